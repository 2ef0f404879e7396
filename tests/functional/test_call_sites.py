"""Activity per call site on real architectures, against hand-counted activations.

The ground truth is computed from plain forward passes: the test replays each
architecture's forward by hand (or reads a producer's output with a plain torch
hook) and counts per unit the positions where the activation was positive.
"""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import CaptureLogger, quiet_trainer_kwargs
from models import (
    gpt2_batch,
    image_batch,
    resnet_tiny,
    sequence_batch,
    tiny_gpt2,
    transformer_encoder,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_gradguard import GradGuard
from lightning_gradguard.functional import ActivityTracker, trace_call_sites


def _counts(h: Tensor, dim: int) -> tuple[Tensor, Tensor, int]:
    """Per unit: positions with h > 0, sum of |h|, positions (the reference count)."""
    moved = h.detach().movedim(dim, -1)
    flat = moved.reshape(-1, moved.shape[-1]).double()
    return (flat > 0).sum(0).double(), flat.abs().sum(0), flat.shape[0]


def _check(tracker: ActivityTracker, expected: dict[str, tuple[Tensor, Tensor, int]]) -> None:
    stats = tracker.stats()
    assert sorted(stats) == sorted(expected)
    for name, (active, abs_sum, samples) in expected.items():
        mean = abs_sum / samples
        assert stats[name].samples == samples, name
        assert stats[name].dead.tolist() == (active == 0).tolist(), name
        torch.testing.assert_close(stats[name].scores, mean / mean.mean(), msg=name)


def _measure(model: nn.Module, *inputs: Any) -> ActivityTracker:
    tracker = ActivityTracker.for_module(model)
    model.train()
    tracker.attach()
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        tracker.detach()
    return tracker


def test_resnet_basic_block_relu_is_two_sites_and_the_first_is_half_dead() -> None:
    model = resnet_tiny()
    with torch.no_grad():
        model.layer1[0].bn1.bias[:4] = -100.0  # channels 0-3 of the block's first ReLU: dead
    x, _ = image_batch()
    tracker = _measure(model, x)
    # Reference: torchvision's BasicBlock forward, replayed by hand in training mode.
    expected: dict[str, tuple[Tensor, Tensor, int]] = {}
    with torch.no_grad():
        h = F.relu(model.bn1(model.conv1(x)))
        expected["relu"] = _counts(h, 1)
        for stage in ("layer1", "layer2"):
            block = getattr(model, stage)[0]
            first = F.relu(block.bn1(block.conv1(h)))
            identity = h if block.downsample is None else block.downsample(h)
            h = F.relu(block.bn2(block.conv2(first)) + identity)
            expected[f"{stage}.0.relu#0"] = _counts(first, 1)
            expected[f"{stage}.0.relu#1"] = _counts(h, 1)
    _check(tracker, expected)
    assert tracker.stats()["layer1.0.relu#0"].dead_fraction == 0.5
    assert tracker.stats()["layer1.0.relu#1"].dead_fraction < 0.5


def test_gpt2_new_gelu_activation_modules_are_sites() -> None:
    model = tiny_gpt2()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.bias[:32] = -100.0  # 32 of 128 units dead
    tokens = gpt2_batch()
    inputs: dict[str, Tensor] = {}
    handles = [
        model.transformer.h[i].mlp.c_fc.register_forward_hook(
            lambda _m, _i, out, i=i: inputs.__setitem__(f"transformer.h.{i}.mlp.act", out)
        )
        for i in range(2)
    ]
    tracker = _measure(model, tokens)
    for handle in handles:
        handle.remove()
    assert type(model.transformer.h[0].mlp.act).__name__ == "NewGELUActivation"

    def new_gelu(x: Tensor) -> Tensor:  # the formula, written out
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))

    _check(tracker, {name: _counts(new_gelu(x), 2) for name, x in inputs.items()})
    assert tracker.stats()["transformer.h.0.mlp.act"].dead_fraction == 0.25


def test_transformer_encoder_functional_relu_sites() -> None:
    model = transformer_encoder()
    with torch.no_grad():
        model.encoder.layers[0].linear1.bias[:16] = -100.0  # half the feed-forward units
    x, _ = sequence_batch()
    inputs: dict[str, Tensor] = {}
    handles = [
        layer.linear1.register_forward_hook(
            lambda _m, _i, out, i=i: inputs.__setitem__(f"encoder.layers.{i}:relu", out)
        )
        for i, layer in enumerate(model.encoder.layers)
    ]
    tracker = _measure(model, x)
    for handle in handles:
        handle.remove()
    _check(tracker, {name: _counts(torch.relu(h), 2) for name, h in inputs.items()})
    assert tracker.stats()["encoder.layers.0:relu"].dead_fraction == 0.5
    sites = {s.name: s for s in tracker.call_sites()}
    assert sites["encoder.layers.1:relu"].before == "encoder.layers.1.linear1"
    assert sites["encoder.layers.1:relu"].after == "encoder.layers.1.linear2"


def test_trace_names_sites_in_call_order_and_leaves_the_model_as_it_was() -> None:
    model = resnet_tiny()
    model.train()
    running = model.bn1.running_mean.clone()
    sites = trace_call_sites(model, image_batch()[0])
    assert [s.name for s in sites] == [
        "relu",
        "layer1.0.relu#0",
        "layer1.0.relu#1",
        "layer2.0.relu#0",
        "layer2.0.relu#1",
    ]
    second = sites[2]
    assert (second.module, second.index, second.calls, second.units) == ("layer1.0.relu", 1, 2, 8)
    assert second.before == "layer1.0.bn2" and second.after == "layer2.0.conv1"
    assert model.training and torch.equal(model.bn1.running_mean, running)


class _Awkward(pl.LightningModule):
    """The three shapes that used to raise inside forward.

    One ``relu`` module at two widths in one forward, a ``Conv1d`` over sequences of
    varying length, and a ReLU on a 1-d output (one unit per sample) whose last batch
    is smaller.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)
        self.out = nn.Linear(3, 1)
        self.relu = nn.ReLU()
        self.scalar_relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu(self.conv(x)).mean(2)  # 6 channels, (N, 6, L) with L varying
        h = self.relu(self.fc(h))  # the same module, 3 wide
        return self.scalar_relu(self.out(h).squeeze(-1))  # (N,)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self(batch).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


class _Sequences(Dataset):
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.items = [torch.randn(4, 5 + i // 4, generator=generator) for i in range(10)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Tensor:
        return self.items[i]


def _batches() -> DataLoader:
    # batches of 4 sequences of length 5, then 6, then a last batch of 2 of length 7
    return DataLoader(_Sequences(), batch_size=4, collate_fn=lambda items: _pad(items))


def _pad(items: list[Tensor]) -> Tensor:
    length = max(t.shape[1] for t in items)
    return torch.stack([F.pad(t, (0, length - t.shape[1])) for t in items])


def test_awkward_shapes_measure_without_raising_under_gradguard_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the report's pictures go to ./gradguard
    model = _Awkward()
    guard = GradGuard(dead_unit_args={"every_n_steps": 3, "window": 3})
    logger = CaptureLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pl.Trainer(logger=logger, callbacks=[guard], **quiet_trainer_kwargs(max_steps=3)).fit(
            model, _batches()
        )
    assert not [w for w in caught if "ActivityTracker" in str(w.message)]
    # Reference: the same three batches replayed by hand.
    expected: dict[str, tuple[Tensor, Tensor, int]] = {}
    parts: dict[str, list[tuple[Tensor, Tensor, int]]] = {
        "relu#0": [],
        "relu#1": [],
        "scalar_relu": [],
    }
    with torch.no_grad():
        for x in _batches():
            first = F.relu(model.conv(x))
            second = F.relu(model.fc(first.mean(2)))
            parts["relu#0"].append(_counts(first, 1))
            parts["relu#1"].append(_counts(second, 1))
            parts["scalar_relu"].append(_counts(F.relu(model.out(second)), 1))
    for name, counts in parts.items():
        expected[name] = (
            sum(c[0] for c in counts),
            sum(c[1] for c in counts),
            sum(c[2] for c in counts),
        )
    logged = logger.at_step(3)
    for name, (active, _, _) in expected.items():
        assert logged[f"dead_units/{name}"] == pytest.approx(float((active == 0).double().mean()))
    assert guard.unit_monitor is not None and guard.unit_monitor.not_covered == {}


def test_swap_functional_relu_reaches_transformer_encoder_layers() -> None:
    from models import EncoderClassifier

    from lightning_gradguard.functional import swap_activations, swap_functional_relu

    model = transformer_encoder()
    x, _ = sequence_batch()
    before = model(x)
    # Reference: torch's own layers built with a leaky activation, same weights.
    reference = EncoderClassifier()
    leaky = functools.partial(F.leaky_relu, negative_slope=0.1)
    for layer in reference.encoder.layers:
        layer.activation, layer.activation_relu_or_gelu = leaky, 0
    reference.load_state_dict(model.state_dict())
    rewritten = swap_functional_relu(model, negative_slope=0.1)
    torch.testing.assert_close(rewritten(x), reference(x))
    assert not torch.allclose(rewritten(x), before)
    rewritten.eval()
    reference.eval()
    with torch.no_grad():  # the inference fast path would compute a ReLU: it must be off
        torch.testing.assert_close(rewritten(x), reference(x))
    assert {type(layer.activation) for layer in model.encoder.layers} == {nn.LeakyReLU}
    # swap_activations on an nn.ReLU activation module turns the fast path off too.
    layer = nn.TransformerEncoderLayer(8, 2, activation=nn.ReLU())
    swap_activations(layer, ["activation"])
    assert layer.activation_relu_or_gelu == 0


def test_compiled_resnet_is_measured_and_traced_after_compilation() -> None:
    from torch._dynamo.utils import counters

    from lightning_gradguard.functional import MeasuringWindows

    model = resnet_tiny()
    with torch.no_grad():
        model.layer1[0].bn1.bias[:4] = -100.0
    compiled = torch.compile(model, backend="eager")
    x, _ = image_batch()
    with torch.no_grad():
        compiled(x)  # compiled before measuring, with the batch size measured
    graphs = counters["stats"]["unique_graphs"]
    tracker, windows = ActivityTracker.for_module(compiled), MeasuringWindows(2, 1)
    for step in range(4):  # windows at steps 0 and 2
        windows.maybe_open(step, tracker)
        with torch.no_grad():
            compiled(x)
        windows.maybe_close(tracker)
    stats = tracker.stats()  # the second window's
    with torch.no_grad():
        first = F.relu(
            model.layer1[0].bn1(model.layer1[0].conv1(F.relu(model.bn1(model.conv1(x)))))
        )
    name = "layer1.0.relu#0"  # named as in the module torch.compile wrapped
    assert stats[name].dead.tolist() == ((first > 0).sum((0, 2, 3)) == 0).tolist()
    assert stats[name].dead_fraction == 0.5 and len(stats) == 5
    names = [s.name for s in trace_call_sites(compiled, x)]
    assert names[:3] == ["relu", "layer1.0.relu#0", "layer1.0.relu#1"]
    assert counters["stats"]["unique_graphs"] == graphs  # measured and traced: no recompilation


class _LitGPT2(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_gpt2()

    def training_step(self, tokens: Tensor, batch_idx: int) -> Tensor:
        return self.model(input_ids=tokens, labels=tokens).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-4)


def test_gradguard_defaults_log_gpt2_sites_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    logger = CaptureLogger()
    guard = GradGuard(dead_unit_args={"every_n_steps": 2, "window": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(logger=logger, callbacks=[guard], **quiet_trainer_kwargs(max_steps=2)).fit(
            _LitGPT2(), DataLoader([gpt2_batch(seed=i)[0] for i in range(8)], batch_size=4)
        )
    keys = {k for k in logger.at_step(1) if k.startswith(("dead_units/", "dormant_units/"))}
    sites = {f"model.transformer.h.{i}.mlp.act" for i in range(2)}
    assert keys == {f"{p}/{s}" for p in ("dead_units", "dormant_units") for s in sites}

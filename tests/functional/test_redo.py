"""ReDo on real blocks: pair inference, recycling through the unit map, the callbacks.

References are independent of the package: pairs written out by hand from the models'
``forward`` code; fresh weights drawn by ``torch.nn.init`` with the documented generator;
dead channels found by a functional forward pass of our own (``F.conv2d``,
``F.batch_norm``, ``F.relu``); parameters, buffers and Adam state compared bit for bit
with copies taken before.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import quiet_trainer_kwargs
from models import (
    gpt2_batch,
    gpt2_loss,
    image_batch,
    resnet_tiny,
    sequence_batch,
    tiny_gpt2,
    transformer_encoder,
)
from torch import Tensor, nn
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader

from lightning_gradguard import DeadUnitMonitor, LayerReinit, UnitRecycler
from lightning_gradguard.functional import (
    UnitPair,
    infer_unit_pairs,
    recycle_units_,
    trace_unit_pairs,
)

SEED = 5


def _generator(seed: int, step: int, offset: int = 0) -> torch.Generator:
    """The callbacks' documented seeding (from ``seed`` and the global step)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 131 + offset)


def _resnet_pairs(prefix: str = "") -> list[UnitPair]:
    """From BasicBlock.forward: conv1 -> bn1 -> relu (1st call) -> conv2, per block."""
    return [
        UnitPair(
            f"{prefix}layer{i}.0.conv1",
            f"{prefix}layer{i}.0.conv2",
            f"{prefix}layer{i}.0.relu#0",
            (f"{prefix}layer{i}.0.bn1",),
        )
        for i in (1, 2)
    ]


def _gpt2_pairs(prefix: str = "") -> list[UnitPair]:
    """From GPT2MLP.forward: c_proj(act(c_fc(x))), both Conv1D."""
    return [
        UnitPair(
            f"{prefix}transformer.h.{i}.mlp.c_fc",
            f"{prefix}transformer.h.{i}.mlp.c_proj",
            f"{prefix}transformer.h.{i}.mlp.act",
        )
        for i in (0, 1)
    ]


def _encoder_pairs(prefix: str = "") -> list[UnitPair]:
    """From TransformerEncoderLayer._ff_block: linear2(dropout(F.relu(linear1(x))))."""
    return [
        UnitPair(
            f"{prefix}encoder.layers.{i}.linear1",
            f"{prefix}encoder.layers.{i}.linear2",
            f"{prefix}encoder.layers.{i}:relu",
        )
        for i in (0, 1)
    ]


def _compiled_in_place() -> nn.Module:
    model = resnet_tiny()
    model.compile(backend="eager")
    model(image_batch()[0])  # compiled before the trace
    return model


# The ResNet's activation sites that have no unambiguous pair, and what the reason names.
RESNET_SKIPPED = {
    "relu": ("layer1.0.conv1 (Conv2d), add_",),  # the stem's relu: a conv and the residual add
    "layer1.0.relu#0": (),  # paired
    "layer1.0.relu#1": (  # after the residual add; feeds the next block's conv1 and downsample
        "its input comes from add_",
        "layer2.0.conv1 (Conv2d), layer2.0.downsample.0 (Conv2d)",
    ),
    "layer2.0.relu#1": ("its input comes from add_", "goes to avgpool (AdaptiveAvgPool2d)"),
}


@pytest.mark.parametrize(
    ("build", "example", "expected"),
    [
        (resnet_tiny, lambda: image_batch()[0], _resnet_pairs()),
        (tiny_gpt2, gpt2_batch, _gpt2_pairs()),
        (transformer_encoder, lambda: sequence_batch()[0], _encoder_pairs()),
        (
            lambda: torch.compile(resnet_tiny(), backend="eager"),
            lambda: image_batch()[0],
            _resnet_pairs("_orig_mod."),
        ),
        (_compiled_in_place, lambda: image_batch()[0], _resnet_pairs()),
    ],
    ids=["resnet", "gpt2", "transformer_encoder", "compiled_resnet", "resnet.compile()"],
)
def test_inferred_pairs_equal_the_pairs_read_from_forward(
    build: Callable[[], nn.Module], example: Callable[[], Any], expected: list[UnitPair]
) -> None:
    model = build()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    found = trace_unit_pairs(model, example())
    assert found.pairs == expected
    for key, value in model.state_dict().items():  # BN statistics restored, nothing changed
        assert torch.equal(value, state[key]), key
    if "layer1.0.conv1" in expected[0].producer:  # the ResNets
        prefix = "_orig_mod." if expected[0].producer.startswith("_orig_mod.") else ""
        skipped = {k.removeprefix(prefix): v.replace(prefix, "") for k, v in found.skipped.items()}
        assert set(skipped) == {k for k, v in RESNET_SKIPPED.items() if v}
        for site, named in RESNET_SKIPPED.items():
            for part in named:
                assert part in skipped[site], (site, skipped[site])
    else:
        assert found.skipped == {}


def test_fx_without_an_example_finds_the_same_resnet_pairs_and_warns_by_name() -> None:
    with pytest.warns(UserWarning, match=r"layer1\.0\.relu#1: its input comes from add"):
        assert infer_unit_pairs(resnet_tiny()) == _resnet_pairs()
    with pytest.raises(ValueError, match="pass an example input"):
        infer_unit_pairs(tiny_gpt2())  # fx cannot trace HF GPT-2


def _train_a_little(model: nn.Module, loss: Callable[[nn.Module], Tensor]) -> torch.optim.Adam:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        loss(model).backward()
        optimizer.step()
    return optimizer


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    out = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    for name, parameter in model.named_parameters():
        for key, value in optimizer.state[parameter].items():
            out[f"{name}/{key}"] = value.detach().clone()
    return out


def _assert_only_changed(
    before: dict[str, Tensor], after: dict[str, Tensor], changed: dict[str, Tensor]
) -> None:
    """Entries in ``changed[key]`` (a bool mask of the tensor) may differ; the rest is identical."""
    assert before.keys() == after.keys()
    for key, old in before.items():
        keep = ~changed[key] if key in changed else torch.ones_like(old, dtype=torch.bool)
        assert torch.equal(after[key][keep], old[keep]), key


def test_recycling_a_resnet_block_resets_conv_rows_bn_channels_and_adam_entries() -> None:
    model = resnet_tiny()
    x, y = image_batch()
    optimizer = _train_a_little(model, lambda m: F.cross_entropy(m(x), y))
    block = model.layer1[0]
    mask = torch.zeros(8, dtype=torch.bool)
    mask[[1, 5]] = True
    with torch.no_grad():
        block.bn1.bias[mask] = -100.0  # channels 1 and 5 dead (what ReDo recycles)
    model.eval()
    output = model(x)
    before = _snapshot(model, optimizer)
    assert (before["layer1.0.bn1.running_mean"][mask] != 0).all()  # the resets are visible
    assert (before["layer1.0.conv1.weight/exp_avg"][mask] != 0).all()
    count = recycle_units_(
        model, _resnet_pairs()[0], mask, optimizer, generator=torch.Generator().manual_seed(7)
    )
    assert count == 2
    after = _snapshot(model, optimizer)
    fresh = torch.empty(8, 8, 3, 3)
    nn.init.kaiming_normal_(fresh, nonlinearity="relu", generator=torch.Generator().manual_seed(7))
    assert torch.equal(block.conv1.weight[mask], fresh[mask])  # He normal, fan_in 8*3*3
    assert torch.all(block.conv2.weight[:, mask] == 0)
    assert torch.all(block.bn1.weight[mask] == 1) and torch.all(block.bn1.bias[mask] == 0)
    assert torch.all(block.bn1.running_mean[mask] == 0)
    assert torch.all(block.bn1.running_var[mask] == 1)
    rows = mask.view(8, 1, 1, 1).expand(8, 8, 3, 3)
    columns = mask.view(1, 8, 1, 1).expand(8, 8, 3, 3)
    changed = {"layer1.0.conv1.weight": rows, "layer1.0.conv2.weight": columns}
    for name in ("weight", "bias", "running_mean", "running_var"):
        changed[f"layer1.0.bn1.{name}"] = mask
    for key in ("exp_avg", "exp_avg_sq"):
        for name in ("conv1.weight", "conv2.weight", "bn1.weight", "bn1.bias"):
            changed[f"layer1.0.{name}/{key}"] = changed[f"layer1.0.{name}"]
            assert torch.all(after[f"layer1.0.{name}/{key}"][changed[f"layer1.0.{name}"]] == 0)
    _assert_only_changed(before, after, changed)
    torch.testing.assert_close(model(x), output)  # dead in, zero out: the same function


def test_recycling_gpt2_conv1d_units_resets_columns_in_and_rows_out() -> None:
    model = tiny_gpt2()
    tokens = gpt2_batch()
    optimizer = _train_a_little(model, lambda m: gpt2_loss(m, tokens))
    mlp = model.transformer.h[0].mlp
    assert tuple(mlp.c_fc.weight.shape) == (32, 128)  # Conv1D: [in, out]
    mask = torch.zeros(128, dtype=torch.bool)
    mask[[0, 3, 77]] = True
    before = _snapshot(model, optimizer)
    count = recycle_units_(
        model, _gpt2_pairs()[0], mask, optimizer, generator=torch.Generator().manual_seed(3)
    )
    assert count == 3
    after = _snapshot(model, optimizer)
    fresh = torch.empty(128, 32)  # [out, in]: fan_in 32, std sqrt(2/32) = 0.25
    nn.init.kaiming_normal_(fresh, nonlinearity="relu", generator=torch.Generator().manual_seed(3))
    assert torch.equal(mlp.c_fc.weight[:, mask], fresh[mask].T)
    assert 0.15 < float(mlp.c_fc.weight[:, mask].detach().std()) < 0.35
    assert torch.all(mlp.c_fc.bias[mask] == 0) and torch.all(mlp.c_proj.weight[mask] == 0)
    prefix = "transformer.h.0.mlp."
    changed = {
        prefix + "c_fc.weight": mask.view(1, 128).expand(32, 128),
        prefix + "c_fc.bias": mask,
        prefix + "c_proj.weight": mask.view(128, 1).expand(128, 32),
    }
    for key in ("exp_avg", "exp_avg_sq"):
        for name in ("c_fc.weight", "c_fc.bias", "c_proj.weight"):
            entries = changed[prefix + name]
            changed[f"{prefix}{name}/{key}"] = entries
            assert (before[f"{prefix}{name}/{key}"][entries] != 0).all()
            assert torch.all(after[f"{prefix}{name}/{key}"][entries] == 0)
    _assert_only_changed(before, after, changed)


# --------------------------------------------------------------------------- callbacks


class _Wrap(pl.LightningModule):
    """A LightningModule around a model, a loss and a fixed list of batches."""

    def __init__(
        self, model: nn.Module, loss: Callable[[nn.Module, Any], Tensor], batches: list[Any]
    ) -> None:
        super().__init__()
        self.model = model
        self._loss = loss
        self._batches = batches

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._loss(self.model, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._batches, batch_size=None)  # type: ignore[arg-type]


def _fit(module: pl.LightningModule, callbacks: list[Any], steps: int) -> None:
    trainer = pl.Trainer(
        max_steps=steps, logger=False, callbacks=callbacks, **quiet_trainer_kwargs()
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)


def _image_loss(model: nn.Module, batch: Any) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def _first_block_relu(model: Any, x: Tensor) -> Tensor:
    """layer1.0's first ReLU output, by functional ops with batch statistics (training mode)."""
    h = F.conv2d(x, model.conv1.weight, padding=1)
    h = F.relu(F.batch_norm(h, None, None, model.bn1.weight, model.bn1.bias, training=True))
    block = model.layer1[0]
    h = F.conv2d(h, block.conv1.weight, padding=1)
    return F.relu(F.batch_norm(h, None, None, block.bn1.weight, block.bn1.bias, training=True))


def test_unit_recycler_revives_a_channel_killed_through_batchnorm() -> None:
    net = resnet_tiny()
    with torch.no_grad():
        net.layer1[0].bn1.bias[3] = -100.0  # BN output < 0 everywhere: channel 3 is dead
    batches = [image_batch(seed=s) for s in range(4)]
    with torch.no_grad():
        assert all((_first_block_relu(net, x)[:, 3] <= 0).all() for x, _ in batches)
        assert all((_first_block_relu(net, x)[:, c] > 0).any() for x, _ in batches for c in (0, 7))
    recycler = UnitRecycler(every_n_steps=4, window=2, tau=0.0, seed=SEED)
    _fit(_Wrap(net, _image_loss, batches), [recycler], steps=4)
    assert recycler.unit_pairs == _resnet_pairs("model.")
    assert set(recycler.skipped) == {f"model.{k}" for k, v in RESNET_SKIPPED.items() if v}
    layers = [(e["step"], e["layer"]) for e in recycler.events]
    assert (2, "model.layer1.0.conv1") in layers
    with torch.no_grad():  # revived: active again, on every batch, two steps after
        assert all((_first_block_relu(net, x)[:, 3] > 0).any() for x, _ in batches)
    assert abs(float(net.layer1[0].bn1.bias[3])) < 1.0  # reset to 0, then trained
    assert abs(float(net.layer1[0].bn1.running_mean[3])) < 5.0  # reset, then tracked


@pytest.mark.parametrize("arch", ["gpt2", "transformer_encoder"])
def test_unit_recycler_recycles_dead_ffn_units_on_transformers(arch: str) -> None:
    dead = [2, 9, 30]
    if arch == "gpt2":
        model: Any = tiny_gpt2()
        fc, proj = model.transformer.h[0].mlp.c_fc, model.transformer.h[0].mlp.c_proj
        in_dim = 32
        batches: list[Any] = [gpt2_batch(seed=s) for s in range(2)]

        def loss(m: nn.Module, b: Any) -> Tensor:
            return gpt2_loss(m, b)

        def outgoing(w: Tensor) -> Tensor:
            return w[dead]  # Conv1D [in, out]: rows

        def incoming(w: Tensor) -> Tensor:
            return w[:, dead].T

        units = 128
        producer = "model.transformer.h.0.mlp.c_fc"
    else:
        model = transformer_encoder()
        fc, proj = model.encoder.layers[0].linear1, model.encoder.layers[0].linear2
        in_dim = 16
        batches = [sequence_batch(seed=s) for s in range(2)]
        loss = _image_loss

        def outgoing(w: Tensor) -> Tensor:  # type: ignore[misc]
            return w[:, dead]  # Linear [out, in]: columns

        def incoming(w: Tensor) -> Tensor:  # type: ignore[misc]
            return w[dead]

        units = 32
        producer = "model.encoder.layers.0.linear1"
    with torch.no_grad():
        fc.bias[dead] = -100.0  # GELU(-100) and ReLU(-100) are exactly 0: dormant, score 0
    recycler = UnitRecycler(every_n_steps=4, window=2, tau=0.0, seed=SEED)
    _fit(_Wrap(model, loss, batches), [recycler], steps=2)  # recycled at the end, step 2
    expected = _gpt2_pairs("model.") if arch == "gpt2" else _encoder_pairs("model.")
    assert recycler.unit_pairs == expected
    assert [(e["step"], e["layer"], e["detail"].split(" units")[0]) for e in recycler.events] == [
        (2, producer, f"3 of {units}")
    ]
    fresh = torch.empty(units, in_dim)
    nn.init.kaiming_normal_(fresh, nonlinearity="relu", generator=_generator(SEED, 2, 0))
    assert torch.equal(incoming(fc.weight.detach()), fresh[dead])
    assert torch.all(fc.bias[dead] == 0) and torch.all(outgoing(proj.weight) == 0)


def test_unit_recycler_measures_every_window_of_a_compiled_model() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        net[0].bias[[1, 4]] = -100.0
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(16, 16, generator=generator), torch.randint(0, 4, (16,))) for _ in range(8)
    ]

    class Killer(pl.Callback):  # kills two more units at step 3, after the first recycling
        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, idx: int) -> None:
            if trainer.global_step == 3:
                with torch.no_grad():
                    net[0].bias[[10, 11]] = -100.0

    compiled = torch.compile(net, backend="eager")  # same batch size before and during fit
    compiled(batches[0][0]).sum().backward()
    net.zero_grad()
    graphs = counters["stats"]["unique_graphs"]
    recycler = UnitRecycler(every_n_steps=4, window=2, tau=0.0, seed=SEED)
    _fit(_Wrap(compiled, _image_loss, batches), [Killer(), recycler], steps=6)
    assert recycler.unit_pairs == [
        UnitPair("model._orig_mod.0", "model._orig_mod.2", "model._orig_mod.1")
    ]
    windows = {e["step"]: e["detail"] for e in recycler.events}
    assert windows[2].startswith("2 of 32") and windows[6].startswith("2 of 32")
    assert torch.all(net[0].bias[[1, 4, 10, 11]].abs() < 1)  # all four recycled
    # Tracing and windows ran eagerly: no recompilation (hooks never entered a graph).
    assert counters["stats"]["unique_graphs"] == graphs


def test_explicit_pairs_name_the_norm_and_are_checked() -> None:
    module = _Wrap(resnet_tiny(), _image_loss, [])
    prefix = "model.layer1.0."
    good = UnitRecycler(
        pairs=[[prefix + "conv1", prefix + "conv2", prefix + "relu#0", prefix + "bn1"]]
    )
    good.on_fit_start(None, module)
    assert good.unit_pairs == _resnet_pairs("model.")[:1]
    bad = UnitRecycler(
        pairs=[[prefix + "conv1", prefix + "conv2", prefix + "relu#0", prefix + "conv2"]]
    )
    with pytest.raises(ValueError, match=r"norm 'model.layer1.0.conv2' is a Conv2d, not a normal"):
        bad.on_fit_start(None, module)
    with pytest.raises(ValueError, match="triples"):
        UnitRecycler(pairs=[[prefix + "conv1", prefix + "conv2"]])


def test_layer_reinit_draws_a_conv1d_with_its_fans_and_refuses_the_tied_head() -> None:
    model = tiny_gpt2()
    batches = [gpt2_batch(seed=s) for s in range(2)]
    reinit = LayerReinit(at_steps=[1], layers=["model.transformer.h.0.mlp.c_fc"], seed=SEED)
    module = _Wrap(model, gpt2_loss, batches)
    _fit(module, [reinit], steps=1)  # re-initialized at the end of the only step
    fc = model.transformer.h[0].mlp.c_fc
    # He normal with Conv1D's real fan-in (its in = 32), drawn in the weight's own layout.
    fresh = torch.empty(32, 128).normal_(0.0, math.sqrt(2 / 32), generator=_generator(SEED, 1))
    assert torch.equal(fc.weight.detach(), fresh)
    assert 0.22 < float(fc.weight.detach().std()) < 0.28  # sqrt(2 / 32), not sqrt(2 / 128) = 0.125
    assert torch.all(fc.bias == 0)
    with pytest.raises(ValueError, match=r"share their weight with \['model.transformer.wte'\]"):
        _fit(
            _Wrap(tiny_gpt2(), gpt2_loss, batches),
            [LayerReinit(at_steps=[1], layers=["model.lm_head"])],
            1,
        )


@pytest.mark.parametrize("recycler_first", [True, False])
def test_unit_recycler_and_dead_unit_monitor_name_the_same_sites(recycler_first: bool) -> None:
    # Both record the first step with a TorchFunctionMode, entered and left in either order.
    recycler = UnitRecycler(every_n_steps=2, window=1, tau=0.0)
    monitor = DeadUnitMonitor(every_n_steps=2, window=1)
    batches = [sequence_batch(seed=s) for s in range(2)]
    callbacks = [recycler, monitor] if recycler_first else [monitor, recycler]
    _fit(_Wrap(transformer_encoder(), _image_loss, batches), callbacks, steps=2)
    assert recycler.unit_pairs == _encoder_pairs("model.")
    assert sorted(monitor.last_stats) == [p.activation for p in recycler.unit_pairs]
    assert torch._C._len_torch_function_stack() == 0  # every mode left

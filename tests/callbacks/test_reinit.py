"""``InitAtStart``, ``UnitRecycler`` and ``LayerReinit`` in real (tiny) Lightning runs.

The references are plain torch, never ``lightning_gradguard``: ``torch.nn.init`` with a
generator seeded as the callbacks document it (from ``seed`` and the global step: every
rank draws the same), forward passes of our own (``F.linear``, ``torch.relu``...) over
the batches the run trained on, gradient norms read in ``on_before_optimizer_step``,
and the parameters and optimizer state read by probe callbacks listed just before and
just after the callback under test, in the same hook.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import CaptureLogger, classification_data, module_grad_norms, quiet_trainer_kwargs
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_gradguard import GradNormMonitor, InitAtStart, LayerReinit, UnitRecycler

SEED = 11


def _generator(seed: int, step: int, offset: int = 0) -> torch.Generator:
    """The documented seeding: from ``seed`` and the step (layer/pair ``offset`` of a step).

    ``InitAtStart`` draws from step 0; ``UnitRecycler`` and ``LayerReinit`` use the global
    step at the moment of the change, ``step * 131 + i`` for the ``i``-th pair / layer.
    """
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 131 + offset)


class _Module(pl.LightningModule):
    """A LightningModule around an ``nn.Sequential`` that records what the tests compare.

    - ``alive``: per training step, per ReLU of ``net``, which units were positive on
      that step's batch, by a forward pass of our own (functional ops, so no module
      hook, the package's included, sees it);
    - ``linear_std``: per Linear, the std of its output on the first training batch;
    - ``grad_norms``: per step, each module's gradient norm (plain torch);
    - ``at_train_start``: the parameters when training starts (after every callback's
      ``on_train_start``).
    """

    def __init__(
        self,
        net: nn.Sequential,
        optimizer: str = "adam",
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        batch_size: int = 32,
        features: int = 16,
        classes: int = 4,
        kill: dict[int, tuple[str, list[int]]] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.optimizer_name = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.data = classification_data(features=features, classes=classes)
        self.kill = kill or {}  # at global step: set these units' biases to -100
        self.alive: list[dict[str, Tensor]] = []
        self.linear_std: dict[str, float] = {}
        self.grad_norms: list[dict[str, float]] = []
        self.at_train_start: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    @torch.no_grad()
    def _own_forward(self, x: Tensor) -> None:
        alive: dict[str, Tensor] = {}
        h = x
        first = not self.linear_std
        for name, module in self.net.named_children():
            if isinstance(module, nn.Linear):
                h = F.linear(h, module.weight, module.bias)
                if first:
                    self.linear_std[f"net.{name}"] = float(h.std())
            elif isinstance(module, nn.ReLU):
                h = torch.relu(h)
                alive[f"net.{name}"] = (h > 0).any(0)
            elif isinstance(module, nn.LeakyReLU):
                h = F.leaky_relu(h, module.negative_slope)
            elif isinstance(module, nn.Tanh):
                h = torch.tanh(h)
            elif isinstance(module, nn.Sigmoid):
                h = torch.sigmoid(h)
            else:
                raise TypeError(type(module).__name__)
        self.alive.append(alive)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        self._own_forward(x)
        return F.cross_entropy(self(x), y)

    def on_train_start(self) -> None:
        self.at_train_start = {n: p.detach().clone() for n, p in self.named_parameters()}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.global_step in self.kill:
            layer, units = self.kill[self.global_step]
            with torch.no_grad():
                self.get_submodule(layer).bias[units] = -100.0

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.grad_norms.append(module_grad_norms(self))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)


class _Probe(pl.Callback):
    """Copies the parameters and optimizer state at the end of the batch that ends on ``step``."""

    def __init__(self, step: int, also: Callable[[Any], Any] | None = None) -> None:
        self.step = step
        self.also = also
        self.params: dict[str, Tensor] = {}
        self.state: dict[str, dict[str, Tensor]] = {}
        self.extra: Any = None

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != self.step or self.params:
            return
        self.params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self.state = _optimizer_state(trainer, pl_module)
        if self.also is not None:
            self.extra = self.also(trainer)


def _optimizer_state(trainer: Any, pl_module: Any) -> dict[str, dict[str, Tensor]]:
    optimizer = trainer.optimizers[0]
    return {
        n: {k: v.clone() for k, v in optimizer.state[p].items()}
        for n, p in pl_module.named_parameters()
        if p in optimizer.state
    }


def _fit(
    model: pl.LightningModule,
    callbacks: list,
    steps: int,
    ckpt_path: Path | None = None,
    **kwargs: Any,
) -> tuple[CaptureLogger, pl.Trainer]:
    logger = CaptureLogger()
    trainer = pl.Trainer(
        logger=logger, callbacks=callbacks, **quiet_trainer_kwargs(max_steps=steps, **kwargs)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, ckpt_path=ckpt_path)
    return logger, trainer


def _assert_same(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(actual[name], value), name


# --------------------------------------------------------------------------- InitAtStart


def _mixed_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.LeakyReLU(0.1), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
    )


@pytest.mark.parametrize(
    ("scheme", "kwargs"),
    [
        ("kaiming_normal", {}),
        ("xavier_uniform", {}),
        ("orthogonal", {}),
        ("normal", {"std": 0.02, "residual_projections": ["net.2"], "n_layers": 2}),
    ],
)
def test_init_at_start_equals_torch_init_with_the_seeded_generator(
    scheme: str, kwargs: dict[str, Any]
) -> None:
    model = _Module(_mixed_net(), optimizer="sgd")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    callback = InitAtStart(scheme, seed=SEED, **kwargs)
    _fit(model, [callback], steps=1)
    generator = _generator(SEED, 0)  # one generator, the layers drawn in module order
    expected: dict[str, Tensor] = {}
    gains = (("net.0", "leaky_relu", 0.1), ("net.2", "tanh", 0.0), ("net.4", "linear", 0.0))
    for name, nl, slope in gains:
        weight = torch.empty_like(before[f"{name}.weight"])
        gain = nn.init.calculate_gain(nl, slope if nl == "leaky_relu" else None)  # type: ignore[arg-type]
        if scheme == "kaiming_normal":
            nn.init.kaiming_normal_(weight, a=slope, nonlinearity=nl, generator=generator)  # type: ignore[arg-type]
        elif scheme == "xavier_uniform":
            nn.init.xavier_uniform_(weight, gain=gain, generator=generator)
        elif scheme == "orthogonal":
            nn.init.orthogonal_(weight, gain=gain, generator=generator)
        else:  # GPT-2: fixed std, residual projections scaled by 1/sqrt(2 * n_layers)
            std = 0.02 / math.sqrt(4) if name == "net.2" else 0.02
            nn.init.normal_(weight, 0.0, std, generator=generator)
        expected[f"{name}.weight"] = weight
        expected[f"{name}.bias"] = torch.zeros_like(before[f"{name}.bias"])
    _assert_same(model.at_train_start, expected)
    assert not torch.equal(before["net.0.weight"], expected["net.0.weight"])
    assert callback.report == {"net.0": "leaky_relu", "net.2": "tanh", "net.4": "linear"}


def test_init_at_start_validates_its_arguments_early() -> None:
    with pytest.raises(ValueError, match=r"InitAtStart\(scheme='he'\): scheme must be one of"):
        InitAtStart("he")
    with pytest.raises(ValueError, match="n_layers=None"):
        InitAtStart("normal", residual_projections=["*.c_proj"])
    with pytest.raises(ValueError, match="nonlinearity='swish'"):
        InitAtStart("xavier_normal", nonlinearity="swish")
    with pytest.raises(TypeError, match="generator"):  # the callback draws from `seed`
        InitAtStart("orthogonal", generator=torch.Generator())  # type: ignore[call-arg]


def _tanh_net(depth: int = 6, width: int = 32) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 4))


def test_init_at_start_lsuv_reaches_the_target_std_on_the_first_batch() -> None:
    target, tol = 0.5, 0.05
    reference = _Module(_tanh_net(), optimizer="sgd", features=32)
    reference._own_forward(reference.data.tensors[0][:32])  # the default init, same batch
    assert max(abs(s - target) for s in reference.linear_std.values()) > 5 * tol
    model = _Module(_tanh_net(), optimizer="sgd", features=32)
    callback = InitAtStart("lsuv", seed=SEED, target_std=target, tol=tol)
    _fit(model, [callback], steps=1)
    # Our own forward on the first training batch, with the weights LSUV left.
    assert set(model.linear_std) == {f"net.{i}" for i in range(0, 13, 2)}
    for name, std in model.linear_std.items():
        assert abs(std - target) < tol, (name, std)
    assert callback.report.not_converged == [] and callback.report.unreached == []


@pytest.mark.parametrize("scheme", ["xavier_normal", "lsuv"])
def test_init_at_start_is_not_reapplied_on_resume(scheme: str, tmp_path: Path) -> None:
    first = _Module(_tanh_net(depth=2), optimizer="sgd", lr=0.1, features=32)
    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path, save_last=True, every_n_train_steps=4
    )
    _fit(first, [InitAtStart(scheme, seed=SEED), checkpoint], steps=4, enable_checkpointing=True)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 4
    state = {k: v for k, v in saved["state_dict"].items()}
    # Training moved the weights away from what InitAtStart produced.
    assert not torch.equal(state["net.0.weight"], first.at_train_start["net.0.weight"])
    resumed = _Module(_tanh_net(depth=2), optimizer="sgd", lr=0.1, features=32)
    callback = InitAtStart(scheme, seed=SEED)
    _fit(resumed, [callback], steps=5, ckpt_path=tmp_path / "last.ckpt")
    # Training resumes from the checkpoint's weights, not from a fresh initialization.
    _assert_same(resumed.at_train_start, state)
    if scheme == "lsuv":
        assert callback.report is None  # LSUV did not even run


# --------------------------------------------------------------------------- UnitRecycler

DEAD_0 = [3, 7, 20]  # units of net.0 (measured at the ReLU net.1) with bias -100
DEAD_2 = [1, 5]  # units of net.2 (ReLU net.3)


def _relu_net(output_relu: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU()]
    layers.append(nn.Linear(32, 4))
    if output_relu:
        layers.append(nn.ReLU())
    net = nn.Sequential(*layers)
    with torch.no_grad():
        net[0].bias[DEAD_0] = -100.0
        net[2].bias[DEAD_2] = -100.0
    return net


def _window_dead(model: _Module, steps: range, relu: str) -> Tensor:
    """Units our own forward never saw positive on the batches of ``steps``."""
    alive = torch.zeros_like(model.alive[steps[0]][relu])
    for step in steps:
        alive |= model.alive[step][relu]
    return ~alive


def _expected_recycle(
    params: dict[str, Tensor],
    state: dict[str, dict[str, Tensor]],
    masks: list[tuple[str, str, Tensor]],
    step: int,
) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """ReDo by hand, pair after pair: He-normal rows (ReLU gain), bias 0, outgoing 0."""
    params = {k: v.clone() for k, v in params.items()}
    state = {k: {s: v.clone() for s, v in d.items()} for k, d in state.items()}
    for index, (producer, consumer, mask) in enumerate(masks):
        fresh = torch.empty_like(params[f"{producer}.weight"])
        nn.init.kaiming_normal_(fresh, nonlinearity="relu", generator=_generator(SEED, step, index))
        params[f"{producer}.weight"][mask] = fresh[mask]
        params[f"{producer}.bias"][mask] = 0.0
        params[f"{consumer}.weight"][:, mask] = 0.0
        for name, index_ in (
            (f"{producer}.weight", (mask,)),
            (f"{producer}.bias", (mask,)),
            (f"{consumer}.weight", (slice(None), mask)),
        ):
            for key in ("exp_avg", "exp_avg_sq"):
                state[name][key][index_] = 0.0  # Adam's per-tensor step stays
    return params, state


def test_unit_recycler_recycles_exactly_the_dead_units() -> None:
    # Adam with L2 weight decay: the dead units' weights get a gradient (decay only), so
    # their moments are non-zero and zeroing them is visible.
    model = _Module(_relu_net(), weight_decay=0.1)
    before, after = _Probe(step=2), _Probe(step=2)
    recycler = UnitRecycler(every_n_steps=4, window=2, tau=0.0, seed=SEED)
    logger, _ = _fit(model, [before, recycler, after], steps=6)
    # Windows: steps 0-1 (recycled at the end of step 1's batch, global_step 2), 4-5.
    dead_0 = _window_dead(model, range(0, 2), "net.1")
    dead_2 = _window_dead(model, range(0, 2), "net.3")
    assert dead_0.nonzero().flatten().tolist() == DEAD_0  # our construction holds
    assert set(DEAD_2) < set(dead_2.nonzero().flatten().tolist())  # and one died by itself
    count_0, count_2 = int(dead_0.sum()), int(dead_2.sum())
    assert logger.at_step(2) == {
        "recycled_units/net.0": float(count_0),
        "recycled_units/net.2": float(count_2),
    }
    params, state = _expected_recycle(
        before.params, before.state, [("net.0", "net.2", dead_0), ("net.2", "net.4", dead_2)], 2
    )
    _assert_same(after.params, params)
    for name in params:
        _assert_same(after.state[name], state[name])
    # New incoming rows, not the old ones; the moments of those entries were non-zero.
    assert (after.params["net.0.weight"][dead_0] != before.params["net.0.weight"][dead_0]).all()
    assert (before.state["net.0.weight"]["exp_avg"][dead_0] != 0).all()
    assert (before.state["net.2.weight"]["exp_avg_sq"][:, dead_0] != 0).all()
    assert (after.state["net.2.weight"]["exp_avg_sq"][:, dead_0] == 0).all()
    # The second window is measured on its own batches, after the recycling.
    late_0 = _window_dead(model, range(4, 6), "net.1")
    late_2 = _window_dead(model, range(4, 6), "net.3")
    assert logger.at_step(6) == {
        "recycled_units/net.0": float(late_0.sum()),
        "recycled_units/net.2": float(late_2.sum()),
    }
    assert [k for _, m in logger.calls for k in m if "net.4" in k] == []  # output: no producer
    expected_events = [
        (2, "recycle", "net.0", f"{count_0} of 32"),
        (2, "recycle", "net.2", f"{count_2} of 32"),
    ]
    for late, layer in ((late_0, "net.0"), (late_2, "net.2")):
        if late.any():
            expected_events.append((6, "recycle", layer, f"{int(late.sum())} of 32"))
    assert [
        (e["step"], e["kind"], e["layer"], e["detail"].split(" units")[0]) for e in recycler.events
    ] == expected_events
    assert recycler.recycled_total == count_0 + count_2 + int(late_0.sum()) + int(late_2.sum())


def test_output_layer_is_never_a_producer() -> None:
    # The output layer feeds a ReLU whose units are all dead (bias -100): nothing reads
    # them, so they are not recycled.
    net = _relu_net(output_relu=True)
    with torch.no_grad():
        net[4].bias.fill_(-100.0)
    model = _Module(net)
    before, after = _Probe(step=2), _Probe(step=2)
    recycler = UnitRecycler(every_n_steps=2, window=2, tau=0.0, seed=SEED)
    logger, _ = _fit(model, [before, recycler, after], steps=2)
    assert _window_dead(model, range(0, 2), "net.5").all()  # every output unit is dead
    dead_2 = _window_dead(model, range(0, 2), "net.3")
    assert logger.at_step(2) == {
        "recycled_units/net.0": float(_window_dead(model, range(0, 2), "net.1").sum()),
        "recycled_units/net.2": float(dead_2.sum()),
    }
    assert {e["layer"] for e in recycler.events} == {"net.0", "net.2"}
    assert torch.equal(after.params["net.4.bias"], before.params["net.4.bias"])  # still -100
    keep = ~dead_2
    assert torch.equal(
        after.params["net.4.weight"][:, keep], before.params["net.4.weight"][:, keep]
    )


def _recycler_run(
    tmp_path: Path, steps: int, ckpt: Path | None = None, save: bool = False
) -> tuple[_Module, pl.Trainer, UnitRecycler]:
    # 4 batches an epoch; windows at steps 0, 4, 8, 12; two more units killed at step 8.
    model = _Module(_relu_net(), weight_decay=0.1, batch_size=64, kill={8: ("net.0", [10, 11])})
    recycler = UnitRecycler(every_n_steps=4, window=2, tau=0.0, seed=SEED)
    callbacks: list = [recycler]
    if save:
        callbacks.append(
            pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=8)
        )
    _, trainer = _fit(model, callbacks, steps=steps, ckpt_path=ckpt, enable_checkpointing=save)
    return model, trainer, recycler


def test_unit_recycler_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    straight, straight_trainer, straight_recycler = _recycler_run(tmp_path, 16)
    _recycler_run(tmp_path, 8, save=True)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)  # plain state only
    assert saved["global_step"] == 8
    (key,) = [k for k in saved["callbacks"] if k.startswith("UnitRecycler")]
    state = saved["callbacks"][key]
    events = saved["callbacks"]["RunRecord"]["events"]  # the run record holds the events
    assert [(e["step"], e["layers"]) for e in events] == [(2, ["net.0"]), (2, ["net.2"])]
    first_window = [_window_dead(straight, range(0, 2), relu).sum() for relu in ("net.1", "net.3")]
    assert state["recycled_total"] == int(sum(first_window))
    fresh = UnitRecycler(every_n_steps=4, window=2, tau=0.0, seed=SEED)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    resumed, resumed_trainer, resumed_recycler = _recycler_run(
        tmp_path, 16, ckpt=tmp_path / "last.ckpt"
    )
    # The units killed at step 8 were recycled after the resume too (window 8-9).
    dead = _window_dead(straight, range(8, 10), "net.1")
    assert {10, 11} <= set(dead.nonzero().flatten().tolist())
    assert (10, "net.0") in [(e["step"], e["layer"]) for e in resumed_recycler.events]
    assert resumed_recycler.events == straight_recycler.events
    assert resumed_recycler.recycled_total == straight_recycler.recycled_total
    _assert_same(
        dict(resumed.named_parameters()),  # type: ignore[arg-type]
        dict(straight.named_parameters()),  # type: ignore[arg-type]
    )
    straight_state = _optimizer_state(straight_trainer, straight)
    resumed_state = _optimizer_state(resumed_trainer, resumed)
    for name, value in straight_state.items():
        _assert_same(resumed_state[name], value)


def test_unit_recycler_arguments_and_impossible_pairs() -> None:
    for kwargs, match in (
        ({"every_n_steps": 0}, "every_n_steps=0"),
        ({"every_n_steps": 4, "window": 5}, "window=5"),
        ({"tau": -0.1}, "tau=-0.1"),
        ({"scheme": "he"}, "scheme='he'"),
        ({"scheme": "lsuv"}, "lsuv"),
        ({"pairs": [["net.0", "net.2"]]}, "triples"),
    ):
        with pytest.raises(ValueError, match=match):
            UnitRecycler(**kwargs)
    for pairs, match in (
        ([["net.0", "net.9", "net.1"]], r"do not exist: \['net.9'\]"),
        ([["net.1", "net.2", "net.3"]], "producer 'net.1' is a ReLU, not Linear/Conv"),
        ([["net.4", "net.0", "net.3"]], "not a producer/consumer pair"),
        ([["net.2", "net.0", "net.3"]], "reads 16 inputs but producer .net.2. makes 32"),
    ):
        model = _Module(_relu_net())
        with pytest.raises(ValueError, match=match):
            _fit(model, [UnitRecycler(every_n_steps=2, window=1, pairs=pairs)], steps=2)
        assert model.alive == []  # refused before the first training step

    class Residual(_Module):  # the only activation feeds a residual add: no pair
        def __init__(self) -> None:
            super().__init__(nn.Sequential())
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 4)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            x, y = batch
            return F.cross_entropy(self.b(x + torch.relu(self.a(x))), y)

    with pytest.raises(
        ValueError, match=r"could not infer producer/consumer pairs.*:relu: its output goes to add"
    ):
        _fit(Residual(), [UnitRecycler(every_n_steps=2, window=1)], steps=1)


# --------------------------------------------------------------------------- LayerReinit


def _deep_sigmoid() -> nn.Sequential:
    """Scenario S1 in miniature (as in test_grad_norm_monitor): the first layers vanish."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(16):
        layer = nn.Linear(16, 16 if i < 15 else 4)
        nn.init.normal_(layer.weight, 0.0, 0.05)
        nn.init.zeros_(layer.bias)
        layers += [layer] + ([nn.Sigmoid()] if i < 15 else [])
    return nn.Sequential(*layers)


def _expected_reinit(
    params: dict[str, Tensor], layers: list[tuple[str, str]], step: int, seed: int
) -> dict[str, Tensor]:
    """Kaiming-normal with the consuming activation's gain, bias 0, by torch.nn.init."""
    params = {k: v.clone() for k, v in params.items()}
    for offset, (name, nonlinearity) in enumerate(layers):
        weight = torch.empty_like(params[f"{name}.weight"])
        nn.init.kaiming_normal_(
            weight,
            nonlinearity=nonlinearity,  # type: ignore[arg-type]
            generator=_generator(seed, step, offset),
        )
        params[f"{name}.weight"] = weight
        params[f"{name}.bias"] = torch.zeros_like(params[f"{name}.bias"])
    return params


def test_layer_reinit_reinitializes_vanishing_layers_once() -> None:
    threshold, patience = 1e-6, 3
    model = _Module(_deep_sigmoid(), lr=1e-3)
    monitor = GradNormMonitor(log_every_n_steps=5, patience=patience, vanishing_threshold=threshold)

    def health(trainer: Any) -> tuple[list[str], Tensor, Tensor]:
        view = monitor._views[0]
        return list(view.grouping.names), view.health.vanishing.clone(), view.health.vanish_streak

    before = _Probe(step=patience, also=health)
    reinit = LayerReinit(check_every_n_steps=1, max_reinits_per_layer=1, seed=SEED)
    after = _Probe(step=patience, also=health)
    _fit(model, [monitor, before, reinit, after], steps=2 * patience + 1)
    # Plain-torch norms: the layers below the threshold on each of the first `patience` steps.
    norms = model.grad_norms
    vanished = [n for n in norms[0] if all(norms[s][n] < threshold for s in range(patience))]
    assert "net.0" in vanished and "net.30" not in vanished
    # Re-initialized at the end of step `patience - 1`'s batch (global_step == patience).
    assert [(e["step"], e["layer"], e["detail"]) for e in reinit.events] == [
        (patience, name, "vanishing gradients") for name in vanished
    ]
    assert reinit.reinit_counts == dict.fromkeys(vanished, 1)
    expected = _expected_reinit(
        before.params, [(name, "sigmoid") for name in vanished], patience, SEED
    )
    _assert_same(after.params, expected)
    assert set(after.state) == set(before.state) == {n for n, _ in model.named_parameters()}
    for name, state in after.state.items():
        layer = name.rsplit(".", 1)[0]
        if layer in vanished:  # moments and Adam's step back to zero
            assert all(torch.count_nonzero(v) == 0 for v in state.values()), name
        else:
            _assert_same(state, before.state[name])
            assert float(state["step"]) == patience
    # The monitor's streak for those layers restarted; its flags were set before.
    names, flags_before, _ = before.extra
    _, flags_after, streak_after = after.extra
    index = [names.index(name) for name in vanished]
    assert flags_before[index].all() and not flags_after[index].any()
    assert (streak_after[index] == 0).all()
    # They vanished again for `patience` steps after the re-init (plain-torch norms),
    # and were not re-initialized a second time (max_reinits_per_layer=1).
    again = [
        n for n in vanished if all(norms[s][n] < threshold for s in range(patience, 2 * patience))
    ]
    assert again, "the re-initialized layers should vanish again in this deep sigmoid stack"
    assert monitor._views[0].health.vanishing[[names.index(n) for n in again]].all()


def test_layer_reinit_on_a_schedule_without_a_monitor() -> None:
    model = _Module(_relu_net())
    before, after = _Probe(step=2), _Probe(step=2)
    reinit = LayerReinit(at_steps=[2], layers=["net.0", "net.4"], seed=SEED)
    _fit(model, [before, reinit, after], steps=4)
    # net.0 feeds a ReLU (He gain), net.4 is the output (linear gain)
    expected = _expected_reinit(before.params, [("net.0", "relu"), ("net.4", "linear")], 2, SEED)
    _assert_same(after.params, expected)
    assert set(after.state) == set(before.state) == {n for n, _ in model.named_parameters()}
    for name, state in after.state.items():
        if name.startswith(("net.0.", "net.4.")):
            assert all(torch.count_nonzero(v) == 0 for v in state.values()), name
        else:
            _assert_same(state, before.state[name])
    assert [(e["step"], e["kind"], e["layer"], e["detail"]) for e in reinit.events] == [
        (2, "reinit", "net.0", "schedule"),
        (2, "reinit", "net.4", "schedule"),
    ]
    assert reinit.reinit_counts == {}  # max_reinits_per_layer limits the vanishing rule only
    state = reinit.state_dict()
    assert state == {"reinit_counts": {}, "scheduled_at": 2}


def test_layer_reinit_needs_a_monitor_or_a_schedule_and_real_layers() -> None:
    for kwargs, match in (
        ({"at_steps": [3]}, "at_steps needs layers"),
        ({"check_every_n_steps": 0}, "check_every_n_steps=0"),
        ({"max_reinits_per_layer": 0}, "max_reinits_per_layer=0"),
        ({"scheme": "lsuv"}, "lsuv"),
        ({"scheme": "glorot"}, "scheme='glorot'"),
    ):
        with pytest.raises(ValueError, match=match):
            LayerReinit(**kwargs)
    cases: list[tuple[list, str]] = [
        ([LayerReinit()], "add GradNormMonitor\\(\\) before LayerReinit"),
        ([LayerReinit(), GradNormMonitor()], "add GradNormMonitor\\(\\) before LayerReinit"),
        ([GradNormMonitor(detect=False), LayerReinit()], "has detect=False"),
        (
            [GradNormMonitor(), LayerReinit(layers=["net.1", "nope"])],
            r"\['net.1', 'nope'\] are not Linear/Conv modules",
        ),
        (
            [LayerReinit(at_steps=[1], layers=["net"])],
            r"\['net'\] are not Linear/Conv modules",
        ),
    ]
    for callbacks, match in cases:
        model = _Module(_relu_net())
        with pytest.raises(ValueError, match=match):
            _fit(model, callbacks, steps=1)
        assert model.alive == []

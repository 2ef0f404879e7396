"""DeadUnitMonitor in real (tiny) Lightning runs."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import CaptureLogger, TinyMLP, quiet_trainer_kwargs
from torch import nn

from lightning_gradguard import DeadUnitMonitor


class _Dying(TinyMLP):
    """The second hidden layer starts with a bias of -100: all its ReLU units are dead."""

    def __init__(self, lr: float = 0.1, **kwargs: Any) -> None:
        super().__init__(sizes=(16, 32, 32, 4), lr=lr, **kwargs)
        with torch.no_grad():
            self.net[2].bias.fill_(-100.0)
            self.net[0].bias.fill_(0.1)


def _fit(
    model: pl.LightningModule, monitor: DeadUnitMonitor, steps: int, **kw: Any
) -> CaptureLogger:
    logger = CaptureLogger()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(
            logger=logger, callbacks=[monitor], **quiet_trainer_kwargs(max_steps=steps, **kw)
        ).fit(model)
    return logger


def _reference_dead_fraction(model: TinyMLP, batches: list[torch.Tensor], layer: int) -> float:
    """Fraction of units of Linear ``layer`` whose pre-activation is <= 0 on every sample."""
    with torch.no_grad():
        positive = torch.zeros(model.net[layer].out_features, dtype=torch.bool)
        for x in batches:
            h = x
            for i, module in enumerate(model.net):
                h = module(h)
                if i == layer:
                    positive |= (h > 0).any(0)
                    break
    return float((~positive).double().mean())


def test_logged_dead_fractions_match_a_direct_forward() -> None:
    model = _Dying(lr=0.0)  # the model does not move: the window's batches can be replayed
    monitor = DeadUnitMonitor(every_n_steps=4, window=2)
    logger = _fit(model, monitor, steps=5)
    batches = [model.data.tensors[0][i * 32 : (i + 1) * 32] for i in range(2)]
    logged = logger.at_step(2)  # the window covers steps 0 and 1, logged once both are done
    assert logged["dead_units/net.1"] == pytest.approx(_reference_dead_fraction(model, batches, 0))
    assert logged["dead_units/net.3"] == 1.0 == _reference_dead_fraction(model, batches, 2)
    assert "dormant_units/net.3" in logged
    assert sorted({s for s, m in logger.calls if "dead_units/net.1" in m}) == [2]


def test_threshold_rescue_swaps_the_dying_layer_only() -> None:
    model = _Dying()
    monitor = DeadUnitMonitor(every_n_steps=4, window=2, rescue="threshold")
    _fit(model, monitor, steps=6)
    assert isinstance(model.net[3], nn.LeakyReLU)
    assert isinstance(model.net[1], nn.ReLU)
    assert monitor.swapped == ["net.3"]
    event = monitor.events[0]
    assert event["kind"] == "swap" and event["layer"] == "net.3" and event["step"] == 2
    assert "100% dead" in event["detail"]


def test_rescue_at_start_swaps_every_relu_before_the_first_step() -> None:
    seen: list[list[str]] = []
    model = TinyMLP(on_before_step=lambda m: seen.append([type(x).__name__ for x in m.net]))
    monitor = DeadUnitMonitor(rescue="start", every_n_steps=10, window=1)
    _fit(model, monitor, steps=1)
    assert seen[0] == ["Linear", "LeakyReLU", "Linear", "LeakyReLU", "Linear"]


def test_no_hooks_outside_windows() -> None:
    hooked: list[bool] = []

    class Probe(TinyMLP):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            hooked.append(bool(self.net[1]._forward_hooks))
            return super().training_step(batch, batch_idx)

    _fit(Probe(), DeadUnitMonitor(every_n_steps=4, window=2), steps=8)
    assert hooked == [True, True, False, False, True, True, False, False]


def test_resume_after_swap_reproduces_uninterrupted_run(tmp_path: Path) -> None:
    def run(steps: int, ckpt: Path | None = None, save: bool = False) -> TinyMLP:
        torch.manual_seed(0)
        model = _Dying(batch_size=64)  # 4 batches an epoch
        callbacks: list = [DeadUnitMonitor(every_n_steps=4, window=2, rescue="threshold")]
        if save:
            callbacks.append(
                pl.callbacks.ModelCheckpoint(
                    dirpath=tmp_path, save_last=True, every_n_train_steps=8
                )
            )
        kwargs = quiet_trainer_kwargs(max_steps=steps, enable_checkpointing=save)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pl.Trainer(logger=False, callbacks=callbacks, **kwargs).fit(model, ckpt_path=ckpt)
        return model

    straight = run(16)
    run(8, save=True)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("DeadUnitMonitor"))
    assert state["swapped"] == ["net.3"]
    resumed = run(16, ckpt=tmp_path / "last.ckpt")
    assert isinstance(resumed.net[3], nn.LeakyReLU)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_compiled_model_recompiles_after_a_swap() -> None:
    class Compiled(_Dying):
        def __init__(self) -> None:
            super().__init__(lr=0.0)
            self.compiled = torch.compile(self.net, backend="eager")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.compiled(x)

    model = Compiled()
    x = torch.randn(5, 16)
    before = model(x)
    monitor = DeadUnitMonitor(every_n_steps=2, window=1, rescue="threshold")
    _fit(model, monitor, steps=2)
    assert monitor.swapped  # the compiled submodule's ReLU was found and swapped
    after = model(x)
    with torch.no_grad():
        h = model.net[0](x)
        h = model.net[2](F.relu(h) if isinstance(model.net[1], nn.ReLU) else F.leaky_relu(h, 0.01))
        expected = model.net[4](F.leaky_relu(h, 0.01))
    torch.testing.assert_close(after, expected)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"rescue": "always"}, "rescue='always'"),
        ({"window": 0}, "window=0"),
        ({"window": 20, "every_n_steps": 10}, "window=20"),
        ({"dead_threshold": 1.5}, "dead_threshold=1.5"),
        ({"activations": ["Relu"]}, "['Relu']"),
        ({"layout": "nchw"}, "layout='nchw'"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        DeadUnitMonitor(**kwargs)
    assert fragment in str(info.value)


class _CompiledDying(_Dying):
    """``_Dying`` with half of the second layer dead, its ``net`` compiled one of two ways."""

    def __init__(self, how: str) -> None:
        super().__init__(lr=0.0)
        with torch.no_grad():
            self.net[2].bias[16:] = 0.5  # units 0-15 stay at -100: dead; 16-31 alive
        if how == "torch.compile":
            self.compiled: nn.Module = torch.compile(self.net, backend="eager")
        else:
            self.net.compile(backend="eager")
            self.compiled = self.net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.compiled(x)


@pytest.mark.parametrize("how", ["torch.compile", "module.compile"])
def test_compiled_model_is_measured_in_every_window_without_recompiling(how: str) -> None:
    from torch._dynamo.utils import counters

    model = _CompiledDying(how)
    model(model.data.tensors[0][:32])  # compiled before fit, with the batch size of fit
    graphs = counters["stats"]["unique_graphs"]
    logger = _fit(model, DeadUnitMonitor(every_n_steps=2, window=1), steps=6)
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation for the windows
    for window, step in enumerate((1, 3, 5)):  # windows measure batches 0, 2 and 4
        batch = [model.data.tensors[0][64 * window : 64 * window + 32]]
        logged = logger.at_step(step)
        assert logged["dead_units/net.1"] == pytest.approx(
            _reference_dead_fraction(model, batch, 0)
        )
        assert logged["dead_units/net.3"] == 0.5 == _reference_dead_fraction(model, batch, 2)


def test_unit_recycler_recycles_in_every_window_of_a_compiled_model() -> None:
    from lightning_gradguard import UnitRecycler

    class Rekilled(_CompiledDying):
        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            if self.global_step == 2:  # kill the recycled units again before the second window
                with torch.no_grad():
                    self.net[2].bias[:16] = -100.0

    model = Rekilled("torch.compile")
    model(model.data.tensors[0][:32])
    recycler = UnitRecycler(every_n_steps=2, window=1, tau=0.0, pairs=[["net.2", "net.4", "net.3"]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(logger=False, callbacks=[recycler], **quiet_trainer_kwargs(max_steps=4)).fit(
            model
        )
    assert [(e["step"], e["layer"]) for e in recycler.events] == [(1, "net.2"), (3, "net.2")]
    assert recycler.recycled_total == 32


def test_many_sites_are_summarised_beyond_max_layers_logged() -> None:
    model = _Dying(lr=0.0)
    logger = _fit(model, DeadUnitMonitor(every_n_steps=4, window=2, max_layers_logged=1), steps=3)
    batches = [model.data.tensors[0][i * 32 : (i + 1) * 32] for i in range(2)]
    first, second = (_reference_dead_fraction(model, batches, i) for i in (0, 2))
    logged = {k: v for k, v in logger.at_step(2).items() if k.startswith("dead_units/")}
    assert logged == {
        "dead_units/layers_min": pytest.approx(min(first, second)),
        "dead_units/layers_median": pytest.approx((first + second) / 2),
        "dead_units/layers_max": 1.0,
        "dead_units/net.1": pytest.approx(first),  # the extreme_layers=3 highest: both
        "dead_units/net.3": 1.0,
    }


def test_a_dying_functional_relu_is_reported_not_swapped() -> None:
    class Functional(_Dying):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net[4](F.relu(self.net[2](F.relu(self.net[0](x)))))

    model = Functional()
    monitor = DeadUnitMonitor(every_n_steps=4, window=2, rescue="threshold")
    with pytest.warns(UserWarning, match=r":relu#1 is a functional ReLU \(100% dead\)"):
        pl.Trainer(logger=False, callbacks=[monitor], **quiet_trainer_kwargs(max_steps=3)).fit(
            model
        )
    assert monitor.swapped == [] and monitor.last_stats[":relu#1"]["dead"] == 1.0

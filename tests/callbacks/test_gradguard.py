"""GradGuard, the one-line bundle: the same results as its parts, one norm pass, clear errors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from helpers import CaptureLogger, TinyMLP, quiet_trainer_kwargs
from torch import nn

from lightning_gradguard import AdaptiveGradClip, DeadUnitMonitor, GradGuard, GradNormMonitor
from lightning_gradguard.functional import FixedNorm


class _Observed(TinyMLP):
    """Keeps raw gradients after backward and the gradients the optimizer gets; injects NaN."""

    def __init__(self, inject_at: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.inject_at = inject_at
        self.raw: list[list[torch.Tensor]] = []
        self.used: list[list[torch.Tensor]] = []

    def on_after_backward(self) -> None:
        if self.global_step == self.inject_at:
            self.net[2].weight.grad[0, 0] = float("nan")
        self.raw.append([p.grad.clone() for p in self.parameters()])

    def on_before_optimizer_step(self, optimizer: Any) -> None:  # runs after the callbacks
        self.used.append([p.grad.clone() for p in self.parameters()])


def _fit(model: pl.LightningModule, callbacks: list[Any], tmp_path: Path, **kwargs: Any) -> Any:
    logger = CaptureLogger()
    trainer_kwargs = quiet_trainer_kwargs(max_steps=kwargs.pop("max_steps", 8), **kwargs)
    trainer_kwargs["default_root_dir"] = str(tmp_path)
    pl.Trainer(logger=logger, callbacks=callbacks, **trainer_kwargs).fit(model)
    return logger


def test_defaults_are_monitor_guard_clip_with_skipping_dead_units_with_rescue_and_report() -> None:
    guard = GradGuard()
    assert [type(p).__name__ for p in guard.gradguard_parts] == [
        "GradNormMonitor",
        "AdaptiveGradClip",
        "DeadUnitMonitor",
        "HealthReport",
    ]
    assert guard.clipper is not None and guard.clipper.policy.name == "guard"
    assert guard.clipper.skip_nonfinite
    assert guard.unit_monitor is not None and guard.unit_monitor.rescue == "threshold"


def test_same_results_as_the_parts_listed_separately(tmp_path: Path) -> None:
    def run(callbacks: list[Any]) -> tuple[dict[int, dict[str, float]], list[torch.Tensor]]:
        torch.manual_seed(0)
        model = TinyMLP(lr=0.05)
        logger = _fit(model, callbacks, tmp_path, max_steps=12)
        steps = {step for step, _ in logger.calls if step is not None}
        logged = {step: logger.at_step(step) for step in steps}
        return logged, [p.detach().clone() for p in model.parameters()]

    options = {"every_n_steps": 4, "window": 2, "rescue": "threshold"}
    parts_logged, parts_params = run(
        [
            GradNormMonitor(log_every_n_steps=1),
            AdaptiveGradClip(policy=FixedNorm(0.5), log_every_n_steps=1),
            DeadUnitMonitor(**options),
        ]
    )
    guard = GradGuard(
        clip=FixedNorm(0.5), log_every_n_steps=1, dead_unit_args=options, report=False
    )
    guard_logged, guard_params = run([guard])
    assert guard_logged.keys() == parts_logged.keys()
    for step, metrics in parts_logged.items():
        assert guard_logged[step] == pytest.approx(metrics, rel=1e-6, nan_ok=True)
    assert any(k.startswith("dead_units/") for m in guard_logged.values() for k in m)
    for a, b in zip(guard_params, parts_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_norms_match_torch_and_clipping_matches_clip_grad_norm(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Observed(lr=0.05)
    logger = _fit(model, [GradGuard(clip="norm", log_every_n_steps=1, report=False)], tmp_path)
    assert len(model.used) == 8
    for step, (raw, used) in enumerate(zip(model.raw, model.used)):
        reference = [nn.Parameter(torch.zeros_like(g)) for g in raw]
        for parameter, grad in zip(reference, raw):
            parameter.grad = grad.clone()
        total = torch.nn.utils.clip_grad_norm_(reference, max_norm=1.0)
        for got, want in zip(used, reference):
            torch.testing.assert_close(got, want.grad, rtol=1e-5, atol=1e-7)
        assert logger.at_step(step)["grad_norm/total"] == pytest.approx(float(total), rel=1e-5)
        assert logger.at_step(step)["clip/threshold"] == 1.0


def test_one_pass_over_the_gradients_for_monitor_and_clipper(tmp_path: Path) -> None:
    from torch.overrides import TorchFunctionMode

    class CountNorms(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
            if func is torch._foreach_norm:
                self.calls += 1
            return func(*args, **(kwargs or {}))

    def norm_passes(callbacks: list[Any]) -> int:
        counter = CountNorms()

        class Count(pl.Callback):
            active = False

            def on_before_optimizer_step(self, trainer: Any, pl_module: Any, opt: Any) -> None:
                if trainer.global_step >= 1:  # step 0 logs
                    counter.__enter__()
                    self.active = True

            def on_train_batch_end(self, *args: Any) -> None:
                if self.active:
                    counter.__exit__(None, None, None)
                    self.active = False

        # Steps 1..4 log nothing (interval 50): only the per-step work is counted.
        _fit(TinyMLP(), [Count(), *callbacks], tmp_path, max_steps=5)
        return counter.calls

    monitor_alone = norm_passes([GradNormMonitor(log_every_n_steps=50)])
    bundled = norm_passes(
        [GradGuard(clip="norm", log_every_n_steps=50, dead_units=False, report=False)]
    )
    assert monitor_alone > 0
    assert bundled == monitor_alone


def test_nonfinite_step_is_skipped_and_training_goes_on(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Observed(inject_at=3)
    before: list[list[torch.Tensor]] = []

    class Snapshot(pl.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            before.append([p.detach().clone() for p in pl_module.parameters()])

    guard = GradGuard(log_every_n_steps=1, dead_units=False, report=False)
    with pytest.warns(UserWarning, match=r"skipped optimizer step.*net\.2"):
        logger = _fit(model, [Snapshot(), guard], tmp_path, max_steps=6)
    for a, b in zip(before[3], before[4]):  # the update of step 3 did not happen
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not all(torch.equal(a, b) for a, b in zip(before[4], before[5]))
    assert logger.by_key("clip/skipped_steps")["clip/skipped_steps"][-1] == (5, 1.0)
    assert all(math.isfinite(float(p.sum())) for p in model.parameters())


class _DeadLayer(TinyMLP):
    """The second hidden ReLU gets a hugely negative bias: its units never fire."""

    def __init__(self) -> None:
        super().__init__(lr=0.01)
        with torch.no_grad():
            self.net[2].bias.fill_(-100.0)


def test_dead_relus_are_swapped_for_leaky_relu(tmp_path: Path) -> None:
    model = _DeadLayer()
    guard = GradGuard(dead_unit_args={"every_n_steps": 4, "window": 2}, report=False)
    with pytest.warns(UserWarning, match="LeakyReLU"):
        logger = _fit(model, [guard], tmp_path, max_steps=6, log_every_n_steps=1)
    assert isinstance(model.net[3], nn.LeakyReLU)
    assert isinstance(model.net[1], nn.ReLU)  # the live layer is left alone
    assert logger.by_key("dead_units/net.3")["dead_units/net.3"][0][1] == 1.0
    assert guard.unit_monitor is not None and guard.unit_monitor.swapped == ["net.3"]


def test_checkpoint_holds_every_part_and_resume_equals_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    def run(steps: int, ckpt: Path | None = None, save: bool = False) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = TinyMLP(lr=0.05, batch_size=64)  # 4 batches an epoch
        guard = GradGuard(clip="zclip", dead_unit_args={"every_n_steps": 3, "window": 2})
        callbacks: list[Any] = [guard]
        if save:
            callbacks.append(
                pl.callbacks.ModelCheckpoint(
                    dirpath=tmp_path, save_last=True, every_n_train_steps=8
                )
            )
        kwargs = quiet_trainer_kwargs(
            max_steps=steps, enable_checkpointing=save, default_root_dir=str(tmp_path)
        )
        pl.Trainer(logger=False, callbacks=callbacks, **kwargs).fit(model, ckpt_path=ckpt)
        return [p.detach().clone() for p in model.parameters()]

    full = run(16)
    path = tmp_path / "last.ckpt"
    run(8, save=True)
    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint["callbacks"]["GradGuard"]  # each part under its own key
    parts = GradGuard(clip="zclip", dead_unit_args={"every_n_steps": 3, "window": 2})
    assert set(state) == {part.state_key for part in parts.gradguard_parts}
    assert "RunRecord" in checkpoint["callbacks"]
    resumed = run(16, ckpt=path)
    for a, b in zip(full, resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_parts_can_be_switched_off_and_configured() -> None:
    guard = GradGuard(
        monitor=False,
        clip=None,
        dead_units=False,
        report=False,
        clip_args={"max_consecutive_skips": 3},
    )
    assert guard.norm_monitor is None and guard.unit_monitor is None
    assert guard.health_report is None
    assert guard.clipper is not None and guard.clipper.policy.name == "none"
    assert guard.clipper.max_consecutive_skips == 3
    nothing = GradGuard(
        monitor=False, clip=None, skip_nonfinite=False, dead_units=False, report=False
    )
    assert nothing.gradguard_parts == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clp": "norm"}, r"unexpected argument 'clp': did you mean 'clip'\?"),
        (
            {"clip": "zclp"},
            r"GradGuard\(clip='zclp'\): clip must be one of .*Did you mean 'zclip'\?",
        ),
        ({"rescue": "treshold"}, r"rescue='treshold'.*Did you mean 'threshold'\?"),
        (
            {"clip_args": {"polcy": "norm"}},
            r"GradGuard\(clip_args=\.\.\.\): AdaptiveGradClip got an unexpected argument "
            r"'polcy': did you mean 'policy'\?",
        ),
        (
            {"monitor_args": {"patience": 0}},
            r"GradGuard\(monitor_args=\.\.\.\): GradNormMonitor\(patience=0\): patience must be "
            r"an integer >= 1",
        ),
        ({"dead_unit_args": ["window", 3]}, r"dead_unit_args=.* must be a dict"),
        ({"report": "yes"}, r"GradGuard\(report='yes'\): report must be True or False"),
    ],
)
def test_bad_arguments_say_how_to_fix_them(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        GradGuard(**kwargs)


def test_a_logging_step_of_monitor_and_clipper_is_one_transfer(tmp_path: Path) -> None:
    from collections import Counter

    from helpers import CountSyncsPerBatch

    def fit(callbacks: list[Any]) -> tuple[_Observed, CaptureLogger, list[Any]]:
        torch.manual_seed(0)
        model, counter = _Observed(lr=0.05), CountSyncsPerBatch()
        logger = _fit(model, [counter, *callbacks], tmp_path, max_steps=6)
        return model, logger, counter.per_batch

    _, _, bare = fit([])
    guard = GradGuard(clip="norm", log_every_n_steps=1, dead_units=False, report=False)
    model, logger, guarded = fit([guard])
    # Step 0 also moves the update ratios (measured after the optimizer step, every 10th
    # logging step); every other step logs the monitor's and the clipper's metrics in the
    # clipper's one flag read.
    for (bare_calls, bare_dispatch), (calls, dispatch) in list(zip(bare, guarded))[1:]:
        assert calls - bare_calls == Counter({"tolist": 1})
        assert dispatch == bare_dispatch
    names = [name for name, _ in model.named_parameters()]
    for step, raw in enumerate(model.raw):
        logged = logger.at_step(step)
        total = torch.linalg.vector_norm(torch.stack([g.norm() for g in raw]))
        clipped = min(float(total), 1.0)  # clip_grad_norm_ to 1.0 scales the total to 1.0
        assert logged["grad_norm/total"] == pytest.approx(float(total), rel=1e-5)
        assert logged["grad_norm/total_clipped"] == pytest.approx(clipped, rel=1e-5)
        assert logged["clip/coef"] == pytest.approx(min(1.0, 1.0 / float(total)), rel=1e-4)
        assert logged["clip/active"] == float(float(total) > 1.0)
        for layer in {name.rsplit(".", 1)[0] for name in names}:
            own = [g for name, g in zip(names, raw) if name.rsplit(".", 1)[0] == layer]
            want = torch.linalg.vector_norm(torch.stack([g.norm() for g in own]))
            assert logged[f"grad_norm/{layer}"] == pytest.approx(float(want), rel=1e-5)

"""GradGuardMixin: policies through configure_gradient_clipping, and AMP-aware manual clipping."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from helpers import TinyMLP, quiet_trainer_kwargs
from pytorch_lightning.plugins.precision import MixedPrecision

from lightning_gradguard import GradGuardMixin
from lightning_gradguard.functional import AutoClip, FixedNorm


def _clipped_reference(raw: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in raw]
    for p, g in zip(params, raw):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    return [p.grad for p in params]


class _Auto(GradGuardMixin, TinyMLP):
    gradguard_clip = FixedNorm(0.05)

    def __init__(self) -> None:
        super().__init__()
        self.raw: list[list[torch.Tensor]] = []
        self.used: list[list[torch.Tensor]] = []

    def on_before_optimizer_step(self, optimizer: Any) -> None:  # before clipping
        self.raw.append([p.grad.clone() for p in self.parameters()])

    def on_fit_start(self) -> None:
        def after_step(optimizer: Any, args: Any, kwargs: Any) -> None:
            self.used.append([p.grad.clone() for p in self.parameters()])

        self.trainer.optimizers[0].register_step_post_hook(after_step)


def test_automatic_optimization_clips_through_lightning_hook() -> None:
    torch.manual_seed(0)
    model = _Auto()
    model.gradguard_clip = FixedNorm(0.05)
    pl.Trainer(logger=False, **quiet_trainer_kwargs(max_steps=3)).fit(model)
    assert len(model.raw) == len(model.used) == 3
    for raw, used in zip(model.raw, model.used):
        for expected, got in zip(_clipped_reference(raw, 0.05), used):
            torch.testing.assert_close(got, expected)


def test_gradient_clip_val_is_ignored_with_a_warning() -> None:
    model = _Auto()
    model.gradguard_clip = FixedNorm(0.05)
    with pytest.warns(UserWarning, match="gradient_clip_val=3.0"):
        pl.Trainer(logger=False, gradient_clip_val=3.0, **quiet_trainer_kwargs(max_steps=2)).fit(
            model
        )
    for raw, used in zip(model.raw, model.used):
        assert float(torch.nn.utils.get_total_norm(used)) == pytest.approx(
            min(0.05, float(torch.nn.utils.get_total_norm(raw))), rel=1e-4
        )


class _ManualFp16(GradGuardMixin, TinyMLP):
    gradguard_clip = FixedNorm(0.05)

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.unscaled_raw: list[list[torch.Tensor]] = []
        self.used: list[list[torch.Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        scale = float(self.trainer.precision_plugin.scaler.get_scale())
        self.unscaled_raw.append([p.grad.float() / scale for p in self.parameters()])
        self.clip_gradients_unscaled(opt)
        opt.step()

    def on_fit_start(self) -> None:
        def after_step(optimizer: Any, args: Any, kwargs: Any) -> None:
            self.used.append([p.grad.clone() for p in self.parameters()])

        self.trainer.optimizers[0].register_step_post_hook(after_step)


def test_manual_optimization_under_fp16_clips_unscaled_gradients() -> None:
    torch.manual_seed(0)
    model = _ManualFp16()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(logger=False, plugins=[plugin], **quiet_trainer_kwargs(max_steps=3)).fit(model)
    assert len(model.used) == 3  # no overflow at this scale: every step ran
    for raw, used in zip(model.unscaled_raw, model.used):
        assert float(torch.nn.utils.get_total_norm(raw)) > 0.05  # clipping was needed
        for expected, got in zip(_clipped_reference(raw, 0.05), used):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_each_optimizer_gets_its_own_policy_state() -> None:
    class Model(GradGuardMixin, pl.LightningModule):
        gradguard_clip = AutoClip(percentile=50)

    model = Model()
    first, second = model.gradguard_policy_for(0), model.gradguard_policy_for(1)
    assert first is not second and first is model.gradguard_policy_for(0)
    assert isinstance(second, AutoClip) and second.percentile == 50


def test_manual_helper_without_policy_says_what_to_do() -> None:
    class Model(GradGuardMixin, pl.LightningModule):
        pass

    with pytest.raises(ValueError, match="gradguard_clip"):
        Model().clip_gradients_unscaled(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1))

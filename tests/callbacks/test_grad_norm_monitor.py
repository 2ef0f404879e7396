"""GradNormMonitor in real (tiny) Lightning runs, against plain-torch reference norms."""

from __future__ import annotations

import math
import statistics
import warnings
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from helpers import (
    CaptureLogger,
    TinyMLP,
    capture_logger,
    module_grad_norms,
    module_param_norms,
    quiet_trainer_kwargs,
)
from torch import nn

from lightning_gradguard import GradNormMonitor


def _fit(
    model: pl.LightningModule, monitor: GradNormMonitor | list, **trainer_kwargs: Any
) -> CaptureLogger:
    logger = CaptureLogger()
    callbacks = monitor if isinstance(monitor, list) else [monitor]
    kwargs = quiet_trainer_kwargs(max_steps=trainer_kwargs.pop("max_steps", 6), **trainer_kwargs)
    pl.Trainer(logger=logger, callbacks=callbacks, **kwargs).fit(model)
    return logger


def test_logged_norms_equal_torch_reference_every_step() -> None:
    seen: list[dict[str, float]] = []
    params_before: list[dict[str, float]] = []
    model = TinyMLP(
        on_before_step=lambda m: (
            seen.append(module_grad_norms(m)),
            params_before.append(module_param_norms(m)),
        )
    )
    monitor = GradNormMonitor(log_every_n_steps=1, param_norm_every_n_steps=1)
    logger = _fit(model, monitor, max_steps=5)
    assert len(seen) == 5
    for step, reference in enumerate(seen):
        logged = logger.at_step(step)
        for layer, value in reference.items():
            assert logged[f"grad_norm/{layer}"] == pytest.approx(value, rel=1e-5)
        total = math.sqrt(sum(v * v for v in reference.values()))
        assert logged["grad_norm/total"] == pytest.approx(total, rel=1e-5)
        for layer, value in params_before[step].items():
            assert logged[f"param_norm/{layer}"] == pytest.approx(value, rel=1e-5)
        assert logged["grad_norm/nonfinite_steps"] == 0
        assert "grad_norm/total_clipped" not in logged  # no clipping configured


def test_update_ratio_matches_sgd_update() -> None:
    # With plain SGD, Δθ = -lr·g exactly, so ‖Δθ‖/‖θ‖ = lr·‖g‖/‖θ‖ per layer.
    grads: list[dict[str, float]] = []
    params: list[dict[str, float]] = []
    model = TinyMLP(
        lr=0.05,
        on_before_step=lambda m: (
            grads.append(module_grad_norms(m)),
            params.append(module_param_norms(m)),
        ),
    )
    logger = _fit(
        model, GradNormMonitor(log_every_n_steps=2, update_ratio_every_n_steps=1), max_steps=6
    )
    logged_steps = sorted(
        {s for s, m in logger.calls if any(k.startswith("update_ratio/") for k in m)}
    )
    assert logged_steps == [0, 2, 4]
    for step in logged_steps:
        logged = logger.at_step(step)
        for layer in ("net.0", "net.2", "net.4"):
            expected = 0.05 * grads[step][layer] / params[step][layer]
            assert logged[f"update_ratio/{layer}"] == pytest.approx(expected, rel=1e-4)


def test_update_ratios_every_tenth_step_by_default() -> None:
    logger = _fit(TinyMLP(), GradNormMonitor(log_every_n_steps=1), max_steps=21)
    steps = sorted({s for s, m in logger.calls if "update_ratio/net.0" in m})
    assert steps == [0, 10, 20]
    # Parameter norms: on logging steps at least 10 optimizer steps apart by default.
    assert sorted({s for s, m in logger.calls if "param_norm/net.0" in m}) == [0, 10, 20]


@pytest.mark.parametrize(
    ("log_every", "param_every", "expected"),
    [(1, 1, list(range(9))), (1, 4, [0, 4, 8]), (3, 4, [0, 6]), (3, 2, [0, 3, 6]), (4, 10, [0])],
)
def test_param_norm_and_update_ratio_cadence(
    log_every: int, param_every: int, expected: list[int]
) -> None:
    # Both *_every_n_steps count optimizer steps: every ceil(n / log_every)-th logging step.
    monitor = GradNormMonitor(
        log_every_n_steps=log_every,
        param_norm_every_n_steps=param_every,
        update_ratio_every_n_steps=param_every,
    )
    logger = _fit(TinyMLP(), monitor, max_steps=9)
    assert sorted({s for s, m in logger.calls if "param_norm/net.0" in m}) == expected
    assert sorted({s for s, m in logger.calls if "update_ratio/net.0" in m}) == expected


def test_interval_defaults_to_trainer_log_every_n_steps() -> None:
    logger = _fit(TinyMLP(), GradNormMonitor(), max_steps=7, log_every_n_steps=3)
    steps = sorted({s for s, m in logger.calls if "grad_norm/total" in m})
    assert steps == [0, 3, 6]


def test_gradient_accumulation_sees_accumulated_gradients() -> None:
    seen: list[dict[str, float]] = []
    model = TinyMLP(on_before_step=lambda m: seen.append(module_grad_norms(m)), batch_size=16)
    logger = _fit(
        model, GradNormMonitor(log_every_n_steps=1), max_steps=3, accumulate_grad_batches=4
    )
    assert len(seen) == 3  # one observation per optimizer step, not per micro-batch
    for step, reference in enumerate(seen):
        assert logger.at_step(step)["grad_norm/net.0"] == pytest.approx(
            reference["net.0"], rel=1e-5
        )


def test_total_clipped_is_logged_when_trainer_clips() -> None:
    seen: list[dict[str, float]] = []
    model = TinyMLP(lr=0.01, on_before_step=lambda m: seen.append(module_grad_norms(m)))
    logger = _fit(model, GradNormMonitor(log_every_n_steps=1), max_steps=4, gradient_clip_val=0.05)
    for step, reference in enumerate(seen):
        total = math.sqrt(sum(v * v for v in reference.values()))
        logged = logger.at_step(step)
        assert logged["grad_norm/total"] == pytest.approx(total, rel=1e-5)  # before clipping
        assert logged["grad_norm/total_clipped"] == pytest.approx(min(total, 0.05), rel=1e-4)


class _FrozenFirstLayer(TinyMLP):
    def configure_optimizers(self) -> Any:
        self.net[0].requires_grad_(False)
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_frozen_parameters_read_zero_and_do_not_crash() -> None:
    logger = _fit(_FrozenFirstLayer(), GradNormMonitor(log_every_n_steps=1), max_steps=2)
    logged = logger.at_step(1)
    assert logged["grad_norm/net.0"] == 0.0
    assert logged["grad_norm/net.2"] > 0


class _TwoOptimizers(pl.LightningModule):
    """Manual optimization with two optimizers, GAN-style."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
        self.critic = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        self.seen: list[tuple[str, dict[str, float]]] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt_g, opt_c = self.optimizers()
        (x,) = batch
        critic_loss = self.critic(self.generator(x).detach()).mean() - self.critic(x).mean()
        opt_c.zero_grad()
        self.manual_backward(critic_loss)
        self.seen.append(("critic", module_grad_norms(self.critic, "critic.")))
        opt_c.step()
        gen_loss = -self.critic(self.generator(x)).mean()
        opt_g.zero_grad()
        self.manual_backward(gen_loss)
        self.seen.append(("generator", module_grad_norms(self.generator, "generator.")))
        opt_g.step()

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.generator.parameters(), 1e-3), torch.optim.Adam(
            self.critic.parameters(), 1e-3
        )

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.randn(64, 8)), batch_size=16
        )


def test_manual_optimization_with_two_optimizers() -> None:
    model = _TwoOptimizers()
    logger = _fit(
        model, GradNormMonitor(log_every_n_steps=1), max_steps=4
    )  # 2 batches x 2 optimizers
    critic_calls = [m for _, m in logger.calls if "grad_norm/total_opt1" in m]
    generator_calls = [m for _, m in logger.calls if "grad_norm/total" in m]
    critic_ref = [r for kind, r in model.seen if kind == "critic"]
    generator_ref = [r for kind, r in model.seen if kind == "generator"]
    assert len(critic_calls) == len(critic_ref) == 2
    assert len(generator_calls) == len(generator_ref) == 2
    for logged, reference in zip(critic_calls, critic_ref):
        assert set(k for k in logged if k.startswith("grad_norm/critic")) == {
            f"grad_norm/{k}" for k in reference
        }
        for layer, value in reference.items():
            assert logged[f"grad_norm/{layer}"] == pytest.approx(value, rel=1e-5)
        assert not any(k.startswith("grad_norm/generator") for k in logged)
    for logged, reference in zip(generator_calls, generator_ref):
        for layer, value in reference.items():
            assert logged[f"grad_norm/{layer}"] == pytest.approx(value, rel=1e-5)


def test_bf16_autocast_on_cpu() -> None:
    seen: list[dict[str, float]] = []
    model = TinyMLP(on_before_step=lambda m: seen.append(module_grad_norms(m)))
    logger = _fit(model, GradNormMonitor(log_every_n_steps=1), max_steps=3, precision="bf16-mixed")
    for step, reference in enumerate(seen):
        logged = logger.at_step(step)
        assert math.isfinite(logged["grad_norm/total"])
        assert logged["grad_norm/net.4"] == pytest.approx(reference["net.4"], rel=1e-5)


def test_large_models_log_summaries() -> None:
    seen: list[dict[str, float]] = []
    model = TinyMLP(
        sizes=(16, 8, 8, 8, 8, 8, 4), on_before_step=lambda m: seen.append(module_grad_norms(m))
    )
    logger = _fit(
        model,
        GradNormMonitor(log_every_n_steps=1, max_layers_logged=4, extreme_layers=1),
        max_steps=1,
    )
    logged = logger.at_step(0)
    values = list(seen[0].values())
    assert logged["grad_norm/layers_min"] == pytest.approx(min(values), rel=1e-5)
    assert logged["grad_norm/layers_median"] == pytest.approx(statistics.median(values), rel=1e-5)
    assert logged["grad_norm/layers_max"] == pytest.approx(max(values), rel=1e-5)
    smallest = min(seen[0], key=seen[0].__getitem__)
    largest = max(seen[0], key=seen[0].__getitem__)
    per_layer = {k for k in logged if k.startswith("grad_norm/net.")}
    assert per_layer == {f"grad_norm/{smallest}", f"grad_norm/{largest}"}


class _DeepSigmoid(TinyMLP):
    """Scenario S1 in miniature: a deep sigmoid stack with small weights."""

    def __init__(self) -> None:
        super().__init__(sizes=(16,) * 16 + (4,))
        layers: list[nn.Module] = []
        for i, layer in enumerate(m for m in self.net if isinstance(m, nn.Linear)):
            nn.init.normal_(layer.weight, 0.0, 0.05)
            nn.init.zeros_(layer.bias)
            layers += [layer] + ([nn.Sigmoid()] if i < 15 else [])
        self.net = nn.Sequential(*layers)


def test_vanishing_gradients_warn_once_naming_the_layers() -> None:
    seen: list[dict[str, float]] = []
    model = _DeepSigmoid()
    model.observer = lambda m: seen.append(module_grad_norms(m))
    monitor = GradNormMonitor(log_every_n_steps=2, patience=3, vanishing_threshold=1e-6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = _fit(model, monitor, max_steps=8)
    messages = [str(w.message) for w in caught if "vanishing gradients" in str(w.message)]
    assert len(messages) == 1
    below = [layer for layer in seen[0] if all(s[layer] < 1e-6 for s in seen[:3])]
    assert below and "net.0" in below  # independent check that the first layer vanishes
    for layer in below:
        assert f"{layer}," in messages[0] or f"{layer} (" in messages[0]
    assert "net.30" not in messages[0]  # the output layer is healthy
    # The logged values are exact even where float32 squares underflow (about 1e-20 here).
    logged = logger.at_step(0)
    assert 0 < seen[0]["net.0"] < 1e-15
    for layer, value in seen[0].items():
        assert logged[f"grad_norm/{layer}"] == pytest.approx(value, rel=1e-6)
    assert "initialization" in messages[0] and "skip connections" in messages[0]


class _Spiking(TinyMLP):
    """Loss scaled by 1e4 from step 30 on: the global norm jumps far above its level."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * (1e4 if self.global_step >= 30 else 1.0)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.0)  # keep the model fixed


def test_exploding_gradients_warn_after_patience() -> None:
    monitor = GradNormMonitor(log_every_n_steps=1, patience=3, warmup_steps=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = _fit(_Spiking(), monitor, max_steps=32)
    assert not [w for w in caught if "exploding" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = _fit(
            _Spiking(),
            GradNormMonitor(log_every_n_steps=1, patience=3, warmup_steps=10),
            max_steps=34,
        )
    messages = [str(w.message) for w in caught if "exploding gradients" in str(w.message)]
    assert len(messages) == 1
    assert "clip" in messages[0]
    assert logger.at_step(30)["grad_norm/total"] > 1000 * logger.at_step(29)["grad_norm/total"]


class _NonFinite(TinyMLP):
    """Puts an inf into the second Linear's gradient at step 2."""

    def on_after_backward(self) -> None:
        if self.global_step == 2:
            self.net[2].weight.grad[0, 0] = float("inf")

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # Runs after the callbacks' hook: keep the inf out of the weights (0·inf would be NaN).
        for p in self.parameters():
            p.grad = torch.nan_to_num(p.grad, posinf=0.0)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_nonfinite_gradients_are_counted_and_located() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = _fit(_NonFinite(), GradNormMonitor(log_every_n_steps=2), max_steps=5)
    messages = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    assert len(messages) == 1
    assert "net.2" in messages[0] and "net.0" not in messages[0]
    assert logger.at_step(0)["grad_norm/nonfinite_steps"] == 0
    assert logger.at_step(2)["grad_norm/nonfinite_steps"] == 1
    assert logger.at_step(4)["grad_norm/nonfinite_steps"] == 1


def test_no_logger_runs() -> None:
    trainer = pl.Trainer(
        logger=False, callbacks=[GradNormMonitor()], **quiet_trainer_kwargs(max_steps=3)
    )
    trainer.fit(TinyMLP())
    assert trainer.global_step == 3


def test_two_instances_coexist_and_checkpoint_round_trip(tmp_path: Any) -> None:
    first = GradNormMonitor(log_every_n_steps=1)
    second = GradNormMonitor(log_every_n_steps=1, group_by="depth", depth=1)
    assert first.state_key != second.state_key
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    kwargs = quiet_trainer_kwargs(max_steps=4, enable_checkpointing=True)
    pl.Trainer(logger=False, callbacks=[first, second, checkpoint], **kwargs).fit(TinyMLP())
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)
    saved = state["callbacks"]
    assert saved[first.state_key]["optimizer_0"]["layers"] == ["net.0", "net.2", "net.4"]
    assert saved[second.state_key]["optimizer_0"]["layers"] == ["net"]
    assert saved[first.state_key]["optimizer_0"]["steps_seen"] == 4
    assert int(saved[first.state_key]["optimizer_0"]["health"]["steps"]) == 4

    resumed = GradNormMonitor(log_every_n_steps=1)
    logger = CaptureLogger()
    kwargs = quiet_trainer_kwargs(max_steps=6)
    pl.Trainer(logger=logger, callbacks=[resumed], **kwargs).fit(
        TinyMLP(), ckpt_path=tmp_path / "last.ckpt"
    )
    assert resumed._views[0].steps_seen == 6
    assert int(resumed._views[0].health.steps) == 6
    assert sorted({s for s, m in logger.calls if "grad_norm/total" in m}) == [4, 5]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"log_every_n_steps": 0}, "log_every_n_steps=0"),
        ({"group_by": "modul"}, "group_by='modul'"),
        ({"norm_type": -1}, "norm_type=-1"),
        ({"max_layers_logged": 0}, "max_layers_logged=0"),
        ({"vanishing_threshold": 0}, "vanishing_threshold=0"),
        ({"explosion_factor": 1}, "explosion_factor=1"),
        ({"patience": 2.5}, "patience=2.5"),
        ({"detect": "yes"}, "detect='yes'"),
        ({"include": "net.*"}, "include='net.*'"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs: dict, fragment: str) -> None:
    with pytest.raises((ValueError, TypeError)) as info:
        GradNormMonitor(**kwargs)
    assert fragment in str(info.value)


def test_callback_is_a_callback_of_both_packages() -> None:
    import lightning.pytorch as lp

    monitor = GradNormMonitor()
    assert isinstance(monitor, pl.Callback)
    assert isinstance(monitor, lp.Callback)


def test_works_with_lightning_pytorch_trainer() -> None:
    import lightning.pytorch as lp

    class Model(lp.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 2)
            self.seen: list[float] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.layer(batch[0]).pow(2).mean()

        def on_before_optimizer_step(self, optimizer: Any) -> None:
            self.seen.append(
                float(torch.nn.utils.get_total_norm([p.grad for p in self.parameters()]))
            )

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self) -> Any:
            return torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(torch.randn(32, 4)), batch_size=8
            )

    model, logger = Model(), capture_logger("lightning.pytorch")
    lp.Trainer(
        logger=logger,
        callbacks=[GradNormMonitor(log_every_n_steps=1)],
        **quiet_trainer_kwargs(max_steps=3),
    ).fit(model)
    values = [value for _, value in logger.by_key("grad_norm/total")["grad_norm/total"]]
    assert values == pytest.approx(model.seen, rel=1e-5)

"""AdaptiveGradClip in real (tiny) Lightning runs, against torch references."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from distributed_helpers import reference_agc_
from helpers import CaptureLogger, TinyMLP, quiet_trainer_kwargs
from torch.overrides import TorchFunctionMode

import lightning_gradguard.callbacks.adaptive_grad_clip as clip_module
from lightning_gradguard import AdaptiveGradClip, GradNormMonitor
from lightning_gradguard.functional import (
    AGC,
    ClipPlan,
    DirectClipper,
    FixedNorm,
    NormPolicy,
    ZClip,
    clip_with_policy_,
)


class _Recording(TinyMLP):
    """Keeps raw gradients after backward and the gradients the optimizer receives."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.raw: list[list[torch.Tensor]] = []
        self.used: list[list[torch.Tensor]] = []
        self.inject_at: int | None = None

    def on_after_backward(self) -> None:
        if self.inject_at is not None and self.global_step == self.inject_at:
            self.net[2].weight.grad[0, 0] = float("nan")
        self.raw.append([p.grad.clone() for p in self.parameters()])

    def on_before_optimizer_step(self, optimizer: Any) -> None:  # runs after the callbacks
        self.used.append([p.grad.clone() for p in self.parameters()])

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=0.01)


def _fit(model: pl.LightningModule, callbacks: list, steps: int, **kwargs: Any) -> CaptureLogger:
    logger = CaptureLogger()
    trainer_kwargs = quiet_trainer_kwargs(max_steps=steps, **kwargs)
    pl.Trainer(logger=logger, callbacks=callbacks, **trainer_kwargs).fit(model)
    return logger


def test_fixed_norm_matches_torch_clip_grad_norm() -> None:
    torch.manual_seed(0)
    model = _Recording()
    logger = _fit(model, [AdaptiveGradClip(policy=FixedNorm(0.05), log_every_n_steps=1)], steps=4)
    for step, (raw, used) in enumerate(zip(model.raw, model.used)):
        reference = [g.clone() for g in raw]
        total = torch.nn.utils.clip_grad_norm_(
            [torch.nn.Parameter(torch.zeros_like(g)) for g in reference], 1e9
        )
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in raw]
        for p, g in zip(params, raw):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(params, 0.05)
        for p, g in zip(params, used):
            torch.testing.assert_close(g, p.grad)
        logged = logger.at_step(step)
        assert logged["clip/threshold"] == pytest.approx(0.05)
        raw_total = float(torch.nn.utils.get_total_norm(raw))
        assert logged["clip/coef"] == pytest.approx(0.05 / (raw_total + 1e-6), rel=1e-6)
        assert logged["clip/active"] == 1.0
        assert logged["grad_norm/total_clipped"] == pytest.approx(0.05, rel=1e-5)
        del total


def test_layer_scope_clips_each_module_to_its_threshold() -> None:
    torch.manual_seed(0)
    model = _Recording()
    _fit(model, [AdaptiveGradClip(policy=FixedNorm(0.01), scope="layer")], steps=2)
    names = [n for n, _ in model.named_parameters()]
    for raw, used in zip(model.raw, model.used):
        for layer in ("net.0", "net.2", "net.4"):
            idx = [i for i, n in enumerate(names) if n.startswith(layer + ".")]
            raw_norm = float(torch.nn.utils.get_total_norm([raw[i] for i in idx]))
            used_norm = float(torch.nn.utils.get_total_norm([used[i] for i in idx]))
            assert used_norm == pytest.approx(min(raw_norm, 0.01), rel=1e-4)


def test_nonfinite_step_is_skipped_bit_identically() -> None:
    torch.manual_seed(0)
    model = _Recording()
    model.inject_at = 2
    snapshots: list[tuple[dict, dict]] = []

    class Snapshot(pl.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            optimizer = trainer.optimizers[0]
            snapshots.append(
                (copy.deepcopy(pl_module.state_dict()), copy.deepcopy(optimizer.state_dict()))
            )

    clipper = AdaptiveGradClip(policy="norm", log_every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = _fit(model, [clipper, Snapshot()], steps=5)
    params_1, opt_1 = snapshots[1]
    params_2, opt_2 = snapshots[2]
    for key in params_1:
        assert torch.equal(params_1[key], params_2[key]), key
    for slot, state in opt_1["state"].items():
        for name, value in state.items():
            assert torch.equal(value, opt_2["state"][slot][name]), (slot, name)
    assert not torch.equal(snapshots[3][0]["net.0.weight"], params_2["net.0.weight"])
    assert clipper.skipped_steps == 1
    assert logger.at_step(3)["clip/skipped_steps"] == 1
    messages = [str(w.message) for w in caught if "skipped optimizer step" in str(w.message)]
    assert len(messages) == 1 and "net.2" in messages[0] and "net.0" not in messages[0]


class _AlwaysNaN(TinyMLP):
    def on_after_backward(self) -> None:
        if self.global_step >= 1:
            self.net[0].bias.grad.fill_(float("inf"))


def test_consecutive_skips_stop_training_with_an_explanation() -> None:
    clipper = AdaptiveGradClip(policy="norm", max_consecutive_skips=3)
    with (
        pytest.raises(RuntimeError, match=r"skipped 3 optimizer steps in a row.*net\.0"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        _fit(_AlwaysNaN(), [clipper], steps=10)


class _Spike(_Recording):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * (1e4 if self.global_step == 25 else 1.0)


def test_spike_skipping_skips_only_the_spike() -> None:
    torch.manual_seed(0)
    model = _Spike()
    clipper = AdaptiveGradClip(policy=FixedNorm(1e9), skip_spikes=True, spike_min_samples=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit(model, [clipper], steps=30, limit_train_batches=8, max_epochs=10)
    assert clipper.skipped_steps == 1


def test_monitor_norms_are_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"clip": 0}
    original = clip_module.grad_norms

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls["clip"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(clip_module, "grad_norms", counting)
    torch.manual_seed(0)
    model = _Recording()
    monitor = GradNormMonitor(log_every_n_steps=1, log_update_ratio=False)
    clipper = AdaptiveGradClip(policy=FixedNorm(0.05), log_every_n_steps=100)
    logger = _fit(model, [monitor, clipper], steps=3)
    assert calls["clip"] == 0  # every step used the monitor's norms
    for step, raw in enumerate(model.raw):
        raw_total = float(torch.nn.utils.get_total_norm(raw))
        assert logger.at_step(step)["grad_norm/total"] == pytest.approx(raw_total, rel=1e-5)


def _reference_layer_clip(
    grads: dict[str, torch.Tensor], max_norm: float
) -> dict[str, torch.Tensor]:
    """Each module's gradients through torch's ``clip_grad_norm_`` on their own."""
    clipped: dict[str, torch.Tensor] = {}
    for layer in sorted({name.rpartition(".")[0] for name in grads}):
        names = [n for n in grads if n.rpartition(".")[0] == layer]
        params = [torch.nn.Parameter(torch.zeros_like(grads[n])) for n in names]
        for p, n in zip(params, names):
            p.grad = grads[n].clone()
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        clipped.update({n: p.grad for n, p in zip(names, params)})
    return clipped


@pytest.mark.parametrize(
    ("monitor_args", "scope"),
    [
        ({"norm_type": "inf"}, "global"),  # another norm order: its total is no L2 norm
        ({"exclude": ["net.4.*"]}, "global"),  # fewer parameters
        ({"group_by": "parameter"}, "layer"),  # other groups
    ],
)
def test_norms_of_a_monitor_that_measures_something_else_are_not_reused(
    monitor_args: dict[str, Any], scope: str
) -> None:
    torch.manual_seed(0)
    model = _Recording()
    monitor = GradNormMonitor(log_every_n_steps=1, log_update_ratio=False, **monitor_args)
    clipper = AdaptiveGradClip(policy=FixedNorm(0.05), scope=scope, log_every_n_steps=100)
    _fit(model, [monitor, clipper], steps=2)
    names = [n for n, _ in model.named_parameters()]
    for raw, used in zip(model.raw, model.used):
        if scope == "global":
            params = [torch.nn.Parameter(torch.zeros_like(g)) for g in raw]
            for p, g in zip(params, raw):
                p.grad = g.clone()
            torch.nn.utils.clip_grad_norm_(params, 0.05)
            expected = [p.grad for p in params]
        else:
            by_layer = _reference_layer_clip(dict(zip(names, raw)), 0.05)
            expected = [by_layer[n] for n in names]
        for got, want in zip(used, expected):
            torch.testing.assert_close(got, want)


class _SometimesUnused(pl.LightningModule):
    """A side layer that takes part in the loss on even steps only: no gradient on odd ones."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(8, 8)
        self.side = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 2)
        self.raw: list[dict[str, torch.Tensor]] = []
        self.used: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        hidden = torch.relu(self.body(batch[0]))
        if self.global_step % 2 == 0:
            hidden = hidden + self.side(hidden)
        return torch.nn.functional.cross_entropy(self.head(hidden), batch[1])

    def _grads(self) -> dict[str, torch.Tensor]:
        return {n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None}

    def on_after_backward(self) -> None:
        self.raw.append(self._grads())

    def on_before_optimizer_step(self, optimizer: Any) -> None:  # after the callbacks
        self.used.append(self._grads())

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> Any:
        x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
        return torch.utils.data.DataLoader(list(zip(x, y)), batch_size=16)


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("with_monitor", [False, True])
def test_parameters_without_a_gradient_on_some_steps(scope: str, with_monitor: bool) -> None:
    torch.manual_seed(0)
    model = _SometimesUnused()
    clipper = AdaptiveGradClip(policy=FixedNorm(0.05), scope=scope, log_every_n_steps=100)
    monitor = GradNormMonitor(log_every_n_steps=1, log_update_ratio=False)
    _fit(model, [monitor, clipper] if with_monitor else [clipper], steps=4)
    assert ["side.weight" in raw for raw in model.raw] == [True, False, True, False]
    for raw, used in zip(model.raw, model.used):
        assert used.keys() == raw.keys()  # a missing gradient stays missing
        if scope == "global":
            params = {n: torch.nn.Parameter(torch.zeros_like(g)) for n, g in raw.items()}
            for n, p in params.items():
                p.grad = raw[n].clone()
            torch.nn.utils.clip_grad_norm_(list(params.values()), 0.05)
            expected = {n: p.grad for n, p in params.items()}
        else:
            expected = _reference_layer_clip(raw, 0.05)
        for n, got in used.items():
            torch.testing.assert_close(got, expected[n])


def test_two_clippers_warning_and_deepspeed_error() -> None:
    with pytest.warns(UserWarning, match="both clipping"):
        _fit(TinyMLP(), [AdaptiveGradClip(policy="norm")], steps=1, gradient_clip_val=1.0)


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    def run(steps: int, ckpt: Path | None = None, save: bool = False) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = _Recording(batch_size=64)  # 4 batches an epoch: step 20 ends epoch 5
        callbacks: list = [AdaptiveGradClip(policy=ZClip(warmup_steps=5, max_grad_norm=None))]
        if save:
            callbacks.append(
                pl.callbacks.ModelCheckpoint(
                    dirpath=tmp_path, save_last=True, every_n_train_steps=20
                )
            )
        kwargs = quiet_trainer_kwargs(max_steps=steps, enable_checkpointing=save)
        pl.Trainer(logger=False, callbacks=callbacks, **kwargs).fit(model, ckpt_path=ckpt)
        return {k: v.clone() for k, v in model.state_dict().items()}

    straight = run(40)
    run(20, save=True)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("AdaptiveGradClip"))
    assert bool(state["optimizer_0"]["policy"]["initialized"])
    resumed = run(40, ckpt=tmp_path / "last.ckpt")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"policy": "zclipp"}, "policy='zclipp'"),
        ({"scope": "tensor"}, "scope='tensor'"),
        ({"spike_sigma": 0}, "spike_sigma=0"),
        ({"max_consecutive_skips": 0}, "max_consecutive_skips=0"),
        ({"skip_nonfinite": "no"}, "skip_nonfinite='no'"),
        ({"spike_window": 1}, "AdaptiveGradClip(spike_window=1): spike_window must be"),
        ({"spike_min_samples": 200}, "spike_min_samples must be an integer in [2, 128]"),
        ({"log_every_n_steps": 0}, "log_every_n_steps must be an integer >= 1 or None"),
        ({"skip_spikes": 1}, "AdaptiveGradClip(skip_spikes=1): skip_spikes must be True or"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, fragment: str) -> None:
    with pytest.raises((ValueError, TypeError)) as info:
        AdaptiveGradClip(**kwargs)
    assert fragment in str(info.value)


def test_fp16_scaler_skips_are_counted_not_doubled() -> None:
    from pytorch_lightning.plugins.precision import MixedPrecision

    torch.manual_seed(0)
    model = _Recording()
    steps_taken: list[int] = []

    class CountSteps(pl.Callback):
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            trainer.optimizers[0].register_step_post_hook(lambda *a: steps_taken.append(1))

    # 2**24 overflows fp16 gradients on the first steps: the GradScaler skips them itself.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    clipper = AdaptiveGradClip(policy=FixedNorm(1.0), log_every_n_steps=1)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger = _fit(model, [clipper, CountSteps()], steps=12, plugins=[plugin])
    scaler_skipped = 12 - len(steps_taken)
    assert scaler_skipped >= 1
    assert clipper._own_skips == 0  # the callback did not act on them
    assert clipper.skipped_steps == scaler_skipped  # but it counts them
    assert clipper.state_dict()["skipped_steps"] == scaler_skipped
    assert logger.at_step(11)["clip/skipped_steps"] == scaler_skipped


@pytest.mark.slow
def test_resume_in_a_fresh_process_equals_uninterrupted_run(tmp_path: Path) -> None:
    import subprocess
    import sys

    worker = Path(__file__).resolve().parents[1] / "workers" / "clip_resume.py"

    def run(*args: str) -> None:
        subprocess.run(
            [sys.executable, str(worker), *args], check=True, timeout=300, capture_output=True
        )

    run("40", str(tmp_path / "straight.pt"))
    run("20", str(tmp_path / "first.pt"), "--save-dir", str(tmp_path / "ckpt"))
    run("40", str(tmp_path / "resumed.pt"), "--resume", str(tmp_path / "ckpt" / "last.ckpt"))
    straight = torch.load(tmp_path / "straight.pt", weights_only=True)
    first = torch.load(tmp_path / "first.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert any(not torch.equal(first[k], straight[k]) for k in straight)  # 20 more steps did move
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key


def test_two_clippers_both_skip_decisions_apply() -> None:
    torch.manual_seed(0)
    model = _Recording()
    model.inject_at = 2
    first = AdaptiveGradClip(policy=FixedNorm(10.0), skip_nonfinite=False, skip_spikes=True)
    second = AdaptiveGradClip(policy=FixedNorm(1e9))  # this one skips non-finite steps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit(model, [first, second], steps=4)
    assert second.skipped_steps == 1 and first.skipped_steps == 0
    assert torch.isfinite(torch.cat([p.detach().flatten() for p in model.parameters()])).all()


class _ManualTwoOptimizers(pl.LightningModule):
    """Manual optimization, two optimizers: the clipper runs inside each ``opt.step()``."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a = torch.nn.Linear(6, 6)
        self.b = torch.nn.Linear(6, 1)
        self.raw: dict[str, list[list[torch.Tensor]]] = {"a": [], "b": []}
        self.used: dict[str, list[list[torch.Tensor]]] = {"a": [], "b": []}

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt_a, opt_b = self.optimizers()
        for name, opt, module in (("a", opt_a, self.a), ("b", opt_b, self.b)):
            opt.zero_grad()
            self.manual_backward(self.b(torch.tanh(self.a(batch[0]))).pow(2).mean() * 50)
            self.raw[name].append([p.grad.clone() for p in module.parameters()])
            opt.step()
            self.used[name].append([p.grad.clone() for p in module.parameters()])

    def configure_optimizers(self) -> Any:
        return (
            torch.optim.SGD(self.a.parameters(), lr=0.01),
            torch.optim.SGD(self.b.parameters(), lr=0.01),
        )

    def train_dataloader(self) -> Any:
        data = torch.utils.data.TensorDataset(torch.randn(48, 6))
        return torch.utils.data.DataLoader(data, batch_size=16)


def test_manual_optimization_clips_each_optimizer_with_its_own_state() -> None:
    torch.manual_seed(0)
    model = _ManualTwoOptimizers()
    clipper = AdaptiveGradClip(policy=ZClip(warmup_steps=2, max_grad_norm=0.5))
    _fit(model, [clipper], steps=6)  # 3 batches x 2 optimizers
    assert set(clipper._states) == {0, 1}
    policies = [clipper._states[i].policy for i in (0, 1)]
    assert policies[0] is not policies[1]
    assert not torch.equal(policies[0].mean, policies[1].mean)  # separate statistics
    for name in ("a", "b"):
        for raw, used in zip(model.raw[name], model.used[name]):
            raw_norm = float(torch.nn.utils.get_total_norm(raw))
            assert float(torch.nn.utils.get_total_norm(used)) <= min(raw_norm, 0.5) * (1 + 1e-5)


def test_deepspeed_is_refused_at_setup_with_what_to_do() -> None:
    from types import SimpleNamespace

    from pytorch_lightning.strategies import DeepSpeedStrategy

    strategy = object.__new__(DeepSpeedStrategy)  # the check needs the type, not a DeepSpeed run
    trainer = SimpleNamespace(strategy=strategy, gradient_clip_val=None, callbacks=[])
    with pytest.raises(RuntimeError, match="gradient_clipping"):
        AdaptiveGradClip(policy="norm").setup(trainer, None, "fit")


class _CountTensorsPassed(TorchFunctionMode):
    """Counts the calls of some torch functions, and the tensors handed to them."""

    def __init__(self, *funcs: Any) -> None:
        super().__init__()
        self.calls = dict.fromkeys(funcs, 0)
        self.tensors = dict.fromkeys(funcs, 0)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        if func in self.calls:
            self.calls[func] += 1
            self.tensors[func] += len(args[0]) if isinstance(args[0], (list, tuple)) else 1
        return func(*args, **(kwargs or {}))


class _CountDuringTraining(pl.Callback):
    """Keeps a :class:`_CountTensorsPassed` active from the start to the end of training."""

    def __init__(self, *funcs: Any) -> None:
        self.counter = _CountTensorsPassed(*funcs)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.counter.__enter__()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.counter.__exit__(None, None, None)


class _PlainSGD(_Recording):
    """SGD without momentum: the optimizer itself never calls ``_foreach_mul_``."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: list[list[torch.Tensor]] = []

    def on_after_backward(self) -> None:
        super().on_after_backward()
        self.weights.append([p.detach().clone() for p in self.parameters()])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize(("max_norm", "scaling_passes"), [(1e9, 0), (1e-9, 6)])
def test_gradients_are_scaled_only_on_steps_that_clip(max_norm: float, scaling_passes: int) -> None:
    torch.manual_seed(0)
    model = _PlainSGD()
    count = _CountDuringTraining(torch._foreach_mul_)
    clipper = AdaptiveGradClip(policy=FixedNorm(max_norm), log_every_n_steps=100)
    _fit(model, [count, clipper], steps=6)
    assert count.counter.calls[torch._foreach_mul_] == scaling_passes
    for raw, used in zip(model.raw, model.used):
        total = torch.linalg.vector_norm(torch.stack([g.norm() for g in raw]))
        coef = min(1.0, max_norm / (float(total) + 1e-6))
        for g_raw, g_used in zip(raw, used):
            torch.testing.assert_close(g_used, g_raw * coef, rtol=1e-5, atol=0)


@pytest.mark.parametrize(("clipping", "scaled_tensors"), [(1e9, 0), (1e-9, 6 * 6)])
def test_agc_reads_the_gradients_once_and_scales_only_what_clips(
    clipping: float, scaled_tensors: int
) -> None:
    torch.manual_seed(0)
    model = _PlainSGD()
    count = _CountDuringTraining(torch._foreach_mul_, torch._foreach_norm)
    clipper = AdaptiveGradClip(policy=AGC(clipping=clipping), log_every_n_steps=100)
    _fit(model, [count, clipper], steps=6)
    assert count.counter.tensors[torch._foreach_mul_] == scaled_tensors  # 6 steps x 6, or none
    # The total norm (for skipping) comes from AGC's unit norms: no whole-tensor pass.
    assert count.counter.calls[torch._foreach_norm] == 0
    names = [n for n, _ in model.named_parameters()]
    assert len(model.used) == 6
    for weights, raw, used in zip(model.weights, model.raw, model.used):
        reference = [torch.nn.Parameter(w.clone()) for w in weights]
        for r, g in zip(reference, raw):
            r.grad = g.clone()
        reference_agc_(reference, clipping, 1e-3)
        for name, r, g_used in zip(names, reference, used):
            torch.testing.assert_close(g_used, r.grad, rtol=1e-5, atol=1e-12, msg=name)


# --------------------------------------------------------------------------- custom policies
#
# The callback treats every policy through the protocol alone (prepare, decide, the plan's
# needs_scaling / apply_ / clipped_norm): a policy written here, of either kind, clips as an
# independent computation of its rule says.

SCHEDULE = (0.1, 0.05, 1e9, 0.02)  # clips at steps 0, 1 and 3 (norms ~0.2-0.4), not at 2


class _Schedule(NormPolicy):
    """A user's norm policy: the threshold of step ``k`` is ``SCHEDULE[k]``."""

    name = "schedule"
    _state_names = ("step",)
    step: torch.Tensor | None = None

    def threshold(self, norm: torch.Tensor) -> torch.Tensor:
        if self.step is None:
            self.step = torch.zeros((), dtype=torch.long, device=norm.device)
        table = torch.tensor(SCHEDULE, dtype=torch.float64, device=norm.device)
        threshold = table[self.step.clamp_max(len(SCHEDULE) - 1)].expand(norm.shape)
        self.step = self.step + 1
        return threshold


class _TensorNormPlan(ClipPlan):
    """Each tensor to a norm of at most ``bound``, one flag per tensor."""

    def __init__(self, grads: list[torch.Tensor], bound: float) -> None:
        self.grads, self.bound = grads, bound

    def needs_scaling(self) -> torch.Tensor:
        return torch.stack([g.norm() > self.bound for g in self.grads])

    def apply_(self, parts: Any = None) -> None:
        for i, g in enumerate(self.grads):
            if parts is None or parts[i]:
                g.mul_(torch.clamp(self.bound / (g.norm() + 1e-6), max=1.0))


class _PerTensorNorm(DirectClipper):
    """A user's direct clipper: every gradient tensor on its own, no global norm."""

    name = "per_tensor"

    def __init__(self, bound: float) -> None:
        self._bound = bound

    @property
    def bound(self) -> float:
        return self._bound

    def prepare(
        self, parameters: Any, grads: Any, group_index: torch.Tensor | None = None
    ) -> _TensorNormPlan:
        return _TensorNormPlan(list(grads), self._bound)


def test_a_custom_norm_policy_clips_like_clip_grad_norm_at_its_threshold() -> None:
    torch.manual_seed(0)
    model = _Recording()
    clipper = AdaptiveGradClip(policy=_Schedule(), log_every_n_steps=1)
    logger = _fit(model, [clipper], steps=len(SCHEDULE))
    clipped_steps = 0
    for step, (raw, used) in enumerate(zip(model.raw, model.used, strict=True)):
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in raw]
        for p, g in zip(params, raw):
            p.grad = g.clone()
        total = float(torch.nn.utils.clip_grad_norm_(params, SCHEDULE[step]))
        clipped_steps += total > SCHEDULE[step]
        for p, g in zip(params, used):
            torch.testing.assert_close(g, p.grad)
        logged = logger.at_step(step)
        assert logged["clip/threshold"] == pytest.approx(SCHEDULE[step])
        assert logged["clip/active"] == float(total > SCHEDULE[step])
        expected = min(total, SCHEDULE[step])
        assert logged["grad_norm/total_clipped"] == pytest.approx(expected, rel=1e-5)
    assert clipped_steps == 3
    # Its state is the callback's to checkpoint, as a built-in policy's is.
    assert clipper.state_dict()["optimizer_0"]["policy"] == {"step": torch.tensor(4)}


@pytest.mark.parametrize("skip_nonfinite", [True, False], ids=["flags-read", "no-read"])
def test_a_custom_direct_clipper_clips_each_tensor_on_its_own(skip_nonfinite: bool) -> None:
    torch.manual_seed(0)
    model = _Recording()
    bound = 0.05
    clipper = AdaptiveGradClip(
        policy=_PerTensorNorm(bound), skip_nonfinite=skip_nonfinite, log_every_n_steps=1
    )
    logger = _fit(model, [clipper], steps=3)
    changed = []
    for step, (raw, used) in enumerate(zip(model.raw, model.used, strict=True)):
        for g_raw, g_used in zip(raw, used):
            p = torch.nn.Parameter(torch.zeros_like(g_raw))
            p.grad = g_raw.clone()
            torch.nn.utils.clip_grad_norm_([p], bound)  # the tensor on its own
            torch.testing.assert_close(g_used, p.grad)
            changed.append(not torch.equal(g_used, g_raw))
        logged = logger.at_step(step)
        assert logged["clip/threshold"] == bound
        assert "clip/coef" not in logged and "clip/active" not in logged  # no norm scaling
        after = float(torch.nn.utils.get_total_norm(used))  # measured: the plan cannot tell
        assert logged["grad_norm/total_clipped"] == pytest.approx(after, rel=1e-5)
    assert any(changed) and not all(changed)  # some tensors clip, others are left alone

    # The same policy object in a plain loop: clip_with_policy_ makes the same calls.
    layer = torch.nn.Linear(4, 3)
    layer(torch.randn(8, 4)).pow(2).sum().backward()
    raw = [p.grad.clone() for p in layer.parameters()]
    norm, threshold, coef = clip_with_policy_(_PerTensorNorm(bound), layer)
    assert float(norm) == pytest.approx(float(torch.nn.utils.get_total_norm(raw)), rel=1e-6)
    assert float(threshold) == bound and coef.isnan()
    for p, g in zip(layer.parameters(), raw):
        assert float(p.grad.norm()) == pytest.approx(min(bound, float(g.norm())), rel=1e-5)

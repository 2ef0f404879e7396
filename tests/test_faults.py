"""Fault injection: what a guarded run does when things go wrong (docs/reliability.md).

Every test injects one fault the way a user would meet it (an unwritable folder, a
missing package, odd parameters, a frozen layer, a reused callback, a fault on one DDP
rank, an fp16 overflow, an LR scheduler, a bad argument) and checks the outcome the
reliability page promises. The references are plain torch (``clip_grad_norm_``,
``GradScaler``, ``StepLR``), never the library's own output. Lightning runs are tiny
(a few steps of a small MLP); the distributed cases share one 2-process launch.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import distributed_helpers as h
import pytest
import pytorch_lightning as pl
import tomllib
import torch
import torch.distributed as dist
from helpers import CaptureLogger, TinyMLP, quiet_trainer_kwargs
from torch import nn

import lightning_gradguard
from lightning_gradguard import (
    AdaptiveGradClip,
    GradGuard,
    GradGuardMixin,
    GradNormMonitor,
    HealthReport,
    InitAtStart,
    LayerReinit,
    UnitRecycler,
)
from lightning_gradguard.callbacks.dead_unit_monitor import DeadUnitMonitor
from lightning_gradguard.functional import AutoClip, FixedNorm, FixedValue, ZClip
from lightning_gradguard.functional.clipping import clip_by_norm_
from lightning_gradguard.functional.policies import EMARatio, clip_with_policy_

ROOT = Path(__file__).resolve().parents[1]


def _fit(
    model: pl.LightningModule, callbacks: list, steps: int, **kwargs: Any
) -> tuple[CaptureLogger, list[str], pl.Trainer]:
    """One quiet fit; returns the logger, the lightning_gradguard warnings and the trainer."""
    logger = CaptureLogger()
    trainer = pl.Trainer(
        logger=logger, callbacks=callbacks, **quiet_trainer_kwargs(max_steps=steps, **kwargs)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model)
    ours = [str(w.message) for w in caught if "lightning_gradguard" in str(w.filename)]
    return logger, ours, trainer


class _Recording(TinyMLP):
    """Raw gradients after backward, and the gradients the optimizer receives."""

    def __init__(self, loss_scale: float = 1.0, nan_at: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.loss_scale = loss_scale
        self.nan_at = nan_at
        self.raw: list[list[torch.Tensor]] = []
        self.used: list[list[torch.Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) * self.loss_scale

    def on_after_backward(self) -> None:
        if self.nan_at is not None and self.global_step == self.nan_at:
            self.net[2].weight.grad[0, 0] = float("nan")
        self.raw.append([p.grad.clone() for p in self.parameters()])

    def on_before_optimizer_step(self, optimizer: Any) -> None:  # after every callback's hook
        self.used.append([p.grad.clone() for p in self.parameters()])


# --------------------------------------------------------------------------- crashes


def test_unwritable_out_dir_is_one_warning_and_training_goes_on(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "a_file"
    not_a_folder.write_text("in the way")
    guard = GradGuard(
        dead_units=False, report_args={"out_dir": str(not_a_folder), "picture_every_n_steps": 2}
    )
    _, ours, trainer = _fit(TinyMLP(), [guard], steps=6)
    assert trainer.global_step == 6  # the run finished
    failures = [w for w in ours if "cannot write pictures" in w]
    assert len(failures) == 1, ours  # pictures at steps 2, 4, 6 and the end: one warning
    assert "HealthReport" in failures[0] and f"out_dir={str(not_a_folder)!r}" in failures[0]
    _, again, _ = _fit(TinyMLP(), [guard], steps=2)  # a reused guard says it for its new run
    assert len([w for w in again if "cannot write pictures" in w]) == 1


_NO_MATPLOTLIB = """
import importlib.metadata, sys, warnings
def absent(name):
    return name == "matplotlib" or name.startswith("matplotlib.")
class Block:  # as if matplotlib were not installed: no module, no distribution metadata
    def find_spec(self, name, path=None, target=None):
        if absent(name):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
for lookup in ("version", "distribution", "metadata"):
    def blocked(name, _real=getattr(importlib.metadata, lookup)):
        if absent(name):
            raise importlib.metadata.PackageNotFoundError(name)
        return _real(name)
    setattr(importlib.metadata, lookup, blocked)
sys.path.insert(0, sys.argv[1])
import pytorch_lightning as pl
from helpers import TinyMLP, quiet_trainer_kwargs
from lightning_gradguard import GradGuard
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    trainer = pl.Trainer(callbacks=[GradGuard()], logger=False, **quiet_trainer_kwargs(max_steps=3))
    trainer.fit(TinyMLP())
assert "matplotlib" not in sys.modules
print("STEPS", trainer.global_step)
print("WARNINGS", sum("matplotlib is not installed" in str(w.message) for w in caught))
"""


def test_without_matplotlib_pictures_are_skipped_with_one_warning(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _NO_MATPLOTLIB, str(Path(__file__).parent)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "STEPS 3" in result.stdout and "WARNINGS 1" in result.stdout, result.stdout


class _OddParameters(pl.LightningModule):
    """A sparse embedding, a complex parameter and an integer buffer-like parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.phase = nn.Parameter(torch.randn(4, dtype=torch.complex64))
        self.emb = nn.Embedding(10, 4, sparse=True)
        self.counter = nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)
        self.raw: list[list[torch.Tensor]] = []
        self.used: list[list[torch.Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = self.lin(batch[0]) + self.emb(torch.tensor([1, 2, 2, 5])).sum(0)
        return (x * self.phase).abs().pow(2).mean() * 30

    def on_after_backward(self) -> None:
        self.raw.append(
            [
                self.lin.weight.grad.clone(),
                self.lin.bias.grad.clone(),
                self.phase.grad.clone(),
                self.emb.weight.grad.to_dense(),
            ]
        )

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.used.append(
            [
                self.lin.weight.grad.clone(),
                self.lin.bias.grad.clone(),
                self.phase.grad.clone(),
                self.emb.weight.grad.to_dense(),
            ]
        )

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> Any:
        data = torch.utils.data.TensorDataset(
            torch.randn(16, 4, generator=torch.Generator().manual_seed(3))
        )
        return torch.utils.data.DataLoader(data, batch_size=4)


@pytest.mark.parametrize("policy", ["norm", "value", "zclip"])
def test_sparse_complex_and_integer_parameters_do_not_crash(policy: str) -> None:
    torch.manual_seed(0)
    model = _OddParameters()
    clip = {"norm": FixedNorm(0.1), "value": FixedValue(0.05), "zclip": ZClip(warmup_steps=2)}
    guard = GradGuard(clip=clip[policy], dead_units=False, report=False, log_every_n_steps=1)
    logger, ours, trainer = _fit(model, [guard], steps=3)
    assert trainer.global_step == 3
    for part in ("GradNormMonitor", "AdaptiveGradClip"):
        said = [w for w in ours if w.startswith(part) and "emb.weight (sparse gradient)" in w]
        assert len(said) == 1, ours  # once, naming both left-out parameters
        assert "counter (integer dtype torch.int64)" in said[0]
    for raw, used in zip(model.raw, model.used):
        dense = raw[:3]  # lin.weight, lin.bias, phase: the measured ones
        assert torch.equal(used[3], raw[3])  # the sparse gradient is left alone
        if policy == "norm":  # as torch's clip_grad_norm_ does it, complex included
            expected = [g.clone() for g in dense]
            params = [nn.Parameter(torch.zeros_like(g)) for g in expected]
            for p, g in zip(params, expected):
                p.grad = g
            torch.nn.utils.clip_grad_norm_(params, 0.1)
            for got, p in zip(used[:3], params):
                torch.testing.assert_close(got, p.grad)
        elif policy == "value":  # real and imaginary parts clamped
            torch.testing.assert_close(used[0], raw[0].clamp(-0.05, 0.05))
            torch.testing.assert_close(
                used[2],
                torch.complex(raw[2].real.clamp(-0.05, 0.05), raw[2].imag.clamp(-0.05, 0.05)),
            )
    # grad_norm/total is the norm of the measured gradients, by torch
    first = logger.at_step(0)["grad_norm/total"]
    assert first == pytest.approx(float(torch.nn.utils.get_total_norm(model.raw[0][:3])), rel=1e-5)


_DOCTOR_MODELS = """
import pytorch_lightning as pl, torch
from torch import nn

class NoData(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

class Odd(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.phase = nn.Parameter(torch.randn(4, dtype=torch.complex64))
        self.emb = nn.Embedding(10, 4, sparse=True)
        self.counter = nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)

    def training_step(self, batch, batch_idx):
        x = self.lin(batch[0]) + self.emb(torch.tensor([1, 2, 2, 5])).sum(0)
        return (x * self.phase).abs().pow(2).mean()

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(16, 4))
        return torch.utils.data.DataLoader(data, batch_size=4)
"""


def test_doctor_measures_odd_parameters_and_refuses_a_model_without_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from lightning_gradguard.doctor import main

    (tmp_path / "fault_models.py").write_text(_DOCTOR_MODELS, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert main(["--model", "fault_models:NoData"]) == 2
    err = capsys.readouterr().err
    assert "train_dataloader() is not implemented" in err
    with pytest.warns(UserWarning, match=r"not measured .*counter \(integer dtype torch.int64\)"):
        code = main(["--model", "fault_models:Odd", "--steps", "1"])
    out, err = capsys.readouterr()
    assert code in (0, 1), err  # a diagnosis, not a usage error
    assert "SparseCPU" not in out + err and "Traceback" not in out + err


def test_layer_scope_whose_globs_match_nothing_is_a_warning() -> None:
    torch.manual_seed(0)
    model = _Recording()
    clipper = AdaptiveGradClip(policy=FixedNorm(1e-3), scope="layer", include=["encoder.*"])
    _, ours, trainer = _fit(model, [clipper], steps=2)
    assert trainer.global_step == 2
    said = [w for w in ours if "matches include=['encoder.*']" in w]
    assert len(said) == 1 and said[0].startswith("AdaptiveGradClip")
    for raw, used in zip(model.raw, model.used):  # nothing clipped
        assert all(torch.equal(a, b) for a, b in zip(raw, used))


# --------------------------------------------------------------------------- silent wrong results


class _FrozenFirstLayer(TinyMLP):
    """The usual fine-tuning freeze: requires_grad=False, but still in the optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.net[0].requires_grad_(False)


def test_frozen_parameters_are_not_vanishing_and_not_reinitialized() -> None:
    torch.manual_seed(0)
    model = _FrozenFirstLayer()
    frozen = model.net[0].weight.detach().clone()
    monitor = GradNormMonitor(log_every_n_steps=1, patience=2)
    reinit = LayerReinit(check_every_n_steps=2)
    _, ours, _ = _fit(model, [monitor, reinit], steps=6)
    assert not [w for w in ours if "vanishing" in w], ours
    assert reinit.reinit_counts == {}
    assert torch.equal(model.net[0].weight, frozen)


def test_reused_callback_starts_the_second_fit_afresh() -> None:
    """A sweep reuses one GradGuard: fit 2 must not clip with fit 1's statistics."""
    torch.manual_seed(0)
    guard = GradGuard(clip=AutoClip(percentile=10, window=100), dead_units=False, report=False)
    _fit(_Recording(loss_scale=1e-4), [guard], steps=4)  # fit 1: tiny norms
    second = _Recording()
    _fit(second, [guard], steps=2)
    # AutoClip's first threshold is the first norm itself: nothing is clipped at step 0.
    assert all(torch.equal(a, b) for a, b in zip(second.raw[0], second.used[0]))
    assert guard.clipper is not None and guard.clipper.skipped_steps == 0


def test_a_reused_dead_unit_monitor_does_not_swap_the_next_model() -> None:
    torch.manual_seed(0)
    monitor = DeadUnitMonitor(every_n_steps=2, window=1, rescue="threshold")
    dead = TinyMLP()
    with torch.no_grad():
        dead.net[0].bias.fill_(-100.0)  # every unit of net.1 is dead
    _fit(dead, [monitor], steps=2)
    assert isinstance(dead.net[1], nn.LeakyReLU)  # fit 1 rescued its model
    healthy = TinyMLP()
    _fit(healthy, [monitor], steps=1)
    assert isinstance(healthy.net[1], nn.ReLU)  # fit 2's model is not fit 1's
    assert monitor.swapped == []


def test_each_optimizer_and_each_fit_gets_a_fresh_policy_in_the_mixin() -> None:
    class Model(GradGuardMixin, TinyMLP):
        gradguard_clip = AutoClip(percentile=50, window=100)

    torch.manual_seed(0)
    model = Model()
    first, second = (
        torch.optim.SGD(model.net[0].parameters()),
        torch.optim.SGD(model.net[2].parameters()),
    )
    model(torch.randn(4, 16)).pow(2).sum().backward()
    policy = model.gradguard_policy_for(0, first)
    clip_with_policy_(policy, list(model.net[0].parameters()))
    fresh = model.gradguard_policy_for(1, second)
    assert fresh is not policy and fresh.history is None  # no copy of optimizer 0's statistics
    assert Model.gradguard_clip.history is None  # the template itself is never updated
    assert model.gradguard_policy_for(0, first) is policy  # same optimizer: same statistics
    new_fit = torch.optim.SGD(model.net[0].parameters())
    assert model.gradguard_policy_for(0, new_fit).history is None  # a new fit starts afresh


def test_skipped_steps_are_logged_at_the_step_they_happen() -> None:
    torch.manual_seed(0)
    model = _Recording(nan_at=2)
    clipper = AdaptiveGradClip(policy=FixedNorm(1.0), log_every_n_steps=1)
    logger, _, _ = _fit(model, [clipper], steps=4)
    logged = {step: logger.at_step(step)["clip/skipped_steps"] for step in range(4)}
    assert logged == {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0}


def test_fp16_scaler_skips_count_toward_the_stop() -> None:
    """NaN on every step: the GradScaler skips each one; the run must stop, not go on."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    class AlwaysNaN(TinyMLP):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return super().training_step(batch, batch_idx) * float("nan")

    scaler = torch.amp.GradScaler("cpu")
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    clipper = AdaptiveGradClip(policy=FixedNorm(1.0), max_consecutive_skips=3)
    model = AlwaysNaN()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"skipped 3 optimizer steps in a row.*GradScaler"):
        _fit(model, [clipper], steps=50, plugins=[plugin])
    assert scaler.get_scale() < 65536.0  # torch's GradScaler did skip (and back off)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


class _Scheduled(_Recording):
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def test_per_step_lr_scheduler_keeps_its_marker_and_teardown_restores_the_step() -> None:
    torch.manual_seed(0)
    model = _Scheduled(nan_at=1)
    guard = GradGuard(clip="norm", dead_units=False, report=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = pl.Trainer(logger=False, callbacks=[guard], **quiet_trainer_kwargs(max_steps=4))
        optimizer_step_before: list[Any] = []

        class Peek(pl.Callback):
            def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
                optimizer_step_before.append(vars(trainer.optimizers[0])["step"])

        trainer.callbacks.insert(0, Peek())
        trainer.fit(model)
    assert not [w for w in caught if "has been overridden" in str(w.message)]
    optimizer = trainer.optimizers[0]
    # torch's own LR-scheduler wrapper is back, not deleted and not ours
    assert vars(optimizer)["step"] is optimizer_step_before[0]
    assert getattr(optimizer.step, "_wrapped_by_lr_sched", False)
    # the scheduler stepped every step (StepLR by hand: 0.1 · 0.5^4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**4)


# --------------------------------------------------------------------------- distributed


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs gloo")
    out = tmp_path_factory.mktemp("fault_runs")
    h.launch_ranks("faults_run.py", str(out), timeout=240)
    return out


@pytest.mark.distributed
def test_ddp_finite_spike_on_one_rank_keeps_the_replicas_identical(ranks: Path) -> None:
    runs = [h.read_json(ranks / f"spike.rank{r}.json") for r in range(h.WORLD_SIZE)]
    step = h.FAULT_SPIKE_STEP
    for run in runs:
        assert run["skipped_steps"] == 1
        assert [e["kind"] for e in run["events"]] == ["skip"]
        assert run["events"][0]["step"] == step
    # every rank folded the same number: ZClip's statistics and the parameters, bit for bit
    assert runs[0]["policy_state"] == runs[1]["policy_state"]
    assert runs[0]["params"] == runs[1]["params"]
    # and the skipped step changed nothing
    assert runs[0]["params"][step] == runs[0]["params"][step - 1]


@pytest.mark.distributed
def test_ddp_nan_on_rank_one_is_counted_and_named_on_rank_zero(ranks: Path) -> None:
    zero, one = (h.read_json(ranks / f"nan.rank{r}.json") for r in range(h.WORLD_SIZE))
    assert zero["nonfinite_steps"][-1] == 1.0
    assert any(e["kind"] == "nonfinite" and e["layer"] == "net.2" for e in zero["events"])
    assert any("appeared in: net.2" in w for w in zero["warnings"])
    assert any("non-finite gradients (inf/NaN) in: net.2" in w for w in zero["warnings"])
    assert zero["skipped_steps"] == one["skipped_steps"] == 1
    assert zero["params"] == one["params"]


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (lambda: EMARatio(ratio=0.5), "ratio=0.5"),
        (lambda: DeadUnitMonitor(dormant_tau=math.nan), "dormant_tau=nan"),
        (lambda: UnitRecycler(tau=math.nan), "tau=nan"),
        (lambda: LayerReinit(at_steps="10", layers=["net.0"]), "at_steps='10'"),
        (lambda: GradNormMonitor(norm_type=True), "norm_type=True"),
        (lambda: GradNormMonitor(vanishing_threshold=math.inf), "vanishing_threshold=inf"),
        (lambda: GradNormMonitor(depth=2), "depth=2"),
        (lambda: AdaptiveGradClip(depth=2), "depth=2"),
        (lambda: InitAtStart(scheme="normal", std=-1.0), "std=-1.0"),
        (lambda: InitAtStart(seed="x"), "seed='x'"),
        (lambda: HealthReport(out_dir=123), "out_dir=123"),
        (lambda: HealthReport(alerts="no"), "alerts='no'"),
        (lambda: clip_with_policy_("zclip", []), "policy='zclip'"),
        (lambda: clip_by_norm_([torch.ones(2)], -1.0, torch.tensor(2.0)), "threshold=-1.0"),
        (lambda: GradGuard(clip="zclipp"), r"GradGuard\(clip='zclipp'\)"),
        (lambda: GradGuard(clip="norm", clip_args={"policy": "zclip"}), "clip_args=.*policy"),
        (lambda: GradGuard(skip_spikes=False, clip_args={"skip_spikes": True}), "skip_spikes"),
    ],
)
def test_bad_arguments_raise_at_construction_naming_the_argument(build: Any, fragment: str) -> None:
    with pytest.raises((TypeError, ValueError), match=fragment):
        build()


def test_depth_is_accepted_with_group_by_depth_in_either_scope() -> None:
    for scope in ("global", "layer"):
        clipper = AdaptiveGradClip("norm", scope=scope, group_by="depth", depth=1)
        _, _, trainer = _fit(TinyMLP(), [clipper], steps=1)
        assert trainer.global_step == 1


def test_a_second_clipper_is_named_in_a_warning() -> None:
    class Mixed(GradGuardMixin, TinyMLP):
        gradguard_clip = "norm"

    _, ours, _ = _fit(TinyMLP(), [AdaptiveGradClip("norm"), AdaptiveGradClip("zclip")], steps=1)
    assert len([w for w in ours if "2 gradient clippers are attached" in w]) == 1
    _, ours, _ = _fit(Mixed(), [GradGuard(dead_units=False, report=False)], steps=1)
    assert len([w for w in ours if "GradGuardMixin (gradguard_clip='norm') both clip" in w]) == 1


# --------------------------------------------------------------------------- dependencies


def test_dependencies_match_the_code() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "lightning_gradguard.__version__" and lightning_gradguard.__version__
    core = " ".join(project["project"]["dependencies"])
    extras = project["project"]["optional-dependencies"]
    assert "matplotlib" not in core and any("matplotlib" in d for d in extras["plots"])
    assert any("scikit-learn" in d for d in extras["demo"])


def test_complex_norms_keep_the_imaginary_part_in_float64() -> None:
    from lightning_gradguard.functional.norms import tensor_norms

    z = torch.tensor([3 + 4j, 0j], dtype=torch.complex64)  # |z| = 5, as torch's vector_norm
    expected = float(torch.linalg.vector_norm(z.to(torch.complex128)))
    assert tensor_norms([z, torch.ones(1)], exact=True).tolist() == [expected, 1.0]


@pytest.mark.parametrize("page", ["reliability.md", "architectures.md"])
def test_every_test_a_docs_table_names_exists(page: str) -> None:
    import re

    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    named = set(re.findall(r"(tests/(?:\w+/)?test_\w+\.py)::(\w+)", text))
    assert len(named) >= 15
    for path, name in named:
        assert f"def {name}(" in (ROOT / path).read_text(encoding="utf-8"), (path, name)


def test_sparse_gradient_norm_is_the_norm_of_the_dense_gradient() -> None:
    from lightning_gradguard.functional.norms import tensor_norms

    embedding = nn.Embedding(10, 3, sparse=True)
    embedding(torch.tensor([1, 1, 2])).sum().backward()  # index 1 twice: duplicates summed
    dense = embedding.weight.grad.to_dense().double()
    got = tensor_norms([embedding.weight.grad, torch.ones(2)]).tolist()
    assert got == pytest.approx([float(torch.linalg.vector_norm(dense)), math.sqrt(2)])


class _FailsInForward(TinyMLP):
    """Raises inside ``forward`` at one step, after a functional and a module ReLU ran."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.relu(self.net[0](x))  # a functional site (TorchFunctionMode)
        if self.global_step == self.fail_at:
            raise RuntimeError("the data went bad")
        return self.net[2](self.net[1](h))


def test_an_exception_in_forward_leaves_no_hook_or_mode_behind(tmp_path: Path) -> None:
    """Lightning skips ``teardown`` after an exception: the window must close anyway."""
    stack = torch._C._len_torch_function_stack()
    model = _FailsInForward(fail_at=3)
    guard = GradGuard(report=False, dead_unit_args={"every_n_steps": 100, "window": 10})
    trainer = pl.Trainer(callbacks=[guard], **quiet_trainer_kwargs(max_steps=6))
    with pytest.raises(RuntimeError, match="the data went bad"):
        trainer.fit(model)
    assert guard.unit_monitor is not None and guard.unit_monitor.last_stats == {}  # mid-window
    assert torch._C._len_torch_function_stack() == stack
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    model.fail_at = -1
    x = torch.randn(4, model.net[0].in_features)
    assert torch.equal(model(x), model.net[2](model.net[1](torch.relu(model.net[0](x)))))

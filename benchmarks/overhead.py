"""Per-step overhead of gradient monitoring, clipping and dead-unit tracking in Lightning.

Runs, in one process and interleaved (round-robin over the variants, the order
rotated every round so that drift and position effects hit every variant
equally), a bare Lightning training step against the same step with one thing
added. The variants (``VARIANTS``) come in four groups:

- reference: ``bare_again``, a second bare run, whose ratio to ``bare`` is the
  noise floor of the measurement (an A/A test);
- monitoring: ``GradNormMonitor(log_every_n_steps=1)``, Lightning's documented
  ``self.log_dict(grad_norm(self, norm_type=2))`` and ``wandb.watch(model,
  log="gradients", log_freq=1)`` with an offline ``WandbLogger``;
- clipping: ``AdaptiveGradClip`` with each policy (default arguments, default
  non-finite skipping, ``log_every_n_steps=50``; one variant logs every step),
  and the baselines it replaces: ``Trainer(gradient_clip_val=1.0)``, the ``zclip``
  package's Lightning callback, ``smartclip``'s AutoClip and timm's
  ``adaptive_clip_grad`` (optional: skipped, with a note, when not installed);
- dead units: ``DeadUnitMonitor`` inside and outside its measuring windows,

on three synthetic workloads (a 12-layer MLP, a 6-layer transformer encoder and
200 small Linear layers), and on request (``--workloads gpt2``) a Hugging Face
GPT-2 from a tiny config (needs ``transformers``). Every variant is a fresh ``Trainer.fit`` of
``warmup + steps`` optimizer steps; the first ``warmup`` steps are discarded.
The transformer step is ~15 times slower than the others, so by default it
runs fewer steps and rounds (see ``WORKLOADS``).

A step's time is the wall time from one ``on_train_batch_start`` to the next:
everything the loop does for one batch, including what Lightning does *after*
``on_train_batch_end`` (handing ``self.log`` metrics to the loggers), which a
start-to-end timer would miss. The figure reported is, per workload and
variant, the median over rounds of ``median(variant step) / median(bare step)``
with both medians taken in the same round. The same figure for mean step times
(which counts work done only every n-th step) is reported next to it.

Every variant has the same cheap in-memory logger attached (``wandb_watch``
adds its ``WandbLogger`` next to it) and the same Trainer flags
(``log_every_n_steps=1``), and the module logs its loss every step as a real
training step does.

Adding a variant is one entry in ``VARIANTS``: a factory taking a
:class:`BenchContext` and returning a :class:`VariantSetup`.

Usage::

    python benchmarks/overhead.py                      # full run, ~20 min on 2 cores
    python benchmarks/overhead.py --quick              # smoke run, tiny models, ~30 s
    python benchmarks/overhead.py --workloads mlp --variants bare,gradguard --rounds 9
    python benchmarks/overhead.py --timm-agc timm-1.0.31-py3-none-any.whl   # timm's AGC too
    python benchmarks/overhead.py --json results.json
    python benchmarks/overhead.py --profile gradguard --workloads mlp   # cProfile one fit
    python benchmarks/overhead.py --workloads gpt2,transformer --variants dead_window,dead_idle
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as _dt
import gc
import importlib
import importlib.util
import io
import json
import logging
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
import types
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# wandb reads these when it is imported and when a run starts.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_CONSOLE", "off")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader

# Imported up front: it imports the unified ``lightning`` package too, whose loggers
# ``_quiet`` then silences.
from lightning_gradguard import (
    AdaptiveGradClip,
    DeadUnitMonitor,
    GradGuard,
    GradNormMonitor,
    HealthReport,
    SpikeRecovery,
)
from lightning_gradguard.functional import (
    AGC,
    AutoClip,
    EMARatio,
    FixedNorm,
    FixedValue,
    GuardClip,
    ZClip,
)

# --------------------------------------------------------------------------- loggers


class MemoryLogger(Logger):
    """A cheap in-memory logger: keeps the number of calls and the last metrics."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.keys: set[str] = set()
        self.last: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls += 1
        self.keys.update(metrics)
        self.last = metrics


# --------------------------------------------------------------------------- timing


class StepTimer(pl.Callback):
    """Records ``time.perf_counter()`` at every train batch start and end."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.ends.append(time.perf_counter())

    def loop_times(self, warmup: int) -> list[float]:
        """Start-to-next-start seconds of every step after ``warmup`` (the last has no next)."""
        return [b - a for a, b in zip(self.starts, self.starts[1:])][warmup:]

    def inner_times(self, warmup: int) -> list[float]:
        """Batch start-to-end seconds (misses the loggers' work after ``on_train_batch_end``)."""
        return [b - a for a, b in zip(self.starts, self.ends)][warmup:]


# --------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """A model and a synthetic batch, at a full and a tiny (smoke-test) size.

    ``steps``, ``warmup`` and ``rounds`` are the defaults of the full run for this
    workload (``--steps``, ``--warmup`` and ``--rounds`` override them for all).
    """

    name: str
    description: str
    build: Callable[[bool], tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]]
    steps: int = 30
    warmup: int = 5
    rounds: int = 5


def _he_init(net: nn.Module) -> nn.Module:
    # He init keeps ReLU stacks (200 layers deep) away from denormal activations,
    # which are pathologically slow on CPU and would distort every variant.
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return net


def _relu_stack(layers: int, width: int) -> nn.Module:
    modules: list[nn.Module] = []
    for i in range(layers):
        modules.append(nn.Linear(width, width))
        if i < layers - 1:
            modules.append(nn.ReLU())
    return _he_init(nn.Sequential(*modules))


def _mlp(tiny: bool) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    width, batch = (32, 8) if tiny else (512, 128)
    return _relu_stack(12, width), (torch.randn(batch, width), torch.randn(batch, width))


def _transformer(tiny: bool) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    d_model, nhead, layers, seq, batch = (32, 4, 2, 8, 4) if tiny else (256, 8, 6, 64, 16)
    layer = nn.TransformerEncoderLayer(
        d_model, nhead, dim_feedforward=4 * d_model, batch_first=True
    )
    net = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    shape = (batch, seq, d_model)
    return net, (torch.randn(shape), torch.randn(shape))


def _many_small(tiny: bool) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    width, batch = (8, 8) if tiny else (64, 64)
    return _relu_stack(200, width), (torch.randn(batch, width), torch.randn(batch, width))


class _GPT2Hidden(nn.Module):
    """GPT-2 (``GPT2Model``) returning its last hidden states, for an MSE regression."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        from transformers import GPT2Model

        self.gpt2 = GPT2Model(config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.gpt2(input_ids=tokens).last_hidden_state


def _gpt2(tiny: bool) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    try:
        from transformers import GPT2Config
    except ImportError as error:
        raise SystemExit(
            "the gpt2 workload needs transformers: pip install -e '.[benchmarks]'"
        ) from error
    layers, width, heads, seq, batch = (1, 16, 2, 8, 2) if tiny else (4, 128, 4, 64, 16)
    config = GPT2Config(
        vocab_size=256,
        n_positions=seq,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    tokens = torch.randint(0, 256, (batch, seq))
    return _GPT2Hidden(config), (tokens, torch.randn(batch, seq, width))


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("mlp", "12 x Linear(512) + ReLU, batch 128", _mlp),
        Workload(
            "transformer",
            "TransformerEncoder 6 layers, d_model 256, nhead 8, seq 64, batch 16",
            _transformer,
            steps=12,
            warmup=3,
            rounds=3,
        ),
        Workload("many_small", "200 x Linear(64) + ReLU, batch 64", _many_small),
        Workload(
            "gpt2",
            "GPT-2 (transformers) 4 layers, n_embd 128, 4 heads, seq 64, batch 16",
            _gpt2,
            steps=12,
            warmup=3,
            rounds=3,
        ),
    )
}
DEFAULT_WORKLOADS = ("mlp", "transformer", "many_small")
"""Run when ``--workloads`` is not given (``gpt2`` needs the optional transformers)."""


# --------------------------------------------------------------------------- module


class BenchModule(pl.LightningModule):
    """MSE regression on fixed synthetic batches; hooks are added by the variants."""

    def __init__(self, net: nn.Module, optimizer: str, lr: float) -> None:
        super().__init__()
        self.net = net
        self.optimizer_name = optimizer
        self.lr = lr
        # (module, optimizer) -> None, run in on_before_optimizer_step.
        self.before_optimizer_step_hooks: list[Callable[[BenchModule, Any], None]] = []

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        for hook in self.before_optimizer_step_hooks:
            hook(self, optimizer)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


# --------------------------------------------------------------------------- variants


@dataclass
class BenchContext:
    """What a variant factory gets: the fresh module and a scratch directory."""

    module: BenchModule
    workload: str
    workdir: Path


@dataclass
class VariantSetup:
    """What a variant adds to the bare run.

    Attributes:
        callbacks: extra Trainer callbacks.
        loggers: extra loggers, attached next to the shared in-memory logger.
        before_optimizer_step: hooks run in the module's ``on_before_optimizer_step``.
        trainer_kwargs: extra Trainer arguments (e.g. ``gradient_clip_val``).
        teardown: called after the fit, whatever happened.
    """

    callbacks: list[Any] = field(default_factory=list)
    loggers: list[Any] = field(default_factory=list)
    before_optimizer_step: list[Callable[[BenchModule, Any], None]] = field(default_factory=list)
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    teardown: Callable[[], None] | None = None


@dataclass(frozen=True)
class Variant:
    """A registry entry.

    Attributes:
        label: the name shown in the tables.
        factory: builds what the variant adds, for one fresh module.
        group: the table section it is listed in.
        workloads: the workloads it runs on (``None``: all).
        requires: returns why the variant cannot run here (an optional package is
            missing), or ``None`` when it can. Unavailable variants are skipped
            with a note, never an error.
    """

    label: str
    factory: Callable[[BenchContext], VariantSetup]
    group: str = "monitoring"
    workloads: tuple[str, ...] | None = None
    requires: Callable[[], str | None] | None = None

    def runs_on(self, workload: str) -> bool:
        return self.workloads is None or workload in self.workloads


def _bare(ctx: BenchContext) -> VariantSetup:
    return VariantSetup()


# ---- monitoring


def _gradguard(ctx: BenchContext) -> VariantSetup:
    return VariantSetup(callbacks=[GradNormMonitor(log_every_n_steps=1)])


def _pl_grad_norm(ctx: BenchContext) -> VariantSetup:
    from pytorch_lightning.utilities import grad_norm

    def hook(module: BenchModule, optimizer: Any) -> None:
        # As Lightning's docs show it (docs: "Track and Visualize Experiments").
        module.log_dict(grad_norm(module, norm_type=2))

    return VariantSetup(before_optimizer_step=[hook])


def _wandb_watch(ctx: BenchContext) -> VariantSetup:
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    logger = WandbLogger(
        project="gradguard-overhead",
        save_dir=str(ctx.workdir),
        offline=True,
        settings=wandb.Settings(
            console="off", x_disable_stats=True, disable_git=True, save_code=False, silent=True
        ),
    )
    run = logger.experiment  # starts the (offline) run now, outside the timed steps
    wandb.watch(ctx.module, log="gradients", log_freq=1)

    def teardown() -> None:
        try:
            run.unwatch(ctx.module)
        finally:
            run.finish()

    return VariantSetup(loggers=[logger], teardown=teardown)


def _gradguard_grads_only(ctx: BenchContext) -> VariantSetup:
    monitor = GradNormMonitor(log_every_n_steps=1, log_param_norms=False, log_update_ratio=False)
    return VariantSetup(callbacks=[monitor])


def _gradguard_every50(ctx: BenchContext) -> VariantSetup:
    return VariantSetup(callbacks=[GradNormMonitor(log_every_n_steps=50)])


def _health_report(ctx: BenchContext) -> VariantSetup:
    # The reporting extras at their default intervals (pictures every 500 steps, no
    # histograms) on top of the monitor: compare with "GradNormMonitor every 50".
    report = HealthReport(out_dir=str(ctx.workdir / "pictures"))
    return VariantSetup(callbacks=[GradNormMonitor(log_every_n_steps=50), report])


def _bundle(ctx: BenchContext) -> VariantSetup:
    # The one-line default, logging every step: monitor + GuardClip with skipping + dead units
    # (windows of 10 batches every 100 steps) + HealthReport (pictures at the end of fit).
    report_args = {"out_dir": str(ctx.workdir / "pictures")}
    return VariantSetup(callbacks=[GradGuard(log_every_n_steps=1, report_args=report_args)])


def _gradguard_ratio_every_step(ctx: BenchContext) -> VariantSetup:
    return VariantSetup(
        callbacks=[GradNormMonitor(log_every_n_steps=1, update_ratio_every_n_steps=1)]
    )


# ---- clipping: AdaptiveGradClip

CLIP_LOG_EVERY = 50
"""The clippers' logging interval: Lightning's default ``log_every_n_steps``.

The Trainer here logs every step (``log_every_n_steps=1``, for the monitors), so
the clippers get an explicit interval; ``clip_zclip_log1`` logs every step.
"""


def _clipper(policy: Callable[[], Any], log_every_n_steps: int = CLIP_LOG_EVERY) -> Any:
    def factory(ctx: BenchContext) -> VariantSetup:
        # skip_nonfinite=True is the default: one flag read per step, included.
        clipper = AdaptiveGradClip(policy=policy(), log_every_n_steps=log_every_n_steps)
        return VariantSetup(callbacks=[clipper])

    return factory


# ---- clipping: the baselines


def _lightning_clip(ctx: BenchContext) -> VariantSetup:
    return VariantSetup(trainer_kwargs={"gradient_clip_val": 1.0})


def _norm_pass_floor(ctx: BenchContext) -> VariantSetup:
    """One fused norm over all gradients, nothing else: what every norm-based clipper
    (and every monitor) must at least do, so the lowest ratio any of them can reach."""

    def hook(module: BenchModule, optimizer: Any) -> None:
        torch._foreach_norm([p.grad for p in module.parameters() if p.grad is not None])

    return VariantSetup(before_optimizer_step=[hook])


def _import_error(module: str, install: str) -> Callable[[], str | None]:
    def check() -> str | None:
        try:
            importlib.import_module(module)
        except Exception as exc:  # ImportError, or a package that fails while importing
            return f"cannot import {module} ({type(exc).__name__}: {exc}); {install}"
        return None

    return check


def _zclip_package(ctx: BenchContext) -> VariantSetup:
    from zclip import ZClipLightningCallback

    # Its defaults are ZClip's (alpha 0.97, z_thresh 2.5, max_grad_norm 1.0, warm-up 25),
    # the same as lightning_gradguard's ZClip().
    return VariantSetup(callbacks=[ZClipLightningCallback()])


def _smartclip_autoclip(ctx: BenchContext) -> VariantSetup:
    import smartclip

    # The same algorithm as lightning_gradguard's AutoClip(): the 10th percentile of the
    # last 1000 norms, clipping from the first step (smartclip's defaults wait 100 steps
    # and use median + 3 std, which costs the same per-parameter pass).
    clipper = smartclip.AutoClip(
        mode="percentile",
        percentile=10.0,
        history="window",
        window_size=1000,
        warmup_steps=0,
        min_history=1,
    )

    def hook(module: BenchModule, optimizer: Any) -> None:
        # What smartclip's SmartClipCallback.on_before_optimizer_step does. Importing that
        # class needs ``transformers`` (its module also defines a HF Trainer callback).
        smartclip.apply(module, clipper)

    return VariantSetup(before_optimizer_step=[hook])


TIMM_AGC_ENV = "GRADGUARD_TIMM_AGC"
_TIMM_AGC: dict[str, Any] = {"source": None, "module": None}


def _timm_agc_source() -> tuple[Path | None, str]:
    """Where timm's ``utils/agc.py`` is: ``--timm-agc``, ``$GRADGUARD_TIMM_AGC`` or timm.

    Accepts ``agc.py`` itself, a timm wheel, or a folder holding ``timm/utils/agc.py``
    or ``utils/agc.py``. Returns ``(path, "")`` or ``(None, why not)``.
    """
    given = _TIMM_AGC["source"] or os.environ.get(TIMM_AGC_ENV)
    if given:
        path = Path(given).expanduser()
        if path.is_dir():
            for inner in (path / "timm" / "utils" / "agc.py", path / "utils" / "agc.py"):
                if inner.is_file():
                    return inner, ""
            return None, f"no timm/utils/agc.py under {path}"
        if path.is_file():
            return path, ""
        return None, f"{path} does not exist"
    # Installed timm: locate it without importing it (timm imports torchvision).
    try:
        spec = importlib.util.find_spec("timm")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        inner = Path(spec.origin).parent / "utils" / "agc.py"
        if inner.is_file():
            return inner, ""
    return None, (
        "timm not found; `pip download timm --no-deps` and pass the wheel with --timm-agc "
        f"(or ${TIMM_AGC_ENV})"
    )


def _load_timm_agc(workdir: Path) -> types.ModuleType:
    """timm's ``timm/utils/agc.py`` alone (it imports only torch), loaded from its file."""
    if _TIMM_AGC["module"] is not None:
        return _TIMM_AGC["module"]
    path, why = _timm_agc_source()
    if path is None:
        raise RuntimeError(why)
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            code = wheel.read("timm/utils/agc.py")
        path = workdir / "timm_utils_agc.py"
        path.write_bytes(code)
    spec = importlib.util.spec_from_file_location("timm_utils_agc", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _TIMM_AGC["module"] = module
    return module


def _timm_agc_missing() -> str | None:
    path, why = _timm_agc_source()
    if path is None:
        return why
    if path.suffix == ".whl":
        try:
            with zipfile.ZipFile(path) as wheel:
                wheel.getinfo("timm/utils/agc.py")
        except (OSError, KeyError, zipfile.BadZipFile) as exc:
            return f"{path}: no timm/utils/agc.py ({exc})"
    return None


def _timm_agc(ctx: BenchContext) -> VariantSetup:
    agc = _load_timm_agc(ctx.workdir)

    def hook(module: BenchModule, optimizer: Any) -> None:
        # timm's train.py calls it after backward, before optimizer.step(), on all the
        # parameters, with its defaults (clip_factor 0.01, eps 1e-3) = AGC()'s.
        agc.adaptive_clip_grad(module.parameters(), clip_factor=0.01)

    return VariantSetup(before_optimizer_step=[hook])


# ---- dead units


def _dead_window(ctx: BenchContext) -> VariantSetup:
    # Back-to-back windows of 10 batches: every step is measured; every 10th also ends a
    # window (detach, statistics, one transfer, logging). Module and functional call sites
    # (the transformer's F.relu, GPT-2's NewGELUActivation) alike.
    return VariantSetup(callbacks=[DeadUnitMonitor(every_n_steps=10, window=10)])


def _dead_idle(ctx: BenchContext) -> VariantSetup:
    # One window of one batch at step 0 (a discarded warm-up step), then none: the
    # measured steps run with no hooks attached.
    return VariantSetup(callbacks=[DeadUnitMonitor(every_n_steps=10**9, window=1)])


# ---- spike recovery (loss signals only: the gradient-norm signal reuses a monitor's pass)


def _recovery(every_n_steps: int) -> Callable[[BenchContext], VariantSetup]:
    def factory(ctx: BenchContext) -> VariantSetup:
        recovery = SpikeRecovery(signals=["loss", "nonfinite"], every_n_steps=every_n_steps)
        return VariantSetup(callbacks=[recovery])

    return factory


_NO_TRANSFORMER = ("mlp", "many_small")  # nn.TransformerEncoderLayer calls F.relu: no modules

VARIANTS: dict[str, Variant] = {
    "bare": Variant("bare", _bare, group="reference"),
    "bare_again": Variant("bare (A/A)", _bare, group="reference"),
    # monitoring
    "gradguard": Variant("GradNormMonitor", _gradguard),
    "pl_grad_norm": Variant("pl grad_norm", _pl_grad_norm),
    "wandb_watch": Variant("wandb.watch", _wandb_watch),
    # Not run by default; for finding where GradNormMonitor's time goes.
    "gradguard_grads_only": Variant("GradNormMonitor grads only", _gradguard_grads_only),
    "gradguard_every50": Variant("GradNormMonitor every 50", _gradguard_every50),
    "health_report": Variant("GradNormMonitor every 50 + HealthReport", _health_report),
    "gradguard_ratio_every_step": Variant(
        "GradNormMonitor ratios every step", _gradguard_ratio_every_step
    ),
    "bundle": Variant("GradGuard (defaults, logging every step)", _bundle),
    # clipping
    "clip_norm": Variant("AdaptiveGradClip norm", _clipper(lambda: FixedNorm(1.0)), "clipping"),
    "clip_value": Variant("AdaptiveGradClip value", _clipper(FixedValue), "clipping"),
    "clip_autoclip": Variant("AdaptiveGradClip autoclip", _clipper(AutoClip), "clipping"),
    "clip_zclip": Variant("AdaptiveGradClip zclip", _clipper(ZClip), "clipping"),
    "clip_ema_ratio": Variant("AdaptiveGradClip ema_ratio", _clipper(EMARatio), "clipping"),
    "clip_agc": Variant("AdaptiveGradClip agc", _clipper(AGC), "clipping"),
    "clip_guard": Variant("AdaptiveGradClip guard", _clipper(GuardClip), "clipping"),
    "clip_zclip_log1": Variant(
        "AdaptiveGradClip zclip, logging every step", _clipper(ZClip, 1), "clipping"
    ),
    "lightning_clip": Variant(
        "Trainer(gradient_clip_val=1.0)", _lightning_clip, "clipping baselines"
    ),
    "norm_floor": Variant(
        "one _foreach_norm over the gradients (the floor)", _norm_pass_floor, "clipping baselines"
    ),
    "zclip_pkg": Variant(
        "zclip ZClipLightningCallback",
        _zclip_package,
        "clipping baselines",
        requires=_import_error("zclip.zclip_lightning_callback", "pip install zclip"),
    ),
    "smartclip_autoclip": Variant(
        "smartclip AutoClip",
        _smartclip_autoclip,
        "clipping baselines",
        requires=_import_error("smartclip", "pip install smartclip"),
    ),
    "timm_agc": Variant(
        "timm adaptive_clip_grad",
        _timm_agc,
        "clipping baselines",
        requires=_timm_agc_missing,
    ),
    # spike recovery
    "recovery": Variant("SpikeRecovery (snapshot every 50 steps)", _recovery(50), "spike recovery"),
    "recovery_every10": Variant(
        "SpikeRecovery, snapshot every 10 steps", _recovery(10), "spike recovery"
    ),
    # dead units
    "dead_window": Variant("DeadUnitMonitor, in windows", _dead_window, "dead units"),
    "dead_idle": Variant("DeadUnitMonitor, outside windows", _dead_idle, "dead units"),
}
"""Variant name -> entry. ``bare`` is the reference and always runs."""

DEFAULT_VARIANTS = tuple(
    name
    for name in VARIANTS
    if name
    not in (
        "gradguard_grads_only",
        "gradguard_every50",
        "gradguard_ratio_every_step",
        "health_report",
    )
)


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """``variant``'s ratio on ``workload`` is at most ``limit``, or below ``versus``'s."""

    text: str
    workload: str
    variant: str
    limit: float | None = None
    versus: str | None = None
    metric: str = "ratio"  # or "mean_ratio": counts work done only every n-th step


def _targets() -> list[Target]:
    targets: list[Target] = []
    for w in ("mlp", "transformer"):
        targets.append(Target(f"GradNormMonitor <= 1.05x bare on {w}", w, "gradguard", 1.05))
    for w in DEFAULT_WORKLOADS:
        targets.append(
            Target(
                f"GradNormMonitor cheaper than pl grad_norm on {w}",
                w,
                "gradguard",
                versus="pl_grad_norm",
            )
        )
    for policy in ("norm", "autoclip", "zclip", "ema_ratio"):
        for w in ("mlp", "transformer"):
            targets.append(
                Target(f"AdaptiveGradClip {policy} <= 1.03x bare on {w}", w, f"clip_{policy}", 1.03)
            )
    for w in ("mlp", "transformer"):
        targets.append(Target(f"AdaptiveGradClip agc <= 1.10x bare on {w}", w, "clip_agc", 1.10))
    for ours, theirs in (
        ("clip_norm", "lightning_clip"),
        ("clip_zclip", "zclip_pkg"),
        ("clip_autoclip", "smartclip_autoclip"),
        ("clip_agc", "timm_agc"),
    ):
        targets.append(
            Target(
                f"{VARIANTS[ours].label} cheaper than {VARIANTS[theirs].label} on many_small",
                "many_small",
                ours,
                versus=theirs,
            )
        )
    for w in ("mlp", "transformer"):
        targets.append(
            Target(
                f"SpikeRecovery <= 1.02x bare on {w} (snapshots 5x as often as the default)",
                w,
                "recovery_every10",
                1.02,
                metric="mean_ratio",
            )
        )
    for w in ("mlp", "transformer", "gpt2"):
        targets.append(
            Target(f"DeadUnitMonitor in windows <= 1.10x bare on {w}", w, "dead_window", 1.10)
        )
        targets.append(
            Target(
                f"DeadUnitMonitor outside windows <= 1.01x bare on {w} (1.00x up to noise)",
                w,
                "dead_idle",
                1.01,
            )
        )
    return targets


TARGETS = _targets()


# --------------------------------------------------------------------------- running


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class FitResult:
    loop_median_s: float
    loop_mean_s: float
    loop_p20_s: float
    inner_median_s: float
    loop_times_s: list[float]
    logged_keys: int


def run_fit(
    workload: Workload,
    variant: Variant,
    *,
    steps: int,
    warmup: int,
    tiny: bool,
    optimizer: str,
    workdir: Path,
    profile: cProfile.Profile | None = None,
) -> FitResult:
    """One fresh ``Trainer.fit`` of ``warmup + steps`` measured steps (plus one to close)."""
    torch.manual_seed(0)
    net, (x, y) = workload.build(tiny)
    module = BenchModule(net, optimizer, lr=1e-3 if optimizer == "adamw" else 1e-2)
    total = warmup + steps + 1
    # The same batch every step: data loading is equal and negligible in every variant.
    loader = DataLoader([(x, y)] * total, batch_size=None, shuffle=False)
    ctx = BenchContext(module=module, workload=workload.name, workdir=workdir)
    setup = variant.factory(ctx)
    module.before_optimizer_step_hooks.extend(setup.before_optimizer_step)
    timer = StepTimer()
    memory = MemoryLogger()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=total,
        max_epochs=1,
        logger=[memory, *setup.loggers],
        callbacks=[timer, *setup.callbacks],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        default_root_dir=str(workdir),
        **setup.trainer_kwargs,
    )
    gc.collect()
    try:
        if profile is not None:
            profile.enable()
        trainer.fit(module, train_dataloaders=loader)
    finally:
        if profile is not None:
            profile.disable()
        if setup.teardown is not None:
            setup.teardown()
    loop = timer.loop_times(warmup)
    inner = timer.inner_times(warmup)
    if not loop:
        raise RuntimeError(f"{workload.name}/{variant.label}: no step was measured")
    return FitResult(
        loop_median_s=statistics.median(loop),
        loop_mean_s=statistics.fmean(loop),
        loop_p20_s=_quantile(loop, 0.2),
        inner_median_s=statistics.median(inner),
        loop_times_s=loop,
        logged_keys=len(memory.keys),
    )


@dataclass(frozen=True)
class Plan:
    """Steps, warm-up steps and rounds of one workload in this run."""

    steps: int
    warmup: int
    rounds: int


def plan_for(workload: Workload, args: argparse.Namespace) -> Plan:
    return Plan(
        steps=args.steps if args.steps is not None else workload.steps,
        warmup=args.warmup if args.warmup is not None else workload.warmup,
        rounds=args.rounds if args.rounds is not None else workload.rounds,
    )


def unavailable_variants(names: Sequence[str]) -> dict[str, str]:
    """Variant name -> why it cannot run here (an optional package is missing)."""
    missing: dict[str, str] = {}
    for name in names:
        check = VARIANTS[name].requires
        reason = None if check is None else check()
        if reason:
            missing[name] = reason
    return missing


def run_benchmark(args: argparse.Namespace, workdir: Path, names: Sequence[str]) -> dict[str, Any]:
    """Run every (round, workload, variant) fit, interleaved; return the summary."""
    workloads = [WORKLOADS[w] for w in args.workloads]
    plans = {w.name: plan_for(w, args) for w in workloads}
    # fits[workload][variant] -> one FitResult per measured round
    fits: dict[str, dict[str, list[FitResult]]] = {
        w.name: {v: [] for v in names if VARIANTS[v].runs_on(w.name)} for w in workloads
    }
    total_rounds = args.warmup_rounds + max(p.rounds for p in plans.values())
    started = time.perf_counter()
    for r in range(total_rounds):
        measured = r >= args.warmup_rounds
        for workload in workloads:
            plan = plans[workload.name]
            if r - args.warmup_rounds >= plan.rounds:
                continue
            here = list(fits[workload.name])
            order = here[r % len(here) :] + here[: r % len(here)]
            for name in order:
                result = run_fit(
                    workload,
                    VARIANTS[name],
                    steps=plan.steps,
                    warmup=plan.warmup,
                    tiny=args.size == "tiny",
                    optimizer=args.optimizer,
                    workdir=workdir,
                )
                if measured:
                    fits[workload.name][name].append(result)
        tag = (
            "warm-up round"
            if not measured
            else f"round {r - args.warmup_rounds + 1}/{total_rounds - args.warmup_rounds}"
        )
        print(f"# {tag} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return summarize(fits, args, plans)


def summarize(
    fits: dict[str, dict[str, list[FitResult]]],
    args: argparse.Namespace,
    plans: dict[str, Plan],
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for workload, by_variant in fits.items():
        bare = by_variant["bare"]
        bare_ms = [f.loop_median_s * 1e3 for f in bare]
        plan = plans[workload]
        entry: dict[str, Any] = {
            "description": WORKLOADS[workload].description if args.size == "full" else "tiny",
            "steps": plan.steps,
            "warmup_steps": plan.warmup,
            "rounds": plan.rounds,
            "bare_ms_per_step": statistics.median(bare_ms),
            "bare_ms_per_round": bare_ms,
            "bare_spread": max(bare_ms) / min(bare_ms),
            "variants": {},
        }
        for name, runs in by_variant.items():
            ratios = [f.loop_median_s / b.loop_median_s for f, b in zip(runs, bare)]
            mean_ratios = [f.loop_mean_s / b.loop_mean_s for f, b in zip(runs, bare)]
            inner_ratios = [f.inner_median_s / b.inner_median_s for f, b in zip(runs, bare)]
            # Contention only ever adds time: a low quantile is a noise-robust cross-check.
            p20_ratios = [f.loop_p20_s / b.loop_p20_s for f, b in zip(runs, bare)]
            entry["variants"][name] = {
                "label": VARIANTS[name].label,
                "group": VARIANTS[name].group,
                "ratio": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "ratio_per_round": ratios,
                "mean_ratio": statistics.median(mean_ratios),
                "mean_ratio_per_round": mean_ratios,
                "inner_ratio": statistics.median(inner_ratios),
                "p20_ratio": statistics.median(p20_ratios),
                "ms_per_step": statistics.median(f.loop_median_s * 1e3 for f in runs),
                "logged_keys": runs[0].logged_keys,
                "step_ms_per_round": [[round(t * 1e3, 4) for t in f.loop_times_s] for f in runs],
            }
        results[workload] = entry
    return results


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target, with met True / False, or None when a side did not run."""
    checks: list[dict[str, Any]] = []
    for t in TARGETS:
        variants = results.get(t.workload, {}).get("variants", {})
        ours = variants.get(t.variant, {}).get(t.metric)
        value: str | None = None
        met: bool | None = None
        if t.limit is not None and ours is not None:
            value, met = f"{ours:.3f}x", ours <= t.limit
        elif t.versus is not None:
            theirs = variants.get(t.versus, {}).get("ratio")
            if ours is not None and theirs is not None:
                value, met = f"{ours:.3f}x vs {theirs:.3f}x", ours < theirs
        checks.append({"target": t.text, "value": value, "met": met})
    return checks


def _groups(names: Sequence[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name in names:
        if name != "bare":
            groups.setdefault(VARIANTS[name].group, []).append(name)
    return groups


def format_table(results: dict[str, Any], names: Sequence[str], *, mean: bool = False) -> str:
    """One row per variant, one column per workload; group names as bold rows."""
    workloads = list(results)
    lines = [
        "| variant | " + " | ".join(workloads) + " |",
        "|---|" + "---|" * len(workloads),
        "| bare ms/step | "
        + " | ".join(f"{results[w]['bare_ms_per_step']:.2f}" for w in workloads)
        + " |",
    ]
    for group, members in _groups(names).items():
        lines.append(f"| **{group}** |" + " |" * len(workloads))
        for name in members:
            cells = []
            for w in workloads:
                v = results[w]["variants"].get(name)
                if v is None:
                    cells.append("—")
                elif mean:
                    cells.append(f"{v['mean_ratio']:.3f}×")
                else:
                    spread = (
                        f" [{v['ratio_min']:.2f}–{v['ratio_max']:.2f}]"
                        if v["ratio_min"] != v["ratio_max"]
                        else ""
                    )
                    cells.append(f"{v['ratio']:.3f}×{spread}")
            lines.append(f"| {VARIANTS[name].label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_targets(checks: list[dict[str, Any]]) -> str:
    lines = []
    for c in checks:
        verdict = "n/a (not run)" if c["met"] is None else ("MET" if c["met"] else "MISSED")
        value = f" ({c['value']})" if c["value"] else ""
        lines.append(f"- {c['target']}: {verdict}{value}")
    return "\n".join(lines)


def noise_report(results: dict[str, Any], limit: float = 1.10) -> list[str]:
    """Workloads whose bare step time varied across rounds by more than ``limit`` (max/min)."""
    return [
        f"{w}: bare ms/step ranged {min(e['bare_ms_per_round']):.2f}–"
        f"{max(e['bare_ms_per_round']):.2f} across rounds ({e['bare_spread']:.2f}x)"
        for w, e in results.items()
        if e["bare_spread"] > limit
    ]


# --------------------------------------------------------------------------- profiling


def profile_variant(args: argparse.Namespace, workdir: Path, name: str, top: int = 30) -> None:
    """cProfile one fit of variant ``name`` on each selected workload; print the top functions."""
    for workload_name in args.workloads:
        workload = WORKLOADS[workload_name]
        plan = plan_for(workload, args)
        profile = cProfile.Profile()
        run_fit(
            workload,
            VARIANTS[name],
            steps=plan.steps,
            warmup=plan.warmup,
            tiny=args.size == "tiny",
            optimizer=args.optimizer,
            workdir=workdir,
            profile=profile,
        )
        out = io.StringIO()
        stats = pstats.Stats(profile, stream=out).sort_stats("cumulative")
        stats.print_stats(top)
        print(f"## cProfile: {VARIANTS[name].label} on {workload_name} (whole fit)\n")
        print(out.getvalue())


# --------------------------------------------------------------------------- CLI


def _csv(choices: Sequence[str], what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(bad) or '(none)'}; choose from {', '.join(choices)}"
            )
        return items

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = ", ".join(f"{w.name} {w.steps}/{w.warmup}/{w.rounds}" for w in WORKLOADS.values())
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
        epilog=f"Per-workload defaults (steps/warmup/rounds): {defaults}.",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="measured steps per fit (default: per workload)"
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="steps discarded at the start of every fit (default: per workload)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="measured interleaved rounds (default: per workload)",
    )
    p.add_argument(
        "--warmup-rounds", type=int, default=1, help="unmeasured rounds first (default 1)"
    )
    p.add_argument(
        "--workloads",
        type=_csv(list(WORKLOADS), "workload"),
        default=list(DEFAULT_WORKLOADS),
        help=f"comma-separated, from {','.join(WORKLOADS)} (default all but gpt2)",
    )
    p.add_argument(
        "--variants",
        type=_csv(list(VARIANTS), "variant"),
        default=list(DEFAULT_VARIANTS),
        help=(
            f"comma-separated, from {','.join(VARIANTS)}\n"
            f"(default: all but gradguard_grads_only, gradguard_every50 and\n"
            f"gradguard_ratio_every_step; bare always runs)"
        ),
    )
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument(
        "--optimizer", choices=("sgd", "adamw"), default="sgd", help="default sgd (momentum 0.9)"
    )
    p.add_argument(
        "--size",
        choices=("full", "tiny"),
        default=None,
        help="model sizes (default full; tiny with --quick)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny models, 3 steps, 1 round, no warm-up round",
    )
    p.add_argument(
        "--timm-agc",
        type=Path,
        default=None,
        help=(
            "timm's agc.py, a timm wheel (`pip download timm --no-deps`) or a folder with\n"
            f"timm/utils/agc.py, for the timm_agc variant (default ${TIMM_AGC_ENV}, or an\n"
            "installed timm; the variant is skipped when none is found)"
        ),
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument(
        "--profile",
        choices=list(VARIANTS),
        default=None,
        help="instead of the benchmark, cProfile one fit of this variant per workload",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.rounds, args.warmup_rounds = 3, 1, 1, 0
    args.size = args.size or ("tiny" if args.quick else "full")
    for name in ("steps", "rounds", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be at least 1")
    if (args.warmup is not None and args.warmup < 0) or args.warmup_rounds < 0:
        p.error("--warmup and --warmup-rounds must be non-negative")
    args.variants = ["bare"] + [v for v in dict.fromkeys(args.variants) if v != "bare"]
    return args


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in (
        "pytorch_lightning",
        "lightning.pytorch",
        "lightning_fabric",
        "lightning.fabric",
        "wandb",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet()
    if args.timm_agc is not None:
        _TIMM_AGC["source"] = str(args.timm_agc)
    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):  # already set (main() called twice in a process)
        torch.set_num_interop_threads(1)
    skipped = unavailable_variants(args.variants)
    for name, reason in skipped.items():
        print(f"Note: skipping {name} ({VARIANTS[name].label}): {reason}")
    names = [n for n in args.variants if n not in skipped]
    if args.profile is not None and args.profile in skipped:
        print(f"Cannot profile {args.profile}: {skipped[args.profile]}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gradguard-bench-") as tmp:
        workdir = Path(tmp)
        os.environ.setdefault("WANDB_DIR", tmp)
        if args.profile is not None:
            profile_variant(args, workdir, args.profile)
            return 0
        results = run_benchmark(args, workdir, names)
    checks = check_targets(results)
    meta = {
        "date": _dt.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pytorch_lightning": pl.__version__,
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "optimizer": args.optimizer,
        "size": args.size,
        "plans": {
            w: {k: results[w][k] for k in ("steps", "warmup_steps", "rounds")} for w in results
        },
        "warmup_rounds": args.warmup_rounds,
        "clip_log_every_n_steps": CLIP_LOG_EVERY,
        "skipped": skipped,
        "timing": (
            "median start-to-next-start train step; "
            "ratio = median over rounds of same-round ratios to bare"
        ),
    }
    plans = ", ".join(
        f"{w} {e['steps']} steps × {e['rounds']} round(s)" for w, e in results.items()
    )
    print(
        f"Step-time ratio to the bare step (median over interleaved rounds of the same-round "
        f"ratio of median step times, [min–max] across rounds); {args.threads} thread(s), "
        f"{os.cpu_count()} CPU(s), {args.optimizer}, {plans}, torch {torch.__version__}, "
        f"pytorch_lightning {pl.__version__}.\n"
    )
    print(format_table(results, names))
    print(
        "\nRatio of mean step times (median over rounds; counts work done every n-th step, "
        "e.g. update ratios and window ends):\n"
    )
    print(format_table(results, names, mean=True))
    if skipped:
        print("\nSkipped (optional package missing): " + ", ".join(skipped))
    print("\nTargets:")
    print(format_targets(checks))
    noisy = noise_report(results)
    if noisy:
        print("\nWarning: the machine looks noisy; re-run at a quiet moment:")
        print("\n".join(f"- {line}" for line in noisy))
        print(
            "\nCross-check, less sensitive to contention (ratio of the 20th percentiles "
            "of step time, median over rounds):"
        )
        for workload, entry in results.items():
            cells = [
                f"{v['label']} {v['p20_ratio']:.3f}×"
                for name, v in entry["variants"].items()
                if name != "bare"
            ]
            print(f"- {workload}: " + ", ".join(cells))
    if args.quick:
        print("\n(--quick: tiny models and 3 steps; these timings mean nothing.)")
    if args.json is not None:
        args.json.write_text(
            json.dumps({"meta": meta, "results": results, "targets": checks}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The variants: what each one adds to the bare step, and the ``VARIANTS`` registry."""

from __future__ import annotations

import importlib
import importlib.util
import os
import types
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Imported up front: it imports the unified ``lightning`` package too, whose loggers
# ``__main__._quiet`` then silences.
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

from .workloads import BenchModule

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

"""Per-step overhead of gradient monitoring in a Lightning training loop.

Runs, in one process and interleaved (round-robin over the variants, the order
rotated every round so that drift and position effects hit every variant
equally), a bare Lightning training step against the same step with:

- ``gradguard``: ``GradNormMonitor(log_every_n_steps=1)``,
- ``pl_grad_norm``: Lightning's documented utility,
  ``self.log_dict(grad_norm(self, norm_type=2))`` in ``on_before_optimizer_step``,
- ``wandb_watch``: ``wandb.watch(model, log="gradients", log_freq=1)`` with an
  offline ``WandbLogger``,

on three synthetic workloads (a 12-layer MLP, a 6-layer transformer encoder and
200 small Linear layers). Every variant is a fresh ``Trainer.fit`` of
``warmup + steps`` optimizer steps; the first ``warmup`` steps are discarded.

A step's time is the wall time from one ``on_train_batch_start`` to the next:
everything the loop does for one batch, including what Lightning does *after*
``on_train_batch_end`` (handing ``self.log`` metrics to the loggers), which a
start-to-end timer would miss. The figure reported is, per workload and
variant, the median over rounds of ``median(variant step) / median(bare step)``
with both medians taken in the same round.

Every variant has the same cheap in-memory logger attached (``wandb_watch``
adds its ``WandbLogger`` next to it) and the same Trainer flags, and the module
logs its loss every step as a real training step does.

Adding a variant (e.g. a clipping policy) is one entry in ``VARIANTS``: a
factory taking a :class:`BenchContext` and returning a :class:`VariantSetup`.

Usage::

    python benchmarks/overhead.py                      # full run, ~15 min on 2 cores
    python benchmarks/overhead.py --quick              # smoke run, tiny models, seconds
    python benchmarks/overhead.py --workloads mlp --variants bare,gradguard --rounds 9
    python benchmarks/overhead.py --json results.json
    python benchmarks/overhead.py --profile gradguard --workloads mlp   # cProfile one fit
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as _dt
import gc
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
import warnings
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
from lightning_gradguard import GradNormMonitor

TARGET_RATIO = 1.05
TARGET_RATIO_WORKLOADS = ("mlp", "transformer")

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
    """A model and a synthetic batch, at a full and a tiny (smoke-test) size."""

    name: str
    description: str
    build: Callable[[bool], tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]]


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


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("mlp", "12 x Linear(512) + ReLU, batch 128", _mlp),
        Workload(
            "transformer",
            "TransformerEncoder 6 layers, d_model 256, nhead 8, seq 64, batch 16",
            _transformer,
        ),
        Workload("many_small", "200 x Linear(64) + ReLU, batch 64", _many_small),
    )
}


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
    label: str
    factory: Callable[[BenchContext], VariantSetup]


def _bare(ctx: BenchContext) -> VariantSetup:
    return VariantSetup()


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


VARIANTS: dict[str, Variant] = {
    "bare": Variant("bare", _bare),
    "gradguard": Variant("GradNormMonitor", _gradguard),
    "pl_grad_norm": Variant("pl grad_norm", _pl_grad_norm),
    "wandb_watch": Variant("wandb.watch", _wandb_watch),
    # Not run by default; for finding where GradNormMonitor's time goes.
    "gradguard_grads_only": Variant("GradNormMonitor grads only", _gradguard_grads_only),
    "gradguard_every50": Variant("GradNormMonitor every 50", _gradguard_every50),
}
"""Variant name -> factory. ``bare`` is the reference and always runs."""

DEFAULT_VARIANTS = ("bare", "gradguard", "pl_grad_norm", "wandb_watch")


# --------------------------------------------------------------------------- running


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class FitResult:
    loop_median_s: float
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
        loop_p20_s=_quantile(loop, 0.2),
        inner_median_s=statistics.median(inner),
        loop_times_s=loop,
        logged_keys=len(memory.keys),
    )


def run_benchmark(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Run every (round, workload, variant) fit, interleaved; return the raw results."""
    workloads = [WORKLOADS[w] for w in args.workloads]
    names = args.variants
    # fits[workload][variant] -> one FitResult per measured round
    fits: dict[str, dict[str, list[FitResult]]] = {
        w.name: {v: [] for v in names} for w in workloads
    }
    total_rounds = args.warmup_rounds + args.rounds
    started = time.perf_counter()
    for r in range(total_rounds):
        measured = r >= args.warmup_rounds
        order = names[r % len(names) :] + names[: r % len(names)]
        for workload in workloads:
            for name in order:
                result = run_fit(
                    workload,
                    VARIANTS[name],
                    steps=args.steps,
                    warmup=args.warmup,
                    tiny=args.size == "tiny",
                    optimizer=args.optimizer,
                    workdir=workdir,
                )
                if measured:
                    fits[workload.name][name].append(result)
        tag = (
            "warm-up round" if not measured else f"round {r - args.warmup_rounds + 1}/{args.rounds}"
        )
        print(f"# {tag} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return summarize(fits, args)


def summarize(
    fits: dict[str, dict[str, list[FitResult]]], args: argparse.Namespace
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for workload, by_variant in fits.items():
        bare = by_variant["bare"]
        bare_ms = [f.loop_median_s * 1e3 for f in bare]
        entry: dict[str, Any] = {
            "description": WORKLOADS[workload].description if args.size == "full" else "tiny",
            "bare_ms_per_step": statistics.median(bare_ms),
            "bare_ms_per_round": bare_ms,
            "bare_spread": max(bare_ms) / min(bare_ms),
            "variants": {},
        }
        for name, runs in by_variant.items():
            ratios = [f.loop_median_s / b.loop_median_s for f, b in zip(runs, bare)]
            inner_ratios = [f.inner_median_s / b.inner_median_s for f, b in zip(runs, bare)]
            # Contention only ever adds time: a low quantile is a noise-robust cross-check.
            p20_ratios = [f.loop_p20_s / b.loop_p20_s for f, b in zip(runs, bare)]
            entry["variants"][name] = {
                "label": VARIANTS[name].label,
                "ratio": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "ratio_per_round": ratios,
                "inner_ratio": statistics.median(inner_ratios),
                "p20_ratio": statistics.median(p20_ratios),
                "ms_per_step": statistics.median(f.loop_median_s * 1e3 for f in runs),
                "logged_keys": runs[0].logged_keys,
                "step_ms_per_round": [[round(t * 1e3, 4) for t in f.loop_times_s] for f in runs],
            }
        results[workload] = entry
    return results


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets GradNormMonitor is held to, with pass / fail / n/a."""
    checks: list[dict[str, Any]] = []
    for workload in TARGET_RATIO_WORKLOADS:
        variants = results.get(workload, {}).get("variants", {})
        ratio = variants.get("gradguard", {}).get("ratio")
        checks.append(
            {
                "target": f"GradNormMonitor <= {TARGET_RATIO:.2f}x bare on {workload}",
                "value": None if ratio is None else f"{ratio:.3f}x",
                "met": None if ratio is None else ratio <= TARGET_RATIO,
            }
        )
    for workload in WORKLOADS:
        variants = results.get(workload, {}).get("variants", {})
        ours = variants.get("gradguard", {}).get("ratio")
        theirs = variants.get("pl_grad_norm", {}).get("ratio")
        known = ours is not None and theirs is not None
        checks.append(
            {
                "target": f"GradNormMonitor cheaper than pl grad_norm on {workload}",
                "value": f"{ours:.3f}x vs {theirs:.3f}x" if known else None,
                "met": ours < theirs if known else None,
            }
        )
    return checks


def format_table(results: dict[str, Any], names: Sequence[str]) -> str:
    shown = [n for n in names if n != "bare"]
    header = ["workload", "bare ms/step", *(VARIANTS[n].label for n in shown)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for workload, entry in results.items():
        cells = [f"{workload} ({entry['description']})", f"{entry['bare_ms_per_step']:.2f}"]
        for name in shown:
            v = entry["variants"][name]
            spread = (
                f" [{v['ratio_min']:.2f}–{v['ratio_max']:.2f}]"
                if v["ratio_min"] != v["ratio_max"]
                else ""
            )
            cells.append(f"{v['ratio']:.3f}×{spread}")
        lines.append("| " + " | ".join(cells) + " |")
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
        profile = cProfile.Profile()
        run_fit(
            workload,
            VARIANTS[name],
            steps=args.steps,
            warmup=args.warmup,
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
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--steps", type=int, default=30, help="measured steps per fit (default 30)")
    p.add_argument(
        "--warmup",
        type=int,
        default=5,
        help="steps discarded at the start of every fit (default 5)",
    )
    p.add_argument("--rounds", type=int, default=5, help="measured interleaved rounds (default 5)")
    p.add_argument(
        "--warmup-rounds", type=int, default=1, help="unmeasured rounds first (default 1)"
    )
    p.add_argument(
        "--workloads",
        type=_csv(list(WORKLOADS), "workload"),
        default=list(WORKLOADS),
        help=f"comma-separated, from {','.join(WORKLOADS)} (default all)",
    )
    p.add_argument(
        "--variants",
        type=_csv(list(VARIANTS), "variant"),
        default=list(DEFAULT_VARIANTS),
        help=(
            f"comma-separated, from {','.join(VARIANTS)}\n"
            f"(default {','.join(DEFAULT_VARIANTS)}; bare always runs)"
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
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.warmup < 0 or args.warmup_rounds < 0:
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
    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):  # already set (main() called twice in a process)
        torch.set_num_interop_threads(1)
    with tempfile.TemporaryDirectory(prefix="gradguard-bench-") as tmp:
        workdir = Path(tmp)
        os.environ.setdefault("WANDB_DIR", tmp)
        if args.profile is not None:
            profile_variant(args, workdir, args.profile)
            return 0
        results = run_benchmark(args, workdir)
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
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "rounds": args.rounds,
        "warmup_rounds": args.warmup_rounds,
        "timing": (
            "median start-to-next-start train step; "
            "ratio = median over rounds of same-round ratios to bare"
        ),
    }
    print(
        f"Step-time ratio to the bare step (median over {args.rounds} interleaved round(s), "
        f"[min–max] across rounds); {args.threads} thread(s), {os.cpu_count()} CPU(s), "
        f"{args.optimizer}, {args.steps} measured steps per fit, torch {torch.__version__}, "
        f"pytorch_lightning {pl.__version__}.\n"
    )
    print(format_table(results, args.variants))
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

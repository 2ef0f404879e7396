"""Running the fits: one timed ``Trainer.fit``, the interleaved rounds, the summary."""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger
from torch.utils.data import DataLoader

from .variants import VARIANTS, BenchContext, Variant
from .workloads import WORKLOADS, BenchModule, Workload

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


CLOCKS: dict[str, Callable[[], float]] = {
    "wall": time.perf_counter,
    "cpu": time.thread_time,
}
"""``--clock``: wall time, or the CPU time of the training thread.

On a shared machine the wall time of a step includes the time the thread waited
for a core; the thread's CPU time does not (with one torch thread, the step's
compute runs in that thread). Contention still slows the caches down, so both
are noisier on a loaded machine than on a quiet one.
"""


class StepTimer(pl.Callback):
    """Records the clock (``time.perf_counter()`` by default) at every batch start and end."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.starts: list[float] = []
        self.ends: list[float] = []

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self.starts.append(self.clock())

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.ends.append(self.clock())

    def loop_times(self, warmup: int) -> list[float]:
        """Start-to-next-start seconds of every step after ``warmup`` (the last has no next)."""
        return [b - a for a, b in zip(self.starts, self.starts[1:])][warmup:]

    def inner_times(self, warmup: int) -> list[float]:
        """Batch start-to-end seconds (misses the loggers' work after ``on_train_batch_end``)."""
        return [b - a for a, b in zip(self.starts, self.ends)][warmup:]


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
    clock: str = "wall",
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
    timer = StepTimer(CLOCKS[clock])
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
                    clock=args.clock,
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
            clock=args.clock,
        )
        out = io.StringIO()
        stats = pstats.Stats(profile, stream=out).sort_stats("cumulative")
        stats.print_stats(top)
        print(f"## cProfile: {VARIANTS[name].label} on {workload_name} (whole fit)\n")
        print(out.getvalue())

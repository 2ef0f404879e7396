"""``python -m benchmarks.overhead``: the command line."""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import os
import platform
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch

from . import __doc__ as _package_doc
from .report import check_targets, print_report
from .runner import profile_variant, run_benchmark, unavailable_variants
from .variants import _TIMM_AGC, CLIP_LOG_EVERY, DEFAULT_VARIANTS, TIMM_AGC_ENV, VARIANTS
from .workloads import DEFAULT_WORKLOADS, WORKLOADS

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
        prog="python -m benchmarks.overhead",
        description=(_package_doc or "").split("\n\n")[0],
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
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="step time: wall time (default) or the training thread's CPU time,\n"
        "less sensitive to other jobs on a shared machine (use with --threads 1)",
    )
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
        "clock": args.clock,
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
    print_report(results, names, checks, skipped, args)
    if args.json is not None:
        args.json.write_text(
            json.dumps({"meta": meta, "results": results, "targets": checks}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

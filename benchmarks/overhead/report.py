"""The targets and the tables the benchmark prints."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch

from .variants import VARIANTS
from .workloads import DEFAULT_WORKLOADS

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


def print_report(
    results: dict[str, Any],
    names: Sequence[str],
    checks: list[dict[str, Any]],
    skipped: dict[str, str],
    args: argparse.Namespace,
) -> None:
    """Print the ratio tables, the targets and, on a noisy machine, the cross-check."""
    plans = ", ".join(
        f"{w} {e['steps']} steps × {e['rounds']} round(s)" for w, e in results.items()
    )
    print(
        f"Step-time ratio to the bare step (median over interleaved rounds of the same-round "
        f"ratio of median step times, [min–max] across rounds); {args.clock} clock, "
        f"{args.threads} thread(s), "
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

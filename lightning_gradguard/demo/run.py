"""``gradguard demo``: each gradient pathology trained without and with GradGuard.

For every scenario of :mod:`lightning_gradguard.demo.scenarios` it trains the
runs one after the other (a progress bar shows where it is), then prints a table
(test accuracy, final loss, skipped steps, dead units, what GradGuard did, time)
and writes into the output folder: ``summary.png`` (accuracy without / with),
the pictures of every guarded run (gradient flow, dead units, clipping),
``results.md``, ``results.json`` and the W&B runs (offline unless asked
otherwise).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_gradguard.callbacks.gradguard import GradGuard
from lightning_gradguard.demo.data import digits
from lightning_gradguard.demo.scenarios import SCENARIOS, Run, Scenario, ScenarioClassifier
from lightning_gradguard.record import run_record

__all__ = [
    "BATCH_SIZE",
    "LOG_EVERY_N_STEPS",
    "QUICK_STEPS",
    "DemoError",
    "RunResult",
    "dead_fraction",
    "main",
    "parse_args",
    "report",
    "results_table",
    "run_demo",
    "slug",
    "summary_picture",
    "train_run",
]

BATCH_SIZE = 64
LOG_EVERY_N_STEPS = 10
QUICK_STEPS = 30
"""Steps per run with ``--quick`` (a smoke test: nothing has time to go wrong or right)."""


class DemoError(RuntimeError):
    """A problem the user can fix (printed as one line, exit code 2)."""


@dataclass
class RunResult:
    """What the table reports about one run."""

    scenario: str
    label: str
    guarded: bool
    accuracy: float
    final_loss: float
    skipped_steps: int
    dead_fraction: float
    actions: str
    seconds: float
    pictures: list[str] = field(default_factory=list)
    wandb_dir: str | None = None


def slug(text: str) -> str:
    """A folder name for a run label.

    Example:
        >>> slug("recommended fix: ReLU + He init")
        'recommended_fix_relu_he_init'
    """
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


@torch.no_grad()
def dead_fraction(net: nn.Module, x: torch.Tensor) -> float:
    """The largest fraction, over hidden activation layers, of units never positive on ``x``.

    Measured on the pre-activations directly (inputs of the ReLU/LeakyReLU
    modules), independently of the library's own tracker.
    """
    never_positive: list[float] = []
    hooks = []

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        alive = (inputs[0] > 0).any(dim=0)
        never_positive.append(1.0 - alive.float().mean().item())

    for module in net.modules():
        if isinstance(module, (nn.ReLU, nn.LeakyReLU)):
            hooks.append(module.register_forward_pre_hook(record))
    was_training = net.training
    net.eval()
    try:
        net(x)
    finally:
        net.train(was_training)
        for hook in hooks:
            hook.remove()
    return max(never_positive, default=0.0)


def _actions(trainer: Any) -> str:
    """What GradGuard said and did, in a few words: events by kind (first step), clipping."""
    record = run_record(trainer)
    words = {
        "vanishing": "vanishing gradients in {layers} layers",
        "exploding": "{n} explosion warning(s)",
        "nonfinite": "non-finite gradients",
        "skip": "{n} step(s) skipped",
        "stop": "training stopped",
        "swap": "ReLU→LeakyReLU in {layers} layer(s)",
        "dying": "{layers} dying layer(s)",
        "rollback": "{n} rollback(s)",
    }
    first = {
        kind: min(e.step for e in record.events_of(kind))
        for kind in record.counts
        if record.events_of(kind)
    }
    parts = [
        words.get(kind, kind + " ({n})").format(
            n=record.count(kind), layers=len(record.layers(kind))
        )
        + f" (step {first[kind]})"
        for kind in sorted(first, key=lambda k: first[k])
    ]
    clip = record.history.get("clip")
    active = [] if clip is None else clip.column("active")
    clipped = sum(value > 0 for value in active)
    if clip is not None and clipped:
        largest = max((v for v in clip.column("raw") if math.isfinite(v)), default=math.nan)
        parts.append(f"clipped {clipped} of {len(active)} logged steps (norm up to {largest:.3g})")
    return "; ".join(parts) or "-"


class _Progress(pl.Callback):
    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def on_train_batch_end(self, *args: Any) -> None:
        self.bar.update(1)


def _steps(scenario: Scenario, quick: bool) -> int:
    per_epoch = math.ceil(len(digits()[0]) / BATCH_SIZE)
    steps = scenario.epochs * per_epoch
    if scenario.max_steps > 0:
        steps = min(steps, scenario.max_steps)
    return min(steps, QUICK_STEPS) if quick else steps


def _wandb_logger(out: Path, scenario: Scenario, run: Run, mode: str, group: str) -> Any:
    if mode == "disabled":
        return None
    from pytorch_lightning.loggers import WandbLogger

    logger = WandbLogger(
        project="lightning-gradguard-demo",
        group=group,
        name=f"{scenario.name}/{slug(run.label)}",
        save_dir=str(out),
        offline=mode == "offline",
        tags=[scenario.name, "gradguard" if run.guarded else "baseline"],
    )
    # Lightning always passes wandb's deprecated `anonymous` setting, which prints a warning.
    logger._wandb_init.pop("anonymous", None)
    try:
        logger.experiment  # noqa: B018 - start the run now, to fail early and clearly
    except Exception as error:  # wandb raises several types (no API key, no network)
        hint = "run `wandb login` first, or " if mode == "online" else ""
        raise DemoError(
            f"could not start a W&B run in {mode} mode ({type(error).__name__}: {error}); "
            f"{hint}use --wandb offline (upload later with `wandb sync`) or --wandb disabled."
        ) from error
    return logger


def train_run(
    scenario: Scenario,
    run: Run,
    out: Path,
    *,
    steps: int,
    seed: int,
    wandb_mode: str,
    group: str,
    bar: Any,
) -> RunResult:
    """Train one run and measure it."""
    start = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    model: ScenarioClassifier = run.make_model()
    train, (x_test, y_test) = digits()
    loader = DataLoader(
        train,
        batch_size=BATCH_SIZE,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    folder = out / scenario.name / slug(run.label)
    callbacks: list[Any] = [_Progress(bar)]
    guard = None
    if run.guarded:
        guard = GradGuard(
            report_args={"out_dir": str(folder), "picture_every_n_steps": None},
            **run.guard_args,
        )
        callbacks.insert(0, guard)
    logger = _wandb_logger(out, scenario, run, wandb_mode, group)
    trainer = pl.Trainer(
        max_steps=steps,
        max_epochs=-1,
        accelerator="cpu",
        devices=1,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        log_every_n_steps=LOG_EVERY_N_STEPS,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GradGuard's warnings are summarized in the table
        trainer.fit(model, loader)
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(dim=1) == y_test).float().mean())
    last = torch.stack(model.losses[-20:]) if model.losses else torch.tensor([math.nan])
    wandb_dir = None
    if logger is not None:
        wandb_dir = str(Path(logger.experiment.dir).parent)
        logger.experiment.finish()  # the next run starts a new W&B run
    pictures = sorted(str(p) for p in folder.glob("*.png")) if guard is not None else []
    return RunResult(
        scenario=scenario.name,
        label=run.label,
        guarded=run.guarded,
        accuracy=accuracy,
        final_loss=float(last.mean()),
        skipped_steps=0 if guard is None or guard.clipper is None else guard.clipper.skipped_steps,
        dead_fraction=dead_fraction(model.net, train.tensors[0]),
        actions=_actions(trainer) if guard is not None else "-",
        seconds=time.perf_counter() - start,
        pictures=pictures,
        wandb_dir=wandb_dir,
    )


def results_table(results: list[RunResult]) -> str:
    """The results as a Markdown table.

    Example:
        >>> row = RunResult("exploding", "with GradGuard", True, 0.96, 0.1, 0, 0.0, "-", 3.0)
        >>> print(results_table([row]).splitlines()[2])
        | exploding | with GradGuard | 0.960 | 0.100 | 0 | 0% | - | 3 s |
    """
    lines = [
        "| scenario | run | test accuracy | final loss | skipped steps | inactive units "
        "| what GradGuard did | time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        loss = f"{r.final_loss:.3f}" if math.isfinite(r.final_loss) else "nan (diverged)"
        lines.append(
            f"| {r.scenario} | {r.label} | {r.accuracy:.3f} | {loss} | {r.skipped_steps} "
            f"| {r.dead_fraction:.0%} | {r.actions} | {r.seconds:.0f} s |"
        )
    return "\n".join(lines)


def summary_picture(results: list[RunResult], path: Path) -> Path:
    """Test accuracy of every run as horizontal bars, grouped by scenario (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from lightning_gradguard.plots import save_png

    colors = {"without": "#c44e52", "with": "#4c72b0"}  # anything else: a recommended fix
    figure = Figure(figsize=(8, 0.45 * len(results) + 1.2), dpi=110)
    axes = figure.subplots()
    rows = list(reversed(results))  # the first run at the top
    positions, labels, previous = [], [], None
    y = 0.0
    for r in rows:
        if previous is not None and r.scenario != previous:
            y += 0.6  # a gap between scenarios
        previous = r.scenario
        positions.append(y)
        labels.append(f"{r.scenario.replace('_', ' ')}: {r.label}")
        axes.barh(y, r.accuracy, height=0.8, color=colors.get(r.label.split()[0], "#55a868"))
        axes.text(r.accuracy + 0.01, y, f"{r.accuracy:.2f}", va="center", fontsize=8)
        y += 1.0
    axes.set_yticks(positions, labels, fontsize=8)
    axes.axvline(0.1, color="grey", linestyle=":", linewidth=1)
    axes.text(0.105, y - 0.6, "chance", color="grey", fontsize=7)
    axes.set_xlim(0, 1.08)
    axes.set_xlabel("test accuracy on the digits data")
    axes.set_title("Without GradGuard (red), with GradGuard (blue), the fix it recommends (green)")
    axes.title.set_fontsize(9)
    figure.tight_layout()
    return save_png(figure, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gradguard demo",
        description=(
            "Train the classic gradient pathologies (vanishing, exploding, dying ReLUs) on "
            "scikit-learn's digits data, each without and with GradGuard, and compare."
        ),
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/gradguard_demo"),
        help="output folder (default: outputs/gradguard_demo)",
    )
    names = [s.name for s in SCENARIOS]
    parser.add_argument(
        "--only",
        choices=names,
        action="append",
        help="run only this scenario (repeatable; default: all)",
    )
    parser.add_argument(
        "--wandb",
        choices=("offline", "online", "disabled"),
        default=os.environ.get("WANDB_MODE", "offline"),
        help="W&B mode: offline (default; upload later with `wandb sync`), online (needs "
        "`wandb login`) or disabled",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_STEPS} steps per run, for a smoke test"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def _quiet() -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    torch.set_num_threads(1)  # tiny nets run fastest on one thread
    torch.set_flush_denormal(True)  # denormal gradients (~1e-40) make CPU arithmetic crawl
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run_demo(args: argparse.Namespace) -> list[RunResult]:
    """Train every selected scenario, print the table, write the files; return the results."""
    from tqdm.auto import tqdm

    _quiet()
    os.environ["WANDB_MODE"] = args.wandb
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    scenarios = [s for s in SCENARIOS if not args.only or s.name in args.only]
    plan = [(s, r, _steps(s, args.quick)) for s in scenarios for r in s.runs]
    group = time.strftime("demo-%Y%m%d-%H%M%S")
    print(f"gradguard demo: {len(plan)} runs on the digits data, results in {out}/")
    results = []
    with tqdm(
        total=sum(steps for _, _, steps in plan),
        unit="step",
        disable=True if args.no_progress else None,  # None: no bar when not on a terminal
    ) as bar:
        for scenario, run, steps in plan:
            bar.set_description(f"{scenario.name}: {run.label}")
            results.append(
                train_run(
                    scenario,
                    run,
                    out,
                    steps=steps,
                    seed=args.seed,
                    wandb_mode=args.wandb,
                    group=group,
                    bar=bar,
                )
            )
    report(results, scenarios, out, args.wandb)
    return results


def report(results: list[RunResult], scenarios: list[Scenario], out: Path, mode: str) -> None:
    """Print the table and the explanations; write results.md, results.json and summary.png."""
    table = results_table(results)
    summary = summary_picture(results, out / "summary.png")
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    (out / "results.json").write_text(
        json.dumps([asdict(r) for r in results], indent=2), encoding="utf-8"
    )
    print()
    print(table)
    print()
    for scenario in scenarios:
        print(f"{scenario.title}\n  {scenario.explanation}")
    print("\nChance level is accuracy 0.10.")
    print(f"\nPictures: {summary}")
    for r in results:
        for picture in r.pictures:
            print(f"  {picture}")
    runs = [r.wandb_dir for r in results if r.wandb_dir]
    if runs and mode == "offline":
        print(f"W&B runs (offline) under {out / 'wandb'}; upload them with:")
        print(f"  wandb sync {out / 'wandb'}/offline-run-*")
    elif runs:
        print("W&B runs: project lightning-gradguard-demo in your W&B account.")
    print(f"Tables: {out / 'results.md'} and {out / 'results.json'}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``gradguard demo``; returns the exit code."""
    args = parse_args(argv)
    try:
        run_demo(args)
    except DemoError as error:
        print(f"gradguard demo: error: {error}", file=sys.stderr)
        return 2
    return 0

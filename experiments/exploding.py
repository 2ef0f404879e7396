"""Exploding gradients, and what each ``AdaptiveGradClip`` policy does about them.

Scenario S2 of the project's calibrated pathologies, on scikit-learn's bundled
digits data (8x8 images, 10 classes; no download): an MLP 64 -> 128 (9 hidden
ReLU layers of width 128) -> 10, biases 0, SGD with learning rate 0.1 and
momentum 0.9, 1000 steps of batch 64.

- ``S2a``: weights drawn from N(0, 0.125). The gradient norm starts at a few
  units; without clipping it explodes later and the run is non-finite from
  step 46-138 (seeds 0-4).
- ``S2b``: weights drawn from N(0, 0.2). The gradient norm is 440-1340 at
  step 0 and, without clipping, the run is non-finite from step 2 or 3.

Each scenario is trained by a Lightning ``Trainer`` with no clipping, and with
:class:`lightning_gradguard.AdaptiveGradClip` and each clipping policy (plus
ZClip without its ``max_grad_norm`` cap, and three policies with
``scope="layer"``). The summary is a markdown table of the test accuracy
(mean ± std over the seeds), how many runs had an inf/NaN loss or gradient,
the largest raw gradient norm, how many steps the callback skipped, and the
wall time per run. ``--out`` also writes every run's numbers as JSON.

Usage::

    python experiments/exploding.py                       # both scenarios, seeds 0-4, 1000 steps
    python experiments/exploding.py --scenario S2b --seeds 0 1 --out /tmp/s2b.json
    python experiments/exploding.py --quick               # 1 seed, 30 steps (tests)
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import AdaptiveGradClip
from lightning_gradguard.demo.data import digits
from lightning_gradguard.functional import (
    AGC,
    AutoClip,
    EMARatio,
    FixedNorm,
    FixedValue,
    GuardClip,
    ZClip,
)

HIDDEN_LAYERS = 9
WIDTH = 128
BATCH_SIZE = 64
LR = 0.1
MOMENTUM = 0.9
WEIGHT_STD = {"S2a": 0.125, "S2b": 0.2}
"""Standard deviation of the initial weights of each scenario."""


@dataclass(frozen=True)
class Config:
    """One way of training: a label and a factory for the clipping callback (None: no clipping)."""

    label: str
    make: Callable[[], AdaptiveGradClip | None]


def _clip(policy: Any, **kwargs: Any) -> Callable[[], AdaptiveGradClip]:
    return lambda: AdaptiveGradClip(policy=policy(), **kwargs)


CONFIGS = (
    Config("no clipping", lambda: None),
    Config("FixedNorm(1.0)", _clip(lambda: FixedNorm(1.0))),
    Config("FixedValue(0.1)", _clip(lambda: FixedValue(0.1))),
    Config("AutoClip(percentile=10)", _clip(lambda: AutoClip(percentile=10))),
    Config("ZClip()", _clip(ZClip)),
    Config("ZClip(max_grad_norm=None)", _clip(lambda: ZClip(max_grad_norm=None))),
    Config("EMARatio()", _clip(EMARatio)),
    Config("GuardClip()", _clip(GuardClip)),
    Config("AGC(), head excluded", _clip(AGC, exclude=["head.*"])),
    Config("AutoClip(percentile=10), layer", _clip(lambda: AutoClip(percentile=10), scope="layer")),
    Config("ZClip(), layer", _clip(ZClip, scope="layer")),
    Config("EMARatio(), layer", _clip(EMARatio, scope="layer")),
)
"""Every configuration, in table order. ``scope="layer"`` clips each Linear layer on its own."""


class ExplodingMLP(pl.LightningModule):
    """``hidden.0`` ... ``hidden.8`` (Linear + ReLU) and the classifier ``head``.

    Args:
        weight_std: standard deviation of the normal initial weights (biases are 0).
    """

    def __init__(self, weight_std: float) -> None:
        super().__init__()
        sizes = [64] + [WIDTH] * HIDDEN_LAYERS
        self.hidden = nn.ModuleList(nn.Linear(i, o) for i, o in itertools.pairwise(sizes))
        self.head = nn.Linear(WIDTH, 10)
        for layer in [*self.hidden, self.head]:
            nn.init.normal_(layer.weight, mean=0.0, std=weight_std)
            nn.init.zeros_(layer.bias)
        self.losses: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.hidden:
            x = torch.relu(layer(x))
        logits: Tensor = self.head(x)
        return logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.losses.append(loss.detach())  # read back once, after training
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)


class RawGradNorms(pl.Callback):
    """Records the global gradient norm of every step before any clipping (list it first).

    In float64: in float32 the sum of squares overflows to inf above a norm of about 1e19,
    although every gradient element is still finite.
    """

    def __init__(self) -> None:
        self.norms: list[Tensor] = []

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        norms = [torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]
        self.norms.append(torch.linalg.vector_norm(torch.stack(norms)))


@dataclass
class RunResult:
    """One training run (one scenario, one configuration, one seed)."""

    scenario: str
    config: str
    seed: int
    accuracy: float
    first_nonfinite_step: int | None
    """First step whose training loss or raw gradient norm was inf/NaN (None: never)."""
    nonfinite_steps: int
    """Steps with an inf/NaN loss or raw gradient norm."""
    weights_finite: bool
    skipped_steps: int
    stopped_early: str | None
    """The error that ended training before ``steps`` (too many skipped steps in a row)."""
    steps: int
    step0_grad_norm: float
    max_finite_grad_norm: float
    final_loss: float
    seconds: float

    @property
    def went_nonfinite(self) -> bool:
        return self.first_nonfinite_step is not None


def train_one(
    scenario: str, config: Config, seed: int, steps: int, data: tuple[TensorDataset, Any]
) -> RunResult:
    """Train one configuration with a Lightning Trainer and measure it."""
    train_set, (x_test, y_test) = data
    start = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    model = ExplodingMLP(WEIGHT_STD[scenario])
    loader = DataLoader(
        train_set,
        batch_size=BATCH_SIZE,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    raw = RawGradNorms()
    clipper = config.make()
    trainer = pl.Trainer(
        max_steps=steps,
        max_epochs=-1,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[raw] if clipper is None else [raw, clipper],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    stopped = None
    try:
        trainer.fit(model, loader)
    except RuntimeError as error:  # AdaptiveGradClip: max_consecutive_skips reached
        if "AdaptiveGradClip skipped" not in str(error):
            raise
        stopped = str(error).split(";")[0]
    seconds = time.perf_counter() - start

    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(dim=1) == y_test).float().mean())
        weights_finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    losses = torch.stack(model.losses).double().tolist()  # one read of all the steps
    norms = torch.stack(raw.norms).double().tolist()
    bad = [
        step
        for step, (loss, norm) in enumerate(itertools.zip_longest(losses, norms, fillvalue=0.0))
        if not (math.isfinite(loss) and math.isfinite(norm))
    ]
    finite_norms = [n for n in norms if math.isfinite(n)]
    return RunResult(
        scenario=scenario,
        config=config.label,
        seed=seed,
        accuracy=accuracy,
        first_nonfinite_step=bad[0] if bad else None,
        nonfinite_steps=len(bad),
        weights_finite=weights_finite,
        skipped_steps=0 if clipper is None else clipper.skipped_steps,
        stopped_early=stopped,
        steps=len(losses),
        step0_grad_norm=norms[0],
        max_finite_grad_norm=max(finite_norms, default=math.nan),
        final_loss=losses[-1],
        seconds=seconds,
    )


def _mean_std(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown_table(results: list[RunResult], scenario: str) -> str:
    """One row per configuration: accuracy, non-finite runs, largest norm, skips, wall time."""
    lines = [
        "| clipping | test accuracy | runs with inf/NaN | largest raw norm | skipped steps "
        "| s / run |",
        "|---|---|---|---|---|---|",
    ]
    for config in CONFIGS:
        runs = [r for r in results if r.scenario == scenario and r.config == config.label]
        if not runs:
            continue
        bad = [r for r in runs if r.went_nonfinite]
        where = ", ".join(str(r.first_nonfinite_step) for r in bad)
        nonfinite = f"{len(bad)}/{len(runs)}" + (f" (steps {where})" if bad else "")
        stopped = sum(r.stopped_early is not None for r in runs)
        skipped = sum(r.skipped_steps for r in runs)
        skipped_text = str(skipped) + (f" ({stopped} stopped)" if stopped else "")
        seconds = statistics.mean(r.seconds for r in runs)
        accuracy = _mean_std([r.accuracy for r in runs])
        largest = statistics.median(r.max_finite_grad_norm for r in runs)
        lines.append(
            f"| {config.label} | {accuracy} | {nonfinite} | {largest:.3g} | {skipped_text} "
            f"| {seconds:.1f} |"
        )
    return "\n".join(lines)


def print_summary(results: list[RunResult], scenarios: list[str], seeds: list[int]) -> None:
    steps = max((r.steps for r in results), default=0)
    for scenario in scenarios:
        runs = [r for r in results if r.scenario == scenario and r.config == CONFIGS[0].label]
        print(
            f"\n### {scenario}: weights N(0, {WEIGHT_STD[scenario]}), SGD lr {LR} momentum "
            f"{MOMENTUM}, {steps} steps, seeds {', '.join(map(str, seeds))}\n"
        )
        if runs:
            step0 = ", ".join(f"{r.step0_grad_norm:.3g}" for r in runs)
            print(f"Gradient norm at step 0: {step0}\n")
        print(markdown_table(results, scenario))
    print(
        "\n'runs with inf/NaN': runs in which the training loss or a raw (unclipped) gradient "
        "was inf/NaN at some step, with the first such step. 'largest raw norm': the largest "
        "finite global gradient norm before clipping, median over the seeds. 'skipped steps': "
        "optimizer steps AdaptiveGradClip skipped, summed over the seeds; 'stopped': runs it "
        "ended after too many skips in a row. Chance accuracy is 0.10."
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--scenario",
        choices=["S2a", "S2b", "both"],
        default="both",
        help="S2a: N(0, 0.125) weights, S2b: N(0, 0.2) weights (default: both)",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="(default: 0 1 2 3 4)"
    )
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps (default: 1000)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="seed 0 only and 30 steps, for a smoke test (overrides --seeds and --steps)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write every run's numbers as JSON")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be a positive integer, got {args.steps}")
    if args.quick:
        args.seeds, args.steps = [0], 30
    return args


def main(argv: list[str] | None = None) -> list[RunResult]:
    args = parse_args(argv)
    scenarios = ["S2a", "S2b"] if args.scenario == "both" else [args.scenario]
    torch.set_num_threads(1)  # tiny nets run fastest on one thread
    for logger_name in ("pytorch_lightning", "lightning.pytorch"):  # hide Lightning's banners
        logging.getLogger(logger_name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # Lightning vs. newer torch, harmless
    warnings.filterwarnings("ignore", "AdaptiveGradClip: skipped")  # counted in the table
    data = digits()
    total = len(scenarios) * len(CONFIGS) * len(args.seeds)
    print(f"Training {total} runs of {args.steps} steps each", flush=True)
    results: list[RunResult] = []
    for scenario in scenarios:
        for config in CONFIGS:
            for seed in args.seeds:
                result = train_one(scenario, config, seed, args.steps, data)
                results.append(result)
                first = result.first_nonfinite_step
                print(
                    f"{scenario} | {config.label:<32} | seed {seed} | accuracy "
                    f"{result.accuracy:.3f} | inf/NaN from step {first} | skipped "
                    f"{result.skipped_steps} | {result.seconds:.1f} s",
                    flush=True,
                )
    print_summary(results, scenarios, args.seeds)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "steps": args.steps,
            "seeds": args.seeds,
            "scenarios": {s: {"weight_std": WEIGHT_STD[s]} for s in scenarios},
            "configs": [c.label for c in CONFIGS],
            "runs": [asdict(r) for r in results],
        }
        args.out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"\nResults written to {args.out}")
    return results


if __name__ == "__main__":
    main()

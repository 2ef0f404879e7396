"""Dying ReLUs after a learning-rate spike, measured and rescued by ``DeadUnitMonitor``.

Scenario S3 of the project's calibrated pathologies, on scikit-learn's bundled
digits data (8x8 images, 10 classes; no download): an MLP 64 -> 256 -> 256 ->
256 -> 10 with ReLU, Kaiming normal initialization and zero biases, trained
with Adam at learning rate 1e-3 for 40 epochs of 23 batches (batch 64). For one
epoch, ``SPIKE_EPOCH = 5`` counted from 0 (the sixth epoch, optimizer steps
115-137), the learning rate is 0.1; then it is 1e-3 again. The spike kills most
units of the second and third hidden layers, and a dead ReLU gets no gradient,
so they stay dead.

Every configuration has a :class:`lightning_gradguard.DeadUnitMonitor`. Unless
said otherwise its measuring window is one whole epoch
(``every_n_steps=window=23``): a unit is dead when it was never positive on any
batch of that epoch.

- ``no_spike``: reference, no spike (``rescue="never"``).
- ``no_fix``: the spike, ``rescue="never"``: the monitor only measures.
- ``threshold``: the spike, ``rescue="threshold", dead_threshold=0.5``: a
  hidden layer whose units were more than half dead over a window gets
  LeakyReLU(0.01) in place of its ReLU.
- ``threshold_last10``: the same rescue, with a window of the last 10 batches
  of the spike epoch (``every_n_steps=16, window=10``: steps 128-137, logged and
  acted on at step 138). A window that ends right after the spike epoch but
  covers all of it cannot see the damage: the units die during its first
  steps, and a unit positive on any batch of the window counts as alive. Epoch
  windows see the dead units one epoch later, at step 161.
- ``start``: the spike, ``rescue="start"``: LeakyReLU everywhere from the
  first step (a control: how much of the damage is the spike itself).

The monitor's ``dead_units/<layer>`` values are read back from an in-memory
logger. A probe also evaluates, at the end of every epoch, the test accuracy
and the fraction of units whose pre-activation is <= 0 on all 1437 training
samples (SCENARIOS' definition, with the model of that moment), to check the
monitor's window-based numbers against. The summary is a markdown table (mean
over the seeds); ``--out`` writes every run's numbers as JSON.

Usage::

    python experiments/dying_relu.py                        # seeds 0-4, 40 epochs
    python experiments/dying_relu.py --seeds 0 1 --out /tmp/dying.json
    python experiments/dying_relu.py --quick                # seed 0, 8 epochs (tests)
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import DeadUnitMonitor
from lightning_gradguard.demo.data import digits

WIDTH = 256
BATCH_SIZE = 64
LR = 1e-3
SPIKE_LR = 0.1
SPIKE_EPOCH = 5
"""The epoch (counted from 0) trained at ``SPIKE_LR``."""
DEAD_THRESHOLD = 0.5
HIDDEN = ("act1", "act2", "act3")
"""The activation modules of the three hidden layers: the ``<layer>`` of the logged keys."""


@dataclass(frozen=True)
class Config:
    """One way of training: a name, a table label, whether the spike happens, the monitor.

    ``window``: ``"epoch"`` (``every_n_steps=window=`` the batches of an epoch) or
    ``"last10"`` (see :func:`last_batches_window`).
    """

    name: str
    label: str
    spike: bool
    rescue: str
    window: str = "epoch"


CONFIGS = (
    Config("no_spike", "no spike (reference)", False, "never"),
    Config("no_fix", 'spike, no fix (rescue="never")', True, "never"),
    Config("threshold", 'spike, rescue="threshold", epoch windows', True, "threshold"),
    Config(
        "threshold_last10",
        'spike, rescue="threshold", window = last 10 batches of the spike epoch',
        True,
        "threshold",
        window="last10",
    ),
    Config("start", 'spike, LeakyReLU from the start (rescue="start")', True, "start"),
)
"""Every configuration, in table order."""


def last_batches_window(steps_per_epoch: int, window: int = 10) -> tuple[int, int]:
    """``(every_n_steps, window)`` for a window of the last ``window`` batches of the spike epoch.

    Windows start at the multiples of ``every_n_steps``: this one starts at step
    ``steps_per_epoch * (SPIKE_EPOCH + 1) - window`` (128), so ``every_n_steps`` is the
    smallest divisor of that step which is at least ``window`` (16).
    """
    start = steps_per_epoch * (SPIKE_EPOCH + 1) - window
    every = next(d for d in range(window, start + 1) if start % d == 0)
    return every, window


class SpikedMLP(pl.LightningModule):
    """``fc1``/``act1`` ... ``fc3``/``act3`` (Linear + ReLU) and the classifier ``head``.

    Args:
        spike_epoch: the epoch trained at ``SPIKE_LR`` (None: no spike).
    """

    def __init__(self, spike_epoch: int | None) -> None:
        super().__init__()
        self.spike_epoch = spike_epoch
        self.fc1, self.act1 = nn.Linear(64, WIDTH), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(WIDTH, WIDTH), nn.ReLU()
        self.fc3, self.act3 = nn.Linear(WIDTH, WIDTH), nn.ReLU()
        self.head = nn.Linear(WIDTH, 10)
        for layer in (self.fc1, self.fc2, self.fc3, self.head):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def pre_activations(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """The three hidden pre-activations and the logits, for measuring.

        The activations are applied as functions, not by calling their modules, so the
        monitor's hooks (attached to the modules during a window) do not count this pass.
        """
        pre = []
        for fc, act in ((self.fc1, self.act1), (self.fc2, self.act2), (self.fc3, self.act3)):
            h = fc(x)
            pre.append(h)
            if isinstance(act, nn.LeakyReLU):  # swapped by the monitor
                x = nn.functional.leaky_relu(h, act.negative_slope)
            else:
                x = nn.functional.relu(h)
        logits: Tensor = self.head(x)
        return pre, logits

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.fc1(x))
        x = self.act2(self.fc2(x))
        x = self.act3(self.fc3(x))
        logits: Tensor = self.head(x)
        return logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def on_train_epoch_start(self) -> None:
        lr = SPIKE_LR if self.current_epoch == self.spike_epoch else LR
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=LR)


class MemoryLogger(Logger):
    """A Lightning logger that keeps every ``log_metrics`` call in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> str:
        return "0"

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((-1 if step is None else int(step), dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def series(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of one key, in logging order."""
        return [(step, metrics[key]) for step, metrics in self.calls if key in metrics]


class EpochProbe(pl.Callback):
    """At the end of every epoch: test accuracy, and dead units on the whole training set."""

    def __init__(self, x_train: Tensor, test: tuple[Tensor, Tensor]) -> None:
        self.x_train = x_train
        self.x_test, self.y_test = test
        self.accuracy: list[float] = []
        self.dead: dict[str, list[float]] = {name: [] for name in HIDDEN}

    @torch.no_grad()
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        # A window of the monitor can be open here: pre_activations keeps out of its hooks.
        pre, _ = pl_module.pre_activations(self.x_train)
        for name, h in zip(HIDDEN, pre):
            self.dead[name].append(float((h <= 0).all(dim=0).double().mean()))
        _, logits = pl_module.pre_activations(self.x_test)
        accuracy = (logits.argmax(dim=1) == self.y_test).float().mean()
        self.accuracy.append(float(accuracy))


@dataclass
class RunResult:
    """One training run (one configuration, one seed)."""

    config: str
    seed: int
    epochs: int
    steps_per_epoch: int
    accuracy: float
    accuracy_by_epoch: list[float]
    """Test accuracy at the end of every epoch."""
    every_n_steps: int
    window: int
    dead_logged: dict[str, list[tuple[int, float]]]
    """Per hidden layer, the monitor's ``dead_units/<layer>``: ``(step, value)``, logged at
    the end of each window (epoch windows: the window of epoch ``e`` at step ``23 (e + 1)``)."""
    dead_full_pass: dict[str, list[float]]
    """Per hidden layer, at the end of every epoch, the fraction of units whose
    pre-activation is <= 0 on all 1437 training samples."""
    swapped: list[str]
    events: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def window_ending_at(self, layer: str, step: int) -> tuple[int, float] | None:
        """``(step, value)`` of the window logged at ``step``, if there is one."""
        return next(((s, v) for s, v in self.dead_logged[layer] if s == step), None)

    def first_detection(self, threshold: float = DEAD_THRESHOLD) -> int | None:
        """The first step at which some hidden layer was logged more than ``threshold`` dead."""
        steps = [s for n in HIDDEN for s, v in self.dead_logged[n] if v > threshold]
        return min(steps, default=None)

    def last_window(self, layer: str) -> tuple[int, float]:
        """``(step, value)`` of the last window."""
        return self.dead_logged[layer][-1]

    @property
    def swap_steps(self) -> list[int]:
        """Steps at which layers were swapped (once per step)."""
        return sorted({int(e["step"]) for e in self.events if e["kind"] == "swap"})


def train_one(config: Config, seed: int, epochs: int, data: tuple[TensorDataset, Any]) -> RunResult:
    """Train one configuration with a Lightning Trainer and measure it."""
    train_set, test = data
    start = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    model = SpikedMLP(SPIKE_EPOCH if config.spike else None)
    loader = DataLoader(
        train_set,
        batch_size=BATCH_SIZE,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    steps_per_epoch = len(loader)  # 23
    if config.window == "last10":
        every_n_steps, window = last_batches_window(steps_per_epoch)
    else:
        every_n_steps = window = steps_per_epoch
    monitor = DeadUnitMonitor(
        every_n_steps=every_n_steps,
        window=window,
        rescue=config.rescue,
        dead_threshold=DEAD_THRESHOLD,
    )
    probe = EpochProbe(train_set.tensors[0], test)
    logger = MemoryLogger()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[monitor, probe],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    seconds = time.perf_counter() - start
    return RunResult(
        config=config.name,
        seed=seed,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        accuracy=probe.accuracy[-1],
        accuracy_by_epoch=probe.accuracy,
        every_n_steps=every_n_steps,
        window=window,
        dead_logged={name: logger.series(f"dead_units/{name}") for name in HIDDEN},
        dead_full_pass=probe.dead,
        swapped=list(monitor.swapped),
        events=[dict(e) for e in monitor.events],
        seconds=seconds,
    )


def _mean_std(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _percents(rows: list[list[float]]) -> str:
    """Mean over the runs of each layer's fraction, as ``a/b/c%``."""
    return "/".join(f"{100 * statistics.mean(column):.0f}" for column in zip(*rows)) + "%"


def _dead_cell(runs: list[RunResult], step: int | None = None) -> str:
    """Mean dead fractions of act1/act2/act3 in the window logged at ``step`` (None: last)."""
    rows = []
    for r in runs:
        picked = [r.last_window(n) if step is None else r.window_ending_at(n, step) for n in HIDDEN]
        if any(p is None for p in picked):
            return "-"
        rows.append([p[1] for p in picked if p is not None])
    cell = _percents(rows)
    if step is None:
        last = sorted({r.last_window(HIDDEN[0])[0] for r in runs})
        cell += f" (step {', '.join(map(str, last))})"
    return cell


def _detection_cell(runs: list[RunResult]) -> str:
    """Where some layer was first logged more than half dead, and the layers' values there."""
    steps = [r.first_detection() for r in runs]
    if all(s is None for s in steps):
        return "never"
    found = [(r, s) for r, s in zip(runs, steps) if s is not None]
    values = _percents([[dict(r.dead_logged[n])[s] for n in HIDDEN] for r, s in found])
    where = ", ".join(str(s) for s in sorted({s for _, s in found}))
    missed = len(runs) - len(found)
    return f"step {where}: {values}" + (f" (never in {missed} of {len(runs)})" if missed else "")


def _swapped_cell(config: Config, runs: list[RunResult]) -> str:
    if config.rescue == "start":
        return "all, at step 0"
    counts: dict[str, int] = {}
    for r in runs:
        if r.swapped:
            key = f"{', '.join(r.swapped)} at step {', '.join(map(str, r.swap_steps))}"
            counts[key] = counts.get(key, 0) + 1
    return "; ".join(f"{key} ({k}/{len(runs)})" for key, k in counts.items()) or "-"


def markdown_table(results: list[RunResult]) -> str:
    """One row per configuration; dead fractions are the monitor's, layers act1/act2/act3."""
    spike_end = results[0].steps_per_epoch * (SPIKE_EPOCH + 1) if results else 0
    lines = [
        "| configuration | test accuracy | accuracy before / after the spike epoch "
        f"| dead, window ending at step {spike_end} | first window > 50% dead "
        "| dead, last window | swapped | s / run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for config in CONFIGS:
        runs = [r for r in results if r.config == config.name]
        if not runs:
            continue
        before = statistics.mean(r.accuracy_by_epoch[SPIKE_EPOCH - 1] for r in runs)
        after = statistics.mean(r.accuracy_by_epoch[SPIKE_EPOCH] for r in runs)
        seconds = statistics.mean(r.seconds for r in runs)
        lines.append(
            f"| {config.label} | {_mean_std([r.accuracy for r in runs])} "
            f"| {before:.3f} / {after:.3f} | {_dead_cell(runs, spike_end)} "
            f"| {_detection_cell(runs)} | {_dead_cell(runs)} | {_swapped_cell(config, runs)} "
            f"| {seconds:.1f} |"
        )
    return "\n".join(lines)


def full_pass_table(results: list[RunResult]) -> str:
    """Dead fractions on the whole training set, with the model at the end of an epoch."""
    lines = [
        "| configuration | before the spike epoch | after the spike epoch | at the end |",
        "|---|---|---|---|",
    ]
    for config in CONFIGS:
        runs = [r for r in results if r.config == config.name]
        if runs:
            cells = [
                _percents([[r.dead_full_pass[n][epoch] for n in HIDDEN] for r in runs])
                for epoch in (SPIKE_EPOCH - 1, SPIKE_EPOCH, -1)
            ]
            lines.append(f"| {config.label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def print_summary(results: list[RunResult], epochs: int, seeds: list[int]) -> None:
    first = results[0].steps_per_epoch * SPIKE_EPOCH
    print(
        f"\n### S3: MLP 64-256-256-256-10, ReLU, Adam lr {LR:g}, lr {SPIKE_LR:g} for epoch "
        f"{SPIKE_EPOCH} (from 0: steps {first}-{first + results[0].steps_per_epoch - 1}), {epochs} "
        f"epochs, seeds {', '.join(map(str, seeds))}\n"
    )
    print(markdown_table(results))
    print(
        "\nDead fractions: DeadUnitMonitor's dead_units/<layer> of the hidden layers "
        "act1/act2/act3 (mean over the seeds): units never positive in the window, logged "
        "after the window's last batch. 'first window > 50% dead': the first logged window in "
        "which some hidden layer was more than half dead (rescue='threshold' swaps there). "
        "'swapped': layers swapped to LeakyReLU(0.01), in how many runs. Accuracy before / "
        "after: at the end of the epoch before the spike and of the spike epoch. Chance "
        "accuracy is 0.10.\n"
    )
    print("Reference: pre-activation <= 0 on all 1437 training samples, model at an epoch's end\n")
    print(full_pass_table(results))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="(default: 0 1 2 3 4)"
    )
    parser.add_argument("--epochs", type=int, default=40, help="epochs per run (default: 40)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"seed 0 only and {SPIKE_EPOCH + 3} epochs, for a smoke test "
        "(overrides --seeds and --epochs)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write every run's numbers as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = [0], SPIKE_EPOCH + 3
    if args.epochs <= SPIKE_EPOCH:
        parser.error(f"--epochs must be more than the spike epoch {SPIKE_EPOCH}, got {args.epochs}")
    return args


def main(argv: list[str] | None = None) -> list[RunResult]:
    args = parse_args(argv)
    torch.set_num_threads(1)  # tiny nets run fastest on one thread
    torch.set_flush_denormal(True)
    for logger_name in ("pytorch_lightning", "lightning.pytorch"):  # hide Lightning's banners
        logging.getLogger(logger_name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # Lightning vs. newer torch, harmless
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")  # no self.log
    warnings.filterwarnings("ignore", "DeadUnitMonitor: swapped")  # reported in the table
    data = digits()
    total = len(CONFIGS) * len(args.seeds)
    print(f"Training {total} runs of {args.epochs} epochs each", flush=True)
    results: list[RunResult] = []
    for config in CONFIGS:
        for seed in args.seeds:
            result = train_one(config, seed, args.epochs, data)
            results.append(result)
            detected = result.first_detection()
            print(
                f"{config.name:<16} | seed {seed} | accuracy {result.accuracy:.3f} | a layer > 50% "
                f"dead at step {detected} | swapped {', '.join(result.swapped) or '-'} at "
                f"{result.swap_steps or '-'} | {result.seconds:.1f} s",
                flush=True,
            )
    print_summary(results, args.epochs, args.seeds)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "epochs": args.epochs,
            "seeds": args.seeds,
            "spike_epoch": SPIKE_EPOCH,
            "lr": LR,
            "spike_lr": SPIKE_LR,
            "dead_threshold": DEAD_THRESHOLD,
            "configs": [asdict(c) for c in CONFIGS],
            "runs": [asdict(r) for r in results],
        }
        args.out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"\nResults written to {args.out}")
    return results


if __name__ == "__main__":
    main()

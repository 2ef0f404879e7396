"""Re-initialization on the digits data: ``InitAtStart`` against vanishing gradients,
``UnitRecycler`` (ReDo) against dying ReLUs.

Two parts, both on scikit-learn's bundled digits data (8x8 images, 10 classes; no
download; split and scaling as in ``exploding.py`` and ``dying_relu.py``), both
trained with Lightning and Adam at learning rate 1e-3, batch 64 (23 batches per epoch).

Part 1, ``init`` (scenario S1): a 25-layer MLP (64 -> 64 x 24, then -> 10) built as one
``nn.Sequential``, sigmoid or tanh after every hidden layer, weights N(0, 0.05) and zero
biases, trained for 30 epochs (690 steps). Neither network learns: the gradient shrinks by
orders of magnitude on its way back. Then the same modules with
:class:`lightning_gradguard.InitAtStart` in the Trainer's callbacks, which re-initializes
them before the first step without touching the model's code:

- ``scheme="xavier_uniform"``: Glorot with the gain of the activation that consumes each
  layer (tanh 5/3, sigmoid 1, the output layer 1), inferred from the ``nn.Sequential``;
- ``scheme="lsuv"``: orthonormal weights rescaled layer by layer until each Linear's
  output has unit std on the first training batch;
- for tanh, ``scheme="xavier_uniform", nonlinearity="linear"`` too: gain 1 everywhere, what
  ``nn.init.xavier_uniform_`` does by default.

A :class:`lightning_gradguard.GradNormMonitor` (float64 norms) logs the gradient norm of
every layer at step 0 to an in-memory logger; the tables show that profile (first/last
layer ratio, and layers 1, 7, 13, 19, 25) and the test accuracy after training.

Part 2, ``recycle`` (scenario S3, the model and learning-rate spike of ``dying_relu.py``):
an MLP 64 -> 256 -> 256 -> 256 -> 10 with ReLU and Kaiming init, 40 epochs, trained at
learning rate 0.1 for epoch 5 (counted from 0, steps 115-137). The spike kills most units of
the second and third hidden layers. Instead of swapping ReLU for LeakyReLU, a
:class:`lightning_gradguard.UnitRecycler` measures the units over the last 10 batches of the
spike epoch (steps 128-137) and recycles those whose ReDo score is at most ``tau`` at step
138: new Kaiming incoming weights, zero bias, zero outgoing weights, Adam moments of those
entries zeroed.

- ``no_fix``: the spike and nothing else (reference);
- ``recycle_once_tau0`` / ``recycle_once_tau0.025``: that one window only (the trigger of
  the calibration runs' "ReDo once"; ``UnitRecycler`` opens a window at every multiple of
  ``every_n_steps``, so :class:`RecycleOnce` opens only the window starting at step 128);
- ``recycle_every128_tau0.025``: the stock callback with ``every_n_steps=128, window=10``:
  windows at steps 0, 128, 256, ... 896, each recycling what is dormant then.

Dead fractions are measured on all 1437 training samples at the end of every epoch
(``dying_relu.EpochProbe``: pre-activation <= 0 on every sample).

Usage::

    python experiments/reinit.py                          # both parts, seeds 0-4 (~5 min)
    python experiments/reinit.py --part init --seeds 0 1 --out /tmp/reinit.json
    python experiments/reinit.py --quick                  # seed 0, few epochs (tests)
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from dying_relu import (  # experiments/ is on sys.path when this script runs
    BATCH_SIZE,
    HIDDEN,
    SPIKE_EPOCH,
    SPIKE_LR,
    EpochProbe,
    MemoryLogger,
    SpikedMLP,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradNormMonitor, InitAtStart, UnitRecycler
from lightning_gradguard.demo.data import digits

LR = 1e-3
DEPTH = 25
"""Linear layers of the deep MLP: 24 hidden (64 -> 64) and the output layer (64 -> 10)."""
WIDTH = 64
POOR_STD = 0.05
PROFILE_LAYERS = (1, 7, 13, 19, 25)
"""Layers (1-based) whose step-0 gradient norm the profile table shows."""
RECYCLE_WINDOW = 10
"""Batches in a recycling window: the last 10 of the spike epoch."""
PAIRS = [["fc1", "fc2", "act1"], ["fc2", "fc3", "act2"], ["fc3", "head", "act3"]]
"""``SpikedMLP`` is not an ``nn.Sequential``: its producer/consumer pairs are named."""
PRODUCERS = ("fc1", "fc2", "fc3")


# --------------------------------------------------------------------------- part 1: init


@dataclass(frozen=True)
class InitConfig:
    """A deep MLP: its activation and the ``InitAtStart`` scheme (None: N(0, 0.05) kept)."""

    name: str
    label: str
    activation: str
    scheme: str | None
    init_kwargs: dict[str, Any] = field(default_factory=dict)


INIT_CONFIGS = (
    InitConfig("sigmoid", "sigmoid, N(0, 0.05)", "sigmoid", None),
    InitConfig(
        "sigmoid_xavier", 'sigmoid, InitAtStart("xavier_uniform")', "sigmoid", "xavier_uniform"
    ),
    InitConfig("sigmoid_lsuv", 'sigmoid, InitAtStart("lsuv")', "sigmoid", "lsuv"),
    InitConfig("tanh", "tanh, N(0, 0.05)", "tanh", None),
    InitConfig("tanh_xavier", 'tanh, InitAtStart("xavier_uniform")', "tanh", "xavier_uniform"),
    InitConfig("tanh_lsuv", 'tanh, InitAtStart("lsuv")', "tanh", "lsuv"),
    InitConfig(
        "tanh_xavier_gain1",
        'tanh, InitAtStart("xavier_uniform", nonlinearity="linear")',
        "tanh",
        "xavier_uniform",
        {"nonlinearity": "linear"},
    ),
)
"""Part 1's configurations, in table order."""


def linear_names() -> list[str]:
    """The module names of the deep MLP's Linear layers, first to last: ``net.0`` ... ``net.48``."""
    return [f"net.{2 * i}" for i in range(DEPTH)]


class DeepMLP(pl.LightningModule):
    """``DEPTH`` Linear layers in one ``nn.Sequential`` (``net``), an activation after each
    hidden one; weights N(0, ``POOR_STD``), biases 0 (scenario S1's poor init)."""

    def __init__(self, activation: str) -> None:
        super().__init__()
        act = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh}[activation]
        sizes = [WIDTH] * DEPTH + [10]
        layers: list[nn.Module] = []
        for n_in, n_out in itertools.pairwise(sizes):
            linear = nn.Linear(n_in, n_out)
            nn.init.normal_(linear.weight, mean=0.0, std=POOR_STD)
            nn.init.zeros_(linear.bias)
            layers += [linear, act()]
        self.net = nn.Sequential(*layers[:-1])  # no activation after the output layer

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.net(x)
        return logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=LR)


@torch.no_grad()
def accuracy_on(model: nn.Module, test: tuple[Tensor, Tensor]) -> float:
    model.eval()
    x, y = test
    return float((model(x).argmax(dim=1) == y).float().mean())


@dataclass
class InitResult:
    """One part-1 run (one configuration, one seed)."""

    config: str
    seed: int
    epochs: int
    accuracy: float
    step0_norms: list[float]
    """Gradient norm of each Linear layer, first to last, at step 0 (``grad_norm/net.<i>``)."""
    gains: dict[str, str]
    """The nonlinearity whose gain each layer got (named schemes), or {}."""
    lsuv_not_converged: list[str]
    vanishing_warned: int
    """Layers ``GradNormMonitor`` warned about (vanishing gradients)."""
    seconds: float

    @property
    def ratio(self) -> float:
        first, last = self.step0_norms[0], self.step0_norms[-1]
        return first / last if last > 0 else math.inf


def train_init(config: InitConfig, seed: int, epochs: int, data: Any) -> InitResult:
    """Train one deep MLP with a Lightning Trainer; read the step-0 norms from the logger."""
    train_set, test = data
    start = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    model = DeepMLP(config.activation)
    loader = DataLoader(
        train_set,
        batch_size=BATCH_SIZE,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    monitor = GradNormMonitor(log_every_n_steps=100, log_param_norms=False, log_update_ratio=False)
    callbacks: list[pl.Callback] = [monitor]
    init = None
    if config.scheme is not None:
        # seed: a different draw per run (InitAtStart's default, 0, is the same for every run)
        init = InitAtStart(scheme=config.scheme, seed=seed, **config.init_kwargs)
        callbacks.insert(0, init)
    logger = MemoryLogger()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    step0 = next(metrics for step, metrics in logger.calls if step == 0)
    norms = [float(step0[f"grad_norm/{name}"]) for name in linear_names()]
    report = None if init is None else init.report
    state = monitor.state_dict()["optimizer_0"]
    return InitResult(
        config=config.name,
        seed=seed,
        epochs=epochs,
        accuracy=accuracy_on(model, test),
        step0_norms=norms,
        gains=dict(report) if isinstance(report, dict) else {},
        lsuv_not_converged=list(getattr(report, "not_converged", [])),
        vanishing_warned=len(state["warned_vanishing"]),
        seconds=time.perf_counter() - start,
    )


def _mean_std(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _geomean(values: list[float]) -> float:
    if any(v <= 0 or not math.isfinite(v) for v in values):
        return 0.0 if any(v == 0 for v in values) else math.inf
    return math.exp(statistics.mean(math.log(v) for v in values))


def _range(values: list[float]) -> str:
    """Geometric mean over the seeds, and the range when there are several."""
    cell = f"{_geomean(values):.1e}"
    if len(values) > 1:
        cell += f" ({min(values):.1e} to {max(values):.1e})"
    return cell


def init_table(results: list[InitResult]) -> str:
    lines = [
        "| configuration | test accuracy | step-0 grad norm, first / last layer "
        "| layers warned vanishing | s / run |",
        "|---|---|---|---|---|",
    ]
    for config in INIT_CONFIGS:
        runs = [r for r in results if r.config == config.name]
        if runs:
            warned = statistics.mean(r.vanishing_warned for r in runs)
            seconds = statistics.mean(r.seconds for r in runs)
            lines.append(
                f"| {config.label} | {_mean_std([r.accuracy for r in runs])} "
                f"| {_range([r.ratio for r in runs])} | {warned:.0f} of {DEPTH} | {seconds:.1f} |"
            )
    return "\n".join(lines)


def profile_table(results: list[InitResult]) -> str:
    header = " | ".join(f"layer {i}" for i in PROFILE_LAYERS)
    lines = [f"| configuration | {header} |", "|---|" + "---|" * len(PROFILE_LAYERS)]
    for config in INIT_CONFIGS:
        runs = [r for r in results if r.config == config.name]
        if runs:
            cells = [
                f"{_geomean([r.step0_norms[i - 1] for r in runs]):.0e}" for i in PROFILE_LAYERS
            ]
            lines.append(f"| {config.label} | {' | '.join(cells)} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- part 2: recycle


class RecycleOnce(UnitRecycler):
    """A :class:`UnitRecycler` with a single measuring window, starting at step ``at_step``.

    The stock callback opens a window at every multiple of ``every_n_steps`` (step 0
    included); this one lets only the window at ``at_step`` open.
    """

    def __init__(self, at_step: int, **kwargs: Any) -> None:
        super().__init__(every_n_steps=at_step, **kwargs)
        self.at_step = at_step

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.at_step:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)


@dataclass(frozen=True)
class RecycleConfig:
    """A spiked S3 run: ``mode`` is ``"none"``, ``"once"`` or ``"periodic"``."""

    name: str
    label: str
    mode: str
    tau: float = 0.0


RECYCLE_CONFIGS = (
    RecycleConfig("no_fix", "spike, no fix", "none"),
    RecycleConfig("recycle_once_tau0", "spike, UnitRecycler once, tau=0", "once", 0.0),
    RecycleConfig("recycle_once_tau0.025", "spike, UnitRecycler once, tau=0.025", "once", 0.025),
    RecycleConfig(
        "recycle_every128_tau0.025",
        "spike, UnitRecycler(every_n_steps=128, window=10, tau=0.025)",
        "periodic",
        0.025,
    ),
)
"""Part 2's configurations, in table order."""


@dataclass
class RecycleResult:
    """One part-2 run (one configuration, one seed)."""

    config: str
    seed: int
    epochs: int
    steps_per_epoch: int
    accuracy: float
    accuracy_by_epoch: list[float]
    dead_full_pass: dict[str, list[float]]
    """Per hidden layer (act1/act2/act3), at the end of every epoch, the fraction of units
    whose pre-activation is <= 0 on all 1437 training samples."""
    recycled: dict[str, list[tuple[int, float]]]
    """Per producer (fc1/fc2/fc3), ``recycled_units/<layer>`` as logged: ``(step, units)``."""
    events: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def recycled_at(self, step: int) -> list[float]:
        """Units recycled in fc1/fc2/fc3 by the window logged at ``step`` (0 if none)."""
        return [dict(self.recycled[p]).get(step, 0.0) for p in PRODUCERS]


def trigger_step(steps_per_epoch: int) -> int:
    """First step of the window of the last ``RECYCLE_WINDOW`` batches of the spike epoch."""
    return steps_per_epoch * (SPIKE_EPOCH + 1) - RECYCLE_WINDOW


def train_recycle(config: RecycleConfig, seed: int, epochs: int, data: Any) -> RecycleResult:
    """Train one spiked S3 run with a Lightning Trainer and measure it."""
    train_set, test = data
    start = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    model = SpikedMLP(SPIKE_EPOCH)
    loader = DataLoader(
        train_set,
        batch_size=BATCH_SIZE,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    steps_per_epoch = len(loader)  # 23
    at = trigger_step(steps_per_epoch)  # 128
    probe = EpochProbe(train_set.tensors[0], test)
    callbacks: list[pl.Callback] = [probe]
    recycler: UnitRecycler | None = None
    if config.mode == "once":
        recycler = RecycleOnce(at, window=RECYCLE_WINDOW, tau=config.tau, pairs=PAIRS, seed=seed)
    elif config.mode == "periodic":
        recycler = UnitRecycler(
            every_n_steps=at, window=RECYCLE_WINDOW, tau=config.tau, pairs=PAIRS, seed=seed
        )
    if recycler is not None:
        callbacks.insert(0, recycler)  # recycles before the probe's end-of-epoch pass
    logger = MemoryLogger()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    return RecycleResult(
        config=config.name,
        seed=seed,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        accuracy=probe.accuracy[-1],
        accuracy_by_epoch=probe.accuracy,
        dead_full_pass=probe.dead,
        recycled={p: logger.series(f"recycled_units/{p}") for p in PRODUCERS},
        events=[] if recycler is None else [dict(e) for e in recycler.events],
        seconds=time.perf_counter() - start,
    )


def _percents(rows: list[list[float]]) -> str:
    """Mean over the runs of each layer's fraction, as ``a/b/c%``."""
    return "/".join(f"{100 * statistics.mean(column):.0f}" for column in zip(*rows)) + "%"


def _dead(runs: list[RecycleResult], epoch: int) -> str:
    return _percents([[r.dead_full_pass[n][epoch] for n in HIDDEN] for r in runs])


def _recycled_cell(runs: list[RecycleResult]) -> str:
    """Mean units recycled in fc1/fc2/fc3 at the trigger (step 138), and in all windows."""
    at = runs[0].steps_per_epoch * (SPIKE_EPOCH + 1)
    trigger = [statistics.mean(r.recycled_at(at)[i] for r in runs) for i in range(3)]
    total = statistics.mean(sum(v for p in PRODUCERS for _, v in r.recycled[p]) for r in runs)
    cell = "/".join(f"{v:.0f}" for v in trigger)
    windows = max(len(r.recycled[PRODUCERS[0]]) for r in runs)
    if windows > 1:
        cell += f" (all {windows} windows: {total:.0f})"
    return cell


def recycle_table(results: list[RecycleResult]) -> str:
    after = SPIKE_EPOCH + 1
    later = min(SPIKE_EPOCH + 5, results[0].epochs - 1) if results else 0
    lines = [
        "| configuration | test accuracy | accuracy after epoch "
        f"{SPIKE_EPOCH} / {after} / {later} | units recycled at step "
        f"{results[0].steps_per_epoch * after if results else 0} (of 256 per layer) "
        f"| dead after epoch {SPIKE_EPOCH} | dead after epoch {after} | dead at the end "
        "| s / run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for config in RECYCLE_CONFIGS:
        runs = [r for r in results if r.config == config.name]
        if not runs:
            continue
        accuracies = " / ".join(
            f"{statistics.mean(r.accuracy_by_epoch[e] for r in runs):.3f}"
            for e in (SPIKE_EPOCH, after, later)
        )
        recycled = "-" if config.mode == "none" else _recycled_cell(runs)
        dead = " | ".join(_dead(runs, e) for e in (SPIKE_EPOCH, after, -1))
        seconds = statistics.mean(r.seconds for r in runs)
        lines.append(
            f"| {config.label} | {_mean_std([r.accuracy for r in runs])} | {accuracies} "
            f"| {recycled} | {dead} | {seconds:.1f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--part", choices=("init", "recycle", "both"), default="both", help="(default: both)"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="(default: 0 1 2 3 4)"
    )
    parser.add_argument(
        "--init-epochs", type=int, default=30, help="epochs of part 1 (default: 30, as S1)"
    )
    parser.add_argument(
        "--recycle-epochs", type=int, default=40, help="epochs of part 2 (default: 40, as S3)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"seed 0 only, 1 epoch in part 1 and {SPIKE_EPOCH + 3} in part 2, for a smoke "
        "test (overrides --seeds and the epochs)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write every run's numbers as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.init_epochs, args.recycle_epochs = [0], 1, SPIKE_EPOCH + 3
    if args.init_epochs < 1:
        parser.error(f"--init-epochs must be a positive integer, got {args.init_epochs}")
    if args.recycle_epochs <= SPIKE_EPOCH + 1:
        parser.error(
            f"--recycle-epochs must be more than {SPIKE_EPOCH + 1} (the spike epoch is "
            f"{SPIKE_EPOCH}), got {args.recycle_epochs}"
        )
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(1)  # tiny nets run fastest on one thread
    torch.set_flush_denormal(True)  # denormal gradients make CPU arithmetic crawl
    for logger_name in ("pytorch_lightning", "lightning.pytorch"):  # hide Lightning's banners
        logging.getLogger(logger_name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # Lightning vs. newer torch, harmless
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")  # no self.log
    warnings.filterwarnings("ignore", "GradNormMonitor: .*")  # counted in the table
    data: tuple[TensorDataset, tuple[Tensor, Tensor]] = digits()
    init_results: list[InitResult] = []
    recycle_results: list[RecycleResult] = []
    seeds = ", ".join(map(str, args.seeds))
    if args.part in ("init", "both"):
        print(f"Part 1: {len(INIT_CONFIGS) * len(args.seeds)} runs of {args.init_epochs} epochs")
        for config in INIT_CONFIGS:
            for seed in args.seeds:
                r = train_init(config, seed, args.init_epochs, data)
                init_results.append(r)
                print(
                    f"{config.name:<15} | seed {seed} | accuracy {r.accuracy:.3f} | step-0 first/"
                    f"last {r.ratio:.1e} | {r.seconds:.1f} s",
                    flush=True,
                )
    if args.part in ("recycle", "both"):
        total = len(RECYCLE_CONFIGS) * len(args.seeds)
        print(f"Part 2: {total} runs of {args.recycle_epochs} epochs")
        for rconfig in RECYCLE_CONFIGS:
            for seed in args.seeds:
                rr = train_recycle(rconfig, seed, args.recycle_epochs, data)
                recycle_results.append(rr)
                at = rr.steps_per_epoch * (SPIKE_EPOCH + 1)
                print(
                    f"{rconfig.name:<25} | seed {seed} | accuracy {rr.accuracy:.3f} | recycled at "
                    f"step {at}: {'/'.join(f'{v:.0f}' for v in rr.recycled_at(at))} | "
                    f"{rr.seconds:.1f} s",
                    flush=True,
                )
    if init_results:
        print(
            f"\n### S1: {DEPTH}-layer MLP, width {WIDTH}, Adam lr {LR:g}, {args.init_epochs} "
            f"epochs, seeds {seeds}\n"
        )
        print(init_table(init_results))
        print(
            "\nStep-0 gradient norms from GradNormMonitor's grad_norm/<layer> (float64): "
            "geometric mean over the seeds (range). Chance accuracy is 0.10.\n"
        )
        print(profile_table(init_results))
    if recycle_results:
        print(
            f"\n### S3: MLP 64-256-256-256-10, ReLU, Adam lr {LR:g}, lr {SPIKE_LR:g} for epoch "
            f"{SPIKE_EPOCH}, {args.recycle_epochs} epochs, seeds {seeds}\n"
        )
        print(recycle_table(recycle_results))
        print(
            "\nUnits recycled: recycled_units/fc1, fc2, fc3 logged at the trigger (mean over "
            "the seeds). Dead: pre-activation <= 0 on all 1437 training samples, act1/act2/act3, "
            f"with the model at the end of an epoch (epoch {SPIKE_EPOCH}'s pass runs after the "
            "recycling at its last batch).\n"
        )
    payload = {
        "seeds": args.seeds,
        "init": {
            "epochs": args.init_epochs,
            "depth": DEPTH,
            "configs": [asdict(c) for c in INIT_CONFIGS],
            "runs": [{**asdict(r), "ratio": r.ratio} for r in init_results],
        },
        "recycle": {
            "epochs": args.recycle_epochs,
            "spike_epoch": SPIKE_EPOCH,
            "spike_lr": SPIKE_LR,
            "window": RECYCLE_WINDOW,
            "configs": [asdict(c) for c in RECYCLE_CONFIGS],
            "runs": [asdict(r) for r in recycle_results],
        },
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"Results written to {args.out}")
    return payload


if __name__ == "__main__":
    main()

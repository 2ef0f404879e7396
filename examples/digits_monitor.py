"""Watch vanishing gradients happen, and go away, with ``GradNormMonitor``.

Two runs of a 25-layer MLP on scikit-learn's bundled digits data (8x8 images,
10 classes; no download), both monitored by
:class:`lightning_gradguard.GradNormMonitor`:

1. ``sigmoid``: sigmoid after every hidden layer, weights drawn from N(0, 0.05).
   The gradient shrinks about 10x per layer on its way back: the first layer's
   gradient norm is around 1e-24 while the last layer's is around 0.6. The
   network does not learn (test accuracy 0.10 = chance) and the monitor warns
   about vanishing gradients.
2. ``relu_kaiming``: the same network with ReLU and Kaiming (He) normal
   initialization. The gradient norms of all layers have the same order of
   magnitude and the network learns.

Metrics go to a Weights & Biases logger in offline mode (nothing is uploaded;
``wandb sync`` uploads later) and to a CSV logger, which the summary at the end
reads back.

Usage::

    python examples/digits_monitor.py                  # 10 epochs per run
    python examples/digits_monitor.py --epochs 30 --out /tmp/digits  # ReLU run: ~0.93
    python examples/digits_monitor.py --quick          # 1 epoch per run (tests)
"""

from __future__ import annotations

import argparse
import csv
import itertools
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradNormMonitor

DEPTH = 25
"""Linear layers in the network: 24 hidden (64 -> 64) and the output layer (64 -> 10)."""
WIDTH = 64
BATCH_SIZE = 64
LOG_EVERY_N_STEPS = 10
RUNS = ("sigmoid", "relu_kaiming")


class DeepMLP(pl.LightningModule):
    """``DEPTH`` Linear layers named ``layers.0`` ... ``layers.24``, one activation between them.

    Args:
        activation: ``"sigmoid"`` (weights N(0, 0.05)) or ``"relu"`` (Kaiming normal).
        lr: Adam learning rate.
    """

    def __init__(self, activation: str, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr
        sizes = [WIDTH] * DEPTH + [10]
        linears = [nn.Linear(i, o) for i, o in itertools.pairwise(sizes)]
        self.layers = nn.ModuleList(linears)
        self.act: nn.Module = nn.Sigmoid() if activation == "sigmoid" else nn.ReLU()
        for layer in linears:
            if activation == "sigmoid":
                nn.init.normal_(layer.weight, mean=0.0, std=0.05)
            else:
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        logits: Tensor = self.layers[-1](x)
        return logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        accuracy = (self(x).argmax(dim=1) == y).float().mean()
        self.log("test/accuracy", accuracy)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def digits_loaders(
    seed: int,
) -> tuple[DataLoader[tuple[Tensor, ...]], DataLoader[tuple[Tensor, ...]]]:
    """Train / test loaders: 1437 / 360 standardized digits (split and scaler as SCENARIOS S1)."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y
    )
    scaler = StandardScaler().fit(x_train)

    def dataset(features: object, labels: object) -> TensorDataset:
        return TensorDataset(
            torch.tensor(scaler.transform(features), dtype=torch.float32),
            torch.tensor(labels, dtype=torch.long),
        )

    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(
        dataset(x_train, y_train), batch_size=BATCH_SIZE, shuffle=True, generator=generator
    )
    test = DataLoader(dataset(x_test, y_test), batch_size=len(y_test))
    return train, test


@dataclass
class RunResult:
    """What the summary reports about one run."""

    name: str
    accuracy: float
    first_layer_norm: float
    last_layer_norm: float
    first_step: int
    vanishing_layers: list[str]
    csv_file: Path
    wandb_dir: Path | None
    seconds: float

    @property
    def ratio(self) -> float:
        if self.last_layer_norm == 0:
            return math.inf
        return self.first_layer_norm / self.last_layer_norm


def first_logged_norms(csv_file: Path, first: str, last: str) -> tuple[int, float, float]:
    """Step and gradient norms of two layers at the first step the monitor logged."""
    with csv_file.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get(f"grad_norm/{first}") and row.get(f"grad_norm/{last}"):
                step = int(float(row["step"]))
                return step, float(row[f"grad_norm/{first}"]), float(row[f"grad_norm/{last}"])
    raise RuntimeError(f"no grad_norm/{first} and grad_norm/{last} values in {csv_file}")


def train_one(name: str, epochs: int, out: Path, seed: int) -> RunResult:
    """Train, test and summarize one run, logged to W&B (offline) and CSV under ``out``."""
    start = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    model = DeepMLP("sigmoid" if name == "sigmoid" else "relu")
    train_loader, test_loader = digits_loaders(seed)
    monitor = GradNormMonitor()
    shutil.rmtree(out / "csv" / name, ignore_errors=True)  # replace a previous run's CSV
    csv_logger = CSVLogger(save_dir=out, name="csv", version=name)
    wandb_logger = WandbLogger(
        project="lightning-gradguard-demo", name=name, save_dir=str(out), group="digits_monitor"
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=[wandb_logger, csv_logger],
        callbacks=[monitor],
        log_every_n_steps=LOG_EVERY_N_STEPS,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(model, train_loader)
    (metrics,) = trainer.test(model, test_loader, verbose=False)
    wandb_dir = Path(wandb_logger.experiment.dir).parent
    wandb_logger.experiment.finish()  # the next WandbLogger starts a new run

    csv_file = Path(csv_logger.log_dir) / "metrics.csv"
    first, last = "layers.0", f"layers.{DEPTH - 1}"
    step, first_norm, last_norm = first_logged_norms(csv_file, first, last)
    state = monitor.state_dict()["optimizer_0"]
    return RunResult(
        name=name,
        accuracy=float(metrics["test/accuracy"]),
        first_layer_norm=first_norm,
        last_layer_norm=last_norm,
        first_step=step,
        vanishing_layers=[n for n in state["layers"] if n in set(state["warned_vanishing"])],
        csv_file=csv_file,
        wandb_dir=wandb_dir if wandb_dir.exists() else None,
        seconds=time.perf_counter() - start,
    )


def print_summary(results: list[RunResult], out: Path) -> None:
    """The few numbers that tell the story, and where the rest is."""
    print()
    print("=" * 78)
    print(f"Summary: a {DEPTH}-layer MLP on the digits data (chance level: accuracy 0.10)")
    print("=" * 78)
    for r in results:
        if r.vanishing_layers:
            warned = (
                f"yes, vanishing gradients in {len(r.vanishing_layers)} of {DEPTH} layers "
                f"({r.vanishing_layers[0]} ... {r.vanishing_layers[-1]})"
            )
        else:
            warned = "no"
        print(f"\n{r.name} ({r.seconds:.0f} s)")
        print(f"  test accuracy            {r.accuracy:.3f}")
        print(
            f"  gradient norm, step {r.first_step}    first layer {r.first_layer_norm:.1e}, "
            f"last layer {r.last_layer_norm:.1e}, first/last = {r.ratio:.1e}"
        )
        print(f"  GradNormMonitor warned   {warned}")
    print("\nResults")
    for r in results:
        print(f"  {r.name:<13} CSV metrics  {r.csv_file}")
        if r.wandb_dir is not None:
            print(f"  {r.name:<13} W&B run      {r.wandb_dir}")
    wandb_dirs = [str(r.wandb_dir) for r in results if r.wandb_dir is not None]
    if wandb_dirs and os.environ.get("WANDB_MODE") == "offline":
        print("\nUpload the W&B runs (needs `wandb login`):")
        print(f"  wandb sync {' '.join(wandb_dirs)}")
    print(f"\nEverything is under {out}/")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--epochs", type=int, default=10, help="epochs per run (default: 10)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 epoch per run, for a smoke test (overrides --epochs)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/digits_monitor"),
        help="output folder for the W&B and CSV logs (default: outputs/digits_monitor)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be a positive integer, got {args.epochs}")
    return args


def main(argv: list[str] | None = None) -> list[RunResult]:
    args = parse_args(argv)
    epochs = 1 if args.quick else args.epochs
    os.environ.setdefault("WANDB_MODE", "offline")  # respect an explicit choice of the user
    os.environ.setdefault("WANDB_SILENT", "true")
    torch.set_num_threads(1)  # tiny nets run fastest on one thread
    torch.set_flush_denormal(True)  # denormal gradients (~1e-40) make CPU arithmetic crawl
    for logger_name in ("pytorch_lightning", "lightning.pytorch"):  # hide Lightning's banners
        logging.getLogger(logger_name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # Lightning vs. newer torch, harmless
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"Training {len(RUNS)} runs of {epochs} epoch(s) each; logs under {out}/")
    results = []
    for name in RUNS:
        print(f"\n--- run {name!r} ---", flush=True)
        results.append(train_one(name, epochs, out, args.seed))
        print(f"test accuracy {results[-1].accuracy:.3f}", flush=True)
    print_summary(results, out)
    return results


if __name__ == "__main__":
    main()

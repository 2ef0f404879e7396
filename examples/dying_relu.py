"""Dying ReLUs after a learning-rate spike (scenario S3), measured and rescued.

An MLP 64 -> 256 -> 256 -> 256 -> 10 with ReLU and Kaiming init, Adam at 1e-3 for 40
epochs, but epoch 5 (from 0) at 0.1: the spike kills most units of ``act2`` and
``act3``, they get no gradient and stay dead, and the accuracy falls to chance (0.10).
``DeadUnitMonitor`` logs ``dead_units/<layer>`` once per epoch. Over 5 seeds
(``experiments/dying_relu.py``, ``experiments/reinit.py``): ``--fix none`` 0.101;
``--fix swap`` (``rescue="threshold"``: LeakyReLU in a layer more than half dead)
0.736; ``--fix recycle`` (``UnitRecycler``: ReDo, dormant units re-initialized) 0.956.

Usage::

    python examples/dying_relu.py --fix swap
    python examples/dying_relu.py --fix recycle
"""

import argparse
from pathlib import Path

import pytorch_lightning as pl
import torch
from digits import DigitsDataModule
from pytorch_lightning.loggers import CSVLogger
from torch import Tensor, nn

from lightning_gradguard import DeadUnitMonitor, UnitRecycler


class SpikedMLP(pl.LightningModule):
    def __init__(self, spike_epoch: int = 5) -> None:
        super().__init__()
        self.spike_epoch = spike_epoch
        self.fc1, self.act1 = nn.Linear(64, 256), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(256, 256), nn.ReLU()
        self.fc3, self.act3 = nn.Linear(256, 256), nn.ReLU()
        self.head = nn.Linear(256, 10)
        for layer in (self.fc1, self.fc2, self.fc3, self.head):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.fc1(x))
        x = self.act2(self.fc2(x))
        return self.head(self.act3(self.fc3(x)))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test/accuracy", (self(x).argmax(dim=1) == y).float().mean())

    def on_train_epoch_start(self) -> None:  # the spike: one epoch at learning rate 0.1
        for group in self.trainer.optimizers[0].param_groups:
            group["lr"] = 0.1 if self.current_epoch == self.spike_epoch else 1e-3

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Dying ReLUs, measured and rescued")
    parser.add_argument("--fix", choices=("none", "swap", "recycle"), default="swap")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("outputs/dying_relu"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> pl.Trainer:
    args = parse_args(argv)
    torch.set_num_threads(1)  # tiny nets run fastest on one thread
    pl.seed_everything(0)
    rescue = "threshold" if args.fix == "swap" else "never"
    callbacks: list[pl.Callback] = [DeadUnitMonitor(every_n_steps=23, window=23, rescue=rescue)]
    if args.fix == "recycle":
        callbacks.append(UnitRecycler(every_n_steps=128, window=10))
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        logger=CSVLogger(args.out, name=args.fix),
        callbacks=callbacks,
        enable_checkpointing=False,
    )
    model, data = SpikedMLP(), DigitsDataModule()
    trainer.fit(model, datamodule=data)
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    print(f"--fix {args.fix}: test accuracy {metrics['test/accuracy']:.3f}")
    return trainer


if __name__ == "__main__":
    main()

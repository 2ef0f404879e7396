"""Vanishing gradients (scenario S1), seen by ``GradNormMonitor``.

A 25-layer MLP with a sigmoid after every hidden layer and weights drawn from
N(0, 0.05) does not learn the digits: at step 0 the first layer's gradient norm is
about 1e-24 against 0.5 for the last one, the test accuracy stays at chance (0.10)
and the monitor warns about vanishing gradients. ``--fix`` trains the same network
with ReLU and Kaiming (He) init: the norms of all layers have the same order of
magnitude and it learns. The metrics go to a CSV file and to a Weights & Biases run
in offline mode (``wandb sync`` uploads it later).

Usage::

    python examples/vanishing.py          # accuracy 0.10, vanishing gradients
    python examples/vanishing.py --fix    # ReLU + Kaiming init: about 0.9
"""

import argparse
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from digits import DigitsDataModule
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from torch import Tensor, nn

from lightning_gradguard import GradNormMonitor


class DeepMLP(pl.LightningModule):
    """25 Linear layers ``net.0`` ... ``net.48``: sigmoid and N(0, 0.05), or ReLU and He."""

    def __init__(self, fix: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(25):
            linear = nn.Linear(64, 10 if i == 24 else 64)
            if fix:
                nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            else:
                nn.init.normal_(linear.weight, std=0.05)
            nn.init.zeros_(linear.bias)
            layers += [linear, nn.ReLU() if fix else nn.Sigmoid()]
        self.net = nn.Sequential(*layers[:-1])  # no activation after the output layer

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test/accuracy", (self.net(x).argmax(dim=1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Vanishing gradients, seen by GradNormMonitor")
    parser.add_argument("--fix", action="store_true", help="ReLU and Kaiming init")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("outputs/vanishing"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    torch.set_num_threads(1)  # tiny nets run fastest on one thread
    torch.set_flush_denormal(True)  # denormal gradients (~1e-40) make CPU arithmetic crawl
    pl.seed_everything(0)
    name = "relu_kaiming" if args.fix else "sigmoid"
    wandb = WandbLogger(project="lightning-gradguard-examples", name=name, save_dir=args.out)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        logger=[CSVLogger(args.out, name=name), wandb],  # W&B offline: `wandb sync` uploads
        callbacks=[GradNormMonitor()],  # grad_norm/<layer>, and a warning when they vanish
        log_every_n_steps=10,
        enable_checkpointing=False,
    )
    model, data = DeepMLP(args.fix), DigitsDataModule()
    trainer.fit(model, datamodule=data)
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    print(f"{name}: test accuracy {metrics['test/accuracy']:.3f}")


if __name__ == "__main__":
    main()

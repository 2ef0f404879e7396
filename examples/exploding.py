"""Exploding gradients (scenario S2b), kept finite by ``GradGuard``.

An MLP 64 -> 128 (9 hidden ReLU layers) -> 10 with weights drawn from N(0, 0.2),
trained with SGD at learning rate 0.1 and momentum 0.9: the gradient norm is several
hundred at step 0 and, without clipping, the loss is NaN from step 2 or 3. With the
one line ``GradGuard()`` (its default policy, ``GuardClip``, cuts the explosions and
leaves healthy steps alone; non-finite steps are skipped) the same run trains:
0.963 ± 0.005 over 5 seeds after 1000 steps (``experiments/exploding.py`` compares
every clipping policy).

Usage::

    python examples/exploding.py              # GradGuard: trains
    python examples/exploding.py --no-guard   # NaN within a few steps
"""

import argparse
from pathlib import Path

import pytorch_lightning as pl
import torch
from digits import DigitsDataModule
from pytorch_lightning.loggers import CSVLogger
from torch import Tensor, nn

from lightning_gradguard import GradGuard


class ExplodingMLP(pl.LightningModule):
    """Linear + ReLU layers ``net.0`` ... ``net.16`` and the classifier ``net.18``."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(10):
            linear = nn.Linear(64 if i == 0 else 128, 10 if i == 9 else 128)
            nn.init.normal_(linear.weight, std=0.2)
            nn.init.zeros_(linear.bias)
            layers += [linear, nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test/accuracy", (self.net(x).argmax(dim=1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Exploding gradients, kept finite by GradGuard")
    parser.add_argument("--no-guard", action="store_true", help="train without GradGuard")
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("outputs/exploding"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> pl.Trainer:
    args = parse_args(argv)
    torch.set_num_threads(1)  # tiny nets run fastest on one thread
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_steps=args.max_steps,
        logger=CSVLogger(args.out, name="no_guard" if args.no_guard else "gradguard"),
        callbacks=[] if args.no_guard else [GradGuard()],
        log_every_n_steps=1,
        enable_checkpointing=False,
    )
    model, data = ExplodingMLP(), DigitsDataModule()
    trainer.fit(model, datamodule=data)
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    print(f"test accuracy {metrics['test/accuracy']:.3f}")
    return trainer


if __name__ == "__main__":
    main()

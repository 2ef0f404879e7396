"""A poorly initialized deep network (scenario S1, tanh), fixed by ``InitAtStart``.

A 25-layer MLP with tanh after every hidden layer and weights drawn from N(0, 0.05):
the gradient shrinks about 2.3x per layer on its way back (first / last layer norm
about 3e-9 at step 0) and the network does not learn (accuracy 0.10, chance).
``InitAtStart("xavier_uniform")`` re-initializes it before the first step, with the
gain of the tanh that consumes each layer, without touching the model's code: the
norms are of one order of magnitude and it learns (0.889 ± 0.017 over 5 seeds after
30 epochs; ``experiments/reinit.py`` compares the schemes). ``GradNormMonitor`` logs
the per-layer norms and warns while they vanish.

Usage::

    python examples/init_at_start.py            # with InitAtStart
    python examples/init_at_start.py --no-init  # as built: vanishing gradients
"""

import argparse
from pathlib import Path

import pytorch_lightning as pl
import torch
from digits import DigitsDataModule
from pytorch_lightning.loggers import CSVLogger
from torch import Tensor, nn

from lightning_gradguard import GradNormMonitor, InitAtStart


class DeepTanhMLP(pl.LightningModule):
    """25 Linear layers ``net.0`` ... ``net.48`` in one ``nn.Sequential``, tanh between."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(25):
            linear = nn.Linear(64, 10 if i == 24 else 64)
            nn.init.normal_(linear.weight, std=0.05)
            nn.init.zeros_(linear.bias)
            layers += [linear, nn.Tanh()]
        self.net = nn.Sequential(*layers[:-1])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test/accuracy", (self.net(x).argmax(dim=1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Deep tanh MLP, fixed by InitAtStart")
    parser.add_argument("--no-init", action="store_true", help="keep the N(0, 0.05) weights")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("outputs/init_at_start"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> pl.Trainer:
    args = parse_args(argv)
    torch.set_num_threads(1)  # tiny nets run fastest on one thread
    pl.seed_everything(0)
    callbacks: list[pl.Callback] = [GradNormMonitor()]
    if not args.no_init:
        callbacks.insert(0, InitAtStart("xavier_uniform"))  # gains inferred: tanh's 5/3
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        logger=CSVLogger(args.out, name="as_built" if args.no_init else "init_at_start"),
        callbacks=callbacks,
        log_every_n_steps=10,
        enable_checkpointing=False,
    )
    model, data = DeepTanhMLP(), DigitsDataModule()
    trainer.fit(model, datamodule=data)
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    print(f"test accuracy {metrics['test/accuracy']:.3f}")
    return trainer


if __name__ == "__main__":
    main()

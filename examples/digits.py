"""The digits data module every example trains on, and the classifier of the two-process
and LightningCLI examples (``ddp_cpu.py``, ``fsdp2_cpu.py``, ``cli.py``).

scikit-learn's bundled digits (8x8 images, 10 classes; nothing to download), split
80/20 (stratified, ``random_state=0``) and standardized with the training set's
statistics, as in the calibrated scenarios: 1437 training and 360 test images.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard.demo.data import digits


def digits_datasets() -> tuple[TensorDataset, TensorDataset]:
    """Standardized digits: ``(train, test)`` datasets of ``(features, label)``."""
    train, (x_test, y_test) = digits()
    return train, TensorDataset(x_test, y_test)


class DigitsDataModule(pl.LightningDataModule):
    """Training and test loaders over the digits data.

    Under DDP or FSDP, Lightning gives each rank its own part of every epoch
    (it injects a ``DistributedSampler``), so ``batch_size`` is per rank.

    Args:
        batch_size: samples per batch and per rank.
    """

    def __init__(self, batch_size: int = 64) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.train_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def setup(self, stage: str) -> None:
        if self.train_set is None:
            self.train_set, self.test_set = digits_datasets()

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        assert self.train_set is not None
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def test_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        assert self.test_set is not None
        return DataLoader(self.test_set, batch_size=self.batch_size)


class DigitsClassifier(pl.LightningModule):
    """An MLP 64 -> ``hidden`` x ``depth`` -> 10 with ReLU, trained with Adam.

    The hidden layers are ``net.0``, ``net.2``, ... and the output layer is ``head``:
    these are the ``<layer>`` names of the ``grad_norm/<layer>`` metrics.

    Args:
        hidden: width of the hidden layers.
        depth: number of hidden layers.
        lr: Adam's learning rate.
    """

    def __init__(self, hidden: int = 128, depth: int = 3, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = 64
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.net = nn.Sequential(*layers)
        self.head = nn.Linear(width, 10)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.head(self.net(x))
        return logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        accuracy = (self(x).argmax(dim=1) == y).float().mean()
        self.log("test/accuracy", accuracy, sync_dist=True)  # averaged over the ranks

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

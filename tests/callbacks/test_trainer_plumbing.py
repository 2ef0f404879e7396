"""The Lightning plumbing (``callbacks/_trainer.py``) against real Trainers and strategies.

Both ``pytorch_lightning`` and ``lightning.pytorch``: strategy kinds by isinstance
(a class whose name merely contains "DDP" is not DDP), the optimizer of a
parameter and its index in a real two-optimizer fit (``LightningOptimizer``
wrappers included), the Trainer's logging interval, and overrides read with
Lightning's ``is_overridden``.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import classification_data
from torch import nn
from torch.utils.data import DataLoader

from lightning_gradguard.callbacks._trainer import (
    is_deepspeed,
    log_interval,
    optimizer_index,
    optimizer_of,
    optimizer_parameters,
    overrides,
    strategy_kind,
)

PACKAGES = ["pytorch_lightning", "lightning.pytorch"]


def _trainer(package: Any, **kwargs: Any) -> Any:
    return package.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.mark.parametrize("name", PACKAGES)
def test_strategy_kind_is_decided_by_isinstance_in_both_packages(name: str) -> None:
    package = importlib.import_module(name)
    strategies = package.strategies
    assert strategy_kind(_trainer(package, devices=1)) == "single"
    assert strategy_kind(_trainer(package, devices=2, strategy="ddp")) == "ddp"
    assert strategy_kind(_trainer(package, devices=2, strategy="ddp_spawn")) == "ddp"
    parallel = _trainer(package, devices=2, strategy=strategies.ModelParallelStrategy())
    assert strategy_kind(parallel) == "model_parallel"

    class CustomDDP(strategies.DDPStrategy):  # a subclass is its base's kind
        pass

    assert strategy_kind(_trainer(package, devices=2, strategy=CustomDDP())) == "ddp"

    class DDPLookalike(strategies.SingleDeviceStrategy):  # the old name test said "DDP"
        pass

    lookalike = _trainer(package, devices=1, strategy=DDPLookalike(device=torch.device("cpu")))
    assert strategy_kind(lookalike) == "single" and not is_deepspeed(lookalike)
    # FSDPStrategy needs a GPU Trainer and DeepSpeedStrategy the deepspeed package; their
    # kinds come from the classes themselves.
    fsdp = SimpleNamespace(strategy=strategies.FSDPStrategy())
    assert strategy_kind(fsdp) == "fsdp"
    deepspeed = SimpleNamespace(strategy=object.__new__(strategies.DeepSpeedStrategy))
    assert strategy_kind(deepspeed) == "deepspeed" and is_deepspeed(deepspeed)  # not "ddp"
    assert strategy_kind(SimpleNamespace(strategy=object())) == "other"


def _two_optimizer_module(package: Any) -> Any:
    class TwoOptimizers(package.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
            self.seen: list[tuple[int, int]] = []

        def training_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            first, second = self.optimizers()  # LightningOptimizer wrappers
            loss = nn.functional.cross_entropy(self.net(x), y)
            self.manual_backward(loss)
            first.step()
            second.step()
            first.zero_grad()
            second.zero_grad()
            self.seen.append(
                (optimizer_index(self.trainer, first), optimizer_index(self.trainer, second))
            )

        def configure_optimizers(self) -> Any:
            return (
                torch.optim.SGD(self.net[0].parameters(), lr=0.1),
                torch.optim.Adam(self.net[2].parameters(), lr=0.01),
            )

        def train_dataloader(self) -> DataLoader:
            return DataLoader(classification_data(n=64), batch_size=32)

    return TwoOptimizers()


@pytest.mark.parametrize("name", PACKAGES)
def test_optimizer_lookup_and_log_interval_in_a_real_fit(name: str) -> None:
    package = importlib.import_module(name)
    module = _two_optimizer_module(package)
    trainer = _trainer(package, max_steps=4, log_every_n_steps=7)  # 2 batches: 2 steps each
    trainer.fit(module)
    first, second = trainer.optimizers
    assert module.seen == [(0, 1), (0, 1)]
    assert optimizer_index(trainer, second) == 1 and optimizer_index(trainer, first) == 0
    assert optimizer_index(trainer, torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1)) == 0
    assert optimizer_of(trainer, module.net[2].weight) is second
    assert optimizer_of(trainer, module.net[0].bias) is first
    assert optimizer_of(trainer, nn.Parameter(torch.ones(1))) is None
    assert optimizer_parameters(second) == [module.net[2].weight, module.net[2].bias]
    assert log_interval(trainer, None) == 7 and log_interval(trainer, 3) == 3


@pytest.mark.parametrize("name", PACKAGES)
def test_overrides_asks_lightnings_is_overridden_of_the_modules_package(name: str) -> None:
    package = importlib.import_module(name)

    class Clips(package.LightningModule):
        def configure_gradient_clipping(self, *args: Any, **kwargs: Any) -> None:
            pass

    class Inherits(Clips):
        pass

    assert overrides(Clips(), "configure_gradient_clipping")
    assert overrides(Inherits(), "configure_gradient_clipping")
    assert not overrides(package.LightningModule(), "configure_gradient_clipping")
    assert not overrides(Clips(), "on_before_optimizer_step")
    assert not overrides(nn.Linear(2, 2), "configure_gradient_clipping")  # type: ignore[arg-type]

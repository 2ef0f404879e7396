"""The classic gradient pathologies, each a small network that reliably fails on the digits data.

- ``vanishing``: 25 Linear layers with sigmoid, weights N(0, 0.05), Adam 1e-3.
  The gradient shrinks about 10x per layer on its way back; the network never
  learns. Nothing a callback does saves a 25-deep sigmoid stack (Glorot init
  does not either); GradGuard names the layers and the remedies, and the
  remedy it recommends (ReLU with He init) is trained as a third run.
- ``exploding``: 9 hidden ReLU layers of 128, weights N(0, 0.2), SGD lr 0.1 with
  momentum 0.9. The initial loss is about 288, the gradients turn non-finite
  within 3 steps.
- ``dying_relu``: 3 hidden ReLU layers of 256, He init, Adam 1e-3, with one epoch
  at lr 0.1 (epoch 5). Most units of the upper layers die and stay dead.
- ``loss_spike``: 2 hidden ReLU layers of 256, He init, Adam 1e-3, with a burst of
  the learning rate (x3 up to x100, 12 steps) at step 300: the loss spikes and the
  run never gets back to where it was. ``SpikeRecovery`` rolls back to the last
  good state and goes on.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

__all__ = [
    "LOSS_SPIKE_BURST",
    "RECOVERY_ARGS",
    "SCENARIOS",
    "Run",
    "Scenario",
    "ScenarioClassifier",
    "mlp",
]


def mlp(
    sizes: list[int], activation: Callable[[], nn.Module], init: Callable[[Tensor], Any]
) -> nn.Sequential:
    """Linear layers of ``sizes`` with ``activation`` between them; weights from ``init``, bias 0.

    Example:
        >>> net = mlp([64, 32, 10], nn.ReLU, nn.init.kaiming_normal_)
        >>> [type(m).__name__ for m in net]
        ['Linear', 'ReLU', 'Linear']
    """
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        linear = nn.Linear(fan_in, fan_out)
        init(linear.weight)
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if index < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def _normal(std: float) -> Callable[[Tensor], Any]:
    return lambda weight: nn.init.normal_(weight, 0.0, std)


def _he(weight: Tensor) -> Any:
    return nn.init.kaiming_normal_(weight, nonlinearity="relu")


class ScenarioClassifier(pl.LightningModule):
    """A classifier around ``net``; the optimizer and an optional one-epoch learning-rate spike.

    Args:
        net: the network (64 inputs, 10 logits).
        optimizer: ``"adam"`` or ``"sgd"`` (momentum 0.9).
        lr: learning rate.
        spike_epoch: an epoch trained at ``spike_lr`` instead (``None``: none).
        spike_lr: the learning rate of that epoch.
        burst: learning-rate factors applied from step ``burst_start`` on, one per step.
        burst_start: the optimizer step the burst begins at.
    """

    def __init__(
        self,
        net: nn.Sequential,
        optimizer: str,
        lr: float,
        spike_epoch: int | None = None,
        spike_lr: float = 0.1,
        burst: tuple[float, ...] = (),
        burst_start: int = 0,
    ) -> None:
        super().__init__()
        self.net = net
        self.optimizer_name = optimizer
        self.lr = lr
        self.spike_epoch = spike_epoch
        self.spike_lr = spike_lr
        self.burst = burst
        self.burst_start = burst_start
        self.losses: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.net(x)
        return logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.losses.append(loss.detach())  # read once, after training
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def on_train_epoch_start(self) -> None:
        if self.spike_epoch is None:
            return
        lr = self.spike_lr if self.current_epoch == self.spike_epoch else self.lr
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not self.burst:
            return
        offset = self.trainer.global_step - self.burst_start
        factor = self.burst[offset] if 0 <= offset < len(self.burst) else 1.0
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = self.lr * factor

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return torch.optim.Adam(self.parameters(), lr=self.lr)


@dataclass(frozen=True)
class Run:
    """One run of a scenario: a label, the model, whether GradGuard is attached (and how)."""

    label: str
    make_model: Callable[[], ScenarioClassifier]
    guarded: bool
    guard_args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Scenario:
    """A pathology: its runs, their length and what to look at."""

    name: str
    title: str
    epochs: int
    runs: tuple[Run, ...]
    explanation: str
    max_steps: int = -1


def _vanishing(activation: str) -> ScenarioClassifier:
    if activation == "sigmoid":
        net = mlp([64] + [64] * 24 + [10], nn.Sigmoid, _normal(0.05))
    else:
        net = mlp([64] + [64] * 24 + [10], nn.ReLU, _he)
    return ScenarioClassifier(net, "adam", 1e-3)


def _exploding() -> ScenarioClassifier:
    return ScenarioClassifier(mlp([64] + [128] * 9 + [10], nn.ReLU, _normal(0.2)), "sgd", 0.1)


def _dying() -> ScenarioClassifier:
    net = mlp([64, 256, 256, 256, 10], nn.ReLU, _he)
    return ScenarioClassifier(net, "adam", 1e-3, spike_epoch=5, spike_lr=0.1)


LOSS_SPIKE_BURST = (3.0, 10.0, 30.0) + (100.0,) * 9
"""The learning-rate factors of the loss-spike scenario, one per step from step 300."""


def _loss_spike() -> ScenarioClassifier:
    net = mlp([64, 256, 256, 10], nn.ReLU, _he)
    return ScenarioClassifier(net, "adam", 1e-3, burst=LOSS_SPIKE_BURST, burst_start=300)


RECOVERY_ARGS: dict[str, Any] = {
    "spike_recovery": True,
    # Snapshots every 25 steps, at least 10 steps old; each of the 12 burst steps may
    # spike again after a rollback (the step counter, and the burst, go on).
    "spike_recovery_args": {"every_n_steps": 25, "min_age": 10, "max_rollbacks_in_window": 12},
}


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        name="vanishing",
        title="Vanishing gradients: 25-layer sigmoid MLP",
        epochs=30,
        runs=(
            Run("without GradGuard", lambda: _vanishing("sigmoid"), guarded=False),
            Run("with GradGuard", lambda: _vanishing("sigmoid"), guarded=True),
            Run("recommended fix: ReLU + He init", lambda: _vanishing("relu"), guarded=True),
        ),
        explanation=(
            "The gradient shrinks ~10x per sigmoid layer: the first layer's norm is ~1e-24 of "
            "the last one's. No clipping or re-initialization saves a 25-deep sigmoid stack; "
            "GradGuard names the vanishing layers and the remedies (ReLU + He init, skip "
            "connections, BatchNorm), and the first remedy trains."
        ),
    ),
    Scenario(
        name="exploding",
        title="Exploding gradients: 10-layer ReLU MLP, weights N(0, 0.2), SGD lr 0.1",
        epochs=1000,
        max_steps=1000,
        runs=(
            Run("without GradGuard", _exploding, guarded=False),
            Run("with GradGuard", _exploding, guarded=True),
        ),
        explanation=(
            "The first gradient norm is ~600 and the weights turn inf/NaN within a few steps. "
            "GradGuard's default GuardClip clips a gradient larger than the weights to "
            "max(0.01 x weight norm, 1.0) from the first step, and later every spike above twice "
            "the median of the recent norms to that median; a non-finite step would be skipped."
        ),
    ),
    Scenario(
        name="dying_relu",
        title="Dying ReLUs: 3x256 ReLU MLP with one epoch at lr 0.1",
        epochs=40,
        runs=(
            Run("without GradGuard", _dying, guarded=False),
            Run("with GradGuard", _dying, guarded=True),
        ),
        explanation=(
            "The learning-rate spike of epoch 5 pushes most units of the upper layers below "
            "zero for every input: they never fire again. GradGuard's clipping cuts the spike's "
            "gradients to the median of the norms before it (seed 0: 0.95, no layer half dead), "
            "and it swaps the ReLU of a layer more than half dead for LeakyReLU (the swap alone: "
            "0.74-0.76)."
        ),
    ),
    Scenario(
        name="loss_spike",
        title="Loss spike: 2x256 ReLU MLP, learning rate x100 for 12 steps at step 300",
        epochs=31,
        max_steps=700,
        runs=(
            Run("without GradGuard", _loss_spike, guarded=False),
            Run("with GradGuard, no SpikeRecovery", _loss_spike, guarded=True),
            Run(
                "with GradGuard + SpikeRecovery",
                _loss_spike,
                guarded=True,
                guard_args=RECOVERY_ARGS,
            ),
        ),
        explanation=(
            "A burst of the learning rate (a bad stretch of data does the same) throws the "
            "weights far off in a few Adam steps; unguarded, the loss jumps and the run never "
            "comes back to where it was. GradGuard's clipping cuts the spiking gradients, which "
            "limits the damage, but Adam's steps stay as large as the learning rate allows; "
            "SpikeRecovery undoes what got through: it rolls back to its last snapshot at each "
            "spiking step (the batches since are skipped) and the run ends like a clean one."
        ),
    ),
)
"""The demo's scenarios, in the order they run."""

"""Vanishing / exploding / non-finite gradient detection, as device-tensor state.

:class:`GradientHealth` is updated on every step with device operations only
(no host sync). Its flags are read on logging steps, in the same transfer as
the metrics, and turned into warnings there.

Example:
    >>> import torch
    >>> from lightning_gradguard.functional import GroupedNorms
    >>> health = GradientHealth(num_groups=2, vanishing_threshold=1e-6, patience=3)
    >>> for _ in range(3):
    ...     health.update(GroupedNorms(torch.tensor([1e-9, 0.5]), torch.tensor(0.5), 2.0))
    >>> health.vanishing.tolist()
    [True, False]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_gradguard.functional.norms import GroupedNorms

__all__ = [
    "GradientHealth",
]

_STATE = (
    "steps",
    "level",
    "vanish_streak",
    "vanishing",
    "explode_streak",
    "explosions",
    "nonfinite_steps",
    "first_nonfinite",
)


class GradientHealth:
    """Running health statistics of per-group gradient norms.

    Args:
        num_groups: number of groups (layers) in the norms passed to :meth:`update`.
        vanishing_threshold: a group whose norm stays below this for ``patience``
            consecutive steps is flagged as vanishing.
        explosion_factor: the global norm is "exploding" on a step when it exceeds
            this factor times its running level (an EMA of past global norms).
        patience: consecutive steps a condition must hold before it is flagged.
        warmup_steps: steps before explosion checks start (the level settles first).
        ema_decay: decay of the running level; the level is updated with the norm
            capped at ``explosion_factor × level`` so a spike cannot drag it up.
        device: device of the state tensors.
    """

    def __init__(
        self,
        num_groups: int,
        vanishing_threshold: float = 1e-7,
        explosion_factor: float = 10.0,
        patience: int = 10,
        warmup_steps: int = 20,
        ema_decay: float = 0.98,
        device: torch.device | str = "cpu",
    ) -> None:
        self.num_groups = num_groups
        self.vanishing_threshold = vanishing_threshold
        self.explosion_factor = explosion_factor
        self.patience = patience
        self.warmup_steps = warmup_steps
        self.ema_decay = ema_decay
        self.reset(device)

    def reset(self, device: torch.device | str = "cpu") -> None:
        """Clear all statistics (state tensors on ``device``)."""
        g = self.num_groups
        self.steps = torch.zeros((), dtype=torch.long, device=device)
        self.level = torch.zeros((), dtype=torch.float64, device=device)
        self.vanish_streak = torch.zeros(g, dtype=torch.long, device=device)
        self.vanishing = torch.zeros(g, dtype=torch.bool, device=device)
        self.explode_streak = torch.zeros((), dtype=torch.long, device=device)
        self.explosions = torch.zeros((), dtype=torch.long, device=device)
        self.nonfinite_steps = torch.zeros((), dtype=torch.long, device=device)
        self.first_nonfinite = torch.zeros(g, dtype=torch.bool, device=device)

    @torch.no_grad()
    def update(self, norms: GroupedNorms) -> None:
        """Account for one step's norms. Device operations only."""
        groups, total = norms.groups.to(torch.float64), norms.total.to(torch.float64)
        finite_groups = torch.isfinite(groups)
        total_finite = torch.isfinite(total)
        step_nonfinite = ~finite_groups.all()

        # Non-finite: count steps, remember the layers of the first such step.
        seen_before = self.nonfinite_steps > 0
        self.first_nonfinite = torch.where(seen_before, self.first_nonfinite, ~finite_groups)
        self.nonfinite_steps += step_nonfinite.long()

        # Vanishing: a finite norm below the threshold for `patience` steps in a row. A
        # group with no gradient at all (frozen, still in the optimizer) was not measured.
        small = finite_groups & (groups < self.vanishing_threshold)
        if norms.measured is not None:
            small = small & norms.measured.to(small.device)
        self.vanish_streak = (self.vanish_streak + 1) * small
        self.vanishing |= self.vanish_streak >= self.patience

        # Exploding: the global norm far above its running level, `patience` steps in a row.
        cap = self.explosion_factor * self.level
        high = (self.steps >= self.warmup_steps) & ~(total <= cap)
        self.explode_streak = (self.explode_streak + 1) * high
        self.explosions += (self.explode_streak == self.patience).long()
        capped = torch.minimum(total, cap)
        ema = self.ema_decay * self.level + (1.0 - self.ema_decay) * capped
        new_level = torch.where(self.steps == 0, total, ema)
        self.level = torch.where(total_finite, new_level, self.level)
        self.steps += total_finite.long()

    def flags(self) -> dict[str, Tensor]:
        """The device tensors a logging step reads (with the metrics, in one transfer)."""
        return {
            "vanishing": self.vanishing,
            "explosions": self.explosions,
            "level": self.level,
            "nonfinite_steps": self.nonfinite_steps,
            "first_nonfinite": self.first_nonfinite,
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain state: CPU tensors only (loads with ``torch.load(weights_only=True)``)."""
        return {name: getattr(self, name).detach().cpu().clone() for name in _STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (on the current state's device)."""
        device = self.steps.device
        for name in _STATE:
            if name in state:
                value = torch.as_tensor(state[name]).to(device)
                if value.shape != getattr(self, name).shape:
                    raise ValueError(
                        f"GradientHealth state {name!r} has shape {tuple(value.shape)}, expected "
                        f"{tuple(getattr(self, name).shape)}: the checkpoint was written for a "
                        "model with a different set of layers."
                    )
                setattr(self, name, value.to(getattr(self, name).dtype))

    def to(self, device: torch.device | str) -> GradientHealth:
        """Move the state tensors to ``device``."""
        for name in _STATE:
            setattr(self, name, getattr(self, name).to(device))
        return self

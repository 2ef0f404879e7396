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
    >>> deferred = GradientHealth(num_groups=2, vanishing_threshold=1e-6, patience=3)
    >>> norms = GroupedNorms(torch.tensor([1e-9, 0.5]), torch.tensor(0.5), 2.0)
    >>> for _ in range(3):
    ...     deferred.update(norms, defer=True)
    >>> deferred.vanishing.tolist()  # reading a statistic works out the buffered steps
    [True, False]
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_gradguard._checks import check_int
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


def _statistic(name: str) -> property:
    def read(self: Any) -> Tensor:
        self._settle()
        return self._state[name]

    def write(self: Any, value: Tensor) -> None:
        self._settle()
        self._state[name] = value

    return property(read, write, doc=f"``{name}`` (deferred steps are worked out first).")


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
        buffer_steps: how many deferred steps (``update(..., defer=True)``) are kept
            before they are worked out anyway.

    The statistics (``steps``, ``level``, ``vanish_streak``, ``vanishing``,
    ``explode_streak``, ``explosions``, ``nonfinite_steps``, ``first_nonfinite``) are
    device tensors; reading one first works out the deferred steps.
    """

    steps = _statistic("steps")
    level = _statistic("level")
    vanish_streak = _statistic("vanish_streak")
    vanishing = _statistic("vanishing")
    explode_streak = _statistic("explode_streak")
    explosions = _statistic("explosions")
    nonfinite_steps = _statistic("nonfinite_steps")
    first_nonfinite = _statistic("first_nonfinite")

    def __init__(
        self,
        num_groups: int,
        vanishing_threshold: float = 1e-7,
        explosion_factor: float = 10.0,
        patience: int = 10,
        warmup_steps: int = 20,
        ema_decay: float = 0.98,
        device: torch.device | str = "cpu",
        buffer_steps: int = 64,
    ) -> None:
        self.num_groups = num_groups
        self.vanishing_threshold = vanishing_threshold
        self.explosion_factor = explosion_factor
        self.patience = patience
        self.warmup_steps = warmup_steps
        self.ema_decay = ema_decay
        check_int(buffer_steps, "buffer_steps", "GradientHealth", low=1)
        self.buffer_steps = buffer_steps
        self.reset(device)

    def reset(self, device: torch.device | str = "cpu") -> None:
        """Clear all statistics (state tensors on ``device``) and the deferred steps."""
        g = self.num_groups
        self._state: dict[str, Tensor] = {
            "steps": torch.zeros((), dtype=torch.long, device=device),
            "level": torch.zeros((), dtype=torch.float64, device=device),
            "vanish_streak": torch.zeros(g, dtype=torch.long, device=device),
            "vanishing": torch.zeros(g, dtype=torch.bool, device=device),
            "explode_streak": torch.zeros((), dtype=torch.long, device=device),
            "explosions": torch.zeros((), dtype=torch.long, device=device),
            "nonfinite_steps": torch.zeros((), dtype=torch.long, device=device),
            "first_nonfinite": torch.zeros(g, dtype=torch.bool, device=device),
        }
        self._clear_buffer()

    def _clear_buffer(self) -> None:
        self._rows: Tensor | None = None  # (buffer_steps, num_groups + 1): groups, then total
        self._measured: Tensor | None = None  # (buffer_steps, num_groups) bool, when needed
        self._pending = 0

    @torch.no_grad()
    def update(self, norms: GroupedNorms, defer: bool = False) -> None:
        """Account for one step's norms. Device operations only.

        Args:
            norms: the step's per-group and total norms.
            defer: only store the norms (one copy into a device buffer); their
                statistics are worked out when one is read, at the next update
                without ``defer``, or when ``buffer_steps`` steps are waiting.
        """
        if not defer and not self._pending:
            self._step(norms.groups, norms.total, norms.measured)
            return
        self._record(norms)
        if not defer or self._pending == self.buffer_steps:
            self._settle()

    def _record(self, norms: GroupedNorms) -> None:
        g, row = self.num_groups, self._pending
        device = self._state["steps"].device
        if self._rows is None:
            self._rows = torch.empty(self.buffer_steps, g + 1, dtype=torch.float64, device=device)
        torch.cat((norms.groups.reshape(g), norms.total.reshape(1)), out=self._rows[row])
        if norms.measured is not None or self._measured is not None:
            if self._measured is None:
                self._measured = torch.ones(self.buffer_steps, g, dtype=torch.bool, device=device)
            measured = self._measured[row]
            if norms.measured is None:
                measured.fill_(True)
            else:
                measured.copy_(norms.measured)
        self._pending += 1

    def _settle(self) -> None:
        """Work out the statistics of the deferred steps."""
        n = self._pending
        if not n:
            return
        assert self._rows is not None
        rows = self._rows[:n]
        measured = None if self._measured is None else self._measured[:n]
        self._pending = 0  # before _apply: its state reads must not settle again
        if n == 1:
            self._step(
                rows[0, : self.num_groups], rows[0, -1], None if measured is None else measured[0]
            )
        else:
            self._apply(rows[:, : self.num_groups], rows[:, self.num_groups], measured)

    def _step(self, groups: Tensor, total: Tensor, measured: Tensor | None) -> None:
        """One step's statistics: fewer operations than :meth:`_apply` for one step."""
        state = self._state
        groups, total = groups.to(torch.float64), total.to(torch.float64)
        finite_groups = torch.isfinite(groups)
        total_finite = torch.isfinite(total)

        # Non-finite: count steps, remember the layers of the first such step.
        nonfinite = ~finite_groups
        seen_before = state["nonfinite_steps"] > 0
        state["first_nonfinite"] = torch.where(seen_before, state["first_nonfinite"], nonfinite)
        state["nonfinite_steps"] = state["nonfinite_steps"] + nonfinite.any()  # bool adds as 0/1

        # Vanishing: a finite norm below the threshold for `patience` steps in a row (NaN
        # and inf compare False: no isfinite mask needed).
        small = groups < self.vanishing_threshold
        if measured is not None:
            small = small & measured.to(small.device)
        streak = (state["vanish_streak"] + 1) * small
        state["vanish_streak"] = streak
        state["vanishing"] = state["vanishing"] | (streak >= self.patience)

        # Exploding: the global norm far above its running level, `patience` steps in a row.
        level, steps = state["level"], state["steps"]
        cap = self.explosion_factor * level
        high = (steps >= self.warmup_steps) & ~(total <= cap)
        explode = (state["explode_streak"] + 1) * high
        state["explode_streak"] = explode
        state["explosions"] = state["explosions"] + (explode == self.patience)
        capped = torch.minimum(total, cap)
        ema = torch.lerp(level, capped, 1.0 - self.ema_decay)  # one op for decay·a + (1-decay)·b
        new_level = torch.where(steps == 0, total, ema)
        state["level"] = torch.where(total_finite, new_level, level)
        state["steps"] = steps + total_finite

    def _apply(self, groups: Tensor, totals: Tensor, measured: Tensor | None) -> None:
        """The statistics after ``n`` steps: ``groups`` is (n, num_groups), ``totals`` (n,)."""
        state = self._state
        groups, totals = groups.to(torch.float64), totals.to(torch.float64)
        n = totals.shape[0]
        steps = torch.arange(n, device=totals.device)

        # Non-finite: count steps, remember the layers of the first such step.
        finite = torch.isfinite(groups)
        bad_steps = ~finite.all(1)
        first_bad = bad_steps.to(torch.uint8).argmax().view(1)  # 0 when there is none
        keep = (state["nonfinite_steps"] > 0) | ~bad_steps.index_select(0, first_bad)[0]
        at_first_bad = ~finite.index_select(0, first_bad)[0]  # a tensor index would sync
        state["first_nonfinite"] = torch.where(keep, state["first_nonfinite"], at_first_bad)
        state["nonfinite_steps"] = state["nonfinite_steps"] + bad_steps.sum()

        # Vanishing: a finite norm below the threshold for `patience` steps in a row. A
        # group with no gradient at all (frozen, still in the optimizer) was not measured.
        small = finite & (groups < self.vanishing_threshold)
        if measured is not None:
            small &= measured.to(small.device)
        streak = _streaks(small, state["vanish_streak"], steps[:, None])
        state["vanishing"] = state["vanishing"] | (streak >= self.patience).any(0)
        state["vanish_streak"] = streak[-1]

        # Exploding: the global norm far above its running level, `patience` steps in a
        # row. The level is a recurrence (an EMA of norms capped by the level itself):
        # one step at a time, four operations each; everything else at once.
        total_finite = torch.isfinite(totals)
        counted = total_finite.long()
        seen = state["steps"] + counted.cumsum(0) - counted  # finite steps before each step
        first = seen == 0
        starts = first & total_finite
        # Where the level starts (first finite norm), the cap is lifted and the level is
        # the norm; a non-finite norm leaves the level alone (weight 0).
        zeros = torch.zeros_like(totals)  # float64: where() of two Python floats is float32
        lift = torch.where(starts, math.inf, zeros)
        weight = torch.where(total_finite, 1.0 - self.ema_decay, zeros).masked_fill_(starts, 1.0)
        safe = torch.where(total_finite, totals, math.inf)
        level = state["level"]
        below: list[Tensor] = []
        for total, safe_total, lift_i, weight_i in zip(
            totals.unbind(), safe.unbind(), lift.unbind(), weight.unbind()
        ):
            cap = torch.add(lift_i, level, alpha=self.explosion_factor)
            below.append(total <= cap)
            level = torch.lerp(level, torch.minimum(safe_total, cap), weight_i)
        # Before the level starts it is 0, and so is the cap.
        within = torch.where(first, totals <= 0.0, torch.stack(below))
        high = (seen >= self.warmup_steps) & ~within
        explode = _streaks(high, state["explode_streak"], steps)
        state["explosions"] = state["explosions"] + (explode == self.patience).sum()
        state["explode_streak"] = explode[-1]
        state["level"] = level
        state["steps"] = state["steps"] + counted.sum()

    def flags(self) -> dict[str, Tensor]:
        """The device tensors a logging step reads (with the metrics, in one transfer)."""
        self._settle()
        state = self._state
        return {
            "vanishing": state["vanishing"],
            "explosions": state["explosions"],
            "level": state["level"],
            "nonfinite_steps": state["nonfinite_steps"],
            "first_nonfinite": state["first_nonfinite"],
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain state: CPU tensors only (loads with ``torch.load(weights_only=True)``)."""
        self._settle()
        return {name: self._state[name].detach().cpu().clone() for name in _STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (on the current state's device).

        Deferred steps not yet worked out are dropped: the loaded state replaces them.
        """
        device = self._state["steps"].device
        current = self._state
        for name in _STATE:
            if name in state:
                value = torch.as_tensor(state[name]).to(device)
                if value.shape != current[name].shape:
                    raise ValueError(
                        f"GradientHealth state {name!r} has shape {tuple(value.shape)}, expected "
                        f"{tuple(current[name].shape)}: the checkpoint was written for a "
                        "model with a different set of layers."
                    )
                current[name] = value.to(current[name].dtype)
        self._clear_buffer()

    def to(self, device: torch.device | str) -> GradientHealth:
        """Move the state tensors to ``device``."""
        self._settle()
        for name in _STATE:
            self._state[name] = self._state[name].to(device)
        self._clear_buffer()
        return self


def _streaks(condition: Tensor, before: Tensor, steps: Tensor) -> Tensor:
    """Consecutive-step counts of ``condition`` (n, ...) at every step, continuing ``before``.

    The same as ``streak = (streak + 1) * condition`` one step at a time.
    """
    last_false = torch.where(condition, -1, steps).cummax(0).values
    return torch.where(last_false >= 0, steps - last_false, before + steps + 1)

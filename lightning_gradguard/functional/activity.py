"""Dead and dormant unit statistics from forward hooks on activation modules.

A unit (a neuron of a Linear layer's output, a channel of a conv output) is
*dead* over a window of batches when its activation was never positive: a ReLU
that only ever sees negative inputs has zero gradient and never recovers. The
ReDo *dormancy score* (Sokar et al., 2023) of unit ``i`` is its mean
``|h_i|`` divided by the layer's average of those means; a unit is dormant
when its score is at most ``tau`` (``tau = 0`` means dead).

:class:`ActivityTracker` attaches hooks only while a window is being measured
(``attach``/``detach``), accumulates per-unit counts on the device, and
:meth:`ActivityTracker.reduce` sums them across ranks with a single
``all_reduce`` for all layers, so every rank decides from the same numbers. (A
torchmetrics ``Metric`` per layer would do the same reduction with one gather
per state and layer; one flat buffer needs one collective.)

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    >>> with torch.no_grad():
    ...     _ = model[0].weight.fill_(0.0), model[0].bias.copy_(torch.tensor([1.0, -1.0, 0.0]))
    >>> tracker = ActivityTracker.for_module(model)
    >>> tracker.attach()
    >>> _ = model(torch.randn(8, 4))
    >>> tracker.detach()
    >>> stats = tracker.stats()["1"]
    >>> stats.dead.tolist(), round(stats.dead_fraction, 3)
    ([False, True, True], 0.667)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

DEFAULT_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
)
"""Activation modules tracked by default: ReLU and its relatives."""


def unit_dim(output: Tensor, layout: str = "auto") -> int:
    """The dimension of ``output`` that indexes units.

    ``"auto"``: dimension 1 for ``(N, C)`` and for conv outputs ``(N, C, H, W)`` /
    ``(N, C, D, H, W)``; the last dimension for ``(N, L, C)`` sequences.
    ``"channels_first"`` forces 1, ``"channels_last"`` forces -1.

    Example:
        >>> unit_dim(torch.zeros(8, 16, 5, 5)), unit_dim(torch.zeros(8, 10, 32))
        (1, 2)
    """
    if layout == "channels_first" or output.dim() <= 2:
        return 1 if output.dim() > 1 else 0
    if layout == "channels_last" or output.dim() == 3:
        return output.dim() - 1
    return 1


@dataclass(frozen=True)
class UnitStats:
    """Per-unit statistics of one layer over a window (host values).

    Attributes:
        dead: per unit, never positive in the window.
        scores: per unit, the ReDo dormancy score (mean |h| over the layer's average).
        samples: positions seen per unit (batch × spatial positions).
    """

    dead: Tensor
    scores: Tensor
    samples: int

    @property
    def dead_fraction(self) -> float:
        """Fraction of units that were never active."""
        return float(self.dead.double().mean()) if self.dead.numel() else 0.0

    def dormant(self, tau: float) -> Tensor:
        """Units whose dormancy score is at most ``tau`` (``tau=0``: dead or silent)."""
        return self.scores <= tau

    def dormant_fraction(self, tau: float) -> float:
        """Fraction of units that are dormant at threshold ``tau``."""
        return float(self.dormant(tau).double().mean()) if self.scores.numel() else 0.0


class _LayerAccumulator:
    def __init__(self, layout: str) -> None:
        self.layout = layout
        self.active: Tensor | None = None  # positions with h > 0, per unit (float64)
        self.abs_sum: Tensor | None = None  # sum of |h| per unit (float64)
        self.samples = 0  # positions seen, a host integer (shapes are known on the host)

    @torch.no_grad()
    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not module.training or not isinstance(output, Tensor) or output.dim() == 0:
            return  # validation, test and predict passes (eval mode) are not training activity
        dim = unit_dim(output, self.layout)
        h = output.detach()
        moved = h.movedim(dim, -1).reshape(-1, h.shape[dim])
        active = (moved > 0).sum(0, dtype=torch.float64)
        abs_sum = moved.abs().sum(0, dtype=torch.float64)
        if self.active is not None and self.active.shape != active.shape:
            raise ValueError(
                f"{type(module).__name__} produced {active.numel()} units after "
                f"{self.active.numel()} in the same window: one activation module is shared by "
                "layers of different widths. Give each layer its own activation module so its "
                "units can be measured."
            )
        if self.active is None or self.abs_sum is None:
            self.active, self.abs_sum, self.samples = active, abs_sum, moved.shape[0]
        else:
            self.active += active
            self.abs_sum += abs_sum
            self.samples += moved.shape[0]

    def reset(self) -> None:
        self.active = self.abs_sum = None
        self.samples = 0


class ActivityTracker:
    """Accumulate per-unit activity of named activation modules over a window.

    Args:
        modules: ``(name, module)`` pairs to hook; their outputs are measured.
        layout: unit layout, see :func:`unit_dim`.
        device: where statistics live when this rank recorded nothing in a window.
    """

    def __init__(
        self,
        modules: Iterable[tuple[str, nn.Module]],
        layout: str = "auto",
        device: torch.device | str = "cpu",
    ) -> None:
        if layout not in ("auto", "channels_first", "channels_last"):
            raise ValueError(
                f"layout={layout!r} is not a unit layout: use 'auto', 'channels_first' "
                "or 'channels_last'."
            )
        self.modules = dict(modules)
        self.layout = layout
        self.device = torch.device(device)  # for the reduction when this rank saw nothing
        self._accumulators = {name: _LayerAccumulator(layout) for name in self.modules}
        self._handles: list[Any] = []

    @classmethod
    def for_module(
        cls,
        model: nn.Module,
        select: Callable[[str, nn.Module], bool]
        | tuple[type[nn.Module], ...] = DEFAULT_ACTIVATIONS,
        layout: str = "auto",
    ) -> ActivityTracker:
        """Track every activation module of ``model`` (by type, or by a predicate)."""
        if isinstance(select, tuple):
            types = select
            named = [(n, m) for n, m in model.named_modules() if n and isinstance(m, types)]
        else:
            named = [(n, m) for n, m in model.named_modules() if n and select(n, m)]
        device = next(model.parameters(), torch.empty(0)).device
        return cls(named, layout, device)

    @property
    def attached(self) -> bool:
        """Whether hooks are currently attached."""
        return bool(self._handles)

    def attach(self) -> None:
        """Attach the forward hooks (idempotent)."""
        if self._handles:
            return
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._accumulators[name]))

    def detach(self) -> None:
        """Remove the forward hooks; accumulated statistics are kept."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def reset(self) -> None:
        """Forget accumulated statistics."""
        for accumulator in self._accumulators.values():
            accumulator.reset()

    def reduce(self) -> None:
        """Sum the statistics across ranks, every layer together.

        A no-op outside a distributed run. Every rank must call it (it is a
        collective), after the same number of windows. Two collectives: a tiny one
        agreeing on each layer's unit count (a layer that did not run on some rank,
        in a conditional branch say, is filled with zeros there), then one
        ``all_reduce`` of every layer's statistics in a single flat buffer.
        """
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        accumulators = list(self._accumulators.values())
        if not accumulators:
            return
        device = next((a.active.device for a in accumulators if a.active is not None), self.device)
        local_units = [0 if a.active is None else a.active.numel() for a in accumulators]
        units = torch.tensor(local_units, dtype=torch.float64, device=device)
        dist.all_reduce(units, op=dist.ReduceOp.MAX)
        agreed = [int(u) for u in units.tolist()]
        parts: list[Tensor] = []
        for accumulator, count in zip(accumulators, agreed):
            if accumulator.active is None or accumulator.abs_sum is None:
                active = abs_sum = torch.zeros(count, dtype=torch.float64, device=device)
            else:
                active, abs_sum = accumulator.active, accumulator.abs_sum
            samples = torch.full((1,), float(accumulator.samples), dtype=torch.float64)
            parts += [active, abs_sum, samples.to(device)]
        flat = torch.cat(parts)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        sample_slots = []
        offset = 0
        for count in agreed:
            sample_slots.append(offset + 2 * count)
            offset += 2 * count + 1
        totals = flat[sample_slots].tolist()
        offset = 0
        for accumulator, count, samples in zip(accumulators, agreed, totals):
            if count:
                accumulator.active = flat[offset : offset + count]
                accumulator.abs_sum = flat[offset + count : offset + 2 * count]
                accumulator.samples = int(samples)
            offset += 2 * count + 1

    def device_stats(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Per layer ``(dead, scores)`` as device tensors (no host transfer)."""
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for name, accumulator in self._accumulators.items():
            if accumulator.active is None or accumulator.abs_sum is None:
                continue
            mean_abs = accumulator.abs_sum / max(accumulator.samples, 1)
            layer_mean = mean_abs.mean()
            scores = torch.where(layer_mean > 0, mean_abs / layer_mean, torch.zeros_like(mean_abs))
            out[name] = (accumulator.active == 0, scores)
        return out

    def stats(self) -> dict[str, UnitStats]:
        """Per layer statistics on the host (one transfer for all layers)."""
        device_stats = self.device_stats()
        if not device_stats:
            return {}
        names = list(device_stats)
        flat = torch.cat(
            [torch.cat([d.double(), s.double()]) for d, s in device_stats.values()]
        ).cpu()  # the one transfer
        out: dict[str, UnitStats] = {}
        offset = 0
        for name in names:
            units = device_stats[name][0].numel()
            out[name] = UnitStats(
                dead=flat[offset : offset + units].bool(),
                scores=flat[offset + units : offset + 2 * units],
                samples=self._accumulators[name].samples,
            )
            offset += 2 * units
        return out


@dataclass
class MeasuringWindows:
    """When an :class:`ActivityTracker` measures: ``window`` batches every ``every_n_steps`` steps.

    Call :meth:`maybe_open` before each training batch and :meth:`maybe_close` after
    it; ``maybe_close`` returns True once a window is complete, with the hooks
    removed and the statistics reduced across ranks. Outside windows nothing is
    hooked.

    Example:
        >>> from torch import nn
        >>> relu = nn.ReLU()
        >>> tracker, windows = ActivityTracker([("relu", relu)]), MeasuringWindows(4, 2)
        >>> done = []
        >>> for step in range(6):
        ...     windows.maybe_open(step, tracker)
        ...     _ = relu(torch.randn(3, 2))
        ...     done.append(windows.maybe_close(tracker))
        >>> done
        [False, True, False, False, False, True]
    """

    every_n_steps: int
    window: int
    started_at: int = -1
    batches: int = 0

    def maybe_open(self, step: int, tracker: ActivityTracker) -> None:
        """Attach the hooks if a window is due at ``step`` (the global step)."""
        if tracker.attached or not tracker.modules:
            return
        if step % self.every_n_steps == 0 and step != self.started_at:
            self.started_at = step
            self.batches = 0
            tracker.reset()
            tracker.attach()

    def maybe_close(self, tracker: ActivityTracker) -> bool:
        """Count a batch; at the window's end detach, reduce across ranks and return True."""
        if not tracker.attached:
            return False
        self.batches += 1
        if self.batches < self.window:
            return False
        tracker.detach()
        tracker.reduce()  # a collective: every rank gets here after the same batches
        return True

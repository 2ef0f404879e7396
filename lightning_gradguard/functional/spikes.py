"""Rolling-window spike detection on the global gradient norm (OLMo-core style).

A norm is a spike when it exceeds the mean of the last ``window`` recorded
norms by more than ``sigma`` standard deviations; detection starts once
``min_samples`` norms were recorded. State is device tensors, no host sync.

Example:
    >>> import torch
    >>> spikes = SpikeWindow(window=8, min_samples=4, sigma=3.0)
    >>> for x in (1.0, 1.1, 0.9, 1.0):
    ...     spikes.record(torch.tensor(x), torch.tensor(True))
    >>> bool(spikes.is_spike(torch.tensor(1.05))), bool(spikes.is_spike(torch.tensor(50.0)))
    (False, True)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "SPIKE_MODES",
    "SPIKE_STATISTICS",
    "RunningSpikeTest",
    "SpikeWindow",
]


class _RingBuffer:
    """The last ``window`` finite values in a float64 device ring buffer, and their count.

    Empty (``values`` is ``None``) until the first value; follows the device of the
    values it is given. Subclasses set ``window`` and test against the buffer.
    """

    window: int
    values: Tensor | None = None
    count: Tensor | None = None

    def _ensure(self, like: Tensor) -> None:
        if self.values is None or self.count is None:
            self.values = torch.full(
                (self.window,), math.nan, dtype=torch.float64, device=like.device
            )
            self.count = torch.zeros((), dtype=torch.long, device=like.device)
        elif self.values.device != like.device:
            self.values, self.count = self.values.to(like.device), self.count.to(like.device)

    def record(self, value: Tensor, keep: Tensor) -> None:
        """Add ``value`` (a scalar) where ``keep`` is true and the value is finite."""
        self._ensure(value)
        assert self.values is not None and self.count is not None
        value = value.detach().to(torch.float64).reshape(1)
        keep = keep & torch.isfinite(value[0])
        slot = (self.count % self.window).view(1)
        updated = self.values.index_copy(0, slot, value)
        self.values = torch.where(keep, updated, self.values)
        self.count = self.count + keep.long()

    def state_dict(self) -> dict[str, Any]:
        """CPU tensors (empty before the first value)."""
        if self.values is None or self.count is None:
            return {}
        return {"values": self.values.cpu().clone(), "count": self.count.cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        if state:
            self.values = torch.as_tensor(state["values"]).clone()
            self.count = torch.as_tensor(state["count"]).clone()


class SpikeWindow(_RingBuffer):
    """Recent global norms in a device ring buffer, and the spike test over them.

    Args:
        window: how many recent norms are kept.
        min_samples: no spike is reported before this many norms were recorded.
        sigma: how many standard deviations above the mean makes a spike.
    """

    def __init__(self, window: int = 128, min_samples: int = 20, sigma: float = 6.0) -> None:
        self.window = window
        self.min_samples = min_samples
        self.sigma = sigma
        self.values: Tensor | None = None
        self.count: Tensor | None = None

    def is_spike(self, norm: Tensor) -> Tensor:
        """Whether ``norm`` is a spike against the recorded window (a bool tensor)."""
        self._ensure(norm)
        assert self.values is not None and self.count is not None
        mean = torch.nanmean(self.values)
        std = torch.nanmean((self.values - mean).pow(2)).sqrt()
        enough = self.count >= self.min_samples
        return enough & (norm.to(torch.float64) > mean + self.sigma * std)


SPIKE_STATISTICS = ("ratio", "zscore")
SPIKE_MODES = ("min", "max")


class RunningSpikeTest(_RingBuffer):
    """A value (a loss, a norm) against the running statistics of its recent values.

    Like Lightning's ``SpikeDetection`` and metaseq's loss-ratio test, but on the
    device (no host read). ``statistic="ratio"``: a spike is a value worse than the
    running mean of the last ``window`` recorded values by at least ``rtol`` times
    that mean and at least ``atol`` (each test only when set). ``statistic="zscore"``:
    worse by more than ``sigma`` standard deviations (and at least ``atol`` when set).
    "Worse" is higher with ``mode="min"`` (a loss), lower with ``mode="max"``.
    Nothing is a spike before ``warmup`` values were recorded; a non-finite value
    is never one here (callers test finiteness themselves).

    Args:
        statistic: ``"ratio"`` or ``"zscore"``.
        mode: ``"min"`` (lower is better) or ``"max"``.
        window: how many recent values the mean (and deviation) use.
        warmup: values recorded before any spike is reported.
        atol: the smallest absolute difference that is a spike (``None``: no test).
        rtol: the smallest difference, relative to the mean, that is a spike (ratio).
        sigma: standard deviations that make a spike (zscore).

    Example:
        >>> import torch
        >>> test = RunningSpikeTest(statistic="ratio", window=4, warmup=3, rtol=1.0)
        >>> for x in (1.0, 1.2, 0.8):
        ...     test.record(torch.tensor(x), torch.tensor(True))
        >>> bool(test.is_spike(torch.tensor(1.5))), bool(test.is_spike(torch.tensor(2.5)))
        (False, True)
    """

    def __init__(
        self,
        statistic: str = "ratio",
        mode: str = "min",
        window: int = 50,
        warmup: int = 20,
        atol: float | None = None,
        rtol: float | None = 1.0,
        sigma: float = 6.0,
    ) -> None:
        if statistic not in SPIKE_STATISTICS:
            raise ValueError(f"statistic={statistic!r} must be one of {list(SPIKE_STATISTICS)}.")
        if mode not in SPIKE_MODES:
            raise ValueError(f"mode={mode!r} must be one of {list(SPIKE_MODES)}.")
        self.statistic = statistic
        self.mode = mode
        self.window = window
        self.warmup = warmup
        self.atol = atol
        self.rtol = rtol
        self.sigma = sigma
        self.values: Tensor | None = None
        self.count: Tensor | None = None

    def mean(self) -> Tensor:
        """The running mean (NaN before the first value)."""
        assert self.values is not None
        return torch.nanmean(self.values)

    def is_spike(self, value: Tensor) -> Tensor:
        """Whether ``value`` is a spike against the recorded values (a bool tensor)."""
        self._ensure(value)
        assert self.values is not None and self.count is not None
        value = value.detach().to(torch.float64)
        mean = torch.nanmean(self.values)
        worse = value - mean if self.mode == "min" else mean - value
        spike = self.count >= self.warmup
        if self.atol is not None:
            spike = spike & (worse >= self.atol)
        if self.statistic == "ratio":
            if self.rtol is not None:
                spike = spike & (worse >= self.rtol * mean.abs())
            else:
                spike = spike & (worse > 0)
        else:
            std = torch.nanmean((self.values - mean).pow(2)).sqrt()
            spike = spike & (worse > self.sigma * std)
        return spike & torch.isfinite(value)

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


class SpikeWindow:
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

    def _ensure(self, like: Tensor) -> None:
        if self.values is None or self.count is None:
            self.values = torch.full(
                (self.window,), math.nan, dtype=torch.float64, device=like.device
            )
            self.count = torch.zeros((), dtype=torch.long, device=like.device)
        elif self.values.device != like.device:
            self.values, self.count = self.values.to(like.device), self.count.to(like.device)

    def is_spike(self, norm: Tensor) -> Tensor:
        """Whether ``norm`` is a spike against the recorded window (a bool tensor)."""
        self._ensure(norm)
        assert self.values is not None and self.count is not None
        mean = torch.nanmean(self.values)
        std = torch.nanmean((self.values - mean).pow(2)).sqrt()
        enough = self.count >= self.min_samples
        return enough & (norm.to(torch.float64) > mean + self.sigma * std)

    def record(self, norm: Tensor, keep: Tensor) -> None:
        """Add ``norm`` to the window where ``keep`` is true and the norm is finite."""
        self._ensure(norm)
        assert self.values is not None and self.count is not None
        keep = keep & torch.isfinite(norm)
        slot = (self.count % self.window).view(1)
        updated = self.values.index_copy(0, slot, norm.to(torch.float64).view(1))
        self.values = torch.where(keep, updated, self.values)
        self.count = self.count + keep.long()

    def state_dict(self) -> dict[str, Any]:
        """CPU tensors (empty before the first norm)."""
        if self.values is None or self.count is None:
            return {}
        return {"values": self.values.cpu().clone(), "count": self.count.cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        if state:
            self.values = torch.as_tensor(state["values"]).clone()
            self.count = torch.as_tensor(state["count"]).clone()

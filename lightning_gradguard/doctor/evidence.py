"""What the rules read: the measurements of one diagnosis as plain values, and the thresholds.

An :class:`Evidence` can be written by hand (no model needed) to try or test a rule of
:mod:`lightning_gradguard.doctor.rules`.

Example:
    >>> from lightning_gradguard.doctor.report import LayerRow
    >>> rows = [LayerRow("0", "Linear", 2e-6, 1, weight_std=0.1), LayerRow("1", "LayerNorm", 1, 1),
    ...         LayerRow("2", "Linear", 2, 1, weight_std=0.1)]
    >>> Evidence(rows).first_last, [r.name for r in Evidence(rows).matrix]
    (1e-06, ['0', '2'])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from lightning_gradguard.doctor.architecture import Architecture
from lightning_gradguard.doctor.report import LayerRow

__all__ = [
    "RELU_ACTIVATIONS",
    "Evidence",
    "Thresholds",
    "first_last_ratio",
]

RELU_ACTIVATIONS = ("ReLU", "ReLU6", "F.relu", "F.relu6")
"""Activations whose gradient is exactly 0 below zero: a unit that is never positive is dead."""


@dataclass(frozen=True)
class Thresholds:
    """Where :func:`~lightning_gradguard.doctor.diagnose` draws the lines (see its arguments).

    ``scale_band``: a weight std between these multiples of the He (or Glorot)
    std counts as well scaled.
    """

    vanishing_ratio: float = 1e-4
    vanishing_threshold: float = 1e-7
    exploding_threshold: float = 100.0
    exploding_ratio: float = 1.0
    dead_threshold: float = 0.5
    small_batch: int = 8
    scale_band: tuple[float, float] = (0.5, 2.0)


@dataclass(frozen=True)
class Evidence:
    """What the rules read: the measurements of one diagnosis, and the thresholds.

    Attributes:
        rows: the layers, in forward order.
        losses: the loss of every step.
        batch_size: the batch size, if known.
        samples: the fewest positions any measured ReLU-like activation saw (a dead
            fraction from fewer than 16 is flagged as such; the default, 16, is not).
        bias_means: the mean bias of every layer that has one.
        trainable: the layers with a trainable parameter of their own.
        batch_norms: the paths of the BatchNorm modules (batch statistics in training).
        architecture: what the model already has: no advice to add what is there.
        thresholds: the lines the rules draw.
    """

    rows: Sequence[LayerRow]
    losses: Sequence[float] = ()
    batch_size: int | None = None
    samples: int = 16
    bias_means: Mapping[str, float] = field(default_factory=dict)
    trainable: frozenset[str] = frozenset()
    batch_norms: tuple[str, ...] = ()
    architecture: Architecture = field(default_factory=Architecture)
    thresholds: Thresholds = field(default_factory=Thresholds)

    # -- views the rules share

    @property
    def with_grad(self) -> list[LayerRow]:
        """Rows with a gradient."""
        return [r for r in self.rows if r.grad_norm is not None]

    @property
    def matrix(self) -> list[LayerRow]:
        """Linear/Conv rows with a gradient."""
        return [r for r in self.with_grad if r.is_matrix_layer]

    @property
    def finite_matrix(self) -> list[LayerRow]:
        """Linear/Conv rows with a finite gradient (the depth profile)."""
        return [r for r in self.matrix if r.grad_norm is not None and math.isfinite(r.grad_norm)]

    @property
    def nonfinite_rows(self) -> list[LayerRow]:
        """Rows whose gradient is inf or NaN."""
        return [r for r in self.with_grad if not math.isfinite(r.grad_norm or 0.0)]

    @property
    def bad_loss_steps(self) -> list[int]:
        """Steps whose loss is inf or NaN."""
        return [i for i, v in enumerate(self.losses) if not math.isfinite(v)]

    @property
    def first_last(self) -> float | None:
        """The depth profile: see :func:`first_last_ratio`."""
        return first_last_ratio(self.rows)

    def fed(self, activation: str) -> list[LayerRow]:
        """Linear/Conv rows (with or without gradient) consumed by ``activation`` unnormalized."""
        return [
            r
            for r in self.rows
            if r.is_matrix_layer and r.activation == activation and not r.normalized
        ]

    def off_he(self, low: bool) -> list[LayerRow]:
        """Rows whose weight std is below (``low``) or above the He band."""
        band = self.thresholds.scale_band
        return [
            r
            for r in self.rows
            if r.he_ratio is not None and (r.he_ratio < band[0] if low else r.he_ratio > band[1])
        ]


def first_last_ratio(rows: Sequence[LayerRow]) -> float | None:
    """Gradient norm of the first Linear/Conv layer over the last one's (finite ones only).

    ``None`` with fewer than two such layers, or a last one whose norm is 0.

    Example:
        >>> rows = [LayerRow(n, "Linear", g, 1, weight_std=0.1) for n, g in (("a", 1e-6), ("b", 1))]
        >>> first_last_ratio(rows)
        1e-06
    """
    finite = [
        r
        for r in rows
        if r.is_matrix_layer and r.grad_norm is not None and math.isfinite(r.grad_norm)
    ]
    if len(finite) < 2 or not finite[-1].grad_norm:
        return None
    return (finite[0].grad_norm or 0.0) / finite[-1].grad_norm

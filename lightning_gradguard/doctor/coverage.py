"""What could not be checked, and why: one small function per check.

"No problem found" covers only the checks that ran; these list the rest as
:class:`~lightning_gradguard.doctor.Unchecked` entries.

Example:
    >>> from lightning_gradguard.doctor.report import LayerRow
    >>> rows = [LayerRow("0", "Linear", 1.0, 1.0, weight_std=0.1)]
    >>> [entry.check for entry in not_checked(rows)]
    ['depth profile']
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from lightning_gradguard.doctor.report import LayerRow, Unchecked

__all__ = [
    "dead_units",
    "depth_profile",
    "grad_param_ratio",
    "not_checked",
    "weight_scale",
]


def depth_profile(rows: Sequence[LayerRow]) -> list[Unchecked]:
    """The first/last comparison needs two Linear/Conv layers with a finite gradient."""
    finite = [
        r
        for r in rows
        if r.is_matrix_layer and r.grad_norm is not None and math.isfinite(r.grad_norm)
    ]
    if len(finite) >= 2:
        return []
    return [
        Unchecked(
            "depth profile",
            f"it compares the first and the last Linear/Conv layer, and {len(finite)} "
            "such layer(s) with a finite gradient were found",
        )
    ]


def weight_scale(unknown: Sequence[str], embeddings: Sequence[str]) -> list[Unchecked]:
    """Layers the unit map does not know, and embeddings, have no He/Glorot reference."""
    out: list[Unchecked] = []
    if unknown:
        out.append(
            Unchecked(
                "weight scale",
                "the unit map does not know these layer types (register them with "
                "lightning_gradguard.functional.register_layer; a normalization layer "
                "registered with kind 'norm' also counts as one for the advice)",
                tuple(unknown),
            )
        )
    if embeddings:
        out.append(
            Unchecked(
                "weight scale",
                "embeddings are lookup tables: He and Glorot init do not apply to them",
                tuple(embeddings),
            )
        )
    return out


def _hidden(rows: Sequence[LayerRow]) -> list[LayerRow]:
    """Linear/Conv layers, but the last one (its gradient follows the loss)."""
    return [r for r in rows if r.is_matrix_layer][:-1]


def grad_param_ratio(rows: Sequence[LayerRow]) -> list[Unchecked]:
    """A layer whose output a normalization consumes is scale-free: its ratio says nothing."""
    scale_free = tuple(r.name for r in _hidden(rows) if r.normalized)
    if not scale_free:
        return []
    return [
        Unchecked(
            "grad/param ratio",
            "a normalization consumes their output, so the loss does not depend on their "
            "scale and the ratio says nothing about exploding",
            scale_free,
        )
    ]


def dead_units(rows: Sequence[LayerRow], not_covered: Mapping[str, str]) -> list[Unchecked]:
    """Layers no activation consumes, and call sites that could not be measured."""
    out: list[Unchecked] = []
    unmeasured = tuple(
        r.name
        for r in _hidden(rows)
        if r.activation is None and r.grad_norm is not None and not r.normalized
    )
    if unmeasured:
        out.append(
            Unchecked(
                "dead units",
                "no activation consumes their output (attention, a residual sum, or an "
                "activation the library does not recognize: register its type with "
                "lightning_gradguard.functional.register_activation)",
                unmeasured,
            )
        )
    for site, reason in sorted(not_covered.items()):
        fed = tuple(r.name for r in rows if r.activation_module == site)
        out.append(
            Unchecked("dead units", f"call site '{site}' could not be measured: {reason}", fed)
        )
    return out


def not_checked(
    rows: Sequence[LayerRow],
    unknown: Sequence[str] = (),
    embeddings: Sequence[str] = (),
    not_covered: Mapping[str, str] | None = None,
) -> list[Unchecked]:
    """Every check that could not run, or not on every layer, and why.

    Args:
        rows: the layers, in forward order.
        unknown: layers whose type the unit map does not know.
        embeddings: the embedding layers.
        not_covered: call sites the activity tracker could not measure, with the reason.
    """
    return [
        *depth_profile(rows),
        *weight_scale(unknown, embeddings),
        *grad_param_ratio(rows),
        *dead_units(rows, not_covered or {}),
    ]

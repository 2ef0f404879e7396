"""The results of :func:`~lightning_gradguard.doctor.diagnose`: rows, findings, text and JSON."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_gradguard._checks import check_choice
from lightning_gradguard.doctor.architecture import Architecture

__all__ = [
    "FAIL_ON",
    "SEVERITIES",
    "Diagnosis",
    "Finding",
    "LayerRow",
    "Unchecked",
]

SEVERITIES = ("info", "warning", "error")
"""Severities of a finding, from least to most serious."""

FAIL_ON = ("warning", "error", "never")
"""Choices of ``fail_on``: the least severity that makes the exit code 1."""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class LayerRow:
    """One layer (a module that owns parameters) of a :class:`Diagnosis`.

    Attributes:
        name: the module's dotted path (``"(root)"`` for parameters of the model itself).
        kind: the module's class name.
        grad_norm: L2 norm of the layer's gradients (float64), averaged over the
            steps; ``inf``/``nan`` if any step was not finite; ``None`` when no
            parameter of the layer got a gradient (frozen or unused).
        param_norm: L2 norm of the layer's parameters.
        dead_fraction: fraction of units of the consuming activation that were
            never positive on any sample of any step (ReLU-like activations
            only; ``None`` otherwise).
        activation: the consuming activation: a module's class (``"ReLU"``,
            ``"LeakyReLU(0.01)"``, ``"Sigmoid"``...) or a functional activation
            (``"F.relu"``, ``"F.gelu"``...); ``None`` when no activation follows the
            layer before the next layer.
        activation_module: the activation's call site, named as
            :class:`~lightning_gradguard.callbacks.DeadUnitMonitor` names it
            (``"net.1"``, ``"layer1.0.relu#1"``, ``"encoder.layers.0:relu"``).
        weight_std: std of the weight entries (Linear and Conv layers only).
        he_std: ``gain / sqrt(fan_in)``, He (Kaiming) init's std for this layer.
        glorot_std: ``gain * sqrt(2 / (fan_in + fan_out))``, Glorot (Xavier) init's std.
        normalized: a normalization layer sits between the layer and its activation.
    """

    name: str
    kind: str
    grad_norm: float | None
    param_norm: float
    dead_fraction: float | None = None
    activation: str | None = None
    activation_module: str | None = None
    weight_std: float | None = None
    he_std: float | None = None
    glorot_std: float | None = None
    normalized: bool = False

    @property
    def ratio(self) -> float | None:
        """``grad_norm / param_norm`` (``None`` without a gradient or with zero parameters)."""
        if self.grad_norm is None or self.param_norm == 0:
            return None
        return self.grad_norm / self.param_norm

    @property
    def he_ratio(self) -> float | None:
        """``weight_std / he_std``: 1 means the weights have He init's scale."""
        return _divide(self.weight_std, self.he_std)

    @property
    def glorot_ratio(self) -> float | None:
        """``weight_std / glorot_std``: 1 means the weights have Glorot init's scale."""
        return _divide(self.weight_std, self.glorot_std)

    @property
    def is_matrix_layer(self) -> bool:
        """A Linear or Conv layer (the depth profile is measured on these)."""
        return self.weight_std is not None

    def to_dict(self) -> dict[str, Any]:
        """The row as JSON-able values (non-finite floats as the strings ``"inf"``, ``"nan"``)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "grad_norm": _json_float(self.grad_norm),
            "param_norm": _json_float(self.param_norm),
            "ratio": _json_float(self.ratio),
            "dead_fraction": _json_float(self.dead_fraction),
            "activation": self.activation,
            "activation_module": self.activation_module,
            "weight_std": _json_float(self.weight_std),
            "he_std": _json_float(self.he_std),
            "glorot_std": _json_float(self.glorot_std),
            "he_ratio": _json_float(self.he_ratio),
            "glorot_ratio": _json_float(self.glorot_ratio),
            "normalized": self.normalized,
        }


@dataclass(frozen=True)
class Finding:
    """A problem (or a remark) found by :func:`diagnose`.

    Attributes:
        kind: ``"nonfinite"``, ``"vanishing"``, ``"exploding"``, ``"dying"``,
            ``"saturating"``, ``"batchnorm_small_batch"``, ``"weight_scale"`` or
            ``"unused"``.
        severity: ``"info"``, ``"warning"`` or ``"error"``.
        message: what was measured, in one or two sentences.
        layers: the layers concerned.
        recommendations: concrete remedies, most promising first.
    """

    kind: str
    severity: str
    message: str
    layers: tuple[str, ...] = ()
    recommendations: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The finding as JSON-able values."""
        return {
            "kind": self.kind,
            "severity": self.severity,
            "message": self.message,
            "layers": list(self.layers),
            "recommendations": list(self.recommendations),
        }


@dataclass(frozen=True)
class Unchecked:
    """A check :func:`diagnose` could not run (or ran on only part of the layers), and why.

    Attributes:
        check: ``"depth profile"``, ``"grad/param ratio"``, ``"weight scale"`` or
            ``"dead units"``.
        reason: why it could not run, in one sentence.
        layers: the layers it did not cover (empty: the whole model).
    """

    check: str
    reason: str
    layers: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The entry as JSON-able values."""
        return {"check": self.check, "reason": self.reason, "layers": list(self.layers)}

    def __str__(self) -> str:
        names = [f"'{name}'" for name in self.layers]
        listed = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        return f"{self.check}: {self.reason}" + (f" ({listed})" if listed else "")


@dataclass
class Diagnosis:
    """The result of :func:`diagnose`: per-layer rows, findings and an exit code.

    Attributes:
        rows: one :class:`LayerRow` per layer, in the order the forward pass
            reached them (layers it never reached last).
        findings: :class:`Finding` objects, most severe first.
        steps: forward/backward passes measured.
        batch_size: the batch size seen (first dimension of the first tensor in
            the batch), or ``None``.
        losses: the loss of every step.
        first_last_ratio: gradient norm of the first Linear/Conv layer over that
            of the last one (``None`` with fewer than two such layers).
        not_checked: the checks that could not run, or not on every layer
            (:class:`Unchecked`). "No problem found" covers only the checks that ran.
        architecture: what the model was found to have (normalization, skip
            connections, attention) and why: the advice fits it.
    """

    rows: list[LayerRow]
    findings: list[Finding]
    steps: int
    batch_size: int | None
    losses: list[float]
    first_last_ratio: float | None = None
    not_checked: list[Unchecked] = field(default_factory=list)
    architecture: Architecture = field(default_factory=Architecture)

    @property
    def exit_code(self) -> int:
        """0 when healthy (no warning, no error), 1 when a problem was found.

        Infos (a remark on the weight scale, an unused layer) do not count. See
        :meth:`exit_code_for` for other policies.
        """
        return self.exit_code_for("warning")

    def exit_code_for(self, fail_on: str = "warning") -> int:
        """1 when a finding is at least as severe as ``fail_on``, else 0.

        Args:
            fail_on: ``"warning"``, ``"error"`` or ``"never"`` (always 0).
        """
        check_choice(fail_on, "fail_on", "Diagnosis.exit_code_for", FAIL_ON)
        if fail_on == "never":
            return 0
        least = SEVERITIES.index(fail_on)
        return int(any(SEVERITIES.index(f.severity) >= least for f in self.findings))

    @property
    def healthy(self) -> bool:
        """No warning and no error."""
        return self.exit_code == 0

    def row(self, name: str) -> LayerRow:
        """The row of layer ``name``."""
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no layer {name!r}: the layers are {[r.name for r in self.rows]}")

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-able values (``json.dumps(..., allow_nan=False)`` works)."""
        return {
            "exit_code": self.exit_code,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "losses": [_json_float(v) for v in self.losses],
            "first_last_ratio": _json_float(self.first_last_ratio),
            "rows": [row.to_dict() for row in self.rows],
            "findings": [finding.to_dict() for finding in self.findings],
            "not_checked": [entry.to_dict() for entry in self.not_checked],
            "architecture": self.architecture.to_dict(),
        }

    def format_table(self) -> str:
        """The rows as a fixed-width text table."""
        header = (
            "layer",
            "type",
            "grad norm",
            "param norm",
            "grad/param",
            "dead",
            "activation",
            "w std",
            "std/He",
            "std/Glorot",
        )
        lines = [
            (
                row.name,
                row.kind,
                _fmt(row.grad_norm, "e"),
                _fmt(row.param_norm, "e"),
                _fmt(row.ratio, "e"),
                "-" if row.dead_fraction is None else f"{100 * row.dead_fraction:.0f}%",
                row.activation or "-",
                _fmt(row.weight_std, "g"),
                _fmt(row.he_ratio, "f"),
                _fmt(row.glorot_ratio, "f"),
            )
            for row in self.rows
        ]
        widths = [max(len(str(c)) for c in column) for column in zip(header, *lines)]
        left = {0, 1, 6}  # text columns; numbers are right-aligned

        def render(cells: Sequence[str]) -> str:
            parts = [
                c.ljust(w) if i in left else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths))
            ]
            return "  ".join(parts).rstrip()

        return "\n".join(
            [render(header), render(["-" * w for w in widths])] + [render(c) for c in lines]
        )

    def format_findings(self) -> str:
        """The findings and their recommendations, as text."""
        if not self.findings:
            return (
                "No problem found by the checks that ran (see 'Not checked')."
                if self.not_checked
                else "No problem found."
            )
        out: list[str] = []
        for finding in self.findings:
            out.append(f"[{finding.severity.upper()}] {finding.kind}: {finding.message}")
            out.extend(f"    - {rec}" for rec in finding.recommendations)
        return "\n".join(out)

    def format_not_checked(self) -> str:
        """The checks that could not run, as text (empty when every check ran)."""
        if not self.not_checked:
            return ""
        return "\n".join(["Not checked:"] + [f"    - {entry}" for entry in self.not_checked])

    def __str__(self) -> str:
        loss = ", ".join(_fmt(v, "g") for v in self.losses[:1])
        ratio = (
            ""
            if self.first_last_ratio is None
            else f", first/last grad norm {_fmt(self.first_last_ratio, 'e')}"
        )
        summary = (
            f"gradguard doctor: {len(self.rows)} layers, {self.steps} step(s), "
            f"batch size {self.batch_size if self.batch_size is not None else '?'}, "
            f"loss {loss}{ratio}"
        )
        verdict = "healthy" if self.healthy else "problems found"
        evidence = self.architecture.evidence
        return "\n".join(
            [
                summary,
                *([f"advice fits: {'; '.join(evidence)}"] if evidence else []),
                "",
                self.format_table(),
                "",
                self.format_findings(),
                "",
                *([self.format_not_checked(), ""] if self.not_checked else []),
                f"Verdict: {verdict} (exit code {self.exit_code})",
            ]
        )


# --------------------------------------------------------------------------- formatting


def _divide(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _json_float(value: float | None) -> float | str | None:
    if value is None:
        return None
    value = float(value)
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _fmt(value: float | None, style: str) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if style == "e":
        return f"{value:.2e}"
    if style == "f":
        return f"{value:.2f}"
    return f"{value:.3g}"

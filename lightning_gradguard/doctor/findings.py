"""The rules: from per-layer rows to findings with severities and recommendations."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from lightning_gradguard.doctor.report import SEVERITIES, Finding, LayerRow, _fmt

__all__ = [
    "Architecture",
    "Thresholds",
    "find_problems",
]

# --------------------------------------------------------------------------- thresholds


@dataclass(frozen=True)
class Thresholds:
    """Where :func:`diagnose` draws the lines (see its arguments).

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
class Architecture:
    """What the model already has, so that advice fits it.

    Attributes:
        normalization: it has normalization layers (BatchNorm, LayerNorm, GroupNorm, RMSNorm...).
        residual: it has residual blocks (a transformer block, an attention layer, a
            ResNet block), recognized by module type or class name.
        transformer: it has attention layers.
        functional_activation: it has ``nn.TransformerEncoderLayer``/``DecoderLayer``,
            whose activation is a function, not a module.
    """

    normalization: bool = False
    residual: bool = False
    transformer: bool = False
    functional_activation: bool = False

    @classmethod
    def of(cls, model: nn.Module) -> Architecture:
        """Read it from the module types and class names of ``model``.

        Example:
            >>> Architecture.of(nn.TransformerEncoderLayer(8, 2)).transformer
            True
        """
        names = [type(m).__name__ for m in model.modules()]
        layers = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
        attention = (nn.MultiheadAttention, *layers)
        transformer = any(
            isinstance(m, attention) or type(m).__name__.endswith("Attention")
            for m in model.modules()
        )
        residual = transformer or any(
            any(part in name for part in ("Block", "Bottleneck", "Residual")) for name in names
        )
        return cls(
            normalization=any("Norm" in name for name in names),
            residual=residual,
            transformer=transformer,
            functional_activation=any(isinstance(m, layers) for m in model.modules()),
        )


# --------------------------------------------------------------------------- findings

_CHECK_LOSS = (
    "Check the loss curve, not only this table: a LayerNorm placed after the activation can "
    "make gradient norms look healthy while the network still does not learn."
)
_SKIP = "Add skip connections (x + f(x)): the gradient then reaches early layers directly."
_HE = (
    "Initialize ReLU layers with He (Kaiming) init: lightning_gradguard.functional."
    "init_(model, 'kaiming_normal') or the InitAtStart(scheme='kaiming_normal') callback."
)
_CLIP = (
    "Clip gradients: GradGuard() (its default policy 'guard' clips a gradient larger than the "
    "weights from the first step, and spikes later on), or AdaptiveGradClip(policy='norm') (a "
    "fixed cap of 1.0, what Trainer(gradient_clip_val=1.0) does). A percentile policy "
    "(AutoClip) cannot clip the first steps: it has no history yet."
)
_LR = "Lower the learning rate, or warm it up over the first steps."


def _normalization(batch_size: int | None, small_batch: int, where: str) -> str:
    if batch_size is not None and batch_size < small_batch:
        return (
            f"Normalize {where} with GroupNorm or LayerNorm: at batch size {batch_size} "
            f"BatchNorm's batch statistics are too noisy (it needs about {small_batch} or more)."
        )
    return (
        f"Normalize {where}: Linear -> BatchNorm1d -> activation (Conv -> BatchNorm2d); "
        f"GroupNorm or LayerNorm when batches are small (under {small_batch})."
    )


def _bias_mean(module: nn.Module | None) -> float | None:
    bias = getattr(module, "bias", None)
    if not isinstance(bias, Tensor) or bias.numel() == 0:
        return None
    return float(bias.detach().double().mean())


def _severity_rank(finding: Finding) -> int:
    return -SEVERITIES.index(finding.severity)


def _names(rows: Sequence[LayerRow], limit: int = 6) -> str:
    names = [f"'{r.name}'" for r in rows]
    return ", ".join(names[:limit]) + (
        f" and {len(names) - limit} more" if len(names) > limit else ""
    )


def find_problems(
    rows: list[LayerRow],
    losses: list[float],
    batch_size: int | None,
    samples: int,
    owners: dict[str, nn.Module],
    t: Thresholds,
    architecture: Architecture | None = None,
) -> tuple[list[Finding], float | None]:
    """Findings from the rows, most severe first, and the first/last gradient norm ratio.

    Args:
        rows: the layers, in forward order.
        losses: the loss of every step.
        batch_size: the batch size, if known.
        samples: the fewest positions any measured activation saw (for dead fractions).
        owners: the module of every row (for its biases and parameters).
        t: the thresholds.
        architecture: what the model already has (normalization, skip connections):
            no advice to add what is there.
    """
    arch = architecture if architecture is not None else Architecture()
    findings: list[Finding] = []
    with_grad = [r for r in rows if r.grad_norm is not None]
    matrix = [r for r in with_grad if r.is_matrix_layer]
    nonfinite = [r for r in with_grad if r.grad_norm is not None and not math.isfinite(r.grad_norm)]
    bad_losses = [i for i, v in enumerate(losses) if not math.isfinite(v)]
    sigmoid_fed = [
        r for r in rows if r.is_matrix_layer and r.activation == "Sigmoid" and not r.normalized
    ]
    tanh_fed = [
        r for r in rows if r.is_matrix_layer and r.activation == "Tanh" and not r.normalized
    ]
    relu_fed = [r for r in rows if r.is_matrix_layer and r.activation in ("ReLU", "ReLU6")]
    low_scale = [r for r in rows if r.he_ratio is not None and r.he_ratio < t.scale_band[0]]
    high_scale = [r for r in rows if r.he_ratio is not None and r.he_ratio > t.scale_band[1]]
    normalize = _normalization(batch_size, t.small_batch, "before the activation")
    structural = ([] if arch.normalization else [normalize]) + ([] if arch.residual else [_SKIP])

    # -- non-finite
    if bad_losses or nonfinite:
        what = []
        if bad_losses:
            what.append(f"the loss is {_fmt(losses[bad_losses[0]], 'g')} at step {bad_losses[0]}")
        if nonfinite:
            what.append(f"the gradients of {_names(nonfinite)} are not finite")
        recs = [
            "Check the batch and the loss for inf/NaN: inputs, labels, log(0), division by 0.",
        ]
        if high_scale:
            recs.append(
                f"The weights are too large for the depth ({_names(high_scale, 3)} at "
                f"{max(r.he_ratio or 0 for r in high_scale):.2g}x the He std): "
                "re-initialize (He for ReLU, Glorot for tanh)."
            )
        recs += [
            "AdaptiveGradClip(skip_nonfinite=True) (its default) skips steps whose gradients "
            "are not finite instead of writing NaN into the weights.",
            _LR,
        ]
        findings.append(
            Finding(
                "nonfinite",
                "error",
                "; ".join(what) + ".",
                tuple(r.name for r in nonfinite),
                tuple(recs),
            )
        )

    # -- depth profile: first vs last Linear/Conv layer
    first_last: float | None = None
    finite_matrix = [r for r in matrix if r.grad_norm is not None and math.isfinite(r.grad_norm)]
    if len(finite_matrix) >= 2 and finite_matrix[-1].grad_norm:
        first_last = (finite_matrix[0].grad_norm or 0.0) / finite_matrix[-1].grad_norm
    tiny = [
        r
        for r in with_grad
        if r.grad_norm is not None
        and math.isfinite(r.grad_norm)
        and r.grad_norm < t.vanishing_threshold
    ]
    if (first_last is not None and first_last < t.vanishing_ratio) or tiny:
        first, last = (
            finite_matrix[0] if finite_matrix else None,
            finite_matrix[-1] if finite_matrix else None,
        )
        parts = []
        if first_last is not None and first is not None and last is not None:
            per_layer = first_last ** (1.0 / max(len(finite_matrix) - 1, 1))
            factor = f", a factor {per_layer:.2g} per layer" if per_layer > 0 else ""
            parts.append(
                f"the gradient norm falls from {_fmt(last.grad_norm, 'e')} at the last layer "
                f"('{last.name}') to {_fmt(first.grad_norm, 'e')} at the first ('{first.name}'): "
                f"first/last = {_fmt(first_last, 'e')}{factor} over {len(finite_matrix)} layers"
            )
        if tiny:
            parts.append(f"{len(tiny)} layer(s) below {t.vanishing_threshold:g}")
        recs: list[str] = []  # type: ignore[no-redef]
        if sigmoid_fed:
            parts.append(
                f"{len(sigmoid_fed)} layers feed a sigmoid without normalization (its slope is at "
                "most 0.25: the gradient shrinks at least 4x per layer)"
            )
            recs += [
                "Replace the sigmoids by ReLU with He init (lightning_gradguard.functional."
                "init_(model, 'kaiming_normal') infers the gain).",
                "Glorot init alone does not rescue a deep sigmoid stack: with any weights the "
                "sigmoid's slope (at most 0.25) shrinks the gradient layer after layer.",
                _normalization(batch_size, t.small_batch, "before each sigmoid"),
                *([] if arch.residual else [_SKIP]),
            ]
        elif tanh_fed:
            recs += [
                "Initialize the tanh layers with Glorot (Xavier) init and tanh's gain 5/3: "
                "lightning_gradguard.functional.init_(model, 'xavier_uniform') infers the gain.",
                *structural,
            ]
        else:
            if relu_fed and any(r in low_scale for r in relu_fed):
                recs.append(
                    _HE + f" Now the weights are {min(r.he_ratio or 0 for r in relu_fed):.2g}x "
                    "the He std."
                )
            dead = [
                r
                for r in rows
                if r.dead_fraction is not None and r.dead_fraction >= t.dead_threshold
            ]
            if dead:
                recs.append("Dead ReLU units pass no gradient: see the 'dying' finding.")
            recs += structural
        recs.append(_CHECK_LOSS)
        findings.append(
            Finding(
                "vanishing",
                "error",
                "; ".join(parts) + ".",
                tuple(r.name for r in (tiny or finite_matrix[:1])),
                tuple(recs),
            )
        )
    elif len(sigmoid_fed) >= 5:
        findings.append(
            Finding(
                "saturating",
                "warning",
                f"{len(sigmoid_fed)} layers feed a sigmoid without normalization: the gradient "
                "shrinks at least 4x per sigmoid; deeper stacks stop learning.",
                tuple(r.name for r in sigmoid_fed),
                (
                    "Replace the sigmoids by ReLU with He init.",
                    _normalization(batch_size, t.small_batch, "before each sigmoid"),
                    *([] if arch.residual else [_SKIP]),
                ),
            )
        )

    # -- exploding
    if not bad_losses and not nonfinite:
        total = math.sqrt(math.fsum((r.grad_norm or 0.0) ** 2 for r in with_grad))
        # the last layer's gradient follows the loss, not the depth: it is left out
        # a layer whose output a normalization consumes is scale-free: the loss does not
        # depend on its weight norm, and its gradient shrinks as the weights grow, so its
        # ratio is no sign of an explosion (a ResNet's first conv, before BatchNorm)
        steep = [
            r for r in matrix[:-1] if (r.ratio or 0.0) > t.exploding_ratio and not r.normalized
        ]
        growing = first_last is not None and first_last > 1.0 / t.vanishing_ratio
        if total > t.exploding_threshold or steep or growing:
            parts = []
            if total > t.exploding_threshold:
                parts.append(
                    f"the global gradient norm is {_fmt(total, 'e')} (> {t.exploding_threshold:g})"
                )
            if steep:
                worst = max(steep, key=lambda r: r.ratio or 0.0)
                parts.append(
                    f"{len(steep)} layer(s) have a gradient larger than {t.exploding_ratio:g}x "
                    f"their weights (worst '{worst.name}': {_fmt(worst.ratio, 'e')})"
                )
            if growing:
                parts.append(
                    f"the gradient grows toward the input (first/last = {_fmt(first_last, 'e')})"
                )
            recs = [_CLIP]
            hidden = [r for r in matrix[:-1] if r.he_ratio is not None and not r.normalized]
            if hidden:
                mean = math.exp(
                    math.fsum(math.log(r.he_ratio or 1.0) for r in hidden) / len(hidden)
                )
                if mean > 1.2:
                    recs.append(
                        f"Re-initialize: the hidden weights are on average {mean:.2g}x the He std, "
                        f"which compounds to about {mean ** len(hidden):.2g}x over {len(hidden)} "
                        "layers (He init for ReLU, Glorot for tanh)."
                    )
            recs += [_LR] + ([] if arch.normalization else [normalize])
            findings.append(
                Finding(
                    "exploding",
                    "error",
                    "; ".join(parts) + ".",
                    tuple(r.name for r in steep),
                    tuple(recs),
                )
            )

    # -- dying ReLUs: one finding for every ReLU call at or above the threshold
    dying: dict[str, LayerRow] = {}
    for row in rows:
        if row.dead_fraction is None or row.activation not in ("ReLU", "ReLU6"):
            continue
        if row.dead_fraction >= t.dead_threshold and row.activation_module not in dying:
            dying[row.activation_module or ""] = row  # the first layer feeding it
    if dying:
        layers = list(dying.values())
        recs = []
        negative = [
            (r.name, bias_mean)
            for r in layers
            if (bias_mean := _bias_mean(owners.get(r.name))) is not None and bias_mean < -0.5
        ]
        if negative:
            listed = ", ".join(f"'{name}' (mean {value:.2g})" for name, value in negative)
            recs.append(f"Initialize biases at 0: the biases of {listed} push the units below 0.")
        recs += [
            "Use LeakyReLU(0.01) instead of ReLU (lightning_gradguard.functional."
            "swap_activations(model)), or let DeadUnitMonitor(rescue='threshold') swap it.",
            "Recycle the dead units with the UnitRecycler callback (ReDo): fresh incoming "
            "weights, zero outgoing weights.",
        ]
        off_scale = [
            r
            for r in layers
            if r.he_ratio is not None and not t.scale_band[0] <= r.he_ratio <= t.scale_band[1]
        ]
        if off_scale:
            recs.append(_HE + f" Now the weights of {_names(off_scale, 3)} are off the He std.")
        recs.append(
            "If the units died during training, a learning-rate spike is the usual cause: "
            "lower the learning rate or warm it up."
        )
        detail = ", ".join(
            f"{100 * (r.dead_fraction or 0):.0f}% of {r.activation} '{r.activation_module}' "
            f"after '{r.name}'"
            for r in layers
        )
        note = (
            f" (measured on only {samples} samples: a unit can look dead by chance)"
            if samples < 16
            else ""
        )
        worst_dead = max(r.dead_fraction or 0.0 for r in layers)
        findings.append(
            Finding(
                "dying",
                "error" if worst_dead >= 0.9 else "warning",
                f"units never active on the batch, so they pass no gradient: {detail}{note}.",
                tuple(r.name for r in layers),
                tuple(recs),
            )
        )

    # -- BatchNorm on tiny batches
    batch_norms = [r for r in rows if r.kind.startswith("BatchNorm")]
    if batch_norms and batch_size is not None and batch_size < t.small_batch:
        findings.append(
            Finding(
                "batchnorm_small_batch",
                "warning",
                f"{_names(batch_norms, 3)} normalize with statistics of {batch_size} samples: "
                "noisy in training, and different from the running statistics used in evaluation.",
                tuple(r.name for r in batch_norms),
                (
                    "Use GroupNorm or LayerNorm, which do not depend on the batch size.",
                    "Or use larger batches (SyncBatchNorm when the global batch is large but "
                    "split across devices).",
                ),
            )
        )

    # -- weight scale (a remark: it explains, it does not fail a run)
    off = [
        r
        for r in rows
        if r.he_ratio is not None
        and r.glorot_ratio is not None
        and not (t.scale_band[0] <= r.he_ratio <= t.scale_band[1])
        and not (t.scale_band[0] <= r.glorot_ratio <= t.scale_band[1])
    ]
    if off:
        detail = ", ".join(f"'{r.name}' {r.he_ratio:.2g}x" for r in off[:4])
        more = f" and {len(off) - 4} more" if len(off) > 4 else ""
        findings.append(
            Finding(
                "weight_scale",
                "info",
                f"{len(off)} layer(s) have a weight std outside {t.scale_band[0]:g}-"
                f"{t.scale_band[1]:g}x both the He and the Glorot std for their activation "
                f"(std/He: {detail}{more}). PyTorch's default init of Linear/Conv is about "
                "0.41x the He std for ReLU."
                + (
                    " Transformers are initialized at a small fixed std by design (GPT-2: 0.02, "
                    "its residual projections 0.02/sqrt(2 n_layer)), with LayerNorm and "
                    "residual connections keeping the signal's scale."
                    if arch.transformer
                    else ""
                ),
                tuple(r.name for r in off),
                (
                    "Nothing to do unless training stalls: the residual stream and LayerNorm "
                    "carry the scale. To re-initialize as GPT-2 does: lightning_gradguard."
                    "functional.init_(model, 'normal', std=0.02, "
                    "residual_projections=['*.c_proj'], n_layers=<blocks>).",
                )
                if arch.transformer
                else (
                    "He init for ReLU-like activations, Glorot for tanh and sigmoid: "
                    "lightning_gradguard.functional.init_(model, 'kaiming_normal' or "
                    "'xavier_uniform') infers each layer's gain.",
                ),
            )
        )

    # -- layers without a gradient
    unused = [
        r
        for r in rows
        if r.grad_norm is None
        and any(p.requires_grad for p in owners[r.name].parameters(recurse=False))
    ]
    if unused:
        findings.append(
            Finding(
                "unused",
                "info",
                f"{_names(unused)} got no gradient: the loss does not use them.",
                tuple(r.name for r in unused),
                (
                    "Remove them or freeze them (requires_grad=False); under DDP unused "
                    "parameters need find_unused_parameters=True.",
                ),
            )
        )
    findings.sort(key=_severity_rank)
    return findings, first_last

"""The rules: small functions from the measured evidence to findings, run in order.

Each rule takes an :class:`~lightning_gradguard.doctor.evidence.Evidence` (the rows of
:func:`~lightning_gradguard.doctor.diagnose`, the losses, the batch size, ... and the
thresholds) and returns one
:class:`~lightning_gradguard.doctor.Finding` or ``None``. :data:`RULES` lists them in
the order their findings are reported (before sorting by severity); :func:`find_problems`
runs them all. An evidence can be built by hand, without a model, to test a rule alone.

Example:
    >>> from lightning_gradguard.doctor.evidence import Evidence
    >>> from lightning_gradguard.doctor.report import LayerRow
    >>> rows = [LayerRow("0", "Linear", grad_norm=float("nan"), param_norm=1.0)]
    >>> nonfinite(Evidence(rows, losses=[2.3])).message
    "the gradients of '0' are not finite."
    >>> [f.kind for f in find_problems(Evidence(rows, losses=[2.3]))]
    ['nonfinite']
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from lightning_gradguard.doctor.evidence import RELU_ACTIVATIONS, Evidence
from lightning_gradguard.doctor.report import SEVERITIES, Finding, LayerRow, _fmt

__all__ = [
    "RULES",
    "Rule",
    "batchnorm_small_batch",
    "dying",
    "exploding",
    "find_problems",
    "nonfinite",
    "saturating",
    "unused",
    "vanishing",
    "weight_scale",
]

Rule = Callable[[Evidence], "Finding | None"]
"""A rule: the evidence in, a finding (or ``None``) out."""


# --------------------------------------------------------------------------- advice

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


def _normalize(e: Evidence, where: str) -> str:
    """The advice to normalize ``where``, fitting the batch size."""
    small, size = e.thresholds.small_batch, e.batch_size
    if size is not None and size < small:
        return (
            f"Normalize {where} with GroupNorm or LayerNorm: at batch size {size} "
            f"BatchNorm's batch statistics are too noisy (it needs about {small} or more)."
        )
    return (
        f"Normalize {where}: Linear -> BatchNorm1d -> activation (Conv -> BatchNorm2d); "
        f"GroupNorm or LayerNorm when batches are small (under {small})."
    )


def _structural(e: Evidence) -> list[str]:
    """Normalization and skip connections, for what the model lacks."""
    arch = e.architecture
    return ([] if arch.normalization else [_normalize(e, "before the activation")]) + (
        [] if arch.residual else [_SKIP]
    )


def _quoted(names: Sequence[str], limit: int = 6) -> str:
    listed = [f"'{name}'" for name in names]
    more = f" and {len(listed) - limit} more" if len(listed) > limit else ""
    return ", ".join(listed[:limit]) + more


def _names(rows: Sequence[LayerRow], limit: int = 6) -> str:
    return _quoted([r.name for r in rows], limit)


def _dead(e: Evidence) -> list[LayerRow]:
    return [
        r
        for r in e.rows
        if r.dead_fraction is not None and r.dead_fraction >= e.thresholds.dead_threshold
    ]


# --------------------------------------------------------------------------- rules


def nonfinite(e: Evidence) -> Finding | None:
    """The loss or a layer's gradient is inf/NaN (error).

    Example:
        >>> nonfinite(Evidence([], losses=[float("inf")])).message
        'the loss is inf at step 0.'
    """
    bad_losses, rows = e.bad_loss_steps, e.nonfinite_rows
    if not bad_losses and not rows:
        return None
    what = []
    if bad_losses:
        what.append(f"the loss is {_fmt(e.losses[bad_losses[0]], 'g')} at step {bad_losses[0]}")
    if rows:
        what.append(f"the gradients of {_names(rows)} are not finite")
    recs = ["Check the batch and the loss for inf/NaN: inputs, labels, log(0), division by 0."]
    high = e.off_he(low=False)
    if high:
        recs.append(
            f"The weights are too large for the depth ({_names(high, 3)} at "
            f"{max(r.he_ratio or 0 for r in high):.2g}x the He std): "
            "re-initialize (He for ReLU, Glorot for tanh)."
        )
    recs += [
        "AdaptiveGradClip(skip_nonfinite=True) (its default) skips steps whose gradients "
        "are not finite instead of writing NaN into the weights.",
        _LR,
    ]
    return Finding("nonfinite", "error", "; ".join(what) + ".", _layer_names(rows), tuple(recs))


def _tiny(e: Evidence) -> list[LayerRow]:
    return [
        r
        for r in e.with_grad
        if r.grad_norm is not None
        and math.isfinite(r.grad_norm)
        and r.grad_norm < e.thresholds.vanishing_threshold
    ]


def _vanishes(e: Evidence) -> bool:
    ratio = e.first_last
    return (ratio is not None and ratio < e.thresholds.vanishing_ratio) or bool(_tiny(e))


def _vanishing_advice(e: Evidence) -> list[str]:
    sigmoid_fed, tanh_fed = e.fed("Sigmoid"), e.fed("Tanh")
    if sigmoid_fed:
        return [
            "Replace the sigmoids by ReLU with He init (lightning_gradguard.functional."
            "init_(model, 'kaiming_normal') infers the gain).",
            "Glorot init alone does not rescue a deep sigmoid stack: with any weights the "
            "sigmoid's slope (at most 0.25) shrinks the gradient layer after layer.",
            _normalize(e, "before each sigmoid"),
            *([] if e.architecture.residual else [_SKIP]),
        ]
    if tanh_fed:
        return [
            "Initialize the tanh layers with Glorot (Xavier) init and tanh's gain 5/3: "
            "lightning_gradguard.functional.init_(model, 'xavier_uniform') infers the gain.",
            *_structural(e),
        ]
    recs: list[str] = []
    relu_fed = [r for r in e.rows if r.is_matrix_layer and r.activation in RELU_ACTIVATIONS]
    low = e.off_he(low=True)
    if any(r in low for r in relu_fed):
        recs.append(
            _HE + f" Now the weights are {min(r.he_ratio or 0 for r in relu_fed):.2g}x the He std."
        )
    if _dead(e):
        recs.append("Dead ReLU units pass no gradient: see the 'dying' finding.")
    return recs + _structural(e)


def vanishing(e: Evidence) -> Finding | None:
    """The first Linear/Conv layer's gradient is tiny next to the last one's, or a layer's
    gradient norm is below ``vanishing_threshold`` (error).

    Example:
        >>> rows = [LayerRow(n, "Linear", g, 1, weight_std=0.1) for n, g in (("a", 1e-9), ("b", 1))]
        >>> vanishing(Evidence(rows)).layers
        ('a',)
    """
    if not _vanishes(e):
        return None
    finite, ratio, tiny = e.finite_matrix, e.first_last, _tiny(e)
    parts = []
    if ratio is not None:
        first, last = finite[0], finite[-1]
        per_layer = ratio ** (1.0 / max(len(finite) - 1, 1))
        factor = f", a factor {per_layer:.2g} per layer" if per_layer > 0 else ""
        parts.append(
            f"the gradient norm falls from {_fmt(last.grad_norm, 'e')} at the last layer "
            f"('{last.name}') to {_fmt(first.grad_norm, 'e')} at the first ('{first.name}'): "
            f"first/last = {_fmt(ratio, 'e')}{factor} over {len(finite)} layers"
        )
    if tiny:
        parts.append(f"{len(tiny)} layer(s) below {e.thresholds.vanishing_threshold:g}")
    sigmoid_fed = e.fed("Sigmoid")
    if sigmoid_fed:
        parts.append(
            f"{len(sigmoid_fed)} layers feed a sigmoid without normalization (its slope is at "
            "most 0.25: the gradient shrinks at least 4x per layer)"
        )
    recs = [*_vanishing_advice(e), _CHECK_LOSS]
    layers = _layer_names(tiny or finite[:1])
    return Finding("vanishing", "error", "; ".join(parts) + ".", layers, tuple(recs))


def saturating(e: Evidence) -> Finding | None:
    """Five or more layers feed a sigmoid without normalization, and the gradients do not
    vanish yet (warning; reported inside ``vanishing`` when they do).

    Example:
        >>> rows = [LayerRow(str(i), "Linear", 1.0, 1.0, activation="Sigmoid", weight_std=0.1)
        ...         for i in range(5)]
        >>> saturating(Evidence(rows)).severity
        'warning'
    """
    sigmoid_fed = e.fed("Sigmoid")
    if len(sigmoid_fed) < 5 or _vanishes(e):
        return None
    return Finding(
        "saturating",
        "warning",
        f"{len(sigmoid_fed)} layers feed a sigmoid without normalization: the gradient "
        "shrinks at least 4x per sigmoid; deeper stacks stop learning.",
        _layer_names(sigmoid_fed),
        (
            "Replace the sigmoids by ReLU with He init.",
            _normalize(e, "before each sigmoid"),
            *([] if e.architecture.residual else [_SKIP]),
        ),
    )


def exploding(e: Evidence) -> Finding | None:
    """The global gradient norm is above ``exploding_threshold``, a hidden Linear/Conv
    layer's grad/param ratio is above ``exploding_ratio``, or the gradient grows toward
    the input (error; not when a gradient or the loss is already not finite).

    Example:
        >>> rows = [LayerRow(n, "Linear", 500.0, 1.0, weight_std=0.1) for n in ("a", "b")]
        >>> exploding(Evidence(rows)).layers
        ('a',)
    """
    if e.bad_loss_steps or e.nonfinite_rows:
        return None
    t, matrix, ratio = e.thresholds, e.matrix, e.first_last
    total = math.sqrt(math.fsum((r.grad_norm or 0.0) ** 2 for r in e.with_grad))
    # the last layer's gradient follows the loss, not the depth: it is left out
    # a layer whose output a normalization consumes is scale-free: the loss does not
    # depend on its weight norm, and its gradient shrinks as the weights grow, so its
    # ratio is no sign of an explosion (a ResNet's first conv, before BatchNorm)
    steep = [r for r in matrix[:-1] if (r.ratio or 0.0) > t.exploding_ratio and not r.normalized]
    growing = ratio is not None and ratio > 1.0 / t.vanishing_ratio
    if not (total > t.exploding_threshold or steep or growing):
        return None
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
        parts.append(f"the gradient grows toward the input (first/last = {_fmt(ratio, 'e')})")
    recs = [_CLIP]
    hidden = [r for r in matrix[:-1] if r.he_ratio is not None and not r.normalized]
    if hidden:
        mean = math.exp(math.fsum(math.log(r.he_ratio or 1.0) for r in hidden) / len(hidden))
        if mean > 1.2:
            recs.append(
                f"Re-initialize: the hidden weights are on average {mean:.2g}x the He std, "
                f"which compounds to about {mean ** len(hidden):.2g}x over {len(hidden)} "
                "layers (He init for ReLU, Glorot for tanh)."
            )
    if not e.architecture.normalization:
        recs += [_LR, _normalize(e, "before the activation")]
    else:
        recs.append(_LR)
    return Finding("exploding", "error", "; ".join(parts) + ".", _layer_names(steep), tuple(recs))


def dying(e: Evidence) -> Finding | None:
    """A ReLU call site (module or functional) has at least ``dead_threshold`` of its units
    never active (warning; error from 90%). One entry per call site, with the first layer
    feeding it.

    Example:
        >>> row = LayerRow("0", "Linear", 1.0, 1.0, dead_fraction=0.95, activation="ReLU",
        ...                activation_module="act#1")
        >>> dying(Evidence([row], bias_means={"0": -2.0})).recommendations[0]
        "Initialize biases at 0: the biases of '0' (mean -2) push the units below 0."
    """
    t = e.thresholds
    sites: dict[str, LayerRow] = {}
    for row in e.rows:
        if row.dead_fraction is None or row.activation not in RELU_ACTIVATIONS:
            continue
        if row.dead_fraction >= t.dead_threshold and row.activation_module not in sites:
            sites[row.activation_module or ""] = row  # the first layer feeding it
    if not sites:
        return None
    layers = list(sites.values())
    recs = []
    negative = [
        (r.name, mean)
        for r in layers
        if (mean := e.bias_means.get(r.name)) is not None and mean < -0.5
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
    band = t.scale_band
    off_scale = [
        r for r in layers if r.he_ratio is not None and not band[0] <= r.he_ratio <= band[1]
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
        f" (measured on only {e.samples} samples: a unit can look dead by chance)"
        if e.samples < 16
        else ""
    )
    worst = max(r.dead_fraction or 0.0 for r in layers)
    return Finding(
        "dying",
        "error" if worst >= 0.9 else "warning",
        f"units never active on the batch, so they pass no gradient: {detail}{note}.",
        _layer_names(layers),
        tuple(recs),
    )


def batchnorm_small_batch(e: Evidence) -> Finding | None:
    """The model has BatchNorm (any ``nn.modules.batchnorm._BatchNorm``: batch statistics in
    training) and the batch is smaller than ``small_batch`` (warning).

    Example:
        >>> batchnorm_small_batch(Evidence([], batch_size=4, batch_norms=("bn",))).layers
        ('bn',)
    """
    names = e.batch_norms
    if not names or e.batch_size is None or e.batch_size >= e.thresholds.small_batch:
        return None
    return Finding(
        "batchnorm_small_batch",
        "warning",
        f"{_quoted(names, 3)} normalize with statistics of {e.batch_size} samples: "
        "noisy in training, and different from the running statistics used in evaluation.",
        tuple(names),
        (
            "Use GroupNorm or LayerNorm, which do not depend on the batch size.",
            "Or use larger batches (SyncBatchNorm when the global batch is large but "
            "split across devices).",
        ),
    )


def weight_scale(e: Evidence) -> Finding | None:
    """A Linear/Conv weight std is outside the band around both the He and the Glorot std
    (info: it explains, it does not fail a run).

    Example:
        >>> row = LayerRow("0", "Linear", 1.0, 1.0, weight_std=0.01, he_std=0.1, glorot_std=0.1)
        >>> weight_scale(Evidence([row])).message.split(": ")[1].split(")")[0]
        "'0' 0.1x"
    """
    low, high = e.thresholds.scale_band
    off = [
        r
        for r in e.rows
        if r.he_ratio is not None
        and r.glorot_ratio is not None
        and not (low <= r.he_ratio <= high)
        and not (low <= r.glorot_ratio <= high)
    ]
    if not off:
        return None
    transformer = e.architecture.transformer
    detail = ", ".join(f"'{r.name}' {r.he_ratio:.2g}x" for r in off[:4])
    more = f" and {len(off) - 4} more" if len(off) > 4 else ""
    message = (
        f"{len(off)} layer(s) have a weight std outside {low:g}-{high:g}x both the He and the "
        f"Glorot std for their activation (std/He: {detail}{more}). PyTorch's default init of "
        "Linear/Conv is about 0.41x the He std for ReLU."
    )
    if transformer:
        message += (
            " Transformers are initialized at a small fixed std by design (GPT-2: 0.02, "
            "its residual projections 0.02/sqrt(2 n_layer)), with LayerNorm and "
            "residual connections keeping the signal's scale."
        )
    advice = (
        "Nothing to do unless training stalls: the residual stream and LayerNorm "
        "carry the scale. To re-initialize as GPT-2 does: lightning_gradguard."
        "functional.init_(model, 'normal', std=0.02, "
        "residual_projections=['*.c_proj'], n_layers=<blocks>)."
        if transformer
        else "He init for ReLU-like activations, Glorot for tanh and sigmoid: "
        "lightning_gradguard.functional.init_(model, 'kaiming_normal' or "
        "'xavier_uniform') infers each layer's gain."
    )
    return Finding("weight_scale", "info", message, _layer_names(off), (advice,))


def unused(e: Evidence) -> Finding | None:
    """A trainable layer got no gradient: the loss does not use it (info).

    Example:
        >>> row = LayerRow("head", "Linear", None, 1.0)
        >>> unused(Evidence([row], trainable=frozenset({"head"}))).message
        "'head' got no gradient: the loss does not use them."
    """
    rows = [r for r in e.rows if r.grad_norm is None and r.name in e.trainable]
    if not rows:
        return None
    return Finding(
        "unused",
        "info",
        f"{_names(rows)} got no gradient: the loss does not use them.",
        _layer_names(rows),
        (
            "Remove them or freeze them (requires_grad=False); under DDP unused "
            "parameters need find_unused_parameters=True.",
        ),
    )


def _layer_names(rows: Sequence[LayerRow]) -> tuple[str, ...]:
    return tuple(r.name for r in rows)


RULES: tuple[Rule, ...] = (
    nonfinite,
    vanishing,
    saturating,
    exploding,
    dying,
    batchnorm_small_batch,
    weight_scale,
    unused,
)
"""Every rule, in the order their findings are listed within one severity."""


def find_problems(evidence: Evidence, rules: Sequence[Rule] = RULES) -> list[Finding]:
    """Run ``rules`` on ``evidence``: their findings, most severe first (stable otherwise).

    Example:
        >>> find_problems(Evidence([LayerRow("0", "Linear", 0.5, 1.0)]))
        []
    """
    findings = [f for rule in rules if (f := rule(evidence)) is not None]
    return sorted(findings, key=lambda f: -SEVERITIES.index(f.severity))

"""Initialization schemes (LSUV: :mod:`.lsuv`; recycling and shrink-and-perturb: :mod:`.redo`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    >>> init_(model, "xavier_uniform")
    {'0': 'tanh', '2': 'linear'}
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gradguard._checks import check_choice, check_number, is_number
from lightning_gradguard.functional.units import Layer, LayerMap, UnitLayout, map_layers

__all__ = [
    "FAN_KINDS",
    "NORM_LAYERS",
    "PASS_THROUGH",
    "SCHEMES",
    "WEIGHT_LAYERS",
    "InitReport",
    "consumer_nonlinearities",
    "init_",
    "init_layer_",
    "init_weight_",
]

SCHEMES = (
    "kaiming_normal",
    "kaiming_uniform",
    "xavier_normal",
    "xavier_uniform",
    "orthogonal",
    "normal",
)
"""Names accepted by :func:`init_`."""

WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
)
PASS_THROUGH: tuple[type[nn.Module], ...] = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)

FAN_KINDS = ("linear", "conv", "conv1d")
"""Kinds of the unit map that fan-based schemes initialize (weights with inputs and units)."""

_GAIN_NAMES: dict[type[nn.Module], str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu",
    nn.LeakyReLU: "leaky_relu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.SELU: "selu",
}


def _weight(module: nn.Module) -> Tensor:
    weight = module.weight
    assert isinstance(weight, Tensor)
    return weight


def _bias(module: nn.Module) -> Tensor | None:
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, Tensor) else None


def _activation_of(module: nn.Module) -> tuple[str, float] | None:
    name = _GAIN_NAMES.get(type(module))
    if name is None:
        return None
    return name, float(getattr(module, "negative_slope", 0.0))


def consumer_nonlinearities(model: nn.Module) -> dict[str, tuple[str, float] | None]:
    """For each weight layer of the unit map, the activation that consumes it, if known.

    Weight layers are the Linear, Conv, ConvTranspose, Hugging Face ``Conv1D`` and
    attention-projection layers of :func:`~lightning_gradguard.functional.map_layers`.

    Norm and dropout layers in between are skipped. A layer followed by another
    weight layer, or last in its Sequential, gets ``("linear", 0.0)``. A layer
    followed by an activation without a known gain (GELU, SiLU, ...) or living
    outside a Sequential gets ``None``: it cannot be inferred.

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.ReLU(), nn.Linear(2, 1))
        >>> consumer_nonlinearities(m)
        {'0': ('relu', 0.0), '3': ('linear', 0.0)}
    """
    layer_map = map_layers(model)
    fan_modules = {id(layer.module): layer.name for layer in layer_map if layer.kind in FAN_KINDS}
    norm_modules = {id(layer.module) for layer in layer_map if layer.kind == "norm"}
    found: dict[str, tuple[str, float] | None] = {}
    for parent in model.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for i, (_, child) in enumerate(children):
            if id(child) not in fan_modules:
                continue
            result: tuple[str, float] | None = ("linear", 0.0)
            for _, after in children[i + 1 :]:
                if id(after) in norm_modules or isinstance(after, NORM_LAYERS + PASS_THROUGH):
                    continue
                if id(after) in fan_modules:
                    break
                result = _activation_of(after)
                break
            found[fan_modules[id(child)]] = result
    for name in fan_modules.values():
        found.setdefault(name, None)
    return found


def _validate_scheme(scheme: Any, owner: str) -> None:
    check_choice(scheme, "scheme", owner, SCHEMES)


def _write_rows_(weight: Tensor, layout: UnitLayout, rows: Tensor) -> None:
    """Write ``rows`` (``[units, rest]``) into ``weight`` through its unit layout."""
    viewed = layout.view(weight).permute((*layout.unit_dims, *layout.reduce_dims))
    viewed.copy_(rows.reshape(viewed.shape))


def init_weight_(
    weight: Tensor,
    scheme: str,
    nonlinearity: str = "relu",
    negative_slope: float = 0.0,
    std: float = 0.02,
    generator: torch.Generator | None = None,
    fans: tuple[int, int] | None = None,
    layout: UnitLayout | None = None,
) -> None:
    """Initialize one weight tensor in place with a named scheme (see :data:`SCHEMES`).

    Kaiming: std ``gain / sqrt(fan_in)``; Glorot: ``gain · sqrt(2 / (fan_in + fan_out))``
    (uniform draws have the same std); orthogonal: orthonormal units, scaled by the gain;
    ``"normal"``: std ``std``. The draws are torch's own (``nn.init``) for the same fans.

    Args:
        weight: the tensor.
        scheme: one of :data:`SCHEMES`.
        nonlinearity: the gain's nonlinearity (``nn.init.calculate_gain``).
        negative_slope: LeakyReLU's slope.
        std: the std of ``"normal"``.
        generator: random generator, for identical draws on every rank.
        fans: ``(fan_in, fan_out)``. Without it the weight is read as ``[out, in, ...]``
            (Linear, Conv), as ``nn.init`` does: wrong for Hugging Face ``Conv1D`` and
            transposed convs. Take them from the unit map (:func:`init_layer_` does).
        layout: the weight's unit layout, for ``"orthogonal"`` (default: units in dim 0).

    Example:
        >>> w = torch.empty(256, 64)  # a Conv1D weight [in=256, out=64]
        >>> init_weight_(w, "kaiming_normal", "linear", fans=(256, 64))
        >>> round(float(w.std()) * 16, 1)  # std 1/sqrt(256)
        1.0
    """
    _validate_scheme(scheme, "init_weight_")
    with torch.no_grad():
        if scheme == "normal":
            weight.normal_(0.0, std, generator=generator)
            return
        if fans is None:
            fans = nn.init._calculate_fan_in_and_fan_out(weight)
        fan_in, fan_out = fans
        param = negative_slope if nonlinearity == "leaky_relu" else None
        gain = nn.init.calculate_gain(nonlinearity, param)  # type: ignore[arg-type]
        if scheme in ("kaiming_normal", "kaiming_uniform"):
            scale = gain / math.sqrt(fan_in)
        elif scheme in ("xavier_normal", "xavier_uniform"):
            scale = gain * math.sqrt(2.0 / float(fan_in + fan_out))
        else:  # orthogonal: orthonormal units ([units, rest] rows), as nn.init.orthogonal_
            if layout is None or (layout.unit_dims == (0,) and weight.dim() >= 2):
                nn.init.orthogonal_(weight, gain=gain, generator=generator)
            else:
                rows = torch.empty(
                    layout.units,
                    weight.numel() // layout.units,
                    dtype=weight.dtype,
                    device=weight.device,
                )
                nn.init.orthogonal_(rows, gain=gain, generator=generator)
                _write_rows_(weight, layout, rows)
            return
        if scheme.endswith("normal"):
            weight.normal_(0.0, scale, generator=generator)
        else:
            bound = math.sqrt(3.0) * scale
            weight.uniform_(-bound, bound, generator=generator)


def init_layer_(
    layer: Layer,
    scheme: str,
    nonlinearity: str = "relu",
    negative_slope: float = 0.0,
    std: float = 0.02,
    generator: torch.Generator | None = None,
) -> None:
    """Initialize one layer of the unit map (:func:`~lightning_gradguard.functional.map_layers`).

    Its fans (receptive field and ``groups`` included, Conv1D and transposed convs the
    right way round) and unit layout come from the map. An embedding is a lookup
    table: one-hot inputs (``fan_in`` 1), linear gain, and its ``padding_idx`` row
    stays zero, as ``nn.Embedding`` keeps it. The bias is left to the caller.

    Example:
        >>> from lightning_gradguard.functional.units import map_layers
        >>> layer = map_layers(nn.Sequential(nn.Embedding(1000, 8)))["0"]
        >>> init_layer_(layer, "kaiming_normal")  # one-hot input: torch's N(0, 1)
        >>> round(float(layer.weight.detach().std()), 1)
        1.0
    """
    if layer.spec.lookup:
        nonlinearity, negative_slope = "linear", 0.0
    init_weight_(
        layer.weight,
        scheme,
        nonlinearity,
        negative_slope,
        std,
        generator,
        fans=(layer.fan_in, layer.fan_out),
        layout=layer.layout,
    )
    padding_idx = getattr(layer.module, "padding_idx", None)
    if layer.spec.lookup and isinstance(padding_idx, int):
        with torch.no_grad():
            layer.weight[padding_idx].zero_()


class InitReport(dict[str, str]):
    """What :func:`init_` did: each initialized layer's name and the gain it used.

    A ``dict`` (layer name → nonlinearity), with two more attributes.

    Attributes:
        skipped: layers and modules left as they were, with the reason (norm affines,
            kinds without an init rule, modules the unit map does not know).
        tied: modules whose weight was initialized once under another name
            (``{"lm_head": "transformer.wte"}``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.skipped: dict[str, str] = {}
        self.tied: dict[str, str] = {}


def _check_init_args(
    scheme: str,
    nonlinearity: str | None,
    residual_projections: Sequence[str],
    n_layers: int | None,
    std: float = 0.02,
    owner: str = "init_",
) -> None:
    _validate_scheme(scheme, owner)
    check_number(std, "std", owner, low=0, low_open=True)
    if nonlinearity is not None:
        check_choice(nonlinearity, "nonlinearity", owner, sorted({*_GAIN_NAMES.values(), "linear"}))
    if residual_projections and not (
        is_number(n_layers) and isinstance(n_layers, int) and n_layers >= 1
    ):
        raise ValueError(
            f"{owner}(n_layers={n_layers!r}): n_layers must be the number of residual blocks "
            "(an integer >= 1) with residual_projections: their std is divided by "
            "sqrt(2 * n_layers)."
        )


def _layer_keys(layer_map: LayerMap) -> dict[int, str]:
    """How reports name each layer: its module, or its parameter where a module has several."""
    counts: dict[str, int] = {}
    for layer in layer_map:
        counts[layer.name] = counts.get(layer.name, 0) + 1
    return {
        id(layer): layer.name if counts[layer.name] == 1 else layer.parameter_name
        for layer in layer_map
    }


def _skip_unknown(layer_map: LayerMap, report: dict[str, str], owner: str) -> None:
    """Name the modules whose parameters the unit map does not know (report + warning)."""
    for name, held in layer_map.unknown.items():
        report[name or "<root>"] = (
            f"the unit map does not know this layer (parameters {list(held)}): register it "
            "with register_layer"
        )
    if layer_map.unknown:
        warnings.warn(
            f"{owner}: left {sorted(n or '<root>' for n in layer_map.unknown)} as they were: "
            "the unit map does not know these layers (register them with "
            "lightning_gradguard.functional.register_layer).",
            stacklevel=3,
        )


def init_(
    model: nn.Module,
    scheme: str = "kaiming_normal",
    nonlinearity: str | None = None,
    std: float = 0.02,
    residual_projections: Sequence[str] = (),
    n_layers: int | None = None,
    bias: float = 0.0,
    generator: torch.Generator | None = None,
) -> InitReport:
    """Initialize every weight layer of ``model`` with a named scheme, in place.

    The layers come from the unit map
    (:func:`~lightning_gradguard.functional.map_layers`): Linear, Conv,
    ConvTranspose, Hugging Face ``Conv1D`` and ``MultiheadAttention``'s input
    projection get the scheme with their own fans; embeddings are initialized as
    lookup tables (see :func:`init_layer_`), once, even when tied to an output head
    (GPT-2's ``lm_head``); norm affines keep their values. Whatever is left alone
    is named in :attr:`InitReport.skipped`, with a warning for layers the map does
    not know.

    Args:
        model: the module tree.
        scheme: one of :data:`SCHEMES`. ``"normal"`` is GPT-2's fixed-std scheme.
        nonlinearity: the gain to use where it cannot be inferred. The gain of a
            layer inside an ``nn.Sequential`` follows the activation that consumes
            it (ReLU, LeakyReLU with its slope, Tanh, Sigmoid, SELU; none: linear).
            When ``None`` and not inferable, ``"relu"`` for Kaiming, ``"linear"``
            otherwise. Passing a value forces it everywhere but on embeddings.
        std: the standard deviation of ``scheme="normal"`` (GPT-2: 0.02).
        residual_projections: glob patterns of layer names (e.g. ``"*.c_proj"``)
            whose std is scaled by ``1/sqrt(2 * n_layers)`` with ``scheme="normal"``,
            as GPT-2 does for the projections that write into the residual stream.
        n_layers: number of residual blocks, required with ``residual_projections``.
        bias: value every bias is set to.
        generator: random generator, for identical draws on every rank.

    Returns:
        An :class:`InitReport`: each initialized layer's name and the nonlinearity
        its gain used, and what was skipped or tied.

    Raises:
        ValueError: on an unknown scheme or nonlinearity, residual projections
            without ``n_layers``, or a ``residual_projections`` pattern that matches
            no layer of the model.

    Example:
        >>> class TinyLM(nn.Module):  # an output head tied to the token embedding
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.wte = nn.Embedding(100, 16)
        ...         self.proj = nn.Linear(16, 16)
        ...         self.ln = nn.LayerNorm(16)
        ...         self.lm_head = nn.Linear(16, 100, bias=False)
        ...         self.lm_head.weight = self.wte.weight
        >>> report = init_(TinyLM(), "normal", std=0.02)
        >>> dict(report), report.tied
        ({'wte': 'linear', 'proj': 'linear'}, {'lm_head': 'wte'})
        >>> report.skipped
        {'ln': 'norm affine: kept as it is'}
    """
    _check_init_args(scheme, nonlinearity, residual_projections, n_layers, std)
    layer_map = map_layers(model)
    fan_layers = [layer for layer in layer_map if layer.kind in FAN_KINDS]
    names = [layer.name for layer in fan_layers]
    unmatched = [
        p for p in residual_projections if not any(fnmatch.fnmatchcase(n, p) for n in names)
    ]
    if unmatched:
        raise ValueError(
            f"residual_projections={list(residual_projections)!r}: {unmatched} match no "
            f"Linear/Conv/Conv1D layer of the model (layers: {names[:8]}"
            f"{', ...' if len(names) > 8 else ''})."
        )
    inferred = consumer_nonlinearities(model)
    fallback = "relu" if scheme.startswith("kaiming") else "linear"
    report = InitReport()
    report.tied.update(layer_map.tied)
    keys = _layer_keys(layer_map)
    for layer in layer_map:
        name = keys[id(layer)]
        if layer.kind == "norm":
            report.skipped[name] = "norm affine: kept as it is"
            continue
        if layer.kind not in (*FAN_KINDS, "embedding"):
            report.skipped[name] = f"kind {layer.kind!r} has no init rule"
            continue
        if layer.kind == "embedding":
            nl, slope = "linear", 0.0
        elif nonlinearity is not None:
            nl, slope = nonlinearity, 0.01 if nonlinearity == "leaky_relu" else 0.0
        else:
            nl, slope = inferred.get(layer.name) or (fallback, 0.0)
        layer_std = std
        if any(fnmatch.fnmatchcase(layer.name, p) for p in residual_projections):
            assert n_layers is not None
            layer_std = std / math.sqrt(2 * n_layers)
        init_layer_(layer, scheme, nl, slope, layer_std, generator)
        if layer.bias is not None:
            with torch.no_grad():
                layer.bias.fill_(bias)
        report[name] = nl
    custom = [n for n, why in report.skipped.items() if why.startswith("kind")]
    if custom:
        warnings.warn(
            f"init_: left {custom} as they were: their kinds have no init rule.", stacklevel=2
        )
    _skip_unknown(layer_map, report.skipped, "init_")
    return report

"""Initialization schemes and LSUV (recycling and shrink-and-perturb: :mod:`.redo`).

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

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
    """For each weight layer inside an ``nn.Sequential``, the activation that consumes it.

    Norm and dropout layers in between are skipped. A layer followed by another
    weight layer, or last in its Sequential, gets ``("linear", 0.0)``. A layer
    followed by an activation without a known gain (GELU, SiLU, ...) or living
    outside a Sequential gets ``None``: it cannot be inferred.

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.ReLU(), nn.Linear(2, 1))
        >>> consumer_nonlinearities(m)
        {'0': ('relu', 0.0), '3': ('linear', 0.0)}
    """
    found: dict[str, tuple[str, float] | None] = {}
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for i, (child_name, child) in enumerate(children):
            if not isinstance(child, WEIGHT_LAYERS):
                continue
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            result: tuple[str, float] | None = ("linear", 0.0)
            for _, after in children[i + 1 :]:
                if isinstance(after, NORM_LAYERS + PASS_THROUGH):
                    continue
                if isinstance(after, WEIGHT_LAYERS):
                    break
                result = _activation_of(after)
                break
            found[full] = result
    for name, module in model.named_modules():
        if isinstance(module, WEIGHT_LAYERS) and name not in found:
            found[name] = None
    return found


def _validate_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r} is not an init scheme: use one of {list(SCHEMES)}.")


def init_weight_(
    weight: Tensor,
    scheme: str,
    nonlinearity: str = "relu",
    negative_slope: float = 0.0,
    std: float = 0.02,
    generator: torch.Generator | None = None,
) -> None:
    """Initialize one weight tensor in place with a named scheme (see :data:`SCHEMES`)."""
    _validate_scheme(scheme)
    with torch.no_grad():
        if scheme == "normal":
            weight.normal_(0.0, std, generator=generator)
        elif scheme in ("kaiming_normal", "kaiming_uniform"):
            fn = nn.init.kaiming_normal_ if scheme == "kaiming_normal" else nn.init.kaiming_uniform_
            if nonlinearity in ("relu", "leaky_relu"):
                fn(weight, a=negative_slope, nonlinearity=nonlinearity, generator=generator)  # type: ignore[arg-type]
            else:  # tanh, sigmoid, selu, linear: Kaiming's std is gain / sqrt(fan_in)
                fan_in = nn.init._calculate_correct_fan(weight, "fan_in")
                gain = nn.init.calculate_gain(nonlinearity)  # type: ignore[arg-type]
                bound_std = gain / math.sqrt(fan_in)
                if scheme == "kaiming_normal":
                    weight.normal_(0.0, bound_std, generator=generator)
                else:
                    bound = math.sqrt(3.0) * bound_std
                    weight.uniform_(-bound, bound, generator=generator)
        else:
            param = negative_slope if nonlinearity == "leaky_relu" else None
            gain = nn.init.calculate_gain(nonlinearity, param)  # type: ignore[arg-type]
            if scheme == "xavier_normal":
                nn.init.xavier_normal_(weight, gain=gain, generator=generator)
            elif scheme == "xavier_uniform":
                nn.init.xavier_uniform_(weight, gain=gain, generator=generator)
            else:
                nn.init.orthogonal_(weight, gain=gain, generator=generator)


def init_(
    model: nn.Module,
    scheme: str = "kaiming_normal",
    nonlinearity: str | None = None,
    std: float = 0.02,
    residual_projections: Sequence[str] = (),
    n_layers: int | None = None,
    bias: float = 0.0,
    generator: torch.Generator | None = None,
) -> dict[str, str]:
    """Initialize every Linear and Conv layer of ``model`` with a named scheme, in place.

    Args:
        model: the module tree.
        scheme: one of :data:`SCHEMES`. ``"normal"`` is GPT-2's fixed-std scheme.
        nonlinearity: the gain to use where it cannot be inferred. The gain of a
            layer inside an ``nn.Sequential`` follows the activation that consumes
            it (ReLU, LeakyReLU with its slope, Tanh, Sigmoid, SELU; none: linear).
            When ``None`` and not inferable, ``"relu"`` for Kaiming, ``"linear"``
            otherwise. Passing a value forces it everywhere.
        std: the standard deviation of ``scheme="normal"`` (GPT-2: 0.02).
        residual_projections: glob patterns of layer names (e.g. ``"*.c_proj"``)
            whose std is scaled by ``1/sqrt(2 * n_layers)`` with ``scheme="normal"``,
            as GPT-2 does for the projections that write into the residual stream.
        n_layers: number of residual blocks, required with ``residual_projections``.
        bias: value every bias is set to.
        generator: random generator, for identical draws on every rank.

    Returns:
        Each initialized layer's name and the nonlinearity its gain used.

    Raises:
        ValueError: on an unknown scheme or nonlinearity, or residual projections
            without ``n_layers``.
    """
    _validate_scheme(scheme)
    if nonlinearity is not None and nonlinearity not in {*_GAIN_NAMES.values(), "linear"}:
        raise ValueError(
            f"nonlinearity={nonlinearity!r} has no known gain: use one of "
            f"{sorted({*_GAIN_NAMES.values(), 'linear'})}."
        )
    if residual_projections and (
        n_layers is None
        or isinstance(n_layers, bool)
        or not isinstance(n_layers, int)
        or n_layers < 1
    ):
        raise ValueError(
            f"n_layers={n_layers!r}: residual_projections need the number of residual blocks "
            "(the std is divided by sqrt(2 * n_layers))."
        )
    inferred = consumer_nonlinearities(model)
    fallback = "relu" if scheme.startswith("kaiming") else "linear"
    used: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, WEIGHT_LAYERS):
            continue
        if nonlinearity is not None:
            nl, slope = nonlinearity, 0.01 if nonlinearity == "leaky_relu" else 0.0
        else:
            nl, slope = inferred.get(name) or (fallback, 0.0)
        layer_std = std
        if residual_projections and any(fnmatch.fnmatchcase(name, p) for p in residual_projections):
            assert n_layers is not None
            layer_std = std / math.sqrt(2 * n_layers)
        init_weight_(_weight(module), scheme, nl, slope, layer_std, generator)
        layer_bias = _bias(module)
        if layer_bias is not None:
            with torch.no_grad():
                layer_bias.fill_(bias)
        used[name] = nl
    return used


# --------------------------------------------------------------------------- LSUV


@dataclass
class LSUVReport:
    """What :func:`lsuv_` did.

    Attributes:
        output_std: final output std of each layer it scaled.
        iterations: rescaling iterations per layer.
        not_converged: layers still outside the tolerance after ``max_iters``.
        unreached: layers the batch's forward pass never went through.
    """

    output_std: dict[str, float] = field(default_factory=dict)
    iterations: dict[str, int] = field(default_factory=dict)
    not_converged: list[str] = field(default_factory=list)
    unreached: list[str] = field(default_factory=list)


@torch.no_grad()
def lsuv_(
    model: nn.Module,
    batch: Any,
    target_std: float = 1.0,
    tol: float = 0.1,
    max_iters: int = 10,
    orthonormal: bool = True,
    generator: torch.Generator | None = None,
) -> LSUVReport:
    """Layer-sequential unit-variance initialization (Mishkin & Matas, 2015), in place.

    Orthonormal pre-initialization of every Linear/Conv weight (biases zeroed),
    then, layer by layer in the order the forward pass reaches them, the weight
    is rescaled until the layer's output std on ``batch`` is within ``tol`` of
    ``target_std`` (at most ``max_iters`` forward passes per layer).

    Args:
        model: any module; layers in any nesting are found by forward hooks.
        batch: the input of ``model(batch)`` (a tensor, or a tuple/list unpacked
            as positional arguments).
        target_std: the output std to reach.
        tol: accepted distance from ``target_std``.
        max_iters: rescaling passes per layer.
        orthonormal: start from orthonormal weights (the paper's first step).
        generator: random generator for the orthonormal draws.

    Returns:
        An :class:`LSUVReport`, naming layers it could not reach or fit.
    """
    if not (isinstance(target_std, (int, float)) and target_std > 0):
        raise ValueError(f"target_std={target_std!r} must be a positive number.")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol={tol!r} must be a positive number.")
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters={max_iters!r} must be a positive integer.")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)]
    if orthonormal:
        for _, module in layers:
            nn.init.orthogonal_(_weight(module), generator=generator)
            layer_bias = _bias(module)
            if layer_bias is not None:
                layer_bias.zero_()
    args = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    order: list[str] = []
    handles = []
    for name, module in layers:

        def record(mod: nn.Module, inputs: Any, output: Any, name: str = name) -> None:
            if name not in order:
                order.append(name)

        handles.append(module.register_forward_hook(record))
    was_training = model.training
    model.eval()
    try:
        model(*args)
    finally:
        for handle in handles:
            handle.remove()
    report = LSUVReport(unreached=[n for n, _ in layers if n not in order])
    modules = dict(layers)
    for name in order:
        module = modules[name]
        captured: dict[str, Tensor] = {}

        def capture(
            mod: nn.Module, inputs: Any, output: Any, captured: dict[str, Tensor] = captured
        ) -> None:
            captured["out"] = output

        handle = module.register_forward_hook(capture)
        try:
            iterations = 0
            std = math.nan
            while iterations < max_iters:
                model(*args)
                std = float(captured["out"].float().std())
                if not math.isfinite(std) or abs(std - target_std) < tol or std == 0.0:
                    break
                _weight(module).mul_(target_std / std)
                iterations += 1
        finally:
            handle.remove()
        report.output_std[name] = std
        report.iterations[name] = iterations
        if not (math.isfinite(std) and abs(std - target_std) < tol):
            report.not_converged.append(name)
    model.train(was_training)
    return report

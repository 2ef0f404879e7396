"""Initialization schemes, LSUV, dormant-unit recycling (ReDo) and shrink-and-perturb.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    >>> init_(model, "xavier_uniform")
    {'0': 'tanh', '2': 'linear'}
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Iterable, Sequence
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
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not 0 < std < math.inf:
        raise ValueError(f"std={std!r} must be a positive finite number (GPT-2 uses 0.02).")
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


# --------------------------------------------------------------------------- ReDo


@dataclass(frozen=True)
class UnitPair:
    """A producer layer whose output units feed a consumer layer.

    Attributes:
        producer: name of the Linear/Conv that makes the units (its output rows).
        consumer: name of the Linear/Conv that reads them (its input columns).
        activation: name of the activation module in between (where units are
            measured), or ``None``.
        norms: names of normalization layers in between.
    """

    producer: str
    consumer: str
    activation: str | None = None
    norms: tuple[str, ...] = ()


def infer_unit_pairs(model: nn.Module) -> list[UnitPair]:
    """Producer→consumer pairs of the sequential stacks of ``model``.

    Inside every ``nn.Sequential``: a Linear/Conv, then any norm, activation and
    dropout layers, then the next Linear/Conv. For other graphs (residual blocks,
    attention) name the pairs yourself.

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(), nn.Linear(8, 2))
        >>> infer_unit_pairs(m)
        [UnitPair(producer='0', consumer='3', activation='1', norms=())]
    """
    pairs: list[UnitPair] = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        prefix = f"{parent_name}." if parent_name else ""
        children = list(parent.named_children())
        for i, (child_name, child) in enumerate(children):
            if not isinstance(child, WEIGHT_LAYERS):
                continue
            activation: str | None = None
            norms: list[str] = []
            for after_name, after in children[i + 1 :]:
                if isinstance(after, WEIGHT_LAYERS):
                    pairs.append(
                        UnitPair(prefix + child_name, prefix + after_name, activation, tuple(norms))
                    )
                    break
                if isinstance(after, NORM_LAYERS):
                    norms.append(prefix + after_name)
                elif isinstance(after, PASS_THROUGH):
                    continue
                elif activation is None and not list(after.parameters()):
                    activation = prefix + after_name
                else:
                    break  # something with parameters or a second activation: not a plain stack
    return pairs


def _reset_optimizer_entries(
    optimizer: torch.optim.Optimizer | None, parameter: Tensor, index: tuple[Any, ...]
) -> None:
    if optimizer is None:
        return
    state = optimizer.state.get(parameter)
    if not state:
        return
    for key, value in state.items():
        if key == "step" or not isinstance(value, Tensor) or value.shape != parameter.shape:
            continue
        value[index] = 0.0  # exp_avg, exp_avg_sq, max_exp_avg_sq, momentum_buffer, ...


def _zero_grad_entries(parameter: Tensor, index: tuple[Any, ...]) -> None:
    """Drop gradients already accumulated for recycled entries (mid-accumulation recycling)."""
    if parameter.grad is not None:
        parameter.grad[index] = 0.0


def _reset_norm_units(
    norm: nn.Module, mask: Tensor, units: int, optimizer: torch.optim.Optimizer | None
) -> None:
    batch_norm = isinstance(norm, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
    running_mean = getattr(norm, "running_mean", None)
    running_var = getattr(norm, "running_var", None)
    if batch_norm and isinstance(running_mean, Tensor) and isinstance(running_var, Tensor):
        running_mean[mask] = 0.0
        running_var[mask] = 1.0
    per_unit = batch_norm or isinstance(norm, nn.GroupNorm)
    per_unit = per_unit or (isinstance(norm, nn.LayerNorm) and norm.normalized_shape == (units,))
    if not per_unit:
        return
    for name, value in (("weight", 1.0), ("bias", 0.0)):
        tensor = getattr(norm, name, None)
        if isinstance(tensor, Tensor):
            tensor[mask] = value
            _reset_optimizer_entries(optimizer, tensor, (mask,))


@torch.no_grad()
def recycle_units_(
    model: nn.Module,
    pair: UnitPair,
    mask: Tensor,
    optimizer: torch.optim.Optimizer | None = None,
    scheme: str = "kaiming_normal",
    generator: torch.Generator | None = None,
) -> int:
    """Recycle the units in ``mask`` (ReDo, Sokar et al., 2023), in place.

    For each selected unit: new incoming weights drawn with ``scheme`` (the gain
    of the pair's activation), bias 0; its outgoing weights in the consumer set
    to 0, so the network's function is unchanged at first; the statistics and
    affine parameters of norm layers in between reset for that unit
    (BatchNorm: running mean 0, variance 1; weight 1, bias 0); and the
    optimizer state of exactly those entries zeroed (SGD ``momentum_buffer``,
    Adam/AdamW ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``), as are any
    gradients already accumulated for them. Adam's ``step``
    is per tensor and is left as it is: the fresh entries restart from zero
    moments with the tensor's bias correction.

    Args:
        model: the model holding the pair.
        pair: the producer/consumer pair (see :func:`infer_unit_pairs`).
        mask: bool tensor, one entry per unit (the producer's output units).
        optimizer: the optimizer whose state is reset, if any.
        scheme: initialization scheme for the new incoming weights.
        generator: random generator, for identical draws on every rank.

    Returns:
        How many units were recycled.

    Raises:
        ValueError: when the mask does not match the producer's units, or the
            model's parameters are sharded (FSDP2), where rows live on other ranks.
    """
    producer = model.get_submodule(pair.producer)
    consumer = model.get_submodule(pair.consumer)
    for module, role in ((producer, "producer"), (consumer, "consumer")):
        if not isinstance(module, WEIGHT_LAYERS):
            raise ValueError(
                f"{role} {getattr(pair, role)!r} is a {type(module).__name__}, not Linear/Conv."
            )
    try:
        from torch.distributed.tensor import DTensor

        if isinstance(_weight(producer), DTensor) or isinstance(_weight(consumer), DTensor):
            raise ValueError(
                "recycle_units_ does not support sharded (FSDP2 / DTensor) parameters: a unit's "
                "incoming and outgoing weights live on different ranks. Recycle before sharding, "
                "or use DDP."
            )
    except ImportError:  # pragma: no cover
        pass
    produced, consumed = _weight(producer), _weight(consumer)
    units = produced.shape[0]
    mask = mask.to(produced.device).bool()
    if mask.shape != (units,):
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}, expected ({units},): one entry per unit."
        )
    if consumed.shape[1] != units:
        raise ValueError(
            f"consumer {pair.consumer!r} reads {consumed.shape[1]} inputs but producer "
            f"{pair.producer!r} makes {units} units: not a producer/consumer pair."
        )
    count = int(mask.sum())
    if count == 0:
        return 0
    nonlinearity, slope = "relu", 0.0
    if pair.activation is not None:
        found = _activation_of(model.get_submodule(pair.activation))
        if found is not None:
            nonlinearity, slope = found
    fresh = torch.empty_like(produced)
    init_weight_(fresh, scheme, nonlinearity, slope, generator=generator)
    produced[mask] = fresh[mask]
    _reset_optimizer_entries(optimizer, produced, (mask,))
    _zero_grad_entries(produced, (mask,))
    produced_bias = _bias(producer)
    if produced_bias is not None:
        produced_bias[mask] = 0.0
        _reset_optimizer_entries(optimizer, produced_bias, (mask,))
        _zero_grad_entries(produced_bias, (mask,))
    consumed[:, mask] = 0.0
    _reset_optimizer_entries(optimizer, consumed, (slice(None), mask))
    _zero_grad_entries(consumed, (slice(None), mask))
    for norm_name in pair.norms:
        _reset_norm_units(model.get_submodule(norm_name), mask, units, optimizer)
    return count


@torch.no_grad()
def shrink_perturb_(
    model: nn.Module,
    shrink: float = 0.4,
    perturb: float = 0.1,
    generator: torch.Generator | None = None,
    modules: Iterable[str] | None = None,
) -> list[str]:
    """Shrink and perturb (Ash & Adams, 2020): ``θ ← shrink·θ + perturb·θ_fresh``, in place.

    ``θ_fresh`` is a fresh draw of PyTorch's default initialization of each
    Linear/Conv layer (``reset_parameters`` on a copy), so the noise has the
    scale of a new network.

    Args:
        model: the model.
        shrink: factor on the current parameters, in (0, 1].
        perturb: factor on the fresh draw, >= 0.
        generator: seeds the fresh draws, for identical noise on every rank
            (without one, the global RNG gives the seed).
        modules: names of the layers to treat (default: every Linear/Conv).

    Returns:
        The names of the layers changed.
    """
    if not (isinstance(shrink, (int, float)) and 0 < shrink <= 1):
        raise ValueError(f"shrink={shrink!r} must be in (0, 1].")
    if not (isinstance(perturb, (int, float)) and perturb >= 0):
        raise ValueError(f"perturb={perturb!r} must be a non-negative number.")
    wanted = None if modules is None else set(modules)
    changed: list[str] = []
    # One seed for the fresh draws: from the generator, else from the global RNG (which then
    # advances, so two calls perturb differently, as two draws should).
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, module in model.named_modules():
            if not isinstance(module, WEIGHT_LAYERS) or (wanted is not None and name not in wanted):
                continue
            fresh = copy.deepcopy(module)
            fresh.reset_parameters()  # type: ignore[operator]
            for current, noise in zip(
                module.parameters(recurse=False), fresh.parameters(recurse=False)
            ):
                current.mul_(shrink).add_(noise, alpha=perturb)
            changed.append(name)
    if wanted is not None and (missing := sorted(wanted - set(changed))):
        raise ValueError(
            f"modules contains {missing}, which are not Linear/Conv layers of the model."
        )
    return changed

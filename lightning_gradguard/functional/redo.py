"""Dormant-unit recycling (ReDo) and shrink-and-perturb.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> recycle_units_(model, UnitPair("0", "2", "1"), torch.tensor([True] + [False] * 7))
    1
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gradguard.functional.init import (
    NORM_LAYERS,
    PASS_THROUGH,
    WEIGHT_LAYERS,
    _activation_of,
    _bias,
    _weight,
    init_weight_,
)


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

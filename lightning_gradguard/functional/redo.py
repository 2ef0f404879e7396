"""Dormant-unit recycling (ReDo) on real blocks, and shrink-and-perturb.

:func:`recycle_units_` gives the dormant output units of a producer layer fresh
incoming weights, zeroes their outgoing weights in the consumer, resets their
norm affine and running statistics, and zeroes exactly those entries of the
optimizer state. Layers are read through the unit map
(``lightning_gradguard.functional.units``): a Hugging Face ``Conv1D``'s
units are its columns, a ``ConvTranspose``'s its dim 1. The pairs come from
:func:`~lightning_gradguard.functional.pairs.infer_unit_pairs`, and
:class:`PairActivity` measures the units where the consumer reads them.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> recycle_units_(model, UnitPair("0", "2", "1"), torch.tensor([True] + [False] * 7))
    1
    >>> model[2].weight[:, 0].tolist()
    [0.0, 0.0]
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_gradguard.functional.activity import ActivityTracker, UnitStats
from lightning_gradguard.functional.init import WEIGHT_LAYERS, _activation_of, init_weight_
from lightning_gradguard.functional.optimizer_state import reset_optimizer_state_
from lightning_gradguard.functional.pairs import (
    PairInference,
    PairTracer,
    UnitPair,
    check_pair,
    infer_unit_pairs,
    trace_unit_pairs,
    unit_layer,
)
from lightning_gradguard.functional.units import Layer

__all__ = [
    "PairActivity",
    "PairInference",
    "PairTracer",
    "UnitPair",
    "check_pair",
    "infer_unit_pairs",
    "recycle_units_",
    "shrink_perturb_",
    "site_nonlinearity",
    "trace_unit_pairs",
]

_FUNCTION_GAINS = {
    "relu": ("relu", 0.0),
    "relu6": ("relu", 0.0),
    "leaky_relu": ("leaky_relu", 0.01),
    "selu": ("selu", 0.0),
    "tanh": ("tanh", 0.0),
    "sigmoid": ("sigmoid", 0.0),
}


def site_nonlinearity(model: nn.Module, site: str | None) -> tuple[str, float] | None:
    """The gain name (and slope) of an activation call site, ``None`` if it has none.

    Example:
        >>> site_nonlinearity(nn.Sequential(nn.LeakyReLU(0.2)), "0#1")
        ('leaky_relu', 0.2)
        >>> site_nonlinearity(nn.Sequential(), ":relu"), site_nonlinearity(nn.GELU(), "")
        (('relu', 0.0), None)
    """
    if site is None:
        return None
    base = site.split("#")[0]
    if ":" in base:
        return _FUNCTION_GAINS.get(base.rsplit(":", 1)[1].rstrip("_"))
    try:
        return _activation_of(model.get_submodule(base))
    except AttributeError:
        return None


def _unit_index(dim: int, mask: Tensor) -> tuple[Any, ...]:
    return (*([slice(None)] * dim), mask)


def _refuse_dtensors(layers: Sequence[Layer]) -> None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return
    if any(isinstance(layer.weight, DTensor) for layer in layers):
        raise ValueError(
            "recycle_units_ does not support sharded (FSDP2 / DTensor) parameters: a unit's "
            "incoming and outgoing weights live on different ranks. Recycle before sharding, "
            "or use DDP."
        )


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
            reset_optimizer_state_(optimizer, tensor, (mask,))


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
    of the pair's activation call site; ReLU's where it has none, GELU say), with
    the fans of the layer as the unit map reads it (a Conv1D's ``[in, out]`` the
    right way round), bias 0; its outgoing weights in the consumer set to 0, so
    the network's function is unchanged at first; the statistics and affine
    parameters of the norm layers in between reset for that unit (BatchNorm:
    running mean 0, variance 1; weight 1, bias 0); and the optimizer state of
    exactly those entries zeroed (SGD ``momentum_buffer``, Adam/AdamW
    ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``), as are any gradients
    already accumulated for them. Adam's ``step`` is per tensor and is kept (the
    rule and its reason: :func:`~lightning_gradguard.functional.reset_optimizer_state_`).

    The draw is the same as ``scheme`` on an empty ``[units, inputs, ...]`` weight
    with ``generator``: identical on every rank given the same seed.

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
        ValueError: when the pair is not a producer/consumer pair of ``model`` (see
            :func:`check_pair`), the mask does not match the producer's units, or the
            parameters are sharded (FSDP2), where rows live on other ranks.
    """
    modules = dict(model.named_modules())
    found = [unit_layer(modules[n], n) for n in (pair.producer, pair.consumer) if n in modules]
    _refuse_dtensors([layer for layer in found if layer is not None])
    why = check_pair(model, pair)
    if why is not None:
        raise ValueError(f"{why}.")
    producer = unit_layer(modules[pair.producer], pair.producer)
    consumer = unit_layer(modules[pair.consumer], pair.consumer)
    assert producer is not None and consumer is not None
    produced, consumed = producer.weight, consumer.weight
    units = producer.units
    mask = mask.to(produced.device).bool()
    if mask.shape != (units,):
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}, expected ({units},): one entry per unit."
        )
    count = int(mask.sum())
    if count == 0:
        return 0
    nonlinearity, slope = site_nonlinearity(model, pair.activation) or ("relu", 0.0)
    rows = produced.movedim(producer.unit_dim, 0)  # a view: [units, inputs, kernel...]
    fresh = torch.empty(rows.shape, dtype=produced.dtype, device=produced.device)
    init_weight_(fresh, scheme, nonlinearity, slope, generator=generator)
    rows[mask] = fresh[mask]
    incoming = _unit_index(producer.unit_dim, mask)
    reset_optimizer_state_(optimizer, produced, incoming)
    _zero_grad_entries(produced, incoming)
    if producer.bias is not None:
        producer.bias[mask] = 0.0
        reset_optimizer_state_(optimizer, producer.bias, (mask,))
        _zero_grad_entries(producer.bias, (mask,))
    outgoing = _unit_index(1 - consumer.unit_dim, mask)
    consumed[outgoing] = 0.0
    reset_optimizer_state_(optimizer, consumed, outgoing)
    _zero_grad_entries(consumed, outgoing)
    for norm_name in pair.norms:
        _reset_norm_units(modules[norm_name], mask, units, optimizer)
    return count


class _InputActivity:
    """Per-unit activity of one consumer's input: positions > 0 and sum of |h|, per unit."""

    def __init__(self, units: int, channels_first: bool, device: torch.device) -> None:
        self.units = units
        self.channels_first = channels_first
        self.device = device
        self.failed: str | None = None
        self.reset()

    def reset(self) -> None:
        self.active = torch.zeros(self.units, dtype=torch.float64, device=self.device)
        self.abs_sum = torch.zeros(self.units, dtype=torch.float64, device=self.device)
        self.samples = 0  # positions seen, a host integer (shapes are known on the host)

    @torch.no_grad()
    def __call__(self, module: nn.Module, h: Tensor) -> None:
        if not module.training or self.failed is not None:
            return  # validation, test and predict passes are not training activity
        dim = 1 if self.channels_first and h.dim() > 1 else h.dim() - 1
        if h.dim() == 0 or h.shape[dim] != self.units:
            self.failed = f"input of shape {tuple(h.shape)} has no dimension of {self.units} units"
            return
        moved = h.detach().movedim(dim, -1).reshape(-1, self.units)
        self.active += (moved > 0).sum(0, dtype=torch.float64).to(self.device)
        self.abs_sum += moved.abs().sum(0, dtype=torch.float64).to(self.device)
        self.samples += moved.shape[0]


class PairActivity(ActivityTracker):
    """Unit activity of each pair, measured where the consumer reads the units.

    A forward pre-hook on each pair's consumer reads its input, which is the
    activation call site's output (through dropout, if any): exact whatever runs
    the activation (a module called twice, ``F.relu`` inside a ``forward``, a
    third-party module), with one width per consumer, known from its weight.
    Statistics are keyed by the pair's activation call site and read as
    :class:`~lightning_gradguard.functional.ActivityTracker`'s are (ReDo scores,
    dead units); :meth:`reduce` sums them across ranks with one ``all_reduce``.
    It plugs into :class:`~lightning_gradguard.functional.MeasuringWindows`.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> with torch.no_grad():
        ...     _ = model[0].bias.copy_(torch.tensor([-9.0, 9.0, 9.0, 9.0]))
        ...     _ = model[0].weight.zero_()
        >>> activity = PairActivity(model, [UnitPair("0", "2", "1")])
        >>> activity.attach()
        >>> _ = model(torch.randn(5, 3))
        >>> activity.detach()
        >>> activity.stats()["1"].dead.tolist()
        [True, False, False, False]
    """

    def __init__(
        self, model: nn.Module, pairs: Iterable[UnitPair], device: torch.device | str | None = None
    ) -> None:
        if device is None:
            device = next(model.parameters(), torch.empty(0)).device
        super().__init__(device=device)
        self.consumers: dict[str, nn.Module] = {}
        self._activity: dict[str, _InputActivity] = {}
        for pair in pairs:
            if not pair.activation:
                continue
            module = model.get_submodule(pair.consumer)
            self.consumers[pair.activation] = module
            self._activity[pair.activation] = self.accumulator_for(module, self.device)

    @staticmethod
    def accumulator_for(consumer: nn.Module, device: torch.device | None = None) -> _InputActivity:
        """A fresh accumulator of ``consumer``'s input: units in dim 1 (conv) or last."""
        layer = unit_layer(consumer)
        if layer is None:
            raise ValueError(f"{type(consumer).__name__} is not a weight layer of the unit map.")
        units = layer.weight.shape[1 - layer.unit_dim]
        where = device if device is not None else layer.weight.device
        return _InputActivity(units, layer.kind == "conv", torch.device(where))

    def adopt(self, site: str, accumulator: _InputActivity) -> None:
        """Use statistics accumulated elsewhere (by :meth:`accumulator_for`) for ``site``."""
        if site in self._activity:
            self._activity[site] = accumulator

    @property
    def measures_anything(self) -> bool:
        """Whether there is a consumer to hook."""
        return bool(self.consumers)

    def new_pass(self) -> None:
        """A new training batch (nothing to do: one consumer, one input per pass)."""

    def attach(self) -> None:
        """Attach the forward pre-hooks on the consumers (idempotent)."""
        if self._handles:
            return
        for site, module in self.consumers.items():

            def hook(module: nn.Module, args: Any, site: str = site) -> None:
                if args and isinstance(args[0], Tensor):
                    self._activity[site](module, args[0])

            self._handles.append(module.register_forward_pre_hook(hook))

    def detach(self) -> None:
        """Remove the hooks; accumulated statistics are kept."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def reset(self) -> None:
        """Forget accumulated statistics."""
        for activity in self._activity.values():
            activity.reset()
            activity.failed = None

    def reduce(self) -> None:
        """Sum the statistics across ranks: one ``all_reduce`` of one flat buffer.

        Widths come from the consumers' weights, the same on every rank, so no
        agreement step is needed. A no-op outside a distributed run.
        """
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        parts: list[Tensor] = []
        for activity in self._activity.values():
            extra = [float(activity.samples), 0.0 if activity.failed is None else 1.0]
            parts += [activity.active, activity.abs_sum]
            parts.append(torch.tensor(extra, dtype=torch.float64).to(activity.active.device))
        if not parts:
            return
        flat = torch.cat(parts)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        tails = []
        for activity in self._activity.values():
            tails += [offset + 2 * activity.units, offset + 2 * activity.units + 1]
            offset += 2 * activity.units + 2
        counts = flat[tails].tolist()
        offset = 0
        for number, activity in enumerate(self._activity.values()):
            units = activity.units
            activity.active = flat[offset : offset + units]
            activity.abs_sum = flat[offset + units : offset + 2 * units]
            activity.samples = int(counts[2 * number])
            if counts[2 * number + 1] and activity.failed is None:
                activity.failed = "it could not be measured on another rank"
            offset += 2 * units + 2

    def device_stats(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Per site ``(dead, scores)`` as device tensors (no host transfer)."""
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for site, activity in self._activity.items():
            if activity.failed is not None or not activity.samples:
                if activity.failed is not None:
                    self.not_covered[site] = activity.failed
                continue
            mean_abs = activity.abs_sum / activity.samples
            layer_mean = mean_abs.mean()
            scores = torch.where(layer_mean > 0, mean_abs / layer_mean, torch.zeros_like(mean_abs))
            out[site] = (activity.active == 0, scores)
        return out

    def stats(self) -> dict[str, UnitStats]:
        """Per site statistics on the host (one transfer for all sites)."""
        device_stats = self.device_stats()
        if not device_stats:
            return {}
        flat = torch.cat(
            [torch.cat([d.double(), s.double()]) for d, s in device_stats.values()]
        ).cpu()  # the one transfer
        out: dict[str, UnitStats] = {}
        offset = 0
        for site, (dead, _) in device_stats.items():
            units = dead.numel()
            out[site] = UnitStats(
                dead=flat[offset : offset + units].bool(),
                scores=flat[offset + units : offset + 2 * units],
                samples=self._activity[site].samples,
            )
            offset += 2 * units
        return out


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

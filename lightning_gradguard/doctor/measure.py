"""The measurement: forward/backward passes on the private copy, and one row per layer.

Gradient and parameter norms come from :mod:`lightning_gradguard.functional.norms`
(float64, one group per module that owns parameters); unit activity from an
:class:`~lightning_gradguard.functional.ActivityTracker` over every activation call site
(module calls ``relu#0``/``relu#1``, functional ``module:relu``), the one path
:class:`~lightning_gradguard.callbacks.DeadUnitMonitor` measures with; which layer feeds
which site from :class:`~lightning_gradguard.doctor.flow.DataFlow`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gradguard.doctor.architecture import norm_modules
from lightning_gradguard.doctor.flow import (
    DataFlow,
    activation_label,
    counts_dead_units,
    gain,
    is_consumer_activation,
)
from lightning_gradguard.doctor.inputs import batch_size as size_of
from lightning_gradguard.doctor.inputs import check_loss
from lightning_gradguard.doctor.report import LayerRow
from lightning_gradguard.functional.activity import (
    ActivityTracker,
    SiteKey,
    UnitStats,
    _set_compiler_stance,
)
from lightning_gradguard.functional.call_sites import CallSite, site_name
from lightning_gradguard.functional.norms import (
    ROOT_GROUP,
    NormGrouping,
    clean_parameter_name,
    grad_norms,
    param_norms,
)
from lightning_gradguard.functional.units import LayerMap, map_layers

__all__ = [
    "SCALED_KINDS",
    "Measurements",
    "Subject",
    "measure",
]

SCALED_KINDS = ("linear", "conv", "conv1d")
"""Kinds of the unit map whose weight scale is compared with He and Glorot init."""


@dataclass
class Subject:
    """The private copy and what the doctor knows of its layers.

    Attributes:
        work: the private copy (a ``torch.compile`` wrapper stays one).
        model: the module that runs (``work``, or the module it compiled): module
            paths and call sites are its names.
        grouping: one norm group per module that owns parameters.
        owners: the module of every group.
        layer_map: the unit map of ``model``.
        norms: its normalization modules, by ``id``.
    """

    work: nn.Module
    model: nn.Module
    grouping: NormGrouping
    owners: dict[str, nn.Module]
    layer_map: LayerMap
    norms: dict[int, nn.Module] = field(default_factory=dict)

    @classmethod
    def of(cls, work: nn.Module) -> Subject:
        """Group the layers of ``work`` and map them.

        Example:
            >>> subject = Subject.of(nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3)))
            >>> subject.grouping.names, len(subject.norms)
            (('0', '1'), 1)
        """
        inner = getattr(work, "_orig_mod", None)
        model = inner if isinstance(inner, nn.Module) else work
        grouping = NormGrouping.from_module(work, group_by="module")
        owners: dict[str, nn.Module] = {}
        for name, module in work.named_modules():
            for parameter_name, _ in module.named_parameters(recurse=False):
                full = clean_parameter_name(f"{name}.{parameter_name}" if name else parameter_name)
                owners.setdefault(full.rpartition(".")[0] or ROOT_GROUP, module)
        layer_map = map_layers(model)
        return cls(
            work,
            model,
            grouping,
            {name: owners[name] for name in grouping.names},
            layer_map,
            norm_modules(model, layer_map),
        )

    @property
    def device(self) -> torch.device:
        """Where the parameters are."""
        return self.grouping.parameters[0].device


@dataclass
class Measurements:
    """What the passes measured.

    Attributes:
        rows: one row per layer, in forward order.
        losses: the loss of every step.
        batch_size: the first batch's size, if known.
        samples: the fewest positions any ReLU-like call site saw (0: none measured).
        not_covered: call sites the tracker could not measure, with the reason.
    """

    rows: list[LayerRow]
    losses: list[float]
    batch_size: int | None
    samples: int
    not_covered: dict[str, str]


def measure(
    subject: Subject,
    loss: Callable[[Any, int], Tensor],
    batches: Iterator[Any],
    steps: int,
    seed: int | None,
) -> Measurements:
    """Run ``steps`` forward/backward passes of ``loss`` on ``batches`` and build the rows.

    Args:
        subject: the private copy.
        loss: ``loss(batch, step)``, the batch already on the device.
        batches: the batches, one per step.
        steps: forward/backward passes.
        seed: seeds the passes' random draws (``None``: the global generator's state);
            the global generator is left as it was.
    """
    tracker = ActivityTracker.for_module(
        subject.model, lambda _, m: is_consumer_activation(m), training_only=False
    )
    flow = DataFlow(subject.model, tracker, subject.norms)
    parameter_norms = param_norms(subject.grouping, exact=True).groups.tolist()
    per_step, losses, size = _passes(subject, tracker, flow, loss, batches, steps, seed)
    stats = tracker.stats()
    sites = {(s.module, s.function, s.index): s for s in tracker.call_sites()}
    has_grad = [False] * len(subject.grouping.names)
    for parameter, group in zip(subject.grouping.parameters, subject.grouping.group_index):
        has_grad[group] = has_grad[group] or parameter.grad is not None
    norms = [_mean_norm([step[i] for step in per_step], has_grad[i]) for i in range(len(has_grad))]
    rows = _rows(subject, flow, sites, stats, norms, parameter_norms)
    flow.forget_graph()
    counted = [
        stats[s.name].samples
        for s in sites.values()
        if s.name in stats and counts_dead_units(_site_module(flow, s))
    ]
    return Measurements(rows, losses, size, min(counted, default=0), dict(tracker.not_covered))


def _passes(
    subject: Subject,
    tracker: ActivityTracker,
    flow: DataFlow,
    loss_of: Callable[[Any, int], Tensor],
    batches: Iterator[Any],
    steps: int,
    seed: int | None,
) -> tuple[list[list[float]], list[float], int | None]:
    """The passes: per step the group gradient norms and the loss; the first batch's size."""
    device = subject.device
    cuda = [device.index if device.index is not None else 0] if device.type == "cuda" else []
    per_step: list[list[float]] = []
    losses: list[float] = []
    size: int | None = None
    # Compiled code (torch.compile(model), model.compile()) runs eagerly while measuring:
    # graphs compiled earlier without the hooks would otherwise skip them.
    prior_stance = _set_compiler_stance("force_eager")
    try:
        tracker.attach()
        with torch.random.fork_rng(devices=cuda), torch.enable_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*self\.log\(\).*")
            if seed is not None:
                torch.manual_seed(seed)
            subject.work.train()
            for step in range(steps):
                batch = next(batches)
                if step == 0:
                    size = size_of(batch)
                for parameter in subject.grouping.parameters:
                    parameter.grad = None
                tracker.new_pass()
                tracker.resume()
                loss = loss_of(batch, step)
                check_loss(loss)
                losses.append(float(loss.detach()))
                tracker.pause()  # the backward pass calls no activation
                loss.backward()
                flow.stop_recording()
                per_step.append(grad_norms(subject.grouping, exact=True).groups.tolist())
    finally:
        tracker.detach()
        flow.remove()
        _set_compiler_stance(prior_stance)
    return per_step, losses, size


def _mean_norm(values: list[float], has_grad: bool) -> float | None:
    """The mean over the steps; the first NaN (else inf) when a step was not finite."""
    if not has_grad:
        return None
    if all(math.isfinite(v) for v in values):
        return math.fsum(values) / len(values)
    return next((v for v in values if math.isnan(v)), math.inf)


def _site_module(flow: DataFlow, site: CallSite) -> nn.Module | None:
    """The activation module of a module site, ``None`` for a functional site."""
    return flow.modules.get(site.module) if site.function is None else None


def _rows(
    subject: Subject,
    flow: DataFlow,
    sites: dict[SiteKey, CallSite],
    stats: dict[str, UnitStats],
    grad_norm: list[float | None],
    parameter_norms: list[float],
) -> list[LayerRow]:
    module_names = {id(m): n for n, m in subject.model.named_modules()}
    layer_names = {
        module_names.get(id(module), "")
        for module in subject.owners.values()
        if id(module) not in subject.norms and not is_consumer_activation(module)
    }
    consumer, normalized = flow.consumers(lambda name: name in layer_names)
    by_module = {id(layer.module): layer for layer in subject.layer_map}
    rows: list[LayerRow] = []
    for index, group in enumerate(subject.grouping.names):
        module = subject.owners[group]
        module_name = module_names.get(id(module), "")
        key = consumer.get(module_name)
        site = sites.get(key) if key is not None else None
        name = site.name if site is not None else _fallback_name(key)
        activation = flow.modules.get(key[0]) if key is not None and key[1] is None else None
        function = key[1] if key is not None else None
        weight_std = he_std = glorot_std = None
        layer = by_module.get(id(module))  # by identity: names differ under torch.compile
        if layer is not None and layer.kind in SCALED_KINDS:
            weight = layer.weight.detach()
            g = gain(activation, function)
            weight_std = float(weight.double().std()) if weight.numel() > 1 else None
            he_std = g / math.sqrt(layer.fan_in)
            glorot_std = g * math.sqrt(2.0 / (layer.fan_in + layer.fan_out))
        dead = None
        if key is not None and name in stats and counts_dead_units(activation):
            dead = stats[name].dead_fraction
        rows.append(
            LayerRow(
                name=group,
                kind=type(module).__name__,
                grad_norm=grad_norm[index],
                param_norm=parameter_norms[index],
                dead_fraction=dead,
                activation=activation_label(activation, function) if key is not None else None,
                activation_module=name,
                weight_std=weight_std,
                he_std=he_std,
                glorot_std=glorot_std,
                normalized=module_name in normalized,
            )
        )
    first_seen = flow.first_seen()

    def order(row: LayerRow) -> float:
        """Where the forward pass reached the module; a module it never called (the
        ``out_proj`` that ``MultiheadAttention`` uses through its weight) sits with its
        nearest called ancestor."""
        path = module_names.get(id(subject.owners[row.name]), "")
        offset = 0.0
        while path:
            if path in first_seen:
                return first_seen[path] + offset
            path = path.rpartition(".")[0]
            offset = 0.5  # just after the ancestor's own call
        return math.inf

    return sorted(rows, key=order)  # stable: unreached layers keep their order


def _fallback_name(key: SiteKey | None) -> str | None:
    """A site the tracker could not measure from its first call is named from its key."""
    return None if key is None else site_name(key[0], key[1], key[2], key[2] + 1)

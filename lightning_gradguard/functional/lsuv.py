"""Layer-sequential unit-variance initialization (LSUV, Mishkin & Matas, 2015).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> report = lsuv_(model, torch.randn(64, 16), generator=torch.Generator().manual_seed(0))
    >>> sorted(report.output_std), report.not_converged
    (['0', '2'], [])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gradguard._checks import check_int, check_number
from lightning_gradguard.functional.init import FAN_KINDS, _layer_keys, _skip_unknown, init_weight_
from lightning_gradguard.functional.units import Layer, map_layers

__all__ = [
    "LSUVReport",
    "lsuv_",
]


@dataclass
class LSUVReport:
    """What :func:`lsuv_` did.

    Attributes:
        output_std: final output std of each layer it scaled.
        iterations: rescaling iterations per layer.
        not_converged: layers still outside the tolerance after ``max_iters``.
        unreached: layers the batch's forward pass never went through.
        skipped: layers left as they were, with the reason (embeddings, norm
            affines, attention input projections, layers the unit map does not know).
    """

    output_std: dict[str, float] = field(default_factory=dict)
    iterations: dict[str, int] = field(default_factory=dict)
    not_converged: list[str] = field(default_factory=list)
    unreached: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


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

    Orthonormal pre-initialization of every Linear/Conv/Conv1D weight (units
    read through the unit map, biases zeroed), then, layer by layer in the order
    the forward pass reaches them, the weight is rescaled until the layer's output
    std on ``batch`` is within ``tol`` of ``target_std`` (at most ``max_iters``
    forward passes per layer). Embeddings (also when tied to an output head),
    norm affines and weights whose module output is not theirs alone
    (``MultiheadAttention``'s input projection) are left as they are and named in
    :attr:`LSUVReport.skipped`.

    Args:
        model: any module; layers in any nesting are found by forward hooks.
        batch: the input of ``model(batch)`` (a tensor, a tuple/list unpacked as
            positional arguments, or a dict unpacked as keyword arguments).
        target_std: the output std to reach.
        tol: accepted distance from ``target_std``.
        max_iters: rescaling passes per layer.
        orthonormal: start from orthonormal weights (the paper's first step).
        generator: random generator for the orthonormal draws.

    Returns:
        An :class:`LSUVReport`, naming layers it could not reach, fit or treat.
    """
    check_number(target_std, "target_std", "lsuv_", low=0, low_open=True)
    check_number(tol, "tol", "lsuv_", low=0, low_open=True)
    check_int(max_iters, "max_iters", "lsuv_", low=1)
    layer_map = map_layers(model)
    report = LSUVReport()
    layers: list[Layer] = []
    keys = _layer_keys(layer_map)
    for layer in layer_map:
        name = keys[id(layer)]
        if layer.kind not in FAN_KINDS:
            report.skipped[name] = {
                "embedding": "lookup table: not rescaled",
                "norm": "norm affine: kept as it is",
            }.get(layer.kind, f"kind {layer.kind!r} has no LSUV rule")
        elif layer.spec.weight != "weight":
            report.skipped[name] = (
                f"{type(layer.module).__name__}.{layer.spec.weight}: the module's output is "
                "not this weight's alone"
            )
        else:
            layers.append(layer)
    for holder, owner in layer_map.tied.items():
        report.skipped[holder] = f"its weight is {owner}'s, treated there"
    _skip_unknown(layer_map, report.skipped, "lsuv_")
    if orthonormal:
        for layer in layers:
            init_weight_(
                layer.weight, "orthogonal", "linear", generator=generator, layout=layer.layout
            )
            if layer.bias is not None:
                layer.bias.zero_()

    # A compiled model is run eagerly here: LSUV's hooks come and go, which would make
    # the compiled graph recompile on every change.
    model = getattr(model, "_orig_mod", model)

    def call() -> Any:
        if isinstance(batch, dict):
            return model._call_impl(**batch)
        return model._call_impl(*(tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)))

    order: list[str] = []
    handles = []
    for layer in layers:

        def record(mod: nn.Module, inputs: Any, output: Any, name: str = layer.name) -> None:
            if name not in order:
                order.append(name)

        handles.append(layer.module.register_forward_hook(record))
    was_training = model.training
    model.eval()
    try:
        call()
    finally:
        for handle in handles:
            handle.remove()
    report.unreached = [layer.name for layer in layers if layer.name not in order]
    modules = {layer.name: layer for layer in layers}
    for name in order:
        layer = modules[name]
        captured: dict[str, Any] = {}

        def capture(
            mod: nn.Module, inputs: Any, output: Any, captured: dict[str, Any] = captured
        ) -> None:
            captured["out"] = output

        handle = layer.module.register_forward_hook(capture)
        try:
            iterations = 0
            std = math.nan
            while iterations < max_iters:
                call()
                out = captured["out"]
                if not isinstance(out, Tensor):
                    report.skipped[name] = f"its output is a {type(out).__name__}, not a tensor"
                    break
                std = float(out.float().std())
                if not math.isfinite(std) or abs(std - target_std) < tol or std == 0.0:
                    break
                layer.weight.mul_(target_std / std)
                iterations += 1
        finally:
            handle.remove()
        if name in report.skipped:
            continue
        report.output_std[name] = std
        report.iterations[name] = iterations
        if not (math.isfinite(std) and abs(std - target_std) < tol):
            report.not_converged.append(name)
    model.train(was_training)
    return report

"""Data flow: which layers feed which activation call site and which normalization.

Read from the autograd graph of the first step, not from the order modules were
declared in: each module call's output node is recorded (a forward hook), and each
activation call site's output node is handed over by the
:class:`~lightning_gradguard.functional.ActivityTracker` that measures it (its
observer), so module sites (``layer1.0.relu#1``) and functional sites
(``encoder.layers.0:relu``) are the tracker's own. From a call's output the graph is
walked back through parameterless operations (additions, reshapes, dropout, and
normalizations when asked) to the outputs of layers: a downsample path added to a
block's output is followed as it ran.

Which modules are activations is the library's classification
(:func:`~lightning_gradguard.functional.is_activation_module`: torch's ReLU family,
registered types and the documented name rule), plus torch's saturating and
normalizing activations (:data:`OTHER_ACTIVATIONS`), which consume a layer but whose
units are not counted as dead.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 2))
    >>> [is_consumer_activation(m) for m in model], [counts_dead_units(m) for m in model]
    ([False, True, False], [False, False, False])
    >>> gain(nn.Tanh(), None), gain(None, "relu") == 2**0.5
    (1.6666666666666667, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from lightning_gradguard.doctor.inputs import first_tensor
from lightning_gradguard.functional.activity import ActivityTracker, SiteKey
from lightning_gradguard.functional.call_sites import is_activation_module

__all__ = [
    "GRAPH_LIMIT",
    "OTHER_ACTIVATIONS",
    "DataFlow",
    "activation_label",
    "counts_dead_units",
    "gain",
    "is_consumer_activation",
]

OTHER_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.LogSigmoid,
    nn.Tanhshrink,
    nn.Softmax,
    nn.LogSoftmax,
)
"""Torch activations outside the ReLU family: a layer's consumer (its gain, the sigmoid
rules), not measured for dead units."""

GRAPH_LIMIT = 4096
"""Autograd nodes visited, at most, when looking for the layers feeding one call."""

_SELU_GAIN = 0.75
_FUNCTION_GAINS = {"selu": _SELU_GAIN, "leaky_relu": math.sqrt(2.0 / (1.0 + 0.01**2))}
"""Gains of functional activations other than ReLU's √2 (a functional ``leaky_relu``
is taken at torch's default slope 0.01: its slope is not visible from its output)."""


def is_consumer_activation(module: nn.Module) -> bool:
    """An activation that consumes a layer: the library's and :data:`OTHER_ACTIVATIONS`."""
    return is_activation_module(module) or isinstance(module, OTHER_ACTIVATIONS)


def counts_dead_units(module: nn.Module | None) -> bool:
    """Whether a dead fraction is read at the module's site (``None``: a functional site).

    The library's activations (:func:`~lightning_gradguard.functional.is_activation_module`)
    and every functional one the tracker measures: ReLU-like, their units can die.
    """
    return module is None or is_activation_module(module)


def activation_label(module: nn.Module | None, function: str | None) -> str:
    """``"ReLU"``, ``"LeakyReLU(0.2)"`` for a module; ``"F.relu"`` for a functional site."""
    if module is None:
        return f"F.{function}"
    if isinstance(module, nn.LeakyReLU):
        return f"LeakyReLU({module.negative_slope:g})"
    return type(module).__name__


def gain(module: nn.Module | None, function: str | None) -> float:
    """``torch.nn.init.calculate_gain`` of the consuming activation (1 for none).

    ReLU-like activations without a gain in torch (GELU, SiLU, ..., registered and
    name-rule ones, functional ones) use ReLU's √2.
    """
    if module is None:
        return 1.0 if function is None else _FUNCTION_GAINS.get(function, math.sqrt(2.0))
    if isinstance(module, nn.LeakyReLU):
        return math.sqrt(2.0 / (1.0 + module.negative_slope**2))
    if isinstance(module, nn.PReLU):
        slope = float(module.weight.detach().double().mean())
        return math.sqrt(2.0 / (1.0 + slope**2))
    if isinstance(module, nn.SELU):
        return _SELU_GAIN
    if is_activation_module(module):
        return math.sqrt(2.0)
    if isinstance(module, nn.Tanh):
        return 5.0 / 3.0
    return 1.0


class DataFlow:
    """Record the first step's data flow: module outputs (hooks) and call sites (observer).

    Args:
        model: the model the tracker measures (module paths are its ``named_modules``).
        tracker: the :class:`~lightning_gradguard.functional.ActivityTracker` measuring
            it; the data flow observes its calls.
        norms: the normalization modules, by ``id``.
    """

    def __init__(
        self, model: nn.Module, tracker: ActivityTracker, norms: dict[int, nn.Module]
    ) -> None:
        self.modules = {name: module for name, module in model.named_modules() if name}
        self.norms = norms
        self.recording = True
        self.events: list[tuple[str, Any]] = []  # ("module", (path, call)) or ("site", key)
        self.outputs: dict[Any, list[str]] = {}  # autograd node of a call's output -> modules
        self.module_nodes: dict[tuple[str, int], Any] = {}  # module call -> its output node
        self.site_nodes: dict[SiteKey, Any] = {}  # activation call site -> its output node
        self._calls: dict[str, int] = {}
        self._tracker = tracker
        tracker.observe(self._on_site)
        self._handles = [
            module.register_forward_hook(self._hook(name)) for name, module in self.modules.items()
        ]

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not self.recording:
                return
            index = self._calls.get(name, 0)
            self._calls[name] = index + 1
            self.events.append(("module", (name, index)))
            produced = output if isinstance(output, Tensor) else first_tensor(output)
            if produced is not None and produced.grad_fn is not None:
                self.outputs.setdefault(produced.grad_fn, []).append(name)
                self.module_nodes[(name, index)] = produced.grad_fn

        return hook

    def _on_site(self, key: SiteKey, output: Tensor) -> None:
        if self.recording and key not in self.site_nodes:
            self.events.append(("site", key))
            self.site_nodes[key] = output.grad_fn

    def stop_recording(self) -> None:
        """The first step is over: later steps add nothing."""
        self.recording = False

    def remove(self) -> None:
        """Remove the hooks and the observer."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._tracker.observe(None)

    def forget_graph(self) -> None:
        """Drop the autograd nodes (they keep the first step's graph alive)."""
        self.outputs, self.module_nodes, self.site_nodes = {}, {}, {}

    def first_seen(self) -> dict[str, int]:
        """Where the forward pass first reached each module path (its position in the calls)."""
        seen: dict[str, int] = {}
        for position, (kind, key) in enumerate(self.events):
            if kind == "module":
                seen.setdefault(key[0], position)
        return seen

    def consumers(self, is_layer: Callable[[str], bool]) -> tuple[dict[str, SiteKey], set[str]]:
        """The first call site each layer's output reaches, and the layers a norm consumes.

        A layer counts as normalized when a normalization sits between it and its
        activation, or when a normalization consumes its output directly.
        """
        consumer: dict[str, SiteKey] = {}
        normalized: set[str] = set()
        for kind, key in self.events:
            if kind == "site":
                found = self.producers(self.site_nodes.get(key), is_layer, through_norms=True)
                for producer, through_norm in found.items():
                    consumer.setdefault(producer, key)
                    if through_norm:
                        normalized.add(producer)
            elif id(self.modules[key[0]]) in self.norms:
                node = self.module_nodes.get(key)
                normalized.update(self.producers(node, is_layer, through_norms=False))
        return consumer, normalized

    def producers(
        self, start: Any, is_layer: Callable[[str], bool], through_norms: bool
    ) -> dict[str, bool]:
        """The layers whose output reaches the call whose output node is ``start``, and
        whether through a normalization.

        Walks the autograd graph back from the call's inputs, through parameterless
        operations (and normalizations when ``through_norms``), and stops at the output
        of a layer (found), of an activation call, or of a normalization.
        """
        if start is None:
            return {}
        sites = set(self.site_nodes.values())
        found: dict[str, bool] = {}
        stack: list[tuple[Any, bool]] = [(node, False) for node, _ in start.next_functions]
        seen: set[tuple[int, bool]] = set()
        while stack and len(seen) < GRAPH_LIMIT:
            node, normed = stack.pop()
            if node is None or (id(node), normed) in seen:
                continue
            seen.add((id(node), normed))
            names = self.outputs.get(node, ())
            layer = next((n for n in names if is_layer(n)), None)
            if layer is not None:
                found[layer] = found.get(layer, False) or normed
                continue
            if node in sites or any(is_consumer_activation(self.modules[n]) for n in names):
                continue
            if any(id(self.modules[n]) in self.norms for n in names):
                if not through_norms:
                    continue
                normed = True
            stack.extend((following, normed) for following, _ in node.next_functions)
        return found

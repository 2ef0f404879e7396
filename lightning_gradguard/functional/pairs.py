"""Producer -> [norm] -> activation -> consumer pairs, from how ``forward`` actually runs.

Recycling a unit (ReDo) touches the layer that makes it (the *producer*: its
output unit), the normalization layers between (that unit's affine and running
statistics), and the layer that reads it (the *consumer*: its input feature).
Which layer feeds which is a property of the forward pass, not of the order in
which modules are declared: torchvision's ``BasicBlock`` calls one ``relu`` twice,
``nn.TransformerEncoderLayer`` calls ``F.relu`` from its own ``forward``, and
GPT-2's MLP is ``c_proj(act(c_fc(x)))`` with Conv1D layers.

:func:`trace_unit_pairs` runs the forward pass once on an example input and
records the data flow between module calls (forward hooks on every module) and
torch function calls (a ``TorchFunctionMode``): which call produced each tensor,
and which calls read it. A pair is a chain in which every link is read by exactly
the next one:

    weight layer -> [norm layers] -> activation call site -> [dropout] -> weight layer

Anything else around an activation (its input made by a residual add, its output
read by two layers or by a pooling, a layer called twice, a view in between) is
skipped and named with the reason, never guessed. Without an example input,
``torch.fx`` symbolic tracing builds the same graph where it can trace the model.

Call sites are named as everywhere in the package: an activation module's path
(``layer1.0.relu#0`` when it runs more than once per forward), or
``<module path>:<function>`` for a functional activation called from that module's
own ``forward`` (``encoder.layers.0:relu``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Block(nn.Module):
    ...     def __init__(self) -> None:
    ...         super().__init__()
    ...         self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 4)
    ...         self.norm = nn.LayerNorm(8)
    ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
    ...         return x + self.fc2(torch.relu(self.norm(self.fc1(x))))
    >>> found = trace_unit_pairs(nn.Sequential(Block(), nn.GELU(), Block()), torch.randn(2, 4))
    >>> found.pairs[0]
    UnitPair(producer='0.fc1', consumer='0.fc2', activation='0:relu', norms=('0.norm',))
    >>> for reason in found.skipped["1"].split("; "):
    ...     print(reason)
    its input comes from add (in 0), not from a weight layer or a norm
    its output is read by 2 calls: 2.fc1 (Linear), add (in 2)
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from lightning_gradguard.functional.activity import _remove_function_mode
from lightning_gradguard.functional.call_sites import (
    ACTIVATION_FUNCTIONS,
    FUNCTION_NAMES,
    is_activation_module,
)
from lightning_gradguard.functional.units import Layer, layer_specs

__all__ = [
    "ACTIVATION_MODULES",
    "NOT_ACTIVATIONS",
    "PASS_THROUGH",
    "PairInference",
    "PairTracer",
    "UnitPair",
    "check_pair",
    "infer_unit_pairs",
    "trace_unit_pairs",
    "unit_layer",
]

ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
)
"""Activation modules recognised by type, with those the dead-unit measure recognises
(``call_sites.is_activation_module``: its types, registered types and its name rule,
which covers Hugging Face's ``NewGELUActivation``). Other parameter-free leaf modules
whose output has the shape of their input count as activations too, unless they are
in :data:`NOT_ACTIVATIONS`."""

NOT_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.Softmax,
    nn.Softmin,
    nn.LogSoftmax,
    nn.Softmax2d,
    nn.Flatten,
    nn.Unflatten,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
)
"""Parameter-free modules that are not unit-wise activations, even where an output
keeps the input's shape (a 1x1 adaptive pooling)."""


def _activation_function(func: Any) -> str | None:
    """The site name of a functional activation (``F.relu``, ``torch.relu_``... -> ``relu``).

    The functions are those the dead-unit measure tracks
    (``lightning_gradguard.functional.call_sites.ACTIVATION_FUNCTIONS``); ``tanh``
    and ``sigmoid`` are not among them: as functions they are mostly gates.
    """
    try:
        found = ACTIVATION_FUNCTIONS.get(func)
    except TypeError:  # unhashable
        return None
    if found is None and isinstance(func, str):  # an fx call_method target
        name = func.rstrip("_")
        return name if name in FUNCTION_NAMES else None
    return found


PASS_THROUGH: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
)
"""Modules a unit goes through unchanged in place (dropout, identity)."""

_NON_DATA = frozenset({"detach", "detach_", "requires_grad_", "retain_grad"})


@dataclass(frozen=True)
class UnitPair:
    """A producer layer whose output units feed a consumer layer.

    Attributes:
        producer: name of the weight layer that makes the units (Linear, Conv,
            ConvTranspose, HF Conv1D: read through the unit map).
        consumer: name of the weight layer that reads them.
        activation: the activation call site in between (a module path,
            ``path#i``, or ``module:function``), or ``None``.
        norms: names of the normalization layers in between (BatchNorm,
            LayerNorm over the units, GroupNorm): their per-unit affine and
            running statistics are reset with the unit.
    """

    producer: str
    consumer: str
    activation: str | None = None
    norms: tuple[str, ...] = ()


@dataclass
class PairInference:
    """What :func:`trace_unit_pairs` found.

    Attributes:
        pairs: the producer/consumer pairs, in the order their activations ran.
        skipped: every activation call site that is not in a pair, with the reason.
        sites: every activation call site the forward pass went through, in order.
    """

    pairs: list[UnitPair] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    sites: list[str] = field(default_factory=list)

    def warn_skipped(self, owner: str) -> None:
        """One warning naming every skipped call site and why (nothing when none)."""
        if self.skipped:
            listed = "; ".join(f"{site}: {why}" for site, why in self.skipped.items())
            warnings.warn(
                f"{owner}: activation call sites without a producer/consumer pair, not "
                f"recycled: {listed}. Name a pair with [producer, consumer, activation, norms...] "
                "if one of them is one.",
                stacklevel=3,
            )


def unit_layer(module: nn.Module, name: str = "") -> Layer | None:
    """The unit map's view of a producer/consumer candidate, or ``None``.

    Weight layers are the unit map's ``linear``, ``conv`` and ``conv1d`` kinds (and
    registered kinds that are neither lookups nor per-unit weights); embeddings and
    norm affines are not.

    Example:
        >>> unit_layer(nn.Conv2d(3, 8, 3)).units, unit_layer(nn.Embedding(4, 2))
        (8, None)
    """
    for spec in layer_specs(module):
        if spec.lookup or spec.per_unit:
            continue
        weight = getattr(module, spec.weight, None)
        if not isinstance(weight, Tensor) or weight.dim() < 2:
            continue
        bias = getattr(module, spec.bias, None) if spec.bias else None
        return Layer(
            name, module, spec, spec.weight, weight, bias if isinstance(bias, Tensor) else None
        )
    return None


def _is_norm(module: nn.Module) -> bool:
    return any(spec.per_unit for spec in layer_specs(module))


@dataclass
class _Node:
    kind: str  # "weight", "norm", "act", "pass", "other"
    label: str  # module path, or the function name for functions
    owner: str  # module path of a module node; the calling module's path for a function
    type_name: str
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    site: str = ""

    def describe(self) -> str:
        if self.kind == "other" and self.type_name == "function":
            return f"{self.label} (in {self.owner or 'the root module'})"
        return f"{self.label} ({self.type_name})" if self.kind != "act" else self.site


@dataclass
class _Value:
    producer: int | None
    uses: list[int] = field(default_factory=list)


class _Graph:
    """Call nodes and the values between them."""

    def __init__(self) -> None:
        self.nodes: list[_Node] = []
        self.values: list[_Value] = []
        self.module_calls: Counter[str] = Counter()
        self.site_calls: Counter[str] = Counter()

    def add(self, node: _Node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def new_value(self, producer: int | None) -> int:
        self.values.append(_Value(producer))
        return len(self.values) - 1

    def name_sites(self) -> None:
        seen: Counter[str] = Counter()
        for node in self.nodes:
            if node.kind != "act":
                continue
            base = node.label if node.type_name != "function" else f"{node.owner}:{node.label}"
            index = seen[base]
            seen[base] += 1
            node.site = base if self.site_calls[base] == 1 else f"{base}#{index}"

    def pairs(self, model: nn.Module) -> PairInference:
        self.name_sites()
        found = PairInference()
        for index, node in enumerate(self.nodes):
            if node.kind != "act":
                continue
            found.sites.append(node.site)
            pair, why = self._pair_at(model, index)
            if pair is None:
                found.skipped[node.site] = why
            else:
                found.pairs.append(pair)
        return found

    def _readers(self, value: int, reader: int) -> str | None:
        """Why ``value`` is not read by ``reader`` alone (``None`` when it is)."""
        uses = self.values[value].uses
        if uses == [reader]:
            return None
        others = [self.nodes[u].describe() for u in dict.fromkeys(uses) if u != reader]
        return "also read by " + ", ".join(others)

    def _producer_of(self, act: int) -> tuple[_Node | None, list[str], str]:
        """Walk back from an activation through norms and dropout to a weight layer."""
        norms: list[str] = []
        reader, value = act, self.nodes[act].inputs[0]
        while True:
            if (why := self._readers(value, reader)) is not None:
                return None, norms, f"its input is {why} (a residual or branch)"
            made_by = self.values[value].producer
            if made_by is None:
                return None, norms, "its input is not made by a module or function of the model"
            maker = self.nodes[made_by]
            if maker.kind in ("norm", "pass") and maker.inputs:
                if maker.kind == "norm":
                    norms.insert(0, maker.label)
                reader, value = made_by, maker.inputs[0]
            elif maker.kind == "weight":
                return maker, norms, ""
            else:
                why = f"its input comes from {maker.describe()}, not from a weight layer or a norm"
                return None, norms, why

    def _consumer_of(self, act: int) -> tuple[_Node | None, str]:
        """Walk forward from an activation through dropout to the one weight layer reading it."""
        value = self.nodes[act].outputs[0]
        while True:
            uses = list(dict.fromkeys(self.values[value].uses))
            if not uses:
                return None, "nothing in the forward pass reads its output"
            if len(uses) > 1:
                readers = ", ".join(self.nodes[u].describe() for u in uses)
                return None, f"its output is read by {len(uses)} calls: {readers}"
            user = self.nodes[uses[0]]
            if user.kind == "pass" and user.outputs:
                value = user.outputs[0]
            elif user.kind == "weight" and user.inputs and user.inputs[0] == value:
                return user, ""
            else:
                return None, f"its output goes to {user.describe()}, not to a weight layer"

    def _pair_at(self, model: nn.Module, act: int) -> tuple[UnitPair | None, str]:
        node = self.nodes[act]
        if not node.inputs or not node.outputs:
            return None, "it has no tensor input or output"
        producer, norms, before = self._producer_of(act)
        consumer, after = self._consumer_of(act)
        if producer is None or consumer is None:
            return None, "; ".join(why for why in (before, after) if why)
        for name in (producer.label, consumer.label, *norms):
            if self.module_calls[name] != 1:
                return None, f"{name} runs {self.module_calls[name]} times per forward"
        pair = UnitPair(producer.label, consumer.label, node.site, tuple(norms))
        why = check_pair(model, pair)
        return (None, why) if why else (pair, "")


def check_pair(model: nn.Module, pair: UnitPair) -> str | None:
    """Why ``pair`` cannot be recycled in ``model`` (``None`` when it can).

    Checks that the names exist, that producer and consumer are weight layers of the
    unit map without groups on the consumer side, that the consumer reads as many
    features as the producer makes units, and that every norm has one value per unit.

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(4, 1))
        >>> check_pair(m, UnitPair("0", "2", "1"))
        "consumer '2' reads 4 inputs but producer '0' makes 3 units: not a producer/consumer pair"
    """
    modules = dict(model.named_modules())
    missing = [n for n in (pair.producer, pair.consumer, *pair.norms) if n not in modules]
    if missing:
        return f"no module named {missing}"
    layers = {}
    for role in ("producer", "consumer"):
        name = getattr(pair, role)
        layer = unit_layer(modules[name], name)
        if layer is None:
            kind = type(modules[name]).__name__
            return (
                f"{role} {name!r} is a {kind}, not Linear/Conv (a weight layer of the unit "
                "map: Linear, Conv, ConvTranspose, Hugging Face Conv1D)"
            )
        if layer.groups != 1 and (role == "consumer" or layer.unit_dim == 1):
            return f"{role} {name!r} has groups={layer.groups}: grouped units are not recycled"
        layers[role] = layer
    units = layers["producer"].units
    consumer = layers["consumer"]
    reads = consumer.weight.shape[1 - consumer.unit_dim]
    if reads != units:
        return (
            f"consumer {pair.consumer!r} reads {reads} inputs but producer {pair.producer!r} "
            f"makes {units} units: not a producer/consumer pair"
        )
    for name in pair.norms:
        norm = modules[name]
        if not _is_norm(norm):
            return f"norm {name!r} is a {type(norm).__name__}, not a normalization layer"
        sizes = {
            t.numel()
            for t in (getattr(norm, "weight", None), getattr(norm, "running_mean", None))
            if isinstance(t, Tensor)
        }
        if isinstance(norm, nn.GroupNorm):
            sizes = {norm.num_channels}
        if sizes and sizes != {units}:
            return f"norm {name!r} holds {sorted(sizes)} values, not one per unit ({units})"
    if pair.activation:
        base = pair.activation.split("#")[0].split(":")[0]
        if base not in modules:
            return f"activation {pair.activation!r} names no module of the model"
    return None


def _leaf_kind(module: nn.Module) -> str | None:
    """The node kind of a module call, or ``None`` for a container (looked through)."""
    if unit_layer(module) is not None:
        return "weight"
    if _is_norm(module):
        return "norm"
    if isinstance(module, PASS_THROUGH):
        return "pass"
    if isinstance(module, ACTIVATION_MODULES) or is_activation_module(module):
        return "act"
    if next(module.children(), None) is not None:
        return None
    if isinstance(module, NOT_ACTIVATIONS) or next(module.parameters(), None) is not None:
        return "other"
    return "maybe_act"  # parameter-free leaf: an activation if it keeps the shape


def _tensors(tree: Any) -> list[Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, Tensor)]


class _Recorder(TorchFunctionMode):
    def __init__(self, tracer: PairTracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.tracer._function(func, args, kwargs, out)
        return out


class PairTracer:
    """Record the data flow of one forward pass, then read the pairs from it.

    :meth:`start` adds hooks to every module of ``model`` and enters a
    ``TorchFunctionMode``; :meth:`stop` removes both and returns a
    :class:`PairInference`. Between them, run exactly one forward pass (it may be
    inside a training step: nothing in it is changed, and an error while recording
    stops the recording, never the forward pass). Compiled code runs eagerly while
    recording (``torch.compiler.set_stance("force_eager")``), so hooks see every call.

    While recording, each weight layer's input is handed to ``on_input(name,
    module, tensor)`` if given (used to measure activity in the same pass).

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
        >>> tracer = PairTracer(model)
        >>> tracer.start()
        >>> _ = model(torch.randn(4, 3))
        >>> tracer.stop().pairs
        [UnitPair(producer='0', consumer='2', activation='1', norms=())]
    """

    def __init__(
        self,
        model: nn.Module,
        on_input: Callable[[str, nn.Module, Tensor], None] | None = None,
    ) -> None:
        self.model = model
        self.on_input = on_input
        self.graph = _Graph()
        self.error: str | None = None
        self._paths = {id(m): n for n, m in model.named_modules()}
        self._current: dict[int, int] = {}  # id(tensor) -> value index
        self._alive: list[Tensor] = []  # keeps ids unique while recording
        self._stack: list[tuple[str, int | None]] = []
        self._inside_leaf = 0
        self._handles: list[Any] = []
        self._mode: _Recorder | None = None
        self._stance: Any = None

    # ------------------------------------------------------------------ recording
    def _use(self, tensor: Tensor, node: int) -> int:
        value = self._current.get(id(tensor))
        if value is None:
            value = self.graph.new_value(None)
            self._current[id(tensor)] = value
            self._alive.append(tensor)
        self.graph.values[value].uses.append(node)
        return value

    def _make(self, tensor: Tensor, node: int) -> int:
        value = self.graph.new_value(node)
        self._current[id(tensor)] = value
        self._alive.append(tensor)
        return value

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = f"{type(error).__name__}: {error}"

    def _pre(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        try:
            path = self._paths.get(id(module), "?")
            if self._inside_leaf or self.error:
                self._stack.append((path, None))
                return
            kind = _leaf_kind(module)
            if kind is None:
                self._stack.append((path, None))
                return
            node = self.graph.add(_Node(kind, path, path, type(module).__name__))
            tensors = _tensors((args, kwargs))
            self.graph.nodes[node].inputs = [self._use(t, node) for t in tensors]
            self.graph.module_calls[path] += 1
            self._inside_leaf += 1
            self._stack.append((path, node))
            if kind == "weight" and self.on_input is not None and tensors:
                self.on_input(path, module, tensors[0])
        except Exception as error:  # never raise inside the user's forward pass
            self._fail(error)

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        try:
            if not self._stack:
                return
            _, node = self._stack.pop()
            if node is None:
                return
            self._inside_leaf -= 1
            record = self.graph.nodes[node]
            outputs = _tensors(output)
            if record.kind == "maybe_act":
                inputs = _tensors(args)
                same = len(outputs) == 1 and inputs and inputs[0].shape == outputs[0].shape
                record.kind = "act" if same else "other"
            if record.kind == "act":
                self.graph.site_calls[record.label] += 1
            record.outputs = [self._make(t, node) for t in outputs]
        except Exception as error:
            self._fail(error)

    def _function(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        if self._inside_leaf or self.error:
            return
        try:
            outputs = _tensors(out)
            name = getattr(func, "__name__", str(func))
            if not outputs or name in _NON_DATA:
                return  # metadata (size, dim, ...) and detaching are not data flow
            owner = self._stack[-1][0] if self._stack else ""
            site_function = _activation_function(func)
            is_act = site_function is not None
            name = site_function or name
            kind = "act" if is_act else "other"
            node = self.graph.add(_Node(kind, name, owner, "function"))
            inputs = _tensors((args, kwargs))
            if is_act and inputs:
                inputs = inputs[:1]  # the activation's input (not, e.g., a PReLU weight)
            self.graph.nodes[node].inputs = [self._use(t, node) for t in inputs]
            self.graph.nodes[node].outputs = [self._make(t, node) for t in outputs]
            if is_act:
                self.graph.site_calls[f"{owner}:{name}"] += 1
        except Exception as error:
            self._fail(error)

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        """Hook every module and start recording torch function calls."""
        for module in self.model.modules():
            self._handles.append(
                module.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True)
            )
            self._handles.append(module.register_forward_hook(self._post, always_call=True))
        self._stance = _force_eager()
        self._mode = _Recorder(self)
        self._mode.__enter__()

    def stop(self) -> PairInference:
        """Stop recording, remove every hook, and return the pairs."""
        if self._mode is not None:  # wherever it is on the stack (other modes may sit above)
            _remove_function_mode(self._mode)
            self._mode = None
        if self._stance is not None:
            self._stance.__exit__(None, None, None)
            self._stance = None
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._alive = []
        self._current = {}
        if self.error is not None:
            return PairInference(skipped={"<trace>": f"recording failed: {self.error}"})
        return self.graph.pairs(self.model)


def _force_eager() -> Any:
    """Enter ``torch.compiler.set_stance("force_eager")``; the returned object restores it."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:  # pragma: no cover - older torch
        return None
    stance = set_stance("force_eager")
    stance.__enter__()
    return stance


def _fx_graph(model: nn.Module) -> _Graph:
    """The same graph from ``torch.fx.symbolic_trace`` (no example input needed)."""
    traced = torch.fx.symbolic_trace(model)
    graph = _Graph()
    values: dict[torch.fx.Node, int] = {}
    for fx_node in traced.graph.nodes:
        inputs: list[torch.fx.Node] = []
        torch.fx.node.map_arg((fx_node.args, fx_node.kwargs), inputs.append)
        if fx_node.op in ("placeholder", "get_attr"):
            values[fx_node] = graph.new_value(None)
            continue
        stack = fx_node.meta.get("nn_module_stack") or {}
        owner = list(stack.values())[-1][0] if stack else ""
        if fx_node.op == "call_module":
            module = traced.get_submodule(fx_node.target)
            kind = _leaf_kind(module) or "other"
            if kind == "maybe_act":
                kind = "other"  # no shapes in fx: only activations known by type count
            node = _Node(kind, str(fx_node.target), str(fx_node.target), type(module).__name__)
            graph.module_calls[node.label] += 1
        else:
            site_function = _activation_function(fx_node.target)
            name = site_function or str(getattr(fx_node.target, "__name__", fx_node.target))
            kind = "act" if site_function is not None else "other"
            node = _Node(kind, name, owner, "function")
            if kind == "act":
                inputs = inputs[:1]
        index = graph.add(node)
        if kind == "act":
            graph.site_calls[
                node.label if node.type_name != "function" else f"{owner}:{node.label}"
            ] += 1
        for arg in inputs:
            if arg in values:
                graph.values[values[arg]].uses.append(index)
                node.inputs.append(values[arg])
        values[fx_node] = graph.new_value(index)
        node.outputs = [values[fx_node]]
    return graph


def trace_unit_pairs(model: nn.Module, example: Any = None) -> PairInference:
    """Infer the producer/consumer pairs of ``model`` from a forward pass.

    Args:
        model: the model (a ``torch.compile`` wrapper is read through: names are
            those of ``model.named_modules()``).
        example: an input to run ``model`` on: a tensor, a tuple/list of positional
            arguments, or a dict of keyword arguments. The pass runs under
            ``torch.no_grad()`` in the model's current mode, and the model's buffers
            (BatchNorm statistics) and the global RNG are restored afterwards.
            ``None``: trace with ``torch.fx.symbolic_trace`` instead (no data needed,
            but only for models fx can trace).

    Returns:
        The pairs, and every activation call site without one, with the reason.

    Raises:
        ValueError: without ``example`` when fx cannot trace the model.
    """
    if example is None:
        try:
            graph = _fx_graph(model)
        except Exception as error:
            raise ValueError(
                f"torch.fx cannot trace {type(model).__name__} ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}): pass an example input, "
                "trace_unit_pairs(model, example)."
            ) from error
        return graph.pairs(model)
    tracer = PairTracer(model)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        tracer.start()
        try:
            if isinstance(example, dict):
                model(**example)
            elif isinstance(example, (tuple, list)):
                model(*example)
            else:
                model(example)
        finally:
            found = tracer.stop()
            restored = dict(model.named_buffers())
            for name, value in buffers.items():
                restored[name].copy_(value)
    return found


def infer_unit_pairs(model: nn.Module, example: Any = None, warn: bool = True) -> list[UnitPair]:
    """The producer/consumer pairs of ``model`` (see :func:`trace_unit_pairs`).

    Activation call sites without a pair are named in one warning (``warn=False``:
    silent; :func:`trace_unit_pairs` returns them).

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(), nn.Linear(8, 2))
        >>> infer_unit_pairs(m, torch.randn(2, 4))
        [UnitPair(producer='0', consumer='3', activation='1', norms=())]
    """
    found = trace_unit_pairs(model, example)
    if warn:
        found.warn_skipped("infer_unit_pairs")
    return found.pairs

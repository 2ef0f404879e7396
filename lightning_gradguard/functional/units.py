"""One map of layers and units: which weight dimension holds a layer's output units.

Everything that works per *unit* (AGC's unit-wise norms, initialization fans,
recycling, the doctor) reads the layers of a model through :func:`map_layers`,
so that a Hugging Face ``Conv1D`` (weight stored ``[in, out]``), a transposed
convolution (output channels in dim 1, split by ``groups``) and a ``Linear``
(``[out, in]``) are each read the right way round. A bare weight tensor cannot
tell these apart; the module that owns it can.

Built in:

============================  ===========  ===========================  =====================
layer                         kind         output units                 fan-in
============================  ===========  ===========================  =====================
``nn.Linear`` (+ subclasses)  linear       dim 0 (rows)                 ``in_features``
``nn.Conv1d/2d/3d``           conv         dim 0 (output channels)      ``in/groups · kernel``
``nn.ConvTranspose1d/2d/3d``  conv         dim 1, per group             ``in/groups · kernel``
HF ``Conv1D`` (by structure)  conv1d       dim 1 (columns, ``nf``)      ``weight.shape[0]``
``nn.Embedding(Bag)``         embedding    dim 0 (one row per index)    1 (one-hot input)
``nn.MultiheadAttention``     linear       dim 0 of ``in_proj_weight``  ``embed_dim``
BatchNorm, LayerNorm,         norm         one value per unit           1
GroupNorm, InstanceNorm,
RMSNorm (affine)
============================  ===========  ===========================  =====================

A weight shared by several modules (GPT-2's ``lm_head.weight`` *is*
``transformer.wte.weight``) is one layer, listed once as what it is: an
embedding, with the other holders in :attr:`Layer.tied_to`. Modules that hold
parameters the map does not know are listed by name in
:attr:`LayerMap.unknown`, never guessed.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.ConvTranspose1d(8, 6, 3, groups=2))
    >>> layers = map_layers(model)
    >>> [(layer.name, layer.kind, layer.units, layer.fan_in) for layer in layers]
    [('0', 'linear', 8, 4), ('2', 'conv', 6, 12)]
    >>> layers["2"].unit_norms().shape
    torch.Size([6])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = [
    "KINDS",
    "Layer",
    "LayerMap",
    "LayerSpec",
    "Match",
    "UnitLayout",
    "fan_in_and_fan_out",
    "layer_specs",
    "map_layers",
    "register_layer",
    "rows_layout",
    "unit_norms",
    "unregister_layer",
    "weight_layouts",
]

KINDS = ("linear", "conv", "conv1d", "embedding", "norm")
"""Kinds of the built-in layer specs. A registered spec may name its own kind."""


@dataclass(frozen=True)
class LayerSpec:
    """How one weight of a layer type holds its units.

    Args:
        kind: what the layer is (see :data:`KINDS`; any name for a registered type).
            Features decide by kind what they do (``init_`` initializes ``"linear"``,
            ``"conv"`` and ``"conv1d"`` with fan-based schemes, embeddings as lookup tables).
        unit_dim: the weight dimension holding the output units: 0 (``[out, in, ...]``, as
            Linear and Conv) or 1 (``[in, out, ...]``, as HF Conv1D and ConvTranspose). The
            other of dims 0 and 1 holds the inputs; dims from 2 on are the receptive field.
        weight: the attribute holding the weight.
        bias: the attribute holding the bias (one value per unit), or ``None``.
        lookup: a lookup table (embedding): units are the rows, one per index, and the
            input is one-hot, so ``fan_in`` is 1.
        per_unit: a weight of one value per unit (norm affines): fans are 1.

    The module's ``groups`` attribute, when it has one, splits inputs and outputs.

    Example:
        >>> LayerSpec("conv1d", unit_dim=1).unit_dim
        1
    """

    kind: str
    unit_dim: int = 0
    weight: str = "weight"
    bias: str | None = "bias"
    lookup: bool = False
    per_unit: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError(f"kind={self.kind!r} must be a non-empty string.")
        if self.unit_dim not in (0, 1):
            raise ValueError(
                f"unit_dim={self.unit_dim!r} is not a unit dimension: use 0 ([out, in, ...]) "
                "or 1 ([in, out, ...])."
            )


Match = type[nn.Module] | Callable[[nn.Module], bool]
"""A layer type (matched with ``isinstance``) or a predicate on the module."""


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face ``Conv1D``, by structure: a 2-D weight ``[in, out]`` with ``nf == out``."""
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return False
    nf = getattr(module, "nf", None)
    weight = getattr(module, "weight", None)
    return (
        isinstance(nf, int)
        and isinstance(weight, Tensor)
        and weight.dim() == 2
        and weight.shape[1] == nf
    )


_NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)

_BUILT_IN: list[tuple[Match, tuple[LayerSpec, ...]]] = [
    (nn.Linear, (LayerSpec("linear"),)),
    (nn.modules.conv._ConvTransposeNd, (LayerSpec("conv", unit_dim=1),)),
    (nn.modules.conv._ConvNd, (LayerSpec("conv"),)),
    (_is_hf_conv1d, (LayerSpec("conv1d", unit_dim=1),)),
    (nn.Embedding, (LayerSpec("embedding", bias=None, lookup=True),)),
    (nn.EmbeddingBag, (LayerSpec("embedding", bias=None, lookup=True),)),
    (
        nn.MultiheadAttention,
        (
            LayerSpec("linear", weight="in_proj_weight", bias="in_proj_bias"),
            LayerSpec("linear", weight="q_proj_weight", bias=None),
            LayerSpec("linear", weight="k_proj_weight", bias=None),
            LayerSpec("linear", weight="v_proj_weight", bias=None),
        ),
    ),
    (_NORMS, (LayerSpec("norm", per_unit=True),)),  # type: ignore[list-item]
]

_REGISTERED: list[tuple[Match, tuple[LayerSpec, ...]]] = []


def register_layer(match: Match, spec: LayerSpec | Sequence[LayerSpec]) -> None:
    """Teach the map another layer type (it takes precedence over the built-in ones).

    Args:
        match: a module class (subclasses match too) or a predicate ``module -> bool``.
        spec: how its weight holds the units; several specs for a module with several
            weights (attributes that are ``None`` on a module are passed over).

    Raises:
        TypeError: when ``match`` is neither a module class nor a callable, or ``spec``
            holds something other than :class:`LayerSpec`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class Dense(nn.Module):  # stores its weight [in, out]
        ...     def __init__(self, n_in: int, n_out: int) -> None:
        ...         super().__init__()
        ...         self.kernel = nn.Parameter(torch.randn(n_in, n_out))
        ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
        ...         return x @ self.kernel
        >>> map_layers(nn.Sequential(Dense(3, 5))).unknown
        {'0': ('kernel',)}
        >>> register_layer(Dense, LayerSpec("linear", unit_dim=1, weight="kernel", bias=None))
        >>> layer = map_layers(nn.Sequential(Dense(3, 5)))["0"]
        >>> layer.kind, layer.units, layer.fan_in
        ('linear', 5, 3)
        >>> unregister_layer(Dense)
    """
    specs = (spec,) if isinstance(spec, LayerSpec) else tuple(spec)
    if not specs or not all(isinstance(s, LayerSpec) for s in specs):
        raise TypeError(f"spec={spec!r} must be a LayerSpec or a sequence of LayerSpec.")
    if not (isinstance(match, type) and issubclass(match, nn.Module)) and not callable(match):
        raise TypeError(f"match={match!r} must be an nn.Module class or a predicate on modules.")
    _REGISTERED.insert(0, (match, specs))


def unregister_layer(match: Match) -> None:
    """Forget a type or predicate given to :func:`register_layer` (no-op if unknown).

    Example:
        >>> unregister_layer(nn.Identity)
    """
    _REGISTERED[:] = [(m, s) for m, s in _REGISTERED if m is not match]


def _matches(match: Match | tuple[type[nn.Module], ...], module: nn.Module) -> bool:
    if isinstance(match, (tuple, type)):
        return isinstance(module, match)
    return bool(match(module))


def layer_specs(module: nn.Module) -> tuple[LayerSpec, ...]:
    """The specs of ``module``'s weights (registered types first), or ``()`` if unknown.

    Example:
        >>> [spec.kind for spec in layer_specs(nn.Conv2d(1, 2, 3))]
        ['conv']
    """
    for match, specs in (*_REGISTERED, *_BUILT_IN):
        if _matches(match, module):
            return specs
    return ()


@dataclass(frozen=True)
class UnitLayout:
    """How to read a weight (or its gradient) unit by unit, without copying it.

    The weight is viewed with :attr:`view_shape`; the dimensions in :attr:`unit_dims`
    index the units (in row-major order, that is the unit's index), the others are
    reduced. A grouped transposed convolution ``[in, out/g, k]`` is viewed
    ``[g, in/g, out/g, k]`` with unit dims ``(0, 2)``: output channel ``c = i·out/g + j``.

    Example:
        >>> layout = UnitLayout((3, 2), (1,))  # a Conv1D [in=3, out=2]
        >>> layout.norms(torch.tensor([[3.0, 0.0], [4.0, 1.0], [0.0, 0.0]]))
        tensor([5., 1.])
    """

    view_shape: tuple[int, ...]
    unit_dims: tuple[int, ...]

    @property
    def units(self) -> int:
        """How many units."""
        return math.prod(self.view_shape[d] for d in self.unit_dims)

    @property
    def reduce_dims(self) -> tuple[int, ...]:
        """The dimensions of the view summed over for a unit's norm."""
        return tuple(d for d in range(len(self.view_shape)) if d not in self.unit_dims)

    @property
    def scale_shape(self) -> tuple[int, ...]:
        """The shape a per-unit factor takes to broadcast against :meth:`view`."""
        return tuple(n if d in self.unit_dims else 1 for d, n in enumerate(self.view_shape))

    def view(self, tensor: Tensor) -> Tensor:
        """``tensor`` viewed with :attr:`view_shape` (a view: writing to it writes ``tensor``)."""
        return tensor if tuple(tensor.shape) == self.view_shape else tensor.view(self.view_shape)

    def as_rows(self, tensor: Tensor) -> Tensor:
        """``tensor`` as ``[units, rest]`` (a copy unless the units are already dim 0)."""
        order = (*self.unit_dims, *self.reduce_dims)
        return self.view(tensor).permute(order).reshape(self.units, -1)

    def norms(self, tensor: Tensor) -> Tensor:
        """The 2-norm of every unit, flat (``[units]``), accumulated in float32 at least."""
        return unit_norms(self.view(tensor), self.reduce_dims)

    def scale_(self, tensor: Tensor, factors: Tensor) -> None:
        """Multiply unit ``i`` of ``tensor`` by ``factors[i]``, in place."""
        self.view(tensor).mul_(factors.to(tensor.dtype).view(self.scale_shape))

    def unit_mask(self, mask: Tensor) -> Tensor:
        """A bool mask over :meth:`view` that is true on every entry of the units in ``mask``.

        Use it on the view: ``layout.view(weight)[layout.unit_mask(mask)] = ...``.
        """
        return mask.view(self.scale_shape).expand(self.view_shape)


def unit_norms(viewed: Tensor, reduce_dims: tuple[int, ...]) -> Tensor:
    """2-norms of ``viewed`` over ``reduce_dims``, flat, accumulated in float32 at least.

    When the reduced dims are not the trailing ones (units in dim 1, as HF ``Conv1D``),
    the squares are summed directly: on CPU ``vector_norm`` over a strided dim is an
    order of magnitude slower than ``square().sum()``.

    Example:
        >>> unit_norms(torch.tensor([[3.0, 0.0], [4.0, 1.0]]), (0,))
        tensor([5., 1.])
    """
    low = viewed.dtype in (torch.float16, torch.bfloat16)
    if not reduce_dims:
        return viewed.abs().to(torch.float32 if low else viewed.dtype).reshape(-1)
    trailing = reduce_dims == tuple(range(viewed.dim() - len(reduce_dims), viewed.dim()))
    if trailing:
        dtype = torch.float32 if low else None
        return torch.linalg.vector_norm(viewed, dim=reduce_dims, dtype=dtype).reshape(-1)
    values = viewed.float() if low else viewed
    return values.square().sum(dim=reduce_dims).sqrt().reshape(-1)


def rows_layout(tensor: Tensor) -> UnitLayout:
    """The layout of a bare weight tensor, units in dim 0 (Linear ``[out, in]``, Conv).

    Vectors and scalars are one unit.

    Example:
        >>> rows_layout(torch.zeros(4, 3, 2)).units
        4
    """
    shape = tuple(tensor.shape)
    if len(shape) <= 1:
        return UnitLayout((max(1, math.prod(shape)),), ())
    return UnitLayout(shape, (0,))


@dataclass(frozen=True)
class Layer:
    """One weight of the model, read through its spec.

    Attributes:
        name: the owning module's dotted path (``transformer.h.0.mlp.c_fc``).
        module: the module.
        spec: how the weight holds its units.
        parameter_name: the weight's dotted parameter name (``...c_fc.weight``).
        weight: the weight tensor.
        bias: the bias, if any.
        tied_to: other modules holding this same weight (``("lm_head",)`` for GPT-2's
            ``transformer.wte``).
    """

    name: str
    module: nn.Module
    spec: LayerSpec
    parameter_name: str
    weight: Tensor
    bias: Tensor | None
    tied_to: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        """The spec's kind (``"linear"``, ``"conv"``, ``"conv1d"``, ``"embedding"``, ...)."""
        return self.spec.kind

    @property
    def groups(self) -> int:
        """The module's ``groups`` (1 without one)."""
        groups = getattr(self.module, "groups", 1)
        return groups if isinstance(groups, int) and groups > 0 else 1

    @property
    def unit_dim(self) -> int:
        """The weight dimension that holds the output units."""
        return self.spec.unit_dim

    @property
    def layout(self) -> UnitLayout:
        """How the weight (and its gradient) is read unit by unit."""
        shape = tuple(self.weight.shape)
        if self.spec.per_unit or len(shape) < 2:
            return UnitLayout((max(1, math.prod(shape)),), (0,))
        if self.spec.unit_dim == 0:
            return UnitLayout(shape, (0,))
        if self.groups == 1:
            return UnitLayout(shape, (1,))
        g = self.groups
        return UnitLayout((g, shape[0] // g, *shape[1:]), (0, 2))

    @property
    def units(self) -> int:
        """How many output units."""
        return self.layout.units

    @property
    def receptive_field(self) -> int:
        """The product of the kernel dimensions (1 for Linear)."""
        return math.prod(self.weight.shape[2:]) if self.weight.dim() > 2 else 1

    @property
    def fan_in(self) -> int:
        """Inputs feeding one output unit (receptive field and groups included)."""
        if self.spec.per_unit or self.spec.lookup or self.weight.dim() < 2:
            return 1
        shape = self.weight.shape
        if self.spec.unit_dim == 0:
            return shape[1] * self.receptive_field
        return shape[0] // self.groups * self.receptive_field

    @property
    def fan_out(self) -> int:
        """Outputs one input feeds (receptive field and groups included)."""
        if self.spec.per_unit or self.weight.dim() < 2:
            return 1
        shape = self.weight.shape
        if self.spec.lookup:
            return shape[1]
        if self.spec.unit_dim == 0:
            return shape[0] // self.groups * self.receptive_field
        return shape[1] * self.receptive_field

    def unit_norms(self, tensor: Tensor | None = None) -> Tensor:
        """The 2-norm of every output unit of the weight (or of ``tensor``, e.g. its grad)."""
        return self.layout.norms(self.weight.detach() if tensor is None else tensor)

    def as_rows(self, tensor: Tensor | None = None) -> Tensor:
        """The weight (or ``tensor``) as ``[units, rest]``: row ``i`` is unit ``i``."""
        return self.layout.as_rows(self.weight.detach() if tensor is None else tensor)


@dataclass
class LayerMap:
    """The weight-bearing layers of a model, each weight once (see :func:`map_layers`).

    Attributes:
        layers: one entry per weight, in module order.
        tied: for every module whose weight is listed under another name, that name
            (``{"lm_head": "transformer.wte"}``).
        unknown: modules holding parameters the map does not know, with those
            parameters' names. Features leave them alone and say so.
    """

    layers: list[Layer] = field(default_factory=list)
    tied: dict[str, str] = field(default_factory=dict)
    unknown: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __contains__(self, name: object) -> bool:
        return any(layer.name == name for layer in self.layers)

    def __getitem__(self, name: str) -> Layer:
        """The (first) layer of module ``name``; a tied holder gives its owner's layer."""
        name = self.tied.get(name, name)
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"{name!r} is not a layer of the map")

    def names(self) -> list[str]:
        """The module names of the layers, each once."""
        return list(dict.fromkeys(layer.name for layer in self.layers))

    def of_kind(self, *kinds: str) -> list[Layer]:
        """The layers of the given kinds."""
        return [layer for layer in self.layers if layer.kind in kinds]

    def by_weight(self) -> dict[Tensor, Layer]:
        """Each layer keyed by its weight tensor (identity), for parameter-list callers."""
        return {layer.weight: layer for layer in self.layers}

    def layouts(self) -> dict[Tensor, UnitLayout]:
        """Each weight's :class:`UnitLayout`, keyed by the weight tensor (identity)."""
        return {layer.weight: layer.layout for layer in self.layers}


def _tensor_attr(module: nn.Module, name: str | None) -> Tensor | None:
    if name is None:
        return None
    value = getattr(module, name, None)
    return value if isinstance(value, Tensor) else None


def map_layers(model: nn.Module) -> LayerMap:
    """Walk ``model`` and return its weight-bearing layers, each weight once.

    A weight held by several modules is listed once, under an embedding that holds
    it if there is one, else under the first holder; the others are in
    :attr:`LayerMap.tied` and :attr:`Layer.tied_to`. Parameters that no spec
    covers are reported in :attr:`LayerMap.unknown` by module name.

    Args:
        model: the module tree (a ``torch.compile`` wrapper is read through).

    Example:
        >>> class Tied(nn.Module):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.wte = nn.Embedding(10, 4)
        ...         self.head = nn.Linear(4, 10, bias=False)
        ...         self.head.weight = self.wte.weight
        >>> layers = map_layers(Tied())
        >>> [(layer.name, layer.kind, layer.tied_to) for layer in layers]
        [('wte', 'embedding', ('head',))]
        >>> layers.tied
        {'head': 'wte'}
    """
    model = getattr(model, "_orig_mod", model)
    candidates: list[tuple[str, nn.Module, LayerSpec, str, Tensor, Tensor | None]] = []
    unknown: dict[str, tuple[str, ...]] = {}
    for name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        covered: set[str] = set()
        for spec in layer_specs(module):
            weight = _tensor_attr(module, spec.weight)
            if weight is None:
                continue
            bias = _tensor_attr(module, spec.bias)
            prefix = f"{name}." if name else ""
            candidates.append((name, module, spec, prefix + spec.weight, weight, bias))
            covered.update(n for n in (spec.weight, spec.bias) if n is not None)
        missing = tuple(n for n in own if n not in covered)
        if missing:
            unknown[name] = missing
    holders: dict[Tensor, list[int]] = {}
    for i, candidate in enumerate(candidates):
        holders.setdefault(candidate[4], []).append(i)
    result = LayerMap(unknown=unknown)
    owners: dict[int, tuple[str, ...]] = {}
    for indices in holders.values():
        lookups = [i for i in indices if candidates[i][2].lookup]
        owner = lookups[0] if lookups else indices[0]
        others = tuple(candidates[i][0] for i in indices if i != owner)
        owners[owner] = others
        for other in others:
            result.tied[other] = candidates[owner][0]
    for i, (name, module, spec, parameter_name, weight, bias) in enumerate(candidates):
        if i in owners:
            result.layers.append(Layer(name, module, spec, parameter_name, weight, bias, owners[i]))
    return result


def fan_in_and_fan_out(module: nn.Module) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a module's (first) weight, read through the map.

    Unlike ``nn.init._calculate_fan_in_and_fan_out``, which reads every weight as
    ``[out, in, ...]``, this reads HF ``Conv1D`` and transposed convolutions the
    right way round and counts ``groups``.

    Raises:
        ValueError: when the map does not know ``module``.

    Example:
        >>> fan_in_and_fan_out(nn.Conv2d(8, 4, 3, groups=2))
        (36, 18)
    """
    for spec in layer_specs(module):
        weight = _tensor_attr(module, spec.weight)
        if weight is not None:
            layer = Layer("", module, spec, spec.weight, weight, _tensor_attr(module, spec.bias))
            return layer.fan_in, layer.fan_out
    raise ValueError(
        f"{type(module).__name__} is not a layer the unit map knows: register it with "
        "register_layer(type, LayerSpec(...))."
    )


def weight_layouts(
    model: nn.Module | Sequence[nn.Module] | Mapping[str, nn.Module],
) -> dict[Tensor, UnitLayout]:
    """Each weight's :class:`UnitLayout`, keyed by the weight tensor, for a model or modules.

    Example:
        >>> conv1d_like = nn.Linear(3, 2)
        >>> list(weight_layouts([conv1d_like]).values())
        [UnitLayout(view_shape=(2, 3), unit_dims=(0,))]
    """
    if isinstance(model, nn.Module):
        return map_layers(model).layouts()
    modules = model.values() if isinstance(model, Mapping) else model
    layouts: dict[Tensor, UnitLayout] = {}
    for module in modules:
        layouts.update(map_layers(module).layouts())
    return layouts

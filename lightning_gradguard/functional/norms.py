"""Per-tensor and per-group norms of gradients and parameters, in one fused pass.

Pure torch: no Lightning, no wandb. Every function returns device tensors and
never synchronizes with the host, so it can run on every training step.

The work is split the way torch's own ``clip_grad.py`` splits it:

1. :class:`NormGrouping` decides, once, which parameters are measured and which
   group (layer) each belongs to.
2. :func:`grouped_norms` computes every tensor's norm with one
   ``torch._foreach_norm`` call, adds them up per group on the device and, for
   sharded tensors (FSDP2 ``DTensor`` shards), reduces all groups with a single
   collective per device mesh.

Per-tensor norms are computed in the tensors' own dtype (half precision in float32),
then stacked and summed per group in float64. That is exact unless a norm is below
:data:`TINY_NORM`: the gradients of a vanishing network can be around 1e-24, whose
squares underflow to exactly 0 in float32. ``exact=True`` computes the per-tensor norms
from float64 copies; :class:`~lightning_gradguard.GradNormMonitor` recomputes the groups
below :data:`TINY_NORM` that way on logging steps.

Example:
    >>> import torch
    >>> from lightning_gradguard.functional import NormGrouping, grad_norms
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    >>> model(torch.randn(8, 4)).sum().backward()
    >>> grouping = NormGrouping.from_module(model)
    >>> grouping.names
    ('0', '2')
    >>> norms = grad_norms(grouping)
    >>> expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    >>> bool(torch.isclose(norms.total.float(), expected))
    True
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

try:  # DTensor (FSDP2 shards); imported once, not per tensor
    from torch.distributed.tensor import DTensor as _DTensor
    from torch.distributed.tensor import Replicate as _Replicate
except ImportError:  # pragma: no cover - torch built without distributed
    _DTensor = None  # type: ignore[assignment, misc]

__all__ = [
    "GROUP_BY_CHOICES",
    "ROOT_GROUP",
    "TINY_NORM",
    "GroupBy",
    "GroupedNorms",
    "NormGrouping",
    "ParameterSnapshot",
    "clean_parameter_name",
    "grad_norms",
    "grouped_norms",
    "local_tensors",
    "param_norms",
    "parse_norm_type",
    "tensor_norms",
    "unsupported_reason",
    "validate_group_by",
]

GroupBy = str | Callable[[str], str | None]
"""How parameters are grouped: ``"module"``, ``"parameter"``, ``"depth"`` or a callable."""

GROUP_BY_CHOICES = ("module", "parameter", "depth")

# Prefixes that wrappers insert into parameter names; the user's model does not have them.
# torch.compile, FSDP1 and activation checkpointing wrap modules at any depth. DDP's
# "module." is not stripped: Lightning hands callbacks the unwrapped module, and a user's
# own submodule may well be called "module".
_INNER_WRAPPERS = re.compile(r"(^|\.)(_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")

ROOT_GROUP = "(root)"
"""Group name of parameters that live directly on the top-level module."""


def parse_norm_type(norm_type: float | int | str, argument: str = "norm_type") -> float:
    """Validate a norm order and return it as a float (``"inf"`` gives ``math.inf``).

    Args:
        norm_type: a positive number, or ``"inf"`` / ``math.inf`` for the max-norm.
        argument: the argument name used in the error message.

    Raises:
        ValueError: if ``norm_type`` is not positive or not a number.

    Example:
        >>> parse_norm_type(2)
        2.0
        >>> parse_norm_type("inf")
        inf
    """
    try:
        if isinstance(norm_type, bool):  # float(True) is 1.0: a flag is not a norm order
            raise TypeError
        value = float(norm_type)
    except (TypeError, ValueError):
        raise ValueError(
            f"{argument}={norm_type!r} is not a norm order: use a positive number "
            "(2.0 for the L2 norm) or 'inf' for the max-norm."
        ) from None
    if not value > 0:
        raise ValueError(
            f"{argument}={norm_type!r} is not a norm order: use a positive number "
            "(2.0 for the L2 norm) or 'inf' for the max-norm."
        )
    return value


def clean_parameter_name(name: str) -> str:
    """Strip the prefixes that ``torch.compile``, FSDP1 and checkpoint wrappers add to names.

    Example:
        >>> clean_parameter_name("_orig_mod.encoder._fsdp_wrapped_module.0.weight")
        'encoder.0.weight'
        >>> clean_parameter_name("encoder.module.weight")  # a user's submodule named "module"
        'encoder.module.weight'
    """
    previous = None
    while previous != name:  # nested wrappers: strip until nothing changes
        previous, name = name, _INNER_WRAPPERS.sub(r"\1", name)
    return name


def _group_of(name: str, group_by: GroupBy, depth: int) -> str | None:
    if callable(group_by):
        return group_by(name)
    if group_by == "parameter":
        return name
    module_path, _, _ = name.rpartition(".")
    if group_by == "depth":
        module_path = ".".join(module_path.split(".")[:depth]) if module_path else ""
    return module_path or ROOT_GROUP


def unsupported_reason(parameter: Tensor) -> str | None:
    """Why a parameter's norm cannot be taken (``None`` when it can).

    Integer and bool tensors have no norm (``linalg.vector_norm`` refuses them) and
    cannot receive a gradient; sparse gradients have no ``linalg.vector_norm`` kernel
    (torch's ``clip_grad_norm_`` fails on them too). Complex tensors are supported.

    Example:
        >>> unsupported_reason(torch.zeros(2, dtype=torch.long))
        'integer dtype torch.int64'
        >>> unsupported_reason(torch.zeros(2, dtype=torch.complex64)) is None
        True
    """
    if not (parameter.is_floating_point() or parameter.is_complex()):
        kind = "bool" if parameter.dtype is torch.bool else "integer"
        return f"{kind} dtype {parameter.dtype}"
    grad = parameter.grad
    if grad is not None and grad.layout is not torch.strided:
        return "sparse gradient"
    return None


def _validate_patterns(patterns: Sequence[str] | None, argument: str) -> tuple[str, ...]:
    if patterns is None:
        return ()
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"{argument}={patterns!r} must be a list of glob patterns over parameter names, "
            "for example ['encoder.*', '*.bias']."
        )
    return tuple(patterns)


def validate_group_by(group_by: GroupBy, depth: int | None) -> int:
    """Check ``group_by``/``depth`` and return the depth to use (1 when unused).

    Raises:
        ValueError: on an unknown ``group_by``, a depth that is not a positive integer, or
            a depth given with another grouping (it would be ignored).
    """
    if not callable(group_by) and group_by not in GROUP_BY_CHOICES:
        raise ValueError(
            f"group_by={group_by!r} is not a grouping: use one of {list(GROUP_BY_CHOICES)} "
            "or a callable that maps a parameter name to a group name (or None to skip it)."
        )
    if group_by == "depth":
        if depth is None or isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(
                f"depth={depth!r} must be a positive integer when group_by='depth' "
                "(depth=2 groups 'encoder.layers.3.attn.weight' under 'encoder.layers')."
            )
        return depth
    if depth is not None:
        raise ValueError(
            f"depth={depth!r} is only used with group_by='depth' (group_by is {group_by!r}): "
            "drop depth, or set group_by='depth'."
        )
    return 1


@dataclass(frozen=True)
class NormGrouping:
    """Which parameters are measured, and the group (layer) each one belongs to.

    Attributes:
        names: group names, in the order their first parameter appears in the model.
        parameter_names: the selected parameters' cleaned dotted names.
        parameters: the selected parameters.
        group_index: for every selected parameter, the index of its group in ``names``.
        left_out: ``(name, reason)`` of the parameters that matched but cannot be
            measured: integer (or bool) dtypes, and gradients that are sparse
            (``nn.Embedding(sparse=True)``) when the grouping is made. torch's own
            ``clip_grad_norm_`` fails on both; callers warn once and go on without them.
    """

    names: tuple[str, ...]
    parameter_names: tuple[str, ...]
    parameters: tuple[Tensor, ...]
    group_index: tuple[int, ...]
    left_out: tuple[tuple[str, str], ...] = ()
    _index_cache: dict[Any, Tensor] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_named_parameters(
        cls,
        named_parameters: Iterable[tuple[str, Tensor]],
        group_by: GroupBy = "module",
        depth: int | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        only: Iterable[Tensor] | None = None,
    ) -> NormGrouping:
        """Group named parameters.

        Args:
            named_parameters: ``(name, parameter)`` pairs, e.g. ``model.named_parameters()``.
            group_by: ``"module"`` (the owning module's dotted path, the default),
                ``"parameter"`` (one group per tensor), ``"depth"`` (the module path cut
                to ``depth`` components) or a callable ``name -> group name or None``
                (``None`` leaves the parameter out).
            depth: number of leading path components kept with ``group_by="depth"``.
            include: glob patterns over parameter names; when given, only matching
                parameters are measured.
            exclude: glob patterns over parameter names to leave out.
            only: restrict to these parameter objects (e.g. one optimizer's).

        Returns:
            The grouping. Parameters with ``requires_grad=False`` are kept: their
            gradient is simply absent, which the norm functions handle.
        """
        depth = validate_group_by(group_by, depth)
        includes = _validate_patterns(include, "include")
        excludes = _validate_patterns(exclude, "exclude")
        allowed = None if only is None else {id(p) for p in only}
        names: dict[str, int] = {}
        parameter_names: list[str] = []
        parameters: list[Tensor] = []
        group_index: list[int] = []
        left_out: list[tuple[str, str]] = []
        seen: set[int] = set()
        for raw_name, parameter in named_parameters:
            if id(parameter) in seen or (allowed is not None and id(parameter) not in allowed):
                continue
            seen.add(id(parameter))
            name = clean_parameter_name(raw_name)
            if includes and not any(fnmatch.fnmatchcase(name, p) for p in includes):
                continue
            if any(fnmatch.fnmatchcase(name, p) for p in excludes):
                continue
            group = _group_of(name, group_by, depth)
            if group is None:
                continue
            reason = unsupported_reason(parameter)
            if reason is not None:
                left_out.append((name, reason))
                continue
            parameter_names.append(name)
            parameters.append(parameter)
            group_index.append(names.setdefault(group, len(names)))
        return cls(
            tuple(names),
            tuple(parameter_names),
            tuple(parameters),
            tuple(group_index),
            tuple(left_out),
        )

    def describe_left_out(self) -> str:
        """The left-out parameters in words, for a warning (empty when none).

        Example:
            >>> embedding = torch.nn.Embedding(10, 3, sparse=True)
            >>> embedding(torch.tensor([1, 2])).sum().backward()
            >>> NormGrouping.from_module(embedding).describe_left_out()
            'weight (sparse gradient)'
        """
        return ", ".join(f"{name} ({reason})" for name, reason in self.left_out)

    @classmethod
    def from_module(cls, module: torch.nn.Module, **kwargs: Any) -> NormGrouping:
        """Group ``module.named_parameters()``; keywords as :meth:`from_named_parameters`."""
        return cls.from_named_parameters(module.named_parameters(), **kwargs)

    def uniform_device(self) -> torch.device | None:
        """The device of every parameter when the fast path of :func:`grad_norms` applies.

        That is: plain tensors (no ``DTensor``), all of one dtype on one device, none
        empty. A gradient always has its parameter's dtype, device and shape (torch
        refuses any other ``.grad``), so this holds for the gradients too, on every
        step: it is worked out once. ``None`` when it does not hold.

        Example:
            >>> NormGrouping.from_module(torch.nn.Linear(2, 2)).uniform_device()
            device(type='cpu')
        """
        cache: dict[Any, Any] = self._index_cache
        if "uniform" not in cache:
            found: torch.device | None = None
            params = self.parameters
            if params:
                dtype, device = params[0].dtype, params[0].device
                if all(
                    not (_DTensor is not None and isinstance(p, _DTensor))
                    and p.dtype is dtype
                    and p.device == device
                    and p.numel()
                    for p in params
                ):
                    found = device
            cache["uniform"] = found
        return cache["uniform"]

    def index_tensor(self, present: tuple[int, ...] | None, device: torch.device) -> Tensor:
        """Group indices (int64, on ``device``) of the parameters at positions ``present``.

        ``None`` stands for every parameter. Cached, so a steady training loop builds
        it once.
        """
        key = (present, device)
        index = self._index_cache.get(key)
        if index is None:
            positions = range(len(self.parameters)) if present is None else present
            index = torch.tensor(
                [self.group_index[i] for i in positions], dtype=torch.long, device=device
            )
            self._index_cache[key] = index
        return index

    def groups_with_gradients(self, present: tuple[int, ...], device: torch.device) -> Tensor:
        """A bool per group: does one of its parameters at positions ``present`` exist.

        A group whose parameters have no gradient (frozen with ``requires_grad=False``
        while still in the optimizer, or unused this step) has norm 0 but is not
        "vanishing": nothing was measured. Cached like :meth:`index_tensor`.
        """
        key = ("groups", present, device)
        mask = self._index_cache.get(key)
        if mask is None:
            mask = torch.zeros(len(self.names), dtype=torch.bool)
            mask[[self.group_index[i] for i in present]] = True
            mask = mask.to(device)
            self._index_cache[key] = mask
        return mask


@dataclass(frozen=True)
class GroupedNorms:
    """Norms of every group and of everything together, as device tensors.

    Attributes:
        groups: shape ``(len(grouping.names),)``; 0 for a group with no tensor.
        total: the norm of all the tensors together (the global norm).
        norm_type: the norm order.
        measured: a bool per group, false where no tensor was there to measure (no
            gradient at all); ``None`` when every group was measured.
    """

    groups: Tensor
    total: Tensor
    norm_type: float
    measured: Tensor | None = None


# --------------------------------------------------------------------------- sharding


def _reduction_dims(tensor: Tensor) -> tuple[Tensor, tuple[Any, tuple[int, ...]] | None]:
    """The local part of a tensor and, for a sharded DTensor, the mesh dims to reduce over."""
    if _DTensor is None or not isinstance(tensor, _DTensor):
        return tensor, None
    if any(p.is_partial() for p in tensor.placements):
        # Partial values are summands, not slices: materialize the sum first.
        placements = [_Replicate() if p.is_partial() else p for p in tensor.placements]
        tensor = tensor.redistribute(tensor.device_mesh, placements)
    dims = tuple(i for i, p in enumerate(tensor.placements) if p.is_shard())
    local = tensor.to_local()
    if not dims:
        return local, None
    return local, (tensor.device_mesh, dims)


def local_tensors(tensors: Sequence[Tensor]) -> tuple[list[Tensor], list[Any]]:
    """Split tensors into their local parts and a reduction key per tensor.

    A plain tensor (or a replicated DTensor) has key ``None``; a sharded DTensor
    has ``(device_mesh, shard_dims)``: its local norms must be reduced over those
    mesh dimensions.
    """
    if _DTensor is None or not any(isinstance(t, _DTensor) for t in tensors):
        return list(tensors), [None] * len(tensors)  # the common, unsharded case
    locals_: list[Tensor] = []
    keys: list[Any] = []
    for tensor in tensors:
        local, key = _reduction_dims(tensor)
        locals_.append(local)
        keys.append(key)
    return locals_, keys


def _all_reduce(values: Tensor, key: tuple[Any, tuple[int, ...]], norm_type: float) -> Tensor:
    mesh, dims = key
    op = dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM
    for dim in dims:
        dist.all_reduce(values, op=op, group=mesh.get_group(dim))
    return values


# --------------------------------------------------------------------------- norms


TINY_NORM = 1e-12
"""Below this a norm accumulated in float32 may have lost its small elements' squares.

Squares of values under about 1e-19 underflow in float32; a tensor whose norm is at
least 1e-12 cannot be dominated by such values, so its float32 norm is accurate.
:func:`grad_norms` callers that log values recompute groups below this with
``exact=True``.
"""


def _dense_part(tensor: Tensor) -> Tensor:
    """A dense tensor with the same norm: an empty shard's zero, a sparse tensor's values."""
    if tensor.layout is not torch.strided:  # nn.Embedding(sparse=True): duplicates summed
        tensor = tensor.coalesce().values() if tensor.is_sparse else tensor.to_dense()
    return tensor if tensor.numel() else tensor.new_zeros(1)  # empty shard: norm 0, inf ok


def _norms_of(
    group: list[Tensor], norm_type: float, exact: bool, dtype: torch.dtype | None = None
) -> Tensor:
    """Stacked norms of tensors of one dtype on one device: one ``_foreach_norm`` call.

    ``dtype``: the tensors' dtype when known (default: the first one's). Raises
    ``TypeError`` when an entry is ``None`` and ``NotImplementedError`` for a sparse
    tensor: :func:`grad_norms`'s fast path falls back on both.
    """
    if exact:
        wide = [t.to(torch.complex128) if t.is_complex() else t.double() for t in group]
        return torch.stack(torch._foreach_norm(wide, norm_type)).real
    if (dtype or group[0].dtype) in (torch.float16, torch.bfloat16):
        return torch.stack(torch._foreach_norm(group, norm_type, dtype=torch.float32))
    return torch.stack(torch._foreach_norm(group, norm_type))


def tensor_norms(tensors: Sequence[Tensor], norm_type: float = 2.0, exact: bool = False) -> Tensor:
    """Norms of local tensors, one fused ``_foreach_norm`` call, stacked into float64.

    Args:
        tensors: plain (local) tensors, on one device.
        norm_type: the norm order (positive, or ``math.inf``).
        exact: accumulate in float64 (a float64 copy of every tensor first). Without
            it float32/float64 tensors accumulate in their own dtype and half
            precision in float32: fast, and exact unless the norm is below
            :data:`TINY_NORM`, where squares of tiny elements underflow.

    Returns:
        A ``(len(tensors),)`` float64 tensor of norms.

    Example:
        >>> tiny = [torch.full((3, 4), 1e-24), torch.ones(4)]
        >>> tensor_norms(tiny)  # float32 squares of 1e-24 underflow
        tensor([0., 2.], dtype=torch.float64)
        >>> tensor_norms(tiny, exact=True)
        tensor([3.4641e-24, 2.0000e+00], dtype=torch.float64)
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    # The common case, checked in one pass: one device, one dtype, no empty shard.
    dtype, device = tensors[0].dtype, tensors[0].device
    if all(t.dtype is dtype and t.numel() and t.device == device for t in tensors):
        try:
            return _norms_of(list(tensors), norm_type, exact).to(torch.float64)
        except NotImplementedError:  # a sparse tensor has no norm kernel: the slow path
            pass
    tensors = [_dense_part(t) for t in tensors]
    first = tensors[0].device
    out = torch.empty(len(tensors), dtype=torch.float64, device=first)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    for indices in groups.values():
        norms = _norms_of([tensors[i] for i in indices], norm_type, exact)
        norms = norms.to(first, torch.float64)
        out[torch.tensor(indices, device=first)] = norms
    return out


def grouped_norms(
    tensors: Sequence[Tensor],
    group_index: Tensor,
    num_groups: int,
    norm_type: float = 2.0,
    keys: Sequence[Any] | None = None,
    exact: bool = False,
) -> GroupedNorms:
    """Per-group and total norms of (possibly sharded) tensors.

    Every tensor's norm is computed in its own dtype (half precision in float32;
    float64 copies with ``exact=True``); the per-group sums and the total are
    accumulated in float64.

    Args:
        tensors: the tensors; ``DTensor`` shards are handled (see ``keys``).
        group_index: int64 tensor, the group of every tensor.
        num_groups: number of groups.
        norm_type: the norm order (positive, or ``math.inf``).
        keys: reduction keys from :func:`local_tensors` when ``tensors`` are already
            local parts; computed here when omitted.
        exact: per-tensor norms in float64 (see :func:`tensor_norms`).

    Returns:
        :class:`GroupedNorms`; under FSDP2 every rank gets the global values after
        one ``all_reduce`` per device mesh dimension.

    Example:
        >>> tensors = [torch.ones(4), torch.ones(5), torch.ones(9)]
        >>> g = grouped_norms(tensors, torch.tensor([0, 0, 1]), num_groups=2)
        >>> [round(x, 6) for x in g.groups.tolist()], round(float(g.total), 4)
        ([3.0, 3.0], 4.2426)
    """
    if keys is None:
        locals_, keys = local_tensors(tensors)
    else:
        locals_ = list(tensors)
    device = locals_[0].device if locals_ else torch.device("cpu")
    is_inf = math.isinf(norm_type)
    powered = _powered(tensor_norms(locals_, norm_type, exact).to(device), norm_type)
    group_index = group_index.to(device)

    distinct = list(dict.fromkeys(keys))  # first-seen order: the same collectives on every rank
    if len(distinct) <= 1:
        # The common cases: all plain tensors (DDP, single device) or all shards of one mesh.
        group_powered = _accumulate(powered, group_index, num_groups, norm_type)
        key = next(iter(distinct), None)
        if key is not None:
            group_powered = _all_reduce(group_powered, key, norm_type)
    else:
        parts = []
        for key in distinct:
            positions = [i for i, k in enumerate(keys) if k == key]
            part = _accumulate(powered[positions], group_index[positions], num_groups, norm_type)
            parts.append(part if key is None else _all_reduce(part, key, norm_type))
        stacked = torch.stack(parts)
        group_powered = stacked.amax(0) if is_inf else stacked.sum(0)
    return _finish(group_powered, norm_type)


def _powered(norms: Tensor, norm_type: float) -> Tensor:
    """``norm ** p`` (the summands of a group's norm); the norms themselves for p = 1, inf."""
    return norms if math.isinf(norm_type) or norm_type == 1.0 else norms.pow(norm_type)


def _accumulate(powered: Tensor, index: Tensor, num_groups: int, norm_type: float) -> Tensor:
    """Per-group sums of ``norm ** p`` in float64 (the maximum for the inf-norm)."""
    out = torch.zeros(num_groups, dtype=torch.float64, device=powered.device)
    if math.isinf(norm_type):
        return out.scatter_reduce_(0, index, powered, reduce="amax", include_self=True)
    return out.index_add_(0, index, powered)


def _finish(group_powered: Tensor, norm_type: float) -> GroupedNorms:
    """Group and total norms from the per-group sums of ``norm ** p``."""
    if math.isinf(norm_type):
        groups = group_powered
        total = groups.max() if groups.numel() else groups.new_zeros(())
    elif norm_type == 1.0:
        groups, total = group_powered, group_powered.sum()
    else:
        inverse = 1.0 / norm_type
        groups, total = group_powered.pow(inverse), group_powered.sum().pow(inverse)
    return GroupedNorms(groups=groups, total=total, norm_type=norm_type)


def _present_gradients(grouping: NormGrouping) -> tuple[tuple[int, ...], list[Tensor]]:
    grads = [parameter.grad for parameter in grouping.parameters]
    if all(grad is not None for grad in grads):  # the common case: all have a gradient
        return tuple(range(len(grads))), grads  # type: ignore[return-value]
    present = tuple(i for i, grad in enumerate(grads) if grad is not None)
    return present, [grads[i] for i in present]  # type: ignore[misc]


def grad_norms(
    grouping: NormGrouping, norm_type: float | str = 2.0, exact: bool = False
) -> GroupedNorms:
    """Per-group and global gradient norms of a grouping's parameters.

    Parameters without a gradient (frozen or unused) count as zero.

    Args:
        grouping: what to measure and how it is grouped.
        norm_type: the norm order (positive, or ``"inf"``).
        exact: float64 per-tensor norms; needed only below :data:`TINY_NORM`
            (vanishing gradients), where float32 squares underflow.

    Returns:
        :class:`GroupedNorms` on the gradients' device; no host synchronization.
    """
    p = parse_norm_type(norm_type)
    device = None if exact else grouping.uniform_device()
    if device is not None:
        # The common case in one pass over the parameters: every check that does not change
        # from step to step was made once (NormGrouping.uniform_device).
        maybe_grads = [parameter.grad for parameter in grouping.parameters]
        try:
            dtype = grouping.parameters[0].dtype
            per_tensor = _norms_of(maybe_grads, p, False, dtype)  # type: ignore[arg-type]
        except (TypeError, NotImplementedError):
            pass  # a parameter without a gradient (None), or a sparse one: the general path
        else:
            return _uniform_grouped(grouping, per_tensor, device, p)
    present, grads = _present_gradients(grouping)
    norms = _grouped(grouping, present, grads, p, exact)
    if len(present) == len(grouping.parameters):
        return norms
    measured = grouping.groups_with_gradients(present, norms.groups.device)
    return GroupedNorms(norms.groups, norms.total, norms.norm_type, measured)


def param_norms(
    grouping: NormGrouping, norm_type: float | str = 2.0, exact: bool = False
) -> GroupedNorms:
    """Per-group and global norms of a grouping's parameters themselves.

    Example:
        >>> layer = torch.nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = layer.weight.fill_(1.0), layer.bias.fill_(0.0)
        >>> param_norms(NormGrouping.from_module(layer)).total
        tensor(2., dtype=torch.float64)
    """
    p = parse_norm_type(norm_type)
    device = None if exact else grouping.uniform_device()
    if device is not None:
        with torch.no_grad():
            norms = _norms_of(list(grouping.parameters), p, exact=False)
        return _uniform_grouped(grouping, norms, device, p)
    present = tuple(range(len(grouping.parameters)))
    return _grouped(grouping, present, [t.detach() for t in grouping.parameters], p, exact)


def _uniform_grouped(
    grouping: NormGrouping, norms: Tensor, device: torch.device, norm_type: float
) -> GroupedNorms:
    """Groups and total from the per-tensor norms of all of a uniform grouping's tensors."""
    powered = _powered(norms.to(torch.float64), norm_type)
    index = grouping.index_tensor(None, device)
    return _finish(_accumulate(powered, index, len(grouping.names), norm_type), norm_type)


def _grouped(
    grouping: NormGrouping,
    present: tuple[int, ...],
    tensors: list[Tensor],
    norm_type: float,
    exact: bool,
    keys: Sequence[Any] | None = None,
) -> GroupedNorms:
    num_groups = len(grouping.names)
    if not tensors:
        zeros = torch.zeros(num_groups, dtype=torch.float64)
        return GroupedNorms(zeros, zeros.sum(), norm_type)
    locals_, found_keys = local_tensors(tensors) if keys is None else (tensors, list(keys))
    device = locals_[0].device
    index = grouping.index_tensor(present, device)
    return grouped_norms(locals_, index, num_groups, norm_type, keys=found_keys, exact=exact)


@dataclass
class ParameterSnapshot:
    """A temporary copy of the local parameter values, to measure one optimizer update.

    Take it just before ``optimizer.step()`` and call :meth:`update_ratios` right
    after; then drop it. Nothing is kept between steps.

    Example:
        >>> layer = torch.nn.Linear(3, 3)
        >>> grouping = NormGrouping.from_module(layer)
        >>> snapshot = ParameterSnapshot.take(grouping)
        >>> with torch.no_grad():
        ...     _ = layer.weight.mul_(1.5), layer.bias.mul_(1.5)
        >>> ratios = snapshot.update_ratios(grouping)
        >>> [round(x, 6) for x in ratios.tolist()]
        [0.5]
    """

    values: list[Tensor]
    keys: list[Any]

    @classmethod
    def take(cls, grouping: NormGrouping) -> ParameterSnapshot:
        """Copy the grouping's local parameter values (one fused clone)."""
        locals_, keys = local_tensors([p.detach() for p in grouping.parameters])
        values = list(torch._foreach_add(locals_, 0.0)) if locals_ else []
        return cls(values=values, keys=keys)

    def update_ratios(
        self, grouping: NormGrouping, before: Tensor | None = None, eps: float = 1e-12
    ) -> Tensor:
        """Per-group ``‖θ_now − θ_snapshot‖ / ‖θ_snapshot‖`` (L2), one float64 vector.

        Args:
            grouping: the grouping the snapshot was taken from.
            before: the per-group L2 norms of the snapshot, when already known
                (``param_norms`` of the same step); computed otherwise.
            eps: floor of the denominator.

        The snapshot is consumed: it is overwritten with the difference in place.
        """
        num_groups = len(grouping.names)
        if not self.values:
            return torch.zeros(num_groups, dtype=torch.float64)
        present = tuple(range(len(grouping.parameters)))
        if before is None:
            before = _grouped(grouping, present, self.values, 2.0, False, keys=self.keys).groups
        now, _ = local_tensors([p.detach() for p in grouping.parameters])
        torch._foreach_sub_(self.values, now)  # θ_before − θ_now, in the snapshot's memory
        delta = _grouped(grouping, present, self.values, 2.0, False, keys=self.keys)
        self.values = []
        return delta.groups / before.clamp_min(eps)

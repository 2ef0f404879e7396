"""In-place gradient clippers, and the plans that decide a clipping before applying it.

Clippers take norms that were already computed (compute once, reuse) and never
synchronize with the host:

- :func:`clip_by_norm_` scales gradients so their norm is at most a threshold;
  it keeps the gradient's direction.
- :func:`clip_by_value_` clamps every element; it changes the direction.
- :func:`agc_` is unit-wise adaptive gradient clipping (Brock et al., 2021).

The first argument names what a function works on, the same way everywhere:
``grads`` when it needs the gradient tensors alone (they are changed in place:
:func:`clip_by_norm_`, :func:`clip_by_value_`, :func:`scale_`), ``parameters``
when it also reads the weights (a model, its modules, or parameters whose
``.grad`` is changed: :func:`agc_`, :func:`agc_plan`,
:func:`~lightning_gradguard.functional.clip_with_policy_`). This is the split of
torch's ``get_total_norm(tensors)`` and ``clip_grads_with_norm_(parameters, ...)``.

A :class:`ClipPlan` is one step's clipping, decided but not applied:
:class:`NormPlan`, :class:`ValuePlan` and :class:`AGCPlan`. The policies of
:mod:`~lightning_gradguard.functional.policies` make them; a caller that reads
flags to the host anyway applies only the parts that change something.

Example:
    >>> import torch
    >>> grads = [torch.tensor([3.0]), torch.tensor([4.0])]  # global norm 5.0
    >>> norm = torch.tensor(5.0, dtype=torch.float64)
    >>> coef = clip_by_norm_(grads, torch.tensor(1.0, dtype=torch.float64), norm)
    >>> round(float(torch.nn.utils.get_total_norm(grads)), 4)
    1.0
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gradguard._checks import check_number
from lightning_gradguard.functional.norms import _all_reduce, local_tensors
from lightning_gradguard.functional.units import UnitLayout, map_layers, unit_norms

__all__ = [
    "CLIP_EPS",
    "STACK_LIMIT",
    "AGCPlan",
    "AGCTarget",
    "ClipPlan",
    "NormPlan",
    "ValuePlan",
    "agc_",
    "agc_plan",
    "clip_by_norm_",
    "clip_by_value_",
    "clip_coefficients",
    "layout_norms",
    "scale_",
]

CLIP_EPS = 1e-6
"""Added to the norm in ``threshold / (norm + eps)``, as torch's ``clip_grad_norm_`` does."""


# --------------------------------------------------------------------------- clippers


def clip_coefficients(threshold: Tensor, norm: Tensor, eps: float = CLIP_EPS) -> Tensor:
    """The factor that brings ``norm`` down to ``threshold``: 1 unless ``norm > threshold``.

    Then it is ``threshold / (norm + eps)``, as in torch's ``clip_grad_norm_``.
    A NaN norm gives 1 (nothing to scale by); steps with non-finite gradients are
    skipped rather than clipped.
    """
    ones = torch.ones_like(norm)
    return torch.where(norm > threshold, threshold / (norm + eps), ones)


@torch.no_grad()
def clip_by_norm_(
    grads: Sequence[Tensor],
    threshold: Tensor,
    norm: Tensor,
    group_index: Tensor | None = None,
    eps: float = CLIP_EPS,
) -> Tensor:
    """Scale gradients in place so their norm is at most ``threshold``.

    Args:
        grads: the gradients (plain tensors or DTensor shards).
        threshold: scalar for a global clip, or one threshold per group.
        norm: the precomputed norm(s), same shape as ``threshold``.
        group_index: the group of every gradient when ``threshold`` is per group.
        eps: added to the norm, as in torch's ``clip_grad_norm_``.

    Returns:
        The clip coefficient(s) applied (1 where nothing was clipped).

    Raises:
        ValueError: for a negative (or NaN) number as threshold, which would flip the
            gradient's sign. A tensor threshold is checked on its device without a host
            sync (``torch._assert_async``: a RuntimeError).

    Example:
        >>> g = [torch.tensor([3.0, 4.0])]
        >>> clip_by_norm_(g, torch.tensor(1.0), torch.tensor(5.0))
        tensor(0.2000)
        >>> g[0]
        tensor([0.6000, 0.8000])
    """
    threshold = _check_threshold(threshold)
    coef = clip_coefficients(threshold, norm, eps)
    scale_(grads, coef, group_index)
    return coef


def _check_threshold(threshold: Tensor | float) -> Tensor:
    """Refuse a negative or NaN clipping threshold (a Python number or a tensor)."""
    if not isinstance(threshold, Tensor):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(
                f"clip_by_norm_(threshold={threshold!r}): threshold must be a number or a tensor."
            )
        if not threshold >= 0:
            raise ValueError(
                f"clip_by_norm_(threshold={threshold!r}): threshold must be >= 0 (a negative "
                "threshold would flip the gradients' sign)."
            )
        return torch.tensor(float(threshold), dtype=torch.float64)
    # A tensor threshold is checked where it lives, without reading it back to the host
    # (on the CPU this raises RuntimeError at once; on an accelerator, at its next sync).
    torch._assert_async(
        (threshold >= 0).all(),
        "clip_by_norm_(threshold=...): threshold must be >= 0 (a negative threshold would "
        "flip the gradients' sign)",
    )
    return threshold


_COMPLEX_TO_REAL = {
    torch.complex32: torch.float16,
    torch.complex64: torch.float32,
    torch.complex128: torch.float64,
}


def _real_dtype(tensor: Tensor) -> torch.dtype:
    """The dtype a real coefficient takes to scale ``tensor`` (complex: its parts' dtype)."""
    return _COMPLEX_TO_REAL.get(tensor.dtype, tensor.dtype)


@torch.no_grad()
def scale_(grads: Sequence[Tensor], coef: Tensor, group_index: Tensor | None = None) -> None:
    """Multiply gradients in place by a coefficient, or by one coefficient per group.

    The scaling pass of norm clipping, for callers that computed the coefficients
    already (and may skip this pass when none is below 1).

    Example:
        >>> g = [torch.tensor([3.0, 4.0]), torch.tensor([1.0])]
        >>> scale_(g, torch.tensor([0.5, 2.0]), group_index=torch.tensor([0, 1]))
        >>> g
        [tensor([1.5000, 2.0000]), tensor([2.])]
    """
    if not grads:
        return
    locals_, _ = local_tensors(grads)
    if coef.dim() == 0:
        torch._foreach_mul_(locals_, coef.to(locals_[0].device, _real_dtype(locals_[0])))
        return
    if group_index is None:
        raise ValueError("scale_: per-group coefficients need group_index.")
    per_tensor = coef.index_select(0, group_index.to(coef.device)).to(_real_dtype(locals_[0]))
    torch._foreach_mul_(locals_, list(per_tensor.to(locals_[0].device).unbind(0)))


@torch.no_grad()
def clip_by_value_(grads: Sequence[Tensor], clip_value: float) -> None:
    """Clamp every gradient element to ``[-clip_value, clip_value]`` in place.

    Unlike :func:`clip_by_norm_` this changes the gradient's direction. Complex
    gradients have their real and imaginary parts clamped.

    Example:
        >>> g = [torch.tensor([0.5, -3.0])]
        >>> clip_by_value_(g, 1.0)
        >>> g[0]
        tensor([ 0.5000, -1.0000])
    """
    check_number(clip_value, "clip_value", "clip_by_value_", low=0, low_open=True)
    if not grads:
        return
    locals_, _ = local_tensors(grads)
    # Complex gradients: the real and imaginary parts are clamped (clamp has no complex
    # kernel; a view as real pairs changes the gradient in place).
    locals_ = [torch.view_as_real(t) if t.is_complex() else t for t in locals_]
    torch._foreach_clamp_min_(locals_, -clip_value)
    torch._foreach_clamp_max_(locals_, clip_value)


# --------------------------------------------------------------------------- plans


class ClipPlan:
    """One step's clipping, decided before any gradient changes: what every plan offers.

    A policy makes a plan in two steps (``prepare``, then ``decide`` with the agreed
    norm, see :mod:`~lightning_gradguard.functional.policies`); the caller then reads
    what it needs from it and applies it. Subclasses: :class:`NormPlan` (scale by a
    coefficient), :class:`ValuePlan` (clamp every element), :class:`AGCPlan` (scale
    every output unit).

    Attributes:
        threshold: what the step clips to, a device tensor shaped like the norm, set
            by ``decide``: a norm policy's threshold(s), or a direct clipper's fixed
            bound (``clip_value``, AGC's ``clipping``). ``None`` before ``decide``.
        coef: the norm-clipping coefficient(s), 1 where nothing clips; ``None`` for
            plans that do not scale by a norm.
    """

    threshold: Tensor | None = None
    coef: Tensor | None = None

    def measured_norm(self) -> Tensor | None:
        """The 2-norm of all the gradients, when preparing measured it on the way.

        ``None`` (the default) when it did not, or when it is only this rank's part
        (sharded gradients): the caller measures the norm itself.
        """
        return None

    def needs_scaling(self) -> Tensor:  # pragma: no cover - abstract
        """Which parts of :meth:`apply_` would change anything: a bool vector on the device.

        A caller that reads flags to the host anyway (to skip a step) reads these with
        them and passes them back to :meth:`apply_`, which then skips the passes that
        would change nothing.
        """
        raise NotImplementedError

    def apply_(self, parts: Sequence[bool] | None = None) -> None:  # pragma: no cover
        """Clip in place: every part, or only those flagged in ``parts``."""
        raise NotImplementedError

    def clipped_norm(self, applied: bool = True) -> Tensor | None:
        """The global norm of the gradients after this step, when known without a pass.

        Args:
            applied: ``False`` when :meth:`apply_` did not run (a skipped step): the
                gradients kept their norm.

        Returns:
            A device tensor, or ``None`` (the default) when only a pass over the
            gradients can tell.
        """
        return None


@dataclass
class NormPlan(ClipPlan):
    """Norm clipping: multiply the gradients by ``coef`` (one per group), set by ``decide``.

    Attributes:
        parameters: the parameters (a policy may read the weights, as GuardClip does).
        grads: the gradients it scales; empty for a policy that never clips.
        group_index: the group of every gradient when the norm is one per group.
        norm: the norm(s) it was decided with, set by ``decide`` with ``coef``.

    Example:
        >>> g = [torch.tensor([3.0, 4.0])]
        >>> plan = NormPlan([], g)
        >>> plan.norm, plan.coef = torch.tensor(5.0), torch.tensor(0.2)
        >>> plan.needs_scaling(), float(plan.clipped_norm())
        (tensor([True]), 1.0)
        >>> plan.apply_()
        >>> g[0]
        tensor([0.6000, 0.8000])
    """

    parameters: list[Tensor]
    grads: list[Tensor]
    group_index: Tensor | None = None
    norm: Tensor | None = None

    def _coef(self) -> Tensor:
        if self.coef is None:
            raise RuntimeError("NormPlan: decide the plan first (ClipPolicy.decide sets coef).")
        return self.coef

    def needs_scaling(self) -> Tensor:
        return (self._coef() < 1).any().view(1)

    def apply_(self, parts: Sequence[bool] | None = None) -> None:
        coef = self._coef()
        if parts is None or any(parts):
            scale_(self.grads, coef, self.group_index)

    def clipped_norm(self, applied: bool = True) -> Tensor | None:
        """From the norm(s) and coefficient(s) (no pass); one per group: combined."""
        coef = self._coef()
        if self.norm is None:
            return None
        after = self.norm * coef if applied else self.norm
        return after.square().sum().sqrt() if after.dim() else after


@dataclass
class ValuePlan(ClipPlan):
    """Value clipping: clamp every element of ``grads`` to ``[-clip_value, clip_value]``.

    Example:
        >>> g = [torch.tensor([0.5, -3.0])]
        >>> plan = ValuePlan(g, 1.0)
        >>> plan.needs_scaling()
        tensor([True])
        >>> plan.apply_()
        >>> g[0]
        tensor([ 0.5000, -1.0000])
    """

    grads: list[Tensor]
    clip_value: float

    def needs_scaling(self) -> Tensor:
        device = self.grads[0].device if self.grads else None
        return torch.ones(1, dtype=torch.bool, device=device)

    def apply_(self, parts: Sequence[bool] | None = None) -> None:
        if parts is None or any(parts):
            clip_by_value_(self.grads, self.clip_value)


def _norm_dtype(tensor: Tensor) -> torch.dtype | None:
    # float32 accumulation (half precision is upcast): a float64 norm on CPU copies the
    # whole tensor first, and AGC's decision needs no more than float32 precision.
    return torch.float32 if tensor.dtype in (torch.float16, torch.bfloat16) else None


def _unitwise_norms(stacked: Tensor) -> Tensor:
    """Norms of a stack of same-shaped tensors ``(n, *shape)``, unit-wise for matrices.

    Returns a tensor that broadcasts against ``stacked``: ``(n, 1, ...)`` for vectors
    and scalars (one norm per tensor), ``(n, units, 1, ...)`` otherwise.
    """
    dims = tuple(range(1, stacked.dim())) if stacked.dim() <= 2 else tuple(range(2, stacked.dim()))
    if not dims:  # a stack of scalars
        return stacked.abs().float()
    return torch.linalg.vector_norm(stacked, dim=dims, keepdim=True, dtype=_norm_dtype(stacked))


def layout_norms(stacked: Tensor, layout: UnitLayout) -> Tensor:
    """Unit norms of a stack ``(n, *layout.view_shape)``, flat in (tensor, unit) order."""
    return unit_norms(stacked, tuple(d + 1 for d in layout.reduce_dims))


def _unit_norms_of(tensor: Tensor) -> Tensor:
    """The unit norms of one tensor, flat: one per row (output unit), or one for a vector."""
    if tensor.dim() <= 1:
        return torch.linalg.vector_norm(tensor, dtype=_norm_dtype(tensor)).view(1)
    dims = tuple(range(1, tensor.dim()))
    return torch.linalg.vector_norm(tensor, dim=dims, dtype=_norm_dtype(tensor))


STACK_LIMIT = 1 << 16
"""Same-shaped tensors up to this many elements are stacked for one AGC pass; larger ones
are processed one by one (stacking them would only copy)."""


@dataclass
class AGCPlan(ClipPlan):
    """AGC's decisions for one step, made before any gradient is touched.

    :func:`agc_plan` makes it; :meth:`apply_` scales the gradients. In between,
    :attr:`clips` (:meth:`needs_scaling`) says which batches have a unit to clip: a
    caller that reads flags to the host anyway (to decide whether to skip the step)
    can read these with them and leave the other batches alone. Scaling a batch
    where nothing clips multiplies by exactly 1, so leaving it alone changes no value.

    Attributes:
        grads: the local gradients, one list per batch (tensors of one shape,
            stacked for the norms, or one large tensor).
        shapes: per batch, the shape its scales take to broadcast against the
            stacked gradients: ``(n, units, 1, ...)``, or ``(n,)`` for vectors.
        unit_norms: the gradient norm of every unit of every batch, flat.
        scale: the factor of every unit, flat, aligned with ``unit_norms``; 1 where
            the unit is small enough.
        local: whether every tensor is a plain (unsharded) tensor, so that
            :meth:`grad_norm` and :meth:`clipped_norm` are the global norms.
    """

    grads: list[list[Tensor]]
    shapes: list[tuple[int, ...]]
    unit_norms: Tensor
    scale: Tensor
    local: bool

    @property
    def clips(self) -> Tensor:
        """A bool vector: does batch ``i`` have a unit to clip (device tensor, no sync)."""
        smallest = [
            piece.amin() if piece.numel() else torch.ones((), device=piece.device)
            for piece in self._pieces()  # an empty shard has nothing to scale
        ]
        if not smallest:
            return torch.zeros(0, dtype=torch.bool, device=self.scale.device)
        return torch.stack(smallest) < 1

    def needs_scaling(self) -> Tensor:
        """:attr:`clips`: one flag per batch, so :meth:`apply_` scales only those that clip."""
        return self.clips

    def grad_norm(self) -> Tensor:
        """The 2-norm of all the gradients, from the unit norms (no pass over them).

        Only global when :attr:`local`; under sharding it is this rank's part.
        """
        return self.unit_norms.double().square().sum().sqrt()

    def measured_norm(self) -> Tensor | None:
        """:meth:`grad_norm` when it is the global norm (:attr:`local`), else ``None``."""
        return self.grad_norm() if self.local else None

    def clipped_norm(self, applied: bool = True) -> Tensor | None:
        """The 2-norm the gradients have after this step, from the unit norms (no pass).

        ``None`` under sharding (the unit norms are this rank's part).
        """
        if not self.local:
            return None
        if not applied:
            return self.grad_norm()
        return (self.unit_norms.double() * self.scale).square().sum().sqrt()

    def apply_(self, parts: Sequence[bool] | None = None) -> None:
        """Scale the gradients in place: every batch, or those where ``parts`` is true."""
        for i, (grads, shape, piece) in enumerate(zip(self.grads, self.shapes, self._pieces())):
            if parts is None or parts[i]:
                factors = piece.view(shape).to(grads[0].dtype).unbind(0)
                torch._foreach_mul_(grads, list(factors))

    def _pieces(self) -> tuple[Tensor, ...]:
        return self.scale.split([math.prod(shape) for shape in self.shapes])


AGCTarget = nn.Module | Sequence[nn.Module] | Sequence[Tensor]
"""What AGC clips: a model, its modules (units read through the unit map), or a list of
parameters (units in dim 0, unless ``layouts`` says otherwise)."""


def _agc_inputs(
    parameters: AGCTarget, layouts: Mapping[Tensor, UnitLayout] | None
) -> tuple[list[Tensor], Mapping[Tensor, UnitLayout]]:
    """The parameters to clip and the layout of each weight whose units are not rows."""
    if isinstance(parameters, nn.Module):
        parameters = [parameters]
    items = list(parameters)
    if items and all(isinstance(m, nn.Module) for m in items):
        modules: list[nn.Module] = items  # type: ignore[assignment]
        found: dict[Tensor, UnitLayout] = {}
        unknown: list[str] = []
        params: dict[Tensor, None] = {}
        for module in modules:
            layer_map = map_layers(module)
            found.update(layer_map.layouts())
            for name, held in layer_map.unknown.items():
                holder = module.get_submodule(name)
                if any(getattr(holder, attr).dim() >= 2 for attr in held):
                    unknown.append(f"{name or type(module).__name__} ({', '.join(held)})")
            params.update(dict.fromkeys(module.parameters()))
        if unknown:
            warnings.warn(
                f"agc_: the unit map does not know {unknown}; their matrices are clipped with "
                "units in dim 0 (rows, the layout of Linear/Conv). Register the layer type with "
                "lightning_gradguard.functional.register_layer if that is wrong.",
                stacklevel=3,
            )
        return list(params), {**found, **(layouts or {})}
    tensors = [t for t in items if isinstance(t, Tensor)]
    if len(tensors) != len(items):
        raise TypeError(
            "parameters must be a model, a list of modules or a list of tensors, got "
            f"{sorted({type(t).__name__ for t in items})}."
        )
    return tensors, layouts or {}


def _not_rows(layout: UnitLayout | None, tensor: Tensor) -> UnitLayout | None:
    """``layout`` when it differs from units-in-dim-0 for a matrix, else ``None``."""
    if layout is None or tensor.dim() < 2:
        return None
    if layout.unit_dims == (0,) and layout.view_shape == tuple(tensor.shape):
        return None
    return layout


def _sharded_layout_squares(weight: Tensor, local: Tensor, layout: UnitLayout) -> Tensor:
    """Squared unit norms of a sharded weight (or gradient) whose units are columns.

    Only the layout ``[in, out, ...]`` (units in dim 1, no groups) is supported sharded:
    the local shard's squared column sums, to be summed over the ranks holding other rows.
    """
    placements = getattr(weight, "placements", ())
    sharded = [p.dim for p in placements if p.is_shard()]
    if layout.unit_dims != (1,) or layout.view_shape != tuple(weight.shape) or 1 in sharded:
        raise ValueError(
            f"agc_: a sharded weight of shape {tuple(weight.shape)} whose units are not rows "
            f"(view {layout.view_shape}, unit dims {layout.unit_dims}) is supported only as "
            "[in, out, ...] sharded along dim 0 (FSDP2's default)."
        )
    dims = tuple(d for d in range(local.dim()) if d != 1)
    dtype = torch.float32 if local.dtype in (torch.float16, torch.bfloat16) else None
    return local.to(dtype or local.dtype).square().sum(dim=dims)


@torch.no_grad()
def agc_plan(
    parameters: AGCTarget,
    clipping: float = 0.01,
    eps: float = 1e-3,
    grad_eps: float = 1e-6,
    layouts: Mapping[Tensor, UnitLayout] | None = None,
) -> AGCPlan:
    """Unit-wise adaptive gradient clipping, decided but not applied: see :func:`agc_`.

    One pass over the weights and one over the gradients (their unit norms). The
    returned plan gives the gradients' total norm at no further cost, and can
    scale only the batches that need it.

    Args:
        parameters: a model or its modules (each weight's output units come from the
            unit map, :func:`~lightning_gradguard.functional.map_layers`), or a list of
            parameters, read with units in dim 0 (``[out, in, ...]``: Linear, Conv)
            except those given in ``layouts``.
        clipping: λ, the largest allowed ratio ‖G‖ / max(‖W‖, eps) per unit.
        eps: floor of the weight norm.
        grad_eps: floor of the gradient norm in the division.
        layouts: for a list of parameters, the layout of weights whose units are not
            rows (``map_layers(model).layouts()``).

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2, 2))
        >>> w.grad = torch.tensor([[1.0, 0.0], [0.0, 0.001]])
        >>> plan = agc_plan([w], clipping=0.01)
        >>> plan.clips  # row 0 (norm 1 > 0.01·√2) clips
        tensor([True])
        >>> round(float(plan.grad_norm()), 6)
        1.0
        >>> plan.apply_()
        >>> w.grad
        tensor([[0.0141, 0.0000],
                [0.0000, 0.0010]])
    """
    check_number(clipping, "clipping", "agc_", low=0, low_open=True)
    check_number(eps, "eps", "agc_", low=0, low_open=True)
    items, known = _agc_inputs(parameters, layouts)
    pairs = [(p.detach(), p.grad) for p in items if p.grad is not None]
    if not pairs:
        empty = torch.zeros(0)
        return AGCPlan(grads=[], shapes=[], unit_norms=empty, scale=empty, local=True)
    special = [_not_rows(known.get(p), p) for p in items if p.grad is not None]
    weights, weight_keys = local_tensors([w for w, _ in pairs])
    grads, _ = local_tensors([g for _, g in pairs])
    device = grads[0].device
    batch_grads: list[list[Tensor]] = []
    shapes: list[tuple[int, ...]] = []
    w_norms: list[Tensor] = []
    g_norms: list[Tensor] = []

    def add(members: list[Tensor], shape: tuple[int, ...], w_norm: Tensor, g_norm: Tensor) -> None:
        batch_grads.append(members)
        shapes.append(shape)
        w_norms.append(w_norm.flatten().to(device))
        g_norms.append(g_norm.flatten().to(device))

    sharded_vectors = [
        i for i, (w, k) in enumerate(zip(weights, weight_keys)) if k and w.dim() <= 1
    ]
    if sharded_vectors:  # whole-tensor norms of vectors split across ranks: one reduction
        from lightning_gradguard.functional.norms import grouped_norms

        index = torch.arange(len(sharded_vectors))
        w_norm = grouped_norms([pairs[i][0] for i in sharded_vectors], index, len(index)).groups
        g_norm = grouped_norms([pairs[i][1] for i in sharded_vectors], index, len(index)).groups
        add([grads[i] for i in sharded_vectors], (len(index),), w_norm, g_norm)
    done = set(sharded_vectors)
    sharded_layouts = [
        (i, lay) for i, lay in enumerate(special) if lay is not None and weight_keys[i]
    ]
    if sharded_layouts:  # columns split across ranks: one reduction for all of them
        squares = [
            _sharded_layout_squares(pairs[i][0], weights[i], lay) for i, lay in sharded_layouts
        ]
        squares += [
            _sharded_layout_squares(pairs[i][1], grads[i], lay) for i, lay in sharded_layouts
        ]
        flat = torch.cat([t.float() for t in squares])
        _all_reduce(flat, weight_keys[sharded_layouts[0][0]], 2.0)
        pieces = flat.sqrt().split([t.numel() for t in squares])
        half = len(sharded_layouts)
        for j, (i, lay) in enumerate(sharded_layouts):
            add([grads[i]], (1, *lay.scale_shape), pieces[j], pieces[half + j])
            done.add(i)
    by_shape: dict[tuple[Any, ...], list[int]] = {}
    for i, g in enumerate(grads):
        if i in done:
            continue
        layout = special[i]
        if layout is not None:  # units not in dim 0 (HF Conv1D, ConvTranspose): own batches
            by_shape.setdefault((tuple(g.shape), g.dtype, g.device, layout), []).append(i)
        else:
            by_shape.setdefault((tuple(g.shape), g.dtype, g.device), []).append(i)
    for key, indices in by_shape.items():
        layout = key[3] if len(key) > 3 else None
        if layout is None:
            continue
        members = [layout.view(grads[i]) for i in indices]
        shape = (len(indices), *layout.scale_shape)
        if len(indices) > 1 and grads[indices[0]].numel() <= STACK_LIMIT:
            w_norm = layout_norms(torch.stack([layout.view(weights[i]) for i in indices]), layout)
            g_norm = layout_norms(torch.stack(members), layout)
            add(members, shape, w_norm, g_norm)
            continue
        for i, member in zip(indices, members):
            w_norm, g_norm = layout.norms(weights[i]), layout.norms(grads[i])
            add([member], (1, *layout.scale_shape), w_norm, g_norm)
    by_shape = {k: v for k, v in by_shape.items() if len(k) == 3}
    for indices in by_shape.values():
        if len(indices) > 1 and grads[indices[0]].numel() <= STACK_LIMIT:
            w_stacked = _unitwise_norms(torch.stack([weights[i] for i in indices]))
            g_stacked = _unitwise_norms(torch.stack([grads[i] for i in indices]))
            add([grads[i] for i in indices], tuple(g_stacked.shape), w_stacked, g_stacked)
            continue
        for i in indices:  # large tensors one by one: stacking them would only copy
            g_norm = _unit_norms_of(grads[i])
            shape = (1, g_norm.numel(), *([1] * (grads[i].dim() - 1)))
            add(
                [grads[i]],
                shape if grads[i].dim() > 1 else (1,),
                _unit_norms_of(weights[i]),
                g_norm,
            )
    w_all, g_all = torch.cat(w_norms), torch.cat(g_norms)
    max_norm = w_all.clamp_min(eps) * clipping
    # Scale only where the unit is too large, as timm does: with clipping·eps < grad_eps
    # a min(1, max_norm / max(‖G‖, grad_eps)) would also shrink units already small enough.
    scale = torch.where(g_all > max_norm, max_norm / g_all.clamp_min(grad_eps), 1.0)
    return AGCPlan(batch_grads, shapes, g_all, scale, local=not any(weight_keys))


@torch.no_grad()
def agc_(
    parameters: AGCTarget,
    clipping: float = 0.01,
    eps: float = 1e-3,
    grad_eps: float = 1e-6,
    layouts: Mapping[Tensor, UnitLayout] | None = None,
) -> None:
    """Unit-wise adaptive gradient clipping (Brock et al., 2021, NFNets), in place.

    For every output unit (row of a Linear weight, output channel of a conv or
    transposed-conv kernel, column of a Hugging Face ``Conv1D``), if
    ``‖G‖ > clipping · max(‖W‖, eps)`` the unit's gradient is rescaled to that
    size. Vectors and scalars (biases, gains) use the whole-tensor norm. ``eps``
    lets a zero-initialized weight still move. The classifier layer is usually
    left out: pass only the modules or parameters to clip.

    Pass the model (or its modules): a bare weight cannot tell a Conv1D ``[in, out]``
    from a Linear ``[out, in]``, the module can (see
    :func:`~lightning_gradguard.functional.map_layers`). A list of parameters is read
    with units in dim 0, the layout of Linear and Conv, except for the weights given
    in ``layouts``. Matrices of layers the map does not know are read as rows too,
    with a warning naming them.

    Small tensors of the same shape are processed together (one stacked pass per
    shape), so a model of many equal layers costs a few kernels, not a loop.
    :func:`agc_plan` decides without applying, for callers that scale only where
    something clips.

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        >>> w.grad = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> agc_([w], clipping=0.01, eps=1e-3)
        >>> w.grad  # row 0 may reach 0.01·1.0, row 1 (zero weights) 0.01·1e-3
        tensor([[1.0000e-02, 0.0000e+00],
                [0.0000e+00, 1.0000e-05]])
        >>> model = torch.nn.Linear(3, 2)
        >>> model(torch.randn(4, 3)).sum().backward()
        >>> agc_(model, clipping=0.01)  # the model: units read through the unit map
    """
    agc_plan(parameters, clipping, eps, grad_eps, layouts).apply_()

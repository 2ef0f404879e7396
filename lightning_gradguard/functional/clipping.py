"""In-place gradient clippers and stateful threshold policies, with no host sync.

Clippers take norms that were already computed (compute once, reuse):

- :func:`clip_by_norm_` scales gradients so their norm is at most a threshold;
  it keeps the gradient's direction.
- :func:`clip_by_value_` clamps every element; it changes the direction.
- :func:`agc_` is unit-wise adaptive gradient clipping (Brock et al., 2021).

Threshold policies turn the current norm(s) into a threshold and update their
state, all as device tensors: :class:`FixedNorm`, :class:`AutoClip`
(Seetharaman et al., 2020), :class:`ZClip` (Kumar et al., 2025) and
:class:`EMARatio` (OLMo). A policy works on a scalar (the global norm) or on a
vector of per-layer norms alike.

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
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_gradguard.functional.norms import local_tensors

CLIP_EPS = 1e-6
"""Added to the norm in ``threshold / (norm + eps)``, as torch's ``clip_grad_norm_`` does."""


def _check_positive(value: Any, argument: str, owner: str, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = "a non-negative" if allow_zero else "a positive"
        raise ValueError(
            f"{owner}({argument}={value!r}): {argument} must be {bound} finite number."
        )
    return float(value)


def _check_fraction(value: Any, argument: str, owner: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1
    if not ok:
        raise ValueError(
            f"{owner}({argument}={value!r}): {argument} must be in the open interval (0, 1)."
        )
    return float(value)


def _check_count(value: Any, argument: str, owner: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"{owner}({argument}={value!r}): {argument} must be an integer >= {minimum}."
        )
    return value


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

    Example:
        >>> g = [torch.tensor([3.0, 4.0])]
        >>> clip_by_norm_(g, torch.tensor(1.0), torch.tensor(5.0))
        tensor(0.2000)
        >>> g[0]
        tensor([0.6000, 0.8000])
    """
    coef = clip_coefficients(threshold, norm, eps)
    scale_(grads, coef, group_index)
    return coef


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
        torch._foreach_mul_(locals_, coef.to(locals_[0].device, locals_[0].dtype))
        return
    if group_index is None:
        raise ValueError("scale_: per-group coefficients need group_index.")
    per_tensor = coef.index_select(0, group_index.to(coef.device)).to(locals_[0].dtype)
    torch._foreach_mul_(locals_, list(per_tensor.to(locals_[0].device).unbind(0)))


@torch.no_grad()
def clip_by_value_(grads: Sequence[Tensor], clip_value: float) -> None:
    """Clamp every gradient element to ``[-clip_value, clip_value]`` in place.

    Unlike :func:`clip_by_norm_` this changes the gradient's direction.

    Example:
        >>> g = [torch.tensor([0.5, -3.0])]
        >>> clip_by_value_(g, 1.0)
        >>> g[0]
        tensor([ 0.5000, -1.0000])
    """
    _check_positive(clip_value, "clip_value", "clip_by_value_")
    if not grads:
        return
    locals_, _ = local_tensors(grads)
    torch._foreach_clamp_min_(locals_, -clip_value)
    torch._foreach_clamp_max_(locals_, clip_value)


def _unitwise_norms(stacked: Tensor) -> Tensor:
    """Norms of a stack of same-shaped tensors ``(n, *shape)``, unit-wise for matrices.

    Returns a tensor that broadcasts against ``stacked``: ``(n, 1, ...)`` for vectors
    and scalars (one norm per tensor), ``(n, units, 1, ...)`` otherwise.
    """
    dims = tuple(range(1, stacked.dim())) if stacked.dim() <= 2 else tuple(range(2, stacked.dim()))
    # float32 accumulation (half precision is upcast): a float64 norm on CPU copies the
    # whole tensor first, and AGC's decision needs no more than float32 precision.
    dtype = torch.float32 if stacked.dtype in (torch.float16, torch.bfloat16) else None
    if not dims:  # a stack of scalars
        return stacked.abs().float()
    return torch.linalg.vector_norm(stacked, dim=dims, keepdim=True, dtype=dtype)


STACK_LIMIT = 1 << 16
"""Same-shaped tensors up to this many elements are stacked for one AGC pass; larger ones
are processed one by one (stacking them would only copy)."""


@torch.no_grad()
def agc_(
    parameters: Sequence[Tensor], clipping: float = 0.01, eps: float = 1e-3, grad_eps: float = 1e-6
) -> None:
    """Unit-wise adaptive gradient clipping (Brock et al., 2021, NFNets), in place.

    For every output unit (row of a weight, output channel of a conv kernel), if
    ``‖G‖ > clipping · max(‖W‖, eps)`` the unit's gradient is rescaled to that
    size. Vectors and scalars (biases, gains) use the whole-tensor norm. ``eps``
    lets a zero-initialized weight still move. The classifier layer is usually
    left out: pass only the parameters to clip.

    Tensors of the same shape are processed together (one stacked pass per
    shape), so a model of many equal layers costs a few kernels, not a loop.

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        >>> w.grad = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> agc_([w], clipping=0.01, eps=1e-3)
        >>> w.grad  # row 0 may reach 0.01·1.0, row 1 (zero weights) 0.01·1e-3
        tensor([[1.0000e-02, 0.0000e+00],
                [0.0000e+00, 1.0000e-05]])
    """
    _check_positive(clipping, "clipping", "agc_")
    _check_positive(eps, "eps", "agc_")
    pairs = [(p.detach(), p.grad) for p in parameters if p.grad is not None]
    if not pairs:
        return
    weights, weight_keys = local_tensors([w for w, _ in pairs])
    grads, _ = local_tensors([g for _, g in pairs])
    sharded_vectors = [
        i for i, (w, k) in enumerate(zip(weights, weight_keys)) if k and w.dim() <= 1
    ]
    if sharded_vectors:
        _agc_sharded_vectors(pairs, sharded_vectors, clipping, eps, grad_eps)
    done = set(sharded_vectors)
    by_shape: dict[tuple[Any, ...], list[int]] = {}
    for i, g in enumerate(grads):
        if i not in done:
            by_shape.setdefault((tuple(g.shape), g.dtype, g.device), []).append(i)
    batches: list[list[int]] = []
    for indices in by_shape.values():
        if grads[indices[0]].numel() <= STACK_LIMIT:
            batches.append(indices)
        else:
            batches.extend([i] for i in indices)
    for indices in batches:
        group_grads = [grads[i] for i in indices]
        if len(indices) == 1:
            w_norm = _unitwise_norms(weights[indices[0]].unsqueeze(0))
            g_norm = _unitwise_norms(group_grads[0].unsqueeze(0))
        else:
            w_norm = _unitwise_norms(torch.stack([weights[i] for i in indices]))
            g_norm = _unitwise_norms(torch.stack(group_grads))
        max_norm = w_norm.clamp_min(eps) * clipping
        # Scale only where the unit is too large, as timm does: with clipping·eps < grad_eps
        # a min(1, max_norm / max(‖G‖, grad_eps)) would also shrink units already small enough.
        scale = torch.where(g_norm > max_norm, max_norm / g_norm.clamp_min(grad_eps), 1.0)
        scale = scale.to(group_grads[0].dtype)
        torch._foreach_mul_(group_grads, list(scale.unbind(0)))


def _agc_sharded_vectors(
    pairs: list[tuple[Tensor, Tensor]],
    indices: list[int],
    clipping: float,
    eps: float,
    grad_eps: float,
) -> None:
    """AGC for 1-D parameters split across ranks: whole-tensor norms need one reduction."""
    from lightning_gradguard.functional.norms import grouped_norms

    index = torch.arange(len(indices))
    w_norm = grouped_norms([pairs[i][0] for i in indices], index, len(indices)).groups
    g_norm = grouped_norms([pairs[i][1] for i in indices], index, len(indices)).groups
    max_norm = w_norm.clamp_min(eps) * clipping
    scale = torch.where(g_norm > max_norm, max_norm / g_norm.clamp_min(grad_eps), 1.0)
    locals_, _ = local_tensors([pairs[i][1] for i in indices])
    torch._foreach_mul_(locals_, list(scale.to(locals_[0].dtype).unbind(0)))

"""An optimizer's parameters, and resetting their state after a re-initialization.

Re-initialized weights must not inherit the momentum of the weights they
replace. :func:`reset_optimizer_state_` is the one place this is done, for a
whole tensor (:class:`~lightning_gradguard.LayerReinit`) and for some of its
entries (:func:`~lightning_gradguard.functional.recycle_units_`).

The rule for Adam's ``step`` (and any per-tensor counter): it belongs to the
whole tensor, so it restarts only when the whole tensor restarts.

- Whole tensor (``index=None``): every tensor of the state is zeroed, ``step``
  included (a plain-number ``step`` too). Adam's and AdamW's next update is then
  exactly a new optimizer's first (bias-corrected from step 1); so is RMSprop's,
  and SGD momentum's without dampening. The state keeps its tensors (and
  devices), so every rank and a checkpoint see the same entries as before.
- Some entries: those entries of every state tensor shaped like the parameter
  (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``momentum_buffer``, ...)
  are zeroed; ``step`` and everything else are kept. The untouched entries'
  updates are then exactly what they would have been. Resetting ``step`` would
  instead shrink them for about a thousand steps (by ``sqrt(1 - beta2**t) / (1 -
  beta1**t)``: 0.32x at ``t = 1``, 0.15x near ``t = 12``, 0.8x at ``t = 1000``,
  betas 0.9, 0.999). The reset entries pay for it: with a large ``step`` their
  bias correction is ~1, so under a steady gradient their ``k``-th update after
  the reset is about ``lr * (1 - beta1**k) / sqrt(1 - beta2**k)`` instead of a
  fresh Adam's ``lr``: 3.2x at ``k = 1``, at most 6.6x (near ``k = 12``), under
  1.3x after a thousand steps. Recycled units start with zero outgoing weights,
  so these larger steps move what the network computes little at first. This is
  also what ReDo's reference implementation does (the moments of the recycled
  units are zeroed; optax's step count is shared and kept).

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(2, 3))
    >>> adam = torch.optim.Adam([w], lr=0.1)
    >>> w.grad = torch.ones(2, 3)
    >>> adam.step()
    >>> reset_optimizer_state_(adam, w, (torch.tensor([True, False]),))
    >>> adam.state[w]["exp_avg"][:, 0].tolist(), int(adam.state[w]["step"])
    ([0.0, 0.10000000149011612], 1)
    >>> reset_optimizer_state_(adam, w)
    >>> int(adam.state[w]["step"]), float(adam.state[w]["exp_avg_sq"].abs().sum())
    (0, 0.0)
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.optim import Optimizer

__all__ = [
    "optimizer_parameters",
    "reset_optimizer_state_",
]


def optimizer_parameters(optimizer: Optimizer) -> list[Tensor]:
    """Every parameter of ``optimizer``, in parameter-group order.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> optimizer_parameters(torch.optim.SGD([w], lr=0.1))[0] is w
        True
    """
    return [p for group in optimizer.param_groups for p in group["params"]]


def reset_optimizer_state_(
    optimizer: Optimizer | None, parameter: Tensor, index: tuple[Any, ...] | None = None
) -> None:
    """Reset ``parameter``'s optimizer state: all of it, or the entries at ``index``.

    See the module docstring for the rule (``step`` restarts only with the whole
    tensor) and why.

    Args:
        optimizer: the optimizer holding the state (``None``: nothing to do).
        parameter: the parameter whose state is reset.
        index: the entries reset, as an index into ``parameter`` (a tuple of slices
            and a bool mask); ``None`` resets the whole tensor.
    """
    if optimizer is None or parameter not in optimizer.state:
        return
    state = optimizer.state[parameter]
    if index is None:
        for key, value in state.items():
            if isinstance(value, Tensor):
                value.zero_()
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                state[key] = type(value)(0)
        return
    for key, value in state.items():
        if key != "step" and isinstance(value, Tensor) and value.shape == parameter.shape:
            value[index] = 0.0

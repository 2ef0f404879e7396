"""``GradGuardMixin``: the clipping policies through Lightning's own hook.

Mix it into a LightningModule (of either Lightning package) and set
``gradguard_clip`` to a policy or shorthand. Lightning then calls
``configure_gradient_clipping`` every automatic-optimization step, after AMP
unscaling, and the policy clips. For manual optimization call
:meth:`GradGuardMixin.clip_gradients_unscaled` between ``manual_backward`` and
``opt.step()``: it accounts for the fp16 loss scale, which Lightning's own
``self.clip_gradients`` does not (its gradients are still scaled at that point,
Lightning issue #18089).

Example:
    >>> import pytorch_lightning as pl
    >>> import torch
    >>> from lightning_gradguard import GradGuardMixin
    >>> class Model(GradGuardMixin, pl.LightningModule):
    ...     gradguard_clip = "autoclip"
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.layer = torch.nn.Linear(4, 1)
    >>> Model().gradguard_policy_for(0)
    AutoClip(percentile=10.0, window=1000)
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

from torch import Tensor, nn

from lightning_gradguard._compat import rank_zero_warn
from lightning_gradguard.callbacks._trainer import optimizer_index
from lightning_gradguard.functional.optimizer_state import optimizer_parameters
from lightning_gradguard.functional.policies import ClipPolicy, clip_with_policy_, make_policy

__all__ = [
    "GradGuardMixin",
]


def _no_owner() -> None:
    """The owner of a policy made without an optimizer (outside a fit)."""
    return None


class GradGuardMixin:
    """LightningModule mixin: adaptive clipping via ``configure_gradient_clipping``.

    Attributes:
        gradguard_clip: a :class:`~lightning_gradguard.functional.ClipPolicy`, a
            shorthand (``"norm"``, ``"value"``, ``"agc"``, ``"autoclip"``, ``"zclip"``,
            ``"ema_ratio"``, ``"guard"``) or ``None`` (Lightning's default behaviour).
            It is a template, never updated itself: each optimizer gets a fresh copy,
            and so does every new optimizer object (a second ``fit`` creates new
            optimizers, so it starts with fresh statistics).
    """

    gradguard_clip: str | ClipPolicy | None = None

    def gradguard_policy_for(
        self, optimizer_index: int, optimizer: Any = None
    ) -> ClipPolicy | None:
        """The policy object (with its state) used for optimizer ``optimizer_index``.

        Args:
            optimizer_index: the optimizer's position in ``trainer.optimizers``.
            optimizer: the optimizer itself; when it is not the one the policy was made
                for (a new fit), the policy starts afresh.
        """
        if self.gradguard_clip is None:
            return None
        policies: dict[int, tuple[Any, ClipPolicy]] = self.__dict__.setdefault(
            "_gradguard_policies", {}
        )
        entry = policies.get(optimizer_index)
        stale = entry is None or (optimizer is not None and entry[0]() is not optimizer)
        if entry is None or stale:
            owner = weakref.ref(optimizer) if optimizer is not None else _no_owner
            entry = (owner, copy.deepcopy(make_policy(self.gradguard_clip)))
            policies[optimizer_index] = entry
        return entry[1]

    def _gradguard_bound_policy(
        self, optimizer_index: int, optimizer: Any = None
    ) -> ClipPolicy | None:
        """The policy, bound to this module's parameters as they are when it first clips."""
        policy = self.gradguard_policy_for(optimizer_index, optimizer)
        if (
            policy is not None
            and isinstance(self, nn.Module)
            and not policy.__dict__.get("_gradguard_bound", False)
        ):
            policy.bind(self)  # AGC reads each weight's output units from the unit map
            policy.__dict__["_gradguard_bound"] = True
        return policy

    def _gradguard_trainer(self) -> Any:
        return getattr(self, "_trainer", None)  # None outside a fit, without raising

    def _gradguard_index(self, optimizer: Any) -> int:
        trainer = self._gradguard_trainer()
        return 0 if trainer is None else optimizer_index(trainer, optimizer)

    def configure_gradient_clipping(
        self,
        optimizer: Any,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip with ``gradguard_clip``; falls back to Lightning's behaviour when it is None."""
        raw = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer wraps the optimizer
        policy = self._gradguard_bound_policy(self._gradguard_index(optimizer), raw)
        if policy is None:
            super().configure_gradient_clipping(  # type: ignore[misc]
                optimizer, gradient_clip_val, gradient_clip_algorithm
            )
            return
        if gradient_clip_val and not self.__dict__.get("_gradguard_warned"):
            self.__dict__["_gradguard_warned"] = True
            rank_zero_warn(
                f"GradGuardMixin clips with {policy!r}; Trainer(gradient_clip_val="
                f"{gradient_clip_val}) is ignored. Remove it to silence this warning."
            )
        clip_with_policy_(policy, optimizer_parameters(raw))

    def clip_gradients_unscaled(self, optimizer: Any) -> tuple[Tensor, Tensor, Tensor]:
        """Manual optimization: clip ``optimizer``'s gradients with ``gradguard_clip``.

        Call it after ``self.manual_backward(loss)`` and before ``optimizer.step()``.
        Under fp16 AMP the gradients are still multiplied by the loss scale here;
        the decision is taken on the unscaled gradients.

        Returns:
            ``(norm, threshold, coefficient)`` as device tensors.

        Raises:
            ValueError: when ``gradguard_clip`` is None.
        """
        index = self._gradguard_index(optimizer)
        raw = getattr(optimizer, "optimizer", optimizer)
        policy = self._gradguard_bound_policy(index, raw)
        if policy is None:
            raise ValueError(
                "clip_gradients_unscaled needs a policy: set gradguard_clip on the module, "
                "e.g. gradguard_clip = 'zclip'."
            )
        trainer = self._gradguard_trainer()
        plugin = getattr(getattr(trainer, "strategy", None), "precision_plugin", None)
        scaler = getattr(plugin, "scaler", None)
        scale = getattr(scaler, "_scale", None) if scaler is not None else None
        return clip_with_policy_(policy, optimizer_parameters(raw), grad_scale=scale)

"""Clipping policies: one small protocol, two kinds, state as device tensors.

Every policy answers three calls, in this order, once per optimizer step; the
callback (:class:`~lightning_gradguard.AdaptiveGradClip`), the mixin and
:func:`clip_with_policy_` make exactly these, with no case for any one policy:

1. ``plan = policy.prepare(parameters, grads, group_index)``: the work that needs
   no norm, before the norm is known. It returns a
   :class:`~lightning_gradguard.functional.clipping.ClipPlan`, whose
   :meth:`~lightning_gradguard.functional.clipping.ClipPlan.measured_norm` is the global
   gradient norm when preparing measured it on the way (AGC), so nobody measures
   it twice.
2. ``policy.decide(plan, norm)``: given the norm (a scalar, or one per group of
   ``group_index``; under DDP/FSDP the one every rank agreed on), fill in
   ``plan.threshold`` and ``plan.coef`` and update the policy's state. Device
   operations only.
3. ``plan.apply_(parts)``: clip in place, every part or only those that
   ``plan.needs_scaling()`` flagged (for callers that read flags to the host anyway).
   ``plan.clipped_norm()`` gives the norm afterwards when it needs no pass.

:meth:`ClipPolicy.clip_` does the three at once. The two kinds:

- :class:`NormPolicy`: a threshold from the norm. A subclass implements
  :meth:`NormPolicy.threshold` (``norm -> threshold``, updating its state), and
  gets norm clipping (:class:`~lightning_gradguard.functional.clipping.NormPlan`):
  :class:`FixedNorm`, :class:`AutoClip`, :class:`ZClip`, :class:`EMARatio`,
  :class:`GuardClip` (whose threshold also reads the weights' norm) and
  :class:`NoClip` (never touches the gradients).
- :class:`DirectClipper`: clips without a norm, so ``prepare`` decides everything
  and ``decide`` only records the fixed bound it reports as the threshold:
  :class:`FixedValue` and :class:`AGC`. A subclass implements ``prepare`` and
  :attr:`DirectClipper.bound`.

Every policy also has ``bind(model)`` (once, before the first step),
``typical_norm()`` (its running level of the norm, if it keeps one),
``state_dict()`` / ``load_state_dict()`` (plain CPU tensors) and ``config()``.

Example:
    A custom norm policy: clip at three times the median of the recent norms.

    >>> import torch
    >>> class ThreeMedians(NormPolicy):
    ...     name = "three_medians"
    ...     _state_names = ("history",)
    ...     history = None
    ...     def threshold(self, norm):
    ...         norm = norm.double()
    ...         if self.history is None:  # state is created on the first norm's device
    ...             self.history = norm.new_full((0, *norm.shape), float("nan"))
    ...         self.history = torch.cat([self.history, norm.unsqueeze(0)])[-8:]
    ...         return 3 * self.history.nanmedian(0).values
    >>> policy = ThreeMedians()
    >>> g = torch.tensor([3.0, 4.0])
    >>> plan = policy.decide(policy.prepare([g], [g]), torch.tensor(5.0))
    >>> plan.threshold, plan.coef  # 3 x median(5) = 15: nothing to clip
    (tensor(15., dtype=torch.float64), tensor(1., dtype=torch.float64))
    >>> [float(policy.threshold(torch.tensor(x))) for x in (1.0, 1.0)]
    [3.0, 3.0]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gradguard._checks import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    closest,
)
from lightning_gradguard.functional.clipping import (
    CLIP_EPS,
    AGCPlan,
    ClipPlan,
    NormPlan,
    ValuePlan,
    _not_rows,
    agc_plan,
    clip_coefficients,
)
from lightning_gradguard.functional.units import UnitLayout, map_layers

__all__ = [
    "AGC",
    "POLICIES",
    "AutoClip",
    "ClipPolicy",
    "DirectClipper",
    "EMARatio",
    "FixedNorm",
    "FixedValue",
    "GuardClip",
    "NoClip",
    "NormPolicy",
    "ZClip",
    "clip_with_policy_",
    "make_policy",
]


def _positive(value: Any, argument: str, owner: str) -> float:
    return check_number(value, argument, owner, low=0, low_open=True)


def _fraction(value: Any, argument: str, owner: str) -> float:
    return check_number(value, argument, owner, low=0, high=1, low_open=True, high_open=True)


class ClipPolicy:
    """The protocol every policy follows (see the module): subclass a kind of it.

    Subclass :class:`NormPolicy` (implement ``threshold(norm)``) or
    :class:`DirectClipper` (implement ``prepare`` and ``bound``). State tensors are
    named in ``_state_names`` and created lazily, on the first norm's device and
    shape, so one policy object serves a global (scalar) or per-layer (vector) scope.
    """

    name = "policy"
    _state_names: tuple[str, ...] = ()

    def bind(self, model: nn.Module) -> None:
        """Read what the policy needs to know of the model (once, before the first step).

        Most policies need nothing. :class:`AGC` reads each weight's output units from
        the unit map (:func:`~lightning_gradguard.functional.map_layers`).
        """
        del model

    def prepare(
        self,
        parameters: Sequence[Tensor],
        grads: Sequence[Tensor],
        group_index: Tensor | None = None,
    ) -> ClipPlan:
        """Start this step's plan: the work that needs no norm, before it is known.

        Args:
            parameters: the parameters whose gradients are ``grads``.
            grads: their gradients (``p.grad``), the tensors the plan changes.
            group_index: the group of every gradient when the norm will be one per group.
        """
        raise NotImplementedError(
            f"{type(self).__name__}: subclass NormPolicy (implement threshold(norm)) or "
            "DirectClipper (implement prepare and bound), not ClipPolicy itself."
        )

    def decide(self, plan: Any, norm: Tensor) -> ClipPlan:
        """Finish ``plan`` (from :meth:`prepare`) with the ``norm``(s); update the state.

        Args:
            plan: what :meth:`prepare` returned for this step.
            norm: the global norm (scalar) or one norm per group; NaN for a step that
                must not enter the statistics.

        Returns:
            ``plan``, with ``threshold`` (and ``coef`` and ``norm`` for norm clipping) set.
        """
        raise NotImplementedError(f"{type(self).__name__}: subclass NormPolicy or DirectClipper.")

    def clip_(
        self,
        parameters: Sequence[Tensor],
        grads: Sequence[Tensor],
        norm: Tensor,
        group_index: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Prepare, decide and apply at once: clip ``grads`` in place given their ``norm``(s).

        Returns:
            ``(threshold, coefficient)`` as device tensors (the coefficient is NaN for
            a direct clipper, which scales by no norm).
        """
        plan = self.decide(self.prepare(parameters, grads, group_index), norm)
        plan.apply_()
        assert plan.threshold is not None
        coef = plan.coef if plan.coef is not None else torch.full_like(norm, math.nan)
        return plan.threshold, coef

    def typical_norm(self) -> Tensor | None:
        """The policy's running level of the norm so far (a device tensor), if it keeps one.

        NaN while it is still warming up; ``None`` for policies without such a
        statistic. ``SpikeRecovery`` compares the gradient norm against it.
        """
        return None

    def config(self) -> dict[str, Any]:
        """The constructor arguments (for logging and state keys)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The state as CPU tensors (loads with ``torch.load(weights_only=True)``)."""
        return {
            n: getattr(self, n).detach().cpu().clone()
            for n in self._state_names
            if getattr(self, n, None) is not None  # none before the first step
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; moved to the device at the next step."""
        for name in self._state_names:
            if name in state:
                setattr(self, name, torch.as_tensor(state[name]).clone())

    def _move_state(self, norm: Tensor) -> None:
        for name in self._state_names:
            value = getattr(self, name, None)
            if value is not None and value.device != norm.device:
                setattr(self, name, value.to(norm.device))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class NormPolicy(ClipPolicy):
    """A threshold from the gradient norm; the gradients are scaled down to it.

    A subclass implements :meth:`threshold`. The plan is a
    :class:`~lightning_gradguard.functional.clipping.NormPlan`: the coefficient is
    ``threshold / (norm + 1e-6)`` where the norm is above the threshold, 1 elsewhere
    (NaN norms included), as in torch's ``clip_grad_norm_``.
    """

    def threshold(self, norm: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Return the threshold for ``norm`` (same shape) and update the state. Device ops only."""
        raise NotImplementedError(f"{type(self).__name__} must implement threshold(norm).")

    def threshold_for(self, plan: NormPlan, norm: Tensor) -> Tensor:
        """This step's threshold: :meth:`threshold`, unless it also reads the parameters.

        :class:`GuardClip` overrides it to pass the weights' norm.
        """
        del plan
        return self.threshold(norm)

    def prepare(
        self,
        parameters: Sequence[Tensor],
        grads: Sequence[Tensor],
        group_index: Tensor | None = None,
    ) -> NormPlan:
        return NormPlan(list(parameters), list(grads), group_index)

    def decide(self, plan: NormPlan, norm: Tensor) -> NormPlan:
        plan.threshold = self.threshold_for(plan, norm)
        plan.coef = clip_coefficients(plan.threshold, norm)
        plan.norm = norm
        return plan


class DirectClipper(ClipPolicy):
    """Clips without a norm (by value, per unit): ``prepare`` decides everything.

    ``decide`` records :attr:`bound` as the plan's threshold, shaped like the norm;
    the plan has no coefficient. A subclass implements ``prepare`` and :attr:`bound`.
    """

    @property
    def bound(self) -> float:  # pragma: no cover - abstract
        """The fixed bound reported as the threshold (``clip_value``, AGC's λ)."""
        raise NotImplementedError

    def decide(self, plan: ClipPlan, norm: Tensor) -> ClipPlan:
        plan.threshold = torch.full_like(norm, self.bound)
        return plan


class FixedNorm(NormPolicy):
    """Clip to a fixed norm (what ``Trainer(gradient_clip_val=...)`` does).

    Args:
        max_norm: the largest norm allowed.
    """

    name = "norm"

    def __init__(self, max_norm: float = 1.0) -> None:
        self.max_norm = _positive(max_norm, "max_norm", "FixedNorm")

    def threshold(self, norm: Tensor) -> Tensor:
        return torch.full_like(norm, self.max_norm)

    def config(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm}


class NoClip(NormPolicy):
    """Never clip: for step skipping alone (``AdaptiveGradClip(policy="none")``).

    The threshold is infinite and the plan holds no gradient (no pass over them).

    Example:
        >>> g = torch.tensor([3.0, 4.0])
        >>> NoClip().clip_([g], [g], torch.tensor(5.0))
        (tensor(inf), tensor(1.))
        >>> g
        tensor([3., 4.])
    """

    name = "none"

    def threshold(self, norm: Tensor) -> Tensor:
        return torch.full_like(norm, math.inf)

    def prepare(
        self,
        parameters: Sequence[Tensor],
        grads: Sequence[Tensor],
        group_index: Tensor | None = None,
    ) -> NormPlan:
        return NormPlan([], [], group_index)


class FixedValue(DirectClipper):
    """Clamp every gradient element to ``[-clip_value, clip_value]``.

    Value clipping changes the gradient's direction; norm clipping keeps it.

    Args:
        clip_value: the largest absolute value of an element.
    """

    name = "value"

    def __init__(self, clip_value: float = 0.5) -> None:
        self.clip_value = _positive(clip_value, "clip_value", "FixedValue")

    @property
    def bound(self) -> float:
        return self.clip_value

    def prepare(
        self,
        parameters: Sequence[Tensor],
        grads: Sequence[Tensor],
        group_index: Tensor | None = None,
    ) -> ValuePlan:
        return ValuePlan(list(grads), self.clip_value)

    def config(self) -> dict[str, Any]:
        return {"clip_value": self.clip_value}


class AGC(DirectClipper):
    """Unit-wise adaptive gradient clipping (Brock et al., 2021); see :func:`agc_`.

    ``prepare`` measures the unit norms of weights and gradients
    (:func:`~lightning_gradguard.functional.clipping.agc_plan`); on unsharded gradients that
    also gives the global gradient norm, so the callback makes no second pass.

    Args:
        clipping: λ, the largest allowed ratio ‖G‖ / max(‖W‖, eps) per unit.
        eps: floor of the weight norm, so zero-initialized weights still move.
    """

    name = "agc"

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3) -> None:
        self.clipping = _positive(clipping, "clipping", "AGC")
        self.eps = _positive(eps, "eps", "AGC")
        self._layouts: dict[int, UnitLayout] = {}  # by id(weight): no tensor in the state

    @property
    def bound(self) -> float:
        return self.clipping

    def bind(self, model: nn.Module) -> None:
        """Read the output units of every weight of ``model`` from the unit map.

        Without it (a bare parameter list) units are rows, dim 0: right for Linear and
        Conv, wrong for Hugging Face ``Conv1D`` (``[in, out]``) and transposed convs.
        Matrices of layers the map does not know are read as rows, with a warning
        naming them.
        """
        layer_map = map_layers(model)
        self._layouts = {
            id(w): layout
            for w, layout in layer_map.layouts().items()
            if _not_rows(layout, w) is not None
        }
        unknown = [
            f"{name} ({', '.join(held)})"
            for name, held in layer_map.unknown.items()
            if any(getattr(model.get_submodule(name), attr).dim() >= 2 for attr in held)
        ]
        if unknown:
            warnings.warn(
                f"AGC: the unit map does not know {unknown}; their matrices are clipped with "
                "units in dim 0 (rows, the layout of Linear/Conv). Register the layer type with "
                "lightning_gradguard.functional.register_layer if that is wrong.",
                stacklevel=2,
            )

    def prepare(
        self,
        parameters: Sequence[Tensor],
        grads: Sequence[Tensor],
        group_index: Tensor | None = None,
    ) -> AGCPlan:
        """The unit norms of weights and gradients, and the scales (see :func:`agc_plan`).

        AGC reads each parameter's ``.grad`` (``grads`` are those tensors).
        """
        layouts = self._layouts
        known = {p: layouts[id(p)] for p in parameters if id(p) in layouts} if layouts else None
        return agc_plan(parameters, self.clipping, self.eps, layouts=known)

    def config(self) -> dict[str, Any]:
        return {"clipping": self.clipping, "eps": self.eps}


class AutoClip(NormPolicy):
    """AutoClip (Seetharaman et al., 2020): clip to a percentile of past norms.

    The history includes the current norm. The paper keeps every norm; this keeps
    the last ``window`` (a ring buffer on the device), so memory stays constant.
    Non-finite norms are not recorded (nor do they push recorded ones out; each
    element of a per-layer vector keeps its own position). Percentiles interpolate
    linearly, as ``numpy.percentile`` does, and equal ``torch.nanquantile`` of the
    history bit for bit. The two ranks and the interpolation weight for each possible
    number of recorded norms come from tables computed once (``nanquantile``'s own
    arithmetic); a global norm's window is sorted once per step, and per-layer
    windows are kept sorted by taking the evicted norm out and putting the new one
    in (binary searches and one shift, no sort). Only ``history`` and ``position``
    are state; the sorted copy is rebuilt from them after a load.

    Args:
        percentile: the percentile of the history to clip to (the paper uses 10).
        window: how many recent norms are kept.
    """

    name = "autoclip"
    _state_names = ("history", "position")
    history: Tensor | None = None
    position: Tensor
    # Derived, not state: nanquantile's ranks and weights, and for per-layer norms the
    # sorted windows (rebuilt from ``history`` when that is replaced).
    _tables: tuple[Tensor, Tensor] | None = None
    _ordered: Tensor | None = None
    _ordered_of: Tensor | None = None
    _index: Tensor
    _inf: Tensor

    def __init__(self, percentile: float = 10.0, window: int = 1000) -> None:
        self.percentile = check_number(percentile, "percentile", "AutoClip", low=0, high=100)
        self.window = check_int(window, "window", "AutoClip", low=1)

    def threshold(self, norm: Tensor) -> Tensor:
        norm = norm.to(torch.float64)
        if self.history is None or self.history.shape[1:] != norm.shape:
            self.history = torch.full(
                (self.window, *norm.shape), math.nan, dtype=torch.float64, device=norm.device
            )
            self.position = torch.zeros(norm.shape, dtype=torch.long, device=norm.device)
        self._move_state(norm)
        if self.position.shape != norm.shape:  # a state saved with one shared position
            self.position = self.position.expand(norm.shape).clone()
        if norm.dim() > 0 and (self._ordered is None or self._ordered_of is not self.history):
            self._sort_windows(self.history)  # first step, loaded state or moved device
        # One write position per element: a non-finite norm neither enters the history
        # nor pushes a recorded norm out of it (it writes back the norm already there).
        finite = torch.isfinite(norm)
        slot = (self.position % self.window).unsqueeze(0)
        evicted = self.history.gather(0, slot).squeeze(0)
        kept = torch.where(finite, norm, evicted)
        self.history.scatter_(0, slot, kept.unsqueeze(0))
        self.position = self.position + finite.long()
        if norm.dim() == 0:  # one sort of the window costs less than the update's ~15 ops
            ordered = self.history.sort(0).values  # NaN (empty) last, as nanquantile sorts
            empty = self.history.isnan().sum(0)
        else:  # sorting [window, layers] costs ~layers times more; the update does not
            ordered, empty = self._update_windows(evicted, kept)
        ranks, weights = self._rank_tables(norm.device)
        # index_select/take, not ``table[empty]``: a 0-dim index would be read to the host.
        around = ordered.gather(0, ranks.index_select(1, empty.flatten()).view(2, *empty.shape))
        threshold = torch.lerp(around[0], around[1], weights.take(empty))
        return torch.nan_to_num(threshold, nan=math.inf)

    def _sort_windows(self, history: Tensor) -> None:
        """Sort each element's window, empty (NaN) slots as ``inf``: ``[*shape, window]``."""
        window = history.nan_to_num(nan=math.inf).movedim(0, -1)
        self._ordered = window.sort(-1).values.contiguous()
        self._ordered_of = history
        self._index = torch.arange(self.window, device=history.device)
        self._inf = torch.full(
            (*history.shape[1:], 1), math.inf, dtype=torch.float64, device=history.device
        )

    def _update_windows(self, evicted: Tensor, kept: Tensor) -> tuple[Tensor, Tensor]:
        """Keep each element's window sorted: ``evicted`` out, ``kept`` in.

        ``O(window)`` per element and no sort: binary searches and one shift. A
        non-finite norm took its evicted norm out and put it back: no change.

        Returns:
            The sorted windows, ``[window, *shape]``, and the number of empty slots.
        """
        assert self._ordered is not None
        ordered, index = self._ordered, self._index
        probe = torch.stack((evicted, kept), -1).nan_to_num_(nan=math.inf)
        at = torch.searchsorted(ordered, probe)  # first position of each, [*shape, 2]
        gone, put = at[..., :1], at[..., 1:]
        # Out at ``gone``, then in at ``put``, less one if the removal was before it.
        lifted = index + (gone < put)
        shifted = torch.where(lifted > put, index - 1, index)
        source = (shifted + (shifted >= gone)).clamp_max_(self.window - 1)
        self._ordered = torch.where(lifted == put, probe[..., 1:], ordered.gather(-1, source))
        recorded = torch.searchsorted(self._ordered, self._inf).squeeze(-1)
        return self._ordered.movedim(-1, 0), self.window - recorded

    def _rank_tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``torch.nanquantile``'s ranks and weight for every count of recorded norms.

        Returns ``(ranks, weights)``: the ranks below and above, ``[2, window + 1]``,
        and the interpolation weight, ``[window + 1]``, indexed by the number of empty
        (NaN) slots. With no recorded norm both ranks are 0, which reads a NaN, as in
        ``nanquantile``. Computed once per device, with ``nanquantile``'s arithmetic.
        """
        if self._tables is None or self._tables[0].device != device:
            recorded = self.window - torch.arange(self.window + 1, device=device)
            q = torch.tensor(self.percentile / 100.0, dtype=torch.float64, device=device)
            ranks = q * (recorded - 1)
            ranks.masked_fill_(ranks < 0, 0)
            below = ranks.long()
            self._tables = (torch.stack((below, ranks.ceil().long())), ranks - below)
        return self._tables

    def config(self) -> dict[str, Any]:
        return {"percentile": self.percentile, "window": self.window}


class ZClip(NormPolicy):
    """ZClip (Kumar et al., 2025): z-score spike clipping over an EMA of norms.

    Follows the authors' reference implementation step for step: for the first
    ``warmup_steps`` norms it only clips at ``max_grad_norm`` and collects them;
    then mean and (population) variance are initialized from them. Afterwards,
    with ``z = (norm − μ) / (σ + eps)``:

    - ``mode="zscore"``, ``clip_option="adaptive_scaling"``: if ``z > z_thresh``
      the threshold is ``(μ + z_thresh·σ / (z / z_thresh)) · clip_factor``;
    - ``mode="zscore"``, ``clip_option="mean"``: if ``z > z_thresh``, clip to μ;
    - ``mode="percentile"``: clip to ``μ + z_thresh·σ`` when above it;

    always capped at ``max_grad_norm`` when that is set. The EMAs are updated
    with the clipped value on a spike (``μ ← α·μ + (1−α)·x``, then
    ``σ² ← α·σ² + (1−α)·(x − μ)²`` with the new μ), or not at all when
    ``skip_update_on_spike``. Unlike the reference, non-finite norms are never
    folded into the statistics (the step is skipped instead).
    """

    name = "zclip"
    _state_names = ("count", "warmup_buffer", "mean", "var", "initialized")

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        max_grad_norm: float | None = 1.0,
        eps: float = 1e-6,
        warmup_steps: int = 25,
        mode: str = "zscore",
        clip_option: str = "adaptive_scaling",
        clip_factor: float = 1.0,
        skip_update_on_spike: bool = False,
    ) -> None:
        self.alpha = _fraction(alpha, "alpha", "ZClip")
        self.z_thresh = _positive(z_thresh, "z_thresh", "ZClip")
        self.max_grad_norm = check_number(
            max_grad_norm, "max_grad_norm", "ZClip", low=0, low_open=True, allow_none=True
        )
        self.eps = _positive(eps, "eps", "ZClip")
        self.warmup_steps = check_int(warmup_steps, "warmup_steps", "ZClip", low=1)
        self.mode = check_choice(mode, "mode", "ZClip", ("zscore", "percentile"))
        self.clip_option = check_choice(
            clip_option, "clip_option", "ZClip", ("adaptive_scaling", "mean")
        )
        self.clip_factor = _positive(clip_factor, "clip_factor", "ZClip")
        self.skip_update_on_spike = check_bool(
            skip_update_on_spike, "skip_update_on_spike", "ZClip"
        )

    def _init_state(self, norm: Tensor) -> None:
        kw: dict[str, Any] = {"dtype": torch.float64, "device": norm.device}
        self.count = torch.zeros((), dtype=torch.long, device=norm.device)
        self.warmup_buffer = torch.zeros((self.warmup_steps, *norm.shape), **kw)
        self.mean = torch.zeros(norm.shape, **kw)
        self.var = torch.zeros(norm.shape, **kw)
        self.initialized = torch.zeros((), dtype=torch.bool, device=norm.device)

    def threshold(self, norm: Tensor) -> Tensor:
        norm = norm.to(torch.float64)
        if getattr(self, "mean", None) is None or self.mean.shape != norm.shape:
            self._init_state(norm)
        self._move_state(norm)
        cap = math.inf if self.max_grad_norm is None else self.max_grad_norm
        finite = torch.isfinite(norm).all()
        ready = self.initialized

        # Warm-up: collect finite norms; initialize mean/variance once the buffer is full.
        collecting = ~ready & finite
        slot = self.count.clamp(max=self.warmup_steps - 1).view(1)
        filled = self.warmup_buffer.index_copy(0, slot, norm.unsqueeze(0))
        self.warmup_buffer = torch.where(collecting, filled, self.warmup_buffer)
        self.count = self.count + collecting.long()
        completing = ~ready & (self.count >= self.warmup_steps)
        buffer_mean = self.warmup_buffer.mean(0)
        buffer_var = (self.warmup_buffer - buffer_mean).pow(2).mean(0)

        # After warm-up: the reference's clip value.
        std = self.var.sqrt()
        if self.mode == "percentile":
            clip_val = self.mean + self.z_thresh * std
            spike = norm > clip_val
        else:
            z = (norm - self.mean) / (std + self.eps)
            spike = z > self.z_thresh
            if self.clip_option == "adaptive_scaling":
                eta = z / self.z_thresh
                clip_val = (self.mean + self.z_thresh * std / eta) * self.clip_factor
            else:
                clip_val = self.mean
        adaptive = torch.where(spike, clip_val, norm)
        effective = adaptive.clamp(max=cap)

        update_value = torch.where(spike, clip_val, norm)
        new_mean = self.alpha * self.mean + (1 - self.alpha) * update_value
        new_var = self.alpha * self.var + (1 - self.alpha) * (update_value - new_mean).pow(2)
        update = ready & torch.isfinite(norm)
        if self.skip_update_on_spike:
            update = update & ~spike
        self.mean = torch.where(update, new_mean, torch.where(completing, buffer_mean, self.mean))
        self.var = torch.where(update, new_var, torch.where(completing, buffer_var, self.var))
        self.initialized = ready | completing
        return torch.where(ready, effective, torch.full_like(norm, cap))

    def typical_norm(self) -> Tensor | None:
        """The EMA mean of the norm; NaN during the warm-up."""
        if getattr(self, "mean", None) is None:
            return None
        return torch.where(self.initialized, self.mean, torch.full_like(self.mean, math.nan))

    def config(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "z_thresh": self.z_thresh,
            "max_grad_norm": self.max_grad_norm,
            "eps": self.eps,
            "warmup_steps": self.warmup_steps,
            "mode": self.mode,
            "clip_option": self.clip_option,
            "clip_factor": self.clip_factor,
            "skip_update_on_spike": self.skip_update_on_spike,
        }


class EMARatio(NormPolicy):
    """OLMo-style clipping to ``ratio ×`` an EMA of the norm.

    The EMA starts at the first norm and is updated with the *clipped* norm:
    ``ema ← decay·ema + (1−decay)·min(norm, ratio·ema)``. Use it with per-layer
    scope (and ``group_by="parameter"`` for OLMo's per-tensor variant) or globally.

    Args:
        ratio: how far above its running level a norm may go.
        decay: EMA decay (OLMo uses the optimizer's β₂, e.g. 0.95).
    """

    name = "ema_ratio"
    _state_names = ("ema", "started")
    ema: Tensor | None = None
    started: Tensor

    def __init__(self, ratio: float = 2.0, decay: float = 0.95) -> None:
        # At or below 1 every step clips to at most the running level, and the level
        # follows the clipped norm down: the gradients would shrink geometrically.
        self.ratio = check_number(ratio, "ratio", "EMARatio", low=1, low_open=True)
        self.decay = _fraction(decay, "decay", "EMARatio")

    def threshold(self, norm: Tensor) -> Tensor:
        norm = norm.to(torch.float64)
        if self.ema is None or self.ema.shape != norm.shape:
            self.ema = torch.zeros(norm.shape, dtype=torch.float64, device=norm.device)
            self.started = torch.zeros(norm.shape, dtype=torch.bool, device=norm.device)
        self._move_state(norm)
        finite = torch.isfinite(norm)
        ema = torch.where(self.started, self.ema, norm)
        threshold = self.ratio * ema
        clipped = norm * clip_coefficients(threshold, norm, CLIP_EPS)
        self.ema = torch.where(finite, torch.lerp(ema, clipped, 1 - self.decay), self.ema)
        self.started = self.started | finite
        return threshold

    def typical_norm(self) -> Tensor | None:
        """The EMA of the (clipped) norm; NaN before the first norm."""
        if self.ema is None:
            return None
        return torch.where(self.started, self.ema, torch.full_like(self.ema, math.nan))

    def config(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "decay": self.decay}


class GuardClip(NormPolicy):
    """Clip only what is clearly abnormal: GradGuard's default policy.

    Two rules, each a bound that scales with the model instead of a fixed number:

    - **Spike**: a norm above ``spike_ratio`` times the median of the last
      ``window`` recorded norms is clipped to that median. A clipped step records
      the median itself, so a run of spikes cannot ratchet the level up; the level
      follows only the norms that were let through.
    - **Weights**: a norm above ``weight_ratio`` times the norm of the weights
      (one SGD step at learning rate 1 would move them by more than their own
      size) is clipped to ``max(cut_ratio * ||W||, min_cut)``. This rule needs no
      history, so it acts from the first step, when a network explodes from
      initialization.

    On a healthy run neither fires: batch noise moves the norm by far less than
    2x its median, and a healthy gradient is a small fraction of the weights
    (0.05 to 0.11 for a tiny GPT-2 and a ResNet). The threshold reported when
    nothing clips is the smaller trigger (the largest norm that would pass);
    when a rule fires it is the norm the gradients are clipped to. A non-finite
    norm is never recorded (the step is skipped instead). The median of an even
    number of norms is the lower of the two middle ones.

    The weight norm is computed from the same parameters as the gradient norm
    (one fused pass, reduced across ranks for sharded parameters), per group
    when clipping per layer. Without parameters (:meth:`threshold` alone) only
    the spike rule applies. The weights move slowly (a step changes their norm
    by about the update ratio, 1e-3 or less), and their pass costs as much as the
    gradients' own: :meth:`decide` measures them on the first step and every
    ``weight_every_n_steps`` steps, and reuses that norm in between.

    Args:
        spike_ratio: how far above the median of the recent norms a norm is a spike.
        window: how many recent norms the median is taken over.
        weight_ratio: the largest ratio gradient norm / weight norm let through.
        cut_ratio: a norm above the weight bound is clipped to this fraction of the
            weight norm...
        min_cut: ...but to no less than this (so zero-initialized weights still move).
        weight_every_n_steps: measure the weight norm every this many :meth:`decide`
            calls (1: every step).

    Example:
        >>> policy = GuardClip(window=8)
        >>> norms = [1.0, 1.2, 0.9, 1.1, 50.0, 1.0]  # a spike at step 4
        >>> [round(float(policy.threshold(torch.tensor(n, dtype=torch.float64))), 2)
        ...  for n in norms]
        [inf, 2.0, 2.0, 2.0, 1.0, 2.0]
        >>> w = torch.nn.Parameter(torch.full((10, 10), 0.2))  # weight norm 2.0
        >>> w.grad = torch.full((10, 10), 66.0)  # gradient norm 660: an explosion
        >>> threshold, coef = GuardClip().clip_([w], [w.grad], torch.tensor(660.0))
        >>> float(threshold)  # max(0.01 * 2.0, 1.0)
        1.0
    """

    name = "guard"
    _state_names = ("history", "position", "weight_norm")
    history: Tensor | None = None
    position: Tensor
    weight_norm: Tensor | None = None  # the last measured weight norm(s), reused in between
    _weight_calls = 0  # decide() calls so far: the weights are measured when it is due
    # (weight norm, its version, bound, cut): the bounds follow from the weight norm alone,
    # which changes on 1 step in ``weight_every_n_steps``; derived, so not in the state.
    _bounds: tuple[Tensor, int, Tensor, Tensor] | None = None

    def __init__(
        self,
        spike_ratio: float = 2.0,
        window: int = 100,
        weight_ratio: float = 1.0,
        cut_ratio: float = 0.01,
        min_cut: float = 1.0,
        weight_every_n_steps: int = 10,
    ) -> None:
        # A norm at its median is no spike: the ratio must be above 1.
        self.spike_ratio = check_number(
            spike_ratio, "spike_ratio", "GuardClip", low=1, low_open=True
        )
        self.window = check_int(window, "window", "GuardClip", low=1)
        self.weight_ratio = _positive(weight_ratio, "weight_ratio", "GuardClip")
        self.cut_ratio = _positive(cut_ratio, "cut_ratio", "GuardClip")
        self.min_cut = _positive(min_cut, "min_cut", "GuardClip")
        self.weight_every_n_steps = check_int(
            weight_every_n_steps, "weight_every_n_steps", "GuardClip", low=1
        )

    def weight_norms(
        self, parameters: Sequence[Tensor], norm: Tensor, group_index: Tensor | None = None
    ) -> Tensor | None:
        """The norm of the weights, shaped like ``norm`` (per group when it is a vector).

        Under FSDP2 every rank gets the global value (one reduction); ``None``
        without parameters.
        """
        from lightning_gradguard.functional.norms import grouped_norms

        weights = [p.detach() for p in parameters]
        if not weights:
            return None
        groups = norm.numel() if norm.dim() else 1
        if group_index is None:
            group_index = torch.zeros(len(weights), dtype=torch.long)
        norms = grouped_norms(weights, group_index, groups)
        return (norms.groups if norm.dim() else norms.total).to(norm.device)

    def _weights_for(
        self, parameters: Sequence[Tensor], norm: Tensor, group_index: Tensor | None
    ) -> Tensor | None:
        """The weight norm(s) for this step: measured when due, else the last measured."""
        due = self._weight_calls % self.weight_every_n_steps == 0
        self._weight_calls += 1
        cached = self.weight_norm
        if due or cached is None or cached.shape != norm.shape:
            self.weight_norm = cached = self.weight_norms(parameters, norm, group_index)
        elif cached.device != norm.device:
            self.weight_norm = cached = cached.to(norm.device)
        return cached

    def state_dict(self) -> dict[str, Any]:
        """The state as CPU tensors; with a measured weight norm, the steps decided so far."""
        state = super().state_dict()
        if self.weight_norm is not None:
            state["weight_calls"] = torch.tensor(self._weight_calls)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; moved to the device at the next step."""
        super().load_state_dict(state)
        self._weight_calls = int(state.get("weight_calls", 0))  # on load, not on a step
        if "weight_norm" not in state:  # an older checkpoint: measure at the next step
            self.weight_norm = None

    def threshold(self, norm: Tensor, weight_norm: Tensor | None = None) -> Tensor:
        """The threshold for ``norm`` (see the class); records the norm. Device ops only.

        Args:
            norm: the gradient norm (scalar) or one norm per group.
            weight_norm: the weights' norm(s), shaped like ``norm``; ``None``: the
                weight rule is off.
        """
        norm = norm.to(torch.float64)
        if self.history is None or self.history.shape[1:] != norm.shape:
            self.history = torch.full(
                (self.window, *norm.shape), math.nan, dtype=torch.float64, device=norm.device
            )
            self.position = torch.zeros(norm.shape, dtype=torch.long, device=norm.device)
        self._move_state(norm)
        if self.position.shape != norm.shape:
            self.position = self.position.expand(norm.shape).clone()
        median = torch.nanmedian(self.history, dim=0).values  # NaN while empty: no spike
        trigger = torch.nan_to_num(self.spike_ratio * median, nan=math.inf)
        spike = norm > trigger
        target = torch.where(spike, median, math.inf)  # where the norm is clipped to
        if weight_norm is not None:
            bound, cut = self._weight_bounds(weight_norm, norm.device)
            large = norm > bound
            target = torch.where(large, torch.minimum(target, cut), target)
            trigger = torch.minimum(trigger, bound)
            spike = spike | large
        threshold = torch.where(spike, target, trigger)
        recorded = torch.where(spike, target, norm)
        finite = torch.isfinite(norm)
        slot = (self.position % self.window).unsqueeze(0)
        written = self.history.scatter(0, slot, recorded.unsqueeze(0))
        self.history = torch.where(finite, written, self.history)
        self.position = self.position + finite.long()
        return threshold

    def _weight_bounds(self, weight_norm: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        """``weight_ratio * ||W||`` and ``max(cut_ratio * ||W||, min_cut)`` in float64.

        Worked out again only when ``weight_norm`` is another tensor, was changed in
        place, or the norm moved to another device: between two weight measurements
        the four operations are not repeated.
        """
        cached = self._bounds
        if weight_norm.is_inference():  # no version counter: nothing tells an in-place change
            cached = self._bounds = None
        elif (
            cached is not None
            and cached[0] is weight_norm
            and cached[1] == weight_norm._version
            and cached[2].device == device
        ):
            return cached[2], cached[3]
        weights = weight_norm.to(device=device, dtype=torch.float64)
        bound = self.weight_ratio * weights
        cut = (self.cut_ratio * weights).clamp_min(self.min_cut)
        if not weight_norm.is_inference():
            self._bounds = (weight_norm, weight_norm._version, bound, cut)
        return bound, cut

    def typical_norm(self) -> Tensor | None:
        """The median of the recent recorded norms (the spike rule's level); NaN while empty."""
        if self.history is None:
            return None
        return torch.nanmedian(self.history, dim=0).values

    def threshold_for(self, plan: NormPlan, norm: Tensor) -> Tensor:
        """:meth:`threshold` with the weights' norm of the plan's parameters (the weight rule)."""
        return self.threshold(norm, self._weights_for(plan.parameters, norm, plan.group_index))

    def config(self) -> dict[str, Any]:
        return {
            "spike_ratio": self.spike_ratio,
            "window": self.window,
            "weight_ratio": self.weight_ratio,
            "cut_ratio": self.cut_ratio,
            "min_cut": self.min_cut,
            "weight_every_n_steps": self.weight_every_n_steps,
        }


POLICIES: dict[str, type[ClipPolicy]] = {
    "norm": FixedNorm,
    "value": FixedValue,
    "agc": AGC,
    "autoclip": AutoClip,
    "zclip": ZClip,
    "ema_ratio": EMARatio,
    "guard": GuardClip,
    "none": NoClip,
}
"""String shorthands accepted by ``AdaptiveGradClip(policy=...)``."""


def make_policy(policy: str | ClipPolicy) -> ClipPolicy:
    """A policy object from a shorthand (default arguments) or the object itself.

    Raises:
        ValueError: for an unknown shorthand, listing the valid ones.

    Example:
        >>> make_policy("zclip").name, make_policy(FixedNorm(2.0))
        ('zclip', FixedNorm(max_norm=2.0))
    """
    if isinstance(policy, ClipPolicy):
        return policy
    if isinstance(policy, str) and policy in POLICIES:
        return POLICIES[policy]()
    close = closest(policy, POLICIES)
    hint = f" (did you mean {close!r}?)" if close else ""
    raise ValueError(
        f"policy={policy!r} is not a clipping policy{hint}: use one of {sorted(POLICIES)} "
        "or a policy object such as ZClip(z_thresh=3.0)."
    )


@torch.no_grad()
def clip_with_policy_(
    policy: ClipPolicy,
    parameters: nn.Module | Sequence[Tensor],
    grad_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Clip the gradients of ``parameters`` globally with ``policy``, in place.

    For a plain PyTorch loop, for ``configure_gradient_clipping`` and for manual
    optimization. ``grad_scale`` is the AMP ``GradScaler``'s current scale when
    the gradients are still scaled: they are unscaled for the decision and scaled
    back afterwards. GradScaler scales are powers of two, so both multiplications
    are exact.

    Args:
        policy: the clipping policy (its state is updated).
        parameters: the model (the policy is bound to it first: AGC then reads each
            weight's output units from the unit map), or the parameters whose ``.grad``
            is clipped (AGC reads units as rows, dim 0, unless the policy was bound with
            :meth:`ClipPolicy.bind`).
        grad_scale: the loss scale the gradients carry, or ``None``.

    Returns:
        ``(norm, threshold, coefficient)`` of the unscaled gradients, device tensors
        (the coefficient is NaN for a direct clipper: value clipping, AGC).

    Example:
        >>> layer = torch.nn.Linear(4, 4)
        >>> layer(torch.randn(8, 4)).pow(2).sum().backward()
        >>> norm, threshold, coef = clip_with_policy_(FixedNorm(0.1), list(layer.parameters()))
        >>> round(float(torch.nn.utils.get_total_norm([p.grad for p in layer.parameters()])), 4)
        0.1
    """
    from lightning_gradguard.functional.norms import grouped_norms

    if not isinstance(policy, ClipPolicy):
        raise TypeError(
            f"clip_with_policy_(policy={policy!r}): policy must be a ClipPolicy object that "
            "lives as long as the run (its state is the history), e.g. "
            "policy = make_policy('zclip') once, then clip_with_policy_(policy, ...) every step."
        )
    if isinstance(parameters, nn.Module):
        policy.bind(parameters)
        parameters = list(parameters.parameters())
    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params if p.grad is not None]
    locals_: list[Tensor] = []
    if grad_scale is not None and grads:
        from lightning_gradguard.functional.norms import local_tensors

        locals_, _ = local_tensors(grads)
        torch._foreach_mul_(locals_, grad_scale.reciprocal().to(locals_[0].dtype))
    plan = policy.prepare(params, grads)
    norm = plan.measured_norm()  # AGC's unit norms give it: no second pass
    if norm is None and grads:
        index = torch.zeros(len(grads), dtype=torch.long, device=grads[0].device)
        norm = grouped_norms(grads, index, 1).total
    elif norm is None:
        norm = torch.zeros((), dtype=torch.float64)
    policy.decide(plan, norm)
    plan.apply_()
    if locals_ and grad_scale is not None:
        torch._foreach_mul_(locals_, grad_scale.to(locals_[0].dtype))
    assert plan.threshold is not None
    coef = plan.coef if plan.coef is not None else torch.full_like(norm, math.nan)
    return norm, plan.threshold, coef

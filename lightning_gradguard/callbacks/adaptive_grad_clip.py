"""``AdaptiveGradClip``: one callback for fixed, AutoClip, ZClip, EMA-ratio and AGC clipping.

Example:
    >>> import pytorch_lightning as pl
    >>> from lightning_gradguard import AdaptiveGradClip
    >>> from lightning_gradguard.functional import ZClip
    >>> clipper = AdaptiveGradClip(policy=ZClip(z_thresh=3.0))
    >>> trainer = pl.Trainer(callbacks=[clipper], logger=False)
"""

from __future__ import annotations

import copy
import functools
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor
from typing_extensions import override

from lightning_gradguard._checks import check_bool, check_choice, check_int, check_number
from lightning_gradguard._compat import Callback, rank_zero_warn
from lightning_gradguard.callbacks._parts import flat_callbacks
from lightning_gradguard.callbacks._trainer import (
    is_deepspeed,
    log_interval,
    optimizer_index,
    optimizer_parameters,
)
from lightning_gradguard.functional.clipping import ClipPlan
from lightning_gradguard.functional.norms import (
    GroupBy,
    GroupedNorms,
    NormGrouping,
    grad_norms,
    validate_group_by,
)
from lightning_gradguard.functional.policies import ClipPolicy, make_policy
from lightning_gradguard.functional.spikes import SpikeWindow
from lightning_gradguard.loggers import flatten_for_host, log_to_loggers, split_host, to_host
from lightning_gradguard.record import run_record

if TYPE_CHECKING:
    import pytorch_lightning as pl


__all__ = [
    "SCOPES",
    "AdaptiveGradClip",
]

SCOPES = ("global", "layer")
_ABSENT = object()  # an optimizer without an instance-level ``step`` (the class's runs)
_GRAD = operator.attrgetter("grad")


def _plain_state(saved: Any) -> dict[str, Any]:
    """A state dict, from a saved copy of a stateful object or from its state dict."""
    return copy.deepcopy(saved if isinstance(saved, dict) else saved.state_dict())


@dataclass
class _ClipState:
    grouping: NormGrouping
    policy: ClipPolicy
    spikes: SpikeWindow | None
    layers: NormGrouping
    steps_seen: int = 0
    skip_flag: bool | None = None  # read on the host with the clipping flags
    nonfinite_flag: bool | None = None
    consecutive_skips: int = 0
    scaler_skips: Tensor | None = None
    # The monitor's grouping last compared with ``grouping``, and whether its norms are
    # this clipper's norms: a grouping never changes, so they are compared once, not per step.
    monitor_grouping: NormGrouping | None = None
    shares_monitor_norms: bool = False


class AdaptiveGradClip(Callback):
    """Clip gradients adaptively and skip steps whose gradients are non-finite or spiking.

    It runs in ``on_before_optimizer_step``: after AMP unscaling and gradient
    accumulation, before the optimizer update. With a
    :class:`~lightning_gradguard.GradNormMonitor` listed *before* it, the
    monitor's norms are reused (one pass over the gradients for both) when the
    monitor measures L2 norms of the same parameters (and, with ``scope="layer"``,
    the same groups).

    Skipping: when the gradients contain inf/NaN (or, with ``skip_spikes``, the
    global norm is more than ``spike_sigma`` standard deviations above the mean
    of the last ``spike_window`` norms), the optimizer update does not happen at
    all: parameters and optimizer state stay bit-identical. The decision is
    reduced across ranks, so every rank skips together, and every rank folds the
    same (largest) norm into its policy. It costs one read of a flag per step.
    After ``max_consecutive_skips`` skipped steps in a row training stops with an
    error. With fp16 AMP, the GradScaler already skips non-finite steps: those
    are counted (toward ``max_consecutive_skips`` too), not acted on twice.

    ``policy`` is a template: every optimizer of every fit clips with a fresh
    copy of it, so a callback reused for another ``fit`` starts afresh.

    Logged keys: ``clip/threshold``, ``clip/coef``, ``clip/active``,
    ``clip/skipped_steps``, ``grad_norm/total_clipped``. With ``scope="layer"``
    ``clip/coef`` is the smallest per-layer coefficient, ``clip/active`` the
    fraction of layers clipped and ``clip/threshold`` the median threshold.

    Args:
        policy: a :class:`~lightning_gradguard.functional.ClipPolicy` object or a
            shorthand: ``"norm"``, ``"value"``, ``"agc"``, ``"autoclip"``,
            ``"zclip"``, ``"ema_ratio"``, ``"guard"`` (default arguments).
        scope: ``"global"`` (one norm for all gradients) or ``"layer"`` (each group
            of ``group_by`` is clipped on its own norm).
        group_by: grouping for ``scope="layer"`` (see ``GradNormMonitor``).
        depth: path components kept with ``group_by="depth"``.
        include: glob patterns of parameter names to clip (default: all).
        exclude: glob patterns of parameter names not to clip (e.g. the classifier
            for AGC).
        skip_nonfinite: skip steps whose gradients contain inf or NaN.
        skip_spikes: also skip steps whose global norm spikes.
        spike_sigma: how many standard deviations above the mean is a spike.
        spike_window: how many recent norms the spike statistics use.
        spike_min_samples: spike skipping starts once this many norms were seen.
        max_consecutive_skips: stop training after this many skipped steps in a row.
        log_every_n_steps: logging interval in optimizer steps; ``None`` uses the
            Trainer's ``log_every_n_steps``.
    """

    clips_gradients = True

    def __init__(
        self,
        policy: str | ClipPolicy = "zclip",
        scope: str = "global",
        group_by: GroupBy = "module",
        depth: int | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        skip_nonfinite: bool = True,
        skip_spikes: bool = False,
        spike_sigma: float = 6.0,
        spike_window: int = 128,
        spike_min_samples: int = 20,
        max_consecutive_skips: int = 10,
        log_every_n_steps: int | None = None,
    ) -> None:
        owner = "AdaptiveGradClip"
        self.policy = make_policy(policy)
        self.scope = check_choice(scope, "scope", owner, SCOPES)
        validate_group_by(group_by, depth)
        NormGrouping.from_named_parameters([], group_by, depth, include, exclude)
        self.group_by, self.depth = group_by, depth
        self.include = None if include is None else list(include)
        self.exclude = None if exclude is None else list(exclude)
        self.skip_nonfinite = check_bool(skip_nonfinite, "skip_nonfinite", owner)
        self.skip_spikes = check_bool(skip_spikes, "skip_spikes", owner)
        self.spike_sigma = check_number(spike_sigma, "spike_sigma", owner, low=0, low_open=True)
        self.spike_window = check_int(spike_window, "spike_window", owner, low=2)
        self.spike_min_samples = check_int(
            spike_min_samples, "spike_min_samples", owner, low=2, high=spike_window
        )
        self.max_consecutive_skips = check_int(
            max_consecutive_skips, "max_consecutive_skips", owner, low=1
        )
        self.log_every_n_steps = check_int(
            log_every_n_steps, "log_every_n_steps", owner, low=1, allow_none=True
        )
        self._own_skips = 0  # steps this callback skipped (host count)
        # id(optimizer) -> (optimizer, its instance-level ``step`` before ours, our wrapper)
        self._wrapped: dict[int, tuple[Any, Any, Any]] = {}
        self._trainer: Any = None
        self._states: dict[int, _ClipState] = {}
        self._loaded: dict[str, Any] = {}
        self._monitor: Any = None
        self._uses_scaler = False
        self._flag_sources: list[Any] = []

    @property
    def reads_flags(self) -> bool:
        """Whether this clipper reads a decision flag on the host every step (it skips steps)."""
        return self.skip_nonfinite or self.skip_spikes

    def policy_snapshot(self) -> dict[str, Any]:
        """Device copies of every optimizer's policy (and spike window), for a rollback.

        Copies, not ``state_dict()``: taking them moves nothing to the host.

        Example:
            >>> AdaptiveGradClip().policy_snapshot()  # no optimizer seen yet
            {}
        """
        saved: dict[str, Any] = {}
        for index, state in self._states.items():
            saved[f"clip_policy_{index}"] = copy.deepcopy(state.policy)
            if state.spikes is not None:
                saved[f"clip_spikes_{index}"] = copy.deepcopy(state.spikes)
        return saved

    def restore_policies(self, saved: dict[str, Any]) -> None:
        """Put back :meth:`policy_snapshot` output, or its ``state_dict()`` form.

        Optimizers not in ``saved`` keep their state.
        """
        for index, state in self._states.items():
            policy = saved.get(f"clip_policy_{index}")
            if policy is not None:
                state.policy.load_state_dict(_plain_state(policy))
            spikes = saved.get(f"clip_spikes_{index}")
            if spikes is not None and state.spikes is not None:
                state.spikes.load_state_dict(_plain_state(spikes))

    def add_flag_source(self, source: Any) -> None:
        """Reduce and read another callback's per-step flag together with the skip flags.

        ``source.spike_flag(optimizer, total_norm, typical_norm)`` returns a 1-D bool
        device tensor on the first optimizer's steps (``typical_norm``: the policy's
        running level of the global norm before this step, ``None`` without one, see
        ``ClipPolicy.typical_norm``); the flags join the
        skip flags' cross-rank reduction (any rank) and their one host read, and
        ``source.receive_flags(values)`` gets the agreed values as a list of bools.
        Only a clipper that :attr:`reads_flags` calls its sources.
        """
        if all(s is not source for s in self._flag_sources):
            self._flag_sources.append(source)

    def policy_level(self, state: _ClipState) -> Tensor | None:
        """The policy's running level of the global norm (``None``: none, or layer scope)."""
        if self.scope != "global":
            return None
        return state.policy.typical_norm()

    def typical_norm(self, optimizer_index: int = 0) -> Tensor | None:
        """One optimizer's running level of the global norm (``None`` before its first step).

        Example:
            >>> AdaptiveGradClip().typical_norm() is None  # no optimizer seen yet
            True
        """
        state = self._states.get(optimizer_index)
        return None if state is None else self.policy_level(state)

    # ------------------------------------------------------------------ identity / state

    @functools.cached_property  # Lightning reads it at every hook call: compute it once
    def state_key(self) -> str:
        return self._generate_state_key(policy=repr(self.policy), scope=self.scope)

    @override
    def state_dict(self) -> dict[str, Any]:
        """Policy state per optimizer and counters: CPU tensors and Python primitives."""
        state: dict[str, Any] = {"skipped_steps": self.skipped_steps}
        for index, s in self._states.items():
            state[f"optimizer_{index}"] = {
                "steps_seen": s.steps_seen,
                "policy": s.policy.state_dict(),
                "spikes": None if s.spikes is None else s.spikes.state_dict(),
                "consecutive_skips": s.consecutive_skips,
            }
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (applied when each optimizer is first seen)."""
        self._loaded = dict(state_dict)
        self._own_skips = int(state_dict.get("skipped_steps", 0))

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped so far: by this callback, or by the fp16 GradScaler.

        Reading it moves the GradScaler count to the host (a sync): do it outside
        the training step.
        """
        return self._own_skips + self._scaler_skips_on_host()

    def _scaler_skips_on_host(self) -> int:
        return sum(int(s.scaler_skips) for s in self._states.values() if s.scaler_skips is not None)

    # ------------------------------------------------------------------ lifecycle

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            # A second fit with the same callback (sweeps, notebooks) starts afresh: no
            # policy statistics, skip counts or saved state of the first. A resumed fit
            # gets its state from load_state_dict, which Lightning calls after setup.
            self._states = {}
            self._loaded = {}
            self._own_skips = 0
        self._trainer = trainer
        run_record(trainer)  # in place before a checkpoint is restored
        if is_deepspeed(trainer):
            raise RuntimeError(
                "AdaptiveGradClip does not work under DeepSpeed: DeepSpeed owns the gradients and "
                "clips them itself. Remove AdaptiveGradClip and set DeepSpeed's own "
                "`gradient_clipping` in its config, e.g. "
                "DeepSpeedStrategy(config={'gradient_clipping': 1.0})."
            )
        if getattr(trainer, "gradient_clip_val", None):
            rank_zero_warn(
                f"AdaptiveGradClip and Trainer(gradient_clip_val={trainer.gradient_clip_val}) are "
                "both clipping gradients: Lightning clips after AdaptiveGradClip, so both "
                "apply. Remove gradient_clip_val to let AdaptiveGradClip own clipping."
            )
        self._interval = log_interval(trainer, self.log_every_n_steps)
        scaler = getattr(trainer.strategy.precision_plugin, "scaler", None)
        self._uses_scaler = scaler is not None
        self._monitor = None
        from lightning_gradguard.callbacks.grad_norm_monitor import GradNormMonitor

        callbacks = flat_callbacks(trainer)
        self._warn_about_other_clippers(callbacks, pl_module)
        for position, callback in enumerate(callbacks):
            if isinstance(callback, GradNormMonitor):
                if position < callbacks.index(self):
                    self._monitor = callback
                else:
                    rank_zero_warn(
                        "GradNormMonitor is listed after AdaptiveGradClip, so it measures clipped "
                        "gradients and computes its own norms. List it first to see the raw "
                        "gradients and share one pass over them."
                    )
                break

    def _warn_about_other_clippers(self, callbacks: list[Any], pl_module: Any) -> None:
        """Two owners of clipping clip twice: say so, once, naming both."""
        clippers = [cb for cb in callbacks if getattr(cb, "clips_gradients", False)]
        if len(clippers) > 1 and clippers[0] is self:
            rank_zero_warn(
                f"{len(clippers)} gradient clippers are attached ("
                + ", ".join(f"{type(c).__name__}(policy={c.policy!r})" for c in clippers)
                + "): each clips the gradients the previous one left, and each skips on its "
                "own. Keep one (GradGuard already contains an AdaptiveGradClip)."
            )
        module_policy = getattr(pl_module, "gradguard_clip", None)
        clipping = [c for c in clippers if c.policy.name != "none"]  # not skip-only ones
        if module_policy is not None and clipping and clipping[0] is self:
            rank_zero_warn(
                f"AdaptiveGradClip(policy={self.policy!r}) and the LightningModule's "
                f"GradGuardMixin (gradguard_clip={module_policy!r}) both clip: the mixin clips "
                "in configure_gradient_clipping after AdaptiveGradClip, so both apply. Set "
                "gradguard_clip = None on the module, or remove the callback."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._states = {}
        if not (self.skip_nonfinite or self.skip_spikes):
            return
        for index, optimizer in enumerate(trainer.optimizers):
            if isinstance(optimizer, torch.optim.LBFGS):
                rank_zero_warn(
                    "AdaptiveGradClip cannot skip steps of LBFGS (it re-evaluates the closure "
                    "inside its step); steps are clipped but never skipped."
                )
                continue
            self._wrap_step(optimizer, index)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Put back exactly what was there (torch's LR-scheduler wrapper, another library's),
        # and only where our wrapper is still the outermost one.
        for optimizer, previous, wrapper in self._wrapped.values():
            if vars(optimizer).get("step") is not wrapper:
                continue
            if previous is _ABSENT:
                del optimizer.step
            else:
                optimizer.step = previous
        self._wrapped = {}

    # ------------------------------------------------------------------ skipping

    def _wrap_step(self, optimizer: Any, index: int) -> None:
        if id(optimizer) in self._wrapped:  # this callback wraps each optimizer once
            return
        original = optimizer.step  # the class's step, or another clipper's wrapper: they chain

        # functools.wraps keeps the wrapped step's attributes, among them torch's
        # ``_wrapped_by_lr_sched`` marker: without it every LR scheduler step warns that
        # "optimizer.step() has been overridden after learning rate scheduler initialization".
        @functools.wraps(original)
        def step(closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()  # runs backward and on_before_optimizer_step
            if self._should_skip(index):
                return loss
            if closure is None:
                return original(**kwargs)
            return original(closure=lambda: loss, **kwargs)

        self._wrapped[id(optimizer)] = (optimizer, vars(optimizer).get("step", _ABSENT), step)
        optimizer.step = step

    def _should_skip(self, index: int) -> bool:
        state = self._states.get(index)
        if state is None or state.skip_flag is None:
            return False
        flag, state.skip_flag = state.skip_flag, None
        if not bool(flag):  # the one host read per step that skipping costs
            state.consecutive_skips = 0
            return False
        self._own_skips += 1
        state.consecutive_skips += 1
        nonfinite = state.nonfinite_flag is not None and bool(state.nonfinite_flag)
        layers: list[str] = []
        if nonfinite:  # a bad step: worth one more pass to name the layers
            bad = ~grad_norms(state.layers).groups.isfinite()
            if not self._uses_scaler:
                # Every rank skips together, so every rank reaches this reduction: a layer is
                # named when it is non-finite on any rank (rank zero, which warns, included).
                # (With a GradScaler each rank's scaler decides alone: no collective here.)
                bad = self._agree_across_ranks(bad)
            layers = [n for n, flag in zip(state.layers.names, bad.tolist()) if flag]
            reason = f"non-finite gradients (inf/NaN) in: {', '.join(layers[:5])}"
        else:
            reason = f"a gradient-norm spike above {self.spike_sigma:g} sigma of the recent norms"
        record = run_record(self._trainer) if self._trainer is not None else None
        step = int(self._trainer.global_step) if self._trainer is not None else 0
        if record is not None:
            record.add(
                "skip",
                step,
                layers=layers,
                values={"nonfinite": float(nonfinite), "consecutive": state.consecutive_skips},
                detail=f"skipped optimizer step ({reason})",
            )
        self._stop_if_too_many(state, reason, layers)
        rank_zero_warn(f"AdaptiveGradClip: skipped optimizer step ({reason}).")
        return True

    def _stop_if_too_many(self, state: _ClipState, reason: str, layers: list[str]) -> None:
        if state.consecutive_skips >= self.max_consecutive_skips:
            record = run_record(self._trainer) if self._trainer is not None else None
            if record is not None:  # in the record before the error: the report writes it
                record.add(
                    "stop",
                    int(self._trainer.global_step),
                    layers=layers,
                    values={"consecutive_skips": state.consecutive_skips},
                    detail=f"stopped after {state.consecutive_skips} skipped steps in a row",
                )
            raise RuntimeError(
                f"AdaptiveGradClip skipped {state.consecutive_skips} optimizer steps in a row "
                f"({reason}); training is stopped rather than looping on a broken state. Lower the "
                "learning rate, check the data and the loss for inf/NaN, or resume from an earlier "
                "checkpoint. Raise max_consecutive_skips to tolerate longer bursts."
            )

    # ------------------------------------------------------------------ the step

    def _state(self, trainer: Any, pl_module: Any, optimizer: Any) -> tuple[int, _ClipState]:
        index = optimizer_index(trainer, optimizer)
        state = self._states.get(index)
        if state is None:
            params = optimizer_parameters(optimizer)
            layer_scope = self.scope == "layer"
            group_by = self.group_by if layer_scope else (lambda name: "all")
            grouping = NormGrouping.from_named_parameters(
                pl_module.named_parameters(),
                group_by,
                self.depth if layer_scope else None,
                self.include,
                self.exclude,
                only=params,
            )
            # Every optimizer of every fit starts from the configured policy, never from
            # another optimizer's or an earlier fit's statistics.
            policy = copy.deepcopy(self.policy)
            policy.bind(pl_module)  # AGC reads each weight's output units from the unit map
            spikes = (
                SpikeWindow(self.spike_window, self.spike_min_samples, self.spike_sigma)
                if self.skip_spikes
                else None
            )
            layers = NormGrouping.from_named_parameters(
                pl_module.named_parameters(),
                "module",
                None,
                self.include,
                self.exclude,
                only=params,
            )
            state = _ClipState(grouping=grouping, policy=policy, spikes=spikes, layers=layers)
            if grouping.left_out:
                rank_zero_warn(
                    f"AdaptiveGradClip: optimizer {index}: not clipped (no norm exists for "
                    f"them): {grouping.describe_left_out()}. The other parameters are."
                )
            if not grouping.parameters:
                rank_zero_warn(
                    f"AdaptiveGradClip: no parameter of optimizer {index} matches "
                    f"include={self.include!r} / exclude={self.exclude!r}: nothing is clipped "
                    "or checked for it. Check the patterns against the names in "
                    "model.named_parameters()."
                )
            saved = self._loaded.pop(f"optimizer_{index}", None)
            if saved is not None:
                state.steps_seen = int(saved["steps_seen"])
                policy.load_state_dict(saved["policy"])
                if spikes is not None and saved.get("spikes") is not None:
                    spikes.load_state_dict(saved["spikes"])
                state.consecutive_skips = int(saved["consecutive_skips"])
            self._states[index] = state
        return index, state

    def _norms(self, state: _ClipState, optimizer: Any, plan: ClipPlan) -> GroupedNorms:
        monitor = self._monitor
        if monitor is not None:
            found = monitor.norms_for(optimizer)
            # The monitor may measure another norm order (norm_type="inf"): clipping is L2.
            if found is not None and found[1].norm_type == 2.0:
                grouping, norms = found
                if self._measures_the_same(state, grouping):
                    return norms
        measured = plan.measured_norm() if self.scope == "global" else None
        if measured is not None:  # the policy measured it while preparing (AGC): no second pass
            return GroupedNorms(groups=measured.view(1), total=measured, norm_type=2.0)
        return grad_norms(state.grouping)

    def _measures_the_same(self, state: _ClipState, grouping: NormGrouping) -> bool:
        """Whether the monitor's ``grouping`` gives this clipper's norms (once per grouping).

        The same parameter objects in the same order (the monitor's include/exclude
        may differ from the clipper's), and for ``scope="layer"`` the same groups.
        """
        if grouping is not state.monitor_grouping:
            mine = state.grouping
            same_params = len(grouping.parameters) == len(mine.parameters) and all(
                map(operator.is_, grouping.parameters, mine.parameters)
            )
            state.shares_monitor_norms = same_params and (
                self.scope == "global"
                or (grouping.names == mine.names and grouping.group_index == mine.group_index)
            )
            state.monitor_grouping = grouping
        return state.shares_monitor_norms

    @staticmethod
    def _gradients(
        state: _ClipState,
    ) -> tuple[Sequence[Tensor], list[Tensor], tuple[int, ...] | None]:
        """The parameters that have a gradient this step, their gradients and their positions.

        One pass in the common case, where every parameter has one (positions ``None``);
        parameters without a gradient this step (unused, frozen) are left out.
        """
        params = state.grouping.parameters
        grads = list(map(_GRAD, params))
        if all(map(operator.is_not, grads, repeat(None))):
            return params, grads, None
        positions = tuple(i for i, grad in enumerate(grads) if grad is not None)
        return [params[i] for i in positions], [grads[i] for i in positions], positions

    @override
    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        index, state = self._state(trainer, pl_module, optimizer)
        if not state.grouping.parameters:
            return  # nothing matched include/exclude (warned once when the state was made)
        present, grads, positions = self._gradients(state)
        index_tensor = None
        if self.scope == "layer":
            device = grads[0].device if grads else torch.device("cpu")
            index_tensor = state.grouping.index_tensor(positions, device)
        plan = state.policy.prepare(present, grads, index_tensor)
        norms = self._norms(state, optimizer, plan)
        total = norms.total
        norm = total if self.scope == "global" else norms.groups

        nonfinite = ~torch.isfinite(total)
        # The step's skip flag from the rules that are on (no tensor for those that are off).
        skip = nonfinite if self.skip_nonfinite and not self._uses_scaler else None
        if state.spikes is not None:
            spike = state.spikes.is_spike(total)
            skip = spike if skip is None else skip | spike
        if self._uses_scaler:
            state.scaler_skips = (
                0 if state.scaler_skips is None else state.scaler_skips
            ) + nonfinite.long()
        deciding = self.skip_nonfinite or self.skip_spikes
        sources = self._flag_sources if deciding and index == 0 else []
        typical = self.policy_level(state) if sources else None
        extra = [s.spike_flag(optimizer, total, typical) for s in sources]
        if deciding:
            # Decide together *before* the policy sees the norm, in one collective for the
            # flags (the clipper's and those of the parts that joined its read) and the
            # norms: when only some ranks' gradients are non-finite or spike (a fault after
            # the all-reduce), every rank must skip, and every rank must fold the same
            # number into its statistics (the largest finite one), or the ranks'
            # thresholds, and then their parameters, drift apart from here on.
            if skip is None:  # with a GradScaler and no spike rule: the scaler skips, not us
                skip = torch.zeros((), dtype=torch.bool, device=total.device)
            extra_flags = (
                torch.cat([f.to(skip.device).reshape(-1) for f in extra])
                if extra
                else skip.new_zeros(0)
            )
            skip, nonfinite, extra_agreed, total, norm = self._agree_on_step(
                skip, nonfinite, extra_flags, total, norm
            )
            # A non-finite step is never folded into the policy (with or without a scaler).
            norm = norm.masked_fill(nonfinite, math.nan)
        state.policy.decide(plan, norm)
        logging_step = state.steps_seen % self._interval == 0
        state.steps_seen += 1
        own: dict[str, Tensor] | None = None  # this step's logged values, when they ride
        own_host: dict[str, float] = {}
        if deciding:
            # Skipping pays one host read per step anyway: the same read also says which
            # passes of the clipping would change anything, and only those run (on most
            # steps of a healthy run, none). On a logging step it also carries the logged
            # values, this clipper's and the monitor's: the step's one transfer.
            assert skip is not None  # set above whenever the clipper decides
            if logging_step:  # on every rank, so that every rank takes the same path below
                own = self._values_before_apply(state, plan, total, skip)
            parts = [
                torch.stack((skip, nonfinite)),
                extra_agreed,
                plan.needs_scaling().to(skip.device),
            ]
            carried = self._monitor_metrics(optimizer, trainer)
            if own is None and carried is None:
                flags = torch.cat(parts).tolist()
            else:
                flags, own_host = self._read_with_metrics(parts, own or {}, carried, optimizer)
            state.skip_flag, state.nonfinite_flag = flags[0], flags[1]
            offset = 2
            for source, flag in zip(sources, extra):
                source.receive_flags([bool(f) for f in flags[offset : offset + flag.numel()]])
                offset += flag.numel()
            if self._uses_scaler and flags[1]:
                # The GradScaler skips this step without calling optimizer.step (so without
                # our wrapper): count it here, toward max_consecutive_skips as well.
                state.consecutive_skips += 1
                self._stop_if_too_many(state, "the fp16 GradScaler found inf/NaN gradients", [])
            if not flags[0]:
                plan.apply_(flags[offset:])
        else:
            plan.apply_()
        if state.spikes is not None and skip is not None:  # skip is set when spikes are
            state.spikes.record(total, ~skip)
        if own is not None:
            if trainer.is_global_zero:
                self._emit(trainer, state, index, own_host)
        elif logging_step:
            # On every rank: without norms from the policy this is a collective under FSDP2.
            clipped = self._clipped_norm(state, plan)
            if trainer.is_global_zero:
                values = to_host(self._values(state, plan, clipped, total))
                self._emit(trainer, state, index, {k: v[0] for k, v in values.items()})

    @staticmethod
    def _agree_on_step(
        skip: Tensor, nonfinite: Tensor, extra: Tensor, total: Tensor, norm: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The step's flags (any rank) and norms (the largest finite one), on every rank.

        ``extra`` holds the flags of the parts that joined the clipper's one read
        (``SpikeRecovery``); it travels in the same collective.
        """
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return skip, nonfinite, extra.bool(), total, norm
        finite_or_zero = [torch.nan_to_num(t.double(), nan=0.0, posinf=0.0) for t in (total, norm)]
        packed = torch.cat(
            [skip.double().view(1), nonfinite.double().view(1), extra.double().reshape(-1)]
            + [t.reshape(-1) for t in finite_or_zero]
        )
        dist.all_reduce(packed, op=dist.ReduceOp.MAX)
        k = extra.numel()
        agreed_extra = packed[2 : 2 + k] > 0
        agreed_total = packed[2 + k].to(total.dtype).reshape(total.shape)
        agreed_norm = packed[3 + k :].to(norm.dtype).reshape(norm.shape)
        return packed[0] > 0, packed[1] > 0, agreed_extra, agreed_total, agreed_norm

    @staticmethod
    def _agree_across_ranks(flag: Tensor) -> Tensor:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            as_int = flag.to(torch.int32)
            dist.all_reduce(as_int, op=dist.ReduceOp.MAX)
            return as_int.bool()
        return flag

    @staticmethod
    def _clipped_norm(state: _ClipState, plan: ClipPlan) -> Tensor:
        """The global norm after clipping: from the plan when it knows it, else measured."""
        # A skipped step (its flag is read on the host by now) kept its gradients.
        clipped = plan.clipped_norm(applied=not state.skip_flag)
        return grad_norms(state.grouping).total if clipped is None else clipped

    def _read_with_metrics(
        self,
        parts: list[Tensor],
        own: dict[str, Tensor],
        carried: dict[str, Tensor] | None,
        optimizer: Any,
    ) -> tuple[list[bool], dict[str, float]]:
        """The flags and the logged values in one float64 vector, one transfer to the host.

        Returns the flags and this clipper's values; the monitor's ``carried`` values go
        back to the monitor.
        """
        device = parts[0].device
        ours, _ = flatten_for_host(own, device)
        theirs, their_sizes = flatten_for_host(carried or {}, device)
        flat = torch.cat([*(p.double() for p in parts), ours, theirs]).tolist()
        n_flags = len(flat) - ours.numel() - theirs.numel()
        end = n_flags + ours.numel()
        if carried is not None:
            self._monitor.receive_metrics(optimizer, split_host(carried, flat[end:], their_sizes))
        return [f != 0.0 for f in flat[:n_flags]], dict(zip(own, flat[n_flags:end]))

    def _monitor_metrics(self, optimizer: Any, trainer: Any) -> dict[str, Tensor] | None:
        """The monitor's metrics of this step when they can travel in the flag read."""
        if self._monitor is None or not trainer.is_global_zero:
            return None
        return self._monitor.metrics_to_carry(optimizer)

    def _values_before_apply(
        self, state: _ClipState, plan: ClipPlan, total: Tensor, skip: Tensor
    ) -> dict[str, Tensor] | None:
        """The logged values before the flags are read, when the plan knows the clipped norm.

        The clipped norm then depends on the skip flag only, which is still on the device:
        both outcomes are computed and the flag picks one. ``None`` when the clipped norm
        needs a pass over the gradients after clipping (value clipping, sharded AGC).
        """
        applied = plan.clipped_norm(applied=True)
        kept = plan.clipped_norm(applied=False)
        if applied is None or kept is None:
            return None
        return self._values(state, plan, torch.where(skip, kept, applied), total)

    @staticmethod
    def _values(
        state: _ClipState, plan: ClipPlan, clipped: Tensor, total: Tensor
    ) -> dict[str, Tensor]:
        """The device scalars of one logging step: threshold, norms, coefficient."""
        threshold, coef = plan.threshold, plan.coef
        assert threshold is not None  # set by decide
        values: dict[str, Tensor] = {
            "threshold": threshold.median() if threshold.dim() else threshold,
            "clipped": clipped,
            "raw": total,
        }
        if coef is not None:  # norm clipping; value clipping and AGC scale by no norm
            values["coef"] = coef.min() if coef.dim() else coef
            values["active"] = (coef < 1).double().mean() if coef.dim() else (coef < 1).double()
        if state.scaler_skips is not None:
            values["scaler_skips"] = state.scaler_skips
        return values

    def _emit(self, trainer: Any, state: _ClipState, index: int, host: dict[str, float]) -> None:
        """Log one step's values (on the host by now) and add them to the run's history."""
        suffix = "" if index == 0 else f"_opt{index}"
        has_coef = "coef" in host
        metrics = {
            f"clip/threshold{suffix}": host["threshold"],
            # The step being logged is skipped (or not) only after this hook: count it now.
            f"clip/skipped_steps{suffix}": float(
                self._own_skips + bool(state.skip_flag) + host.get("scaler_skips", 0.0)
            ),
            f"grad_norm/total_clipped{suffix}": host["clipped"],
        }
        if has_coef:
            metrics[f"clip/coef{suffix}"] = host["coef"]
            metrics[f"clip/active{suffix}"] = host["active"]
        metrics = {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
        step = int(trainer.global_step)
        series = {name: host[name] for name in ("threshold", "raw", "clipped")}
        if has_coef:
            series.update(coef=host["coef"], active=host["active"])
        run_record(trainer).history.add(f"clip{suffix}", step, series)
        log_to_loggers(trainer, metrics, step=step)

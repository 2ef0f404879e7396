"""``GradNormMonitor``: per-layer gradient norms, parameter norms and update ratios.

Example:
    >>> import pytorch_lightning as pl
    >>> from lightning_gradguard import GradNormMonitor
    >>> trainer = pl.Trainer(callbacks=[GradNormMonitor(log_every_n_steps=10)], logger=False)
"""

from __future__ import annotations

import copy
import functools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor
from typing_extensions import override

from lightning_gradguard._checks import check_bool, check_int, check_number
from lightning_gradguard._compat import Callback, rank_zero_warn
from lightning_gradguard.callbacks._trainer import (
    log_interval,
    optimizer_index,
    optimizer_parameters,
    overrides,
)
from lightning_gradguard.functional.health import GradientHealth
from lightning_gradguard.functional.norms import (
    TINY_NORM,
    GroupBy,
    GroupedNorms,
    NormGrouping,
    ParameterSnapshot,
    grad_norms,
    local_tensors,
    param_norms,
    parse_norm_type,
    validate_group_by,
)
from lightning_gradguard.loggers import log_to_loggers, to_host
from lightning_gradguard.record import run_record

if TYPE_CHECKING:
    import pytorch_lightning as pl

__all__ = [
    "REMEDIES_EXPLODING",
    "REMEDIES_VANISHING",
    "GradNormMonitor",
]

REMEDIES_VANISHING = (
    "Classic remedies: He (Kaiming) initialization for ReLU layers or Glorot (Xavier) for "
    "tanh, ReLU/LeakyReLU instead of sigmoid, skip connections, BatchNorm or LayerNorm "
    "between layers, or a higher learning rate for the affected layers."
)
REMEDIES_EXPLODING = (
    "Classic remedies: clip by norm (keeps the direction, e.g. Trainer(gradient_clip_val=1.0) "
    "or lightning_gradguard's adaptive clipping), a lower learning rate or a warm-up, a smaller "
    "initialization (He/Glorot), normalization layers."
)


def _agree_on_nonfinite(norms: GroupedNorms) -> GroupedNorms:
    """Make a layer non-finite on every rank when it is non-finite on one (DDP).

    DDP all-reduces the gradients before the monitor sees them, so the ranks agree,
    except after a fault that happens on one rank after the reduction. Then that
    rank's NaN must not be hidden from rank zero, which logs and warns: one
    collective of one flag per layer, on the device.
    """
    bad = (~torch.isfinite(norms.groups)).to(torch.int32)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    flagged = bad.bool()
    nan = torch.full_like(norms.groups, math.nan)
    groups = torch.where(flagged, nan, norms.groups)
    total = torch.where(flagged.any(), torch.full_like(norms.total, math.nan), norms.total)
    return GroupedNorms(groups, total, norms.norm_type, norms.measured)


@dataclass
class _OptimizerView:
    """What the monitor keeps per optimizer: its grouping and health state."""

    grouping: NormGrouping
    health: GradientHealth
    steps_seen: int = 0
    warned_vanishing: set[str] = field(default_factory=set)
    warned_explosions: int = 0
    warned_nonfinite: bool = False
    last_norms: GroupedNorms | None = None
    pending: dict[str, Tensor] | None = None
    arrived: dict[str, list[float]] | None = None  # pending values another part moved already
    snapshot: ParameterSnapshot | None = None
    snapshot_norms: Tensor | None = None
    sharded: bool = False
    replicated: bool = False  # DDP: every rank holds the full (all-reduced) gradients
    step_for_log: int = 0
    suffix: str = ""


class GradNormMonitor(Callback):
    """Log per-layer gradient norms and warn about vanishing and exploding gradients.

    It runs in ``on_before_optimizer_step``: the gradients it sees are unscaled
    (AMP), accumulated over ``accumulate_grad_batches`` and reduced across ranks,
    and *not yet clipped*. When clipping is configured it also logs
    ``grad_norm/total_clipped``, measured right after the optimizer step.

    Keys (``<layer>`` is the owning module's dotted path):

    - ``grad_norm/total`` and ``grad_norm/<layer>`` (every logging step),
    - ``param_norm/<layer>`` (on logging steps at least ``param_norm_every_n_steps``
      optimizer steps apart) and ``update_ratio/<layer>``
      (‖Δθ‖ / ‖θ‖ of that step, on logging steps at least ``update_ratio_every_n_steps``
      optimizer steps apart),
    - ``grad_norm/total_clipped`` when Lightning clips (``gradient_clip_val`` or an
      overridden ``configure_gradient_clipping``; ``AdaptiveGradClip`` logs it itself),
    - ``grad_norm/nonfinite_steps``, the number of steps with a non-finite gradient.

    With more than ``max_layers_logged`` layers, per-layer keys are replaced by
    ``<prefix>/layers_min``, ``/layers_median``, ``/layers_max`` and the
    ``extreme_layers`` smallest and largest layers by name. With several
    optimizers, the totals and counts of optimizer ``i > 0`` carry a suffix:
    ``grad_norm/total_opt<i>``, ``grad_norm/nonfinite_steps_opt<i>``.

    Norms are computed every step with device operations only; they are moved to
    the host once per logging step, and the detection warnings are raised then.
    Between logging steps the detection only stores each step's norms on the device
    and works them out at the next logging step (or when another part reads it).

    Args:
        log_every_n_steps: logging interval in optimizer steps; ``None`` uses the
            Trainer's ``log_every_n_steps``.
        group_by: ``"module"``, ``"parameter"``, ``"depth"`` or a callable
            ``parameter name -> group name or None``.
        depth: path components kept with ``group_by="depth"``.
        include: glob patterns of parameter names to measure (default: all).
        exclude: glob patterns of parameter names to leave out.
        norm_type: 2.0 (L2), any positive order, or ``"inf"``.
        log_param_norms: also log ``param_norm/<layer>``.
        log_update_ratio: also log ``update_ratio/<layer>``.
        update_ratio_every_n_steps: update ratios are computed on logging steps at
            least this many optimizer steps apart (the first included): every logging
            step with the Trainer's default interval of 50, every 10th step when
            logging every step. They need a temporary copy of the parameters and two
            more passes over them, the most expensive thing the monitor does: with
            ``log_every_n_steps=1`` the default 10 keeps the monitor within a few
            percent of the bare step.
        param_norm_every_n_steps: parameter norms move slowly and cost one more pass
            over the weights, so they are computed on logging steps at least this
            many optimizer steps apart: every logging step with the Trainer's
            default interval of 50, every 10th step when logging every step.
            Set it to 1 for parameter norms on every logging step.
        max_layers_logged: above this many layers, log summaries instead.
        extreme_layers: how many smallest and largest layers a summary names.
        detect: run vanishing / exploding / non-finite detection.
        vanishing_threshold: a layer's gradient norm below this is vanishing.
        explosion_factor: a global norm above this factor times its running level
            is exploding.
        patience: consecutive steps a condition must hold before a warning.
        warmup_steps: steps before explosion checks start.

    Example:
        >>> monitor = GradNormMonitor(log_every_n_steps=25, group_by="depth", depth=2)
        >>> monitor.state_key.startswith("GradNormMonitor{'group_by': 'depth', 'depth': 2")
        True
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        group_by: GroupBy = "module",
        depth: int | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        norm_type: float | str = 2.0,
        log_param_norms: bool = True,
        log_update_ratio: bool = True,
        update_ratio_every_n_steps: int = 10,
        param_norm_every_n_steps: int = 10,
        max_layers_logged: int = 64,
        extreme_layers: int = 3,
        detect: bool = True,
        vanishing_threshold: float = 1e-7,
        explosion_factor: float = 10.0,
        patience: int = 10,
        warmup_steps: int = 20,
    ) -> None:
        owner = "GradNormMonitor"
        self.log_every_n_steps = check_int(
            log_every_n_steps, "log_every_n_steps", owner, low=1, allow_none=True
        )
        validate_group_by(group_by, depth)
        # Validates include/exclude now rather than at the first training step.
        NormGrouping.from_named_parameters([], group_by, depth, include, exclude)
        self.group_by, self.depth = group_by, depth
        self.include = None if include is None else list(include)
        self.exclude = None if exclude is None else list(exclude)
        self.norm_type = parse_norm_type(norm_type)
        self.log_param_norms = check_bool(log_param_norms, "log_param_norms", owner)
        self.log_update_ratio = check_bool(log_update_ratio, "log_update_ratio", owner)
        self.update_ratio_every_n_steps = check_int(
            update_ratio_every_n_steps, "update_ratio_every_n_steps", owner, low=1
        )
        self.param_norm_every_n_steps = check_int(
            param_norm_every_n_steps, "param_norm_every_n_steps", owner, low=1
        )
        self.max_layers_logged = check_int(max_layers_logged, "max_layers_logged", owner, low=1)
        self.extreme_layers = check_int(extreme_layers, "extreme_layers", owner, low=0)
        self.detect = check_bool(detect, "detect", owner)
        self.vanishing_threshold = check_number(
            vanishing_threshold, "vanishing_threshold", owner, low=0, low_open=True
        )
        self.explosion_factor = check_number(
            explosion_factor, "explosion_factor", owner, low=1, low_open=True
        )
        self.patience = check_int(patience, "patience", owner, low=1)
        self.warmup_steps = check_int(warmup_steps, "warmup_steps", owner, low=0)
        self._views: dict[int, _OptimizerView] = {}
        self._loaded_state: dict[str, Any] = {}
        self._hook_handles: list[Any] = []
        self._clipping_configured = False

    # ------------------------------------------------------------------ identity / state

    @functools.cached_property  # Lightning reads it at every hook call: compute it once
    def state_key(self) -> str:
        group_by = (
            self.group_by
            if isinstance(self.group_by, str)
            else getattr(self.group_by, "__qualname__", "callable")
        )
        return self._generate_state_key(
            group_by=group_by,
            depth=self.depth,
            include=self.include,
            exclude=self.exclude,
            norm_type=self.norm_type,
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        """Detection state per optimizer, as CPU tensors and Python primitives."""
        state: dict[str, Any] = {}
        for index, view in self._views.items():
            state[f"optimizer_{index}"] = {
                "layers": list(view.grouping.names),
                "steps_seen": view.steps_seen,
                "health": view.health.state_dict(),
                "warned_vanishing": sorted(view.warned_vanishing),
                "warned_explosions": view.warned_explosions,
                "warned_nonfinite": view.warned_nonfinite,
            }
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; applied when each optimizer is first seen."""
        self._loaded_state = dict(state_dict)
        for index, view in self._views.items():
            self._restore(index, view)

    def _restore(self, index: int, view: _OptimizerView) -> None:
        saved = self._loaded_state.pop(f"optimizer_{index}", None)
        if saved is None:
            return
        if list(saved["layers"]) != list(view.grouping.names):
            rank_zero_warn(
                f"GradNormMonitor: the checkpoint's layers for optimizer {index} differ from the "
                "model's; detection state starts afresh."
            )
            return
        view.steps_seen = int(saved["steps_seen"])
        view.health.load_state_dict(saved["health"])
        view.warned_vanishing = set(saved["warned_vanishing"])
        view.warned_explosions = int(saved["warned_explosions"])
        view.warned_nonfinite = bool(saved["warned_nonfinite"])

    # ------------------------------------------------------------------ lifecycle

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        run_record(trainer)  # in place before a checkpoint is restored
        self._interval = log_interval(trainer, self.log_every_n_steps)
        # Logging steps between two parameter-norm / update-ratio measurements (ceil division).
        self._param_norm_every = -(-self.param_norm_every_n_steps // self._interval)
        self._ratio_every = -(-self.update_ratio_every_n_steps // self._interval)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._views = {}
        run_record(trainer).thresholds["grad_norm"] = self.vanishing_threshold
        self._clipping_configured = self._detect_clipping(trainer, pl_module)
        self._remove_hooks()
        for index, optimizer in enumerate(trainer.optimizers):
            handle = optimizer.register_step_post_hook(self._make_post_step_hook(trainer, index))
            self._hook_handles.append(handle)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for view in self._views.values():
            self._flush(trainer, view)
        self._remove_hooks()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []

    @staticmethod
    def _detect_clipping(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        # lightning_gradguard's own clippers log grad_norm/total_clipped themselves.
        clip_val = getattr(trainer, "gradient_clip_val", None)
        return bool(clip_val) or overrides(pl_module, "configure_gradient_clipping")

    # ------------------------------------------------------------------ the step

    def _view(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> tuple[int, _OptimizerView]:
        index = optimizer_index(trainer, optimizer)
        view = self._views.get(index)
        if view is None:
            params = optimizer_parameters(optimizer)
            grouping = NormGrouping.from_named_parameters(
                pl_module.named_parameters(),
                self.group_by,
                self.depth,
                self.include,
                self.exclude,
                only=params,
            )
            device = params[0].device if params else torch.device("cpu")
            health = GradientHealth(
                len(grouping.names),
                vanishing_threshold=self.vanishing_threshold,
                explosion_factor=self.explosion_factor,
                patience=self.patience,
                warmup_steps=self.warmup_steps,
                device=device,
            )
            _, keys = local_tensors(list(grouping.parameters))
            sharded = any(key is not None for key in keys)
            distributed = dist.is_available() and dist.is_initialized()
            view = _OptimizerView(
                grouping=grouping,
                health=health,
                suffix=f"_opt{index}" if index else "",
                sharded=sharded,
                replicated=not sharded and distributed and dist.get_world_size() > 1,
            )
            if grouping.left_out:
                rank_zero_warn(
                    f"GradNormMonitor: optimizer {index}: not measured (no norm exists for "
                    f"them): {grouping.describe_left_out()}. The other parameters are."
                )
            self._views[index] = view
            self._restore(index, view)
        return index, view

    def vanishing_layers(self) -> list[str]:
        """Layers whose gradients vanished (for ``patience`` steps in a row), every optimizer.

        It reads the detection flags from the device: one host read, so call it on
        a few steps, not every step. Empty with ``detect=False``.
        """
        names: list[str] = []
        for view in self._views.values():
            flags = view.health.vanishing.tolist()
            names += [n for n, flag in zip(view.grouping.names, flags) if flag and n not in names]
        return names

    @torch.no_grad()
    def restart_vanishing(self, layers: Sequence[str]) -> None:
        """Forget the vanishing streak of ``layers`` (after a remedy such as a re-init).

        Example:
            >>> monitor = GradNormMonitor()
            >>> monitor.restart_vanishing(["net.0"])  # no layer seen yet: nothing to do
            >>> monitor.vanishing_layers()
            []
        """
        for view in self._views.values():
            for name in layers:
                if name in view.grouping.names:
                    g = view.grouping.names.index(name)
                    view.health.vanishing[g] = False
                    view.health.vanish_streak[g] = 0

    def detection_snapshot(self) -> dict[str, Any]:
        """Device copies of the detection state, per optimizer (for a rollback).

        Copies, not ``state_dict()``: taking them moves nothing to the host.

        Example:
            >>> GradNormMonitor().detection_snapshot()  # no optimizer seen yet
            {}
        """
        return {
            f"monitor_health_{i}": copy.deepcopy(view.health) for i, view in self._views.items()
        }

    def restore_detection(self, saved: dict[str, Any]) -> None:
        """Put back :meth:`detection_snapshot` output, or its ``state_dict()`` form.

        Optimizers not in ``saved`` keep their state.
        """
        for index, view in self._views.items():
            health = saved.get(f"monitor_health_{index}")
            if health is not None:
                plain = health if isinstance(health, dict) else health.state_dict()
                view.health.load_state_dict(copy.deepcopy(plain))

    def norms_for(self, optimizer: Any) -> tuple[NormGrouping, GroupedNorms] | None:
        """The grouping and norms computed for ``optimizer`` at the current step.

        Other callbacks that run after this one in the same hook (a clipper) reuse
        them instead of a second pass over the gradients.
        """
        for index, opt in enumerate(getattr(self, "_optimizers", [])):
            view = self._views.get(index)
            if opt is optimizer and view is not None and view.last_norms is not None:
                return view.grouping, view.last_norms
        return None

    def metrics_to_carry(self, optimizer: Any) -> dict[str, Tensor] | None:
        """The device metrics of ``optimizer``'s logging step, for a part that reads anyway.

        A clipper that reads its skip flags to the host after this hook takes these
        along in the same transfer and hands them back with :meth:`receive_metrics`;
        the step then logs with one transfer instead of two. ``None`` when there is
        nothing to carry (not a logging step, not rank zero, or sharded gradients,
        whose logged norms may still be recomputed after the step).
        """
        index = self._index_of(optimizer)
        view = None if index is None else self._views.get(index)
        if view is None or view.pending is None or view.sharded or view.arrived is not None:
            return None
        return view.pending

    def receive_metrics(self, optimizer: Any, host: dict[str, list[float]]) -> None:
        """Take the values of :meth:`metrics_to_carry`, now on the host; they are logged at
        the step's flush with whatever was added after the optimizer step."""
        index = self._index_of(optimizer)
        view = None if index is None else self._views.get(index)
        if view is None or view.pending is None:
            return
        view.arrived = host
        view.pending = {k: v for k, v in view.pending.items() if k not in host}

    def _index_of(self, optimizer: Any) -> int | None:
        for index, opt in enumerate(getattr(self, "_optimizers", [])):
            if opt is optimizer:
                return index
        return None

    @override
    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self._optimizers = list(trainer.optimizers)
        _, view = self._view(trainer, pl_module, optimizer)
        if view.pending is not None:  # the previous step was skipped (e.g. by the AMP scaler)
            self._flush(trainer, view)
        norms = grad_norms(view.grouping, self.norm_type)
        if view.replicated:
            norms = _agree_on_nonfinite(norms)
        view.last_norms = norms
        logging_step = view.steps_seen % self._interval == 0
        if self.detect:  # read on logging steps: other steps only store their norms
            view.health.update(norms, defer=not logging_step)
        view.steps_seen += 1
        if not logging_step:
            return
        pending: dict[str, Tensor] = {
            f"grad_norm/total{view.suffix}": norms.total,
            "grad_norm/<layers>": norms.groups,
        }
        l2_param_norms: Tensor | None = None
        log_index = (view.steps_seen - 1) // self._interval
        if self.log_param_norms and log_index % self._param_norm_every == 0:
            pending["param_norm/<layers>"] = param_norms(view.grouping, self.norm_type).groups
            if self.norm_type == 2.0:
                l2_param_norms = pending["param_norm/<layers>"]
        if self.detect:
            pending.update({f"health/{k}": v for k, v in view.health.flags().items()})
        view.pending = pending
        view.step_for_log = int(trainer.global_step)
        if self.log_update_ratio and log_index % self._ratio_every == 0:
            view.snapshot = ParameterSnapshot.take(view.grouping)
            view.snapshot_norms = l2_param_norms

    def _make_post_step_hook(self, trainer: pl.Trainer, index: int) -> Any:
        def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
            view = self._views.get(index)
            if view is None or view.pending is None:
                return
            with torch.no_grad():
                if view.snapshot is not None:
                    view.pending["update_ratio/<layers>"] = view.snapshot.update_ratios(
                        view.grouping, before=view.snapshot_norms
                    )
                    view.snapshot = view.snapshot_norms = None
                if view.sharded:  # all ranks: the exact recompute is a collective
                    self._exact_tiny_norms_on_device(view, view.pending)
                if self._clipping_configured:
                    view.pending[f"grad_norm/total_clipped{view.suffix}"] = grad_norms(
                        view.grouping, self.norm_type
                    ).total
            self._flush(trainer, view)

        return hook

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # A logging step whose optimizer step did not run (AMP inf skip): log what we have.
        for view in self._views.values():
            if view.pending is not None:
                self._flush(trainer, view)

    # ------------------------------------------------------------------ host side

    def _flush(self, trainer: pl.Trainer, view: _OptimizerView) -> None:
        pending, view.pending, view.snapshot = view.pending, None, None
        arrived, view.arrived = view.arrived, None
        if pending is None or not trainer.is_global_zero:
            return
        host = to_host(pending)  # what another part did not carry (often nothing)
        if arrived is not None:
            host = {**arrived, **host}
        if not view.sharded:
            self._exact_tiny_norms_on_host(view, host)
        metrics: dict[str, float] = {}
        names = view.grouping.names
        for key, values in host.items():
            if key.startswith("health/"):
                continue
            if key.endswith("/<layers>"):
                metrics.update(self._layer_metrics(key.split("/")[0], names, values))
            else:
                metrics[key] = values[0]
        if self.detect:
            metrics[f"grad_norm/nonfinite_steps{view.suffix}"] = host["health/nonfinite_steps"][0]
            self._warn(trainer, view, host)
        # Every layer goes to the history (the pictures), also the ones left out of the logs.
        run_record(trainer).history.add(
            "grad_norm", view.step_for_log, dict(zip(names, host["grad_norm/<layers>"]))
        )
        log_to_loggers(trainer, metrics, step=view.step_for_log)

    # Norms are accumulated in float32 for speed; below TINY_NORM (vanishing gradients)
    # float32 squares underflow, so logged values there are recomputed in float64. That
    # costs a second pass (and, unsharded, a second small transfer) only when it happens.

    def _exact_tiny_norms_on_host(self, view: _OptimizerView, host: dict[str, list[float]]) -> None:
        key = "grad_norm/<layers>"
        tiny = [i for i, v in enumerate(host.get(key, [])) if abs(v) < TINY_NORM]
        if not tiny:
            return
        exact = grad_norms(view.grouping, self.norm_type, exact=True)
        groups, total = to_host({"groups": exact.groups, "total": exact.total}).values()
        for i in tiny:
            host[key][i] = groups[i]
        total_key = f"grad_norm/total{view.suffix}"
        if abs(host[total_key][0]) < TINY_NORM:
            host[total_key] = total

    def _exact_tiny_norms_on_device(self, view: _OptimizerView, pending: dict[str, Tensor]) -> None:
        groups = pending["grad_norm/<layers>"]
        if not bool((groups.abs() < TINY_NORM).any()):  # one read, logging steps under FSDP only
            return
        exact = grad_norms(view.grouping, self.norm_type, exact=True)
        pending["grad_norm/<layers>"] = torch.where(groups.abs() < TINY_NORM, exact.groups, groups)
        total_key = f"grad_norm/total{view.suffix}"
        total = pending[total_key]
        pending[total_key] = torch.where(total.abs() < TINY_NORM, exact.total, total)

    def _layer_metrics(
        self, prefix: str, names: Sequence[str], values: list[float]
    ) -> dict[str, float]:
        if len(names) <= self.max_layers_logged:
            return {f"{prefix}/{name}": value for name, value in zip(names, values)}
        finite = [v for v in values if math.isfinite(v)]
        metrics: dict[str, float] = {}
        if finite:
            metrics[f"{prefix}/layers_min"] = min(finite)
            metrics[f"{prefix}/layers_median"] = statistics.median(finite)
            metrics[f"{prefix}/layers_max"] = max(finite)
        order = sorted(range(len(values)), key=lambda i: (math.isfinite(values[i]), values[i]))
        k = self.extreme_layers
        for i in order[:k] + order[len(order) - k :] if k else []:
            metrics[f"{prefix}/{names[i]}"] = values[i]
        return metrics

    def _warn(
        self, trainer: pl.Trainer, view: _OptimizerView, host: dict[str, list[float]]
    ) -> None:
        names = view.grouping.names
        vanishing = [
            n
            for n, flag in zip(names, host["health/vanishing"])
            if flag and n not in view.warned_vanishing
        ]
        if vanishing:
            view.warned_vanishing.update(vanishing)
            rank_zero_warn(
                f"GradNormMonitor: vanishing gradients in {len(vanishing)} layer(s): "
                f"{', '.join(vanishing)} "
                f"(L{self.norm_type:g} norm below {self.vanishing_threshold:g} for {self.patience} "
                f"consecutive steps). {REMEDIES_VANISHING}"
            )
            run_record(trainer).add(
                "vanishing",
                view.step_for_log,
                layers=vanishing,
                values={"threshold": self.vanishing_threshold},
                detail=f"norm < {self.vanishing_threshold:g}",
            )
        explosions = int(host["health/explosions"][0])
        if explosions > view.warned_explosions:
            view.warned_explosions = explosions
            rank_zero_warn(
                f"GradNormMonitor: exploding gradients: the global gradient norm stayed above "
                f"{self.explosion_factor:g}x its running level "
                f"({host['health/level'][0]:.3g}) for {self.patience} consecutive steps. "
                f"{REMEDIES_EXPLODING}"
            )
            level = host["health/level"][0]
            run_record(trainer).add(
                "exploding",
                view.step_for_log,
                values={"level": level, "norm": host[f"grad_norm/total{view.suffix}"][0]},
                detail=f"norm > {self.explosion_factor:g}x {level:.3g}",
            )
        nonfinite = int(host["health/nonfinite_steps"][0])
        if nonfinite and not view.warned_nonfinite:
            view.warned_nonfinite = True
            first = [n for n, flag in zip(names, host["health/first_nonfinite"]) if flag]
            shown = ", ".join(first[:5]) + (" ..." if len(first) > 5 else "")
            rank_zero_warn(
                f"GradNormMonitor: non-finite gradients (inf/NaN) in {nonfinite} step(s); at the "
                f"first one they appeared in: {shown}. {REMEDIES_EXPLODING}"
            )
            run_record(trainer).add(
                "nonfinite",
                view.step_for_log,
                layers=first,
                values={"steps": nonfinite},
                detail=f"{nonfinite} step(s) with inf/NaN gradients",
            )

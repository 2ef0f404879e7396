"""``SpikeRecovery``: roll back to the last good state on a loss spike, and go on.

Example:
    >>> import pytorch_lightning as pl
    >>> from lightning_gradguard import GradNormMonitor, SpikeRecovery
    >>> recovery = SpikeRecovery(every_n_steps=50, consecutive=2, cooldown_steps=20)
    >>> trainer = pl.Trainer(callbacks=[GradNormMonitor(), recovery], logger=False)
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_gradguard._checks import check_bool, check_choice, check_int, check_number
from lightning_gradguard._compat import Callback, rank_zero_warn
from lightning_gradguard.callbacks._parts import flat_callbacks
from lightning_gradguard.callbacks._trainer import is_deepspeed
from lightning_gradguard.functional.norms import NormGrouping, grad_norms
from lightning_gradguard.functional.optimizer_state import optimizer_parameters
from lightning_gradguard.functional.snapshot import StateSnapshot, _restore_into, live_state
from lightning_gradguard.functional.spikes import SPIKE_MODES, SPIKE_STATISTICS, RunningSpikeTest
from lightning_gradguard.loggers import log_to_loggers
from lightning_gradguard.record import run_record

if TYPE_CHECKING:
    import pytorch_lightning as pl


__all__ = [
    "SIGNALS",
    "STORAGES",
    "SpikeRecovery",
    "record_rollback",
]

SIGNALS = ("loss", "grad_norm", "nonfinite")
STORAGES = ("host", "disk")


def _check_signals(signals: Any) -> list[str]:
    if isinstance(signals, str) or not isinstance(signals, Sequence) or not signals:
        raise TypeError(
            f"SpikeRecovery(signals={signals!r}): signals must be a non-empty list of "
            f"{list(SIGNALS)}."
        )
    return [check_choice(signal, "signals", "SpikeRecovery", SIGNALS) for signal in signals]


def record_rollback(trainer: pl.Trainer, step: int, detail: str, values: dict[str, float]) -> None:
    """Write one rollback to the run record (events table row, alert, picture marker)."""
    run_record(trainer).add("rollback", step, values=values, detail=detail)


class _DiskSnapshot:
    """A snapshot written through the strategy's checkpoint IO (one file per rank and slot)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.step = -1
        self.extra: dict[str, Any] = {}
        self.nbytes = 0
        self._io: Any = None

    @property
    def taken(self) -> bool:
        return self.step >= 0

    def take(self, module: Any, optimizers: Sequence[Any], step: int) -> None:
        from lightning_gradguard.functional.snapshot import _optimizer_scalars

        tensors = {k: t.detach().cpu().clone() for k, t in live_state(module, optimizers)}
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        state = {"tensors": tensors, "scalars": _optimizer_scalars(optimizers)}
        self._io.save_checkpoint(state, str(self.path))
        self.step = int(step)

    def restore(self, module: Any, optimizers: Sequence[Any]) -> None:
        state = self._io.load_checkpoint(str(self.path), map_location="cpu")
        _restore_into(state["tensors"], state["scalars"], module, optimizers)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "path": str(self.path), "extra": self.extra}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.path = int(state["step"]), Path(state["path"])
        self.extra = state.get("extra", {})


class SpikeRecovery(Callback):
    """Keep a last-good snapshot; on a loss or gradient spike, roll back to it and go on.

    Every ``every_n_steps`` optimizer steps, while no spike is open, it copies the
    parameters, buffers, optimizer state, the GradScaler's state and the clip
    policy's and monitor's statistics to host memory (pinned, non-blocking copies
    on a GPU; under FSDP2 each rank its own shard), or through Lightning's
    checkpoint IO to disk with ``storage="disk"``. On every optimizer step it tests:

    - ``"loss"``: the training loss (the mean over accumulated micro-batches)
      against its running statistics, like Lightning's ``SpikeDetection``
      (``statistic="ratio"``: worse than the running mean of the last ``window``
      losses by ``rtol`` times that mean and by ``atol``) or as a z-score
      (``statistic="zscore"``, ``sigma``), after ``warmup`` steps;
    - ``"grad_norm"``: the global gradient norm against ``grad_factor`` times the
      clip policy's running level of the norm (``AdaptiveGradClip`` with ZClip's
      mean or EMA-ratio's EMA), or times the running mean of the last ``window``
      norms otherwise. The norm comes from the monitor's (or the clipper's) pass:
      no second pass;
    - ``"nonfinite"``: a loss that is inf or NaN.

    The ranks agree with one flag reduction; with an ``AdaptiveGradClip`` that
    skips steps the flag travels in the clipper's reduction and its one host read.
    After ``consecutive`` spiking steps in a row the snapshot is restored on every
    rank (bit-identical), the data loader goes on with new batches (the offending
    ones are skipped, their indices recorded), and, with ``cooldown_steps``, the
    learning rate is multiplied by ``cooldown_factor`` ramping linearly back to 1
    through the optimizer's param groups (the user's scheduler stays in charge).

    ``trainer.global_step`` is never rewound: it counts optimizer steps taken,
    rolled-back ones included, and so do the LR schedulers (their state is not part
    of the snapshot). After ``max_rollbacks`` in the run, or
    ``max_rollbacks_in_window`` within ``rollback_window`` steps, training stops
    with an error naming the steps, the signals and what was tried.

    Args:
        signals: which tests can trigger a rollback (subset of ``"loss"``,
            ``"grad_norm"``, ``"nonfinite"``).
        every_n_steps: optimizer steps between snapshots.
        min_age: a rollback goes to a snapshot at least this many steps old (two
            snapshots are then kept: the one rolled back to and a younger one ageing).
        consecutive: spiking steps in a row that trigger a rollback.
        statistic: ``"ratio"`` or ``"zscore"`` for the loss test.
        mode: ``"min"`` (a loss: higher is worse) or ``"max"``.
        window: recent losses (and norms) in the running statistics.
        warmup: steps recorded before the loss or norm test reports anything.
        atol: smallest absolute loss increase that is a spike (``None``: no test).
        rtol: smallest loss increase relative to the running mean that is a spike.
        sigma: standard deviations for ``statistic="zscore"``.
        grad_factor: a norm above this many times its typical level is a spike.
        cooldown_steps: steps of reduced learning rate after a rollback (0: none).
        cooldown_factor: the learning rate multiplier at the start of the cool-down.
        max_rollbacks: rollbacks allowed in the whole run.
        max_rollbacks_in_window: rollbacks allowed within ``rollback_window`` steps.
        rollback_window: the window, in optimizer steps, for ``max_rollbacks_in_window``.
        storage: ``"host"`` (memory) or ``"disk"`` (the strategy's checkpoint IO).
        snapshot_dir: folder for ``storage="disk"`` (default:
            ``<default_root_dir>/spike_snapshots``).
        checkpoint_snapshot: keep the host snapshot in the callback's checkpoint
            state, so that a resumed run rolls back exactly like an uninterrupted one.
    """

    def __init__(
        self,
        signals: Sequence[str] = SIGNALS,
        every_n_steps: int = 50,
        min_age: int = 0,
        consecutive: int = 1,
        statistic: str = "ratio",
        mode: str = "min",
        window: int = 50,
        warmup: int = 20,
        atol: float | None = None,
        rtol: float | None = 3.0,
        sigma: float = 6.0,
        grad_factor: float = 5.0,
        cooldown_steps: int = 0,
        cooldown_factor: float = 0.1,
        max_rollbacks: int = 10,
        max_rollbacks_in_window: int = 3,
        rollback_window: int = 1000,
        storage: str = "host",
        snapshot_dir: str | None = None,
        checkpoint_snapshot: bool = True,
    ) -> None:
        owner = "SpikeRecovery"
        self.signals = _check_signals(signals)
        self.statistic = check_choice(statistic, "statistic", owner, SPIKE_STATISTICS)
        self.mode = check_choice(mode, "mode", owner, SPIKE_MODES)
        self.storage = check_choice(storage, "storage", owner, STORAGES)
        self.every_n_steps = check_int(every_n_steps, "every_n_steps", owner, low=1)
        self.min_age = check_int(min_age, "min_age", owner, low=0)
        self.consecutive = check_int(consecutive, "consecutive", owner, low=1)
        self.window = check_int(window, "window", owner, low=2)
        self.warmup = check_int(warmup, "warmup", owner, low=1)
        self.atol = check_number(atol, "atol", owner, low=0, low_open=True, allow_none=True)
        self.rtol = check_number(rtol, "rtol", owner, low=0, low_open=True, allow_none=True)
        self.sigma = check_number(sigma, "sigma", owner, low=0, low_open=True)
        self.grad_factor = check_number(grad_factor, "grad_factor", owner, low=1, low_open=True)
        self.cooldown_steps = check_int(cooldown_steps, "cooldown_steps", owner, low=0)
        self.cooldown_factor = check_number(
            cooldown_factor, "cooldown_factor", owner, low=0, high=1, low_open=True
        )
        self.max_rollbacks = check_int(max_rollbacks, "max_rollbacks", owner, low=1)
        self.max_rollbacks_in_window = check_int(
            max_rollbacks_in_window, "max_rollbacks_in_window", owner, low=1
        )
        self.rollback_window = check_int(rollback_window, "rollback_window", owner, low=1)
        self.snapshot_dir = snapshot_dir
        self.checkpoint_snapshot = check_bool(checkpoint_snapshot, "checkpoint_snapshot", owner)
        self._loss_test = RunningSpikeTest(
            statistic, mode, window, warmup, self.atol, self.rtol, self.sigma
        )
        self._norm_test = RunningSpikeTest(
            "ratio", "min", window, warmup, None, self.grad_factor - 1
        )
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        """The state of a run (snapshots, streaks, hooks), empty."""
        self.rollbacks: list[dict[str, Any]] = []
        self._snapshots: list[Any] = []
        self._taken_at: list[int] = []  # the global step each snapshot's age counts from
        self._streak: list[list[str]] = []
        self._rollback_due: list[str] | None = None
        self._batches: list[list[int]] = []  # [global step, epoch, batch_idx] since the oldest
        self._cooldown_left = 0
        self._saved_lrs: list[list[Any]] | None = None
        self._loss_sum: Tensor | None = None
        self._pending: tuple[Tensor | None, Tensor | None] = (None, None)
        self._stepped = False
        self._via_clipper = False
        self._clipper: Any = None
        self._monitor: Any = None
        self._grouping: NormGrouping | None = None
        self._deferred: list[tuple[Any, Any]] = []
        self._trainer: Any = None
        self._loaded: dict[str, Any] | None = None
        self._last_nbytes = -1
        self._hooks: list[Any] = []

    # ------------------------------------------------------------------ identity / state

    @functools.cached_property  # Lightning reads it at every hook call: compute it once
    def state_key(self) -> str:
        return self._generate_state_key(signals=tuple(self.signals), storage=self.storage)

    @property
    def skipped_batches(self) -> int:
        """Batches whose updates were rolled back (and not replayed)."""
        return sum(len(r["batches"]) for r in self.rollbacks)

    @override
    def state_dict(self) -> dict[str, Any]:
        """Detection statistics, rollbacks and (host storage) the snapshots: plain values."""
        snapshots = []
        if self.checkpoint_snapshot or self.storage == "disk":
            for snapshot in self._snapshots:
                state = snapshot.state_dict()
                state["extra"] = _plain_extra(snapshot.extra)
                snapshots.append(state)
        return {
            "loss_test": self._loss_test.state_dict(),
            "norm_test": self._norm_test.state_dict(),
            "rollbacks": copy.deepcopy(self.rollbacks),
            "streak": [list(s) for s in self._streak],
            "batches": [list(b) for b in self._batches],
            "cooldown_left": self._cooldown_left,
            "snapshots": snapshots,
            "taken_at": list(self._taken_at) if snapshots else [],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self._loss_test.load_state_dict(state_dict.get("loss_test", {}))
        self._norm_test.load_state_dict(state_dict.get("norm_test", {}))
        self.rollbacks = copy.deepcopy(list(state_dict.get("rollbacks", [])))
        self._streak = [list(s) for s in state_dict.get("streak", [])]
        self._batches = [list(b) for b in state_dict.get("batches", [])]
        self._cooldown_left = int(state_dict.get("cooldown_left", 0))
        self._loaded = state_dict

    # ------------------------------------------------------------------ lifecycle

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        run_record(trainer)  # in place before a checkpoint is restored
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "SpikeRecovery needs automatic optimization: with manual optimization it cannot "
                "see where an optimizer step ends. Remove it, or use its pieces in your "
                "training_step: lightning_gradguard.functional.StateSnapshot (take/restore) and "
                "RunningSpikeTest (is_spike/record)."
            )
        if is_deepspeed(trainer):
            raise RuntimeError(
                "SpikeRecovery does not support DeepSpeed (DeepSpeed owns the optimizer state); "
                "use DDP or ModelParallelStrategy (FSDP2)."
            )
        self._trainer = trainer
        from lightning_gradguard.callbacks.adaptive_grad_clip import AdaptiveGradClip
        from lightning_gradguard.callbacks.grad_norm_monitor import GradNormMonitor

        callbacks = flat_callbacks(trainer)
        self._clipper = next((c for c in callbacks if isinstance(c, AdaptiveGradClip)), None)
        self._monitor = next((c for c in callbacks if isinstance(c, GradNormMonitor)), None)
        self._via_clipper = self._clipper is not None and self._clipper.reads_flags
        if self._via_clipper:
            self._clipper.add_flag_source(self)
        if self.consecutive > 1 and "save_checkpoint" not in vars(trainer):
            self._defer_checkpoints(trainer)

    def _defer_checkpoints(self, trainer: pl.Trainer) -> None:
        """A checkpoint due while a spike streak is open is written once it is decided."""
        original = trainer.save_checkpoint

        def save_checkpoint(*args: Any, **kwargs: Any) -> None:
            if self._streak:
                self._deferred.append((args, kwargs))
                return
            original(*args, **kwargs)

        trainer.save_checkpoint = save_checkpoint  # type: ignore[method-assign]

    def _flush_deferred(self, trainer: pl.Trainer) -> None:
        deferred, self._deferred = self._deferred, []
        for args, kwargs in deferred:
            trainer.save_checkpoint(*args, **kwargs)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            self._hooks.append(optimizer.register_step_post_hook(self._after_step))
        loaded, self._loaded = self._loaded, None
        if loaded and loaded.get("snapshots"):
            self._snapshots = []
            for state in loaded["snapshots"]:
                snapshot = self._new_snapshot(trainer, len(self._snapshots))
                snapshot.load_state_dict(state)
                self._snapshots.append(snapshot)
            self._taken_at = [int(t) for t in loaded["taken_at"]]
        elif not self._snapshots:
            self._take(trainer, pl_module)  # the starting state is the first good one

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._streak = []
        self._flush_deferred(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if "save_checkpoint" in vars(trainer):
            del trainer.save_checkpoint

    # ------------------------------------------------------------------ detection

    @override
    @torch.no_grad()
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        value = loss.detach().to(torch.float64)
        scaler = getattr(trainer.strategy.precision_plugin, "scaler", None)
        scale = getattr(scaler, "_scale", None)
        if isinstance(scale, Tensor):  # fp16 AMP hands the hook the scaled loss
            value = value / scale.to(value.device, torch.float64)
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value

    def spike_flag(self, optimizer: Any, total: Tensor | None, typical: Tensor | None) -> Tensor:
        """This rank's flags for the current step: [any, nonfinite, loss, grad_norm] (device).

        ``typical``: the clip policy's running level of the norm (NaN or ``None``:
        SpikeRecovery's own running mean of the last ``window`` norms is used).
        """
        loss, self._loss_sum = self._loss_sum, None
        device = total.device if total is not None else (loss.device if loss is not None else None)
        false = torch.zeros((), dtype=torch.bool, device=device)
        nonfinite = loss_spike = grad_spike = false
        if loss is not None:
            if "nonfinite" in self.signals:
                nonfinite = ~torch.isfinite(loss)
            if "loss" in self.signals:
                loss_spike = self._loss_test.is_spike(loss)
        if total is not None and "grad_norm" in self.signals:
            total = total.detach().to(torch.float64)
            own = self._norm_test.is_spike(total)
            if typical is not None:
                reference = typical.detach().to(torch.float64).reshape(())
                by_policy = total > self.grad_factor * reference
                grad_spike = torch.where(torch.isfinite(reference), by_policy, own)
            else:
                grad_spike = own
            grad_spike = grad_spike & torch.isfinite(total)
        self._pending = (loss, total)
        flags = torch.stack([nonfinite, loss_spike, grad_spike]).to(device)
        return torch.cat([flags.any().view(1), flags])

    def receive_flags(self, values: list[bool]) -> None:
        """The flags every rank agreed on (one host read): count the streak, keep statistics."""
        self._stepped = True
        spike = values[0]
        names = [name for name, flag in zip(("nonfinite", "loss", "grad_norm"), values[1:]) if flag]
        loss, total = self._pending
        self._pending = (None, None)
        if spike:
            self._streak.append(names)
            if len(self._streak) >= self.consecutive:
                self._rollback_due = sorted({n for step in self._streak for n in step})
            return
        self._streak = []
        keep = torch.ones((), dtype=torch.bool)
        if loss is not None:
            self._loss_test.record(loss, keep.to(loss.device))
        if total is not None:
            self._norm_test.record(total, keep.to(total.device))

    @override
    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self._cooldown_left > 0 and self._saved_lrs is None:
            self._start_cooldown_step(trainer)
        if self._via_clipper or optimizer is not trainer.optimizers[0]:
            return  # the clipper asks for the flags inside its own reduction and read
        total = None
        if "grad_norm" in self.signals:
            total = self._total_norm(trainer, pl_module, optimizer)
        flags = self.spike_flag(optimizer, total, self._clip_level())
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            as_int = flags.to(torch.int32)
            dist.all_reduce(as_int, op=dist.ReduceOp.MAX)  # the one collective: any rank
            flags = as_int.bool()
        self.receive_flags([bool(f) for f in flags.tolist()])  # the one host read

    def _clip_level(self) -> Tensor | None:
        return None if self._clipper is None else self._clipper.typical_norm(0)

    def _total_norm(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> Tensor:
        if self._monitor is not None:
            found = self._monitor.norms_for(optimizer)
            if found is not None:
                return found[1].total
        if self._grouping is None:
            params = optimizer_parameters(optimizer)
            self._grouping = NormGrouping.from_named_parameters(
                pl_module.named_parameters(), lambda name: "all", only=params
            )
        return grad_norms(self._grouping).total

    # ------------------------------------------------------------------ cool-down

    def _start_cooldown_step(self, trainer: pl.Trainer) -> None:
        done = self.cooldown_steps - self._cooldown_left
        factor = self.cooldown_factor + (1.0 - self.cooldown_factor) * done / self.cooldown_steps
        self._saved_lrs = []
        for optimizer in trainer.optimizers:
            self._saved_lrs.append([group["lr"] for group in optimizer.param_groups])
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * factor

    def _end_cooldown_step(self, trainer: pl.Trainer) -> None:
        if self._saved_lrs is None:
            return
        for optimizer, lrs in zip(trainer.optimizers, self._saved_lrs):
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = lr
        self._saved_lrs = None
        self._cooldown_left -= 1

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # Before Lightning steps the LR schedulers: they see the user's learning rate.
        if self._trainer is not None and optimizer is self._trainer.optimizers[-1]:
            self._end_cooldown_step(self._trainer)

    # ------------------------------------------------------------------ after the step

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batches.append([int(trainer.global_step), int(trainer.current_epoch), batch_idx])

    @override
    @torch.no_grad()
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._end_cooldown_step(trainer)  # the step was skipped: the post-step hook did not run
        if not self._stepped:
            return  # accumulating: snapshots and rollbacks only between optimizer steps
        self._stepped = False
        if self._rollback_due is not None:
            signals, self._rollback_due = self._rollback_due, None
            self._rollback(trainer, pl_module, signals)
        elif not self._streak and self._snapshot_due(trainer):
            self._take(trainer, pl_module)
        if not self._streak:
            self._flush_deferred(trainer)

    def _snapshot_due(self, trainer: pl.Trainer) -> bool:
        if not self._snapshots:
            return True
        step = int(trainer.global_step)
        if step - self._taken_at[-1] < self.every_n_steps:
            return False
        return self.min_age == 0 or step - self._taken_at[-1] >= self.min_age

    # ------------------------------------------------------------------ snapshots

    def _new_snapshot(self, trainer: pl.Trainer, slot: int) -> Any:
        if self.storage == "host":
            return StateSnapshot()
        default = os.path.join(trainer.default_root_dir, "spike_snapshots")
        folder = Path(self.snapshot_dir or default)
        folder.mkdir(parents=True, exist_ok=True)
        snapshot = _DiskSnapshot(folder / f"rank{trainer.global_rank}_slot{slot}.ckpt")
        snapshot._io = trainer.strategy.checkpoint_io
        return snapshot

    def _take(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = int(trainer.global_step)
        slots = 1 if self.min_age == 0 else 2
        if len(self._snapshots) < slots:
            snapshot = self._new_snapshot(trainer, len(self._snapshots))
            self._snapshots.append(snapshot)
            self._taken_at.append(step)
        else:  # reuse the oldest slot: the younger one is now old enough to roll back to
            snapshot = self._snapshots.pop(0)
            self._taken_at.pop(0)
            self._snapshots.append(snapshot)
            self._taken_at.append(step)
        if isinstance(snapshot, _DiskSnapshot):
            snapshot._io = trainer.strategy.checkpoint_io
        snapshot.take(pl_module, trainer.optimizers, step)
        snapshot.extra = self._part_states(trainer)
        oldest = int(self._snapshots[0].step)
        self._batches = [b for b in self._batches if b[0] >= oldest]
        if snapshot.nbytes != self._last_nbytes:
            self._last_nbytes = snapshot.nbytes
            megabytes = snapshot.nbytes * slots / 2**20
            rank_zero_info(
                f"SpikeRecovery: {slots} snapshot(s) of {snapshot.nbytes / 2**20:.2f} MB per rank "
                f"({'host memory' if self.storage == 'host' else 'disk'}; parameters, buffers "
                "and optimizer state)."
            )
            log_to_loggers(trainer, {"spike/snapshot_mb": megabytes}, step=step)

    def _part_states(self, trainer: pl.Trainer) -> dict[str, Any]:
        """Small device copies of the parts' statistics and the GradScaler's state."""
        extra: dict[str, Any] = {}
        scaler = getattr(trainer.strategy.precision_plugin, "scaler", None)
        if scaler is not None:
            extra["scaler"] = copy.deepcopy(scaler.state_dict())
        if self._clipper is not None:
            extra.update(self._clipper.policy_snapshot())
        if self._monitor is not None:
            extra.update(self._monitor.detection_snapshot())
        return extra

    def _restore_parts(self, trainer: pl.Trainer, extra: dict[str, Any]) -> None:
        scaler = getattr(trainer.strategy.precision_plugin, "scaler", None)
        if scaler is not None and "scaler" in extra:
            scaler.load_state_dict(copy.deepcopy(extra["scaler"]))
        if self._clipper is not None:
            self._clipper.restore_policies(extra)
        if self._monitor is not None:
            self._monitor.restore_detection(extra)

    # ------------------------------------------------------------------ rollback

    def _target(self, step: int) -> int:
        for position in range(len(self._snapshots) - 1, -1, -1):
            if step - self._taken_at[position] >= self.min_age:
                return position
        return 0

    def _rollback(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, signals: list[str]
    ) -> None:
        step = int(trainer.global_step)
        if not self._snapshots or not self._snapshots[0].taken:
            rank_zero_warn(f"SpikeRecovery: a spike at step {step - 1} but no snapshot yet.")
            self._streak = []
            return
        recent = [r for r in self.rollbacks if step - r["step"] <= self.rollback_window]
        if len(self.rollbacks) >= self.max_rollbacks or len(recent) >= self.max_rollbacks_in_window:
            raise RuntimeError(self._give_up_message(step, signals, recent))
        position = self._target(step)
        snapshot = self._snapshots[position]
        snapshot.restore(pl_module, trainer.optimizers)
        self._restore_parts(trainer, snapshot.extra)
        # Snapshots younger than the one restored may hold the spike's build-up: drop them.
        del self._snapshots[position + 1 :]
        self._taken_at = self._taken_at[: position + 1]
        self._taken_at[position] = step  # its age counts from now
        since = int(snapshot.step)
        batches = [b for b in self._batches if b[0] >= since]
        self._batches = []
        self._streak = []
        self._cooldown_left = self.cooldown_steps
        first = batches[0][0] if batches else since  # later than `since` after a rollback
        rollback: dict[str, Any] = {
            "step": step,
            "to_step": since,
            "signals": list(signals),
            "batches": [b[1:] for b in batches],
        }
        self.rollbacks.append(rollback)
        shown = ", ".join(f"{b[1]}:{b[2]}" for b in batches[:8])
        more = " ..." if len(batches) > 8 else ""
        detail = (
            f"rolled back the updates of steps {first}-{step - 1} ({', '.join(signals)}) to "
            f"the state of step {since}; "
            f"skipped {len(batches)} batch(es) (epoch:batch {shown}{more})"
        )
        rank_zero_warn(f"SpikeRecovery: {detail}.")
        values = {"to_step": float(since), "batches": float(len(batches))}
        record_rollback(trainer, step - 1, detail, values)
        log_to_loggers(
            trainer,
            {
                "spike/rollbacks": float(len(self.rollbacks)),
                "spike/skipped_batches": float(self.skipped_batches),
            },
            step=step,
        )

    def _give_up_message(self, step: int, signals: list[str], recent: list[Any]) -> str:
        history = "; ".join(
            f"step {r['step'] - 1} ({', '.join(r['signals'])}) -> state of step {r['to_step']}"
            for r in self.rollbacks
        )
        limit = (
            f"max_rollbacks={self.max_rollbacks}"
            if len(self.rollbacks) >= self.max_rollbacks
            else f"max_rollbacks_in_window={self.max_rollbacks_in_window} within "
            f"{self.rollback_window} steps ({len(recent)} recent)"
        )
        cooldown = (
            f" with a learning-rate cool-down (x{self.cooldown_factor:g} over "
            f"{self.cooldown_steps} steps)"
            if self.cooldown_steps
            else " without a learning-rate cool-down (cooldown_steps=0)"
        )
        return (
            f"SpikeRecovery: another spike at step {step - 1} ({', '.join(signals)}) after "
            f"{len(self.rollbacks)} rollback(s): {history}. Tried: rolling back to the last good "
            f"snapshot and skipping the batches since{cooldown}. The limit {limit} is reached, so "
            "training stops rather than loop. Lower the learning rate, inspect the skipped "
            "batches, set cooldown_steps, or raise the limits."
        )


def _plain_extra(extra: dict[str, Any]) -> dict[str, Any]:
    """The parts' states as plain values (for a checkpoint)."""
    plain: dict[str, Any] = {}
    for key, value in extra.items():
        if isinstance(value, Tensor):
            plain[key] = value.detach().cpu().clone()
        elif isinstance(value, dict):
            plain[key] = value
        else:
            plain[key] = value.state_dict()
    return plain

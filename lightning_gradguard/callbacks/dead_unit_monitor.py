"""``DeadUnitMonitor``: measure dead / dormant ReLU units and rescue them with LeakyReLU.

Example:
    >>> import pytorch_lightning as pl
    >>> from lightning_gradguard import DeadUnitMonitor
    >>> monitor = DeadUnitMonitor(every_n_steps=100, window=10, rescue="threshold")
    >>> trainer = pl.Trainer(callbacks=[monitor], logger=False)
"""

from __future__ import annotations

import functools
import math
from typing import Any

from torch import nn

from lightning_gradguard._compat import Callback, rank_zero_warn
from lightning_gradguard.functional.activity import (
    DEFAULT_ACTIVATIONS,
    ActivityTracker,
    MeasuringWindows,
)
from lightning_gradguard.functional.norms import clean_parameter_name
from lightning_gradguard.functional.surgery import swap_activations
from lightning_gradguard.logging import log_to_loggers
from lightning_gradguard.record import RunRecord, run_record

RESCUE_MODES = ("never", "start", "threshold")


def _activation_types(names: list[str] | None) -> tuple[type[nn.Module], ...]:
    if names is None:
        return DEFAULT_ACTIVATIONS
    known = {t.__name__: t for t in DEFAULT_ACTIVATIONS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"activations={names!r}: {unknown} are not activation module names; "
            f"choose from {sorted(known)}."
        )
    return tuple(known[n] for n in names)


class DeadUnitMonitor(Callback):
    """Log the fraction of dead (and dormant) units per activation layer; optionally rescue.

    Every ``every_n_steps`` optimizer steps, forward hooks are attached to the
    activation modules for ``window`` training batches, then removed: outside a
    window training runs with no hooks at all. A unit is dead when its output
    was never positive in the window, dormant when its ReDo score (mean |h| over
    the layer's average) is at most ``dormant_tau``. The statistics are summed
    across ranks before anything is decided, so a unit alive on one rank's data
    is not dead, and every rank takes the same decision at the same step.

    Keys: ``dead_units/<layer>`` and ``dormant_units/<layer>``, where ``<layer>``
    is the activation module's dotted path.

    Rescue (``rescue``): ``"never"`` (monitor only), ``"start"`` (swap every ReLU
    for LeakyReLU before the first step), ``"threshold"`` (swap the ReLUs of layers
    whose dead fraction exceeds ``dead_threshold`` at the end of a window).
    Swapped layer names are part of the callback's state and re-applied on resume
    before the first step: LeakyReLU has no parameters, so the model's own
    ``state_dict`` cannot remember the swap. A ``torch.compile``-d model recompiles
    after a swap (once). Swaps and dying layers are events of the run record
    (:func:`~lightning_gradguard.record.run_record`); ``events`` lists the swaps.

    Args:
        every_n_steps: start a measuring window every this many optimizer steps.
        window: training batches per window.
        rescue: ``"never"``, ``"start"`` or ``"threshold"``.
        dead_threshold: dead fraction above which a layer is rescued.
        dormant_tau: dormancy threshold for ``dormant_units/<layer>``.
        negative_slope: LeakyReLU's slope.
        activations: activation class names to track (default: ReLU and relatives);
            only ``ReLU`` modules are ever swapped.
        layout: which dimension holds units, see
            :func:`lightning_gradguard.functional.unit_dim`.
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        window: int = 10,
        rescue: str = "never",
        dead_threshold: float = 0.5,
        dormant_tau: float = 0.025,
        negative_slope: float = 0.01,
        activations: list[str] | None = None,
        layout: str = "auto",
    ) -> None:
        for name, value in (("every_n_steps", every_n_steps), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        if window > every_n_steps:
            raise ValueError(f"window={window} must not exceed every_n_steps={every_n_steps}.")
        if rescue not in RESCUE_MODES:
            raise ValueError(
                f"rescue={rescue!r} is not a rescue mode: use one of {list(RESCUE_MODES)}."
            )
        for argument, fraction in (
            ("dead_threshold", dead_threshold),
            ("negative_slope", negative_slope),
        ):
            ok = isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
            if not ok or not 0 < fraction < 1:
                raise ValueError(f"{argument}={fraction!r} must be a number in (0, 1).")
        if (
            isinstance(dormant_tau, bool)
            or not isinstance(dormant_tau, (int, float))
            or not 0 <= dormant_tau < math.inf
        ):
            raise ValueError(
                f"DeadUnitMonitor(dormant_tau={dormant_tau!r}): dormant_tau must be a "
                "non-negative finite number."
            )
        if layout not in ("auto", "channels_first", "channels_last"):
            raise ValueError(
                f"layout={layout!r} is not a unit layout: use 'auto', 'channels_first' or "
                "'channels_last'."
            )
        self.every_n_steps = every_n_steps
        self.window = window
        self.rescue = rescue
        self.dead_threshold = float(dead_threshold)
        self.dormant_tau = float(dormant_tau)
        self.negative_slope = float(negative_slope)
        self.activations = None if activations is None else list(activations)
        self._types = _activation_types(self.activations)
        self.layout = layout
        self.swapped: list[str] = []
        self._record: RunRecord | None = None
        self.last_stats: dict[str, dict[str, float]] = {}
        self._tracker: ActivityTracker | None = None
        self._windows = MeasuringWindows(every_n_steps, window)
        self._reported_dying: set[str] = set()

    @functools.cached_property  # Lightning reads it at every hook call: compute it once
    def state_key(self) -> str:
        return self._generate_state_key(rescue=self.rescue, activations=self.activations)

    def state_dict(self) -> dict[str, Any]:
        """Swapped layers and the measuring window: Python primitives only."""
        return {
            "swapped": list(self.swapped),
            "window_started_at": self._windows.started_at,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore; the swaps are re-applied to the model before the first step."""
        self.swapped = list(state_dict.get("swapped", []))
        self._windows.started_at = int(state_dict.get("window_started_at", -1))

    @property
    def events(self) -> list[dict[str, Any]]:
        """The swaps of the current run (step, kind, layer, detail), from the run record."""
        if self._record is None:
            return []
        return [event.row() for event in self._record.events_of("swap")]

    # ------------------------------------------------------------------ lifecycle

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            # A second fit with the same callback starts afresh: the first run's swaps are
            # not re-applied to another model. A resumed fit gets them from
            # load_state_dict, which Lightning calls after setup.
            self.swapped, self.last_stats = [], {}
            self._reported_dying = set()
            self._windows = MeasuringWindows(self.every_n_steps, self.window)
        self._record = run_record(trainer)  # in place before a checkpoint is restored

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._record = run_record(trainer)
        self._record.thresholds["dead_units"] = self.dead_threshold
        wrapped = "DDP" in type(trainer.strategy).__name__
        pending = [
            name for name in self.swapped if isinstance(pl_module.get_submodule(name), nn.ReLU)
        ]
        if pending:  # resumed after a swap: the model must compute what it computed then
            swap_activations(
                pl_module,
                pending,
                to="leaky_relu",
                negative_slope=self.negative_slope,
                wrapped=wrapped,
            )
        if self.rescue == "start":
            names = [n for n, m in pl_module.named_modules() if n and isinstance(m, nn.ReLU)]
            if names:
                swap_activations(
                    pl_module,
                    names,
                    to="leaky_relu",
                    negative_slope=self.negative_slope,
                    wrapped=wrapped,
                )
                self._record_swaps(trainer, names, "rescue at start")
        self._build_tracker(pl_module)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self._tracker is not None:
            self._tracker.detach()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._tracker is not None:
            self._tracker.detach()

    def _build_tracker(self, pl_module: Any) -> None:
        if self._tracker is not None:
            self._tracker.detach()
        self._tracker = ActivityTracker.for_module(pl_module, self._types, self.layout)
        if not self._tracker.modules:
            rank_zero_warn(
                f"DeadUnitMonitor: {type(pl_module).__name__} has no activation module of "
                f"{[t.__name__ for t in self._types]}; nothing to measure. If forward calls "
                "F.relu, lightning_gradguard.functional.swap_functional_relu can rewrite it."
            )

    # ------------------------------------------------------------------ windows

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._tracker is not None:
            self._windows.maybe_open(int(trainer.global_step), self._tracker)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        tracker = self._tracker
        if tracker is None or not self._windows.maybe_close(tracker):
            return
        stats = tracker.stats()
        self.last_stats = {
            name: {"dead": s.dead_fraction, "dormant": s.dormant_fraction(self.dormant_tau)}
            for name, s in stats.items()
        }
        metrics: dict[str, float] = {}
        step = int(trainer.global_step)
        record = run_record(trainer)
        dead: dict[str, float] = {}
        dormant: dict[str, float] = {}
        for name, values in self.last_stats.items():
            layer = clean_parameter_name(name + ".x")[:-2]
            metrics[f"dead_units/{layer}"] = dead[layer] = values["dead"]
            metrics[f"dormant_units/{layer}"] = dormant[layer] = values["dormant"]
        record.history.add("dead_units", step, dead)
        record.history.add("dormant_units", step, dormant)
        if trainer.is_global_zero:
            log_to_loggers(trainer, metrics, step=step)
        for name, values in self.last_stats.items():
            if values["dead"] > self.dead_threshold and name not in self._reported_dying:
                self._reported_dying.add(name)
                record.add(
                    "dying",
                    step,
                    layers=[name],
                    values={"dead": values["dead"]},
                    detail=f"{values['dead']:.0%} of units dead",
                )
        if self.rescue == "threshold":
            dying = [
                name
                for name, values in self.last_stats.items()
                if values["dead"] > self.dead_threshold
                and isinstance(pl_module.get_submodule(name), nn.ReLU)
            ]
            if dying:
                wrapped = "DDP" in type(trainer.strategy).__name__
                swap_activations(
                    pl_module,
                    dying,
                    to="leaky_relu",
                    negative_slope=self.negative_slope,
                    wrapped=wrapped,
                )
                self._record_swaps(trainer, dying, "dead fraction above threshold")
                self._build_tracker(pl_module)

    def _record_swaps(self, trainer: Any, names: list[str], reason: str) -> None:
        step = int(trainer.global_step)
        record = run_record(trainer)
        for name in names:
            if name not in self.swapped:
                self.swapped.append(name)
            dead = self.last_stats.get(name, {}).get("dead")
            detail = f"ReLU -> LeakyReLU({self.negative_slope:g}), {reason}"
            if dead is not None:
                detail += f", {dead:.0%} dead"
            values = {} if dead is None else {"dead": dead}
            record.add("swap", step, layers=[name], values=values, detail=detail)
        rank_zero_warn(
            f"DeadUnitMonitor: swapped ReLU for LeakyReLU({self.negative_slope:g}) in "
            f"{', '.join(names)} at step {step} ({reason})."
        )

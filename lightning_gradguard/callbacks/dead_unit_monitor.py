"""``DeadUnitMonitor``: measure dead / dormant ReLU units and rescue them with LeakyReLU.

Example:
    >>> import pytorch_lightning as pl
    >>> from lightning_gradguard import DeadUnitMonitor
    >>> monitor = DeadUnitMonitor(every_n_steps=100, window=10, rescue="threshold")
    >>> trainer = pl.Trainer(callbacks=[monitor], logger=False)
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn
from typing_extensions import override

from lightning_gradguard._checks import check_choice, check_int, check_names, check_number
from lightning_gradguard._compat import rank_zero_warn
from lightning_gradguard.callbacks._trainer import strategy_kind
from lightning_gradguard.callbacks._windows import WindowedCallback
from lightning_gradguard.functional.activity import ActivityTracker
from lightning_gradguard.functional.call_sites import (
    FUNCTION_NAMES,
    is_activation_module,
    is_activation_name,
    registered_activations,
)
from lightning_gradguard.functional.norms import clean_parameter_name
from lightning_gradguard.functional.surgery import swap_activations
from lightning_gradguard.loggers import log_to_loggers
from lightning_gradguard.record import RunRecord, run_record

if TYPE_CHECKING:
    import pytorch_lightning as pl


__all__ = [
    "RESCUE_MODES",
    "DeadUnitMonitor",
]

RESCUE_MODES = ("never", "start", "threshold")
LAYOUTS = ("auto", "channels_first", "channels_last")


def _check_activation_names(names: Any) -> list[str] | None:
    names = check_names(names, "activations", "DeadUnitMonitor", example="['ReLU', 'gelu']")
    unknown = [n for n in names or [] if not (n in FUNCTION_NAMES or is_activation_name(n))]
    if unknown:
        raise ValueError(
            f"DeadUnitMonitor(activations={names!r}): {unknown} are neither activation module "
            f"class names (torch's {sorted(t.__name__ for t in registered_activations())}, a "
            "registered type, or a name the activation name rule matches, such as "
            f"'NewGELUActivation') nor functional activations {list(FUNCTION_NAMES)}."
        )
    return names


def _check_fraction(value: Any, argument: str) -> float:
    return check_number(
        value, argument, "DeadUnitMonitor", low=0, high=1, low_open=True, high_open=True
    )


def _selection(names: list[str] | None) -> Callable[[str, nn.Module], bool]:
    if names is None:
        return lambda _, module: is_activation_module(module)
    chosen = set(names)
    return lambda _, module: type(module).__name__ in chosen and is_activation_module(module)


def _functions(names: list[str] | None) -> list[str] | None:
    if names is None:
        return None  # every functional activation
    squeezed = {n.lower().replace("_", "") for n in names}
    return [f for f in FUNCTION_NAMES if f in names or f.replace("_", "") in squeezed]


class DeadUnitMonitor(WindowedCallback):
    """Log the fraction of dead (and dormant) units per activation call site; optionally rescue.

    Every ``every_n_steps`` optimizer steps, the activation call sites are measured
    for ``window`` training batches (forward hooks on activation modules, module
    hooks and a ``TorchFunctionMode`` for functional activations), then everything
    is removed: outside a window training runs with no hooks at all. A unit is dead
    when its output was never positive in the window, dormant when its ReDo score
    (mean |h| over the site's average) is at most ``dormant_tau``. The statistics
    are summed across ranks before anything is decided, so a unit alive on one
    rank's data is not dead, and every rank takes the same decision at the same step.

    Keys: ``dead_units/<site>`` and ``dormant_units/<site>``, where ``<site>`` is
    the call site's name: the activation module's dotted path, ``<path>#<i>`` for
    the ``i``-th call of a module called several times per forward, and
    ``<module>:<function>`` for a functional activation (``encoder.layers.0:relu``).
    With more than ``max_layers_logged`` sites, ``<prefix>/layers_min``,
    ``/layers_median`` and ``/layers_max`` and the ``extreme_layers`` highest sites
    are logged instead. Sites that could not be measured are in ``not_covered``.

    A compiled model (``torch.compile(model)`` or ``model.compile()``) runs eagerly
    during a window (``torch.compiler.set_stance("force_eager")``) so the hooks
    run in every window; its compiled graphs are reused after the window, with no
    recompilation.

    Rescue (``rescue``): ``"never"`` (monitor only), ``"start"`` (swap every ReLU
    module for LeakyReLU before the first step), ``"threshold"`` (swap the ReLU
    modules of sites whose dead fraction exceeds ``dead_threshold`` at the end of a
    window; a module called at several sites is swapped for all of them, and a
    functional site is reported, not swapped: see ``swap_functional_relu``).
    Swapped module names are part of the callback's state and re-applied on resume
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
        activations: activation module class names and functional activation names
            (``"relu"``, ``"gelu"``, ...) to measure; default: every activation module
            (:func:`~lightning_gradguard.functional.is_activation_module`) and every
            functional activation. A class name also selects its functional form
            (``"ReLU"`` selects ``F.relu``). Only ``ReLU`` modules are ever swapped.
        layout: which dimension holds units, see
            :func:`lightning_gradguard.functional.unit_dim`.
        max_layers_logged: above this many call sites, log summaries instead.
        extreme_layers: how many of the highest sites a summary names.
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
        max_layers_logged: int = 64,
        extreme_layers: int = 3,
    ) -> None:
        owner = "DeadUnitMonitor"
        check_int(every_n_steps, "every_n_steps", owner, low=1)
        check_int(window, "window", owner, low=1, high=every_n_steps)
        self.rescue = check_choice(rescue, "rescue", owner, RESCUE_MODES)
        self.dead_threshold = _check_fraction(dead_threshold, "dead_threshold")
        self.dormant_tau = check_number(dormant_tau, "dormant_tau", owner, low=0)
        self.negative_slope = _check_fraction(negative_slope, "negative_slope")
        self.activations = _check_activation_names(activations)
        self.layout = check_choice(layout, "layout", owner, LAYOUTS)
        self.max_layers_logged = check_int(max_layers_logged, "max_layers_logged", owner, low=1)
        self.extreme_layers = check_int(extreme_layers, "extreme_layers", owner, low=0)
        super().__init__(every_n_steps, window)
        self.every_n_steps, self.window = every_n_steps, window
        self.not_covered: dict[str, str] = {}
        self.swapped: list[str] = []
        self._record: RunRecord | None = None
        self.last_stats: dict[str, dict[str, float]] = {}
        self._reported_dying: set[str] = set()
        self._warned_functional: set[str] = set()
        self._warned_empty = False

    @functools.cached_property  # Lightning reads it at every hook call: compute it once
    def state_key(self) -> str:
        return self._generate_state_key(rescue=self.rescue, activations=self.activations)

    @override
    def state_dict(self) -> dict[str, Any]:
        """Swapped layers and the measuring window: Python primitives only."""
        return {"swapped": list(self.swapped), **self._window_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore; the swaps are re-applied to the model before the first step."""
        self.swapped = list(state_dict.get("swapped", []))
        self._load_window_state(state_dict)

    @property
    def events(self) -> list[dict[str, Any]]:
        """The swaps of the current run (step, kind, layer, detail), from the run record."""
        if self._record is None:
            return []
        return [event.row() for event in self._record.events_of("swap")]

    # ------------------------------------------------------------------ lifecycle

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            # A second fit with the same callback starts afresh: the first run's swaps are
            # not re-applied to another model. A resumed fit gets them from
            # load_state_dict, which Lightning calls after setup.
            self.swapped, self.last_stats = [], {}
            self._reported_dying = set()
            self._restart_windows()
        self._record = run_record(trainer)  # in place before a checkpoint is restored

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record = run_record(trainer)
        self._record.thresholds["dead_units"] = self.dead_threshold
        wrapped = strategy_kind(trainer) == "ddp"
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

    def _build_tracker(self, pl_module: pl.LightningModule) -> None:
        self._close_window()
        self._tracker = ActivityTracker.for_module(
            pl_module,
            _selection(self.activations),
            self.layout,
            functions=_functions(self.activations),
        )
        self._tracker.not_covered.update(self.not_covered)  # kept across a rebuild
        self.not_covered = self._tracker.not_covered

    # ------------------------------------------------------------------ windows

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any
    ) -> None:
        if self._tracker is not None:
            self._tracker.pause()  # no activation in backward; the next forward resumes

    @override
    def on_window_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, tracker: ActivityTracker
    ) -> None:
        stats = tracker.stats()
        if not stats:
            self._warn_nothing_measured(pl_module)
        self.last_stats = {
            name: {"dead": s.dead_fraction, "dormant": s.dormant_fraction(self.dormant_tau)}
            for name, s in stats.items()
        }
        names = [clean_parameter_name(name + ".x")[:-2] for name in self.last_stats]
        metrics: dict[str, float] = {}
        step = int(trainer.global_step)
        record = run_record(trainer)
        site_stats = list(self.last_stats.values())
        for series, kind in (("dead_units", "dead"), ("dormant_units", "dormant")):
            record.history.add(series, step, {n: v[kind] for n, v in zip(names, site_stats)})
        for prefix, kind in (("dead_units", "dead"), ("dormant_units", "dormant")):
            fractions = [v[kind] for v in self.last_stats.values()]
            metrics.update(self._site_metrics(prefix, names, fractions))
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
            self._rescue(trainer, pl_module, tracker)

    def _rescue(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, tracker: ActivityTracker
    ) -> None:
        sites = {site.name: site for site in tracker.call_sites()}
        dying: list[str] = []
        for name, values in self.last_stats.items():
            site = sites.get(name)
            if values["dead"] <= self.dead_threshold or site is None:
                continue
            if site.function is not None:
                if site.function == "relu" and name not in self._warned_functional:
                    self._warned_functional.add(name)
                    rank_zero_warn(
                        f"DeadUnitMonitor: {name} is a functional ReLU ({values['dead']:.0%} "
                        "dead); module swapping cannot reach it. Rewrite its module with "
                        "lightning_gradguard.functional.swap_functional_relu."
                    )
                continue
            if site.module not in dying and isinstance(
                pl_module.get_submodule(site.module), nn.ReLU
            ):
                dying.append(site.module)
        if dying:
            wrapped = strategy_kind(trainer) == "ddp"
            swap_activations(
                pl_module,
                dying,
                to="leaky_relu",
                negative_slope=self.negative_slope,
                wrapped=wrapped,
            )
            self._record_swaps(trainer, dying, "dead fraction above threshold")
            self._build_tracker(pl_module)

    def _site_metrics(self, prefix: str, names: list[str], values: list[float]) -> dict[str, float]:
        if len(names) <= self.max_layers_logged:
            return {f"{prefix}/{name}": value for name, value in zip(names, values)}
        metrics = {
            f"{prefix}/layers_min": min(values),
            f"{prefix}/layers_median": statistics.median(values),
            f"{prefix}/layers_max": max(values),
        }
        highest = sorted(range(len(values)), key=lambda i: values[i], reverse=True)
        for i in highest[: self.extreme_layers]:
            metrics[f"{prefix}/{names[i]}"] = values[i]
        return metrics

    def _warn_nothing_measured(self, pl_module: pl.LightningModule) -> None:
        if self._warned_empty:
            return
        self._warned_empty = True
        rank_zero_warn(
            f"DeadUnitMonitor: no activation call site of {type(pl_module).__name__} ran in a "
            "training batch of the window; nothing was measured. Measured are activation "
            "modules (torch's ReLU family and modules named like 'NewGELUActivation'; add a "
            "type with lightning_gradguard.functional.register_activation) and functional "
            f"activations {list(FUNCTION_NAMES)} called in training mode. Activations built "
            "from other ops (a custom x * torch.sigmoid(x)) are not measured."
        )

    def _record_swaps(self, trainer: pl.Trainer, names: list[str], reason: str) -> None:
        step = int(trainer.global_step)
        record = run_record(trainer)
        for name in names:
            if name not in self.swapped:
                self.swapped.append(name)
            site_dead = [v["dead"] for n, v in self.last_stats.items() if n.split("#")[0] == name]
            dead = max(site_dead) if site_dead else None
            detail = f"ReLU -> LeakyReLU({self.negative_slope:g}), {reason}"
            if dead is not None:
                detail += f", {dead:.0%} dead"
            values = {} if dead is None else {"dead": dead}
            record.add("swap", step, layers=[name], values=values, detail=detail)
        rank_zero_warn(
            f"DeadUnitMonitor: swapped ReLU for LeakyReLU({self.negative_slope:g}) in "
            f"{', '.join(names)} at step {step} ({reason})."
        )

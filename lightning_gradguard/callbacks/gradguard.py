"""``GradGuard``: monitoring, adaptive clipping and dead-unit rescue in one callback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
from typing_extensions import override

from lightning_gradguard._checks import check_bool, check_choice, check_int, closest
from lightning_gradguard._compat import Callback, rank_zero_warn
from lightning_gradguard.callbacks.adaptive_grad_clip import AdaptiveGradClip
from lightning_gradguard.callbacks.dead_unit_monitor import RESCUE_MODES, DeadUnitMonitor
from lightning_gradguard.callbacks.grad_norm_monitor import GradNormMonitor
from lightning_gradguard.callbacks.health_report import HealthReport
from lightning_gradguard.callbacks.spike_recovery import SpikeRecovery
from lightning_gradguard.functional.policies import POLICIES, ClipPolicy

__all__ = [
    "GradGuard",
]

# Every hook of Lightning's Callback base class (the two packages have the same ones).
_HOOKS = tuple(
    name
    for name in dir(pl.Callback)
    if (name.startswith("on_") or name in ("setup", "teardown"))
    and callable(getattr(pl.Callback, name))
)


def _build(part: type[Callback], argument: str, options: dict[str, Any] | None) -> Any:
    """Construct one part, naming the GradGuard argument in any error it raises."""
    try:
        return part(**(options or {}))
    except (TypeError, ValueError) as error:
        raise type(error)(f"GradGuard({argument}=...): {error}") from None


def _check_clip(clip: Any) -> None:
    """``clip`` must be a shorthand, a policy object or None; a typo names ``clip``."""
    if clip is None or isinstance(clip, ClipPolicy) or (isinstance(clip, str) and clip in POLICIES):
        return
    choices = sorted(POLICIES)
    hint = closest(clip, choices)
    raise ValueError(
        f"GradGuard(clip={clip!r}): clip must be one of {choices}, a policy object such as "
        "ZClip(z_thresh=3.0), or None for no clipping."
        + (f" Did you mean {hint!r}?" if hint else "")
    )


def _check_options(options: Any, argument: str) -> dict[str, Any] | None:
    if options is not None and not isinstance(options, dict):
        raise TypeError(
            f"GradGuard({argument}={options!r}): {argument} must be a dict of keyword arguments."
        )
    return options


def _refuse_conflicts(
    argument: str,
    options: dict[str, Any] | None,
    top_level: dict[str, Any],
    renamed: dict[str, str],
) -> None:
    """An option given both in ``<part>_args`` and as a GradGuard argument is an error.

    ``renamed`` maps part arguments that GradGuard sets under another name (the
    clipper's ``policy`` is GradGuard's ``clip``): those are never taken from the dict.
    """
    for key, name in renamed.items():
        if options and key in options:
            raise ValueError(
                f"GradGuard({argument}={{{key!r}: ...}}): set the {key} with "
                f"GradGuard({name}=...), not in {argument} (both were given, and only one "
                "can win)."
            )
    for key, value in top_level.items():
        if options and key in options and options[key] != value:
            raise ValueError(
                f"GradGuard({key}={value!r}) and {argument}={{{key!r}: {options[key]!r}}} "
                f"disagree: give {key} once, as GradGuard({key}=...)."
            )


class GradGuard(Callback):
    """Gradient health in one line: monitor, clip, skip bad steps, rescue dead ReLUs.

    The bundle holds the library's callbacks as parts and runs them in this
    order, every hook:

    1. :class:`~lightning_gradguard.GradNormMonitor` (``monitor``): per-layer
       gradient norms, parameter norms, update ratios, vanishing/exploding/
       non-finite warnings.
    2. :class:`~lightning_gradguard.AdaptiveGradClip` (``clip``): the policy
       (default :class:`~lightning_gradguard.functional.GuardClip`, which leaves
       healthy steps alone and clips spikes and explosions), with non-finite steps
       skipped. It reuses the monitor's
       norms: one pass over the gradients for both.
    3. :class:`~lightning_gradguard.DeadUnitMonitor` (``dead_units``): dead and
       dormant units per activation layer, with ``rescue`` (default: swap the
       ReLU of a layer that is more than half dead for LeakyReLU). One activity
       tracker, hooked only inside its measuring windows.
    4. :class:`~lightning_gradguard.HealthReport` (``report``): pictures,
       histograms, the events table, alerts and a run summary.

    Off by default: :class:`~lightning_gradguard.SpikeRecovery`
    (``spike_recovery=True``, after the clipper): a last-good snapshot and a
    rollback on a loss spike; its flag travels in the clipper's one host read.

    Every part can be switched off (``monitor=False``, ``clip=None``,
    ``dead_units=False``, ``report=False``) and configured with a dict of its own
    arguments (``monitor_args``, ``clip_args``, ``dead_unit_args``,
    ``report_args``); the parts are available as attributes (``norm_monitor``,
    ``clipper``, ``recovery``, ``unit_monitor``, ``health_report``; ``None`` when off) and, in
    order, in ``gradguard_parts``.

    The parts talk to each other through the run record
    (:func:`~lightning_gradguard.record.run_record`), which is checkpointed beside
    the bundle. The bundle's checkpoint entry (key ``"GradGuard"``) holds each
    part's state under that part's own ``state_key``: resuming with other settings
    for one part (another ``clip``) restores every other part (the dead-unit swaps,
    the monitor's detection state) and starts that part afresh, with a warning that
    names it.

    Args:
        monitor: log per-layer norms and detect vanishing/exploding gradients.
        clip: clipping policy: ``"guard"`` (the default), ``"zclip"``, ``"autoclip"``,
            ``"ema_ratio"``, ``"norm"``, ``"value"``, ``"agc"`` or a
            :class:`~lightning_gradguard.functional.ClipPolicy`; ``None`` for no
            clipping (non-finite steps are then still skipped if ``skip_nonfinite``).
        skip_nonfinite: skip optimizer steps whose gradients contain inf or NaN.
        skip_spikes: also skip steps whose global norm spikes far above the recent
            ones.
        dead_units: measure dead and dormant units.
        rescue: what to do about dying ReLUs: ``"threshold"``, ``"start"`` or
            ``"never"`` (see ``DeadUnitMonitor``).
        report: add ``HealthReport`` (W&B extras and PNG pictures).
        log_every_n_steps: logging interval of the monitor and the clipper;
            ``None`` uses the Trainer's ``log_every_n_steps``.
        monitor_args: more ``GradNormMonitor`` arguments.
        clip_args: more ``AdaptiveGradClip`` arguments.
        dead_unit_args: more ``DeadUnitMonitor`` arguments.
        report_args: more ``HealthReport`` arguments.
        spike_recovery: add ``SpikeRecovery`` (roll back to the last good state on a
            loss spike).
        spike_recovery_args: more ``SpikeRecovery`` arguments.

    Example:
        >>> guard = GradGuard(clip="autoclip", dead_unit_args={"every_n_steps": 50})
        >>> [type(part).__name__ for part in guard.gradguard_parts]
        ['GradNormMonitor', 'AdaptiveGradClip', 'DeadUnitMonitor', 'HealthReport']
        >>> GradGuard(clip=None, skip_nonfinite=False, dead_units=False, report=False)
        GradGuard(GradNormMonitor)
    """

    def __init__(
        self,
        monitor: bool = True,
        clip: str | ClipPolicy | None = "guard",
        skip_nonfinite: bool = True,
        skip_spikes: bool = False,
        dead_units: bool = True,
        rescue: str = "threshold",
        report: bool = True,
        log_every_n_steps: int | None = None,
        monitor_args: dict[str, Any] | None = None,
        clip_args: dict[str, Any] | None = None,
        dead_unit_args: dict[str, Any] | None = None,
        report_args: dict[str, Any] | None = None,
        spike_recovery: bool = False,
        spike_recovery_args: dict[str, Any] | None = None,
    ) -> None:
        owner = "GradGuard"
        self.monitor = check_bool(monitor, "monitor", owner)
        _check_clip(clip)
        self.clip = clip
        self.skip_nonfinite = check_bool(skip_nonfinite, "skip_nonfinite", owner)
        self.skip_spikes = check_bool(skip_spikes, "skip_spikes", owner)
        self.dead_units = check_bool(dead_units, "dead_units", owner)
        self.rescue = check_choice(rescue, "rescue", owner, RESCUE_MODES)
        self.report = check_bool(report, "report", owner)
        self.log_every_n_steps = check_int(
            log_every_n_steps, "log_every_n_steps", owner, low=1, allow_none=True
        )
        self.monitor_args = _check_options(monitor_args, "monitor_args")
        self.clip_args = _check_options(clip_args, "clip_args")
        self.dead_unit_args = _check_options(dead_unit_args, "dead_unit_args")
        self.report_args = _check_options(report_args, "report_args")
        self.spike_recovery = check_bool(spike_recovery, "spike_recovery", owner)
        self.spike_recovery_args = _check_options(spike_recovery_args, "spike_recovery_args")
        self._build_parts()

    def _build_parts(self) -> None:
        """Construct the parts from the arguments; an error names the GradGuard argument."""
        clip_args, dead_unit_args = self.clip_args, self.dead_unit_args
        skips = {"skip_nonfinite": self.skip_nonfinite, "skip_spikes": self.skip_spikes}
        _refuse_conflicts("clip_args", clip_args, skips, {"policy": "clip"})
        _refuse_conflicts("dead_unit_args", dead_unit_args, {"rescue": self.rescue}, {})
        interval = {"log_every_n_steps": self.log_every_n_steps}
        self.norm_monitor: GradNormMonitor | None = (
            _build(GradNormMonitor, "monitor_args", {**interval, **(self.monitor_args or {})})
            if self.monitor
            else None
        )
        clip_options = {
            "policy": "none" if self.clip is None else self.clip,  # "none": only skips bad steps
            **skips,
            **interval,
            **(clip_args or {}),
        }
        wants_clipper = self.clip is not None or self.skip_nonfinite or self.skip_spikes
        self.clipper: AdaptiveGradClip | None = (
            _build(AdaptiveGradClip, "clip_args", clip_options) if wants_clipper else None
        )
        unit_options = {"rescue": self.rescue, **(dead_unit_args or {})}
        self.unit_monitor: DeadUnitMonitor | None = (
            _build(DeadUnitMonitor, "dead_unit_args", unit_options) if self.dead_units else None
        )
        self.health_report: HealthReport | None = (
            _build(HealthReport, "report_args", self.report_args) if self.report else None
        )
        self.recovery: SpikeRecovery | None = (
            _build(SpikeRecovery, "spike_recovery_args", self.spike_recovery_args)
            if self.spike_recovery
            else None
        )
        self.gradguard_parts: list[Any] = [
            part
            for part in (
                self.norm_monitor,
                self.clipper,
                self.recovery,
                self.unit_monitor,
                self.health_report,
            )
            if part is not None
        ]
        base = {name: getattr(Callback, name, None) for name in _HOOKS}
        self._hooked: dict[str, list[Callable[..., Any]]] = {
            name: [
                getattr(part, name)
                for part in self.gradguard_parts
                if getattr(type(part), name, None) is not base[name]
            ]
            for name in _HOOKS
        }

    def __repr__(self) -> str:
        names = ", ".join(type(part).__name__ for part in self.gradguard_parts)
        return f"GradGuard({names})"

    @property
    def state_key(self) -> str:
        """``"GradGuard"``: the settings are in each part's own key, inside the entry."""
        return "GradGuard"

    @override
    def state_dict(self) -> dict[str, Any]:
        """Each part's state under the part's ``state_key`` (tensors and Python primitives)."""
        return {part.state_key: part.state_dict() for part in self.gradguard_parts}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Give each part the state saved under its own key.

        A part whose settings changed (its key differs) starts afresh with a warning
        that names it; the other parts are restored.
        """
        saved = dict(state_dict)
        for part in self.gradguard_parts:
            state = saved.pop(part.state_key, None)
            if state is not None:
                part.load_state_dict(state)
                continue
            name = type(part).__name__
            other = [key for key in saved if key.partition("{")[0] == name]
            for key in other:
                del saved[key]
            if other:
                rank_zero_warn(
                    f"GradGuard: the checkpoint's {name} state was saved with other settings "
                    f"({other[0]}; now {part.state_key}), so {name} starts afresh. The other "
                    "parts are restored."
                )
        if saved:
            rank_zero_warn(
                f"GradGuard: the checkpoint holds state of parts this GradGuard does not have "
                f"({', '.join(sorted(saved))}); it is not restored."
            )

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Also read a checkpoint of earlier versions: one entry for all parts, by class name.

        Its key named every part's settings; a part whose settings match is restored,
        another starts afresh with a warning that names it.
        """
        callbacks = checkpoint.get("callbacks") or {}
        if self.state_key not in callbacks:
            for key, state in callbacks.items():
                if isinstance(key, str) and key.startswith("GradGuard{"):
                    self._load_legacy(key, state)
                    break
        for method in self._hooked["on_load_checkpoint"]:
            method(trainer, pl_module, checkpoint)

    def _load_legacy(self, key: str, state: dict[str, Any]) -> None:
        for part in self.gradguard_parts:
            name = type(part).__name__
            if name not in state:
                continue
            if repr(part.state_key) in key:
                part.load_state_dict(state[name])
            else:
                rank_zero_warn(
                    f"GradGuard: the checkpoint (an earlier version's layout) holds {name} "
                    f"state saved with other settings than {part.state_key}, so {name} starts "
                    "afresh. The other parts are restored."
                )


def _forward(name: str) -> Callable[..., None]:
    def hook(self: GradGuard, *args: Any, **kwargs: Any) -> None:
        for method in self._hooked[name]:
            method(*args, **kwargs)

    hook.__name__ = hook.__qualname__ = name
    hook.__doc__ = f"Run ``{name}`` of every part, in order."
    return hook


for _name in _HOOKS:
    if _name not in vars(GradGuard):  # hooks the bundle defines itself forward explicitly
        setattr(GradGuard, _name, _forward(_name))

"""The one place where metrics leave the device and reach the trainer's loggers.

Every callback hands its metrics here as a dict of device tensors. They are
concatenated into one float64 vector and moved to the host in a single
transfer, then given as one dict to each of ``trainer.loggers`` (which log on
rank zero only). Calling ``self.log`` once per layer costs about 0.2 ms per
metric per call; this costs one copy.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


def to_host(values: Mapping[str, Tensor]) -> dict[str, list[float]]:
    """Move a dict of device tensors to Python floats in one transfer.

    Args:
        values: name -> tensor (any shape; flattened).

    Returns:
        name -> list of floats, in the tensors' flattened order.

    Example:
        >>> to_host({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor(3.0)})
        {'a': [1.0, 2.0], 'b': [3.0]}
    """
    if not values:
        return {}
    flat = [v.detach().reshape(-1).to(torch.float64) for v in values.values()]
    devices = {t.device for t in flat}
    if len(devices) > 1:
        flat = [t.cpu() for t in flat]
    host = torch.cat(flat).cpu().tolist()  # the one device-to-host transfer
    out: dict[str, list[float]] = {}
    offset = 0
    for name, tensor in zip(values, flat):
        out[name] = host[offset : offset + tensor.numel()]
        offset += tensor.numel()
    return out


def log_to_loggers(trainer: Any, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Give ``metrics`` to every logger of ``trainer`` at ``step`` (default: ``global_step``).

    Works with no logger at all. Lightning's loggers write on rank zero only. The
    values are also kept in :func:`metric_history`, which the pictures are drawn from.
    """
    if not metrics:
        return
    if step is None:
        step = int(trainer.global_step)
    metric_history(trainer).append((step, dict(metrics)))
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)


HISTORY_SIZE = 20_000
"""How many ``log_to_loggers`` calls a trainer's metric history keeps (the newest)."""


def metric_history(trainer: Any) -> deque[tuple[int, dict[str, float]]]:
    """Every metric dict the callbacks logged, with its step (bounded; for the pictures)."""
    history = getattr(trainer, "_gradguard_history", None)
    if history is None:
        history = deque(maxlen=HISTORY_SIZE)
        trainer._gradguard_history = history
    return history


# --------------------------------------------------------------------------- events

EVENT_COLUMNS = ("step", "kind", "layer", "detail")
"""Columns of the ``gradguard/events`` table."""

ALERT_KINDS = {"nonfinite": "ERROR", "exploding": "WARN", "dying": "WARN", "rollback": "WARN"}
"""Event kinds that also raise a W&B alert, with the alert level."""


class EventLog:
    """What the callbacks did (skips, swaps, re-inits, warnings), kept per Trainer.

    Events are plain dicts (``step``, ``kind``, ``layer``, ``detail``). Kinds in
    :data:`ALERT_KINDS` also send a W&B alert when a ``WandbLogger`` is attached,
    at most ``max_alerts_per_hour`` per kind, so a bad hour sends a few, not
    thousands.

    Example:
        >>> log = EventLog()
        >>> _ = log.add(10, "swap", "net.3", "ReLU -> LeakyReLU")
        >>> log.events
        [{'step': 10, 'kind': 'swap', 'layer': 'net.3', 'detail': 'ReLU -> LeakyReLU'}]
    """

    def __init__(self, max_alerts_per_hour: int = 5) -> None:
        self.events: list[dict[str, Any]] = []
        self.max_alerts_per_hour = max_alerts_per_hour
        self._alert_times: dict[str, list[float]] = {}

    def add(self, step: int, kind: str, layer: str, detail: str) -> dict[str, Any]:
        """Record an event and return it."""
        event = {"step": int(step), "kind": kind, "layer": layer, "detail": detail}
        self.events.append(event)
        return event

    def alert_allowed(self, kind: str, now: float) -> bool:
        """Whether one more alert of ``kind`` fits in the hourly budget (and count it)."""
        recent = [t for t in self._alert_times.get(kind, []) if now - t < 3600.0]
        if len(recent) >= self.max_alerts_per_hour:
            self._alert_times[kind] = recent
            return False
        self._alert_times[kind] = [*recent, now]
        return True


def event_log(trainer: Any) -> EventLog:
    """The trainer's :class:`EventLog` (created on first use)."""
    log = getattr(trainer, "_gradguard_event_log", None)
    if log is None:
        log = EventLog()
        trainer._gradguard_event_log = log
    return log


def record_event(trainer: Any, kind: str, layer: str, detail: str, step: int | None = None) -> None:
    """Record an event for the trainer; alert kinds also reach W&B as a rate-limited alert."""
    import time

    log = event_log(trainer)
    event = log.add(int(trainer.global_step) if step is None else step, kind, layer, detail)
    level = ALERT_KINDS.get(kind)
    if level is None or not getattr(trainer, "is_global_zero", True):
        return
    runs = wandb_runs(trainer)
    if runs and log.alert_allowed(kind, time.monotonic()):
        import wandb

        for run in runs:
            run.alert(
                title=f"gradguard: {kind}",
                text=f"step {event['step']}: {layer} {detail}".strip(),
                level=getattr(wandb.AlertLevel, level),  # type: ignore[attr-defined]
            )


# --------------------------------------------------------------------------- logger kinds


def _is_logger(logger: Any, class_name: str) -> bool:
    return any(cls.__name__ == class_name for cls in type(logger).__mro__)


def wandb_runs(trainer: Any) -> list[Any]:
    """The W&B runs of the trainer's ``WandbLogger``-s (rank zero only; empty otherwise)."""
    if not getattr(trainer, "is_global_zero", True):
        return []
    runs = []
    for logger in getattr(trainer, "loggers", []):
        if _is_logger(logger, "WandbLogger"):
            run = logger.experiment
            if hasattr(run, "log") and hasattr(run, "summary"):
                runs.append(run)
    return runs


def tensorboard_writers(trainer: Any) -> list[Any]:
    """The ``SummaryWriter``-s of the trainer's ``TensorBoardLogger``-s (rank zero only)."""
    if not getattr(trainer, "is_global_zero", True):
        return []
    return [
        logger.experiment
        for logger in getattr(trainer, "loggers", [])
        if _is_logger(logger, "TensorBoardLogger") and hasattr(logger.experiment, "add_scalar")
    ]

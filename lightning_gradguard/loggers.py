"""The one place where metrics leave the device and reach the trainer's loggers.

Every callback hands its metrics here as a dict of device tensors. They are
concatenated into one float64 vector and moved to the host in a single
transfer, then given as one dict to each of ``trainer.loggers`` (which log on
rank zero only). Calling ``self.log`` once per layer costs about 0.2 ms per
metric per call; this costs one copy.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_gradguard.record import Event, EventKind, run_record

__all__ = [
    "flatten_for_host",
    "log_to_loggers",
    "record_event",
    "split_host",
    "tensorboard_writers",
    "to_host",
    "wandb_runs",
]


def to_host(values: Mapping[str, Tensor]) -> dict[str, list[float]]:
    """Move a dict of device tensors to Python floats in one transfer.

    Args:
        values: name -> tensor (any shape; flattened).

    Returns:
        name -> list of floats, in the tensors' flattened order.

    Example:
        >>> to_host({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor(3.0)})
        {'a': [1.0, 2.0], 'b': [3.0]}
        >>> to_host({"x": torch.tensor(0.5, dtype=torch.float64), "y": torch.tensor(2.0).double()})
        {'x': [0.5], 'y': [2.0]}
    """
    if not values:
        return {}
    devices = {v.device for v in values.values()}
    device = devices.pop() if len(devices) == 1 else torch.device("cpu")
    flat, sizes = flatten_for_host(values, device)
    return split_host(values, flat.cpu().tolist(), sizes)  # the one device-to-host transfer


def flatten_for_host(
    values: Mapping[str, Tensor], device: torch.device
) -> tuple[Tensor, list[int]]:
    """``values`` as one float64 vector on ``device`` and the number of floats of each.

    For a caller that moves them to the host together with values of its own (a
    clipper's flag read); :func:`split_host` gives them their names back.

    Example:
        >>> flat, sizes = flatten_for_host({"a": torch.tensor([1.0, 2.0])}, torch.device("cpu"))
        >>> split_host({"a": torch.tensor([1.0, 2.0])}, flat.tolist(), sizes)
        {'a': [1.0, 2.0]}
    """
    flat = [v.detach().reshape(-1).to(device, torch.float64) for v in values.values()]
    if not flat:
        return torch.zeros(0, dtype=torch.float64, device=device), []
    return torch.cat(flat), [t.numel() for t in flat]


def split_host(
    values: Mapping[str, Tensor], host: list[float], sizes: list[int]
) -> dict[str, list[float]]:
    """Name the floats of :func:`flatten_for_host`, once they are on the host.

    Example:
        >>> split_host({"a": torch.zeros(2), "b": torch.zeros(())}, [1.0, 2.0, 3.0], [2, 1])
        {'a': [1.0, 2.0], 'b': [3.0]}
    """
    out: dict[str, list[float]] = {}
    offset = 0
    for name, size in zip(values, sizes):
        out[name] = host[offset : offset + size]
        offset += size
    return out


def log_to_loggers(trainer: Any, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Give ``metrics`` to every logger of ``trainer`` at ``step`` (default: ``global_step``).

    Works with no logger at all. Lightning's loggers write on rank zero only. What
    the pictures are drawn from is written to the run record's structured history
    by each callback (:class:`~lightning_gradguard.record.MetricHistory`), not
    parsed back from these keys.
    """
    if not metrics:
        return
    if step is None:
        step = int(trainer.global_step)
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)


def record_event(
    trainer: Any,
    kind: EventKind,
    layer: str,
    detail: str,
    step: int | None = None,
    values: Mapping[str, float] | None = None,
) -> Event:
    """Shorthand for ``run_record(trainer).add(...)`` with one layer (``""``: none).

    Example:
        >>> import pytorch_lightning as pl
        >>> trainer = pl.Trainer(logger=False, enable_checkpointing=False)
        >>> record_event(trainer, "swap", "net.3", "ReLU -> LeakyReLU", step=10).layers
        ('net.3',)
    """
    when = int(trainer.global_step) if step is None else int(step)
    layers = [layer] if layer else []
    return run_record(trainer).add(kind, when, layers=layers, values=values, detail=detail)


# --------------------------------------------------------------------------- logger kinds


@functools.cache
def _logger_classes(name: str) -> tuple[type, ...]:
    """``name`` from the loggers of both Lightning packages (the unified one is optional)."""
    import pytorch_lightning.loggers as pl_loggers

    classes: list[type] = [getattr(pl_loggers, name)]
    try:
        import lightning.pytorch.loggers as lp_loggers

        classes.append(getattr(lp_loggers, name))
    except ImportError:  # pragma: no cover - depends on the environment
        pass
    return tuple(classes)


def _is_logger(logger: Any, class_name: str) -> bool:
    return isinstance(logger, _logger_classes(class_name))


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

"""lightning_gradguard: drop-in PyTorch Lightning callbacks that keep gradients healthy.

The callbacks and the mixin are imported lazily, so ``lightning_gradguard.functional``
(pure torch) can be used from plain PyTorch or Fabric without importing Lightning.

Example:
    >>> import pytorch_lightning as pl
    >>> from lightning_gradguard import GradNormMonitor
    >>> trainer = pl.Trainer(callbacks=[GradNormMonitor()], logger=False)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "AdaptiveGradClip": "lightning_gradguard.callbacks.adaptive_grad_clip",
    "DeadUnitMonitor": "lightning_gradguard.callbacks.dead_unit_monitor",
    "Diagnosis": "lightning_gradguard.doctor",
    "GradGuard": "lightning_gradguard.callbacks.gradguard",
    "GradNormMonitor": "lightning_gradguard.callbacks.grad_norm_monitor",
    "GradGuardMixin": "lightning_gradguard.mixin",
    "HealthReport": "lightning_gradguard.callbacks.health_report",
    "InitAtStart": "lightning_gradguard.callbacks.reinit",
    "LayerReinit": "lightning_gradguard.callbacks.reinit",
    "RunRecord": "lightning_gradguard.record",
    "UnitRecycler": "lightning_gradguard.callbacks.reinit",
    "diagnose": "lightning_gradguard.doctor",
    "run_record": "lightning_gradguard.record",
}

if TYPE_CHECKING:
    from lightning_gradguard.callbacks.adaptive_grad_clip import AdaptiveGradClip
    from lightning_gradguard.callbacks.dead_unit_monitor import DeadUnitMonitor
    from lightning_gradguard.callbacks.grad_norm_monitor import GradNormMonitor
    from lightning_gradguard.callbacks.gradguard import GradGuard
    from lightning_gradguard.callbacks.health_report import HealthReport
    from lightning_gradguard.callbacks.reinit import InitAtStart, LayerReinit, UnitRecycler
    from lightning_gradguard.doctor import Diagnosis, diagnose
    from lightning_gradguard.mixin import GradGuardMixin
    from lightning_gradguard.record import RunRecord, run_record


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_gradguard' has no attribute {name!r}")


__all__ = [
    "AdaptiveGradClip",
    "DeadUnitMonitor",
    "Diagnosis",
    "GradGuard",
    "GradGuardMixin",
    "GradNormMonitor",
    "HealthReport",
    "InitAtStart",
    "LayerReinit",
    "RunRecord",
    "UnitRecycler",
    "__version__",
    "diagnose",
    "run_record",
]

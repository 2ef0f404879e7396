"""lightning_gradguard: drop-in PyTorch Lightning callbacks that keep gradients healthy.

The callbacks, the mixin and the subpackages are imported lazily (module ``__getattr__``,
as torch and numpy do), so ``lightning_gradguard.functional`` (pure torch) can be used from
plain PyTorch or Fabric without importing Lightning.

Example:
    >>> import lightning_gradguard as gg
    >>> gg.functional.grad_norms.__name__
    'grad_norms'
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
    "InitAtStart": "lightning_gradguard.callbacks.init_at_start",
    "LayerReinit": "lightning_gradguard.callbacks.layer_reinit",
    "RunRecord": "lightning_gradguard.record",
    "SpikeRecovery": "lightning_gradguard.callbacks.spike_recovery",
    "UnitRecycler": "lightning_gradguard.callbacks.unit_recycler",
    "diagnose": "lightning_gradguard.doctor",
    "run_record": "lightning_gradguard.record",
}

# Subpackages and modules reachable as attributes (``gg.functional``), imported on first use.
_SUBMODULES = frozenset({"callbacks", "demo", "doctor", "functional", "plots", "record"})

if TYPE_CHECKING:
    from lightning_gradguard import callbacks as callbacks
    from lightning_gradguard import demo as demo
    from lightning_gradguard import doctor as doctor
    from lightning_gradguard import functional as functional
    from lightning_gradguard import plots as plots
    from lightning_gradguard import record as record
    from lightning_gradguard.callbacks.adaptive_grad_clip import AdaptiveGradClip
    from lightning_gradguard.callbacks.dead_unit_monitor import DeadUnitMonitor
    from lightning_gradguard.callbacks.grad_norm_monitor import GradNormMonitor
    from lightning_gradguard.callbacks.gradguard import GradGuard
    from lightning_gradguard.callbacks.health_report import HealthReport
    from lightning_gradguard.callbacks.init_at_start import InitAtStart
    from lightning_gradguard.callbacks.layer_reinit import LayerReinit
    from lightning_gradguard.callbacks.spike_recovery import SpikeRecovery
    from lightning_gradguard.callbacks.unit_recycler import UnitRecycler
    from lightning_gradguard.doctor import Diagnosis, diagnose
    from lightning_gradguard.mixin import GradGuardMixin
    from lightning_gradguard.record import RunRecord, run_record


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
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
    "SpikeRecovery",
    "UnitRecycler",
    "__version__",
    "diagnose",
    "run_record",
]


def __dir__() -> list[str]:
    # The subpackages stay out of ``__all__`` (a star import would import the optional
    # matplotlib through ``plots``) but are listed here, for completion.
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)

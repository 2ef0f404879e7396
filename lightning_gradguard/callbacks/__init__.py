"""Lightning callbacks: thin adapters over :mod:`lightning_gradguard.functional`."""

from lightning_gradguard.callbacks.adaptive_grad_clip import AdaptiveGradClip
from lightning_gradguard.callbacks.dead_unit_monitor import DeadUnitMonitor
from lightning_gradguard.callbacks.grad_norm_monitor import GradNormMonitor
from lightning_gradguard.callbacks.gradguard import GradGuard
from lightning_gradguard.callbacks.health_report import HealthReport
from lightning_gradguard.callbacks.init_at_start import InitAtStart
from lightning_gradguard.callbacks.layer_reinit import LayerReinit
from lightning_gradguard.callbacks.spike_recovery import SpikeRecovery
from lightning_gradguard.callbacks.unit_recycler import UnitRecycler

__all__ = [
    "AdaptiveGradClip",
    "DeadUnitMonitor",
    "GradGuard",
    "GradNormMonitor",
    "HealthReport",
    "InitAtStart",
    "LayerReinit",
    "SpikeRecovery",
    "UnitRecycler",
]

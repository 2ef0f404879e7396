"""``diagnose(model, batch)`` and the ``gradguard doctor`` command: a gradient health check-up.

A few forward/backward passes on a *copy* of the model (no optimizer step; the
user's model, its buffers, gradients, modes and hooks are never touched), then
one row per layer (every module that owns parameters): gradient norm,
parameter norm, their ratio, the dead fraction of the activation call site that
consumes the layer, that activation, and the weight std against what He and
Glorot initialization would give. From the rows come findings (vanishing,
exploding, non-finite, dying, deep sigmoid stacks, BatchNorm on tiny batches,
weight scale, unused layers), each with a severity and concrete remedies, and an
exit code a CI job can use.

- :mod:`~lightning_gradguard.doctor.checkup`: :func:`diagnose`, in steps (validate,
  prepare the copy and the batches, measure, run the rules, report);
- :mod:`~lightning_gradguard.doctor.measure`: the passes and the rows; unit activity
  through :class:`~lightning_gradguard.functional.ActivityTracker`, data flow from
  :mod:`~lightning_gradguard.doctor.flow`;
- :mod:`~lightning_gradguard.doctor.rules`: the rules, one function each, and
  :mod:`~lightning_gradguard.doctor.coverage`: what could not be checked;
- :mod:`~lightning_gradguard.doctor.architecture`: what the model already has;
- :mod:`~lightning_gradguard.doctor.report`: :class:`Diagnosis`, text table and JSON;
- :mod:`~lightning_gradguard.doctor.cli`: :func:`main`, the ``doctor`` subcommand
  (also ``python -m lightning_gradguard.doctor``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_gradguard.doctor import diagnose
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> batch = (torch.randn(32, 8), torch.randint(0, 3, (32,)))
    >>> diagnosis = diagnose(model, batch, steps=1)
    >>> [row.name for row in diagnosis.rows], diagnosis.rows[0].activation
    (['0', '2'], 'ReLU')
    >>> diagnosis.exit_code  # no warning, no error: healthy
    0
"""

from lightning_gradguard.doctor.architecture import Architecture
from lightning_gradguard.doctor.checkup import diagnose
from lightning_gradguard.doctor.cli import main
from lightning_gradguard.doctor.inputs import default_loss
from lightning_gradguard.doctor.report import (
    FAIL_ON,
    SEVERITIES,
    Diagnosis,
    Finding,
    LayerRow,
    Unchecked,
)

__all__ = [
    "FAIL_ON",
    "SEVERITIES",
    "Architecture",
    "Diagnosis",
    "Finding",
    "LayerRow",
    "Unchecked",
    "default_loss",
    "diagnose",
    "main",
]

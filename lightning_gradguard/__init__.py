"""lightning_gradguard: drop-in PyTorch Lightning callbacks that keep gradients healthy.

Example:
    >>> import pytorch_lightning as pl
    >>> from lightning_gradguard import GradNormMonitor
    >>> trainer = pl.Trainer(callbacks=[GradNormMonitor()], logger=False)
"""

from lightning_gradguard.callbacks import AdaptiveGradClip, GradNormMonitor
from lightning_gradguard.mixin import GradGuardMixin

__version__ = "0.1.0"

__all__ = ["AdaptiveGradClip", "GradGuardMixin", "GradNormMonitor", "__version__"]

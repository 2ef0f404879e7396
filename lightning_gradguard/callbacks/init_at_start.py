"""``InitAtStart``: He / Glorot / orthogonal / GPT-2 normal init, or LSUV, before the first step.

Example:
    >>> import pytorch_lightning as pl
    >>> from lightning_gradguard import InitAtStart
    >>> trainer = pl.Trainer(callbacks=[InitAtStart("xavier_uniform", seed=1)], logger=False)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from typing_extensions import override

from lightning_gradguard._checks import check_int, check_number
from lightning_gradguard._compat import Callback, rank_zero_warn
from lightning_gradguard.callbacks._reinit_common import (
    check_named_scheme,
    check_seed,
    refuse_sharded,
    seeded_generator,
)
from lightning_gradguard.functional.init import _check_init_args, init_
from lightning_gradguard.functional.lsuv import lsuv_

if TYPE_CHECKING:
    import pytorch_lightning as pl

__all__ = [
    "InitAtStart",
]


class InitAtStart(Callback):
    """Apply He / Glorot / orthogonal / GPT-2 normal init, or LSUV, without editing the module.

    It runs once, before the first training step of a fresh fit (never when
    resuming from a checkpoint): named schemes in ``on_fit_start`` (after
    ``configure_model``, so layers built there are included), LSUV in
    ``on_train_start`` on the first training batch. Draws use ``seed``, so every
    rank gets the same weights; after LSUV, rank 0's weights are broadcast.

    Args:
        scheme: one of ``kaiming_normal``, ``kaiming_uniform``, ``xavier_normal``,
            ``xavier_uniform``, ``orthogonal``, ``normal`` or ``lsuv``.
        seed: seed of the random draws.
        input_fn: maps a training batch to the model's input for LSUV (default:
            the first element of a tuple/list batch, or the batch itself).
        nonlinearity: forced gain, see :func:`~lightning_gradguard.functional.init_`.
        std: std of ``scheme="normal"`` (GPT-2: 0.02).
        residual_projections: glob patterns of GPT-2 residual projections.
        n_layers: number of residual blocks (with ``residual_projections``).
        target_std: LSUV's target output std.
        tol: LSUV's tolerance.
        max_iters: LSUV's rescaling passes per layer.
    """

    def __init__(
        self,
        scheme: str = "kaiming_normal",
        seed: int = 0,
        input_fn: Callable[[Any], Any] | None = None,
        nonlinearity: str | None = None,
        std: float = 0.02,
        residual_projections: list[str] | None = None,
        n_layers: int | None = None,
        target_std: float = 1.0,
        tol: float = 0.1,
        max_iters: int = 10,
    ) -> None:
        self.scheme = check_named_scheme(scheme, "InitAtStart", lsuv=True)
        self.seed = check_seed(seed, "InitAtStart")
        self.input_fn = input_fn
        projections = tuple(residual_projections or ())
        if scheme != "lsuv":  # validate now (the patterns are checked against the model later)
            _check_init_args(scheme, nonlinearity, projections, n_layers, std, "InitAtStart")
        self.nonlinearity = nonlinearity
        self.std = std
        self.residual_projections = list(projections)
        self.n_layers = n_layers
        self.target_std = check_number(
            target_std, "target_std", "InitAtStart", low=0, low_open=True
        )
        self.tol = check_number(tol, "tol", "InitAtStart", low=0, low_open=True)
        self.max_iters = check_int(max_iters, "max_iters", "InitAtStart", low=1)
        self.report: Any = None

    @property
    def init_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``init_`` this callback passes (not for ``"lsuv"``)."""
        return {
            "nonlinearity": self.nonlinearity,
            "std": self.std,
            "residual_projections": tuple(self.residual_projections),
            "n_layers": self.n_layers,
        }

    @property
    def lsuv_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``lsuv_`` this callback passes (``"lsuv"`` only)."""
        return {"target_std": self.target_std, "tol": self.tol, "max_iters": self.max_iters}

    @staticmethod
    def _resuming(trainer: pl.Trainer) -> bool:
        return bool(getattr(trainer, "ckpt_path", None)) or int(trainer.global_step) > 0

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.scheme == "lsuv" or self._resuming(trainer):
            return
        refuse_sharded(pl_module, "InitAtStart")
        device = next(pl_module.parameters(), torch.empty(0)).device
        generator = seeded_generator(self.seed, 0, device)
        self.report = init_(pl_module, self.scheme, generator=generator, **self.init_kwargs)
        if not self.report:
            rank_zero_warn(
                f"InitAtStart: {type(pl_module).__name__} has no Linear/Conv layer to initialize."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.scheme != "lsuv" or self._resuming(trainer):
            return
        refuse_sharded(pl_module, "InitAtStart")
        loader: Any = trainer.train_dataloader
        batch = next(iter(loader))
        inputs = (
            self.input_fn(batch)
            if self.input_fn
            else (batch[0] if isinstance(batch, (tuple, list)) else batch)
        )
        inputs = pl_module.transfer_batch_to_device(inputs, pl_module.device, 0)
        device = next(pl_module.parameters(), torch.empty(0)).device
        generator = seeded_generator(self.seed, 0, device)
        self.report = lsuv_(pl_module, inputs, generator=generator, **self.lsuv_kwargs)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            with torch.no_grad():
                for parameter in pl_module.parameters():
                    dist.broadcast(parameter.data, src=0)

"""A 2-process CPU (gloo) DDP run logging to an offline W&B run; launched by the tests.

Usage: ``python wandb_run.py OUT_DIR``. One process per rank, started by
``distributed_helpers.launch_ranks`` with torchrun-style variables; the test sets
``WANDB_MODE=offline``, ``WANDB_SILENT`` and the ``WANDB_*_DIR`` folders in the
environment. Both ranks build the same ``pytorch_lightning.Trainer`` (``strategy="ddp"``,
SGD) with a ``WandbLogger(offline=True, save_dir=OUT_DIR/wandb_save)`` and
``Corrupter``, ``GradNormMonitor``, ``AdaptiveGradClip``, ``DeadUnitMonitor`` and
``HealthReport`` (histograms every ``HIST_EVERY`` steps, pictures every
``PICTURE_EVERY`` steps into ``OUT_DIR/pictures``).

The model is ``TinyMLP(16, 32, 32, 4)`` whose second hidden layer is dead from the
start (bias -100), so ``DeadUnitMonitor`` reports it dying and swaps it. ``Corrupter``
is listed first: at ``FAULT_STEP``, on rank 1 only, it puts a NaN into one gradient,
after DDP's all-reduce, so only rank 1's gradients are non-finite and both ranks must
skip that step together.

After the fit, rank 0 finishes the W&B run, and every rank writes
``OUT_DIR/rank<r>.json``: the PNG files it saved (``plots.save_png`` is wrapped to
record them), what its ``WandbLogger.experiment`` was and whether a W&B run existed in
the process, the min, max and element count of every layer's gradients at the
histogram steps (read in the LightningModule's ``on_before_optimizer_step``, which
Lightning calls after every callback's, so these are the gradients ``HealthReport``
histogrammed), its event log, the clipper's skip count and the final parameters.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import distributed_helpers as h
import pytorch_lightning as pl
import torch
from helpers import TinyMLP

from lightning_gradguard import (
    AdaptiveGradClip,
    DeadUnitMonitor,
    GradNormMonitor,
    HealthReport,
    plots,
)
from lightning_gradguard.record import run_record

STEPS = 8  # one epoch: 256 samples, 2 ranks, 16 per batch
BATCH_PER_RANK = 16
HIST_EVERY = 2
PICTURE_EVERY = 4
FAULT_STEP = 4  # a histogram step: rank 1 histograms its NaN gradients there
PROJECT = "gradguard-ddp-tests"


class Module(TinyMLP):
    """``TinyMLP(16, 32, 32, 4)``; the ReLU after ``net.2`` never fires (bias -100)."""

    def __init__(self) -> None:
        super().__init__(sizes=(16, 32, 32, 4), batch_size=BATCH_PER_RANK)
        with torch.no_grad():
            self.net[2].bias.fill_(-100.0)
        self.grad_bounds: dict[int, dict[str, list[float]]] = {}

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        step = int(self.trainer.global_step)
        if step % HIST_EVERY:
            return
        bounds = {}
        for name in ("net.0", "net.2", "net.4"):
            grads = [p.grad.reshape(-1).double() for p in self.get_submodule(name).parameters()]
            flat = torch.cat(grads)
            bounds[name] = [float(flat.min()), float(flat.max()), flat.numel()]
        self.grad_bounds[step] = bounds


class Corrupter(pl.Callback):
    """Listed first: on rank 1 only, a NaN into one gradient at ``FAULT_STEP``."""

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if trainer.global_rank == 1 and trainer.global_step == FAULT_STEP:
            pl_module.net[4].weight.grad[0, 0] = float("nan")


def main(out_dir: Path) -> None:
    from pytorch_lightning.loggers import WandbLogger

    torch.set_num_threads(1)
    saved: list[list[Any]] = []
    save_png = plots.save_png
    trainer: pl.Trainer | None = None

    def recording_save_png(fig: Any, path: Any, *args: Any, **kwargs: Any) -> Path:
        saved.append([None if trainer is None else int(trainer.global_step), str(path)])
        return save_png(fig, path, *args, **kwargs)

    plots.save_png = recording_save_png  # type: ignore[assignment]

    torch.manual_seed(0)
    module = Module()
    logger = WandbLogger(offline=True, save_dir=str(out_dir / "wandb_save"), project=PROJECT)
    clipper = AdaptiveGradClip(policy="norm", log_every_n_steps=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=h.WORLD_SIZE,
        strategy="ddp",
        max_epochs=1,
        max_steps=STEPS,
        logger=logger,
        callbacks=[
            Corrupter(),
            GradNormMonitor(
                log_every_n_steps=1, update_ratio_every_n_steps=1, param_norm_every_n_steps=1
            ),
            clipper,
            DeadUnitMonitor(every_n_steps=4, window=2, rescue="threshold"),
            HealthReport(
                picture_every_n_steps=PICTURE_EVERY,
                histogram_every_n_steps=HIST_EVERY,
                out_dir=str(out_dir / "pictures"),
            ),
        ],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out_dir),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)

    import wandb

    rank = torch.distributed.get_rank()
    result = {
        "global_rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "backend": torch.distributed.get_backend(),
        "strategy": type(trainer.strategy).__name__,
        "global_step": trainer.global_step,
        "experiment_type": type(logger.experiment).__name__,
        "wandb_run_in_process": wandb.run is not None,
        "saved_pngs": saved,
        "grad_bounds": {str(step): v for step, v in module.grad_bounds.items()},
        "events": [e.row() for e in run_record(trainer).events],
        "skipped_steps": clipper.skipped_steps,
        "params_end": h.flat(list(module.parameters())),
    }
    if trainer.is_global_zero:
        logger.experiment.finish()
    h.write_json(out_dir / f"rank{rank}.json", result)


if __name__ == "__main__":
    h.run_rank(main, Path(sys.argv[1]))  # barrier, destroy every group, os._exit

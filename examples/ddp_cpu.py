"""Two-process DDP on CPU, with the one-line ``GradGuard``.

``Trainer(accelerator="cpu", devices=2, strategy="ddp")`` starts a second process
running this same script; the two talk through gloo. Each rank trains on its half
of every epoch of scikit-learn's digits data. DDP averages the gradients across the
ranks before ``on_before_optimizer_step``, so GradGuard sees the same gradients on
every rank: the monitor logs the same norms, the clipper takes the same decisions,
and the replicas stay identical. Rank 0 alone writes the CSV metrics and prints the
result; the script checks at the end that both ranks hold the same parameters.

Usage::

    python examples/ddp_cpu.py                      # 5 epochs, about 20 s on a laptop
    python examples/ddp_cpu.py --max-steps 10 --out /tmp/ddp
    python examples/ddp_cpu.py --policy autoclip
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from digits import DigitsClassifier, DigitsDataModule, metric_values, two_process_args
from pytorch_lightning.loggers import CSVLogger

from lightning_gradguard import GradGuard

warnings.filterwarnings("ignore", ".*does not have many workers.*")
# The 360 test images split evenly over 2 ranks: no image is counted twice.
warnings.filterwarnings("ignore", ".*Using `DistributedSampler` with the dataloaders.*")


class ReplicaCheck(pl.Callback):
    """At the end of training, compare every parameter across the ranks, bit for bit."""

    def __init__(self) -> None:
        self.identical: bool | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sums = torch.stack([p.detach().double().sum() for p in pl_module.parameters()])
        largest, smallest = sums.clone(), sums.clone()
        torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX)
        torch.distributed.all_reduce(smallest, op=torch.distributed.ReduceOp.MIN)
        self.identical = torch.equal(largest, smallest)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    description = __doc__.split("\n\n")[0] if __doc__ else None
    args: argparse.Namespace = two_process_args("ddp_cpu", description, argv)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Train on two CPU processes; rank 0 prints and returns a summary, rank 1 None."""
    args = parse_args(argv)
    torch.set_num_threads(1)  # two processes on a few cores: no oversubscription
    pl.seed_everything(0, verbose=False)
    # Monitor, clipper with step skipping, dead units (windows of 5 batches every 20 steps
    # in this short run) and the report: the whole bundle, one pass over the gradients.
    guard = GradGuard(clip=args.policy, dead_unit_args={"every_n_steps": 20, "window": 5})
    replicas = ReplicaCheck()
    logger = CSVLogger(args.out, name="ddp_cpu")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",  # gloo on CPU
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        log_every_n_steps=args.log_every,
        logger=logger,
        callbacks=[guard, replicas],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model, data = DigitsClassifier(), DigitsDataModule(batch_size=args.batch_size)
    trainer.fit(model, datamodule=data)
    (tested,) = trainer.test(model, datamodule=data, verbose=False)
    if not trainer.is_global_zero:
        return None

    metrics_csv = Path(logger.log_dir) / "metrics.csv"
    norms = metric_values(metrics_csv, "grad_norm/total")
    summary = {
        "world_size": trainer.world_size,
        "backend": str(torch.distributed.get_backend()),
        "steps": trainer.global_step,
        "grad_norm_first": norms[0],
        "grad_norm_last": norms[-1],
        "clip_threshold_last": metric_values(metrics_csv, "clip/threshold")[-1],
        "skipped_steps": guard.clipper.skipped_steps if guard.clipper else 0,
        "replicas_identical": replicas.identical,
        "test_accuracy": tested["test/accuracy"],
        "metrics_csv": str(metrics_csv),
    }
    print(
        f"DDP on CPU: {summary['world_size']} processes ({summary['backend']}), "
        f"{summary['steps']} optimizer steps, batch {args.batch_size} per rank\n"
        f"grad_norm/total   {norms[0]:.3g} at the first logged step, {norms[-1]:.3g} at the last "
        f"({len(norms)} logged, all finite: {all(map(math.isfinite, norms))})\n"
        f"clip/threshold    {summary['clip_threshold_last']:.3g} at the last logged step "
        f"({args.policy}); skipped steps: {summary['skipped_steps']}\n"
        f"replicas          identical parameters on every rank: {summary['replicas_identical']}\n"
        f"test accuracy     {summary['test_accuracy']:.3f}\n"
        f"metrics           {metrics_csv}"
    )
    return summary


if __name__ == "__main__":
    main()

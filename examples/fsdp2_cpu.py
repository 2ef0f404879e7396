"""FSDP2 on CPU, with the one-line ``GradGuard``.

Lightning's ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)``
starts a second process running this same script (gloo between the two) and hands
the model a device mesh. The model shards itself in ``configure_model`` with
PyTorch's FSDP2 ``fully_shard``: each rank then holds half of the rows of every
weight, and the gradients are ``DTensor`` shards. GradGuard's monitor and clipper
sum the local squared norms and reduce them across the ranks before the square
root, so they log and clip with the norms of the whole model; its dead-unit counts
are summed across the ranks too.
(Lightning's ``FSDPStrategy``, FSDP1, needs a GPU; this one runs on CPU.)

Usage::

    python examples/fsdp2_cpu.py                    # 5 epochs, about 20 s on a laptop
    python examples/fsdp2_cpu.py --max-steps 10 --out /tmp/fsdp2
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
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from lightning_gradguard import GradGuard

warnings.filterwarnings("ignore", ".*does not have many workers.*")
# The 360 test images split evenly over 2 ranks: no image is counted twice.
warnings.filterwarnings("ignore", ".*Using `DistributedSampler` with the dataloaders.*")


class ShardedDigitsClassifier(DigitsClassifier):
    """``DigitsClassifier``, sharded with FSDP2 over the strategy's data-parallel mesh."""

    def configure_model(self) -> None:
        if isinstance(self.head.weight, DTensor):
            return  # already sharded: Lightning calls this hook again for trainer.test
        assert self.device_mesh is not None, "run with ModelParallelStrategy"
        mesh = self.device_mesh["data_parallel"]
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fully_shard(module, mesh=mesh)  # one all-gather per layer in forward
        fully_shard(self, mesh=mesh)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    description = __doc__.split("\n\n")[0] if __doc__ else None
    args: argparse.Namespace = two_process_args("fsdp2_cpu", description, argv)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Train on two CPU processes; rank 0 prints and returns a summary, rank 1 None."""
    args = parse_args(argv)
    torch.set_num_threads(1)  # two processes on a few cores: no oversubscription
    pl.seed_everything(0, verbose=False)
    # Monitor, clipper with step skipping, dead units (windows of 5 batches every 20 steps
    # in this short run) and the report: the whole bundle, one pass over the gradients.
    guard = GradGuard(clip=args.policy, dead_unit_args={"every_n_steps": 20, "window": 5})
    logger = CSVLogger(args.out, name="fsdp2_cpu")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        log_every_n_steps=args.log_every,
        logger=logger,
        callbacks=[guard],
        enable_checkpointing=False,  # a sharded checkpoint is a folder per step: not needed here
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model, data = ShardedDigitsClassifier(), DigitsDataModule(batch_size=args.batch_size)
    trainer.fit(model, datamodule=data)
    (tested,) = trainer.test(model, datamodule=data, verbose=False)  # every rank: collectives
    if not trainer.is_global_zero:
        return None

    first_layer = model.net[0]
    assert isinstance(first_layer, nn.Linear)
    weight = first_layer.weight
    sharded = isinstance(weight, DTensor)
    local_rows = weight.to_local().shape[0] if isinstance(weight, DTensor) else weight.shape[0]
    metrics_csv = Path(logger.log_dir) / "metrics.csv"
    norms = metric_values(metrics_csv, "grad_norm/total")
    summary = {
        "world_size": trainer.world_size,
        "strategy": type(trainer.strategy).__name__,
        "steps": trainer.global_step,
        "sharded": sharded,
        "rows_full": weight.shape[0],
        "rows_rank0": local_rows,
        "grad_norm_first": norms[0],
        "grad_norm_last": norms[-1],
        "clip_threshold_last": metric_values(metrics_csv, "clip/threshold")[-1],
        "skipped_steps": guard.clipper.skipped_steps if guard.clipper else 0,
        "test_accuracy": tested["test/accuracy"],
        "metrics_csv": str(metrics_csv),
    }
    print(
        f"FSDP2 on CPU: {summary['world_size']} processes ({summary['strategy']}), "
        f"{summary['steps']} optimizer steps, batch {args.batch_size} per rank\n"
        f"sharding          net.0.weight is a DTensor: {sharded}; {local_rows} of its "
        f"{weight.shape[0]} rows on rank 0\n"
        f"grad_norm/total   {norms[0]:.3g} at the first logged step, {norms[-1]:.3g} at the last "
        f"({len(norms)} logged, all finite: {all(map(math.isfinite, norms))})\n"
        f"clip/threshold    {summary['clip_threshold_last']:.3g} at the last logged step "
        f"({args.policy}); skipped steps: {summary['skipped_steps']}\n"
        f"test accuracy     {summary['test_accuracy']:.3f}\n"
        f"metrics           {metrics_csv}"
    )
    return summary


if __name__ == "__main__":
    main()

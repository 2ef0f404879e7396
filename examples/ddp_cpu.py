"""Two-process DDP on CPU, with the one-line ``GradGuard``.

``Trainer(accelerator="cpu", devices=2, strategy="ddp")`` starts a second process
running this same script; the two talk through gloo, and each trains on its half of
every epoch. DDP averages the gradients before ``on_before_optimizer_step``, so
GradGuard sees the same gradients on every rank: the same norms, the same clipping
decisions, identical replicas (checked at the end). Rank 0 alone writes the metrics.

Usage::

    python examples/ddp_cpu.py                      # 5 epochs, about 20 s on a laptop
    python examples/ddp_cpu.py --max-steps 10 --out /tmp/ddp
"""

import argparse
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from digits import DigitsClassifier, DigitsDataModule
from pytorch_lightning.loggers import CSVLogger

from lightning_gradguard import GradGuard

warnings.filterwarnings("ignore", ".*does not have many workers.*")
# The 360 test images split evenly over 2 ranks: no image is counted twice.
warnings.filterwarnings("ignore", ".*Using `DistributedSampler` with the dataloaders.*")


class ReplicaCheck(pl.Callback):
    """At the end of training, compare every parameter across the ranks, bit for bit."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sums = torch.stack([p.detach().double().sum() for p in pl_module.parameters()])
        largest, smallest = sums.clone(), sums.clone()
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        self.identical = torch.equal(largest, smallest)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Two-process DDP on CPU, with GradGuard")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("outputs/ddp_cpu"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)  # two processes on a few cores: no oversubscription
    pl.seed_everything(0)
    # Monitor, ZClip with step skipping, dead units (windows of 5 batches every 20 steps
    # in this short run) and the report: the whole bundle, one pass over the gradients.
    guard = GradGuard(clip="zclip", dead_unit_args={"every_n_steps": 20, "window": 5})
    replicas = ReplicaCheck()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",  # gloo on CPU
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        log_every_n_steps=args.log_every,
        logger=CSVLogger(args.out, name="ddp_cpu"),
        callbacks=[guard, replicas],
        enable_checkpointing=False,
    )
    model, data = DigitsClassifier(), DigitsDataModule()
    trainer.fit(model, datamodule=data)
    (tested,) = trainer.test(model, datamodule=data, verbose=False)
    if trainer.is_global_zero:
        print(
            f"DDP on CPU: {trainer.world_size} processes ({dist.get_backend()}), "
            f"{trainer.global_step} optimizer steps, batch 64 per rank\n"
            f"identical parameters on every rank: {replicas.identical}\n"
            f"test accuracy {tested['test/accuracy']:.3f}; metrics in {trainer.logger.log_dir}"
        )


if __name__ == "__main__":
    main()

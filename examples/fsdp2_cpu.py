"""FSDP2 on CPU, with the one-line ``GradGuard``.

Lightning's ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)``
starts a second process (gloo between the two) and hands the model a device mesh; the
model shards itself in ``configure_model`` with FSDP2's ``fully_shard``. Each rank then
holds half of the rows of every weight and the gradients are ``DTensor`` shards.
GradGuard reduces the local squared norms across the ranks before the square root, so
it logs and clips with the norms of the whole model: those of the DDP example.
(Lightning's ``FSDPStrategy``, FSDP1, needs a GPU; this one runs on CPU.)

Usage::

    python examples/fsdp2_cpu.py                    # 5 epochs, about 20 s on a laptop
    python examples/fsdp2_cpu.py --max-steps 10 --out /tmp/fsdp2
"""

import argparse
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from digits import DigitsClassifier, DigitsDataModule
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
        mesh = self.device_mesh["data_parallel"]
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fully_shard(module, mesh=mesh)  # one all-gather per layer in forward
        fully_shard(self, mesh=mesh)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="FSDP2 on CPU, with GradGuard")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("outputs/fsdp2_cpu"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)  # two processes on a few cores: no oversubscription
    pl.seed_everything(0)
    guard = GradGuard(clip="zclip", dead_unit_args={"every_n_steps": 20, "window": 5})
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        log_every_n_steps=args.log_every,
        logger=CSVLogger(args.out, name="fsdp2_cpu"),
        callbacks=[guard],
        enable_checkpointing=False,  # a sharded checkpoint is a folder per step: not needed
    )
    model, data = ShardedDigitsClassifier(), DigitsDataModule()
    trainer.fit(model, datamodule=data)
    (tested,) = trainer.test(model, datamodule=data, verbose=False)  # every rank: collectives
    weight = model.net[0].weight
    if trainer.is_global_zero:
        print(
            f"FSDP2 on CPU: {trainer.world_size} processes ({type(trainer.strategy).__name__}), "
            f"{trainer.global_step} optimizer steps, batch 64 per rank\n"
            f"net.0.weight is a DTensor: {isinstance(weight, DTensor)}; "
            f"{weight.to_local().shape[0]} of its {weight.shape[0]} rows on rank 0\n"
            f"test accuracy {tested['test/accuracy']:.3f}; metrics in {trainer.logger.log_dir}"
        )


if __name__ == "__main__":
    main()

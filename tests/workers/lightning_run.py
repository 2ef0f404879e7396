"""One 2-process CPU (gloo) Lightning run with ``GradNormMonitor``; launched by the tests.

Usage: ``python lightning_run.py {ddp|fsdp} OUT_DIR``

``ddp`` uses ``pytorch_lightning`` with ``strategy="ddp"``; ``fsdp`` uses
``lightning.pytorch`` with ``ModelParallelStrategy`` and FSDP2 ``fully_shard``
(so both import styles are exercised). Lightning's subprocess launcher re-runs
this script for rank 1. Every rank writes ``OUT_DIR/rank<r>.json``: every
``log_metrics`` call its logger received (the logger is deliberately *not*
rank-zero-only, so a callback that logs on rank 1 would show up), and whether each
batch it trained on was the one the test expects.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import distributed_helpers as h
import torch
from helpers import capture_logger
from torch.utils.data import DataLoader

from lightning_gradguard import GradNormMonitor


def main(mode: str, out_dir: Path) -> None:
    torch.set_num_threads(1)
    pl = importlib.import_module("pytorch_lightning" if mode == "ddp" else "lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = h.make_net()
            self.data = h.make_dataset()
            self.batch_checks: list[bool] = []

        def configure_model(self) -> None:
            if mode != "fsdp":
                return
            h.shard_linear_layers(self.net, self.device_mesh["data_parallel"])

        def train_dataloader(self) -> DataLoader:
            return h.rank_loader(self.data, self.trainer, h.BATCH_PER_RANK)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            expected = self.data.tensors[0][h.rank_indices(self.trainer.global_rank, batch_idx)]
            self.batch_checks.append(bool(torch.equal(x, expected)))
            return h.loss_fn(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=h.LR)

    if mode == "ddp":
        strategy: Any = "ddp"
    else:
        strategy = pl.strategies.ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    logger = capture_logger(pl.__name__)
    module = Module()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=h.WORLD_SIZE,
        strategy=strategy,
        max_epochs=1,
        max_steps=h.STEPS,
        logger=logger,
        callbacks=[
            GradNormMonitor(
                log_every_n_steps=1, update_ratio_every_n_steps=1, param_norm_every_n_steps=1
            ),
            GradNormMonitor(
                log_every_n_steps=1,
                update_ratio_every_n_steps=1,
                param_norm_every_n_steps=1,
                group_by="parameter",
                norm_type="inf",
            ),
        ],
        use_distributed_sampler=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out_dir),
    )
    trainer.fit(module)
    from torch.distributed.tensor import DTensor

    params = dict(module.named_parameters())
    local = {n: p.to_local() if isinstance(p, DTensor) else p for n, p in params.items()}
    h.write_json(
        out_dir / f"rank{trainer.global_rank}.json",
        {
            "world_size": trainer.world_size,
            "backend": torch.distributed.get_backend(),
            "strategy": type(trainer.strategy).__name__,
            "params_are_dtensors": [isinstance(p, DTensor) for p in params.values()],
            "local_shapes": {n: list(t.shape) for n, t in local.items()},
            "batch_checks": module.batch_checks,
            "calls": [
                {"step": step, "metrics": {k: float(v) for k, v in metrics.items()}}
                for step, metrics in logger.calls
            ],
        },
    )

    # Rank 0 returns only when every rank has written its file and exited cleanly.
    h.leave_group()  # before waiting: the ranks Lightning started end through it too
    children = getattr(trainer.strategy.launcher, "procs", [])  # ranks Lightning started
    codes = [child.wait(timeout=120) for child in children]
    if any(codes):
        sys.exit(f"ranks started by Lightning exited with {codes}")


if __name__ == "__main__":
    h.run_rank(main, sys.argv[1], Path(sys.argv[2]))  # os._exit, see run_rank

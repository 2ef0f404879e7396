"""2-process CPU (gloo) Lightning runs with ``SpikeRecovery``; launched by the tests.

Usage: ``python spike_run.py OUT_DIR [SCENARIO ...]`` (default: both scenarios). One
process per rank, started by ``distributed_helpers.launch_ranks``.

- ``ddp`` (``pytorch_lightning``, ``strategy="ddp"``, Adam): only rank 1's loss spikes
  (x1000) at ``SPIKE_STEP``.
- ``fsdp`` (``lightning.pytorch``, ``ModelParallelStrategy`` + FSDP2 ``fully_shard``,
  Adam): only rank 0's loss spikes at ``SPIKE_STEP``.

Both detect on the loss only, so the other rank sees nothing itself: it must roll back
because the ranks decide together. After every batch a recording callback (listed after
``SpikeRecovery``) stores the full parameters and the full Adam state (``full_tensor()``
of FSDP2's shards); every rank writes ``OUT_DIR/<scenario>.rank<r>.json``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import distributed_helpers as h
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import SpikeRecovery

SCENARIOS = ("ddp", "fsdp")
STEPS = 16
SPIKE_STEP = 9
SPIKE_RANK = {"ddp": 1, "fsdp": 0}
RECOVERY_ARGS: dict[str, Any] = {
    "signals": ["loss"],
    "every_n_steps": 4,
    "warmup": 3,
    "window": 4,
    "rtol": 20.0,
}


def make_dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(h.SEED + 7)
    n = h.WORLD_SIZE * h.BATCH_PER_RANK * STEPS
    x = torch.randn(n, h.LAYER_SIZES[0], generator=generator)
    y = torch.randn(n, h.LAYER_SIZES[-1], generator=generator)
    return TensorDataset(x, y)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def run(pl: Any, mode: str) -> dict[str, Any]:
    states: list[list[float]] = []

    class Recorder(pl.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            params = list(pl_module.net.parameters())
            flat = h.flat([_full(p.detach()) for p in params])
            optimizer = trainer.optimizers[0]
            for p in params:
                for _, value in sorted(optimizer.state.get(p, {}).items()):
                    if isinstance(value, torch.Tensor):
                        flat.extend(h.flat([_full(value).reshape(-1)]))
            states.append(flat)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = h.make_net()
            self.data = make_dataset()

        def configure_model(self) -> None:
            if mode != "fsdp":
                return
            h.shard_linear_layers(self.net, self.device_mesh["data_parallel"])

        def train_dataloader(self) -> DataLoader:
            return h.rank_loader(self.data, self.trainer, h.BATCH_PER_RANK)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = h.loss_fn(self.net(x), y)
            if batch_idx == SPIKE_STEP and self.trainer.global_rank == SPIKE_RANK[mode]:
                loss = loss * 1000.0
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=h.ADAM_LR)

    recovery = SpikeRecovery(**RECOVERY_ARGS)
    if mode == "fsdp":
        strategy: Any = pl.strategies.ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1
        )
    else:
        strategy = "ddp"
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=h.WORLD_SIZE,
        strategy=strategy,
        max_epochs=1,
        logger=False,
        callbacks=[recovery, Recorder()],
        use_distributed_sampler=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Module())
    return {
        "global_rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "strategy": type(trainer.strategy).__name__,
        "rollbacks": recovery.rollbacks,
        "snapshot_bytes": recovery._snapshots[0].nbytes,
        "states": states,
    }


def main(out_dir: Path, scenarios: list[str]) -> None:
    torch.set_num_threads(1)
    for scenario in scenarios or SCENARIOS:
        pl = importlib.import_module(
            "lightning.pytorch" if scenario == "fsdp" else "pytorch_lightning"
        )
        result = run(pl, scenario)
        h.write_json(out_dir / f"{scenario}.rank{torch.distributed.get_rank()}.json", result)


if __name__ == "__main__":
    h.run_rank(main, Path(sys.argv[1]), sys.argv[2:])  # barrier, destroy every group, os._exit

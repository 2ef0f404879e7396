"""2-process CPU (gloo) Lightning runs with ``DeadUnitMonitor``; launched by the tests.

Usage: ``python dead_units_run.py OUT_DIR [SCENARIO ...]`` (default: every scenario of
``SCENARIOS``, in order). One process per rank, started by
``distributed_helpers.launch_ranks`` with torchrun-style variables, so the same two
processes run one ``Trainer.fit`` per scenario (``pytorch_lightning``, ``strategy="ddp"``,
SGD) on one process group.

- ``split``: ``make_dead_net("split")``, lr 0 (the model never moves, so the tests can
  replay the windows' batches), ``rescue="never"``.
- ``threshold``: ``make_dead_net("threshold")``, lr ``DEAD_THRESHOLD_LR``,
  ``rescue="threshold"``.

Each rank gets its own ``DistributedSampler(shuffle=False)`` (``use_distributed_sampler
=False``) and a ``CaptureLogger``, which records on every rank (it is not rank-zero
restricted). After each scenario every rank writes ``OUT_DIR/<scenario>.rank<r>.json``:
the sample indices of every batch, the activation types the forward ran with at every
step, every ``log_metrics`` call, the monitor's reduced ``last_stats``, its swap events,
and the parameters before and after the fit.
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
from helpers import CaptureLogger
from torch.utils.data import DataLoader

from lightning_gradguard import DeadUnitMonitor
from lightning_gradguard.functional.surgery import activation_types

SCENARIOS = ("split", "threshold")


class Module(pl.LightningModule):
    def __init__(self, kind: str, lr: float) -> None:
        super().__init__()
        self.net = h.make_dead_net(kind)
        self.data = h.make_dead_dataset()
        self.lr = lr
        self.activations = [n for n, m in self.named_modules() if isinstance(m, torch.nn.ReLU)]
        self.batch_indices: list[list[int]] = []
        self.types_per_step: list[list[str]] = []

    def train_dataloader(self) -> DataLoader:
        return h.rank_loader(self.data, self.trainer, h.DEAD_BATCH_PER_RANK)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, index = batch
        self.batch_indices.append(index.tolist())
        self.types_per_step.append(activation_types(self, self.activations))
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def run(scenario: str, out_dir: Path) -> dict[str, Any]:
    if scenario == "split":
        module = Module("split", lr=0.0)
        monitor = DeadUnitMonitor(every_n_steps=h.DEAD_EVERY_N_STEPS, window=h.DEAD_WINDOW)
    else:
        module = Module("threshold", lr=h.DEAD_THRESHOLD_LR)
        monitor = DeadUnitMonitor(
            every_n_steps=h.DEAD_EVERY_N_STEPS,
            window=h.DEAD_WINDOW,
            rescue="threshold",
            dead_threshold=h.DEAD_THRESHOLD,
        )
    params_start = h.flat(list(module.parameters()))
    logger = CaptureLogger()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=h.WORLD_SIZE,
        strategy="ddp",
        max_epochs=1,
        max_steps=h.DEAD_STEPS,
        logger=logger,
        callbacks=[monitor],
        use_distributed_sampler=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out_dir),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    return {
        "global_rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "backend": torch.distributed.get_backend(),
        "strategy": type(trainer.strategy).__name__,
        "global_step": trainer.global_step,
        "batch_indices": module.batch_indices,
        "activations": module.activations,
        "types_per_step": module.types_per_step,
        "types_end": activation_types(module, module.activations),
        "calls": [[step, metrics] for step, metrics in logger.calls],
        "last_stats": monitor.last_stats,
        "events": monitor.events,
        "swapped": monitor.swapped,
        "params_start": params_start,
        "params_end": h.flat(list(module.parameters())),
    }


def main(out_dir: Path, scenarios: list[str]) -> None:
    torch.set_num_threads(1)
    for scenario in scenarios or SCENARIOS:
        result = run(scenario, out_dir)
        h.write_json(out_dir / f"{scenario}.rank{torch.distributed.get_rank()}.json", result)


if __name__ == "__main__":
    h.run_rank(main, Path(sys.argv[1]), sys.argv[2:])  # barrier, destroy every group, os._exit

"""2-process CPU (gloo) DDP runs with a fault on rank 1 only; launched by ``tests/test_faults.py``.

Usage: ``python faults_run.py OUT_DIR``. One process per rank, started by
``distributed_helpers.launch_ranks``; the two processes run one ``Trainer.fit`` per
scenario on one process group and write ``OUT_DIR/<scenario>.rank<r>.json``.

- ``spike``: ``AdaptiveGradClip(ZClip, skip_spikes=True)``; at ``FAULT_SPIKE_STEP`` rank 1
  alone multiplies its (already all-reduced) gradients by ``FAULT_SPIKE_FACTOR``: a finite
  spike that only rank 1 sees. Both ranks must skip the step and fold the same number
  into ZClip's statistics, so that thresholds and parameters stay identical.
- ``nan``: ``GradGuard`` (monitor + clipper); at ``FAULT_NAN_STEP`` rank 1 alone puts a NaN into
  ``net.2``'s weight gradient. Rank 0, which logs and warns, must count the step and
  name the layer.
"""

from __future__ import annotations

import math
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

from lightning_gradguard import AdaptiveGradClip, GradGuard
from lightning_gradguard.functional import ZClip
from lightning_gradguard.record import run_record

SCENARIOS = ("spike", "nan")


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _plain(value.double().tolist())
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def run(scenario: str, out_dir: Path) -> dict[str, Any]:
    record: dict[str, Any] = {"params": [], "policy_state": []}

    class Corrupter(pl.Callback):
        """Listed first: the fault on rank 1 only, after DDP's all-reduce."""

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            if trainer.global_rank != 1:
                return
            step = trainer.global_step
            if scenario == "spike" and step == h.FAULT_SPIKE_STEP:
                for p in pl_module.parameters():
                    p.grad.mul_(h.FAULT_SPIKE_FACTOR)
            if scenario == "nan" and step == h.FAULT_NAN_STEP:
                pl_module.net[2].weight.grad[0, 0] = float("nan")

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = h.make_net()
            self.data = h.make_clip_dataset()

        def train_dataloader(self) -> DataLoader:
            return h.rank_loader(self.data, self.trainer, h.BATCH_PER_RANK)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return h.loss_fn(self.net(x), y)

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            record["params"].append(h.flat(list(self.net.parameters())))
            state = clipper._states.get(0)
            record["policy_state"].append(_plain(state.policy.state_dict()) if state else None)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=h.LR)

    if scenario == "spike":
        clipper = AdaptiveGradClip(
            policy=ZClip(**h.ZCLIP_ARGS),
            skip_spikes=True,
            spike_window=8,
            spike_min_samples=3,
            log_every_n_steps=1,
        )
        guard: Any = clipper
    else:
        guard = GradGuard(clip="norm", dead_units=False, report=False, log_every_n_steps=1)
        clipper = guard.clipper
    logger = CaptureLogger()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=h.WORLD_SIZE,
        strategy="ddp",
        max_epochs=1,
        max_steps=h.CLIP_STEPS,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[Corrupter(), guard],
        use_distributed_sampler=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out_dir),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Module())
    record.update(
        global_rank=trainer.global_rank,
        global_step=trainer.global_step,
        skipped_steps=clipper.skipped_steps,
        nonfinite_steps=[
            v
            for _, v in logger.by_key("grad_norm/nonfinite_steps").get(
                "grad_norm/nonfinite_steps", []
            )
        ],
        events=[
            {"kind": e.kind, "layer": ", ".join(e.layers), "step": e.step}
            for e in run_record(trainer).events
        ],
        warnings=[str(w.message) for w in caught if "gradguard" in str(w.filename)],
    )
    return record


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    for scenario in SCENARIOS:
        result = run(scenario, out_dir)
        h.write_json(out_dir / f"{scenario}.rank{torch.distributed.get_rank()}.json", result)


if __name__ == "__main__":
    h.run_rank(main, Path(sys.argv[1]))  # barrier, destroy every group, os._exit

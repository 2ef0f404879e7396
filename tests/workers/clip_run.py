"""2-process CPU (gloo) Lightning runs with ``AdaptiveGradClip``; launched by the tests.

Usage: ``python clip_run.py OUT_DIR [SCENARIO ...]`` (default: every scenario of
``SCENARIOS``, in order). One process per rank, started by
``distributed_helpers.launch_ranks`` with torchrun-style variables, so the same two
processes run one ``Trainer.fit`` per scenario on one process group: starting Python
and importing Lightning costs seconds, a fit here a fraction of one.

- ``ddp_*`` (``pytorch_lightning``, ``strategy="ddp"``, SGD): ``FixedNorm``, ``ZClip``,
  ``AutoClip``, ``GuardClip``.
- ``fsdp_*`` (``lightning.pytorch``, ``ModelParallelStrategy`` + FSDP2 ``fully_shard``,
  SGD): ``FixedNorm``, ``AGC`` and ``GuardClip`` (its weight norm over the shards).
- ``fault_zclip`` (``pytorch_lightning``, ``strategy="ddp"``, Adam): ``ZClip``, and
  rank 1 alone puts a NaN into one gradient at ``FAULT_STEP``, after DDP's all-reduce
  (a callback listed before the clipper).

After each scenario every rank writes ``OUT_DIR/<scenario>.rank<r>.json``: per step,
the threshold the policy returned, the clipped gradients (full tensors, read in the
LightningModule's ``on_before_optimizer_step``, which Lightning calls after every
callback's), the parameters and optimizer state after the step and the policy's
state; at the end ``skipped_steps``.
"""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import distributed_helpers as h
import torch
from torch.utils.data import DataLoader

from lightning_gradguard import AdaptiveGradClip
from lightning_gradguard.functional import AGC, AutoClip, FixedNorm, GuardClip, ZClip

# In this order: the fault run last, so a hang there leaves the other results written.
SCENARIOS = (
    "ddp_fixed",
    "ddp_zclip",
    "ddp_autoclip",
    "ddp_guard",
    "fsdp_fixed",
    "fsdp_agc",
    "fsdp_guard",
    "fault_zclip",
)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _policy(name: str) -> Any:
    if name == "fixed":
        return FixedNorm(h.FIXED_MAX_NORM)
    if name == "zclip":
        return ZClip(**h.ZCLIP_ARGS)
    if name == "autoclip":
        return AutoClip(**h.AUTOCLIP_ARGS)
    if name == "guard":
        return GuardClip(**h.GUARD_ARGS)
    return AGC(clipping=h.AGC_CLIPPING, eps=h.AGC_EPS)


def _plain(value: Any) -> Any:
    """A policy state as JSON: tensors become (nested) lists of floats."""
    if isinstance(value, torch.Tensor):
        return _plain(value.double().tolist())
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None  # NaN != NaN: compare "no value" as None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def run(pl: Any, mode: str, policy_name: str, out_dir: Path) -> dict[str, Any]:
    record: dict[str, Any] = {
        "threshold": [],
        "clipped": [],
        "params": [],
        "opt_state": [],
        "policy_state": [],
        "batch_checks": [],
        "step_seen_by_corrupter": [],
    }

    class Corrupter(pl.Callback):
        """Listed before the clipper: on rank 1 only, a NaN into one gradient at FAULT_STEP."""

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            step = trainer.global_step
            record["step_seen_by_corrupter"].append(step)
            if mode == "fault" and trainer.global_rank == 1 and step == h.FAULT_STEP:
                pl_module.net[2].weight.grad[1, 2] = float("nan")

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = h.make_net()
            self.data = h.make_clip_dataset()

        def configure_model(self) -> None:
            if mode != "fsdp":
                return
            h.shard_linear_layers(self.net, self.device_mesh["data_parallel"])

        def train_dataloader(self) -> DataLoader:
            return h.rank_loader(self.data, self.trainer, h.BATCH_PER_RANK)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            indices = h.clip_rank_indices(self.trainer.global_rank, batch_idx)
            record["batch_checks"].append(bool(torch.equal(x, self.data.tensors[0][indices])))
            return h.clip_loss(self.net(x), y, batch_idx)

        def on_before_optimizer_step(self, optimizer: Any) -> None:
            # After every callback's hook, so after AdaptiveGradClip: the clipped gradients.
            record["clipped"].append(h.flat([_full(p.grad) for p in self.net.parameters()]))

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            params = list(self.net.parameters())
            record["params"].append(h.flat([_full(p) for p in params]))
            optimizer = self.trainer.optimizers[0]
            state = []
            for p in params:
                for key, value in sorted(optimizer.state.get(p, {}).items()):
                    if isinstance(value, torch.Tensor):
                        state.append([key, h.flat([_full(value)])])
            record["opt_state"].append(state)
            record["policy_state"].append(_plain(clipper.policy.state_dict()))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            if mode == "fault":
                return torch.optim.Adam(self.parameters(), lr=h.ADAM_LR)
            return torch.optim.SGD(self.parameters(), lr=h.LR)

    policy = _policy(policy_name)
    threshold = getattr(policy, "threshold", None)  # norm policies only; AGC has none

    def recording_threshold(norm: torch.Tensor, *args: Any) -> torch.Tensor:
        assert threshold is not None
        value = threshold(norm, *args)
        record["threshold"].append(_plain(float(value)))
        return value

    if threshold is not None:
        policy.threshold = recording_threshold  # type: ignore[method-assign]
    clipper = AdaptiveGradClip(policy=policy, log_every_n_steps=1)

    if mode == "fsdp":
        strategy: Any = pl.strategies.ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1
        )
    else:
        strategy = "ddp"
    module = Module()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=h.WORLD_SIZE,
        strategy=strategy,
        max_epochs=1,
        max_steps=h.CLIP_STEPS,
        logger=False,
        callbacks=[Corrupter(), clipper],
        use_distributed_sampler=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out_dir),
    )
    trainer.fit(module)
    from torch.distributed.tensor import DTensor

    record.update(
        global_rank=trainer.global_rank,
        world_size=trainer.world_size,
        backend=torch.distributed.get_backend(),
        strategy=type(trainer.strategy).__name__,
        global_step=trainer.global_step,
        skipped_steps=clipper.skipped_steps,
        params_are_dtensors=[isinstance(p, DTensor) for p in module.net.parameters()],
        local_shapes={
            n: list(p.to_local().shape if isinstance(p, DTensor) else p.shape)
            for n, p in module.net.named_parameters()
        },
    )
    return record


def main(out_dir: Path, scenarios: list[str]) -> None:
    torch.set_num_threads(1)
    for scenario in scenarios or SCENARIOS:
        mode, policy_name = scenario.split("_")
        pl = importlib.import_module("lightning.pytorch" if mode == "fsdp" else "pytorch_lightning")
        result = run(pl, mode, policy_name, out_dir)
        h.write_json(out_dir / f"{scenario}.rank{torch.distributed.get_rank()}.json", result)


if __name__ == "__main__":
    h.run_rank(main, Path(sys.argv[1]), sys.argv[2:])  # barrier, destroy every group, os._exit

"""2-process CPU (gloo) Lightning runs of the re-initialization callbacks; launched by the tests.

Usage: ``python reinit_run.py OUT_DIR [SCENARIO ...]`` (default: every scenario of
``SCENARIOS``, in order). One process per rank, started by
``distributed_helpers.launch_ranks`` with torchrun-style variables, so the same two
processes run one ``Trainer.fit`` per scenario on one process group.

- ``recycle``: ``make_recycle_net()`` on the dead-unit dataset, DDP, Adam with weight
  decay, ``UnitRecycler(tau=0)``. Units dead on both ranks' data and units dead on one
  rank's data only.
- ``layer_reinit``: ``make_net()`` on the plain dataset, DDP, Adam,
  ``LayerReinit(at_steps=[REINIT_AT_STEP], layers=REINIT_LAYERS)``.
- ``lsuv``: ``make_net()``, DDP, ``InitAtStart("lsuv")``: each rank's first batch differs.
- ``fsdp``: ``make_net()`` sharded with FSDP2 ``fully_shard`` under
  ``ModelParallelStrategy``: each callback must refuse, and ``recycle_units_`` too.

After building the model each rank seeds its global RNG differently, so anything drawn
from the global RNG (rather than the callbacks' seeded generators) would differ between
the ranks. Every rank writes ``OUT_DIR/<scenario>.rank<r>.json``: the sample indices of
every batch, which units its own forward pass (functional ops, no module hooks) saw
positive at every step, the parameters and Adam state right before and right after the
callback at the step it acts, and at the end, the callback's events and every
``log_metrics`` call (the logger records on every rank).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import distributed_helpers as h
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import CaptureLogger
from torch import nn
from torch.utils.data import DataLoader

from lightning_gradguard import InitAtStart, LayerReinit, UnitRecycler
from lightning_gradguard.functional import UnitPair, recycle_units_

SCENARIOS = ("recycle", "layer_reinit", "lsuv", "fsdp")


class Module(pl.LightningModule):
    def __init__(self, scenario: str) -> None:
        super().__init__()
        self.scenario = scenario
        if scenario == "recycle":
            self.net = h.make_recycle_net()
            self.data = h.make_dead_dataset()
            self.batch_size = h.DEAD_BATCH_PER_RANK
        else:
            self.net = h.make_net()
            data = h.make_dataset()
            self.data = torch.utils.data.TensorDataset(*data.tensors, torch.arange(len(data)))
            self.batch_size = h.BATCH_PER_RANK
        self.batch_indices: list[list[int]] = []
        self.alive: list[dict[str, list[bool]]] = []
        self.at_train_start: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_model(self) -> None:
        if self.scenario != "fsdp":
            return
        h.shard_linear_layers(self.net, self.device_mesh["data_parallel"])

    def train_dataloader(self) -> DataLoader:
        return h.rank_loader(self.data, self.trainer, self.batch_size)

    @torch.no_grad()
    def _own_forward(self, x: torch.Tensor) -> None:
        alive: dict[str, list[bool]] = {}
        hidden = x
        for name, module in self.net.named_children():
            if isinstance(module, nn.Linear):
                hidden = F.linear(hidden, module.weight, module.bias)
            elif isinstance(module, nn.ReLU):
                hidden = torch.relu(hidden)
                alive[f"net.{name}"] = (hidden > 0).any(0).tolist()
            else:
                hidden = torch.tanh(hidden)
        self.alive.append(alive)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, index = batch
        self.batch_indices.append(index.tolist())
        if self.scenario == "recycle":
            self._own_forward(x)
        return F.mse_loss(self(x), y)

    def on_train_start(self) -> None:  # after every callback's on_train_start
        self.at_train_start = h.flat(list(self.parameters()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            self.parameters(), lr=h.REINIT_LR, weight_decay=h.REINIT_WEIGHT_DECAY
        )


def _optimizer_state(trainer: Any, module: nn.Module) -> dict[str, dict[str, list[float]]]:
    optimizer = trainer.optimizers[0]
    return {
        name: {key: h.flat([value]) for key, value in optimizer.state[p].items()}
        for name, p in module.named_parameters()
        if p in optimizer.state
    }


class Probe(pl.Callback):
    """Parameters and Adam state at the end of the batch that ends on ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.params: dict[str, list[float]] = {}
        self.state: dict[str, dict[str, list[float]]] = {}

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step and not self.params:
            self.params = {n: h.flat([p]) for n, p in pl_module.named_parameters()}
            self.state = _optimizer_state(trainer, pl_module)


def _trainer(logger: CaptureLogger, callbacks: list, steps: int, out_dir: Path, **kw: Any) -> Any:
    return pl.Trainer(
        accelerator="cpu",
        devices=h.WORLD_SIZE,
        strategy=kw.pop("strategy", "ddp"),
        max_epochs=1,
        max_steps=steps,
        logger=logger,
        callbacks=callbacks,
        use_distributed_sampler=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out_dir),
    )


def _desync_global_rng() -> None:
    torch.manual_seed(1000 + int(os.environ["RANK"]))


def run_ddp(scenario: str, out_dir: Path) -> dict[str, Any]:
    module = Module(scenario)
    params_start = {n: h.flat([p]) for n, p in module.named_parameters()}
    _desync_global_rng()
    at = h.DEAD_LOG_STEPS[0] if scenario == "recycle" else h.REINIT_AT_STEP
    before, after = Probe(at), Probe(at)
    callback: Any
    if scenario == "recycle":
        callback = UnitRecycler(
            every_n_steps=h.DEAD_EVERY_N_STEPS, window=h.DEAD_WINDOW, tau=0.0, seed=h.REINIT_SEED
        )
        steps = h.DEAD_STEPS
    elif scenario == "layer_reinit":
        callback = LayerReinit(
            at_steps=[h.REINIT_AT_STEP], layers=list(h.REINIT_LAYERS), seed=h.REINIT_SEED
        )
        steps = h.STEPS
    else:
        callback = InitAtStart("lsuv", seed=h.REINIT_SEED)
        steps = 1
    logger = CaptureLogger()
    trainer = _trainer(logger, [before, callback, after], steps, out_dir)
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
        "alive": module.alive,
        "calls": [[step, metrics] for step, metrics in logger.calls],
        "events": getattr(callback, "events", []),
        "recycled_total": getattr(callback, "recycled_total", None),
        "not_converged": getattr(callback.report, "not_converged", None)
        if scenario == "lsuv"
        else None,
        "params_start": params_start,
        "at_train_start": module.at_train_start,
        "before": {"params": before.params, "state": before.state},
        "after": {"params": after.params, "state": after.state},
        "params_end": {n: h.flat([p]) for n, p in module.named_parameters()},
        "state_end": _optimizer_state(trainer, module),
    }


def run_fsdp(out_dir: Path) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    refusals: dict[str, str] = {}
    sharded: list[bool] = []
    callbacks: dict[str, Any] = {
        "UnitRecycler": UnitRecycler(every_n_steps=2, window=1),
        "LayerReinit": LayerReinit(at_steps=[1], layers=["net.0"]),
        "InitAtStart": InitAtStart("lsuv"),
    }
    for name, callback in callbacks.items():
        module = Module("fsdp")
        strategy = pl.strategies.ModelParallelStrategy(
            data_parallel_size=h.WORLD_SIZE, tensor_parallel_size=1
        )
        trainer = _trainer(CaptureLogger(), [callback], h.STEPS, out_dir, strategy=strategy)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer.fit(module)
        except RuntimeError as error:
            refusals[name] = str(error)
        sharded = [isinstance(p, DTensor) for p in module.parameters()]
        refusals[name + ".batches"] = str(len(module.batch_indices))
    try:
        mask = torch.ones(h.LAYER_SIZES[1], dtype=torch.bool)
        recycle_units_(module, UnitPair("net.0", "net.2", "net.1"), mask)
    except ValueError as error:
        refusals["recycle_units_"] = str(error)
    return {"refusals": refusals, "params_are_dtensors": sharded}


def main(out_dir: Path, scenarios: list[str]) -> None:
    torch.set_num_threads(1)
    for scenario in scenarios or SCENARIOS:
        result = run_fsdp(out_dir) if scenario == "fsdp" else run_ddp(scenario, out_dir)
        h.write_json(out_dir / f"{scenario}.rank{torch.distributed.get_rank()}.json", result)


if __name__ == "__main__":
    h.run_rank(main, Path(sys.argv[1]), sys.argv[2:])  # barrier, destroy every group, os._exit

"""Poisoned-stream calibration for ``SpikeRecovery`` (CPU, a few minutes in all).

Two workloads, each trained clean and with a poisoned stretch of the run:

- ``digits``: the scenarios' digits MLP (64 -> 256 -> 256 -> 10, ReLU, Adam 1e-3,
  batch 64). From step ``POISON_START`` on, ``POISON_STEPS`` batches are corrupted:
  labels shuffled and inputs scaled by a ramp (x3 up to x100), so the damage
  builds over several steps before it is obvious.
- ``lm``: a small causal transformer language model (2 layers, d_model 64) over
  synthetic tokens from a fixed sparse Markov chain. From ``POISON_START`` on the
  learning rate is multiplied by a ramp (x3 up to x30) for ``POISON_STEPS`` steps.

Variants on the poisoned stream: no recovery; skip-only (``AdaptiveGradClip`` with
no clipping and ``skip_spikes=True``, the skip step GradGuard already has);
Lightning's ``SpikeDetection`` (terminates: the run ends at the spike, its loss then
is reported); ``SpikeRecovery``. The final loss is the held-out loss at the end.

Usage: ``python experiments/spike_recovery.py [--workload digits lm] [--seeds 0 1 2]
[--out results.json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import AdaptiveGradClip, GradNormMonitor, SpikeRecovery

WORKLOADS = ("digits", "digits_lr", "lm")
POISON_START = {"digits": 300, "digits_lr": 300, "lm": 200}
RAMP = {
    "digits": (3, 5, 10, 20, 50, 100, 100, 100),  # input scale of corrupted batches
    "digits_lr": (3, 10, 30, 100, 100, 100, 100, 100, 100, 100, 100, 100),  # LR factor
    "lm": (3, 10, 30, 100, 100, 100, 100, 100, 100, 100, 100, 100),
}
STEPS = {"digits": 700, "digits_lr": 700, "lm": 500}
VARIANTS = ("clean", "clean_recovery", "none", "skip", "lightning", "recovery")


# --------------------------------------------------------------------------- data and models


def digits_data() -> tuple[TensorDataset, tuple[Tensor, Tensor]]:
    from lightning_gradguard.demo.data import digits

    return digits()


def markov_tokens(n: int, length: int, vocab: int, seed: int) -> Tensor:
    """Sequences from a fixed sparse Markov chain (each token has 3 likely successors)."""
    chain = torch.Generator().manual_seed(1234)
    successors = torch.randint(0, vocab, (vocab, 3), generator=chain)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.empty(n, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (n,), generator=generator)
    for t in range(1, length):
        pick = torch.randint(0, 3, (n,), generator=generator)
        tokens[:, t] = successors[tokens[:, t - 1], pick]
    return tokens


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 32, d_model: int = 32, length: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Parameter(torch.randn(length, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, 4, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length))

    def forward(self, tokens: Tensor) -> Tensor:
        n = tokens.shape[1]
        h = self.embed(tokens) + self.position[:n]
        h = self.blocks(h, mask=self.mask[:n, :n], is_causal=True)
        return self.head(h)


class Workload(pl.LightningModule):
    def __init__(self, kind: str, seed: int) -> None:
        super().__init__()
        self.kind = kind
        self.model = kind.split("_")[0]
        self.poison = "lr" if kind.endswith("lr") or kind == "lm" else "batches"
        torch.manual_seed(seed)
        if self.model == "digits":
            self.net: nn.Module = nn.Sequential(
                nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
            )
            self.train_set, self.test = digits_data()
            self.lr = 1e-3
        else:
            self.net = TinyLM()
            self.train_set = TensorDataset(markov_tokens(20000, 17, 32, seed=seed))
            self.test = (markov_tokens(512, 17, 32, seed=10_000),)
            self.lr = 1e-3
        self.poisoned = False
        self.seed = seed
        self.last_loss = math.nan

    def loss(self, batch: Any, corrupt: int = 0) -> Tensor:
        if self.model == "digits":
            x, y = batch
            if corrupt:
                x = x * corrupt
                y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(corrupt))]
            return nn.functional.cross_entropy(self.net(x), y)
        (tokens,) = batch
        logits = self.net(tokens[:, :-1])
        return nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
        )

    def _ramp(self) -> int:
        offset = self.trainer.global_step - POISON_START[self.kind]
        if self.poisoned and 0 <= offset < len(RAMP[self.kind]):
            return RAMP[self.kind][offset]
        return 0

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.poison == "lr":  # the learning-rate burst
            factor = self._ramp() or 1
            for group in self.trainer.optimizers[0].param_groups:
                group["lr"] = self.lr * factor

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        corrupt = self._ramp() if self.poison == "batches" else 0
        loss = self.loss(batch, corrupt)
        self.last_loss = float(loss.detach())
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        batch = 64 if self.model == "digits" else 32
        return DataLoader(self.train_set, batch_size=batch, shuffle=True, generator=generator)

    @torch.no_grad()
    def held_out_loss(self) -> float:
        self.net.eval()
        loss = self.loss(self.test)
        self.net.train()
        return float(loss)


# --------------------------------------------------------------------------- runs


def callbacks_for(variant: str, kind: str) -> list[Any]:
    if variant == "skip":
        return [GradNormMonitor(log_every_n_steps=1000), AdaptiveGradClip("none", skip_spikes=True)]
    if variant == "lightning":
        from pytorch_lightning.callbacks.spike import SpikeDetection

        # Its defaults (window 10, warm-up 1 batch, rtol 2.0); its warm-up counts the
        # epoch's batch index.
        return [SpikeDetection(exclude_batches_path="/tmp/spike_recovery_experiment")]
    if variant in ("recovery", "clean_recovery"):
        return [
            GradNormMonitor(log_every_n_steps=1000),
            # Detection at its defaults; snapshots every 25 steps (the runs are short),
            # at least 10 steps old; the poisoned stretch lasts up to 12 steps, so a
            # rollback at each of its steps must be allowed.
            SpikeRecovery(
                every_n_steps=25, min_age=10, max_rollbacks_in_window=12, max_rollbacks=20
            ),
        ]
    return []


def run(kind: str, variant: str, seed: int) -> dict[str, Any]:
    module = Workload(kind, seed)
    module.poisoned = not variant.startswith("clean")
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=STEPS[kind],
        max_epochs=-1,
        logger=False,
        callbacks=callbacks_for(variant, kind),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir="/tmp/spike_recovery_experiment",
    )
    stopped = None
    started = time.perf_counter()
    try:
        trainer.fit(module)
    except Exception as error:  # Lightning's SpikeDetection terminates the run
        stopped = f"{type(error).__name__} at step {trainer.global_step}"
    result: dict[str, Any] = {
        "kind": kind,
        "variant": variant,
        "seed": seed,
        "final_loss": module.held_out_loss(),
        "steps": trainer.global_step,
        "stopped": stopped,
        "seconds": time.perf_counter() - started,
    }
    for callback in trainer.callbacks:
        if isinstance(callback, SpikeRecovery):
            result["rollbacks"] = len(callback.rollbacks)
            result["skipped_batches"] = callback.skipped_batches
        if isinstance(callback, AdaptiveGradClip):
            result["skipped_steps"] = callback.skipped_steps
    return result


def summarize(results: list[dict[str, Any]]) -> str:
    lines = [
        "| workload | variant | final held-out loss (mean ± std) | per seed | notes |",
        "|---|---|---|---|---|",
    ]
    for kind in dict.fromkeys(r["kind"] for r in results):
        for variant in VARIANTS:
            rows = [r for r in results if r["kind"] == kind and r["variant"] == variant]
            if not rows:
                continue
            losses = [r["final_loss"] for r in rows]
            spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
            notes = []
            if any(r["stopped"] for r in rows):
                notes.append("stopped: " + ", ".join(str(r["steps"]) for r in rows))
            if "rollbacks" in rows[0]:
                notes.append("rollbacks " + "/".join(str(r["rollbacks"]) for r in rows))
                notes.append("skipped batches " + "/".join(str(r["skipped_batches"]) for r in rows))
            if "skipped_steps" in rows[0]:
                notes.append("skipped steps " + "/".join(str(r["skipped_steps"]) for r in rows))
            per_seed = ", ".join(f"{v:.3f}" for v in losses)
            lines.append(
                f"| {kind} | {variant} | {statistics.mean(losses):.3f} ± {spread:.3f} | "
                f"{per_seed} | {'; '.join(notes)} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", nargs="+", default=list(WORKLOADS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    results = []
    for kind in args.workload:
        for variant in args.variants:
            for seed in args.seeds:
                result = run(kind, variant, seed)
                print(json.dumps(result), flush=True)
                results.append(result)
    print(summarize(results))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

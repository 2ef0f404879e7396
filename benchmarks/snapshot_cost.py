"""What one ``SpikeRecovery`` snapshot and one rollback cost, in ms per MB of state.

Builds the ``mlp`` and ``transformer`` workloads of ``benchmarks/overhead/workloads.py``, runs
two optimizer steps (so the optimizer state exists), then times
``StateSnapshot.take`` (copy of parameters, buffers and optimizer state to host
buffers) and ``StateSnapshot.restore`` (copy back into the live tensors), each the
median of ``--repeats`` calls, next to the bare training step. On a GPU the copies
are pinned and non-blocking: the time includes a ``torch.cuda.synchronize()``.

Usage: ``python benchmarks/snapshot_cost.py [--optimizer sgd|adamw] [--device cpu|cuda]
[--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead.workloads import WORKLOADS

from lightning_gradguard.functional import StateSnapshot


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    workload: str, optimizer_name: str, device: torch.device, repeats: int, tiny: bool
) -> dict[str, Any]:
    net, (x, y) = WORKLOADS[workload].build(tiny)
    net, x, y = net.to(device), x.to(device), y.to(device)
    if optimizer_name == "adamw":
        optimizer: Any = torch.optim.AdamW(net.parameters(), lr=1e-3)
    else:
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad()
        F.mse_loss(net(x), y).backward()
        optimizer.step()

    def timed(fn: Any) -> float:
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    step()
    step()
    snapshot = StateSnapshot()
    snapshot.take(net, [optimizer], step=0)  # allocates the host buffers once
    megabytes = snapshot.nbytes / 2**20
    step_ms = timed(step)
    take_ms = timed(lambda: snapshot.take(net, [optimizer], step=1))
    restore_ms = timed(lambda: snapshot.restore(net, [optimizer]))
    return {
        "workload": workload,
        "optimizer": optimizer_name,
        "device": str(device),
        "state_mb": megabytes,
        "step_ms": step_ms,
        "snapshot_ms": take_ms,
        "rollback_ms": restore_ms,
        "snapshot_ms_per_mb": take_ms / megabytes,
        "rollback_ms_per_mb": restore_ms / megabytes,
        "snapshot_every_50_ratio": 1.0 + take_ms / 50 / step_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--optimizer", choices=("sgd", "adamw"), nargs="+", default=["sgd", "adamw"]
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny models, 3 repeats")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = 3 if args.quick else args.repeats
    print(
        "| workload | optimizer | device | state (MB) | step (ms) | snapshot (ms) | "
        "rollback (ms) | snapshot ms/MB | rollback ms/MB | step cost, snapshot every 50 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for workload in ("mlp", "transformer"):
        for optimizer in args.optimizer:
            r = measure(workload, optimizer, device, repeats, args.quick)
            print(
                f"| {workload} | {optimizer} | {r['device']} | {r['state_mb']:.1f} | "
                f"{r['step_ms']:.1f} | {r['snapshot_ms']:.2f} | {r['rollback_ms']:.2f} | "
                f"{r['snapshot_ms_per_mb']:.3f} | {r['rollback_ms_per_mb']:.3f} | "
                f"{r['snapshot_every_50_ratio']:.4f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()

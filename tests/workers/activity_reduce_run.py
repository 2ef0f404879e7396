"""``ActivityTracker.reduce`` when a tracked layer did not run on one rank; launched by tests.

Usage: ``RANK=r WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... python activity_reduce_run.py OUT``

Two tracked ReLUs: ``always`` runs on both ranks, ``branch`` only on rank 0 (a
conditional branch). Each rank writes its reduced statistics to ``OUT/rank<r>.json``.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import distributed_helpers as h
import torch
import torch.distributed as dist
from torch import nn

from lightning_gradguard.functional import ActivityTracker


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=20))
    rank = dist.get_rank()
    always, branch = nn.ReLU(), nn.ReLU()
    tracker = ActivityTracker([("always", always), ("branch", branch)])
    tracker.attach()
    # Rank 0: unit 0 positive, unit 1 never. Rank 1: unit 1 positive, unit 0 never.
    always(torch.tensor([[1.0, -1.0], [2.0, -3.0]]) if rank == 0 else torch.tensor([[-1.0, 4.0]]))
    if rank == 0:
        branch(torch.tensor([[-1.0, 5.0, -2.0]]))
    tracker.detach()
    tracker.reduce()
    stats = tracker.stats()
    h.write_json(
        out_dir / f"rank{rank}.json",
        {
            name: {"dead": s.dead.tolist(), "scores": s.scores.tolist(), "samples": s.samples}
            for name, s in stats.items()
        },
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""``ActivityTracker.reduce`` when a tracked layer did not run on one rank; launched by tests.

Usage: ``RANK=r WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... python activity_reduce_run.py OUT``

Three tracked ReLUs: ``always`` runs on both ranks, ``branch`` only on rank 0 (a
conditional branch) in the first window, ``late`` only on rank 1 in the third. Each rank
writes its reduced statistics per window, and the collectives of the second window's
reduction, to ``OUT/rank<r>.json``.
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


def _stats(tracker: ActivityTracker) -> dict:
    return {
        name: {"dead": s.dead.tolist(), "scores": s.scores.tolist(), "samples": s.samples}
        for name, s in tracker.stats().items()
    }


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=20))
    rank = dist.get_rank()
    always, branch, late = nn.ReLU(), nn.ReLU(), nn.ReLU()
    tracker = ActivityTracker([("always", always), ("branch", branch), ("late", late)])
    out: dict = {}
    # Window 1. Rank 0: unit 0 positive, unit 1 never. Rank 1: unit 1 positive, unit 0 never.
    tracker.attach()
    always(torch.tensor([[1.0, -1.0], [2.0, -3.0]]) if rank == 0 else torch.tensor([[-1.0, 4.0]]))
    if rank == 0:
        branch(torch.tensor([[-1.0, 5.0, -2.0]]))
    tracker.detach()
    tracker.reduce()
    out["window1"] = _stats(tracker)
    # Window 2: the same sites on both ranks; count the collectives of the reduction.
    calls = {"all_reduce": 0, "all_gather_object": 0}
    for name in calls:
        original = getattr(dist, name)

        def counted(*args: object, _original=original, _name=name, **kwargs: object) -> object:
            calls[_name] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    tracker.reset()
    tracker.attach()
    always(torch.tensor([[-1.0, -1.0]]) if rank == 0 else torch.tensor([[-2.0, 3.0]]))
    tracker.detach()
    tracker.reduce()
    out["window2"], out["collectives2"] = _stats(tracker), dict(calls)
    # Window 3: a site that ran on neither rank before, on rank 1 only.
    tracker.reset()
    tracker.attach()
    always(torch.tensor([[1.0, 1.0]]))
    if rank == 1:
        late(torch.tensor([[-1.0, 2.0, 3.0, -4.0]]))
    tracker.detach()
    tracker.reduce()
    out["window3"] = _stats(tracker)
    h.write_json(out_dir / f"rank{rank}.json", out)


if __name__ == "__main__":
    h.run_rank(main, Path(sys.argv[1]))  # barrier, destroy every group, os._exit

"""``grouped_norms`` on DTensors in a 2-process gloo group; launched by the tests.

Usage: ``RANK=r WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... python functional_run.py OUT_DIR``

Each case distributes the tensors of ``distributed_helpers.odd_tensors()`` (odd
shapes: uneven shards, and an empty shard on rank 1) and writes, per norm order, the
group norms, the total and how many ``torch.distributed.all_reduce`` calls the
package made, to ``OUT_DIR/rank<r>.json``. The test compares with full tensors.
"""

from __future__ import annotations

import math
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import distributed_helpers as h
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from lightning_gradguard.functional.norms import grouped_norms

NORM_TYPES = (2.0, math.inf, 1.0, 3.0)
GROUP_INDEX = [0, 0, 1, 1, 2]  # 5 tensors in 3 groups, plus a 4th group with no tensor
NUM_GROUPS = 4
TIMEOUT = timedelta(seconds=20)  # a collective mismatch fails fast instead of hanging

_calls = {"all_reduce": 0}
_real_all_reduce = dist.all_reduce


def _counting_all_reduce(*args: Any, **kwargs: Any) -> Any:
    _calls["all_reduce"] += 1
    return _real_all_reduce(*args, **kwargs)


def measure(tensors: list[torch.Tensor]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    index = torch.tensor(GROUP_INDEX)
    for norm_type in NORM_TYPES:
        _calls["all_reduce"] = 0
        norms = grouped_norms(tensors, index, NUM_GROUPS, norm_type)
        out[str(norm_type)] = {
            "groups": norms.groups.tolist(),
            "total": float(norms.total),
            "all_reduce_calls": _calls["all_reduce"],
        }
    return out


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=TIMEOUT)
    rank = dist.get_rank()
    dist.all_reduce = _counting_all_reduce  # the package calls ``dist.all_reduce`` at run time
    mesh = init_device_mesh("cpu", (h.WORLD_SIZE,))
    full = h.odd_tensors()
    results: dict[str, Any] = {}

    # Every tensor Shard(0): uneven shards, (1, 4) leaves rank 1 an empty (0, 4) shard.
    shard0 = [distribute_tensor(t, mesh, [Shard(0)]) for t in full]
    results["local_numels"] = [d.to_local().numel() for d in shard0]
    results["shard0"] = measure(shard0)

    # Mixed placements on one mesh: Shard(0), Shard(1), Replicate, a plain tensor.
    placements: list[Any] = [[Shard(1)], [Replicate()], None, [Shard(1)], [Shard(0)]]
    mixed = [t if p is None else distribute_tensor(t, mesh, p) for t, p in zip(full, placements)]
    results["mixed"] = measure(mixed)

    # Partial: every rank holds a summand; the full tensor is their sum.
    weights = [0.25, 0.75]
    partial = [
        DTensor.from_local(t * weights[rank], mesh, [Partial()], run_check=False) for t in full
    ]
    results["partial"] = measure(partial)

    # Several meshes (as in 2-D parallelism): 1-D meshes with different names, and a
    # ("dp", "tp") mesh whose tensors reduce over dp only or over dp and tp.
    mesh_2d = init_device_mesh("cpu", (h.WORLD_SIZE, 1), mesh_dim_names=("dp", "tp"))
    mesh_a = init_device_mesh("cpu", (h.WORLD_SIZE,), mesh_dim_names=("a",))
    mesh_b = init_device_mesh("cpu", (h.WORLD_SIZE,), mesh_dim_names=("b",))
    layouts: list[tuple[Any, list[Any]]] = [
        (mesh_2d, [Shard(0), Replicate()]),
        (mesh_a, [Shard(0)]),
        (mesh_2d, [Shard(0), Shard(1)]),
        (mesh_b, [Shard(0)]),
        (mesh, [Shard(0)]),
    ]
    multi = [distribute_tensor(t, m, p) for t, (m, p) in zip(full, layouts)]
    results["multi_mesh"] = measure(multi)

    # Two process groups over the same ranks (2-D parallelism has dp and tp groups): the
    # reductions must run in the same order on every rank, whatever the ranks' hash seeds
    # (the launcher gives each rank its own PYTHONHASHSEED), or gloo hangs.
    other = DeviceMesh.from_group(
        dist.new_group([0, 1], timeout=TIMEOUT), "cpu", mesh_dim_names=("x",)
    )
    two = [distribute_tensor(t, mesh if i % 2 else other, [Shard(0)]) for i, t in enumerate(full)]
    results["two_groups"] = measure(two)

    h.write_json(out_dir / f"rank{rank}.json", results)


if __name__ == "__main__":
    h.run_rank(main, Path(sys.argv[1]))  # barrier, destroy every group, os._exit

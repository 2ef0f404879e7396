"""``agc_`` on a GPT-2 whose parameters are all ``Shard(0)`` DTensors, in a 2-process gloo group.

Usage: ``RANK=r WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... python agc_conv1d_run.py OUT_DIR``

Every parameter of a tiny Hugging Face GPT-2 (and its gradient) is sharded along dim 0,
as FSDP2 shards them: a Conv1D weight ``[in, out]`` then holds some inputs of every
output unit on each rank. Writes the full clipped gradients and the number of
``all_reduce`` calls to ``OUT_DIR/rank<r>.json``; the test compares them with AGC by
hand on the unsharded model.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import distributed_helpers as h
import torch
import torch.distributed as dist
from models import gpt2_batch, gpt2_loss, tiny_gpt2
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from lightning_gradguard.functional import agc_

CLIPPING = 0.01
_calls = {"all_reduce": 0}
_real_all_reduce = dist.all_reduce


def _counting_all_reduce(*args: Any, **kwargs: Any) -> Any:
    _calls["all_reduce"] += 1
    return _real_all_reduce(*args, **kwargs)


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (h.WORLD_SIZE,))
    model = tiny_gpt2()
    gpt2_loss(model, gpt2_batch()).backward()
    sharded: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) not in sharded:  # the tied weight is sharded once, for both holders
                new = nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)]))
                new.grad = distribute_tensor(p.grad, mesh, [Shard(0)])
                sharded[id(p)] = new
            setattr(module, name, sharded[id(p)])
    dist.all_reduce = _counting_all_reduce  # the package calls ``dist.all_reduce`` at run time
    agc_(model, clipping=CLIPPING)
    calls = _calls["all_reduce"]
    dist.all_reduce = _real_all_reduce
    grads = {n: p.grad.full_tensor().tolist() for n, p in model.named_parameters()}
    h.write_json(out_dir / f"rank{rank}.json", {"grads": grads, "all_reduce_calls": calls})


if __name__ == "__main__":
    h.run_rank(main, Path(sys.argv[1]))  # barrier, destroy every group, os._exit

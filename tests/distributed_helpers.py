"""Shared pieces of the 2-process (gloo, CPU) tests: model, data, references, launching.

Imported by ``tests/test_distributed.py`` (the pytest process) and by the worker
scripts in ``tests/workers/`` (the distributed processes), so both sides build the
same initial weights and the same global batches.

The reference computations here use plain torch only (``get_total_norm``,
``torch.linalg.vector_norm``), never ``lightning_gradguard``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

TESTS_DIR = Path(__file__).resolve().parent
WORKERS_DIR = TESTS_DIR / "workers"

WORLD_SIZE = 2
SEED = 1234
# Odd sizes so that FSDP2's Shard(0) is uneven; the last layer's weight has one row,
# so rank 1 holds an *empty* shard of it (and of its bias).
LAYER_SIZES = (7, 5, 3, 1)
LINEAR_NAMES = ("net.0", "net.2", "net.4")  # dotted paths inside the LightningModule
NUM_SAMPLES = 24
BATCH_PER_RANK = 3
STEPS = 4  # optimizer steps per run
LR = 0.1

_DIST_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "PL_GLOBAL_SEED",
    "PL_TRAINER_GPUS",
)


# --------------------------------------------------------------------------- model and data


def make_net() -> nn.Sequential:
    """The network, built deterministically (same weights in every process)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(SEED)
    a, b, c, d = LAYER_SIZES
    net = nn.Sequential(nn.Linear(a, b), nn.Tanh(), nn.Linear(b, c), nn.Tanh(), nn.Linear(c, d))
    torch.random.set_rng_state(generator_state)
    return net


def make_dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(SEED + 1)
    x = torch.randn(NUM_SAMPLES, LAYER_SIZES[0], generator=generator)
    y = torch.randn(NUM_SAMPLES, LAYER_SIZES[-1], generator=generator)
    return TensorDataset(x, y)


def rank_indices(rank: int, step: int) -> list[int]:
    """Sample indices of ``rank``'s batch at ``step``, written out by hand.

    ``DistributedSampler(shuffle=False, drop_last=False)`` over ``NUM_SAMPLES``
    (a multiple of ``WORLD_SIZE``) gives rank ``r`` the indices ``r, r + W, r + 2W, ...``.
    """
    own = list(range(rank, NUM_SAMPLES, WORLD_SIZE))
    return own[step * BATCH_PER_RANK : (step + 1) * BATCH_PER_RANK]


def global_indices(step: int) -> list[int]:
    return [i for rank in range(WORLD_SIZE) for i in rank_indices(rank, step)]


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(output, target)


# --------------------------------------------------------------------------- references


def _norm(tensors: list[torch.Tensor], norm_type: float) -> float:
    return float(torch.nn.utils.get_total_norm([t.detach().double() for t in tensors], norm_type))


def reference_metrics() -> list[dict[str, dict[str, float]]]:
    """What the two monitors of ``workers/lightning_run.py`` should log at every step.

    One plain-torch process trains the same network with SGD on the *global*
    batches (the union of both ranks' batches: DDP and FSDP2 average the ranks'
    gradients, and every rank has the same batch size, so the result equals the
    gradient of the mean loss over the global batch).

    Returns, per optimizer step, ``{"module_l2": metrics, "parameter_inf": metrics}``:
    the metrics of ``GradNormMonitor()`` (L2, one group per module) and of
    ``GradNormMonitor(group_by="parameter", norm_type="inf")``. Update ratios are
    L2 ``‖θ_after − θ_before‖ / ‖θ_before‖`` in both.
    """
    net = make_net()
    data = make_dataset()
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    layers = dict(zip(LINEAR_NAMES, [net[0], net[2], net[4]]))
    params = {
        f"{layer}.{kind}": p for layer, m in layers.items() for kind, p in m.named_parameters()
    }
    inf = math.inf
    out: list[dict[str, dict[str, float]]] = []
    for step in range(STEPS):
        x, y = data[global_indices(step)]
        optimizer.zero_grad()
        loss_fn(net(x), y).backward()
        by_module: dict[str, float] = {
            "grad_norm/total": _norm([p.grad for p in net.parameters()], 2.0)
        }
        by_param: dict[str, float] = {
            "grad_norm/total": _norm([p.grad for p in net.parameters()], inf)
        }
        for name, layer in layers.items():
            by_module[f"grad_norm/{name}"] = _norm([p.grad for p in layer.parameters()], 2.0)
            by_module[f"param_norm/{name}"] = _norm(list(layer.parameters()), 2.0)
        for name, p in params.items():
            by_param[f"grad_norm/{name}"] = float(torch.linalg.vector_norm(p.grad.double(), inf))
            by_param[f"param_norm/{name}"] = float(
                torch.linalg.vector_norm(p.detach().double(), inf)
            )
        before = {name: p.detach().clone() for name, p in params.items()}
        optimizer.step()
        for name in layers:
            now = [params[f"{name}.{kind}"] for kind in ("weight", "bias")]
            old = [before[f"{name}.{kind}"] for kind in ("weight", "bias")]
            delta = [a.detach() - b for a, b in zip(now, old)]
            by_module[f"update_ratio/{name}"] = _norm(delta, 2.0) / _norm(old, 2.0)
        for name, p in params.items():
            delta = p.detach() - before[name]
            by_param[f"update_ratio/{name}"] = _norm([delta], 2.0) / _norm([before[name]], 2.0)
        out.append({"module_l2": by_module, "parameter_inf": by_param})
    return out


def odd_tensors() -> list[torch.Tensor]:
    """Tensors of odd shapes for the DTensor tests (deterministic, float32)."""
    generator = torch.Generator().manual_seed(SEED + 2)
    shapes = [(5, 7), (3,), (1, 4), (9, 2, 3), (7, 3)]
    return [torch.randn(shape, generator=generator) for shape in shapes]


def reference_norm(tensors: list[torch.Tensor], norm_type: float) -> float:
    """Norm of the concatenation of full tensors (plain torch)."""
    flat = torch.cat([t.double().reshape(-1) for t in tensors])
    return float(torch.linalg.vector_norm(flat, norm_type))


# --------------------------------------------------------------------------- launching


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a worker: no inherited rank variables, one thread per process."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _failure(what: str, logs: list[tuple[str, str]]) -> AssertionError:
    text = "\n".join(f"----- {name} -----\n{log[-6000:]}" for name, log in logs)
    return AssertionError(f"{what}\n{text}")


def run_script(script: str, *args: str, timeout: float = 300.0) -> None:
    """Run ``tests/workers/<script>`` once; it starts its own ranks (Lightning launcher).

    The script runs in its own session so that, on a timeout, the ranks Lightning
    started are killed with it.
    """
    command = [sys.executable, str(WORKERS_DIR / script), *args]
    proc = subprocess.Popen(
        command,
        env=clean_env(),
        cwd=TESTS_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise _failure(
            f"{script} timed out after {timeout}s", [("stdout", stdout), ("stderr", stderr)]
        ) from None
    if proc.returncode != 0:
        raise _failure(
            f"{script} exited with {proc.returncode}", [("stdout", stdout), ("stderr", stderr)]
        )


def launch_ranks(
    script: str, *args: str, world_size: int = WORLD_SIZE, timeout: float = 120.0
) -> None:
    """Start ``world_size`` copies of ``tests/workers/<script>`` with torchrun-style variables."""
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = clean_env(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            # Distinct (as in any two processes) but fixed, so set iteration orders are
            # reproducible and differ between the ranks.
            PYTHONHASHSEED=str(rank),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKERS_DIR / script), *args],
                env=env,
                cwd=TESTS_DIR,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    deadline = time.monotonic() + timeout
    logs: list[tuple[str, str]] = []
    timed_out = False
    for rank, proc in enumerate(procs):
        try:
            output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            for other in procs:
                other.kill()
            output, _ = proc.communicate()
        logs.append((f"rank {rank}", output))
    if timed_out:
        raise _failure(f"{script} timed out after {timeout}s (a collective mismatch hangs)", logs)
    codes = [proc.returncode for proc in procs]
    if any(codes):
        raise _failure(f"{script} ranks exited with {codes}", logs)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)

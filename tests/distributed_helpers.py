"""Shared pieces of the 2-process (gloo, CPU) tests: model, data, references, launching.

Imported by ``tests/distributed/test_distributed.py`` (the pytest process) and by the worker
scripts in ``tests/workers/`` (the distributed processes), so both sides build the
same initial weights and the same global batches.

The reference computations here use plain torch only (``get_total_norm``,
``torch.linalg.vector_norm``), never ``lightning_gradguard``.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

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


def shard_linear_layers(net: nn.Sequential, mesh: Any) -> None:
    """FSDP2 as the workers shard: each ``nn.Linear`` its own ``fully_shard`` unit, then ``net``."""
    from torch.distributed.fsdp import fully_shard

    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)


def rank_loader(data: TensorDataset, trainer: Any, batch_size: int) -> DataLoader:
    """This rank's batches: ``DistributedSampler(shuffle=False)``, so the split is known."""
    sampler = DistributedSampler(
        data, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
    )
    return DataLoader(data, batch_size=batch_size, sampler=sampler)


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


# --------------------------------------------------------------------------- ending a rank


def leave_group() -> None:
    """Wait for every rank, then destroy every process group (a no-op without one).

    The barrier keeps a rank from exiting while another still writes its results or
    runs a collective; ``destroy_process_group()`` with no argument shuts down the
    default group and every group made from it (DeviceMesh groups included).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_rank(main: Callable[..., object], *args: Any) -> NoReturn:
    """Run a worker's ``main(*args)`` in this rank, then end the process in a defined way.

    Every script in ``tests/workers/`` that joins a process group ends through here:
    on success :func:`leave_group` (barrier, destroy every group), then the ``atexit``
    handlers (wandb's teardown among them), a flush of stdout and stderr, and
    ``os._exit``: the interpreter's finalization never runs. A failure prints its
    traceback and exits with 1 (no barrier: the other rank may be elsewhere); a
    ``SystemExit`` keeps its code and message.

    Why not return from ``main`` and let Python exit: a rank used to abort now and
    then *after* writing every result, with SIGABRT and "terminate called without an
    active exception". The cause, seen with gdb in ``reinit_run.py``:

    - ``destroy_process_group()`` removes the groups from torch's registry, but the
      C++ ``ProcessGroupGloo`` objects live on while anything still references them
      (in ``reinit_run.py``: two ``DeviceMesh`` objects, still referenced by
      ``DTensorSpec`` objects after ``gc.collect()``). They are destroyed during
      ``Py_FinalizeEx`` instead (``~ProcessGroupGloo`` under ``pybind11_object_dealloc``
      under ``dict_dealloc``; the default group's ``TCPStore`` server with it on rank
      0), and every group's ``pt_gloo_runloop`` worker threads live until then.
    - A gloo worker thread drops its reference to a finished collective *after* the
      caller's ``wait()`` returned. When that is the last reference, the tensors are
      freed on the worker thread, and a tensor that has a Python object is released
      by taking the GIL there (``ProcessGroupGloo::runLoop`` → ``~AsyncBroadcastWork``
      → ``~AsyncWork`` → ``TensorImpl::decref_pyobject`` →
      ``ConcretePyInterpreterVTable::decref`` → ``pybind11::gil_scoped_acquire``):
      every broadcast or all-reduce of a tensor made in Python (the broadcasts of a
      fit's setup, the callbacks' one-tensor agreements). ``runLoop`` does it after
      ``AsyncWork::execute`` returned, so a ``barrier()`` can complete before it.
      Normally it follows within microseconds; on a loaded machine (CI: two cores,
      the whole suite) the thread can be descheduled long enough that it still waits
      for the GIL when the main thread, past ``barrier()`` and
      ``destroy_process_group()``, enters finalization.
    - A non-main thread that asks for the GIL while the interpreter finalizes is
      ended with ``pthread_exit`` (Python 3.11 ``take_gil``). Its forced unwinding
      reaches a ``noexcept`` destructor and the C++ runtime calls ``std::terminate``:
      "terminate called without an active exception", SIGABRT, exit code -6. The
      rank that aborts is the one whose worker thread lost the race (rank 0 in the
      CI failure; either rank can).

    Forcing that timing (gdb pausing each gloo worker thread 1.5-3 s between
    ``execute`` and the release) made ``reinit_run.py fsdp`` abort exactly so, on
    rank 0 in thread ``pt_gloo_runloop``: ``runLoop`` → ``~AsyncBarrierWork`` →
    ``~AsyncAllreduceWork`` → ``TensorImpl::decref_pyobject`` → ``gil_scoped_acquire``
    → ``take_gil`` → ``PyThread_exit_thread`` → ``pthread_exit`` →
    ``_Unwind_ForcedUnwind`` → ``__gxx_personality_v0`` → ``std::terminate``. The
    final ``barrier()``'s own work keeps the work before it (a callback's one-tensor
    all-reduce) alive, so the last Python tensor is released on a worker thread just
    after ``barrier()`` returns, milliseconds before finalization.

    Ending with ``os._exit`` after the barrier makes the outcome independent of that
    timing: no Python object is destroyed at exit, so no process group, store or
    tensor is released while the interpreter finalizes, and the worker threads that
    are still running are stopped by the kernel with the process, wherever they
    are. The results were written (atomically) before, and the barrier ensures every
    rank has finished its collectives, so nothing is lost by skipping finalization.

    Args:
        main: the worker's entry point.
        *args: passed to ``main``.
    """
    code = 0
    try:
        main(*args)
        leave_group()
    except SystemExit as stop:
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
            code = 1
        else:
            code = int(stop.code or 0)
    except BaseException:  # a failed rank exits, whatever the failure
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


Launch = tuple[Path, AssertionError | None]
"""Where a module's scenarios wrote their results, and how the launch failed (if it did)."""


def launch_scenarios(script: str, out: Path, timeout: float = 150.0) -> Launch:
    """Run ``script`` on every rank, writing to ``out``; a failure is kept, not raised.

    The scenarios written before a failure still get checked; :func:`read_ranks`
    raises the failure for the scenarios that have no result.
    """
    try:
        launch_ranks(script, str(out), timeout=timeout)
    except AssertionError as error:
        return out, error
    return out, None


def read_ranks(launch: Launch, scenario: str) -> list[dict[str, Any]]:
    """Every rank's ``<scenario>.rank<r>.json`` from a :func:`launch_scenarios` run."""
    out, error = launch
    paths = [out / f"{scenario}.rank{rank}.json" for rank in range(WORLD_SIZE)]
    if not all(path.exists() for path in paths):
        raise AssertionError(f"{scenario}: no result from every rank") from error
    return [read_json(path) for path in paths]


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


# --------------------------------------------------------------------------- clipping runs
#
# Used by ``tests/distributed/test_distributed_clip.py`` and ``tests/workers/clip_run.py``. The
# references below are plain torch and plain Python: ``clip_grad_norm_`` with a
# threshold chosen by a hand-written ZClip / AutoClip, and a hand-written unit-wise
# AGC, never ``lightning_gradguard``.

CLIP_STEPS = 8  # optimizer steps per clipping run: one epoch of the clipping dataset
CLIP_NUM_SAMPLES = WORLD_SIZE * BATCH_PER_RANK * CLIP_STEPS
# The loss is multiplied by this factor at these steps, on every rank and in the
# reference, so that an adaptive policy sees a real spike after its warm-up.
CLIP_LOSS_SCALES = {5: 25.0}
FIXED_MAX_NORM = 0.3
ZCLIP_ARGS: dict[str, Any] = {"warmup_steps": 3, "max_grad_norm": None, "z_thresh": 2.5}
AUTOCLIP_ARGS: dict[str, Any] = {"percentile": 50.0, "window": 100}
AGC_CLIPPING = 0.05
GUARD_ARGS: dict[str, Any] = {
    "spike_ratio": 2.0,
    "window": 100,
    "weight_ratio": 1.0,
    "cut_ratio": 0.05,
    "min_cut": 0.05,
    "weight_every_n_steps": 3,  # measured at steps 0, 3, 6 of CLIP_STEPS, reused in between
}
AGC_EPS = 1e-3
FAULT_STEP = 4  # rank 1 puts a NaN into one gradient (after DDP's all-reduce) at this step
# tests/workers/faults_run.py: rank 1 alone multiplies its gradients by FAULT_SPIKE_FACTOR at
# FAULT_SPIKE_STEP (a finite spike only it sees), or puts a NaN into one at FAULT_NAN_STEP.
FAULT_SPIKE_STEP = 5
FAULT_SPIKE_FACTOR = 1000.0
FAULT_NAN_STEP = 3
ADAM_LR = 0.01


def make_clip_dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(SEED + 3)
    x = torch.randn(CLIP_NUM_SAMPLES, LAYER_SIZES[0], generator=generator)
    y = torch.randn(CLIP_NUM_SAMPLES, LAYER_SIZES[-1], generator=generator)
    return TensorDataset(x, y)


def clip_rank_indices(rank: int, step: int) -> list[int]:
    """Like :func:`rank_indices`, for the clipping dataset."""
    own = list(range(rank, CLIP_NUM_SAMPLES, WORLD_SIZE))
    return own[step * BATCH_PER_RANK : (step + 1) * BATCH_PER_RANK]


def clip_global_indices(step: int) -> list[int]:
    return [i for rank in range(WORLD_SIZE) for i in clip_rank_indices(rank, step)]


def clip_loss(output: torch.Tensor, target: torch.Tensor, step: int) -> torch.Tensor:
    return loss_fn(output, target) * CLIP_LOSS_SCALES.get(step, 1.0)


def flat(tensors: list[torch.Tensor]) -> list[float]:
    """One list of Python floats (exact for float32 values) from a list of tensors."""
    return torch.cat([t.detach().reshape(-1).double() for t in tensors]).tolist()


class ReferenceZClip:
    """ZClip as in the authors' reference code (bluorion-com/ZClip), in Python floats.

    Warm-up: collect ``warmup_steps`` norms (clipping at ``max_grad_norm`` only), then
    mean and population variance of them. Afterwards ``z = (g − μ) / (σ + eps)``; on
    ``z > z_thresh`` clip to ``μ + z_thresh·σ / (z / z_thresh)`` and feed that value to
    the EMAs, otherwise feed ``g`` (``μ ← αμ + (1−α)x``, ``σ² ← ασ² + (1−α)(x − μ)²``).
    """

    def __init__(
        self,
        warmup_steps: int,
        max_grad_norm: float | None,
        z_thresh: float,
        alpha: float = 0.97,
        eps: float = 1e-6,
    ) -> None:
        self.warmup_steps = warmup_steps
        self.max_grad_norm = max_grad_norm
        self.z_thresh = z_thresh
        self.alpha = alpha
        self.eps = eps
        self.buffer: list[float] = []
        self.mean: float | None = None
        self.var: float | None = None

    def threshold(self, norm: float) -> float:
        cap = math.inf if self.max_grad_norm is None else self.max_grad_norm
        if self.mean is None or self.var is None:
            self.buffer.append(norm)
            if len(self.buffer) >= self.warmup_steps:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
            return cap
        std = math.sqrt(self.var)
        z = (norm - self.mean) / (std + self.eps)
        value = norm
        if z > self.z_thresh:
            value = self.mean + self.z_thresh * std / (z / self.z_thresh)
        self.mean = self.alpha * self.mean + (1 - self.alpha) * value
        self.var = self.alpha * self.var + (1 - self.alpha) * (value - self.mean) ** 2
        return min(value, cap)


class ReferenceAutoClip:
    """AutoClip: the ``percentile`` of all norms so far (this one included), as numpy does."""

    def __init__(self, percentile: float, window: int) -> None:
        self.percentile = percentile
        self.window = window
        self.history: list[float] = []

    def threshold(self, norm: float) -> float:
        self.history = [*self.history, norm][-self.window :]
        ordered = sorted(self.history)
        position = (len(ordered) - 1) * self.percentile / 100.0
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class ReferenceGuardClip:
    """GuardClip in Python floats: a spike rule over the lower median of recorded norms,
    and a bound relative to the weight norm.

    A norm above ``spike_ratio`` × the median is clipped to the median; a norm above
    ``weight_ratio`` × ‖W‖ is clipped to ``max(cut_ratio·‖W‖, min_cut)`` (the smaller of
    the two when both fire). A clipped step records the value it was clipped to, any
    other step its norm. When nothing fires the threshold is the smaller trigger. ‖W‖ is
    taken on the first step and every ``weight_every_n_steps`` steps, and kept in between.
    """

    def __init__(
        self,
        spike_ratio: float,
        window: int,
        weight_ratio: float,
        cut_ratio: float,
        min_cut: float,
        weight_every_n_steps: int,
    ) -> None:
        self.spike_ratio, self.window = spike_ratio, window
        self.weight_ratio, self.cut_ratio, self.min_cut = weight_ratio, cut_ratio, min_cut
        self.weight_every_n_steps, self.calls, self.weight_norm = weight_every_n_steps, 0, math.nan
        self.history: list[float] = []

    def threshold(self, norm: float, weight_norm: float) -> float:
        if self.calls % self.weight_every_n_steps == 0:
            self.weight_norm = weight_norm
        self.calls += 1
        weight_norm = self.weight_norm
        recent = sorted(self.history[-self.window :])
        median = recent[(len(recent) - 1) // 2] if recent else math.nan
        trigger = self.spike_ratio * median if recent else math.inf
        fired = norm > trigger
        target = median if fired else math.inf
        bound = self.weight_ratio * weight_norm
        if norm > bound:
            target = min(target, max(self.cut_ratio * weight_norm, self.min_cut))
            fired = True
        value = target if fired else min(trigger, bound)
        self.history.append(target if fired else norm)
        return value


def reference_agc_(params: list[torch.Tensor], clipping: float, eps: float) -> None:
    """Unit-wise AGC on full (unsharded) tensors, one unit at a time (plain torch)."""
    for p in params:
        g = p.grad
        units = [(p.detach(), g)] if p.dim() <= 1 else list(zip(p.detach(), g))
        for w_unit, g_unit in units:
            w_norm = float(torch.linalg.vector_norm(w_unit.double()))
            g_norm = float(torch.linalg.vector_norm(g_unit.double()))
            max_norm = max(w_norm, eps) * clipping
            if g_norm > max_norm:
                g_unit.mul_(max_norm / max(g_norm, 1e-6))


def reference_clip_run(
    policy: str, optimizer: str = "sgd", skip_steps: tuple[int, ...] = ()
) -> dict[str, list]:
    """One plain-torch process on the global batches of the clipping dataset.

    Args:
        policy: ``"fixed"`` (``FIXED_MAX_NORM``), ``"zclip"``, ``"autoclip"``, ``"guard"``
            or ``"agc"``.
        optimizer: ``"sgd"`` (lr ``LR``) or ``"adam"`` (lr ``ADAM_LR``).
        skip_steps: steps whose update is skipped entirely (no optimizer step and no
            clipping statistics updated), as a skipped non-finite step should be.

    Returns, per step: ``raw_norm`` (global L2 norm before clipping), ``threshold``
    (``None`` for AGC), ``clipped`` (the flattened clipped gradients, ``None`` on a
    skipped step) and ``params`` (the flattened parameters after the step).
    """
    net = make_net()
    data = make_clip_dataset()
    params = list(net.parameters())
    opt: torch.optim.Optimizer = (
        torch.optim.SGD(params, lr=LR) if optimizer == "sgd" else torch.optim.Adam(params, ADAM_LR)
    )
    thresholds: Any = {
        "zclip": ReferenceZClip(**ZCLIP_ARGS),
        "autoclip": ReferenceAutoClip(**AUTOCLIP_ARGS),
        "guard": ReferenceGuardClip(**GUARD_ARGS),
    }.get(policy)
    out: dict[str, list] = {"raw_norm": [], "threshold": [], "clipped": [], "params": []}
    for step in range(CLIP_STEPS):
        x, y = data[clip_global_indices(step)]
        opt.zero_grad()
        clip_loss(net(x), y, step).backward()
        norm = _norm([p.grad for p in params], 2.0)
        out["raw_norm"].append(norm)
        if step in skip_steps:
            out["threshold"].append(None)
            out["clipped"].append(None)
            out["params"].append(flat(params))
            continue
        threshold: float | None = None
        if policy == "agc":
            reference_agc_(params, AGC_CLIPPING, AGC_EPS)
        else:
            if policy == "guard":
                threshold = thresholds.threshold(norm, _norm([p.detach() for p in params], 2.0))
            else:
                threshold = FIXED_MAX_NORM if policy == "fixed" else thresholds.threshold(norm)
            if math.isfinite(threshold):
                torch.nn.utils.clip_grad_norm_(params, threshold)
        out["threshold"].append(threshold)
        out["clipped"].append(flat([p.grad for p in params]))
        opt.step()
        out["params"].append(flat(params))
    return out


# --------------------------------------------------------------------------- dead-unit runs
#
# Used by ``tests/distributed/test_distributed_dead_units.py`` and
# ``tests/workers/dead_units_run.py``.
# The data are built so that the rank split is known: ``DistributedSampler(shuffle=False)``
# gives rank 0 the even and rank 1 the odd sample indices. Feature ``DEAD_F_WINDOW`` is 1 in
# a single rank-1 sample of the first window only, ``DEAD_F_RANK0`` / ``DEAD_F_RANK1`` are 1
# on every sample of rank 0 / rank 1 (0 elsewhere), the other features are Gaussian. The
# first Linear layers are set by hand so that chosen units fire on exactly those samples.

DEAD_BATCH_PER_RANK = 4
DEAD_STEPS = 6  # optimizer steps per run: one epoch of the dead-unit dataset
DEAD_NUM_SAMPLES = WORLD_SIZE * DEAD_BATCH_PER_RANK * DEAD_STEPS
DEAD_FEATURES = 6
DEAD_F_WINDOW, DEAD_F_RANK0, DEAD_F_RANK1 = 0, 1, 2
DEAD_EVERY_N_STEPS = 3
DEAD_WINDOW = 2
# Windows start at steps 0 and 3 and cover DEAD_WINDOW batches each; the callback logs
# (and decides) at the end of a window's last batch, when global_step is already
# start + DEAD_WINDOW.
DEAD_WINDOWS = ((0, 1), (3, 4))
DEAD_LOG_STEPS = (2, 5)
DEAD_THRESHOLD = 0.5
DEAD_TAU = 0.025  # DeadUnitMonitor's default dormant_tau
DEAD_THRESHOLD_LR = 0.05
DEAD_ACTIVATIONS = ("net.1", "net.3")  # the ReLUs of the "threshold" network


def dead_rank_indices(rank: int, step: int) -> list[int]:
    """Sample indices of ``rank``'s batch at ``step`` (``DistributedSampler(shuffle=False)``)."""
    own = list(range(rank, DEAD_NUM_SAMPLES, WORLD_SIZE))
    return own[step * DEAD_BATCH_PER_RANK : (step + 1) * DEAD_BATCH_PER_RANK]


def dead_window_indices(window: int, ranks: tuple[int, ...] = (0, 1)) -> list[int]:
    """The samples seen by ``ranks`` during window ``window`` (an index into DEAD_WINDOWS)."""
    return [i for step in DEAD_WINDOWS[window] for r in ranks for i in dead_rank_indices(r, step)]


def make_dead_dataset() -> TensorDataset:
    """``(x, y, index)``: the index column lets a rank report which samples it saw."""
    generator = torch.Generator().manual_seed(SEED + 5)
    x = torch.zeros(DEAD_NUM_SAMPLES, DEAD_FEATURES)
    x[:, 3:] = torch.randn(DEAD_NUM_SAMPLES, DEAD_FEATURES - 3, generator=generator)
    x[0::WORLD_SIZE, DEAD_F_RANK0] = 1.0
    x[1::WORLD_SIZE, DEAD_F_RANK1] = 1.0
    x[dead_rank_indices(1, DEAD_WINDOWS[0][1])[2], DEAD_F_WINDOW] = 1.0
    y = torch.randn(DEAD_NUM_SAMPLES, 1, generator=generator)
    return TensorDataset(x, y, torch.arange(DEAD_NUM_SAMPLES))


def make_dead_net(kind: str) -> nn.Sequential:
    """The hand-set networks of the two dead-unit scenarios (same weights in every process).

    ``"split"``: ``Linear(6, 5) → ReLU → Linear(5, 1)``; hidden unit 0 always fires
    (bias 1), unit 1 only on the ``DEAD_F_WINDOW`` sample (rank 1, first window), unit 2
    only on rank 0's samples, unit 3 never (bias -100), unit 4 on Gaussian features.

    ``"threshold"``: ``Linear(6, 4) → ReLU → Linear(4, 3) → ReLU → Linear(3, 1)``; in the
    first hidden layer unit 0 always fires, units 1 and 2 only on rank 1's samples, unit 3
    never: 3/4 dead on rank 0's data alone, 1/4 on both ranks' data. The second hidden
    layer has bias -100: dead everywhere.
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(SEED + 6)
    if kind == "split":
        net = nn.Sequential(nn.Linear(DEAD_FEATURES, 5), nn.ReLU(), nn.Linear(5, 1))
        w = torch.zeros(5, DEAD_FEATURES)
        w[1, DEAD_F_WINDOW] = 1.0
        w[2, DEAD_F_RANK0] = 1.0
        w[4, 3:] = torch.tensor([1.0, -0.5, 0.25])
        b = torch.tensor([1.0, -0.5, -0.5, -100.0, 0.0])
    else:
        net = nn.Sequential(
            nn.Linear(DEAD_FEATURES, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1)
        )
        w = torch.zeros(4, DEAD_FEATURES)
        w[1, DEAD_F_RANK1] = 1.0
        w[2, DEAD_F_RANK1] = 2.0
        b = torch.tensor([1.0, -0.5, -0.5, -100.0])
        with torch.no_grad():
            net[2].bias.fill_(-100.0)
    with torch.no_grad():
        net[0].weight.copy_(w)
        net[0].bias.copy_(b)
    torch.random.set_rng_state(generator_state)
    return net


def reference_unit_activity(
    net: nn.Sequential, activation: int, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per unit of ``net[activation]``'s output over the samples ``x`` (plain torch).

    Returns ``(dead, scores)``: never positive, and the ReDo dormancy score (mean |h|
    of the unit over the layer's average of those means).
    """
    with torch.no_grad():
        h = net[: activation + 1](x).double()
    mean_abs = h.abs().mean(0)
    return ~(h > 0).any(0), mean_abs / mean_abs.mean()


# --------------------------------------------------------------------------- re-initialization runs
#
# Used by ``tests/distributed/test_distributed_reinit.py`` and ``tests/workers/reinit_run.py``. The
# recycling run reuses the dead-unit dataset (rank 0 sees the even, rank 1 the odd sample
# indices; ``DEAD_F_RANK0`` / ``DEAD_F_RANK1`` mark them) and its windows
# (``DEAD_EVERY_N_STEPS``, ``DEAD_WINDOW``: decisions at ``DEAD_LOG_STEPS``).

REINIT_SEED = 77  # ``seed`` of the re-initialization callbacks
REINIT_LR = 1e-3  # Adam; small, so a unit dead on one rank's data stays dead there
REINIT_WEIGHT_DECAY = 0.1  # L2 decay gives dead units non-zero Adam moments
REINIT_AT_STEP = 2  # LayerReinit's schedule
REINIT_LAYERS = ("net.0", "net.4")


def make_recycle_net() -> nn.Sequential:
    """``Linear(6, 4) → ReLU → Linear(4, 3) → ReLU → Linear(3, 1)``, hand-set.

    First hidden layer: unit 0 always fires (bias 1), unit 1 only on rank 0's samples,
    unit 2 only on rank 1's samples, unit 3 never (bias -100, weights on the Gaussian
    features so that weight decay moves them). Second hidden layer: units 0 and 2 fire
    whenever unit 0 does, unit 1 never (bias -100).
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(SEED + 8)
    net = nn.Sequential(
        nn.Linear(DEAD_FEATURES, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1)
    )
    w0 = torch.zeros(4, DEAD_FEATURES)
    w0[1, DEAD_F_RANK0] = 1.0
    w0[2, DEAD_F_RANK1] = 1.0
    w0[3, 3:] = torch.tensor([0.3, -0.2, 0.1])
    w2 = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.2, 0.2, 0.2, 0.2], [0.5, 0.0, 0.0, 0.0]])
    with torch.no_grad():
        net[0].weight.copy_(w0)
        net[0].bias.copy_(torch.tensor([1.0, -0.5, -0.5, -100.0]))
        net[2].weight.copy_(w2)
        net[2].bias.copy_(torch.tensor([0.0, -100.0, 0.0]))
    torch.random.set_rng_state(generator_state)
    return net

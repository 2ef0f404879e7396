"""A host copy of a model's and its optimizers' state, taken and put back in place.

:class:`StateSnapshot` copies parameters, buffers and optimizer state into host
buffers that are allocated once and reused: pinned memory and non-blocking copies
when the state lives on a GPU, plain copies on the CPU. Restoring copies the
values back *into* the live tensors, so every reference to them (the optimizer's
``param_groups``, FSDP2's sharded parameters, compiled graphs) stays valid.
Under FSDP2 a parameter is a ``DTensor``: each rank copies its own local shard.
Nothing here reads a value on the host: taking a snapshot never waits for the
device.

Example:
    >>> import torch
    >>> net = torch.nn.Linear(3, 2)
    >>> opt = torch.optim.Adam(net.parameters(), lr=0.1)
    >>> net(torch.ones(1, 3)).sum().backward(); opt.step()
    >>> snapshot = StateSnapshot()
    >>> snapshot.take(net, [opt], step=1)
    >>> before = net.weight.detach().clone()
    >>> net(torch.ones(1, 3)).sum().backward(); opt.step()
    >>> snapshot.restore(net, [opt])
    >>> torch.equal(net.weight, before), snapshot.step
    (True, 1)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gradguard.functional.optimizer_state import optimizer_parameters

__all__ = [
    "StateSnapshot",
    "live_state",
    "local_tensor",
]


def local_tensor(tensor: Tensor) -> Tensor:
    """The tensor itself, or this rank's shard of a ``DTensor`` (sharing its storage)."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def live_state(module: nn.Module, optimizers: Sequence[Any]) -> Iterator[tuple[str, Tensor]]:
    """Every tensor a snapshot holds, by a stable key, as this rank's local tensor.

    Keys: ``param/<name>``, ``buffer/<name>`` and ``opt<i>/<position>/<key>`` where
    ``position`` counts the parameters of optimizer ``i``'s param groups in order.
    """
    with torch.no_grad():
        for name, param in module.named_parameters():
            yield f"param/{name}", local_tensor(param.detach())
        for name, buffer in module.named_buffers():
            yield f"buffer/{name}", local_tensor(buffer)
        for index, optimizer in enumerate(optimizers):
            for position, weight in enumerate(optimizer_parameters(optimizer)):
                for key, value in optimizer.state.get(weight, {}).items():
                    if isinstance(value, Tensor):
                        yield f"opt{index}/{position}/{key}", local_tensor(value)


def _optimizer_scalars(optimizers: Sequence[Any]) -> dict[str, Any]:
    """Optimizer state entries that are not tensors (plain Python values)."""
    scalars: dict[str, Any] = {}
    for index, optimizer in enumerate(optimizers):
        params = optimizer_parameters(optimizer)
        for position, param in enumerate(params):
            for key, value in optimizer.state.get(param, {}).items():
                if not isinstance(value, Tensor):
                    scalars[f"opt{index}/{position}/{key}"] = value
    return scalars


class StateSnapshot:
    """One reusable host copy of parameters, buffers and optimizer state.

    Args:
        pin_memory: pin the host buffers (``None``: pin when the state is on CUDA).

    Attributes:
        step: the optimizer step the snapshot was taken at (``-1``: none yet).
        extra: small states the caller keeps with it (GradScaler, clip policy ...).
    """

    def __init__(self, pin_memory: bool | None = None) -> None:
        self.pin_memory = pin_memory
        self.step = -1
        self.extra: dict[str, Any] = {}
        self._host: dict[str, Tensor] = {}
        self._scalars: dict[str, Any] = {}
        self._copied: Any = None  # a CUDA event after non-blocking copies to the host

    @property
    def taken(self) -> bool:
        """Whether the snapshot holds a state."""
        return self.step >= 0

    @property
    def nbytes(self) -> int:
        """Bytes of host memory the snapshot's tensors take."""
        return sum(t.numel() * t.element_size() for t in self._host.values())

    def _buffer(self, key: str, live: Tensor) -> Tensor:
        host = self._host.get(key)
        if host is None or host.shape != live.shape or host.dtype != live.dtype:
            pin = live.is_cuda if self.pin_memory is None else self.pin_memory
            host = torch.empty(live.shape, dtype=live.dtype, device="cpu", pin_memory=pin)
            self._host[key] = host
        return host

    @torch.no_grad()
    def take(self, module: nn.Module, optimizers: Sequence[Any], step: int) -> None:
        """Copy the current state into the host buffers (allocated on first use)."""
        seen = set()
        on_cuda = False
        for key, live in live_state(module, optimizers):
            self._buffer(key, live).copy_(live, non_blocking=live.is_cuda)
            seen.add(key)
            on_cuda = on_cuda or live.is_cuda
        if on_cuda:  # the host reads the buffers only after this (see state_dict)
            self._copied = torch.cuda.Event()
            self._copied.record()
        for key in set(self._host) - seen:  # state that no longer exists
            del self._host[key]
        self._scalars = _optimizer_scalars(optimizers)
        self.step = int(step)

    @torch.no_grad()
    def restore(self, module: nn.Module, optimizers: Sequence[Any]) -> None:
        """Copy the snapshot back into the live tensors; drop optimizer state it lacks.

        Raises:
            RuntimeError: no snapshot was taken, or the live state has a tensor of
                another shape than the snapshot's (the model changed structure).
        """
        if not self.taken:
            raise RuntimeError("StateSnapshot.restore: no snapshot was taken yet.")
        _restore_into(self._host, self._scalars, module, optimizers)

    def state_dict(self) -> dict[str, Any]:
        """The snapshot as CPU tensors and Python primitives (for a checkpoint)."""
        if self._copied is not None:  # wait for the non-blocking copies (a checkpoint: rare)
            self._copied.synchronize()
        return {
            "step": self.step,
            "tensors": {k: v.clone() for k, v in self._host.items()},
            "scalars": dict(self._scalars),
            "extra": self.extra,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self.step = int(state["step"])
        self._host = {k: torch.as_tensor(v).clone() for k, v in state["tensors"].items()}
        self._scalars = dict(state["scalars"])
        self.extra = state.get("extra", {})


def _restore_into(
    host: dict[str, Tensor],
    scalars: dict[str, Any],
    module: nn.Module,
    optimizers: Sequence[Any],
) -> None:
    """Copy ``host`` tensors into the live state named like :func:`live_state` keys."""
    missing = []
    for key, live in live_state(module, optimizers):
        saved = host.get(key)
        if saved is None:
            missing.append(key)
            continue
        if saved.shape != live.shape:
            raise RuntimeError(
                f"StateSnapshot.restore: {key} has shape {tuple(live.shape)} but the snapshot "
                f"holds {tuple(saved.shape)}; the model changed structure since the snapshot."
            )
        live.copy_(saved, non_blocking=live.is_cuda)
    for index, optimizer in enumerate(optimizers):
        params = optimizer_parameters(optimizer)
        for position, param in enumerate(params):
            prefix = f"opt{index}/{position}/"
            state = optimizer.state.get(param)
            if state is None:
                continue
            if not any(k.startswith(prefix) for k in host) and not any(
                k.startswith(prefix) for k in scalars
            ):
                del optimizer.state[param]  # the snapshot predates this state
                continue
            for key in list(state):
                if f"{prefix}{key}" in scalars:
                    state[key] = scalars[f"{prefix}{key}"]
    unexpected = [k for k in missing if not k.startswith("opt")]
    if unexpected:
        raise RuntimeError(
            f"StateSnapshot.restore: the snapshot has no copy of {', '.join(unexpected[:5])}; "
            "the model changed structure since the snapshot."
        )

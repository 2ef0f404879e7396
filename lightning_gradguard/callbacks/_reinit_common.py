"""What the three re-initialization callbacks share: seeded draws, the sharding refusal.

Every rank re-initializes identically: random draws come from a generator seeded
with ``seed`` and the global step, and every decision is taken from statistics
that are the same on all ranks. Sharded (FSDP2) parameters are refused with a
message: a unit's incoming and outgoing weights live on different ranks there.

Example:
    >>> import torch
    >>> a = seeded_generator(3, 10, torch.device("cpu"))
    >>> b = seeded_generator(3, 10, torch.device("cpu"))
    >>> torch.equal(torch.rand(2, generator=a), torch.rand(2, generator=b))
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_gradguard._checks import check_choice, check_int
from lightning_gradguard.functional.init import FAN_KINDS, SCHEMES
from lightning_gradguard.functional.units import map_layers

__all__ = [
    "check_named_scheme",
    "check_seed",
    "refuse_sharded",
    "seeded_generator",
    "weight_layer_names",
]


def seeded_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The same generator on every rank: seeded from ``seed`` and the step."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1_000_003 + step)
    return generator


def refuse_sharded(pl_module: nn.Module, owner: str) -> None:
    """Raise a ``RuntimeError`` naming ``owner`` when ``pl_module`` holds DTensor parameters."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return
    if any(isinstance(p, DTensor) for p in pl_module.parameters()):
        raise RuntimeError(
            f"{owner} does not support sharded (FSDP2 / ModelParallelStrategy) parameters: "
            "re-initialized rows and their optimizer state live on other ranks. Use DDP, or "
            "initialize before sharding (e.g. init_ in configure_model)."
        )


def weight_layer_names(pl_module: nn.Module) -> set[str]:
    """Modules whose weight a fan-based scheme re-initializes (Linear, Conv, HF Conv1D)."""
    return {
        layer.name
        for layer in map_layers(pl_module)
        if layer.kind in FAN_KINDS and layer.spec.weight == "weight"
    }


def check_named_scheme(scheme: Any, owner: str, *, lsuv: bool = False) -> str:
    """``scheme`` if it is an init scheme (``"lsuv"`` too when ``lsuv``), else a ``ValueError``.

    Example:
        >>> check_named_scheme("lsuv", "LayerReinit")
        Traceback (most recent call last):
        ...
        ValueError: LayerReinit(scheme='lsuv'): scheme must be one of ['kaiming_normal', \
'kaiming_uniform', 'xavier_normal', 'xavier_uniform', 'orthogonal', 'normal'].
    """
    return check_choice(scheme, "scheme", owner, [*SCHEMES, *(["lsuv"] if lsuv else [])])


def check_seed(seed: Any, owner: str) -> int:
    """``seed`` if it is an integer >= 0, else a ``ValueError``."""
    checked = check_int(seed, "seed", owner, low=0)
    assert checked is not None
    return checked

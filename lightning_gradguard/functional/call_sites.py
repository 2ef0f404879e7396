"""Activation call sites: what counts as an activation, and how each call is named.

A *call site* is one place in a forward pass where an activation produces unit
outputs. Its name, used in metric keys such as ``dead_units/<site>``, is:

- an activation module called once per forward: its module path (``net.2``,
  ``transformer.h.0.mlp.act``);
- an activation module called ``k > 1`` times in one forward: ``<path>#<i>``,
  ``i`` the 0-based order of the call (torchvision's ``BasicBlock``:
  ``layer1.0.relu#0`` after ``bn1``, ``layer1.0.relu#1`` after the residual add);
- a functional activation (``F.relu``, ``F.gelu``, ``torch.relu``, ``x.relu()``, ...)
  called from module ``M``'s own ``forward`` (not from a child): ``<M path>:<function>``,
  plus ``#<i>`` if ``M`` calls that function more than once (``encoder.layers.0:relu``).
  The root module's path is ``""``, so a call in the root's own code is ``:relu``.

Activation modules are recognised by type or by a documented name rule, see
:func:`is_activation_module`; :func:`register_activation` adds a type.

Example:
    >>> from torch import nn
    >>> is_activation_module(nn.ReLU()), is_activation_module(nn.Linear(2, 2))
    (True, False)
    >>> class NewGELUActivation(nn.Module):  # a third-party activation, recognised by name
    ...     def forward(self, x):
    ...         return x
    >>> is_activation_module(NewGELUActivation())
    True
    >>> site_name("layer1.0.relu", None, 1, calls=2), site_name("encoder.layers.0", "relu", 0, 1)
    ('layer1.0.relu#1', 'encoder.layers.0:relu')
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
)
"""Torch activation modules tracked by default: ReLU and its relatives."""

ACTIVATION_NAME_RULE = re.compile(r"(Activation$|ReLU|GELU|GeLU|SiLU|Swish|Mish|ELU)")
"""Third-party activation modules are recognised by class name: a leaf module without
parameters whose class name ends in ``Activation`` or contains ``ReLU``, ``GELU``, ``GeLU``,
``SiLU``, ``Swish``, ``Mish`` or ``ELU`` (case-sensitive). This covers Hugging Face's
``ACT2FN`` modules (``NewGELUActivation``, ``GELUActivation``, ``FastGELUActivation``,
``QuickGELUActivation``, ``ReLUSquaredActivation``, ``PytorchGELUTanh``, ...) and timm's."""

NOT_ACTIVATIONS: frozenset[str] = frozenset({"LinearActivation", "Identity"})
"""Class names the name rule would match that are not activations (identity maps)."""

_REGISTERED: list[type[nn.Module]] = []


def register_activation(module_type: type[nn.Module]) -> type[nn.Module]:
    """Track every module of ``module_type`` as an activation (usable as a class decorator).

    Example:
        >>> @register_activation
        ... class Squash(nn.Module):
        ...     def forward(self, x):
        ...         return torch.relu(x) ** 2
        >>> is_activation_module(Squash())
        True
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type={module_type!r} must be an nn.Module subclass.")
    if module_type not in _REGISTERED:
        _REGISTERED.append(module_type)
    return module_type


def registered_activations() -> tuple[type[nn.Module], ...]:
    """The default activation types followed by the registered ones."""
    return (*DEFAULT_ACTIVATIONS, *_REGISTERED)


def is_activation_name(name: str) -> bool:
    """Whether a class name is an activation's: a known type's name or the name rule."""
    known = {t.__name__ for t in registered_activations()}
    return name in known or (
        name not in NOT_ACTIVATIONS and ACTIVATION_NAME_RULE.search(name) is not None
    )


def is_activation_module(module: nn.Module) -> bool:
    """Whether ``module``'s output is measured as an activation.

    True for instances of :data:`DEFAULT_ACTIVATIONS` and registered types, and for
    any leaf module without parameters whose class name matches
    :data:`ACTIVATION_NAME_RULE` (and is not in :data:`NOT_ACTIVATIONS`).
    """
    if isinstance(module, registered_activations()):
        return True
    name = type(module).__name__
    if name in NOT_ACTIVATIONS or ACTIVATION_NAME_RULE.search(name) is None:
        return False
    return next(module.children(), None) is None and next(module.parameters(), None) is None


def _functions() -> dict[Callable[..., Any], str]:
    table: dict[Callable[..., Any], str] = {}
    for name in ("relu", "relu6", "leaky_relu", "gelu", "silu", "elu", "selu", "celu", "mish"):
        for owner in (F, torch, torch.Tensor, torch._C._nn):
            for variant in (name, name + "_"):
                function = getattr(owner, variant, None)
                if callable(function):
                    table[function] = name
    table[F.hardswish] = "hardswish"
    return table


ACTIVATION_FUNCTIONS: dict[Callable[..., Any], str] = _functions()
"""Functional activations measured at their call sites, with the name used in site
names: ``F.relu``, ``torch.relu``, ``Tensor.relu`` and their in-place forms are all
``relu``; likewise ``relu6``, ``leaky_relu``, ``gelu``, ``silu``, ``elu``, ``selu``,
``celu``, ``mish``, ``hardswish``."""

FUNCTION_NAMES: tuple[str, ...] = tuple(sorted(set(ACTIVATION_FUNCTIONS.values())))
"""The names of the functional activations (``"gelu"``, ``"relu"``, ...)."""


def site_name(module: str, function: str | None, index: int, calls: int) -> str:
    """The call site's name (see the module docstring).

    Args:
        module: the activation module's path, or the path of the module whose own
            ``forward`` called the function (``""`` for the root).
        function: the functional activation's name, ``None`` for a module site.
        index: 0-based order of this call among the calls of the same module (or of
            the same function from the same module) in one forward.
        calls: how many such calls one forward makes.
    """
    name = module if function is None else f"{module}:{function}"
    return f"{name}#{index}" if calls > 1 else name


@dataclass(frozen=True)
class CallSite:
    """One activation call site, as recorded in a forward pass.

    Attributes:
        name: the site's name (:func:`site_name`), e.g. ``layer1.0.relu#1``.
        module: the activation module's path (module site), or the path of the
            module whose own ``forward`` called the function (functional site).
        function: the functional activation's name (``"relu"``), ``None`` for a
            module site.
        index: 0-based order of the call among the same module's (or the same
            function's in the same module) calls in one forward.
        calls: how many such calls one forward makes.
        order: position of the site among all sites of the forward (first call).
        units: the number of units (the size of ``unit_dim``).
        unit_dim: the dimension of the output that indexes units.
        shape: the output's shape at the site's first call.
        before: the last leaf module with parameters whose forward finished before
            the call (the producer, or the norm after it), ``None`` if none.
        after: the first leaf module with parameters called after it (a consumer
            candidate), ``None`` if none.
    """

    name: str
    module: str
    function: str | None
    index: int
    calls: int
    order: int
    units: int
    unit_dim: int
    shape: tuple[int, ...]
    before: str | None
    after: str | None


CHANNELS_FIRST_PRODUCERS: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
)
"""Producers whose 3-d outputs are ``(N, C, L)``: an activation after them (with
``layout="auto"``) reads units along dimension 1, not the last one."""


__all__ = [
    "ACTIVATION_FUNCTIONS",
    "ACTIVATION_NAME_RULE",
    "CHANNELS_FIRST_PRODUCERS",
    "DEFAULT_ACTIVATIONS",
    "FUNCTION_NAMES",
    "NOT_ACTIVATIONS",
    "CallSite",
    "is_activation_module",
    "is_activation_name",
    "register_activation",
    "registered_activations",
    "site_name",
]

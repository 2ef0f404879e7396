"""Lightning plumbing, written once: what every callback asks the Trainer.

The optimizer a parameter belongs to and its index, an optimizer's parameters,
the logging interval, the kind of strategy, and whether a LightningModule
overrides a hook. Strategy kinds are decided with ``isinstance`` against the
strategy classes of both ``pytorch_lightning`` and (when installed)
``lightning.pytorch``, never from class names. Overrides are read with
Lightning's public ``is_overridden``.

Example:
    >>> import pytorch_lightning as pl
    >>> trainer = pl.Trainer(logger=False, log_every_n_steps=7, enable_progress_bar=False)
    >>> strategy_kind(trainer), log_interval(trainer, None), log_interval(trainer, 3)
    ('single', 7, 3)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import pytorch_lightning as _pl
from pytorch_lightning import strategies as _pl_strategies
from pytorch_lightning.utilities.model_helpers import is_overridden as _pl_is_overridden
from torch import Tensor
from torch.optim import Optimizer

from lightning_gradguard.functional.optimizer_state import optimizer_parameters

if TYPE_CHECKING:
    import pytorch_lightning as pl

__all__ = [
    "StrategyKind",
    "is_deepspeed",
    "log_interval",
    "optimizer_index",
    "optimizer_of",
    "optimizer_parameters",
    "overrides",
    "strategy_kind",
]

StrategyKind = Literal["deepspeed", "fsdp", "model_parallel", "ddp", "single", "other"]

_IsOverridden = Callable[[str, Any, Any], bool]
_packages: list[tuple[Any, Any, _IsOverridden]] = [(_pl, _pl_strategies, _pl_is_overridden)]
try:  # the unified ``lightning`` package is optional
    import lightning.pytorch as _lp
    from lightning.pytorch import strategies as _lp_strategies
    from lightning.pytorch.utilities.model_helpers import is_overridden as _lp_is_overridden

    _packages.append((_lp, _lp_strategies, _lp_is_overridden))
except ImportError:  # pragma: no cover - depends on the environment
    pass

# Most specific first: DeepSpeedStrategy is a DDPStrategy.
_KINDS: tuple[tuple[StrategyKind, str], ...] = (
    ("deepspeed", "DeepSpeedStrategy"),
    ("fsdp", "FSDPStrategy"),
    ("model_parallel", "ModelParallelStrategy"),
    ("ddp", "DDPStrategy"),
    ("single", "SingleDeviceStrategy"),
)


def _classes(name: str) -> tuple[type, ...]:
    return tuple(
        getattr(strategies, name) for _, strategies, _ in _packages if hasattr(strategies, name)
    )


_KIND_CLASSES = tuple((kind, _classes(name)) for kind, name in _KINDS)


def strategy_kind(trainer: pl.Trainer) -> StrategyKind:
    """What kind of strategy ``trainer`` runs, by ``isinstance`` (both Lightning packages).

    ``"deepspeed"``, ``"fsdp"`` (``FSDPStrategy``), ``"model_parallel"``
    (``ModelParallelStrategy``, FSDP2), ``"ddp"``, ``"single"`` (one device) or
    ``"other"``. A subclass counts as its base (a custom DDP strategy is ``"ddp"``).

    Example:
        >>> from pytorch_lightning.strategies import DDPStrategy
        >>> from types import SimpleNamespace
        >>> strategy_kind(SimpleNamespace(strategy=DDPStrategy()))
        'ddp'
    """
    strategy = trainer.strategy
    for kind, classes in _KIND_CLASSES:
        if classes and isinstance(strategy, classes):
            return kind
    return "other"


def is_deepspeed(trainer: pl.Trainer) -> bool:
    """Whether ``trainer`` runs DeepSpeed (which owns clipping and the optimizer state)."""
    return strategy_kind(trainer) == "deepspeed"


def log_interval(trainer: pl.Trainer, every_n_steps: int | None) -> int:
    """``every_n_steps`` when given, else the Trainer's ``log_every_n_steps`` (at least 1).

    Example:
        >>> from types import SimpleNamespace
        >>> log_interval(SimpleNamespace(log_every_n_steps=0), None)
        1
    """
    if every_n_steps is not None:
        return every_n_steps
    return max(1, int(getattr(trainer, "log_every_n_steps", 50) or 1))


def optimizer_index(trainer: pl.Trainer, optimizer: Any) -> int:
    """The position of ``optimizer`` in ``trainer.optimizers`` (0 when it is not there).

    Lightning may hand a hook its ``LightningOptimizer`` wrapper: the wrapped
    optimizer is looked up.

    Example:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> a, b = torch.optim.SGD([w], lr=0.1), torch.optim.SGD([w], lr=0.1)
        >>> optimizer_index(SimpleNamespace(optimizers=[a, b]), b)
        1
    """
    optimizer = getattr(optimizer, "_optimizer", optimizer)
    return next((i for i, opt in enumerate(trainer.optimizers) if opt is optimizer), 0)


def optimizer_of(trainer: pl.Trainer, parameter: Tensor) -> Optimizer | None:
    """The optimizer of ``trainer`` that updates ``parameter``, or ``None``.

    Example:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> w, v = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
        >>> sgd = torch.optim.SGD([w], lr=0.1)
        >>> trainer = SimpleNamespace(optimizers=[sgd])
        >>> optimizer_of(trainer, w) is sgd, optimizer_of(trainer, v)
        (True, None)
    """
    for optimizer in trainer.optimizers:
        if any(p is parameter for p in optimizer_parameters(optimizer)):
            return optimizer
    return None


def overrides(pl_module: pl.LightningModule, hook: str) -> bool:
    """Whether ``pl_module``'s class overrides the ``LightningModule`` hook ``hook``.

    Lightning's public ``is_overridden``, asked of whichever Lightning package
    ``pl_module`` comes from (``False`` for a module of neither).

    Example:
        >>> import pytorch_lightning as pl
        >>> class Clips(pl.LightningModule):
        ...     def configure_gradient_clipping(self, *args, **kwargs):
        ...         pass
        >>> overrides(Clips(), "configure_gradient_clipping")
        True
        >>> overrides(pl.LightningModule(), "configure_gradient_clipping")
        False
    """
    for package, _, is_overridden in _packages:
        if isinstance(pl_module, package.LightningModule):
            return bool(is_overridden(hook, pl_module, package.LightningModule))
    return False

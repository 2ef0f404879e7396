"""What the passes run on: the private copy, the batches and the loss."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "batch_size",
    "batches",
    "check_loss",
    "default_loss",
    "first_tensor",
    "is_lightning_module",
    "lightning_loss",
    "private_copy",
    "to_device",
]


def first_tensor(batch: Any) -> Tensor | None:
    """The first tensor in ``batch`` (depth first through lists, tuples and dicts), or ``None``."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def batch_size(batch: Any) -> int | None:
    """The first dimension of the first tensor in ``batch`` (``None`` without one).

    Example:
        >>> batch_size({"x": torch.zeros(5, 2), "y": torch.zeros(5)})
        5
    """
    tensor = first_tensor(batch)
    return int(tensor.shape[0]) if tensor is not None and tensor.dim() > 0 else None


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor moved to ``device`` (containers and namedtuples kept)."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return type(batch)({k: to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batches(batch: Any) -> Iterator[Any]:
    """The batch again and again, or a DataLoader's batches (restarted when exhausted)."""
    if not isinstance(batch, torch.utils.data.DataLoader):
        while True:
            yield batch
    produced = 0
    while True:
        for item in batch:
            produced += 1
            yield item
        if produced == 0:
            raise ValueError("batch is an empty DataLoader: it yielded no batch.")


def is_lightning_module(model: nn.Module) -> bool:
    """Whether ``model`` is a LightningModule of ``pytorch_lightning`` or ``lightning.pytorch``.

    Example:
        >>> is_lightning_module(nn.Linear(2, 2))
        False
    """
    import pytorch_lightning as pl

    classes: list[type] = [pl.LightningModule]
    try:  # the unified ``lightning`` package is optional
        import lightning.pytorch as lp

        classes.append(lp.LightningModule)
    except ImportError:  # pragma: no cover - depends on the environment
        pass
    return isinstance(model, tuple(classes))


def private_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without gradients: the passes never touch the model itself.

    Raises:
        TypeError: the model cannot be deep-copied (the message says why).
    """
    try:
        work = copy.deepcopy(model)
    except Exception as error:  # anything deepcopy raises: say why, never touch the original
        raise TypeError(
            f"model could not be copied ({type(error).__name__}: {error}). diagnose works on a "
            "private copy so that your model is never changed; make the model deep-copyable "
            "(no open files, locks or generators as attributes) or pass a fresh instance."
        ) from error
    for parameter in work.parameters():
        parameter.grad = None
    return work


def lightning_loss(model: nn.Module) -> Callable[[Any, int], Tensor]:
    """``loss(batch, step)`` from the LightningModule's ``training_step`` (its ``"loss"``).

    Raises:
        ValueError: manual optimization, or (when called) a dict without ``"loss"`` or None.
    """
    if getattr(model, "automatic_optimization", True) is False:
        raise ValueError(
            f"model={type(model).__name__} uses manual optimization "
            "(automatic_optimization=False): its training_step steps optimizers itself, which "
            "needs a Trainer. Pass loss_fn=lambda model, batch: <the loss> instead."
        )
    training_step: Callable[..., Any] = getattr(model, "training_step")  # noqa: B009
    try:
        inspect.signature(training_step).bind(None, 0)
        with_index = True
    except (TypeError, ValueError):
        with_index = False

    def compute(batch: Any, step: int) -> Tensor:
        out = training_step(batch, step) if with_index else training_step(batch)
        if isinstance(out, dict):
            if "loss" not in out:
                raise ValueError(
                    f"training_step returned a dict without a 'loss' key (keys: {sorted(out)})."
                )
            out = out["loss"]
        if out is None:
            raise ValueError(
                "training_step returned None (Lightning skips such a batch): nothing to "
                "differentiate. Pass loss_fn=lambda model, batch: <the loss>."
            )
        return out

    return compute


def default_loss(model: nn.Module, batch: Any) -> Tensor:
    """The loss :func:`diagnose` uses for a plain ``nn.Module`` without ``loss_fn``.

    ``batch`` must be an ``(inputs, targets)`` pair: cross-entropy of
    ``model(inputs)`` against integer targets (class indices), mean squared
    error against floating-point targets.

    Example:
        >>> model = nn.Linear(4, 3)
        >>> loss = default_loss(model, (torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])))
        >>> loss.shape
        torch.Size([])
    """
    if not (
        isinstance(batch, (tuple, list))
        and len(batch) == 2
        and all(isinstance(t, Tensor) for t in batch)
    ):
        raise ValueError(
            f"batch of type {type(batch).__name__} is not an (inputs, targets) pair of tensors: "
            "pass loss_fn=lambda model, batch: <a scalar loss> to diagnose."
        )
    inputs, targets = batch
    output = model(inputs)
    if targets.is_floating_point():
        return nn.functional.mse_loss(output, targets)
    return nn.functional.cross_entropy(output, targets)


def check_loss(loss: Any) -> None:
    """Raise a ``ValueError`` unless ``loss`` is a scalar tensor depending on parameters."""
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"the loss must be a scalar tensor, got {shape}.")
    if not loss.requires_grad:
        raise ValueError(
            "the loss does not depend on any trainable parameter (it has no grad_fn): was it "
            "computed under torch.no_grad(), or detached?"
        )

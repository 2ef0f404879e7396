"""``diagnose(model, batch)`` in steps, each a small function: validate the arguments,
prepare the private copy, build the loss and the batches, measure, gather the evidence,
run the rules, report."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor, nn

from lightning_gradguard._checks import check_int, check_number
from lightning_gradguard.doctor.architecture import Architecture
from lightning_gradguard.doctor.coverage import not_checked
from lightning_gradguard.doctor.evidence import Evidence, Thresholds, first_last_ratio
from lightning_gradguard.doctor.inputs import (
    batches,
    default_loss,
    is_lightning_module,
    lightning_loss,
    private_copy,
    to_device,
)
from lightning_gradguard.doctor.measure import Measurements, Subject, measure
from lightning_gradguard.doctor.report import Diagnosis, Finding
from lightning_gradguard.doctor.rules import find_problems

__all__ = ["diagnose"]

_OWNER = "diagnose"


def diagnose(
    model: nn.Module,
    batch: Any,
    *,
    steps: int = 3,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    seed: int | None = 0,
    vanishing_ratio: float = 1e-4,
    vanishing_threshold: float = 1e-7,
    exploding_threshold: float = 100.0,
    exploding_ratio: float = 1.0,
    dead_threshold: float = 0.5,
    small_batch: int = 8,
) -> Diagnosis:
    """Measure the gradients of ``model`` on ``batch`` and diagnose every layer.

    Works on a private deep copy: ``steps`` forward/backward passes in training
    mode, no optimizer step, then the copy is dropped. The model itself (its
    parameters, buffers such as BatchNorm's running statistics, ``.grad``,
    training mode, ``requires_grad`` and hooks) and the global random state
    are exactly as before.

    Args:
        model: a LightningModule (the loss is ``training_step(batch, step)``, or
            its ``"loss"`` entry when it returns a dict; the batch goes through
            the module's ``on_before_batch_transfer``/``transfer_batch_to_device``/
            ``on_after_batch_transfer`` hooks first) or a plain ``nn.Module``.
        batch: one batch, used at every step; or a ``DataLoader``, whose
            successive batches are used (restarted when exhausted).
        steps: forward/backward passes. Gradient norms are averaged over them;
            a unit counts as dead only if it was never positive in any of them.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; takes precedence over
            ``training_step``. Default for a plain module: :func:`default_loss`
            (cross-entropy of ``model(x)`` for an ``(x, y)`` batch with integer
            ``y``, mean squared error for floating-point ``y``).
        seed: seeds the random draws of the passes (dropout), so two runs agree;
            ``None`` draws from the global generator's current state. Either way
            the global generator is left as it was.
        vanishing_ratio: gradients vanish when the first Linear/Conv layer's
            gradient norm is below this fraction of the last one's (and explode
            when it is above its inverse).
        vanishing_threshold: a layer whose gradient norm is below this vanishes.
        exploding_threshold: the global gradient norm above which gradients explode.
        exploding_ratio: a Linear/Conv layer (except the last, whose gradient
            follows the loss) whose ``grad_norm / param_norm`` is above this
            explodes (one SGD step at learning rate 1 would move the weights by
            more than their own norm).
        dead_threshold: a ReLU call site with at least this fraction of dead units is dying.
        small_batch: batches smaller than this are too small for BatchNorm.

    Returns:
        A :class:`~lightning_gradguard.doctor.Diagnosis`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` (or cannot be deep-copied),
            ``loss_fn`` is not callable.
        ValueError: a bad argument (the message names it), a model without
            trainable parameters, or a loss that is not a scalar depending on them.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> deep = nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(16, 16), nn.Sigmoid())])
        >>> d = diagnose(deep, (torch.randn(64, 16), torch.randint(0, 16, (64,))), steps=1)
        >>> [f.kind for f in d.findings][:1], d.exit_code
        (['vanishing'], 1)
    """
    thresholds = _validate(
        model,
        loss_fn=loss_fn,
        seed=seed,
        steps=steps,
        vanishing_ratio=vanishing_ratio,
        vanishing_threshold=vanishing_threshold,
        exploding_threshold=exploding_threshold,
        exploding_ratio=exploding_ratio,
        dead_threshold=dead_threshold,
        small_batch=small_batch,
    )
    subject = _prepare(model)
    loss, source = _loss_and_batches(subject, batch, loss_fn)
    measured = measure(subject, loss, source, steps, seed)  # step 4
    evidence = _evidence(subject, measured, thresholds)
    findings = find_problems(evidence)
    return _report(subject, measured, evidence, findings, steps)


def _validate(model: Any, *, loss_fn: Any, seed: Any, steps: Any, **thresholds: Any) -> Thresholds:
    """Step 1: every argument checked before anything runs; the thresholds."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{_OWNER}(model={type(model).__name__!r}): model must be a torch.nn.Module."
        )
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(
            f"{_OWNER}(loss_fn={loss_fn!r}): loss_fn must be a callable "
            "loss_fn(model, batch) or None."
        )
    check_int(seed, "seed", _OWNER, allow_none=True)
    check_int(steps, "steps", _OWNER, low=1)

    def positive(name: str, high: float | None = None, high_open: bool = False) -> float:
        return check_number(
            thresholds[name], name, _OWNER, low=0, high=high, low_open=True, high_open=high_open
        )

    return Thresholds(
        vanishing_ratio=positive("vanishing_ratio", high=1, high_open=True),
        vanishing_threshold=positive("vanishing_threshold"),
        exploding_threshold=positive("exploding_threshold"),
        exploding_ratio=positive("exploding_ratio"),
        dead_threshold=positive("dead_threshold", high=1),
        small_batch=int(check_int(thresholds["small_batch"], "small_batch", _OWNER, low=1) or 1),
    )


def _prepare(model: nn.Module) -> Subject:
    """Step 2: the private copy (``configure_model()`` run on it), its layers mapped."""
    work = private_copy(model)
    if is_lightning_module(work) and callable(getattr(work, "configure_model", None)):
        work.configure_model()  # type: ignore[operator]  # layers built there exist now
    subject = Subject.of(work)
    if subject.grouping.left_out:
        warnings.warn(
            f"diagnose: not measured (no norm exists for them): "
            f"{subject.grouping.describe_left_out()}.",
            stacklevel=3,
        )
    if not any(p.requires_grad for p in subject.grouping.parameters):
        raise ValueError(
            f"model={type(model).__name__} has no trainable parameter (none, or all with "
            "requires_grad=False): there is no gradient to diagnose."
        )
    return subject


def _loss_and_batches(
    subject: Subject, batch: Any, loss_fn: Callable[[nn.Module, Any], Tensor] | None
) -> tuple[Callable[[Any, int], Tensor], Iterator[Any]]:
    """Step 3: ``loss(batch, step)`` on batches moved to the device, and the batches.

    A LightningModule without ``loss_fn`` gets its own batch-transfer hooks and
    ``training_step``; a plain module :func:`default_loss`.
    """
    work, device = subject.work, subject.device
    lightning = loss_fn is None and is_lightning_module(work)
    compute: Callable[[Any, int], Tensor]
    if loss_fn is not None:
        user_loss = loss_fn
        compute = lambda b, step: user_loss(work, b)  # noqa: E731
    elif lightning:
        compute = lightning_loss(work)
    else:
        compute = lambda b, step: default_loss(work, b)  # noqa: E731

    def prepared(b: Any) -> Any:
        if lightning:
            b = work.on_before_batch_transfer(b, 0)  # type: ignore[operator]
            b = work.transfer_batch_to_device(b, device, 0)  # type: ignore[operator]
            return work.on_after_batch_transfer(b, 0)  # type: ignore[operator]
        return to_device(b, device)

    return (lambda b, step: compute(prepared(b), step)), batches(batch)


def _evidence(subject: Subject, measured: Measurements, thresholds: Thresholds) -> Evidence:
    """Step 5: what the rules read, from the measurements and the copy's layers.

    (Step 6 runs the rules on it: :func:`~lightning_gradguard.doctor.rules.find_problems`.)
    """
    bias_means: dict[str, float] = {}
    trainable: set[str] = set()
    for name, module in subject.owners.items():
        bias = getattr(module, "bias", None)
        if isinstance(bias, Tensor) and bias.numel() > 0:
            bias_means[name] = float(bias.detach().double().mean())
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            trainable.add(name)
    return Evidence(
        rows=measured.rows,
        losses=measured.losses,
        batch_size=measured.batch_size,
        samples=measured.samples,
        bias_means=bias_means,
        trainable=frozenset(trainable),
        batch_norms=tuple(
            name
            for name, module in subject.model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
        ),
        architecture=Architecture.of(subject.model, subject.layer_map),
        thresholds=thresholds,
    )


def _report(
    subject: Subject,
    measured: Measurements,
    evidence: Evidence,
    findings: list[Finding],
    steps: int,
) -> Diagnosis:
    """Step 7: list what could not be checked, and build the diagnosis."""
    owner_names = {id(module): name for name, module in subject.owners.items()}
    unknown = [
        name or "(root)" for name in subject.layer_map.unknown if name in subject.owners or not name
    ]
    embeddings = [
        owner_names[id(layer.module)]
        for layer in subject.layer_map.of_kind("embedding")
        if id(layer.module) in owner_names
    ]
    return Diagnosis(
        rows=measured.rows,
        findings=findings,
        steps=steps,
        batch_size=measured.batch_size,
        losses=measured.losses,
        first_last_ratio=first_last_ratio(measured.rows),
        not_checked=not_checked(measured.rows, unknown, embeddings, measured.not_covered),
        architecture=evidence.architecture,
    )

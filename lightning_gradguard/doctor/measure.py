"""The measurement: forward/backward passes on a private copy, hooks, per-layer rows."""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gradguard.doctor.findings import Architecture, Thresholds, find_problems
from lightning_gradguard.doctor.report import Diagnosis, LayerRow, Unchecked
from lightning_gradguard.functional.activity import (
    DEFAULT_ACTIVATIONS,
    _set_compiler_stance,
    unit_dim,
)
from lightning_gradguard.functional.init import NORM_LAYERS
from lightning_gradguard.functional.norms import (
    ROOT_GROUP,
    NormGrouping,
    clean_parameter_name,
    grad_norms,
    param_norms,
)
from lightning_gradguard.functional.units import LayerMap, map_layers

__all__ = [
    "ACTIVATIONS",
    "SATURATING",
    "default_loss",
    "diagnose",
    "is_activation",
    "is_lightning_module",
]

SATURATING: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Tanh)
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    *DEFAULT_ACTIVATIONS,
    *SATURATING,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.LogSigmoid,
    nn.Tanhshrink,
    nn.Softmax,
    nn.LogSoftmax,
)
"""Activation modules the doctor recognizes as the consumer of a layer."""

_RELU_LIKE: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.ELU,
    nn.CELU,
    nn.Hardswish,
)


def _check_number(value: Any, name: str, low: float, high: float = math.inf) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not low < value < high:
        bounds = f"in ({low:g}, {high:g})" if math.isfinite(high) else f"> {low:g}"
        raise ValueError(f"{name}={value!r} must be a number {bounds}.")
    return float(value)


def _check_fraction(value: Any, name: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not 0 < value <= 1:
        raise ValueError(f"{name}={value!r} must be a fraction in (0, 1].")
    return float(value)


def _check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}.")
    return value


def _first_tensor(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _batch_size(batch: Any) -> int | None:
    tensor = _first_tensor(batch)
    return int(tensor.shape[0]) if tensor is not None and tensor.dim() > 0 else None


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _batches(batch: Any) -> Iterator[Any]:
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
    return any(
        cls.__name__ == "LightningModule"
        and cls.__module__.split(".")[0] in ("pytorch_lightning", "lightning")
        for cls in type(model).__mro__
    )


def is_activation(module: nn.Module) -> bool:
    """An activation module: one of :data:`ACTIVATIONS`, or a parameterless third-party one.

    Third-party activation modules are recognized by name (Hugging Face's
    ``NewGELUActivation``, ``GELUActivation``...: a class name ending in ``Activation``).

    Example:
        >>> is_activation(nn.ReLU()), is_activation(nn.Linear(2, 2))
        (True, False)
    """
    if isinstance(module, ACTIVATIONS):
        return True
    name = type(module).__name__
    return name.endswith("Activation") and next(module.parameters(), None) is None


def _counts_dead_units(module: nn.Module) -> bool:
    """A ReLU-like activation (torch's, or a third-party GELU/SiLU/ReLU module): its units
    can be dead (never positive)."""
    if isinstance(module, DEFAULT_ACTIVATIONS):
        return True
    return is_activation(module) and any(
        part in type(module).__name__ for part in ("GELU", "SiLU", "Swish", "ReLU")
    )


def _is_norm(module: nn.Module) -> bool:
    """A normalization layer: torch's, or a leaf module whose class name says ``Norm``."""
    if isinstance(module, NORM_LAYERS):
        return True
    return "Norm" in type(module).__name__ and next(module.children(), None) is None


def _activation_label(module: nn.Module) -> str:
    if isinstance(module, nn.LeakyReLU):
        return f"LeakyReLU({module.negative_slope:g})"
    return type(module).__name__


def _gain(module: nn.Module | None) -> float:
    """``torch.nn.init.calculate_gain`` of the consuming activation (1 for none)."""
    if module is None:
        return 1.0
    if isinstance(module, nn.LeakyReLU):
        return math.sqrt(2.0 / (1.0 + module.negative_slope**2))
    if isinstance(module, nn.PReLU):
        slope = float(module.weight.detach().double().mean())
        return math.sqrt(2.0 / (1.0 + slope**2))
    if isinstance(module, nn.SELU):
        return 0.75
    if isinstance(module, _RELU_LIKE):  # GELU, SiLU, ...: no gain in torch; ReLU's is closest
        return math.sqrt(2.0)
    if any(part in type(module).__name__ for part in ("GELU", "SiLU", "Swish", "ReLU")):
        return math.sqrt(2.0)  # third-party ReLU-like activation modules
    if isinstance(module, nn.Tanh):
        return 5.0 / 3.0
    return 1.0


# --------------------------------------------------------------------------- measurement


class _Recorder:
    """Forward hooks: the call order, per-unit activity of every activation call, and data flow.

    An activation module called twice in one forward pass (``self.relu`` after two
    layers) is measured separately for each call. Which layers feed which
    activation or normalization call is read from the autograd graph of the first
    step (the output node of every module call, the input node of every activation
    and normalization call), so branches (a downsample path added to a block's
    output) and parameterless operations in between (additions, reshapes) are
    followed as they ran, whatever order the modules were declared in.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = {name: module for name, module in model.named_modules() if name}
        self.trace: list[tuple[str, int]] = []  # (module, call index), first step only
        self.recording = True
        self.calls: dict[str, int] = {}
        self.active: dict[tuple[str, int], Tensor] = {}  # positions with h > 0, per unit
        self.samples: dict[tuple[str, int], int] = {}
        self.broken: set[tuple[str, int]] = set()  # a call whose width changed between steps
        self.outputs: dict[Any, list[str]] = {}  # autograd node of a call's output -> modules
        self.inputs: dict[tuple[str, int], Any] = {}  # activation/norm call -> its input's node
        self._handles = [
            module.register_forward_hook(self._hook(name)) for name, module in self.modules.items()
        ]
        self._handles += [
            module.register_forward_pre_hook(self._pre_hook(name))
            for name, module in self.modules.items()
            if is_activation(module) or _is_norm(module)
        ]

    def _pre_hook(self, name: str) -> Callable[[nn.Module, Any], None]:
        def hook(module: nn.Module, inputs: Any) -> None:
            if not self.recording:
                return
            first = _first_tensor(inputs)
            if first is not None and first.grad_fn is not None:  # before an in-place op runs
                self.inputs[(name, self.calls.get(name, 0))] = first.grad_fn

        return hook

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            index = self.calls.get(name, 0)
            self.calls[name] = index + 1
            key = (name, index)
            if self.recording:
                self.trace.append(key)
                produced = _first_tensor(output)
                if produced is not None and produced.grad_fn is not None:
                    self.outputs.setdefault(produced.grad_fn, []).append(name)
            if not _counts_dead_units(module) or not isinstance(output, Tensor):
                return
            if output.dim() == 0 or key in self.broken:
                return
            with torch.no_grad():
                dim = unit_dim(output)
                h = output.detach().movedim(dim, -1).reshape(-1, output.shape[dim])
                active = (h > 0).sum(0, dtype=torch.float64)
            before = self.active.get(key)
            if before is None:
                self.active[key], self.samples[key] = active, h.shape[0]
            elif before.shape != active.shape:
                self.broken.add(key)
            else:
                before += active
                self.samples[key] += h.shape[0]

        return hook

    def new_step(self) -> None:
        self.calls = {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def forget_graph(self) -> None:
        """Drop the autograd nodes (they keep the first step's graph alive)."""
        self.outputs, self.inputs = {}, {}

    def dead_fraction(self, key: tuple[str, int]) -> float | None:
        active = self.active.get(key)
        if active is None or key in self.broken or active.numel() == 0:
            return None
        return float((active == 0).double().mean())

    def producers(
        self, key: tuple[str, int], is_layer: Callable[[str], bool], through_norms: bool
    ) -> dict[str, bool]:
        """The layers whose output reaches the input of call ``key``, and whether through a norm.

        Walks the autograd graph back from the call's input, through parameterless
        operations (and normalizations when ``through_norms``), and stops at the
        output of a layer (found), of an activation, or of a normalization.
        """
        start = self.inputs.get(key)
        found: dict[str, bool] = {}
        stack: list[tuple[Any, bool]] = [(start, False)]
        seen: set[tuple[int, bool]] = set()
        while stack and len(seen) < _GRAPH_LIMIT:
            node, normed = stack.pop()
            if node is None or (id(node), normed) in seen:
                continue
            seen.add((id(node), normed))
            names = self.outputs.get(node, ())
            layer = next((n for n in names if is_layer(n)), None)
            if layer is not None:
                found[layer] = found.get(layer, False) or normed
                continue
            if any(is_activation(self.modules[n]) for n in names):
                continue
            if any(_is_norm(self.modules[n]) for n in names):
                if not through_norms:
                    continue
                normed = True
            stack.extend((following, normed) for following, _ in node.next_functions)
        return found


_GRAPH_LIMIT = 4096
"""Autograd nodes visited, at most, when looking for the layers feeding one call."""


def _private_copy(model: nn.Module) -> nn.Module:
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


def _lightning_loss(model: nn.Module) -> Callable[[Any, int], Tensor]:
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


def _layers(model: nn.Module) -> tuple[NormGrouping, dict[str, nn.Module]]:
    """One group per module that owns parameters, and the module of every group."""
    grouping = NormGrouping.from_module(model, group_by="module")
    owners: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        for parameter_name, _ in module.named_parameters(recurse=False):
            full = clean_parameter_name(f"{name}.{parameter_name}" if name else parameter_name)
            owners.setdefault(full.rpartition(".")[0] or ROOT_GROUP, module)
    return grouping, {name: owners[name] for name in grouping.names}


# --------------------------------------------------------------------------- diagnose


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
        dead_threshold: a ReLU layer with at least this fraction of dead units is dying.
        small_batch: batches smaller than this are too small for BatchNorm.

    Returns:
        A :class:`Diagnosis`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` (or cannot be deep-copied),
            ``loss_fn`` is not callable.
        ValueError: a bad argument (the message names it), a model without
            trainable parameters, or a loss that is not a scalar depending on them.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> deep = nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(16, 16), nn.Sigmoid())])
        >>> d = diagnose(deep, (torch.randn(64, 16), torch.randint(0, 16, (64,))), steps=1)
        >>> [f.kind for f in d.findings][:1], d.exit_code
        (['vanishing'], 1)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model={type(model).__name__!r} must be a torch.nn.Module.")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn={loss_fn!r} must be a callable loss_fn(model, batch) or None.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed={seed!r} must be an integer or None.")
    thresholds = Thresholds(
        vanishing_ratio=_check_number(vanishing_ratio, "vanishing_ratio", 0.0, 1.0),
        vanishing_threshold=_check_number(vanishing_threshold, "vanishing_threshold", 0.0),
        exploding_threshold=_check_number(exploding_threshold, "exploding_threshold", 0.0),
        exploding_ratio=_check_number(exploding_ratio, "exploding_ratio", 0.0),
        dead_threshold=_check_fraction(dead_threshold, "dead_threshold"),
        small_batch=_check_int(small_batch, "small_batch", 1),
    )
    steps = _check_int(steps, "steps", 1)

    work = _private_copy(model)
    if is_lightning_module(work) and callable(getattr(work, "configure_model", None)):
        work.configure_model()  # type: ignore[operator]  # layers built there exist now
    grouping, owners = _layers(work)
    if grouping.left_out:
        warnings.warn(
            f"diagnose: not measured (no norm exists for them): {grouping.describe_left_out()}.",
            stacklevel=2,
        )
    if not any(p.requires_grad for p in grouping.parameters):
        raise ValueError(
            f"model={type(model).__name__} has no trainable parameter (none, or all with "
            "requires_grad=False): there is no gradient to diagnose."
        )
    device = grouping.parameters[0].device
    compute: Callable[[Any, int], Tensor]
    if loss_fn is not None:
        user_loss = loss_fn
        compute = lambda b, step: user_loss(work, b)  # noqa: E731
    elif is_lightning_module(work):
        compute = _lightning_loss(work)
    else:
        compute = lambda b, step: default_loss(work, b)  # noqa: E731

    def prepare(b: Any) -> Any:
        if loss_fn is None and is_lightning_module(work):
            b = work.on_before_batch_transfer(b, 0)  # type: ignore[operator]
            b = work.transfer_batch_to_device(b, device, 0)  # type: ignore[operator]
            return work.on_after_batch_transfer(b, 0)  # type: ignore[operator]
        return _to_device(b, device)

    parameter_norms = param_norms(grouping, exact=True).groups.tolist()
    per_step: list[list[float]] = []
    losses: list[float] = []
    batch_size: int | None = None
    source = _batches(batch)
    recorder = _Recorder(work)
    cuda = [device.index if device.index is not None else 0] if device.type == "cuda" else []
    # Compiled code (torch.compile(model), model.compile()) runs eagerly while measuring:
    # graphs compiled earlier without the recorder's hooks would otherwise skip them.
    prior_stance = _set_compiler_stance("force_eager")
    try:
        with torch.random.fork_rng(devices=cuda), torch.enable_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*self\.log\(\).*")
            if seed is not None:
                torch.manual_seed(seed)
            work.train()
            for step in range(steps):
                current = next(source)
                if step == 0:
                    batch_size = _batch_size(current)
                for parameter in grouping.parameters:
                    parameter.grad = None
                recorder.new_step()
                loss = compute(prepare(current), step)
                _check_loss(loss)
                losses.append(float(loss.detach()))
                loss.backward()
                recorder.recording = False
                per_step.append(grad_norms(grouping, exact=True).groups.tolist())
    finally:
        recorder.remove()
        _set_compiler_stance(prior_stance)

    has_grad = [False] * len(grouping.names)
    for parameter, group in zip(grouping.parameters, grouping.group_index):
        has_grad[group] = has_grad[group] or parameter.grad is not None
    layer_map = map_layers(work)
    rows = _rows(work, grouping, owners, recorder, per_step, parameter_norms, has_grad, layer_map)
    recorder.forget_graph()
    samples = min(recorder.samples.values(), default=0)
    architecture = Architecture.of(work)
    findings, first_last = find_problems(
        rows, losses, batch_size, samples, owners, thresholds, architecture
    )
    not_checked = _not_checked(rows, owners, layer_map, recorder, architecture)
    return Diagnosis(rows, findings, steps, batch_size, losses, first_last, not_checked)


def _check_loss(loss: Any) -> None:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"the loss must be a scalar tensor, got {shape}.")
    if not loss.requires_grad:
        raise ValueError(
            "the loss does not depend on any trainable parameter (it has no grad_fn): was it "
            "computed under torch.no_grad(), or detached?"
        )


def _rows(
    work: nn.Module,
    grouping: NormGrouping,
    owners: dict[str, nn.Module],
    recorder: _Recorder,
    per_step: list[list[float]],
    parameter_norms: list[float],
    has_grad: list[bool],
    layer_map: LayerMap,
) -> list[LayerRow]:
    module_names = {id(m): n for n, m in work.named_modules()}
    first_seen: dict[str, int] = {}
    for position, (name, _) in enumerate(recorder.trace):
        first_seen.setdefault(name, position)
    layer_names = {
        module_names.get(id(module), "")
        for module in owners.values()
        if not _is_norm(module) and not is_activation(module)
    }

    def is_layer(name: str) -> bool:
        return name in layer_names

    # Which activation call consumes each layer (the first one its output reaches), and
    # which layers a normalization consumes: from the data flow of the first step.
    consumer: dict[str, tuple[str, int]] = {}
    normalized: set[str] = set()
    for call in dict.fromkeys(recorder.trace):  # calls in the order they ran
        called = recorder.modules[call[0]]
        if is_activation(called):
            for producer, through_norm in recorder.producers(call, is_layer, True).items():
                consumer.setdefault(producer, call)
                if through_norm:
                    normalized.add(producer)
        elif _is_norm(called):
            normalized.update(recorder.producers(call, is_layer, False))
    by_module = {id(layer.module): layer for layer in layer_map}
    rows: list[LayerRow] = []
    for index, group in enumerate(grouping.names):
        module = owners[group]
        values = [step[index] for step in per_step]
        if not has_grad[index]:
            grad_norm: float | None = None
        elif all(math.isfinite(v) for v in values):
            grad_norm = math.fsum(values) / len(values)
        else:
            grad_norm = (
                next(v for v in values if math.isnan(v))
                if any(math.isnan(v) for v in values)
                else math.inf
            )
        module_name = module_names.get(id(module), "")
        key = consumer.get(module_name)
        activation = recorder.modules[key[0]] if key is not None else None
        weight_std = he_std = glorot_std = None
        layer = by_module.get(id(module))  # by identity: names differ under torch.compile
        if layer is not None and layer.kind in _SCALED_KINDS:
            weight = layer.weight.detach()
            gain = _gain(activation)
            weight_std = float(weight.double().std()) if weight.numel() > 1 else None
            he_std = gain / math.sqrt(layer.fan_in)
            glorot_std = gain * math.sqrt(2.0 / (layer.fan_in + layer.fan_out))
        rows.append(
            LayerRow(
                name=group,
                kind=type(module).__name__,
                grad_norm=grad_norm,
                param_norm=parameter_norms[index],
                dead_fraction=recorder.dead_fraction(key) if key is not None else None,
                activation=_activation_label(activation) if activation is not None else None,
                activation_module=key[0] if key is not None else None,
                weight_std=weight_std,
                he_std=he_std,
                glorot_std=glorot_std,
                normalized=module_name in normalized,
            )
        )

    def order(name: str) -> float:
        """Where the forward pass reached the module; a module it never called (the
        ``out_proj`` that ``MultiheadAttention`` uses through its weight) sits with its
        nearest called ancestor."""
        path = module_names.get(id(owners[name]), "")
        offset = 0.0
        while path:
            if path in first_seen:
                return first_seen[path] + offset
            path = path.rpartition(".")[0]
            offset = 0.5  # just after the ancestor's own hook
        return math.inf

    return sorted(rows, key=lambda r: order(r.name))  # stable: unreached layers keep order


_SCALED_KINDS = ("linear", "conv", "conv1d")
"""Kinds of the unit map whose weight scale is compared with He and Glorot init."""


def _not_checked(
    rows: list[LayerRow],
    owners: dict[str, nn.Module],
    layer_map: LayerMap,
    recorder: _Recorder,
    architecture: Architecture,
) -> list[Unchecked]:
    """The checks that could not run, or not on every layer, and why."""
    out: list[Unchecked] = []
    matrix = [r for r in rows if r.is_matrix_layer]
    finite = [r for r in matrix if r.grad_norm is not None and math.isfinite(r.grad_norm)]
    if len(finite) < 2:
        out.append(
            Unchecked(
                "depth profile",
                f"it compares the first and the last Linear/Conv layer, and {len(finite)} "
                "such layer(s) with a finite gradient were found",
            )
        )
    unknown = [name for name in layer_map.unknown if name in owners or name == ""]  # by name
    if unknown:
        out.append(
            Unchecked(
                "weight scale",
                "the unit map does not know these layer types (register them with "
                "lightning_gradguard.functional.register_layer)",
                tuple(name or "(root)" for name in unknown),
            )
        )
    owner_ids = {id(module): name for name, module in owners.items()}
    embeddings = [
        owner_ids[id(layer.module)]
        for layer in layer_map.of_kind("embedding")
        if id(layer.module) in owner_ids
    ]
    if embeddings:
        out.append(
            Unchecked(
                "weight scale",
                "embeddings are lookup tables: He and Glorot init do not apply to them",
                tuple(embeddings),
            )
        )
    scale_free = [r.name for r in matrix[:-1] if r.normalized]
    if scale_free:
        out.append(
            Unchecked(
                "grad/param ratio",
                "a normalization consumes their output, so the loss does not depend on their "
                "scale and the ratio says nothing about exploding",
                tuple(scale_free),
            )
        )
    unmeasured = [
        r.name
        for r in matrix[:-1]
        if r.activation is None and r.grad_norm is not None and not r.normalized
    ]
    if unmeasured:
        hint = (
            " (nn.TransformerEncoderLayer and nn.TransformerDecoderLayer call F.relu/F.gelu)"
            if architecture.functional_activation
            else ""
        )
        out.append(
            Unchecked(
                "dead units",
                "no activation module consumes their output (attention, a residual sum, or a "
                f"functional activation such as F.relu in forward{hint}, which is not measured)",
                tuple(unmeasured),
            )
        )
    measured = {key[0] for key in recorder.active}
    other = sorted(
        {
            r.activation_module
            for r in rows
            if r.activation_module is not None
            and r.activation_module not in measured
            and not isinstance(recorder.modules[r.activation_module], ACTIVATIONS)
        }
    )
    if other:
        out.append(
            Unchecked(
                "dead units",
                "activation modules that are not ReLU-like (by type or class name) are not "
                "measured for dead units",
                tuple(other),
            )
        )
    return out

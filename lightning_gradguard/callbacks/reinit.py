"""Re-initialization callbacks: ``InitAtStart``, ``UnitRecycler`` (ReDo) and ``LayerReinit``.

Every rank re-initializes identically: random draws come from a generator seeded
with ``seed`` and the global step, and every decision is taken from statistics
that are the same on all ranks (reduced activity, all-reduced gradient norms).
Sharded (FSDP2) parameters are refused at setup with a message: a unit's
incoming and outgoing weights live on different ranks there.

Example:
    >>> import pytorch_lightning as pl
    >>> from lightning_gradguard import UnitRecycler
    >>> trainer = pl.Trainer(callbacks=[UnitRecycler(every_n_steps=500)], logger=False)
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_gradguard._compat import Callback, rank_zero_warn
from lightning_gradguard.callbacks._parts import flat_callbacks
from lightning_gradguard.callbacks.grad_norm_monitor import GradNormMonitor
from lightning_gradguard.functional.activity import MeasuringWindows
from lightning_gradguard.functional.init import (
    FAN_KINDS,
    SCHEMES,
    _check_init_args,
    consumer_nonlinearities,
    init_,
    init_layer_,
    lsuv_,
)
from lightning_gradguard.functional.redo import (
    PairActivity,
    PairInference,
    PairTracer,
    UnitPair,
    check_pair,
    recycle_units_,
    unit_layer,
)
from lightning_gradguard.functional.units import map_layers
from lightning_gradguard.loggers import log_to_loggers
from lightning_gradguard.record import RunRecord, run_record

__all__ = [
    "InitAtStart",
    "LayerReinit",
    "UnitRecycler",
]


def _generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The same generator on every rank: seeded from ``seed`` and the step."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1_000_003 + step)
    return generator


def _refuse_sharded(pl_module: nn.Module, owner: str) -> None:
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


def _weight_layer_names(pl_module: nn.Module) -> set[str]:
    """Modules whose weight a fan-based scheme re-initializes (Linear, Conv, HF Conv1D)."""
    return {
        layer.name
        for layer in map_layers(pl_module)
        if layer.kind in FAN_KINDS and layer.spec.weight == "weight"
    }


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES and scheme != "lsuv":
        raise ValueError(f"scheme={scheme!r} is not an init scheme: use one of {list(SCHEMES)}.")


def _positive(value: Any, argument: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{argument}={value!r} must be a positive integer.")


def _check_seed(seed: Any, owner: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise TypeError(f"{owner}(seed={seed!r}): seed must be a non-negative integer.")
    return seed


def _check_steps(at_steps: Any) -> list[int] | None:
    """``at_steps`` as a sorted list of global steps (a string is refused, not split)."""
    if at_steps is None:
        return None
    if isinstance(at_steps, (str, bytes)) or not isinstance(at_steps, (list, tuple)):
        raise TypeError(
            f"LayerReinit(at_steps={at_steps!r}): at_steps must be a list of global steps, "
            "e.g. at_steps=[10, 500]."
        )
    if not all(not isinstance(s, bool) and isinstance(s, int) and s >= 0 for s in at_steps):
        raise ValueError(
            f"LayerReinit(at_steps={at_steps!r}): every step must be a non-negative integer."
        )
    return sorted(at_steps)


def _check_names(names: Any, argument: str, owner: str) -> list[str] | None:
    if names is None:
        return None
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(
            f"{owner}({argument}={names!r}): {argument} must be a list of module names, "
            "e.g. ['encoder.0', 'head']."
        )
    return list(names)


def _optimizer_of(trainer: Any, parameter: Tensor) -> torch.optim.Optimizer | None:
    for optimizer in trainer.optimizers:
        if any(p is parameter for group in optimizer.param_groups for p in group["params"]):
            return optimizer
    return None


def _check_pair(pl_module: nn.Module, pair: UnitPair) -> None:
    """Refuse an impossible producer/consumer pair at the start, not after the first window."""
    why = check_pair(pl_module, pair)
    if why is not None:
        raise ValueError(f"pairs: {why}.")


def _pairs_hash(pairs: list[UnitPair]) -> float:
    return float(zlib.crc32(repr(pairs).encode()))


def _same_on_every_rank(pairs: list[UnitPair], device: torch.device) -> bool:
    """One tiny collective: do all ranks hold the same pairs?"""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return True
    value = _pairs_hash(pairs)
    both = torch.tensor([value, -value], dtype=torch.float64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return bool(both[0] == value and -both[1] == value)


class InitAtStart(Callback):
    """Apply He / Glorot / orthogonal / GPT-2 normal init, or LSUV, without editing the module.

    It runs once, before the first training step of a fresh fit (never when
    resuming from a checkpoint): named schemes in ``on_fit_start`` (after
    ``configure_model``, so layers built there are included), LSUV in
    ``on_train_start`` on the first training batch. Draws use ``seed``, so every
    rank gets the same weights; after LSUV, rank 0's weights are broadcast.

    Args:
        scheme: one of ``kaiming_normal``, ``kaiming_uniform``, ``xavier_normal``,
            ``xavier_uniform``, ``orthogonal``, ``normal`` or ``lsuv``.
        seed: seed of the random draws.
        input_fn: maps a training batch to the model's input for LSUV (default:
            the first element of a tuple/list batch, or the batch itself).
        nonlinearity: forced gain, see :func:`~lightning_gradguard.functional.init_`.
        std: std of ``scheme="normal"`` (GPT-2: 0.02).
        residual_projections: glob patterns of GPT-2 residual projections.
        n_layers: number of residual blocks (with ``residual_projections``).
        target_std: LSUV's target output std.
        tol: LSUV's tolerance.
        max_iters: LSUV's rescaling passes per layer.
    """

    def __init__(
        self,
        scheme: str = "kaiming_normal",
        seed: int = 0,
        input_fn: Callable[[Any], Any] | None = None,
        nonlinearity: str | None = None,
        std: float = 0.02,
        residual_projections: list[str] | None = None,
        n_layers: int | None = None,
        target_std: float = 1.0,
        tol: float = 0.1,
        max_iters: int = 10,
    ) -> None:
        _check_scheme(scheme)
        self.scheme = scheme
        self.seed = _check_seed(seed, "InitAtStart")
        self.input_fn = input_fn
        self.init_kwargs: dict[str, Any] = {
            "nonlinearity": nonlinearity,
            "std": std,
            "residual_projections": tuple(residual_projections or ()),
            "n_layers": n_layers,
        }
        self.lsuv_kwargs: dict[str, Any] = {
            "target_std": target_std,
            "tol": tol,
            "max_iters": max_iters,
        }
        if scheme != "lsuv":  # validate now (the patterns are checked against the model later)
            _check_init_args(
                scheme,
                nonlinearity,
                self.init_kwargs["residual_projections"],
                n_layers,
                std,
            )
        self.report: Any = None

    @staticmethod
    def _resuming(trainer: Any) -> bool:
        return bool(getattr(trainer, "ckpt_path", None)) or int(trainer.global_step) > 0

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.scheme == "lsuv" or self._resuming(trainer):
            return
        _refuse_sharded(pl_module, "InitAtStart")
        device = next(pl_module.parameters(), torch.empty(0)).device
        generator = _generator(self.seed, 0, device)
        self.report = init_(pl_module, self.scheme, generator=generator, **self.init_kwargs)
        if not self.report:
            rank_zero_warn(
                f"InitAtStart: {type(pl_module).__name__} has no Linear/Conv layer to initialize."
            )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.scheme != "lsuv" or self._resuming(trainer):
            return
        _refuse_sharded(pl_module, "InitAtStart")
        batch = next(iter(trainer.train_dataloader))
        inputs = (
            self.input_fn(batch)
            if self.input_fn
            else (batch[0] if isinstance(batch, (tuple, list)) else batch)
        )
        inputs = pl_module.transfer_batch_to_device(inputs, pl_module.device, 0)
        device = next(pl_module.parameters(), torch.empty(0)).device
        generator = _generator(self.seed, 0, device)
        self.report = lsuv_(pl_module, inputs, generator=generator, **self.lsuv_kwargs)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            with torch.no_grad():
                for parameter in pl_module.parameters():
                    dist.broadcast(parameter.data, src=0)


class UnitRecycler(Callback):
    """Recycle dormant units (ReDo, Sokar et al., 2023) every ``every_n_steps`` steps.

    Over a measuring window of ``window`` training batches the activity of each
    producer -> [norm] -> activation -> consumer pair is accumulated where the
    consumer reads the units (:class:`~lightning_gradguard.functional.PairActivity`,
    summed across ranks); units whose dormancy score is at most ``tau`` get new
    incoming weights, zero bias, zero outgoing weights, their norm affine and
    running statistics reset, and zeroed optimizer state
    (:func:`~lightning_gradguard.functional.recycle_units_`). The output layer is
    never recycled: it is nobody's producer.

    Without ``pairs``, they are inferred from the first training step's forward
    pass, recorded as it runs (module hooks and a ``TorchFunctionMode``; compiled
    code runs eagerly for that step): conv -> BatchNorm -> ReLU -> conv in a
    ResNet block, GPT-2's ``c_fc`` -> act -> ``c_proj``, a Transformer FFN's
    ``linear1`` -> ``F.relu`` -> ``linear2``. Call sites without an unambiguous
    pair (after a residual add, feeding two layers) are named in a warning. That
    step also counts for a window starting at it. Every rank must find the same
    pairs (checked with one collective).

    On a compiled model the window's batches run eagerly
    (``torch.compiler.set_stance("force_eager")``) so the consumers' hooks see
    them: no recompilation, compiled speed outside windows.

    Logged: ``recycled_units/<layer>`` (units recycled in that window, by
    producer layer). Every recycling is a ``recycle`` event of the run record
    (values: ``units``); ``events`` lists them (step, kind, layer, detail). The
    pairs in use are in ``unit_pairs``, the skipped call sites in ``skipped``.

    Args:
        every_n_steps: start a measuring window every this many optimizer steps.
        window: training batches per window.
        tau: dormancy threshold (ReDo's default 0.025; 0 recycles only dead units).
        pairs: ``[producer, consumer, activation, norm, ...]`` names: the weight layer
            making the units, the one reading them, the activation call site between
            (a module path, ``path#i`` for a module run several times, or
            ``module:function`` for a functional activation), and any norm layers
            between producer and activation; inferred when omitted.
        scheme: init scheme of the new incoming weights.
        seed: seed of the random draws (with the step: identical on every rank).
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        window: int = 10,
        tau: float = 0.025,
        pairs: list[list[str]] | None = None,
        scheme: str = "kaiming_normal",
        seed: int = 0,
    ) -> None:
        _positive(every_n_steps, "every_n_steps")
        _positive(window, "window")
        if window > every_n_steps:
            raise ValueError(f"window={window} must not exceed every_n_steps={every_n_steps}.")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 <= tau < math.inf:
            raise ValueError(
                f"UnitRecycler(tau={tau!r}): tau must be a non-negative finite number."
            )
        _check_scheme(scheme)
        if scheme == "lsuv":
            raise ValueError("scheme='lsuv' needs data; recycled units use a named scheme.")
        if pairs is not None and not all(
            isinstance(p, (list, tuple)) and len(p) >= 3 and all(isinstance(n, str) for n in p)
            for p in pairs
        ):
            raise ValueError(
                f"pairs={pairs!r} must be [producer, consumer, activation] name triples, "
                "optionally followed by the names of norm layers between producer and activation."
            )
        self.every_n_steps = every_n_steps
        self.window = window
        self.tau = float(tau)
        self.pairs = None if pairs is None else [list(p) for p in pairs]
        self.scheme = scheme
        self.seed = _check_seed(seed, "UnitRecycler")
        self.recycled_total = 0
        self._record: RunRecord | None = None
        self.unit_pairs: list[UnitPair] = []
        self.skipped: dict[str, str] = {}
        self._tracker: PairActivity | None = None
        self._tracer: PairTracer | None = None
        self._trace_pending = False
        self._trace_activity: dict[str, Any] = {}
        self._windows = MeasuringWindows(every_n_steps, window)

    @functools.cached_property  # Lightning reads it at every hook call: compute it once
    def state_key(self) -> str:
        return self._generate_state_key(tau=self.tau, pairs=self.pairs)

    def state_dict(self) -> dict[str, Any]:
        return {
            "recycled_total": self.recycled_total,
            "window_started_at": self._windows.started_at,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.recycled_total = int(state_dict.get("recycled_total", 0))
        self._windows.started_at = int(state_dict.get("window_started_at", -1))

    @property
    def events(self) -> list[dict[str, Any]]:
        """The recyclings of the current run (step, kind, layer, detail), from the run record."""
        if self._record is None:
            return []
        return [event.row() for event in self._record.events_of("recycle")]

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":  # per run: a resumed fit gets them back from load_state_dict
            self.recycled_total = 0
            self._windows = MeasuringWindows(self.every_n_steps, self.window)
        self._record = run_record(trainer)  # in place before a checkpoint is restored

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        _refuse_sharded(pl_module, "UnitRecycler")
        self._tracker = None
        if self.pairs is None:
            self._trace_pending = True
            return
        self.unit_pairs = [UnitPair(p[0], p[1], p[2], tuple(p[3:])) for p in self.pairs]
        modules = dict(pl_module.named_modules())
        missing = sorted({n for p in self.pairs for n in (p[:2] + p[3:]) if n not in modules})
        if missing:
            raise ValueError(f"pairs name modules that do not exist: {missing}.")
        for pair in self.unit_pairs:
            _check_pair(pl_module, pair)
        self._tracker = PairActivity(pl_module, self.unit_pairs)

    # ------------------------------------------------------------------ inference
    def _start_trace(self, pl_module: Any) -> None:
        self._trace_pending = False
        self._trace_activity = {}
        self._tracer = PairTracer(pl_module, on_input=self._observe_input)
        self._tracer.start()

    def _observe_input(self, name: str, module: nn.Module, tensor: Tensor) -> None:
        """Activity of every weight layer's input in the traced step (pairs are not known yet)."""
        if name not in self._trace_activity:
            self._trace_activity[name] = PairActivity.accumulator_for(module)
        self._trace_activity[name](module, tensor)

    def _finish_trace(self, trainer: Any, pl_module: Any) -> None:
        tracer, self._tracer = self._tracer, None
        if tracer is None:
            return
        found: PairInference = tracer.stop()
        observed, self._trace_activity = self._trace_activity, {}
        self.unit_pairs = [p for p in found.pairs if p.activation is not None]
        self.skipped = dict(found.skipped)
        device = next(pl_module.parameters(), torch.empty(0)).device
        if not _same_on_every_rank(self.unit_pairs, device):
            raise RuntimeError(
                "UnitRecycler inferred different producer/consumer pairs on different ranks "
                f"(this rank: {[p.producer for p in self.unit_pairs]}): the forward pass takes "
                "another path on some rank. Pass pairs=[[producer, consumer, activation], ...]."
            )
        if not self.unit_pairs:
            listed = "; ".join(f"{s}: {why}" for s, why in self.skipped.items()) or "none"
            raise ValueError(
                f"UnitRecycler could not infer producer/consumer pairs in "
                f"{type(pl_module).__name__} from its first training step (activation call "
                f"sites: {listed}). Pass pairs=[[producer, consumer, activation, norms...], ...] "
                "with module names."
            )
        if trainer.is_global_zero and self.skipped:
            found.warn_skipped("UnitRecycler")
        tracker = PairActivity(pl_module, self.unit_pairs, device=device)
        self._tracker = tracker
        step = int(trainer.global_step)
        windows = self._windows
        if step % windows.every_n_steps == 0 and step != windows.started_at:
            # The traced step opens the window due now: count its forward pass.
            windows.maybe_open(step, tracker)
            for pair in self.unit_pairs:
                if pair.consumer in observed:
                    tracker.adopt(str(pair.activation), observed[pair.consumer])

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Tensor) -> None:
        if self._tracer is not None:
            self._finish_trace(trainer, pl_module)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self._tracer is not None:
            self._tracer.stop()
            self._tracer = None
        if self._tracker is not None:
            self._windows.close(self._tracker)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._tracer is not None:
            self._tracer.stop()
            self._tracer = None
        if self._tracker is not None:
            self._windows.close(self._tracker)  # also gives torch.compile its stance back

    # ------------------------------------------------------------------ windows
    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._trace_pending:
            self._start_trace(pl_module)
            return
        if self._tracker is not None:
            self._windows.maybe_open(int(trainer.global_step), self._tracker)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._tracer is not None:  # a step without backward (skipped, or manual without it)
            self._finish_trace(trainer, pl_module)
        tracker = self._tracker
        if tracker is None or not self._windows.maybe_close(tracker):
            return
        stats = tracker.stats()
        step = int(trainer.global_step)
        metrics: dict[str, float] = {}
        modules = dict(pl_module.named_modules())
        for index, pair in enumerate(self.unit_pairs):
            if pair.activation is None or pair.activation not in stats:
                continue
            mask = stats[pair.activation].dormant(self.tau)
            layer = unit_layer(modules[pair.producer], pair.producer)
            assert layer is not None
            optimizer = _optimizer_of(trainer, layer.weight)
            generator = _generator(self.seed, step * 131 + index, layer.weight.device)
            count = recycle_units_(pl_module, pair, mask, optimizer, self.scheme, generator)
            metrics[f"recycled_units/{pair.producer}"] = float(count)
            if count:
                self.recycled_total += count
                run_record(trainer).add(
                    "recycle",
                    step,
                    layers=[pair.producer],
                    values={"units": count},
                    detail=f"{count} of {mask.numel()} units dormant (tau={self.tau:g})",
                )
        if trainer.is_global_zero:
            log_to_loggers(trainer, metrics, step=step)


class LayerReinit(Callback):
    """Re-initialize layers whose gradients vanished, or on a schedule.

    Vanishing is read from a :class:`~lightning_gradguard.GradNormMonitor` listed
    before this callback (its norms and its ``vanishing_threshold``/``patience``
    detection: no second pass over the gradients), every ``check_every_n_steps``
    steps. A re-initialized layer gets a fresh weight (``scheme``, gain of its
    consuming activation), zero bias, and its optimizer state cleared (moments
    zeroed, Adam's ``step`` back to 0); the monitor's streak for it restarts.
    Every re-initialization is a ``reinit`` event of the run record; ``events``
    lists them (step, kind, layer, detail).

    Args:
        check_every_n_steps: how often the monitor's vanishing flags are read (one
            host read per check).
        at_steps: explicit schedule: re-initialize ``layers`` at these global steps.
        layers: module names for the schedule (and, if given, the only layers the
            vanishing rule may touch).
        scheme: init scheme.
        max_reinits_per_layer: a layer is re-initialized at most this many times by
            the vanishing rule (a layer that vanishes again needs another remedy).
        seed: seed of the random draws (with the step: identical on every rank).
    """

    def __init__(
        self,
        check_every_n_steps: int = 50,
        at_steps: list[int] | None = None,
        layers: list[str] | None = None,
        scheme: str = "kaiming_normal",
        max_reinits_per_layer: int = 1,
        seed: int = 0,
    ) -> None:
        _positive(check_every_n_steps, "check_every_n_steps")
        _positive(max_reinits_per_layer, "max_reinits_per_layer")
        _check_scheme(scheme)
        if scheme == "lsuv":
            raise ValueError("scheme='lsuv' needs data; LayerReinit uses a named scheme.")
        steps = _check_steps(at_steps)
        names = _check_names(layers, "layers", "LayerReinit")
        if steps is not None and not names:
            raise ValueError("at_steps needs layers=[...]: the modules to re-initialize.")
        self.check_every_n_steps = check_every_n_steps
        self.at_steps = steps
        self.layers = names
        self.scheme = scheme
        self.max_reinits_per_layer = max_reinits_per_layer
        self.seed = _check_seed(seed, "LayerReinit")
        self.reinit_counts: dict[str, int] = {}
        self._monitor: GradNormMonitor | None = None
        self._scheduled_at = -1  # the last step the schedule ran (once per step)
        self._record: RunRecord | None = None

    @functools.cached_property  # Lightning reads it at every hook call: compute it once
    def state_key(self) -> str:
        return self._generate_state_key(layers=self.layers, at_steps=self.at_steps)

    def state_dict(self) -> dict[str, Any]:
        return {"reinit_counts": dict(self.reinit_counts), "scheduled_at": self._scheduled_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reinit_counts = {
            str(k): int(v) for k, v in state_dict.get("reinit_counts", {}).items()
        }
        self._scheduled_at = int(state_dict.get("scheduled_at", -1))

    @property
    def events(self) -> list[dict[str, Any]]:
        """The re-initializations of this run (step, kind, layer, detail), from the run record."""
        if self._record is None:
            return []
        return [event.row() for event in self._record.events_of("reinit")]

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._record = run_record(trainer)  # in place before a checkpoint is restored
        if stage == "fit":  # per run: a resumed fit gets them back from load_state_dict
            self._scheduled_at = -1
            self.reinit_counts = {}
        callbacks = flat_callbacks(trainer)
        monitors = [
            cb for cb in callbacks[: callbacks.index(self)] if isinstance(cb, GradNormMonitor)
        ]
        self._monitor = monitors[0] if monitors else None
        if self._monitor is None and self.at_steps is None:
            raise ValueError(
                "LayerReinit reads vanishing gradients from a GradNormMonitor: add "
                "GradNormMonitor() before LayerReinit in Trainer(callbacks=[...]), or give "
                "an explicit schedule with at_steps=[...] and layers=[...]."
            )
        if self._monitor is not None and not self._monitor.detect and self.at_steps is None:
            raise ValueError(
                "LayerReinit reads the vanishing flags of the GradNormMonitor before it, but that "
                "monitor has detect=False and never sets them: use GradNormMonitor(detect=True), "
                "or give an explicit schedule with at_steps=[...] and layers=[...]."
            )
        if self.layers is not None:
            tied = map_layers(pl_module).tied
            shared = {n: tied[n] for n in self.layers if n in tied}
            if shared:
                raise ValueError(
                    f"layers={self.layers!r}: {sorted(shared)} share their weight with "
                    f"{sorted(set(shared.values()))} (tied): re-initializing them would redraw "
                    "that layer too. Leave them out."
                )
            weight_layers = _weight_layer_names(pl_module)
            bad = [n for n in self.layers if n not in weight_layers]
            if bad:
                raise ValueError(
                    f"layers={self.layers!r}: {bad} are not Linear/Conv modules of the model "
                    "(Linear, Conv, ConvTranspose or Hugging Face Conv1D)."
                )

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        _refuse_sharded(pl_module, "LayerReinit")

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = int(trainer.global_step)
        scheduled = self.at_steps is not None and step in self.at_steps and bool(self.layers)
        if scheduled and step != self._scheduled_at and self.layers:
            self._scheduled_at = step
            self._reinit(trainer, pl_module, list(self.layers), step, "schedule")
        if self._monitor is None or step % self.check_every_n_steps:
            return
        names = self._monitor.vanishing_layers()  # one host read per check
        weight_layers = _weight_layer_names(pl_module)
        chosen = [
            n
            for n in names
            if n in weight_layers
            and (self.layers is None or n in self.layers)
            and self.reinit_counts.get(n, 0) < self.max_reinits_per_layer
        ]
        if chosen:
            self._reinit(trainer, pl_module, chosen, step, "vanishing gradients")
            self._monitor.restart_vanishing(chosen)

    @torch.no_grad()
    def _reinit(
        self, trainer: Any, pl_module: Any, names: list[str], step: int, reason: str
    ) -> None:
        gains = consumer_nonlinearities(pl_module)
        layer_map = map_layers(pl_module)
        for offset, name in enumerate(names):
            layer = layer_map[name]  # fans and units from the map (HF Conv1D is [in, out])
            weight = layer.weight
            nl, slope = gains.get(name) or ("relu", 0.0)
            generator = _generator(self.seed, step * 131 + offset, weight.device)
            init_layer_(layer, self.scheme, nl, slope, generator=generator)
            params = [weight]
            if layer.bias is not None:
                layer.bias.zero_()
                params.append(layer.bias)
            for parameter in params:
                optimizer = _optimizer_of(trainer, parameter)
                if optimizer is not None and parameter in optimizer.state:
                    for value in optimizer.state[parameter].values():
                        if isinstance(value, Tensor):
                            value.zero_()  # moments, and Adam's step back to 0
            if reason != "schedule":  # the limit is for the vanishing rule only
                self.reinit_counts[name] = self.reinit_counts.get(name, 0) + 1
            run_record(trainer).add("reinit", step, layers=[name], detail=reason)
        rank_zero_warn(f"LayerReinit: re-initialized {', '.join(names)} at step {step} ({reason}).")

"""``UnitRecycler``: recycle dormant units (ReDo) in measuring windows.

Example:
    >>> import pytorch_lightning as pl
    >>> from lightning_gradguard import UnitRecycler
    >>> trainer = pl.Trainer(callbacks=[UnitRecycler(every_n_steps=500)], logger=False)
"""

from __future__ import annotations

import functools
import zlib
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from typing_extensions import override

from lightning_gradguard._checks import check_int, check_number
from lightning_gradguard.callbacks._reinit_common import (
    check_named_scheme,
    check_seed,
    refuse_sharded,
    seeded_generator,
)
from lightning_gradguard.callbacks._trainer import optimizer_of
from lightning_gradguard.callbacks._windows import WindowedCallback
from lightning_gradguard.functional.redo import (
    PairActivity,
    PairInference,
    PairTracer,
    UnitPair,
    check_pair,
    recycle_units_,
    unit_layer,
)
from lightning_gradguard.loggers import log_to_loggers
from lightning_gradguard.record import RunRecord, run_record

if TYPE_CHECKING:
    import pytorch_lightning as pl

__all__ = [
    "UnitRecycler",
]


def _check_pairs(pairs: Any) -> list[list[str]] | None:
    """``pairs`` as lists of names: [producer, consumer, activation, norms...] each."""
    if pairs is None:
        return None
    ok = isinstance(pairs, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) >= 3 and all(isinstance(n, str) for n in p)
        for p in pairs
    )
    if not ok:
        raise ValueError(
            f"UnitRecycler(pairs={pairs!r}): pairs must be [producer, consumer, activation] "
            "name triples, optionally followed by the names of norm layers between producer "
            "and activation."
        )
    return [list(p) for p in pairs]


def _refuse_impossible_pair(pl_module: nn.Module, pair: UnitPair) -> None:
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


class UnitRecycler(WindowedCallback):
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
        owner = "UnitRecycler"
        check_int(every_n_steps, "every_n_steps", owner, low=1)
        check_int(window, "window", owner, low=1, high=every_n_steps)
        self.tau = check_number(tau, "tau", owner, low=0)
        self.scheme = check_named_scheme(scheme, owner)
        self.pairs = _check_pairs(pairs)
        self.seed = check_seed(seed, owner)
        super().__init__(every_n_steps, window)
        self.every_n_steps, self.window = every_n_steps, window
        self.recycled_total = 0
        self._record: RunRecord | None = None
        self.unit_pairs: list[UnitPair] = []
        self.skipped: dict[str, str] = {}
        self._tracer: PairTracer | None = None
        self._trace_pending = False
        self._trace_activity: dict[str, Any] = {}

    @functools.cached_property  # Lightning reads it at every hook call: compute it once
    def state_key(self) -> str:
        return self._generate_state_key(tau=self.tau, pairs=self.pairs)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"recycled_total": self.recycled_total, **self._window_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.recycled_total = int(state_dict.get("recycled_total", 0))
        self._load_window_state(state_dict)

    @property
    def events(self) -> list[dict[str, Any]]:
        """The recyclings of the current run (step, kind, layer, detail), from the run record."""
        if self._record is None:
            return []
        return [event.row() for event in self._record.events_of("recycle")]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # per run: a resumed fit gets them back from load_state_dict
            self.recycled_total = 0
            self._restart_windows()
        self._record = run_record(trainer)  # in place before a checkpoint is restored

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refuse_sharded(pl_module, "UnitRecycler")
        self._tracker = None
        if self.pairs is None:
            self._trace_pending = True
            return
        self.unit_pairs = [UnitPair(p[0], p[1], p[2], tuple(p[3:])) for p in self.pairs]
        modules = dict(pl_module.named_modules())
        missing = sorted({n for p in self.pairs for n in (p[:2] + p[3:]) if n not in modules})
        if missing:
            raise ValueError(
                f"UnitRecycler(pairs={self.pairs!r}): pairs name modules that do not exist: "
                f"{missing}."
            )
        for pair in self.unit_pairs:
            _refuse_impossible_pair(pl_module, pair)
        self._tracker = PairActivity(pl_module, self.unit_pairs)

    # ------------------------------------------------------------------ inference
    def _start_trace(self, pl_module: pl.LightningModule) -> None:
        self._trace_pending = False
        self._trace_activity = {}
        self._tracer = PairTracer(pl_module, on_input=self._observe_input)
        self._tracer.start()

    def _observe_input(self, name: str, module: nn.Module, tensor: Tensor) -> None:
        """Activity of every weight layer's input in the traced step (pairs are not known yet)."""
        if name not in self._trace_activity:
            self._trace_activity[name] = PairActivity.accumulator_for(module)
        self._trace_activity[name](module, tensor)

    def _finish_trace(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        if self._tracer is not None:
            self._finish_trace(trainer, pl_module)

    def _stop_trace(self) -> None:
        if self._tracer is not None:
            self._tracer.stop()
            self._tracer = None

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._stop_trace()
        super().on_exception(trainer, pl_module, exception)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop_trace()
        super().teardown(trainer, pl_module, stage)  # also gives torch.compile its stance back

    # ------------------------------------------------------------------ windows
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._trace_pending:
            self._start_trace(pl_module)
            return
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._tracer is not None:  # a step without backward (skipped, or manual without it)
            self._finish_trace(trainer, pl_module)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def on_window_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, tracker: Any
    ) -> None:
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
            optimizer = optimizer_of(trainer, layer.weight)
            generator = seeded_generator(self.seed, step * 131 + index, layer.weight.device)
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

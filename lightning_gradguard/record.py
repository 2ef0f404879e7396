"""The run record: the one channel through which the callbacks tell each other what happened.

Every lightning_gradguard callback writes what it did and measured into one
:class:`RunRecord` per run, and :class:`~lightning_gradguard.HealthReport` (and
anything else that wants to know) reads it from there:

- **events** (:class:`Event`): a kind from :data:`EVENT_KINDS`, the optimizer step,
  the layers concerned, named numeric values and a short human detail. The record
  keeps the newest ``max_events_per_kind`` events of every kind, so frequent events
  (skipped steps) never push out rare ones (swaps), plus exact counts, the set of
  layers and the sums of the values per kind over the whole run.
- **history** (:class:`MetricHistory`): structured series of what was logged (for
  example ``"grad_norm"``: one column per layer, one row per logging step), bounded
  to ``history_rows`` rows per series, evenly thinned as the run grows, so the
  pictures always cover the whole run.
- **thresholds**: the lines the pictures draw (``"grad_norm"``: the vanishing
  threshold, ``"dead_units"``: the dead fraction that triggers a rescue).

A callback finds the record with :func:`run_record`: the ``RunRecord`` among the
trainer's callbacks (a :class:`~lightning_gradguard.GradGuard` holds one as its
first part), added to ``trainer.callbacks`` on first use when there is none. The
record is a callback itself only to be part of the checkpoint: its
:meth:`~RunRecord.state_dict` holds plain tensors and Python primitives (loads
with ``torch.load(weights_only=True)``), so after a resume the events, counts and
history of the part before the checkpoint are back.

Example:
    >>> record = RunRecord(max_events_per_kind=2)
    >>> for step in range(5):
    ...     _ = record.add("skip", step, detail="skipped optimizer step")
    >>> _ = record.add("swap", 3, layers=["net.3"], values={"dead": 0.75})
    >>> record.count("skip"), [e.step for e in record.events_of("skip")]
    (5, [3, 4])
    >>> record.layers("swap"), record.total("swap", "dead")
    (['net.3'], 0.75)
    >>> record.history.add("grad_norm", 10, {"net.0": 0.5, "net.2": 0.25})
    >>> record.history.get("grad_norm").names
    ['net.0', 'net.2']
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import Tensor
from typing_extensions import override

from lightning_gradguard._checks import check_choice, check_int
from lightning_gradguard._compat import Callback, rank_zero_warn

if TYPE_CHECKING:
    import pytorch_lightning as pl


__all__ = [
    "EVENT_COLUMNS",
    "EVENT_KINDS",
    "STATE_VERSION",
    "Event",
    "EventKind",
    "MetricHistory",
    "RunRecord",
    "Series",
    "find_run_record",
    "run_record",
]

EventKind = Literal[
    "skip",
    "stop",
    "nonfinite",
    "vanishing",
    "exploding",
    "dying",
    "swap",
    "reinit",
    "recycle",
    "rollback",
]
"""What an event reports:

- ``skip``: an optimizer step was skipped (values: ``nonfinite`` 1 or 0; layers:
  the layers with non-finite gradients);
- ``stop``: a guard stopped training (e.g. too many skipped steps in a row);
- ``nonfinite``, ``vanishing``, ``exploding``, ``dying``: what the monitors detected;
- ``swap``: ReLU replaced by LeakyReLU (values: ``dead``, the dead fraction);
- ``reinit``: a layer re-initialized; ``recycle``: dormant units recycled
  (values: ``units``);
- ``rollback``: the model went back to an earlier good state.
"""

EVENT_KINDS: tuple[str, ...] = get_args(EventKind)
"""Every :data:`EventKind`, in a fixed order."""

EVENT_COLUMNS = ("step", "kind", "layer", "detail")
"""Columns of the events table (:meth:`Event.row`)."""

STATE_VERSION = 1


@dataclass(frozen=True)
class Event:
    """One thing a callback did or detected, at an optimizer step.

    Attributes:
        kind: one of :data:`EVENT_KINDS`.
        step: the trainer's ``global_step`` when it happened.
        layers: the layers concerned (module paths); empty for the whole model.
        values: named numbers (a dead fraction, a unit count, a norm).
        detail: a short sentence for people.

    Example:
        >>> Event("swap", 10, ("net.3",), {"dead": 1.0}, "ReLU -> LeakyReLU").row()
        {'step': 10, 'kind': 'swap', 'layer': 'net.3', 'detail': 'ReLU -> LeakyReLU'}
    """

    kind: EventKind
    step: int
    layers: tuple[str, ...] = ()
    values: Mapping[str, float] = field(default_factory=dict)
    detail: str = ""

    def row(self) -> dict[str, Any]:
        """The event as a row of the events table (layers joined by ``", "``)."""
        return {
            "step": self.step,
            "kind": self.kind,
            "layer": ", ".join(self.layers),
            "detail": self.detail,
        }

    def to_state(self) -> dict[str, Any]:
        """Plain Python primitives (for the checkpoint)."""
        return {
            "kind": self.kind,
            "step": self.step,
            "layers": list(self.layers),
            "values": dict(self.values),
            "detail": self.detail,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Event:
        """The inverse of :meth:`to_state`."""
        return cls(
            kind=state["kind"],
            step=int(state["step"]),
            layers=tuple(str(name) for name in state.get("layers", ())),
            values={str(k): float(v) for k, v in state.get("values", {}).items()},
            detail=str(state.get("detail", "")),
        )


# --------------------------------------------------------------------------- history


@dataclass
class Series:
    """A read-only view of one history series.

    Attributes:
        steps: the optimizer step of each row.
        names: the column names (layers, or quantities such as ``"threshold"``).
        values: ``[rows, columns]`` float64 tensor; NaN where not logged.
        logged: ``[rows, columns]`` bool tensor: whether the value was logged (a
            logged value may itself be NaN: a non-finite gradient).
    """

    steps: list[int]
    names: list[str]
    values: Tensor
    logged: Tensor

    def column(self, name: str) -> list[float]:
        """One column as floats, NaN where not logged (an empty list if unknown)."""
        if name not in self.names:
            return []
        return self.values[:, self.names.index(name)].tolist()


class _SeriesStore:
    """Rows of one series, thinned to at most ``max_rows`` evenly spaced rows.

    Row ``k`` (counting every row ever added) is kept when ``k % stride == 0``;
    when the store is full, every other kept row is dropped and the stride doubles.
    The newest row is always kept as a provisional *tail* until a kept row replaces
    it, so the last values logged are never lost.
    """

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.names: list[str] = []
        self.index: dict[str, int] = {}
        self.steps: list[int] = []
        self.rows: list[Tensor] = []  # float64 [len(names) at the time]; NaN = not logged
        self.masks: list[Tensor] = []
        self.stride = 1
        self.added = 0
        self.tail = False  # whether the last row is a provisional one

    def add(self, step: int, values: Mapping[str, float]) -> None:
        for name in values:
            if name not in self.index:
                self.index[name] = len(self.names)
                self.names.append(name)
        if self.steps and self.steps[-1] == step:  # same step (another optimizer): merge
            self._merge(len(self.steps) - 1, values)
            return
        row, mask = self._row(values, len(self.names))
        keep = self.added % self.stride == 0
        self.added += 1
        if self.tail:  # the previous newest row was provisional: this one replaces it
            self.steps.pop()
            self.rows.pop()
            self.masks.pop()
        self.steps.append(int(step))
        self.rows.append(row)
        self.masks.append(mask)
        self.tail = not keep
        kept = len(self.steps) - (1 if self.tail else 0)
        if kept > self.max_rows:
            self._thin()

    def _row(self, values: Mapping[str, float], width: int) -> tuple[Tensor, Tensor]:
        """One row as tensors, built from Python lists (one tensor per row, not per value)."""
        row = [math.nan] * width
        mask = [False] * width
        for name, value in values.items():
            row[self.index[name]] = float(value)
            mask[self.index[name]] = True
        return torch.tensor(row, dtype=torch.float64), torch.tensor(mask, dtype=torch.bool)

    def _merge(self, position: int, values: Mapping[str, float]) -> None:
        width = len(self.names)
        new, new_mask = self._row(values, width)
        old, old_mask = self.rows[position], self.masks[position]
        row = torch.cat([old, old.new_full((width - old.numel(),), math.nan)])
        mask = torch.cat([old_mask, old_mask.new_zeros(width - old_mask.numel())])
        self.rows[position] = torch.where(new_mask, new, row)
        self.masks[position] = mask | new_mask

    def _thin(self) -> None:
        count = len(self.steps) - (1 if self.tail else 0)
        keep = list(range(0, count, 2)) + ([count] if self.tail else [])
        self.steps = [self.steps[i] for i in keep]
        self.rows = [self.rows[i] for i in keep]
        self.masks = [self.masks[i] for i in keep]
        self.stride *= 2

    def view(self) -> Series:
        width = len(self.names)
        values = torch.full((len(self.rows), width), math.nan, dtype=torch.float64)
        logged = torch.zeros((len(self.rows), width), dtype=torch.bool)
        for i, (row, mask) in enumerate(zip(self.rows, self.masks)):
            values[i, : row.numel()] = row
            logged[i, : mask.numel()] = mask
        return Series(list(self.steps), list(self.names), values, logged)

    def state_dict(self) -> dict[str, Any]:
        series = self.view()
        return {
            "names": list(self.names),
            "steps": torch.tensor(self.steps, dtype=torch.int64),
            "values": series.values,
            "logged": series.logged,
            "stride": self.stride,
            "added": self.added,
            "tail": self.tail,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.names = [str(n) for n in state["names"]]
        self.index = {name: i for i, name in enumerate(self.names)}
        self.steps = [int(s) for s in state["steps"].tolist()]
        values = state["values"].to(torch.float64)
        logged = state["logged"].to(torch.bool)
        self.rows = [values[i].clone() for i in range(values.shape[0])]
        self.masks = [logged[i].clone() for i in range(logged.shape[0])]
        self.stride = int(state["stride"])
        self.added = int(state["added"])
        self.tail = bool(state["tail"])


class MetricHistory:
    """Named series of values over optimizer steps, bounded, for the pictures.

    Args:
        max_rows: rows kept per series. Older rows are thinned evenly (every
            other one, repeatedly) so that the series always spans the whole run;
            the newest row is always kept.

    Example:
        >>> history = MetricHistory(max_rows=4)
        >>> for step in range(10):
        ...     history.add("clip", step, {"threshold": float(step)})
        >>> history.get("clip").steps
        [0, 4, 8, 9]
        >>> history.get("clip").column("threshold")
        [0.0, 4.0, 8.0, 9.0]
    """

    def __init__(self, max_rows: int = 512) -> None:
        self.max_rows = max_rows
        self._series: dict[str, _SeriesStore] = {}

    def add(self, series: str, step: int, values: Mapping[str, float]) -> None:
        """Add one row of ``values`` (column name -> number) to ``series`` at ``step``.

        Rows for the same step are merged (two optimizers logging at one step).
        """
        if not values:
            return
        store = self._series.get(series)
        if store is None:
            store = self._series[series] = _SeriesStore(self.max_rows)
        store.add(int(step), values)

    def get(self, series: str) -> Series | None:
        """The series, or ``None`` if nothing was logged under that name."""
        store = self._series.get(series)
        return None if store is None or not store.steps else store.view()

    def names(self) -> list[str]:
        """The series names, in the order they first appeared."""
        return list(self._series)

    def clear(self) -> None:
        """Forget every series."""
        self._series = {}

    def state_dict(self) -> dict[str, Any]:
        """Tensors and Python primitives, one entry per series."""
        return {name: store.state_dict() for name, store in self._series.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self._series = {}
        for name, saved in state.items():
            store = _SeriesStore(self.max_rows)
            store.load_state_dict(saved)
            self._series[str(name)] = store


# --------------------------------------------------------------------------- the record


class RunRecord(Callback):
    """Events, counts and metric history of one run, shared by every lightning_gradguard part.

    Writers: the monitors, the clipper, the dead-unit rescue, the re-initializers
    (and any callback of yours) call :meth:`add` for events and ``history.add``
    for series. Readers: :class:`~lightning_gradguard.HealthReport` (pictures,
    events table, summary, alerts), your code after ``fit``. Get it with
    :func:`run_record`. It is reset when a new ``fit`` sets up and restored from
    the checkpoint on resume.

    Args:
        max_events_per_kind: newest events kept per kind (the counts, layers and
            value sums stay exact beyond it).
        history_rows: rows kept per history series.

    Example:
        >>> record = RunRecord()
        >>> event = record.add("reinit", 40, layers=["net.0"], detail="vanishing gradients")
        >>> [e.row() for e in record.events]
        [{'step': 40, 'kind': 'reinit', 'layer': 'net.0', 'detail': 'vanishing gradients'}]
        >>> record.count("reinit"), record.layers("reinit")
        (1, ['net.0'])
    """

    def __init__(self, max_events_per_kind: int = 1000, history_rows: int = 512) -> None:
        self.max_events_per_kind = check_int(
            max_events_per_kind, "max_events_per_kind", "RunRecord", low=1
        )
        self.history_rows = check_int(history_rows, "history_rows", "RunRecord", low=1)
        self.history = MetricHistory(history_rows)
        self.thresholds: dict[str, float] = {}
        self._events: dict[str, deque[tuple[int, Event]]] = {}
        self._counts: dict[str, int] = {}
        self._layers: dict[str, list[str]] = {}
        self._totals: dict[str, dict[str, float]] = {}
        self._sequence = 0

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={n}" for k, n in self._counts.items())
        return f"RunRecord({counts})"

    @property
    def state_key(self) -> str:  # one record per trainer: no settings in the key
        return "RunRecord"

    # ------------------------------------------------------------------ writing

    def add(
        self,
        kind: EventKind,
        step: int,
        layers: Iterable[str] = (),
        values: Mapping[str, float] | None = None,
        detail: str = "",
    ) -> Event:
        """Record an event and return it.

        Args:
            kind: one of :data:`EVENT_KINDS`.
            step: the optimizer step (``trainer.global_step``).
            layers: the layers concerned.
            values: named numbers; their sums per kind are kept exactly.
            detail: a short sentence for people.
        """
        check_choice(kind, "kind", "RunRecord.add", EVENT_KINDS)
        event = Event(
            kind=kind,
            step=int(step),
            layers=tuple(str(name) for name in layers),
            values={str(k): float(v) for k, v in (values or {}).items()},
            detail=str(detail),
        )
        self._store(event)
        return event

    def _store(self, event: Event, count: bool = True) -> None:
        self._sequence += 1
        queue = self._events.get(event.kind)
        if queue is None:
            queue = self._events[event.kind] = deque(maxlen=self.max_events_per_kind)
        queue.append((self._sequence, event))
        if not count:
            return
        self._counts[event.kind] = self._counts.get(event.kind, 0) + 1
        known = self._layers.setdefault(event.kind, [])
        known.extend(name for name in event.layers if name not in known)
        totals = self._totals.setdefault(event.kind, {})
        for name, value in event.values.items():
            totals[name] = totals.get(name, 0.0) + value

    # ------------------------------------------------------------------ reading

    @property
    def events(self) -> list[Event]:
        """The kept events of every kind, in the order they were recorded."""
        merged = [item for queue in self._events.values() for item in queue]
        return [event for _, event in sorted(merged, key=lambda item: item[0])]

    def events_of(self, *kinds: str) -> list[Event]:
        """The kept events of the given kinds, in the order they were recorded."""
        merged = [item for kind in kinds for item in self._events.get(kind, ())]
        return [event for _, event in sorted(merged, key=lambda item: item[0])]

    def events_since(self, sequence: int) -> tuple[list[Event], int]:
        """Kept events recorded after ``sequence`` (a value this method returned), and the new one.

        A reader that polls (the report's alerts) passes back the number it got,
        so it sees every event once.
        """
        if sequence >= self._sequence:  # nothing new: the common case, checked every step
            return [], self._sequence
        merged = []
        for queue in self._events.values():
            for item in reversed(queue):  # the newest first: stop at the first one already seen
                if item[0] <= sequence:
                    break
                merged.append(item)
        return [event for _, event in sorted(merged, key=lambda item: item[0])], self._sequence

    def count(self, kind: str) -> int:
        """How many events of ``kind`` were recorded in the run (exact, kept or not)."""
        return self._counts.get(kind, 0)

    @property
    def counts(self) -> dict[str, int]:
        """Exact event counts per kind (kinds with none left out)."""
        return dict(self._counts)

    def layers(self, kind: str) -> list[str]:
        """Every layer named by an event of ``kind`` in the run, in first-seen order."""
        return list(self._layers.get(kind, []))

    def total(self, kind: str, value: str) -> float:
        """The sum of ``values[value]`` over every event of ``kind`` in the run."""
        return self._totals.get(kind, {}).get(value, 0.0)

    # ------------------------------------------------------------------ lifecycle / state

    def reset(self) -> None:
        """Forget everything (a new run)."""
        self.history.clear()
        self.thresholds = {}
        self._events = {}
        self._counts = {}
        self._layers = {}
        self._totals = {}
        self._sequence = 0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # a new fit starts a new record; a resume restores it after this
            self.reset()

    @override
    def state_dict(self) -> dict[str, Any]:
        """Events, exact counts, thresholds and history: tensors and Python primitives."""
        return {
            "version": STATE_VERSION,
            "events": [event.to_state() for event in self.events],
            "counts": dict(self._counts),
            "layers": {kind: list(names) for kind, names in self._layers.items()},
            "totals": {kind: dict(values) for kind, values in self._totals.items()},
            "thresholds": dict(self.thresholds),
            "history": self.history.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (a newer layout is refused with a warning)."""
        version = state_dict.get("version")
        if version != STATE_VERSION:
            rank_zero_warn(
                f"RunRecord: the checkpoint's record has layout version {version!r}, this "
                f"version reads {STATE_VERSION}; the record starts empty."
            )
            return
        self.reset()
        for saved in state_dict.get("events", []):
            self._store(Event.from_state(saved), count=False)
        self._counts = {str(k): int(v) for k, v in state_dict.get("counts", {}).items()}
        self._layers = {
            str(k): [str(n) for n in names] for k, names in state_dict.get("layers", {}).items()
        }
        self._totals = {
            str(k): {str(n): float(v) for n, v in values.items()}
            for k, values in state_dict.get("totals", {}).items()
        }
        self.thresholds = {str(k): float(v) for k, v in state_dict.get("thresholds", {}).items()}
        self.history.load_state_dict(state_dict.get("history", {}))


def find_run_record(trainer: pl.Trainer) -> RunRecord | None:
    """The trainer's :class:`RunRecord` (inside a bundle too), or ``None``."""
    for callback in getattr(trainer, "callbacks", None) or []:
        if isinstance(callback, RunRecord):
            return callback
        for part in getattr(callback, "gradguard_parts", None) or []:
            if isinstance(part, RunRecord):
                return part
    return None


def run_record(trainer: pl.Trainer) -> RunRecord:
    """The trainer's :class:`RunRecord`; one is appended to ``trainer.callbacks`` if none.

    This is the one way the callbacks find the record: a ``RunRecord`` listed in
    ``Trainer(callbacks=[...])`` or held by a :class:`~lightning_gradguard.GradGuard`.
    A callback that is set up without one adds it, so that it is checkpointed with
    the other callbacks.

    Example:
        >>> import pytorch_lightning as pl
        >>> trainer = pl.Trainer(logger=False, enable_checkpointing=False)
        >>> record = run_record(trainer)
        >>> run_record(trainer) is record and record in trainer.callbacks
        True
    """
    record = find_run_record(trainer)
    if record is None:
        record = RunRecord()
        callbacks = getattr(trainer, "callbacks", None)
        if isinstance(callbacks, list):
            callbacks.append(record)
    return record

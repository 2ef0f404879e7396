"""``HealthReport``: pictures, histograms, the events table and run summary, for any logger.

Example:
    >>> import pytorch_lightning as pl
    >>> from lightning_gradguard import GradNormMonitor, HealthReport
    >>> trainer = pl.Trainer(callbacks=[GradNormMonitor(), HealthReport()], logger=False)
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_gradguard._checks import check_bool, check_int
from lightning_gradguard._compat import Callback, rank_zero_warn
from lightning_gradguard.callbacks._parts import flat_callbacks
from lightning_gradguard.callbacks.adaptive_grad_clip import AdaptiveGradClip
from lightning_gradguard.callbacks.spike_recovery import SpikeRecovery
from lightning_gradguard.functional.norms import NormGrouping, local_tensors
from lightning_gradguard.loggers import tensorboard_writers, to_host, wandb_runs
from lightning_gradguard.record import EVENT_COLUMNS, Event, RunRecord, run_record

if TYPE_CHECKING:
    import pytorch_lightning as pl


__all__ = [
    "ALERT_LEVELS",
    "METRIC_PREFIXES",
    "AlertLimiter",
    "HealthReport",
    "finite_histogram",
]

METRIC_PREFIXES = (
    "grad_norm",
    "param_norm",
    "update_ratio",
    "clip",
    "dead_units",
    "dormant_units",
    "recycled_units",
    "grad_hist",
    "gradguard",
)
"""Key prefixes that get their own W&B sections against ``trainer/global_step``."""

ALERT_LEVELS = {
    "nonfinite": "ERROR",
    "stop": "ERROR",
    "exploding": "WARN",
    "dying": "WARN",
    "rollback": "WARN",
}
"""Event kinds that raise a W&B alert, with the alert level (a skipped step with
non-finite gradients raises an ``ERROR`` alert too)."""


class AlertLimiter:
    """At most ``max_per_hour`` alerts per kind in any hour (a bad hour sends a few, not thousands).

    Example:
        >>> limiter = AlertLimiter(max_per_hour=2)
        >>> [limiter.allowed("nonfinite", t) for t in (0.0, 1.0, 2.0, 3601.0)]
        [True, True, False, True]
    """

    def __init__(self, max_per_hour: int = 5) -> None:
        self.max_per_hour = max_per_hour
        self._times: dict[str, list[float]] = {}

    def allowed(self, kind: str, now: float) -> bool:
        """Whether one more alert of ``kind`` fits in the hourly budget (and count it)."""
        recent = [t for t in self._times.get(kind, []) if now - t < 3600.0]
        if len(recent) >= self.max_per_hour:
            self._times[kind] = recent
            return False
        self._times[kind] = [*recent, now]
        return True


def _alert(event: Event) -> tuple[str, str] | None:
    """The alert's kind (its title and rate-limit bucket) and level for ``event``, if any."""
    if event.kind == "skip":  # a step skipped for non-finite gradients is a non-finite alert
        return ("nonfinite", "ERROR") if event.values.get("nonfinite") else None
    level = ALERT_LEVELS.get(event.kind)
    return None if level is None else (event.kind, level)


def finite_histogram(values: Tensor, bins: int) -> Tensor:
    """``[low, high, count_1, ..., count_bins]`` of the finite entries, with no host sync.

    The range is the finite entries' min and max (computed on the device, unlike
    ``torch.histc(min=0, max=0)``, which reads it back); inf/NaN entries are left
    out (a step with non-finite gradients reaches this before it is skipped). All
    equal values fall in the first bin of ``[v, v]``.

    Example:
        >>> finite_histogram(torch.tensor([0.0, 1.0, 1.0, float("nan"), 4.0]), 4).tolist()
        [0.0, 4.0, 1.0, 2.0, 0.0, 1.0]
    """
    finite = torch.isfinite(values)
    low = torch.where(finite, values, torch.inf).min() if values.numel() else values.new_zeros(())
    high = torch.where(finite, values, -torch.inf).max() if values.numel() else values.new_zeros(())
    low = torch.where(torch.isfinite(low), low, 0.0)
    high = torch.where(torch.isfinite(high), high, low)
    width = (high - low).clamp_min(torch.finfo(values.dtype).tiny)
    index = ((values - low) / width * bins).nan_to_num(0.0).clamp(0, bins - 1).long()
    counts = torch.zeros(bins, dtype=values.dtype, device=values.device)
    counts.index_add_(0, index, finite.to(values.dtype))
    return torch.cat([low.view(1), high.view(1), counts])


def _plots_or_none() -> Any:
    """:mod:`lightning_gradguard.plots`, or None when matplotlib cannot be imported."""
    try:
        from lightning_gradguard import plots
    except ImportError:
        return None
    return plots


def _public_config(callback: Any) -> dict[str, Any]:
    """The constructor arguments of a callback, as plain values (for the run config)."""
    config: dict[str, Any] = {}
    for name in inspect.signature(type(callback).__init__).parameters:
        if name in ("self", "args", "kwargs") or not hasattr(callback, name):
            continue
        value = getattr(callback, name)
        if isinstance(value, (bool, int, float, str)) or value is None:
            config[name] = value
        elif isinstance(value, (list, tuple)) and all(
            isinstance(v, (bool, int, float, str)) for v in value
        ):
            config[name] = list(value)
        else:
            config[name] = repr(value)
    return config


class HealthReport(Callback):
    """Pictures, gradient histograms, the events table and a run summary.

      It draws from the run record (:func:`~lightning_gradguard.record.run_record`),
      where the other lightning_gradguard callbacks write what they measured (the
      metric history) and did (the events), so it adds no pass over the gradients,
      except for the opt-in histograms. The record is part of the checkpoint: after
      a resume, pictures, events and summary cover the whole run.

      - Pictures every ``picture_every_n_steps`` steps and at the end of fit: a
        gradient-flow heatmap (layers × steps, log-scale norm, vanishing cells
        marked), the dead-unit fraction per layer over time, and the clip threshold
        against the raw norm. Saved as PNG files in ``out_dir`` for users of any
        logger, and logged as images to W&B (``gradguard/<picture>``) and TensorBoard.
      - Histograms of every layer's gradients (``grad_hist/<layer>``), opt-in, every
        ``histogram_every_n_steps`` steps: computed on the device with
        ``torch.histc`` after AMP unscaling and the DDP reduction (the gradients the
        optimizer really uses), moved to the host in one transfer. Under FSDP2 they
        describe this rank's shards. Non-finite elements are left out.
      - The events table ``gradguard/events`` (step, kind, layer, detail): skipped
        steps, swaps, re-initializations, recycling, rollbacks, vanishing /
        exploding / non-finite warnings. W&B gets a ``wandb.Table``, TensorBoard a text table.
      - W&B alerts on non-finite gradients, explosions, mass dying and rollbacks, at most
        ``max_alerts_per_hour`` per kind.
      - With a ``WandbLogger``: the callbacks' settings in the run config, metric
        sections (``define_metric``) against ``trainer/global_step``, and totals in
        the run summary (skipped steps, swapped layers, recycled units, worst layers;
    with ``SpikeRecovery``: rollbacks and the batches they skipped).
      - Files in ``out_dir`` for any logger: the pictures, ``events.csv`` (the
        events table) and ``summary.json`` (the run summary).

      At the end of fit, and also when fit stops on an exception (``on_exception``,
      including the clipper's limit of skipped steps in a row), the pictures, the
      events table and the summary so far are written before the error propagates;
      the summary then says what stopped the run (``gradguard/stopped_by``).

      Everything goes through the Trainer's loggers on rank zero; with no logger the
      files are still written.

      Args:
          picture_every_n_steps: draw and log the pictures every this many steps
              (``None``: only at the end of fit).
          histogram_every_n_steps: log gradient histograms every this many steps
              (``None``, the default: never).
          histogram_bins: bins per histogram.
          out_dir: folder of the files (default: ``gradguard`` in the first logger's
              folder, else in ``trainer.default_root_dir``).
          alerts: send W&B alerts.
          max_alerts_per_hour: the rate limit per alert kind.
    """

    def __init__(
        self,
        picture_every_n_steps: int | None = 500,
        histogram_every_n_steps: int | None = None,
        histogram_bins: int = 64,
        out_dir: str | None = None,
        alerts: bool = True,
        max_alerts_per_hour: int = 5,
    ) -> None:
        owner = "HealthReport"
        self.picture_every_n_steps = check_int(
            picture_every_n_steps, "picture_every_n_steps", owner, low=1, allow_none=True
        )
        self.histogram_every_n_steps = check_int(
            histogram_every_n_steps, "histogram_every_n_steps", owner, low=1, allow_none=True
        )
        self.histogram_bins = check_int(histogram_bins, "histogram_bins", owner, low=2)
        if out_dir is not None and not isinstance(out_dir, (str, os.PathLike)):
            raise TypeError(
                f"HealthReport(out_dir={out_dir!r}): out_dir must be a folder path (str) or None."
            )
        self.out_dir = out_dir
        self.alerts = check_bool(alerts, "alerts", owner)
        self.max_alerts_per_hour = check_int(
            max_alerts_per_hour, "max_alerts_per_hour", owner, low=0
        )
        self.pictures: dict[str, Path] = {}
        self.files: dict[str, Path] = {}
        self._grouping: NormGrouping | None = None
        self._last_picture_step = -1
        self._limiter = AlertLimiter(max_alerts_per_hour if alerts else 0)
        self._alerted_up_to = 0  # the record's sequence number of the last event seen
        self._warned_no_matplotlib = False
        self._warned_write = False

    # ------------------------------------------------------------------ set-up

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # a reused report draws and warns for its new run
            self._last_picture_step = -1
            self._warned_no_matplotlib = self._warned_write = False
        run_record(trainer)  # in place before a checkpoint is restored

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._limiter = AlertLimiter(self.max_alerts_per_hour if self.alerts else 0)
        # Events restored from a checkpoint were alerted in the run that recorded them.
        _, self._alerted_up_to = run_record(trainer).events_since(0)
        runs = wandb_runs(trainer)
        if not runs:
            return
        config = {
            f"gradguard/{type(cb).__name__}": _public_config(cb)
            for cb in flat_callbacks(trainer)
            if type(cb).__module__.startswith("lightning_gradguard")
            and not isinstance(cb, RunRecord)  # the record has no guarding settings
        }
        for run in runs:
            run.config.update(config, allow_val_change=True)
            run.define_metric("trainer/global_step")
            for prefix in METRIC_PREFIXES:
                run.define_metric(f"{prefix}/*", step_metric="trainer/global_step")

    def _folder(self, trainer: pl.Trainer) -> Path:
        if self.out_dir is not None:
            return Path(self.out_dir)
        for logger in getattr(trainer, "loggers", []):
            root = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
            if root:
                return Path(root) / "gradguard"
        return Path(trainer.default_root_dir) / "gradguard"

    # ------------------------------------------------------------------ alerts

    def _send_alerts(self, trainer: pl.Trainer) -> None:
        """A W&B alert for each new event of an alert kind, within the hourly budget."""
        record = run_record(trainer)
        events, self._alerted_up_to = record.events_since(self._alerted_up_to)
        if not events or not trainer.is_global_zero:
            return
        runs = wandb_runs(trainer)
        if not runs:
            return
        import wandb

        for event in events:
            alert = _alert(event)
            if alert is None or not self._limiter.allowed(alert[0], time.monotonic()):
                continue
            kind, level = alert
            row = event.row()
            for run in runs:
                run.alert(
                    title=f"gradguard: {kind}",
                    text=f"step {event.step}: {row['layer']} {event.detail}".strip(),
                    level=getattr(wandb.AlertLevel, level),  # type: ignore[attr-defined]
                )

    # ------------------------------------------------------------------ histograms

    @override
    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        every = self.histogram_every_n_steps
        if every is None or int(trainer.global_step) % every or not trainer.is_global_zero:
            return  # only rank zero logs: the others skip the work too
        if self._grouping is None:
            self._grouping = NormGrouping.from_module(pl_module)
        grouping = self._grouping
        rows: dict[str, Tensor] = {}
        for g, name in enumerate(grouping.names):
            grads = [
                p.grad
                for p, i in zip(grouping.parameters, grouping.group_index)
                if i == g and p.grad is not None
            ]
            if grads:
                local, _ = local_tensors(grads)
                flat = torch.cat([t.detach().reshape(-1).float() for t in local])
                rows[name] = finite_histogram(flat, self.histogram_bins)
        if rows:
            host = to_host(rows)  # one transfer for every layer
            self._log_histograms(trainer, host, int(trainer.global_step))

    def _log_histograms(self, trainer: pl.Trainer, host: dict[str, list[float]], step: int) -> None:
        import numpy as np

        for run in wandb_runs(trainer):
            import wandb

            payload: dict[str, Any] = {"trainer/global_step": step}
            for name, values in host.items():
                low, high, counts = values[0], values[1], values[2:]
                if not (math.isfinite(low) and math.isfinite(high)):
                    continue
                high = high if high > low else low + 1e-12
                edges = np.linspace(low, high, len(counts) + 1)
                payload[f"grad_hist/{name}"] = wandb.Histogram(
                    np_histogram=(np.asarray(counts), edges)
                )
            run.log(payload)
        for writer in tensorboard_writers(trainer):
            for name, values in host.items():
                low, high, counts = values[0], values[1], values[2:]
                if not (math.isfinite(low) and math.isfinite(high)):
                    continue
                high = high if high > low else low + 1e-12
                edges = np.linspace(low, high, len(counts) + 1)
                centers = (edges[:-1] + edges[1:]) / 2
                total = float(sum(counts))
                writer.add_histogram_raw(
                    f"grad_hist/{name}",
                    min=low,
                    max=high,
                    num=total,
                    sum=float(np.dot(centers, counts)),
                    sum_squares=float(np.dot(centers**2, counts)),
                    bucket_limits=edges[1:].tolist(),
                    bucket_counts=list(counts),
                    global_step=step,
                )

    # ------------------------------------------------------------------ pictures

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._send_alerts(trainer)
        every = self.picture_every_n_steps
        step = int(trainer.global_step)
        if every is None or step == 0 or step % every or step == self._last_picture_step:
            return
        self._last_picture_step = step
        if trainer.is_global_zero:
            self._draw_and_log(trainer, step)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._send_alerts(trainer)
        if not trainer.is_global_zero:
            return
        step = int(trainer.global_step)
        # Drawn again even when this step already had pictures: the monitors flush
        # their last metrics at the end of fit. Logged only once per step.
        self._draw_and_log(trainer, step, log=step != self._last_picture_step)
        self._log_events(trainer, step)
        summary = self._log_summary(trainer)
        self._write_files(trainer, summary)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Write the pictures, the events table and the summary so far; the error then goes on.

        Nothing here may replace the error that stopped the run: a failure is a warning.
        """
        try:
            self._send_alerts(trainer)
            if not trainer.is_global_zero:
                return
            step = int(trainer.global_step)
            self._draw_and_log(trainer, step)
            self._log_events(trainer, step)
            stopped_by = f"{type(exception).__name__}: {exception}"
            summary = self._log_summary(trainer, stopped_by=stopped_by[:500])
            self._write_files(trainer, summary)
        except Exception as error:  # the run's own error matters more than the report
            rank_zero_warn(
                f"HealthReport could not write the report of the failed run to "
                f"{self._folder(trainer)}: {type(error).__name__}: {error}"
            )

    def _series(self, trainer: pl.Trainer, name: str) -> tuple[list[int], list[str], Any]:
        """Steps, column names and values of one series of the run record's history.

        The values are a ``numpy.ma`` masked array: a value not logged at a step is
        masked, drawn as "not logged"; NaN stays for values that really were
        non-finite.
        """
        import numpy as np

        series = run_record(trainer).history.get(name)
        if series is None:
            return [], [], np.ma.masked_array(np.zeros((0, 0)))
        values = series.values.numpy()
        return series.steps, series.names, np.ma.masked_array(values, mask=~series.logged.numpy())

    def _draw_and_log(self, trainer: pl.Trainer, step: int, log: bool = True) -> None:
        plots = _plots_or_none()
        if plots is None:
            if not self._warned_no_matplotlib:
                self._warned_no_matplotlib = True
                rank_zero_warn(
                    "HealthReport: matplotlib is not installed, so no pictures are drawn "
                    "(the events, histograms and summary are still logged). "
                    "pip install 'lightning_gradguard[plots]' to get them."
                )
            return
        record = run_record(trainer)
        folder = self._folder(trainer)
        drawn: dict[str, Path] = {}
        steps, layers, norms = self._series(trainer, "grad_norm")
        if steps and layers:
            threshold = record.thresholds.get("grad_norm", 1e-7)
            figure = plots.gradient_flow_heatmap(
                steps, layers, norms, vanishing_threshold=threshold
            )
            self._save(plots, figure, folder / "gradient_flow.png", drawn, "gradient_flow")
        steps, layers, fractions = self._series(trainer, "dead_units")
        if steps and layers:
            events = [
                (event.step, layer)
                for event in record.events_of("swap", "recycle")
                for layer in event.layers
            ]
            figure = plots.dead_units_chart(
                steps,
                layers,
                fractions,
                threshold=record.thresholds.get("dead_units"),
                events=events,
            )
            self._save(plots, figure, folder / "dead_units.png", drawn, "dead_units")
        clip = record.history.get("clip")
        if clip is not None:
            skipped = [event.step for event in record.events_of("skip")]
            figure = plots.clip_chart(
                clip.steps,
                clip.column("raw"),
                clip.column("threshold"),
                clip.column("clipped"),
                skipped_steps=skipped,
                rollback_steps=[event.step for event in record.events_of("rollback")],
            )
            self._save(plots, figure, folder / "clipping.png", drawn, "clipping")
        self.pictures.update(drawn)
        if log:
            self._log_images(trainer, drawn, step)

    def _save(self, plots: Any, figure: Any, path: Path, drawn: dict[str, Path], name: str) -> None:
        """Write one picture; a failed write is a warning (once), never the end of the run."""
        try:
            drawn[name] = plots.save_png(figure, path)
        except (OSError, ValueError) as error:  # unwritable, not a folder, disk full
            if not self._warned_write:
                self._warned_write = True
                rank_zero_warn(
                    f"HealthReport: cannot write pictures to out_dir={str(path.parent)!r} "
                    f"({type(error).__name__}: {error}); training goes on without them. "
                    "Set HealthReport(out_dir=...) to a writable folder."
                )

    def _log_images(self, trainer: pl.Trainer, drawn: dict[str, Path], step: int) -> None:
        if not drawn:
            return
        for run in wandb_runs(trainer):
            import wandb

            payload: dict[str, Any] = {
                f"gradguard/{name}": wandb.Image(str(path)) for name, path in drawn.items()
            }
            payload["trainer/global_step"] = step
            run.log(payload)
        writers = tensorboard_writers(trainer)
        if writers:
            from matplotlib.image import imread

            for name, path in drawn.items():
                image = imread(path)
                for writer in writers:
                    writer.add_image(f"gradguard/{name}", image, step, dataformats="HWC")

    # ------------------------------------------------------------------ end of fit

    def _log_events(self, trainer: pl.Trainer, step: int) -> None:
        events = [event.row() for event in run_record(trainer).events]
        for run in wandb_runs(trainer):
            import wandb

            table = wandb.Table(
                columns=list(EVENT_COLUMNS), data=[[e[c] for c in EVENT_COLUMNS] for e in events]
            )
            run.log({"gradguard/events": table, "trainer/global_step": step})
        for writer in tensorboard_writers(trainer):
            lines = ["| step | kind | layer | detail |", "|---|---|---|---|"]
            lines += [
                f"| {e['step']} | {e['kind']} | {e['layer']} | {e['detail']} |" for e in events
            ]
            writer.add_text("gradguard/events", "\n".join(lines), step)

    def summary(self, trainer: pl.Trainer) -> dict[str, Any]:
        """Totals of the whole run (resumed parts included), from the run record.

        Skipped steps, swapped / re-initialized layers, recycled units, exact event
        counts per kind, and the weakest and strongest layers at the last logged step.
        """
        record = run_record(trainer)
        clippers = [cb for cb in flat_callbacks(trainer) if isinstance(cb, AdaptiveGradClip)]
        totals: dict[str, Any] = {
            "gradguard/events": sum(record.counts.values()),
            "gradguard/event_counts": record.counts,
            # The clipper also counts the steps the fp16 GradScaler skipped (no events).
            "gradguard/skipped_steps": (
                sum(clipper.skipped_steps for clipper in clippers)
                if clippers
                else record.count("skip")
            ),
            "gradguard/swapped_layers": sorted(record.layers("swap")),
            "gradguard/reinitialized_layers": sorted(record.layers("reinit")),
            "gradguard/recycled_units": int(record.total("recycle", "units")),
        }
        for callback in flat_callbacks(trainer):
            if isinstance(callback, SpikeRecovery):  # rollbacks also counted as events
                totals["gradguard/rollbacks"] = len(callback.rollbacks)
                totals["gradguard/rollback_skipped_batches"] = int(callback.skipped_batches)
        steps, layers, norms = self._series(trainer, "grad_norm")
        if steps and layers:
            last = norms[-1].filled(math.nan)
            ranked = sorted((float(v), n) for v, n in zip(last, layers) if math.isfinite(v))
            totals["gradguard/weakest_layers"] = [n for _, n in ranked[:3]]
            totals["gradguard/strongest_layers"] = [n for _, n in ranked[-3:][::-1]]
        return totals

    def _log_summary(self, trainer: pl.Trainer, stopped_by: str | None = None) -> dict[str, Any]:
        totals = self.summary(trainer)
        if stopped_by is not None:
            totals["gradguard/stopped_by"] = stopped_by
        for run in wandb_runs(trainer):
            for key, value in totals.items():
                run.summary[key] = value
        return totals

    def _write_files(self, trainer: pl.Trainer, summary: dict[str, Any]) -> None:
        """``events.csv`` and ``summary.json`` in the output folder (a failure is a warning)."""
        folder = self._folder(trainer)
        events_path, summary_path = folder / "events.csv", folder / "summary.json"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with events_path.open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow([*EVENT_COLUMNS, "values"])
                for event in run_record(trainer).events:
                    row = event.row()
                    writer.writerow([*(row[c] for c in EVENT_COLUMNS), json.dumps(event.values)])
            summary_path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        except OSError as error:
            rank_zero_warn(
                f"HealthReport could not write the events table and summary to {folder} "
                f"(out_dir): {type(error).__name__}: {error}. Training goes on."
            )
            return
        self.files.update(events=events_path, summary=summary_path)

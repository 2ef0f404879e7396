"""The run record: one channel between the callbacks, in the checkpoint, bounded, never lost.

Real Lightning runs of a tiny MLP whose second hidden ReLU is dead from the start
(it is swapped for LeakyReLU at the first window) and whose gradients turn NaN
where a test says so.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from helpers import TinyMLP, module_grad_norms, quiet_trainer_kwargs
from torch import nn

from lightning_gradguard import GradGuard, HealthReport, RunRecord, run_record

DEAD = "net.3"  # the ReLU after net.2, whose bias is -100


class _Troubled(TinyMLP):
    """Dead ``net.3`` units; NaN gradients at the steps in ``nan_at``; an error at ``fail_at``.

    Keeps plain-torch per-layer gradient norms of every step (the reference).
    """

    def __init__(self, nan_at: set[int] | None = None, fail_at: int | None = None) -> None:
        super().__init__(lr=0.05)
        with torch.no_grad():
            self.net[2].bias.fill_(-100.0)
        self.nan_at = nan_at or set()
        self.fail_at = fail_at
        self.norms: dict[int, dict[str, float]] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == self.fail_at:
            raise RuntimeError(f"data loader broke at step {self.global_step}")
        return super().training_step(batch, batch_idx)

    def on_after_backward(self) -> None:
        self.norms[self.global_step] = module_grad_norms(self)
        if self.global_step in self.nan_at:
            self.net[4].weight.grad[0, 0] = float("nan")


def _guard(**clip_args: Any) -> GradGuard:
    return GradGuard(
        clip="zclip",
        dead_unit_args={"every_n_steps": 4, "window": 2},
        report_args={"picture_every_n_steps": None},
        clip_args=clip_args or None,
    )


def _fit(
    model: pl.LightningModule,
    callbacks: list[Any],
    root: Path,
    steps: int,
    ckpt: Path | None = None,
    save_every: int | None = None,
) -> pl.Trainer:
    if save_every is not None:
        callbacks = [
            *callbacks,
            pl.callbacks.ModelCheckpoint(
                dirpath=root / "ckpt", save_last=True, every_n_train_steps=save_every
            ),
        ]
    kwargs = quiet_trainer_kwargs(
        max_steps=steps, default_root_dir=str(root), enable_checkpointing=save_every is not None
    )
    trainer = pl.Trainer(logger=False, callbacks=callbacks, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, ckpt_path=ckpt)
    return trainer


def _events_csv(folder: Path) -> list[dict[str, str]]:
    with (folder / "events.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------- checkpoint


@pytest.fixture(scope="module")
def first_half(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, _Troubled, RunRecord]:
    """8 steps with a NaN at step 5 and the dead layer swapped at step 2; checkpoint at 8."""
    root = tmp_path_factory.mktemp("first_half")
    torch.manual_seed(0)
    model = _Troubled(nan_at={5})
    trainer = _fit(model, [_guard()], root, steps=8, save_every=8)
    return root, model, run_record(trainer)


def test_record_round_trips_through_a_real_checkpoint_with_weights_only(
    first_half: tuple[Path, _Troubled, RunRecord],
) -> None:
    root, model, record = first_half
    checkpoint = torch.load(root / "ckpt" / "last.ckpt", weights_only=True)
    saved = checkpoint["callbacks"]["RunRecord"]
    # What happened, against what the test did: a swap of the dead layer at the first
    # window's end (step 2), one skipped step where the NaN was injected (step 5).
    swaps = [e for e in saved["events"] if e["kind"] == "swap"]
    assert [(e["step"], e["layers"], e["values"]["dead"]) for e in swaps] == [(2, [DEAD], 1.0)]
    skips = [e for e in saved["events"] if e["kind"] == "skip"]
    assert [(e["step"], e["layers"], e["values"]["nonfinite"]) for e in skips] == [
        (5, ["net.4"], 1.0)
    ]
    assert saved["counts"]["skip"] == 1 and saved["counts"]["swap"] == 1
    # The history holds the per-layer norms the pictures draw, equal to plain torch's.
    history = saved["history"]["grad_norm"]
    assert history["steps"].tolist() == list(range(8))
    for row, step in enumerate(history["steps"].tolist()):
        for column, layer in enumerate(history["names"]):
            expected = model.norms[step][layer]
            logged = float(history["values"][row, column])
            if step == 5 and layer == "net.4":
                assert math.isnan(logged)
            else:
                assert logged == pytest.approx(expected, rel=1e-5)
    # A fresh record restored from the file equals the live one.
    restored = RunRecord()
    restored.load_state_dict(saved)
    assert restored.events == record.events
    assert restored.counts == record.counts
    assert restored.layers("swap") == [DEAD]
    live, back = record.history.get("grad_norm"), restored.history.get("grad_norm")
    assert live is not None and back is not None
    assert live.steps == back.steps and live.names == back.names
    torch.testing.assert_close(live.values, back.values, equal_nan=True, rtol=0, atol=0)
    assert restored.state_dict().keys() == saved.keys()


def test_resume_with_another_clip_keeps_the_swap_the_monitor_and_the_record(
    first_half: tuple[Path, _Troubled, RunRecord], tmp_path: Path
) -> None:
    root, _, _ = first_half
    seen: list[str] = []

    class FirstBatch(pl.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            seen.append(type(pl_module.net[3]).__name__)

    torch.manual_seed(1)
    model = _Troubled()  # a fresh model: ReLU in net.3 again until the swap is re-applied
    guard = GradGuard(
        clip="autoclip",  # another clipping policy than the checkpoint's
        dead_unit_args={"every_n_steps": 4, "window": 2},
        report_args={"picture_every_n_steps": None},
    )
    kwargs = quiet_trainer_kwargs(max_steps=10, default_root_dir=str(tmp_path))
    trainer = pl.Trainer(logger=False, callbacks=[FirstBatch(), guard], **kwargs)
    with pytest.warns(UserWarning, match=r"AdaptiveGradClip state was saved with other settings"):
        trainer.fit(model, ckpt_path=root / "ckpt" / "last.ckpt")
    assert seen[0] == "LeakyReLU"  # the swap came back before the first resumed step
    assert guard.unit_monitor is not None and guard.unit_monitor.swapped == [DEAD]
    assert guard.norm_monitor is not None
    assert guard.norm_monitor.state_dict()["optimizer_0"]["steps_seen"] == 10  # 8 restored + 2
    assert guard.clipper is not None
    assert guard.clipper.state_dict()["optimizer_0"]["steps_seen"] == 2  # started afresh
    # The summary and the pictures cover the whole run, the part before the checkpoint too.
    report = guard.health_report
    assert report is not None
    summary = json.loads((tmp_path / "gradguard" / "summary.json").read_text())
    assert summary["gradguard/swapped_layers"] == [DEAD]
    assert summary["gradguard/event_counts"]["skip"] == 1  # the NaN step before the checkpoint
    assert report.summary(trainer)["gradguard/swapped_layers"] == [DEAD]
    norms = run_record(trainer).history.get("grad_norm")
    assert norms is not None and norms.steps == list(range(10))
    assert {"gradient_flow", "dead_units", "clipping"} <= set(report.pictures)


def test_checkpoint_of_the_earlier_layout_still_loads(
    first_half: tuple[Path, _Troubled, RunRecord], tmp_path: Path
) -> None:
    root, _, _ = first_half
    checkpoint = torch.load(root / "ckpt" / "last.ckpt", weights_only=True)
    # The earlier layout: one entry for every part, by class name, under a key naming
    # every part's settings; and no run record.
    parts = _guard().gradguard_parts
    entry = checkpoint["callbacks"].pop("GradGuard")
    del checkpoint["callbacks"]["RunRecord"]
    legacy_key = f"GradGuard{{'parts': {[part.state_key for part in parts]!r}}}"
    checkpoint["callbacks"][legacy_key] = {
        type(part).__name__: entry[part.state_key] for part in parts
    }
    path = tmp_path / "legacy.ckpt"
    torch.save(checkpoint, path)
    torch.manual_seed(1)
    model = _Troubled()
    guard = _guard()
    _fit(model, [guard], tmp_path, steps=9, ckpt=path)
    assert isinstance(model.net[3], nn.LeakyReLU)
    assert guard.norm_monitor is not None
    assert guard.norm_monitor.state_dict()["optimizer_0"]["steps_seen"] == 9


# --------------------------------------------------------------------------- exceptions


def test_exception_mid_fit_leaves_pictures_events_and_summary_on_disk(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Troubled(nan_at={2}, fail_at=6)
    with pytest.raises(RuntimeError, match="data loader broke at step 6"):
        _fit(model, [_guard()], tmp_path, steps=10)
    folder = tmp_path / "gradguard"  # default out_dir: under trainer.default_root_dir
    for name in ("gradient_flow", "dead_units", "clipping"):
        assert (folder / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    rows = _events_csv(folder)
    assert [(r["step"], r["kind"], r["layer"]) for r in rows if r["kind"] in ("skip", "swap")] == [
        ("2", "swap", DEAD),
        ("2", "skip", "net.4"),
    ]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["gradguard/skipped_steps"] == 1
    assert summary["gradguard/swapped_layers"] == [DEAD]
    assert summary["gradguard/stopped_by"] == "RuntimeError: data loader broke at step 6"


def test_skip_limit_leaves_the_report_on_disk_before_it_raises(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Troubled(nan_at=set(range(3, 20)))
    out = tmp_path / "report"
    guard = GradGuard(
        dead_units=False,
        clip_args={"max_consecutive_skips": 3},
        report_args={"out_dir": str(out), "picture_every_n_steps": None},
    )
    with pytest.raises(RuntimeError, match="skipped 3 optimizer steps in a row"):
        _fit(model, [guard], tmp_path, steps=20)
    assert (out / "gradient_flow.png").exists() and (out / "clipping.png").exists()
    rows = _events_csv(out)
    assert [(r["step"], r["kind"]) for r in rows if r["kind"] in ("skip", "stop")] == [
        ("3", "skip"),
        ("4", "skip"),
        ("5", "skip"),
        ("5", "stop"),
    ]
    (stop,) = [r for r in rows if r["kind"] == "stop"]
    assert json.loads(stop["values"]) == {"consecutive_skips": 3.0}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gradguard/skipped_steps"] == 3
    assert summary["gradguard/event_counts"]["stop"] == 1
    assert "skipped 3 optimizer steps in a row" in summary["gradguard/stopped_by"]


# --------------------------------------------------------------------------- bounded


def test_events_are_bounded_with_exact_counts_and_the_history_spans_the_run(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    steps = 32
    nan_at = set(range(5, steps, 2))  # every other step from step 5 on
    model = _Troubled(nan_at=nan_at)
    record = RunRecord(max_events_per_kind=4, history_rows=8)
    guard = GradGuard(
        dead_unit_args={"every_n_steps": 4, "window": 2},
        report_args={"picture_every_n_steps": None},
    )
    trainer = _fit(model, [record, guard], tmp_path, steps=steps)
    assert run_record(trainer) is record  # the record listed by the user is the one used
    skipped = len([step for step in nan_at if step < steps])  # 5, 7, ..., 31
    assert skipped == 14
    assert record.count("skip") == skipped
    assert guard.clipper is not None and guard.clipper.skipped_steps == skipped
    kept = record.events_of("skip")
    assert len(kept) == 4  # the newest four
    assert [e.step for e in kept] == sorted(e.step for e in kept) and kept[-1].step == steps - 1
    assert record.layers("swap") == [DEAD]  # rare events are not pushed out by frequent ones
    assert [e.layers for e in record.events_of("swap")] == [(DEAD,)]
    norms = record.history.get("grad_norm")
    assert norms is not None
    assert len(norms.steps) <= 9 and norms.steps[0] == 0 and norms.steps[-1] == steps - 1
    gaps = {b - a for a, b in zip(norms.steps, norms.steps[1:-1])}
    assert len(gaps) == 1  # evenly thinned (the newest row is kept besides)
    saved = torch.load(_save(trainer, tmp_path), weights_only=True)["callbacks"]["RunRecord"]
    assert len(saved["events"]) <= 4 * len(saved["counts"])
    assert saved["counts"]["skip"] == skipped


def _save(trainer: pl.Trainer, tmp_path: Path) -> Path:
    path = tmp_path / "end.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_health_report_alone_finds_the_one_record(tmp_path: Path) -> None:
    torch.manual_seed(0)
    report = HealthReport(picture_every_n_steps=None)
    trainer = _fit(TinyMLP(), [report], tmp_path, steps=2)
    records = [cb for cb in trainer.callbacks if isinstance(cb, RunRecord)]
    assert len(records) == 1 and run_record(trainer) is records[0]
    assert (
        json.loads((tmp_path / "gradguard" / "summary.json").read_text())["gradguard/events"] == 0
    )


def test_a_polling_reader_sees_each_event_once_and_unknown_kinds_are_refused() -> None:
    record = RunRecord(max_events_per_kind=2)
    first = record.add("skip", 1, values={"nonfinite": 1.0})
    seen, mark = record.events_since(0)
    assert seen == [first]
    assert record.events_since(mark) == ([], mark)
    later = [record.add("skip", step) for step in (2, 3, 4)] + [record.add("swap", 4, ["a"])]
    seen, mark = record.events_since(mark)
    assert seen == later[1:]  # the skip at step 2 was pushed out before anyone read it
    assert record.count("skip") == 4 and record.total("skip", "nonfinite") == 1.0
    with pytest.raises(ValueError, match=r"add\(kind='skipped'\): kind must be one of"):
        record.add("skipped", 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"max_events_per_kind=0"):
        RunRecord(max_events_per_kind=0)

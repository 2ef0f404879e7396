"""``HealthReport`` with W&B: a real 2-process DDP run read back from disk, and disabled mode.

One launch of ``tests/workers/wandb_run.py`` (two CPU processes, gloo) trains with a
``WandbLogger(offline=True)`` on both ranks and ``GradNormMonitor``, ``AdaptiveGradClip``,
``DeadUnitMonitor`` and ``HealthReport``; rank 1 alone gets a NaN gradient after DDP's
all-reduce at a histogram step. The run's ``.wandb`` file is parsed with
``wandb_reader.load_run``: one run, written by rank 0 only, one row per step, histograms
of the full (all-reduced) gradients, one skip in the events table and one alert.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import distributed_helpers as h
import pytest
import pytorch_lightning as pl
import torch
from helpers import TinyMLP, quiet_trainer_kwargs
from wandb_reader import RunData, find_run_files, load_run
from workers import wandb_run as w

from lightning_gradguard import AdaptiveGradClip, DeadUnitMonitor, GradNormMonitor, HealthReport
from lightning_gradguard.record import run_record

pytestmark = pytest.mark.distributed  # conftest.py: also slow, skipped without gloo

LAUNCH_TIMEOUT = 150.0  # seconds for the whole launch; a collective mismatch hangs
LAYERS = ("net.0", "net.2", "net.4")
PICTURES = ("gradient_flow", "dead_units", "clipping")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _wandb_env(mp: pytest.MonkeyPatch, root: Path, mode: str) -> None:
    mp.setenv("WANDB_MODE", mode)
    mp.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        mp.setenv(var, str(root / var.lower()))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunData, list[dict]]:
    out = tmp_path_factory.mktemp("wandb_ddp")
    with pytest.MonkeyPatch.context() as mp:
        _wandb_env(mp, out, "offline")  # copied into the workers' environment
        h.launch_ranks("wandb_run.py", str(out), timeout=LAUNCH_TIMEOUT)
    ranks = [h.read_json(out / f"rank{rank}.json") for rank in range(h.WORLD_SIZE)]
    for rank, result in enumerate(ranks):
        assert result["global_rank"] == rank
        assert result["world_size"] == h.WORLD_SIZE
        assert result["backend"] == "gloo"
        assert result["strategy"] == "DDPStrategy"
        assert result["global_step"] == w.STEPS
    return out, load_run(out / "wandb_save"), ranks


def test_one_run_written_by_rank_zero_only(ddp_run: tuple[Path, RunData, list[dict]]) -> None:
    out, run, (rank0, rank1) = ddp_run
    runs = find_run_files(out / "wandb_save")
    assert len(runs) == 1, runs
    assert [p.name for p in (out / "wandb_save" / "wandb").iterdir() if "run-" in p.name] == [
        runs[0].parent.name
    ]
    assert run.project == w.PROJECT and run.exit_code == 0
    assert not (h.TESTS_DIR / "wandb").exists()  # nothing written next to the workers' cwd
    assert rank0["experiment_type"] == "Run" and rank0["wandb_run_in_process"]
    assert "DummyExperiment" in rank1["experiment_type"]  # Lightning's rank > 0 stand-in
    assert not rank1["wandb_run_in_process"]
    config = run.user_config
    assert {k for k in config if k.startswith("gradguard/")} == {
        "gradguard/GradNormMonitor",
        "gradguard/AdaptiveGradClip",
        "gradguard/DeadUnitMonitor",
        "gradguard/HealthReport",
    }  # the test's Corrupter callback is not a gradguard one
    assert config["gradguard/HealthReport"]["histogram_every_n_steps"] == w.HIST_EVERY
    assert config["gradguard/DeadUnitMonitor"]["rescue"] == "threshold"
    defined = {m.get("glob_name") or m.get("name"): m for m in run.metrics}
    assert defined["grad_norm/*"]["step_metric"] == "trainer/global_step"


def test_scalars_logged_once_per_step(ddp_run: tuple[Path, RunData, list[dict]]) -> None:
    _, run, _ = ddp_run
    for key in ("grad_norm/total", "grad_norm/net.0", "clip/threshold"):
        steps = [s for s, _ in run.series(key, step_key="trainer/global_step")]
        assert steps == list(range(w.STEPS)), f"{key}: {steps}"  # no second row from rank 1
    # Rank 0's own gradients stayed finite at the fault step, but rank 1's NaN is not
    # hidden from it: the monitor logs the reduced (non-finite) value there.
    norms = dict(run.series("grad_norm/total", step_key="trainer/global_step"))
    assert all(isinstance(v, float) and v > 0 for s, v in norms.items() if s != w.FAULT_STEP)
    assert not math.isfinite(float(norms[w.FAULT_STEP]))
    assert [s for s, _ in run.series("dead_units/net.3", step_key="trainer/global_step")] == [2, 6]
    assert run.user_summary["gradguard/skipped_steps"] == 1


def test_histograms_describe_the_reduced_gradients(
    ddp_run: tuple[Path, RunData, list[dict]],
) -> None:
    _, run, (rank0, rank1) = ddp_run
    rows = run.rows_with("grad_hist/net.0")
    assert sorted(r["trainer/global_step"] for r in rows) == list(range(0, w.STEPS, w.HIST_EVERY))
    for row in rows:
        step = row["trainer/global_step"]
        bounds = rank0["grad_bounds"][str(step)]
        if step != w.FAULT_STEP:  # DDP: both ranks hold the same (all-reduced) gradients
            assert rank1["grad_bounds"][str(step)] == bounds
        for layer in LAYERS:
            low, high, elements = bounds[layer]
            hist = run.histogram(f"grad_hist/{layer}", step=row["_step"])
            assert sum(hist.values) == elements  # every element of the full gradient, once
            assert hist.bins[0] == pytest.approx(low, rel=1e-12, abs=1e-30)
            if high > low:
                assert hist.bins[-1] == pytest.approx(high, rel=1e-12, abs=1e-30)
            else:  # one value (the dead layer's zero gradients): a tiny range above it
                assert low < hist.bins[-1] <= low + 1e-9


def test_events_table_and_alerts(ddp_run: tuple[Path, RunData, list[dict]]) -> None:
    _, run, (rank0, rank1) = ddp_run
    table = run.table("gradguard/events")
    assert table.columns == ["step", "kind", "layer", "detail"]
    skip_rows = [row for row in table.rows if row[3].startswith("skipped")]
    assert len(skip_rows) == 1, skip_rows
    step, kind, layer, detail = skip_rows[0]
    assert (step, kind) == (w.FAULT_STEP, "skip")
    # rank 0's own gradients were finite, but the layer is named from the reduced flags
    assert layer == "net.4" and "net.4" in detail
    assert ("swap", "net.3") in {(row[1], row[2]) for row in table.rows}
    titles = [a["title"] for a in run.alerts]
    # The monitor's non-finite warning and the clipper's skip, as in a single process.
    assert titles.count("gradguard: nonfinite") == 2
    assert "gradguard: dying" in titles
    # Both ranks skipped together and end with the same parameters.
    assert rank0["skipped_steps"] == rank1["skipped_steps"] == 1
    assert rank0["params_end"] == rank1["params_end"]
    for result in (rank0, rank1):
        skips = [e["step"] for e in result["events"] if e["detail"].startswith("skipped")]
        assert skips == [w.FAULT_STEP]


def test_pictures_written_once_by_rank_zero(ddp_run: tuple[Path, RunData, list[dict]]) -> None:
    out, run, (rank0, rank1) = ddp_run
    assert rank1["saved_pngs"] == []
    pictures = out / "pictures"
    assert sorted(p.name for p in pictures.iterdir()) == sorted(
        [f"{n}.png" for n in PICTURES] + ["events.csv", "summary.json"]
    )
    for name in PICTURES:
        assert (pictures / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
        logged = run.value(f"gradguard/{name}")
        assert logged["_type"] == "image-file"
        assert (run.files_dir / logged["path"]).exists()
    # Drawn at the picture steps and at the end of fit, on rank 0 only.
    steps = sorted({step for step, _ in rank0["saved_pngs"]})
    assert steps == list(range(w.PICTURE_EVERY, w.STEPS + 1, w.PICTURE_EVERY))
    image_steps = sorted(
        {r["trainer/global_step"] for r in run.rows_with("gradguard/gradient_flow")}
    )
    assert image_steps == steps


# --------------------------------------------------------------------------- disabled mode


class _NanAtHistogramStep(TinyMLP):
    """A dead second hidden layer, and a NaN gradient at step 2 (a histogram step)."""

    def __init__(self) -> None:
        super().__init__(sizes=(16, 32, 32, 4))
        with torch.no_grad():
            self.net[2].bias.fill_(-100.0)

    def on_after_backward(self) -> None:
        if self.global_step == 2:
            self.net[4].weight.grad[0, 0] = float("nan")


def test_wandb_disabled_still_writes_pictures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytorch_lightning.loggers import WandbLogger

    _wandb_env(monkeypatch, tmp_path, "disabled")
    logger = WandbLogger(save_dir=str(tmp_path / "wandb_save"), project="gradguard-tests")
    clipper = AdaptiveGradClip(policy="norm", log_every_n_steps=1)
    report = HealthReport(
        picture_every_n_steps=4, histogram_every_n_steps=2, out_dir=str(tmp_path / "pictures")
    )
    callbacks: list[Any] = [
        GradNormMonitor(log_every_n_steps=1),
        clipper,
        DeadUnitMonitor(every_n_steps=4, window=2, rescue="threshold"),
        report,
    ]
    torch.manual_seed(0)
    trainer = pl.Trainer(logger=logger, callbacks=callbacks, **quiet_trainer_kwargs(max_steps=8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_NanAtHistogramStep())
    logger.experiment.finish()
    import wandb

    wandb.teardown()  # the process-wide "disabled" setting must not leak into other tests
    for name in PICTURES:
        assert (tmp_path / "pictures" / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    assert set(report.pictures) == set(PICTURES)
    assert find_run_files(tmp_path / "wandb_save") == []
    assert clipper.skipped_steps == 1
    assert [e.step for e in run_record(trainer).events_of("skip")] == [2]
    assert report.summary(trainer)["gradguard/skipped_steps"] == 1

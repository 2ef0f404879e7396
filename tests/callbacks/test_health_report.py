"""HealthReport with a real offline W&B run read back from disk, TensorBoard, CSV and no logger."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from helpers import TinyMLP, quiet_trainer_kwargs
from torch import nn
from wandb_reader import load_run

from lightning_gradguard import (
    AdaptiveGradClip,
    DeadUnitMonitor,
    GradNormMonitor,
    HealthReport,
)

STEPS = 8


class _Troubled(TinyMLP):
    """Second hidden layer dead from the start; a NaN gradient at step 3."""

    def __init__(self) -> None:
        super().__init__(sizes=(16, 32, 32, 4))
        with torch.no_grad():
            self.net[2].bias.fill_(-100.0)
        self.hist_reference: dict[int, dict[str, int]] = {}

    def on_after_backward(self) -> None:
        if self.global_step == 3:
            self.net[4].weight.grad[0, 0] = float("nan")


def _callbacks(**report: Any) -> list[pl.Callback]:
    return [
        GradNormMonitor(
            log_every_n_steps=1, update_ratio_every_n_steps=1, param_norm_every_n_steps=1
        ),
        AdaptiveGradClip(policy="norm", log_every_n_steps=1),
        DeadUnitMonitor(every_n_steps=4, window=2, rescue="threshold"),
        HealthReport(picture_every_n_steps=4, histogram_every_n_steps=2, **report),
    ]


def _fit(logger: Any, callbacks: list[pl.Callback]) -> _Troubled:
    torch.manual_seed(0)
    model = _Troubled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(logger=logger, callbacks=callbacks, **quiet_trainer_kwargs(max_steps=STEPS)).fit(
            model
        )
    return model


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path, _Troubled]]:
    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            mp.setenv(var, str(root / var.lower()))
        from pytorch_lightning.loggers import WandbLogger

        logger = WandbLogger(offline=True, save_dir=str(root), project="gradguard-tests")
        model = _fit(logger, _callbacks(out_dir=str(root / "pictures")))
        logger.experiment.finish()
        run = load_run(root)
        import wandb

        wandb.teardown()  # the process-wide wandb settings (offline mode) must not leak
        yield run, root, model


def test_config_and_metric_sections(wandb_run: tuple[Any, Path, _Troubled]) -> None:
    run, _, _ = wandb_run
    config = run.user_config
    assert config["gradguard/GradNormMonitor"]["log_every_n_steps"] == 1
    assert config["gradguard/AdaptiveGradClip"]["scope"] == "global"
    assert config["gradguard/DeadUnitMonitor"]["rescue"] == "threshold"
    defined = {m.get("glob_name") or m.get("name"): m for m in run.metrics}
    assert defined["grad_norm/*"]["step_metric"] == "trainer/global_step"
    assert "dead_units/*" in defined and "clip/*" in defined


def test_scalars_reach_wandb(wandb_run: tuple[Any, Path, _Troubled]) -> None:
    run, _, _ = wandb_run
    series = run.series("grad_norm/total", step_key="trainer/global_step")
    steps = [s for s, v in series if v is not None]
    assert steps == list(range(STEPS))
    assert run.value("dead_units/net.3") == 1.0


def test_histograms_count_every_gradient_element(wandb_run: tuple[Any, Path, _Troubled]) -> None:
    run, _, model = wandb_run
    rows = run.rows_with("grad_hist/net.0")
    logged_steps = sorted(r["trainer/global_step"] for r in rows)
    assert logged_steps == [0, 2, 4, 6]
    for layer in ("net.0", "net.2", "net.4"):
        module = model.get_submodule(layer)
        elements = sum(p.numel() for p in module.parameters())
        hist = run.histogram(f"grad_hist/{layer}", step=rows[0]["_step"])
        assert sum(hist.values) == elements  # every gradient element counted once
        assert hist.bins[0] < hist.bins[-1]


def test_events_table_alerts_and_summary(wandb_run: tuple[Any, Path, _Troubled]) -> None:
    run, _, _ = wandb_run
    table = run.table("gradguard/events")
    assert table.columns == ["step", "kind", "layer", "detail"]
    kinds = {(row[1], row[2]) for row in table.rows}
    assert ("swap", "net.3") in kinds
    assert ("dying", "net.3") in kinds
    assert any(kind == "nonfinite" for kind, _ in kinds)  # the skipped NaN step
    skip_rows = [row for row in table.rows if row[3].startswith("skipped")]
    assert [row[0] for row in skip_rows] == [3]
    titles = [a["title"] for a in run.alerts]
    assert "gradguard: nonfinite" in titles and "gradguard: dying" in titles
    summary = run.user_summary
    assert summary["gradguard/skipped_steps"] == 1
    assert summary["gradguard/swapped_layers"] == ["net.3"]
    assert len(summary["gradguard/weakest_layers"]) == 3


def test_pictures_are_logged_and_saved(wandb_run: tuple[Any, Path, _Troubled]) -> None:
    run, root, _ = wandb_run
    for name in ("gradient_flow", "dead_units", "clipping"):
        png = root / "pictures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        logged = run.value(f"gradguard/{name}")
        assert logged["_type"] == "image-file"
        assert (run.files_dir / logged["path"]).exists()


def test_alerts_are_rate_limited() -> None:
    from lightning_gradguard.callbacks.health_report import AlertLimiter

    limiter = AlertLimiter(max_per_hour=2)
    assert [limiter.allowed("nonfinite", t) for t in (0.0, 1.0, 2.0, 3.0)] == [
        True,
        True,
        False,
        False,
    ]
    assert limiter.allowed("dying", 4.0)  # per kind
    assert limiter.allowed("nonfinite", 3601.0)  # the hour has passed


def test_tensorboard_gets_scalars_histograms_images_and_events(tmp_path: Path) -> None:
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    _fit(logger, _callbacks())
    accumulator = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    assert "grad_norm/total" in tags["scalars"]
    assert "grad_hist/net.0" in tags["histograms"]
    assert {"gradguard/gradient_flow", "gradguard/dead_units"} <= set(tags["images"])
    histogram = accumulator.Histograms("grad_hist/net.2")[0].histogram_value
    assert histogram.num == sum(p.numel() for p in nn.Linear(32, 32).parameters())
    assert "gradguard/events/text_summary" in tags["tensors"]
    assert (Path(logger.log_dir) / "gradguard" / "gradient_flow.png").exists()


def test_csv_logger_and_no_logger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytorch_lightning.loggers import CSVLogger

    logger = CSVLogger(str(tmp_path), name="csv")
    _fit(logger, _callbacks())
    header = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0]
    assert "grad_norm/total" in header and "grad_hist" not in header  # CSV: scalars only
    assert (Path(logger.log_dir) / "gradguard" / "clipping.png").exists()
    monkeypatch.chdir(tmp_path)
    _fit(False, _callbacks())
    assert (tmp_path / "gradguard" / "gradient_flow.png").exists()


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"picture_every_n_steps": 0}, "picture_every_n_steps=0"),
        ({"histogram_every_n_steps": -1}, "histogram_every_n_steps=-1"),
        ({"histogram_bins": 1}, "histogram_bins=1"),
        ({"max_alerts_per_hour": -1}, "max_alerts_per_hour=-1"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        HealthReport(**kwargs)
    assert fragment in str(info.value)

"""``examples/digits_monitor.py --quick`` end to end, checked on what it writes to disk."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "digits_monitor.py"


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("digits_monitor", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("digits_monitor")
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        cwd=out,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-5000:]
    return out, result.stdout


def _rows(csv_file: Path) -> list[dict[str, str]]:
    with csv_file.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _linear_layers(activation: str) -> list[str]:
    model = _load_example().DeepMLP(activation)
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


@pytest.mark.slow
@pytest.mark.parametrize(("run", "activation"), [("sigmoid", "sigmoid"), ("relu_kaiming", "relu")])
def test_csv_has_every_linear_layer(quick_run: tuple[Path, str], run: str, activation: str) -> None:
    out, _ = quick_run
    csv_file = out / "csv" / run / "metrics.csv"
    assert csv_file.is_file()
    header = set(_rows(csv_file)[0])
    layers = _linear_layers(activation)
    assert len(layers) == 25
    for prefix in ("grad_norm", "param_norm", "update_ratio"):
        missing = [name for name in layers if f"{prefix}/{name}" not in header]
        assert not missing, f"{run}: no {prefix}/ key for {missing}"
    assert {"grad_norm/total", "grad_norm/nonfinite_steps", "test/accuracy"} <= header


def _step0_norms(run_dir: Path) -> tuple[float, float]:
    for row in _rows(run_dir / "metrics.csv"):
        if row.get("grad_norm/layers.0"):
            assert float(row["step"]) == 0
            return float(row["grad_norm/layers.0"]), float(row["grad_norm/layers.24"])
    raise AssertionError(f"no grad_norm/layers.0 in {run_dir}")


@pytest.mark.slow
def test_sigmoid_gradients_vanish_at_step_0(quick_run: tuple[Path, str]) -> None:
    out, _ = quick_run
    first, last = _step0_norms(out / "csv" / "sigmoid")
    assert 0 < first < 1e-6 * last, (first, last)  # measured: ~1e-24 vs ~0.6
    first, last = _step0_norms(out / "csv" / "relu_kaiming")
    assert 0.01 < first / last < 100, (first, last)  # measured: ~0.7


@pytest.mark.slow
def test_wandb_offline_runs_written(quick_run: tuple[Path, str]) -> None:
    out, stdout = quick_run
    run_dirs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 2, run_dirs
    for run_dir in run_dirs:
        assert list(run_dir.glob("*.wandb")), f"no .wandb file in {run_dir}"
        assert str(run_dir) in stdout  # the summary says where it is
    assert "wandb sync " in stdout


@pytest.mark.slow
def test_vanishing_warning_for_the_sigmoid_run_only(quick_run: tuple[Path, str]) -> None:
    _, stdout = quick_run
    sigmoid_part, _, relu_part = stdout.partition("--- run 'relu_kaiming' ---")
    assert relu_part, stdout[-3000:]
    assert "GradNormMonitor: vanishing gradients" in sigmoid_part
    training_part, _, summary = relu_part.partition("Summary:")
    assert "GradNormMonitor: vanishing gradients" not in training_part
    sigmoid_summary, _, relu_summary = summary.partition("\nrelu_kaiming")
    assert "warned   yes, vanishing gradients" in sigmoid_summary
    assert "warned   no" in relu_summary

"""The scripts in ``examples/``, run with small budgets, checked on the story each one tells.

``vanishing.py`` runs as a user runs it (a subprocess: it starts a W&B offline run); the
others run in this process through their ``main(argv)``, which returns the Trainer, so
the test can look at the trained model itself. The two-process examples and the
LightningCLI one are in ``tests/distributed/test_examples_distributed.py``.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import wandb_reader as wr
from helpers import load_example
from torch import nn

from lightning_gradguard.demo.data import digits

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
STEPS_PER_EPOCH = 23  # ceil(1437 / 64)


def metrics(out: Path, run: str) -> list[dict[str, str]]:
    (path,) = (out / run).rglob("metrics.csv")
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def logged(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    """``step -> value`` of every row that has ``key``."""
    return {int(row["step"]): float(row[key]) for row in rows if row.get(key)}


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``example(name)``: the script as a module; torch's global settings restored after."""
    monkeypatch.syspath_prepend(str(EXAMPLES))  # the examples import their digits module
    threads = torch.get_num_threads()
    yield lambda name: load_example(EXAMPLES / f"{name}.py")
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


# --------------------------------------------------------------------------- vanishing.py


@pytest.fixture(scope="module")
def vanishing_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("vanishing")
    return out, _run_vanishing(out, wandb_mode="offline")


def _run_vanishing(out: Path, *args: str, wandb_mode: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "vanishing.py"), *args, "--epochs", "1", "--out", str(out)],
        cwd=out,
        env={**os.environ, "WANDB_MODE": wandb_mode, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-5000:]
    return result.stdout


def _check_every_layer_logged(rows: list[dict[str, str]]) -> float:
    """Every Linear layer has its three keys; returns first / last layer norm at step 0."""
    header = set().union(*rows)
    for prefix in ("grad_norm", "param_norm", "update_ratio"):
        missing = [f"net.{2 * i}" for i in range(25) if f"{prefix}/net.{2 * i}" not in header]
        assert not missing, f"no {prefix}/ key for {missing}"
    return logged(rows, "grad_norm/net.0")[0] / logged(rows, "grad_norm/net.48")[0]


@pytest.mark.slow
def test_vanishing_sigmoid_stack_warns_and_writes_a_wandb_offline_run(
    vanishing_run: tuple[Path, str],
) -> None:
    out, stdout = vanishing_run
    ratio = _check_every_layer_logged(metrics(out, "sigmoid"))
    assert 0 < ratio < 1e-6, ratio  # measured: ~1e-24 / 0.6
    assert "GradNormMonitor: vanishing gradients" in stdout
    assert "sigmoid: test accuracy 0.1" in stdout  # chance: 0.100 or so
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    # The offline run, read back from its .wandb file: every layer's gradient norm is there.
    history = wr.load_run(run_dir).history
    logged_keys = set().union(*history)
    assert {f"grad_norm/net.{2 * i}" for i in range(25)} <= logged_keys


@pytest.mark.slow
def test_vanishing_fix_relu_kaiming_has_even_norms(tmp_path: Path) -> None:
    # In its own process: a disabled wandb run in this one would leave wandb's
    # process-wide settings to the offline runs of other tests.
    stdout = _run_vanishing(tmp_path, "--fix", wandb_mode="disabled")
    ratio = _check_every_layer_logged(metrics(tmp_path, "relu_kaiming"))
    assert 0.01 < ratio < 100, ratio  # measured: ~0.7
    assert "vanishing gradients" not in stdout


# --------------------------------------------------------------------------- exploding.py


@pytest.mark.slow
def test_exploding_goes_nan_without_gradguard_and_trains_with_it(
    example: Any, tmp_path: Path
) -> None:
    script = example("exploding")
    without = script.main(["--no-guard", "--max-steps", "30", "--out", str(tmp_path)])
    losses = logged(metrics(tmp_path, "no_guard"), "train/loss")
    assert losses[0] > 10  # the weights N(0, 0.2) start far off
    first_nan = min(step for step, loss in losses.items() if not math.isfinite(loss))
    assert first_nan <= 5, losses  # SCENARIOS S2b: non-finite at step 2 or 3
    assert float(without.callback_metrics["test/accuracy"]) == pytest.approx(0.1, abs=0.02)

    guarded = script.main(["--max-steps", "30", "--out", str(tmp_path)])
    rows = metrics(tmp_path, "gradguard")
    losses = logged(rows, "train/loss")
    assert len(losses) == 30 and all(map(math.isfinite, losses.values()))
    # The raw norm at step 0 is in the hundreds; GradGuard cut it to its threshold.
    norm, threshold = logged(rows, "grad_norm/total")[0], logged(rows, "clip/threshold")[0]
    clipped = logged(rows, "grad_norm/total_clipped")[0]
    assert norm > 100 and clipped <= threshold * (1 + 1e-5) and clipped < norm / 10
    assert all(bool(torch.isfinite(p).all()) for p in guarded.lightning_module.parameters())
    assert float(guarded.callback_metrics["test/accuracy"]) > 0.3  # measured: 0.57


# --------------------------------------------------------------------------- dying_relu.py


def _dead_on_training_set(model: nn.Module) -> list[float]:
    """Fraction of units of act1/act2/act3 whose pre-activation is <= 0 on every sample."""
    x = digits()[0].tensors[0]
    fractions = []
    with torch.no_grad():
        for fc, act in ((model.fc1, model.act1), (model.fc2, model.act2), (model.fc3, model.act3)):
            h = fc(x)
            fractions.append(float((h <= 0).all(dim=0).double().mean()))
            x = act(h)
    return fractions


@pytest.mark.slow
def test_dying_relu_spike_kills_units_and_both_fixes_act(
    example: Any, tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    script = example("dying_relu")
    runs = {}
    for fix, epochs in (("none", 8), ("swap", 8), ("recycle", 7)):
        runs[fix] = script.main(["--fix", fix, "--epochs", str(epochs), "--out", str(tmp_path)])
    before, after = STEPS_PER_EPOCH * 5, STEPS_PER_EPOCH * 7  # windows of epochs 4 and 6
    rows = metrics(tmp_path, "none")
    assert logged(rows, "dead_units/act2")[before] < 0.1  # healthy until the spike
    assert max(logged(rows, f"dead_units/{n}")[after] for n in ("act2", "act3")) > 0.9
    # An independent count with the final model: act2 dead on all 1437 samples.
    no_fix = _dead_on_training_set(runs["none"].lightning_module)
    assert no_fix[0] < 0.1 and no_fix[1] > 0.9, no_fix  # the first layer never dies
    assert float(runs["none"].callback_metrics["test/accuracy"]) < 0.2  # chance is 0.10

    swapped = runs["swap"].lightning_module
    assert isinstance(swapped.act2, nn.LeakyReLU) and isinstance(swapped.act1, nn.ReLU)
    messages = [str(w.message) for w in recwarn]
    assert any("swapped ReLU for LeakyReLU" in m and "step 161" in m for m in messages)

    recycled = metrics(tmp_path, "recycle")
    # Windows at steps 0 and 128 act at steps 10 and 138; the second finds the dead units.
    assert sorted(logged(recycled, "recycled_units/fc2")) == [10, 138]
    assert logged(recycled, "recycled_units/fc2")[138] > 200  # of 256 (measured: ~250)
    assert _dead_on_training_set(runs["recycle"].lightning_module)[1] < 0.1
    assert float(runs["recycle"].callback_metrics["test/accuracy"]) > 0.6  # measured: ~0.9


# --------------------------------------------------------------------------- init_at_start.py


@pytest.mark.slow
def test_init_at_start_makes_the_deep_tanh_network_learn(
    example: Any, tmp_path: Path, recwarn: Any
) -> None:
    script = example("init_at_start")
    as_built = script.main(["--no-init", "--epochs", "1", "--out", str(tmp_path)])
    assert [w for w in recwarn if "vanishing gradients" in str(w.message)]  # net.0 ... net.18
    recwarn.clear()
    fixed = script.main(["--epochs", "1", "--out", str(tmp_path)])
    assert not [w for w in recwarn if "vanishing gradients" in str(w.message)]
    ratios = {}
    for run in ("as_built", "init_at_start"):
        rows = metrics(tmp_path, run)
        ratios[run] = logged(rows, "grad_norm/net.0")[0] / logged(rows, "grad_norm/net.48")[0]
    assert ratios["as_built"] < 1e-6 and 0.1 < ratios["init_at_start"] < 100, ratios
    # Glorot uniform with tanh's gain 5/3: std = 5/3 * sqrt(2 / (64 + 64)), one epoch later.
    weight = fixed.lightning_module.net[24].weight
    assert float(weight.detach().std()) == pytest.approx(5 / 3 * (2 / 128) ** 0.5, rel=0.1)
    assert float(as_built.callback_metrics["test/accuracy"]) < 0.2
    assert float(fixed.callback_metrics["test/accuracy"]) > 0.3  # measured: 0.46

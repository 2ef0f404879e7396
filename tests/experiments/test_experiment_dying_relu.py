"""``experiments/dying_relu.py --quick`` end to end, checked on its JSON and its tables."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from helpers import load_example, run_example_quick

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "dying_relu.py"
STEPS_PER_EPOCH = 23  # ceil(1437 / 64)
SPIKE_END = STEPS_PER_EPOCH * 6  # step 138: the spike epoch (5, from 0) is over
NEXT_EPOCH_END = STEPS_PER_EPOCH * 7  # step 161


def _load_example() -> ModuleType:
    return load_example(SCRIPT)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("dying_relu")
    return run_example_quick(SCRIPT, out)


def _run(results: dict[str, Any], config: str) -> dict[str, Any]:
    runs: list[dict[str, Any]] = [r for r in results["runs"] if r["config"] == config]
    (run,) = runs
    return run


def _dead(run: dict[str, Any], layer: str, step: int) -> float:
    """The monitor's ``dead_units/<layer>`` of the window logged at ``step``."""
    values = {int(s): v for s, v in run["dead_logged"][layer]}
    return float(values[step])


@pytest.mark.slow
def test_json_has_every_configuration(quick_run: tuple[dict[str, Any], str]) -> None:
    results, _ = quick_run
    names = [config.name for config in _load_example().CONFIGS]
    assert [c["name"] for c in results["configs"]] == names
    assert {"no_fix", "threshold", "start"} <= set(names)
    assert results["seeds"] == [0] and results["epochs"] == 8
    assert results["spike_epoch"] == 5 and results["spike_lr"] == 0.1
    assert sorted(r["config"] for r in results["runs"]) == sorted(names)
    for run in results["runs"]:
        assert run["steps_per_epoch"] == STEPS_PER_EPOCH
        assert len(run["accuracy_by_epoch"]) == 8
        assert set(run["dead_logged"]) == {"act1", "act2", "act3"}


def test_the_last_batches_window_ends_with_the_spike_epoch() -> None:
    every, window = _load_example().last_batches_window(STEPS_PER_EPOCH)
    assert (every, window) == (16, 10)
    assert (SPIKE_END - window) % every == 0  # a window starts at 128 and is logged at 138


@pytest.mark.slow
def test_spike_kills_a_hidden_layer_without_a_fix(quick_run: tuple[dict[str, Any], str]) -> None:
    results, _ = quick_run
    reference, run = _run(results, "no_spike"), _run(results, "no_fix")
    before = STEPS_PER_EPOCH * 5
    for layer in ("act1", "act2", "act3"):
        assert _dead(reference, layer, NEXT_EPOCH_END) < 0.1, layer
        assert _dead(run, layer, before) < 0.1, layer  # healthy until the spike
    # The window of the spike epoch saw the model of before the spike on its first batch.
    assert _dead(run, "act2", SPIKE_END) < 0.5
    # One epoch later the monitor sees the damage (measured: act2 100%, act3 ~100%), and
    # so does a full pass over the training set at the end of the spike epoch.
    assert max(_dead(run, n, NEXT_EPOCH_END) for n in ("act2", "act3")) > 0.9
    assert run["dead_full_pass"]["act2"][5] > 0.9
    assert run["dead_full_pass"]["act1"][-1] < 0.1  # the first hidden layer never dies
    assert run["swapped"] == [] and run["events"] == []
    assert reference["accuracy"] > 0.9 and run["accuracy"] < 0.3  # chance is 0.10


@pytest.mark.slow
def test_threshold_rescue_swaps_the_dead_layers(quick_run: tuple[dict[str, Any], str]) -> None:
    results, _ = quick_run
    epoch_windows, last10 = _run(results, "threshold"), _run(results, "threshold_last10")
    assert "act2" in epoch_windows["swapped"] and "act1" not in epoch_windows["swapped"]
    assert {e["step"] for e in epoch_windows["events"]} == {NEXT_EPOCH_END}
    assert all(e["kind"] == "swap" and "dead" in e["detail"] for e in epoch_windows["events"])
    # The window of the last 10 batches of the spike epoch acts one epoch earlier.
    assert "act2" in last10["swapped"]
    assert {e["step"] for e in last10["events"]} == {SPIKE_END}
    assert _dead(last10, "act2", SPIKE_END) > 0.5


@pytest.mark.slow
def test_leaky_relu_from_the_start(quick_run: tuple[dict[str, Any], str]) -> None:
    results, _ = quick_run
    run = _run(results, "start")
    assert run["swapped"] == ["act1", "act2", "act3"]
    assert {e["step"] for e in run["events"]} == {0}


@pytest.mark.slow
def test_stdout_has_the_markdown_tables(quick_run: tuple[dict[str, Any], str]) -> None:
    results, stdout = quick_run
    assert "| configuration | test accuracy | accuracy before / after the spike epoch |" in stdout
    assert "| configuration | before the spike epoch | after the spike epoch |" in stdout
    for config in results["configs"]:
        assert stdout.count(f"| {config['label']} |") == 2

"""``experiments/reinit.py --quick`` end to end, checked on its JSON and its tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import run_example_quick

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "reinit.py"
STEPS_PER_EPOCH = 23  # ceil(1437 / 64)
TRIGGER = STEPS_PER_EPOCH * 6  # step 138: the window of steps 128-137 is over
DEPTH = 25


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("reinit")
    return run_example_quick(SCRIPT, out)


def _run(part: dict[str, Any], config: str) -> dict[str, Any]:
    (run,) = [r for r in part["runs"] if r["config"] == config]
    return run


@pytest.mark.slow
def test_json_has_every_configuration(quick_run: tuple[dict[str, Any], str]) -> None:
    results, _ = quick_run
    assert results["seeds"] == [0]
    init, recycle = results["init"], results["recycle"]
    assert init["epochs"] == 1 and recycle["epochs"] == 8 and recycle["spike_epoch"] == 5
    assert sorted(r["config"] for r in init["runs"]) == sorted(c["name"] for c in init["configs"])
    assert sorted(r["config"] for r in recycle["runs"]) == sorted(
        c["name"] for c in recycle["configs"]
    )
    for run in init["runs"]:
        # Read back from GradNormMonitor's grad_norm/<layer> at step 0, in float64: even
        # the sigmoid stack's ~1e-24 first-layer norm is not 0.
        assert len(run["step0_norms"]) == DEPTH
        assert all(0 < norm < 1e3 for norm in run["step0_norms"]), run["config"]
    for run in recycle["runs"]:
        assert run["steps_per_epoch"] == STEPS_PER_EPOCH
        assert len(run["accuracy_by_epoch"]) == 8
        assert set(run["dead_full_pass"]) == {"act1", "act2", "act3"}


@pytest.mark.slow
def test_init_at_start_fixes_the_tanh_gradient_profile(
    quick_run: tuple[dict[str, Any], str],
) -> None:
    init = quick_run[0]["init"]
    poor, xavier, lsuv = (_run(init, n) for n in ("tanh", "tanh_xavier", "tanh_lsuv"))
    # N(0, 0.05): the gradient shrinks ~2.5x per tanh layer (measured: first/last ~3e-9).
    assert poor["ratio"] < 1e-6
    for fixed in (xavier, lsuv):  # measured: ~5.7 and ~8.6
        assert 0.1 < fixed["ratio"] < 100
        assert fixed["ratio"] / poor["ratio"] > 1e6  # orders of magnitude
    # Gains inferred from the nn.Sequential: tanh for the hidden layers, linear for the output.
    assert (
        xavier["gains"]["net.0"] == "tanh" and xavier["gains"][f"net.{2 * DEPTH - 2}"] == "linear"
    )
    assert lsuv["gains"] == {} and lsuv["lsuv_not_converged"] == []
    # One epoch is enough to move away from chance (0.10) once the gradients flow.
    assert poor["accuracy"] < 0.2 and xavier["accuracy"] > 0.3 and lsuv["accuracy"] > 0.3


@pytest.mark.slow
def test_init_alone_does_not_save_the_deep_sigmoid(quick_run: tuple[dict[str, Any], str]) -> None:
    init = quick_run[0]["init"]
    poor, xavier, lsuv = (_run(init, n) for n in ("sigmoid", "sigmoid_xavier", "sigmoid_lsuv"))
    assert poor["ratio"] < 1e-20  # measured: ~2e-24
    assert xavier["gains"]["net.0"] == "sigmoid"
    # Better than N(0, 0.05), still vanishing (measured: ~3e-15 and ~2e-10).
    for fixed in (xavier, lsuv):
        assert poor["ratio"] < fixed["ratio"] < 1e-6
        assert fixed["accuracy"] < 0.2


@pytest.mark.slow
def test_unit_recycler_revives_the_layers_the_spike_killed(
    quick_run: tuple[dict[str, Any], str],
) -> None:
    recycle = quick_run[0]["recycle"]
    no_fix = _run(recycle, "no_fix")
    assert no_fix["dead_full_pass"]["act2"][5] > 0.9 and no_fix["dead_full_pass"]["act2"][-1] > 0.9
    assert no_fix["accuracy"] < 0.3 and no_fix["events"] == []
    for name in ("recycle_once_tau0", "recycle_once_tau0.025"):
        run = _run(recycle, name)
        # One window (steps 128-137), acted on at step 138; the first hidden layer never dies.
        assert [step for step, _ in run["recycled"]["fc2"]] == [TRIGGER]
        assert {e["step"] for e in run["events"]} == {TRIGGER}
        fc1, fc2, fc3 = (dict(run["recycled"][p])[TRIGGER] for p in ("fc1", "fc2", "fc3"))
        assert fc1 == 0 and fc2 > 200 and fc3 > 100  # of 256 (measured: 0/255/~235)
        # The probe at the end of the spike epoch runs after the recycling: units are alive.
        assert run["dead_full_pass"]["act2"][5] < 0.1 and run["dead_full_pass"]["act2"][-1] < 0.1
        assert run["accuracy"] > 0.6  # measured: ~0.89 two epochs after the spike
    periodic = _run(recycle, "recycle_every128_tau0.025")
    # The stock callback also opens a window at step 0 (steps 0-9, acted on at step 10).
    assert [step for step, _ in periodic["recycled"]["fc2"]] == [10, TRIGGER]
    assert dict(periodic["recycled"]["fc2"])[TRIGGER] > 200
    assert periodic["accuracy"] > 0.6


@pytest.mark.slow
def test_stdout_has_the_markdown_tables(quick_run: tuple[dict[str, Any], str]) -> None:
    results, stdout = quick_run
    assert "| configuration | test accuracy | step-0 grad norm, first / last layer |" in stdout
    assert "| configuration | layer 1 | layer 7 | layer 13 | layer 19 | layer 25 |" in stdout
    assert "| configuration | test accuracy | accuracy after epoch 5 / 6 / 7 |" in stdout
    for config in results["init"]["configs"]:
        assert stdout.count(f"| {config['label']} |") == 2
    for config in results["recycle"]["configs"]:
        assert stdout.count(f"| {config['label']} |") == 1

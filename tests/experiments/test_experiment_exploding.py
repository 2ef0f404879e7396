"""``experiments/exploding.py --quick`` end to end, checked on its JSON and its table."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from helpers import load_example, run_example_quick

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "exploding.py"
POLICY_NAMES = ("FixedNorm", "FixedValue", "AutoClip", "ZClip", "EMARatio", "AGC")


def _load_example() -> ModuleType:
    return load_example(SCRIPT)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("exploding")
    return run_example_quick(SCRIPT, out)


def _run(results: dict[str, Any], scenario: str, config: str) -> dict[str, Any]:
    (run,) = [r for r in results["runs"] if r["scenario"] == scenario and r["config"] == config]
    return run


@pytest.mark.slow
def test_json_has_every_configuration_and_policy(quick_run: tuple[dict[str, Any], str]) -> None:
    results, _ = quick_run
    labels = [config.label for config in _load_example().CONFIGS]
    assert results["configs"] == labels
    assert results["seeds"] == [0] and results["steps"] == 30
    for name in POLICY_NAMES:
        assert any(label.startswith(name) for label in labels), name
    assert any(label.endswith(", layer") for label in labels)
    for scenario in ("S2a", "S2b"):
        assert {r["config"] for r in results["runs"] if r["scenario"] == scenario} == set(labels)


@pytest.mark.slow
def test_s2b_explodes_without_clipping(quick_run: tuple[dict[str, Any], str]) -> None:
    results, _ = quick_run
    run = _run(results, "S2b", "no clipping")
    assert run["step0_grad_norm"] > 100  # measured: ~1.3e3 with seed 0
    assert run["first_nonfinite_step"] is not None and run["first_nonfinite_step"] <= 5
    assert not run["weights_finite"]
    assert run["accuracy"] == pytest.approx(0.1, abs=0.02)  # NaN logits: chance


@pytest.mark.slow
def test_fixed_norm_and_zclip_warmup_keep_s2b_finite(quick_run: tuple[dict[str, Any], str]) -> None:
    results, _ = quick_run
    for config in ("FixedNorm(1.0)", "ZClip()"):
        run = _run(results, "S2b", config)
        assert run["first_nonfinite_step"] is None, config
        assert run["weights_finite"] and run["skipped_steps"] == 0, config
        assert run["steps"] == 30 and run["accuracy"] > 0.3, config  # measured: 0.59


@pytest.mark.slow
def test_plain_autoclip_does_not_clip_the_first_s2b_step(
    quick_run: tuple[dict[str, Any], str],
) -> None:
    """SCENARIOS S2b: the history is just the first norm, so step 0 goes through unclipped."""
    results, _ = quick_run
    run = _run(results, "S2b", "AutoClip(percentile=10)")
    assert run["first_nonfinite_step"] is not None
    # AdaptiveGradClip skipped the non-finite steps (weights stay finite), then stopped.
    assert run["weights_finite"] and run["skipped_steps"] >= 1
    assert run["stopped_early"] and "skipped" in run["stopped_early"]


@pytest.mark.slow
def test_stdout_has_the_markdown_tables(quick_run: tuple[dict[str, Any], str]) -> None:
    results, stdout = quick_run
    assert stdout.count("| clipping | test accuracy | runs with inf/NaN |") == 2
    for label in results["configs"]:
        assert f"| {label} |" in stdout
    assert "### S2a" in stdout and "### S2b" in stdout

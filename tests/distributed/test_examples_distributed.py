"""The two-process examples and the LightningCLI example, run as a user runs them.

Each script runs in a subprocess, in its own session, with small settings from its
command line. ``ddp_cpu.py`` and ``fsdp2_cpu.py`` start their second process
themselves (Lightning's launcher, gloo on CPU). The tests read what the scripts
print and the CSV metrics they write.
"""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from distributed_helpers import clean_env

pytestmark = pytest.mark.distributed  # the examples run as two ranks

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
STEPS = 8
LOG_EVERY = 2
TIMEOUT = 180.0

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo"
)


def run_example(script: str, *args: str, cwd: Path) -> str:
    """Run ``examples/<script> args`` in ``cwd``; return its output, fail on a non-zero exit."""
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=cwd,
        env=clean_env(WANDB_MODE="offline"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # on a timeout, the rank Lightning started goes too
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"{script} timed out after {TIMEOUT}s\n{output[-5000:]}") from None
    assert proc.returncode == 0, f"{script} exited with {proc.returncode}\n{output[-5000:]}"
    return output


def metrics_rows(folder: Path) -> list[dict[str, str]]:
    (path,) = folder.rglob("metrics.csv")
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def logged(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    """``step -> value`` of every row that has ``key``."""
    return {int(row["step"]): float(row[key]) for row in rows if row.get(key)}


def _distributed_run(script: str, tmp: Path) -> tuple[str, list[dict[str, str]]]:
    out = tmp / "logs"
    args = ("--max-steps", str(STEPS), "--log-every", str(LOG_EVERY), "--out", str(out))
    output = run_example(script, *args, cwd=tmp)
    # GradGuard's report: rank 0 alone draws the pictures, next to the metrics.
    pictures = sorted(p.name for p in out.rglob("gradguard/*.png"))
    assert pictures == ["clipping.png", "dead_units.png", "gradient_flow.png"], pictures
    return output, metrics_rows(out)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict[str, str]]]:
    return _distributed_run("ddp_cpu.py", tmp_path_factory.mktemp("ddp_cpu"))


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict[str, str]]]:
    return _distributed_run("fsdp2_cpu.py", tmp_path_factory.mktemp("fsdp2_cpu"))


def _check_norms_and_clipping(rows: list[dict[str, str]]) -> None:
    norms = logged(rows, "grad_norm/total")
    assert sorted(norms) == list(range(0, STEPS, LOG_EVERY))  # rank 0 logged each step once
    assert all(math.isfinite(v) and v > 0 for v in norms.values())
    for layer in ("net.0", "net.2", "net.4", "head"):
        assert set(logged(rows, f"grad_norm/{layer}")) == set(norms), layer
    thresholds = logged(rows, "clip/threshold")
    assert set(thresholds) == set(norms) and all(math.isfinite(v) for v in thresholds.values())
    assert set(logged(rows, "clip/skipped_steps").values()) == {0.0}
    # Nothing leaves the clipper above its threshold.
    clipped = logged(rows, "grad_norm/total_clipped")
    for step, value in clipped.items():
        assert value <= thresholds[step] * (1 + 1e-5), step
    # GradGuard's dead-unit window (batches 0-4) ended and was logged once, per hidden layer.
    for activation in ("net.1", "net.3", "net.5"):
        dead = logged(rows, f"dead_units/{activation}")
        assert len(dead) == 1 and 0.0 <= next(iter(dead.values())) <= 1.0, activation
    accuracy = logged(rows, "test/accuracy")
    assert len(accuracy) == 1 and 0.0 <= next(iter(accuracy.values())) <= 1.0


@needs_gloo
def test_ddp_example_trains_two_identical_replicas(
    ddp_run: tuple[str, list[dict[str, str]]],
) -> None:
    output, rows = ddp_run
    assert f"DDP on CPU: 2 processes (gloo), {STEPS} optimizer steps" in output
    assert "identical parameters on every rank: True" in output
    assert output.count("DDP on CPU:") == 1  # rank 0 alone prints the summary
    _check_norms_and_clipping(rows)


@needs_gloo
def test_fsdp2_example_shards_the_model(fsdp2_run: tuple[str, list[dict[str, str]]]) -> None:
    output, rows = fsdp2_run
    assert f"FSDP2 on CPU: 2 processes (ModelParallelStrategy), {STEPS} optimizer steps" in output
    assert "net.0.weight is a DTensor: True; 64 of its 128 rows on rank 0" in output
    _check_norms_and_clipping(rows)


@needs_gloo
def test_fsdp2_logs_the_norms_of_the_whole_model(
    ddp_run: tuple[str, list[dict[str, str]]], fsdp2_run: tuple[str, list[dict[str, str]]]
) -> None:
    """Same seed, same batches: the sharded run logs what the replicated run logs."""
    _, ddp_rows = ddp_run
    _, fsdp_rows = fsdp2_run
    keys = ("grad_norm/total", "grad_norm/net.0", "grad_norm/head", "clip/threshold")
    for key in (*keys, "dead_units/net.1", "dormant_units/net.3"):
        ddp, fsdp = logged(ddp_rows, key), logged(fsdp_rows, key)
        assert ddp.keys() == fsdp.keys(), key
        for step in ddp:
            assert fsdp[step] == pytest.approx(ddp[step], rel=1e-4), (key, step)


def test_cli_example_builds_the_callbacks_from_the_config(tmp_path: Path) -> None:
    out = tmp_path / "logs"
    run_example(
        "cli.py",
        "fit",
        "--config",
        str(EXAMPLES / "cli_config.yaml"),
        f"--trainer.max_steps={STEPS}",
        f"--trainer.log_every_n_steps={LOG_EVERY}",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={out}",
        cwd=tmp_path,
    )
    rows = metrics_rows(out)
    norms = logged(rows, "grad_norm/total")
    assert sorted(norms) == list(range(0, STEPS, LOG_EVERY))
    assert all(math.isfinite(v) and v > 0 for v in norms.values())
    header = set(rows[0])
    # exclude: ["*.bias"] left the biases out: still one key per layer, from the weights.
    assert {"grad_norm/net.0", "grad_norm/head", "clip/threshold", "dead_units/net.1"} <= header
    (log_dir,) = {p.parent for p in out.rglob("metrics.csv")}
    assert "skip_spikes: true" in (log_dir / "config.yaml").read_text(encoding="utf-8")
    pictures = sorted(p.name for p in (log_dir / "gradguard").glob("*.png"))
    assert pictures == ["clipping.png", "dead_units.png", "gradient_flow.png"]

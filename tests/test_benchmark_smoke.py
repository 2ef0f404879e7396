"""The overhead benchmark runs end to end (``--quick``) and prints its table.

Timings are not tests: nothing here looks at a number.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"
VARIANT_LABELS = ("GradNormMonitor", "pl grad_norm", "wandb.watch")
WORKLOADS = ("mlp", "transformer", "many_small")


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(cwd))
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_quick_run_prints_a_table_with_every_variant(tmp_path: Path) -> None:
    out_json = tmp_path / "overhead.json"
    proc = _run(["--quick", "--json", str(out_json)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| workload"))
    assert "bare ms/step" in header
    for label in VARIANT_LABELS:
        assert label in header
    rows = [line for line in lines if line.startswith("| ") and line is not header]
    for workload in WORKLOADS:
        row = next(r for r in rows if r.startswith(f"| {workload} "))
        assert row.count("×") == len(VARIANT_LABELS)
    assert "Targets:" in proc.stdout
    assert proc.stdout.count("GradNormMonitor cheaper than pl grad_norm") == len(WORKLOADS)

    data = json.loads(out_json.read_text())
    assert set(data["results"]) == set(WORKLOADS)
    for entry in data["results"].values():
        assert set(entry["variants"]) == {"bare", "gradguard", "pl_grad_norm", "wandb_watch"}
        # Every variant really ran and logged through the shared in-memory logger.
        assert entry["variants"]["bare"]["logged_keys"] >= 1
        assert (
            entry["variants"]["gradguard"]["logged_keys"] > entry["variants"]["bare"]["logged_keys"]
        )
        assert (
            entry["variants"]["pl_grad_norm"]["logged_keys"]
            > entry["variants"]["bare"]["logged_keys"]
        )
    assert len(data["targets"]) == 2 + len(WORKLOADS)
    # Nothing written next to the caller: Lightning and wandb files go to a temp folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overhead.json"]


def test_unknown_variant_is_rejected_with_the_choices(tmp_path: Path) -> None:
    proc = _run(["--quick", "--variants", "bare,nope"], tmp_path)
    assert proc.returncode == 2
    assert "nope" in proc.stderr
    assert "gradguard" in proc.stderr

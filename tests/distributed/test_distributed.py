"""Real 2-process tests on CPU with gloo: DDP, FSDP2 and DTensor norms.

Every scenario runs in fresh processes started from here (``tests/workers/``):
Lightning's DDP launcher re-executes ``sys.argv``, which must be a script, not
pytest. The workers write what they saw to JSON; these tests compare it with
single-process references computed with plain torch in ``distributed_helpers``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import distributed_helpers as h
import pytest

pytestmark = pytest.mark.distributed  # conftest.py: also slow, skipped without gloo

NORM_TOL = {"rel": 1e-5, "abs": 1e-8}
# ‖Δθ‖ is a difference of float32 parameters, so it carries a little more rounding.
# (Measured: at most ~7e-7 relative for every key.)
RATIO_TOL = {"rel": 5e-5, "abs": 1e-8}


def _assert_close(actual: dict[str, float], expected: dict[str, float], where: str) -> None:
    for key, value in expected.items():
        tol = RATIO_TOL if key.startswith("update_ratio/") else NORM_TOL
        assert actual[key] == pytest.approx(value, **tol), f"{where}: {key}"


def _split_calls(calls: list[dict[str, Any]]) -> dict[int, dict[str, dict[str, float]]]:
    """Per step, the one ``log_metrics`` call of each monitor (told apart by their keys)."""
    steps: dict[int, dict[str, dict[str, float]]] = {}
    for call in calls:
        metrics = call["metrics"]
        monitor = "parameter_inf" if "grad_norm/net.0.weight" in metrics else "module_l2"
        assert monitor not in steps.setdefault(call["step"], {}), (
            f"{monitor} logged twice at step {call['step']}"
        )
        steps[call["step"]][monitor] = metrics
    return steps


@pytest.fixture(scope="module")
def reference() -> list[dict[str, dict[str, float]]]:
    return h.reference_metrics()


def _check_lightning_run(out: Path, reference: list[dict[str, dict[str, float]]]) -> dict:
    rank0 = h.read_json(out / "rank0.json")
    rank1 = h.read_json(out / "rank1.json")
    for rank, data in enumerate((rank0, rank1)):
        assert data["world_size"] == h.WORLD_SIZE
        assert data["backend"] == "gloo"
        # Each rank trained on the batches the reference puts together.
        assert data["batch_checks"] == [True] * h.STEPS, f"rank {rank} saw other batches"
    # Rank zero only: a logger that records on every rank got nothing on rank 1 ...
    assert rank1["calls"] == []
    # ... and on rank 0 exactly one call per monitor per step, at steps 0..STEPS-1.
    steps = _split_calls(rank0["calls"])
    assert sorted(steps) == list(range(h.STEPS))
    for step, expected in enumerate(reference):
        logged = steps[step]
        assert set(logged) == {"module_l2", "parameter_inf"}
        for monitor, metrics in expected.items():
            assert set(logged[monitor]) == {*metrics, "grad_norm/nonfinite_steps"}
            assert logged[monitor]["grad_norm/nonfinite_steps"] == 0
            _assert_close(logged[monitor], metrics, f"step {step} {monitor}")
    return {"rank0": rank0, "rank1": rank1}


def test_ddp_grad_norms_match_single_process(tmp_path: Path, reference: list) -> None:
    h.run_script("lightning_run.py", "ddp", str(tmp_path))
    runs = _check_lightning_run(tmp_path, reference)
    assert runs["rank0"]["strategy"] == "DDPStrategy"
    assert not any(runs["rank0"]["params_are_dtensors"])


def test_fsdp2_grad_norms_match_unsharded(tmp_path: Path, reference: list) -> None:
    h.run_script("lightning_run.py", "fsdp", str(tmp_path))
    runs = _check_lightning_run(tmp_path, reference)
    rank0, rank1 = runs["rank0"], runs["rank1"]
    assert rank0["strategy"] == "ModelParallelStrategy"
    assert all(rank0["params_are_dtensors"]) and all(rank1["params_are_dtensors"])
    # Really sharded, unevenly: Shard(0) of Linear(7, 5) is 3 + 2 rows, and the last
    # layer's single row leaves rank 1 empty shards (the inf norm must cope with them).
    assert rank0["local_shapes"]["net.0.weight"] == [3, 7]
    assert rank1["local_shapes"]["net.0.weight"] == [2, 7]
    assert rank1["local_shapes"]["net.4.weight"] == [0, 3]
    assert rank1["local_shapes"]["net.4.bias"] == [0]


def test_grouped_norms_on_dtensors(tmp_path: Path) -> None:
    h.launch_ranks("functional_run.py", str(tmp_path), timeout=180)
    full = h.odd_tensors()
    groups = [[full[0], full[1]], [full[2], full[3]], [full[4]], []]
    results = [h.read_json(tmp_path / f"rank{rank}.json") for rank in range(h.WORLD_SIZE)]
    # Shard(0) really is uneven and leaves rank 1 an empty shard of the (1, 4) tensor.
    numels = [r["local_numels"] for r in results]
    assert [a + b for a, b in zip(*numels)] == [t.numel() for t in full]
    assert numels[1][2] == 0
    # Reductions per call: one for one 1-D mesh; none when nothing is sharded (Partial is
    # summed by DTensor itself); one per (mesh, dim) otherwise.
    expected_calls = {"shard0": 1, "mixed": 1, "partial": 0, "multi_mesh": 6, "two_groups": 2}
    for rank, result in enumerate(results):
        for case, calls in expected_calls.items():
            for norm_type in (2.0, math.inf, 1.0, 3.0):
                got = result[case][str(norm_type)]
                where = f"rank {rank} {case} norm_type={norm_type}"
                want = [h.reference_norm(g, norm_type) if g else 0.0 for g in groups]
                assert got["groups"] == pytest.approx(want, rel=1e-6, abs=1e-12), where
                total = h.reference_norm(full, norm_type)
                assert got["total"] == pytest.approx(total, rel=1e-6), where
                assert got["all_reduce_calls"] == calls, where
    # Every rank holds the same global values ("decide together").
    for case in expected_calls:
        assert results[0][case] == results[1][case], case

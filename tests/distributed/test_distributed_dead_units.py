"""``DeadUnitMonitor`` in real 2-process CPU (gloo) DDP runs: decide from reduced statistics.

One launch of ``tests/workers/dead_units_run.py`` (two processes, started here) runs both
scenarios, one ``Trainer.fit`` each, and writes what each rank saw to JSON. The data put
chosen features on one rank's samples only (``distributed_helpers.make_dead_dataset``)
and the first layers are set by hand (``make_dead_net``), so a unit can be alive on one
rank's data and dead on the other's. The references are plain-torch forwards
(``reference_unit_activity``) over the union of both ranks' window batches, and over one
rank's batches alone to show that a per-rank decision would differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import distributed_helpers as h
import pytest
import torch

pytestmark = pytest.mark.distributed  # conftest.py: also slow, skipped without gloo

LAUNCH_TIMEOUT = 150.0  # seconds for the whole launch; a collective mismatch hangs


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> h.Launch:
    return h.launch_scenarios(
        "dead_units_run.py", tmp_path_factory.mktemp("dead_unit_runs"), LAUNCH_TIMEOUT
    )


def _ranks(launch: h.Launch, scenario: str) -> list[dict[str, Any]]:
    runs = h.read_ranks(launch, scenario)
    for rank, run in enumerate(runs):
        assert run["global_rank"] == rank
        assert run["world_size"] == h.WORLD_SIZE
        assert run["backend"] == "gloo"
        assert run["strategy"] == "DDPStrategy"
        assert run["global_step"] == h.DEAD_STEPS
        # Each rank saw exactly the samples the references use.
        expected = [h.dead_rank_indices(rank, step) for step in range(h.DEAD_STEPS)]
        assert run["batch_indices"] == expected, f"rank {rank} saw other batches"
    return runs


def _logged(calls: list[list[Any]]) -> dict[int, dict[str, float]]:
    """``log_metrics`` calls by step (each step logged once)."""
    steps = [step for step, _ in calls]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {step: metrics for step, metrics in calls}


def _reference(
    kind: str, activation: int, window: int, ranks: tuple[int, ...] = (0, 1)
) -> tuple[torch.Tensor, torch.Tensor]:
    x = h.make_dead_dataset().tensors[0][h.dead_window_indices(window, ranks)]
    return h.reference_unit_activity(h.make_dead_net(kind), activation, x)


def _fraction(mask: torch.Tensor) -> float:
    return float(mask.double().mean())


def test_unit_alive_on_one_rank_only_is_not_dead(launch: tuple) -> None:
    rank0, rank1 = _ranks(launch, "split")
    # Logged on rank 0 only: the recording logger is not rank-zero restricted, and it
    # got no call at all on rank 1.
    assert rank1["calls"] == []
    logged = _logged(rank0["calls"])
    assert sorted(logged) == list(h.DEAD_LOG_STEPS)
    for window, step in enumerate(h.DEAD_LOG_STEPS):
        dead, scores = _reference("split", 1, window)
        assert set(logged[step]) == {"dead_units/net.1", "dormant_units/net.1"}
        assert logged[step]["dead_units/net.1"] == pytest.approx(_fraction(dead), abs=1e-12)
        assert logged[step]["dormant_units/net.1"] == pytest.approx(
            _fraction(scores <= h.DEAD_TAU), abs=1e-12
        )
    # The data do what they were built for. First window: unit 1 fires on one sample of
    # rank 1 only, unit 2 on rank 0's samples only, unit 3 never.
    dead, _ = _reference("split", 1, 0)
    dead_rank0, _ = _reference("split", 1, 0, ranks=(0,))
    dead_rank1, _ = _reference("split", 1, 0, ranks=(1,))
    assert dead.tolist() == [False, False, False, True, False]
    assert dead_rank0.tolist() == [False, True, False, True, False]
    assert dead_rank1.tolist() == [False, False, True, True, False]
    # So a per-rank measurement would say 2/5 on either rank; the reduced one says 1/5.
    assert logged[h.DEAD_LOG_STEPS[0]]["dead_units/net.1"] == 0.2
    assert _fraction(dead_rank0) == _fraction(dead_rank1) == 0.4
    # Second window: unit 1's sample is gone, it is dead on the union too (a window
    # measures its own batches, not the run so far).
    dead, _ = _reference("split", 1, 1)
    assert dead.tolist() == [False, True, False, True, False]
    assert logged[h.DEAD_LOG_STEPS[1]]["dead_units/net.1"] == 0.4
    # Both ranks hold the same reduced statistics; lr=0 kept the model fixed.
    assert rank0["last_stats"] == rank1["last_stats"]
    assert rank0["last_stats"]["net.1"]["dead"] == 0.4
    for run in (rank0, rank1):
        assert run["params_end"] == run["params_start"]
        assert run["events"] == [] and run["swapped"] == []


def test_threshold_swap_is_decided_together(launch: tuple) -> None:
    rank0, rank1 = _ranks(launch, "threshold")
    # The reference for the first window: the model has not moved yet (net.3 is dead,
    # so no gradient reaches the layers before it, and the swap comes after the window).
    dead_1, _ = _reference("threshold", 1, 0)
    dead_1_rank0, _ = _reference("threshold", 1, 0, ranks=(0,))
    dead_3, _ = _reference("threshold", 3, 0)
    assert _fraction(dead_3) == 1.0  # dead on both ranks' data: swapped
    assert _fraction(dead_1) == 0.25 < h.DEAD_THRESHOLD  # reduced: below the threshold
    assert _fraction(dead_1_rank0) == 0.75 > h.DEAD_THRESHOLD  # rank 0 alone: above
    assert rank1["calls"] == []
    logged = _logged(rank0["calls"])
    assert sorted(logged) == list(h.DEAD_LOG_STEPS)
    first = logged[h.DEAD_LOG_STEPS[0]]
    assert first["dead_units/net.1"] == pytest.approx(_fraction(dead_1), abs=1e-12)
    assert first["dead_units/net.3"] == 1.0
    # One swap, of net.3 only, at the same step on both ranks.
    assert rank0["events"] == rank1["events"]
    assert [(e["step"], e["kind"], e["layer"]) for e in rank0["events"]] == [
        (h.DEAD_LOG_STEPS[0], "swap", "net.3")
    ]
    for run in (rank0, rank1):
        assert run["activations"] == list(h.DEAD_ACTIVATIONS)
        assert run["swapped"] == ["net.3"]
        assert run["types_end"] == ["ReLU", "LeakyReLU"]  # net.1 was NOT swapped
        # The forward ran with the same modules at every step on both ranks: ReLU in
        # the first window's batches, LeakyReLU from the step after it.
        swap_step = h.DEAD_LOG_STEPS[0]
        assert run["types_per_step"] == [["ReLU", "ReLU"]] * swap_step + [["ReLU", "LeakyReLU"]] * (
            h.DEAD_STEPS - swap_step
        )
    # The second window still reduces net.1 to 1/4 dead: no swap there either.
    assert logged[h.DEAD_LOG_STEPS[1]]["dead_units/net.1"] == 0.25
    assert rank0["last_stats"] == rank1["last_stats"]
    # The model trained, and identically on both ranks.
    assert rank0["params_end"] == rank1["params_end"]
    assert rank0["params_end"] != rank0["params_start"]
    # Neither rank hung, and the launch ended cleanly.
    _, error = launch
    assert error is None, str(error)


def test_reduce_when_a_layer_ran_on_one_rank_only(tmp_path: Path) -> None:
    h.launch_ranks("activity_reduce_run.py", str(tmp_path), timeout=120)
    results = [h.read_json(tmp_path / f"rank{rank}.json") for rank in range(h.WORLD_SIZE)]
    assert results[0] == results[1]  # both ranks hold the same reduced statistics
    first = results[0]["window1"]
    # "always": unit 0 was positive on rank 0, unit 1 on rank 1 -> neither is dead.
    assert first["always"]["dead"] == [False, False]
    assert first["always"]["samples"] == 3
    # ReLU outputs [[1, 0], [2, 0]] and [[0, 4]]: mean |h| per unit over 3 samples
    means = [3 / 3, 4 / 3]
    expected = [m / (sum(means) / 2) for m in means]
    assert first["always"]["scores"] == pytest.approx(expected)
    # "branch" ran on rank 0 only: its statistics are rank 0's, rank 1 adds zeros.
    assert first["branch"]["dead"] == [True, False, True]
    assert first["branch"]["samples"] == 1
    # Window 2, the same sites: one all_reduce and nothing else.
    assert results[0]["collectives2"] == {"all_reduce": 1, "all_gather_object": 0}
    assert results[0]["window2"]["always"]["dead"] == [True, False]
    assert results[0]["window2"]["always"]["samples"] == 2
    # Window 3: a new site on rank 1 only is agreed on and summed on both ranks.
    third = results[0]["window3"]
    assert third["late"]["dead"] == [True, False, False, True]
    assert third["late"]["samples"] == 1
    assert third["always"]["samples"] == 2 and third["always"]["dead"] == [False, False]

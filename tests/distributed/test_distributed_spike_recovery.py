"""``SpikeRecovery`` in real 2-process CPU (gloo) runs: DDP and FSDP2 (``ModelParallelStrategy``).

One launch of ``tests/workers/spike_run.py`` runs both scenarios. In each, the loss of
*one* rank spikes; the ranks must roll back together, to a state equal bit for bit to
the one recorded right after the snapshot's step, and stay identical to each other.
"""

from __future__ import annotations

from typing import Any

import distributed_helpers as h
import pytest

pytestmark = pytest.mark.distributed  # conftest.py: also slow, skipped without gloo

STEPS = 16
SPIKE_STEP = 9
SNAPSHOT_STEP = 8  # snapshots every 4 steps: 0, 4, 8


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> h.Launch:
    return h.launch_scenarios("spike_run.py", tmp_path_factory.mktemp("spike_runs"), 150.0)


def _ranks(launch: h.Launch, scenario: str) -> list[dict[str, Any]]:
    return h.read_ranks(launch, scenario)


@pytest.mark.parametrize(
    ("scenario", "strategy"), [("ddp", "DDPStrategy"), ("fsdp", "ModelParallelStrategy")]
)
def test_a_spike_on_one_rank_rolls_back_every_rank_bit_identically(
    launch: tuple, scenario: str, strategy: str
) -> None:
    runs = _ranks(launch, scenario)
    expected = [
        {
            "step": SPIKE_STEP + 1,
            "to_step": SNAPSHOT_STEP,
            "signals": ["loss"],
            "batches": [[0, SNAPSHOT_STEP], [0, SPIKE_STEP]],
        }
    ]
    for rank, run in enumerate(runs):
        assert run["global_rank"] == rank and run["strategy"] == strategy
        assert run["global_step"] == STEPS
        assert run["rollbacks"] == expected, f"rank {rank}"
        states = run["states"]
        # After the rollback (end of batch 9): the state after step 8 (end of batch 7),
        # parameters and Adam moments and step counts, bit for bit.
        assert states[SPIKE_STEP] == states[SNAPSHOT_STEP - 1], f"rank {rank}"
        assert states[SPIKE_STEP] != states[SPIKE_STEP - 1]
    # The ranks hold the same full state after every batch.
    for batch, (a, b) in enumerate(zip(runs[0]["states"], runs[1]["states"], strict=True)):
        assert a == b, f"ranks differ after batch {batch}"


def test_fsdp2_ranks_keep_their_own_shards(launch: tuple) -> None:
    ddp, fsdp = _ranks(launch, "ddp"), _ranks(launch, "fsdp")
    # A DDP rank holds the whole state; an FSDP2 rank only its shards (plus the step counts).
    for rank in range(h.WORLD_SIZE):
        assert fsdp[rank]["snapshot_bytes"] < ddp[rank]["snapshot_bytes"]

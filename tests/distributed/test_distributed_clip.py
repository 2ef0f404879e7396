"""``AdaptiveGradClip`` in real 2-process CPU (gloo) runs: DDP, FSDP2 and a one-rank fault.

One launch of ``tests/workers/clip_run.py`` (two processes, started here) runs every
scenario, one ``Trainer.fit`` each, and writes what each rank saw to JSON: starting
Python and importing Lightning costs far more than the fits. The tests compare the
ranks with each other (bit for bit: they must decide together) and with
single-process references in plain torch (``distributed_helpers.reference_clip_run``:
``clip_grad_norm_`` with thresholds from hand-written ZClip / AutoClip, and a
hand-written unit-wise AGC).
"""

from __future__ import annotations

import math
from typing import Any

import distributed_helpers as h
import pytest
import torch

pytestmark = pytest.mark.distributed  # conftest.py: also slow, skipped without gloo

# A float32 all-reduce (or reduce-scatter) of the ranks' gradients against one float32
# backward over the global batch: a few ulps apart.
GRAD_TOL = {"rel": 1e-5, "abs": 1e-7}
LAUNCH_TIMEOUT = 150.0  # seconds for the whole launch; a collective mismatch hangs


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> h.Launch:
    return h.launch_scenarios("clip_run.py", tmp_path_factory.mktemp("clip_runs"), LAUNCH_TIMEOUT)


def _ranks(launch: h.Launch, scenario: str) -> list[dict[str, Any]]:
    runs = h.read_ranks(launch, scenario)
    for rank, run in enumerate(runs):
        assert run["global_rank"] == rank
        assert run["world_size"] == h.WORLD_SIZE
        assert run["backend"] == "gloo"
        assert run["global_step"] == h.CLIP_STEPS
        # Each rank trained on the batches the reference puts together.
        assert run["batch_checks"] == [True] * h.CLIP_STEPS, f"rank {rank} saw other batches"
        assert run["step_seen_by_corrupter"] == list(range(h.CLIP_STEPS))
    return runs


def _assert_ranks_identical(runs: list[dict[str, Any]], keys: tuple[str, ...]) -> None:
    """Every rank holds the same values, bit for bit (JSON floats round-trip exactly)."""
    for key in keys:
        for step, values in enumerate(zip(*(run[key] for run in runs))):
            assert all(v == values[0] for v in values), f"{key} differs across ranks at {step}"


def _assert_matches_reference(
    run: dict[str, Any], ref: dict[str, list], where: str, skip_steps: tuple[int, ...] = ()
) -> None:
    for step in range(h.CLIP_STEPS):
        if step not in skip_steps:
            assert run["clipped"][step] == pytest.approx(ref["clipped"][step], **GRAD_TOL), (
                f"{where}: clipped gradients at step {step}"
            )
        assert run["params"][step] == pytest.approx(ref["params"][step], **GRAD_TOL), (
            f"{where}: parameters after step {step}"
        )


def _clipped_steps(ref: dict[str, list]) -> list[bool]:
    return [t is not None and n > t for n, t in zip(ref["raw_norm"], ref["threshold"], strict=True)]


ALL_KEYS = ("policy_state", "threshold", "clipped", "params", "opt_state")


# --------------------------------------------------------------------------- DDP


def test_ddp_fixed_norm_matches_clip_grad_norm(launch: tuple) -> None:
    runs = _ranks(launch, "ddp_fixed")
    ref = h.reference_clip_run("fixed")
    # The threshold really bites at some steps and not at others.
    assert 0 < sum(_clipped_steps(ref)) < h.CLIP_STEPS
    _assert_ranks_identical(runs, ALL_KEYS)
    for rank, run in enumerate(runs):
        assert run["strategy"] == "DDPStrategy"
        assert not any(run["params_are_dtensors"])
        assert run["threshold"] == [h.FIXED_MAX_NORM] * h.CLIP_STEPS
        assert run["skipped_steps"] == 0
        _assert_matches_reference(run, ref, f"rank {rank}")


@pytest.mark.parametrize("policy", ["zclip", "autoclip", "guard"])
def test_ddp_adaptive_policy_decides_together(launch: tuple, policy: str) -> None:
    runs = _ranks(launch, f"ddp_{policy}")
    # Thresholds, clip decisions, policy state and parameters: identical on both ranks.
    _assert_ranks_identical(runs, ALL_KEYS)
    ref = h.reference_clip_run(policy)
    clipped = _clipped_steps(ref)
    assert any(clipped) and not all(clipped)
    if policy == "zclip":  # warm-up only collects; the loss spike at step 5 is clipped
        assert ref["threshold"][: h.ZCLIP_ARGS["warmup_steps"]] == [math.inf] * 3
        assert all(clipped[step] for step in h.CLIP_LOSS_SCALES)
    for rank, run in enumerate(runs):
        assert run["skipped_steps"] == 0
        assert run["threshold"] == pytest.approx(ref["threshold"], rel=1e-5), f"rank {rank}"
        _assert_matches_reference(run, ref, f"rank {rank}")


# --------------------------------------------------------------------------- FSDP2


@pytest.mark.parametrize("policy", ["fixed", "agc", "guard"])
def test_fsdp2_clipped_shards_match_unsharded_reference(launch: tuple, policy: str) -> None:
    runs = _ranks(launch, f"fsdp_{policy}")
    rank0, rank1 = runs
    for run in runs:
        assert run["strategy"] == "ModelParallelStrategy"
        assert all(run["params_are_dtensors"])
        assert run["skipped_steps"] == 0
    # Really sharded, unevenly: 3 + 2 rows of Linear(7, 5), 2 + 1 of the 3-element bias
    # (AGC's sharded-vector path), and empty shards of the one-row last layer on rank 1.
    assert rank0["local_shapes"]["0.weight"] == [3, 7]
    assert rank1["local_shapes"]["0.weight"] == [2, 7]
    assert rank0["local_shapes"]["2.bias"] == [2]
    assert rank1["local_shapes"]["2.bias"] == [1]
    assert rank1["local_shapes"]["4.weight"] == [0, 3]
    assert rank1["local_shapes"]["4.bias"] == [0]
    _assert_ranks_identical(runs, ALL_KEYS)
    ref = h.reference_clip_run(policy)
    if policy in ("fixed", "guard"):
        assert 0 < sum(_clipped_steps(ref)) < h.CLIP_STEPS
    for rank, run in enumerate(runs):
        if policy == "guard":  # its weight rule reads the norm of every shard, reduced
            assert run["threshold"] == pytest.approx(ref["threshold"], rel=1e-5), f"rank {rank}"
        _assert_matches_reference(run, ref, f"rank {rank}")


def test_reference_agc_clips_some_units_only() -> None:
    """The AGC setting is one where some units (rows and biases) clip and others do not."""
    net = h.make_net()
    x, y = h.make_clip_dataset()[h.clip_global_indices(0)]
    h.clip_loss(net(x), y, 0).backward()
    before = [p.grad.clone() for p in net.parameters()]
    h.reference_agc_(list(net.parameters()), h.AGC_CLIPPING, h.AGC_EPS)
    changed = []
    for old, p in zip(before, net.parameters()):
        units = [(old, p.grad)] if p.dim() <= 1 else list(zip(old, p.grad))
        changed += [not torch.equal(a, b) for a, b in units]
    assert any(changed) and not all(changed)


# --------------------------------------------------------------------------- one-rank fault


def test_nan_on_one_rank_skips_the_step_on_both(launch: tuple) -> None:
    runs = _ranks(launch, "fault_zclip")
    k = h.FAULT_STEP
    for rank, run in enumerate(runs):
        assert run["skipped_steps"] == 1, f"rank {rank}"
        # Step k changed nothing: parameters and Adam's state (moments and step count)
        # are bit-identical to the end of step k - 1 ...
        assert run["params"][k] == run["params"][k - 1], f"rank {rank}"
        assert run["opt_state"][k] == run["opt_state"][k - 1], f"rank {rank}"
        # ... and every other step did update.
        for step in range(1, h.CLIP_STEPS):
            if step != k:
                assert run["params"][step] != run["params"][step - 1], f"rank {rank} {step}"
    # Both ranks decided together at every step, the policy's state included (a rank
    # whose own gradients were finite must not fold step k into its statistics), and
    # end with identical parameters.
    _assert_ranks_identical(runs, ("policy_state", "threshold", "params", "opt_state"))
    ref = h.reference_clip_run("zclip", optimizer="adam", skip_steps=(k,))
    assert any(_clipped_steps(ref)[k + 1 :])  # ZClip still clips after the fault
    for rank, run in enumerate(runs):
        _assert_matches_reference(run, ref, f"rank {rank}", skip_steps=(k,))
    # Neither rank hung, and the launch ended cleanly.
    _, error = launch
    assert error is None, str(error)

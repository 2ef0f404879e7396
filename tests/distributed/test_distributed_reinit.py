"""Re-initialization callbacks in real 2-process CPU (gloo) runs: every rank changes alike.

One launch of ``tests/workers/reinit_run.py`` (two processes, started here) runs every
scenario, one ``Trainer.fit`` each, and writes what each rank saw to JSON. Each rank
seeds its global RNG differently after building the model, so only draws from the
callbacks' seeded generators (or a broadcast) can leave the ranks identical. The
references are plain torch: the ranks' own forward passes (which units were positive,
per step and rank), and ``torch.nn.init`` with a generator seeded from ``seed`` and the
global step as the callbacks document.
"""

from __future__ import annotations

from typing import Any

import distributed_helpers as h
import pytest
import torch
from torch import nn

pytestmark = pytest.mark.distributed  # conftest.py: also slow, skipped without gloo

LAUNCH_TIMEOUT = 150.0  # seconds for the whole launch; a collective mismatch hangs


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> h.Launch:
    return h.launch_scenarios(
        "reinit_run.py", tmp_path_factory.mktemp("reinit_runs"), LAUNCH_TIMEOUT
    )


def _read(launch: h.Launch, scenario: str) -> list[dict[str, Any]]:
    return h.read_ranks(launch, scenario)


def _ranks(launch: h.Launch, scenario: str, steps: int) -> list[dict[str, Any]]:
    runs = _read(launch, scenario)
    for rank, run in enumerate(runs):
        assert run["global_rank"] == rank
        assert run["world_size"] == h.WORLD_SIZE
        assert run["backend"] == "gloo"
        assert run["strategy"] == "DDPStrategy"
        assert run["global_step"] == steps
    return runs


def _generator(step: int, offset: int) -> torch.Generator:
    return torch.Generator().manual_seed(h.REINIT_SEED * 1_000_003 + step * 131 + offset)


def _dead(runs: list[dict[str, Any]], relu: str, steps: tuple[int, ...], ranks: tuple[int, ...]):
    """Units never positive in our own forward passes over these steps and ranks."""
    alive = [runs[r]["alive"][s][relu] for r in ranks for s in steps]
    return torch.tensor(alive).any(0).logical_not()


def _t(values: list[float], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


def test_recycling_is_decided_together_and_leaves_the_ranks_identical(launch: tuple) -> None:
    rank0, rank1 = runs = _ranks(launch, "recycle", h.DEAD_STEPS)
    for rank, run in enumerate(runs):
        expected = [h.dead_rank_indices(rank, step) for step in range(h.DEAD_STEPS)]
        assert run["batch_indices"] == expected, f"rank {rank} saw other batches"
    first = h.DEAD_WINDOWS[0]
    # Our construction: net.0's unit 3 and net.2's unit 1 are dead on both ranks' data;
    # net.0's unit 1 fires on rank 0's samples only, unit 2 on rank 1's only.
    dead_1 = _dead(runs, "net.1", first, (0, 1))
    dead_3 = _dead(runs, "net.3", first, (0, 1))
    assert dead_1.tolist() == [False, False, False, True]
    assert dead_3.tolist() == [False, True, False]
    assert _dead(runs, "net.1", first, (0,)).tolist() == [False, False, True, True]
    assert _dead(runs, "net.1", first, (1,)).tolist() == [False, True, False, True]
    # Logged on rank 0 only, from the reduced statistics: 1 unit each, not the 2 of a
    # per-rank decision.
    assert rank1["calls"] == []
    second = h.DEAD_WINDOWS[1]
    expected_calls = [
        [h.DEAD_LOG_STEPS[0], {"recycled_units/net.0": 1.0, "recycled_units/net.2": 1.0}],
        [
            h.DEAD_LOG_STEPS[1],
            {
                "recycled_units/net.0": float(_dead(runs, "net.1", second, (0, 1)).sum()),
                "recycled_units/net.2": float(_dead(runs, "net.3", second, (0, 1)).sum()),
            },
        ],
    ]
    assert rank0["calls"] == expected_calls
    assert rank0["events"] == rank1["events"]
    assert [(e["step"], e["layer"]) for e in rank0["events"]] == [(2, "net.0"), (2, "net.2")]
    # Bit-identical parameters and Adam state on both ranks, right after the recycling
    # and at the end.
    assert rank0["after"] == rank1["after"]
    assert rank0["params_end"] == rank1["params_end"]
    assert rank0["state_end"] == rank1["state_end"]
    before, after = rank0["before"], rank0["after"]
    w_before = _t(before["params"]["net.0.weight"], (4, 6))
    w_after = _t(after["params"]["net.0.weight"], (4, 6))
    fresh = torch.empty(4, 6)
    nn.init.kaiming_normal_(fresh, nonlinearity="relu", generator=_generator(2, 0))
    assert torch.equal(w_after[3], fresh[3])  # the new row: He-normal from the seeded draw
    assert torch.equal(w_after[:3], w_before[:3])  # units dead on one rank only: untouched
    b_after = after["params"]["net.0.bias"]
    assert b_after[3] == 0.0 and b_after[:3] == before["params"]["net.0.bias"][:3]
    consumer_before = _t(before["params"]["net.2.weight"], (3, 4))
    consumer_after = _t(after["params"]["net.2.weight"], (3, 4))
    # Outgoing weights of net.0's unit 3 zeroed; net.2's row 1 was recycled itself (the
    # net.2 → net.4 pair, after the net.0 → net.2 one): a fresh row, all inputs.
    rows = torch.tensor([0, 2])
    assert torch.equal(consumer_after[rows, 3], torch.zeros(2))
    assert torch.equal(consumer_after[rows, :3], consumer_before[rows, :3])
    fresh = torch.empty(3, 4)
    nn.init.kaiming_normal_(fresh, nonlinearity="relu", generator=_generator(2, 1))
    assert torch.equal(consumer_after[1], fresh[1])
    assert after["params"]["net.4.weight"][1] == 0.0
    for key in ("exp_avg", "exp_avg_sq"):
        moments_before = _t(before["state"]["net.0.weight"][key], (4, 6))
        moments_after = _t(after["state"]["net.0.weight"][key], (4, 6))
        assert moments_before[3].abs().sum() > 0  # weight decay made them non-zero
        assert torch.equal(moments_after[3], torch.zeros(6))
        assert torch.equal(moments_after[:3], moments_before[:3])
    assert after["state"]["net.0.weight"]["step"] == before["state"]["net.0.weight"]["step"]


def test_scheduled_layer_reinit_leaves_the_ranks_identical(launch: tuple) -> None:
    rank0, rank1 = runs = _ranks(launch, "layer_reinit", h.STEPS)
    for rank, run in enumerate(runs):
        expected = [h.rank_indices(rank, step) for step in range(h.STEPS)]
        assert run["batch_indices"] == expected, f"rank {rank} saw other batches"
    assert rank0["after"] == rank1["after"]
    assert rank0["params_end"] == rank1["params_end"]
    assert rank0["state_end"] == rank1["state_end"]
    assert rank0["events"] == rank1["events"]
    step = h.REINIT_AT_STEP
    assert [(e["step"], e["layer"], e["detail"]) for e in rank0["events"]] == [
        (step, layer, "schedule") for layer in h.REINIT_LAYERS
    ]
    net = h.make_net()
    after, before = rank0["after"], rank0["before"]
    # net.0 feeds a Tanh, net.4 is the output (linear gain)
    for offset, (layer, nonlinearity) in enumerate(zip(h.REINIT_LAYERS, ("tanh", "linear"))):
        weight = torch.empty_like(net.get_submodule(layer.removeprefix("net.")).weight)
        nn.init.kaiming_normal_(
            weight,
            nonlinearity=nonlinearity,  # type: ignore[arg-type]
            generator=_generator(step, offset),
        )
        assert after["params"][f"{layer}.weight"] == weight.double().flatten().tolist()
        assert after["params"][f"{layer}.bias"] == [0.0] * weight.shape[0]
        for kind in ("weight", "bias"):
            state = after["state"][f"{layer}.{kind}"]
            assert all(v == 0.0 for values in state.values() for v in values)  # step too
    assert after["params"]["net.2.weight"] == before["params"]["net.2.weight"]
    assert after["state"]["net.2.weight"] == before["state"]["net.2.weight"]
    assert after["params"]["net.0.weight"] != before["params"]["net.0.weight"]


def test_lsuv_weights_are_rank_zeros_on_every_rank(launch: tuple) -> None:
    rank0, rank1 = _ranks(launch, "lsuv", 1)
    # The ranks measured different first batches; training starts from the same weights,
    # not from the module's initial ones.
    assert h.rank_indices(0, 0) != h.rank_indices(1, 0)
    assert rank0["at_train_start"] == rank1["at_train_start"]
    assert rank0["at_train_start"] != h.flat(list(h.make_net().parameters()))
    # Those are rank 0's: unit output std on rank 0's first batch (our own forward).
    net = h.make_net()
    with torch.no_grad():
        offset = 0
        for p in net.parameters():
            p.copy_(torch.tensor(rank0["at_train_start"][offset : offset + p.numel()]).view_as(p))
            offset += p.numel()
        x = h.make_dataset().tensors[0][h.rank_indices(0, 0)]
        stds = {}
        for index, module in enumerate(net):
            x = module(x)
            if isinstance(module, nn.Linear):
                stds[f"net.{index}"] = float(x.std())
    converged = [name for name in stds if name not in rank0["not_converged"]]
    assert converged, rank0["not_converged"]
    for name in converged:
        assert abs(stds[name] - 1.0) < 0.1, (name, stds[name])


def test_sharded_parameters_are_refused(launch: tuple) -> None:
    rank0, rank1 = _read(launch, "fsdp")
    assert rank0 == rank1
    assert rank0["params_are_dtensors"] == [True] * 6  # FSDP2 really sharded the model
    refusals = rank0["refusals"]
    for name in ("UnitRecycler", "LayerReinit", "InitAtStart"):
        message = refusals[name]
        assert message.startswith(f"{name} does not support sharded (FSDP2"), message
        assert "Use DDP" in message
        assert refusals[f"{name}.batches"] == "0"  # refused before training
    assert "does not support sharded (FSDP2 / DTensor)" in refusals["recycle_units_"]
    _, error = launch
    assert error is None, str(error)

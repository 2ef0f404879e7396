"""No device-to-host sync on non-logging steps; one transfer on logging steps.

Two counters, as DESIGN.md explains: a ``TorchFunctionMode`` sees ``item``,
``__bool__``, ``tolist``, ``cpu``, ``numpy`` ... in ordinary code but not inside
autograd hooks; a ``TorchDispatchMode`` counting ``aten._local_scalar_dense``
reaches into hooks. Both are compared against the bare run.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from helpers import (
    CaptureLogger,
    CountSyncsPerBatch,
    DispatchSyncCounter,
    SyncCounter,
    TinyMLP,
    quiet_trainer_kwargs,
)

from lightning_gradguard import AdaptiveGradClip, GradNormMonitor


def _counts(
    extra_callbacks: list, steps: int = 8, **trainer_kwargs: Any
) -> list[tuple[Counter[str], int]]:
    torch.manual_seed(0)
    counter = CountSyncsPerBatch()
    kwargs = quiet_trainer_kwargs(max_steps=steps, **trainer_kwargs)
    # The counter is first: its batch-end hook closes the window before the monitor's.
    pl.Trainer(logger=CaptureLogger(), callbacks=[counter, *extra_callbacks], **kwargs).fit(
        TinyMLP()
    )
    return counter.per_batch


def test_counters_do_see_a_sync() -> None:
    # Guard against a counter that can never fire.
    function, dispatch = SyncCounter(), DispatchSyncCounter()
    with function, dispatch:
        x = torch.ones(3)
        x.sum().item()
        bool(x.any())
    assert function.counts["item"] == 1 and function.counts["__bool__"] == 1
    assert dispatch.count == 2


def test_no_sync_on_non_logging_steps_and_one_transfer_when_logging() -> None:
    bare = _counts([])
    monitored = _counts([GradNormMonitor(log_every_n_steps=4)])
    assert len(bare) == len(monitored) == 8
    for step, ((bare_calls, bare_dispatch), (calls, dispatch)) in enumerate(zip(bare, monitored)):
        extra = calls - bare_calls
        if step % 4 == 0:  # a logging step: exactly one transfer (cat(...).cpu().tolist())
            assert extra == Counter({"cpu": 1, "tolist": 1}), (step, extra)
        else:
            assert extra == Counter(), (step, extra)
        assert dispatch == bare_dispatch, (step, dispatch, bare_dispatch)


def test_no_sync_with_clipping_and_accumulation() -> None:
    kwargs = {"gradient_clip_val": 0.5, "accumulate_grad_batches": 2}
    bare = _counts([], steps=4, **kwargs)
    monitored = _counts([GradNormMonitor(log_every_n_steps=100)], steps=4, **kwargs)
    # Batches 2.. (optimizer steps 1..3) log nothing: no extra sync at all.
    for (bare_calls, bare_dispatch), (calls, dispatch) in list(zip(bare, monitored))[2:]:
        assert calls - bare_calls == Counter()
        assert dispatch == bare_dispatch


@pytest.mark.parametrize(
    "policy", ["norm", "value", "agc", "autoclip", "zclip", "ema_ratio", "guard"]
)
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_clipping_without_skipping_never_syncs(policy: str, scope: str) -> None:
    bare = _counts([], steps=4)
    clipper = AdaptiveGradClip(
        policy=policy, scope=scope, skip_nonfinite=False, log_every_n_steps=100
    )
    clipped = _counts([clipper], steps=4)
    for (bare_calls, bare_dispatch), (calls, dispatch) in list(zip(bare, clipped))[1:]:
        assert calls - bare_calls == Counter()
        assert dispatch == bare_dispatch


@pytest.mark.parametrize("policy", ["zclip", "autoclip", "agc", "value", "none", "guard"])
def test_skipping_costs_one_flag_read_per_step(policy: str) -> None:
    # The skip flags and which clipping passes have work to do travel in one ``tolist``
    # (a copy to the host on a GPU; on the CPU it reads memory without a dispatched op).
    bare = _counts([], steps=4)
    clipper = AdaptiveGradClip(policy=policy, skip_spikes=True, log_every_n_steps=100)
    clipped = _counts([clipper], steps=4)
    for (bare_calls, bare_dispatch), (calls, dispatch) in list(zip(bare, clipped))[1:]:
        assert calls - bare_calls == Counter({"tolist": 1})
        assert dispatch == bare_dispatch

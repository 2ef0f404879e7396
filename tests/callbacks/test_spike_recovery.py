"""``SpikeRecovery`` in real Lightning runs on one process.

The references are independent: a plain-torch training loop over the same batches
with the rolled-back ones left out (what a person restarting from the last good
state and excluding those batches would get), state copied by a recording callback
with ``state_dict()``, and checkpoints read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from helpers import CaptureLogger, classification_data, quiet_trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader

from lightning_gradguard import AdaptiveGradClip, GradGuard, GradNormMonitor, SpikeRecovery
from lightning_gradguard.functional import RunningSpikeTest, StateSnapshot, ZClip
from lightning_gradguard.record import run_record

BATCH = 16
SAMPLES = 256  # 16 batches per epoch
FAST = {"every_n_steps": 5, "warmup": 4, "window": 8}


def poison(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A corrupted batch: inputs scaled x100, labels shifted (a loss spike)."""
    return x * 100.0, (y + 1) % 4


class PoisonMLP(pl.LightningModule):
    """An MLP trained with Adam; the batches in ``poisoned`` (epoch, batch_idx) are corrupted."""

    def __init__(self, poisoned: set[tuple[int, int]] = frozenset(), lr: float = 0.01) -> None:  # type: ignore[assignment]
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        self.poisoned = set(poisoned)
        self.lr = lr
        self.data = classification_data(n=SAMPLES, features=16, classes=4)
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if (self.current_epoch, batch_idx) in self.poisoned:
            x, y = poison(x, y)
        loss = nn.functional.cross_entropy(self.net(x), y)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=BATCH)


def reference_run(
    batches: list[tuple[int, int]], lr: float = 0.01
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Plain torch: the same model trained on ``batches`` (epoch, batch_idx), in order."""
    module = PoisonMLP(lr=lr)
    net = module.net
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    x_all, y_all = module.data.tensors
    for _, index in batches:
        x = x_all[index * BATCH : (index + 1) * BATCH]
        y = y_all[index * BATCH : (index + 1) * BATCH]
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    return net, optimizer


def assert_same_state(module: PoisonMLP, net: nn.Module, lightning_opt: Any, opt: Any) -> None:
    for (name, a), b in zip(module.net.named_parameters(), net.parameters()):
        assert torch.equal(a, b), name
    left, right = lightning_opt.state_dict()["state"], opt.state_dict()["state"]
    assert left.keys() == right.keys()
    for key in left:
        for field in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(left[key][field], right[key][field]), (key, field)


class StateRecorder(pl.Callback):
    """Listed after SpikeRecovery: a copy of model and optimizer state after every batch."""

    def __init__(self) -> None:
        self.states: list[tuple[int, dict[str, Any], dict[str, Any]]] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self.states.append(
            (
                trainer.global_step,
                copy.deepcopy(pl_module.state_dict()),
                copy.deepcopy(trainer.optimizers[0].state_dict()),
            )
        )


def fit(module: PoisonMLP, callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    options = quiet_trainer_kwargs(max_epochs=1, **kwargs)
    trainer = pl.Trainer(logger=CaptureLogger(), callbacks=callbacks, **options)
    trainer.fit(module)
    return trainer


# ---------------------------------------------------------------- functional pieces


def test_running_spike_test_matches_lightning_rule_by_hand() -> None:
    values = [2.0, 2.2, 1.8, 2.1]
    test = RunningSpikeTest("ratio", "min", window=4, warmup=4, atol=0.5, rtol=0.5)
    for v in values:
        assert not bool(test.is_spike(torch.tensor(100.0)))  # still warming up
        test.record(torch.tensor(v), torch.tensor(True))
    mean = sum(values) / 4  # 2.025: a spike needs value - mean >= max(0.5, 0.5 * mean)
    assert not bool(test.is_spike(torch.tensor(mean + 0.5 * mean - 1e-6)))
    assert bool(test.is_spike(torch.tensor(mean + 0.5 * mean + 1e-6)))
    assert not bool(test.is_spike(torch.tensor(float("nan"))))
    z = RunningSpikeTest("zscore", "max", window=4, warmup=4, sigma=2.0)
    for v in values:
        z.record(torch.tensor(v), torch.tensor(True))
    std = (sum((v - mean) ** 2 for v in values) / 4) ** 0.5
    assert bool(z.is_spike(torch.tensor(mean - 2 * std - 1e-6)))  # "max": lower is worse
    assert not bool(z.is_spike(torch.tensor(mean - 2 * std + 1e-6)))
    assert not bool(z.is_spike(torch.tensor(100.0)))


def test_gradient_signal_against_the_policy_level_or_the_own_running_mean() -> None:
    recovery = SpikeRecovery(signals=["grad_norm"], grad_factor=5.0, warmup=2, window=4)
    for norm in (1.0, 3.0):  # the own running mean becomes 2.0
        flags = recovery.spike_flag(None, torch.tensor(norm), None)
        recovery.receive_flags(flags.tolist())
    level = torch.tensor(0.5, dtype=torch.float64)
    # [any, nonfinite, loss, grad_norm]: against the policy's level (5 x 0.5 = 2.5) ...
    assert recovery.spike_flag(None, torch.tensor(2.6), level).tolist() == [
        True,
        False,
        False,
        True,
    ]
    assert recovery.spike_flag(None, torch.tensor(2.4), level).tolist() == [False] * 4
    # ... and against the own mean (5 x 2.0 = 10) while the policy warms up (NaN) or has none.
    for missing in (torch.tensor(float("nan")), None):
        assert recovery.spike_flag(None, torch.tensor(9.9), missing).tolist()[3] is False
        assert recovery.spike_flag(None, torch.tensor(10.1), missing).tolist()[3] is True
    # ZClip's level is its EMA mean once its warm-up is over (the authors' update rule).
    zclip = ZClip(warmup_steps=2, alpha=0.5)
    zclip.threshold(torch.tensor(1.0))
    assert torch.isnan(zclip.typical_norm())
    zclip.threshold(torch.tensor(3.0))
    assert float(zclip.typical_norm()) == 2.0
    zclip.threshold(torch.tensor(2.5))  # no spike: mean <- 0.5 * 2 + 0.5 * 2.5
    assert float(zclip.typical_norm()) == 2.25


def test_state_snapshot_restores_bit_identical_and_drops_newer_optimizer_state() -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    snapshot = StateSnapshot()
    snapshot.take(net, [optimizer], step=0)  # before the first step: no optimizer state
    start = copy.deepcopy(net.state_dict())
    for _ in range(3):
        optimizer.zero_grad()
        net(torch.randn(8, 4)).pow(2).sum().backward()
        optimizer.step()
    snapshot.restore(net, [optimizer])
    assert optimizer.state_dict()["state"] == {}
    for key, value in net.state_dict().items():  # running stats included
        assert torch.equal(value, start[key]), key
    snapshot.take(net, [optimizer], step=3)
    assert snapshot.nbytes == sum(t.numel() * t.element_size() for t in start.values())


# ---------------------------------------------------------------- one process


def test_rollback_equals_a_run_without_the_rolled_back_batches() -> None:
    module = PoisonMLP(poisoned={(0, 12)})
    recovery = SpikeRecovery(signals=["loss"], **FAST)
    recorder = StateRecorder()
    trainer = fit(module, [recovery, recorder])
    # Snapshots at steps 0, 5, 10: the spike at step 12 rolls back batches 10, 11 and 12.
    assert recovery.rollbacks == [
        {"step": 13, "to_step": 10, "signals": ["loss"], "batches": [[0, 10], [0, 11], [0, 12]]}
    ]
    assert trainer.global_step == 16  # steps taken are counted; the loader went on
    # Right after the rollback the state is the one after batch 9, bit for bit.
    _, after_rollback, opt_after = recorder.states[12]
    _, snapshot_state, opt_snapshot = recorder.states[9]
    for key, value in snapshot_state.items():
        assert torch.equal(after_rollback[key], value), key
    assert opt_after["state"].keys() == opt_snapshot["state"].keys()
    for index, fields in opt_snapshot["state"].items():
        for field, value in fields.items():
            assert torch.equal(opt_after["state"][index][field], value), (index, field)
    # The whole run equals plain torch over batches 0-9 and 13-15.
    net, optimizer = reference_run([(0, i) for i in [*range(10), 13, 14, 15]])
    assert_same_state(module, net, trainer.optimizers[0], optimizer)


def test_no_spike_means_no_change() -> None:
    module = PoisonMLP()
    recovery = SpikeRecovery(**FAST)
    trainer = fit(module, [GradNormMonitor(log_every_n_steps=4), recovery])
    assert recovery.rollbacks == []
    net, optimizer = reference_run([(0, i) for i in range(16)])
    assert_same_state(module, net, trainer.optimizers[0], optimizer)


def test_gradguard_part_with_the_clipper_flags_and_the_run_record(tmp_path: Path) -> None:
    module = PoisonMLP(poisoned={(0, 12), (0, 13)})
    guard = GradGuard(
        clip=ZClip(warmup_steps=5, max_grad_norm=None),
        dead_units=False,
        report_args={"out_dir": str(tmp_path)},
        spike_recovery=True,
        spike_recovery_args={"signals": ["grad_norm"], "consecutive": 2, **FAST},
    )
    assert guard.recovery is not None and guard.recovery in guard.gradguard_parts
    logger = CaptureLogger()
    options = quiet_trainer_kwargs(max_epochs=1, default_root_dir=str(tmp_path))
    trainer = pl.Trainer(logger=logger, callbacks=[guard], **options)
    trainer.fit(module)
    recovery = guard.recovery
    assert recovery._via_clipper  # the flag went through the clipper's one read
    # ZClip's running mean is the reference: the x100 inputs' norm is far above 5x it;
    # two spiking steps in a row (12, 13) roll back to the snapshot at step 10.
    assert [(r["step"], r["to_step"], r["signals"]) for r in recovery.rollbacks] == [
        (14, 10, ["grad_norm"])
    ]
    assert recovery.skipped_batches == 4
    events = run_record(trainer).events_of("rollback")
    assert [e.step for e in events] == [13] and "steps 10-13" in events[0].detail
    assert events[0].values == {"to_step": 10.0, "batches": 4.0}
    summary = guard.health_report.summary(trainer)  # type: ignore[union-attr]
    assert summary["gradguard/rollbacks"] == 1
    assert summary["gradguard/rollback_skipped_batches"] == 4
    assert logger.by_key("spike/rollbacks")["spike/rollbacks"] == [(14, 1.0)]
    assert (tmp_path / "clipping.png").exists()


def test_max_rollbacks_stops_the_run_with_steps_and_signals() -> None:
    module = PoisonMLP(poisoned={(0, i) for i in range(9, 16)})
    recovery = SpikeRecovery(signals=["loss", "nonfinite"], max_rollbacks=2, **FAST)
    with pytest.raises(RuntimeError, match="max_rollbacks=2") as error:
        fit(module, [recovery])
    message = str(error.value)
    assert "step 9 (loss) -> state of step 5" in message
    assert "cooldown_steps=0" in message


def test_rollback_window_limit_and_cooldown_ramp() -> None:
    seen: list[float] = []

    class LrProbe(pl.Callback):
        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            seen.append(optimizer.param_groups[0]["lr"])

    recovery = SpikeRecovery(
        signals=["loss"],
        cooldown_steps=4,
        cooldown_factor=0.2,
        max_rollbacks_in_window=1,
        rollback_window=3,
        **FAST,
    )
    scheduler_lrs: list[float] = []

    class WithScheduler(PoisonMLP):
        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
            scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
            }

        def on_train_batch_end(self, *args: Any) -> None:
            scheduler_lrs.append(self.trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0])

    module = WithScheduler(poisoned={(0, 7), (0, 12)})
    trainer = fit(module, [recovery, LrProbe()], max_steps=16)
    assert [r["step"] for r in recovery.rollbacks] == [8, 13]  # 5 steps apart: allowed
    # The scheduler (per step, gamma 0.9) is in charge; the cool-down multiplies on top
    # for 4 steps (0.2, 0.4, 0.6, 0.8) and the scheduler never sees it.
    lrs = [0.01 * 0.9**k for k in range(16)]
    factors = [1.0] * 16
    for start in (8, 13):
        for i, f in enumerate((0.2, 0.4, 0.6, 0.8)):
            if start + i < 16:
                factors[start + i] = f
    assert seen == pytest.approx([lr * f for lr, f in zip(lrs, factors)], rel=1e-12)
    assert scheduler_lrs == pytest.approx([0.01 * 0.9 ** (k + 1) for k in range(16)], rel=1e-12)
    assert trainer.global_step == 16
    module = PoisonMLP(poisoned={(0, 7), (0, 9)})
    narrow = SpikeRecovery(signals=["loss"], max_rollbacks_in_window=1, rollback_window=3, **FAST)
    with pytest.raises(RuntimeError, match="max_rollbacks_in_window=1 within 3 steps"):
        fit(module, [narrow])


def test_gradient_accumulation_snapshots_between_optimizer_steps_only() -> None:
    module = PoisonMLP(poisoned={(0, 13)})
    recovery = SpikeRecovery(signals=["loss"], every_n_steps=2, warmup=2, window=4)
    snapshots: list[tuple[int, int]] = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            batch_idx = args[-1]
            snapshot = recovery._snapshots[-1]
            if not snapshots or snapshots[-1][1] != snapshot.step:
                snapshots.append((batch_idx, snapshot.step))
                state = dict(zip(snapshot._host, snapshot._host.values()))
                for name, value in pl_module.named_parameters():
                    assert torch.equal(state[f"param/{name}"], value.detach()), name

    trainer = fit(module, [recovery, Watch()], accumulate_grad_batches=2)
    # Every snapshot ends an accumulation window (odd batch index), never inside one.
    taken = [(b, s) for b, s in snapshots if s > 0]
    assert taken and all(b % 2 == 1 and s == (b + 1) // 2 for b, s in taken)
    # Batch 13 (second half of step 6) spikes: back to step 6's state; batches 12, 13 skipped.
    assert recovery.rollbacks[0]["to_step"] == 6
    assert recovery.rollbacks[0]["batches"] == [[0, 12], [0, 13]]
    assert trainer.global_step == 8


def test_manual_optimization_is_a_clear_error() -> None:
    class Manual(PoisonMLP):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> None:
            optimizer = self.optimizers()
            loss = super().training_step(batch, batch_idx)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()

    with pytest.raises(RuntimeError, match=r"needs automatic optimization.*StateSnapshot"):
        fit(Manual(), [SpikeRecovery()])


def test_bf16_mixed_rollback_is_bit_identical() -> None:
    module = PoisonMLP(poisoned={(0, 12)})
    recovery = SpikeRecovery(signals=["loss"], **FAST)
    recorder = StateRecorder()
    fit(module, [recovery, recorder], precision="bf16-mixed")
    assert [r["to_step"] for r in recovery.rollbacks] == [10]
    _, after, _ = recorder.states[12]
    _, before, _ = recorder.states[9]
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_fp16_grad_scaler_state_is_rolled_back() -> None:
    from pytorch_lightning.plugins.precision import MixedPrecision

    # Lightning's "16-mixed" on the CPU has no GradScaler; give it torch's real one.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    module = PoisonMLP(poisoned={(0, 12)})
    recovery = SpikeRecovery(signals=["loss"], **FAST)
    scales: list[float] = []

    class ScaleProbe(pl.Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            scales.append(float(trainer.strategy.precision_plugin.scaler.get_scale()))

    fit(module, [recovery, ScaleProbe()], plugins=[plugin])
    assert [r["to_step"] for r in recovery.rollbacks] == [10]
    # The loss test saw the unscaled loss (else every step would look like a spike).
    assert len(recovery.rollbacks) == 1
    # The scale grows every 2 finite steps (it did between the snapshot and the spike);
    # after the rollback it is the scale of step 10 again.
    assert scales[11] != scales[9]
    assert scales[12] == scales[9]


def test_checkpoint_resume_after_a_rollback_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    # One rollback before the checkpoint (end of epoch 0, step 16), one after the resume
    # (step 17) to the snapshot the checkpoint carried: the state of step 10 (its age
    # counts from the first rollback, step 13, so the next snapshot is due at step 18).
    poisoned = {(0, 12), (1, 1)}
    args = {"signals": ["loss"], **FAST}

    def run(
        root: Path, resume: str | None = None, epochs: int = 2
    ) -> tuple[PoisonMLP, pl.Trainer, SpikeRecovery]:
        module = PoisonMLP(poisoned=poisoned)
        recovery = SpikeRecovery(**args)
        checkpoint = pl.callbacks.ModelCheckpoint(
            dirpath=root, save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True
        )
        options = quiet_trainer_kwargs(
            max_epochs=epochs, enable_checkpointing=True, default_root_dir=str(root)
        )
        trainer = pl.Trainer(logger=False, callbacks=[recovery, checkpoint], **options)
        trainer.fit(module, ckpt_path=resume)
        return module, trainer, recovery

    whole, whole_trainer, whole_recovery = run(tmp_path / "whole")
    run(tmp_path / "first", epochs=1)
    saved = next((tmp_path / "first").glob("*.ckpt"))
    state = torch.load(saved, weights_only=True)  # plain tensors and primitives only
    assert any("SpikeRecovery" in key for key in state["callbacks"])
    resumed, resumed_trainer, resumed_recovery = run(tmp_path / "resumed", resume=str(saved))
    assert [(r["step"], r["to_step"]) for r in whole_recovery.rollbacks] == [(13, 10), (18, 10)]
    assert resumed_recovery.rollbacks == whole_recovery.rollbacks
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    left = whole_trainer.optimizers[0].state_dict()["state"]
    right = resumed_trainer.optimizers[0].state_dict()["state"]
    for key in left:
        for field in left[key]:
            assert torch.equal(left[key][field], right[key][field])


def test_a_checkpoint_due_inside_a_spike_streak_waits_for_the_decision(tmp_path: Path) -> None:
    module = PoisonMLP(poisoned={(0, 11), (0, 12)})
    recovery = SpikeRecovery(signals=["loss"], consecutive=2, **FAST)
    saved_at: list[tuple[int, bool]] = []

    class Probe(pl.Callback):
        def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: Any) -> None:
            snapshot = recovery._snapshots[0]
            state = dict(zip(snapshot._host, snapshot._host.values()))
            same = all(
                torch.equal(state[f"param/{n}"], p.detach())
                for n, p in pl_module.named_parameters()
            )
            saved_at.append((trainer.global_step, same))

    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=12, save_top_k=-1
    )
    options = quiet_trainer_kwargs(max_epochs=1, enable_checkpointing=True)
    pl.Trainer(logger=False, callbacks=[recovery, Probe(), checkpoint], **options).fit(module)
    assert [r["step"] for r in recovery.rollbacks] == [13]
    # Due after step 11 (a spiking step, streak open): written after the rollback at 12,
    # holding the restored state, never the post-spike one.
    assert saved_at[0] == (13, True)


def _counts_with_batch_end(extra: list[Any], steps: int = 8) -> list[tuple[Counter[str], int]]:
    """Sync counts per batch, with the counter listed *last*: the window also covers the
    other callbacks' ``on_train_batch_end`` (where snapshots are taken)."""
    from helpers import CountSyncsPerBatch, TinyMLP

    torch.manual_seed(0)
    counter = CountSyncsPerBatch()
    kwargs = quiet_trainer_kwargs(max_steps=steps)
    pl.Trainer(logger=CaptureLogger(), callbacks=[*extra, counter], **kwargs).fit(TinyMLP())
    return counter.per_batch


def test_host_syncs_one_read_shared_with_the_clipper() -> None:
    def clipper() -> AdaptiveGradClip:
        return AdaptiveGradClip(policy="zclip", log_every_n_steps=100)

    def recovery() -> SpikeRecovery:
        return SpikeRecovery(every_n_steps=3, warmup=2)

    bare = _counts_with_batch_end([])
    both = _counts_with_batch_end([clipper(), recovery()])
    swapped = _counts_with_batch_end([recovery(), clipper()])  # order does not matter
    alone = _counts_with_batch_end([recovery()])
    for step in range(1, 8):  # snapshot steps (3, 6) included: copies, no reads
        assert both[step][0] - bare[step][0] == Counter({"tolist": 1}), step
        assert swapped[step][0] - bare[step][0] == Counter({"tolist": 1}), step
        assert alone[step][0] - bare[step][0] == Counter({"tolist": 1}), step
        assert both[step][1] == alone[step][1] == bare[step][1]


def test_disk_storage_through_checkpoint_io(tmp_path: Path) -> None:
    module = PoisonMLP(poisoned={(0, 12)})
    recovery = SpikeRecovery(signals=["loss"], storage="disk", snapshot_dir=str(tmp_path), **FAST)
    trainer = fit(module, [recovery])
    assert [p.name for p in tmp_path.iterdir()] == ["rank0_slot0.ckpt"]
    net, optimizer = reference_run([(0, i) for i in [*range(10), 13, 14, 15]])
    assert_same_state(module, net, trainer.optimizers[0], optimizer)


def test_min_age_rolls_back_to_an_older_snapshot() -> None:
    module = PoisonMLP(poisoned={(0, 11)})
    recovery = SpikeRecovery(signals=["loss"], min_age=4, **FAST)
    trainer = fit(module, [recovery])
    # Snapshots at 0, 5, 10; at the spike (step 11) the one at 10 is 2 steps old: back to 5.
    assert recovery.rollbacks[0]["to_step"] == 5
    assert len(recovery._snapshots) == 1
    net, optimizer = reference_run([(0, i) for i in [*range(5), 12, 13, 14, 15]])
    assert_same_state(module, net, trainer.optimizers[0], optimizer)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"signals": ["loss", "grad"]}, ValueError, "signals='grad'.*'grad_norm'"),
        ({"signals": "loss"}, TypeError, "signals='loss'"),
        ({"every_n_steps": 0}, ValueError, "every_n_steps=0"),
        ({"statistic": "sigma"}, ValueError, "statistic='sigma'"),
        ({"cooldown_factor": 1.5}, ValueError, "cooldown_factor=1.5"),
        ({"grad_factor": 1.0}, ValueError, "grad_factor=1.0"),
        ({"storage": "gpu"}, ValueError, "storage='gpu'"),
        ({"rtol": -1.0}, ValueError, "rtol=-1.0"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        SpikeRecovery(**kwargs)
    with pytest.raises(error, match="GradGuard\\(spike_recovery_args"):
        GradGuard(spike_recovery=True, spike_recovery_args=kwargs)


def test_rollback_reaches_a_real_offline_wandb_run(tmp_path: Path) -> None:
    from wandb_reader import load_run

    from lightning_gradguard import HealthReport

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            mp.setenv(var, str(tmp_path / var.lower()))
        from pytorch_lightning.loggers import WandbLogger

        logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="gradguard-tests")
        recovery = SpikeRecovery(signals=["loss"], **FAST)
        report = HealthReport(out_dir=str(tmp_path / "pictures"), picture_every_n_steps=None)
        options = quiet_trainer_kwargs(max_epochs=1)
        pl.Trainer(logger=logger, callbacks=[recovery, report], **options).fit(
            PoisonMLP(poisoned={(0, 12)})
        )
        logger.experiment.finish()
        run = load_run(tmp_path)
        import wandb

        wandb.teardown()
    rows = [row for row in run.table("gradguard/events").rows if row[1] == "rollback"]
    assert [row[0] for row in rows] == [12]
    assert "to the state of step 10" in rows[0][3] and "0:10, 0:11, 0:12" in rows[0][3]
    alerts = [a for a in run.alerts if a["title"] == "gradguard: rollback"]
    assert len(alerts) == 1 and alerts[0]["level"] == "WARN"
    assert run.user_summary["gradguard/rollbacks"] == 1
    assert run.user_summary["gradguard/rollback_skipped_batches"] == 3
    assert [v for _, v in run.series("spike/rollbacks", step_key="trainer/global_step")] == [1.0]

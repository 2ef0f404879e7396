"""GradGuard's default clipping (GuardClip): healthy runs untouched, exploding runs rescued.

"Untouched" is measured from the gradients themselves: the raw gradient after
backward against the gradient the optimizer gets, after every callback ran.
"""

from __future__ import annotations

import io
import math
import statistics
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from helpers import quiet_trainer_kwargs
from models import gpt2_loss, resnet_tiny, sequence_batch, tiny_gpt2, transformer_encoder
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_gradguard import GradGuard
from lightning_gradguard.functional import GuardClip, clip_with_policy_

torch.set_num_threads(1)
STEPS = 50


class _Batches(Dataset[Any]):
    """``STEPS`` batches made by ``make(step)``, one per index (batch size 1 of batches)."""

    def __init__(self, make: Any) -> None:
        self.make = make

    def __len__(self) -> int:
        return STEPS

    def __getitem__(self, index: int) -> Any:
        return self.make(index)


def _sequences(step: int, batch: int = 8, length: int = 16) -> Tensor:
    """Arithmetic progressions mod 64: a sequence a language model can learn."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, 64, (batch, 1), generator=g)
    increment = torch.randint(1, 4, (batch, 1), generator=g)
    return (start + increment * torch.arange(length)) % 64


def _images(step: int, batch: int = 32) -> tuple[Tensor, Tensor]:
    """Ten noisy class prototypes (8x8 RGB): a task a ResNet can learn."""
    prototypes = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(1000 + step)
    y = torch.randint(0, 10, (batch,), generator=g)
    return prototypes[y] + 0.5 * torch.randn(batch, 3, 8, 8, generator=g), y


class _Watched(pl.LightningModule):
    """Records the raw gradients after backward and those the optimizer gets."""

    def __init__(self, net: nn.Module, loss: Any, optimizer: Any, make: Any) -> None:
        super().__init__()
        self.net, self.loss, self.optimizer, self.make = net, loss, optimizer, make
        self.raw: list[list[Tensor]] = []
        self.used: list[list[Tensor]] = []
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss: Tensor = self.loss(self.net, batch)
        self.losses.append(float(loss.detach()))
        return loss

    def on_after_backward(self) -> None:
        self.raw.append([p.grad.clone() for p in self.parameters() if p.grad is not None])

    def on_before_optimizer_step(self, optimizer: Any) -> None:  # after the callbacks' hooks
        self.used.append([p.grad.clone() for p in self.parameters() if p.grad is not None])

    def configure_optimizers(self) -> Any:
        return self.optimizer(self.parameters())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Batches(self.make), batch_size=None)


def _untouched_fraction(model: _Watched, tmp_path: Path) -> float:
    trainer = pl.Trainer(
        **quiet_trainer_kwargs(max_steps=STEPS, default_root_dir=str(tmp_path)),
        callbacks=[GradGuard(dead_units=False, report=False)],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    assert len(model.raw) == len(model.used) == STEPS
    same = [
        all(torch.equal(r, u) for r, u in zip(raw, used))
        for raw, used in zip(model.raw, model.used)
    ]
    return sum(same) / len(same)


def test_healthy_gpt2_with_adamw_is_untouched(tmp_path: Path) -> None:
    model = _Watched(
        tiny_gpt2(),
        gpt2_loss,
        lambda params: torch.optim.AdamW(params, lr=3e-4),
        _sequences,
    )
    untouched = _untouched_fraction(model, tmp_path)
    assert untouched >= 0.95
    assert model.losses[-1] < model.losses[0]  # it trains
    # ZClip's cap of 1.0 would have clipped most of these steps: the norms are above it
    raw_norms = [math.sqrt(sum(float(g.double().pow(2).sum()) for g in s)) for s in model.raw]
    assert sum(n > 1.0 for n in raw_norms) > STEPS // 2


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_healthy_resnet_with_sgd_momentum_is_untouched(tmp_path: Path, compiled: bool) -> None:
    net = resnet_tiny()
    model = _Watched(
        torch.compile(net, backend="eager") if compiled else net,
        lambda net, batch: nn.functional.cross_entropy(net(batch[0]), batch[1]),
        lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
        _images,
    )
    assert _untouched_fraction(model, tmp_path) >= 0.95
    assert sum(model.losses[-10:]) < sum(model.losses[:10])


def test_healthy_transformer_encoder_with_adamw_is_untouched(tmp_path: Path) -> None:
    model = _Watched(
        transformer_encoder(),
        lambda net, batch: nn.functional.cross_entropy(net(batch[0]), batch[1]),
        lambda params: torch.optim.AdamW(params, lr=1e-3),
        lambda step: sequence_batch(16, seed=step % 4),  # four batches, seen again and again
    )
    assert _untouched_fraction(model, tmp_path) >= 0.95
    assert sum(model.losses[-8:]) < sum(model.losses[:8])


def _s2(std: float, seed: int) -> nn.Sequential:
    """SCENARIOS.md S2: an MLP 64 -> 128 (9 hidden ReLU layers) -> 10, weights N(0, std)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    sizes = [64] + [128] * 9 + [10]
    for index in range(len(sizes) - 1):
        linear = nn.Linear(sizes[index], sizes[index + 1])
        nn.init.normal_(linear.weight, 0.0, std)
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()] if index < len(sizes) - 2 else [linear]
    return nn.Sequential(*layers)


def test_s2b_exploding_from_step_0_is_rescued(tmp_path: Path) -> None:
    """S2b (N(0, 0.2), SGD 0.1 momentum 0.9) with GradGuard(): trains instead of diverging."""
    from lightning_gradguard.demo.data import digits

    train, (x_test, y_test) = digits()
    net = _s2(0.2, seed=0)
    with torch.no_grad():
        first = nn.functional.cross_entropy(net(train.tensors[0][:64]), train.tensors[1][:64])
    assert float(first) > 50  # it does start by exploding (SCENARIOS.md: about 288)

    def ce(model: nn.Module, batch: Any) -> Tensor:
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    model = _Watched(net, ce, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), None)
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator())
    model.train_dataloader = lambda: loader  # type: ignore[method-assign]
    trainer = pl.Trainer(
        **quiet_trainer_kwargs(max_steps=400, max_epochs=-1, default_root_dir=str(tmp_path)),
        callbacks=[GradGuard(dead_units=False, report=False)],
    )
    model.raw, model.used = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    assert all(math.isfinite(v) for v in model.losses)
    net.eval()
    with torch.no_grad():
        accuracy = float((net(x_test).argmax(1) == y_test).double().mean())
    assert accuracy > 0.9  # FixedNorm(1.0) reaches 0.96 in 1000 steps; unclipped: 0.10
    # the first step was clipped: the optimizer got a gradient of norm max(0.01 ||W||, 1)
    used0 = math.sqrt(sum(float(g.double().pow(2).sum()) for g in model.used[0]))
    raw0 = math.sqrt(sum(float(g.double().pow(2).sum()) for g in model.raw[0]))
    assert raw0 > 100 and used0 == pytest.approx(1.0, rel=1e-4)


def test_guard_clip_rules_against_a_hand_computation() -> None:
    """The spike rule (median of recorded norms) and the weight rule, step by step."""
    policy = GuardClip(spike_ratio=2.0, window=4, weight_ratio=1.0, cut_ratio=0.01, min_cut=0.5)
    weight = torch.tensor(10.0, dtype=torch.float64)  # cut = max(0.1, 0.5) = 0.5
    norms = [1.0, 3.0, 1.2, 0.8, 50.0, 1.1, 2.5, 0.9]
    history: list[float] = []
    for norm in norms:
        t = float(policy.threshold(torch.tensor(norm, dtype=torch.float64), weight))
        median = sorted(history)[(len(history) - 1) // 2] if history else math.inf
        if norm > 10.0:
            expected, recorded = 0.5, 0.5  # larger than the weights: cut
        elif norm > 2.0 * median:
            expected, recorded = median, median  # a spike: clipped to the median
        else:
            expected, recorded = min(2.0 * median, 10.0), norm
        assert t == pytest.approx(expected), (norm, history)
        history = [*history, recorded][-4:]
    assert GuardClip().state_dict() == {}  # before the first step: nothing to save
    state = policy.state_dict()
    assert set(state) == {"history", "position"}
    assert all(isinstance(v, Tensor) for v in state.values())
    again = GuardClip(spike_ratio=2.0, window=4, weight_ratio=1.0, cut_ratio=0.01, min_cut=0.5)
    again.load_state_dict(state)
    for x in (0.7, 9.0):
        a = policy.threshold(torch.tensor(x, dtype=torch.float64), weight)
        b = again.threshold(torch.tensor(x, dtype=torch.float64), weight)
        assert torch.equal(a, b)


def test_guard_clip_weight_bounds_follow_every_change_of_the_weight_norm() -> None:
    """The weight rule's bounds are reused between weight measurements, never stale.

    With no history the spike rule is off: a norm above ``weight_ratio * w`` gives
    ``max(cut_ratio * w, min_cut)``, a norm below it gives ``weight_ratio * w``.
    """
    policy = GuardClip(weight_ratio=2.0, cut_ratio=0.1, min_cut=0.5, window=1)

    def threshold(norm: float, weight: Tensor) -> float:
        policy.history = None  # no spike rule: only the weight rule applies
        return float(policy.threshold(torch.tensor(norm, dtype=torch.float64), weight))

    weight = torch.tensor(10.0, dtype=torch.float64)
    assert threshold(5.0, weight) == pytest.approx(20.0)  # below 2 * 10
    assert threshold(50.0, weight) == pytest.approx(1.0)  # above: max(0.1 * 10, 0.5)
    weight.fill_(100.0)  # changed in place (same tensor object)
    assert threshold(50.0, weight) == pytest.approx(200.0)
    assert threshold(500.0, weight) == pytest.approx(10.0)
    other = torch.tensor(1.0, dtype=torch.float64)  # another tensor
    assert threshold(50.0, other) == pytest.approx(0.5)  # max(0.1, 0.5)
    with torch.inference_mode():
        inferred = torch.tensor(3.0, dtype=torch.float64)
        assert threshold(5.0, inferred) == pytest.approx(6.0)
        inferred.fill_(30.0)
        assert threshold(5.0, inferred) == pytest.approx(60.0)
        assert threshold(100.0, inferred) == pytest.approx(3.0)


def test_guard_clip_weight_norm_and_clipping_match_torch() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    model(torch.randn(4, 8)).pow(2).sum().mul(1e4).backward()  # far larger than the weights
    params = list(model.parameters())
    weight_norm = float(torch.nn.utils.get_total_norm([p.detach() for p in params]))
    raw = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
    assert raw > weight_norm
    norm, threshold, _ = clip_with_policy_(GuardClip(cut_ratio=0.5, min_cut=0.1), model)
    assert float(norm) == pytest.approx(raw, rel=1e-6)
    assert float(threshold) == pytest.approx(0.5 * weight_norm, rel=1e-6)
    clipped = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
    assert clipped == pytest.approx(0.5 * weight_norm, rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spike_ratio": 1.0}, "spike_ratio=1.0"),
        ({"window": 0}, "window=0"),
        ({"weight_ratio": -1}, "weight_ratio=-1"),
        ({"cut_ratio": math.inf}, "cut_ratio=inf"),
        ({"min_cut": 0}, "min_cut=0"),
    ],
)
def test_guard_clip_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GuardClip(**kwargs)


def test_guard_clip_per_layer_uses_each_layer_weight_norm() -> None:
    torch.manual_seed(0)
    big, small = nn.Linear(4, 4), nn.Linear(4, 2)
    params = [big.weight, big.bias, small.weight, small.bias]
    for p, scale in zip(params, (100.0, 100.0, 1e-3, 1e-3)):
        p.grad = torch.randn_like(p) * scale
    grads = [p.grad for p in params]
    raw = [p.grad.clone() for p in params]
    groups = torch.tensor([0, 0, 1, 1])
    norm = torch.stack(
        [torch.nn.utils.get_total_norm(grads[:2]), torch.nn.utils.get_total_norm(grads[2:])]
    ).double()
    weights = [
        float(torch.nn.utils.get_total_norm([p.detach() for p in params[:2]])),
        float(torch.nn.utils.get_total_norm([p.detach() for p in params[2:]])),
    ]
    policy = GuardClip(cut_ratio=0.5, min_cut=1e-3)
    plan = policy.decide(policy.prepare(params, grads, groups), norm)
    assert plan.threshold is not None
    assert plan.threshold.tolist() == pytest.approx([0.5 * weights[0], weights[1]])
    plan.apply_()
    after = float(torch.nn.utils.get_total_norm([p.grad for p in params[:2]]))
    assert after == pytest.approx(0.5 * weights[0], rel=1e-5)  # the big layer is cut
    assert all(torch.equal(p.grad, r) for p, r in zip(params[2:], raw[2:]))  # the other not


def test_guard_clip_typical_norm_is_the_median_of_what_it_recorded() -> None:
    """SpikeRecovery's gradient-norm signal compares against this level."""
    policy = GuardClip(window=4)
    assert policy.typical_norm() is None
    recorded: list[float] = []
    for norm in [1.0, 3.0, 2.0, 40.0, 5.0, 4.0]:
        level = statistics.median_low(recorded[-4:]) if recorded else None
        policy.threshold(torch.tensor(norm, dtype=torch.float64))
        # a spike (above 2x the median) is recorded as the median itself
        recorded.append(level if level is not None and norm > 2 * level else norm)
        assert float(policy.typical_norm()) == statistics.median_low(recorded[-4:])


def _decide(policy: GuardClip, weight: torch.Tensor, norm: torch.Tensor) -> Any:
    return policy.decide(policy.prepare([weight], [weight.grad]), norm)


def test_guard_clip_measures_the_weights_every_n_steps_and_resumes_on_schedule() -> None:
    weight = nn.Parameter(torch.full((6, 6), 30.0))  # norm 180: the cut is 0.01 * 180 = 1.8
    policy = GuardClip(spike_ratio=1e12, weight_every_n_steps=3)  # only the weight rule acts
    thresholds, weight_norms, saved = [], [], io.BytesIO()
    for step in range(7):
        with torch.no_grad():
            weight.mul_(1.5)  # the weights move a lot: the threshold shows which norm was used
        weight_norms.append(float(torch.linalg.vector_norm(weight.detach().double())))
        weight.grad = torch.full_like(weight, 1e6)  # far above the weights: the weight rule cuts
        norm = torch.linalg.vector_norm(weight.grad.double())
        thresholds.append(float(_decide(policy, weight, norm).threshold))
        if step == 4:  # a checkpoint between two measurements
            torch.save(policy.state_dict(), saved)
    # Measured at steps 0, 3 and 6, reused in between: cut = 0.01 * that weight norm.
    expected = [0.01 * weight_norms[step - step % 3] for step in range(7)]
    assert thresholds == pytest.approx(expected, rel=1e-6)
    saved.seek(0)
    resumed = GuardClip(spike_ratio=1e12, weight_every_n_steps=3)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    norm = torch.linalg.vector_norm(weight.grad.double())
    # Step 5 again, after a resume: the norm measured at step 3, as in the run that went on.
    assert float(_decide(resumed, weight, norm).threshold) == thresholds[5]
    with pytest.raises(ValueError, match="weight_every_n_steps=0"):
        GuardClip(weight_every_n_steps=0)

"""``reset_optimizer_state_`` against hand-computed Adam and SGD-momentum updates.

The rule under test: some entries reset -> their moments are zero and Adam's
``step`` is kept (the untouched entries' updates are exactly what they would have
been); the whole tensor reset -> every state tensor is zeroed, ``step`` included, and
the next update is a fresh Adam's first (bias-corrected) step.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_gradguard.functional import reset_optimizer_state_
from lightning_gradguard.functional.optimizer_state import optimizer_parameters

LR, BETA1, BETA2, EPS = 0.1, 0.9, 0.999, 1e-8


def _gradients(steps: int, shape: tuple[int, ...]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(steps)]


class _HandAdam:
    """Adam written out per entry in float64, as in Kingma & Ba (2015), Algorithm 1."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.w = weight.double().clone()
        self.m = torch.zeros_like(self.w)
        self.v = torch.zeros_like(self.w)
        self.t = 0

    def step(self, g: torch.Tensor) -> None:
        self.t += 1
        self.m = BETA1 * self.m + (1 - BETA1) * g
        self.v = BETA2 * self.v + (1 - BETA2) * g * g
        m_hat = self.m / (1 - BETA1**self.t)
        v_hat = self.v / (1 - BETA2**self.t)
        self.w = self.w - LR * m_hat / (v_hat.sqrt() + EPS)


def _torch_adam(
    shape: tuple[int, int], amsgrad: bool = False
) -> tuple[torch.Tensor, torch.optim.Adam]:
    weight = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(1)))
    return weight, torch.optim.Adam([weight], lr=LR, betas=(BETA1, BETA2), eps=EPS, amsgrad=amsgrad)


def _step(weight: torch.Tensor, optimizer: torch.optim.Optimizer, g: torch.Tensor) -> None:
    weight.grad = g.to(weight.dtype)
    optimizer.step()


def test_resetting_rows_zeroes_their_moments_and_keeps_the_step() -> None:
    shape = (3, 2)
    grads = _gradients(7, shape)
    weight, adam = _torch_adam(shape)
    hand = _HandAdam(weight.detach())
    for g in grads[:6]:
        _step(weight, adam, g)
        hand.step(g)
    rows = torch.tensor([True, False, True])
    reset_optimizer_state_(adam, weight, (rows,))
    hand.m[rows] = 0.0
    hand.v[rows] = 0.0  # the step counter stays at 6 for every row
    assert int(adam.state[weight]["step"]) == 6
    _step(weight, adam, grads[6])
    hand.step(grads[6])
    torch.testing.assert_close(weight.detach().double(), hand.w, rtol=1e-5, atol=1e-6)


def test_a_reset_rows_first_update_has_the_documented_size() -> None:
    # With zero moments and the tensor's step t kept, the next update of a reset entry is
    # lr * sign(g) * (1 - b1) / (1 - b1**t) / sqrt((1 - b2) / (1 - b2**t)).
    shape = (2, 4)
    for steps in (6, 3000):
        weight, adam = _torch_adam(shape)
        g = torch.ones(shape)
        for _ in range(steps - 1):
            _step(weight, adam, g)
        reset_optimizer_state_(adam, weight, (torch.tensor([True, False]),))
        before = weight.detach().double().clone()
        _step(weight, adam, -g)
        t = steps
        size = LR * (1 - BETA1) / (1 - BETA1**t) / math.sqrt((1 - BETA2) / (1 - BETA2**t))
        moved = weight.detach().double() - before
        expected = torch.full((4,), size, dtype=torch.float64)
        torch.testing.assert_close(moved[0], expected, rtol=1e-4, atol=1e-6)
    assert size == pytest.approx(3.08 * LR, rel=0.01)  # large t: ~3x a fresh Adam's lr


def test_untouched_rows_update_exactly_as_without_the_reset() -> None:
    shape = (4, 3)
    grads = _gradients(5, shape)
    weight, adam = _torch_adam(shape)
    twin, twin_adam = _torch_adam(shape)
    for g in grads[:4]:
        _step(weight, adam, g)
        _step(twin, twin_adam, g)
    rows = torch.tensor([False, True, False, False])
    reset_optimizer_state_(adam, weight, (slice(None), torch.tensor([True, False, False])))
    reset_optimizer_state_(twin_adam, twin, (rows,))
    _step(weight, adam, grads[4])
    _step(twin, twin_adam, grads[4])
    untouched = torch.tensor([False, True, True])  # columns of the first reset
    reference, reference_adam = _torch_adam(shape)
    for g in grads:
        _step(reference, reference_adam, g)
    assert torch.equal(weight.detach()[:, untouched], reference.detach()[:, untouched])
    assert torch.equal(twin.detach()[~rows], reference.detach()[~rows])
    assert not torch.equal(twin.detach()[rows], reference.detach()[rows])


def test_resetting_the_whole_tensor_gives_a_fresh_adams_first_step() -> None:
    shape = (2, 3)
    grads = _gradients(4, shape)
    weight, adam = _torch_adam(shape)
    for g in grads[:3]:
        _step(weight, adam, g)
    reset_optimizer_state_(adam, weight)
    assert int(adam.state[weight]["step"]) == 0
    assert all(torch.count_nonzero(v) == 0 for v in adam.state[weight].values())
    start = weight.detach().double().clone()
    _step(weight, adam, grads[3])
    # Step 1 of Adam: m_hat = g, v_hat = g^2, so the update is lr * g / (|g| + eps).
    g = grads[3]
    torch.testing.assert_close(
        weight.detach().double(), start - LR * g / (g.abs() + EPS), rtol=1e-6, atol=1e-6
    )
    assert int(adam.state[weight]["step"]) == 1


def test_amsgrad_and_sgd_momentum_entries_are_reset_too() -> None:
    shape = (3, 2)
    weight, adam = _torch_adam(shape, amsgrad=True)
    for g in _gradients(3, shape):
        _step(weight, adam, g)
    rows = torch.tensor([False, True, False])
    reset_optimizer_state_(adam, weight, (rows,))
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert torch.count_nonzero(adam.state[weight][key][rows]) == 0, key
        assert torch.count_nonzero(adam.state[weight][key][~rows]) == 4, key
    # SGD with momentum: a reset row's buffer restarts from its gradient, like a fresh SGD.
    w = torch.nn.Parameter(torch.zeros(shape))
    sgd = torch.optim.SGD([w], lr=LR, momentum=0.9)
    grads = _gradients(3, shape)
    for g in grads[:2]:
        _step(w, sgd, g)
    buffer = sgd.state[w]["momentum_buffer"].double().clone()
    reset_optimizer_state_(sgd, w, (rows,))
    before = w.detach().double().clone()
    _step(w, sgd, grads[2])
    expected_buffer = torch.where(rows[:, None], grads[2], 0.9 * buffer + grads[2])
    torch.testing.assert_close(w.detach().double(), before - LR * expected_buffer)


def test_nothing_to_reset_is_not_an_error() -> None:
    weight, adam = _torch_adam((2, 2))
    reset_optimizer_state_(adam, weight)  # no state yet
    reset_optimizer_state_(None, weight, (torch.tensor([True, False]),))
    assert optimizer_parameters(adam) == [weight] and weight not in adam.state

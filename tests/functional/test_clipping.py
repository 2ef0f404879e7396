"""Clippers and threshold policies against independent reference computations.

Every expected value here is computed in this file (plain Python, numpy or torch
built-ins such as ``clip_grad_norm_``), never with the package's own helpers:

- ``clip_by_norm_`` / ``clip_by_value_`` against ``torch.nn.utils``;
- ``agc_`` against a per-parameter loop written as timm's ``adaptive_clip_grad``;
- ``AutoClip`` against ``numpy.percentile`` over a sliding window;
- ``ZClip`` against a plain-Python port of the authors' reference ``ZClip`` class
  (bluorion-com/ZClip, ``zclip/zclip.py``);
- ``EMARatio`` against OLMo's per-step formula.
"""

from __future__ import annotations

import io
import math
import re
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
from helpers import SyncCounter

from lightning_gradguard.functional.clipping import agc_, agc_plan, clip_by_norm_, clip_by_value_
from lightning_gradguard.functional.policies import (
    AGC,
    POLICIES,
    AutoClip,
    ClipPolicy,
    EMARatio,
    FixedNorm,
    FixedValue,
    GuardClip,
    ZClip,
    clip_with_policy_,
    make_policy,
)

F64 = torch.float64


def _scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=F64)


def _spiky_norms(n: int, seed: int, spikes: dict[int, float] | None = None) -> list[float]:
    """Positive norms around 1 with a few large spikes."""
    rng = np.random.default_rng(seed)
    values = rng.uniform(0.5, 1.5, size=n)
    for step, factor in (spikes or {}).items():
        values[step] *= factor
    return [float(v) for v in values]


def _cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    x = torch.cat([t.flatten().double() for t in a])
    y = torch.cat([t.flatten().double() for t in b])
    return float(x @ y / (x.norm() * y.norm()))


def _grad_params(grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        params.append(p)
    return params


# --------------------------------------------------------------------------- clip_by_norm_


@pytest.mark.parametrize("max_norm", [0.5, 2.0, 100.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_by_norm_matches_torch_clip_grad_norm(max_norm: float, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (3,), (2, 3, 4), ()]
    grads = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    params = _grad_params(grads)
    torch_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)

    # Independent norm, computed by hand; ~6.5, far from every threshold.
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    assert abs(norm - max_norm) > 1.0
    assert float(torch_norm) == pytest.approx(norm, rel=1e-5)

    coef = clip_by_norm_(grads, _scalar(max_norm), _scalar(norm))
    expected_coef = max_norm / (norm + 1e-6) if norm > max_norm else 1.0
    assert float(coef) == pytest.approx(expected_coef, rel=1e-12)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for mine, theirs in zip(grads, params):
        torch.testing.assert_close(mine, theirs.grad, rtol=tol, atol=tol)
    clipped = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    assert clipped == pytest.approx(min(norm, max_norm), rel=1e-5)


def test_clip_by_norm_per_group_thresholds() -> None:
    gen = torch.Generator().manual_seed(1)
    shapes = [(4, 3), (3,), (2, 5), (5,), (6,)]
    group_of = [0, 0, 1, 2, 1]
    grads = [torch.randn(s, generator=gen, dtype=F64) * 3 for s in shapes]
    originals = [g.clone() for g in grads]
    thresholds = [1.0, 100.0, 0.1]

    norms = [0.0, 0.0, 0.0]
    for g, group in zip(grads, group_of):
        norms[group] += float((g**2).sum())
    norms = [math.sqrt(v) for v in norms]
    # Group 0 and 2 are clipped, group 1 is not; none is near its threshold.
    assert norms[0] > 2 * thresholds[0] and norms[2] > 2 * thresholds[2]
    assert norms[1] < thresholds[1] / 2
    expected_coefs = [t / (n + 1e-6) if n > t else 1.0 for t, n in zip(thresholds, norms)]

    coef = clip_by_norm_(
        grads,
        torch.tensor(thresholds, dtype=F64),
        torch.tensor(norms, dtype=F64),
        group_index=torch.tensor(group_of),
    )
    assert coef.tolist() == pytest.approx(expected_coefs, rel=1e-12)
    for g, original, group in zip(grads, originals, group_of):
        torch.testing.assert_close(g, original * expected_coefs[group], rtol=1e-12, atol=0)

    clipped = [0.0, 0.0, 0.0]
    for g, group in zip(grads, group_of):
        clipped[group] += float((g**2).sum())
    for value, n, t in zip(clipped, norms, thresholds):
        assert math.sqrt(value) == pytest.approx(min(n, t), rel=1e-6)


def test_clip_by_norm_per_group_needs_group_index() -> None:
    grads = [torch.ones(3), torch.ones(2)]
    with pytest.raises(ValueError, match="group_index"):
        clip_by_norm_(grads, torch.tensor([1.0, 1.0]), torch.tensor([5.0, 5.0]))


def test_clip_by_norm_below_threshold_is_untouched() -> None:
    grads = [torch.tensor([0.3, -0.4])]
    coef = clip_by_norm_(grads, _scalar(1.0), _scalar(0.5))
    assert float(coef) == 1.0
    assert grads[0].tolist() == pytest.approx([0.3, -0.4])
    assert clip_by_norm_([], _scalar(1.0), _scalar(5.0)).item() == pytest.approx(1 / (5 + 1e-6))


# --------------------------------------------------------------------------- clip_by_value_


@pytest.mark.parametrize("clip_value", [0.1, 0.7, 5.0])
def test_clip_by_value_matches_torch(clip_value: float) -> None:
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(s, generator=gen) for s in [(6, 4), (4,), (3, 2, 2)]]
    params = _grad_params(grads)
    torch.nn.utils.clip_grad_value_(params, clip_value)
    clip_by_value_(grads, clip_value)
    for mine, theirs in zip(grads, params):
        assert torch.equal(mine, theirs.grad)
    assert max(float(g.abs().max()) for g in grads) <= float(torch.tensor(clip_value))


def test_value_clipping_changes_direction_norm_clipping_keeps_it() -> None:
    gen = torch.Generator().manual_seed(3)
    original = [torch.randn(50, generator=gen, dtype=F64) * 3, torch.randn(7, generator=gen) * 3]
    by_value = [g.clone() for g in original]
    by_norm = [g.clone() for g in original]

    clip_by_value_(by_value, 1.0)
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in original))
    clip_by_norm_(by_norm, _scalar(1.0), _scalar(norm))

    assert _cosine(original, by_value) < 0.99
    assert _cosine(original, by_norm) == pytest.approx(1.0, abs=1e-7)
    assert math.sqrt(sum(float((g.double() ** 2).sum()) for g in by_norm)) == pytest.approx(
        1.0, rel=1e-5
    )


# --------------------------------------------------------------------------- AGC


def _reference_agc(params: list[torch.Tensor], clipping: float, eps: float) -> None:
    """timm's ``adaptive_clip_grad`` (Brock et al., 2021), one parameter at a time."""

    def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
        if x.ndim <= 1:
            return x.norm(2.0)
        return x.norm(2.0, dim=tuple(range(1, x.ndim)), keepdim=True)

    for p in params:
        if p.grad is None:
            continue
        w, g = p.detach(), p.grad.detach()
        max_norm = unitwise_norm(w).clamp(min=eps).mul_(clipping)
        grad_norm = unitwise_norm(g)
        clipped = g * (max_norm / grad_norm.clamp(min=1e-6))
        g.copy_(torch.where(grad_norm > max_norm, clipped, g))


def _agc_model(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Linear and conv weights, biases, a scalar gain; several layers share shapes."""
    gen = torch.Generator().manual_seed(4)
    shapes = [
        (16, 8),  # Linear in
        (16,),
        (16, 16),  # three equal hidden layers (batched together)
        (16,),
        (16, 16),
        (16,),
        (16, 16),
        (16,),
        (8, 3, 3, 3),  # conv
        (8,),
        (6, 8, 3, 3),  # another conv, alone in its shape
        (),  # a scalar gain
        (4, 16),  # a weight without gradient
    ]
    params = []
    for i, shape in enumerate(shapes):
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype))
        if i < len(shapes) - 1:
            # Gradient units whose size varies over four decades: some clipped, some not.
            units = shape[0] if shape else 1
            scales = torch.logspace(-4, 0, units, dtype=dtype)[torch.randperm(units, generator=gen)]
            scales = scales.reshape(-1, *([1] * (len(shape) - 1))) if shape else scales[0]
            p.grad = torch.randn(shape, generator=gen, dtype=dtype) * scales
        params.append(p)
    return params


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clipping", [0.01, 0.1])
def test_agc_matches_timm_reference(dtype: torch.dtype, clipping: float) -> None:
    mine = _agc_model(dtype)
    theirs = _agc_model(dtype)
    before = [p.grad.clone() if p.grad is not None else None for p in theirs]
    _reference_agc(theirs, clipping, eps=1e-3)
    agc_(mine, clipping=clipping, eps=1e-3)

    changed = unchanged = 0
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for p, q, b in zip(mine, theirs, before):
        if q.grad is None:
            assert p.grad is None
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=0)
        rows_changed = (q.grad != b).reshape(b.shape[0] if b.dim() else 1, -1).any(1)
        changed += int(rows_changed.sum())
        unchanged += int((~rows_changed).sum())
    # The data exercise both branches.
    assert changed > 5 and unchanged > 5


def test_agc_single_parameter_and_distinct_shapes() -> None:
    gen = torch.Generator().manual_seed(5)
    # One parameter alone.
    w = torch.nn.Parameter(torch.randn(5, 7, generator=gen, dtype=F64))
    w.grad = (
        torch.randn(5, 7, generator=gen, dtype=F64) * torch.logspace(-3, 0, 5, dtype=F64)[:, None]
    )
    ref = torch.nn.Parameter(w.detach().clone())
    ref.grad = w.grad.clone()
    agc_([w], clipping=0.05)
    _reference_agc([ref], clipping=0.05, eps=1e-3)
    torch.testing.assert_close(w.grad, ref.grad, rtol=1e-12, atol=0)

    # Every shape distinct: no batching at all.
    shapes = [(3, 4), (4,), (2, 3, 5), (2, 2, 2, 2), (1,)]
    mine, theirs = [], []
    for shape in shapes:
        data = torch.randn(shape, generator=gen, dtype=F64)
        grad = torch.randn(shape, generator=gen, dtype=F64) * 0.1
        for bucket in (mine, theirs):
            p = torch.nn.Parameter(data.clone())
            p.grad = grad.clone()
            bucket.append(p)
    agc_(mine, clipping=0.05)
    _reference_agc(theirs, clipping=0.05, eps=1e-3)
    for p, q in zip(mine, theirs):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0)


def test_agc_zero_initialized_weight_still_moves() -> None:
    clipping, eps = 0.02, 1e-3
    w = torch.nn.Parameter(torch.zeros(4, 3, dtype=F64))
    b = torch.nn.Parameter(torch.zeros(4, dtype=F64))
    w.grad = torch.ones(4, 3, dtype=F64)
    b.grad = torch.full((4,), 2.0, dtype=F64)
    agc_([w, b], clipping=clipping, eps=eps)
    row_norms = w.grad.norm(dim=1)
    assert row_norms.tolist() == pytest.approx([clipping * eps] * 4, rel=1e-9)
    assert float(b.grad.norm()) == pytest.approx(clipping * eps, rel=1e-9)
    # Direction is kept, and the gradient is not zero.
    assert torch.all(w.grad > 0) and torch.all(b.grad > 0)


def test_agc_tiny_gradient_below_max_norm_is_untouched() -> None:
    # With clipping·eps < 1e-6 (the floor of the gradient norm), a unit whose gradient
    # is already below the allowed size must be left alone, as in timm.
    clipping, eps = 0.01, 1e-6  # max_norm of a zero weight: 1e-8
    mine = torch.nn.Parameter(torch.zeros(3, 2, dtype=F64))
    mine.grad = torch.tensor([[3e-9, 4e-9], [3e-8, 4e-8], [3.0, 4.0]], dtype=F64)
    ref = torch.nn.Parameter(mine.detach().clone())
    ref.grad = mine.grad.clone()
    agc_([mine], clipping=clipping, eps=eps)
    _reference_agc([ref], clipping=clipping, eps=eps)
    torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-12, atol=0)
    assert mine.grad[0].tolist() == pytest.approx([3e-9, 4e-9], rel=1e-12)


def test_agc_plan_decides_first_and_scales_only_what_clips() -> None:
    gen = torch.Generator().manual_seed(6)
    clipping = 0.05
    # Distinct shapes: one batch each, in this order. Gradients far below the allowed
    # size (0.05 times a weight norm of order 1) for the first and last, far above for
    # the second.
    specs = [((4, 3), 1e-4), ((5, 2), 10.0), ((4,), 1e-4)]
    mine, theirs = [], []
    for shape, size in specs:
        data = torch.randn(shape, generator=gen, dtype=F64)
        grad = torch.randn(shape, generator=gen, dtype=F64) * size
        for bucket in (mine, theirs):
            p = torch.nn.Parameter(data.clone())
            p.grad = grad.clone()
            bucket.append(p)
    expected_total = torch.nn.utils.get_total_norm([p.grad for p in theirs])

    plan = agc_plan(mine, clipping=clipping)
    versions = [p.grad._version for p in mine]
    assert plan.clips.tolist() == [False, True, False]
    torch.testing.assert_close(plan.grad_norm(), expected_total, rtol=1e-12, atol=0)

    plan.apply_(plan.clips.tolist())
    _reference_agc(theirs, clipping, eps=1e-3)
    for p, q in zip(mine, theirs):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0)
    # The batches with nothing to clip were not written at all.
    assert [p.grad._version - v for p, v in zip(mine, versions)] == [0, 1, 0]
    clipped_total = torch.nn.utils.get_total_norm([q.grad for q in theirs])
    torch.testing.assert_close(plan.clipped_norm(), clipped_total, rtol=1e-12, atol=0)


@pytest.mark.parametrize("grad_scale", [None, 1024.0])
def test_clip_with_policy_agc_matches_reference_and_reports_the_raw_norm(
    grad_scale: float | None,
) -> None:
    mine = _agc_model(F64)
    theirs = _agc_model(F64)
    expected_norm = torch.nn.utils.get_total_norm([p.grad for p in theirs if p.grad is not None])
    _reference_agc(theirs, 0.05, eps=1e-3)
    scale = None
    if grad_scale is not None:  # gradients still carry an AMP loss scale (a power of two)
        scale = torch.tensor(grad_scale, dtype=F64)
        for p in mine:
            if p.grad is not None:
                p.grad.mul_(grad_scale)
    norm, _, _ = clip_with_policy_(AGC(clipping=0.05), mine, grad_scale=scale)
    torch.testing.assert_close(norm, expected_norm, rtol=1e-12, atol=0)
    for p, q in zip(mine, theirs):
        if q.grad is None:
            continue
        got = p.grad if grad_scale is None else p.grad / grad_scale
        torch.testing.assert_close(got, q.grad, rtol=1e-12, atol=0)


def test_agc_skips_parameters_without_grad() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    agc_([p])
    assert p.grad is None
    agc_([])


# --------------------------------------------------------------------------- AutoClip


@pytest.mark.parametrize("percentile", [0, 10, 50, 87.5, 100])
def test_autoclip_matches_numpy_percentile_with_wrapping_window(percentile: float) -> None:
    window = 16
    norms = _spiky_norms(60, seed=6, spikes={7: 40.0, 20: 15.0, 41: 80.0, 42: 30.0})
    policy = AutoClip(percentile=percentile, window=window)
    for t, value in enumerate(norms):
        threshold = policy.threshold(_scalar(value))
        expected = np.percentile(norms[max(0, t - window + 1) : t + 1], percentile)
        assert threshold.shape == ()
        assert float(threshold) == pytest.approx(expected, rel=1e-12), t


def test_autoclip_ignores_non_finite_norms() -> None:
    window = 8
    norms = _spiky_norms(40, seed=7, spikes={15: 50.0})
    sequence: list[float] = []
    for t, value in enumerate(norms):
        sequence.append(value)
        if t % 5 == 2:
            sequence.append([math.nan, math.inf, -math.inf][t % 3])
    sequence.insert(0, math.nan)  # before anything was recorded

    policy = AutoClip(percentile=30, window=window)
    history: list[float] = []
    for value in sequence:
        threshold = float(policy.threshold(_scalar(value)))
        if math.isfinite(value):
            history.append(value)
        if not history:
            assert threshold == math.inf
        else:
            expected = np.percentile(history[-window:], 30)
            assert threshold == pytest.approx(expected, rel=1e-12)


def test_autoclip_per_layer_vector_is_elementwise() -> None:
    window, layers = 12, 3
    columns = [_spiky_norms(60, seed=10 + k, spikes={5 * k + 3: 25.0}) for k in range(layers)]
    columns[1][17] = math.nan
    columns[2][30] = math.inf
    policy = AutoClip(percentile=20, window=window)
    histories: list[list[float]] = [[] for _ in range(layers)]
    for t in range(60):
        norm = torch.tensor([c[t] for c in columns], dtype=F64)
        threshold = policy.threshold(norm)
        assert threshold.shape == (layers,)
        for k in range(layers):
            if math.isfinite(columns[k][t]):
                histories[k].append(columns[k][t])
            expected = np.percentile(histories[k][-window:], 20)
            assert float(threshold[k]) == pytest.approx(expected, rel=1e-12), (t, k)


def _nanquantile_of_windows(
    columns: torch.Tensor, window: int, percentile: float
) -> list[torch.Tensor]:
    """Per step, ``torch.nanquantile`` over each element's last ``window`` finite norms.

    The formula AutoClip used before its rank tables, computed here from plain lists:
    the window is NaN-padded, and a NaN result (nothing recorded) means no clipping.
    """
    recorded: list[list[float]] = [[] for _ in range(columns.shape[1])]
    expected = []
    for row in columns.tolist():
        for kept, value in zip(recorded, row):
            if math.isfinite(value):
                kept.append(value)
        padded = [kept[-window:] + [math.nan] * (window - len(kept[-window:])) for kept in recorded]
        values = torch.tensor(padded, dtype=F64).T  # [window, elements]
        quantile = torch.nanquantile(values, percentile / 100.0, dim=0)
        expected.append(torch.nan_to_num(quantile, nan=math.inf))
    return expected


@pytest.mark.parametrize("percentile", [0, 10, 33.3, 100])
def test_autoclip_is_bitwise_nanquantile_of_the_window_through_a_state_round_trip(
    percentile: float,
) -> None:
    window, steps, resume_at = 32, 200, 117
    generator = torch.Generator().manual_seed(14)
    columns = torch.rand((steps, 3), generator=generator, dtype=F64) * 4
    columns[:, 2] = columns[:, 2].round(decimals=1)  # ties in the window
    odd = torch.rand(columns.shape, generator=generator)
    columns[odd < 0.08] = math.nan
    columns[(odd >= 0.08) & (odd < 0.12)] = math.inf
    columns[(odd >= 0.12) & (odd < 0.14)] = -math.inf
    columns[:5, 1] = math.nan  # one element starts with nothing recorded
    expected = _nanquantile_of_windows(columns, window, percentile)

    vector, scalar = AutoClip(percentile, window), AutoClip(percentile, window)
    for t in range(resume_at):
        assert torch.equal(vector.threshold(columns[t]), expected[t]), t
        assert torch.equal(scalar.threshold(columns[t, 0]), expected[t][0]), t
    # Resumed from a checkpoint (same keys as ever), or just going on: the same thresholds.
    resumed = [AutoClip(percentile, window), AutoClip(percentile, window)]
    for policy, saved in zip(resumed, (vector, scalar)):
        buffer = io.BytesIO()
        torch.save(saved.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        assert sorted(state) == ["history", "position"]
        policy.load_state_dict(state)
    for t in range(resume_at, steps):
        assert torch.equal(vector.threshold(columns[t]), expected[t]), t
        assert torch.equal(resumed[0].threshold(columns[t]), expected[t]), t
        assert torch.equal(scalar.threshold(columns[t, 0]), expected[t][0]), t
        assert torch.equal(resumed[1].threshold(columns[t, 0]), expected[t][0]), t


# --------------------------------------------------------------------------- ZClip


class ReferenceZClip:
    """A plain-Python port of the authors' ``ZClip`` (bluorion-com/ZClip, zclip/zclip.py).

    ``step`` takes the precomputed total norm and returns the effective clip
    threshold (``max_grad_norm`` or ``inf`` during warm-up) and the coefficient
    the reference multiplies the gradients by.
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        max_grad_norm: float | None = 1.0,
        eps: float = 1e-6,
        warmup_steps: int = 25,
        mode: str = "zscore",
        clip_option: str = "adaptive_scaling",
        clip_factor: float = 1.0,
        skip_update_on_spike: bool = False,
    ) -> None:
        self.alpha = alpha
        self.z_thresh = z_thresh
        self.max_grad_norm = max_grad_norm
        self.eps = eps
        self.warmup_steps = warmup_steps
        self.mode = mode
        self.clip_option = clip_option if mode == "zscore" else None
        self.clip_factor = clip_factor
        self.skip_update_on_spike = skip_update_on_spike
        self.buffer: list[float] = []
        self.initialized = False
        self.mean = 0.0
        self.var = 0.0
        self.spikes = 0

    def _initialize_ema(self) -> None:
        self.mean = sum(self.buffer) / len(self.buffer)
        self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
        self.initialized = True
        self.buffer = []

    def _update_ema(self, grad_norm: float) -> None:
        self.mean = self.alpha * self.mean + (1 - self.alpha) * grad_norm
        self.var = self.alpha * self.var + (1 - self.alpha) * (grad_norm - self.mean) ** 2

    def _compute_clip_val(self, grad_norm: float) -> float | None:
        std = self.var**0.5
        if self.mode == "percentile":
            threshold = self.mean + self.z_thresh * std
            if grad_norm > threshold:
                return threshold
        else:
            z = (grad_norm - self.mean) / (std + self.eps)
            if z > self.z_thresh:
                if self.clip_option == "adaptive_scaling":
                    eta = z / self.z_thresh
                    threshold = self.mean + (self.z_thresh * std) / eta
                    return threshold * self.clip_factor
                return self.mean
        return None

    @staticmethod
    def _coefficient(total_norm: float, max_norm: float) -> float:
        return max_norm / (total_norm + 1e-6) if total_norm > max_norm else 1.0

    def step(self, total_norm: float) -> tuple[float, float]:
        if not self.initialized:
            self.buffer.append(total_norm)
            if len(self.buffer) >= self.warmup_steps:
                self._initialize_ema()
            if self.max_grad_norm is None:
                return math.inf, 1.0
            return self.max_grad_norm, self._coefficient(total_norm, self.max_grad_norm)

        clip_val = self._compute_clip_val(total_norm)
        adaptive_clip = clip_val if clip_val is not None else total_norm
        effective = adaptive_clip
        if self.max_grad_norm is not None:
            effective = min(adaptive_clip, self.max_grad_norm)
        coef = self._coefficient(total_norm, effective)
        if clip_val is not None:
            self.spikes += 1
        if clip_val is not None and self.skip_update_on_spike:
            return effective, coef
        self._update_ema(clip_val if clip_val is not None else total_norm)
        return effective, coef


ZCLIP_SPIKES = {4: 6.0, 18: 12.0, 30: 9.0, 31: 5.0, 45: 20.0, 60: 8.0, 61: 8.0, 62: 8.0, 75: 3.0}
ZCLIP_MODES = [
    {"mode": "zscore", "clip_option": "adaptive_scaling"},
    {"mode": "zscore", "clip_option": "adaptive_scaling", "clip_factor": 0.8},
    {"mode": "zscore", "clip_option": "mean"},
    {"mode": "percentile"},
]


@pytest.mark.parametrize("skip_update_on_spike", [False, True])
@pytest.mark.parametrize("max_grad_norm", [None, 1.2, 5.0])
@pytest.mark.parametrize("mode_kwargs", ZCLIP_MODES, ids=lambda k: "-".join(map(str, k.values())))
def test_zclip_thresholds_match_reference(
    mode_kwargs: dict[str, Any], max_grad_norm: float | None, skip_update_on_spike: bool
) -> None:
    kwargs = dict(
        alpha=0.9,
        z_thresh=2.0,
        max_grad_norm=max_grad_norm,
        warmup_steps=10,
        skip_update_on_spike=skip_update_on_spike,
        **mode_kwargs,
    )
    norms = _spiky_norms(80, seed=8, spikes=ZCLIP_SPIKES)
    reference = ReferenceZClip(**kwargs)
    policy = ZClip(**kwargs)
    for t, value in enumerate(norms):
        expected, _ = reference.step(value)
        threshold = policy.threshold(_scalar(value))
        assert threshold.shape == ()
        if math.isinf(expected):
            assert float(threshold) == math.inf, t
        else:
            assert float(threshold) == pytest.approx(expected, rel=1e-9, abs=1e-12), t
    # The sequence exercised the spike branch (otherwise the test proves little).
    assert reference.spikes >= 3


def test_zclip_warmup_clips_at_max_grad_norm_only() -> None:
    policy = ZClip(max_grad_norm=2.0, warmup_steps=5)
    for value in (1.0, 10.0, 0.5, 100.0, 3.0):
        assert float(policy.threshold(_scalar(value))) == 2.0
    unbounded = ZClip(max_grad_norm=None, warmup_steps=3)
    for value in (1.0, 50.0, 2.0):
        assert float(unbounded.threshold(_scalar(value))) == math.inf


def test_zclip_non_finite_norm_does_not_poison_statistics() -> None:
    kwargs = dict(alpha=0.9, z_thresh=2.0, max_grad_norm=None, warmup_steps=6)
    norms = _spiky_norms(40, seed=9, spikes={20: 10.0})
    reference = ReferenceZClip(**kwargs)
    policy = ZClip(**kwargs)
    for t, value in enumerate(norms):
        if t in (3, 12, 25):  # a non-finite norm is skipped: the reference never sees it
            for bad in (math.nan, math.inf):
                policy.threshold(_scalar(bad))
        expected, _ = reference.step(value)
        threshold = float(policy.threshold(_scalar(value)))
        if math.isinf(expected):
            assert threshold == math.inf
        else:
            assert threshold == pytest.approx(expected, rel=1e-9), t


@pytest.mark.parametrize("mode_kwargs", ZCLIP_MODES[::2], ids=["adaptive", "mean"])
def test_zclip_clip_matches_reference_in_place_clipping(mode_kwargs: dict[str, Any]) -> None:
    kwargs = dict(alpha=0.9, z_thresh=2.0, max_grad_norm=1.3, warmup_steps=8, **mode_kwargs)
    norms = _spiky_norms(50, seed=11, spikes={3: 4.0, 20: 10.0, 33: 6.0, 34: 6.0, 47: 15.0})
    reference = ReferenceZClip(**kwargs)
    policy = ZClip(**kwargs)
    gen = torch.Generator().manual_seed(12)
    shapes = [(6, 5), (5,), (3, 2, 2)]
    clipped_steps = 0
    for target in norms:
        raw = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
        scale = target / math.sqrt(sum(float((g**2).sum()) for g in raw))
        grads = [g * scale for g in raw]
        norm = math.sqrt(sum(float((g**2).sum()) for g in grads))

        expected_threshold, coef = reference.step(norm)
        expected = [g * coef for g in grads]  # the reference's param.grad.mul_(clip_coef)
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        threshold, applied = policy.clip_(params, grads, _scalar(norm))

        assert float(applied) == pytest.approx(coef, rel=1e-9)
        assert float(threshold) == pytest.approx(expected_threshold, rel=1e-9)
        for g, e in zip(grads, expected):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=0)
        clipped_steps += coef < 1.0
    assert reference.spikes >= 3 and clipped_steps >= 5


def test_zclip_per_layer_vector_matches_reference_per_column() -> None:
    kwargs = dict(alpha=0.9, z_thresh=2.0, max_grad_norm=None, warmup_steps=8)
    layers = 3
    columns = [
        _spiky_norms(50, seed=20 + k, spikes={15 + 7 * k: 10.0, 40: 5.0}) for k in range(layers)
    ]
    references = [ReferenceZClip(**kwargs) for _ in range(layers)]
    policy = ZClip(**kwargs)
    for t in range(50):
        threshold = policy.threshold(torch.tensor([c[t] for c in columns], dtype=F64))
        assert threshold.shape == (layers,)
        for k in range(layers):
            expected, _ = references[k].step(columns[k][t])
            if math.isinf(expected):
                assert float(threshold[k]) == math.inf
            else:
                assert float(threshold[k]) == pytest.approx(expected, rel=1e-9), (t, k)


# --------------------------------------------------------------------------- EMARatio


def _reference_ema_ratio(norms: list[float], ratio: float, decay: float) -> list[float]:
    """OLMo's adaptive clipping: clip to ratio·EMA, update the EMA with the clipped norm."""
    ema: float | None = None
    thresholds = []
    for norm in norms:
        if ema is None:
            ema = norm
        threshold = ratio * ema
        coef = threshold / (norm + 1e-6) if norm > threshold else 1.0
        ema = ema + (1 - decay) * (norm * coef - ema)  # torch.lerp(ema, norm·coef, 1 − decay)
        thresholds.append(threshold)
    return thresholds


@pytest.mark.parametrize(("ratio", "decay"), [(2.0, 0.95), (1.5, 0.8), (1.05, 0.99)])
def test_ema_ratio_matches_olmo_formula(ratio: float, decay: float) -> None:
    norms = _spiky_norms(60, seed=13, spikes={10: 8.0, 11: 8.0, 30: 20.0})
    expected = _reference_ema_ratio(norms, ratio, decay)
    policy = EMARatio(ratio=ratio, decay=decay)
    for t, value in enumerate(norms):
        threshold = policy.threshold(_scalar(value))
        assert float(threshold) == pytest.approx(expected[t], rel=1e-12), t
    # Spikes were clipped: the threshold stayed far below them.
    assert expected[30] < norms[30] / 2


def test_ema_ratio_per_layer_vector_skips_non_finite_elementwise() -> None:
    layers = 4
    columns = [_spiky_norms(60, seed=30 + k, spikes={9 * k + 5: 12.0}) for k in range(layers)]
    columns[0][0] = math.nan  # before the EMA started
    columns[1][20] = math.inf
    columns[2][33] = math.nan
    expected = []
    for column in columns:
        finite = [v for v in column if math.isfinite(v)]
        thresholds = iter(_reference_ema_ratio(finite, 2.0, 0.9))
        # A non-finite step leaves the EMA alone: its threshold is the next step's.
        per_step, pending = [], 0
        for value in column:
            if math.isfinite(value):
                current = next(thresholds)
                per_step.extend([current] * (pending + 1))
                pending = 0
            else:
                pending += 1
        expected.append(per_step)
    policy = EMARatio(ratio=2.0, decay=0.9)
    for t in range(60):
        threshold = policy.threshold(torch.tensor([c[t] for c in columns], dtype=F64))
        assert threshold.shape == (layers,)
        for k in range(layers):
            if t == 0 and k == 0:
                assert math.isnan(float(threshold[k]))  # nothing to go by yet
            else:
                assert float(threshold[k]) == pytest.approx(expected[k][t], rel=1e-12), (t, k)


# --------------------------------------------------------------------------- state_dict


def _run(policy: Any, norms: list[torch.Tensor]) -> list[torch.Tensor]:
    return [policy.threshold(n).clone() for n in norms]


def _round_trip(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


POLICY_FACTORIES = {
    "autoclip": lambda: AutoClip(percentile=25, window=16),
    "zclip": lambda: ZClip(alpha=0.9, z_thresh=2.0, max_grad_norm=None, warmup_steps=10),
    "zclip-capped-skip": lambda: ZClip(
        warmup_steps=10, max_grad_norm=1.2, mode="percentile", skip_update_on_spike=True
    ),
    "ema_ratio": lambda: EMARatio(ratio=1.5, decay=0.9),
    "guard": lambda: GuardClip(spike_ratio=1.5, window=16),
}


@pytest.mark.parametrize("split", [5, 30])
@pytest.mark.parametrize("shape", [(), (3,)], ids=["global", "per-layer"])
@pytest.mark.parametrize("name", list(POLICY_FACTORIES))
def test_state_dict_round_trip_continues_identically(
    name: str, shape: tuple[int, ...], split: int
) -> None:
    width = int(np.prod(shape))
    columns = [_spiky_norms(50, seed=40 + k, spikes={12: 9.0, 35: 15.0}) for k in range(width)]
    norms = [torch.tensor([c[t] for c in columns], dtype=F64).reshape(shape) for t in range(50)]

    uninterrupted = _run(POLICY_FACTORIES[name](), norms)

    first = POLICY_FACTORIES[name]()
    before = _run(first, norms[:split])
    state = _round_trip(first.state_dict())
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    resumed = POLICY_FACTORIES[name]()
    resumed.load_state_dict(state)
    after = _run(resumed, norms[split:])

    for t, (a, b) in enumerate(zip(uninterrupted, before + after)):
        assert torch.equal(a, b), (t, a, b)


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("build", "needles"),
    [
        (lambda: AutoClip(percentile=150), ["percentile", "150"]),
        (lambda: AutoClip(percentile=-1), ["percentile", "-1"]),
        (lambda: AutoClip(window=0), ["window", "0"]),
        (lambda: ZClip(mode="median"), ["mode", "'median'"]),
        (lambda: ZClip(clip_option="max"), ["clip_option", "'max'"]),
        (lambda: ZClip(alpha=1.5), ["alpha", "1.5"]),
        (lambda: ZClip(alpha=0), ["alpha", "0"]),
        (lambda: ZClip(z_thresh=-2.0), ["z_thresh", "-2.0"]),
        (lambda: ZClip(max_grad_norm=0.0), ["max_grad_norm", "0.0"]),
        (lambda: ZClip(warmup_steps=0), ["warmup_steps", "0"]),
        (lambda: ZClip(clip_factor=math.nan), ["clip_factor", "nan"]),
        (lambda: EMARatio(ratio=0), ["ratio", "0"]),
        (lambda: EMARatio(decay=1.0), ["decay", "1.0"]),
        (lambda: FixedNorm(max_norm=-1), ["max_norm", "-1"]),
        (lambda: FixedNorm(max_norm=math.inf), ["max_norm", "inf"]),
        (lambda: FixedValue(clip_value=0), ["clip_value", "0"]),
        (lambda: AGC(clipping=-0.1), ["clipping", "-0.1"]),
        (lambda: AGC(eps=0), ["eps", "0"]),
        (lambda: clip_by_value_([torch.ones(2)], -1.0), ["clip_value", "-1.0"]),
        (lambda: agc_([], clipping=0.0), ["clipping", "0.0"]),
    ],
)
def test_bad_arguments_name_argument_and_value(build: Any, needles: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        build()
    message = str(info.value)
    for needle in needles:
        assert needle in message, message


def test_make_policy_unknown_name_lists_choices() -> None:
    with pytest.raises(ValueError, match=re.escape("'zclipp'")) as info:
        make_policy("zclipp")
    for choice in POLICIES:
        assert repr(choice) in str(info.value)
    zclip = ZClip(z_thresh=3.0)
    assert make_policy(zclip) is zclip
    for name, cls in POLICIES.items():
        assert type(make_policy(name)) is cls


# --------------------------------------------------------------------------- host sync

ALL_POLICIES = {
    "norm": lambda: FixedNorm(1.0),
    "value": lambda: FixedValue(0.5),
    "agc": lambda: AGC(),
    **POLICY_FACTORIES,
    "zclip-mean": lambda: ZClip(warmup_steps=5, clip_option="mean"),
}


@pytest.mark.parametrize("shape", [(), (3,)], ids=["global", "per-layer"])
@pytest.mark.parametrize("name", list(ALL_POLICIES))
def test_policies_do_not_sync_with_host(name: str, shape: tuple[int, ...]) -> None:
    width = int(np.prod(shape))
    columns = [_spiky_norms(30, seed=50 + k, spikes={20: 10.0}) for k in range(width)]
    norms = [torch.tensor([c[t] for c in columns], dtype=F64).reshape(shape) for t in range(30)]
    norms[15] = torch.full(shape, math.nan, dtype=F64)
    gen = torch.Generator().manual_seed(51)
    params = [torch.nn.Parameter(torch.randn(3, 4, generator=gen)) for _ in range(3)]
    grads = [torch.randn(3, 4, generator=gen) for _ in params]
    for p, g in zip(params, grads):
        p.grad = g
    group_index = torch.arange(3) if shape else None

    policy = ALL_POLICIES[name]()
    with SyncCounter() as counter:
        for norm in norms:  # the whole protocol but the application
            plan = policy.decide(policy.prepare(params, grads, group_index), norm)
            plan.needs_scaling()
            plan.clipped_norm()
        for norm in norms[:5]:
            policy.clip_(params, grads, norm, group_index)
        clip_by_norm_(grads, norms[0].new_tensor(1.0), norms[0].new_tensor(2.0))
    assert counter.counts == Counter(), counter.counts


def test_a_policy_must_be_of_a_kind() -> None:
    """ClipPolicy is the protocol; a subclass of it alone is told which kind to subclass."""

    class Bare(ClipPolicy):
        def threshold(self, norm: torch.Tensor) -> torch.Tensor:
            return norm

    g = torch.ones(3)
    with pytest.raises(NotImplementedError, match=r"subclass NormPolicy .* or DirectClipper"):
        Bare().clip_([g], [g], torch.tensor(1.0))

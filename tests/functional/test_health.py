"""GradientHealth against a step-by-step reference written in plain Python floats.

The reference is the rule as documented, one step at a time: a vanishing streak per
layer, an exploding streak of the global norm against an EMA of past norms capped at
``explosion_factor`` times the level, and the count and location of non-finite steps.
The class is fed the same scripted norms step by step and deferred (buffered and
worked out later, with buffers that fill up and logging intervals that do not divide
the run), and must end in the same state after every read.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass, field

import pytest
import torch

from lightning_gradguard.functional import GradientHealth, GroupedNorms

INF, NAN = math.inf, math.nan


@dataclass
class Reference:
    """The detection rules, one step at a time, in Python numbers."""

    groups: int
    threshold: float
    factor: float
    patience: int
    warmup: int
    decay: float
    steps: int = 0
    level: float = 0.0
    explode_streak: int = 0
    explosions: int = 0
    nonfinite_steps: int = 0
    vanish_streak: list[int] = field(default_factory=list)
    vanishing: list[bool] = field(default_factory=list)
    first_nonfinite: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.vanish_streak = [0] * self.groups
        self.vanishing = [False] * self.groups
        self.first_nonfinite = [False] * self.groups

    def step(self, groups: list[float], total: float, measured: list[bool] | None) -> None:
        finite = [math.isfinite(g) for g in groups]
        if not all(finite):
            if self.nonfinite_steps == 0:
                self.first_nonfinite = [not f for f in finite]
            self.nonfinite_steps += 1
        for i, g in enumerate(groups):
            small = finite[i] and g < self.threshold and (measured is None or measured[i])
            self.vanish_streak[i] = self.vanish_streak[i] + 1 if small else 0
            if self.vanish_streak[i] >= self.patience:
                self.vanishing[i] = True
        cap = self.factor * self.level
        high = self.steps >= self.warmup and not total <= cap  # a NaN norm is "high"
        self.explode_streak = self.explode_streak + 1 if high else 0
        if self.explode_streak == self.patience:
            self.explosions += 1
        if math.isfinite(total):
            if self.steps == 0:
                self.level = total
            else:
                self.level = self.decay * self.level + (1 - self.decay) * min(total, cap)
            self.steps += 1


def _script(seed: int, steps: int, groups: int) -> list[tuple[list[float], float, list[bool]]]:
    """Norms with every event: vanishing layers, spikes, explosions, inf and NaN, gaps."""
    rng = torch.Generator().manual_seed(seed)
    rows = []
    for t in range(steps):
        base = (torch.rand(groups, generator=rng, dtype=torch.float64) + 0.5).tolist()
        if t % 17 < 9:  # layer 0 vanishes in runs of 9 steps
            base[0] = 1e-9
        if groups > 2 and t > 5:  # layer 2 vanishes for good
            base[2] = 1e-12
        if t in (31, 32, 33, 34, 35, 36, 50, 51, 52, 53, 54, 55, 56, 80):  # spikes, explosions
            base[1] *= 500.0
        if t == 40:
            base[1] = INF
        if t in (44, 70):
            base[-1] = NAN
        total = math.sqrt(sum(g * g for g in base))  # inf or NaN when a layer is
        measured = [not (i == 0 and t % 23 == 3) for i in range(groups)]  # a frozen step
        rows.append((base, total, measured))
    return rows


def _state(health: GradientHealth) -> dict[str, object]:
    return {
        "steps": int(health.steps),
        "level": float(health.level),
        "explode_streak": int(health.explode_streak),
        "explosions": int(health.explosions),
        "nonfinite_steps": int(health.nonfinite_steps),
        "vanish_streak": health.vanish_streak.tolist(),
        "vanishing": health.vanishing.tolist(),
        "first_nonfinite": health.first_nonfinite.tolist(),
    }


def _expected(reference: Reference) -> dict[str, object]:
    return {
        "steps": reference.steps,
        "level": pytest.approx(reference.level, rel=1e-12),
        "explode_streak": reference.explode_streak,
        "explosions": reference.explosions,
        "nonfinite_steps": reference.nonfinite_steps,
        "vanish_streak": reference.vanish_streak,
        "vanishing": reference.vanishing,
        "first_nonfinite": reference.first_nonfinite,
    }


@pytest.mark.parametrize(
    ("read_every", "buffer_steps", "warmup", "first_nan"),
    [(1, 64, 20, False), (7, 64, 20, False), (50, 16, 0, True), (13, 5, 3, False)],
)
def test_deferred_steps_give_the_step_by_step_result(
    read_every: int, buffer_steps: int, warmup: int, first_nan: bool
) -> None:
    groups, patience = 4, 3
    script = _script(seed=read_every, steps=90, groups=groups)
    if first_nan:  # a non-finite norm before the level exists
        script[0] = ([NAN] * groups, NAN, [True] * groups)
    config = {"vanishing_threshold": 1e-7, "explosion_factor": 10.0, "patience": patience}
    health = GradientHealth(
        groups, warmup_steps=warmup, ema_decay=0.98, buffer_steps=buffer_steps, **config
    )
    reference = Reference(groups, 1e-7, 10.0, patience, warmup, 0.98)
    reads = 0
    for t, (values, total, measured) in enumerate(script):
        read = t % read_every == 0
        norms = GroupedNorms(
            torch.tensor(values, dtype=torch.float64),
            torch.tensor(total, dtype=torch.float64),
            2.0,
            torch.tensor(measured),
        )
        health.update(norms, defer=not read)
        reference.step(values, total, measured)
        if read:
            reads += 1
            assert _state(health) == _expected(reference), t
    assert _state(health) == _expected(reference)
    # The script does exercise every rule.
    assert reference.explosions >= 2 and reference.nonfinite_steps >= 3
    assert reference.vanishing[0] and reference.vanishing[2] and not reference.vanishing[3]
    assert reads == len(range(0, len(script), read_every))


def _norms(values: list[float], total: float) -> GroupedNorms:
    as_tensor = torch.tensor(values, dtype=torch.float64)
    return GroupedNorms(as_tensor, torch.tensor(total, dtype=torch.float64), 2.0)


def test_deferred_steps_survive_state_dict_copy_and_rollback() -> None:
    script = _script(seed=3, steps=30, groups=3)
    health = GradientHealth(3, patience=2, warmup_steps=2, vanishing_threshold=1e-7)
    reference = Reference(3, 1e-7, 10.0, 2, 2, 0.98)
    for values, total, _ in script[:20]:
        health.update(_norms(values, total), defer=True)
        reference.step(values, total, None)
    copy = pickle.loads(pickle.dumps(health))  # deferred steps travel with a copy
    saved = health.state_dict()  # works them out first
    fresh = GradientHealth(3, patience=2, warmup_steps=2, vanishing_threshold=1e-7)
    fresh.load_state_dict(saved)
    assert _state(fresh) == _expected(reference)
    assert _state(copy) == _expected(reference)
    for values, total, _ in script[20:]:  # steps after the snapshot are rolled back
        health.update(_norms(values, total), defer=True)
    health.load_state_dict(saved)
    assert _state(health) == _expected(reference)


def test_bad_buffer_steps_is_named() -> None:
    with pytest.raises(ValueError, match=r"GradientHealth\(buffer_steps=0\)"):
        GradientHealth(2, buffer_steps=0)

"""The doctor's one activity path: call sites from ActivityTracker, data flow from its observer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gradguard.doctor import diagnose
from lightning_gradguard.functional import ActivityTracker, register_activation


class Squash(nn.Module):
    """A third-party activation the name rule does not know: relu(x) squared."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) ** 2


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act, self.head = nn.Linear(6, 12), Squash(), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc(x)))


def test_an_activation_is_measured_as_a_function_then_as_a_registered_module() -> None:
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.fc.bias[:4] -= 30.0  # four units never positive
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    with torch.no_grad():
        expected = float((model.fc(x) <= 0).all(dim=0).double().mean())
    assert expected >= 4 / 12

    before = diagnose(model, (x, y), steps=1).row("fc")  # the relu inside Squash.forward
    assert (before.activation, before.activation_module) == ("F.relu", "act:relu")
    assert before.dead_fraction == expected

    register_activation(Squash)  # from now on the module is the call site
    after = diagnose(model, (x, y), steps=1).row("fc")
    assert (after.activation, after.activation_module) == ("Squash", "act")
    assert after.dead_fraction == expected


def test_a_failing_observer_is_a_warning_and_the_measurement_goes_on() -> None:
    relu = nn.ReLU()
    tracker = ActivityTracker([("act", relu)])

    def broken(key: object, output: torch.Tensor) -> None:
        raise RuntimeError("no room")

    tracker.observe(broken)
    tracker.attach()
    with pytest.warns(UserWarning, match=r"observer failed at call site 'act' \(RuntimeError"):
        relu(torch.tensor([[1.0, -1.0]]))
    tracker.new_pass()
    relu(torch.tensor([[2.0, -3.0]]))  # warned once
    tracker.detach()
    assert tracker.stats()["act"].dead.tolist() == [False, True]

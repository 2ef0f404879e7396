"""Dead / dormant unit statistics and ReLU surgery, on hand-built inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_gradguard.functional import (
    ActivityTracker,
    swap_activations,
    swap_functional_relu,
    unit_dim,
)
from lightning_gradguard.functional.surgery import activation_types


class _Identity(nn.Module):
    """An 'activation' that returns its input, so tests choose the outputs exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _track(outputs: list[torch.Tensor], layout: str = "auto") -> ActivityTracker:
    module = _Identity()
    tracker = ActivityTracker([("act", module)], layout)
    tracker.attach()
    for out in outputs:
        tracker.new_pass()  # one forward pass per batch
        module(out)
    tracker.detach()
    return tracker


def test_linear_layout_dead_units_and_dormancy_scores() -> None:
    batch_1 = torch.tensor([[1.0, 0.0, -1.0, 0.0], [3.0, 0.0, -2.0, 0.0]])
    batch_2 = torch.tensor([[2.0, -5.0, -1.0, 0.0], [2.0, 0.0, -1.0, 0.5]])
    stats = _track([batch_1, batch_2]).stats()["act"]
    # Units 1 and 2 are never positive; unit 3 is positive once.
    assert stats.dead.tolist() == [False, True, True, False]
    assert stats.dead_fraction == 0.5
    assert stats.samples == 4
    mean_abs = torch.tensor([8.0, 5.0, 5.0, 0.5], dtype=torch.float64) / 4
    expected = mean_abs / mean_abs.mean()
    torch.testing.assert_close(stats.scores, expected)
    # scores: [1.73, 1.08, 1.08, 0.108]
    assert stats.dormant(0.11).tolist() == [False, False, False, True]
    assert stats.dormant_fraction(0.11) == 0.25
    assert stats.dormant_fraction(0.1) == 0.0


def test_conv_layout_counts_channels_over_batch_and_space() -> None:
    out = torch.full((2, 3, 4, 4), -1.0)
    out[1, 0, 3, 3] = 2.0  # channel 0 alive at a single position of a single sample
    out[:, 2] = 1.0  # channel 2 alive everywhere
    stats = _track([out]).stats()["act"]
    assert stats.dead.tolist() == [False, True, False]
    assert stats.samples == 2 * 4 * 4


def test_sequence_layout_uses_last_dimension_and_can_be_forced() -> None:
    out = torch.full((2, 5, 3), -1.0)
    out[..., 1] = 1.0
    assert _track([out]).stats()["act"].dead.tolist() == [True, False, True]
    forced = _track([out], layout="channels_first").stats()["act"]
    assert forced.dead.numel() == 5
    assert unit_dim(torch.zeros(2, 5, 3), "channels_first") == 1
    assert unit_dim(torch.zeros(2, 3, 4, 4)) == 1


def test_inplace_relu_is_measured_after_activation() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(inplace=True))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([-1.0, 1.0]))
    tracker = ActivityTracker.for_module(model)
    assert list(tracker.modules) == ["1"]
    tracker.attach()
    model(torch.randn(6, 3))
    tracker.detach()
    assert tracker.stats()["1"].dead.tolist() == [True, False]


def test_hooks_and_mode_exist_only_while_attached() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    tracker = ActivityTracker.for_module(model)
    modes_before = torch._C._len_torch_function_stack()
    assert not model[1]._forward_hooks
    tracker.attach()
    tracker.attach()  # idempotent
    assert model[1]._forward_hooks and model[0]._forward_pre_hooks
    assert torch._C._len_torch_function_stack() == modes_before + 1
    tracker.detach()
    assert not model[1]._forward_hooks and not model[0]._forward_pre_hooks
    assert torch._C._len_torch_function_stack() == modes_before
    model(torch.randn(2, 3))
    assert tracker.stats() == {}  # nothing measured while detached


def test_swap_keeps_inplace_and_reports_names() -> None:
    model = nn.Sequential(
        nn.Linear(2, 2), nn.ReLU(inplace=True), nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    )
    assert swap_activations(model, negative_slope=0.2) == ["1", "2.1"]
    assert isinstance(model[1], nn.LeakyReLU) and model[1].inplace
    assert isinstance(model[2][1], nn.LeakyReLU) and not model[2][1].inplace
    assert model[1].negative_slope == 0.2
    assert activation_types(model, ["1", "2.1"]) == ["LeakyReLU", "LeakyReLU"]
    x = torch.randn(4, 2)
    expected = F.leaky_relu(model[2][0](F.leaky_relu(model[0](x), 0.2)), 0.2)
    torch.testing.assert_close(model(x), expected)


def test_swap_warns_when_nothing_matches_and_rejects_bad_names() -> None:
    with pytest.warns(UserWarning, match="swap_functional_relu"):
        assert swap_activations(nn.Sequential(nn.Linear(2, 2), nn.Tanh())) == []
    with pytest.raises(ValueError, match="'0'"):
        swap_activations(nn.Sequential(nn.Linear(2, 2)), names=["0"])
    with pytest.raises(ValueError, match="to='gelu'"):
        swap_activations(nn.Sequential(nn.ReLU()), to="gelu")


def test_prelu_is_refused_once_wrapped_for_ddp() -> None:
    with pytest.raises(ValueError, match="never be synchronized"):
        swap_activations(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), to="prelu", wrapped=True)
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    assert swap_activations(model, to="prelu") == ["1"]
    assert isinstance(model[1], nn.PReLU)


class _FunctionalNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.a(x))
        x = self.b(x).relu()
        return torch.relu_(x)


def test_fx_rewrite_replaces_functional_relus() -> None:
    net = _FunctionalNet()
    rewritten = swap_functional_relu(net, negative_slope=0.1)
    x = torch.randn(7, 3)
    expected = F.leaky_relu(F.leaky_relu(net.b(F.leaky_relu(net.a(x), 0.1)), 0.1), 0.1)
    torch.testing.assert_close(rewritten(x), expected)
    assert rewritten.a is net.a  # parameters are shared, not copied


class _Untraceable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow
            return F.relu(x)
        return x


def test_fx_rewrite_explains_untraceable_models() -> None:
    with pytest.raises(ValueError, match=r"cannot be traced by torch\.fx.*nn\.ReLU modules"):
        swap_functional_relu(_Untraceable())


def test_eval_mode_passes_are_not_counted() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    tracker = ActivityTracker.for_module(model)
    tracker.attach()
    model(torch.randn(4, 3))
    model.eval()
    model(torch.randn(100, 3))  # a validation pass
    tracker.detach()
    assert tracker.stats()["1"].samples == 4


def test_a_width_change_at_one_site_warns_once_and_training_goes_on() -> None:
    relu = nn.ReLU()
    tracker = ActivityTracker([("relu", relu)])
    tracker.attach()
    relu(torch.randn(2, 3))
    with pytest.warns(UserWarning, match=r"'relu'.*shape \[2, 5\] after 3 units") as caught:
        tracker.new_pass()
        out = relu(torch.randn(2, 5))  # same site, another width: no error in forward
        tracker.new_pass()
        relu(torch.randn(2, 5))
    tracker.detach()
    assert out.shape == (2, 5)
    assert len([w for w in caught if "ActivityTracker" in str(w.message)]) == 1
    assert tracker.stats() == {}  # the site is left out of the window, not mixed
    assert "relu" in tracker.not_covered


def test_trackers_leave_the_function_mode_stack_in_any_order() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    first, second = ActivityTracker.for_module(model), ActivityTracker.for_module(model)
    depth = torch._C._len_torch_function_stack()
    first.attach()
    second.attach()
    first.detach()  # not the top of the stack
    assert torch._C._len_torch_function_stack() == depth + 1
    model(torch.randn(2, 3))
    second.detach()
    assert torch._C._len_torch_function_stack() == depth
    assert first.stats() == {} and list(second.stats()) == ["1"]


def test_functional_sites_follow_the_calling_module() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = _FunctionalNet()
            self.act = nn.GELU()  # a module: its own F.gelu call is not a functional site

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.gelu(self.act(self.inner(x)))

    net = Net()
    x = torch.randn(5, 3)
    tracker = ActivityTracker.for_module(net)
    tracker.attach()
    net(x)
    tracker.detach()
    stats = tracker.stats()
    assert list(stats) == ["inner:relu#0", "inner:relu#1", "inner:relu#2", "act", ":gelu"]
    with torch.no_grad():
        a = F.relu(net.inner.a(x))
        b = net.inner.b(a).relu()
    assert stats["inner:relu#0"].dead.tolist() == ((a > 0).sum(0) == 0).tolist()
    assert stats["inner:relu#1"].dead.tolist() == ((b > 0).sum(0) == 0).tolist()


def test_a_paused_mode_comes_back_with_the_next_forward() -> None:
    net = _FunctionalNet()
    tracker = ActivityTracker.for_module(net)
    depth = torch._C._len_torch_function_stack()
    tracker.attach()
    tracker.pause()  # as in on_before_backward: no activation in the backward pass
    assert torch._C._len_torch_function_stack() == depth
    torch.relu(torch.randn(3, 3))  # outside the model while paused: not seen
    net(torch.randn(4, 3))  # the model's forward puts the mode back
    assert torch._C._len_torch_function_stack() == depth + 1
    tracker.detach()
    assert torch._C._len_torch_function_stack() == depth
    # the root's own three ReLU calls; the paused call outside the model is not one of them
    assert list(tracker.stats()) == [":relu#0", ":relu#1", ":relu#2"]

"""Initialization schemes, LSUV, ReDo recycling and shrink-and-perturb, against torch references."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_gradguard.functional import (
    UnitPair,
    consumer_nonlinearities,
    infer_unit_pairs,
    init_,
    lsuv_,
    recycle_units_,
    shrink_perturb_,
)


def _mlp(act: type[nn.Module] = nn.ReLU, depth: int = 4, width: int = 64) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), act()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def test_gain_follows_the_consuming_activation() -> None:
    model = nn.Sequential(
        nn.Linear(4, 4),
        nn.BatchNorm1d(4),
        nn.LeakyReLU(0.2),
        nn.Dropout(),
        nn.Linear(4, 4),
        nn.Tanh(),
        nn.Linear(4, 4),
        nn.GELU(),
        nn.Linear(4, 2),
    )
    assert consumer_nonlinearities(model) == {
        "0": ("leaky_relu", 0.2),
        "4": ("tanh", 0.0),
        "6": None,  # GELU has no standard gain
        "8": ("linear", 0.0),
    }


@pytest.mark.parametrize(
    "scheme", ["kaiming_normal", "kaiming_uniform", "xavier_normal", "xavier_uniform", "orthogonal"]
)
def test_schemes_equal_torch_init_with_the_same_generator(scheme: str) -> None:
    model = nn.Sequential(
        nn.Linear(32, 16), nn.LeakyReLU(0.1), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 2)
    )
    used = init_(model, scheme, generator=torch.Generator().manual_seed(7), bias=0.5)
    expected_nl = {"0": "leaky_relu", "2": "tanh", "4": "linear"}
    assert used == expected_nl
    generator = torch.Generator().manual_seed(7)
    for name, nl, slope in (("0", "leaky_relu", 0.1), ("2", "tanh", 0.0), ("4", "linear", 0.0)):
        weight = torch.empty_like(model.get_submodule(name).weight)
        gain = nn.init.calculate_gain(nl, slope if nl == "leaky_relu" else None)
        if scheme == "kaiming_normal" and nl == "leaky_relu":
            nn.init.kaiming_normal_(weight, a=slope, nonlinearity=nl, generator=generator)
        elif scheme == "kaiming_uniform" and nl == "leaky_relu":
            nn.init.kaiming_uniform_(weight, a=slope, nonlinearity=nl, generator=generator)
        elif scheme == "kaiming_normal":
            weight.normal_(0, gain / math.sqrt(weight.shape[1]), generator=generator)
        elif scheme == "kaiming_uniform":
            bound = math.sqrt(3) * gain / math.sqrt(weight.shape[1])
            weight.uniform_(-bound, bound, generator=generator)
        elif scheme == "xavier_normal":
            nn.init.xavier_normal_(weight, gain=gain, generator=generator)
        elif scheme == "xavier_uniform":
            nn.init.xavier_uniform_(weight, gain=gain, generator=generator)
        else:
            nn.init.orthogonal_(weight, gain=gain, generator=generator)
        torch.testing.assert_close(model.get_submodule(name).weight, weight)
        assert torch.all(model.get_submodule(name).bias == 0.5)


def test_kaiming_relu_keeps_the_signal_scale_through_depth() -> None:
    torch.manual_seed(0)
    model = _mlp(depth=20, width=256)
    init_(model, "kaiming_normal")
    h = torch.randn(512, 256)
    for module in list(model)[:-1]:
        h = module(h)
    # He init keeps E[h^2] ~ E[x^2] for ReLU stacks: the second moment stays O(1).
    assert 0.3 < float(h.pow(2).mean()) < 3.0


def test_gpt2_normal_scales_residual_projections() -> None:
    model = nn.ModuleDict({"attn": nn.Linear(64, 64), "c_proj": nn.Linear(64, 64)})
    init_(
        model,
        "normal",
        std=0.02,
        residual_projections=["*c_proj"],
        n_layers=8,
        generator=torch.Generator().manual_seed(0),
    )
    generator = torch.Generator().manual_seed(0)
    attn = torch.empty(64, 64).normal_(0, 0.02, generator=generator)
    proj = torch.empty(64, 64).normal_(0, 0.02 / math.sqrt(16), generator=generator)
    torch.testing.assert_close(model["attn"].weight, attn)
    torch.testing.assert_close(model["c_proj"].weight, proj)
    with pytest.raises(ValueError, match="n_layers"):
        init_(model, "normal", residual_projections=["*c_proj"])
    with pytest.raises(ValueError, match="scheme='he'"):
        init_(model, "he")


def test_lsuv_reaches_unit_variance_and_names_unreached_layers() -> None:
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _mlp(act=nn.Tanh, depth=10)
            self.unused = nn.Linear(3, 3)  # never reached by forward

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    model = Net()
    batch = torch.randn(256, 64)
    report = lsuv_(model, batch, generator=torch.Generator().manual_seed(0))
    assert report.unreached == ["unused"]
    assert report.not_converged == []
    captured: dict[str, float] = {}
    hooks = [
        m.register_forward_hook(lambda mod, i, o, n=n: captured.__setitem__(n, float(o.std())))
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n != "unused"
    ]
    model(batch)
    for hook in hooks:
        hook.remove()
    assert all(abs(std - 1.0) < 0.1 for std in captured.values()), captured
    with pytest.raises(ValueError, match="tol=0"):
        lsuv_(model, batch, tol=0)


def test_infer_pairs_and_recycle_dead_units_keeps_the_function() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    pairs = infer_unit_pairs(model)
    assert pairs == [UnitPair(producer="0", consumer="3", activation="2", norms=("1",))]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(32, 8)).sum().backward()
    optimizer.step()
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[2, 5, 11]] = True
    with torch.no_grad():  # make the units dead: BN output -> very negative before ReLU
        model[1].bias[dead] = -100.0
    model.eval()
    x = torch.randn(20, 8)
    before = model(x)
    state_before = {k: v.clone() for k, v in optimizer.state[model[0].weight].items()}
    consumer_before = model[3].weight.detach().clone()
    count = recycle_units_(
        model, pairs[0], dead, optimizer, generator=torch.Generator().manual_seed(1)
    )
    assert count == 3
    torch.testing.assert_close(model(x), before)  # dead units contributed 0, and still do
    assert torch.all(model[0].bias[dead] == 0)
    assert torch.all(model[3].weight[:, dead] == 0)
    torch.testing.assert_close(model[3].weight[:, ~dead], consumer_before[:, ~dead])
    assert torch.all(model[1].running_mean[dead] == 0) and torch.all(
        model[1].running_var[dead] == 1
    )
    assert torch.all(model[1].weight[dead] == 1) and torch.all(model[1].bias[dead] == 0)
    state = optimizer.state[model[0].weight]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.all(state[key][dead] == 0)
        torch.testing.assert_close(state[key][~dead], state_before[key][~dead])
    assert torch.equal(state["step"], state_before["step"])  # per-tensor step left as is
    consumer_state = optimizer.state[model[3].weight]
    assert torch.all(consumer_state["exp_avg"][:, dead] == 0)
    # New incoming rows: He-normal for ReLU, std sqrt(2 / fan_in) (statistically).
    rows = model[0].weight[dead]
    assert 0.2 < float(rows.std()) < 0.8  # sqrt(2/8) = 0.5


def test_recycle_rejects_mismatched_masks_and_pairs() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match="one entry per unit"):
        recycle_units_(model, UnitPair("0", "2", "1"), torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="not a producer/consumer pair"):
        recycle_units_(model, UnitPair("2", "0"), torch.ones(4, dtype=torch.bool))


def test_shrink_perturb() -> None:
    torch.manual_seed(0)
    model = _mlp(depth=2, width=8)
    original = [p.detach().clone() for p in model.parameters()]
    shrink_perturb_(model, shrink=0.5, perturb=0.0)
    for p, o in zip(model.parameters(), original):
        torch.testing.assert_close(p, 0.5 * o)
    a, b = _mlp(depth=2, width=8), _mlp(depth=2, width=8)
    b.load_state_dict(a.state_dict())
    shrink_perturb_(a, 0.4, 0.1, generator=torch.Generator().manual_seed(3))
    shrink_perturb_(b, 0.4, 0.1, generator=torch.Generator().manual_seed(3))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)  # the same generator gives the same noise (every rank alike)
    with pytest.raises(ValueError, match="shrink=0"):
        shrink_perturb_(a, shrink=0)

"""Exact values of the functional norms against plain-torch reference computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_gradguard.functional import (
    NormGrouping,
    ParameterSnapshot,
    grad_norms,
    param_norms,
)
from lightning_gradguard.functional.norms import (
    TINY_NORM,
    clean_parameter_name,
    grouped_norms,
    tensor_norms,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 7),
        nn.ReLU(),
        nn.Sequential(nn.Linear(7, 7), nn.LayerNorm(7)),
        nn.Linear(7, 3, bias=False),
    )
    model(torch.randn(11, 5)).pow(2).sum().backward()
    return model


def _reference(model: nn.Module, norm_type: float) -> dict[str, float]:
    out = {}
    for name, module in model.named_modules():
        grads = [p.grad for p in module.parameters(recurse=False) if p.grad is not None]
        if grads:
            out[name] = float(torch.nn.utils.get_total_norm(grads, norm_type).double())
    return out


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
def test_group_and_total_norms_match_torch(norm_type: float) -> None:
    model = _model()
    grouping = NormGrouping.from_module(model)
    assert grouping.names == ("0", "2.0", "2.1", "3")
    norms = grad_norms(grouping, norm_type)
    expected = _reference(model, norm_type)
    assert norms.groups.tolist() == pytest.approx([expected[n] for n in grouping.names], rel=1e-6)
    total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()], norm_type)
    assert float(norms.total) == pytest.approx(float(total), rel=1e-6)


def test_total_matches_clip_grad_norm_return_value() -> None:
    model = _model()
    norms = grad_norms(NormGrouping.from_module(model))
    returned = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9)
    assert float(norms.total) == pytest.approx(float(returned), rel=1e-6)


def test_string_inf_norm() -> None:
    model = _model()
    norms = grad_norms(NormGrouping.from_module(model), "inf")
    expected = max(float(p.grad.abs().max()) for p in model.parameters())
    assert float(norms.total) == pytest.approx(expected)


def test_tiny_gradients_do_not_underflow() -> None:
    # Squares of 1e-24 underflow in float32: the norm must still be exact.
    grads = [torch.full((64, 64), 1e-24), torch.full((64,), 1e-24)]
    norms = tensor_norms(grads, exact=True)
    assert norms.tolist() == pytest.approx([64 * 1e-24, 8 * 1e-24], rel=1e-9)
    grouped = grouped_norms(grads, torch.tensor([0, 0]), 1, exact=True)
    assert float(grouped.total) == pytest.approx(math.sqrt(64 * 64 + 64) * 1e-24, rel=1e-9)
    # The fast float32 path reads 0 here, which is why values below TINY_NORM are redone.
    assert tensor_norms(grads).tolist() == [0.0, 0.0]
    assert float(torch._foreach_norm(grads, 2)[0]) == 0.0


def test_fast_norms_are_exact_above_tiny_norm() -> None:
    torch.manual_seed(0)
    grads = [torch.randn(300, 70) * 1e-9, torch.randn(50) * 1e3, torch.randn(7, 7, 3).half()]
    fast = tensor_norms(grads).tolist()
    exact = [float(torch.linalg.vector_norm(g.double())) for g in grads]
    assert min(exact) > TINY_NORM
    assert fast == pytest.approx(exact, rel=1e-5)


def test_group_by_parameter_depth_and_callable() -> None:
    model = _model()
    by_param = NormGrouping.from_module(model, group_by="parameter")
    assert by_param.names == (
        "0.weight",
        "0.bias",
        "2.0.weight",
        "2.0.bias",
        "2.1.weight",
        "2.1.bias",
        "3.weight",
    )
    values = grad_norms(by_param).groups.tolist()
    expected = [float(p.grad.double().norm()) for p in model.parameters()]
    assert values == pytest.approx(expected, rel=1e-6)

    by_depth = NormGrouping.from_module(model, group_by="depth", depth=1)
    assert by_depth.names == ("0", "2", "3")
    depth_values = grad_norms(by_depth).groups.tolist()
    block = [p.grad for p in model[2].parameters()]
    assert depth_values[1] == pytest.approx(
        float(torch.nn.utils.get_total_norm(block).double()), rel=1e-6
    )

    def weights_only(name: str) -> str | None:
        return "weights" if name.endswith("weight") else None

    custom = NormGrouping.from_module(model, group_by=weights_only)
    assert custom.names == ("weights",)
    weights = [p.grad for n, p in model.named_parameters() if n.endswith("weight")]
    assert float(grad_norms(custom).total) == pytest.approx(
        float(torch.nn.utils.get_total_norm(weights)), rel=1e-6
    )


def test_include_exclude_and_root_group() -> None:
    model = _model()
    model.scale = nn.Parameter(torch.ones(2))  # a parameter on the root module
    excluded = NormGrouping.from_module(model, exclude=["*.bias"])
    assert all(not n.endswith("bias") for n in excluded.parameter_names)
    included = NormGrouping.from_module(model, include=["2.*"])
    assert included.names == ("2.0", "2.1")
    assert NormGrouping.from_module(model).names[0] == "(root)"  # root parameters come first


def test_missing_gradients_count_as_zero() -> None:
    model = _model()
    model[0].weight.grad = None
    norms = grad_norms(NormGrouping.from_module(model))
    assert norms.groups[0].item() == pytest.approx(float(model[0].bias.grad.norm()), rel=1e-6)
    for p in model.parameters():
        p.grad = None
    assert grad_norms(NormGrouping.from_module(model)).groups.tolist() == [0.0] * 4


def test_shared_parameters_are_counted_once() -> None:
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, shared)
    model(torch.randn(2, 3)).sum().backward()
    grouping = NormGrouping.from_module(model)
    assert len(grouping.parameters) == 2
    expected = torch.nn.utils.get_total_norm([shared.weight.grad, shared.bias.grad])
    assert float(grad_norms(grouping).total) == pytest.approx(float(expected), rel=1e-6)


def test_param_norms_match_hand_computation() -> None:
    model = _model()
    grouping = NormGrouping.from_module(model)
    values = param_norms(grouping).groups.tolist()
    expected = [
        math.sqrt(
            sum(
                float(p.detach().double().pow(2).sum())
                for p in model.get_submodule(n).parameters(recurse=False)
            )
        )
        for n in grouping.names
    ]
    assert values == pytest.approx(expected, rel=1e-6)  # float32 accumulation


def test_update_ratio_is_delta_over_old_norm() -> None:
    model = _model()
    grouping = NormGrouping.from_module(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    snapshot = ParameterSnapshot.take(grouping)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    ratios = snapshot.update_ratios(grouping).tolist()
    for group, ratio in zip(grouping.names, ratios):
        names = [n for n in before if n.rpartition(".")[0] == group]
        delta = math.sqrt(
            sum(float((model.get_parameter(n) - before[n]).double().pow(2).sum()) for n in names)
        )
        old = math.sqrt(sum(float(before[n].double().pow(2).sum()) for n in names))
        assert ratio == pytest.approx(delta / old, rel=1e-6)


def test_wrapper_prefixes_are_removed() -> None:
    assert clean_parameter_name("_orig_mod.encoder.0.weight") == "encoder.0.weight"
    assert clean_parameter_name("encoder.module.weight") == "encoder.module.weight"
    assert clean_parameter_name("encoder._fsdp_wrapped_module.0.weight") == "encoder.0.weight"
    compiled = torch.compile(nn.Sequential(nn.Linear(2, 2)))
    assert NormGrouping.from_module(compiled).names == ("0",)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"group_by": "layer"}, "group_by='layer'"),
        ({"group_by": "depth"}, "depth=None"),
        ({"group_by": "depth", "depth": 0}, "depth=0"),
        ({"include": "encoder.*"}, "include='encoder.*'"),
        ({"exclude": [1]}, "exclude=[1]"),
    ],
)
def test_bad_grouping_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(
        (ValueError, TypeError), match=message.replace("[", r"\[").replace("]", r"\]")
    ):
        NormGrouping.from_module(nn.Linear(2, 2), **kwargs)


@pytest.mark.parametrize("bad", [0, -2.0, "two", None])
def test_bad_norm_type_is_named(bad: object) -> None:
    with pytest.raises(ValueError, match="norm_type="):
        grad_norms(NormGrouping.from_module(nn.Linear(2, 2)), bad)  # type: ignore[arg-type]


def test_bf16_gradients() -> None:
    model = _model().to(torch.bfloat16)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    norms = grad_norms(NormGrouping.from_module(model))
    expected = torch.nn.utils.get_total_norm([p.grad.double() for p in model.parameters()])
    assert float(norms.total) == pytest.approx(float(expected), rel=1e-6)


def test_functional_does_not_import_lightning() -> None:
    import subprocess
    import sys

    code = (
        "import sys, lightning_gradguard.functional\n"
        "heavy = ('pytorch_lightning', 'lightning', 'wandb')\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in heavy]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_one_grouping_follows_gradients_that_come_and_go() -> None:
    # The per-grouping facts are worked out once; which gradients a step has is not.
    model = _model()
    grouping = NormGrouping.from_module(model)
    assert grouping.uniform_device() == torch.device("cpu")
    layer_norm = model[2][1].weight
    kept = layer_norm.grad
    for grad in (kept, None, kept * 3):
        layer_norm.grad = grad
        norms = grad_norms(grouping)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        expected = torch.nn.utils.get_total_norm(grads)
        assert float(norms.total) == pytest.approx(float(expected), rel=1e-6)
        assert (norms.measured is None) == (grad is not None)


def test_mixed_dtypes_and_sparse_gradients_take_the_general_path() -> None:
    model = _model()
    model[3].double()
    model[3].weight.grad = torch.randn_like(model[3].weight)
    mixed = NormGrouping.from_module(model)
    assert mixed.uniform_device() is None
    expected = torch.nn.utils.get_total_norm([p.grad.double() for p in model.parameters()])
    assert float(grad_norms(mixed).total) == pytest.approx(float(expected), rel=1e-6)

    embedding = nn.Embedding(6, 3, sparse=True)
    grouping = NormGrouping.from_module(embedding)  # no gradient yet: not left out
    assert grouping.uniform_device() is not None
    embedding(torch.tensor([1, 1, 4])).sum().backward()
    dense = embedding.weight.grad.to_dense()
    assert float(grad_norms(grouping).total) == pytest.approx(float(dense.norm()), rel=1e-6)

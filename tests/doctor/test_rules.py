"""Each doctor rule alone, on hand-built evidence (no model), against hand computations."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
from torch import nn

import lightning_gradguard.doctor as doctor
from lightning_gradguard.doctor import Architecture, Diagnosis, LayerRow, diagnose
from lightning_gradguard.doctor import cli as doctor_cli
from lightning_gradguard.doctor.coverage import dead_units, depth_profile, not_checked
from lightning_gradguard.doctor.evidence import Evidence, Thresholds, first_last_ratio
from lightning_gradguard.doctor.flow import gain
from lightning_gradguard.doctor.rules import (
    RULES,
    batchnorm_small_batch,
    dying,
    exploding,
    find_problems,
    nonfinite,
    saturating,
    unused,
    vanishing,
    weight_scale,
)
from lightning_gradguard.functional import LayerSpec, register_layer, unregister_layer


def layer(name: str, grad: float | None, param: float = 1.0, **kw: Any) -> LayerRow:
    """A Linear row (it has a weight std unless told otherwise)."""
    kw.setdefault("weight_std", 0.1)
    return LayerRow(name, kw.pop("kind", "Linear"), grad, param, **kw)


def stack(grads: list[float], **kw: Any) -> list[LayerRow]:
    return [layer(str(i), g, **kw) for i, g in enumerate(grads)]


# --------------------------------------------------------------------------- nonfinite


def test_nonfinite_names_the_loss_step_the_layers_and_the_largest_weights() -> None:
    rows = [
        layer("a", 1.0, he_std=0.1, weight_std=0.5),  # 5x the He std
        layer("b", float("nan"), he_std=0.1, weight_std=0.3),
        layer("c", float("inf")),
    ]
    finding = nonfinite(Evidence(rows, losses=[2.0, float("inf")]))
    assert finding is not None and finding.severity == "error"
    assert finding.message == "the loss is inf at step 1; the gradients of 'b', 'c' are not finite."
    assert finding.layers == ("b", "c")
    assert "('a', 'b' at 5x the He std)" in finding.recommendations[1]
    assert nonfinite(Evidence(stack([1.0, 2.0]), losses=[1.0])) is None


# --------------------------------------------------------------------------- depth profile


def test_first_last_ratio_uses_finite_linear_conv_rows_only() -> None:
    rows = [
        layer("norm", 1e-12, weight_std=None),  # not a matrix layer
        layer("first", 3e-6),
        layer("mid", float("nan")),
        layer("last", 1.5),
        layer("unused", None),
    ]
    assert first_last_ratio(rows) == 3e-6 / 1.5
    assert first_last_ratio(rows[:2]) is None
    assert first_last_ratio([layer("a", 1.0), layer("b", 0.0)]) is None


def test_vanishing_message_matches_the_per_layer_factor_by_hand() -> None:
    grads = [1e-9 * 10**i for i in range(9)]  # 1e-9 ... 0.1: a factor 10 per layer
    finding = vanishing(Evidence(stack(grads)))
    assert finding is not None and finding.kind == "vanishing" and finding.severity == "error"
    ratio = grads[0] / grads[-1]
    assert f"first/last = {ratio:.2e}, a factor {ratio ** (1 / 8):.2g} per layer" in finding.message
    tiny = [str(i) for i, g in enumerate(grads) if g < 1e-7]
    assert finding.layers == tuple(tiny) and f"{len(tiny)} layer(s) below 1e-07" in finding.message
    # no tiny layer: the first layer is named
    healthy_tail = [g * 1e6 for g in grads]
    assert vanishing(Evidence(stack(healthy_tail))).layers == ("0",)  # type: ignore[union-attr]
    assert vanishing(Evidence(stack([0.5, 1.0]))) is None


def test_vanishing_advice_follows_the_activation_and_the_architecture() -> None:
    grads = [1e-9, 1e-3, 1.0]
    sigmoid = vanishing(Evidence(stack(grads, activation="Sigmoid")))
    assert sigmoid is not None
    assert "3 layers feed a sigmoid without normalization" in sigmoid.message
    assert sigmoid.recommendations[0].startswith("Replace the sigmoids by ReLU")
    assert any("skip connections" in r for r in sigmoid.recommendations)
    tanh = vanishing(Evidence(stack(grads, activation="Tanh")))
    assert tanh is not None and "Glorot (Xavier) init and tanh's gain" in tanh.recommendations[0]
    # ReLU layers at 0.2x the He std, one of them with dead units, in a ResNet-like model
    rows = stack(grads, activation="F.relu", weight_std=0.02, he_std=0.1)
    rows[1] = layer("1", 1e-3, activation="F.relu", weight_std=0.02, he_std=0.1, dead_fraction=0.6)
    arch = Architecture(normalization=True, residual=True)
    relu = vanishing(Evidence(rows, architecture=arch))
    assert relu is not None
    assert relu.recommendations[0].endswith("Now the weights are 0.2x the He std.")
    assert relu.recommendations[1] == "Dead ReLU units pass no gradient: see the 'dying' finding."
    text = " ".join(relu.recommendations)
    assert "skip connections" not in text and "Normalize" not in text
    assert relu.recommendations[-1].startswith("Check the loss curve")


def test_saturating_only_when_five_sigmoid_layers_and_no_vanishing() -> None:
    five = stack([1.0] * 5, activation="Sigmoid")
    finding = saturating(Evidence(five, batch_size=4))
    assert finding is not None and finding.severity == "warning" and len(finding.layers) == 5
    assert "at batch size 4" in finding.recommendations[1]
    assert saturating(Evidence(five[:4])) is None
    normalized = [layer(r.name, 1.0, activation="Sigmoid", normalized=True) for r in five]
    assert saturating(Evidence(normalized)) is None
    vanishing_five = stack([1e-9, 1, 1, 1, 1], activation="Sigmoid")
    assert saturating(Evidence(vanishing_five)) is None  # reported inside 'vanishing'


# --------------------------------------------------------------------------- exploding


def test_exploding_global_norm_steep_layers_and_reinit_advice_by_hand() -> None:
    he = math.sqrt(2 / 64)
    rows = [
        layer("0", 60.0, param=10.0, weight_std=0.2, he_std=he),
        layer("1", 90.0, param=30.0, weight_std=0.3, he_std=he),
        layer("2", 5.0, param=100.0, weight_std=0.1, he_std=he, normalized=True),
        layer("3", 40.0, param=1.0, weight_std=0.2, he_std=he),  # last: left out of 'steep'
    ]
    finding = exploding(Evidence(rows))
    assert finding is not None and finding.severity == "error"
    total = math.sqrt(60**2 + 90**2 + 5**2 + 40**2)
    assert f"the global gradient norm is {total:.2e} (> 100)" in finding.message
    assert finding.layers == ("0", "1")  # ratios 6 and 3; '2' is normalized, '3' is last
    assert "(worst '0': 6.00e+00)" in finding.message
    mean = math.sqrt((0.2 / he) * (0.3 / he))  # geometric mean over the unnormalized hidden
    reinit = next(r for r in finding.recommendations if r.startswith("Re-initialize"))
    assert f"on average {mean:.2g}x the He std" in reinit
    assert f"about {mean**2:.2g}x over 2 layers" in reinit
    assert finding.recommendations[-1].startswith("Normalize before the activation")
    normed = exploding(Evidence(rows, architecture=Architecture(normalization=True)))
    assert normed is not None and not normed.recommendations[-1].startswith("Normalize")


def test_exploding_growth_toward_the_input_and_silence_when_not_finite() -> None:
    growing = exploding(Evidence(stack([1.0, 1e-5]), thresholds=Thresholds(exploding_ratio=1e9)))
    assert growing is not None and "grows toward the input (first/last = 1.00e+05)" in (
        growing.message
    )
    loud = stack([500.0, 1.0])
    assert exploding(Evidence(loud, losses=[float("nan")])) is None
    assert exploding(Evidence([*loud, layer("x", float("inf"))])) is None
    assert exploding(Evidence(stack([0.5, 0.5]))) is None


# --------------------------------------------------------------------------- dying


def _fed(name: str, site: str, dead: float, activation: str = "ReLU", **kw: Any) -> LayerRow:
    return layer(name, 1.0, dead_fraction=dead, activation=activation, activation_module=site, **kw)


def test_dying_one_entry_per_call_site_with_the_first_layer_feeding_it() -> None:
    rows = [
        _fed("conv1", "block.relu#0", 0.5),
        _fed("conv2", "block.relu#1", 0.75),
        _fed("down", "block.relu#1", 0.75),  # the same call: not listed twice
        _fed("ffn", "enc:relu", 0.6, activation="F.relu"),
        _fed("mlp", "mlp.act", 0.99, activation="GELU"),  # not ReLU: its units still pass
        _fed("low", "low.relu", 0.49),
    ]
    finding = dying(Evidence(rows, samples=64))
    assert finding is not None and finding.severity == "warning"
    assert finding.layers == ("conv1", "conv2", "ffn")
    assert finding.message == (
        "units never active on the batch, so they pass no gradient: "
        "50% of ReLU 'block.relu#0' after 'conv1', 75% of ReLU 'block.relu#1' after 'conv2', "
        "60% of F.relu 'enc:relu' after 'ffn'."
    )
    assert dying(Evidence(rows[-2:])) is None


def test_dying_severity_bias_advice_scale_and_few_samples() -> None:
    rows = [
        _fed("a", "s0", 0.9, weight_std=0.5, he_std=0.1),
        _fed("b", "s1", 0.6),
    ]
    finding = dying(Evidence(rows, samples=8, bias_means={"a": -3.0, "b": -0.4}))
    assert finding is not None and finding.severity == "error"  # 90% and more
    assert finding.recommendations[0] == (
        "Initialize biases at 0: the biases of 'a' (mean -3) push the units below 0."
    )
    assert any(
        r.endswith("Now the weights of 'a' are off the He std.") for r in finding.recommendations
    )
    assert "(measured on only 8 samples: a unit can look dead by chance)" in finding.message
    plain = dying(Evidence(rows[1:], samples=16))
    assert plain is not None and plain.recommendations[0].startswith("Use LeakyReLU(0.01)")
    assert "measured on only" not in plain.message


# --------------------------------------------------------------------------- the others


def test_batchnorm_small_batch_below_the_threshold_only() -> None:
    norms = ("bn", "sync")
    finding = batchnorm_small_batch(Evidence([], batch_size=7, batch_norms=norms))
    assert finding is not None and finding.layers == norms and finding.severity == "warning"
    assert finding.message.startswith("'bn', 'sync' normalize with statistics of 7 samples")
    assert batchnorm_small_batch(Evidence([], batch_size=8, batch_norms=norms)) is None
    assert batchnorm_small_batch(Evidence([], batch_size=None, batch_norms=norms)) is None
    assert batchnorm_small_batch(Evidence([], batch_size=2)) is None
    # read by type: SyncBatchNorm and a BatchNorm without affine parameters count too
    torch.manual_seed(0)
    layers = [nn.Linear(8, 8), nn.SyncBatchNorm(8), nn.ReLU(), nn.Linear(8, 8)]
    model = nn.Sequential(*layers, nn.BatchNorm1d(8, affine=False))  # no parameters, no row
    found = diagnose(model, torch.randn(4, 8), loss_fn=lambda m, b: m(b).pow(2).mean(), steps=1)
    finding = next(f for f in found.findings if f.kind == "batchnorm_small_batch")
    assert finding.layers == ("1", "4")


def test_weight_scale_outside_both_bands_and_the_transformer_wording() -> None:
    rows = [
        layer("low", 1.0, weight_std=0.02, he_std=0.1, glorot_std=0.08),  # 0.2x, 0.25x
        layer("glorot_ok", 1.0, weight_std=0.04, he_std=0.1, glorot_std=0.05),  # 0.4x, 0.8x
        layer("high", 1.0, weight_std=0.5, he_std=0.1, glorot_std=0.2),  # 5x, 2.5x
    ]
    finding = weight_scale(Evidence(rows))
    assert finding is not None and finding.severity == "info"
    assert finding.layers == ("low", "high")
    assert "(std/He: 'low' 0.2x, 'high' 5x)" in finding.message
    assert "Transformers" not in finding.message
    gpt = weight_scale(Evidence(rows, architecture=Architecture(transformer=True)))
    assert gpt is not None and "GPT-2: 0.02" in gpt.message
    assert "residual_projections=['*.c_proj']" in gpt.recommendations[0]
    assert weight_scale(Evidence(rows[1:2])) is None


def test_unused_only_for_trainable_layers_without_gradient() -> None:
    rows = [layer("used", 1.0), layer("head", None), layer("frozen", None)]
    finding = unused(Evidence(rows, trainable=frozenset({"used", "head"})))
    assert finding is not None and finding.layers == ("head",) and finding.severity == "info"
    assert unused(Evidence(rows, trainable=frozenset({"used"}))) is None


def test_find_problems_sorts_by_severity_keeping_the_rule_order() -> None:
    rows = [
        layer("0", 1e-9, dead_fraction=0.6, activation="ReLU", activation_module="r"),
        layer("1", 1.0, weight_std=0.5, he_std=0.1, glorot_std=0.1),
        layer("bn", 1.0, kind="BatchNorm1d", weight_std=None),
        layer("spare", None),
    ]
    evidence = Evidence(rows, batch_size=4, trainable=frozenset({"spare"}), batch_norms=("bn",))
    found = [(f.kind, f.severity) for f in find_problems(evidence)]
    assert found == [
        ("vanishing", "error"),
        ("dying", "warning"),
        ("batchnorm_small_batch", "warning"),
        ("weight_scale", "info"),
        ("unused", "info"),
    ]
    assert [f.kind for f in find_problems(evidence, rules=[unused, vanishing])] == [
        "vanishing",
        "unused",
    ]
    assert [rule.__name__ for rule in RULES][:3] == ["nonfinite", "vanishing", "saturating"]


# --------------------------------------------------------------------------- coverage


def test_coverage_lists_unconsumed_layers_and_unmeasured_sites() -> None:
    rows = [
        layer("attn", 1.0),
        layer("fc1", 1.0, activation="ReLU", activation_module="act#0"),
        layer("head", 1.0),  # the last layer: no activation expected
    ]
    entries = dead_units(rows, {"act#0": "an output of shape [4] after 8 units"})
    assert [(e.check, e.layers) for e in entries] == [
        ("dead units", ("attn",)),
        ("dead units", ("fc1",)),
    ]
    assert "call site 'act#0' could not be measured: an output of shape" in entries[1].reason
    assert depth_profile(rows) == []
    assert [e.check for e in not_checked(rows[:1], embeddings=["wte"])] == [
        "depth profile",
        "weight scale",
    ]


# --------------------------------------------------------------------------- classification


@pytest.mark.parametrize(
    ("module", "function", "torch_name", "param"),
    [
        (nn.ReLU(), None, "relu", None),
        (nn.Tanh(), None, "tanh", None),
        (nn.Sigmoid(), None, "sigmoid", None),
        (nn.LeakyReLU(0.2), None, "leaky_relu", 0.2),
        (nn.SELU(), None, "selu", None),
        (None, "relu", "relu", None),
        (None, "selu", "selu", None),
        (None, "leaky_relu", "leaky_relu", 0.01),
        (None, None, "linear", None),
    ],
)
def test_gain_is_torchs_calculate_gain(
    module: nn.Module | None, function: str | None, torch_name: str, param: float | None
) -> None:
    expected = nn.init.calculate_gain(torch_name, param)  # type: ignore[arg-type]
    assert gain(module, function) == pytest.approx(expected, rel=1e-12)


def test_architecture_reads_types_the_unit_map_and_the_documented_name_rules() -> None:
    from models import resnet_tiny, tiny_gpt2

    resnet = Architecture.of(resnet_tiny())
    assert (resnet.normalization, resnet.residual, resnet.transformer) == (True, True, False)
    assert resnet.evidence == (
        "normalization: BatchNorm2d 'bn1'",
        "skip connections: BasicBlock 'layer1.0' (class name)",
    )
    gpt2 = Architecture.of(tiny_gpt2())
    assert gpt2.transformer and gpt2.residual and gpt2.normalization
    assert "attention: GPT2Attention 'transformer.h.0.attn' (class name)" in gpt2.evidence

    class ScaleNorm(nn.Module):  # a third-party norm: its name alone is no evidence
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.weight * x / x.norm(dim=-1, keepdim=True)

    model = nn.Sequential(nn.Linear(4, 4), ScaleNorm())
    assert Architecture.of(model) == Architecture()
    register_layer(ScaleNorm, LayerSpec("norm", bias=None, per_unit=True))
    try:
        registered = Architecture.of(model)
    finally:
        unregister_layer(ScaleNorm)
    assert registered.normalization and registered.evidence == ("normalization: ScaleNorm '1'",)


def test_functional_activation_in_a_residual_forward_feeds_its_layer() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.nn.functional.gelu(self.fc1(x))
            return self.head(torch.relu(self.fc2(h) + x))

    torch.manual_seed(0)
    model = Block()
    with torch.no_grad():
        model.fc2.bias[:3] -= 20.0  # three units of the relu after the residual sum die
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    diagnosis = diagnose(model, (x, y), steps=1)
    fc1, fc2 = diagnosis.row("fc1"), diagnosis.row("fc2")
    assert (fc1.activation, fc1.activation_module) == ("F.gelu", ":gelu")
    assert (fc2.activation, fc2.activation_module) == ("F.relu", ":relu")
    assert diagnosis.row("head").activation is None
    with torch.no_grad():
        pre = model.fc2(torch.nn.functional.gelu(model.fc1(x))) + x
    expected = float((pre <= 0).all(dim=0).double().mean())
    assert expected >= 3 / 8 and fc2.dead_fraction == expected


# --------------------------------------------------------------------------- the public surface


def test_the_package_exports_only_the_public_api() -> None:
    assert set(doctor.__all__) == {
        "FAIL_ON",
        "SEVERITIES",
        "Architecture",
        "Diagnosis",
        "Finding",
        "LayerRow",
        "Unchecked",
        "default_loss",
        "diagnose",
        "main",
    }
    assert doctor_cli.__all__ == ["main"]
    assert not hasattr(doctor_cli, "UsageError") and not hasattr(doctor_cli, "import_object")


def test_argument_errors_use_the_uniform_wording() -> None:
    batch = (torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match=re.escape("diagnose(steps=0): steps must be an integer")):
        diagnose(nn.Linear(2, 2), batch, steps=0)
    with pytest.raises(
        ValueError, match=re.escape("dead_threshold must be a finite number in (0, 1]")
    ):
        diagnose(nn.Linear(2, 2), batch, dead_threshold=1.5)
    diagnosis = Diagnosis(rows=[], findings=[], steps=1, batch_size=None, losses=[])
    with pytest.raises(ValueError, match=r"fail_on must be one of .* Did you mean 'warning'"):
        diagnosis.exit_code_for("warnings")

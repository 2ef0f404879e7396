"""The map of layers and units, on real architectures, against shapes read by hand."""

from __future__ import annotations

import math

import pytest
import torch
from models import resnet_tiny, tiny_gpt2, transformer_encoder
from torch import nn

from lightning_gradguard.functional import (
    LayerSpec,
    fan_in_and_fan_out,
    map_layers,
    register_layer,
    unregister_layer,
)


def test_gpt2_conv1d_units_are_the_output_columns_and_lm_head_is_the_tied_embedding() -> None:
    model = tiny_gpt2()
    layers = map_layers(model)
    wte = model.transformer.wte.weight
    assert model.lm_head.weight is wte  # the premise: GPT-2 ties them
    # The tied weight is listed once, as the embedding, and lm_head is named as tied to it.
    holders = [layer for layer in layers if layer.weight is wte]
    assert [(h.name, h.kind, h.tied_to) for h in holders] == [
        ("transformer.wte", "embedding", ("lm_head",))
    ]
    assert layers.tied == {"lm_head": "transformer.wte"}
    assert layers["lm_head"].name == "transformer.wte"
    assert "lm_head" not in layers.names()
    assert layers.unknown == {}
    # Every parameter of the model is covered exactly once (weights and biases).
    covered = [layer.weight for layer in layers] + [
        layer.bias for layer in layers if layer.bias is not None
    ]
    assert len({id(t) for t in covered}) == len(covered) == len(list(model.parameters()))
    conv1ds = layers.of_kind("conv1d")
    assert len(conv1ds) == 4 * model.config.n_layer
    for layer in conv1ds:
        n_in, n_out = layer.weight.shape  # HF Conv1D stores [in, out]; nf is the output width
        assert layer.module.nf == n_out
        assert (layer.units, layer.fan_in, layer.fan_out) == (n_out, n_in, n_out)
        x = torch.randn(3, n_in)
        # unit j's incoming weights are what output j is made of: y_j = x · W[:, j] + b_j
        y = layer.module(x)
        rows = layer.as_rows()
        assert rows.shape == (n_out, n_in)
        torch.testing.assert_close(y, x @ rows.T + layer.bias)
        torch.testing.assert_close(layer.unit_norms(), layer.weight.detach().norm(dim=0))
    mlp = model.transformer.h[0].mlp
    assert layers["transformer.h.0.mlp.c_fc"].units == mlp.c_fc.nf == 4 * model.config.n_embd
    # torch's own fan computation reads Conv1D the wrong way round: the map does not.
    torch_fans = nn.init._calculate_fan_in_and_fan_out(mlp.c_fc.weight)
    assert fan_in_and_fan_out(mlp.c_fc) == tuple(reversed(torch_fans))
    assert fan_in_and_fan_out(mlp.c_fc) == (model.config.n_embd, 4 * model.config.n_embd)
    ln = layers["transformer.h.0.ln_1"]
    assert (ln.kind, ln.units, ln.fan_in) == ("norm", model.config.n_embd, 1)


def test_resnet_convs_batchnorms_and_downsample() -> None:
    model = resnet_tiny()
    layers = map_layers(model)
    assert layers.unknown == {} and layers.tied == {}
    expected = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))
    }
    assert layers.names() == list(expected)
    down = layers["layer2.0.downsample.0"]
    assert (down.kind, down.units, down.fan_in, down.fan_out) == ("conv", 16, 8, 16)
    conv = layers["layer2.0.conv1"]  # 8 -> 16 channels, 3x3
    assert (conv.units, conv.fan_in, conv.fan_out) == (16, 8 * 9, 16 * 9)
    assert fan_in_and_fan_out(conv.module) == nn.init._calculate_fan_in_and_fan_out(conv.weight)
    torch.testing.assert_close(conv.unit_norms(), conv.weight.detach().flatten(1).norm(dim=1))
    bn = layers["layer2.0.downsample.1"]
    assert (bn.kind, bn.units, bn.bias is model.layer2[0].downsample[1].bias) == ("norm", 16, True)


def test_transformer_encoder_in_proj_is_a_raw_parameter_and_out_proj_a_linear() -> None:
    model = transformer_encoder()
    layers = map_layers(model)
    attn = model.encoder.layers[0].self_attn
    in_proj = layers["encoder.layers.0.self_attn"]
    assert in_proj.parameter_name == "encoder.layers.0.self_attn.in_proj_weight"
    assert in_proj.weight is attn.in_proj_weight and in_proj.bias is attn.in_proj_bias
    assert (in_proj.kind, in_proj.units, in_proj.fan_in) == ("linear", 3 * 16, 16)
    out_proj = layers["encoder.layers.0.self_attn.out_proj"]
    assert type(out_proj.module).__name__ == "NonDynamicallyQuantizableLinear"
    assert (out_proj.kind, out_proj.units) == ("linear", 16)
    assert layers["encoder.layers.0.linear1"].units == 32
    assert layers.unknown == {}
    assert sum(1 for _ in layers) == 2 * 6 + 1  # in/out proj, 2 FFN, 2 norms per layer + head


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_conv_transpose_units_are_output_channels_split_by_groups(groups: int) -> None:
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(8, 12, kernel_size=(3, 2), groups=groups)
    layer = map_layers(nn.Sequential(conv))["0"]
    assert conv.weight.shape == (8, 12 // groups, 3, 2)
    assert (layer.kind, layer.units) == ("conv", 12)
    # Independent: output channel c reads input channels of its group, kernel 3x2.
    assert layer.fan_in == (8 // groups) * 6
    assert layer.fan_out == (12 // groups) * 6
    # Unit c's weights are exactly those that make output channel c: perturbing them
    # changes channel c of the output and no other.
    x = torch.randn(2, 8, 4, 4)
    base = conv(x).detach()
    for c in range(12):
        with torch.no_grad():
            rows = layer.as_rows()
            per_group = 12 // groups
            g, j = divmod(c, per_group)
            expected = conv.weight[g * (8 // groups) : (g + 1) * (8 // groups), j].flatten()
            torch.testing.assert_close(rows[c], expected)
        saved = conv.weight.detach().clone()
        with torch.no_grad():
            mask = torch.zeros(12, dtype=torch.bool)
            mask[c] = True
            layer.layout.view(conv.weight)[layer.layout.unit_mask(mask)] += 1.0
        changed = (conv(x).detach() - base).abs().flatten(2).amax(2).amax(0) > 0
        with torch.no_grad():
            conv.weight.copy_(saved)
        assert changed.nonzero().flatten().tolist() == [c]
    norms = layer.unit_norms()
    expected_norms = torch.stack([layer.as_rows()[c].norm() for c in range(12)])
    torch.testing.assert_close(norms, expected_norms)


class _Dense(nn.Module):
    """A layer the map does not know: its weight is ``kernel``, stored ``[in, out]``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(n_in, n_out))
        self.offset = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.kernel + self.offset


def test_unknown_layers_are_named_and_a_registered_layer_is_read_by_its_spec() -> None:
    model = nn.Sequential(nn.Linear(3, 4), _Dense(4, 6))
    layers = map_layers(model)
    assert layers.names() == ["0"]
    assert layers.unknown == {"1": ("kernel", "offset")}
    with pytest.raises(ValueError, match="register_layer"):
        fan_in_and_fan_out(model[1])
    register_layer(_Dense, LayerSpec("linear", unit_dim=1, weight="kernel", bias="offset"))
    try:
        layers = map_layers(model)
        dense = layers["1"]
        assert layers.unknown == {}
        assert (dense.kind, dense.units, dense.fan_in, dense.fan_out) == ("linear", 6, 4, 6)
        assert dense.bias is model[1].offset
        torch.testing.assert_close(dense.unit_norms(), model[1].kernel.detach().norm(dim=0))
        # A predicate works too, and the newest registration wins.
        register_layer(
            lambda m: isinstance(m, _Dense), LayerSpec("custom", unit_dim=0, weight="kernel")
        )
        layers = map_layers(model)
        assert (layers["1"].kind, layers["1"].units) == ("custom", 4)
        assert layers.unknown == {"1": ("offset",)}  # the new spec names no such bias
        assert layers["1"].bias is None
    finally:
        unregister_layer(_Dense)
        from lightning_gradguard.functional import units

        units._REGISTERED.clear()
    assert map_layers(model).unknown == {"1": ("kernel", "offset")}


def test_bad_specs_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unit_dim=2"):
        LayerSpec("linear", unit_dim=2)
    with pytest.raises(TypeError, match="spec="):
        register_layer(nn.Linear, "linear")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="match="):
        register_layer(3, LayerSpec("linear"))  # type: ignore[arg-type]


def test_embedding_is_a_lookup_table_one_unit_per_row() -> None:
    emb = nn.EmbeddingBag(10, 5)
    layer = map_layers(nn.Sequential(emb))["0"]
    assert (layer.kind, layer.units, layer.fan_in, layer.fan_out) == ("embedding", 10, 1, 5)
    # torch's default N(0, 1) embedding init is Kaiming's std for fan_in 1, gain 1.
    assert math.isclose(1 / math.sqrt(layer.fan_in), 1.0)


def test_compiled_model_is_read_through() -> None:
    model = resnet_tiny()
    compiled = torch.compile(model, backend="eager")
    assert map_layers(compiled).names() == map_layers(model).names()

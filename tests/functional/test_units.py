"""The map of layers and units, on real architectures, against shapes read by hand."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from models import resnet_tiny, tiny_gpt2, transformer_encoder
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard.functional import (
    AGC,
    LayerSpec,
    agc_,
    clip_with_policy_,
    init_,
    lsuv_,
    map_layers,
    register_layer,
    unregister_layer,
)
from lightning_gradguard.functional.units import fan_in_and_fan_out


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
        def is_dense(module: nn.Module) -> bool:
            return isinstance(module, _Dense)

        register_layer(is_dense, LayerSpec("custom", unit_dim=0, weight="kernel"))
        layers = map_layers(model)
        assert (layers["1"].kind, layers["1"].units) == ("custom", 4)
        assert layers.unknown == {"1": ("offset",)}  # the new spec names no such bias
        assert layers["1"].bias is None
        unregister_layer(is_dense)
        assert map_layers(model)["1"].kind == "linear"
    finally:
        unregister_layer(_Dense)
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


def test_compiled_gpt2_is_read_through_by_the_map_agc_init_and_lsuv() -> None:
    from models import gpt2_batch, gpt2_loss

    model = tiny_gpt2()
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = torch.compile(model, backend="eager")
    assert map_layers(compiled).names() == map_layers(model).names()
    report = init_(compiled, "normal", residual_projections=["*.c_proj"], n_layers=2)
    assert report.tied == {"lm_head": "transformer.wte"}
    assert "transformer.h.0.mlp.c_fc" in report
    gpt2_loss(model, gpt2_batch()).backward()  # the gradients: AGC reads the wrapper
    reference = tiny_gpt2()
    reference.load_state_dict(model.state_dict())
    for p, q in zip(reference.parameters(), model.parameters()):
        p.grad = q.grad.clone()
    agc_(compiled, clipping=0.01)
    _hand_agc_(reference, 0.01, 1e-3)
    for p, q in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad)
    lsuv = lsuv_(compiled, gpt2_batch(batch=8))  # run eagerly: no recompile per hook
    assert len(lsuv.output_std) == 8 and lsuv.not_converged == []
    model.compile(backend="eager")  # compiled in place: LSUV still runs the module eagerly
    lsuv = lsuv_(model, gpt2_batch(batch=8))
    assert len(lsuv.output_std) == 8 and lsuv.not_converged == []
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_before


# --------------------------------------------------------------------------- AGC per output unit


def _clip_unit_(w: torch.Tensor, g: torch.Tensor, clipping: float, eps: float) -> None:
    """The paper's rule for one unit: ‖G‖ > λ·max(‖W‖, eps) → G·λ·max(‖W‖, eps)/‖G‖."""
    bound = clipping * max(float(w.double().norm()), eps)
    norm = float(g.double().norm())
    if norm > bound:
        g.mul_(bound / max(norm, 1e-6))


def _hand_agc_(model: nn.Module, clipping: float, eps: float) -> None:
    """AGC written out by hand per layer type, one unit at a time (no library code).

    HF Conv1D ``[in, out]``: unit j is column ``W[:, j]``. Other matrices: unit i is
    ``W[i]`` (Linear, Conv, embedding rows, MultiheadAttention's in_proj). Vectors and
    scalars: the whole tensor.
    """
    seen: set[int] = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen or p.grad is None:
                continue
            seen.add(id(p))
            w, g = p.detach(), p.grad
            if p.dim() <= 1:
                _clip_unit_(w, g, clipping, eps)
            elif type(module).__name__ == "Conv1D" and p is module.weight:
                for j in range(w.shape[1]):
                    _clip_unit_(w[:, j], g[:, j], clipping, eps)
            else:
                for i in range(w.shape[0]):
                    _clip_unit_(w[i], g[i], clipping, eps)


def _gpt2_with_grads(seed: int = 0) -> nn.Module:
    from models import gpt2_batch, gpt2_loss

    model = tiny_gpt2(seed=seed)
    gpt2_loss(model, gpt2_batch(seed=seed)).backward()
    return model


def _conv1d_unit_ratios(model: nn.Module, clipping: float, eps: float) -> torch.Tensor:
    """Every Conv1D output column's ‖G[:, j]‖ / (λ·max(‖W[:, j]‖, eps)), by hand."""
    ratios = []
    for module in model.modules():
        if type(module).__name__ == "Conv1D":
            w, g = module.weight.detach().double(), module.weight.grad.double()
            bound = clipping * w.norm(dim=0).clamp_min(eps)
            ratios.append(g.norm(dim=0) / bound)
    return torch.cat(ratios)


@pytest.mark.parametrize("clipping", [0.01, 0.05])
def test_agc_on_gpt2_clips_every_conv1d_output_unit_to_the_bound(clipping: float) -> None:
    eps = 1e-3
    mine, theirs = _gpt2_with_grads(), _gpt2_with_grads()
    assert (_conv1d_unit_ratios(mine, clipping, eps) > 1.5).any()  # the premise: units clip
    agc_(mine, clipping=clipping, eps=eps)
    _hand_agc_(theirs, clipping, eps)
    for (name, p), q in zip(mine.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert _conv1d_unit_ratios(mine, clipping, eps).max() <= 1 + 1e-5
    # A bare parameter list is read as rows (dim 0), as documented: it cannot bound the
    # Conv1D output columns. With the layouts of the map it can.
    rows = _gpt2_with_grads()
    agc_(list(rows.parameters()), clipping=clipping, eps=eps)
    assert _conv1d_unit_ratios(rows, clipping, eps).max() > 1.5
    listed = _gpt2_with_grads()
    agc_(list(listed.parameters()), clipping, eps, layouts=map_layers(listed).layouts())
    for p, q in zip(listed.parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_agc_policy_bound_to_gpt2_and_clip_with_policy_match_the_hand_formula() -> None:
    clipping, eps = 0.02, 1e-3
    theirs = _gpt2_with_grads()
    _hand_agc_(theirs, clipping, eps)
    by_model = _gpt2_with_grads()
    clip_with_policy_(AGC(clipping, eps), by_model)
    policy = AGC(clipping, eps)
    bound = _gpt2_with_grads()
    policy.bind(bound)
    clip_with_policy_(policy, list(bound.parameters()))
    for mine in (by_model, bound):
        for p, q in zip(mine.parameters(), theirs.parameters()):
            torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("build", [resnet_tiny, transformer_encoder])
def test_agc_on_resnet_and_encoder_still_equals_timm(build: Callable[[], nn.Module]) -> None:
    from distributed_helpers import reference_agc_
    from models import image_batch, sequence_batch

    def with_grads() -> nn.Module:
        model = build()
        x, y = image_batch() if build is resnet_tiny else sequence_batch()
        (nn.functional.cross_entropy(model(x), y) * 100).backward()
        return model

    mine, theirs = with_grads(), with_grads()
    agc_(mine, clipping=0.01)
    reference_agc_(list(theirs.parameters()), clipping=0.01, eps=1e-3)
    changed = 0
    for p, q, r in zip(mine.parameters(), theirs.parameters(), with_grads().parameters()):
        torch.testing.assert_close(p.grad, q.grad)
        changed += int(not torch.equal(p.grad, r.grad))
    assert changed > 0


@pytest.mark.parametrize("groups", [1, 3])
def test_agc_on_grouped_conv_transpose_clips_output_channels(groups: int) -> None:
    torch.manual_seed(1)
    conv = nn.ConvTranspose2d(6, 9, 3, groups=groups)
    conv(torch.randn(2, 6, 5, 5)).pow(2).sum().backward()
    w, g0 = conv.weight.detach().clone(), conv.weight.grad.clone()
    agc_(conv, clipping=0.01)
    ipg, opg = 6 // groups, 9 // groups
    expected = g0.clone()
    for c in range(9):
        k, j = divmod(c, opg)
        rows = slice(k * ipg, (k + 1) * ipg)
        _clip_unit_(w[rows, j], expected[rows, j], 0.01, 1e-3)  # channel c's weights only
    torch.testing.assert_close(conv.weight.grad, expected)
    assert not torch.equal(expected, g0)


def test_agc_names_layers_the_map_does_not_know() -> None:
    model = nn.Sequential(nn.Linear(3, 4), _Dense(4, 6))
    model(torch.randn(5, 3)).sum().backward()
    with pytest.warns(UserWarning, match=r"does not know \['1 \(kernel, offset\)'\]"):
        agc_(model, clipping=0.01)
    with pytest.raises(TypeError, match="parameters must be"):
        agc_([model[0], model[0].weight], clipping=0.01)  # type: ignore[list-item]


# --------------------------------------------------------------------------- init per layer


def _std(t: torch.Tensor) -> float:
    return float(t.detach().double().std())


def _close(actual: float, expected: float, rel: float = 0.12) -> bool:
    return abs(actual - expected) <= rel * expected


class _CountDraws(torch.overrides.TorchFunctionMode):
    """Counts the in-place random draws made on one tensor."""

    def __init__(self, target: torch.Tensor) -> None:
        super().__init__()
        self.target, self.count = target, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if getattr(func, "__name__", "") in ("normal_", "uniform_") and args[0] is self.target:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_gpt2_scheme_scales_c_proj_and_initializes_the_tied_embedding_once() -> None:
    n_layer, n_embd, std = 3, 64, 0.02
    model = tiny_gpt2(n_layer=n_layer, n_embd=n_embd)
    wte = model.transformer.wte.weight
    with _CountDraws(wte) as draws:
        report = init_(
            model, "normal", std=std, residual_projections=["*.c_proj"], n_layers=n_layer
        )
    assert draws.count == 1  # once, as the embedding: not again through lm_head
    assert model.lm_head.weight is wte
    assert report.tied == {"lm_head": "transformer.wte"} and "lm_head" not in report
    assert _close(_std(wte), std)
    for i, block in enumerate(model.transformer.h):
        for layer in (block.attn.c_attn, block.mlp.c_fc):
            assert _close(_std(layer.weight), std), i
            assert torch.count_nonzero(layer.bias) == 0
        for layer in (block.attn.c_proj, block.mlp.c_proj):  # GPT-2: 0.02 / sqrt(2 n_layer)
            assert _close(_std(layer.weight), std / math.sqrt(2 * n_layer)), i
    assert set(report.skipped) == {
        n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)
    }
    assert sorted(report) == sorted(
        ["transformer.wte", "transformer.wpe"]
        + [
            f"transformer.h.{i}.{n}"
            for i in range(n_layer)
            for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        ]
    )
    with pytest.raises(ValueError, match=r"\['\*\.c_prj'\] match no"):
        init_(model, "normal", residual_projections=["*.c_prj"], n_layers=n_layer)


def test_kaiming_on_gpt2_uses_the_conv1d_fan_in_and_the_embedding_is_a_lookup_table() -> None:
    n_embd = 64
    model = tiny_gpt2(n_embd=n_embd)
    init_(model, "kaiming_normal")  # no consuming activation is inferable: relu's gain
    block = model.transformer.h[0]
    # Independent fans, from the config: c_fc reads n_embd inputs, mlp.c_proj 4·n_embd.
    assert _close(_std(block.mlp.c_fc.weight), math.sqrt(2 / n_embd))
    assert _close(_std(block.mlp.c_proj.weight), math.sqrt(2 / (4 * n_embd)))
    assert _close(_std(block.attn.c_attn.weight), math.sqrt(2 / n_embd))
    # nn.init would have read c_fc's [in, out] as fan_in = 4·n_embd: half that std.
    assert not _close(_std(block.mlp.c_fc.weight), math.sqrt(2 / (4 * n_embd)))
    # The (tied) embedding: one-hot input, linear gain, torch's own N(0, 1).
    assert _close(_std(model.transformer.wte.weight), 1.0)


@pytest.mark.parametrize("scheme", ["kaiming_normal", "xavier_uniform"])
def test_resnet_init_std_per_conv_follows_the_scheme(scheme: str) -> None:
    from models import ResNet

    torch.manual_seed(0)
    model = ResNet(layers=(1, 1), widths=(32, 64))
    report = init_(model, scheme)
    assert set(report.skipped) == {
        n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
    }
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        k = module.kernel_size[0] * module.kernel_size[1] if isinstance(module, nn.Conv2d) else 1
        n_in = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
        n_out = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
        # downsample.0 ends its Sequential (BN, no activation): linear gain. Layers outside
        # a Sequential get the scheme's fallback: relu for Kaiming, linear for Glorot.
        linear = name.endswith("downsample.0") or not scheme.startswith("kaiming")
        gain = 1.0 if linear else math.sqrt(2)
        if scheme == "kaiming_normal":
            expected = gain / math.sqrt(n_in * k)
        else:
            expected = gain * math.sqrt(2 / (n_in * k + n_out * k))
        assert report[name] == ("linear" if gain == 1.0 else "relu"), name
        rel = 0.12 if module.weight.numel() >= 800 else 0.3
        assert _close(_std(module.weight), expected, rel), (name, _std(module.weight), expected)


def test_encoder_init_covers_the_raw_in_proj_parameter() -> None:
    from models import EncoderClassifier

    torch.manual_seed(0)
    d = 32
    model = EncoderClassifier(d_model=d)
    report = init_(model, "xavier_normal")
    for layer in model.encoder.layers:
        attn = layer.self_attn
        assert _close(_std(attn.in_proj_weight), math.sqrt(2 / (d + 3 * d)))
        assert torch.count_nonzero(attn.in_proj_bias) == 0
        assert _close(_std(attn.out_proj.weight), math.sqrt(2 / (2 * d)))
        assert _close(_std(layer.linear1.weight), math.sqrt(2 / (d + 32)))
    assert report["encoder.layers.0.self_attn"] == "linear"  # the module's one mapped weight


def test_init_and_lsuv_name_the_layers_they_leave_alone() -> None:
    model = nn.Sequential(nn.Linear(3, 4), _Dense(4, 6))
    with pytest.warns(UserWarning, match=r"init_: left \['1'\]"):
        report = init_(model)
    assert list(report) == ["0"] and "register_layer" in report.skipped["1"]
    with pytest.warns(UserWarning, match=r"lsuv_: left \['1'\]"):
        lsuv = lsuv_(model, torch.randn(32, 3))
    assert list(lsuv.output_std) == ["0"] and "1" in lsuv.skipped


def _output_stds(model: nn.Module, names: list[str], *args: torch.Tensor) -> dict[str, float]:
    """Each named module's output std on one forward pass (eval), by forward hooks."""
    stds: dict[str, float] = {}
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: stds.__setitem__(n, float(o.detach().double().std()))
        )
        for n in names
    ]
    model.eval()
    with torch.no_grad():
        model(*args)
    for h in handles:
        h.remove()
    return stds


def test_lsuv_on_gpt2_gives_unit_variance_per_conv1d_and_names_what_it_skips() -> None:
    from models import gpt2_batch

    model = tiny_gpt2()
    tokens = gpt2_batch(batch=8)
    report = lsuv_(model, tokens)
    conv1ds = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert sorted(report.output_std) == sorted(conv1ds)
    assert report.not_converged == [] and report.unreached == []
    for name, std in _output_stds(model, conv1ds, tokens).items():
        assert abs(std - 1.0) < 0.1, name
    skipped = set(report.skipped)
    norms = {n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    assert skipped == {"transformer.wte", "transformer.wpe", "lm_head"} | norms
    assert "transformer.wte" in report.skipped["lm_head"]


def test_lsuv_on_the_encoder_reports_attention_projections() -> None:
    from models import sequence_batch

    model = transformer_encoder()
    x, _ = sequence_batch(batch=16, length=8)
    report = lsuv_(model, x)
    ffn = [f"encoder.layers.{i}.linear{j}" for i in range(2) for j in (1, 2)]
    assert sorted(report.output_std) == sorted([*ffn, "head"])
    for name, std in _output_stds(model, ffn, x).items():
        assert abs(std - 1.0) < 0.1, name
    # MultiheadAttention uses out_proj's weight without calling the module: unreached.
    assert report.unreached == [f"encoder.layers.{i}.self_attn.out_proj" for i in range(2)]
    for i in range(2):
        assert "not this weight's alone" in report.skipped[f"encoder.layers.{i}.self_attn"]


# --------------------------------------------------------------------------- callbacks on GPT-2


class _GPT2Module(pl.LightningModule):
    def __init__(self, n_embd: int = 64) -> None:
        super().__init__()
        self.model = tiny_gpt2(n_embd=n_embd)
        self.n_embd = n_embd

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        from models import gpt2_loss

        return gpt2_loss(self.model, batch[0])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        from models import gpt2_batch

        return DataLoader(TensorDataset(gpt2_batch(batch=8)), batch_size=4)


class _Observe(pl.Callback):
    """Reads the model where the callbacks before it have acted."""

    def __init__(self) -> None:
        self.init_std: dict[str, float] = {}
        self.max_ratio: list[float] = []
        self.reinit_std: list[float] = []

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        block = pl_module.model.transformer.h[0]
        self.init_std = {
            "c_fc": _std(block.mlp.c_fc.weight),
            "c_proj": _std(block.mlp.c_proj.weight),
            "wte": _std(pl_module.model.transformer.wte.weight),
        }

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.max_ratio.append(float(_conv1d_unit_ratios(pl_module.model, 0.01, 1e-3).max()))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if trainer.global_step == 1:
            self.reinit_std.append(_std(pl_module.model.transformer.h[1].mlp.c_fc.weight))


def test_callbacks_on_gpt2_init_clip_and_reinit_conv1d_by_output_unit() -> None:
    from helpers import quiet_trainer_kwargs

    from lightning_gradguard import AdaptiveGradClip, InitAtStart, LayerReinit

    observe = _Observe()
    module = _GPT2Module()
    n_layer = module.model.config.n_layer
    callbacks = [
        InitAtStart("normal", residual_projections=["*.mlp.c_proj"], n_layers=n_layer),
        AdaptiveGradClip(policy=AGC(clipping=0.01)),
        LayerReinit(at_steps=[1], layers=["model.transformer.h.1.mlp.c_fc"]),
        observe,
    ]
    trainer = pl.Trainer(max_steps=2, callbacks=callbacks, logger=False, **quiet_trainer_kwargs())
    trainer.fit(module)
    assert _close(observe.init_std["c_fc"], 0.02)
    assert _close(observe.init_std["c_proj"], 0.02 / math.sqrt(2 * n_layer))
    assert _close(observe.init_std["wte"], 0.02)
    assert callbacks[0].report.tied == {"model.lm_head": "model.transformer.wte"}
    # Every Conv1D output column of every step within λ·max(‖W_j‖, eps), by hand.
    assert len(observe.max_ratio) == 2 and max(observe.max_ratio) <= 1 + 1e-5
    # Re-initialized with Kaiming (relu gain) through the map: fan_in = n_embd, not 4·n_embd.
    assert len(observe.reinit_std) == 1
    assert _close(observe.reinit_std[0], math.sqrt(2 / module.n_embd))


@pytest.mark.slow
def test_agc_on_gpt2_sharded_like_fsdp2_matches_the_hand_formula(tmp_path: Path) -> None:
    import distributed_helpers as h

    h.launch_ranks("agc_conv1d_run.py", str(tmp_path), timeout=240)
    reference = _gpt2_with_grads()
    _hand_agc_(reference, 0.01, 1e-3)
    results = [h.read_json(tmp_path / f"rank{rank}.json") for rank in range(h.WORLD_SIZE)]
    for result in results:
        # One reduction for the sharded vectors' weights, one for their gradients, one
        # for every Conv1D's column norms (weights and gradients together).
        assert result["all_reduce_calls"] == 3
        grads = result["grads"]
        assert set(grads) == {n for n, _ in reference.named_parameters()}
        for name, p in reference.named_parameters():
            torch.testing.assert_close(torch.tensor(grads[name]), p.grad, msg=name)


@pytest.mark.parametrize("groups", [1, 4])
def test_kaiming_on_conv_transpose_uses_the_inputs_per_output_channel(groups: int) -> None:
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(64, 32, kernel_size=3, groups=groups)
    report = init_(nn.Sequential(conv, nn.ReLU()), "kaiming_normal")
    assert report == {"0": "relu"}
    # Output channel c reads in/groups input channels through a 3x3 kernel.
    expected = math.sqrt(2 / (64 // groups * 9))
    assert _close(_std(conv.weight), expected)
    # nn.init reads weight.shape[1] = out/groups as the fan-in.
    torch_std = math.sqrt(2 / nn.init._calculate_fan_in_and_fan_out(conv.weight)[0])
    assert not _close(torch_std, expected)


def test_lsuv_on_resnet_gives_unit_variance_per_conv_before_its_batchnorm() -> None:
    from models import image_batch

    model = resnet_tiny()
    x, _ = image_batch(batch=16)
    report = lsuv_(model, x)
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(report.output_std) == sorted(convs) and report.not_converged == []
    norms = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert set(report.skipped) == norms
    for name, std in _output_stds(model, convs, x).items():
        assert abs(std - 1.0) < 0.1, name

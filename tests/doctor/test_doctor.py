"""diagnose() and `gradguard doctor` on the calibrated failures of SCENARIOS.md (sklearn digits)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_gradguard import Diagnosis, diagnose
from lightning_gradguard.doctor import main
from lightning_gradguard.functional import trace_call_sites

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The first 64 standardized training digits (SCENARIOS.md set-up)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_train, _, y_train, _ = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    x_train = StandardScaler().fit_transform(x_train)
    return torch.tensor(x_train[:64], dtype=torch.float32), torch.tensor(y_train[:64])


def mlp(depth: int, width: int, activation: type[nn.Module], init: str, **kw: Any) -> nn.Sequential:
    """``depth`` Linear layers 64 -> width ... -> 10 with ``activation`` after the hidden ones."""
    torch.manual_seed(kw.get("seed", 0))
    layers: list[nn.Module] = []
    fan_in = 64
    for _ in range(depth - 1):
        layers += [nn.Linear(fan_in, width), activation()]
        fan_in = width
    layers.append(nn.Linear(fan_in, 10))
    model = nn.Sequential(*layers)
    for layer in model:
        if isinstance(layer, nn.Linear):
            if init == "he":
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            else:
                nn.init.normal_(layer.weight, 0.0, float(init))
            nn.init.constant_(layer.bias, kw.get("bias", 0.0))
    return model


def reference_norm(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], layer: str) -> float:
    """The layer's gradient norm by plain torch.autograd, in float64."""
    x, y = batch
    module = model.get_submodule(layer)
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(module.parameters()))
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))


def kinds(diagnosis: Diagnosis, severity: str | None = None) -> list[str]:
    return [f.kind for f in diagnosis.findings if severity is None or f.severity == severity]


# --------------------------------------------------------------------------- scenarios


def test_s1_deep_sigmoid_stack_is_vanishing(digits: Any) -> None:
    model = mlp(25, 64, nn.Sigmoid, "0.05")
    diagnosis = diagnose(model, digits)
    first, last = reference_norm(model, digits, "0"), reference_norm(model, digits, "48")
    assert first < 1e-20  # the underflow float32 squares would hide
    assert diagnosis.row("0").grad_norm == pytest.approx(first, rel=1e-6)
    assert diagnosis.row("48").grad_norm == pytest.approx(last, rel=1e-6)
    assert diagnosis.first_last_ratio == pytest.approx(first / last, rel=1e-6)
    vanishing = diagnosis.findings[0]
    assert vanishing.kind == "vanishing" and vanishing.severity == "error"
    assert diagnosis.exit_code == 1
    text = " ".join(vanishing.recommendations)
    assert "ReLU with He init" in text and "Glorot init alone does not rescue" in text
    assert "LayerNorm placed after the activation" in text  # no over-promise
    assert [r.activation for r in diagnosis.rows] == ["Sigmoid"] * 24 + [None]


def test_relu_he_net_of_the_same_shape_is_healthy(digits: Any) -> None:
    diagnosis = diagnose(mlp(25, 64, nn.ReLU, "he"), digits)
    assert kinds(diagnosis, "error") == kinds(diagnosis, "warning") == []
    assert diagnosis.exit_code == 0 and diagnosis.healthy
    assert 0.1 < (diagnosis.first_last_ratio or 0) < 10
    assert "Verdict: healthy (exit code 0)" in str(diagnosis)


def test_s2b_exploding_net(digits: Any) -> None:
    diagnosis = diagnose(mlp(10, 128, nn.ReLU, "0.2"), digits)
    assert kinds(diagnosis, "error") == ["exploding"]
    finding = diagnosis.findings[0]
    assert "global gradient norm" in finding.message
    assert any("AdaptiveGradClip(policy='norm')" in r for r in finding.recommendations)
    reinit = next(r for r in finding.recommendations if r.startswith("Re-initialize"))
    # 0.2 against sqrt(2/64) for the first layer and sqrt(2/128) for the 8 others
    expected = math.exp(
        (math.log(0.2 / math.sqrt(2 / 64)) + 8 * math.log(0.2 / math.sqrt(2 / 128))) / 9
    )
    mean = float(re.search(r"on average ([0-9.]+)x the He std", reinit).group(1))  # type: ignore[union-attr]
    assert mean == pytest.approx(expected, abs=0.06)


def test_dying_relu_dead_fraction_matches_an_independent_count(digits: Any) -> None:
    model = mlp(4, 256, nn.ReLU, "he")
    with torch.no_grad():
        model[2].bias.fill_(-4.0)  # second hidden layer pushed below zero
    diagnosis = diagnose(model, digits)
    x, _ = digits
    with torch.no_grad():
        hidden = torch.relu(model[0](x))
        pre = model[2](hidden)
    expected = float((pre <= 0).all(dim=0).double().mean())
    assert 0.5 < expected < 1.0
    assert diagnosis.row("2").dead_fraction == expected
    assert diagnosis.row("2").activation_module == "3"
    first_expected = float((model[0](x) <= 0).all(dim=0).double().mean())
    assert diagnosis.row("0").dead_fraction == first_expected
    dying = next(f for f in diagnosis.findings if f.kind == "dying")
    assert dying.layers == ("2",)
    assert any("biases of '2'" in r for r in dying.recommendations)
    assert any("LeakyReLU" in r for r in dying.recommendations)
    assert diagnosis.exit_code == 1


def test_weight_scale_against_he_and_glorot_formulas() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 40), nn.Tanh(), nn.Conv1d(1, 2, 3)
    )
    batch = torch.randn(16, 20)
    diagnosis = diagnose(model, batch, loss_fn=lambda m, b: m[:4](b).pow(2).mean(), steps=1)
    relu_row, tanh_row = diagnosis.row("0"), diagnosis.row("2")
    std = float(model[0].weight.detach().double().std())
    assert relu_row.he_ratio == pytest.approx(std / math.sqrt(2 / 20), rel=1e-12)
    assert relu_row.glorot_ratio == pytest.approx(std / (math.sqrt(2) * math.sqrt(2 / 50)))
    tanh_std = float(model[2].weight.detach().double().std())
    assert tanh_row.glorot_ratio == pytest.approx(tanh_std / (5 / 3 * math.sqrt(2 / 70)))
    assert tanh_row.activation == "Tanh"
    assert diagnosis.row("4").grad_norm is None  # never used by the loss
    assert "unused" in kinds(diagnosis, "info")


def test_small_batch_recommends_layernorm_or_groupnorm(digits: Any) -> None:
    x, y = digits
    small = (x[:4], y[:4])
    diagnosis = diagnose(mlp(25, 64, nn.Sigmoid, "0.05"), small, steps=1)
    text = " ".join(diagnosis.findings[0].recommendations)
    assert "GroupNorm or LayerNorm" in text and "batch size 4" in text
    assert diagnosis.batch_size == 4

    torch.manual_seed(0)
    with_bn = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    found = diagnose(with_bn, small, steps=1)
    finding = next(f for f in found.findings if f.kind == "batchnorm_small_batch")
    assert finding.severity == "warning" and finding.layers == ("1",)
    assert "GroupNorm or LayerNorm" in finding.recommendations[0]
    assert found.row("0").normalized and found.row("0").activation == "ReLU"
    assert "batchnorm_small_batch" not in kinds(diagnose(with_bn, digits, steps=1))


def test_nonfinite_weights_give_an_error_and_strict_json(digits: Any) -> None:
    model = mlp(3, 32, nn.ReLU, "he")
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    diagnosis = diagnose(model, digits, steps=1)
    assert diagnosis.findings[0].kind == "nonfinite" and diagnosis.exit_code == 1
    data = json.loads(json.dumps(diagnosis.to_dict(), allow_nan=False))
    assert data["losses"] == ["nan"] and data["exit_code"] == 1
    assert {row["name"] for row in data["rows"]} == {"0", "2", "4"}


def test_shared_activation_module_is_measured_per_call() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.out = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(4, 2)
            self.act = nn.ReLU()  # used after two layers of different widths

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.act(self.b(self.act(self.a(x)))))

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.b.bias.fill_(-100.0)
    diagnosis = diagnose(net, (torch.randn(32, 8), torch.randint(0, 2, (32,))), steps=2)
    assert diagnosis.row("b").dead_fraction == 1.0
    assert diagnosis.row("a").dead_fraction is not None and diagnosis.row("a").dead_fraction < 0.5
    assert [r.name for r in diagnosis.rows] == ["a", "b", "out"]


# --------------------------------------------------------------------------- the model is untouched


class BNNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10)
        )
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)  # no Trainer: Lightning would warn
        return {"loss": loss}


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()},
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "params": {k: id(p) for k, p in model.named_parameters()},
        "grads": {
            k: (id(p.grad), p.grad.clone())
            for k, p in model.named_parameters()
            if p.grad is not None
        },
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "hooks": {
            k: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for k, m in model.named_modules()
        },
        "tensor_hooks": {k: len(p._backward_hooks or {}) for k, p in model.named_parameters()},
        "rng": torch.get_rng_state().clone(),
    }


def _assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key
    for key, value in before["buffers"].items():
        assert torch.equal(value, after["buffers"][key]), key
    assert before["params"] == after["params"]
    assert before["grads"].keys() == after["grads"].keys()
    for key, (identity, value) in before["grads"].items():
        assert identity == after["grads"][key][0] and torch.equal(value, after["grads"][key][1])
    for name in ("requires_grad", "training", "hooks", "tensor_hooks"):
        assert before[name] == after[name], name
    assert torch.equal(before["rng"], after["rng"])


def test_the_model_is_unchanged_bit_for_bit(digits: Any) -> None:
    torch.manual_seed(0)
    model = BNNet()
    with torch.no_grad():
        model.net[1].running_mean.uniform_(-1, 1)
    model.net[4].weight.grad = torch.full_like(model.net[4].weight, 7.0)  # a stale gradient
    model.net[0].bias.register_hook(lambda g: g)
    model.net[2].register_forward_hook(lambda m, i, o: None)
    model.eval()
    model.net[3].train()  # mixed modes are restored exactly too
    before = _snapshot(model)
    diagnosis = diagnose(model, digits)
    _assert_same(before, _snapshot(model))

    # the stale gradient did not leak into the measurement
    model.zero_grad(set_to_none=True)
    clean = diagnose(model, digits)
    assert [r.grad_norm for r in clean.rows] == [r.grad_norm for r in diagnosis.rows]
    # training_step's dict loss is the same loss as the plain cross-entropy (dropout aside)
    plain = diagnose(model.net, digits, seed=0)
    assert plain.row("0").grad_norm == pytest.approx(diagnosis.row("net.0").grad_norm, rel=1e-6)
    assert diagnosis.row("frozen").grad_norm is None
    assert "unused" not in kinds(diagnosis)  # frozen is not unused


def test_dataloader_batches_and_seed(digits: Any) -> None:
    x, y = digits
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    model = mlp(3, 32, nn.ReLU, "he")
    a = diagnose(model, loader, steps=6)  # 4 batches, then the loader restarts
    b = diagnose(model, loader, steps=6)
    assert a.steps == 6 and a.batch_size == 16 and len(a.losses) == 6
    assert a.losses[:2] == a.losses[4:] and a.to_dict() == b.to_dict()


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"steps": 0}, "steps=0"),
        ({"steps": 1.5}, "steps=1.5"),
        ({"dead_threshold": 2.0}, "dead_threshold=2.0"),
        ({"vanishing_ratio": -1}, "vanishing_ratio=-1"),
        ({"small_batch": 0}, "small_batch=0"),
        ({"seed": "x"}, "seed='x'"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        diagnose(nn.Linear(2, 2), (torch.randn(4, 2), torch.tensor([0, 1, 0, 1])), **kwargs)


def test_bad_model_loss_and_batch() -> None:
    batch = (torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(TypeError, match="model='str'"):
        diagnose("net", batch)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="loss_fn=3"):
        diagnose(nn.Linear(2, 2), batch, loss_fn=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loss_fn=lambda model, batch"):
        diagnose(nn.Linear(2, 2), torch.randn(4, 2))
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        diagnose(frozen, batch)


# --------------------------------------------------------------------------- command line

MODULE = """
import json, os
import torch
import pytorch_lightning as pl
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(pl.LightningModule):
    def __init__(self, depth: int = 4, activation: str = "relu", std: float = 0.0) -> None:
        super().__init__()
        act = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}[activation]
        layers = []
        for _ in range(depth - 1):
            layers += [nn.Linear(16, 16), act()]
        self.net = nn.Sequential(*layers, nn.Linear(16, 4))
        for m in self.net:
            if isinstance(m, nn.Linear):
                if std:
                    nn.init.normal_(m.weight, 0.0, std)
                else:
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=32)


class Data(pl.LightningDataModule):
    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.batch_size = batch_size

    def prepare_data(self):
        open("prepared.txt", "w").write("yes")

    def setup(self, stage):
        assert open("prepared.txt").read() == "yes"
        g = torch.Generator().manual_seed(2)
        x, y = torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)
        self.data = TensorDataset(x, y)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    name = f"doctor_project_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(MODULE, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # main() adds the cwd; undo it afterwards
    return tmp_path / f"{name}.py"


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    code = "from lightning_gradguard.doctor import main; raise SystemExit(main())"
    # -P: the cwd is not put on sys.path by Python, as with an installed console script
    command = [sys.executable, "-P", "-c", code, *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_cli_subprocess_json_exit_codes_and_bad_path(project: Path) -> None:
    name = project.stem
    healthy = _run(
        ["--model", f"{name}:Net", "--datamodule", f"{name}:Data", "--json"], project.parent
    )
    assert healthy.returncode == 0, healthy.stderr
    data = json.loads(healthy.stdout)
    assert data["exit_code"] == 0 and data["steps"] == 3 and data["batch_size"] == 32
    assert [row["name"] for row in data["rows"]] == ["net.0", "net.2", "net.4", "net.6"]
    assert (project.parent / "prepared.txt").exists()  # prepare_data() and setup() ran

    bad = _run(["--model", "no_such_package.models:Net"], project.parent)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr
    assert "cannot import 'no_such_package.models'" in bad.stderr


def test_cli_in_process_model_args_and_fail_on(project: Path, capsys: Any) -> None:
    name = project.stem
    vanishing = [
        "--model",
        f"{name}:Net",
        "--model-args",
        '{"depth": 12, "activation": "sigmoid", "std": 0.05}',
    ]
    assert main([*vanishing, "--steps", "1"]) == 1
    out = capsys.readouterr().out
    assert "[ERROR] vanishing" in out and "Verdict: problems found (exit code 1)" in out
    assert main([*vanishing, "--fail-on", "never"]) == 0
    assert main([*vanishing, "--fail-on", "error"]) == 1
    capsys.readouterr()
    assert main(["--model", f"{name}:Missing"]) == 2
    assert f"module '{name}' has no 'Missing'" in capsys.readouterr().err
    assert main(["--model", f"{name}:Net", "--model-args", "{bad json"]) == 2
    assert "--model-args is not valid JSON" in capsys.readouterr().err
    assert main(["--model", f"{name}:Net", "--model-args", '{"depht": 3}']) == 2
    assert "depht" in capsys.readouterr().err
    assert main(["--steps", "0", "--model", f"{name}:Net"]) == 2
    assert main(["--fail-on", "sometimes"]) == 2  # argparse names the choices
    assert "choose from" in capsys.readouterr().err


def test_cli_lightningcli_config(project: Path, capsys: Any) -> None:
    name = project.stem
    config = project.parent / "config.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            seed_everything: 3
            trainer:
              max_epochs: 1
              logger:
                class_path: pytorch_lightning.loggers.CSVLogger
                init_args: {{save_dir: never_created}}
            model:
              class_path: {name}.Net
              init_args:
                depth: 12
                activation: sigmoid
                std: 0.05
            data:
              class_path: {name}.Data
              init_args:
                batch_size: 4
            """
        ),
        encoding="utf-8",
    )
    assert main(["--config", str(config), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["batch_size"] == 4 and data["findings"][0]["kind"] == "vanishing"
    assert any("GroupNorm or LayerNorm" in r for r in data["findings"][0]["recommendations"])
    assert not (project.parent / "never_created").exists()  # the trainer is never built

    config.write_text(f"model:\n  class_path: {name}.Net\n  init_args:\n    depht: 3\n")
    assert main(["--config", str(config)]) == 2
    assert "depht" in capsys.readouterr().err
    assert main(["--config", str(project.parent / "missing.yaml")]) == 2
    config.write_text("model:\n  class_path: nowhere.Net\n")
    capsys.readouterr()
    assert main(["--config", str(config)]) == 2
    assert "model.class_path 'nowhere.Net': cannot import 'nowhere'" in capsys.readouterr().err


# --------------------------------------------------------------------------- real architectures


def _advice(diagnosis: Diagnosis) -> str:
    return " ".join(r for f in diagnosis.findings for r in f.recommendations)


def _grad_norm(model: nn.Module, loss: torch.Tensor, layer: str) -> float:
    """A layer's own parameters' gradient norm by plain autograd, in float64."""
    params = list(model.get_submodule(layer).parameters(recurse=False))
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))


def test_resnet_downsampling_block_data_flow_and_no_false_alarm() -> None:
    from models import image_batch, resnet_tiny

    model, batch = resnet_tiny(), image_batch(16, 8)
    diagnosis = diagnose(model, batch)
    assert kinds(diagnosis, "error") == kinds(diagnosis, "warning") == []
    assert diagnosis.exit_code == 0
    # torchvision's BasicBlock: relu(bn2(conv2(.)) + downsample(x)), one relu called twice:
    # two call sites, named as DeadUnitMonitor names them (relu#0 after bn1, relu#1 after the add)
    for layer in ("layer2.0.conv2", "layer2.0.downsample.0", "layer1.0.conv2"):
        assert diagnosis.row(layer).activation == "ReLU"
        assert diagnosis.row(layer).activation_module == layer.split(".")[0] + ".0.relu#1"
        assert diagnosis.row(layer).normalized
    assert diagnosis.row("layer2.0.conv1").activation_module == "layer2.0.relu#0"
    sites = {site.name for site in trace_call_sites(resnet_tiny(), batch[0])}
    assert {r.activation_module for r in diagnosis.rows if r.activation_module} <= sites
    # the dead fraction of the block's second relu call, counted by hand (train-mode BN)
    net = resnet_tiny()
    block = net.layer2[0]
    x, _ = batch
    with torch.no_grad():
        h = net.layer1(net.relu(net.bn1(net.conv1(x))))
        pre = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(h))))) + block.downsample(h)
    expected = float((pre <= 0).all(dim=3).all(dim=2).all(dim=0).double().mean())
    assert diagnosis.row("layer2.0.conv2").dead_fraction == expected
    assert diagnosis.row("layer2.0.downsample.0").dead_fraction == expected
    # He std of a conv from its fans (in_channels * 3 * 3), gain of ReLU
    conv2 = diagnosis.row("layer2.0.conv2")
    assert conv2.he_std == pytest.approx(math.sqrt(2) / math.sqrt(16 * 9), rel=1e-12)
    assert "BatchNorm" not in _advice(diagnosis) and "skip connections" not in _advice(diagnosis)
    # what the advice assumed, and from which module, in the text and the JSON
    assumed = (
        "normalization: BatchNorm2d 'bn1'; skip connections: BasicBlock 'layer1.0' (class name)"
    )
    assert f"advice fits: {assumed}" in str(diagnosis)
    assert diagnosis.to_dict()["architecture"]["evidence"] == assumed.split("; ")
    unchecked = {entry.check: entry for entry in diagnosis.not_checked}
    assert "conv1" in unchecked["grad/param ratio"].layers


def test_resnet18_sized_has_no_error() -> None:
    """Stock ResNet-18 widths: its first conv (grad/param above 1, before BatchNorm) is no
    explosion."""
    from models import ResNet, image_batch

    torch.manual_seed(0)
    model = ResNet(layers=(2, 2, 2, 2), widths=(64, 128, 256, 512))
    diagnosis = diagnose(model, image_batch(8, 32), steps=1)
    assert kinds(diagnosis, "error") == [] and diagnosis.exit_code == 0
    assert (diagnosis.row("conv1").ratio or 0) > 1.0  # what the old rule read as exploding
    assert [r.name for r in diagnosis.rows if r.is_matrix_layer][-1] == "fc"


def test_gpt2_conv1d_layers_are_checked_and_unmeasured_parts_are_named() -> None:
    from models import gpt2_batch, gpt2_loss, tiny_gpt2

    model, tokens = tiny_gpt2(), gpt2_batch()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.bias[:40] -= 50.0  # 40 of 128 GELU units never positive
    diagnosis = diagnose(model, tokens, loss_fn=gpt2_loss)
    assert kinds(diagnosis, "error") == kinds(diagnosis, "warning") == []
    c_fc = model.transformer.h[0].mlp.c_fc
    row = diagnosis.row("transformer.h.0.mlp.c_fc")
    fan_in, fan_out = c_fc.weight.shape  # Conv1D stores [in, out]
    assert row.activation == "NewGELUActivation"
    assert row.weight_std == pytest.approx(float(c_fc.weight.detach().double().std()))
    assert row.he_std == pytest.approx(math.sqrt(2) / math.sqrt(fan_in), rel=1e-12)
    assert row.glorot_std == pytest.approx(math.sqrt(2) * math.sqrt(2 / (fan_in + fan_out)))
    # the depth profile runs: first and last Conv1D by plain autograd
    loss = gpt2_loss(model, tokens)
    first = _grad_norm(model, loss, "transformer.h.0.attn.c_attn")
    last = _grad_norm(model, loss, "transformer.h.1.mlp.c_proj")
    assert diagnosis.first_last_ratio == pytest.approx(first / last, rel=1e-5)
    # NewGELUActivation's units, counted by hand: never positive on any token of any step
    outputs: list[torch.Tensor] = []
    handle = model.transformer.h[0].mlp.act.register_forward_hook(
        lambda m, i, o: outputs.append(o.detach().reshape(-1, o.shape[-1]))
    )
    with torch.no_grad():
        model(input_ids=tokens)
    handle.remove()
    expected = float((outputs[0] <= 0).all(dim=0).double().mean())
    assert expected >= 40 / 128 and row.dead_fraction == expected
    checks = {(e.check, name) for e in diagnosis.not_checked for name in e.layers}
    assert ("dead units", "transformer.h.0.attn.c_attn") in checks
    assert ("weight scale", "transformer.wte") in checks
    text = str(diagnosis)
    assert "Not checked:" in text and "Verdict: healthy" in text
    remark = next(f for f in diagnosis.findings if f.kind == "weight_scale")  # GPT-2's 0.02
    assert remark.severity == "info" and "fixed std by design" in remark.message
    data = json.loads(json.dumps(diagnosis.to_dict(), allow_nan=False))
    assert {e["check"] for e in data["not_checked"]} >= {"dead units", "weight scale"}


def test_transformer_encoder_out_proj_is_not_the_last_layer() -> None:
    from models import sequence_batch, transformer_encoder

    model, batch = transformer_encoder(), sequence_batch(8)
    with torch.no_grad():
        model.encoder.layers[0].linear1.bias[:10] -= 50.0  # 10 of 32 units never positive
    diagnosis = diagnose(model, batch)
    assert kinds(diagnosis, "error") == kinds(diagnosis, "warning") == []
    names = [r.name for r in diagnosis.rows]
    attn = names.index("encoder.layers.0.self_attn")
    assert names[attn + 1] == "encoder.layers.0.self_attn.out_proj"
    assert names[-1] == "head"
    loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
    first = _grad_norm(model, loss, "encoder.layers.0.self_attn")
    last = _grad_norm(model, loss, "head")
    assert diagnosis.first_last_ratio == pytest.approx(first / last, rel=1e-5)
    # F.relu inside TransformerEncoderLayer is a functional call site, measured like a module
    row = diagnosis.row("encoder.layers.0.linear1")
    assert (row.activation, row.activation_module) == ("F.relu", "encoder.layers.0:relu")
    assert row.he_std == pytest.approx(math.sqrt(2) / math.sqrt(16), rel=1e-12)  # ReLU's gain
    outputs: list[torch.Tensor] = []
    handle = model.encoder.layers[0].linear1.register_forward_hook(
        lambda m, i, o: outputs.append(o.detach().reshape(-1, o.shape[-1]))
    )
    with torch.no_grad():
        model(batch[0])  # dropout 0: the doctor's training-mode passes see the same values
    handle.remove()
    expected = float((outputs[0] <= 0).all(dim=0).double().mean())
    assert 10 / 32 <= expected < 0.5 and row.dead_fraction == expected
    unmeasured = {n for e in diagnosis.not_checked if e.check == "dead units" for n in e.layers}
    assert "encoder.layers.0.linear1" not in unmeasured

    # a real problem is still found, with advice that fits a transformer
    with torch.no_grad():
        model.head.weight.mul_(1e4)
    exploding = diagnose(model, batch, steps=1)
    assert "exploding" in kinds(exploding, "error")
    advice = _advice(exploding)
    assert "skip connections" not in advice and "BatchNorm" not in advice
    assert "GradGuard()" in advice


def test_nn_transformer_and_compiled_resnet_have_no_error() -> None:
    from models import image_batch, resnet_tiny, sequence_batch

    class Seq2Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.t = nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, batch_first=True)
            self.head = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.t(x, x).mean(1))

    torch.manual_seed(0)
    diagnosis = diagnose(Seq2Seq(), sequence_batch(8), steps=1)
    assert kinds(diagnosis, "error") == kinds(diagnosis, "warning") == []

    # Compiled code already cached for this forward (an earlier run in the process) must
    # not hide the doctor's hooks: the measurement runs the model eagerly.
    torch.compile(resnet_tiny(), backend="eager")(image_batch(16, 8)[0]).sum().backward()
    compiled = torch.compile(resnet_tiny(), backend="eager")
    plain = diagnose(resnet_tiny(), image_batch(16, 8), steps=1)
    found = diagnose(compiled, image_batch(16, 8), steps=1)
    assert found.exit_code == 0
    assert [r.name for r in found.rows] == [r.name for r in plain.rows]
    for a, b in zip(found.rows, plain.rows):
        assert a.activation == b.activation and a.he_std == b.he_std
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)

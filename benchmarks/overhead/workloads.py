"""The benchmark's workloads: models, synthetic batches and the Lightning module."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """A model and a synthetic batch, at a full and a tiny (smoke-test) size.

    ``steps``, ``warmup`` and ``rounds`` are the defaults of the full run for this
    workload (``--steps``, ``--warmup`` and ``--rounds`` override them for all).
    """

    name: str
    description: str
    build: Callable[[bool], tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]]
    steps: int = 30
    warmup: int = 5
    rounds: int = 5


def _he_init(net: nn.Module) -> nn.Module:
    # He init keeps ReLU stacks (200 layers deep) away from denormal activations,
    # which are pathologically slow on CPU and would distort every variant.
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return net


def _relu_stack(layers: int, width: int) -> nn.Module:
    modules: list[nn.Module] = []
    for i in range(layers):
        modules.append(nn.Linear(width, width))
        if i < layers - 1:
            modules.append(nn.ReLU())
    return _he_init(nn.Sequential(*modules))


def _mlp(tiny: bool) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    width, batch = (32, 8) if tiny else (512, 128)
    return _relu_stack(12, width), (torch.randn(batch, width), torch.randn(batch, width))


def _transformer(tiny: bool) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    d_model, nhead, layers, seq, batch = (32, 4, 2, 8, 4) if tiny else (256, 8, 6, 64, 16)
    layer = nn.TransformerEncoderLayer(
        d_model, nhead, dim_feedforward=4 * d_model, batch_first=True
    )
    net = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    shape = (batch, seq, d_model)
    return net, (torch.randn(shape), torch.randn(shape))


def _many_small(tiny: bool) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    width, batch = (8, 8) if tiny else (64, 64)
    return _relu_stack(200, width), (torch.randn(batch, width), torch.randn(batch, width))


class _GPT2Hidden(nn.Module):
    """GPT-2 (``GPT2Model``) returning its last hidden states, for an MSE regression."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        from transformers import GPT2Model

        self.gpt2 = GPT2Model(config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.gpt2(input_ids=tokens).last_hidden_state


def _gpt2(tiny: bool) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    try:
        from transformers import GPT2Config
    except ImportError as error:
        raise SystemExit(
            "the gpt2 workload needs transformers: pip install -e '.[benchmarks]'"
        ) from error
    layers, width, heads, seq, batch = (1, 16, 2, 8, 2) if tiny else (4, 128, 4, 64, 16)
    config = GPT2Config(
        vocab_size=256,
        n_positions=seq,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    tokens = torch.randint(0, 256, (batch, seq))
    return _GPT2Hidden(config), (tokens, torch.randn(batch, seq, width))


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("mlp", "12 x Linear(512) + ReLU, batch 128", _mlp),
        Workload(
            "transformer",
            "TransformerEncoder 6 layers, d_model 256, nhead 8, seq 64, batch 16",
            _transformer,
            steps=12,
            warmup=3,
            rounds=3,
        ),
        Workload("many_small", "200 x Linear(64) + ReLU, batch 64", _many_small),
        Workload(
            "gpt2",
            "GPT-2 (transformers) 4 layers, n_embd 128, 4 heads, seq 64, batch 16",
            _gpt2,
            steps=12,
            warmup=3,
            rounds=3,
        ),
    )
}
DEFAULT_WORKLOADS = ("mlp", "transformer", "many_small")
"""Run when ``--workloads`` is not given (``gpt2`` needs the optional transformers)."""


# --------------------------------------------------------------------------- module


class BenchModule(pl.LightningModule):
    """MSE regression on fixed synthetic batches; hooks are added by the variants."""

    def __init__(self, net: nn.Module, optimizer: str, lr: float) -> None:
        super().__init__()
        self.net = net
        self.optimizer_name = optimizer
        self.lr = lr
        # (module, optimizer) -> None, run in on_before_optimizer_step.
        self.before_optimizer_step_hooks: list[Callable[[BenchModule, Any], None]] = []

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        for hook in self.before_optimizer_step_hooks:
            hook(self, optimizer)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

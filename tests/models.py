"""Real architectures the tests run every unit-level feature on.

- :func:`tiny_gpt2`: a Hugging Face GPT-2 from a tiny config (``Conv1D`` layers whose
  weight is stored ``[in, out]``, a token embedding tied to ``lm_head``, the
  ``NewGELUActivation`` module), randomly initialized, nothing downloaded.
- :func:`resnet_tiny`: a ResNet with torchvision's block structure, written out here
  because PyPI's torchvision wheel cannot be imported next to the CPU torch pinned for
  the tests: ``BasicBlock`` calls one ``relu`` module twice, every conv is followed by
  BatchNorm, and the first block of a stage has a ``downsample`` path (1x1 conv + BN).
- :func:`transformer_encoder`: ``nn.TransformerEncoder`` with its default activation,
  the functional ``F.relu`` inside ``TransformerEncoderLayer``.

Each comes with a batch maker, so a test can run a forward and backward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def tiny_gpt2_config(n_layer: int = 2, n_embd: int = 32, vocab_size: int = 64) -> object:
    """A GPT-2 config small enough for a CPU test (2 blocks, 32 wide, 64 tokens)."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=32,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )


def tiny_gpt2(seed: int = 0, n_layer: int = 2, n_embd: int = 32) -> nn.Module:
    """A randomly initialized ``GPT2LMHeadModel`` (``transformer.wte`` tied to ``lm_head``)."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(tiny_gpt2_config(n_layer=n_layer, n_embd=n_embd))


def gpt2_batch(batch: int = 4, length: int = 16, vocab_size: int = 64, seed: int = 0) -> Tensor:
    """Random token ids ``(batch, length)``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator)


def gpt2_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    """The language-modelling loss of ``model`` on ``tokens`` (labels are the inputs)."""
    return model(input_ids=tokens, labels=tokens).loss


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: conv-bn-relu-conv-bn, + identity or downsample, relu.

    One ``relu`` module is called twice, as in torchvision.
    """

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    """torchvision's ``ResNet`` with ``BasicBlock`` (layer names as in torchvision).

    Initialized as torchvision does: Kaiming normal (fan_out, relu) for convs, BN
    weight 1 and bias 0.
    """

    def __init__(
        self, layers: tuple[int, ...] = (1, 1), widths: tuple[int, ...] = (8, 16), classes: int = 10
    ) -> None:
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        for i, (blocks, width) in enumerate(zip(layers, widths)):
            stages.append(self._make_layer(width, blocks, stride=1 if i == 0 else 2))
        for i, stage in enumerate(stages, start=1):
            self.add_module(f"layer{i}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * BasicBlock.expansion, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        self.num_stages = len(stages)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet_tiny(seed: int = 0, layers: tuple[int, ...] = (1, 1)) -> ResNet:
    """A two-stage ResNet (8 and 16 channels); the second stage has a downsample path."""
    torch.manual_seed(seed)
    return ResNet(layers=layers)


def image_batch(
    batch: int = 8, size: int = 8, classes: int = 10, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Random images ``(batch, 3, size, size)`` and labels."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=generator)
    y = torch.randint(0, classes, (batch,), generator=generator)
    return x, y


class EncoderClassifier(nn.Module):
    """``nn.TransformerEncoder`` (functional ReLU inside each layer) with a linear head."""

    def __init__(self, d_model: int = 16, layers: int = 2, classes: int = 4) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).mean(1))


def transformer_encoder(seed: int = 0) -> EncoderClassifier:
    """A two-layer encoder, 16 wide, feed-forward 32, on ``(batch, seq, 16)`` inputs."""
    torch.manual_seed(seed)
    return EncoderClassifier()


def sequence_batch(
    batch: int = 4, length: int = 6, d_model: int = 16, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Random sequences ``(batch, length, d_model)`` and labels."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, d_model, generator=generator), torch.randint(
        0, 4, (batch,), generator=generator
    )


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "gpt2": tiny_gpt2,
    "resnet": resnet_tiny,
    "transformer_encoder": transformer_encoder,
}
"""Builders of the real architectures, by name, for parametrized tests."""

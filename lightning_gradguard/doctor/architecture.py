"""What the model already has (normalization, skip connections, attention), so advice fits it.

Read from the library's own classification, never from a guess:

- normalization: torch's normalization layers by type (:data:`NORM_TYPES`), and any
  layer the unit map knows as kind ``"norm"`` (a third-party norm counts once it is
  registered with :func:`~lightning_gradguard.functional.register_layer`);
- attention: ``nn.MultiheadAttention`` and torch's transformer layers by type, and
  modules whose class name matches :data:`ATTENTION_NAME_RULE` (Hugging Face's
  ``GPT2Attention``, ``BertSelfAttention``, ...);
- skip connections: a model with attention, or modules whose class name matches
  :data:`RESIDUAL_NAME_RULE` (torchvision's ``BasicBlock`` and ``Bottleneck``, Hugging
  Face's ``GPT2Block``, ...).

The two name rules are the only name-based ones; :attr:`Architecture.evidence` says,
for each feature found, which module showed it and how.

Example:
    >>> from torch import nn
    >>> arch = Architecture.of(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    >>> arch.normalization, arch.residual, arch.evidence
    (True, False, ("normalization: LayerNorm '1'",))
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from lightning_gradguard.functional.units import LayerMap, map_layers

__all__ = [
    "ATTENTION_NAME_RULE",
    "ATTENTION_TYPES",
    "NORM_TYPES",
    "RESIDUAL_NAME_RULE",
    "Architecture",
    "norm_modules",
]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
"""Torch's normalization layers, recognized by type."""

ATTENTION_TYPES: tuple[type[nn.Module], ...] = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)
"""Torch's attention layers (and the transformer layers that hold them), by type."""

ATTENTION_NAME_RULE = re.compile(r"Attention$")
"""A module whose class name ends in ``Attention`` is an attention layer."""

RESIDUAL_NAME_RULE = re.compile(r"(Block|Bottleneck|Residual)")
"""A module whose class name contains ``Block``, ``Bottleneck`` or ``Residual`` is a
residual block (it has a skip connection)."""


def norm_modules(model: nn.Module, layer_map: LayerMap | None = None) -> dict[int, nn.Module]:
    """The normalization modules of ``model``, by ``id``: torch's types and unit-map norms.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> [type(m).__name__ for m in norm_modules(model).values()]
        ['BatchNorm1d']
    """
    found = {id(m): m for m in model.modules() if isinstance(m, NORM_TYPES)}
    layers = layer_map if layer_map is not None else map_layers(model)
    found.update({id(layer.module): layer.module for layer in layers.of_kind("norm")})
    return found


@dataclass(frozen=True)
class Architecture:
    """What the model already has, so that advice fits it (no advice to add what is there).

    Attributes:
        normalization: it has normalization layers.
        residual: it has skip connections (residual blocks, or attention layers).
        transformer: it has attention layers.
        evidence: for each feature found, the module that showed it and how
            (``"skip connections: BasicBlock 'layer1.0' (class name)"``).
    """

    normalization: bool = False
    residual: bool = False
    transformer: bool = False
    evidence: tuple[str, ...] = ()

    @classmethod
    def of(cls, model: nn.Module, layer_map: LayerMap | None = None) -> Architecture:
        """Read it from ``model``'s module types, its unit map and the two name rules.

        Example:
            >>> Architecture.of(nn.TransformerEncoderLayer(8, 2)).transformer
            True
        """
        norms = norm_modules(model, layer_map)
        norm = attention = residual = None
        for name, module in model.named_modules():
            label = f"{type(module).__name__} '{name or '(root)'}'"
            if norm is None and id(module) in norms:
                norm = f"normalization: {label}"
            if attention is None and isinstance(module, ATTENTION_TYPES):
                attention = f"attention: {label}"
            elif attention is None and ATTENTION_NAME_RULE.search(type(module).__name__):
                attention = f"attention: {label} (class name)"
            if residual is None and RESIDUAL_NAME_RULE.search(type(module).__name__):
                residual = f"skip connections: {label} (class name)"
        if residual is None and attention is not None:
            residual = "skip connections: attention layers come with them"
        return cls(
            normalization=norm is not None,
            residual=residual is not None,
            transformer=attention is not None,
            evidence=tuple(e for e in (norm, residual, attention) if e is not None),
        )

    def to_dict(self) -> dict[str, object]:
        """The architecture as JSON-able values."""
        return {
            "normalization": self.normalization,
            "residual": self.residual,
            "transformer": self.transformer,
            "evidence": list(self.evidence),
        }

"""Pure-torch core of lightning_gradguard: usable without Lightning (plain PyTorch, Fabric)."""

from lightning_gradguard.functional.health import GradientHealth
from lightning_gradguard.functional.norms import (
    GroupedNorms,
    NormGrouping,
    ParameterSnapshot,
    clean_parameter_name,
    grad_norms,
    grouped_norms,
    local_tensors,
    param_norms,
    parse_norm_type,
    tensor_norms,
)

__all__ = [
    "GradientHealth",
    "GroupedNorms",
    "NormGrouping",
    "ParameterSnapshot",
    "clean_parameter_name",
    "grad_norms",
    "grouped_norms",
    "local_tensors",
    "param_norms",
    "parse_norm_type",
    "tensor_norms",
]

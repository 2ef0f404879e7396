"""Pure-torch core of lightning_gradguard: usable without Lightning (plain PyTorch, Fabric)."""

from lightning_gradguard.functional.activity import (
    DEFAULT_ACTIVATIONS,
    ActivityTracker,
    UnitStats,
    unit_dim,
)
from lightning_gradguard.functional.clipping import (
    agc_,
    clip_by_norm_,
    clip_by_value_,
    clip_coefficients,
)
from lightning_gradguard.functional.health import GradientHealth
from lightning_gradguard.functional.norms import (
    TINY_NORM,
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
from lightning_gradguard.functional.policies import (
    AGC,
    POLICIES,
    AutoClip,
    ClipPolicy,
    EMARatio,
    FixedNorm,
    FixedValue,
    ZClip,
    clip_with_policy_,
    make_policy,
)
from lightning_gradguard.functional.spikes import SpikeWindow
from lightning_gradguard.functional.surgery import (
    activation_types,
    swap_activations,
    swap_functional_relu,
)

__all__ = [
    "AGC",
    "DEFAULT_ACTIVATIONS",
    "POLICIES",
    "TINY_NORM",
    "ActivityTracker",
    "AutoClip",
    "ClipPolicy",
    "EMARatio",
    "FixedNorm",
    "FixedValue",
    "GradientHealth",
    "GroupedNorms",
    "NormGrouping",
    "ParameterSnapshot",
    "SpikeWindow",
    "UnitStats",
    "ZClip",
    "activation_types",
    "agc_",
    "clean_parameter_name",
    "clip_by_norm_",
    "clip_by_value_",
    "clip_coefficients",
    "clip_with_policy_",
    "grad_norms",
    "grouped_norms",
    "local_tensors",
    "make_policy",
    "param_norms",
    "parse_norm_type",
    "swap_activations",
    "swap_functional_relu",
    "tensor_norms",
    "unit_dim",
]

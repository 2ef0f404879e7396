"""Pure-torch core of lightning_gradguard: usable without Lightning (plain PyTorch, Fabric).

The names below are the public API: what a plain PyTorch or Fabric training loop calls,
and the types it reads back. Everything else (norm building blocks such as
``tensor_norms`` and ``local_tensors``, name cleaning, the policy registry, the fan and
layout helpers, the constants) stays in its submodule, importable from there
(``lightning_gradguard.functional.norms.tensor_norms``), and is not re-exported here.

Example:
    >>> import torch
    >>> from lightning_gradguard.functional import NormGrouping, ZClip, grad_norms
    >>> from lightning_gradguard.functional import clip_with_policy_
    >>> model = torch.nn.Linear(3, 2)
    >>> model(torch.ones(4, 3)).sum().backward()
    >>> norms = grad_norms(NormGrouping.from_module(model))
    >>> norm, threshold, coef = clip_with_policy_(ZClip(), model)
    >>> bool(torch.isclose(norm, norms.total))
    True
"""

from lightning_gradguard.functional.activity import (
    ActivityTracker,
    MeasuringWindows,
    UnitStats,
    trace_call_sites,
    unit_dim,
)
from lightning_gradguard.functional.call_sites import (
    CallSite,
    is_activation_module,
    register_activation,
)
from lightning_gradguard.functional.clipping import (
    ClipPlan,
    NormPlan,
    ValuePlan,
    agc_,
    clip_by_norm_,
    clip_by_value_,
)
from lightning_gradguard.functional.health import GradientHealth
from lightning_gradguard.functional.init import (
    InitReport,
    consumer_nonlinearities,
    init_,
)
from lightning_gradguard.functional.lsuv import LSUVReport, lsuv_
from lightning_gradguard.functional.norms import (
    GroupedNorms,
    NormGrouping,
    ParameterSnapshot,
    grad_norms,
    param_norms,
)
from lightning_gradguard.functional.optimizer_state import reset_optimizer_state_
from lightning_gradguard.functional.policies import (
    AGC,
    AutoClip,
    ClipPolicy,
    DirectClipper,
    EMARatio,
    FixedNorm,
    FixedValue,
    GuardClip,
    NoClip,
    NormPolicy,
    ZClip,
    clip_with_policy_,
)
from lightning_gradguard.functional.redo import (
    PairActivity,
    PairInference,
    UnitPair,
    infer_unit_pairs,
    recycle_units_,
    shrink_perturb_,
    trace_unit_pairs,
)
from lightning_gradguard.functional.snapshot import StateSnapshot
from lightning_gradguard.functional.spikes import RunningSpikeTest
from lightning_gradguard.functional.surgery import swap_activations, swap_functional_relu
from lightning_gradguard.functional.units import (
    Layer,
    LayerMap,
    LayerSpec,
    UnitLayout,
    map_layers,
    register_layer,
    unregister_layer,
)

__all__ = [
    "AGC",
    "ActivityTracker",
    "AutoClip",
    "CallSite",
    "ClipPlan",
    "ClipPolicy",
    "DirectClipper",
    "EMARatio",
    "FixedNorm",
    "FixedValue",
    "GradientHealth",
    "GroupedNorms",
    "GuardClip",
    "InitReport",
    "LSUVReport",
    "Layer",
    "LayerMap",
    "LayerSpec",
    "MeasuringWindows",
    "NoClip",
    "NormGrouping",
    "NormPlan",
    "NormPolicy",
    "PairActivity",
    "PairInference",
    "ParameterSnapshot",
    "RunningSpikeTest",
    "StateSnapshot",
    "UnitLayout",
    "UnitPair",
    "UnitStats",
    "ValuePlan",
    "ZClip",
    "agc_",
    "clip_by_norm_",
    "clip_by_value_",
    "clip_with_policy_",
    "consumer_nonlinearities",
    "grad_norms",
    "infer_unit_pairs",
    "init_",
    "is_activation_module",
    "lsuv_",
    "map_layers",
    "param_norms",
    "recycle_units_",
    "register_activation",
    "register_layer",
    "reset_optimizer_state_",
    "shrink_perturb_",
    "swap_activations",
    "swap_functional_relu",
    "trace_call_sites",
    "trace_unit_pairs",
    "unit_dim",
    "unregister_layer",
]

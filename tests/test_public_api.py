"""The package's public surface: subpackages reachable as attributes, lazily."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SUBMODULES = ["callbacks", "demo", "doctor", "functional", "plots", "record"]


def test_functional_as_attribute_does_not_import_lightning() -> None:
    code = textwrap.dedent(
        """
        import sys
        import torch
        import lightning_gradguard as gg
        assert "lightning_gradguard.functional" not in sys.modules
        model = torch.nn.Linear(3, 2)
        model(torch.ones(4, 3)).sum().backward()
        norms = gg.functional.grad_norms(gg.functional.NormGrouping.from_module(model))
        expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        assert torch.isclose(norms.total.float(), expected), (norms.total, expected)
        assert "pytorch_lightning" not in sys.modules, "functional imported pytorch_lightning"
        assert "lightning" not in sys.modules, "functional imported lightning"
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", SUBMODULES)
def test_subpackages_are_attributes(name: str) -> None:
    import importlib

    import lightning_gradguard as gg

    module = getattr(gg, name)
    assert module is importlib.import_module(f"lightning_gradguard.{name}")
    assert name in dir(gg)


def test_unknown_attribute_raises() -> None:
    import lightning_gradguard as gg

    with pytest.raises(AttributeError, match="no_such_thing"):
        _ = gg.no_such_thing


def _package_modules() -> list[str]:
    import pkgutil

    import lightning_gradguard

    names = ["lightning_gradguard"]
    for info in pkgutil.walk_packages(lightning_gradguard.__path__, "lightning_gradguard."):
        names.append(info.name)
    return sorted(names)


MODULES = _package_modules()


def test_every_module_is_listed() -> None:
    # walk_packages finds the files on disk: a module that failed to be found would skip
    # the checks below silently.
    from pathlib import Path

    import lightning_gradguard

    root = Path(lightning_gradguard.__file__).parent
    on_disk = {
        ".".join(("lightning_gradguard", *p.relative_to(root).with_suffix("").parts)).removesuffix(
            ".__init__"
        )
        for p in root.rglob("*.py")
    }
    assert on_disk == set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_module_defines_all_with_existing_public_names(name: str) -> None:
    import importlib
    import importlib.util

    if name.endswith("plots"):
        pytest.importorskip("matplotlib")
    if name.endswith("__main__"):  # importing it would run the command: read its source
        import re

        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None
        with open(spec.origin) as source:
            assert re.search(r"^__all__\b", source.read(), re.M), f"{name} has no __all__"
        return
    module = importlib.import_module(name)
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    exported = list(module.__all__)
    assert len(exported) == len(set(exported)), f"{name}.__all__ repeats a name"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what the module lacks: {missing}"
    private = [n for n in exported if n.startswith("_") and n != "__version__"]
    assert not private, f"{name}.__all__ exports private names: {private}"


def test_functional_keeps_internals_out() -> None:
    import lightning_gradguard.functional as F

    for helper in ("rows_layout", "layer_specs", "clip_coefficients", "site_nonlinearity"):
        assert helper not in F.__all__
        assert helper not in vars(F)


FUNCTIONAL_PUBLIC = {
    # norms and detection
    "NormGrouping", "grad_norms", "param_norms", "GroupedNorms", "ParameterSnapshot",
    "GradientHealth",
    # clipping and its policies
    "clip_by_norm_", "clip_by_value_", "agc_", "clip_with_policy_", "ClipPolicy",
    "NormPolicy", "DirectClipper", "ClipPlan", "NormPlan", "ValuePlan",
    "FixedNorm", "FixedValue", "AutoClip", "ZClip", "EMARatio", "AGC", "GuardClip", "NoClip",
    # spikes and rollback
    "RunningSpikeTest", "StateSnapshot",
    # activity and surgery
    "ActivityTracker", "UnitStats", "MeasuringWindows", "trace_call_sites", "CallSite",
    "register_activation", "is_activation_module", "unit_dim",
    "swap_activations", "swap_functional_relu",
    # initialization and recycling
    "init_", "lsuv_", "InitReport", "LSUVReport", "consumer_nonlinearities",
    "infer_unit_pairs", "trace_unit_pairs", "PairInference", "UnitPair", "PairActivity",
    "recycle_units_", "shrink_perturb_", "reset_optimizer_state_",
    # layers and units
    "map_layers", "LayerMap", "Layer", "LayerSpec", "UnitLayout", "register_layer",
    "unregister_layer",
}  # fmt: skip
"""What a plain PyTorch or Fabric loop calls and the types it reads: docs/functional.md."""

FUNCTIONAL_INTERNAL = {
    "norms": (
        "tensor_norms", "grouped_norms", "local_tensors", "clean_parameter_name",
        "parse_norm_type", "TINY_NORM",
    ),
    "clipping": ("agc_plan", "AGCPlan"),
    "policies": ("make_policy", "POLICIES"),
    "spikes": ("SpikeWindow",),
    "activity": ("DEFAULT_ACTIVATIONS",),
    "surgery": ("activation_types",),
    "init": ("init_weight_", "init_layer_", "SCHEMES"),
    "redo": ("check_pair", "PairTracer"),
    "optimizer_state": ("optimizer_parameters",),
    "units": ("fan_in_and_fan_out", "weight_layouts", "KINDS"),
}  # fmt: skip
"""Helpers that stay in their submodule (and importable from there), not re-exported."""


def test_functional_exports_exactly_its_public_names() -> None:
    import lightning_gradguard.functional as F

    assert set(F.__all__) == FUNCTIONAL_PUBLIC
    assert len(F.__all__) == len(FUNCTIONAL_PUBLIC) == 56
    star: dict[str, object] = {}
    exec("from lightning_gradguard.functional import *", star)
    assert set(star) - {"__builtins__"} == FUNCTIONAL_PUBLIC
    # Nothing else public is bound in the package namespace (submodules aside).
    import types

    extra = {
        name
        for name, value in vars(F).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert extra == FUNCTIONAL_PUBLIC


def test_functional_internals_stay_in_their_submodules() -> None:
    import importlib

    import lightning_gradguard.functional as F

    for module_name, names in FUNCTIONAL_INTERNAL.items():
        module = importlib.import_module(f"lightning_gradguard.functional.{module_name}")
        for name in names:
            assert hasattr(module, name), f"functional.{module_name} lacks {name}"
            assert name not in vars(F), f"functional re-exports the helper {name}"


def test_every_public_functional_name_has_its_own_docstring() -> None:
    import inspect

    import lightning_gradguard.functional as F

    for name in F.__all__:
        obj = getattr(F, name)
        assert inspect.isclass(obj) or inspect.isfunction(obj), name
        doc = obj.__doc__ or ""
        # A dataclass without a docstring gets its signature as __doc__: not documentation.
        assert doc.strip() and not doc.startswith(f"{name}("), f"{name} has no docstring"
        assert obj.__module__.startswith("lightning_gradguard.functional."), name


@pytest.mark.parametrize(
    "name",
    [
        "GradGuard",
        "GradNormMonitor",
        "AdaptiveGradClip",
        "SpikeRecovery",
        "DeadUnitMonitor",
        "HealthReport",
        "InitAtStart",
        "UnitRecycler",
        "LayerReinit",
    ],
)
def test_every_constructor_argument_is_an_attribute_of_the_same_name(name: str) -> None:
    import inspect

    import lightning_gradguard

    cls = getattr(lightning_gradguard, name)
    callback = cls()
    arguments = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
    assert arguments, name
    missing = [n for n in arguments if not hasattr(callback, n)]
    assert not missing, f"{name}({', '.join(missing)}=...) is kept under another name"

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

"""Test markers: ``distributed`` and ``slow``, so that ``pytest -m "not slow"`` is a fast loop.

- ``distributed``: the test launches several processes (2-rank gloo runs on CPU). Such a
  test is also ``slow`` (starting the ranks alone takes 10-30 s) and is skipped where
  torch has no gloo backend.
- ``slow``: the test (with its share of a module fixture) takes about 10 s or more on
  two CPU cores: quick example and demo runs, benchmark runs, resumes in a fresh process.

``scripts/test.sh`` (CI) runs everything; ``pytest -m "not slow"`` leaves out both kinds.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

MARKERS = {
    "distributed": "launches several processes (2-rank gloo on CPU); implies slow",
    "slow": "takes about 10 s or more on two CPU cores; left out by -m 'not slow'",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gloo = dist.is_available() and dist.is_gloo_available()
    for item in items:
        if item.get_closest_marker("distributed") is None:
            continue
        item.add_marker(pytest.mark.slow)
        if not gloo:
            item.add_marker(pytest.mark.skip(reason="needs torch.distributed with gloo"))

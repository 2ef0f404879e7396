"""The documentation site builds in strict mode, with an API entry for every public object.

``mkdocs build --strict`` fails on any warning: a broken link between pages, a page
missing from the navigation, a docstring cross-reference that does not resolve. The
build runs once per module, into a temporary folder, and the tests read its HTML.
"""

from __future__ import annotations

import html
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_gradguard
from lightning_gradguard import functional

ROOT = Path(__file__).resolve().parents[2]
DOCS_PACKAGES = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = [name for name in DOCS_PACKAGES if importlib.util.find_spec(name) is None]
    assert not missing, (
        f"the docs packages {missing} are not installed: pip install -e '.[test]' "
        "(the test extra includes the docs extra)"
    )
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-5000:]
    return out


def _text(page: Path) -> str:
    """The visible text of an HTML page, whitespace collapsed."""
    raw = page.read_text(encoding="utf-8")
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", raw)))


def _anchor_ids(site: Path) -> set[str]:
    ids: set[str] = set()
    for page in (site / "api").rglob("*.html"):
        ids.update(re.findall(r'id="([^"]+)"', page.read_text(encoding="utf-8")))
    return ids


def test_every_page_of_the_navigation_is_built(site: Path) -> None:
    for name in (
        "quickstart",
        "distributed",
        "comparison",
        "grad_norm_monitor",
        "functional",
        "benchmarks",
        "api/callbacks",
    ):
        assert (site / name / "index.html").is_file(), name
    assert (site / "index.html").is_file()


def test_api_pages_render_the_docstrings(site: Path) -> None:
    text = _text(site / "api" / "callbacks" / "index.html")
    doctor = _text(site / "api" / "doctor" / "index.html")
    for name in lightning_gradguard.__all__:
        if name == "__version__" or name == "GradGuardMixin":
            continue
        page = doctor if name in ("diagnose", "Diagnosis") else text
        summary = inspect.getdoc(getattr(lightning_gradguard, name)).splitlines()[0]
        summary = summary.replace("`", "")  # ``code`` is rendered as <code>code</code>
        summary = re.sub(r":(?:class|func|meth|mod|attr):~?", "", summary)  # roles become links
        squeezed = page.replace(" ", "")  # a role renders as a link with spaces around it
        assert summary.replace(" ", "") in squeezed, f"{name}: docstring summary not on its page"
    # The arguments table of GradNormMonitor, from its Google-style "Args:" section.
    assert "vanishing_threshold" in text and "a layer's gradient norm below this" in text
    mixin = _text(site / "api" / "mixin" / "index.html")
    assert "clip_gradients_unscaled" in mixin and "(norm, threshold, coefficient)" in mixin


def test_every_public_class_and_function_has_an_api_entry(site: Path) -> None:
    ids = _anchor_ids(site)
    missing = [f"lightning_gradguard.{n}" for n in lightning_gradguard.__all__ if n[0] != "_"]
    missing = [name for name in missing if name not in ids]
    for name in functional.__all__:
        obj = getattr(functional, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            path = f"{obj.__module__}.{obj.__qualname__}"
            if path not in ids:
                missing.append(path)
    assert not missing, f"no API entry for {missing}"


def test_doctest_examples_render_as_code(site: Path) -> None:
    page = (site / "api" / "norms" / "index.html").read_text(encoding="utf-8")
    assert "<blockquote>" not in page  # ">>>" lines read as quotes: an "Example:" admonition
    assert ":class:" not in _text(site / "api" / "callbacks" / "index.html")


def test_links_to_examples_reach_the_copied_scripts(site: Path) -> None:
    page = (site / "distributed" / "index.html").read_text(encoding="utf-8")
    links = set(re.findall(r'href="([^"]*examples/[^"]+\.py)"', page))
    assert {"../examples/ddp_cpu.py", "../examples/fsdp2_cpu.py"} <= links
    for link in links:
        copied = (site / "distributed" / link).resolve()
        assert copied.read_bytes() == (ROOT / "examples" / copied.name).read_bytes()

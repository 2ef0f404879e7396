"""A griffe extension: the package's docstrings as the API reference pages show them.

The docstrings are written for ``help()``, doctest and Sphinx-style readers:
``Example:`` sections and roles such as ``:class:`~lightning_gradguard.GradNormMonitor```.
For mkdocstrings (Google style), this extension rewrites them when the API pages
are built, without touching the code:

- an ``Example:`` heading becomes ``Examples:``, the section griffe renders as
  doctest code (as ``Example:`` it is an admonition, and the ``>>>`` lines read as
  quotes);
- a role that names a ``lightning_gradguard`` object by its full path becomes a
  cross-reference to its API entry; any other role (relative names, torch) becomes
  inline code.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

_EXAMPLE_HEADING = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|mod|obj|exc|const):`(~?)([^`]+)`")
PACKAGE = "lightning_gradguard"


def _role_to_markdown(match: re.Match[str]) -> str:
    short, target = match.group(1) == "~", match.group(2).strip()
    title = target.rsplit(".", 1)[-1] if short else target
    if target.startswith(PACKAGE + "."):
        return f"[`{title}`][{target}]"
    return f"`{title}`"


def markdown_docstring(text: str) -> str:
    """``text`` with ``Example:`` headings renamed and Sphinx roles turned into markdown.

    Args:
        text: a docstring, as written in the code.

    Returns:
        The docstring for mkdocstrings' Google-style parser.
    """
    return _ROLE.sub(_role_to_markdown, _EXAMPLE_HEADING.sub(r"\1Examples:", text))


class MarkdownDocstrings(Extension):
    """Rewrite every loaded object's docstring with :func:`markdown_docstring`."""

    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_docstring(obj.docstring.value)

"""MkDocs hooks: the pages' links to the example scripts work on GitHub and on the site.

A page in ``docs/`` links to a script as ``../examples/ddp_cpu.py``, which GitHub
resolves in the repository. MkDocs only knows the files under ``docs/``, so in
strict mode that link would fail the build. These hooks copy ``examples/`` into
the site (``examples/ddp_cpu.py`` next to the pages) and rewrite the links that
leave ``docs/`` for ``examples/`` to point at the copies. Every other link is
still checked by MkDocs.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
SHARED_DIRS = ("examples",)
"""Folders of the repository (outside ``docs/``) whose files the site serves as-is."""

_LINK = re.compile(r"(\]\()([^)\s#]+)([^)]*\))")


def on_files(files: Files, config: Any) -> Files:
    """Add the files of ``SHARED_DIRS`` to the site, at the same path as in the repository."""
    for folder in SHARED_DIRS:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                files.append(
                    File(
                        path.relative_to(ROOT).as_posix(),
                        src_dir=str(ROOT),
                        dest_dir=config["site_dir"],
                        use_directory_urls=config["use_directory_urls"],
                    )
                )
    return files


def site_link(target: str, page_uri: str) -> str:
    """The site's version of a link ``target`` written in the page ``page_uri``.

    A link that leaves ``docs/`` for one of ``SHARED_DIRS`` (``../examples/x.py`` from
    ``quickstart.md``) becomes a link to the copy in the site (``examples/x.py``);
    anything else is returned unchanged.

    Args:
        target: the link as written in the markdown source.
        page_uri: the page's path inside ``docs/`` (``"quickstart.md"``).

    Returns:
        The link to use on the site.
    """
    if "://" in target or target.startswith(("/", "mailto:")):
        return target
    page_dir = posixpath.dirname(page_uri)
    resolved = posixpath.normpath(posixpath.join("docs", page_dir, target))
    if resolved.split("/")[0] not in SHARED_DIRS:
        return target
    return posixpath.relpath(resolved, page_dir or ".")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Point the page's links to ``SHARED_DIRS`` at the copies in the site."""
    uri = page.file.src_uri

    def rewrite(match: re.Match[str]) -> str:
        return match.group(1) + site_link(match.group(2), uri) + match.group(3)

    return _LINK.sub(rewrite, markdown)

"""What the book-level tests need to know about the book, read from its own
configuration (_config.yml, _toc.yml) so that nothing is written down twice."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

# BOOK_ROOT / BOOK_HTML / BOOK_SCREENSHOTS: test another book or build
# (development only; make test uses the defaults).
ROOT = Path(os.environ.get("BOOK_ROOT", Path(__file__).resolve().parent.parent))
HTML = Path(os.environ.get("BOOK_HTML", ROOT / "_build" / "html"))
SCREENSHOTS = Path(os.environ.get("BOOK_SCREENSHOTS", ROOT / "_build" / "screenshots"))
CHAPTERS = ROOT / "chapters"


def config() -> dict:
    return yaml.safe_load((ROOT / "_config.yml").read_text()) or {}


def repository_url() -> str:
    """The repository URL configured in _config.yml, without a trailing slash
    or .git."""
    url = (config().get("repository") or {}).get("url")
    assert url, "_config.yml has no repository.url"
    return re.sub(r"(\.git)?/*$", "", url.strip())


def colab_url(docname: str, suffix: str = ".ipynb") -> str:
    """The "Open in Colab" URL sphinx-book-theme derives for a page."""
    cfg = config()
    repo = cfg.get("repository") or {}
    colab = ((cfg.get("launch_buttons") or {}).get("colab_url")
             or "https://colab.research.google.com").rstrip("/")
    m = re.match(r"https://github\.com/([^/]+)/([^/]+)$", repository_url())
    assert m, f"repository.url is not a GitHub repository: {repository_url()}"
    org, name = m.groups()
    branch = repo.get("branch") or "main"
    path_to_book = (repo.get("path_to_book") or "").strip("/")
    path = f"{path_to_book}/{docname}" if path_to_book else docname
    return f"{colab}/github/{org}/{name}/blob/{branch}/{path}{suffix}"


def _files(entries) -> list[str]:
    out = []
    for entry in entries or []:
        if not isinstance(entry, dict):
            continue
        if "file" in entry:
            out.append(str(entry["file"]))
        for key in ("parts", "chapters", "sections"):
            out.extend(_files(entry.get(key)))
    return out


def toc_pages() -> list[str]:
    """Docnames of every page in _toc.yml: the root, then every `file:`
    entry (any nesting), without suffix, in order."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text()) or {}
    pages = [str(toc["root"])] + _files([toc])
    seen, ordered = set(), []
    for p in pages:
        p = re.sub(r"\.(md|ipynb|rst)$", "", p.strip("/"))
        if p not in seen:
            seen.add(p)
            ordered.append(p)
    return ordered


def source_of(docname: str) -> Path | None:
    for suffix in (".ipynb", ".md", ".rst"):
        path = ROOT / f"{docname}{suffix}"
        if path.exists():
            return path
    return None


def is_chapter(docname: str) -> bool:
    return docname.startswith("chapters/")


# Lines the book tests want shown at the end of the pytest run (timings);
# printed by conftest.py's pytest_terminal_summary.
SUMMARY = pytest.StashKey[list]()

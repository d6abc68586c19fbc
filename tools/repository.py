"""The book's repository URL: written by hand once, in _config.yml, and derived everywhere else.

``repository.url`` in ``_config.yml`` names the GitHub repository the book is published from. The
launch buttons are derived from it by Jupyter Book; the places below carry a copy of it that this
script writes (and the book test ``tests_book/test_repository.py`` checks):

* the install cell (first code cell) of every chapter in ``chapters/``:
  ``%pip install -q "bnlib @ git+URL"``;
* ``README.md``: ``bnlib @ git+URL`` and ``pip install git+URL``;
* ``intro.md``: ``git clone URL`` and the ``cd NAME`` that follows it;
* ``CITATION.cff``: ``repository-code: URL``.

Usage (standard library only, so it runs before any virtual environment exists)::

    python tools/repository.py https://github.com/OWNER/REPO   # set the URL, rewrite every copy
    python tools/repository.py --check                         # list copies that disagree (exit 1)

``make repository URL=https://github.com/OWNER/REPO`` runs the first form. A trailing ``.git`` or
``/`` is dropped; anything that is not ``https://github.com/OWNER/REPO`` is refused before any file
is written. Notebooks are rewritten as nbformat writes them (one-space JSON indentation, sorted
keys), so only the install line changes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# GitHub's rules: an owner is 1-39 letters, digits or single hyphens, not starting with a hyphen;
# a repository name is letters, digits, '.', '-', '_' (not '.' or '..').
_OWNER = r"[A-Za-z0-9](?:[A-Za-z0-9]|-(?=[A-Za-z0-9])){0,38}"
_NAME = r"[A-Za-z0-9._-]+"
_URL = re.compile(rf"https://github\.com/({_OWNER})/({_NAME})")
# A GitHub URL as it appears in a derived place (the copy to compare and replace).
_ANY_URL = r"https?://github\.com/[^\s\"'`<>)@]+"


class RepositoryError(ValueError):
    """Not a GitHub repository URL, or a file whose derived copy cannot be found."""


def normalize(url: str) -> str:
    """``https://github.com/OWNER/REPO`` from ``url`` (a trailing ``.git`` and slashes dropped).

    Raises :class:`RepositoryError` for anything else (another host, ``http://``, a path below
    the repository, a query, an owner or name GitHub does not allow).
    """
    text = url.strip()
    stripped = re.sub(r"/+$", "", text)
    stripped = re.sub(r"\.git$", "", stripped)
    m = _URL.fullmatch(stripped)
    if not m or m.group(2) in (".", "..") or m.group(2).endswith(".git"):
        raise RepositoryError(
            f"not a GitHub repository URL: {url!r}; expected https://github.com/OWNER/REPO "
            "(a trailing .git or / is accepted and dropped)")
    return stripped


def configured(root: Path = ROOT) -> str:
    """``repository.url`` as written in ``root/_config.yml`` (not normalized)."""
    text = (root / "_config.yml").read_text(encoding="utf-8")
    m = _config_url_line(text)
    if m is None:
        raise RepositoryError(f"{root / '_config.yml'} has no 'repository:' block with a 'url:' line")
    return m.group(2).strip().strip("\"'")


def _config_url_line(text: str) -> re.Match | None:
    # The `url:` key directly inside the top-level `repository:` mapping.
    return re.search(r"(?m)^(repository:[^\n]*\n(?:[ \t]+[^\n]*\n|[ \t]*#[^\n]*\n|\n)*?[ \t]+url:[ \t]*)([^\n#]*)",
                     text)


# ----------------------------------------------------------------------------------------------
# The derived places: each is (path, read copies, rewrite) on a file's text
# ----------------------------------------------------------------------------------------------

_PIP_GIT = re.compile(rf"(git\+)({_ANY_URL})")
_CLONE = re.compile(rf"(git clone )({_ANY_URL})(\n[ \t]*cd )(\S+)")
_CITATION = re.compile(rf"(?m)^(repository-code:[ \t]*)[\"']?({_ANY_URL})[\"']?[ \t]*$")


def _strip(url: str) -> str:
    return re.sub(r"(\.git)?/*$", "", url)


def _text_copies(pattern: re.Pattern, url_group: int = 2) -> Callable[[str], list[str]]:
    return lambda text: [_strip(m.group(url_group)) for m in pattern.finditer(text)]


def _first_code_cell(nb: dict) -> dict | None:
    return next((c for c in nb.get("cells", []) if c.get("cell_type") == "code"), None)


def _cell_source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _notebook_copies(text: str) -> list[str]:
    cell = _first_code_cell(json.loads(text))
    return _text_copies(_PIP_GIT)(_cell_source(cell)) if cell else []


def _notebook_rewrite(text: str, url: str) -> str:
    nb = json.loads(text)
    if _dump_notebook(nb) != text:
        raise RepositoryError("not in nbformat's layout (re-save it with nbformat first); left unchanged")
    cell = _first_code_cell(nb)
    if cell is None or not _PIP_GIT.search(_cell_source(cell)):
        raise RepositoryError("its first code cell has no 'git+https://github.com/...' install line")
    src = cell["source"]
    lines = src if isinstance(src, list) else [src]
    new = [_PIP_GIT.sub(lambda m: m.group(1) + url, line) for line in lines]
    cell["source"] = new if isinstance(src, list) else new[0]
    return _dump_notebook(nb)


def _dump_notebook(nb: dict) -> str:
    # nbformat.write's layout: indent=1, sorted keys, UTF-8 kept, a final newline.
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def _readme_rewrite(text: str, url: str) -> str:
    if not _PIP_GIT.search(text):
        raise RepositoryError("no 'git+https://github.com/...' line")
    return _PIP_GIT.sub(lambda m: m.group(1) + url, text)


def _intro_copies(text: str) -> list[str]:
    out = []
    for m in _CLONE.finditer(text):
        out.append(_strip(m.group(2)))
        # `cd NAME` after the clone: the folder git creates, i.e. the repository's name.
        out.append(f"https://github.com/{_strip(m.group(2)).split('/')[-2]}/{m.group(4)}")
    return out


def _intro_rewrite(text: str, url: str) -> str:
    if not _CLONE.search(text):
        raise RepositoryError("no 'git clone https://github.com/...' followed by a 'cd' line")
    name = url.rsplit("/", 1)[1]
    return _CLONE.sub(lambda m: f"{m.group(1)}{url}{m.group(3)}{name}", text)


def _citation_rewrite(text: str, url: str) -> str:
    if not _CITATION.search(text):
        raise RepositoryError("no 'repository-code:' line")
    return _CITATION.sub(lambda m: f'{m.group(1)}"{url}"', text)


def places(root: Path = ROOT) -> list[tuple[Path, Callable[[str], list[str]], Callable[[str, str], str]]]:
    """Every derived place under ``root``: ``(path, copies(text) -> URLs, rewrite(text, url) -> text)``."""
    out = [(nb, _notebook_copies, _notebook_rewrite) for nb in sorted((root / "chapters").glob("*.ipynb"))]
    out.append((root / "README.md", _text_copies(_PIP_GIT), _readme_rewrite))
    out.append((root / "intro.md", _intro_copies, _intro_rewrite))
    if (root / "CITATION.cff").exists():
        out.append((root / "CITATION.cff", _text_copies(_CITATION), _citation_rewrite))
    return out


def disagreements(root: Path = ROOT) -> list[str]:
    """One line per derived place that does not name the configured repository (empty: all agree).

    A place with no copy at all counts as a disagreement: the URL must not silently vanish.
    """
    try:
        url = normalize(configured(root))
    except RepositoryError as err:
        return [f"_config.yml: {err}"]
    problems = []
    if configured(root) != url:
        problems.append(f"_config.yml: repository.url {configured(root)!r} is not normalized; write {url}")
    for path, copies, _ in places(root):
        rel = path.relative_to(root)
        if not path.exists():
            problems.append(f"{rel}: missing")
            continue
        found = copies(path.read_text(encoding="utf-8"))
        if not found:
            problems.append(f"{rel}: no copy of the repository URL where one is expected")
        problems += [f"{rel}: names {u}, _config.yml says {url}" for u in found if u != url]
    return problems


def set_repository(url: str, root: Path = ROOT) -> list[Path]:
    """Write ``url`` (normalized) into ``_config.yml`` and every derived place; return the files changed.

    Every new text is computed before the first file is written, so bad input, or a file whose
    copy cannot be found, changes nothing.
    """
    url = normalize(url)
    config = root / "_config.yml"
    text = config.read_text(encoding="utf-8")
    m = _config_url_line(text)
    if m is None:
        raise RepositoryError(f"{config}: no 'repository:' block with a 'url:' line")
    new = {config: text[:m.start(2)] + url + _trailing(m.group(2)) + text[m.end(2):]}
    for path, _, rewrite in places(root):
        try:
            new[path] = rewrite(path.read_text(encoding="utf-8"), url)
        except (OSError, RepositoryError) as err:
            raise RepositoryError(f"{path.relative_to(root)}: {err}") from None
    changed = []
    for path, content in new.items():
        if path.read_text(encoding="utf-8") != content:
            path.write_text(content, encoding="utf-8")
            changed.append(path)
    return changed


def _trailing(value: str) -> str:
    """The spaces between the old value and an inline comment, kept as they were."""
    return value[len(value.rstrip()):]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Set the book's GitHub repository (in _config.yml and every copy).")
    p.add_argument("url", nargs="?", help="https://github.com/OWNER/REPO")
    p.add_argument("--check", action="store_true", help="only list the copies that disagree with _config.yml")
    p.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.check == (a.url is not None):
        p.error("give either a URL or --check")
    if a.check:
        problems = disagreements(a.root)
        for line in problems:
            print(line, file=sys.stderr)
        print(f"repository {configured(a.root)}: " + ("every copy agrees" if not problems else
                                                     f"{len(problems)} disagreement(s)"))
        return 1 if problems else 0
    try:
        changed = set_repository(a.url, a.root)
    except RepositoryError as err:
        print(f"error: {err}; nothing was changed", file=sys.stderr)
        return 2
    url = normalize(a.url)
    print(f"repository set to {url}; " + (f"{len(changed)} file(s) rewritten: " +
                                          ", ".join(str(c.relative_to(a.root)) for c in changed)
                                          if changed else "every file already named it"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

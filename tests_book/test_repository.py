"""The repository URL is one setting: _config.yml's repository.url, copied by tools/repository.py
into every derived place (chapters' install cells, README.md, intro.md, CITATION.cff), and the
project files around it (CITATION.cff's schema check, tools/check_citation.py).

Fast: no build, no browser; the rewriting is tried on copies in a temporary directory."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from bookconfig import ROOT, repository_url


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


repository = _load("repository")
check_citation = _load("check_citation")

FILES = ["_config.yml", "README.md", "intro.md", "CITATION.cff", "pyproject.toml"]


@pytest.fixture
def book(tmp_path) -> Path:
    """A copy of the files that name the repository."""
    for name in FILES:
        shutil.copy2(ROOT / name, tmp_path / name)
    (tmp_path / "chapters").mkdir()
    for nb in (ROOT / "chapters").glob("*.ipynb"):
        shutil.copy2(nb, tmp_path / "chapters" / nb.name)
    return tmp_path


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_every_copy_agrees_with_config():
    problems = repository.disagreements(ROOT)
    assert not problems, (
        "the repository URL differs from _config.yml's repository.url in:\n  " + "\n  ".join(problems)
        + "\nrun `make repository URL=<the URL in _config.yml>` to rewrite every copy")


def test_config_url_is_the_one_the_book_tests_use():
    assert repository.normalize(repository.configured(ROOT)) == repository_url()


def test_every_place_is_checked():
    places = {str(p.relative_to(ROOT)) for p, _, _ in repository.places(ROOT)}
    chapters = {f"chapters/{nb.name}" for nb in (ROOT / "chapters").glob("*.ipynb")}
    assert chapters and chapters <= places
    assert {"README.md", "intro.md", "CITATION.cff"} <= places


def _plant_in_notebook(path: Path) -> None:
    nb = json.loads(path.read_text(encoding="utf-8"))
    cell = next(c for c in nb["cells"] if c["cell_type"] == "code")
    cell["source"] = [line.replace(repository_url(), "https://github.com/someone/elsewhere")
                      for line in cell["source"]]
    path.write_text(repository._dump_notebook(nb), encoding="utf-8")


@pytest.mark.parametrize("place", ["chapter", "README.md", "intro.md", "intro.md (cd)", "CITATION.cff",
                                   "_config.yml"])
def test_planted_disagreement_is_found(book, place):
    if place == "chapter":
        target = sorted((book / "chapters").glob("*.ipynb"))[0]
        _plant_in_notebook(target)
        name = f"chapters/{target.name}"
    elif place == "intro.md (cd)":
        text = (book / "intro.md").read_text()
        old = "cd " + repository_url().rsplit("/", 1)[1]
        assert old in text
        (book / "intro.md").write_text(text.replace(old, "cd another-name"))
        name = "intro.md"
    else:
        text = (book / place).read_text()
        assert repository_url() in text
        (book / place).write_text(text.replace(repository_url(), "https://github.com/someone/elsewhere", 1))
        name = place
    problems = repository.disagreements(book)
    if place == "_config.yml":  # the setting moved: every copy now disagrees with it
        named = {p.split(":", 1)[0] for p in problems}
        assert named == {str(path.relative_to(book)) for path, _, _ in repository.places(book)}, problems
    else:
        assert problems and all(p.startswith(f"{name}:") for p in problems), problems
    assert repository.main(["--check", "--root", str(book)]) == 1


def test_a_removed_copy_is_a_disagreement(book):
    text = (book / "README.md").read_text()
    (book / "README.md").write_text(text.replace("git+", "git-plus "))
    assert any(p.startswith("README.md: no copy") for p in repository.disagreements(book))


@pytest.mark.parametrize("given", [
    "https://github.com/someone/my-fork",
    "https://github.com/someone/my-fork.git",
    "https://github.com/someone/my-fork/",
    " https://github.com/someone/my-fork.git/ ",
])
def test_normalize(given):
    assert repository.normalize(given) == "https://github.com/someone/my-fork"


def test_set_repository_rewrites_every_copy_and_nothing_else(book):
    before = {p: p.read_text(encoding="utf-8") for p in book.rglob("*") if p.is_file()}
    new = "https://github.com/someone/my.fork_2"
    changed = repository.set_repository(new + ".git/", book)
    assert repository.disagreements(book) == []
    assert repository.configured(book) == new
    assert (book / "pyproject.toml") not in changed
    for path, old in before.items():
        now = path.read_text(encoding="utf-8")
        old_lines, new_lines = old.splitlines(), now.splitlines()
        assert len(old_lines) == len(new_lines), path
        diff = [(a, b) for a, b in zip(old_lines, new_lines) if a != b]
        for a, b in diff:  # only lines that named the repository changed, and only that part of them
            assert repository_url() in a or "cd batchnorm-book" in a, (path, a)
            expect = a.replace(repository_url(), new).replace("cd batchnorm-book", "cd my.fork_2")
            assert b == expect, (path, a, b)
        assert bool(diff) == (path in changed), path
    # Setting it back restores every file byte for byte.
    repository.set_repository(repository_url(), book)
    assert all(p.read_text(encoding="utf-8") == old for p, old in before.items())


@pytest.mark.parametrize("bad", [
    "", "not a url", "github.com/someone/fork", "http://github.com/someone/fork",
    "https://gitlab.com/someone/fork", "https://github.com/someone", "https://github.com/someone/fork/tree/main",
    "https://github.com/-someone/fork", "https://github.com/some--one/fork", "https://github.com/someone/fork?x=1",
    "https://github.com/someone/..", "https://github.com/someone/fork.git.git", "https://github.com/some one/fork",
])
def test_bad_input_is_refused_and_changes_nothing(book, bad, capsys):
    before = _digests(book)
    with pytest.raises(repository.RepositoryError, match="not a GitHub repository URL"):
        repository.set_repository(bad, book)
    assert repository.main([bad, "--root", str(book)]) == 2
    err = capsys.readouterr().err
    assert "expected https://github.com/OWNER/REPO" in err and "nothing was changed" in err
    assert _digests(book) == before


def test_a_file_without_its_copy_changes_nothing(book):
    """A derived place that cannot be rewritten stops the command before any file is written."""
    text = (book / "intro.md").read_text()
    (book / "intro.md").write_text(text.replace("git clone", "git-clone"))
    before = _digests(book)
    with pytest.raises(repository.RepositoryError, match="intro.md"):
        repository.set_repository("https://github.com/someone/fork", book)
    assert _digests(book) == before


# ------------------------------------------------------------------- CITATION.cff


def _wheels() -> Path:
    return check_citation.WHEELS


def test_citation_is_valid():
    schema = check_citation.load_schema(_wheels())
    assert check_citation.problems(ROOT / "CITATION.cff", schema) == []


def test_citation_check_finds_problems(tmp_path):
    schema = check_citation.load_schema(_wheels())
    text = (ROOT / "CITATION.cff").read_text()
    bad = tmp_path / "CITATION.cff"
    bad.write_text(text.replace("cff-version: 1.2.0", "cff-version: 1.2.0\nunknown-key: 1")
                   .replace("license: MIT", "license: Not-A-Licence")
                   .replace('version: "0.1.0"', 'version: "9.9"'))
    found = "\n".join(check_citation.problems(bad, schema))
    assert "unknown-key" in found
    assert "Not-A-Licence" in found
    assert "version is '9.9', pyproject.toml says '0.1.0'" in found

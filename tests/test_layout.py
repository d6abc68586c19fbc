"""The package's two parts stay apart: the normalization library never loads the lab kit."""

from __future__ import annotations

import ast
import functools
import importlib
import json
import pathlib
import pkgutil
import re
import subprocess
import sys

import bnlib

ROOT = pathlib.Path(bnlib.__file__).resolve().parent
# The chapters, read from chapters/ so that a new chapter is covered without editing this list.
CHAPTERS = sorted(p.stem for p in (pathlib.Path(__file__).resolve().parent.parent / "chapters").glob("*.ipynb"))


def _loaded_by(statement: str) -> set[str]:
    """Modules that ``statement`` loads on top of torch and NumPy, in a fresh interpreter."""
    code = (
        "import sys, torch, numpy; before = set(sys.modules); "
        f"{statement}; print('\\n'.join(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_import_bnlib_loads_no_kit_plotting_progress_or_data():
    loaded = _loaded_by("import bnlib")
    assert "bnlib.functional" in loaded  # the probe sees what the import loads
    for prefix in ("bnlib.lab", "matplotlib", "tqdm", "urllib.request"):
        assert not any(m == prefix or m.startswith(prefix + ".") for m in loaded), (prefix, sorted(loaded))


def test_core_modules_import_only_torch_numpy_and_the_standard_library():
    stdlib = set(sys.stdlib_module_names)
    for path in ROOT.glob("*.py"):
        for line in path.read_text().splitlines():
            m = re.match(r"\s*(?:from|import)\s+([A-Za-z_][\w]*)", line)
            if not m or line.lstrip().startswith("from ."):
                continue
            top = m.group(1)
            assert top in stdlib or top in {"torch", "numpy", "bnlib"}, f"{path.name}: {line.strip()}"
            assert "bnlib.lab" not in line, f"{path.name} imports the lab kit: {line.strip()}"


def test_no_module_is_named_after_or_introduces_itself_as_a_chapter_helper():
    for path in list(ROOT.glob("*.py")) + list((ROOT / "lab").glob("*.py")):
        text = path.read_text()
        assert not re.search(r"helpers? (of|for) the chapter", text, re.IGNORECASE), path
        if path.parent.name == "lab":  # the kit serves every chapter and names none
            assert path.stem not in CHAPTERS, path
            assert "chapters/" not in text, f"{path} names a chapter file"


# The files that may take optimizer steps, and why.
STEPPING_FILES = {
    "lab/loop.py": "the one training loop",
    "adapt.py": "TENT adapts at test time, one step per test batch: the update is the method, not training",
}


def test_one_training_loop():
    """Only bnlib.lab.loop takes optimizer steps: every training run goes through its train_loop."""
    stepping = re.compile(r"\b\w*(opt|optimizer|optim)\w*\.step\(")
    for path in list(ROOT.glob("*.py")) + list((ROOT / "lab").glob("*.py")):
        if path.relative_to(ROOT).as_posix() in STEPPING_FILES:
            continue
        for line in path.read_text().splitlines():
            assert not stepping.search(line), f"{path.name} has a training loop of its own: {line.strip()}"


# --------------------------------------------------------------------------
# The chapters use the kit; they do not write their own copies of it
# --------------------------------------------------------------------------

CHAPTER_DIR = pathlib.Path(__file__).resolve().parent.parent / "chapters"
# A chapter cell may take optimizer steps itself only where the loop is what its section teaches; a comment
# starting with this marker then says why.
LOOP_MARKER = "# written-out loop:"
STEPPING = re.compile(r"\b\w*(opt|optimizer|optim)\w*\.step\(")


@functools.cache
def _chapter_cells() -> list[tuple[str, str, ast.Module, str]]:
    """(chapter, cell id, parsed code, source) of every code cell of every chapter."""
    sys.path.insert(0, str(CHAPTER_DIR.parent / "tools"))
    try:
        from run_chapters import cell_to_python  # IPython-only lines (%pip, !cmd) as pass
    finally:
        sys.path.pop(0)
    cells = []
    for path in sorted(CHAPTER_DIR.glob("*.ipynb")):
        nb = json.loads(path.read_text())
        for k, cell in enumerate(nb["cells"]):
            if cell["cell_type"] == "code":
                source = "".join(cell["source"])
                cells.append((path.stem, cell.get("id", k), ast.parse(cell_to_python(source)), source))
    return cells


def _kit_names() -> dict[str, str]:
    """Every name the kit's modules and bnlib.layers export (``__all__``) -> the module exporting it."""
    import bnlib.lab
    import bnlib.layers
    names = {n: "bnlib.layers" for n in bnlib.layers.__all__}
    for info in pkgutil.iter_modules(bnlib.lab.__path__):
        module = importlib.import_module(f"bnlib.lab.{info.name}")
        names.update({n: module.__name__ for n in getattr(module, "__all__", ()) if n not in names})
    return names


def test_chapters_take_optimizer_steps_only_through_the_kit():
    """Training goes through bnlib.lab.training (fit, Step); a written-out loop says why with the marker."""
    assert len(_chapter_cells()) > 50  # the cells are read
    for chapter, k, _, source in _chapter_cells():
        if STEPPING.search(source):
            assert LOOP_MARKER in source, (
                f"{chapter}.ipynb cell {k} takes optimizer steps itself: use training.fit / training.Step, or, "
                f"where the loop is what the section teaches, say so in a comment starting {LOOP_MARKER!r}")


def test_chapters_do_not_redefine_the_kit():
    """No chapter defines a function or class the kit exports (bn_layers, evaluate, ...) or mean_std."""
    kit = _kit_names()
    assert {"fit", "evaluate", "bn_layers", "preserved_state", "History"} <= set(kit)
    for chapter, k, tree, _ in _chapter_cells():
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                assert node.name not in kit, f"{chapter}.ipynb cell {k} redefines {kit[node.name]}.{node.name}"
                assert node.name != "mean_std", (
                    f"{chapter}.ipynb cell {k} defines mean_std: use the kit's Spread (mean, sample std)")


def _assigned(node: ast.Assign) -> list[tuple[str, ast.expr | None]]:
    """(name, value) of each name an assignment binds; value None where it cannot be told (unpacking a call)."""
    pairs = []
    for target in node.targets:
        if isinstance(target, ast.Name):
            pairs.append((target.id, node.value))
        elif isinstance(target, ast.Tuple):
            values = node.value.elts if isinstance(node.value, ast.Tuple) else [None] * len(target.elts)
            pairs += [(t.id, v) for t, v in zip(target.elts, values) if isinstance(t, ast.Name)]
    return pairs


def _typed_in(value: ast.expr | None) -> bool:
    """A literal collection or a range(...) call: numbers typed into the chapter."""
    return isinstance(value, (ast.Tuple, ast.List, ast.Set)) or (
        isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "range")


def test_chapters_take_their_seeds_from_the_kit():
    """A chapter's seeds come from the kit (BNLIB_SEEDS replaces them): no SEEDS = (0, 1, 2) typed in."""
    for chapter, k, tree, _ in _chapter_cells():
        for node in tree.body:
            if isinstance(node, ast.Assign):
                for name, value in _assigned(node):
                    assert not ("SEEDS" in name and _typed_in(value)), (
                        f"{chapter}.ipynb cell {k} types its seeds in: {ast.unparse(node)}; "
                        "use the kit's seeds (bnlib.lab.protocol.seeds())")

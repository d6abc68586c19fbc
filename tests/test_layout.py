"""The package's two parts stay apart: the normalization library never loads the lab kit."""

from __future__ import annotations

import pathlib
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


def test_one_training_loop():
    """Only bnlib.lab.loop takes optimizer steps: every training run goes through its train_loop."""
    stepping = re.compile(r"\b\w*(opt|optimizer|optim)\w*\.step\(")
    for path in list(ROOT.glob("*.py")) + list((ROOT / "lab").glob("*.py")):
        if path.relative_to(ROOT).as_posix() == "lab/loop.py":
            continue
        for line in path.read_text().splitlines():
            assert not stepping.search(line), f"{path.name} has a training loop of its own: {line.strip()}"

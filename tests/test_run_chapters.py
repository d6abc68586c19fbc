"""tools/run_chapters.py: runs notebooks as plain Python and records each cell (no Jupyter needed)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("run_chapters", ROOT / "tools" / "run_chapters.py")
run_chapters = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_chapters)


def _notebook(path: Path, *cells: str) -> Path:
    nb = {"cells": [{"cell_type": "code", "source": src.splitlines(keepends=True), "metadata": {},
                     "outputs": [], "execution_count": None} for src in cells]
          + [{"cell_type": "markdown", "source": ["# prose"], "metadata": {}}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))
    return path


def test_magics_become_pass_at_their_indentation():
    src = "try:\n    import bnlib\nexcept ImportError:\n    %pip install -q bnlib\n!ls\nx = 1  # 100%"
    expected = "try:\n    import bnlib\nexcept ImportError:\n    pass\npass\nx = 1  # 100%"
    assert run_chapters.cell_to_python(src) == expected


def test_cells_share_a_namespace_and_show_the_last_expression(tmp_path, capsys):
    nb = _notebook(tmp_path / "ok.ipynb", "try:\n    import math\nexcept ImportError:\n    %pip install math",
                   "x = math.sqrt(16)\nprint('x is', x)", "x + 1", "import os\nos.getcwd()")
    rec = run_chapters.run_notebook(nb)
    assert rec["ok"] and rec["error"] is None and rec["chapter"] == "ok"
    assert [c["output"] for c in rec["cells"][:3]] == ["", "x is 4.0\n", "5.0\n"]
    assert rec["cells"][3]["output"].strip() == repr(str(tmp_path))  # runs in the notebook's folder
    assert all(c["seconds"] >= 0 for c in rec["cells"])


def test_a_failing_claim_stops_the_chapter(tmp_path):
    nb = _notebook(tmp_path / "bad.ipynb", "y = 2", "assert y == 3, 'the claim'", "print('never')")
    rec = run_chapters.run_notebook(nb)
    assert not rec["ok"] and len(rec["cells"]) == 2
    assert "AssertionError: the claim" in rec["error"] and rec["cells"][1]["error"] == rec["error"]


def test_main_runs_each_chapter_in_its_own_process(tmp_path, capsys):
    good = _notebook(tmp_path / "good.ipynb", "print('hello')")
    bad = _notebook(tmp_path / "bad.ipynb", "raise ValueError('broken')")
    out = tmp_path / "res" / "chapters.json"
    assert run_chapters.main(["--jobs", "2", "--json", str(out), str(good), str(bad)]) == 1
    res = json.loads(out.read_text())
    assert [c["chapter"] for c in res["chapters"]] == ["good", "bad"]
    assert res["chapters"][0]["ok"] and res["chapters"][0]["cells"][0]["output"] == "hello\n"
    assert not res["chapters"][1]["ok"] and "ValueError: broken" in res["chapters"][1]["error"]
    assert res["environment"]["torch"]
    assert "1 of 2 chapters ran" in capsys.readouterr().out


def test_main_needs_notebooks():
    with pytest.raises(SystemExit):
        run_chapters.main([])


def test_the_working_directory_is_restored(tmp_path):
    import os
    before = os.getcwd()
    run_chapters.run_notebook(_notebook(tmp_path / "nb.ipynb", "raise RuntimeError('x')"))
    assert os.getcwd() == before

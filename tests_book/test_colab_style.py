"""The chapters, run the way Colab runs them: outside the repository.

1. Every chapter's first code cell is the install cell: it imports bnlib and
   only when that fails installs it, from the repository configured in
   _config.yml (`%pip install -q "bnlib @ git+<repository.url>"`).
2. A wheel is built from the checkout and installed, with the pinned runtime
   dependencies from requirements.txt, into a fresh virtual environment; then
   a chapter (by default the quickest one, by the time its stored outputs took
   to produce, among the chapters that train a model through bnlib: see
   `trains`) is copied into a temporary directory outside the repository and
   executed there with that environment's own kernel. The kernel must import
   bnlib from the wheel (not from the checkout) and no cell may fail.

Environment overrides (for development):
  BOOK_COLAB_NOTEBOOKS  os.pathsep-separated notebooks to use instead of chapters/*.ipynb
  BOOK_COLAB_EXECUTE    "all", or comma-separated notebook names (stems) to execute
                        (default: the quickest chapter that trains)
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import nbformat
import pytest
from bookconfig import CHAPTERS, ROOT, SUMMARY, repository_url

# Runtime dependencies of the chapters, installed pinned (from requirements.txt).
# keras: the chapter that runs Keras beside bnlib (on the PyTorch backend; Colab ships Keras). Not myst-nb:
# the chapters glue their numbers with bnlib.lab.glue, which needs only IPython.
RUNTIME = ["torch", "numpy", "matplotlib", "tqdm", "ipykernel", "nbclient", "nbformat", "keras"]
KERNEL = "bnlib-colab-style"
CELL_TIMEOUT_S = 900


def _notebooks() -> list[Path]:
    override = os.environ.get("BOOK_COLAB_NOTEBOOKS")
    if override:
        return [Path(p).resolve() for p in override.split(os.pathsep) if p]
    return sorted(CHAPTERS.glob("*.ipynb"))


NOTEBOOKS = _notebooks()


def _ids(paths):
    return [p.stem for p in paths]


# ------------------------------------------------------------ install cell


def _first_code_cell(nb) -> str:
    for cell in nb.cells:
        if cell.cell_type == "code":
            return cell.source
    return ""


def _magic_pip_args(node: ast.AST) -> str | None:
    """The argument string of `%pip ...` / `!pip ...` after IPython's
    transformation into get_ipython().run_line_magic / .system calls."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        return None
    args = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    if node.func.attr == "run_line_magic" and len(args) == 2 and args[0] == "pip":
        return args[1]
    if node.func.attr == "system" and args and re.match(r"\s*(python\S*\s+-m\s+)?pip\s", args[0]):
        return re.sub(r"^\s*(python\S*\s+-m\s+)?pip\s+", "", args[0])
    return None


def _imports_bnlib(stmts) -> bool:
    for stmt in stmts:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "bnlib" for a in node.names):
                return True
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "bnlib":
                return True
    return False


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = []
    if isinstance(handler.type, ast.Name):
        names = [handler.type.id]
    elif isinstance(handler.type, ast.Tuple):
        names = [e.id for e in handler.type.elts if isinstance(e, ast.Name)]
    return bool({"ImportError", "ModuleNotFoundError"} & set(names))


def check_install_cell(source: str, repo_url: str) -> list[str]:
    """Problems with a chapter's install cell (empty list: fine)."""
    from IPython.core.inputtransformer2 import TransformerManager

    expected = f'%pip install -q "bnlib @ git+{repo_url}"'
    if not source.strip():
        return ["the notebook has no code cell"]
    try:
        tree = ast.parse(TransformerManager().transform_cell(source))
    except SyntaxError as err:
        return [f"the first code cell does not parse: {err}"]

    installs = [(n, _magic_pip_args(n)) for n in ast.walk(tree)]
    installs = [(n, a) for n, a in installs if a is not None and re.search(r"\binstall\b", a)]
    guarded = set()
    good_try = False
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try) or not _imports_bnlib(node.body):
            continue
        for handler in node.handlers:
            if not _catches_import_error(handler):
                continue
            for sub in ast.walk(handler):
                args = _magic_pip_args(sub)
                if args is None:
                    continue
                guarded.add(id(sub))
                spec = re.search(r"""["']?bnlib\s*@\s*git\+(\S+?)["']?(?:\s|$)""", args)
                url = spec and re.sub(r"(@[^/]*)?$", "", spec.group(1))  # drop an @ref
                if url and re.sub(r"\.git$", "", url.rstrip("/")) == repo_url:
                    good_try = True
    problems = []
    if not good_try:
        problems.append(
            "the first code cell must import bnlib and, only when that raises ImportError, "
            f"install it from the configured repository:\n"
            f"    try:\n        import bnlib\n    except ImportError:\n        {expected}\n"
            f"  found:\n" + "\n".join("    " + line for line in source.splitlines()))
    unguarded = [a for n, a in installs if id(n) not in guarded]
    if unguarded:
        problems.append(f"the first code cell installs packages unconditionally: {unguarded}")
    return problems


def test_there_are_chapters():
    assert NOTEBOOKS, (
        "no chapter notebook in chapters/ (or BOOK_COLAB_NOTEBOOKS): the Colab-style check "
        "has nothing to run; add chapters/<name>.ipynb")


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_first_code_cell_installs_bnlib(notebook):
    nb = nbformat.read(notebook, as_version=4)
    problems = check_install_cell(_first_code_cell(nb), repository_url())
    assert not problems, f"{notebook.name}: " + "\n".join(problems)


@pytest.mark.parametrize("source, ok", [
    ('try:\n    import bnlib\nexcept ImportError:\n'
     '    %pip install -q "bnlib @ git+https://github.com/bnlib/batchnorm-book"', True),
    ('try:\n    import bnlib  # noqa\nexcept (ImportError, OSError):\n'
     '    !pip install -q "bnlib @ git+https://github.com/bnlib/batchnorm-book.git@main"\n'
     '    import bnlib', True),
    ('%pip install -q "bnlib @ git+https://github.com/bnlib/batchnorm-book"\nimport bnlib', False),
    ('try:\n    import bnlib\nexcept ImportError:\n'
     '    %pip install -q "bnlib @ git+https://github.com/someone/fork"', False),
    ('try:\n    import numpy\nexcept ImportError:\n'
     '    %pip install -q "bnlib @ git+https://github.com/bnlib/batchnorm-book"', False),
    ('import bnlib', False),
])
def test_install_cell_checker(source, ok):
    """The checker itself, on good and bad install cells."""
    problems = check_install_cell(source, "https://github.com/bnlib/batchnorm-book")
    assert (not problems) == ok, problems


# --------------------------------------------------------------- execution


def _pins() -> list[str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"^([A-Za-z0-9_.-]+)\s*==\s*(\S+)$", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    missing = [name for name in RUNTIME if name not in pins]
    assert not missing, f"requirements.txt must pin (==) the runtime dependencies {missing}"
    return [f"{name}=={pins[name]}" for name in RUNTIME]


def _stored_runtime(path: Path) -> float:
    """Seconds the stored outputs took to produce (from nbclient's per-cell
    timing metadata); infinity when the notebook carries no timing."""
    nb = nbformat.read(path, as_version=4)
    total, timed = 0.0, False
    for cell in nb.cells:
        ex = cell.get("metadata", {}).get("execution", {})
        start, end = ex.get("iopub.execute_input"), ex.get("shell.execute_reply")
        if start and end:
            try:
                total += (datetime.fromisoformat(end.replace("Z", "+00:00"))
                          - datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds()
                timed = True
            except ValueError:
                pass
    return total if timed else float("inf")


# ------------------------------------------------------- which chapter runs

# The kit's training loop (bnlib.lab.training): the front end and the loop itself.
TRAINING_LOOP = {"fit", "train_loop"}


def _code_trees(nb) -> list[ast.AST]:
    from IPython.core.inputtransformer2 import TransformerManager

    trees = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        try:
            trees.append(ast.parse(TransformerManager().transform_cell(cell.source)))
        except SyntaxError:
            continue
    return trees


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def trains(nb) -> bool:
    """Does the notebook train a model through bnlib?

    True when a code cell calls the kit's training loop -- ``fit(...)`` or ``train_loop(...)``
    imported from a bnlib module, or reached as an attribute of one (``training.fit(...)``,
    ``bnlib.lab.training.train_loop(...)``) -- or takes optimisation steps by hand: it calls
    ``.backward(...)`` and an optimizer's ``.step(...)``. Plotting stored records, or calling a
    ``fit`` that is not bnlib's (e.g. Keras's ``model.fit``), does not count.
    """
    loop_names, bnlib_modules, methods = set(), set(), set()
    trees = _code_trees(nb)
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "bnlib":
                for alias in node.names:
                    bound = alias.asname or alias.name
                    (loop_names if alias.name in TRAINING_LOOP else bnlib_modules).add(bound)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "bnlib":
                        bnlib_modules.add(alias.asname or "bnlib")
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in loop_names:
                loop_names.discard(node.name)  # redefined locally: no longer bnlib's
    for tree in trees:
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if isinstance(f, ast.Name) and f.id in loop_names:
                return True
            if isinstance(f, ast.Attribute):
                methods.add(f.attr)
                if f.attr in TRAINING_LOOP and _root_name(f.value) in bnlib_modules:
                    return True
    return {"backward", "step"} <= methods


def _quickest_training_chapter(paths: list[Path]) -> Path:
    training = [p for p in paths if trains(nbformat.read(p, as_version=4))]
    assert training, (
        "no chapter trains a model through bnlib (calls fit/train_loop, or .backward() and .step()): "
        f"{[p.name for p in paths]}")
    return min(training, key=lambda p: (_stored_runtime(p), p.stat().st_size))


def _to_execute() -> list[Path]:
    if not NOTEBOOKS:
        return []
    choice = os.environ.get("BOOK_COLAB_EXECUTE", "").strip()
    if choice == "all":
        return NOTEBOOKS
    if choice:
        names = {c.strip() for c in choice.split(",")}
        return [p for p in NOTEBOOKS if p.stem in names]
    return [_quickest_training_chapter(NOTEBOOKS)]


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        pytest.fail(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _clean_env(venv: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in {"PYTHONPATH", "VIRTUAL_ENV", "JUPYTER_PATH", "JUPYTER_CONFIG_DIR",
                        "PYTHONHOME", "BNLIB_PROGRESS"}}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["PYTHONHASHSEED"] = "0"
    return env


def _copy_sources(dest: Path) -> None:
    """Copy the checkout's files (tracked + untracked, not ignored) so that the
    wheel is built from what is in the tree, never from a stale build/."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        listed = None
    if listed is None:
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
            ".git", ".venv", "_build", "build", "dist", "*.egg-info", "__pycache__", "data"))
        return
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


@pytest.fixture(scope="module")
def colab_env(tmp_path_factory):
    """A fresh venv with the pinned runtime and the bnlib wheel; returns
    (venv path, timings)."""
    base = tmp_path_factory.mktemp("colab")
    timings = {}
    t0 = time.monotonic()
    src, wheels, venv = base / "src", base / "wheels", base / "venv"
    src.mkdir()
    _copy_sources(src)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(src), "-w", str(wheels)])
    wheel = next(wheels.glob("bnlib-*.whl"), None)
    assert wheel, f"pip wheel produced no bnlib wheel in {wheels}"
    timings["wheel"] = time.monotonic() - t0

    t0 = time.monotonic()
    _run([sys.executable, "-m", "venv", str(venv)])
    py = venv / "bin" / "python"
    # torch is pinned (==) in the same command that installs bnlib, so pip can
    # never pick an unpinned (multi-GB CUDA) build to satisfy bnlib's torch>=2.1.
    _run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
          *_pins(), str(wheel)], env=_clean_env(venv))
    _run([str(py), "-m", "ipykernel", "install", "--sys-prefix", "--name", KERNEL,
          "--display-name", "bnlib (Colab-style)"], env=_clean_env(venv))
    timings["venv"] = time.monotonic() - t0
    yield venv, timings


PROBE = """import json, sys, bnlib, torch
print("COLAB_PROBE " + json.dumps({"bnlib": bnlib.__file__, "prefix": sys.prefix,
                                   "executable": sys.executable, "torch": torch.__version__}))"""


@pytest.mark.parametrize("notebook", _to_execute(), ids=_ids(_to_execute()))
def test_chapter_runs_outside_the_repository(colab_env, notebook, tmp_path, request):
    venv, timings = colab_env
    workdir = tmp_path / "colab"  # outside the repository, like Colab's /content
    workdir.mkdir()
    assert ROOT not in workdir.resolve().parents
    nb = nbformat.read(notebook, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    copy = workdir / notebook.name
    nbformat.write(nb, copy)

    t0 = time.monotonic()
    proc = subprocess.run(
        [str(venv / "bin" / "jupyter-execute"), f"--kernel_name={KERNEL}",
         f"--timeout={CELL_TIMEOUT_S}", "--startup_timeout=120", "--inplace", copy.name],
        cwd=workdir, env=_clean_env(venv), capture_output=True, text=True)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, (
        f"{notebook.name} failed outside the repository (in {workdir}, kernel {KERNEL}):\n"
        f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")

    ran = nbformat.read(copy, as_version=4)
    errors = [o for c in ran.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, f"{notebook.name}: error outputs: {[e.get('ename') for e in errors]}"

    first = next(c for c in ran.cells if c.cell_type == "code")
    first_text = "".join(o.get("text", "") for o in first.get("outputs", []))
    assert "git+" not in first_text and "ERROR" not in first_text, (
        f"{notebook.name}: the install cell tried to install although bnlib was importable:\n{first_text}")

    probe_out = "".join(o.get("text", "") for o in ran.cells[-1].get("outputs", []))
    m = re.search(r"COLAB_PROBE (.*)", probe_out)
    assert m, f"probe cell printed nothing: {ran.cells[-1].get('outputs')}"
    info = json.loads(m.group(1))
    bnlib_file = Path(info["bnlib"]).resolve()
    site = [p.resolve() for p in venv.glob("lib/python*/site-packages")]
    assert any(s in bnlib_file.parents for s in site), (
        f"the kernel imported bnlib from {bnlib_file}, not from the wheel in {venv}")
    assert ROOT not in bnlib_file.parents, f"the kernel imported the checkout's bnlib ({bnlib_file})"
    assert Path(info["prefix"]).resolve() == venv.resolve(), f"the kernel ran in {info['prefix']}"

    summary = (f"colab-style: wheel {timings['wheel']:.0f}s, venv+install {timings['venv']:.0f}s, "
               f"{notebook.name} executed in {elapsed:.0f}s (torch {info['torch']})")
    print(summary)
    request.config.stash.setdefault(SUMMARY, []).append(summary)


# --------------------------------------------------- the choice of chapter


def _notebook(*sources: str, seconds: float = 1.0):
    """A notebook whose code cells are ``sources``, each stored as taking ``seconds``."""
    nb = nbformat.v4.new_notebook()
    for src in sources:
        cell = nbformat.v4.new_code_cell(src)
        cell.metadata["execution"] = {"iopub.execute_input": "2026-01-01T00:00:00.000000Z",
                                      "shell.execute_reply": f"2026-01-01T00:00:{seconds:09.6f}Z"}
        nb.cells.append(cell)
    return nb


@pytest.mark.parametrize("sources, expected", [
    (["from bnlib.lab.training import fit", "h = fit(model, data, steps=10)"], True),
    (["from bnlib.lab import training", "h = training.fit(model, data)"], True),
    (["import bnlib.lab.training", "bnlib.lab.training.train_loop(model, batches, step, plan)"], True),
    (["from bnlib.lab.training import train_loop as loop", "loop(m, b, s, p)"], True),
    (["loss = model(x).sum()\nloss.backward()\nopt.step()"], True),
    (["from bnlib.lab import plots", "plots.figure(records)"], False),  # plots stored records
    (["import keras", "model.fit(x, y, epochs=1)"], False),  # not bnlib's fit
    (["from bnlib.lab import training", "y = layer(x)\ny.sum().backward()"], False),  # gradients, no step
    (["from bnlib.lab.training import fit", "def fit(m):\n    pass", "fit(model)"], False),  # a local fit
])
def test_trains(sources, expected):
    assert trains(_notebook(*sources)) == expected


def test_selection_is_the_quickest_chapter_that_trains(tmp_path):
    plots = _notebook("from bnlib.lab import plots", "plots.show(records)", seconds=1)
    slow = _notebook("from bnlib.lab.training import fit", "fit(model, data)", seconds=50)
    quick = _notebook("from bnlib.lab import training", "training.train_loop(m, b, s, p)", seconds=20)
    paths = []
    for name, nb in (("plots", plots), ("slow", slow), ("quick", quick)):
        paths.append(tmp_path / f"{name}.ipynb")
        nbformat.write(nb, paths[-1])
    assert _stored_runtime(paths[0]) < _stored_runtime(paths[2]) < _stored_runtime(paths[1])
    assert _quickest_training_chapter(paths).stem == "quick"
    with pytest.raises(AssertionError, match="no chapter trains"):
        _quickest_training_chapter(paths[:1])


def test_the_chapter_run_trains():
    """The chapter this test executes by default trains, and no quicker chapter does."""
    chosen = _quickest_training_chapter(NOTEBOOKS)
    assert trains(nbformat.read(chosen, as_version=4))
    quicker = [p for p in NOTEBOOKS if _stored_runtime(p) < _stored_runtime(chosen)]
    assert not any(trains(nbformat.read(p, as_version=4)) for p in quicker)

"""Run the chapters as plain Python, cell by cell, and record what each cell printed and how long it took.

This is how the book is checked on a machine without Jupyter, e.g. a GPU machine whose Python has
PyTorch but no notebook stack (see README, *Running on a GPU*). Each notebook runs in its own
process with the chapter's folder as working directory, like a kernel; code cells run in order in one
namespace. IPython-only lines (``%pip ...``, ``!cmd``) become ``pass``: the chapters use them only to
install bnlib where it is missing. A cell whose last statement is an expression prints its ``repr``,
as a notebook shows it. The first failing cell (an exception, e.g. a claim's ``assert``) ends the
chapter, which is then reported as failed.

Each cell's printed text is also compared with the output stored in the notebook, masked as nbval
masks it (``nbval_sanitize.cfg``): the record lists the cells that differ, e.g. the numbers that
change on a GPU or another CPU. ``--keep-going`` runs the cells after a failing one too.

Usage::

    python tools/run_chapters.py [--jobs 6] [--timeout 600] [--keep-going] [--json chapters.json] chapters/*.ipynb

The JSON holds the machine (``bnlib.lab.bench.environment``) and, per chapter: ``ok``, ``seconds``,
``device`` (what ``bnlib.lab.training.device()`` chose), the error if any, and per code cell its index, first
line, seconds and printed text. ``nbval`` (``make test``) remains the check of the stored outputs; this
tool checks that every chapter runs, and measures where the time goes, on another machine.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import contextlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

MAGIC = re.compile(r"^(\s*)[%!].*$")
# The Makefile's CPU_PATHS: the AVX2 code paths of ATen, oneDNN and MKL on any x86 CPU, so that a chapter's outputs
# (torch.randn's numbers among them) do not depend on whether the CPU has AVX-512.
CPU_PATHS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
MAX_TEXT = 8000  # characters of printed output kept per cell (its end)


def cell_to_python(source: str) -> str:
    """Replace IPython-only lines (``%magic``, ``!shell``) by ``pass`` at the same indentation."""
    return "\n".join(MAGIC.sub(r"\1pass", line) for line in source.splitlines())


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else value


def code_cells(path: Path) -> list[str]:
    """The sources of the code cells of the notebook at ``path``, in order."""
    nb = json.loads(path.read_text())
    return [_text(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def stored_outputs(path: Path) -> list[str | None]:
    """Per code cell, the text it printed when the notebook was stored (its streams, then the
    ``text/plain`` of its result); None for a cell tagged ``nbval-ignore-output``."""
    nb = json.loads(path.read_text())
    out = []
    for c in nb["cells"]:
        if c["cell_type"] != "code":
            continue
        if "nbval-ignore-output" in c.get("metadata", {}).get("tags", []):
            out.append(None)
            continue
        text = ""
        for o in c.get("outputs", []):
            if o.get("output_type") == "stream" and o.get("name") == "stdout":
                text += _text(o["text"])
            elif o.get("output_type") == "execute_result" and "text/plain" in o.get("data", {}):
                text += _text(o["data"]["text/plain"]) + "\n"
        out.append(text)
    return out


def sanitizers(config: Path) -> list[tuple[re.Pattern, str]]:
    """The ``regex``/``replace`` pairs of an nbval sanitize file (masks for volatile output)."""
    pairs, regex = [], None
    if config.exists():
        for line in config.read_text().splitlines():
            if line.startswith("regex:"):
                regex = re.compile(line[len("regex:"):].strip())
            elif line.startswith("replace:") and regex is not None:
                pairs.append((regex, line[len("replace:"):].strip()))
                regex = None
    return pairs


def same_output(a: str, b: str, masks: list[tuple[re.Pattern, str]]) -> bool:
    """Whether two outputs agree once volatile values are masked (as nbval compares them)."""
    for regex, replace in masks:
        a, b = regex.sub(replace, a), regex.sub(replace, b)
    return a.strip() == b.strip()


class _Tee(io.TextIOBase):
    """Writes to the real stream and keeps a copy of what was written."""

    def __init__(self, stream):
        self.stream, self.parts = stream, []

    def write(self, text):
        self.parts.append(text)
        self.stream.write(text)
        return len(text)

    def flush(self):
        self.stream.flush()


def run_notebook(path: Path, keep_going: bool = False) -> dict:
    """Execute the code cells of ``path`` in this process; returns the chapter's record.

    Each cell's record says whether its output matches the stored one (``matches_stored``; None for
    cells tagged ``nbval-ignore-output``), with the masks of ``nbval_sanitize.cfg`` beside the
    ``chapters/`` folder. With ``keep_going``, cells after a failing one still run.
    """
    import matplotlib
    matplotlib.use("Agg")

    namespace = {"__name__": "__main__"}
    cells, start = [], time.perf_counter()
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        _run_cells(path, namespace, cells, keep_going)
    finally:
        os.chdir(cwd)
    masks = sanitizers(path.resolve().parent.parent / "nbval_sanitize.cfg")
    for cell, stored in zip(cells, stored_outputs(path)):
        cell["matches_stored"] = None if stored is None else same_output(stored, cell["output"], masks)
    errors = [c["error"] for c in cells if "error" in c]
    error = errors[0] if errors else None
    device = None
    if "bnlib" in sys.modules:
        from bnlib.lab.training import device as bnlib_device
        device = str(bnlib_device())
    differ = [c["index"] for c in cells if c["matches_stored"] is False]
    return {"chapter": path.stem, "ok": error is None, "seconds": round(time.perf_counter() - start, 1),
            "device": device, "error": error, "differs_from_stored": differ, "cells": cells}


def _run_cells(path: Path, namespace: dict, cells: list, keep_going: bool) -> None:
    """Run the code cells of ``path`` in ``namespace``, appending one record per cell to ``cells``."""
    import matplotlib.pyplot as plt

    for i, src in enumerate(code_cells(path)):
        out, t0, error = _Tee(sys.stdout), time.perf_counter(), None
        try:
            tree = ast.parse(cell_to_python(src), filename=f"{path.name}[{i}]")
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):  # shown, as a notebook does
                last = ast.Expression(tree.body.pop().value)
            with contextlib.redirect_stdout(out):
                exec(compile(tree, f"{path.name}[{i}]", "exec"), namespace)
                if last is not None:
                    value = eval(compile(last, f"{path.name}[{i}]", "eval"), namespace)
                    if value is not None:
                        print(repr(value))
        except BaseException:  # noqa: BLE001 - recorded, and ends the chapter
            error = traceback.format_exc(limit=-8)
        plt.close("all")
        text = "".join(out.parts)
        cells.append({"index": i, "first_line": src.strip().splitlines()[0][:100] if src.strip() else "",
                      "seconds": round(time.perf_counter() - t0, 3), "output": text[-MAX_TEXT:]})
        if error:
            cells[-1]["error"] = error
            if not keep_going:
                return


def _child(path: str, record: str, keep_going: bool) -> None:
    """Entry point of one chapter's process: run it, write its record."""
    result = run_notebook(Path(path).resolve(), keep_going)
    Path(record).write_text(json.dumps(result, indent=1))
    sys.exit(0 if result["ok"] else 1)


def _run_one(path: Path, tmp: Path, timeout: float, threads: int, keep_going: bool) -> dict:
    """Run one chapter in a fresh process (a fresh 'kernel'); returns its record."""
    record = tmp / f"{path.stem}.json"
    log = tmp / f"{path.stem}.log"
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONHASHSEED="0", OMP_NUM_THREADS=str(threads))
    if platform.machine() in ("x86_64", "AMD64"):  # the CPU code paths the stored outputs were written with
        env.update(CPU_PATHS)
    env.pop("BNLIB_PROGRESS", None)
    start = time.perf_counter()
    with open(log, "w") as f:
        try:
            subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(path.resolve()), str(record)]
                           + (["--keep-going"] if keep_going else []),
                           stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"chapter": path.stem, "ok": False, "seconds": round(time.perf_counter() - start, 1),
                    "device": None, "error": f"timed out after {timeout:.0f} s", "cells": [], "differs_from_stored": [],
                    "log_tail": log.read_text()[-MAX_TEXT:]}
    if not record.exists():  # the process died before writing (e.g. killed, or an import error)
        return {"chapter": path.stem, "ok": False, "seconds": round(time.perf_counter() - start, 1),
                "device": None, "error": "the chapter's process ended without a record", "cells": [],
                "differs_from_stored": [],
                "log_tail": log.read_text()[-MAX_TEXT:]}
    return json.loads(record.read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--jobs", type=int, default=1, help="chapters run at once (default 1)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per chapter (default 600)")
    parser.add_argument("--json", type=Path, help="write the records here")
    parser.add_argument("--keep-going", action="store_true", help="run the cells after a failing one too")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child, args.keep_going)
        return 0
    if not args.notebooks:
        parser.error("expected one or more notebooks")
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // args.jobs))
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"run_chapters.{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bnlib.lab.bench import environment
    from bnlib.lab.training import device

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(_run_one, nb, tmp, args.timeout, threads, args.keep_going): nb for nb in args.notebooks}
        records = []
        for fut in concurrent.futures.as_completed(futures):
            rec = fut.result()
            records.append(rec)
            differ = rec.get("differs_from_stored") or []
            print(f"{'ok    ' if rec['ok'] else 'FAILED'} {rec['chapter']:<16} {rec['seconds']:7.1f} s  "
                  f"device {rec['device']}  cells differing from the stored output: {differ or 'none'}", flush=True)
            if not rec["ok"]:
                print(rec.get("error") or "", rec.get("log_tail", ""), sep="\n", flush=True)
    order = {nb.stem: i for i, nb in enumerate(args.notebooks)}
    records.sort(key=lambda r: order[r["chapter"]])
    result = {"environment": environment(device()), "jobs": args.jobs, "threads_per_chapter": threads,
              "seconds": round(time.perf_counter() - start, 1), "chapters": records}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    failed = [r["chapter"] for r in records if not r["ok"]]
    print(f"{len(records) - len(failed)} of {len(records)} chapters ran in {result['seconds']:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Validate CITATION.cff against the Citation File Format 1.2.0 schema, with no network.

The schema is the one the PyPI package ``cffconvert`` ships (``cffconvert/schemas/1.2.0/schema.json``);
``make venv`` downloads that wheel (pinned in the Makefile) into ``.venv/share/cff/`` without
installing it (its own requirements would pin an old jsonschema), and this script reads the schema
straight from the wheel. Besides the schema, the file must agree with the project: ``version`` and
``license`` with pyproject.toml (the repository URL is checked by ``tools/repository.py --check``).

Usage: ``python tools/check_citation.py [CITATION.cff] [--wheels DIR]``; exit 1 with one line per
problem.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = Path(os.environ.get("CFF_WHEELS", ROOT / ".venv" / "share" / "cff"))
SCHEMA_IN_WHEEL = "cffconvert/schemas/1.2.0/schema.json"


def load_schema(wheels: Path = WHEELS) -> dict:
    found = sorted(wheels.glob("cffconvert-*.whl"))
    if not found:
        raise FileNotFoundError(f"no cffconvert wheel in {wheels} (the Makefile's venv step downloads it)")
    with zipfile.ZipFile(found[-1]) as whl:
        return json.loads(whl.read(SCHEMA_IN_WHEEL))


def _plain(value):
    """YAML's dates as the strings they were written as (the schema expects strings)."""
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _pyproject(root: Path) -> dict:
    text = (root / "pyproject.toml").read_text(encoding="utf-8")
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]
    version = re.search(r'(?m)^version\s*=\s*"([^"]+)"', project)
    licence = re.search(r'(?m)^license\s*=\s*\{\s*text\s*=\s*"([^"]+)"', project)
    return {"version": version and version.group(1), "license": licence and licence.group(1)}


def problems(path: Path, schema: dict, root: Path = ROOT) -> list[str]:
    import jsonschema
    import yaml

    try:
        data = _plain(yaml.safe_load(path.read_text(encoding="utf-8")))
    except yaml.YAMLError as err:
        return [f"{path.name}: not YAML: {err}"]
    validator = jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker())
    out = [f"{path.name}: {'/'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}"
           for e in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))]
    if isinstance(data, dict):
        for key, want in _pyproject(root).items():
            if want is not None and str(data.get(key)) != want:
                out.append(f"{path.name}: {key} is {data.get(key)!r}, pyproject.toml says {want!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file", nargs="?", type=Path, default=ROOT / "CITATION.cff")
    p.add_argument("--wheels", type=Path, default=WHEELS, help="folder holding the cffconvert wheel")
    a = p.parse_args(argv)
    try:
        schema = load_schema(a.wheels)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    found = problems(a.file, schema)
    for line in found:
        print(line, file=sys.stderr)
    if not found:
        print(f"{a.file.name}: valid Citation File Format 1.2.0, agrees with pyproject.toml")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())

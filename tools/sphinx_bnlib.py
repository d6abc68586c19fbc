"""Sphinx extension for the book's API reference (api.md): links to bnlib's short names.

The library's most used names are re-exported by the package (``bnlib.BatchNorm2d`` is
``bnlib.modules.BatchNorm2d``), and docstrings refer to them by either name. The API page
documents each object once, under the module that defines it; this extension resolves a
reference to a re-exported name (``:class:`bnlib.BatchNorm2d```) to that entry, so the strict
build (``-n``) neither fails on it nor needs the object documented twice.

Loaded by _config.yml (``sphinx.local_extensions`` and the ``extensions`` list).
"""

from __future__ import annotations

import importlib


def canonical_name(target: str) -> str | None:
    """``bnlib.X`` -> ``module.qualname`` of the object it names, when that is another name."""
    module, _, attr = target.rpartition(".")
    if not module.startswith("bnlib") or not attr:
        return None
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None
    owner, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not owner or not qualname or f"{owner}.{qualname}" == target:
        return None
    return f"{owner}.{qualname}"


def _resolve(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target = canonical_name(node.get("reftarget", ""))
    if target is None:
        return None
    domain = env.get_domain("py")
    return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], target, node, contnode)


def setup(app):
    app.connect("missing-reference", _resolve)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

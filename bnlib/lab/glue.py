"""Glue a value computed in a notebook cell into the book's prose.

The chapters write every measured number in their text as ``{glue:text}`key:.1f` `` and store the value in
the cell that computed it with :func:`glue`. Jupyter Book (myst-nb) renders the role from the stored output,
so the text and the run beside it cannot disagree.

This is myst-nb's ``glue`` (``myst_nb.glue``), written out here so that a chapter runs where myst-nb is not
installed, as in Colab: it emits exactly the output myst-nb's would (a display message whose MIME types carry
myst-nb's prefix and whose metadata names the key), so notebooks executed with either store the same thing.
Outside IPython (a chapter run as a plain script) it does nothing.
"""

from __future__ import annotations

from typing import Any

__all__ = ["glue", "plain"]

#: The MIME-type prefix myst-nb gives a value that is glued but not displayed.
GLUE_PREFIX = "application/papermill.record/"


def plain(value: Any) -> Any:
    """Returns the Python number a NumPy scalar or a 0-dim array/tensor holds (``.item()``); anything else as is."""
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "shape", None) == ():
        return item()
    return value


def glue(name: str, value: Any, display: bool = False) -> None:
    """Store ``value``'s display form in the notebook under ``name``, for ``{glue:text}`name` `` in markdown.

    A NumPy scalar, a 0-dim NumPy array or a 0-dim torch tensor is stored as the plain Python number it holds
    (``.item()``), so ``{glue:text}`name:.1f` `` can format it (their own repr, ``np.float64(...)``, cannot be).

    Args:
        name: the key, unique within the notebook.
        value: the value; what is stored is what the notebook would display for it (for a scalar of NumPy or
            torch, for the Python number it holds).
        display: also show the value in the cell's output (default False: stored only).

    Returns:
        None.
    """
    try:
        from IPython import get_ipython
        from IPython.core.formatters import format_display_data
        from IPython.display import display as ipy_display
    except ImportError:  # no IPython: not in a notebook, nothing to store
        return
    if get_ipython() is None:
        return
    mimebundle, metadata = format_display_data(plain(value))
    prefix = "" if display else GLUE_PREFIX
    metadata["scrapbook"] = {"name": name, "mime_prefix": prefix}
    ipy_display({prefix + k: v for k, v in mimebundle.items()}, raw=True, metadata=metadata)

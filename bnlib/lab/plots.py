"""The book's figure style and the plots its results are drawn with (matplotlib).

* the style: :func:`apply_style` (or ``with style():``), :data:`RC`, the colour-blind-safe Okabe-Ito
  :data:`PALETTE`, the fixed pair :data:`BN_COLOR` / :data:`NO_BN_COLOR` for "with BN" against
  "without", and one colour per method book-wide: :data:`METHOD_COLORS` by the name a figure shows
  ("BN", "no BN", "LN", "GN", ...), :data:`NORM_COLORS` by ``make_norm``'s name, :func:`color_for` for
  either (a variant of a method, e.g. "BN + noise", keeps its method's colour and differs by line
  style); :func:`subplots` sizes a figure by its panels;
* the plots: training curves of several runs (:func:`plot_curves`), percentiles over training as a
  band around the median (:func:`plot_percentiles`, Figure 1 (b, c) of Ioffe & Szegedy 2015), a grid
  of histograms (:func:`plot_histograms`), a learning-rate sweep (:func:`plot_lr_sweep`; several seeds per
  rate give error bars) and the curves of several seeds as a mean with a min-max band
  (:func:`plot_seed_curves`).

Figures use 100 dpi so that the PNGs stored in the notebooks stay small. The functions only draw
(they never call ``plt.show()``) and return the Axes or Figure they drew on. ``import bnlib`` and
``import bnlib.lab`` never load this module: ``from bnlib.lab import plots``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np

__all__ = [
    "PALETTE",
    "BN_COLOR",
    "NO_BN_COLOR",
    "NORM_COLORS",
    "METHOD_COLORS",
    "RC",
    "apply_style",
    "style",
    "color_for",
    "subplots",
    "plot_curves",
    "plot_percentiles",
    "plot_histograms",
    "plot_lr_sweep",
    "plot_seed_curves",
]

#: Okabe-Ito colour-blind-safe palette (black first, as in the original).
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#E69F00", "#CC79A7", "#56B4E9", "#000000", "#F0E442"]

#: The fixed pair used whenever a figure compares a network with and without BN.
BN_COLOR = "#0072B2"      # blue
NO_BN_COLOR = "#D55E00"   # vermillion

#: One colour per normalization name (the names of ``bnlib.lab.models.make_norm``, plus 'bln' and 'ghost').
NORM_COLORS = {
    "bn": BN_COLOR,
    "bn-torch": BN_COLOR,
    "none": NO_BN_COLOR,
    "gn": "#009E73",      # bluish green
    "ln": "#E69F00",      # orange
    "in": "#CC79A7",      # reddish purple
    "brn": "#56B4E9",     # sky blue
    "bln": "#000000",     # black
    "ghost": "#999999",   # grey
    # Methods beyond the Okabe-Ito eight (Paul Tol's muted colours): normalization-free training, RMSNorm,
    # and the test-time adaptations of the distribution-shift chapter.
    "rms": "#117733",       # dark green
    "skipinit": "#332288",  # indigo
    "fixup": "#44AA99",     # teal
    "nf": "#882255",        # wine
    "nf+agc": "#AA4499",    # purple
    "adabn": "#DDCC77",     # sand
    "batch": "#88CCEE",     # cyan (prediction-time BN: the test batch's statistics)
    "mix": "#999933",       # olive
    "tent": "#661100",      # brown
}

#: The one colour of each method in every figure of the book, by the name figures and legends use.
METHOD_COLORS = {
    "BN": BN_COLOR,
    "no BN": NO_BN_COLOR,
    "GN": NORM_COLORS["gn"],
    "LN": NORM_COLORS["ln"],
    "IN": NORM_COLORS["in"],
    "Batch Renorm": NORM_COLORS["brn"],
    "BLN": NORM_COLORS["bln"],
    "GhostBN": NORM_COLORS["ghost"],
    "RMSNorm": NORM_COLORS["rms"],
    "SkipInit": NORM_COLORS["skipinit"],
    "Fixup": NORM_COLORS["fixup"],
    "NF": NORM_COLORS["nf"],
    "NF + AGC": NORM_COLORS["nf+agc"],
    "AdaBN": NORM_COLORS["adabn"],
    "prediction-time BN": NORM_COLORS["batch"],
    "mix": NORM_COLORS["mix"],
    "TENT": NORM_COLORS["tent"],
}

# Other spellings of those names (lower case), as chapters write them in legends.
_ALIASES = {
    "batchnorm": "bn", "batch norm": "bn", "batch normalization": "bn", "torch.nn bn": "bn", "bnlib bn": "bn",
    "groupnorm": "gn", "group norm": "gn", "layernorm": "ln", "layer norm": "ln", "instancenorm": "in",
    "instance norm": "in", "batch renorm": "brn", "batchrenorm": "brn", "ghost bn": "ghost", "ghostbn": "ghost",
    "ghost batchnorm": "ghost", "ghostbatchnorm": "ghost", "no bn": "none", "without bn": "none",
    "baseline": "none", "no norm": "none", "no normalization": "none", "rmsnorm": "rms", "nf + agc": "nf+agc",
    "prediction-time bn": "batch", "source": "bn",
}

#: The rcParams of the book's style.
RC: dict[str, Any] = {
    "figure.dpi": 100,
    "savefig.dpi": 100,
    "figure.figsize": (6.0, 3.6),
    "figure.constrained_layout.use": True,
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.5,
    "axes.prop_cycle": mpl.cycler(color=PALETTE),
    "image.cmap": "viridis",
}


def apply_style() -> None:
    """Make the book's style the default for all following figures.

    Returns:
        None.
    """
    mpl.rcParams.update(RC)


@contextlib.contextmanager
def style() -> Iterator[None]:
    """Context manager: the book's style inside the ``with`` block only.

    Returns:
        a context manager (yields None).
    """
    with mpl.rc_context(RC):
        yield


def color_for(label: Any, index: int = 0) -> str:
    """Colour for a curve: its method's colour if ``label`` names one (:data:`METHOD_COLORS`,
    :data:`NORM_COLORS`; case and a leading 'with ' are ignored: 'BN', 'with BN' -> BN_COLOR,
    'no BN', 'without BN', 'baseline' -> NO_BN_COLOR, 'GroupNorm' -> GN's colour), else ``PALETTE[index]``.

    Returns:
        str: a hex colour.
    """
    text = str(label).strip().lower()
    if text.startswith("with "):
        text = text[5:]
    text = _ALIASES.get(text, text)
    if text.startswith("mix"):  # "mix, N = 16": the mixing method, whatever its N
        text = "mix"
    if text in NORM_COLORS:
        return NORM_COLORS[text]
    return PALETTE[index % len(PALETTE)]


def subplots(nrows: int = 1, ncols: int = 1, *, panel: tuple[float, float] = (3.2, 2.6), **kw):
    """``plt.subplots`` with the book's style and a size of ``panel`` inches per panel.

    Returns:
        (Figure, Axes or array of Axes), as ``plt.subplots``.
    """
    with style():
        return plt.subplots(nrows, ncols, figsize=(panel[0] * ncols, panel[1] * nrows), **kw)


def _ax(ax):
    """Returns ``ax``, or the Axes of a new styled figure if it is None."""
    if ax is not None:
        return ax
    with style():
        return plt.figure().add_subplot()


_CURVE_AXES = {
    "test_acc": ("test_step", "test accuracy"),
    "wall_time": ("test_step", "wall time (s)"),
    "train_loss": ("step", "training loss"),
    "lr": ("step", "learning rate"),
}


def _metric_axes(metric: str) -> tuple[str, str]:
    """Returns ``(x attribute, y label)`` of a curve metric; raises ValueError for an unknown one."""
    if metric not in _CURVE_AXES:
        raise ValueError(f"metric must be one of {sorted(_CURVE_AXES)}, got {metric!r}")
    return _CURVE_AXES[metric]


def _label_curve_axes(ax, metric: str, ylabel: str) -> None:
    """Axis labels (training step, the metric) and a log y-axis for losses and learning rates."""
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    if metric in ("train_loss", "lr"):
        ax.set_yscale("log")


def plot_curves(histories: Mapping[str, Any], metric: str = "test_acc", ax=None,
                colors: Mapping[str, str] | None = None, **line_kw):
    """Plot one metric of several runs against training steps.

    Args:
        histories: ``{label: History}`` (or anything with the same list
            attributes); the legend shows the labels.
        metric: ``'test_acc'``, ``'train_loss'``, ``'lr'`` or ``'wall_time'``.
        ax: Axes to draw on; default a new figure.
        colors: ``{label: colour}``; default :func:`color_for` of each label.
        **line_kw: passed to ``ax.plot``.

    A diverged run ends with an ``x`` marker at its last point.

    Returns:
        matplotlib Axes.
    """
    xname, ylabel = _metric_axes(metric)
    ax = _ax(ax)
    for i, (label, h) in enumerate(histories.items()):
        color = (colors or {}).get(label) or color_for(label, i)
        x, y = np.asarray(getattr(h, xname)), np.asarray(getattr(h, metric), dtype=float)
        ax.plot(x, y, color=color, label=str(label), **line_kw)
        if getattr(h, "diverged", False) and len(x):
            ax.plot(x[-1:], np.nan_to_num(y[-1:], nan=0.0), "x", color=color, ms=7, mew=2)
    _label_curve_axes(ax, metric, ylabel)
    if len(histories) > 1:
        ax.legend()
    return ax


def plot_percentiles(steps, pcts=None, ax=None, label: str | None = None,
                     color: str | None = None, band_alpha: float = 0.25):
    """Plot percentiles over training as a band around a median line (Figure 1 b, c).

    Args:
        steps: ``(T,)`` steps -- or a :class:`bnlib.lab.probes.PercentileProbe`
            (then leave ``pcts`` None).
        pcts: ``(T, k)`` percentiles, lowest first (e.g. 15, 50, 85); the
            band spans the first and last column, the line is the middle one.
        ax, label, color: as usual; ``color`` defaults to ``color_for(label)``.

    Returns:
        matplotlib Axes.
    """
    if pcts is None:
        steps, pcts = steps.array()
    steps = np.asarray(steps)
    pcts = np.asarray(pcts, dtype=float).reshape(len(steps), -1)
    ax = _ax(ax)
    color = color or color_for(label if label is not None else "", 0)
    k = pcts.shape[1]
    if k >= 2:
        ax.fill_between(steps, pcts[:, 0], pcts[:, -1], color=color, alpha=band_alpha, linewidth=0)
    ax.plot(steps, pcts[:, k // 2], color=color, label=label)
    ax.set_xlabel("training step")
    if label is not None:
        ax.legend()
    return ax


def _cell(cell) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Returns ``(counts, edges, title)`` from a histogram cell (tuple or dict)."""
    if isinstance(cell, Mapping):
        return np.asarray(cell["counts"], float), np.asarray(cell["edges"], float), cell.get("title")
    counts, edges = cell[0], cell[1]
    title = cell[2] if len(cell) > 2 else None
    return np.asarray(counts, float), np.asarray(edges, float), title


def _rows(grid) -> tuple[list, list]:
    """Returns ``(row labels, rows of cells)`` from the accepted grid layouts."""
    items = list(grid.items()) if isinstance(grid, Mapping) else [(None, r) for r in grid]
    labels, rows = [], []
    for label, row in items:
        labels.append(label)
        rows.append(list(row))
    return labels, rows


def plot_histograms(grid, *, col_labels: Sequence[str] | None = None, density: bool = True,
                    colors: Mapping[str, str] | None = None, panel: tuple[float, float] = (2.0, 1.5),
                    sharex: bool = True):
    """Draw a grid of histograms (rows: e.g. layers or models; columns: e.g. steps).

    Args:
        grid: ``{row label: row}`` or a list of rows. A row is a list of cells
            -- ``(counts, edges)``, ``(counts, edges, title)`` or a dict with
            ``'counts'``, ``'edges'`` and optional ``'title'``.
        col_labels: titles of the columns (default: the cells' titles).
        density: normalise each histogram to unit area.
        colors: ``{row label: colour}``; default :func:`color_for`.
        panel: inches per panel; sharex: share x-axes.

    Returns:
        matplotlib Figure.
    """
    labels, rows = _rows(grid)
    nrows, ncols = len(rows), max((len(r) for r in rows), default=0)
    if nrows == 0 or ncols == 0:
        raise ValueError("plot_histograms needs at least one cell")
    with style():
        fig, axes = plt.subplots(nrows, ncols, figsize=(panel[0] * ncols, panel[1] * nrows),
                                 sharex=sharex, squeeze=False)
    for r, (label, row) in enumerate(zip(labels, rows)):
        color = (colors or {}).get(label) or color_for(label if label is not None else "", r)
        for c in range(ncols):
            ax = axes[r, c]
            if c >= len(row):
                ax.set_visible(False)
                continue
            counts, edges, title = _cell(row[c])
            if density and counts.sum() > 0:
                counts = counts / (counts.sum() * np.diff(edges))
            ax.stairs(counts, edges, fill=True, color=color, alpha=0.8)
            ax.set_yticks([])
            ax.grid(False)
            top = col_labels[c] if col_labels is not None and r == 0 else (title if col_labels is None else None)
            if top:
                ax.set_title(top)
            if c == 0 and label is not None:
                ax.set_ylabel(str(label))
    return fig


def _value(v: Any, metric: str) -> tuple[float, bool]:
    """Returns ``(value, diverged)`` for a History (its ``metric``) or a plain number."""
    if hasattr(v, "test_acc"):
        x = getattr(v, metric)
        return (float("nan") if x is None else float(x)), bool(getattr(v, "diverged", False))
    return float(v), not math.isfinite(float(v))


def _seed_values(v: Any, metric: str) -> list[tuple[float, bool]]:
    """Returns ``[(value, diverged), ...]`` for one sweep point: a History, a number, or a list of them (seeds)."""
    if isinstance(v, (list, tuple)):
        return [_value(x, metric) for x in v]
    if hasattr(v, "values") and not hasattr(v, "test_acc") and not isinstance(v, Mapping):
        return [_value(x, metric) for x in v.values]      # a bnlib.lab.protocol.Spread
    return [_value(v, metric)]


def plot_lr_sweep(results, ax=None, metric: str = "final_acc", label: str | None = None,
                  colors: Mapping[str, str] | None = None):
    """Plot a learning-rate sweep: final accuracy (or any number) against lr, log x-axis.

    Args:
        results: ``{lr: point}`` for one curve, or ``{label: {lr: point}}`` for several. A point is a
            History, a number, or several seeds of them (a list, or a :class:`bnlib.lab.protocol.Spread`):
            then the mean is drawn with error bars of one sample standard deviation; a point is drawn as
            diverged only when every seed diverged (the others' mean is shown otherwise).
        metric: attribute read from each History (``'final_acc'``, ``'best_acc'``).
        ax, label, colors: as usual.

    Diverged runs are drawn as ``x`` markers at the bottom of the axes.

    Returns:
        matplotlib Axes.
    """
    ax = _ax(ax)
    first = next(iter(results.values()), None) if isinstance(results, Mapping) else None
    if isinstance(first, Mapping):
        series = dict(results)
    else:
        series = {label: dict(results)}
    for i, (name, sweep) in enumerate(series.items()):
        color = (colors or {}).get(name) or color_for(name if name is not None else "", i)
        lrs = sorted(sweep)
        seeds = [_seed_values(sweep[lr], metric) for lr in lrs]
        kept = [[x for x, diverged in s if not diverged] for s in seeds]   # the seeds that did not diverge
        vals = [float(np.mean(k)) if k else math.nan for k in kept]
        errs = [float(np.std(k, ddof=1)) if len(k) > 1 else 0.0 for k in kept]
        bad = [not k for k in kept]
        lrs, vals, bad, errs = (np.asarray(lrs, float), np.asarray(vals, float), np.asarray(bad, bool),
                                np.asarray(errs, float))
        ok = ~bad & np.isfinite(vals)
        lbl = None if name is None else str(name)
        if any(len(s) > 1 for s in seeds):
            ax.errorbar(lrs[ok], vals[ok], yerr=errs[ok], fmt="o-", color=color, label=lbl, ms=4, capsize=3)
        else:
            ax.plot(lrs[ok], vals[ok], "o-", color=color, label=lbl, ms=4)
        if bad.any():
            ax.plot(lrs[bad], np.zeros(bad.sum()), "x", color=color, ms=7, mew=2,
                    transform=ax.get_xaxis_transform(), clip_on=False)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(metric.replace("_", " "))
    if any(n is not None for n in series):
        ax.legend()
    return ax


def plot_seed_curves(runs: Mapping[str, Sequence[Any]], metric: str = "test_acc", ax=None,
                     colors: Mapping[str, str] | None = None, band_alpha: float = 0.2):
    """Plot one metric of several seeds per configuration: the mean line and a min-max band.

    Args:
        runs: ``{label: [History, ...]}``, one list of seeds per configuration; the seeds of one label
            must have been evaluated at the same steps.
        metric, ax, colors: as in :func:`plot_curves`.

    Returns:
        matplotlib Axes.
    """
    xname, ylabel = _metric_axes(metric)
    ax = _ax(ax)
    for i, (label, hists) in enumerate(runs.items()):
        hists = list(hists)
        if not hists:
            raise ValueError(f"no runs for {label!r}")
        x = np.asarray(getattr(hists[0], xname))
        n = min(len(getattr(h, metric)) for h in hists)
        ys = np.asarray([np.asarray(getattr(h, metric), dtype=float)[:n] for h in hists])
        color = (colors or {}).get(label) or color_for(label, i)
        ax.plot(x[:n], ys.mean(axis=0), color=color, label=f"{label} (mean of {len(hists)})")
        if len(hists) > 1:
            ax.fill_between(x[:n], ys.min(axis=0), ys.max(axis=0), color=color, alpha=band_alpha, linewidth=0)
    _label_curve_axes(ax, metric, ylabel)
    ax.legend()
    return ax

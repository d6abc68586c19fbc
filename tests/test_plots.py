"""The kit's plots: seed curves, learning-rate sweeps, and the book's one colour per method."""

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from bnlib.lab import plots  # noqa: E402
from bnlib.lab.protocol import Spread  # noqa: E402
from bnlib.lab.training import History  # noqa: E402


def _hist(accs):
    return History(test_step=list(range(0, 10 * len(accs), 10)), test_acc=list(accs))


def test_plot_seed_curves_draws_mean_and_band():
    ax = plots.plot_seed_curves({"BN": [_hist([0.1, 0.5]), _hist([0.1, 0.7])]})
    line = ax.get_lines()[0]
    assert list(line.get_ydata()) == pytest.approx([0.1, 0.6])
    assert ax.get_xlabel() == "training step" and ax.get_ylabel() == "test accuracy"
    assert len(ax.collections) == 1                 # the min-max band


def test_plot_lr_sweep_error_bars_from_seeds():
    ax = plots.plot_lr_sweep({"BN": {0.1: [0.8, 0.9, 1.0], 1.0: Spread([0.5, 0.5, 0.5])}})
    line = ax.get_lines()[0]
    assert list(line.get_ydata()) == pytest.approx([0.9, 0.5])
    assert ax.containers, "error bars expected"


def test_every_method_has_its_own_colour():
    colours = list(plots.METHOD_COLORS.values())
    assert len(set(colours)) == len(colours)  # no two methods share a colour
    for name, colour in plots.METHOD_COLORS.items():
        assert plots.color_for(name) == colour
        assert plots.color_for(f"with {name}") == colour


def test_spellings_name_the_same_method():
    assert plots.color_for("no BN") == plots.color_for("without BN") == plots.NO_BN_COLOR
    assert plots.color_for("no normalization") == plots.color_for("none") == plots.NO_BN_COLOR
    assert plots.color_for("GroupNorm") == plots.color_for("gn") == plots.METHOD_COLORS["GN"]
    assert plots.color_for("Batch Renorm") == plots.NORM_COLORS["brn"]
    assert plots.color_for("RMSNorm") == plots.color_for("rms") == plots.METHOD_COLORS["RMSNorm"]
    assert plots.color_for("mix, N = 16") == plots.color_for("mix4") == plots.METHOD_COLORS["mix"]
    assert plots.color_for("source") == plots.BN_COLOR  # the source model is plain BN with running statistics


def test_other_curves_take_the_palette():
    assert plots.color_for("something else", 2) == plots.PALETTE[2]

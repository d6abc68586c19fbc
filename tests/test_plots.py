"""The book's one colour per method (bnlib.lab.plots)."""

from bnlib.lab import plots


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

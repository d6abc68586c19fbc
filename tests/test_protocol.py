"""The book's statistical protocol: t quantiles, intervals, verdicts and the comparison seeds."""

import math
import re

import numpy as np
import pytest
import torch

from bnlib.lab import protocol
from bnlib.lab.protocol import Comparison, Spread, ci, paired, seeds, t_cdf, t_quantile, welch


# Two-sided critical values from a printed t table (three decimals).
@pytest.mark.parametrize("p, df, table", [
    (0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 3, 3.182), (0.975, 4, 2.776), (0.975, 9, 2.262),
    (0.975, 30, 2.042), (0.95, 10, 1.812), (0.995, 5, 4.032), (0.9, 2, 1.886), (0.975, 1000, 1.962),
])
def test_t_quantile_matches_the_table(p, df, table):
    assert t_quantile(p, df) == pytest.approx(table, abs=6e-4)
    assert t_quantile(1 - p, df) == pytest.approx(-t_quantile(p, df))
    assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)


def test_t_cdf_closed_forms():
    # df = 1 is Cauchy: F(t) = 1/2 + atan(t)/π; df = 2: F(t) = 1/2 + t / (2√(2 + t²))
    for t in (-3.0, -0.4, 0.0, 0.7, 5.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-13)


def test_non_integer_df_between_its_neighbours_and_equal_to_the_integrated_density():
    q = t_quantile(0.975, 2.5)
    assert t_quantile(0.975, 3) < q < t_quantile(0.975, 2)
    # independent check: integrate Student's density numerically for df = 2.5
    df = 2.5
    x = np.linspace(0.0, q, 200_001)
    pdf = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) \
        * (1 + x ** 2 / df) ** (-(df + 1) / 2)
    area = float(np.sum((pdf[1:] + pdf[:-1]) / 2 * np.diff(x)))
    assert 0.5 + area == pytest.approx(0.975, abs=1e-8)


def test_t_refuses_bad_arguments():
    with pytest.raises(ValueError, match="0 < p < 1"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile(0.975, 0)


def test_ci_is_mean_plus_minus_t_times_standard_error():
    mean, low, high = ci([1.0, 2.0, 3.0])            # s = 1, n = 3
    assert mean == pytest.approx(2.0)
    assert (high - mean) == pytest.approx(4.303 / math.sqrt(3), abs=1e-3)
    assert (mean - low) == pytest.approx(high - mean)
    assert ci([1.0, 2.0, 3.0], confidence=0.9)[2] < high


def test_ci_refuses_fewer_than_two_values():
    with pytest.raises(ValueError, match="at least 2 values"):
        ci([1.0])
    with pytest.raises(ValueError, match="at least 2 values"):
        paired(Spread([1.0]), Spread([2.0]))
    with pytest.raises(ValueError, match="confidence"):
        ci([1.0, 2.0], confidence=95)


def test_paired_uses_the_per_seed_differences():
    a, b = [0.91, 0.93, 0.95], [0.90, 0.91, 0.92]     # differences 0.01, 0.02, 0.03
    c = paired(a, b)
    assert c.mean == pytest.approx(0.02) and c.n == 3 and c.df == 2
    assert c.high - c.mean == pytest.approx(4.3027 * 0.01 / math.sqrt(3), rel=1e-4)
    assert c.verdict == "inconclusive"               # 0.02 ± 0.025 includes 0
    d = paired([0.91, 0.93, 0.95], [0.90, 0.92, 0.94])   # every seed 0.01 ahead: no spread at all
    assert (d.low, d.high) == pytest.approx((0.01, 0.01)) and d.verdict == "greater"
    assert paired(b, a).mean == pytest.approx(-0.02)


def test_paired_accepts_arrays_tensors_and_spreads():
    a = np.array([1.0, 2.0, 4.0])
    b = torch.tensor([0.0, 0.5, 1.0])
    c = paired(a, b)
    assert c.mean == pytest.approx(np.mean(a - b.numpy()))
    assert paired(Spread(a), Spread(b.tolist())) == c


def test_paired_refuses_different_lengths_bad_margins_and_nan():
    with pytest.raises(ValueError, match="3 and 2"):
        paired([1, 2, 3], [1, 2])
    for bad in (0, -1.0, math.inf):
        with pytest.raises(ValueError, match="margin"):
            paired([1, 2, 3], [1, 2, 3], margin=bad)
    with pytest.raises(ValueError, match="NaN"):
        paired([1, 2, float("nan")], [1, 2, 3])


def test_verdicts():
    up, down = paired([2.0, 2.1, 2.2], [1.0, 1.0, 1.0]), paired([1.0, 1.0, 1.0], [2.0, 2.1, 2.2])
    assert up.verdict == "greater" and down.verdict == "less"
    tie = [0.5, 0.52, 0.49, 0.51], [0.5, 0.51, 0.5, 0.5]
    assert paired(*tie).verdict == "inconclusive"                 # without a margin a tie is not a claim
    assert paired(*tie, margin=0.05).verdict == "equivalent"
    assert paired(*tie, margin=0.005).verdict == "inconclusive"   # the interval is wider than the margin
    # a small but consistent difference inside the margin: the margin's question is answered first
    small = paired([1.010, 1.012, 1.011], [1.0, 1.0, 1.0], margin=0.5)
    assert small.low > 0 and small.verdict == "equivalent"
    assert paired([1.010, 1.012, 1.011], [1.0, 1.0, 1.0]).verdict == "greater"
    # the interval must be strictly inside the margin
    assert Comparison(0.0, -1.0, 1.0, 3, 2.0, margin=1.0).verdict == "inconclusive"
    assert set(protocol.VERDICTS) == {"greater", "less", "equivalent", "inconclusive"}


def test_format():
    c = Comparison(0.012, 0.004, 0.020, 3, 2.0)
    assert c.format(1, 100) == "+1.2 [+0.4, +2.0]"
    assert Comparison(-0.5, -0.9, -0.1, 3, 2.0).format() == "-0.5 [-0.9, -0.1]"
    assert "greater" in str(c)


def test_welch_against_a_hand_computation():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0]
    # means 2.5 and 4; variances 5/3 and 4; squared standard errors 5/12 and 4/3
    va, vb = 5 / 12, 4 / 3
    nu = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)          # = 3.2347...
    assert nu == pytest.approx(3.2347, abs=1e-4)
    c = welch(a, b)
    assert c.mean == pytest.approx(-1.5) and c.df == pytest.approx(nu)
    half = t_quantile(0.975, nu) * math.sqrt(va + vb)
    assert (c.low, c.high) == pytest.approx((-1.5 - half, -1.5 + half))
    assert t_quantile(0.975, 4) < t_quantile(0.975, nu) < t_quantile(0.975, 3)
    assert c.verdict == "inconclusive" and c.n == 3


def test_welch_equal_groups_and_constant_groups():
    x = [1.0, 2.0, 3.0]
    assert welch(x, x).mean == 0 and welch(x, x).df == pytest.approx(4.0)   # equal variances, equal n: 2n − 2
    c = welch([2.0, 2.0], [1.0, 1.0, 1.0])
    assert (c.low, c.high) == (1.0, 1.0) and c.verdict == "greater"
    with pytest.raises(ValueError, match="at least 2 values"):
        welch([1.0], [1.0, 2.0])


def test_spread_is_mean_and_sample_std():
    s = Spread([0.90, 0.92, 0.94])
    assert s.n == 3 and s.mean == pytest.approx(0.92) and s.std == pytest.approx(0.02)
    assert (s.min, s.max) == (0.90, 0.94)
    assert s.format(1, 100) == "92.0 ± 2.0"
    assert Spread([5.0]).std == 0.0
    assert Spread(np.array([1.0, 3.0])).values == (1.0, 3.0)
    with pytest.raises(ValueError, match="at least one"):
        Spread([])


def test_seeds_default_and_environment(monkeypatch):
    monkeypatch.delenv("BNLIB_SEEDS", raising=False)
    assert seeds() == (0, 1, 2) and seeds(5) == (0, 1, 2, 3, 4)
    monkeypatch.setenv("BNLIB_SEEDS", "3,4,5")
    assert seeds() == (3, 4, 5) and seeds(2) == (3, 4)
    assert seeds(5) == (3, 4, 5, 6, 7)                  # continues after the largest listed
    monkeypatch.setenv("BNLIB_SEEDS", " 10, 2 ")
    assert seeds(3) == (10, 2, 11)
    monkeypatch.setenv("BNLIB_SEEDS", "")
    assert seeds() == (0, 1, 2)


@pytest.mark.parametrize("text, message", [
    ("3;4;5", "comma-separated"), ("3,x,5", "'x'"), ("3,,5", "comma-separated"), ("1.5,2", "'1.5'"),
    ("-1,2", "non-negative"), ("3,3,4", "listed twice"),
])
def test_seeds_refuse_bad_environment(monkeypatch, text, message):
    monkeypatch.setenv("BNLIB_SEEDS", text)
    with pytest.raises(ValueError, match=message):
        seeds()


def test_seeds_refuse_bad_n(monkeypatch):
    monkeypatch.delenv("BNLIB_SEEDS", raising=False)
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="positive integer"):
            seeds(bad)


def test_the_worked_example_of_the_measuring_page():
    """measuring.md's example runs and prints what the page shows."""
    import doctest
    from pathlib import Path

    page = Path(__file__).resolve().parent.parent / "measuring.md"
    blocks = re.findall(r"```pycon\n(.*?)```", page.read_text(), re.S)
    assert blocks, "the page's worked example"
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for i, block in enumerate(blocks):
        runner.run(parser.get_doctest(block, {}, f"measuring.md[{i}]", str(page), 0))
    assert runner.summarize(verbose=False).failed == 0


"""The book's one statistical protocol: paired seeds, a 95 % confidence interval, and three verdicts.

Every comparison in the book ("BN reaches a higher accuracy", "the bias changes nothing") is judged the same way:

1. The compared configurations run on the same seeds, :func:`seeds`, so that a seed fixes the initialisation and
   the data order of both arms; the comparison is then **paired**, one difference per seed (:func:`paired`).
   Where pairing is impossible the two groups are compared unpaired with Welch's interval (:func:`welch`).
2. The mean difference is reported with its **95 % confidence interval** from Student's t distribution
   (n − 1 degrees of freedom for paired differences; Welch–Satterthwaite's for unpaired ones). Spreads are sample
   standard deviations (``ddof=1``), :class:`Spread`.
3. The verdict (:attr:`Comparison.verdict`):

   * ``"greater"`` / ``"less"``: the interval lies above / below 0 ("A beats B");
   * ``"equivalent"``: a margin δ was stated *before* the result and the interval lies inside (−δ, +δ)
     ("no difference", "a tie"). This is two one-sided tests, each at the 2.5 % level (the 95 % two-sided interval
     where TOST's usual form uses a 90 % one), so the verdict is conservative;
   * ``"inconclusive"``: anything else; no claim is drawn from it.

A sketch of a chapter's use::

    acc = {norm: [run(norm, seed) for seed in protocol.seeds()] for norm in ("bn", None)}
    gain = protocol.paired(acc["bn"], acc[None])          # a[i] and b[i] from the same seed
    glue("gain", gain.format(1, 100))                      # "+3.1 [+1.9, +4.3]"
    assert gain.verdict == "greater"

The comparison seeds are ``0, 1, ..., n - 1`` unless the environment variable ``BNLIB_SEEDS`` (``"3,4,5"``)
replaces them, so that a whole run of the book can be repeated on other seeds: a claim that holds only for some
seeds is not a claim.

Student's t quantiles are computed here (no SciPy): the distribution function through the regularized incomplete
beta function (a continued fraction), inverted by bisection; this holds for non-integer degrees of freedom too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Comparison", "Spread", "ci", "mean_std", "paired", "seeds", "t_cdf", "t_quantile", "welch"]

#: The environment variable whose comma-separated integers replace the comparison seeds.
SEEDS_ENV = "BNLIB_SEEDS"

VERDICTS = ("greater", "less", "equivalent", "inconclusive")


# ---------------------------------------------------------------------------------------------------- seeds

def seeds(n: int = 3) -> tuple[int, ...]:
    """Returns the book's ``n`` comparison seeds.

    By default ``(0, 1, ..., n - 1)``. When ``BNLIB_SEEDS`` is set (``"3,4,5"``), its first ``n`` integers; if it
    lists fewer than ``n``, the seeds continue with consecutive integers after its largest.

    Raises:
        ValueError: ``n`` is not a positive integer, or ``BNLIB_SEEDS`` is not a comma-separated list of distinct
            non-negative integers.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"seeds(n) needs a positive integer n, got {n!r}")
    text = os.environ.get(SEEDS_ENV)
    if text is None or not text.strip():
        return tuple(range(n))
    listed = []
    for item in text.split(","):
        item = item.strip()
        try:
            seed = int(item)
        except ValueError:
            raise ValueError(f"{SEEDS_ENV}={text!r}: expected comma-separated non-negative integers such as "
                             f"'3,4,5', found {item!r}") from None
        if seed < 0:
            raise ValueError(f"{SEEDS_ENV}={text!r}: seeds must be non-negative, found {seed}")
        if seed in listed:
            raise ValueError(f"{SEEDS_ENV}={text!r}: seed {seed} is listed twice")
        listed.append(seed)
    chosen = listed[:n]
    nxt = max(listed) + 1
    while len(chosen) < n:
        chosen.append(nxt)
        nxt += 1
    return tuple(chosen)


# ---------------------------------------------------------------------------------------------------- spread

@dataclass(frozen=True, init=False)
class Spread:
    """The values one metric took over seeds, with their mean and sample standard deviation (``ddof=1``)."""

    values: tuple[float, ...]

    def __init__(self, values: Iterable[float]):
        vals = tuple(_number(v) for v in values)
        if not vals:
            raise ValueError("Spread needs at least one value")
        object.__setattr__(self, "values", vals)

    @property
    def n(self) -> int:
        """Returns the number of seeds."""
        return len(self.values)

    @property
    def mean(self) -> float:
        """Returns the mean over seeds."""
        return math.fsum(self.values) / self.n

    @property
    def std(self) -> float:
        """Returns the sample standard deviation over seeds, s = √(Σ(x − x̄)² / (n − 1)) (0 for a single value)."""
        if self.n < 2:
            return 0.0
        m = self.mean
        return math.sqrt(math.fsum((v - m) ** 2 for v in self.values) / (self.n - 1))

    @property
    def min(self) -> float:
        """Returns the smallest value."""
        return min(self.values)

    @property
    def max(self) -> float:
        """Returns the largest value."""
        return max(self.values)

    def scaled(self, factor: float) -> Spread:
        """Returns the same spread with every value multiplied by ``factor`` (e.g. 100 for per cent)."""
        return Spread(v * factor for v in self.values)

    def format(self, digits: int = 1, scale: float = 1.0) -> str:
        """Returns ``"mean ± std"`` of the values times ``scale``, with ``digits`` decimals."""
        s = self.scaled(scale)
        return f"{s.mean:.{digits}f} ± {s.std:.{digits}f}"

    def __str__(self) -> str:
        return f"{self.mean:.4g} ± {self.std:.2g} (n={self.n})"


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Returns the mean and the sample standard deviation (``ddof=1``) of ``values``, as plain floats."""
    s = Spread(values)
    return s.mean, s.std


def _number(v) -> float:
    """Returns ``v`` as a float: a Python, NumPy or 0-dim torch number (anything ``float()`` accepts)."""
    x = float(v)
    if math.isnan(x):
        raise ValueError("a measured value is NaN: a diverged run cannot enter a comparison")
    return x


def _values(values, what: str) -> tuple[float, ...]:
    vals = values.values if isinstance(values, Spread) else tuple(_number(v) for v in values)
    if len(vals) < 2:
        raise ValueError(f"{what}: a confidence interval needs at least 2 values (seeds), got {len(vals)}")
    return vals


# ---------------------------------------------------------------------------------------------------- Student's t

def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))          # even step: d_{2m}
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))  # odd step: d_{2m+1}
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) = B(x; a, b) / B(a, b), for 0 ≤ x ≤ 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    # x^a (1 − x)^b / (a B(a, b)), in logs
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):                    # the fraction converges fast here
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b      # I_x(a, b) = 1 − I_{1−x}(b, a)


def _check_df(df: float) -> float:
    df = float(df)
    if not df > 0 or math.isinf(df):
        raise ValueError(f"degrees of freedom must be a positive finite number, got {df}")
    return df


def t_cdf(t: float, df: float) -> float:
    """Returns P(T ≤ t) for Student's t with ``df`` degrees of freedom (any positive real ``df``).

    P(T ≤ t) = 1 − ½ I_x(df/2, ½) for t ≥ 0, with x = df / (df + t²); symmetric for t < 0.
    """
    df = _check_df(df)
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))   # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Returns the t with P(T ≤ t) = ``p`` for Student's t with ``df`` degrees of freedom, by bisection.

    ``t_quantile(0.975, 2)`` is 4.303, the half-width factor of a 95 % interval from 3 values.
    """
    df = _check_df(df)
    if not 0.0 < p < 1.0:
        raise ValueError(f"a quantile needs 0 < p < 1, got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:            # bracket the quantile
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


def _check_confidence(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1 (0.95 for a 95 % interval), got {confidence}")
    return float(confidence)


def ci(values: Iterable[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Returns ``(mean, low, high)``: the mean of ``values`` and its Student-t confidence interval.

    x̄ ± t_{(1+c)/2, n−1} · s / √n, with s the sample standard deviation.

    Raises:
        ValueError: fewer than 2 values, or a confidence outside (0, 1).
    """
    confidence = _check_confidence(confidence)
    s = Spread(_values(values, "ci"))
    half = t_quantile((1.0 + confidence) / 2.0, s.n - 1) * s.std / math.sqrt(s.n)
    return s.mean, s.mean - half, s.mean + half


# ---------------------------------------------------------------------------------------------------- comparisons

@dataclass(frozen=True)
class Comparison:
    """A difference a − b between two configurations: its mean, confidence interval and verdict.

    Attributes:
        mean: the mean difference (a − b).
        low, high: the bounds of its confidence interval.
        n: the number of seeds (paired) or the smaller group's size (unpaired).
        df: the degrees of freedom of the t quantile used.
        margin: the equivalence margin δ stated before the result, or None.
        confidence: the interval's confidence level (0.95).
    """

    mean: float
    low: float
    high: float
    n: int
    df: float
    margin: float | None = None
    confidence: float = 0.95

    @property
    def verdict(self) -> str:
        """Returns ``"greater"``, ``"less"``, ``"equivalent"`` or ``"inconclusive"``.

        ``"equivalent"`` when a margin was given and the interval lies inside (−margin, +margin) (two one-sided
        tests at the 2.5 % level each: conservative); a margin asks the equivalence question, so this verdict
        comes first even when the interval also excludes 0 (a difference smaller than the stated margin).
        Otherwise ``"greater"`` when the interval lies above 0, ``"less"`` when below, else ``"inconclusive"``.
        """
        if self.margin is not None and -self.margin < self.low and self.high < self.margin:
            return "equivalent"
        if self.low > 0:
            return "greater"
        if self.high < 0:
            return "less"
        return "inconclusive"

    def format(self, digits: int = 1, scale: float = 1.0) -> str:
        """Returns ``"+1.2 [+0.4, +2.0]"``: the mean difference and its interval times ``scale``."""
        return (f"{self.mean * scale:+.{digits}f} "
                f"[{self.low * scale:+.{digits}f}, {self.high * scale:+.{digits}f}]")

    def __str__(self) -> str:
        margin = "" if self.margin is None else f", margin ±{self.margin:.3g}"
        return f"{self.format(3)} ({self.confidence:.0%} CI, n={self.n}{margin}): {self.verdict}"


def _check_margin(margin: float | None) -> float | None:
    if margin is None:
        return None
    margin = float(margin)
    if not margin > 0 or math.isinf(margin):
        raise ValueError(f"an equivalence margin must be a positive finite number stated before the result, "
                         f"got {margin}")
    return margin


def paired(a: Sequence[float], b: Sequence[float], *, margin: float | None = None,
           confidence: float = 0.95) -> Comparison:
    """Compares two configurations run on the same seeds: ``a[i]`` and ``b[i]`` come from seed i.

    The differences dᵢ = aᵢ − bᵢ give d̄ ± t_{(1+c)/2, n−1} · s_d / √n.

    Args:
        a, b: one value per seed, in the same seed order (lists, tuples, arrays or :class:`Spread`).
        margin: the equivalence margin δ (same units as the values), stated before the result; None when the
            question is only whether one is larger.
        confidence: the interval's level (0.95).

    Raises:
        ValueError: different lengths, fewer than 2 pairs, a margin that is not positive, a NaN value.
    """
    av, bv = _values(a, "paired (a)"), _values(b, "paired (b)")
    if len(av) != len(bv):
        raise ValueError(f"paired needs one value of each arm per seed, got {len(av)} and {len(bv)} values")
    margin, confidence = _check_margin(margin), _check_confidence(confidence)
    mean, low, high = ci([x - y for x, y in zip(av, bv)], confidence)
    return Comparison(mean, low, high, len(av), float(len(av) - 1), margin, confidence)


def welch(a: Sequence[float], b: Sequence[float], *, margin: float | None = None,
          confidence: float = 0.95) -> Comparison:
    """Compares two independent groups (unpaired), with Welch's interval.

    ā − b̄ ± t_{(1+c)/2, ν} · √(s_a²/n_a + s_b²/n_b), with the Welch–Satterthwaite degrees of freedom
    ν = (s_a²/n_a + s_b²/n_b)² / ((s_a²/n_a)²/(n_a − 1) + (s_b²/n_b)²/(n_b − 1)).

    Use it only where pairing is impossible (the two arms cannot share seeds); see :func:`paired`.

    Raises:
        ValueError: fewer than 2 values in a group, a margin that is not positive, a NaN value.
    """
    sa, sb = Spread(_values(a, "welch (a)")), Spread(_values(b, "welch (b)"))
    margin, confidence = _check_margin(margin), _check_confidence(confidence)
    va, vb = sa.std ** 2 / sa.n, sb.std ** 2 / sb.n          # squared standard errors
    se = math.sqrt(va + vb)
    if se == 0.0:                                            # both groups constant: ν undefined, interval a point
        df = float(sa.n + sb.n - 2)
    else:
        df = (va + vb) ** 2 / (va ** 2 / (sa.n - 1) + vb ** 2 / (sb.n - 1))
    half = t_quantile((1.0 + confidence) / 2.0, df) * se
    mean = sa.mean - sb.mean
    return Comparison(mean, mean - half, mean + half, min(sa.n, sb.n), df, margin, confidence)

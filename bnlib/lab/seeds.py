"""Several seeds of one experiment: their spread, and a difference measured in units of it.

A conclusion drawn from training ("BN reaches a higher accuracy", "the bias changes nothing") holds only if
the difference it rests on is large against what changes from one seed to the next. The book runs every
compared configuration with at least three seeds and states differences in units of the seed spread::

    acc = {norm: Spread([run(norm, seed) for seed in SEEDS]) for norm in ("bn", None)}
    print(acc["bn"], acc[None])                     # "0.912 ± 0.004 (n=3)"
    assert separation(acc["bn"], acc[None]) > 3     # the gap is over 3 spreads

The spread is the sample standard deviation (``ddof=1``). :func:`separation` divides the difference of the
means by the larger of the two spreads, floored at ``floor`` so that two runs that happen to agree exactly
(a deterministic result, or a metric that saturates) do not make any gap look infinitely significant.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["SEEDS", "Spread", "separation"]

#: The seeds a compared configuration runs with, unless a chapter says otherwise.
SEEDS = (0, 1, 2)


@dataclass(frozen=True, init=False)
class Spread:
    """The values one metric took over seeds, with their mean and sample standard deviation."""

    values: tuple[float, ...]

    def __init__(self, values: Iterable[float]):
        vals = tuple(float(v) for v in values)
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
        """Returns the sample standard deviation over seeds (0 for a single value)."""
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


def separation(a: Spread, b: Spread, floor: float = 0.0) -> float:
    """How far apart two configurations are, in units of the seed spread.

    Returns:
        float: ``(a.mean - b.mean) / max(a.std, b.std, floor)`` (signed: positive when ``a`` is larger);
        ``inf`` or ``-inf`` when both spreads and the floor are 0 and the means differ, 0 when they agree.
    """
    diff = a.mean - b.mean
    unit = max(a.std, b.std, floor)
    if unit == 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / unit

"""Superseded by :mod:`bnlib.lab.protocol` (seeds, spreads, paired confidence intervals and verdicts).

Kept while chapters move to the protocol: :class:`Spread` is the protocol's, ``SEEDS`` and :func:`separation` are
the older rule below. New code uses ``protocol.seeds()``, ``protocol.paired`` and ``protocol.welch``.

Several seeds of one experiment: their spread, and a difference measured in units of it.

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

from .protocol import Spread

__all__ = ["SEEDS", "Spread", "separation"]

#: The seeds a compared configuration runs with, unless a chapter says otherwise.
SEEDS = (0, 1, 2)


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

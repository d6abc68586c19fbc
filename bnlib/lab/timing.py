"""Wall-time measurement that survives noisy machines: medians, and candidates timed interleaved.

Two rules make timings on a shared laptop or CI machine usable:

* **report the median** of many repetitions, not the mean: a background job that steals the CPU for
  one repetition moves the mean, not the median;
* **interleave the candidates** when comparing: :func:`compare` times candidate A once, then B once,
  then C once, and repeats, rotating which one goes first, so a slow spell of the machine hits every
  candidate alike instead of whichever happened to be measured during it.

On CUDA, kernels run asynchronously; every timed sample is preceded and followed by
``torch.cuda.synchronize`` of the device the candidate runs on, so the time measured is the time the
GPU took, not the time to enqueue.

Why not ``torch.utils.benchmark``
---------------------------------
Its :class:`~torch.utils.benchmark.Timer` measures one statement at a time (``timeit``,
``blocked_autorange``), and :class:`~torch.utils.benchmark.Compare` only lays out in a table
measurements that were taken one after the other; neither interleaves candidates, which is what
:func:`compare` exists for. Three further differences matter here:

* ``Timer`` runs the statement under its own thread count (``num_threads``, default 1), while the
  chapters time under the thread count they set themselves;
* ``Timer.timeit`` adds an untimed warm-up of ``number // 100`` (at least 2) calls to every
  measurement, and ``blocked_autorange`` chooses the number of calls itself (until ``min_run_time``),
  so the number of calls, and hence a notebook cell's running time, is not what the caller asked
  for; here it is exactly ``warmup + repeat * number`` per candidate;
* its default clock synchronizes whatever accelerator is present at every reading, even when the code
  timed runs on the CPU; here only the device given is synchronized (with ``device=None``: CUDA, if
  this process has started using it). A replaceable ``clock`` and
  ``sync`` let the tests check the order of calls and the arithmetic without real time.

Where a single measurement with no rival is wanted, ``torch.utils.benchmark`` is used
(:func:`bnlib.lab.bench.copy_bandwidth`).

Example::

    from bnlib.lab.timing import time_fn, compare
    t = time_fn(lambda: model(x), repeat=30, warmup=3)      # median seconds
    res = compare({"with BN": lambda: model(x), "folded": lambda: folded(x)}, repeat=30)
    res.medians["folded"], res.speedup("with BN", "folded")

Timings are volatile: notebook cells that print them carry the ``nbval-ignore-output`` tag.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

__all__ = ["synchronize", "time_fn", "compare", "Comparison"]

DeviceLike = None | str | torch.device


def _is_cuda(device: DeviceLike) -> bool:
    """Returns True when timings on ``device`` need CUDA synchronization.

    ``None`` means "whatever is in use": synchronize if CUDA is available and
    has been initialized in this process.
    """
    if device is None:
        return torch.cuda.is_available() and torch.cuda.is_initialized()
    return torch.device(device).type == "cuda"


def synchronize(device: DeviceLike = None) -> None:
    """Wait for all queued work on ``device`` (a no-op unless it is CUDA).

    Returns:
        None.
    """
    if _is_cuda(device):
        torch.cuda.synchronize(None if device is None else torch.device(device))


def _make_timer(device: DeviceLike, clock: Callable[[], float], sync: Callable[[], None] | None):
    """Returns ``timed(fn, number) -> seconds per call`` for one device."""
    if sync is None:
        cuda = _is_cuda(device)
        dev = None if device is None else torch.device(device)
        sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)

    def timed(fn: Callable[[], object], number: int) -> float:
        sync()
        t0 = clock()
        for _ in range(number):
            fn()
        sync()
        return (clock() - t0) / number

    return timed


def _check_counts(repeat: int, warmup: int, number: int) -> None:
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if number < 1:
        raise ValueError(f"number must be >= 1, got {number}")


def time_fn(fn: Callable[[], object], repeat: int = 20, warmup: int = 3, number: int = 1,
            device: DeviceLike = None, *, clock: Callable[[], float] = time.perf_counter,
            sync: Callable[[], None] | None = None, return_all: bool = False):
    """Median wall time of one call of ``fn``.

    Args:
        fn: zero-argument callable to time (its result is discarded).
        repeat: number of timed samples; the median of them is returned.
        warmup: untimed calls first (caches, allocator, lazy initialization).
        number: calls per sample; each sample is its total time / ``number``
            (use > 1 for calls much shorter than a millisecond).
        device: the device ``fn`` runs on; CUDA devices are synchronized
            before and after each sample. None: synchronize CUDA if it is in
            use in this process.
        clock: the clock (seconds); replaceable for tests.
        sync: replaces the device synchronization (for tests).
        return_all: also return the list of samples.

    Returns:
        float: median seconds per call; or ``(median, samples)`` if
        ``return_all``.
    """
    _check_counts(repeat, warmup, number)
    timed = _make_timer(device, clock, sync)
    for _ in range(warmup):
        fn()
    (sync or (lambda: synchronize(device)))()
    samples = [timed(fn, number) for _ in range(repeat)]
    med = statistics.median(samples)
    return (med, samples) if return_all else med


@dataclass
class Comparison:
    """Result of :func:`compare`.

    Attributes:
        samples: ``{name: [seconds per call, one per repetition]}``.
        medians: ``{name: median seconds per call}``.
        order: the names in the order the timed samples were taken
            (``repeat * len(samples)`` entries; shows the interleaving).
        baseline: the name speed-ups are relative to (the first candidate
            unless given).
    """

    samples: dict[str, list[float]]
    medians: dict[str, float]
    order: list[str] = field(default_factory=list)
    baseline: str | None = None

    def ratio(self, a: str, b: str) -> float:
        """Returns ``median(a) / median(b)``."""
        return self.medians[a] / self.medians[b]

    def speedup(self, slow: str, fast: str) -> float:
        """Returns how many times faster ``fast`` is than ``slow`` (``median(slow) / median(fast)``)."""
        return self.ratio(slow, fast)

    @property
    def ratios(self) -> dict[str, float]:
        """Returns ``{name: median(name) / median(baseline)}`` (baseline -> 1.0)."""
        base = self.medians[self.baseline]
        return {k: v / base for k, v in self.medians.items()}

    def table(self, unit: str = "ms") -> str:
        """Returns a small text table: name, median time, ratio to the baseline."""
        scale = {"s": 1.0, "ms": 1e3, "us": 1e6}[unit]
        width = max(len(k) for k in self.medians)
        lines = [f"{'':{width}}  {'median ' + unit:>12}  {'/ ' + str(self.baseline):>10}"]
        for k, v in self.medians.items():
            lines.append(f"{k:{width}}  {v * scale:12.3f}  {self.ratios[k]:10.2f}")
        return "\n".join(lines)


def compare(fns: Mapping[str, Callable[[], object]], repeat: int = 20, warmup: int = 2, number: int = 1,
            device: DeviceLike = None, baseline: str | None = None, rotate: bool = True, *,
            clock: Callable[[], float] = time.perf_counter,
            sync: Callable[[], None] | None = None) -> Comparison:
    """Time several candidates interleaved: each repetition times every candidate once.

    Warm-up: ``warmup`` untimed calls of each candidate (candidate by
    candidate). Then, for repetition ``r = 0 .. repeat-1``, every candidate
    is timed once (``number`` calls per sample); with ``rotate=True`` the
    order of repetition ``r`` starts at candidate ``r mod k`` (A B C, B C A,
    C A B, ...), so no candidate always runs first, right after another one,
    or last.

    Args:
        fns: ``{name: zero-argument callable}`` (at least one).
        repeat, warmup, number, device, clock, sync: as in :func:`time_fn`.
        baseline: name that :attr:`Comparison.ratios` divide by (default:
            the first name).
        rotate: rotate the order between repetitions (default True).

    Returns:
        Comparison: samples, medians, the order of the samples, the baseline.
    """
    _check_counts(repeat, warmup, number)
    names = list(fns)
    if not names:
        raise ValueError("compare() needs at least one candidate")
    if baseline is None:
        baseline = names[0]
    elif baseline not in fns:
        raise KeyError(f"baseline {baseline!r} is not one of {names}")
    timed = _make_timer(device, clock, sync)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    (sync or (lambda: synchronize(device)))()
    samples: dict[str, list[float]] = {k: [] for k in names}
    order: list[str] = []
    k = len(names)
    for r in range(repeat):
        start = r % k if rotate else 0
        for j in range(k):
            name = names[(start + j) % k]
            samples[name].append(timed(fns[name], number))
            order.append(name)
    medians = {name: statistics.median(samples[name]) for name in names}
    return Comparison(samples=samples, medians=medians, order=order, baseline=baseline)

"""Tests for bnlib.lab.timing: interleaving order, warm-up, medians and ratios.

No assertion depends on real time: candidates advance a fake clock by a known
amount and log their calls.
"""
import pytest
import torch

from bnlib.lab.timing import Comparison, compare, synchronize, time_fn


class FakeClock:
    """A clock that only moves when a candidate says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def candidates(clock, durations, log):
    """{name: fn} where fn logs its name and advances the clock by durations[name]."""
    def make(name, d):
        def fn():
            log.append(name)
            clock.now += d
        return fn
    return {name: make(name, d) for name, d in durations.items()}


def test_time_fn_median_warmup_and_number():
    clock, log = FakeClock(), []
    fn = candidates(clock, {"a": 0.5}, log)["a"]
    med, samples = time_fn(fn, repeat=5, warmup=3, number=4, clock=clock, return_all=True)
    assert len(log) == 3 + 5 * 4          # warm-up calls + timed calls
    assert samples == [0.5] * 5           # per call, not per sample
    assert med == 0.5


def test_time_fn_median_ignores_one_outlier():
    clock = FakeClock()
    durations = iter([1.0, 1.0, 100.0, 1.0, 1.0])

    def fn():
        clock.now += next(durations)

    assert time_fn(fn, repeat=5, warmup=0, clock=clock) == 1.0


def test_time_fn_syncs_around_every_sample():
    clock, events = FakeClock(), []

    def fn():
        events.append("call")

    time_fn(fn, repeat=2, warmup=1, sync=lambda: events.append("sync"), clock=clock)
    # warm-up call, sync; then each sample is sync, call, sync
    assert events == ["call", "sync", "sync", "call", "sync", "sync", "call", "sync"]


def test_compare_interleaves_with_rotation():
    clock, log = FakeClock(), []
    fns = candidates(clock, {"a": 1.0, "b": 2.0, "c": 4.0}, log)
    res = compare(fns, repeat=4, warmup=1, clock=clock)
    # warm-up: each candidate once, in order; then rotated rounds
    assert log[:3] == ["a", "b", "c"]
    rounds = [log[3 + 3 * r: 6 + 3 * r] for r in range(4)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert res.order == log[3:]
    # every round holds every candidate exactly once
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert {k: len(v) for k, v in res.samples.items()} == {"a": 4, "b": 4, "c": 4}


def test_compare_without_rotation_keeps_order():
    clock, log = FakeClock(), []
    fns = candidates(clock, {"x": 1.0, "y": 1.0}, log)
    res = compare(fns, repeat=3, warmup=0, rotate=False, clock=clock)
    assert res.order == ["x", "y"] * 3


def test_compare_medians_ratios_speedup():
    clock, log = FakeClock(), []
    fns = candidates(clock, {"slow": 3.0, "fast": 1.0}, log)
    res = compare(fns, repeat=5, warmup=0, number=2, clock=clock)
    assert isinstance(res, Comparison)
    assert res.medians == {"slow": 3.0, "fast": 1.0}
    assert res.baseline == "slow"
    assert res.ratios == {"slow": 1.0, "fast": pytest.approx(1 / 3)}
    assert res.speedup("slow", "fast") == 3.0
    assert res.ratio("fast", "slow") == pytest.approx(1 / 3)
    assert len(log) == 5 * 2 * 2
    table = res.table()
    assert "slow" in table and "fast" in table and "3000.000" in table


def test_compare_interleaving_spreads_a_slow_spell():
    """A slow spell of the machine (every 4th sample taken is 10x slower)
    does not make one candidate look slower than the other."""
    clock = FakeClock()
    taken = [0]

    def make():
        def fn():
            taken[0] += 1
            clock.now += 10.0 if taken[0] % 4 == 0 else 1.0
        return fn

    res = compare({"a": make(), "b": make()}, repeat=9, warmup=0, clock=clock)
    assert res.medians["a"] == res.medians["b"] == 1.0


def test_compare_baseline_and_errors():
    clock, log = FakeClock(), []
    fns = candidates(clock, {"a": 2.0, "b": 1.0}, log)
    res = compare(fns, repeat=1, warmup=0, baseline="b", clock=clock)
    assert res.ratios == {"a": 2.0, "b": 1.0}
    with pytest.raises(KeyError):
        compare(fns, repeat=1, baseline="zzz", clock=clock)
    with pytest.raises(ValueError):
        compare({}, repeat=1)
    with pytest.raises(ValueError):
        compare(fns, repeat=0)
    with pytest.raises(ValueError):
        time_fn(lambda: None, number=0)


def test_real_clock_smoke():
    x = torch.randn(64, 64)
    t = time_fn(lambda: x @ x, repeat=3, warmup=1)
    assert t > 0
    res = compare({"mm": lambda: x @ x, "add": lambda: x + x}, repeat=2, warmup=0, device="cpu")
    assert set(res.medians) == {"mm", "add"}
    synchronize("cpu")  # no-op, must not raise

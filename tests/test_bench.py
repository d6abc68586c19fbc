"""``python -m bnlib.lab.bench`` measures and reports what it claims (no timing is asserted).

Real timings are noisy, so the arithmetic of the tables is checked with fake measurements; the real
runs use tiny shapes, few repetitions and synthetic MNIST-shaped data (no download, a few seconds).
"""

from __future__ import annotations

import json
import pathlib
import statistics

import pytest
import torch

from bnlib.lab import bench
from bnlib.lab.timing import Comparison


def tiny_mnist(n_train: int = 240, n_test: int = 120, seed: int = 0):
    """MNIST-shaped random data whose class is set by the mean brightness of one of ten image strips,
    so that a short run learns something and accuracies differ between steps."""
    g = torch.Generator().manual_seed(seed)

    def split(n):
        y = torch.randint(0, 10, (n,), generator=g)
        x = torch.rand(n, 1, 28, 28, generator=g) * 0.2
        for k in range(10):
            x[y == k, :, 2 * k + 4: 2 * k + 6] += 0.8
        return x, y

    return split(n_train), split(n_test)


def fake_compare(samples: dict[str, list[float]]):
    """A stand-in for ``bench.compare`` returning the given per-repetition samples (seconds)."""
    def fake(fns, repeat=1, warmup=0, number=1, device=None, baseline=None, **kw):
        assert set(fns) == set(samples), (set(fns), set(samples))
        return Comparison(samples=samples, medians={k: statistics.median(v) for k, v in samples.items()},
                          baseline=baseline)
    return fake


def test_batchnorm_rows_real_run_and_table():
    rows = bench.bench_batchnorm(shapes=[(8, 4, 3, 3), (16, 5)], repeat=2, warmup=1, device="cpu")
    assert [r["layer"] for r in rows] == ["BatchNorm2d", "BatchNorm1d"]
    assert [r["shape"] for r in rows] == [(8, 4, 3, 3), (16, 5)]
    table = bench.format_batchnorm_table(rows).splitlines()
    assert len(table) == 2 + len(rows) and "(8, 4, 3, 3)" in table[2] and "BatchNorm1d" in table[3]


def test_batchnorm_ratio_is_the_median_of_paired_ratios(monkeypatch):
    # In repetition 2 the machine was slow for both; the ratio of times taken together divides it out.
    samples = {"torch": [1.0, 1.0, 10.0], "bnlib": [2.0, 2.2, 21.0], "naive": [4.0, 5.0, 30.0]}
    monkeypatch.setattr(bench, "compare", fake_compare(samples))
    (row,) = bench.bench_batchnorm(shapes=[(4, 3)], repeat=3, device="cpu")
    assert row["torch_ms"] == pytest.approx(1e3 * 1.0) and row["bnlib_ms"] == pytest.approx(1e3 * 2.2)
    assert row["ratio"] == pytest.approx(2.1)           # median of 2.0, 2.2, 2.1 (not 2.2 / 1.0)
    assert row["naive_ratio"] == pytest.approx(4.0)     # median of 4.0, 5.0, 3.0


def test_nominal_bandwidth_picks_the_most_specific_name():
    table = dict(bench.NOMINAL_BANDWIDTH_GBS)
    assert table["H100 PCIe"] != table["H100"]
    assert bench.nominal_bandwidth("NVIDIA H100 PCIe") == table["H100 PCIe"]   # not the plain "H100" entry
    assert bench.nominal_bandwidth("NVIDIA H100 80GB HBM3") == table["H100"]
    assert bench.nominal_bandwidth("nvidia a100-sxm4-80gb") == table["A100-SXM4-80GB"]  # case ignored
    assert bench.nominal_bandwidth("Some Future GPU") is None


def test_bandwidth_counts_five_passes_and_the_floor():
    rows = [{"shape": (4, 8, 16, 16), "layer": "BatchNorm2d", "dtype": "float32", "torch_ms": 2.0,
             "bnlib_ms": 4.0, "ratio": 2.0},
            {"shape": (64, 32), "layer": "BatchNorm1d", "dtype": "bfloat16", "torch_ms": 0.5,
             "bnlib_ms": 0.25, "ratio": 0.5}]
    r2d, r1d = bench.bench_bandwidth(rows, device="cpu", copy_gbs=10.0)
    assert r2d["bytes"] == 5 * (4 * 8 * 16 * 16) * 4 and r1d["bytes"] == 5 * (64 * 32) * 2
    for r, src in ((r2d, rows[0]), (r1d, rows[1])):
        assert r["torch_gbs"] == pytest.approx(r["bytes"] / (src["torch_ms"] * 1e-3) / 1e9)
        assert r["floor_ms"] == pytest.approx(r["bytes"] / 10e9 * 1e3)      # five passes at copy speed
        assert r["bnlib_of_copy"] == pytest.approx(r["floor_ms"] / src["bnlib_ms"])
        assert r["ratio"] == src["ratio"] and r["nominal_gbs"] is None and r["bnlib_of_nominal"] is None


def test_copy_bandwidth_grows_with_the_bytes_moved(monkeypatch):
    class FakeMeasurement:
        median = 1e-3

    class FakeTimer:
        def __init__(self, stmt, globals, num_threads, **kw):
            self.n = globals["src"].numel()
            assert stmt == "dst.copy_(src)" and num_threads == torch.get_num_threads()

        def blocked_autorange(self, min_run_time):
            return FakeMeasurement()

    monkeypatch.setattr(bench.torch_benchmark, "Timer", FakeTimer)
    # 1 MiB of float32 read and written in 1 ms: 2 * 2**20 bytes / 1e-3 s.
    assert bench.copy_bandwidth("cpu", mib=1) == pytest.approx(2 * 2**20 / 1e-3 / 1e9)
    assert bench.copy_bandwidth("cpu", mib=4) == pytest.approx(4 * bench.copy_bandwidth("cpu", mib=1))


def test_compile_section_reports_timings_with_a_stand_in_compiler(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)   # "compiles" to the module itself
    (row,) = bench.bench_compile(shapes=[(8, 4, 3, 3)], repeat=2, warmup=1, device="cpu")
    assert row["error"] is None and row["layer"] == "BatchNorm2d" and row["backend"] == "inductor"
    assert row["compile_s"] > 0 and row["eager_ms"] > 0 and row["compiled_ms"] > 0
    assert {"eager_ratio", "compiled_ratio", "speedup", "torch_ms"} <= set(row)


def test_compile_failure_is_reported_not_raised(monkeypatch, capsys):
    def broken(module, **kw):
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(torch, "compile", broken)
    out = bench.main(["--repeat", "1", "--device", "cpu", "--shapes", "8x4x3x3", "--sections", "compile"])
    (row,) = out["compile"]
    assert row["error"] == "RuntimeError: no compiler here" and "compiled_ms" not in row
    assert "skipped: RuntimeError: no compiler here" in capsys.readouterr().out


def test_compile_with_fullgraph_traces_bnlib_without_a_graph_break():
    # The 'eager' backend traces with dynamo (fullgraph=True raises at a graph break) but generates no code.
    (row,) = bench.bench_compile(shapes=[(8, 4, 3, 3)], repeat=1, warmup=0, device="cpu", backend="eager")
    assert row["error"] is None, row["error"]


def test_training_rates_for_the_three_models():
    rows = bench.bench_training(rounds=2, steps=3, device="cpu", data=tiny_mnist())
    assert [r["model"] for r in rows] == ["bnlib BN", "torch.nn BN", "no BN"]
    assert all(r["steps_per_s"] > 0 for r in rows)
    assert rows[1]["ratio_to_torch"] == 1.0


def test_training_with_a_clock_counts_steps_per_clock_second(monkeypatch):
    """With a clock, the rate is steps / (clock after fit − clock before), and the ratio to torch.nn is the
    median of the per-round ratios."""
    seconds = {"bn": 2.0, "bn-torch": 1.0, None: 0.5}  # clock seconds per fit call, by the MLP's norm
    now = [0.0]
    norm_of = {}
    real_mlp = bench.MLP

    def mlp(activation="sigmoid", norm=None):
        model = real_mlp(activation=activation, norm=norm)
        norm_of[id(model)] = norm
        return model

    def fake_fit(model, data, steps, **kw):
        now[0] += seconds[norm_of[id(model)]]

    monkeypatch.setattr(bench, "MLP", mlp)
    monkeypatch.setattr(bench, "fit", fake_fit)
    rows = bench.bench_training(rounds=3, steps=10, device="cpu", data=tiny_mnist(), clock=lambda: now[0])
    rates = {r["model"]: r for r in rows}
    assert rates["bnlib BN"]["steps_per_s"] == pytest.approx(5.0) and rates["no BN"]["steps_per_s"] == 20.0
    assert rates["bnlib BN"]["ratio_to_torch"] == pytest.approx(0.5)


def test_main_threads_and_clock_options(tmp_path):
    threads = torch.get_num_threads()
    try:
        out = bench.main(["--repeat", "1", "--device", "cpu", "--shapes", "16x5", "--sections", "batchnorm",
                          "--threads", "1", "--clock", "cpu", "--json", str(tmp_path / "b.json")])
        assert out["environment"]["clock"] == "cpu" and out["environment"]["threads"] == 1
        assert out["batchnorm"][0]["threads"] == 1
        with pytest.raises(SystemExit):  # CPU time adds up the threads' times: one thread only
            bench.main(["--threads", "2", "--clock", "cpu", "--sections", "batchnorm"])
    finally:
        torch.set_num_threads(threads)


def test_figure1_steps_to_baseline_is_the_first_evaluation_at_the_baseline():
    rows = bench.bench_figure1(steps=40, device="cpu", data=tiny_mnist())
    assert [r["model"] for r in rows] == ["no BN", "BN"] and [r["norm"] for r in rows] == [None, "bn"]
    target = rows[0]["final_acc"]
    for r in rows:
        assert r["steps"] == 40 and r["test_step"][-1] == 40 and len(r["test_acc"]) == len(r["test_step"])
        assert r["final_acc"] == r["test_acc"][-1]
        reached = [s for s, a in zip(r["test_step"], r["test_acc"]) if a >= target]
        assert r["steps_to_baseline"] == (reached[0] if reached else None)


def test_main_runs_the_default_sections_in_order_and_saves_after_each(monkeypatch, tmp_path):
    calls = []

    def fake_section(name, fail=False):
        def section(args):
            calls.append(name)
            if fail:
                raise KeyboardInterrupt  # a run cut short
            return [{"section": name, "seen_before": sorted(args.results)}]
        return section

    sections = {name: fake_section(name) for name in bench.SECTIONS}
    monkeypatch.setattr(bench, "SECTIONS", sections)
    path = tmp_path / "out" / "bench.json"
    out = bench.main(["--device", "cpu", "--json", str(path)])
    assert calls == list(bench.DEFAULT_SECTIONS) and "figure1" not in calls
    saved = json.loads(path.read_text())
    assert list(saved) == ["environment", "seconds", *bench.DEFAULT_SECTIONS]
    assert saved["environment"]["device"] == "cpu"
    assert out[bench.DEFAULT_SECTIONS[1]][0]["seen_before"] == [bench.DEFAULT_SECTIONS[0]]

    # A run interrupted in its second section keeps the first one on disk.
    calls.clear()
    sections["bandwidth"] = fake_section("bandwidth", fail=True)
    path2 = tmp_path / "cut.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--device", "cpu", "--sections", "batchnorm,bandwidth,fold", "--json", str(path2)])
    assert calls == ["batchnorm", "bandwidth"]
    assert set(json.loads(path2.read_text())) == {"environment", "seconds", "batchnorm"}


def test_main_writes_json_of_a_real_run(tmp_path, capsys):
    path = tmp_path / "bench.json"
    out = bench.main(["--repeat", "1", "--device", "cpu", "--shapes", "8x4x3x3,16x5", "--sections",
                      "batchnorm,bandwidth", "--json", str(path)])
    saved = json.loads(path.read_text())
    assert [r["shape"] for r in saved["batchnorm"]] == [[8, 4, 3, 3], [16, 5]]
    assert [r["shape"] for r in saved["bandwidth"]] == [[8, 4, 3, 3], [16, 5]]
    # the bandwidth section reuses the batchnorm section's times instead of measuring again
    assert [r["bnlib_ms"] for r in saved["bandwidth"]] == [r["bnlib_ms"] for r in saved["batchnorm"]]
    assert out["environment"]["device"] == "cpu"
    assert "Memory bandwidth" in capsys.readouterr().out


def test_main_rejects_unknown_sections_and_bad_shapes():
    with pytest.raises(SystemExit):
        bench.main(["--sections", "batchnorm,nonsense"])
    with pytest.raises(SystemExit):
        bench.main(["--shapes", "8by4"])


def test_environment_describes_the_machine():
    env = bench.environment("cpu")
    assert env["device_type"] == "cpu" and env["device_name"]
    assert env["torch"] == torch.__version__
    assert env["threads"] == torch.get_num_threads() and env["date"].endswith("+00:00")


def test_load_records(tmp_path):
    (tmp_path / "b-gpu").mkdir()
    (tmp_path / "a-cpu").mkdir()
    (tmp_path / "empty").mkdir()
    env = {"environment": {"device_type": "cpu"}}
    (tmp_path / "a-cpu" / "bench.json").write_text(json.dumps({**env, "batchnorm": []}))
    (tmp_path / "b-gpu" / "chapters.json").write_text(json.dumps({**env, "chapters": []}))
    recs = bench.load_records(tmp_path)
    assert list(recs) == ["a-cpu", "b-gpu"] and list(recs["a-cpu"]) == ["bench"]
    (tmp_path / "b-gpu" / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="environment"):
        bench.load_records(tmp_path)
    with pytest.raises(FileNotFoundError):
        bench.load_records(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        bench.load_records(tmp_path / "missing")


def test_shipped_records_are_complete_and_current():
    """The records in bnlib/lab/results (plotted by the appendix) load, hold every section, and their
    chapter runs name chapters that exist and all succeeded."""
    chapters = {p.stem for p in (pathlib.Path(__file__).resolve().parents[1] / "chapters").glob("*.ipynb")}
    recs = bench.load_records()
    assert recs, "expected at least one measured record"
    for machine, files in recs.items():
        assert {"bench", "chapters"} <= set(files), machine
        assert {"batchnorm", "bandwidth", "fold", "training"} <= set(files["bench"]), machine
        env = files["bench"]["environment"]
        assert env["device_type"] in ("cpu", "cuda") and env["torch"] and env["date"]
        runs = files["chapters"]["chapters"]
        assert runs and {c["chapter"] for c in runs} <= chapters, machine
        failed = [c["chapter"] for c in runs if not c["ok"] or c["error"]]
        assert not failed, f"{machine}: chapters recorded as failed: {failed}"

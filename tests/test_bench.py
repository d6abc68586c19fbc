"""``python -m bnlib.lab.bench`` runs and reports what it claims (no timing is asserted)."""

from bnlib.lab import bench


def test_bench_batchnorm_rows_and_table():
    rows = bench.bench_batchnorm(shapes=[(8, 4, 3, 3), (16, 5)], repeat=2, warmup=1, device="cpu")
    assert [r["layer"] for r in rows] == ["BatchNorm2d", "BatchNorm1d"]
    for r in rows:
        assert r["torch_ms"] > 0 and r["bnlib_ms"] > 0 and r["ratio"] > 0
    table = bench.format_batchnorm_table(rows)
    assert "BatchNorm2d" in table and "ratio" in table


def test_bench_training_reports_three_models():
    rows = bench.bench_training(rounds=1, steps=3, device="cpu")
    assert [r["model"] for r in rows] == ["bnlib BN", "torch.nn BN", "no BN"]
    assert all(r["steps_per_s"] > 0 for r in rows)


def test_environment_describes_the_machine():
    env = bench.environment("cpu")
    assert env["device_type"] == "cpu" and env["device_name"]
    assert env["torch"] == __import__("torch").__version__
    assert env["threads"] >= 1 and env["date"].endswith("+00:00")


def test_nominal_bandwidth_known_and_unknown_devices():
    assert bench.nominal_bandwidth("NVIDIA H200") == 4800.0
    assert bench.nominal_bandwidth("NVIDIA H100 PCIe") == 2000.0  # before the plain "H100" entry
    assert bench.nominal_bandwidth("Tesla T4") == 320.0
    assert bench.nominal_bandwidth("Some Future GPU") is None


def test_bench_bandwidth_counts_five_tensors():
    rows = [{"shape": (4, 8, 16, 16), "layer": "BatchNorm2d", "dtype": "float32", "torch_ms": 2.0, "bnlib_ms": 4.0}]
    (r,) = bench.bench_bandwidth(rows, device="cpu")
    assert r["bytes"] == 5 * 4 * 8 * 16 * 16 * 4
    assert abs(r["torch_gbs"] - r["bytes"] / 2e-3 / 1e9) < 1e-12
    assert abs(r["torch_gbs"] / r["bnlib_gbs"] - 2.0) < 1e-12
    assert r["copy_gbs"] > 0 and r["nominal_gbs"] is None and r["bnlib_of_nominal"] is None


def test_bench_fold_is_exact_and_timed():
    rows = bench.bench_fold(batch_sizes=(2,), repeat=2, device="cpu",
                            models={"tiny": dict(channels=(4,))})
    (r,) = rows
    assert r["model"] == "tiny" and r["batch"] == 2
    assert r["bn_ms"] > 0 and r["folded_ms"] > 0 and r["speedup"] > 0
    assert r["max_abs_diff"] < 1e-5


def test_main_writes_json(tmp_path, capsys):
    import json
    path = tmp_path / "out" / "bench.json"
    out = bench.main(["--repeat", "1", "--device", "cpu", "--shapes", "8x4x3x3,16x5", "--sections",
                      "batchnorm,bandwidth", "--json", str(path)])
    saved = json.loads(path.read_text())
    assert set(saved) == {"environment", "seconds", "batchnorm", "bandwidth"}
    assert [r["shape"] for r in saved["batchnorm"]] == [[8, 4, 3, 3], [16, 5]]
    assert [r["shape"] for r in saved["bandwidth"]] == [[8, 4, 3, 3], [16, 5]]
    assert out["environment"]["device"] == "cpu"
    assert "Memory bandwidth" in capsys.readouterr().out


def test_main_rejects_unknown_sections():
    import pytest
    with pytest.raises(SystemExit):
        bench.main(["--sections", "batchnorm,nonsense"])
    with pytest.raises(SystemExit):
        bench.main(["--shapes", "8by4"])


def test_bench_figure1_short_run():
    rows = bench.bench_figure1(steps=20, device="cpu")
    assert [r["model"] for r in rows] == ["no BN", "BN"] and [r["norm"] for r in rows] == [None, "bn"]
    for r in rows:
        assert r["steps"] == 20 and r["seconds"] > 0 and 0 <= r["final_acc"] <= 1
        assert r["test_step"][-1] == 20 and len(r["test_acc"]) == len(r["test_step"])
    assert rows[0]["steps_to_baseline"] is not None  # the baseline reaches its own final accuracy


def test_default_sections_leave_out_the_long_run():
    assert "figure1" in bench.SECTIONS and "figure1" not in bench.DEFAULT_SECTIONS
    assert set(bench.DEFAULT_SECTIONS) < set(bench.SECTIONS)


def test_load_records(tmp_path):
    import json
    import pytest
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


def test_shipped_records_are_complete():
    """The records in bnlib/lab/results (plotted by the appendix) load and hold every section."""
    recs = bench.load_records()
    assert recs, "expected at least one measured record"
    for machine, files in recs.items():
        assert {"bench", "chapters"} <= set(files), machine
        assert {"batchnorm", "bandwidth", "fold", "training"} <= set(files["bench"]), machine
        env = files["bench"]["environment"]
        assert env["device_type"] in ("cpu", "cuda") and env["torch"] and env["date"]
        assert files["chapters"]["chapters"] and all("ok" in c for c in files["chapters"]["chapters"])

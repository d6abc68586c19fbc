"""``python -m bnlib.bench`` runs and reports what it claims (no timing is asserted)."""

from bnlib import bench


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

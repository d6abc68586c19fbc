"""bnlib.lab.launch: backend choice, the single-process helpers, and tiny spawned runs (2 gloo processes)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from bnlib.lab import launch, models
from bnlib.lab.launch import _build_model

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def test_pick_backend():
    if torch.cuda.is_available() and torch.cuda.device_count() >= 2 and dist.is_nccl_available():
        assert launch.pick_backend(2) == ("nccl", "cuda")
    else:
        assert launch.pick_backend(2) == ("gloo", "cpu")
    assert launch.pick_backend(2, "gloo") == ("gloo", "cpu")
    with pytest.raises(ValueError):
        launch.pick_backend(2, "mpi")
    if not (torch.cuda.is_available() and torch.cuda.device_count() >= 64):
        with pytest.raises(RuntimeError):
            launch.pick_backend(64, "nccl")


def test_build_model_norms_and_errors():
    from bnlib.distributed import SyncBatchNorm
    from bnlib.variants import GhostBatchNorm2d

    base = dict(launch.DEFAULTS, channels=(4, 8))
    assert any(isinstance(m, SyncBatchNorm) for m in _build_model({**base, "norm": "sync"}).modules())
    local = _build_model({**base, "norm": "local"})
    assert not any(isinstance(m, SyncBatchNorm) for m in local.modules())
    ghost = _build_model({**base, "norm": "ghost", "batch_per_replica": 4, "ghost_batch": 2})
    assert sum(isinstance(m, GhostBatchNorm2d) for m in ghost.modules()) == 2
    with pytest.raises(ValueError):
        _build_model({**base, "norm": "ghost", "batch_per_replica": 3, "ghost_batch": 2})
    with pytest.raises(ValueError):
        _build_model({**base, "norm": "nope"})


def test_run_ddp_rejects_unknown_options():
    with pytest.raises(TypeError):
        launch.run_ddp(nrom="sync")
    with pytest.raises(TypeError):
        launch.compare_norms(("sync",), stepz=3)
    with pytest.raises(TypeError, match="an entry of runs"):
        launch.run_many([{"norm": "sync", "sead": 1}])
    with pytest.raises(ValueError, match="world_size and backend must be the same"):
        launch.run_many([{"norm": "sync", "world_size": 3}])


@needs_gloo
def test_torch_syncbn_cpu_error_leaves_no_group():
    msg = launch.torch_syncbn_cpu_error()
    assert msg is not None and "GPU" in msg  # if torch lifts the restriction, the chapter must change
    assert not dist.is_initialized()


def test_replica_order_slices_one_global_order():
    world, b, n = 3, 4, 50                     # 4 global batches of 12 per epoch, 2 examples left out
    orders = [launch.replica_order(n, world, r, b, seed=7, device=torch.device("cpu")) for r in range(world)]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(7))
    for step in (0, 1, 3, 4, 9):
        glob = torch.cat([o(step) for o in orders])
        s = step % 4
        assert torch.equal(glob, perm[s * world * b:(s + 1) * world * b])


def _batch(n=16):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_gradient_accumulation_gap():
    x, y = _batch()
    torch.manual_seed(0)
    bn = models.CNN(channels=(4, 8), norm="bn")
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    r = launch.gradient_accumulation_gap(bn, x, y, micro_batches=4)
    assert r["micro_batch_size"] == 4
    assert r["grad_rel_diff"] > 1e-2 and r["logits_max_diff"] > 1e-3
    assert all(torch.equal(v, bn.state_dict()[k]) for k, v in before.items())  # model untouched
    assert all(p.grad is None for p in bn.parameters())
    # one micro-batch is the big batch
    assert launch.gradient_accumulation_gap(bn, x, y, micro_batches=1)["grad_max_diff"] == 0.0
    torch.manual_seed(0)
    free = models.CNN(channels=(4, 8), norm="gn")
    r = launch.gradient_accumulation_gap(free, x, y, micro_batches=4)
    assert r["grad_rel_diff"] < 1e-12 and r["logits_max_diff"] < 1e-12
    r32 = launch.gradient_accumulation_gap(free, x, y, micro_batches=4, dtype=None)
    assert r32["grad_rel_diff"] < 1e-4  # float32: rounding only
    with pytest.raises(ValueError):
        launch.gradient_accumulation_gap(free, x, y, micro_batches=3)


@needs_gloo
def test_check_sync_equivalence():
    r = launch.check_sync_equivalence(world_size=2, batch_per_replica=3, channels=4, spatial=(3, 2),
                                         dtype="float64", timeout_s=60)
    assert r["backend"] in ("gloo", "nccl")
    for q in ("output", "input_grad", "weight_grad", "bias_grad", "running_mean", "running_var"):
        assert r[q] < 1e-10, (q, r[q])
    assert r["local_bn_output"] > 1e-2
    # DDP's all-reduce averages the replicas' gradients (it does not add them up)
    assert r["ddp_grad_vs_mean"] < 1e-12
    assert r["ddp_grad_vs_sum"] > 0.1 * r["ddp_grad_scale"] and r["ddp_grad_vs_own"] > 0.1 * r["ddp_grad_scale"]


@needs_gloo
def test_compare_norms_and_run_ddp_tiny():
    kw = dict(world_size=2, batch_per_replica=2, steps=12, channels=(4, 8), test_examples=100, log_every=4,
              backend="gloo")
    runs = launch.compare_norms(("local", "sync"), timeout_s=120, **kw)
    assert list(runs) == ["local", "sync"]
    for name, r in runs.items():
        assert r["norm"] == name and r["global_batch"] == 4 and r["test_examples"] == 100
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert r["loss_steps"] == [4, 8, 12] and len(r["loss_curve"]) == 3
        assert r["step_ms"] > 0
    assert runs["local"]["syncbn_collectives_per_step"] == 0 and runs["local"]["syncbn_comm_ms"] == 0
    assert runs["sync"]["syncbn_collectives_per_step"] == 4  # 2 BN layers x (forward + backward)
    # run_ddp alone reproduces the same numbers (seeded; gloo sums of two are order-independent)
    again = launch.run_ddp(norm="sync", timeout_s=120, **kw)
    assert again["test_accuracy"] == runs["sync"]["test_accuracy"]
    assert again["loss_curve"] == runs["sync"]["loss_curve"]


@needs_gloo
def test_a_failing_replica_is_reported_with_its_traceback():
    """A replica that raises leaves with status 1; the launcher's error quotes the replica's traceback."""
    with pytest.raises(RuntimeError, match=r"(?s)failed: ProcessExitedException.*ghost_batch=2 must divide"):
        launch.run_ddp(norm="ghost", batch_per_replica=3, ghost_batch=2, steps=1, backend="gloo", timeout_s=60)

"""bnlib.distributed.SyncBatchNorm: 2 processes on gloo over loopback against one BatchNorm on the whole batch.

Everything that needs a process group runs in ONE spawned job of 2 processes (``_worker``), which
plays every scenario and saves its results; the tests compare them, in float64, with torch.nn's
BatchNorm (or a plain model) run in this process on the concatenated batch. Timeouts on the
process group and on the joins turn a deadlock into a failure instead of a hung CI job.
"""

from __future__ import annotations

import socket
import tempfile
import traceback
import zlib
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.checkpoint import checkpoint

import bnlib
from bnlib.distributed import SyncBatchNorm

WORLD = 2
JOIN_TIMEOUT_S = 90  # both children together; the process group itself times out after 60 s
TOL = dict(rtol=1e-9, atol=1e-10)

TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}

# name: (per-rank batch sizes, per-example shape (C, *), layer kwargs, training steps)
SCENARIOS = {
    "equal_2d": ((16, 16), (3, 4, 5), dict(), 3),
    "unequal_1d_cumulative_nobias": ((5, 11), (4,), dict(momentum=None, bias=False, eps=1e-3), 3),
    "unequal_3d_input": ((3, 8), (2, 6), dict(momentum=0.3), 2),
    "unequal_5d_input_not_affine": ((1, 2), (2, 2, 3, 2), dict(affine=False), 2),
    "empty_rank": ((0, 7), (2, 3), dict(), 2),
    "no_running_stats": ((6, 10), (3, 2, 2), dict(track_running_stats=False), 2),
}


# ---------------------------------------------------------------------------------------------
# Deterministic data, shared by the workers and the reference
# ---------------------------------------------------------------------------------------------

def _gen(*seed):
    # zlib.crc32, not hash(): str hashes differ between processes (PYTHONHASHSEED)
    return torch.Generator().manual_seed(zlib.crc32(repr(seed).encode()))


def _full_batch(name, step):
    """Input (offset mean: |μ| ≫ σ would break E[x²]−E[x]²) and upstream gradient for a step."""
    splits, tail, _, _ = SCENARIOS[name]
    g = _gen(name, step)
    shape = (sum(splits),) + tail
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 0.5 + 100.0
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, w


def _offset_batch():
    """16 examples of 1e4 + noise (σ ≈ 1) and an upstream gradient, float32 values held in float64."""
    g = _gen("offset")
    x = torch.randn(16, 3, 4, generator=g, dtype=torch.float64) + 1e4
    return x.float().double(), torch.randn(16, 3, 4, generator=g, dtype=torch.float64).float().double()


def _rank_slice(t, splits, rank):
    start = sum(splits[:rank])
    return t[start:start + splits[rank]]


def _init_affine(layer, name):
    if layer.affine:
        g = _gen(name, "params")
        with torch.no_grad():
            layer.weight.copy_(torch.rand(layer.num_features, generator=g, dtype=torch.float64) + 0.5)
            if layer.bias is not None:
                layer.bias.copy_(torch.randn(layer.num_features, generator=g, dtype=torch.float64))


def _play(layer, name, rank=None):
    """Run a scenario's training steps (then one eval step) on ``layer``; rank None = whole batch."""
    splits, _, _, steps = SCENARIOS[name]
    out = []
    for mode in ["train"] * steps + ["eval"]:
        layer.train(mode == "train")
        x, w = _full_batch(name, len(out))
        if rank is not None:
            x, w = _rank_slice(x, splits, rank), _rank_slice(w, splits, rank)
        x = x.clone().requires_grad_()
        y = layer(x)
        (y * w).sum().backward()
        rec = {"y": y.detach().clone(), "x.grad": x.grad.clone()}
        for p in ("weight", "bias"):
            t = getattr(layer, p)
            if t is not None:
                rec[p + ".grad"] = t.grad.clone()
                t.grad = None
        for b in ("running_mean", "running_var", "num_batches_tracked"):
            if getattr(layer, b) is not None:
                rec[b] = getattr(layer, b).clone()
        out.append(rec)
    return out


class Net(nn.Module):
    """Nested model: a Sequential inside a custom module, torch.nn and bnlib BNs, an instance norm."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, bias=False),
            nn.BatchNorm2d(4, momentum=0.2),
            nn.ReLU(),
            nn.InstanceNorm2d(4, affine=True),
            nn.Sequential(bnlib.BatchNorm2d(4, bias=False)),
        )
        self.head = nn.Linear(4, 3)
        self.norm = bnlib.BatchNorm1d(3, momentum=None)

    def forward(self, x):
        return self.norm(self.head(self.features(x).mean((2, 3))))


def _ddp_data(step):
    g = _gen("ddp", step)
    return torch.randn(32, 2, 5, 5, generator=g, dtype=torch.float64) * 2 + 1, torch.randint(0, 3, (32,), generator=g)


def _net():
    torch.manual_seed(1234)
    return Net().double()


def _train_net(model, rank=None, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(steps):
        x, t = _ddp_data(step)
        if rank is not None:
            x, t = x[16 * rank:16 * (rank + 1)], t[16 * rank:16 * (rank + 1)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), t).backward()
        if rank is not None:  # what DistributedDataParallel does: average the gradients over ranks
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= WORLD
        opt.step()
    return model


CHECKPOINT_CASES = [(reentrant, momentum) for reentrant in (False, True) for momentum in (0.1, None)]


def _checkpoint_batches():
    """Three batches of 8 examples (each rank takes 4), with offsets so the running averages move."""
    g = torch.Generator().manual_seed(7)
    return [3 * torch.randn(8, 3, generator=g, dtype=torch.float64) + k for k in range(3)]


def _play_checkpointed(layer, reentrant, rank=None):
    """Three training steps through ``checkpoint(layer, ...)``; returns the buffers after them."""
    for x in _checkpoint_batches():
        x = (x if rank is None else x[4 * rank:4 * (rank + 1)]).clone().requires_grad_()
        checkpoint(layer, x, use_reentrant=reentrant).square().sum().backward()
    return {k: v.clone() for k, v in layer.named_buffers()}


# ---------------------------------------------------------------------------------------------
# The spawned job
# ---------------------------------------------------------------------------------------------

def _worker(rank, port, outdir):
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=60))
        res = {}
        for name, (_, tail, kwargs, _) in SCENARIOS.items():
            layer = SyncBatchNorm(tail[0], **kwargs).double()
            _init_affine(layer, name)
            res[name] = _play(layer, name, rank)

        # Activation checkpointing: the recompute during the backward is a second forward on the same batch.
        res["checkpoint"] = {case: _play_checkpointed(SyncBatchNorm(3, momentum=case[1]).double(), case[0], rank)
                             for case in CHECKPOINT_CASES}

        # < 2 values per channel over ALL ranks: every rank raises the same error (no deadlock).
        layer = SyncBatchNorm(3)
        try:
            layer(torch.randn(1 - rank, 3))
            res["too_few"] = None
        except ValueError as e:
            res["too_few"] = str(e)
        res["too_few_nbt"] = int(layer.num_batches_tracked)  # a forward that raised counts no batch

        # float32 with a large offset: compared with float64 BatchNorm on the concatenated batch.
        x32 = _offset_batch()[0][8 * rank:8 * (rank + 1)].float().requires_grad_()
        f32 = SyncBatchNorm(3)
        y32 = f32(x32)
        (y32 * _offset_batch()[1][8 * rank:8 * (rank + 1)].float()).sum().backward()
        res["offset_f32"] = (y32.detach(), x32.grad, f32.running_mean.clone(), f32.running_var.clone())

        # Every slice empty: an empty output, running statistics untouched.
        empty = SyncBatchNorm(3)
        res["all_empty"] = (empty(torch.randn(0, 3, 2)).shape, empty.running_mean.clone(),
                            empty.running_var.clone(), int(empty.num_batches_tracked))
        # ... but 1 value on each rank is 2 overall: fine.
        y = layer(torch.tensor([[1.0, 2.0, 3.0]]) * (rank + 1))
        res["one_each"] = (y.detach(), layer.running_mean.clone(), layer.running_var.clone())

        # torch.nn.SyncBatchNorm refuses CPU input in a process group (it checks before communicating).
        try:
            nn.SyncBatchNorm(3)(torch.randn(4, 3))
            res["torch_sync_error"] = None
        except (ValueError, RuntimeError) as e:
            res["torch_sync_error"] = str(e)

        # Eval mode does not communicate: only rank 0 calls the layer, then both meet at a barrier.
        if rank == 0:
            layer.eval()
            res["eval_alone"] = layer(torch.randn(4, 3)).shape
        dist.barrier()

        # A converted nested model trained data-parallel, 3 SGD steps. The gradients are averaged
        # by hand exactly as DistributedDataParallel does (constructing a DDP imports torch._dynamo,
        # which alone takes seconds; bnlib.lab.launch uses the real DDP).
        model = _train_net(SyncBatchNorm.convert_sync_batchnorm(_net()), rank)
        res["ddp"] = {k: v.clone() for k, v in model.state_dict().items()}
        res["ddp_types"] = sorted({type(m).__name__ for m in model.modules()})

        dist.destroy_process_group()
        torch.save(res, Path(outdir) / f"rank{rank}.pt")
    except BaseException:
        (Path(outdir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks():
    """Run the 2-process job once; returns [results of rank 0, results of rank 1]."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as outdir:
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, port, outdir), daemon=True) for r in range(WORLD)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(JOIN_TIMEOUT_S)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        errors = {r: (Path(outdir) / f"rank{r}.err").read_text() for r in range(WORLD)
                  if (Path(outdir) / f"rank{r}.err").exists()}
        if hung or errors or any(p.exitcode != 0 for p in procs):
            pytest.fail(f"spawned job failed: hung ranks {hung}, exit codes {[p.exitcode for p in procs]}\n"
                        + "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in errors.items()))
        return [torch.load(Path(outdir) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ---------------------------------------------------------------------------------------------
# Tests on the spawned results
# ---------------------------------------------------------------------------------------------

@pytest.mark.recent_torch
@pytest.mark.parametrize("name", SCENARIOS)
def test_sync_equals_batchnorm_on_concatenated_batch(ranks, name):
    """Outputs, input grads (per rank), parameter grads (summed over ranks), running stats (every rank)."""
    splits, tail, kwargs, _ = SCENARIOS[name]
    ref = TORCH_BN[len(tail) + 1](tail[0], **kwargs).double()
    _init_affine(ref, name)
    expected = _play(ref, name)
    if not ref.track_running_stats:
        # Eval mode never communicates, so without running statistics each rank normalizes its
        # slice with its own statistics (as torch.nn.SyncBatchNorm does): the reference is per rank.
        per_rank = [_play(ref, name, r)[-1] for r in range(WORLD)]
        expected[-1] = {k: torch.cat([p[k] for p in per_rank]) if k in ("y", "x.grad") else sum(p[k] for p in per_rank)
                        for k in per_rank[0]}
    for step, exp in enumerate(expected):
        got = [ranks[r][name][step] for r in range(WORLD)]
        for key in ("y", "x.grad"):
            torch.testing.assert_close(torch.cat([g[key] for g in got]), exp[key], **TOL,
                                       msg=lambda m: f"{name} step {step} {key}: {m}")
        for key in exp:
            if key.endswith(".grad") and key != "x.grad":
                torch.testing.assert_close(sum(g[key] for g in got), exp[key], **TOL,
                                           msg=lambda m: f"{name} step {step} {key} summed over ranks: {m}")
            elif key.startswith(("running", "num_batches")):
                for r in range(WORLD):
                    torch.testing.assert_close(got[r][key], exp[key], **TOL,
                                               msg=lambda m: f"{name} step {step} rank {r} {key}: {m}")


@pytest.mark.parametrize("reentrant,momentum", CHECKPOINT_CASES)
def test_checkpointed_sync_matches_torch_batchnorm_on_concatenated_batch(ranks, reentrant, momentum):
    """Under torch's checkpoint (either mode) torch.nn's BN counts the recompute as a batch and updates its running
    statistics again; SyncBatchNorm, with statistics over both ranks, does the same on every rank."""
    expected = _play_checkpointed(nn.BatchNorm1d(3, momentum=momentum).double(), reentrant)
    assert int(expected["num_batches_tracked"]) == 6  # what torch.nn does: 3 batches, each forward twice
    for r in range(WORLD):
        got = ranks[r]["checkpoint"][reentrant, momentum]
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, **TOL, msg=lambda m: f"rank {r} {key}: {m}")


def test_too_few_values_over_all_ranks_raises_on_every_rank(ranks):
    for r in range(WORLD):
        assert ranks[r]["too_few"] is not None and "more than 1 value per channel" in ranks[r]["too_few"]
        assert "over all 2 replicas" in ranks[r]["too_few"]


def test_failed_forward_does_not_count_a_batch(ranks):
    for r in range(WORLD):
        assert ranks[r]["too_few_nbt"] == 0


def test_float32_large_offset_matches_float64(ranks):
    """y = x·s + (β − μ·s) loses ~1e-3 at |μ| = 1e4 in float32; the centred form keeps ~1e-6."""
    x, w = _offset_batch()
    ref = nn.BatchNorm1d(3).double()
    xr = x.clone().requires_grad_()
    y = ref(xr)
    (y * w).sum().backward()
    for r in range(WORLD):
        y_r, g_r, rm, rv = ranks[r]["offset_f32"]
        sl = slice(8 * r, 8 * (r + 1))
        torch.testing.assert_close(y_r.double(), y[sl].detach(), rtol=0, atol=2e-5)
        torch.testing.assert_close(g_r.double(), xr.grad[sl], rtol=0, atol=5e-5)
        torch.testing.assert_close(rm.double(), ref.running_mean, rtol=1e-7, atol=0)
        torch.testing.assert_close(rv.double(), ref.running_var, rtol=1e-4, atol=0)


def test_float32_large_offset_without_process_group_matches_float64():
    x, _ = _offset_batch()
    y = SyncBatchNorm(3)(x.float())
    torch.testing.assert_close(y.double(), nn.BatchNorm1d(3).double()(x).detach(), rtol=0, atol=2e-5)


def test_all_ranks_empty_gives_empty_output(ranks):
    ref = bnlib.BatchNorm1d(3)  # what one process does with an empty batch (torch.nn's behaviour)
    ref(torch.randn(0, 3, 2))
    for r in range(WORLD):
        shape, rm, rv, nbt = ranks[r]["all_empty"]
        assert shape == (0, 3, 2)
        assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
        assert nbt == int(ref.num_batches_tracked)


def test_one_value_per_rank_is_enough(ranks):
    x = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]])
    ref = nn.BatchNorm1d(3)
    y = ref(x)
    for r in range(WORLD):
        y_r, rm, rv = ranks[r]["one_each"]
        torch.testing.assert_close(y_r, y[r:r + 1])
        torch.testing.assert_close(rm, ref.running_mean)
        torch.testing.assert_close(rv, ref.running_var)


def test_eval_mode_does_not_communicate(ranks):
    assert ranks[0]["eval_alone"] == (4, 3)


def test_converted_model_data_parallel_equals_single_process_training(ranks):
    expected = _train_net(_net()).state_dict()
    for r in range(WORLD):
        assert ranks[r]["ddp_types"] == ["Conv2d", "InstanceNorm2d", "Linear", "Net", "ReLU", "Sequential",
                                         "SyncBatchNorm"]
        got = ranks[r]["ddp"]
        assert got.keys() == expected.keys()
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], rtol=1e-7, atol=1e-9, msg=lambda m: f"rank {r} {k}: {m}")


# ---------------------------------------------------------------------------------------------
# Single-process tests (no process group)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5), (2, 3, 4, 5), (2, 3, 2, 2, 2)])
@pytest.mark.parametrize("kwargs", [dict(), dict(momentum=None, affine=False), dict(track_running_stats=False)])
def test_without_process_group_equals_batchnorm(shape, kwargs):
    assert not dist.is_initialized()
    ours = SyncBatchNorm(3, **kwargs).double()
    ref = {2: bnlib.BatchNorm1d, 3: bnlib.BatchNorm1d, 4: bnlib.BatchNorm2d, 5: bnlib.BatchNorm3d}[len(shape)](
        3, **kwargs).double()
    _init_affine(ours, "single")
    ref.load_state_dict(ours.state_dict())
    g = _gen("single", shape)
    for mode in ["train", "train", "eval", "train"]:
        ours.train(mode == "train")
        ref.train(mode == "train")
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ours(x1), ref(x2)
        torch.testing.assert_close(y1, y2, rtol=0, atol=0)
        y1.square().sum().backward()
        y2.square().sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=0, atol=0)


def test_convert_sync_batchnorm_nested_model():
    model = _net()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, bnlib.BatchNorm2d, bnlib.BatchNorm1d)):
                m.running_mean.uniform_(-1, 1)
                m.num_batches_tracked.fill_(7)
    model.features[1].weight.requires_grad_(False)
    model.features[4][0].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    old_params = dict(model.named_parameters())
    old_instance_norm = model.features[3]

    converted = SyncBatchNorm.convert_sync_batchnorm(model, process_group="pg-sentinel")
    assert converted is model  # the root is not a BN: converted in place
    bns = [converted.features[1], converted.features[4][0], converted.norm]
    assert all(type(m) is SyncBatchNorm and m.process_group == "pg-sentinel" for m in bns)
    assert converted.features[3] is old_instance_norm
    assert (bns[0].momentum, bns[1].bias, bns[2].momentum) == (0.2, None, None)
    assert [m.training for m in bns] == [True, False, True]
    assert not bns[0].weight.requires_grad and bns[1].weight.requires_grad
    # The same parameter objects (an optimizer built before still works), same state.
    assert dict(converted.named_parameters()).keys() == old_params.keys()
    assert all(p is old_params[k] for k, p in converted.named_parameters())
    after = converted.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and after[k].device == v.device
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)
    # Without a process group the converted model computes what the original did.
    x, _ = _ddp_data(0)
    # (torch.nn's BN and bnlib's differ by rounding only)
    torch.testing.assert_close(converted(x), _net_with_state(before)(x), rtol=1e-9, atol=1e-12)


def _net_with_state(state):
    net = _net()
    net.load_state_dict(state)
    net.features[4][0].eval()
    return net


@pytest.mark.parametrize("root", [nn.BatchNorm1d(3), bnlib.BatchNorm3d(3, affine=False), nn.SyncBatchNorm(3)])
def test_convert_root_batchnorm_returns_new_module(root):
    root = root.double()
    converted = SyncBatchNorm.convert_sync_batchnorm(root)
    assert type(converted) is SyncBatchNorm and converted is not root
    assert converted.running_var.dtype == torch.float64
    assert (converted.affine, converted.num_features) == (root.affine, 3)


def test_convert_leaves_other_layers_alone():
    for m in [nn.InstanceNorm2d(3), nn.LayerNorm(3), nn.Linear(3, 3)]:
        assert SyncBatchNorm.convert_sync_batchnorm(m) is m


def test_errors():
    layer = SyncBatchNorm(3)
    with pytest.raises(ValueError, match="expected input with 3 channels"):
        layer(torch.randn(4, 5))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        layer(torch.randn(4))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3))
    layer.eval()
    assert layer(torch.randn(1, 3)).shape == (1, 3)


def test_torch_syncbatchnorm_refuses_cpu_but_ours_runs(ranks):
    """The reason this module exists (if torch ever lifts the restriction, the chapter must change)."""
    for r in range(WORLD):
        assert ranks[r]["torch_sync_error"] is not None and "GPU" in ranks[r]["torch_sync_error"]


def test_communication_timers_nest():
    """An outer timer keeps counting through an inner one; each sees the collectives inside it."""
    from bnlib.distributed import _TIMER, communication_timer

    with communication_timer() as outer:
        _TIMER.run(lambda: None, torch.zeros(1))
        with communication_timer() as inner:
            _TIMER.run(lambda: None, torch.zeros(1))
        _TIMER.run(lambda: None, torch.zeros(1))
    _TIMER.run(lambda: None, torch.zeros(1))  # no timer active: not counted
    assert (outer.calls, inner.calls) == (3, 1)
    assert outer.seconds >= inner.seconds >= 0.0
    assert not _TIMER.active

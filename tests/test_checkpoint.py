"""Activation checkpointing re-runs a layer's forward during the backward pass. torch.nn's BN layers count that
second forward as a batch and update their running statistics again (under both of torch's checkpoint modes),
exactly as a second plain forward on the same input would. bnlib's layers do the same, so that a model checkpointed
with bnlib ends with the buffers it would have with torch.nn, and the count ``num_batches_tracked`` always agrees
with the updates the statistics received (the weights of ``momentum=None``'s cumulative average).
SyncBatchNorm with a real process group is checked the same way in tests/test_distributed.py (spawned job)."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import bnlib
from bnlib.recurrent import StepBatchNorm

MODES = [pytest.param(True, id="reentrant"), pytest.param(False, id="non-reentrant")]


def _batches(shape, k=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g) * (1 + i) + i for i in range(k)]


def _buffers(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()
            if k.rpartition(".")[2].startswith(("running", "num_batches"))}


def _run_checkpointed(layer, batches, use_reentrant):
    for x in batches:
        x = x.clone().requires_grad_()
        y = checkpoint(layer, x, use_reentrant=use_reentrant)
        y.square().sum().backward()


def _run_twice(layer, batches):
    """What a checkpointed step does to the buffers: the forward, and the recompute on the same input."""
    for x in batches:
        layer(x.clone().requires_grad_())
        layer(x.clone().requires_grad_()).square().sum().backward()


@pytest.mark.parametrize("use_reentrant", MODES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_batchnorm_matches_torch_under_checkpoint(dims, momentum, use_reentrant):
    shape = {1: (8, 4), 2: (4, 4, 3, 3), 3: (2, 4, 2, 3, 3)}[dims]
    ours = getattr(bnlib, f"BatchNorm{dims}d")(4, momentum=momentum)
    theirs = getattr(nn, f"BatchNorm{dims}d")(4, momentum=momentum)
    batches = _batches(shape)
    _run_checkpointed(ours, batches, use_reentrant)
    _run_checkpointed(theirs, batches, use_reentrant)
    for name, value in _buffers(theirs).items():
        torch.testing.assert_close(_buffers(ours)[name], value, msg=name)
    assert int(ours.num_batches_tracked) == 2 * len(batches)  # torch.nn counts the recompute too


def test_functional_batch_norm_matches_torch_under_checkpoint():
    batches = _batches((8, 4))
    stats = {lib: (torch.zeros(4), torch.ones(4)) for lib in ("bnlib", "torch")}
    for use_reentrant in (True, False):
        for x in batches:
            for lib, f in (("bnlib", bnlib.functional.batch_norm), ("torch", nn.functional.batch_norm)):
                x1 = x.clone().requires_grad_()
                checkpoint(lambda t, f=f, lib=lib: f(t, *stats[lib], training=True), x1,
                           use_reentrant=use_reentrant).sum().backward()
    torch.testing.assert_close(stats["bnlib"], stats["torch"])


def _layers():
    """Every bnlib layer that keeps running statistics, with an input it accepts."""
    yield "InPlaceABN", lambda m: bnlib.InPlaceABN(4, momentum=m), (8, 4)
    yield "BatchRenorm2d", lambda m: bnlib.BatchRenorm2d(4, momentum=m), (4, 4, 3, 3)
    yield "GhostBatchNorm1d", lambda m: bnlib.GhostBatchNorm1d(4, virtual_batch_size=4, momentum=m), (8, 4)
    yield "BatchLayerNorm", lambda m: bnlib.BatchLayerNorm(4, momentum=m), (8, 4)
    yield "InstanceNorm1d", lambda m: bnlib.InstanceNorm1d(4, momentum=m, track_running_stats=True), (4, 4, 5)
    yield "StepBatchNorm", lambda m: StepBatchNorm(4, max_steps=3, momentum=0.1 if m is None else m), (8, 4)
    yield "GhostBatch", lambda m: bnlib.GhostBatch(bnlib.BatchNorm1d(4, momentum=m), virtual_batch_size=4), (8, 4)


@pytest.mark.parametrize("use_reentrant", MODES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("name,make,shape", list(_layers()), ids=[n for n, *_ in _layers()])
def test_every_layer_counts_and_updates_like_a_second_forward(name, make, shape, momentum, use_reentrant):
    torch.manual_seed(0)
    checkpointed, twice = make(momentum), make(momentum)
    twice.load_state_dict(checkpointed.state_dict())
    batches = _batches(shape)
    if name == "StepBatchNorm":  # one time step per call: the layer is called with its step
        for layer, run in ((checkpointed, "ckpt"), (twice, "twice")):
            for t, x in enumerate(batches):
                x = x.clone().requires_grad_()
                if run == "ckpt":
                    checkpoint(layer, x, t, use_reentrant=use_reentrant).square().sum().backward()
                else:
                    layer(x.clone(), t)
                    layer(x, t).square().sum().backward()
    else:
        _run_checkpointed(checkpointed, batches, use_reentrant)
        _run_twice(twice, batches)
    expected = _buffers(twice)
    assert expected, name
    for key, value in expected.items():
        torch.testing.assert_close(_buffers(checkpointed)[key], value, msg=f"{name}: {key}")

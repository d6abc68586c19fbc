"""Edges shared by every bnlib layer: the empty batch, sizes given as NumPy or tensor integers, and what folding
refuses (a BN subclass with its own forward, a TorchScript module)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import bnlib
from bnlib.fold import FoldError, fold_batchnorm

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")

# Every layer with batch statistics, with an input shape it accepts (N = 0 filled in by the test).
BATCH_STAT_LAYERS = {
    "BatchNorm1d": (lambda: bnlib.BatchNorm1d(4), (4,)),
    "BatchNorm1d (N, C, L)": (lambda: bnlib.BatchNorm1d(4), (4, 3)),
    "BatchNorm2d": (lambda: bnlib.BatchNorm2d(4), (4, 3, 2)),
    "BatchNorm3d": (lambda: bnlib.BatchNorm3d(4), (4, 2, 2, 2)),
    "BatchNorm2d untracked": (lambda: bnlib.BatchNorm2d(4, track_running_stats=False), (4, 3, 2)),
    "SyncBatchNorm": (lambda: bnlib.SyncBatchNorm(4), (4, 3, 2)),
    "BatchRenorm1d": (lambda: bnlib.BatchRenorm1d(4, r_max=2.0, d_max=1.0), (4,)),
    "BatchRenorm2d": (lambda: bnlib.BatchRenorm2d(4), (4, 3, 2)),
    "GhostBatchNorm1d": (lambda: bnlib.GhostBatchNorm1d(4, virtual_batch_size=2), (4,)),
    "GhostBatchNorm2d": (lambda: bnlib.GhostBatchNorm2d(4, virtual_batch_size=2), (4, 3, 2)),
    "BatchLayerNorm": (lambda: bnlib.BatchLayerNorm(4), (4,)),
    "BatchLayerNorm (N, C, H, W)": (lambda: bnlib.BatchLayerNorm(4), (4, 3, 2)),
    "BatchLayerNorm untracked": (lambda: bnlib.BatchLayerNorm(4, track_running_stats=False), (4,)),
    "GhostBatch(BatchRenorm1d)": (lambda: bnlib.GhostBatch(bnlib.BatchRenorm1d(4), 2), (4,)),
    "InstanceNorm2d tracked": (lambda: bnlib.InstanceNorm2d(4, affine=True, track_running_stats=True), (4, 3, 2)),
}


def _buffers(layer):
    return {k: v.clone() for k, v in layer.state_dict().items() if k != "num_batches_tracked"}


@pytest.mark.parametrize("name", BATCH_STAT_LAYERS)
def test_empty_training_batch_gives_an_empty_output_and_leaves_the_statistics_alone(name):
    """As torch.nn: an empty output of the input's shape and dtype, in the graph of γ and β (gradient 0), and the
    running statistics untouched (torch.nn's BatchNorm, and so bnlib's BatchNorm and SyncBatchNorm, still count
    the batch in num_batches_tracked; the variants, which torch.nn does not have, do not)."""
    make, shape = BATCH_STAT_LAYERS[name]
    layer = make().train()
    before = _buffers(layer)
    x = torch.randn(0, *shape, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == x.shape
    for p in layer.parameters():
        assert torch.equal(p.grad, torch.zeros_like(p))
    after = _buffers(layer)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    layer.eval()
    assert layer(torch.randn(0, *shape)).shape == x.shape


SIZED = {
    "BatchNorm2d": lambda n: bnlib.BatchNorm2d(n),
    "SyncBatchNorm": lambda n: bnlib.SyncBatchNorm(n),
    "BatchRenorm1d": lambda n: bnlib.BatchRenorm1d(n),
    "GhostBatchNorm2d": lambda n: bnlib.GhostBatchNorm2d(n, virtual_batch_size=n),
    "GhostBatch": lambda n: bnlib.GhostBatch(bnlib.BatchNorm1d(4), n),
    "BatchLayerNorm": lambda n: bnlib.BatchLayerNorm(n),
    "LayerNorm": lambda n: bnlib.LayerNorm(n),
    "LayerNorm shape": lambda n: bnlib.LayerNorm((n, n)),
    "GroupNorm groups": lambda n: bnlib.GroupNorm(n, 8),
    "GroupNorm channels": lambda n: bnlib.GroupNorm(2, n),
    "InstanceNorm2d": lambda n: bnlib.InstanceNorm2d(n),
    "FrozenBatchNorm2d": lambda n: bnlib.FrozenBatchNorm2d(n),
}


@pytest.mark.parametrize("name", SIZED)
@pytest.mark.parametrize("size", [np.int64(4), np.int32(4), torch.tensor(4)], ids=["int64", "int32", "tensor"])
def test_integer_sizes_are_accepted_as_torch_accepts_them(name, size):
    """operator.index: NumPy integers and integer 0-dim tensors are sizes (torch.nn.BatchNorm2d(np.int64(4)) works)."""
    layer = SIZED[name](size)
    reference = SIZED[name](4)
    assert layer.state_dict().keys() == reference.state_dict().keys()
    for a, b in zip(layer.state_dict().values(), reference.state_dict().values()):
        assert a.shape == b.shape
    assert repr(layer) == repr(reference)


@pytest.mark.parametrize("name", SIZED)
@pytest.mark.parametrize("size", [4.0, "4", True, torch.tensor(4.0)], ids=["float", "str", "bool", "float tensor"])
def test_other_sizes_are_refused_with_a_type_error(name, size):
    with pytest.raises(TypeError, match="expected .* to be an int"):
        SIZED[name](size)


@pytest.mark.parametrize("name", ["BatchNorm2d", "GhostBatch", "LayerNorm", "GroupNorm channels", "InstanceNorm2d"])
def test_sizes_below_one_are_refused_with_a_value_error(name):
    with pytest.raises(ValueError, match="positive int"):
        SIZED[name](np.int64(0))


class _Doubled(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


class _DoubledBnlib(bnlib.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


class _Plain(nn.BatchNorm2d):  # a subclass that keeps BN's forward is folded
    pass


def _trained(bn_cls):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), bn_cls(4), nn.ReLU())
    net.train()
    net(torch.randn(8, 3, 6, 6) * 2 + 1)
    return net.eval()


@pytest.mark.parametrize("bn_cls", [_Doubled, _DoubledBnlib])
def test_fold_refuses_a_batchnorm_subclass_that_overrides_forward(bn_cls):
    net = _trained(bn_cls)
    with pytest.raises(FoldError, match=rf"1: .*{bn_cls.__name__} overrides forward"):
        fold_batchnorm(net)
    kept = fold_batchnorm(net, strict=False)
    assert isinstance(kept[1], bn_cls)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(kept(x), net(x))


def test_fold_folds_a_batchnorm_subclass_that_keeps_forward():
    net = _trained(_Plain)
    folded = fold_batchnorm(net)
    assert isinstance(folded[1], nn.Identity)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)


def test_fold_refuses_a_torchscript_module():
    net = _trained(nn.BatchNorm2d)
    with pytest.raises(TypeError, match="TorchScript module.*fold the eager model|TorchScript module.*Fold the eager"):
        fold_batchnorm(torch.jit.script(net))
    with pytest.raises(TypeError, match="TorchScript"):
        fold_batchnorm(nn.Sequential(torch.jit.script(net)))

"""Tests of bnlib.frozen: frozen BN layers and the converter."""

import copy

import pytest
import torch
from torch import nn

import bnlib
from bnlib import variants
from bnlib.frozen import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, freeze_batchnorm
from bnlib.lab.models import CNN, MLP
from bnlib.layers import is_batchnorm


def _trained_bn(bn, shape, steps=5):
    """``bn`` with non-trivial running statistics, γ and β."""
    torch.manual_seed(0)
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.uniform_(0.5, 2.0)
        if bn.bias is not None:
            bn.bias.uniform_(-1.0, 1.0)
    bn.train()
    for _ in range(steps):
        bn(torch.randn(*shape) * 3 + 1)
    return bn


@pytest.mark.parametrize("make, shape, frozen_cls", [
    (lambda: nn.BatchNorm1d(5), (8, 5), FrozenBatchNorm1d),
    (lambda: bnlib.BatchNorm1d(5), (8, 5, 3), FrozenBatchNorm1d),
    (lambda: nn.BatchNorm2d(5), (4, 5, 3, 3), FrozenBatchNorm2d),
    (lambda: bnlib.BatchNorm2d(5, affine=False), (4, 5, 3, 3), FrozenBatchNorm2d),
    (lambda: bnlib.BatchNorm2d(5, bias=False), (4, 5, 3, 3), FrozenBatchNorm2d),
    (lambda: bnlib.BatchNorm3d(5, eps=1e-3), (2, 5, 2, 3, 3), FrozenBatchNorm3d),
    (lambda: variants.GhostBatchNorm2d(5, virtual_batch_size=2), (4, 5, 3, 3), FrozenBatchNorm2d),
    (lambda: variants.BatchRenorm1d(5), (8, 5), FrozenBatchNorm1d),
    (lambda: bnlib.SyncBatchNorm(5), (4, 5, 3), FrozenBatchNorm),
])
def test_frozen_equals_eval_mode_bn_in_both_modes(make, shape, frozen_cls):
    bn = _trained_bn(make(), shape)
    frozen = freeze_batchnorm(copy.deepcopy(bn))
    assert type(frozen) is frozen_cls
    x = torch.randn(*shape) * 2
    bn.eval()
    with torch.no_grad():
        expected = bn(x)
    for mode in (True, False):
        frozen.train(mode)
        torch.testing.assert_close(frozen(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(frozen.running_mean, bn.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(frozen.running_var, bn.running_var, rtol=0, atol=0)


def test_statistics_never_change_and_a_batch_of_one_works():
    frozen = freeze_batchnorm(_trained_bn(bnlib.BatchNorm1d(4), (16, 4)))
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    frozen.train()
    out = frozen(torch.randn(1, 4) * 10)  # a batch of one: no "more than 1 value per channel" error
    assert out.shape == (1, 4)
    for _ in range(3):
        frozen(torch.randn(8, 4) + 5)
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("train_affine", [False, True])
def test_train_affine_controls_gamma_beta_and_gradients_reach_the_input(train_affine):
    frozen = freeze_batchnorm(_trained_bn(nn.BatchNorm2d(3), (4, 3, 2, 2)), train_affine=train_affine)
    assert frozen.train_affine is train_affine
    assert frozen.weight.requires_grad is train_affine and frozen.bias.requires_grad is train_affine
    x = torch.randn(2, 3, 2, 2, requires_grad=True)
    frozen(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    if train_affine:
        assert frozen.weight.grad is not None and frozen.weight.grad.abs().sum() > 0
        assert frozen.bias.grad is not None
    else:
        assert frozen.weight.grad is None and frozen.bias.grad is None
    # the gradient of a fixed affine map: dy/dx = γ / sqrt(var + eps), per channel
    scale, _ = frozen.scale_and_shift()
    torch.testing.assert_close(x.grad, 2 * frozen(x).detach() * scale.detach().view(1, -1, 1, 1))


def test_freeze_model_replaces_every_bn_and_keeps_eval_outputs():
    torch.manual_seed(0)
    model = CNN(channels=(4, 8), norm="bn", depth_per_stage=2)
    model.train()
    for _ in range(3):
        model(torch.rand(6, 1, 12, 12))
    x = torch.rand(5, 1, 12, 12)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    frozen = freeze_batchnorm(copy.deepcopy(model), train_affine=True)
    assert not any(is_batchnorm(m) for m in frozen.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules()) == 4
    frozen.train()
    torch.testing.assert_close(frozen(x), expected, rtol=1e-5, atol=1e-5)
    # the state_dict has the same keys as the BN model's and loads back into it
    assert frozen.state_dict().keys() == model.state_dict().keys()
    fresh = CNN(channels=(4, 8), norm="bn", depth_per_stage=2)
    fresh.load_state_dict(frozen.state_dict())
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-5)


def test_freeze_leaves_other_parameters_alone_and_works_with_torch_bn():
    torch.manual_seed(0)
    model = MLP(widths=(6, 6), norm="bn-torch")
    model.hidden[0].linear.weight.requires_grad_(False)
    freeze_batchnorm(model)
    assert all(isinstance(layer.norm, FrozenBatchNorm1d) for layer in model.hidden)
    assert not model.hidden[0].linear.weight.requires_grad and model.hidden[1].linear.weight.requires_grad
    assert model.out.weight.requires_grad


def test_precise_bn_and_syncbn_conversion_skip_frozen_layers():
    model = freeze_batchnorm(nn.Sequential(nn.Linear(3, 4), _trained_bn(nn.BatchNorm1d(4), (8, 4))))
    before = model[1].running_mean.clone()
    assert bnlib.running_stats.recompute_bn_stats(model, torch.randn(20, 3) + 7, batch_size=10) == {}
    assert torch.equal(model[1].running_mean, before)
    converted = bnlib.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(converted[1]) is FrozenBatchNorm1d


def test_refusals():
    with pytest.raises(ValueError, match="no running statistics"):
        freeze_batchnorm(nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="BatchLayerNorm"):
        freeze_batchnorm(nn.Sequential(variants.BatchLayerNorm(3)))
    with pytest.raises(ValueError, match="4D"):
        FrozenBatchNorm2d(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="channels"):
        FrozenBatchNorm1d(3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="num_features"):
        FrozenBatchNorm1d(0)
    # layers that are not batch-statistics layers stay as they are
    ln = variants.LayerNorm(3)
    assert freeze_batchnorm(ln) is ln


def test_exported_from_the_package():
    assert bnlib.freeze_batchnorm is freeze_batchnorm
    assert bnlib.FrozenBatchNorm2d is FrozenBatchNorm2d
    assert "FrozenBatchNorm1d" in repr(freeze_batchnorm(nn.BatchNorm1d(2)).__class__)

"""Tests of bnlib.lab.params: BN with γ or β taken away, freezing parameters, effective step sizes."""

import pytest
import torch
import torch.nn as nn

import bnlib
from bnlib.lab.models import CNN, MLP
from bnlib.lab.params import (
    BN_VARIANTS,
    StepSizeRecorder,
    bn_factory,
    bn_parameters,
    count_parameters,
    gamma_zeroed,
    small_gamma_mask,
    train_only,
)
from bnlib.lab.training import fit, seed_everything
from bnlib.layers import bn_layers


def _bn(model):
    """The BN layers of ``model`` as a list, in module order."""
    return list(bn_layers(model).values())


@pytest.mark.parametrize("kind,cls", [("1d", bnlib.BatchNorm1d), ("2d", bnlib.BatchNorm2d)])
def test_bn_factory_variants(kind, cls):
    full, g1, b0, none = (bn_factory(v, kind)(5) for v in ("full", "gamma=1", "beta=0", "none"))
    for layer in (full, g1, b0, none):
        assert isinstance(layer, cls) and layer.num_features == 5
    assert full.weight.requires_grad and full.bias.requires_grad
    assert not g1.weight.requires_grad and g1.bias.requires_grad
    assert torch.equal(g1.weight, torch.ones(5))
    assert b0.weight.requires_grad and b0.bias is None
    assert none.weight is None and none.bias is None and not none.affine


def test_every_listed_variant_builds_and_learns_what_it_says():
    """Each name of BN_VARIANTS builds a layer; its trainable BN parameters match the description."""
    trainable = {}
    for variant in BN_VARIANTS:
        layer = bn_factory(variant)(3)
        trainable[variant] = sorted(n for n, p in layer.named_parameters() if p.requires_grad)
    assert trainable == {"full": ["bias", "weight"], "gamma=1": ["bias"], "beta=0": ["weight"], "none": []}


def test_bn_factory_rejects_unknown():
    with pytest.raises(ValueError, match="unknown variant"):
        bn_factory("gamma=2")
    with pytest.raises(ValueError, match="kind"):
        bn_factory("full", "3d")


def test_bn_factory_passes_kwargs_and_works_in_models():
    layer = bn_factory("full", eps=1e-3, momentum=0.2)(4)
    assert layer.eps == 1e-3 and layer.momentum == 0.2
    seed_everything(0)
    mlp = MLP(norm=bn_factory("beta=0"))
    assert len(_bn(mlp)) == 3 and all(m.bias is None for m in _bn(mlp))
    cnn = CNN(channels=(4, 8), norm=bn_factory("gamma=1", "2d"))
    assert len(_bn(cnn)) == 2
    assert cnn(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_bn_parameters_come_from_torch_and_bnlib_layers():
    model = nn.Sequential(nn.Linear(3, 4), bnlib.BatchNorm1d(4), nn.BatchNorm1d(4), nn.LayerNorm(4))
    assert [type(m) for m in _bn(model)] == [bnlib.BatchNorm1d, nn.BatchNorm1d]
    assert len(bn_parameters(model)) == 4


def test_train_only_bn_head_and_counts():
    seed_everything(0)
    cnn = CNN(channels=(4, 8), norm="bn")
    total = count_parameters(cnn)
    assert total == count_parameters(cnn, trainable=False)
    n_bn = 2 * (4 + 8)
    n_head = 8 * 10 + 10
    assert train_only(cnn, bn=True) == n_bn
    assert all(not b.conv.weight.requires_grad for b in cnn.blocks)
    assert train_only(cnn, cnn.head, bn=True) == n_bn + n_head
    assert train_only(cnn, cnn.head) == n_head
    assert all(not p.requires_grad for p in bn_parameters(cnn))
    assert count_parameters(cnn, trainable=False) == total


def test_fit_leaves_frozen_parameters_untouched():
    seed_everything(0)
    cnn = CNN(channels=(4, 8), norm="bn")
    train_only(cnn, bn=True)
    conv0 = cnn.blocks[0].conv.weight.detach().clone()
    head0 = cnn.head.weight.detach().clone()
    gamma0 = cnn.blocks[0].norm.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    fit(cnn, ((x, y), (x, y)), steps=5, batch_size=16, lr=0.1, device="cpu")
    assert torch.equal(cnn.blocks[0].conv.weight, conv0) and torch.equal(cnn.head.weight, head0)
    assert not torch.equal(cnn.blocks[0].norm.weight, gamma0)


def test_step_size_recorder_measures_relative_steps():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))        # norm 5
    rec = StepSizeRecorder({"w": w})
    rec(0)
    with torch.no_grad():
        w.add_(torch.tensor([0.5, 0.0]))
    rec(1)
    with torch.no_grad():
        w.mul_(2.0)
    rec(2)
    steps, norms, rel = rec.array()
    assert steps.tolist() == [1, 2]
    assert rel["w"][0] == pytest.approx(0.5 / 5.0)
    assert rel["w"][1] == pytest.approx(1.0)           # doubling: the change equals the old norm
    assert norms["w"][1] == pytest.approx(2 * float(torch.tensor([3.5, 4.0]).norm()))


def test_step_size_recorder_every_and_with_fit():
    seed_everything(0)
    mlp = MLP(in_features=4, widths=(6,), norm="bn", bias=None)
    rec = StepSizeRecorder({"W": mlp.hidden[0].linear.weight}, every=2)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 4, generator=g), torch.randint(0, 10, (40,), generator=g)
    fit(mlp, ((x, y), (x, y)), steps=6, batch_size=8, lr=0.1, callback=rec, callback_every=1, device="cpu")
    steps, norms, rel = rec.array()
    assert steps.tolist() == [2, 4, 6]
    assert (rel["W"] > 0).all() and (norms["W"] > 0).all()
    with pytest.raises(ValueError):
        StepSizeRecorder({})


def test_small_gamma_mask_is_relative_to_the_median():
    layer = bnlib.BatchNorm1d(5)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([2.0, -0.1, 1.0, 0.05, -3.0]))   # median |gamma| = 1
    assert small_gamma_mask(layer).tolist() == [False, False, False, True, False]
    assert small_gamma_mask(layer, rel=0.2).tolist() == [False, True, False, True, False]
    with torch.no_grad():
        layer.weight.mul_(100.0)                                        # the same features at any scale
    assert small_gamma_mask(layer).tolist() == [False, False, False, True, False]
    with pytest.raises(ValueError, match="affine"):
        small_gamma_mask(bnlib.BatchNorm1d(3, affine=False))


def test_gamma_zeroed_switches_features_off_and_restores():
    seed_everything(0)
    mlp = MLP(in_features=4, widths=(6, 5), norm="bn", bias=None).eval()
    x = torch.randn(7, 4)
    layers = _bn(mlp)
    before = [m.weight.detach().clone() for m in layers]
    masks = [torch.tensor([True, False, False, False, False, True]), torch.zeros(5, dtype=torch.bool)]
    with gamma_zeroed(mlp, masks):
        assert layers[0].weight[0] == 0 and layers[0].weight[5] == 0 and layers[0].weight[1] == before[0][1]
        h = layers[0](mlp.hidden[0].linear(x))
        assert torch.allclose(h[:, 0], layers[0].bias[0].expand(7))    # the feature outputs its beta
    assert all(torch.equal(m.weight, w) for m, w in zip(layers, before))
    with pytest.raises(ValueError, match="one mask per BN layer"), gamma_zeroed(mlp, masks[:1]):
        pass
    wrong = [torch.zeros(3, dtype=torch.bool), masks[1]]
    with pytest.raises(ValueError, match="shape"), gamma_zeroed(mlp, wrong):
        pass
    with pytest.raises(RuntimeError), gamma_zeroed(mlp, masks):       # restored even after an error
        raise RuntimeError
    assert all(torch.equal(m.weight, w) for m, w in zip(layers, before))

"""Tests of bnlib.lab.models: every model with every normalization, and the layer details."""

import functools

import pytest
import torch
import torch.nn as nn

from bnlib import modules, variants
from bnlib.lab.models import CNN, MLP, NORM_NAMES, ResNet, make_norm

NAMES_1D = [None, "none", "bn", "bn-torch", "ln", "gn", "brn", "bln"]
NAMES_2D = NAMES_1D + ["in"]




def check_forward_backward(model, x, num_classes=10):
    model.train()
    out = model(x)
    assert out.shape == (x.shape[0], num_classes)
    out.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x[:1])).all()


ghost1d = functools.partial(variants.GhostBatchNorm1d, virtual_batch_size=3)
ghost2d = functools.partial(variants.GhostBatchNorm2d, virtual_batch_size=2)


@pytest.mark.parametrize("norm", NAMES_1D + [ghost1d])
def test_mlp_every_norm(norm):
    torch.manual_seed(0)
    check_forward_backward(MLP(widths=(12, 12), norm=norm), torch.rand(6, 1, 28, 28))


@pytest.mark.parametrize("norm", NAMES_2D + [ghost2d])
def test_cnn_every_norm(norm):
    torch.manual_seed(0)
    model = CNN(channels=(4, 8), norm=norm, depth_per_stage=2)
    check_forward_backward(model, torch.rand(4, 1, 12, 12))


@pytest.mark.parametrize("norm", NAMES_2D)
def test_resnet_every_norm(norm):
    torch.manual_seed(0)
    model = ResNet(in_channels=3, num_classes=5, width=4, blocks_per_stage=1, norm=norm)
    check_forward_backward(model, torch.rand(4, 3, 16, 16), num_classes=5)


def test_make_norm_builds_bnlib_layers():
    assert type(make_norm("bn", 6, "1d")) is modules.BatchNorm1d
    assert type(make_norm("bn", 6, "2d")) is modules.BatchNorm2d
    assert type(make_norm("BN-torch", 6, "2d")) is nn.BatchNorm2d
    assert isinstance(make_norm(None, 6, "2d"), nn.Identity)
    assert isinstance(make_norm("ln", 6, "1d"), variants.LayerNorm)
    ln2d = make_norm("ln", 6, "2d")
    assert isinstance(ln2d, variants.GroupNorm) and ln2d.num_groups == 1
    # the largest divisor of C that is at most 8
    assert [make_norm("gn", c, "2d").num_groups for c in (4, 6, 12, 32, 100, 7)] == [4, 6, 6, 8, 5, 7]
    assert isinstance(make_norm("in", 6, "2d"), variants.InstanceNorm2d)
    assert isinstance(make_norm("brn", 6, "1d"), variants.BatchRenorm1d)
    assert isinstance(make_norm("brn", 6, "2d"), variants.BatchRenorm2d)
    assert isinstance(make_norm("bln", 6, "2d"), variants.BatchLayerNorm)
    assert isinstance(make_norm(ghost2d, 6, "2d"), variants.GhostBatchNorm2d)


def test_make_norm_forwards_keyword_arguments():
    bn = make_norm("bn", 64, kind="2d", momentum=0.01, eps=1e-3)
    assert type(bn) is modules.BatchNorm2d and bn.momentum == 0.01 and bn.eps == 1e-3
    assert make_norm("bn-torch", 5, momentum=None).momentum is None
    assert make_norm("bn", 5, affine=False).weight is None
    assert make_norm("gn", 12, "2d", num_groups=3).num_groups == 3      # instead of the default 6
    assert make_norm("gn", 12, "2d", num_groups=4, eps=1e-2).eps == 1e-2
    assert make_norm("ln", 6, "2d", eps=1e-3).eps == 1e-3 and make_norm("ln", 6, eps=1e-3).eps == 1e-3
    assert make_norm("in", 6, "2d").affine and not make_norm("in", 6, "2d", affine=False).affine
    assert make_norm("brn", 6, momentum=0.1).momentum == 0.1
    assert make_norm(ghost2d, 6, "2d", momentum=0.2).momentum == 0.2     # to a callable too
    assert isinstance(make_norm("none", 6, momentum=0.1), nn.Identity)
    with pytest.raises(TypeError):
        make_norm("gn", 12, "2d", momentum=0.1)                          # GroupNorm has no momentum


def test_models_take_a_partial_of_make_norm():
    norm = functools.partial(make_norm, "bn", kind="2d", momentum=0.01, eps=1e-3)
    model = CNN(channels=(4, 8), norm=norm)
    layers = [b.norm for b in model.blocks]
    assert all(type(m) is modules.BatchNorm2d and m.momentum == 0.01 and m.eps == 1e-3 for m in layers)
    assert [m.num_features for m in layers] == [4, 8]
    # a callable norm counts as a normalization: the conv before it drops its bias
    assert all(b.conv.bias is None for b in model.blocks)
    check_forward_backward(model, torch.rand(4, 1, 8, 8))


def test_unknown_norm_and_misuse():
    with pytest.raises(ValueError) as err:
        make_norm("batchnorm", 8, "1d")
    assert all(repr(name) in str(err.value) for name in NORM_NAMES)
    with pytest.raises(ValueError):
        MLP(norm="in")                      # instance norm needs conv maps
    with pytest.raises(ValueError):
        make_norm("bn", 8, "3d")


def test_mlp_structure_and_init():
    torch.manual_seed(0)
    m = MLP(norm="bn", init_std=0.1)
    assert len(m.hidden) == 3
    for layer in m.hidden:
        assert isinstance(layer.linear, nn.Linear) and isinstance(layer.act, nn.Sigmoid)
        assert isinstance(layer.norm, modules.BatchNorm1d)
        assert layer.linear.bias is not None and (layer.linear.bias == 0).all()
    assert abs(m.hidden[0].linear.weight.std().item() - 0.1) < 0.005
    assert all(layer.linear.bias is None for layer in MLP(norm="bn", bias=None).hidden)
    assert all(layer.linear.bias is not None for layer in MLP(norm=None, bias=None).hidden)
    assert all(layer.linear.bias is None for layer in MLP(bias=False).hidden)
    # The activation's input is the norm's output.
    x = torch.rand(5, 784)
    layer = m.hidden[0]
    assert torch.allclose(layer(x), torch.sigmoid(layer.norm(layer.linear(x))))


def test_conv_bias_dropped_only_right_before_a_norm():
    def biases(model):
        return {m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d)}
    assert biases(CNN(norm="bn")) == {False}
    assert biases(CNN(norm=None)) == {True}
    assert biases(CNN(norm="bn", bn_position="after")) == {True}
    assert biases(CNN(norm="bn", conv_bias=True)) == {True}
    assert biases(CNN(norm=None, conv_bias=False)) == {False}
    assert biases(ResNet(norm="bn", width=4)) == {False}
    assert biases(ResNet(norm=None, width=4)) == {True}


@pytest.mark.parametrize("position,expected", [("before", ["conv", "norm", "act"]),
                                                ("after", ["conv", "act", "norm"])])
def test_cnn_bn_position_order(position, expected):
    model = CNN(channels=(4,), norm="bn", bn_position=position)
    block = model.blocks[0]
    order = []
    for name in ("conv", "norm", "act"):
        getattr(block, name).register_forward_hook(lambda *_, n=name: order.append(n))
    model(torch.rand(2, 1, 8, 8))
    assert order == expected


def test_cnn_depth():
    model = CNN(channels=(4, 8, 8, 16), depth_per_stage=2)
    assert len(model.blocks) == 8
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("norm", ["bn", "bn-torch", "gn"])
def test_resnet_zero_init_residual(norm):
    torch.manual_seed(0)
    model = ResNet(width=4, blocks_per_stage=1, norm=norm, zero_init_residual=True)
    for block in model.blocks:
        assert (block.norm2.weight == 0).all() and (block.norm1.weight == 1).all()
    # every other norm keeps γ = 1 (the stem and the projection shortcuts)
    others = [m for m in model.modules() if hasattr(m, "weight") and isinstance(m.weight, nn.Parameter)
              and m.weight.dim() == 1 and all(m is not b.norm2 for b in model.blocks)]
    assert others and all((m.weight == 1).all() for m in others)
    # an identity block (same shape in and out) starts as the identity after its last ReLU: h = relu(x)
    block = model.blocks[0]
    x = torch.relu(torch.randn(2, 4, 6, 6))
    model.train()
    torch.testing.assert_close(block(x), x)
    check_forward_backward(model, torch.rand(4, 1, 12, 12))
    # the last γ still learns: its gradient is not zero
    assert all(b.norm2.weight.grad.abs().sum() > 0 for b in model.blocks)
    # the default leaves every γ at 1
    assert all((b.norm2.weight == 1).all() for b in ResNet(width=4, blocks_per_stage=1, norm=norm).blocks)


def test_resnet_zero_init_residual_needs_a_learned_scale():
    with pytest.raises(ValueError, match="learned scale"):
        ResNet(width=4, blocks_per_stage=1, norm=None, zero_init_residual=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_models_on_cuda():
    for model, x in ((MLP(norm="bn"), torch.rand(4, 1, 28, 28)),
                     (CNN(norm="bn"), torch.rand(4, 1, 28, 28)),
                     (ResNet(norm="gn", width=8), torch.rand(4, 1, 28, 28))):
        check_forward_backward(model.cuda(), x.cuda())

"""The one definition of "the BN layers of a model" and the one way to leave a model as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlib
from bnlib.layers import bn_layers, preserved_state


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 6), bnlib.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(6, 3), nn.BatchNorm1d(3, track_running_stats=False), nn.LayerNorm(3))


def test_bn_layers_by_qualified_name_in_module_order():
    net = _net()
    assert list(bn_layers(net)) == ["1", "5"]
    assert list(bn_layers(net, tracking=True)) == ["1"]
    assert bn_layers(nn.Sequential(nn.Linear(2, 2), nn.GroupNorm(1, 2))) == {}
    bn = bnlib.BatchNorm2d(3)
    assert bn_layers(bn) == {"": bn}


def test_bn_layers_refuses_a_non_module():
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        bn_layers([])


def test_preserved_state_restores_modes_buffers_and_parameters_exactly():
    torch.manual_seed(0)
    net = _net().eval()
    net[3].train()                                   # a mixed pattern of flags survives
    net[0].bias.requires_grad_(False)
    x = torch.randn(8, 4)
    net(x).sum().backward()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()}
    flags = [m.training for m in net.modules()]
    buf = net[1].running_mean
    with preserved_state(net, parameters=True):
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        net(x).sum().backward()
        opt.step()
        net[0].bias.requires_grad_(True)
        net[1].running_mean = torch.zeros(6)          # replaced, not updated in place
        net[4].weight.grad = None
    assert net[1].running_mean is buf
    assert [m.training for m in net.modules()] == flags
    assert not net[0].bias.requires_grad
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    for n, p in net.named_parameters():
        assert (p.grad is None) == (grads[n] is None), n
        if p.grad is not None:
            assert torch.equal(p.grad, grads[n]), n


def test_preserved_state_leaves_parameters_alone_unless_asked():
    net = _net()
    w0 = net[0].weight.detach().clone()
    with preserved_state(net):
        with torch.no_grad():
            net[0].weight.add_(1.0)
        net(torch.randn(5, 4))
    assert net[1].num_batches_tracked.item() == 0
    assert torch.equal(net[0].weight, w0 + 1.0)           # parameters: not restored by default

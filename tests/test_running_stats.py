"""bnlib.running_stats: momentum conventions, EMA rules and Precise BN."""

import copy

import pytest
import torch
from torch import nn

import bnlib
from bnlib import running_stats as rs


@pytest.mark.parametrize("value", [0.0, 0.01, 0.1, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("a,b", [("torch", "keras"), ("torch", "flax"), ("keras", "flax"),
                                 ("paper", "tf"), ("jax", "pytorch")])
def test_convert_momentum_round_trip(value, a, b):
    assert rs.convert_momentum(rs.convert_momentum(value, a, b), b, a) == pytest.approx(value, abs=1e-15)


def test_convert_momentum_known_values():
    assert rs.convert_momentum(0.1, "torch", "keras") == pytest.approx(0.9)
    assert rs.convert_momentum(0.99, "keras", "torch") == pytest.approx(0.01)
    assert rs.convert_momentum(0.99, from_="flax", to="torch") == pytest.approx(0.01)
    assert rs.convert_momentum(0.99, "keras", "flax") == 0.99
    assert rs.convert_momentum(0.1, "torch", "paper") == 0.1


def test_convert_momentum_errors():
    with pytest.raises(ValueError, match="unknown convention"):
        rs.convert_momentum(0.1, "caffe", "torch")
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        rs.convert_momentum(1.5)
    with pytest.raises(ValueError):
        rs.convert_momentum(None)


def test_torch_style_update_matches_torch_nn():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4, momentum=0.1).double()
    mean, var = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    for _ in range(5):
        x = torch.randn(8, 4, 3, dtype=torch.float64) * 2 + 1
        bn(x)
        rs.torch_style_update(mean, var, x, momentum=0.1)
    torch.testing.assert_close(mean, bn.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, bn.running_var, rtol=1e-12, atol=1e-12)


def test_keras_and_torch_trajectories_agree_after_conversion():
    torch.manual_seed(0)
    k_mean, t_mean = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for _ in range(20):
        batch = torch.randn(3, dtype=torch.float64)
        rs.ema_update(k_mean, batch, 0.99, "keras")
        rs.ema_update(t_mean, batch, rs.convert_momentum(0.99, "keras", "torch"), "torch")
    torch.testing.assert_close(k_mean, t_mean, rtol=1e-14, atol=1e-14)


def test_keras_style_variance_is_biased():
    x = torch.randn(10, 2, dtype=torch.float64)
    mean, var = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    rs.keras_style_update(mean, var, x, momentum=0.0)  # momentum 0: take the batch value
    torch.testing.assert_close(var, x.var(0, unbiased=False))
    torch.testing.assert_close(mean, x.mean(0))


@pytest.mark.parametrize("sizes", [[7], [5, 5, 5], [1, 9, 3, 20]])
def test_channel_moments_equal_concatenated(sizes):
    torch.manual_seed(1)
    xs = [torch.randn(n, 3, 4, dtype=torch.float64) * 0.01 + 1e4 for n in sizes]
    s = rs.ChannelMoments()
    for x in xs:
        s.update(x)
    allx = torch.cat(xs).transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(s.mean, allx.mean(1), rtol=1e-13, atol=0)
    torch.testing.assert_close(s.var(), allx.var(1, unbiased=True), rtol=1e-9, atol=0)
    torch.testing.assert_close(s.var(unbiased=False), allx.var(1, unbiased=False), rtol=1e-9, atol=0)
    assert s.n == sum(sizes) * 4


def _nested_model(kind):
    bn = bnlib.BatchNorm1d if kind == "bnlib" else nn.BatchNorm1d
    inner = nn.Sequential(nn.Linear(6, 5), bn(5), nn.ReLU(), nn.Dropout(0.5))
    return nn.Sequential(nn.Sequential(inner, nn.Linear(5, 4)), bn(4, momentum=None), nn.Tanh(), nn.Linear(4, 2))


def _inputs_of_bns(model, x, batch_size):
    """The concatenated inputs of every BN layer, collected independently of running_stats."""
    got = {name: [] for name in rs.batchnorm_layers(model)}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=name: got[n].append(inp[0]))
             for name, m in rs.batchnorm_layers(model).items()]
    model.eval()
    for m in rs.batchnorm_layers(model).values():
        m.train()
        m.momentum = 0.0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


@pytest.mark.parametrize("kind", ["bnlib", "torch"])
@pytest.mark.parametrize("batch_size", [50, 64, 200])
def test_precise_bn_equals_direct_statistics(kind, batch_size):
    torch.manual_seed(0)
    model = _nested_model(kind).double()
    x = torch.randn(200, 6, dtype=torch.float64) * 3 + 2
    model.train()
    for i in range(3):  # some EMA history
        model(x[i * 10:(i + 1) * 10])
    expected = _inputs_of_bns(copy.deepcopy(model), x, batch_size)
    rs.recompute_bn_stats(model, x, batch_size=batch_size)
    layers = rs.batchnorm_layers(model)
    assert set(layers) == {"0.0.1", "1"}
    for name, m in layers.items():
        a = expected[name]
        torch.testing.assert_close(m.running_mean, a.mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.running_var, a.var(0, unbiased=True), rtol=1e-12, atol=1e-12)


def test_precise_bn_single_batch_first_layer_is_population():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), bnlib.BatchNorm1d(4), nn.ReLU(), nn.BatchNorm1d(4)).double()
    x = torch.randn(100, 3, dtype=torch.float64)
    rs.precise_bn(model, x, batch_size=30)  # 4 batches of unequal size (30, 30, 30, 10)
    with torch.no_grad():
        h = model[0](x)
    torch.testing.assert_close(model[1].running_mean, h.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model[1].running_var, h.var(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["bnlib", "torch"])
def test_precise_bn_restores_state(kind):
    torch.manual_seed(0)
    model = _nested_model(kind)
    model.train()
    model(torch.randn(16, 6))
    model.eval()
    model[0].train()  # a mixed state must come back exactly
    flags = [m.training for m in model.modules()]
    params = copy.deepcopy(list(model.parameters()))
    layers = rs.batchnorm_layers(model)
    before = {n: (m.momentum, int(m.num_batches_tracked)) for n, m in layers.items()}
    rs.recompute_bn_stats(model, torch.randn(100, 6), batch_size=32, num_batches=2)
    assert [m.training for m in model.modules()] == flags
    assert {n: (m.momentum, int(m.num_batches_tracked)) for n, m in layers.items()} == before
    for p, q in zip(params, model.parameters()):
        assert torch.equal(p, q)
        assert p.grad is None and q.grad is None


def test_precise_bn_num_batches_and_iterables():
    torch.manual_seed(0)
    model = nn.Sequential(bnlib.BatchNorm1d(3))
    x = torch.randn(100, 3) + 5
    moments = rs.recompute_bn_stats(model, x, batch_size=10, num_batches=3)
    assert moments["0"].n == 30
    torch.testing.assert_close(model[0].running_mean, x[:30].mean(0), rtol=1e-5, atol=1e-5)
    loader = [(x[i:i + 25], torch.zeros(25)) for i in range(0, 100, 25)]
    moments = rs.recompute_bn_stats(model, loader)
    assert moments["0"].n == 100
    torch.testing.assert_close(model[0].running_var, x.var(0), rtol=1e-5, atol=1e-5)


def test_precise_bn_without_bn_layers_and_errors():
    assert rs.recompute_bn_stats(nn.Linear(2, 2), torch.randn(4, 2)) == {}
    model = nn.Sequential(nn.BatchNorm1d(2))
    with pytest.raises(ValueError, match="no batches"):
        rs.recompute_bn_stats(model, torch.randn(0, 2))
    assert model[0].momentum == 0.1

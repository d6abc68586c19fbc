"""Test-time adaptation (bnlib.adapt): AdaBN, prediction-time BN, the source/target mix, TENT, and exact restoring."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlib import modules
from bnlib.adapt import adabn, entropy, prediction_time_bn, source_target_mix, tent

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BN2D = {"torch": nn.BatchNorm2d, "bnlib": modules.BatchNorm2d}


def make_net(bn="torch", seed=0, dropout=False):
    """conv-BN-ReLU twice, pooled, a linear head; running statistics moved away from their initial values."""
    torch.manual_seed(seed)
    bn2d = BN2D[bn]
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), bn2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, bias=False), bn2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), *([nn.Dropout(0.5)] if dropout else []), nn.Linear(6, 3))
    with torch.no_grad():
        net.train()
        for _ in range(5):
            net(torch.randn(16, 1, 8, 8) * 2 + 1)           # source statistics
        for m in net.modules():
            if isinstance(m, bn2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    net.eval()
    return net


def snapshot(model):
    """Everything preserved_state must bring back: values, flags, gradients."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [(n, p.requires_grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()],
            [m.training for m in model.modules()])


def assert_same(model, snap):
    state, params, modes = snapshot(model)
    assert state.keys() == snap[0].keys()
    for k in state:
        assert torch.equal(state[k], snap[0][k]), k           # bit for bit
    for (n, rg, g), (n0, rg0, g0) in zip(params, snap[1]):
        assert n == n0 and rg == rg0 and ((g is None and g0 is None) or torch.equal(g, g0)), n
    assert modes == snap[2]


def target(n=64, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, 8, 8, generator=g) * 0.5 - 1).to(device)      # shifted: other mean and scale


@pytest.mark.parametrize("bn", sorted(BN2D))
@pytest.mark.parametrize("dev", DEVICES)
def test_adabn_equals_statistics_computed_directly(bn, dev):
    net = make_net(bn).to(dev)
    x = target(device=dev).double()
    net.double()
    conv1, bn1, conv2 = net[0], net[1], net[3]
    # With one batch of all of x: BN1's input is conv1(x); BN2's is conv2(relu(BN1 normalizing x's own batch)).
    h1 = conv1(x)
    h2 = conv2(F.relu(F.batch_norm(h1, None, None, bn1.weight, bn1.bias, True, 0.0, bn1.eps)))
    expected = {}
    for name, h in (("1", h1), ("4", h2)):
        expected[name] = (h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=True))
    snap = snapshot(net)
    with torch.no_grad(), adabn(net, x, batch_size=len(x)) as m:
        assert m is net and not any(mod.training for mod in net.modules())
        for name, (mean, var) in expected.items():
            torch.testing.assert_close(net.get_submodule(name).running_mean, mean, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(net.get_submodule(name).running_var, var, rtol=1e-10, atol=1e-12)
        out = net(x)
    # the output inside the block is plain inference with those statistics
    with torch.no_grad():
        ref = copy.deepcopy(net)
        for name, (mean, var) in expected.items():
            ref.get_submodule(name).running_mean.copy_(mean)
            ref.get_submodule(name).running_var.copy_(var)
        torch.testing.assert_close(out, ref(x), rtol=1e-10, atol=1e-12)
    assert_same(net, snap)


def test_adabn_over_several_batches_is_precise_bn():
    from bnlib.running_stats import recompute_bn_stats
    net, x = make_net(), target(96)
    ref = copy.deepcopy(net)
    recompute_bn_stats(ref, x, batch_size=32)
    with adabn(net, x, batch_size=32):
        for a, b in zip(net.state_dict().values(), ref.state_dict().values()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("bn", sorted(BN2D))
@pytest.mark.parametrize("dev", DEVICES)
def test_prediction_time_bn_uses_the_batch_and_restores(bn, dev):
    net, x = make_net(bn, dropout=True).to(dev), target(device=dev)
    ref = copy.deepcopy(net).train()
    ref[-2].eval()                                               # dropout off
    snap = snapshot(net)
    with torch.no_grad(), prediction_time_bn(net):
        out = net(x)
        assert not net[-2].training                              # dropout stays off
    torch.testing.assert_close(out, ref(x), rtol=0, atol=0)      # training-mode BN, batch statistics
    assert_same(net, snap)


@pytest.mark.parametrize("dev", DEVICES)
def test_mix_at_zero_is_prediction_time_bn_and_at_infinity_the_source(dev):
    net, x = make_net().to(dev), target(device=dev)
    snap = snapshot(net)
    with torch.no_grad():
        source = net(x)
        with prediction_time_bn(net):
            batch = net(x)
        with source_target_mix(net, 0):
            mix0 = net(x)
        with source_target_mix(net, math.inf):
            mix_inf = net(x)
        with source_target_mix(net, 1e12):
            mix_big = net(x)
    torch.testing.assert_close(mix0, batch, rtol=1e-5, atol=1e-5)
    assert torch.equal(mix_inf, source)
    torch.testing.assert_close(mix_big, source, rtol=1e-5, atol=1e-5)
    assert (batch - source).abs().max() > 0.1                    # the shift matters, so the checks above can fail
    assert_same(net, snap)


def test_mix_weights_source_and_batch_by_pseudo_count():
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
        bn.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.1, 0.3]))
    x = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(3)) * 3 + 2
    N, n = 24.0, 8
    var_t, mean_t = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    mean = (N * bn.running_mean + n * mean_t) / (N + n)         # μ = (N μ_s + n μ_t) / (N + n)
    var = (N * bn.running_var + n * var_t) / (N + n)            # σ² = (N σ_s² + n σ_t²) / (N + n)
    expected = (x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + bn.eps) * bn.weight[:, None, None] \
        + bn.bias[:, None, None]
    with torch.no_grad(), source_target_mix(bn, N):
        out = bn(x)
        out_again = bn(x)                                        # the source statistics are not overwritten
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_again, out, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_mean, torch.tensor([1.0, -2.0, 0.5]), rtol=0, atol=0)


def test_mix_keeps_gradients_flowing_to_the_input():
    net, x = make_net(), target().requires_grad_(True)
    with source_target_mix(net, 16):
        net(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("bn", sorted(BN2D))
@pytest.mark.parametrize("dev", DEVICES)
def test_tent_step_equals_a_hand_made_adam_step_on_gamma_beta(bn, dev):
    net, x = make_net(bn).to(dev), target(device=dev)
    ref = copy.deepcopy(net).train()
    bn_params = [p for m in ref.modules() if isinstance(m, BN2D[bn]) for p in (m.weight, m.bias)]
    opt = torch.optim.Adam(bn_params, lr=1e-3, betas=(0.9, 0.999))
    snap = snapshot(net)
    with tent(net) as adapt:
        out = adapt(x)
        x2 = target(seed=2, device=dev)
        out2 = adapt(x2)
        assert adapt.steps == 2 and len(adapt.losses) == 2
        for xb, o in ((x, out), (x2, out2)):
            logits = ref(xb)
            torch.testing.assert_close(o, logits.detach(), rtol=1e-6, atol=1e-6)   # logits before its own step
            loss = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        changed = []
        for (name, p), q in zip(net.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
            if not torch.equal(p, snap[0][name]):
                changed.append(name)
    assert changed == ["1.weight", "1.bias", "4.weight", "4.bias"]   # only γ and β moved
    assert_same(net, snap)


def test_tent_lowers_the_entropy_of_a_repeated_batch():
    net, x = make_net(), target(128)
    with tent(net, lr=5e-2) as adapt:
        for _ in range(30):
            adapt(x)
    assert all(b < a for a, b in zip(adapt.losses, adapt.losses[1:])), adapt.losses
    assert adapt.losses[-1] < 0.9 * adapt.losses[0], adapt.losses


def test_tent_sgd_has_momentum_and_restores_requires_grad_and_grads():
    net, x = make_net(), target()
    net[0].weight.requires_grad_(False)
    net(x).sum().backward()                                      # stale gradients that must come back
    snap = snapshot(net)
    with tent(net, optimizer="sgd", lr=0.01) as adapt:
        assert isinstance(adapt.optimizer, torch.optim.SGD)
        assert adapt.optimizer.param_groups[0]["momentum"] == 0.9
        trained = {id(p) for p in adapt.params}
        assert all(p.requires_grad == (id(p) in trained) for p in net.parameters())
        adapt(x)
    assert_same(net, snap)


def test_restored_even_when_the_block_raises():
    net, x = make_net(), target()
    snap = snapshot(net)
    for ctx in (lambda: tent(net), lambda: prediction_time_bn(net), lambda: source_target_mix(net, 4),
                lambda: adabn(net, x)):
        with pytest.raises(RuntimeError, match="boom"), ctx() as a:
            (a if callable(a) and not isinstance(a, nn.Module) else net)(x)
            raise RuntimeError("boom")
        assert_same(net, snap)


def test_entropy():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(entropy(logits), torch.tensor([math.log(4), 0.0]))
    with pytest.raises(ValueError, match=r"shape \(N, classes\)"):
        entropy(torch.zeros(3))


def test_errors():
    no_bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2))
    for fn, args in ((adabn, (target(),)), (prediction_time_bn, ()), (source_target_mix, (1.0,)), (tent, ())):
        with pytest.raises(ValueError, match="no batch-statistics layers"), fn(no_bn, *args):
            pass
        with pytest.raises(TypeError, match="expects a torch.nn.Module"), fn("net", *args):
            pass
    untracked = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False))
    with pytest.raises(ValueError, match="with running statistics"), source_target_mix(untracked, 1.0):
        pass
    with pytest.raises(ValueError, match="with running statistics"), adabn(untracked, target()):
        pass
    for bad in (-1, float("nan"), "8", True):
        with pytest.raises(ValueError, match="pseudo_count must be a number >= 0"), source_target_mix(make_net(), bad):
            pass
    with pytest.raises(ValueError, match="optimizer must be 'adam' or 'sgd'"), tent(make_net(), optimizer="adamw"):
        pass
    for bad in (0, -1e-3, float("inf")):
        with pytest.raises(ValueError, match="lr must be a finite number > 0"), tent(make_net(), lr=bad):
            pass
    not_affine = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, affine=False))
    with pytest.raises(ValueError, match="affine=False"), tent(not_affine):
        pass
    with pytest.raises(ValueError, match="batch_size must be a positive integer"), adabn(make_net(), target(),
                                                                                          batch_size=0):
        pass

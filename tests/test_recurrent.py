"""Tests of bnlib.recurrent: per-time-step Batch Normalization (Cooijmans et al. 2017)."""

import copy

import pytest
import torch
from torch import nn

from bnlib.recurrent import StepBatchNorm, recompute_step_stats


def test_one_step_is_batchnorm_with_the_buffers_of_that_step():
    torch.manual_seed(0)
    step = StepBatchNorm(4, max_steps=3, gamma_init=0.7)
    ref = nn.BatchNorm1d(4)
    with torch.no_grad():
        ref.weight.fill_(0.7)
    a = torch.randn(6, 4)
    assert torch.allclose(step(a, 1), ref(a), atol=1e-6)
    assert torch.allclose(step.running_mean[1], ref.running_mean)
    assert torch.allclose(step.running_var[1], ref.running_var)
    assert step.steps_tracked.tolist() == [0, 1, 0]
    assert torch.equal(step.running_mean[0], torch.zeros(4))  # other steps untouched


def test_all_steps_at_once_equals_one_call_per_step():
    torch.manual_seed(1)
    x = torch.randn(6, 5, 3)
    mask = torch.rand(6, 5) > 0.3
    for masked in (False, True):
        a = StepBatchNorm(3, max_steps=5, masked=masked)
        b = StepBatchNorm(3, max_steps=5, masked=masked)
        ya = a(x, mask=mask)
        yb = torch.stack([b(x[:, t], t, mask[:, t]) for t in range(5)], 1)
        assert torch.allclose(ya, yb, atol=1e-5)
        assert torch.allclose(a.running_mean, b.running_mean, atol=1e-6)
        assert torch.allclose(a.running_var, b.running_var, atol=1e-6)
        assert torch.equal(a.steps_tracked, b.steps_tracked)
        a.eval()
        b.eval()
        assert torch.allclose(a(x), torch.stack([b(x[:, t], t) for t in range(5)], 1), atol=1e-6)


@pytest.mark.parametrize("padded", [False, True])
def test_all_steps_at_once_has_the_gradients_of_one_call_per_step(padded):
    """Both paths of (N, T, C) training (one BN of (N, T·C) without padding; per-step statistics with it) against
    T calls, one per step: the gradients of x, γ and β, and the running variance."""
    torch.manual_seed(2)
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    mask = (torch.rand(6, 4) > 0.3) if padded else torch.ones(6, 4, dtype=torch.bool)
    mask[:2] = True  # at least two real rows per step
    g = torch.randn(6, 4, 3, dtype=torch.float64)
    grads = []
    for all_at_once in (True, False):
        bn = StepBatchNorm(3, max_steps=4, masked=True, gamma_init=0.8).double()
        xi = x.clone().requires_grad_()
        y = bn(xi, mask=mask) if all_at_once else torch.stack([bn(xi[:, t], t, mask[:, t]) for t in range(4)], 1)
        y.backward(g)
        grads.append((xi.grad, bn.weight.grad, bn.bias.grad, bn.running_var.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_masked_statistics_use_real_rows_only():
    torch.manual_seed(0)
    bn = StepBatchNorm(4, max_steps=3, masked=True, momentum=1.0, gamma_init=1.0)
    a = torch.randn(5, 4)
    mask = torch.tensor([True, True, True, False, False])
    y = bn(a, 1, mask)
    real = a[:3]
    var, mean = torch.var_mean(real, 0, correction=0)
    assert torch.allclose(y[:3], (real - mean) / torch.sqrt(var + bn.eps), atol=1e-5)
    assert torch.allclose(bn.running_mean[1], mean)
    assert torch.allclose(bn.running_var[1], var * 3 / 2)
    naive = StepBatchNorm(4, max_steps=3, masked=False, momentum=1.0)
    naive(a, 1, mask)
    assert torch.allclose(naive.running_mean[1], a.mean(0), atol=1e-6)  # the padded rows count


def test_beyond_the_tracked_steps_reuses_the_last_tracked_step():
    torch.manual_seed(0)
    bn = StepBatchNorm(4, max_steps=3)
    bn(torch.randn(8, 2, 4))  # steps 0 and 1 only
    bn.eval()
    a = torch.randn(5, 4)
    assert bn.stat_step(2) == 1 and bn.stat_step(10) == 1
    assert torch.allclose(bn(a, 2), bn(a, 1))
    long = bn(torch.randn(5, 7, 4))  # 7 steps: 2..6 use step 1's statistics
    assert long.shape == (5, 7, 4)


def test_cooijmans_defaults_and_validation():
    bn = StepBatchNorm(4, max_steps=3, bias=False)
    assert torch.equal(bn.weight, torch.full((4,), 0.1)) and bn.bias is None
    with pytest.raises(ValueError, match="with a step t"):
        bn(torch.randn(5, 4))
    with pytest.raises(ValueError, match="max_steps"):
        StepBatchNorm(4, max_steps=0)


def test_recompute_step_stats_pools_batches_exactly_and_restores_state():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = StepBatchNorm(3, max_steps=4, momentum=0.3)

        def forward(self, x):
            return self.bn(x)

    net = Net().eval()
    x = torch.randn(40, 4, 3) * 2 + 1
    assert recompute_step_stats(net, x, batch_size=10) == 4
    # the statistics of all 40 rows of each step, as recompute_bn_stats pools them (not the average of the four
    # batch variances, which misses the spread of the batch means)
    torch.testing.assert_close(net.bn.running_mean, x.double().mean(0).float())
    torch.testing.assert_close(net.bn.running_var, x.double().var(0).float())
    averaged = torch.stack([x[i:i + 10].var(0) for i in range(0, 40, 10)]).mean(0)
    assert (net.bn.running_var - averaged).abs().max() > 1e-3
    assert net.bn.steps_tracked.tolist() == [4, 4, 4, 4]
    assert net.bn.momentum == 0.3 and not net.training
    with pytest.raises(ValueError, match="batch_size"):
        recompute_step_stats(net, x[:5], batch_size=10)


def test_recompute_step_stats_pools_only_the_real_rows_of_masked_layers():
    """Both ways of calling the layer: step by step ((N, C) and t) and all steps at once ((N, T, C))."""
    torch.manual_seed(1)
    one, every = StepBatchNorm(2, max_steps=3, masked=True), StepBatchNorm(2, max_steps=3, masked=True)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.one, self.every = one, every

        def forward(self, x, lengths):
            mask = torch.arange(x.shape[1])[None, :] < lengths[:, None]  # (N, T): real rows
            return self.every(self.first(x, mask), mask=mask)

        def first(self, x, mask):
            return torch.stack([self.one(x[:, t], t, mask[:, t]) for t in range(x.shape[1])], 1)

    x = torch.randn(12, 3, 2) * 3 + 2
    lengths = torch.tensor([3, 1, 2] * 4)
    net = Net()
    mask = torch.arange(3)[None, :] < lengths[:, None]
    with torch.no_grad():  # what `every` sees in training, batch by batch
        y_train = torch.cat([copy.deepcopy(net).train().first(x[i:i + 6], mask[i:i + 6]) for i in (0, 6)])
    assert recompute_step_stats(net.eval(), x, lengths, batch_size=6) == 2
    for t in range(3):
        real = lengths > t
        for layer, inputs in ((one, x), (every, y_train.detach())):
            values = inputs[:, t][real].double()
            torch.testing.assert_close(layer.running_mean[t], values.mean(0).float())
            torch.testing.assert_close(layer.running_var[t], values.var(0).float())
    assert one.steps_tracked.tolist() == every.steps_tracked.tolist() == [2, 2, 2]


def test_masked_and_plain_statistics_agree_exactly_without_padding():
    torch.manual_seed(0)
    x = torch.randn(32, 4) * 1e-3  # small variance: where two computations would round differently
    mask = torch.ones(32, dtype=torch.bool)
    plain, masked = StepBatchNorm(4, max_steps=2), StepBatchNorm(4, max_steps=2, masked=True)
    assert torch.equal(plain(x, 0), masked(x, 0, mask))
    assert torch.equal(plain.running_var, masked.running_var) and torch.equal(plain.running_mean, masked.running_mean)

"""bnlib.running_stats.bias_corrected: a moving average without its initial value."""

import pytest
import torch
from torch import nn

from bnlib import running_stats as rs


@pytest.mark.parametrize("initial", [0.0, 1.0, 5.0])
@pytest.mark.parametrize("momentum", [0.01, 0.1, 1.0])
def test_equals_the_weighted_mean_of_the_batch_values(initial, momentum):
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(40, 3, generator=gen, dtype=torch.float64) * 2 + 3
    running = torch.full((3,), initial, dtype=torch.float64)
    for k, b in enumerate(values, start=1):
        rs.ema_update(running, b, momentum)
        w = momentum * (1 - momentum) ** torch.arange(k - 1, -1, -1, dtype=torch.float64)  # α(1−α)^(t−j)
        expected = (w[:, None] * values[:k]).sum(0) / w.sum()
        got = rs.bias_corrected(running, momentum, k, initial=initial)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_constant_stream_is_exact_from_the_first_step():
    running = torch.zeros(2)
    for t in range(1, 6):
        rs.ema_update(running, torch.tensor([2.0, -1.0]), 0.01)
        torch.testing.assert_close(rs.bias_corrected(running, 0.01, t), torch.tensor([2.0, -1.0]))
        assert running.abs().max() < 0.1  # while the raw average is still near its initial 0


def test_torch_layer_running_var_with_initial_one():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3, momentum=0.05).double()
    batch_vars = []
    for _ in range(7):
        x = torch.randn(16, 3, dtype=torch.float64) * 3
        bn(x)
        batch_vars.append(x.var(0))  # torch.nn averages the unbiased batch variance
    w = 0.05 * 0.95 ** torch.arange(6, -1, -1, dtype=torch.float64)
    expected = (w[:, None] * torch.stack(batch_vars)).sum(0) / w.sum()
    torch.testing.assert_close(rs.bias_corrected(bn.running_var, 0.05, 7, initial=1.0), expected)
    before = bn.running_var.clone()
    rs.bias_corrected(bn.running_var, 0.05, 7, initial=torch.ones(3, dtype=torch.float64))
    assert torch.equal(bn.running_var, before)  # not changed in place


@pytest.mark.parametrize("momentum", [0.0, -0.1, 1.5, None])
def test_bad_momentum(momentum):
    with pytest.raises(ValueError, match="momentum in \\(0, 1\\]"):
        rs.bias_corrected(torch.zeros(2), momentum, 3)


@pytest.mark.parametrize("steps", [0, -1, 2.0, True])
def test_bad_steps(steps):
    with pytest.raises(ValueError, match="positive integer"):
        rs.bias_corrected(torch.zeros(2), 0.1, steps)

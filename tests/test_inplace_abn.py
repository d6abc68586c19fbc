"""In-Place ABN against the pair it replaces: torch.nn's BatchNorm followed by a leaky ReLU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnlib
from bnlib.inplace_abn import InPlaceABN

SHAPES = {1: (16, 6), 2: (8, 6, 5, 4), 3: (4, 6, 3, 4, 5)}
TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _pair_and_abn(rank: int, slope: float = 0.01, momentum: float | None = 0.1, dtype=torch.float32):
    torch.manual_seed(rank)
    bn = TORCH_BN[rank](6, momentum=momentum, dtype=dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5).mul_(torch.tensor([1, -1, 1, -1, 1, 1], dtype=dtype))
        bn.bias.uniform_(-0.5, 0.5)
    abn = InPlaceABN(6, negative_slope=slope, momentum=momentum, dtype=dtype)
    abn.load_state_dict(bn.state_dict())  # torch.nn's state_dict loads unchanged
    return bn, abn


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("slope", [0.01, 0.3])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_equals_batchnorm_then_leaky_relu(rank, slope, momentum):
    bn, abn = _pair_and_abn(rank, slope, momentum)
    for _step in range(3):  # three training steps: outputs, gradients and running statistics
        x = (torch.randn(SHAPES[rank]) * 3 + 2).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        g = torch.randn(SHAPES[rank])
        ref = F.leaky_relu(bn(x), slope)
        out = abn(x2)
        torch.testing.assert_close(out, ref)
        ref.backward(g)
        out.backward(g)
        torch.testing.assert_close(x2.grad, x.grad)
        torch.testing.assert_close(abn.weight.grad, bn.weight.grad)
        torch.testing.assert_close(abn.bias.grad, bn.bias.grad)
        assert not abn.last_step_kept_xhat
    torch.testing.assert_close(abn.running_mean, bn.running_mean)
    torch.testing.assert_close(abn.running_var, bn.running_var)
    assert abn.num_batches_tracked.item() == bn.num_batches_tracked.item() == 3
    bn.eval()
    abn.eval()
    x = torch.randn(SHAPES[rank])
    torch.testing.assert_close(abn(x), F.leaky_relu(bn(x), slope))


def test_channels_last_input():
    bn, abn = _pair_and_abn(2)
    x = torch.randn(8, 6, 5, 4).to(memory_format=torch.channels_last).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(8, 6, 5, 4)
    ref = F.leaky_relu(bn(x), 0.01)
    out = abn(x2)
    torch.testing.assert_close(out, ref)
    ref.backward(g)
    out.backward(g)
    torch.testing.assert_close(x2.grad, x.grad)


def test_gradcheck_float64():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    abn = InPlaceABN(3, negative_slope=0.2, dtype=torch.float64)
    with torch.no_grad():
        abn.weight.copy_(torch.tensor([0.7, -1.3, 2.0]))
        abn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    assert torch.autograd.gradcheck(lambda x, w, b: bnlib.inplace_abn.InPlaceABNFunction.apply(
        x, w, b, 1e-5, 0.2, False)[0], (x, abn.weight, abn.bias))


def test_only_the_output_is_kept_for_the_backward():
    """The pair keeps two full-size tensors (BN's input, the activation's input); In-Place ABN keeps one."""
    def full_size_saved(fn, x):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x)
        return sum(1 for n in sizes if n == x.numel())

    bn, abn = _pair_and_abn(2)
    x = torch.randn(8, 6, 5, 4, requires_grad=True)
    assert full_size_saved(lambda t: F.leaky_relu(bn(t), 0.01), x) == 2
    assert full_size_saved(abn, x) == 1


def test_tiny_gamma_keeps_xhat_and_stays_exact():
    bn, abn = _pair_and_abn(2)
    with torch.no_grad():
        for m in (bn, abn):
            m.weight[2] = 0.0     # γ = 0: the output says nothing about x̂ in that channel
    x = torch.randn(8, 6, 5, 4, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(8, 6, 5, 4)
    F.leaky_relu(bn(x), 0.01).backward(g)
    abn(x2).backward(g)
    assert abn.last_step_kept_xhat
    torch.testing.assert_close(abn.weight.grad, bn.weight.grad)
    torch.testing.assert_close(x2.grad, x.grad)


def test_refuses_a_non_invertible_activation_and_bad_input():
    with pytest.raises(ValueError, match="negative_slope > 0.*ReLU"):
        InPlaceABN(4, negative_slope=0.0)
    with pytest.raises(ValueError, match="negative_slope > 0"):
        InPlaceABN(4, negative_slope=-0.1)
    abn = InPlaceABN(4)
    with pytest.raises(ValueError, match="expected an \\(N, C\\)"):
        abn(torch.randn(4))
    with pytest.raises(ValueError, match="expected input with 4 channels"):
        abn(torch.randn(8, 3))
    with pytest.raises(ValueError):
        abn(torch.randn(1, 4))          # one value per channel in training, as every BN layer refuses


def test_empty_batch_like_the_pair():
    bn, abn = _pair_and_abn(2)
    x = torch.randn(0, 6, 5, 4)
    assert abn(x).shape == F.leaky_relu(bn(x), 0.01).shape
    torch.testing.assert_close(abn.running_mean, bn.running_mean)
    assert abn.num_batches_tracked.item() == bn.num_batches_tracked.item()


def test_half_precision_input():
    bn, abn = _pair_and_abn(2)
    x = torch.randn(8, 6, 5, 4).to(torch.bfloat16)
    torch.testing.assert_close(abn(x), F.leaky_relu(bn(x.float()), 0.01).to(torch.bfloat16), atol=2e-2, rtol=2e-2)

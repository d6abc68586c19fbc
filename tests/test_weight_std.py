"""Scaled weight standardization against a direct computation: outputs, gradients, gains, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bnlib import ScaledStdConv2d, ScaledStdLinear
from bnlib.weight_std import nonlinearity_gain, scaled_standardize


def _direct(w: torch.Tensor, gain: torch.Tensor, gamma: float, eps: float) -> torch.Tensor:
    """Ŵ unit by unit, in float64, with the loops written out."""
    out = torch.empty_like(w, dtype=torch.float64)
    for i in range(w.shape[0]):
        row = w[i].double().flatten()
        n = row.numel()
        mu = row.sum() / n
        var = ((row - mu) ** 2).sum() / n
        out[i] = (gain[i].double() * gamma * (row - mu) / math.sqrt(max(n * float(var), eps))).reshape(w[i].shape)
    return out


def test_relu_gain_is_the_analytic_value():
    assert nonlinearity_gain("relu") == pytest.approx(math.sqrt(2.0) / math.sqrt(1.0 - 1.0 / math.pi), rel=1e-9)
    assert nonlinearity_gain("linear") == pytest.approx(1.0, rel=1e-9)
    assert nonlinearity_gain("ReLU") == nonlinearity_gain("relu")
    assert nonlinearity_gain(2.5) == 2.5


@pytest.mark.parametrize("name", ["relu", "gelu", "tanh", "sigmoid", "silu"])
def test_gain_restores_unit_variance_of_a_sampled_nonlinearity(name):
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    phi = {"relu": torch.relu, "gelu": F.gelu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "silu": F.silu}[name]
    # The standard error of a variance from 2e6 normal draws is ~0.1 %; 1 % can fail.
    assert float((nonlinearity_gain(name) * phi(z)).var()) == pytest.approx(1.0, rel=0.01)


@pytest.mark.parametrize("eps", [1e-4, 0.0, 10.0])
def test_linear_matches_direct_computation_outputs_and_gradients(eps):
    torch.manual_seed(0)
    layer = ScaledStdLinear(7, 5, nonlinearity="relu", eps=eps).double()
    with torch.no_grad():
        layer.gain.copy_(torch.linspace(0.5, 2.0, 5))
    x = torch.randn(4, 7, dtype=torch.float64)
    w = layer.weight.detach().clone().requires_grad_(True)
    g = layer.gain.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    what = _direct(w.detach(), g.detach(), nonlinearity_gain("relu"), eps)
    torch.testing.assert_close(layer.standardized_weight(), what)
    y = layer(x)
    torch.testing.assert_close(y, x @ what.T + b.detach())

    # Gradients: the same formula in differentiable tensor operations, against autograd through the layer.
    grad_out = torch.randn_like(y)
    (y * grad_out).sum().backward()
    mu = w.mean(1, keepdim=True)
    var = ((w - mu) ** 2).mean(1, keepdim=True)
    w_hat = g[:, None] * nonlinearity_gain("relu") * (w - mu) / torch.sqrt(torch.clamp(7 * var, min=eps))
    ((x @ w_hat.T + b) * grad_out).sum().backward()
    torch.testing.assert_close(layer.weight.grad, w.grad)
    torch.testing.assert_close(layer.gain.grad, g.grad)
    torch.testing.assert_close(layer.bias.grad, b.grad)


def test_linear_gradients_pass_gradcheck():
    torch.manual_seed(1)
    layer = ScaledStdLinear(6, 3, nonlinearity="gelu").double()
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    w, g, b = (nn.Parameter(p.detach().clone()) for p in (layer.weight, layer.gain, layer.bias))

    def f(x, w, g, b):
        return F.linear(x, scaled_standardize(w, g, layer.gamma, layer.eps), b)

    assert torch.autograd.gradcheck(f, (x, w, g, b))


@pytest.mark.parametrize("groups,stride,padding", [(1, 1, 1), (2, 2, 0)])
def test_conv_matches_direct_computation(groups, stride, padding):
    torch.manual_seed(2)
    conv = ScaledStdConv2d(4, 6, 3, stride=stride, padding=padding, groups=groups, nonlinearity="linear").double()
    with torch.no_grad():
        conv.gain.uniform_(0.5, 1.5)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64, requires_grad=True)
    what = _direct(conv.weight.detach(), conv.gain.detach(), 1.0, conv.eps)
    assert conv.weight[0].numel() == (4 // groups) * 9  # fan-in per filter
    torch.testing.assert_close(conv.standardized_weight(), what)
    y = conv(x)
    torch.testing.assert_close(y, F.conv2d(x, what, conv.bias, stride=stride, padding=padding, groups=groups))
    # Autograd through the layer against numerical gradients.
    assert torch.autograd.gradcheck(lambda inp: conv(inp), (x,))


def test_standardized_rows_have_zero_mean_and_the_planned_norm():
    torch.manual_seed(3)
    conv = ScaledStdConv2d(8, 16, 3, nonlinearity="relu")
    with torch.no_grad():
        conv.weight.mul_(37.0).add_(5.0)  # the raw scale and offset do not matter
    w = conv.standardized_weight().flatten(1)
    torch.testing.assert_close(w.mean(1), torch.zeros(16), atol=1e-6, rtol=0)
    torch.testing.assert_close((w ** 2).sum(1), torch.full((16,), nonlinearity_gain("relu") ** 2))


def test_relu_network_keeps_unit_variance_at_initialization():
    torch.manual_seed(4)
    h = torch.randn(4096, 512)
    with torch.no_grad():
        for _ in range(10):
            h = ScaledStdLinear(512, 512, nonlinearity="relu")(torch.relu(h))
    # Ten layers without any normalization of the activations: variance 1 within 10 % (5 % std of a unit's
    # variance over rows; drift would compound over layers).
    assert float(h.var(0).mean()) == pytest.approx(1.0, rel=0.1)


def test_state_dict_and_parameters():
    layer = ScaledStdLinear(3, 2)
    assert set(layer.state_dict()) == {"weight", "bias", "gain"}
    assert torch.equal(layer.gain, torch.ones(2))
    assert "nonlinearity='relu'" in repr(layer)
    conv = ScaledStdConv2d(3, 2, 3, bias=False)
    assert set(conv.state_dict()) == {"weight", "gain"}


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        ScaledStdLinear(3, 2, eps=-1e-4)
    with pytest.raises(ValueError, match="eps must be finite"):
        ScaledStdConv2d(3, 2, 3, eps=float("nan"))
    with pytest.raises(TypeError, match="eps must be a number"):
        ScaledStdLinear(3, 2, eps="small")
    with pytest.raises(ValueError, match="unknown nonlinearity 'swish'; valid names"):
        ScaledStdLinear(3, 2, nonlinearity="swish")
    with pytest.raises(ValueError, match="positive and finite"):
        ScaledStdLinear(3, 2, nonlinearity=-1.0)
    with pytest.raises(TypeError, match="a name or a positive number"):
        ScaledStdLinear(3, 2, nonlinearity=None)
    with pytest.raises(ValueError, match="fan-in of at least 2"):
        ScaledStdLinear(1, 4)
    with pytest.raises(ValueError, match="fan-in of at least 2"):
        ScaledStdConv2d(1, 4, 1)
    with pytest.raises(ValueError, match="one per output unit"):
        scaled_standardize(torch.randn(3, 4), torch.ones(4))
    with pytest.raises(ValueError, match="output dimension"):
        scaled_standardize(torch.randn(3))


def test_equal_weights_do_not_divide_by_zero():
    layer = ScaledStdLinear(4, 2)
    with torch.no_grad():
        layer.weight.fill_(0.3)
    w = layer.standardized_weight()
    assert torch.isfinite(w).all() and torch.equal(w, torch.zeros(2, 4))

"""bnlib.closed_form (the formulas line by line) against bnlib.fast (the tuned default): the same numbers.

Outputs, input and parameter gradients, running statistics and memory formats, for float32, float64 and the
half-precision dtypes, channels-last maps, the empty batch, large offsets and double backward; and the switch
``bnlib.functional.use_closed_form`` that selects the plain one.
"""

from __future__ import annotations

import pytest
import torch

import bnlib
from bnlib import closed_form, fast, functional

SHAPES = [(16, 5), (8, 3, 7), (4, 3, 6, 5), (2, 3, 4, 3, 2)]
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3),
       torch.bfloat16: (2e-2, 2e-2)}


def _run(x, g, layer, plain):
    xi = x.clone().requires_grad_()
    if plain:
        with functional.use_closed_form():
            y = layer(xi)
    else:
        y = layer(xi)
    y.backward(g)
    return y, xi.grad, layer.weight.grad, layer.bias.grad, layer.running_mean, layer.running_var


def _layer(x, momentum=0.1):
    cls = {2: bnlib.BatchNorm1d, 3: bnlib.BatchNorm1d, 4: bnlib.BatchNorm2d, 5: bnlib.BatchNorm3d}[x.dim()]
    layer = cls(x.shape[1], momentum=momentum).to(torch.float32 if x.dtype in (torch.float16, torch.bfloat16)
                                                  else x.dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, x.shape[1]))
        layer.bias.copy_(torch.linspace(-1, 1, x.shape[1]))
    return layer


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_plain_and_tuned_agree(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 3).to(dtype)
    g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    rtol, atol = TOL[dtype]
    for momentum in (0.1, None):
        tuned = _run(x, g, _layer(x, momentum), plain=False)
        plain = _run(x, g, _layer(x, momentum), plain=True)
        for a, b in zip(tuned, plain):
            assert a.dtype == b.dtype
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol)
        assert tuned[0].is_contiguous() and plain[0].is_contiguous()


@pytest.mark.parametrize("shape", [(4, 3, 6, 5), (2, 3, 4, 3, 2)], ids=str)
def test_channels_last(shape):
    gen = torch.Generator().manual_seed(1)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(memory_format=fmt)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    tuned, plain = _run(x, g, _layer(x), plain=False), _run(x, g, _layer(x), plain=True)
    for a, b in zip(tuned, plain):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert plain[0].is_contiguous(memory_format=fmt) and tuned[0].is_contiguous(memory_format=fmt)


def test_empty_batch():
    for plain in (False, True):
        x = torch.randn(0, 3, 4)
        layer = _layer(x)
        y, *_ = _run(x, torch.randn(0, 3, 4), layer, plain)
        assert y.shape == (0, 3, 4)
        assert torch.equal(layer.running_mean, torch.zeros(3)) and torch.equal(layer.running_var, torch.ones(3))
        assert torch.equal(layer.weight.grad, torch.zeros(3))


@pytest.mark.parametrize("shape", [(256, 4), (16, 4, 6, 6)], ids=str)
def test_large_offset(shape):
    """x = 1e3 + 0.01·noise in float32: both keep the rounding of the mean out of the output and the gradient."""
    gen = torch.Generator().manual_seed(3)
    x = (1e3 + 0.01 * torch.randn(shape, generator=gen, dtype=torch.float64)).float()
    g = torch.randn(shape, generator=gen)
    xe = x.double().requires_grad_()
    ye = torch.nn.functional.batch_norm(xe, None, None, training=True)
    ye.backward(g.double())
    for fn in (closed_form.BatchNormFunction, fast.BatchNormFunction):
        xi = x.clone().requires_grad_()
        y, mean, var = fn.apply(xi, None, None, 1e-5)
        y.backward(g)
        assert (y.double() - ye).abs().max() < 1e-3
        assert (xi.grad.double() - xe.grad).norm() / xe.grad.norm() < 1e-3
        dims = [d for d in range(x.dim()) if d != 1]
        assert abs(var.double() / x.double().var(dim=dims, correction=0) - 1).max() < 1e-3


def test_double_backward_and_gradcheck():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: closed_form.BatchNormFunction.apply(*a, 1e-5)[0], (x, w, b))
    assert torch.autograd.gradgradcheck(lambda *a: closed_form.BatchNormFunction.apply(*a, 1e-5)[0], (x, w, b))
    grads = []
    for fn in (closed_form.BatchNormFunction, fast.BatchNormFunction):
        y = fn.apply(x, w, b, 1e-5)[0]
        (gx,) = torch.autograd.grad((y ** 3).sum(), x, create_graph=True)
        grads.append(torch.autograd.grad(gx.pow(2).sum(), (x, w)))
    for a, b_ in zip(*grads):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-12)


def test_use_closed_form_selects_the_plain_function_and_nests():
    """Inside the block the plain Function records the graph; outside (and after an error) the tuned one."""
    x = torch.randn(8, 3, requires_grad=True)

    def function():
        return functional.batch_norm(x, None, None, training=True).grad_fn._forward_cls

    assert function() is fast.BatchNormFunction and functional._plain == [False]
    with functional.use_closed_form():
        with functional.use_closed_form():
            assert function() is closed_form.BatchNormFunction
        assert function() is closed_form.BatchNormFunction
        layer = bnlib.BatchNorm2d(3)
        assert layer(torch.randn(4, 3, 2, 2, requires_grad=True)).grad_fn._forward_cls is closed_form.BatchNormFunction
    assert function() is fast.BatchNormFunction
    with pytest.raises(RuntimeError), functional.use_closed_form():
        raise RuntimeError
    assert function() is fast.BatchNormFunction

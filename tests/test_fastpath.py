"""bnlib's BatchNorm fast path: torch.compile without a graph break, every layout and size against torch.nn, and no
native batch-norm kernel."""

from __future__ import annotations

import pytest
import torch

import bnlib


def test_compile_fullgraph_matches_eager():
    """Inductor on the CPU (needs a C++ compiler) traces BatchNormFunction whole, forward and backward."""
    torch._dynamo.reset()
    eager, compiled_layer = bnlib.BatchNorm2d(3), bnlib.BatchNorm2d(3)
    compiled = torch.compile(compiled_layer, fullgraph=True)  # fullgraph: a graph break is an error
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=gen) * 3 + 2
    g = torch.randn(4, 3, 5, 5, generator=gen)
    grads = []
    for layer in (eager, compiled):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(g)
        grads.append((y.detach(), xi.grad, compiled_layer.weight.grad if layer is compiled else eager.weight.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_layer.running_mean, eager.running_mean)
    torch.testing.assert_close(compiled_layer.running_var, eager.running_var)
    assert int(compiled_layer.num_batches_tracked) == int(eager.num_batches_tracked) == 1


# The fast path's layouts and sizes: small inputs take temporaries, large ones work in place (functional._is_small),
# contiguous maps are reduced row by row (functional._rows); every combination must agree with torch.nn.
LAYOUTS = {
    "small (N, C)": lambda gen: torch.randn(60, 7, generator=gen, dtype=torch.float64),
    "large (N, C)": lambda gen: torch.randn(4096, 7, generator=gen, dtype=torch.float64),
    "small maps": lambda gen: torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64),
    "large maps": lambda gen: torch.randn(16, 3, 32, 32, generator=gen, dtype=torch.float64),
    "large channels-last": lambda gen: torch.randn(16, 3, 32, 32, generator=gen, dtype=torch.float64).to(
        memory_format=torch.channels_last),
    "large transposed (N, C)": lambda gen: torch.randn(7, 4096, generator=gen, dtype=torch.float64).t(),
}


def _pair(C, ndim):
    ours = (bnlib.BatchNorm1d if ndim == 2 else bnlib.BatchNorm2d)(C).double()
    theirs = (torch.nn.BatchNorm1d if ndim == 2 else torch.nn.BatchNorm2d)(C).double()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_and_size_matches_torch(layout):
    gen = torch.Generator().manual_seed(0)
    x = LAYOUTS[layout](gen) * 3 + 5
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    ours, theirs = _pair(x.shape[1], x.dim())
    results = []
    for layer in (ours, theirs):
        for _ in range(2):  # two steps: running statistics too
            xi = x.clone(memory_format=torch.preserve_format).requires_grad_()
            y = layer(xi)
            y.backward(g)
        results.append((y, xi.grad, layer.weight.grad, layer.bias.grad, layer.running_mean, layer.running_var))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert results[0][0].stride() == results[1][0].stride()  # torch.nn's memory format


def test_output_may_be_changed_in_place():
    """y is handed over (ReLU(inplace=True) after BN, as in ResNets): the backward must not depend on it."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, 6, 6, generator=gen, dtype=torch.float64)
    grads = []
    for layer in _pair(4, 4):
        xi = x.clone().requires_grad_()
        torch.relu_(layer(xi)).pow(2).sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-10)


def test_no_native_batch_norm_kernel_is_called():
    """bnlib computes BN itself: no aten batch-norm operator runs in a training or evaluation step."""
    from torch.profiler import profile

    layer = bnlib.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    with profile() as prof:
        layer(x).sum().backward()
        layer.eval()
        layer(x)
    names = {e.name for e in prof.events()}
    assert not [n for n in names if "batch_norm" in n.lower()], sorted(names)

"""bnlib's BatchNorm fast path: torch.compile without a graph break, every layout and size against torch.nn, and no
native batch-norm kernel."""

from __future__ import annotations

import pytest
import torch

import bnlib


@pytest.mark.recent_torch
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


# The fast path's layouts and sizes: inputs below 4 MiB keep x − μ for the backward, larger ones work in place
# (fast._keeps_centred); large buffers come from NumPy's allocator (fast._empty); contiguous maps are
# reduced row by row (fast._rows), wide (N, C) inputs by a matrix-vector product (fast._columns).
# Every combination must agree with torch.nn; the thresholds are lowered here so that small tensors take every path.
LAYOUTS = {
    "small (N, C)": lambda gen: torch.randn(60, 7, generator=gen, dtype=torch.float64),
    "large (N, C)": lambda gen: torch.randn(4096, 7, generator=gen, dtype=torch.float64),
    "small maps": lambda gen: torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64),
    "large maps": lambda gen: torch.randn(16, 3, 32, 32, generator=gen, dtype=torch.float64),
    "large channels-last": lambda gen: torch.randn(16, 3, 32, 32, generator=gen, dtype=torch.float64).to(
        memory_format=torch.channels_last),
    "large transposed (N, C)": lambda gen: torch.randn(7, 4096, generator=gen, dtype=torch.float64).t(),
    "wide (N, C)": lambda gen: torch.randn(33, 600, generator=gen, dtype=torch.float64),
    "wide transposed (N, C)": lambda gen: torch.randn(600, 33, generator=gen, dtype=torch.float64).t(),
}
PATHS = {"as shipped": {}, "in place, NumPy buffers": {"KEEP_CENTRED_BYTES": 0, "LARGE_BUFFER_BYTES": 0}}


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Run the test with the thresholds of bnlib.fast as shipped, then with every input "large"."""
    for name, value in PATHS[request.param].items():
        monkeypatch.setattr(bnlib.fast, name, value)
    return request.param


def _pair(C, ndim):
    ours = (bnlib.BatchNorm1d if ndim == 2 else bnlib.BatchNorm2d)(C).double()
    theirs = (torch.nn.BatchNorm1d if ndim == 2 else torch.nn.BatchNorm2d)(C).double()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_and_size_matches_torch(layout, path):
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


@pytest.mark.parametrize("shape", [(60, 7), (8, 4, 6, 6)])
def test_graph_can_be_run_twice_and_gradients_may_be_expanded(shape, path):
    """retain_graph=True: a second backward through the same graph gives the same gradients (the forward's saved
    tensors are read, not overwritten); and a gradient with zero strides (from ``y.sum()``) is handled."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 5
    ours, theirs = _pair(shape[1], len(shape))
    xi, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, yt = ours(xi), theirs(xt)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    first = torch.autograd.grad(y, xi, g, retain_graph=True)[0]
    second = torch.autograd.grad(y, xi, g, retain_graph=True)[0]
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    torch.testing.assert_close(first, torch.autograd.grad(yt, xt, g, retain_graph=True)[0], rtol=1e-9, atol=1e-10)
    expanded = torch.autograd.grad((y * 2).sum(), xi)[0]  # ∂/∂y is an expanded scalar
    torch.testing.assert_close(expanded, torch.autograd.grad((yt * 2).sum(), xt)[0], rtol=1e-9, atol=1e-9)


def test_float16_input_on_every_path(path):
    """Half-precision input, normalized in float32 and returned in float16, on both paths."""
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(16, 3, 8, 8, generator=gen) * 2 + 7).half()
    ours, theirs = bnlib.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    xi, xt = x.clone().requires_grad_(), x.float().requires_grad_()
    y, yt = ours(xi), theirs(xt)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), yt, rtol=2e-3, atol=2e-3)
    g = torch.randn(x.shape, generator=gen)
    y.backward(g.half())
    yt.backward(g)
    torch.testing.assert_close(xi.grad.float(), xt.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_output_may_be_changed_in_place(path):
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


@pytest.mark.parametrize("shape", [(256, 4), (16, 4, 6, 6)])
def test_large_offset_is_exact_on_every_path(shape, path):
    """x = 1e3 + 0.01·noise in float32: the rounding of the mean (an ulp of 1e3 is 6e-5, 0.6 % of σ) must not reach
    the output or the gradient, whether x − μ is kept (δ folded in) or recomputed (δ in the formulas)."""
    gen = torch.Generator().manual_seed(3)
    x = (1e3 + 0.01 * torch.randn(shape, generator=gen, dtype=torch.float64)).float()
    g = torch.randn(shape, generator=gen)
    xi, xe = x.clone().requires_grad_(), x.double().requires_grad_()
    y = bnlib.functional.batch_norm(xi, None, None, training=True)
    ye = torch.nn.functional.batch_norm(xe, None, None, training=True)
    assert (y.double() - ye).abs().max() < 1e-3
    y.backward(g)
    ye.backward(g.double())
    assert (xi.grad.double() - xe.grad).norm() / xe.grad.norm() < 1e-3

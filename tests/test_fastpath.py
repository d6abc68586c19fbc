"""torch.compile(bnlib.BatchNorm2d(C), fullgraph=True): one graph, no break, same numbers as eager (issue 16)."""

from __future__ import annotations

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

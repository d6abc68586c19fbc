"""bnlib's BatchNorm as a drop-in for torch.nn's (2.13) at the edges: empty batches, eps, TorchScript, ±inf.

Every expected value here comes from running torch.nn on the same input, never from a constant.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import bnlib
from bnlib import functional as bnf

# torch 2.13 deprecates TorchScript but still ships it; bnlib keeps it working as torch.nn does.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")

KINDS = {
    1: (bnlib.BatchNorm1d, nn.BatchNorm1d),
    2: (bnlib.BatchNorm1d, nn.BatchNorm1d),
    3: (bnlib.BatchNorm1d, nn.BatchNorm1d),
    4: (bnlib.BatchNorm2d, nn.BatchNorm2d),
    5: (bnlib.BatchNorm3d, nn.BatchNorm3d),
}
FLAGS = [{}, {"momentum": None}, {"affine": False}, {"bias": False}, {"track_running_stats": False}]


def pair(ndim: int, **kwargs) -> tuple[nn.Module, nn.Module]:
    """A bnlib layer and a torch.nn layer with the same random parameters and running statistics, float64."""
    ours_cls, theirs_cls = KINDS[ndim]
    ours, theirs = ours_cls(3, **kwargs).double(), theirs_cls(3, **kwargs).double()
    gen = torch.Generator().manual_seed(ndim)
    with torch.no_grad():
        for t in ours.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) + 0.5)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def assert_same_state(ours: nn.Module, theirs: nn.Module) -> None:
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=0, equal_nan=True, msg=f"state_dict[{k!r}] differs")


def forward_backward(layer: nn.Module, x: torch.Tensor, g: torch.Tensor):
    """Output, input gradient and parameter gradients of one forward + backward."""
    layer.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    y = layer(xi)
    y.backward(g)
    return y.detach(), xi.grad, [p.grad for p in layer.parameters()]


@pytest.mark.recent_torch
@pytest.mark.parametrize("flags", FLAGS, ids=str)
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (2, 3, 0), (0, 3, 2, 2), (2, 3, 0, 4), (0, 3, 1, 2, 2)])
def test_empty_batch_in_training_matches_torch(shape, flags):
    """An empty batch: empty output, running statistics untouched, the batch still counted, zero gradients."""
    ours, theirs = pair(len(shape), **flags)
    ours.train(), theirs.train()
    x, g = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    y1, gx1, gp1 = forward_backward(ours, x, g)
    y2, gx2, gp2 = forward_backward(theirs, x, g)
    assert y1.shape == y2.shape == x.shape and y1.dtype == y2.dtype
    assert gx1.shape == gx2.shape == x.shape
    for a, b in zip(gp1, gp2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # torch.nn: zeros
    assert_same_state(ours, theirs)  # including num_batches_tracked
    # The next, non-empty batch gets the same weight in the running averages (momentum=None counts batches).
    full = (4,) + tuple(max(s, 2) for s in shape[1:])
    x, g = torch.randn(full, dtype=torch.float64), torch.randn(full, dtype=torch.float64)
    for a, b in zip(forward_backward(ours, x, g)[:2], forward_backward(theirs, x, g)[:2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert_same_state(ours, theirs)


def test_empty_batch_functional_leaves_running_statistics_untouched():
    mean, var = torch.rand(3), torch.rand(3) + 1
    ours_mean, ours_var = mean.clone(), var.clone()
    y = bnf.batch_norm(torch.randn(0, 3, 5), ours_mean, ours_var, training=True)
    expected = nn.functional.batch_norm(torch.randn(0, 3, 5), mean, var, training=True)
    assert y.shape == expected.shape
    assert torch.equal(ours_mean, mean) and torch.equal(ours_var, var)


@pytest.mark.recent_torch
@pytest.mark.parametrize("eps", [0.0, -1e-5, -1.0])
@pytest.mark.parametrize("training", [True, False])
def test_eps_is_checked_like_torch(eps, training):
    """torch.nn 2.13 builds the layer with any eps; the forward raises ValueError "eps must be positive" in
    training (eps <= 0) and "eps must be non-negative" in evaluation (eps < 0)."""
    ours, theirs = bnlib.BatchNorm2d(3, eps=eps), nn.BatchNorm2d(3, eps=eps)  # both build
    ours.train(training), theirs.train(training)
    x = torch.randn(4, 3, 2, 2)
    try:
        expected = theirs(x)
    except ValueError as error:
        phrase = "eps must be positive" if "positive" in str(error) else "eps must be non-negative"
        assert phrase in str(error)
        with pytest.raises(ValueError, match=phrase):
            ours(x)
        with pytest.raises(ValueError, match=phrase):
            bnf.batch_norm(x, ours.running_mean, ours.running_var, training=training, eps=eps)
        assert int(ours.num_batches_tracked) == 0  # a refused batch is not counted
    else:
        torch.testing.assert_close(ours(x), expected)


@pytest.mark.recent_torch
@pytest.mark.parametrize("flags", FLAGS, ids=str)
@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
def test_torchscript_module_matches_eager(ndim, flags):
    """torch.jit.script compiles the layer; outputs, gradients and running statistics equal the eager layer's."""
    eager, theirs = pair(ndim, **flags)
    scripted = torch.jit.script(pair(ndim, **flags)[0])
    gen = torch.Generator().manual_seed(0)
    shape = (4, 3) + (3,) * (ndim - 2)
    for mode in ["train", "train", "eval", "train"]:
        eager.train(mode == "train"), scripted.train(mode == "train"), theirs.train(mode == "train")
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        ours, script, torch_nn = (forward_backward(m, x, g) for m in (eager, scripted, theirs))
        for a, b, c in zip(ours[:2] + tuple(ours[2]), script[:2] + tuple(script[2]),
                           torch_nn[:2] + tuple(torch_nn[2])):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-12)
        for (k, a), b in zip(eager.state_dict().items(), scripted.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14, msg=k)


def test_torchscript_module_saves_loads_and_reports_bad_input():
    scripted = torch.jit.script(bnlib.BatchNorm2d(3))
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    y = loaded(x)
    torch.testing.assert_close(y, bnlib.BatchNorm2d(3)(x))
    assert y.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(Exception, match=r"expected input with 3 channels in dim 1, got 4"):
        scripted(torch.randn(4, 4, 5, 5))
    with pytest.raises(Exception, match=r"expected 4D \(N, C, H, W\) input, got 3D"):
        scripted(torch.randn(4, 3, 5))


def test_torchscript_double_backward_matches_torch():
    ours, theirs = pair(4)
    scripted = torch.jit.script(ours)
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    results = []
    for layer in (scripted, theirs):
        xi = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad((layer(xi) ** 3).sum(), xi, create_graph=True)
        gx.pow(2).sum().backward()
        results.append((xi.grad, layer.weight.grad, layer.bias.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5), (4, 3, 2, 2), (4, 3, 2, 2, 2)])
def test_infinite_input_matches_torch(shape, dtype):
    """+inf in channel 0, −inf in channel 1, channel 2 finite. torch.nn gives running_mean ±inf (not NaN),
    running_var NaN, a NaN output and input gradient for those channels; bnlib matches all of it, and the
    finite channel is unaffected."""
    ours, theirs = pair(len(shape))
    ours.to(dtype), theirs.to(dtype)
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    per_channel = x.view(shape[0], 3, -1)  # a view: writes go to x
    per_channel[1, 0, 0] = float("inf")
    per_channel[0, 1, -1] = float("-inf")
    g = torch.randn(shape, dtype=torch.float64).to(dtype)
    y1, gx1, gp1 = forward_backward(ours, x, g)
    y2, gx2, gp2 = forward_backward(theirs, x, g)
    assert torch.isinf(ours.running_mean[:2]).all()
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, **tol)  # ±inf in the same places
    torch.testing.assert_close(ours.running_var, theirs.running_var, equal_nan=True, **tol)
    torch.testing.assert_close(y1, y2, equal_nan=True, **tol)
    torch.testing.assert_close(gx1, gx2, equal_nan=True, **tol)
    for a, b in zip(gp1, gp2):
        torch.testing.assert_close(a, b, equal_nan=True, **tol)

"""bnlib.RMSNorm against torch.nn.RMSNorm: outputs, gradients, affine or not, shapes, dtypes, state_dict, errors."""

import inspect

import pytest
import torch
from torch import nn

import bnlib
from bnlib.rmsnorm import RMSNorm

TOL = dict(rtol=1e-12, atol=1e-12)
D64 = torch.float64


def rand(*shape, seed=0, dtype=D64, scale=2.0, shift=0.5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=D64) * scale + shift).to(dtype)


def pair(*args, dtype=D64, **kwargs):
    """Our layer and torch's with the same random γ (so that its gradient is not trivial)."""
    ours, theirs = RMSNorm(*args, dtype=dtype, **kwargs), nn.RMSNorm(*args, dtype=dtype, **kwargs)
    if ours.weight is not None:
        with torch.no_grad():
            ours.weight.copy_(torch.rand(ours.weight.shape, generator=torch.Generator().manual_seed(7)) + 0.5)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def run_both(ours, theirs, x, tol=TOL):
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    assert y1.dtype == y2.dtype == x.dtype and y1.shape == y2.shape == x.shape
    torch.testing.assert_close(y1, y2, **tol)
    g = rand(*y1.shape, seed=3, dtype=y1.dtype, shift=0.0)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, **tol)
    if ours.weight is not None:
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **tol)


def test_signature_is_torchs():
    def params(cls):  # names, kinds and defaults (annotations are written differently)
        return [(p.name, p.kind, p.default) for p in inspect.signature(cls).parameters.values()]

    assert params(RMSNorm) == params(nn.RMSNorm)
    assert bnlib.RMSNorm is RMSNorm


@pytest.mark.parametrize("normalized_shape,input_shape", [
    (6, (6,)), (6, (4, 6)), (6, (2, 3, 6)), ((3, 4), (2, 5, 3, 4)), ([5, 2, 3], (3, 5, 2, 3)),
    (torch.Size([4]), (2, 2, 2, 4)), ((2, 3), (2, 3)),
])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("eps", [None, 1e-3, 0.0])
def test_matches_torch(normalized_shape, input_shape, affine, eps):
    ours, theirs = pair(normalized_shape, eps=eps, elementwise_affine=affine)
    assert ours.normalized_shape == theirs.normalized_shape and repr(ours) == repr(theirs)
    for mode in (True, False):  # no batch statistics: both modes compute the same thing
        ours.train(mode), theirs.train(mode)
        run_both(ours, theirs, rand(*input_shape))


def test_state_dict_and_parameters():
    ours, theirs = pair((3, 4))
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight"]
    assert ours.weight.shape == (3, 4) and ours.weight.requires_grad
    plain, plain_torch = RMSNorm(4, elementwise_affine=False), nn.RMSNorm(4, elementwise_affine=False)
    assert plain.weight is None and list(plain.state_dict()) == list(plain_torch.state_dict()) == []
    fresh = RMSNorm(5)
    assert torch.equal(fresh.weight, torch.ones(5))  # γ starts at 1
    fresh.load_state_dict(nn.RMSNorm(5).state_dict())  # torch's checkpoints load, and ours load into torch's
    nn.RMSNorm((3, 4), dtype=D64).load_state_dict(ours.state_dict())


def test_default_eps_is_the_computation_dtypes():
    """eps=None: ε = machine epsilon of the statistics dtype; the difference shows on tiny inputs."""
    for dtype in (torch.float32, torch.float64):
        x = torch.full((2, 8), 1e-4, dtype=dtype)
        ms = 1e-8
        expected = 1e-4 / (ms + torch.finfo(dtype).eps) ** 0.5
        torch.testing.assert_close(RMSNorm(8, dtype=dtype)(x), torch.full_like(x, expected))
        torch.testing.assert_close(RMSNorm(8, dtype=dtype)(x), nn.RMSNorm(8, dtype=dtype)(x), rtol=1e-6, atol=0)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's unfused path
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("weight_dtype", ["same", torch.float32])
def test_low_precision_matches_torch(dtype, weight_dtype):
    """float16/bfloat16 are normalized in float32 and cast back: results bit-equal to torch's on the CPU."""
    x = rand(16, 33, dtype=dtype, scale=3.0)
    ours, theirs = pair(33, dtype=dtype if weight_dtype == "same" else weight_dtype)
    with torch.no_grad():
        y1, y2 = ours(x), theirs(x)
    assert y1.dtype == y2.dtype == dtype
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)


def test_per_example_and_scale_invariant():
    """Each row is normalized on its own (no coupling across the batch); scaling a row does not change it."""
    layer = RMSNorm(8, dtype=D64, eps=0.0)
    x = rand(5, 8)
    y = layer(x)
    torch.testing.assert_close(layer(x[2:3]), y[2:3], **TOL)
    torch.testing.assert_close(layer(x * torch.tensor([[1.0], [3.0], [0.5], [7.0], [2.0]], dtype=D64)), y, **TOL)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(5, dtype=D64), **TOL)  # unit RMS with γ = 1


def test_gradcheck():
    layer = RMSNorm((2, 3), eps=1e-3, dtype=D64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))
    x = rand(3, 2, 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda t, w: torch.func.functional_call(layer, {"weight": w}, (t,)),
                                    (x, layer.weight.detach().clone().requires_grad_()))


def test_empty_batch():
    ours, theirs = pair(4)
    assert ours(rand(0, 4)).shape == theirs(rand(0, 4)).shape == (0, 4)


def test_errors():
    """Shape mismatches name the expected and the actual shape as torch does; bad arguments are refused."""
    ours, theirs = RMSNorm((2, 3)), nn.RMSNorm((2, 3))
    phrase = r"normalized_shape=\[2, 3\], expected input with shape \[\*,? ?2, 3\], but got input of size ?\[3, 2\]"
    for layer in (ours, theirs):
        with pytest.raises(Exception, match=phrase):
            layer(torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"got input of size \[3\]"):
        ours(torch.randn(3))
    with pytest.raises(ValueError, match=r"got input of size \[\]"):
        RMSNorm(3)(torch.tensor(1.0))
    with pytest.raises(TypeError, match="floating-point"):
        ours(torch.ones(4, 2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        ours([[1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="positive sizes"):
        RMSNorm((3, 0))
    with pytest.raises(ValueError, match="positive sizes"):
        RMSNorm(())
    with pytest.raises(ValueError, match="eps >= 0"):
        RMSNorm(3, eps=-1e-5)


DEVICES = ["meta", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_devices(device):
    """Forward and backward stay on the input's device (``meta`` catches a stray CPU tensor without a GPU)."""
    ours, _ = pair(16)
    x = rand(4, 7, 16)
    layer, xd = ours.to(device), x.to(device).requires_grad_()
    y = layer(xd)
    y.sum().backward()
    assert y.device == xd.grad.device == layer.weight.grad.device == torch.device(device)
    if device != "meta":
        torch.testing.assert_close(y.cpu(), ours.cpu()(x), rtol=1e-12, atol=1e-12)

"""bnlib's BatchNorm against torch.nn's: outputs, gradients, running statistics, state_dict, errors."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

import bnlib
from bnlib import functional as BF
from bnlib import reference

PAIRS = {
    "1d": (bnlib.BatchNorm1d, nn.BatchNorm1d, [(16, 5), (8, 5, 7)]),
    "2d": (bnlib.BatchNorm2d, nn.BatchNorm2d, [(6, 5, 4, 3)]),
    "3d": (bnlib.BatchNorm3d, nn.BatchNorm3d, [(3, 5, 2, 3, 4)]),
}
TOL = dict(rtol=1e-9, atol=1e-10)


def make_pair(kind, **kwargs):
    """A bnlib layer and a torch.nn layer with identical random parameters, in float64."""
    ours_cls, theirs_cls, _ = PAIRS[kind]
    ours = ours_cls(5, **kwargs).double()
    theirs = theirs_cls(5, **kwargs).double()
    if ours.affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            if ours.bias is not None:
                ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def assert_same_state(ours, theirs):
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TOL, msg=f"state_dict[{k!r}] differs")


FLAGS = [(a, b, t, m) for a, b in [(True, True), (True, False), (False, True)]
         for t, m in itertools.product([True, False], [0.1, 0.5, None])]


@pytest.mark.recent_torch
@pytest.mark.parametrize("kind", PAIRS)
@pytest.mark.parametrize("affine,bias,track,momentum", FLAGS)
def test_train_eval_sequence_matches_torch(kind, affine, bias, track, momentum):
    """Three training steps, an eval step, two more training steps: everything equal at each."""
    gen = torch.Generator().manual_seed(0)
    for shape in PAIRS[kind][2]:
        ours, theirs = make_pair(kind, affine=affine, bias=bias, track_running_stats=track, momentum=momentum,
                                 eps=1e-3)
        for mode in ["train", "train", "train", "eval", "train", "train"]:
            ours.train(mode == "train")
            theirs.train(mode == "train")
            x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2.0 + 3.0
            x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
            y1, y2 = ours(x1), theirs(x2)
            torch.testing.assert_close(y1, y2, **TOL)
            g = torch.randn(shape, generator=gen, dtype=torch.float64)
            y1.backward(g)
            y2.backward(g)
            torch.testing.assert_close(x1.grad, x2.grad, **TOL)
            for p1, p2 in zip(ours.parameters(), theirs.parameters()):
                torch.testing.assert_close(p1.grad, p2.grad, **TOL)
            if affine:
                ours.zero_grad()
                theirs.zero_grad()
            assert_same_state(ours, theirs)


def test_running_variance_is_unbiased_and_momentum_none_is_cumulative():
    bn = bnlib.BatchNorm1d(3, momentum=None).double()
    xs = [torch.randn(10, 3, dtype=torch.float64) + i for i in range(4)]
    for x in xs:
        bn(x)
    torch.testing.assert_close(bn.running_mean, torch.stack([x.mean(0) for x in xs]).mean(0), **TOL)
    torch.testing.assert_close(bn.running_var, torch.stack([x.var(0, unbiased=True) for x in xs]).mean(0), **TOL)
    assert int(bn.num_batches_tracked) == 4


def test_eval_is_the_affine_map_of_algorithm_2():
    bn = bnlib.BatchNorm2d(4).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    bn.eval()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - scale * bn.running_mean
    torch.testing.assert_close(bn(x), x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), **TOL)


@pytest.mark.parametrize("weight,bias", [(True, True), (False, False), (True, False)])
def test_gradcheck_and_gradgradcheck(weight, bias):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, generator=gen, dtype=torch.float64).add(0.5).requires_grad_() if weight else None
    b = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = tuple(t for t in (x, w, b) if t is not None)

    def f(*args):
        it = iter(args)
        xx = next(it)
        ww = next(it) if weight else None
        bb = next(it) if bias else None
        return BF.batch_norm(xx, None, None, ww, bb, training=True, eps=1e-3)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_double_backward_matches_torch():
    """A gradient penalty (create_graph) gives the same second-order gradients as torch.nn."""
    ours, theirs = make_pair("2d")
    x = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    results = []
    for layer in (ours, theirs):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        (gx,) = torch.autograd.grad((y**3).sum(), xi, create_graph=True)
        gx.pow(2).sum().backward()
        results.append((xi.grad, layer.weight.grad, layer.bias.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("shape", [(7, 4), (5, 4, 6), (3, 4, 5, 2)])
def test_numpy_reference_against_autograd(shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape) * 3 + 1
    gamma, beta = rng.uniform(0.5, 1.5, size=4), rng.normal(size=4)
    dy = rng.normal(size=shape)
    y, cache = reference.batchnorm_forward(x, gamma, beta, eps=1e-5)
    dx, dgamma, dbeta = reference.batchnorm_backward(dy, cache)
    dx_graph, dgamma_graph, dbeta_graph = reference.batchnorm_backward_graph(dy, cache)

    xt = torch.tensor(x, requires_grad=True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = torch.tensor(beta, requires_grad=True)
    yt = torch.nn.functional.batch_norm(xt, None, None, gt, bt, training=True, eps=1e-5)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    for ours, graph, theirs in [(dx, dx_graph, xt.grad), (dgamma, dgamma_graph, gt.grad),
                                (dbeta, dbeta_graph, bt.grad)]:
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(graph, theirs.numpy(), rtol=1e-9, atol=1e-11)


def test_numerical_gradient_agrees_with_closed_form():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 3))
    gamma, beta = rng.uniform(0.5, 1.5, size=3), rng.normal(size=3)
    dy = rng.normal(size=(6, 3))
    _, cache = reference.batchnorm_forward(x, gamma, beta)
    dx, _, _ = reference.batchnorm_backward(dy, cache)
    num = reference.numerical_gradient(lambda v: reference.batchnorm_forward(v, gamma, beta)[0], x.copy(), dy)
    np.testing.assert_allclose(dx, num, rtol=1e-5, atol=1e-7)
    # An all-ones upstream gradient gives dx = 0: Σy is constant (β·m) whatever x is.
    dx_ones, _, _ = reference.batchnorm_backward(np.ones_like(x), cache)
    assert np.abs(dx_ones).max() < 1e-12


def test_reference_inference_matches_modules():
    bn = bnlib.BatchNorm1d(3).double()
    for _ in range(3):
        bn(torch.randn(8, 3, dtype=torch.float64) * 2 + 1)
    bn.eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    ref = reference.batchnorm_inference(x.numpy(), bn.weight.detach().numpy(), bn.bias.detach().numpy(),
                                        bn.running_mean.numpy(), bn.running_var.numpy(), bn.eps)
    np.testing.assert_allclose(bn(x).detach().numpy(), ref, rtol=1e-12)


@pytest.mark.parametrize("kind", PAIRS)
def test_state_dict_round_trips_both_ways(kind):
    ours, theirs = make_pair(kind)
    shape = PAIRS[kind][2][0]
    for _ in range(2):
        ours(torch.randn(shape, dtype=torch.float64))
    theirs_new = PAIRS[kind][1](5).double()
    theirs_new.load_state_dict(ours.state_dict())  # bnlib -> torch.nn
    assert_same_state(ours, theirs_new)
    for _ in range(2):
        theirs_new(torch.randn(shape, dtype=torch.float64))
    ours_new = PAIRS[kind][0](5).double()
    ours_new.load_state_dict(theirs_new.state_dict())  # torch.nn -> bnlib
    assert_same_state(ours_new, theirs_new)


def test_old_state_dict_without_num_batches_tracked_loads():
    bn = bnlib.BatchNorm1d(3)
    sd = nn.BatchNorm1d(3).state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    bn.load_state_dict(sd)
    assert int(bn.num_batches_tracked) == 0


@pytest.mark.recent_torch
def test_constructor_matches_torch():
    ours, theirs = bnlib.BatchNorm2d(7), nn.BatchNorm2d(7)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]
    bn = bnlib.BatchNorm1d(4, affine=False, track_running_stats=False, dtype=torch.float64)
    assert bn.weight is None and bn.running_mean is None and bn.num_batches_tracked is None
    no_shift = bnlib.BatchNorm1d(4, bias=False)
    assert no_shift.bias is None
    assert repr(no_shift).split("(", 1)[1] == repr(nn.BatchNorm1d(4, bias=False)).split("(", 1)[1]
    assert dict(bnlib.BatchNorm1d(3, dtype=torch.float16).named_buffers())["running_mean"].dtype == torch.float16


def test_channels_last_and_non_contiguous():
    ours, theirs = make_pair("2d")
    x = torch.randn(4, 5, 6, 7, dtype=torch.float64)
    xcl = x.to(memory_format=torch.channels_last)
    y1, y2 = ours(xcl), theirs(xcl)
    torch.testing.assert_close(y1, y2, **TOL)
    assert y1.is_contiguous(memory_format=torch.channels_last)
    xt = torch.randn(5, 4, 6, 7, dtype=torch.float64).transpose(0, 1)  # a non-contiguous view
    assert not xt.is_contiguous()
    x1, x2 = xt.clone().requires_grad_(), xt.clone().requires_grad_()
    torch.testing.assert_close(ours(xt), theirs(xt), **TOL)
    g = torch.randn(4, 5, 6, 7, dtype=torch.float64)
    ours(x1).backward(g)
    theirs(x2).backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, **TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_keeps_float32_statistics(dtype):
    bn = bnlib.BatchNorm2d(3)
    x = (torch.randn(8, 3, 4, 4) * 4 + 10).to(dtype)
    y = bn(x.requires_grad_())
    assert y.dtype == dtype
    y.float().sum().backward()
    assert x.grad.dtype == dtype and bn.weight.grad.dtype == torch.float32
    assert bn.running_mean.dtype == torch.float32
    ref = torch.nn.functional.batch_norm(x.detach().double(), None, None, training=True)
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)


def test_large_offset_float32_is_stable():
    """x = 1e3 + 0.01·noise: E[x²] − E[x]² in float32 loses every digit; bnlib must not."""
    gen = torch.Generator().manual_seed(0)
    x = 1e3 + 0.01 * torch.randn(256, 4, generator=gen)
    exact = torch.nn.functional.batch_norm(x.double(), None, None, training=True, eps=1e-8)
    naive_var = (x * x).mean(0) - x.mean(0) ** 2
    naive = (x - x.mean(0)) / torch.sqrt(naive_var.clamp_min(0) + 1e-8)
    assert (naive.double() - exact).abs().max() > 0.1  # the naive formula is badly wrong here
    ours = BF.batch_norm(x, None, None, training=True, eps=1e-8)
    assert (ours.double() - exact).abs().max() < 1e-2
    # Gradients stay accurate too.
    xr = x.clone().requires_grad_()
    g = torch.randn(256, 4, generator=gen)
    BF.batch_norm(xr, None, None, training=True, eps=1e-8).backward(g)
    xe = x.double().requires_grad_()
    torch.nn.functional.batch_norm(xe, None, None, training=True, eps=1e-8).backward(g.double())
    rel = (xr.grad.double() - xe.grad).norm() / xe.grad.norm()
    assert rel < 1e-2


def test_bad_input_errors_are_clear():
    bn = bnlib.BatchNorm2d(3)
    with pytest.raises(ValueError, match=r"expected input with 3 channels in dim 1, got 4"):
        bn(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"expected 4D \(N, C, H, W\) input, got 3D"):
        bn(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"expected 2D \(N, C\) or 3D \(N, C, L\) input, got 4D"):
        bnlib.BatchNorm1d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"more than 1 value per channel when training"):
        bnlib.BatchNorm1d(3)(torch.randn(1, 3))
    one = bnlib.BatchNorm1d(3)
    one.eval()
    assert one(torch.randn(1, 3)).shape == (1, 3)  # a single example is fine in eval mode
    with pytest.raises(ValueError, match=r"weight to have one value per channel, i.e. 3 elements.*got 2"):
        BF.batch_norm(torch.randn(4, 3), None, None, torch.ones(2), None, training=True)
    with pytest.raises(ValueError, match="running_mean and running_var in evaluation mode"):
        BF.batch_norm(torch.randn(4, 3), None, None, training=False)
    with pytest.raises(TypeError, match="floating-point input"):
        bnlib.BatchNorm1d(3)(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"eps must be positive during training \(expected eps > 0"):
        BF.batch_norm(torch.ones(4, 3), None, None, training=True, eps=0.0)
    with pytest.raises(ValueError, match="num_features"):
        bnlib.BatchNorm1d(0)
    with pytest.raises(ValueError, match="momentum"):
        bnlib.BatchNorm1d(3, momentum=1.5)
    with pytest.raises(ValueError, match="shape"):
        reference.batchnorm_forward(np.ones((4, 3)), np.ones(2), np.zeros(2))

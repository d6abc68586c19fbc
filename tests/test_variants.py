"""bnlib.variants: LN/GN/IN against torch.nn, Batch Renormalization, Ghost BN and Batch Layer Normalization."""

import math

import pytest
import torch
from torch import nn

import bnlib
from bnlib import variants as V

TOL = dict(rtol=1e-9, atol=1e-9)
D64 = torch.float64


def rand(*shape, seed=0, scale=2.0, shift=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=D64) * scale + shift


def randomize_affine(module):
    """Random γ, β (so that gradients with respect to them are not trivial)."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        if getattr(module, "weight", None) is not None:
            module.weight.copy_(torch.rand(module.weight.shape, generator=g, dtype=D64) + 0.5)
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(torch.randn(module.bias.shape, generator=g, dtype=D64))


def run_both(ours, theirs, x, seed=1):
    """Forward and backward the same input and upstream gradient through both modules; compare everything."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    torch.testing.assert_close(y1, y2, **TOL)
    g = rand(*y1.shape, seed=seed, shift=0.0)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, **TOL)
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p1.grad, p2.grad, **TOL, msg=f"grad of {n1}")
        p1.grad = p2.grad = None
    assert_same_state(ours, theirs)


def assert_same_state(ours, theirs):
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TOL, msg=f"state_dict[{k!r}]")


def pair(ours_cls, theirs_cls, *args, **kwargs):
    ours = ours_cls(*args, **kwargs).double()
    theirs = theirs_cls(*args, **kwargs).double()
    randomize_affine(ours)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


# ---------------------------------------------------------------------------------------------- LN / GN / IN

@pytest.mark.parametrize("normalized_shape,input_shape",
                         [(6, (4, 6)), ((3, 4), (2, 5, 3, 4)), ([5, 2, 3], (3, 5, 2, 3))])
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, True)])
def test_layer_norm_matches_torch(normalized_shape, input_shape, affine, bias):
    ours, theirs = pair(V.LayerNorm, nn.LayerNorm, normalized_shape, eps=1e-3, elementwise_affine=affine, bias=bias)
    assert ours.normalized_shape == theirs.normalized_shape
    for mode in (True, False):
        ours.train(mode), theirs.train(mode)
        run_both(ours, theirs, rand(*input_shape))


def test_layer_norm_errors():
    ln = V.LayerNorm((3, 4))
    with pytest.raises(ValueError, match=r"trailing shape \(3, 4\).*\(2, 4, 3\)"):
        ln(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="trailing shape"):
        ln(torch.randn(4))
    with pytest.raises(TypeError, match="floating-point"):
        ln(torch.ones(2, 3, 4, dtype=torch.long))


@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("input_shape", [(4, 6), (3, 6, 5), (2, 6, 3, 4)])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_matches_torch(groups, input_shape, affine):
    ours, theirs = pair(V.GroupNorm, nn.GroupNorm, groups, 6, eps=1e-4, affine=affine)
    run_both(ours, theirs, rand(*input_shape))


def test_group_norm_errors():
    with pytest.raises(ValueError, match=r"num_channels=10.*num_groups=4"):
        V.GroupNorm(4, 10)
    gn = V.GroupNorm(2, 6)
    with pytest.raises(ValueError, match=r"expected 6 channels.*got 5"):
        gn(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        gn(torch.randn(6))


IN_PAIRS = [(V.InstanceNorm1d, nn.InstanceNorm1d, (4, 3, 7)), (V.InstanceNorm2d, nn.InstanceNorm2d, (4, 3, 5, 2))]


@pytest.mark.recent_torch
@pytest.mark.parametrize("ours_cls,theirs_cls,shape", IN_PAIRS)
@pytest.mark.parametrize("affine,track,momentum", [(False, False, 0.1), (True, False, 0.1), (False, True, 0.1),
                                                   (True, True, 0.3), (True, True, None)])
def test_instance_norm_matches_torch(ours_cls, theirs_cls, shape, affine, track, momentum):
    ours, theirs = pair(ours_cls, theirs_cls, 3, eps=1e-3, momentum=momentum, affine=affine,
                        track_running_stats=track)
    for i, mode in enumerate(["train", "train", "eval", "train"]):
        ours.train(mode == "train"), theirs.train(mode == "train")
        run_both(ours, theirs, rand(*shape, seed=i))
        run_both(ours, theirs, rand(*shape[1:], seed=i + 10))  # unbatched (C, *spatial)


def test_instance_norm_errors():
    inorm = V.InstanceNorm2d(3)
    with pytest.raises(ValueError, match=r"4D \(N, C, H, W\).*got 2D"):
        inorm(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"expected 3 channels in dim 1, got 4"):
        inorm(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"expected 3 channels in dim 0, got 4"):
        inorm(torch.randn(4, 5, 5))
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        inorm(torch.randn(2, 3, 1, 1))


def test_no_torch_normalization_kernels(monkeypatch):
    """LN/GN/IN are plain tensor operations, not torch.nn.functional's kernels."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a torch normalization kernel was called")
    for name in ["layer_norm", "group_norm", "instance_norm", "batch_norm"]:
        monkeypatch.setattr(torch.nn.functional, name, forbidden)
        monkeypatch.setattr(torch, name, forbidden)
    x = torch.randn(4, 6, 3, 3)
    for layer in [V.LayerNorm((6, 3, 3)), V.GroupNorm(3, 6), V.InstanceNorm2d(6, affine=True, track_running_stats=True),
                  V.BatchRenorm2d(6), V.GhostBatchNorm2d(6, 2), V.BatchLayerNorm(6)]:
        layer(x).sum().backward()


# ---------------------------------------------------------------------------------------------- Batch Renormalization

@pytest.mark.parametrize("ours_cls,theirs_cls,shape", [(V.BatchRenorm1d, nn.BatchNorm1d, (8, 5)),
                                                       (V.BatchRenorm1d, nn.BatchNorm1d, (4, 5, 3)),
                                                       (V.BatchRenorm2d, nn.BatchNorm2d, (3, 5, 4, 2))])
@pytest.mark.parametrize("momentum", [0.01, 0.3, None])
def test_batch_renorm_with_trivial_limits_is_batch_norm(ours_cls, theirs_cls, shape, momentum):
    ours = ours_cls(5, eps=1e-3, momentum=momentum).double()
    theirs = theirs_cls(5, eps=1e-3, momentum=momentum).double()
    randomize_affine(ours)
    theirs.load_state_dict(ours.state_dict())
    for i, mode in enumerate(["train", "train", "eval", "train"]):
        ours.train(mode == "train"), theirs.train(mode == "train")
        run_both(ours, theirs, rand(*shape, seed=i))


def renorm_reference(x, w, b, running_mean, running_var, eps, r_max, d_max, detach=True):
    """Batch Renormalization by hand for (N, C); r and d detached unless detach=False."""
    mu_b = x.mean(0)
    sigma_b = ((x - mu_b) ** 2).mean(0).add(eps).sqrt()
    sigma = (running_var + eps).sqrt()
    r = (sigma_b / sigma).clamp(1 / r_max, r_max)
    d = ((mu_b - running_mean) / sigma).clamp(-d_max, d_max)
    if detach:
        r, d = r.detach(), d.detach()
    return w * ((x - mu_b) / sigma_b * r + d) + b, r, d


def test_batch_renorm_no_gradient_through_r_and_d():
    layer = V.BatchRenorm1d(4, r_max=3.0, d_max=5.0, momentum=0.2).double()
    randomize_affine(layer)
    with torch.no_grad():  # population estimates far from the batch's, so that r and d are clipped for some channels
        layer.running_mean.copy_(torch.tensor([0.0, 3.0, 2.9, -20.0], dtype=D64))
        layer.running_var.copy_(torch.tensor([100.0, 4.0, 0.01, 1.0], dtype=D64))
    rm0, rv0 = layer.running_mean.clone(), layer.running_var.clone()
    x = rand(16, 4)
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = layer(x1)
    y2, r, d = renorm_reference(x2, w, b, rm0, rv0, layer.eps, 3.0, 5.0)
    assert (r == 3.0).any() and (r == 1 / 3).any() and (d.abs() == 5.0).any()  # clipped both ways, and d
    assert ((r > 1 / 3) & (r < 3)).any()  # some channels unclipped
    torch.testing.assert_close(y1, y2, **TOL)
    g = rand(16, 4, seed=5, shift=0.0)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, **TOL)
    torch.testing.assert_close(layer.weight.grad, w.grad, **TOL)
    torch.testing.assert_close(layer.bias.grad, b.grad, **TOL)
    # Not detaching r and d gives a different input gradient: the comparison above is meaningful.
    x3 = x.clone().requires_grad_()
    y3, _, _ = renorm_reference(x3, w.detach(), b.detach(), rm0, rv0, layer.eps, 3.0, 5.0, detach=False)
    y3.backward(g)
    assert not torch.allclose(x3.grad, x1.grad, rtol=1e-6, atol=1e-8)
    # Running statistics: moving average of μ_B and of the unbiased batch variance.
    torch.testing.assert_close(layer.running_mean, 0.8 * rm0 + 0.2 * x.mean(0), **TOL)
    torch.testing.assert_close(layer.running_var, 0.8 * rv0 + 0.2 * x.var(0, unbiased=True), **TOL)
    # Eval: BN with the running statistics.
    layer.eval()
    torch.testing.assert_close(layer(x), (x - layer.running_mean) / (layer.running_var + layer.eps).sqrt()
                               * layer.weight + layer.bias, **TOL)


def test_renorm_schedule():
    assert V.renorm_schedule(0) == (1.0, 0.0)
    assert V.renorm_schedule(5000) == (1.0, 0.0)
    r, d = V.renorm_schedule(15000)
    assert math.isclose(r, 1 + 2 * 10000 / 35000) and math.isclose(d, 5 * 10000 / 20000)
    assert V.renorm_schedule(25000)[1] == 5.0
    assert V.renorm_schedule(40000) == (3.0, 5.0) == V.renorm_schedule(10 ** 6)
    steps = range(0, 50000, 997)
    values = [V.renorm_schedule(s) for s in steps]
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(values, values[1:]))
    assert V.renorm_schedule(10, warmup=0, r_max_final=2, d_max_final=1, r_max_steps=20, d_max_steps=10) == (1.5, 1.0)
    with pytest.raises(ValueError, match="warmup"):
        V.renorm_schedule(0, warmup=100, r_max_steps=50)


def test_apply_renorm_schedule_and_limits():
    model = nn.Sequential(nn.Linear(3, 4), V.BatchRenorm1d(4), nn.Sequential(nn.Conv2d(4, 2, 1), V.BatchRenorm2d(2)))
    assert V.apply_renorm_schedule(model, 40000) == (3.0, 5.0)
    assert (model[1].r_max, model[1].d_max, model[2][1].r_max, model[2][1].d_max) == (3.0, 5.0, 3.0, 5.0)
    model[1].set_limits(2.0, 0.5)
    model[1].r_max = 1.5
    assert (model[1].r_max, model[1].d_max) == (1.5, 0.5)
    with pytest.raises(ValueError, match="r_max >= 1"):
        model[1].r_max = 0.5
    with pytest.raises(ValueError, match="d_max >= 0"):
        model[1].set_limits(2.0, -1.0)
    assert list(model[1].state_dict()) == list(nn.BatchNorm1d(4).state_dict())


def test_batch_renorm_errors():
    with pytest.raises(ValueError, match=r"4D \(N, C, H, W\).*got 3D"):
        V.BatchRenorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"expected input with 3 channels.*got 4"):
        V.BatchRenorm1d(3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        V.BatchRenorm1d(3)(torch.randn(1, 3))


# ---------------------------------------------------------------------------------------------- Ghost BN

@pytest.mark.parametrize("ours_cls,theirs_cls,shape,vbs", [(V.GhostBatchNorm1d, nn.BatchNorm1d, (12, 5), 4),
                                                           (V.GhostBatchNorm1d, nn.BatchNorm1d, (6, 5, 3), 2),
                                                           (V.GhostBatchNorm2d, nn.BatchNorm2d, (6, 5, 2, 3), 3)])
@pytest.mark.parametrize("momentum,track", [(0.1, True), (None, True), (0.1, False)])
def test_ghost_batch_norm_is_per_chunk_batch_norm(ours_cls, theirs_cls, shape, vbs, momentum, track):
    ours = ours_cls(5, vbs, eps=1e-3, momentum=momentum, track_running_stats=track).double()
    theirs = theirs_cls(5, eps=1e-3, momentum=momentum, track_running_stats=track).double()
    randomize_affine(ours)
    theirs.load_state_dict(ours.state_dict())
    for i, mode in enumerate(["train", "train", "eval", "train"]):
        ours.train(mode == "train"), theirs.train(mode == "train")
        x = rand(*shape, seed=i)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1 = ours(x1)
        if mode == "train" or not track:  # one BN step per chunk, in order
            y2 = torch.cat([theirs(c) for c in x2.split(vbs)])
        else:
            y2 = theirs(x2)
        torch.testing.assert_close(y1, y2, **TOL)
        g = rand(*shape, seed=10 + i, shift=0.0)
        y1.backward(g), y2.backward(g)
        torch.testing.assert_close(x1.grad, x2.grad, **TOL)
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **TOL)
        torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, **TOL)
        ours.zero_grad(), theirs.zero_grad()
        assert_same_state(ours, theirs)


def test_ghost_batch_norm_full_virtual_batch_is_batch_norm():
    ours, theirs = V.GhostBatchNorm2d(3, 8).double(), nn.BatchNorm2d(3).double()
    randomize_affine(ours)
    theirs.load_state_dict(ours.state_dict())
    for i in range(2):
        run_both(ours, theirs, rand(8, 3, 2, 2, seed=i))


def test_ghost_batch_wrapper_equals_ghost_batch_norm_and_devices():
    torch.manual_seed(0)
    x = torch.randn(12, 3, 4, 4, dtype=torch.float64)
    ghost = V.GhostBatchNorm2d(3, virtual_batch_size=4).double()
    wrapped = V.GhostBatch(bnlib.BatchNorm2d(3).double(), 4)
    assert torch.allclose(ghost(x), wrapped(x), atol=1e-12)
    assert torch.allclose(ghost.running_mean, wrapped.layer.running_mean, atol=1e-12)
    assert torch.allclose(ghost.running_var, wrapped.layer.running_var, atol=1e-12)
    # Batch Renorm in ghost batches: the layer applied to each chunk in turn
    brn, ref = V.BatchRenorm2d(3, momentum=0.1).double(), V.BatchRenorm2d(3, momentum=0.1).double()
    brn.set_limits(2.0, 1.0)
    ref.set_limits(2.0, 1.0)
    out = V.GhostBatch(brn, 4)(x)
    assert torch.allclose(out, torch.cat([ref(c) for c in x.split(4)]), atol=1e-12)
    # per-example layers do not care about chunks; evaluation sees the whole batch
    gn = V.GroupNorm(3, 3).double()
    assert torch.allclose(V.GhostBatch(gn, 4)(x), gn(x), atol=1e-12)
    wrapped.eval()
    assert torch.equal(wrapped(x), wrapped.layer(x))


@pytest.mark.parametrize("make", [
    lambda: V.BatchRenorm2d(3, momentum=0.1, r_max=1.5, d_max=0.5),
    lambda: V.BatchRenorm1d(3, momentum=None, r_max=2.0, d_max=1.0),
    lambda: V.BatchLayerNorm(3),
    lambda: V.BatchLayerNorm(3, momentum=None, scale_by_sqrt_dk=True),
    lambda: V.BatchLayerNorm(3, track_running_stats=False),
], ids=["brn2d", "brn1d-cumulative", "bln", "bln-cumulative-dk", "bln-untracked"])
@pytest.mark.parametrize("shape", [(12, 3), (12, 3, 5), (12, 3, 2, 3)], ids=["2d", "3d", "4d"])
def test_ghost_batch_all_chunks_at_once_equals_chunk_by_chunk(make, shape):
    """GhostBatch's one-pass path for Batch Renorm and BLN (their _forward_ghosts) against the layer applied to each
    chunk in turn: output, gradients, running statistics and counters, over three training steps."""
    fast = make().double()
    if fast.input_dims and len(shape) not in fast.input_dims:
        pytest.skip(f"{type(fast).__name__} takes no {len(shape)}D input")
    slow = make().double()
    with torch.no_grad():
        for p_fast, p_slow in zip(fast.parameters(), slow.parameters()):
            p_fast.normal_()
            p_slow.copy_(p_fast)
    wrapped = V.GhostBatch(fast, 4)
    for step in range(3):
        x = rand(*shape, seed=step)
        xf, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = rand(*shape, seed=10 + step, shift=0.0)
        yf = wrapped(xf)
        ys = torch.cat([slow(c) for c in xs.split(4)])
        torch.testing.assert_close(yf, ys, **TOL)
        yf.backward(g)
        ys.backward(g)
        torch.testing.assert_close(xf.grad, xs.grad, **TOL)
        for p_fast, p_slow in zip(fast.parameters(), slow.parameters()):
            torch.testing.assert_close(p_fast.grad, p_slow.grad, **TOL)
        for (name, b_fast), b_slow in zip(fast.named_buffers(), slow.buffers()):
            torch.testing.assert_close(b_fast, b_slow, **TOL, msg=name)


def test_ghost_batch_wrapper_errors():
    with pytest.raises(ValueError, match="virtual_batch_size"):
        V.GhostBatch(nn.BatchNorm2d(3), 0)
    with pytest.raises(ValueError, match="does not divide"):
        V.GhostBatch(nn.BatchNorm2d(3), 4)(torch.randn(6, 3, 2, 2))


def test_ghost_batch_norm_errors():
    layer = V.GhostBatchNorm1d(3, 4)
    with pytest.raises(ValueError, match=r"virtual_batch_size=4 does not divide the batch size 10"):
        layer(torch.randn(10, 3))
    with pytest.raises(ValueError, match=r"expected input with 3 channels.*got 2"):
        layer(torch.randn(8, 2))
    with pytest.raises(ValueError, match=r"2D \(N, C\) or 3D \(N, C, L\).*got 4D"):
        layer(torch.randn(8, 3, 2, 2))
    with pytest.raises(ValueError, match="more than 1 value per channel in each ghost batch"):
        V.GhostBatchNorm1d(3, 1)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="positive int"):
        V.GhostBatchNorm1d(3, 0)
    layer.eval()
    assert layer(torch.randn(10, 3)).shape == (10, 3)  # eval uses running statistics: any batch size


# ------------------------------------------------------------------------------------------ Batch Layer Normalization

def bln_reference(x, w, b, eps, m, scale_by_sqrt_dk=False, mu_b=None, var_b=None):
    """The authors'-code formula written out directly, with stats over (N, *spatial) and (C, *spatial)."""
    bdims = [0] + list(range(2, x.dim()))
    fdims = list(range(1, x.dim()))
    if mu_b is None:
        mu_b = x.mean(bdims, keepdim=True)
        var_b = ((x - mu_b) ** 2).mean(bdims, keepdim=True)
    mu_f = x.mean(fdims, keepdim=True)
    var_f = ((x - mu_f) ** 2).mean(fdims, keepdim=True)
    x_b = (x - mu_b) / torch.sqrt(var_b + eps)
    x_f = (x - mu_f) / torch.sqrt(var_f + eps)
    xhat = (x_f * (1 / m - 1e-4) + x_b * (1 - (1 / m + 1e-4)))
    if scale_by_sqrt_dk:
        xhat = xhat / math.sqrt(x.shape[1])
    shape = [1, -1] + [1] * (x.dim() - 2)
    return w.view(shape) * xhat + b.view(shape)


@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5), (2, 4, 3, 3)])
@pytest.mark.parametrize("scale", [False, True])
def test_batch_layer_norm_formula(shape, scale):
    layer = V.BatchLayerNorm(4, momentum=0.25, scale_by_sqrt_dk=scale).double()
    randomize_affine(layer)
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    x = rand(*shape)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = layer(x1), bln_reference(x2, w, b, 1e-3, shape[0], scale)
    torch.testing.assert_close(y1, y2, **TOL)
    g = rand(*shape, seed=3, shift=0.0)
    y1.backward(g), y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, **TOL)
    torch.testing.assert_close(layer.weight.grad, w.grad, **TOL)
    torch.testing.assert_close(layer.bias.grad, b.grad, **TOL)
    bdims = [0] + list(range(2, x.dim()))
    count = x.numel() // x.shape[1]
    torch.testing.assert_close(layer.running_mean, 0.25 * x.mean(bdims), **TOL)
    torch.testing.assert_close(layer.running_var, 0.75 + 0.25 * x.var(bdims, correction=1), **TOL)
    assert int(layer.batch_size_tracked) == shape[0] and int(layer.num_batches_tracked) == 1 and count > 1
    # Eval: running statistics for x_b, the example's own for x_f, m = the training batch size.
    layer.eval()
    xe = rand(5, *shape[1:], seed=7)
    cshape = [1, -1] + [1] * (x.dim() - 2)
    expected = bln_reference(xe, w.detach(), b.detach(), 1e-3, shape[0], scale,
                             layer.running_mean.view(cshape), layer.running_var.view(cshape))
    torch.testing.assert_close(layer(xe), expected, **TOL)


def test_batch_layer_norm_limits():
    x = rand(1, 8, 4, 4)  # m = 1 (one image): close to LayerNorm over (C, H, W)
    bln = V.BatchLayerNorm(8).double()
    ln = nn.LayerNorm((8, 4, 4), eps=1e-3, elementwise_affine=False).double()
    torch.testing.assert_close(bln(x), ln(x), rtol=0, atol=1e-3)
    x = rand(4000, 6)  # large m: close to BatchNorm
    bn = nn.BatchNorm1d(6, eps=1e-3, affine=False).double()
    torch.testing.assert_close(V.BatchLayerNorm(6).double()(x), bn(x), rtol=0, atol=3e-3)
    # Before any training step, eval with m = the input's batch size; without tracking, batch statistics.
    untrained = V.BatchLayerNorm(6, track_running_stats=False).double().eval()
    torch.testing.assert_close(untrained(x[:10]), bln_reference(x[:10], torch.ones(6, dtype=D64),
                                                                torch.zeros(6, dtype=D64), 1e-3, 10), **TOL)
    assert untrained.batch_size_tracked is None


def test_batch_layer_norm_state_and_errors():
    layer = V.BatchLayerNorm(3)
    assert set(layer.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked",
                                       "batch_size_tracked"}
    layer(torch.randn(5, 3))
    layer.reset_running_stats()
    assert int(layer.batch_size_tracked) == 0
    with pytest.raises(ValueError, match=r"expected input with 3 channels.*got 4"):
        layer(torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"got 5D"):
        layer(torch.randn(2, 3, 2, 2, 2))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(4, 3, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------- dtype / device

def all_layers(C=4):
    return [V.LayerNorm((C, 3, 3)), V.GroupNorm(2, C, affine=True),
            V.InstanceNorm2d(C, affine=True, track_running_stats=True),
            V.BatchRenorm2d(C, r_max=2.0, d_max=1.0), V.GhostBatchNorm2d(C, 2), V.BatchLayerNorm(C)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_uses_float32_statistics(dtype):
    x = torch.randn(4, 4, 3, 3) * 0.5 + 100.0  # a large mean: half-precision statistics would lose it
    for layer in all_layers():
        for mode in (True, False):
            ref = layer.train(mode)
            state = {k: v.clone() for k, v in ref.state_dict().items()}
            expected = ref(x.to(dtype).float())
            ref.load_state_dict(state)
            y = layer(x.to(dtype))
            assert y.dtype == dtype, type(layer).__name__
            tol = 1e-2 if dtype == torch.float16 else 5e-2
            torch.testing.assert_close(y.float(), expected, rtol=tol, atol=tol, msg=type(layer).__name__)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = torch.randn(4, 4, 3, 3)
    for cpu in all_layers():
        gpu = all_layers()[[type(l) for l in all_layers()].index(type(cpu))].cuda()
        gpu.load_state_dict(cpu.state_dict())
        for mode in (True, False):
            cpu.train(mode), gpu.train(mode)
            torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# torch.nn 2.13 parity: the bias= keyword and empty batches
# ---------------------------------------------------------------------------------------------

@pytest.mark.recent_torch
@pytest.mark.parametrize("make, shape", [
    (lambda lib: lib.GroupNorm(2, 4, bias=False), (3, 4, 5)),
    (lambda lib: lib.LayerNorm(5, bias=False), (3, 4, 5)),
    (lambda lib: lib.InstanceNorm1d(4, affine=True, bias=False), (3, 4, 5)),
    (lambda lib: lib.InstanceNorm2d(4, affine=True, bias=False), (3, 4, 5, 2)),
])
def test_bias_keyword_matches_torch(make, shape):
    ours, ref = make(bnlib).double(), make(nn).double()
    assert ours.bias is None and ref.bias is None
    assert list(ours.state_dict()) == list(ref.state_dict())
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ref.weight.copy_(ours.weight)
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = torch.randn(shape, dtype=torch.float64)
    ya, yb = ours(xa), ref(xb)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)


@pytest.mark.parametrize("make, shape", [
    (lambda lib: lib.GroupNorm(2, 4), (0, 4, 5)),
    (lambda lib: lib.LayerNorm(5), (0, 4, 5)),
    (lambda lib: lib.InstanceNorm1d(4), (0, 4, 5)),  # with affine=True torch.nn 2.13 raises IndexError
])
def test_empty_batch_matches_torch(make, shape):
    ours, ref = make(bnlib), make(nn)
    xa, xb = torch.randn(shape, requires_grad=True), torch.randn(shape, requires_grad=True)
    ya, yb = ours(xa), ref(xb)
    assert ya.shape == yb.shape == shape
    ya.sum().backward()
    yb.sum().backward()
    for p_ours, p_ref in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p_ours.grad, p_ref.grad)


@pytest.mark.parametrize("make", [lambda: bnlib.BatchRenorm1d(4, r_max=2.0, d_max=1.0),
                                  lambda: bnlib.GhostBatchNorm1d(4, virtual_batch_size=2)])
def test_empty_batch_bnlib_only_layers_leave_statistics_alone(make):
    layer = make()
    y = layer(torch.randn(0, 4, 3))
    assert y.shape == (0, 4, 3)
    assert torch.equal(layer.running_mean, torch.zeros(4)) and torch.equal(layer.running_var, torch.ones(4))
    assert int(layer.num_batches_tracked) == 0
    y.sum().backward()
    assert torch.equal(layer.weight.grad, torch.zeros(4))

"""Adaptive gradient clipping against a direct computation; the residual variants' promises at initialization."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from bnlib.lab.data import load_mnist
from bnlib.lab.nonorm import RESIDUALS, ResidualMLP, adaptive_clip_, agc_parameters, unitwise_norm, with_agc
from bnlib.lab.training import fit, seed_everything
from bnlib.weight_std import ScaledStdLinear


def _agc_direct(w: torch.Tensor, g: torch.Tensor, clipping: float, eps: float) -> torch.Tensor:
    """AGC unit by unit with the loop written out (dimension 0 indexes units; 0-d/1-d: each element a unit)."""
    w, g = w.double(), g.double()
    if w.dim() <= 1:
        w, g = w.reshape(-1, 1), g.reshape(-1, 1)
    out = g.clone()
    for i in range(w.shape[0]):
        wn = math.sqrt(float((w[i] ** 2).sum()))
        gn = math.sqrt(float((g[i] ** 2).sum()))
        limit = clipping * max(wn, eps)
        if gn > limit:
            out[i] = g[i] * (limit / gn)
    return out


@pytest.mark.parametrize("shape", [(), (5,), (6, 4), (3, 2, 3, 3)])
def test_agc_matches_direct_computation(shape):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    if w.dim() >= 1:
        w[0] = 0.0  # a zero-initialised unit: the floor ε sets its limit
    p = nn.Parameter(w.clone())
    # Gradients spread over three orders of magnitude, so that some units are clipped and some not.
    p.grad = torch.randn(shape, generator=gen, dtype=torch.float64) * torch.logspace(-4, -1, max(p.numel(), 1),
                                                                                     dtype=torch.float64
                                                                                     ).reshape(shape)
    before = p.grad.clone()
    adaptive_clip_([p], clipping=0.05, eps=1e-3)
    want = _agc_direct(w, before, 0.05, 1e-3).reshape(shape)
    torch.testing.assert_close(p.grad, want)
    if w.dim() >= 2:  # the test exercises both branches
        changed = (p.grad != before).flatten(1).any(1)
        assert changed.any() and not changed.all()


def test_unitwise_norm_shapes():
    w = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(unitwise_norm(w).flatten(), w.flatten(1).norm(dim=1))
    assert unitwise_norm(w).shape == (4, 1, 1, 1)
    torch.testing.assert_close(unitwise_norm(torch.tensor([-2.0, 3.0])), torch.tensor([2.0, 3.0]))


def test_with_agc_clips_before_each_step():
    torch.manual_seed(1)
    model = ResidualMLP(in_features=12, width=8, depth=2, num_classes=3, residual="nf")
    twin = ResidualMLP(in_features=12, width=8, depth=2, num_classes=3, residual="nf")
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
    opt = with_agc(torch.optim.SGD(model.parameters(), lr=0.5), agc_parameters(model), clipping=0.01)
    ref = torch.optim.SGD(twin.parameters(), lr=0.5)
    for _ in range(3):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
        head_grad = twin.head.weight.grad.clone()
        adaptive_clip_(agc_parameters(twin), clipping=0.01)
        assert torch.equal(twin.head.weight.grad, head_grad)  # the head is not clipped
        opt.step()
        ref.step()
        for (name, a), b in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, msg=name)


def test_agc_parameters_leave_out_the_head():
    model = ResidualMLP(in_features=12, width=8, depth=2, residual="skipinit")
    clipped = {id(p) for p in agc_parameters(model)}
    assert clipped.isdisjoint(id(p) for p in model.head.parameters())
    assert len(clipped) == len(list(model.parameters())) - 2
    with pytest.raises(ValueError, match="no submodule named"):
        agc_parameters(model, exclude=("classifier",))


def test_agc_bad_arguments():
    p = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="clipping"):
        adaptive_clip_([p], clipping=0.0)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        adaptive_clip_([p], eps=-1.0)
    with pytest.raises(ValueError, match="finite"):
        with_agc(torch.optim.SGD([p], lr=0.1), [p], clipping=float("inf"))
    with pytest.raises(ValueError, match="optimizer updates"):
        with_agc(torch.optim.SGD([p], lr=0.1), [nn.Parameter(torch.ones(2))])


def test_residual_mlp_bad_arguments():
    with pytest.raises(ValueError, match="unknown residual 'rezero'; valid"):
        ResidualMLP(residual="rezero")
    with pytest.raises(ValueError, match="depth must be an int >= 1"):
        ResidualMLP(depth=0)
    with pytest.raises(ValueError, match="alpha"):
        ResidualMLP(residual="nf", alpha=-0.2)
    with pytest.raises(ValueError, match="analytic variance of 'nf'"):
        ResidualMLP(residual="bn").expected_variances()


@pytest.mark.parametrize("residual", ["skipinit", "fixup"])
def test_blocks_are_the_identity_at_initialization(residual):
    torch.manual_seed(2)
    model = ResidualMLP(in_features=20, width=16, depth=6, residual=residual)
    x = torch.randn(32, 20)
    hs = model.hidden(x)
    for block, h_in, h_out in zip(model.blocks, hs[:-1], hs[1:]):
        assert torch.equal(h_out, h_in)
        if residual == "fixup":  # the branch itself outputs 0, not only its product with α
            assert torch.equal(block.branch(h_in), torch.zeros_like(h_in))
    if residual == "fixup":
        assert torch.equal(model(x), torch.zeros(32, 10))  # zero head: uniform predictions
    # Where learning starts: SkipInit's α of every block has a gradient at once; Fixup's zero head is the only
    # weight with one at the first step (no gradient flows back through it), the branches follow after it moves.
    nn.functional.cross_entropy(model(x), torch.randint(0, 10, (32,))).backward()
    if residual == "skipinit":
        assert all(b.alpha.grad is not None and b.alpha.grad != 0 for b in model.blocks)
    else:
        assert model.head.weight.grad.abs().sum() > 0
        assert all(b.branch[7].weight.grad.abs().sum() == 0 for b in model.blocks)


def test_fixup_scales_the_first_branch_layer_by_depth():
    torch.manual_seed(3)
    width, depth = 256, 16
    model = ResidualMLP(in_features=20, width=width, depth=depth, residual="fixup")
    std = torch.stack([b.branch[3].weight.detach().std() for b in model.blocks]).mean()
    # He: std √(2/width); Fixup scales it by depth^(−1/2).
    assert float(std) == pytest.approx(math.sqrt(2.0 / width) / math.sqrt(depth), rel=0.02)


def test_nf_analytic_variance_tracks_the_measured_one():
    torch.manual_seed(4)
    model = ResidualMLP(in_features=256, width=512, depth=10, residual="nf", alpha=0.5)
    assert isinstance(model.stem, ScaledStdLinear) and isinstance(model.blocks[0].branch[1], ScaledStdLinear)
    with torch.no_grad():
        hs = model.hidden(torch.randn(2048, 256))
    measured = [float(h.var(0).mean()) for h in hs]
    expected = model.expected_variances()
    assert expected[0] == 1.0 and expected[-1] == pytest.approx(1.0 + 10 * 0.25)
    # Within 10 % at every block (the variance grows by 250 % over the ten).
    for i, (m, e) in enumerate(zip(measured, expected)):
        assert m == pytest.approx(e, rel=0.1), (i, measured, expected)


def test_without_normalization_the_signal_doubles_per_block_and_bn_adds_one():
    """The second moment E[h²] (mean over batch and units): He-initialized branches return as much as they
    receive, so without BN it doubles per block; BN normalizes the branch's input, so its output adds 1."""
    torch.manual_seed(5)
    x = torch.randn(2048, 64)
    depth = 8
    with torch.no_grad():
        none = [float(h.pow(2).mean()) for h in ResidualMLP(64, 256, depth, residual="none").hidden(x)]
        bn = [float(h.pow(2).mean()) for h in ResidualMLP(64, 256, depth, residual="bn").hidden(x)]
    rate = (none[-1] / none[0]) ** (1 / depth)
    assert 1.8 < rate < 2.2, none
    per_block = (bn[-1] - bn[0]) / depth
    assert 0.85 < per_block < 1.15, bn


@pytest.mark.parametrize("residual", list(RESIDUALS))
def test_each_variant_trains(residual):
    (xtr, ytr), (xte, yte) = load_mnist()
    xtr, xte = (xtr[:2048] - 0.1307) / 0.3081, (xte[:512] - 0.1307) / 0.3081
    seed_everything(0)
    model = ResidualMLP(width=32, depth=4, residual=residual)
    hist = fit(model, ((xtr, ytr[:2048]), (xte, yte[:512])), steps=120, batch_size=64, lr=0.01, momentum=0.9,
               eval_every=40, progress=False)
    assert not hist.diverged
    assert hist.train_loss[-1] < 0.5 * hist.train_loss[0], hist.train_loss
    assert hist.final_acc > 0.7, hist.test_acc

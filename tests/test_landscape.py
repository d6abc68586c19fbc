"""Tests for bnlib.lab.landscape: the noisy-BN layer and the loss-landscape measurement."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlib.lab.landscape import LandscapeRecorder, NoisyShift, loss_landscape, noisy_norm
from bnlib.lab.models import MLP
from bnlib.lab.training import fit, seed_everything


class Quadratic(nn.Module):
    """A "model" whose output is its parameter vector w; with ``quad_loss`` the loss is ½ wᵀAw."""

    def __init__(self, A, w0):
        super().__init__()
        self.register_buffer("A", A)
        self.w = nn.Parameter(w0.clone())

    def forward(self, x):
        return self.w


def quad_loss_for(A):
    return lambda out, y: 0.5 * out @ A @ out


def test_quadratic_gradient_change_and_loss_match_the_math():
    torch.manual_seed(0)
    A = torch.diag(torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64))
    w0 = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)
    model = Quadratic(A, w0)
    etas = [0.01, 0.05, 0.1, 0.3]
    res = loss_landscape(model, quad_loss_for(A), (torch.zeros(1), torch.zeros(1)), etas)
    g = A @ w0                                   # ∇L(w) = A w
    for eta, loss, change in zip(etas, res.losses, res.grad_changes):
        w = w0 - eta * g
        assert loss == pytest.approx(float(0.5 * w @ A @ w), rel=1e-12)
        # ∇L(w0) − ∇L(w0 − ηg) = ηAg
        assert change == pytest.approx(float(eta * torch.linalg.vector_norm(A @ g)), rel=1e-10)
    assert res.loss0 == pytest.approx(float(0.5 * w0 @ A @ w0), rel=1e-12)
    assert res.grad_norm == pytest.approx(float(torch.linalg.vector_norm(g)), rel=1e-12)
    # effective β-smoothness is at most the largest curvature, and equals λ when A = λI
    assert res.beta_smoothness <= 5.0 + 1e-9
    iso = Quadratic(3.0 * torch.eye(3, dtype=torch.float64), w0)
    r2 = loss_landscape(iso, quad_loss_for(iso.A), (torch.zeros(1), torch.zeros(1)), etas)
    assert r2.beta_smoothness == pytest.approx(3.0, rel=1e-10)
    assert r2.loss_range == pytest.approx(max(np.append(r2.losses, r2.loss0)) - min(np.append(r2.losses, r2.loss0)))


def test_parameters_buffers_grads_and_rng_restored_exactly():
    torch.manual_seed(1)
    model = MLP(widths=(16, 16), norm="bn")
    x, y = torch.randn(32, 784), torch.randint(0, 10, (32,))
    F.cross_entropy(model(x), y).backward()      # some existing .grad and running stats
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    res = loss_landscape(model, F.cross_entropy, (x, y), [0.1, 1.0, 10.0])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training
    assert res.losses.shape == (3,) and res.grad_changes.shape == (3,)
    assert np.all(np.isfinite(res.losses)) and np.all(res.grad_changes > 0)


def test_grad_none_stays_none():
    model = MLP(widths=(8,), norm=None)
    x, y = torch.randn(8, 784), torch.randint(0, 10, (8,))
    loss_landscape(model, F.cross_entropy, (x, y), [0.5])
    assert all(p.grad is None for p in model.parameters())


def test_recorder_as_fit_callback_does_not_change_training():
    g = torch.Generator().manual_seed(0)
    xtr, ytr = torch.rand(600, 1, 28, 28, generator=g), torch.randint(0, 10, (600,), generator=g)
    data = ((xtr, ytr), (xtr[:100], ytr[:100]))
    seed_everything(0)
    m1 = MLP(widths=(16,), norm="bn")
    h1 = fit(m1, data, steps=20, eval_every=10, device="cpu")
    seed_everything(0)
    m2 = MLP(widths=(16,), norm="bn")
    rec = LandscapeRecorder(F.cross_entropy, (xtr[:64], ytr[:64]), [0.1, 1.0])
    h2 = fit(m2, data, steps=20, eval_every=10, callback=rec, callback_every=10, device="cpu")
    assert h1.same_results(h2)
    assert rec.steps == [0, 10, 20]
    s = rec.summary()
    assert s["loss_range"].shape == (3,) and np.all(s["beta_smoothness"] > 0)


def test_noisy_shift_train_and_eval():
    torch.manual_seed(0)
    layer = NoisyShift(4, scale=(2.0, 3.0), shift_mean=1.0, shift_std=0.5)
    x = torch.ones(1000, 4)
    y = layer(x)
    # one scale and shift per unit, shared by the batch
    assert torch.allclose(y, y[:1].expand_as(y))
    s_plus_t = y[0]
    y2 = layer(x)
    assert not torch.equal(y2[0], s_plus_t)            # redrawn every pass
    z = layer(torch.zeros(5, 4))                        # zero input isolates the shift t
    assert z.std(0).max() == 0
    layer.eval()                                       # the average transform: x·2.5 + 1
    assert torch.allclose(layer(x), 3.5 * x)
    assert torch.equal(layer(x), layer(x))
    # statistics of s and t over many passes
    layer.train()
    torch.manual_seed(1)
    ts = torch.stack([layer(torch.zeros(2, 4))[0] for _ in range(4000)])
    assert ts.mean().item() == pytest.approx(1.0, abs=0.03)
    assert ts.std().item() == pytest.approx(0.5, abs=0.03)
    ss = torch.stack([layer(torch.ones(2, 4))[0] for _ in range(4000)]) - 1.0  # s + t − t̄ has mean 2.5
    assert ss.mean().item() == pytest.approx(2.5, abs=0.05)
    with pytest.raises(ValueError):
        layer(torch.zeros(3, 5))


def test_noisy_norm_builds_modules_for_mlp():
    torch.manual_seed(0)
    m = MLP(norm=noisy_norm("bn", shift_std=0.2))
    assert isinstance(m.hidden[0].norm, nn.Sequential)
    assert isinstance(m.hidden[0].norm[1], NoisyShift)
    m0 = MLP(norm=noisy_norm(None))
    assert isinstance(m0.hidden[0].norm, NoisyShift)
    out = m(torch.rand(10, 1, 28, 28))
    assert out.shape == (10, 10)
    if torch.cuda.is_available():
        m.cuda()(torch.rand(10, 784, device="cuda"))

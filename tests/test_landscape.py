"""Tests for bnlib.lab.landscape: the noisy-BN layer, the loss landscape along the gradient and the gradient-based
ICS."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlib.lab.landscape import (
    GradientShiftRecorder,
    LandscapeRecorder,
    NoisyShift,
    gradient_shift,
    loss_landscape,
    noisy_norm,
)
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


def test_noisy_shift_per_example_is_iid_noise_whose_distribution_changes_every_step():
    # Santurkar et al.'s form: y = x + n, n_ij ~ N(t_j, s_j²) i.i.d. over examples, (s_j, t_j) redrawn every pass
    torch.manual_seed(0)
    layer = NoisyShift(3, scale=(0.5, 2.0), shift_mean=1.0, shift_std=0.5)
    assert layer.per_example
    n = 20000
    x = torch.linspace(-1, 1, n).unsqueeze(1).repeat(1, 3)
    noise = layer(x) - x
    # every example its own draw: the noise is not shared down a column, and is uncorrelated between neighbours
    assert noise.std(0).min() > 0.4
    r = np.corrcoef(noise[:-1].T.numpy().ravel(), noise[1:].T.numpy().ravel())[0, 1]
    assert abs(r) < 0.03
    # Gaussian around the unit's mean t_j with the unit's spread s_j, one (s_j, t_j) per unit
    t, s = noise.mean(0), noise.std(0)
    assert torch.all((s > 0.5 - 0.03) & (s < 2.0 + 0.03))
    assert torch.allclose(((noise - t) / s).pow(4).mean(0), torch.full((3,), 3.0), atol=0.15)   # kurtosis 3
    assert len(set(np.round(t.numpy(), 2))) == 3                                       # different t_j per unit
    # a fresh distribution at every pass, with t ~ N(1, 0.5²) and s ~ U[0.5, 2] over passes
    ts, ss = [], []
    for _ in range(2000):
        z = layer(torch.zeros(200, 3))
        ts.append(z.mean(0))
        ss.append(z.std(0))
    ts, ss = torch.cat(ts), torch.cat(ss)
    assert ts.mean().item() == pytest.approx(1.0, abs=0.03)
    assert ts.std().item() == pytest.approx(0.5, abs=0.03)
    assert ss.mean().item() == pytest.approx(1.25, abs=0.03)                          # (0.5 + 2) / 2
    assert ss.min().item() > 0.375 and ss.max().item() < 2.5                  # U[0.5, 2] ± sampling error of 200
    # every element of a (N, C, H, W) input gets its own noise: positions of one channel differ
    layer4 = NoisyShift(2, shift_std=0.0)
    z4 = layer4(torch.zeros(2, 2, 5, 5))
    assert z4[0, 0].std() > 0 and not torch.equal(z4[0, 0], z4[1, 0])
    # eval: the mean of the noise, y = x + μ
    layer.eval()
    assert torch.allclose(layer(x), x + 1.0)
    with pytest.raises(ValueError, match="expected input"):
        layer(torch.zeros(3, 5))


def test_noisy_shift_batch_shared_train_and_eval():
    torch.manual_seed(0)
    layer = NoisyShift(4, scale=(2.0, 3.0), shift_mean=1.0, shift_std=0.5, per_example=False)
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


def test_noisy_shift_argument_errors():
    with pytest.raises(ValueError, match="scale"):
        NoisyShift(2, scale=(2.0, 1.0))
    with pytest.raises(ValueError, match="scale"):
        NoisyShift(2, scale=(-1.0, 1.0))
    with pytest.raises(ValueError, match="shift_std"):
        NoisyShift(2, shift_std=-0.1)
    assert "per_example=False" in repr(NoisyShift(2, per_example=False))


def test_noisy_norm_builds_modules_for_mlp():
    torch.manual_seed(0)
    m = MLP(norm=noisy_norm("bn", shift_std=0.2))
    assert isinstance(m.hidden[0].norm, nn.Sequential)
    assert isinstance(m.hidden[0].norm[1], NoisyShift)
    m0 = MLP(norm=noisy_norm(None))
    assert isinstance(m0.hidden[0].norm, NoisyShift) and m0.hidden[0].norm.per_example
    shared = MLP(norm=noisy_norm("bn", per_example=False))
    assert not shared.hidden[0].norm[1].per_example
    out = m(torch.rand(10, 1, 28, 28))
    assert out.shape == (10, 10)
    if torch.cuda.is_available():
        m.cuda()(torch.rand(10, 784, device="cuda"))


# --------------------------------------------------------------------------
# Equal step lengths
# --------------------------------------------------------------------------

def test_distances_step_by_fixed_lengths_on_a_quadratic():
    A = torch.diag(torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64))
    w0 = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)
    model = Quadratic(A, w0)
    g = A @ w0
    gnorm = float(torch.linalg.vector_norm(g))
    dists = [0.01, 0.1, 0.5]
    res = loss_landscape(model, quad_loss_for(A), (torch.zeros(1), torch.zeros(1)), distances=dists)
    np.testing.assert_allclose(res.step_lengths, dists, rtol=1e-12)
    np.testing.assert_allclose(res.etas, np.asarray(dists) / gnorm, rtol=1e-12)
    for d, loss, change in zip(dists, res.losses, res.grad_changes):
        w = w0 - d * g / gnorm
        assert loss == pytest.approx(float(0.5 * w @ A @ w), rel=1e-12)
        assert change == pytest.approx(float(d / gnorm * torch.linalg.vector_norm(A @ g)), rel=1e-10)
    # the same points as etas = d/‖g‖, hence the same β-smoothness
    same = loss_landscape(model, quad_loss_for(A), (torch.zeros(1), torch.zeros(1)), list(np.asarray(dists) / gnorm))
    assert same.beta_smoothness == pytest.approx(res.beta_smoothness, rel=1e-10)


def test_beta_smoothness_does_not_depend_on_gradient_size_but_loss_range_does():
    """Scaling the loss by c scales the gradient by c: at equal η the loss range grows like c²,
    the β-smoothness (gradient change per unit distance) like c, and at equal distances the loss range like c."""
    A = torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64))
    w0 = torch.tensor([0.7, -0.2], dtype=torch.float64)
    batch = (torch.zeros(1), torch.zeros(1))
    r1 = loss_landscape(Quadratic(A, w0), quad_loss_for(A), batch, [0.1, 0.2])
    r4 = loss_landscape(Quadratic(4 * A, w0), quad_loss_for(4 * A), batch, [0.1, 0.2])
    assert r4.beta_smoothness == pytest.approx(4 * r1.beta_smoothness, rel=1e-9)
    d1 = loss_landscape(Quadratic(A, w0), quad_loss_for(A), batch, distances=[0.05, 0.1])
    d4 = loss_landscape(Quadratic(4 * A, w0), quad_loss_for(4 * A), batch, distances=[0.05, 0.1])
    assert d4.loss_range == pytest.approx(4 * d1.loss_range, rel=1e-9)


def test_landscape_argument_errors():
    model = Quadratic(torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    loss, batch = quad_loss_for(model.A), (torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match="exactly one"):
        loss_landscape(model, loss, batch)
    with pytest.raises(ValueError, match="exactly one"):
        loss_landscape(model, loss, batch, [0.1], distances=[0.1])
    with pytest.raises(ValueError, match="positive"):
        loss_landscape(model, loss, batch, [0.1, 0.0])


def test_recorder_with_distances():
    torch.manual_seed(0)
    model = MLP(widths=(8,), norm="bn")
    x, y = torch.randn(32, 784), torch.randint(0, 10, (32,))
    rec = LandscapeRecorder(F.cross_entropy, (x, y), distances=[0.5, 1.0])
    rec(0, model)
    np.testing.assert_allclose(rec.results[0].step_lengths, [0.5, 1.0], rtol=1e-5)
    assert set(rec.summary()) == {"steps", "loss_range", "max_grad_change", "beta_smoothness", "grad_norm"}


# --------------------------------------------------------------------------
# Gradient-based internal covariate shift
# --------------------------------------------------------------------------

class TwoLayers(nn.Module):
    """out = w2 · (w1 x): a scalar first layer and a vector second layer; loss ½‖out − y‖²."""

    def __init__(self, w1, w2):
        super().__init__()
        self.w1 = nn.Parameter(torch.tensor(w1, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.tensor(w2, dtype=torch.float64))

    def forward(self, x):
        return self.w2 * (self.w1 * x)


def half_sq(out, y):
    return 0.5 * ((out - y) ** 2).sum()


def test_gradient_shift_matches_the_hand_computed_update():
    w1, w2, x, lr = 0.8, [1.5, -0.4], 2.0, 0.1
    y = torch.tensor([1.0, 0.5], dtype=torch.float64)
    model = TwoLayers(w1, w2)
    res = gradient_shift(model, half_sq, (torch.tensor(x, dtype=torch.float64), y), [model.w2], [model.w1], lr)
    W2 = torch.tensor(w2, dtype=torch.float64)
    r = W2 * w1 * x - y                         # residual
    G = r * (w1 * x)                            # ∇_{w2} L
    g1 = float((r * W2 * x).sum())              # ∇_{w1} L
    w1_new = w1 - lr * g1
    G2 = (W2 * w1_new * x - y) * (w1_new * x)   # ∇_{w2} L after the earlier layer's step, w2 unchanged
    assert res.grad_norm == pytest.approx(float(G.norm()), rel=1e-12)
    assert res.shifted_norm == pytest.approx(float(G2.norm()), rel=1e-12)
    assert res.distance == pytest.approx(float((G - G2).norm()), rel=1e-12)
    assert res.cosine == pytest.approx(float(G @ G2 / (G.norm() * G2.norm())), rel=1e-12)
    assert res.relative == pytest.approx(res.distance / res.grad_norm)
    # no step, no shift
    still = gradient_shift(model, half_sq, (torch.tensor(x, dtype=torch.float64), y), [model.w2], [model.w1], 0.0)
    assert still.distance == 0 and still.cosine == pytest.approx(1.0)
    assert model.w1.item() == w1                # left as found


def test_gradient_shift_leaves_model_and_rng_as_found():
    torch.manual_seed(2)
    model = MLP(widths=(16, 16), norm=noisy_norm("bn", shift_std=0.5))
    x, y = torch.randn(32, 784), torch.randint(0, 10, (32,))
    F.cross_entropy(model(x), y).backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    layer = [model.hidden[1].linear.weight]
    earlier = list(model.hidden[0].parameters())
    res = gradient_shift(model, F.cross_entropy, (x, y), layer, earlier, lr=0.5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
    assert torch.equal(torch.get_rng_state(), rng)
    assert res.distance > 0 and -1 <= res.cosine <= 1


def test_gradient_shift_argument_errors():
    model = MLP(widths=(8, 8), norm=None)
    x, y = torch.randn(4, 784), torch.randint(0, 10, (4,))
    w = [model.hidden[1].linear.weight]
    with pytest.raises(ValueError, match="first layer"):
        gradient_shift(model, F.cross_entropy, (x, y), w, [], 0.1)
    with pytest.raises(ValueError, match="share"):
        gradient_shift(model, F.cross_entropy, (x, y), w, w + [model.hidden[0].linear.weight], 0.1)
    with pytest.raises(ValueError, match="no parameters"):
        gradient_shift(model, F.cross_entropy, (x, y), [], w, 0.1)


def test_gradient_shift_recorder_as_fit_callback_does_not_change_training():
    g = torch.Generator().manual_seed(0)
    xtr, ytr = torch.rand(600, 1, 28, 28, generator=g), torch.randint(0, 10, (600,), generator=g)
    data = ((xtr, ytr), (xtr[:100], ytr[:100]))

    def layers(m):
        return {"h2": ([m.hidden[1].linear.weight], list(m.hidden[0].parameters())),
                "out": ([m.out.weight], [p for b in m.hidden for p in b.parameters()])}

    seed_everything(0)
    h1 = fit(MLP(widths=(16, 16), norm="bn"), data, steps=20, eval_every=10, device="cpu")
    seed_everything(0)
    rec = GradientShiftRecorder(F.cross_entropy, [(xtr[:30], ytr[:30]), (xtr[30:60], ytr[30:60])], layers, lr=0.1)
    h2 = fit(MLP(widths=(16, 16), norm="bn"), data, steps=20, eval_every=10, callback=rec, callback_every=10,
             device="cpu")
    assert h1.same_results(h2)
    s = rec.summary()
    assert set(s) == {"h2", "out"} and rec.steps == [0, 10, 20]
    for v in s.values():
        assert v["relative"].shape == (3,) and np.all(v["distance"] > 0) and np.all(np.abs(v["cosine"]) <= 1)

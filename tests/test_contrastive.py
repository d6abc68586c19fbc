"""bnlib.lab.contrastive: views, grouped and shuffled encoding, the MoCo update, the linear probe."""

import copy

import pytest
import torch

from bnlib.lab import contrastive as C

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def digits(n=64, seed=0):
    """Synthetic 28x28 images with a blob inside the central 20x20 (so that 3-pixel shifts keep it whole)."""
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 4:24, 4:24] = torch.rand(n, 1, 20, 20, generator=gen(seed))
    return x


def test_augment_is_a_random_shift_plus_noise():
    x = digits(8)
    a, b = C.augment(x, gen(1)), C.augment(x, gen(1))
    assert torch.equal(a, b) and a.shape == x.shape
    shifted = C.augment(x, gen(2), noise=0.0)
    torch.testing.assert_close(shifted.sum((1, 2, 3)), x.sum((1, 2, 3)))  # a translation: nothing lost
    assert not torch.equal(shifted, x)
    # each view is the image moved by (dy, dx) in [-3, 3]
    for i in range(8):
        assert any(torch.equal(shifted[i], torch.roll(x[i], (dy, dx), (1, 2)))
                   for dy in range(-3, 4) for dx in range(-3, 4))


def test_grouped_encoding_uses_each_groups_statistics():
    torch.manual_seed(0)
    enc = C.Encoder("bn")
    x = digits(16)
    order = torch.randperm(16, generator=gen(3))
    with torch.no_grad():
        out = C._grouped(enc, x, 4, order)
        for g in range(4):
            idx = order[4 * g:4 * g + 4]  # the examples encoded together in group g
            torch.testing.assert_close(out[idx], enc(x[idx]))
        plain = C._grouped(enc, x, 4)
        torch.testing.assert_close(plain[:4], enc(x[:4]))
        assert not torch.allclose(plain, enc(x))  # statistics of 4 images, not of 16
        gn = C.Encoder("gn")  # per-example normalization: grouping and order change nothing
        torch.testing.assert_close(C._grouped(gn, x, 4, order), gn(x), rtol=1e-5, atol=1e-6)


def test_moco_step_updates_queue_and_key_encoder():
    torch.manual_seed(0)
    enc = C.Encoder("bn", width=8, dim=4)
    opt = torch.optim.SGD(enc.parameters(), lr=0.1)
    moco = C.MoCo(enc, mode="shuffle", groups=2, queue=12, tau=0.2, momentum=0.9, generator=gen(0))
    assert all(not p.requires_grad for p in moco.key_encoder.parameters())
    x = digits(4)
    views = C.augment(x, gen(1)), C.augment(x, gen(2))
    with torch.no_grad():
        scores = C.MoCo(copy.deepcopy(enc), mode="bn", groups=2, queue=12, tau=0.2, momentum=0.9,
                        generator=gen(0))(*views)
    assert scores.shape == (4, 13)  # the positive, then the 12 queued keys
    old_queue = moco.queue.clone()
    key_before = [p.clone() for p in moco.key_encoder.parameters()]
    loss = C.MocoStep(moco, opt)(views, torch.zeros(4, dtype=torch.long))
    assert loss.ndim == 0 and torch.isfinite(loss) and len(moco.accuracy) == 1
    assert torch.equal(moco.queue[4:], old_queue[:8])  # the 4 new keys first, the oldest 4 dropped
    torch.testing.assert_close(moco.queue[:4].norm(dim=1), torch.ones(4))
    assert "queue" in dict(moco.named_buffers())
    for kb, ka, q in zip(key_before, moco.key_encoder.parameters(), enc.parameters()):
        torch.testing.assert_close(ka, 0.9 * kb + 0.1 * q.detach())  # k ← m·k + (1 − m)·q, after the step
    with pytest.raises(ValueError, match="mode"):
        C.MoCo(enc, mode="sync", groups=2, queue=8, tau=0.2, momentum=0.9, generator=gen(0))


@pytest.mark.parametrize("dev", DEVICES)
def test_train_moco_runs_and_is_deterministic(dev):
    x = digits(64)
    runs = [C.train_moco(x, mode, steps=6, batch_size=16, queue=32, width=8, seed=1, dev=dev)
            for mode in ("shuffle", "shuffle", "bn", "gn")]
    (e1, h1, a1), (e2, h2, a2) = runs[0], runs[1]
    assert h1.train_loss == h2.train_loss and a1 == a2 and len(a1) == 6
    assert all(torch.equal(p, q) for p, q in zip(e1.parameters(), e2.parameters()))
    assert h1.train_loss != runs[2][1].train_loss  # shuffling changes what the keys are normalized with
    assert next(runs[3][0].parameters()).device.type == dev
    assert C.features(runs[3][0], x[:5]).shape == (5, 8)


def test_linear_probe():
    g = gen(0)
    y = torch.randint(0, 10, (400,), generator=g)
    centers = torch.randn(10, 20, generator=g) * 4
    f = centers[y] + torch.randn(400, 20, generator=g) * 0.3  # separable clusters
    assert C.linear_probe((f[:300], y[:300]), (f[300:], y[300:])) == 1.0
    noise = torch.randn(400, 6, generator=g)  # features that say nothing about the label
    assert C.linear_probe((noise[:300], y[:300]), (noise[300:], y[300:])) < 0.35


def test_pretext_accuracy_same_weights_two_groupings(monkeypatch):
    torch.manual_seed(0)
    enc = C.Encoder("bn", width=8)
    x = digits(32)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    a = C.pretext_accuracy(enc, x, groups=4, shuffle=False, generator=gen(1))
    b = C.pretext_accuracy(enc, x, groups=4, shuffle=False, generator=gen(1))
    assert a == b and 0.0 <= a <= 1.0 and enc.training
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())  # no trace in the buffers
    # identical views (no noise, no shift): every query's nearest key is its own under either grouping for GN
    gn = C.Encoder("gn", width=8)
    monkeypatch.setattr(C, "augment", lambda images, generator: images)
    assert C.pretext_accuracy(gn, x, groups=4, shuffle=True, generator=gen(2)) == 1.0
    assert C.pretext_accuracy(enc, x, groups=4, shuffle=False, generator=gen(2)) == 1.0

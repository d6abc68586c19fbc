"""Shifted MNIST (bnlib.lab.shift): reproducible, in range, shapes kept, stronger with severity, bad input refused."""

import math

import pytest
import torch

from bnlib.lab.shift import CORRUPTIONS, SEVERITIES, STRENGTHS, corrupt

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def digits(n=64, seed=0):
    """Synthetic MNIST-like images: a dark background with a bright blob and stroke, values in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    centre = 10 + 8 * torch.rand(n, 2, generator=g)
    r2 = (yy - centre[:, :1, None]) ** 2 + (xx - centre[:, 1:, None]) ** 2
    blob = torch.exp(-r2 / 12)
    stroke = ((xx - 14).abs() < 1.5) & ((yy - 14).abs() < 8)
    x = torch.clamp(blob + stroke * torch.rand(n, 1, 1, generator=g), 0, 1)
    return x.unsqueeze(1)


@pytest.fixture(scope="module")
def images():
    return digits()


def mean_distance(a, b):
    return (a - b).flatten(1).norm(dim=1).mean().item()


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@pytest.mark.parametrize("severity", SEVERITIES)
def test_same_call_gives_identical_tensor(images, corruption, severity):
    a = corrupt(images, corruption, severity)
    b = corrupt(images.clone(), corruption, severity)
    assert torch.equal(a, b)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_seed_selects_the_draws(images, corruption):
    a, b = corrupt(images, corruption, 3, seed=0), corrupt(images, corruption, 3, seed=1)
    if corruption in ("contrast", "brightness", "blur"):
        assert torch.equal(a, b)        # no randomness
    else:
        assert not torch.equal(a, b)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@pytest.mark.parametrize("severity", SEVERITIES)
def test_shape_dtype_range_kept_and_input_untouched(images, corruption, severity):
    before = images.clone()
    out = corrupt(images, corruption, severity)
    assert out.shape == images.shape and out.dtype == images.dtype and out.device == images.device
    assert out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()
    assert torch.equal(images, before)
    assert out.data_ptr() != images.data_ptr()


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_distance_from_clean_grows_with_severity(images, corruption):
    d = [mean_distance(corrupt(images, corruption, s), images) for s in (0,) + SEVERITIES]
    assert d[0] == 0
    assert all(b > a for a, b in zip(d, d[1:])), d


def test_float64_kept():
    x = digits(8).double()
    for c in CORRUPTIONS:
        out = corrupt(x, c, 5)
        assert out.dtype == torch.float64 and out.min() >= 0 and out.max() <= 1


def test_each_corruption_does_what_it_says(images):
    x = images
    noise = corrupt(x, "gaussian_noise", 2) - x                                 # σ = 0.2 before clipping
    inside = (x > 0.3) & (x < 0.7)
    assert abs(noise[inside].std().item() - 0.2) < 0.03
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(corrupt(x, "contrast", 5) - m, 0.1 * (x - m))
    torch.testing.assert_close(corrupt(x, "brightness", 4), 0.4 + 0.6 * x)
    full = corrupt(x, "inversion", 5)
    torch.testing.assert_close(full, 1 - x)
    flipped = [(corrupt(x, "inversion", s) - x).abs().flatten(1).sum(1) > 0 for s in SEVERITIES]
    for a, b in zip(flipped, flipped[1:]):
        assert bool((b | ~a).all())                                              # nested: once inverted, stays
    assert abs(flipped[1].float().mean().item() - STRENGTHS["inversion"][1]) < 0.2
    # blur keeps the total ink away from the border (the kernel sums to 1) and lowers the peak
    blurred = corrupt(x, "blur", 5)
    torch.testing.assert_close(blurred.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)), rtol=2e-2, atol=0.5)
    assert (blurred.amax(dim=(1, 2, 3)) < x.amax(dim=(1, 2, 3))).all()


def test_translation_moves_ink_by_whole_pixels():
    x = torch.zeros(50, 1, 28, 28)
    x[:, 0, 14, 14] = 1.0                                                        # one lit pixel in the centre
    for severity in SEVERITIES:
        out = corrupt(x, "translation", severity)
        k = STRENGTHS["translation"][severity - 1]
        assert torch.equal(out.sum(dim=(1, 2, 3)), torch.ones(50))              # moved, not smeared or lost
        pos = out[:, 0].flatten(1).argmax(1)
        dy, dx = pos // 28 - 14, pos % 28 - 14
        length = (dx.double() ** 2 + dy.double() ** 2).sqrt()
        assert (length - k).abs().max() <= math.sqrt(0.5) + 1e-9               # rounding of each coordinate


def test_rotation_keeps_a_centred_disc():
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    r = ((yy - 13.5) ** 2 + (xx - 13.5) ** 2).sqrt()
    disc = (r < 6).float().expand(4, 1, 28, 28)
    for severity in SEVERITIES:
        out = corrupt(disc, "rotation", severity)
        torch.testing.assert_close(out[..., r < 4.5], disc[..., r < 4.5])      # inside: still lit
        torch.testing.assert_close(out[..., r > 7.5], disc[..., r > 7.5])      # outside: still dark
        torch.testing.assert_close(out.sum(), disc.sum(), rtol=2e-2, atol=0)


@pytest.mark.parametrize("dev", DEVICES)
def test_runs_on_the_images_device(dev):
    x = digits(8).to(dev)
    for c in CORRUPTIONS:
        out = corrupt(x, c, 3)
        assert out.device == x.device
        torch.testing.assert_close(out.cpu(), corrupt(x.cpu(), c, 3), atol=1e-5, rtol=0)


def test_severity_zero_is_a_clean_copy(images):
    out = corrupt(images, "rotation", 0)
    assert torch.equal(out, images) and out.data_ptr() != images.data_ptr()


@pytest.mark.parametrize("bad, match", [
    (dict(corruption="fog"), "unknown corruption 'fog'"),
    (dict(severity=6), "severity must be an integer in 0..5"),
    (dict(severity=-1), "severity must be an integer"),
    (dict(severity=2.0), "severity must be an integer"),
    (dict(severity=True), "severity must be an integer"),
    (dict(seed=-3), "seed must be a non-negative integer"),
])
def test_bad_arguments_refused(images, bad, match):
    kw = dict(corruption="contrast", severity=2) | bad
    with pytest.raises(ValueError, match=match):
        corrupt(images, kw.pop("corruption"), kw.pop("severity"), **kw)


def test_bad_images_refused():
    with pytest.raises(ValueError, match=r"shape \(N, C, H, W\)"):
        corrupt(torch.rand(28, 28), "blur", 1)
    with pytest.raises(TypeError, match="floating-point"):
        corrupt(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), "blur", 1)
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        corrupt(torch.rand(2, 1, 28, 28) * 255, "blur", 1)
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        corrupt(torch.full((2, 1, 28, 28), float("nan")), "blur", 1)
    with pytest.raises(TypeError, match="tensor of images"):
        corrupt([[0.5]], "blur", 1)


@pytest.mark.mnist
def test_real_mnist_in_range_and_ordered():
    from bnlib.lab.data import load_mnist
    _, (x, _) = load_mnist()
    x = x[:256]
    for c in CORRUPTIONS:
        d = [mean_distance(corrupt(x, c, s), x) for s in SEVERITIES]
        assert all(b > a for a, b in zip(d, d[1:])), (c, d)
        assert corrupt(x, c, 5).min() >= 0 and corrupt(x, c, 5).max() <= 1

"""Shifted MNIST: deterministic corruptions of test images at five severities, made by code (nothing downloaded).

The images are what :func:`bnlib.lab.data.load_mnist` returns: float tensors ``(N, C, H, W)`` with values in
[0, 1] (0 the background, 1 the ink). Every corruption keeps the shape, the dtype, the device and the range::

    (_, _), (x_test, y_test) = load_mnist()
    x_shifted = corrupt(x_test, "contrast", severity=3)

======================  ================================================================  =====================
corruption              what severity s = 1..5 does                                       strength per severity
======================  ================================================================  =====================
``gaussian_noise``      x + σ·z, z ~ N(0, 1) per pixel, clipped to [0, 1]                  σ = 0.1 ... 0.5
``contrast``            m + c·(x − m), m the image's mean                                  c = 0.5 ... 0.1
``brightness``          b + (1 − b)·x: the background rises to b, the ink stays at 1       b = 0.1 ... 0.5
``inversion``           1 − x for a fraction p of the images (the others unchanged)        p = 0.2 ... 1.0
``blur``                Gaussian blur (replicated border)                                  σ = 0.5 ... 1.5 px
``rotation``            rotation about the centre by ±θ (sign drawn per image), bilinear   θ = 10 ... 60°
``translation``         shift by round(k·(cos φ, sin φ)) pixels (φ drawn per image),       k = 1 ... 5 px
                        zeros shifted in
======================  ================================================================  =====================

Severity 0 is the clean image (a copy). Random draws come from a CPU ``torch.Generator`` seeded by the corruption
and ``seed`` alone -- *not* by the severity -- so the five severities of one corruption share their draws (the same
noise pattern, the same images inverted, the same rotation signs and directions) and differ only in strength: each
severity is the previous one made stronger, and the distance from the clean images grows with it. The draws depend
on an image's position in the batch, so corrupt the whole test set once rather than each batch separately.
Everything is computed with torch alone, on the images' device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CORRUPTIONS", "SEVERITIES", "STRENGTHS", "corrupt"]

#: The strength of each corruption at severities 1..5 (units in the module docstring's table).
STRENGTHS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.1, 0.2, 0.3, 0.4, 0.5),      # σ of the added noise
    "contrast": (0.5, 0.4, 0.3, 0.2, 0.1),            # factor c on the deviation from the image mean
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),          # background level b
    "inversion": (0.2, 0.4, 0.6, 0.8, 1.0),           # fraction p of images inverted
    "blur": (0.5, 0.75, 1.0, 1.25, 1.5),              # σ of the Gaussian kernel, pixels
    "rotation": (10.0, 20.0, 30.0, 45.0, 60.0),       # angle θ, degrees
    "translation": (1.0, 2.0, 3.0, 4.0, 5.0),         # shift length k, pixels
}

#: The corruptions, in the order of :data:`STRENGTHS`.
CORRUPTIONS: tuple[str, ...] = tuple(STRENGTHS)

#: The severities (0, the clean image, is also accepted by :func:`corrupt`).
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)


def _generator(corruption: str, seed: int) -> torch.Generator:
    """The CPU generator of one corruption: seeded by the corruption's index and ``seed``, not by the severity."""
    return torch.Generator().manual_seed(1_000_003 * int(seed) + CORRUPTIONS.index(corruption))


def _check(x: Tensor, corruption: str, severity: int, seed: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"corrupt() expects a tensor of images, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"corrupt() expects images of shape (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"corrupt() expects floating-point images in [0, 1] (as load_mnist gives), got {x.dtype}")
    if x.numel() and not (x.min() >= 0 and x.max() <= 1):   # also refuses NaN
        raise ValueError("corrupt() expects values in [0, 1] (as load_mnist gives), "
                         f"got min {x.min().item():.3g}, max {x.max().item():.3g}")
    if corruption not in STRENGTHS:
        raise ValueError(f"unknown corruption {corruption!r}; valid: {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, int) or not 0 <= severity <= len(SEVERITIES):
        raise ValueError(f"severity must be an integer in 0..{len(SEVERITIES)} (0 = clean), got {severity!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _gaussian_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A normalized 1-D Gaussian kernel of radius ceil(3σ): its weights are positive and sum to 1."""
    radius = math.ceil(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-t.square() / (2 * sigma ** 2))
    return (k / k.sum()).to(dtype=dtype, device=device)


def _blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of every channel; a convex combination of pixels, so the range is kept."""
    n, c, h, w = x.shape
    k = _gaussian_kernel(sigma, x.dtype, x.device)
    r = (len(k) - 1) // 2
    y = x.reshape(n * c, 1, h, w)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))   # along the rows
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))   # along the columns
    return y.reshape(n, c, h, w).clamp_(0, 1)   # clamp: rounding only


def _rotate(x: Tensor, degrees: float, gen: torch.Generator) -> Tensor:
    """Rotate each image by ±degrees about its centre (sign drawn per image); bilinear, zeros outside."""
    n = x.shape[0]
    sign = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
    a = sign * math.radians(degrees)
    cos, sin, zero = torch.cos(a), torch.sin(a), torch.zeros(n, dtype=torch.float64)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(dtype=x.dtype, device=x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp_(0, 1)


def _translate(x: Tensor, k: float, gen: torch.Generator) -> Tensor:
    """Shift each image by round(k·cos φ) columns and round(k·sin φ) rows, φ drawn per image; zeros shifted in."""
    n, _, h, w = x.shape
    phi = torch.rand(n, generator=gen, dtype=torch.float64) * (2 * math.pi)
    dx = torch.round(k * torch.cos(phi)).long().tolist()
    dy = torch.round(k * torch.sin(phi)).long().tolist()
    out = torch.zeros_like(x)
    for i, (sx, sy) in enumerate(zip(dx, dy)):
        # out[:, y + sy, x + sx] = x[:, y, x] where both are inside the image
        out[i, :, max(sy, 0):h + min(sy, 0), max(sx, 0):w + min(sx, 0)] = \
            x[i, :, max(-sy, 0):h + min(-sy, 0), max(-sx, 0):w + min(-sx, 0)]
    return out


def corrupt(x: Tensor, corruption: str, severity: int, *, seed: int = 0) -> Tensor:
    """A corrupted copy of the images ``x``.

    Args:
        x: images ``(N, C, H, W)``, floating point, values in [0, 1] (as :func:`bnlib.lab.data.load_mnist`
            returns them); any device.
        corruption: one of :data:`CORRUPTIONS`.
        severity: 1 (mild) .. 5 (strong), or 0 for a clean copy.
        seed: selects the random draws (noise, which images are inverted, rotation signs, shift directions);
            the same ``(x, corruption, seed)`` gives the same draws at every severity.

    Returns:
        Tensor: a new tensor with the shape, dtype and device of ``x``, values in [0, 1]; the same call always
        returns the same values.

    Raises:
        TypeError, ValueError: ``x`` is not a floating-point 4-D tensor in [0, 1], or the corruption, severity or
        seed is not one of the valid values.
    """
    _check(x, corruption, severity, seed)
    if severity == 0:
        return x.clone()
    s = STRENGTHS[corruption][severity - 1]
    gen = _generator(corruption, seed)
    if corruption == "gaussian_noise":
        z = torch.randn(x.shape, generator=gen).to(dtype=x.dtype, device=x.device)
        return (x + s * z).clamp_(0, 1)                              # x + σ z, clipped
    if corruption == "contrast":
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        return (m + s * (x - m)).clamp_(0, 1)                        # m + c (x − m); clamp: rounding only
    if corruption == "brightness":
        return (s + (1 - s) * x).clamp_(0, 1)                        # b + (1 − b) x
    if corruption == "inversion":
        u = torch.rand(x.shape[0], generator=gen)                    # image i inverted when u_i < p
        flip = (u < s).to(x.device).view(-1, 1, 1, 1)               # u in [0, 1): p = 1 inverts all
        return torch.where(flip, 1 - x, x)
    if corruption == "blur":
        return _blur(x, s)
    if corruption == "rotation":
        return _rotate(x, s, gen)
    return _translate(x, s, gen)                                     # "translation"

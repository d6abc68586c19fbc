"""The teaching implementation of Batch Normalization, in NumPy.

This module is the one the chapter *The algorithm* (``chapters/algorithm.ipynb``) walks through line
by line. It favours clarity over speed: every quantity of Algorithm 1 of Ioffe & Szegedy (2015) gets
its own name, and the backward pass is given twice:

* :func:`batchnorm_backward_graph` goes node by node through the computational graph, each local
  derivative written next to the forward operation it belongs to;
* :func:`batchnorm_backward` is the simplified closed form that needs only two reductions.

Shapes follow PyTorch: ``x`` is ``(N, C)`` or ``(N, C, *spatial)`` and the statistics of channel
``c`` are taken over every axis but axis 1, so each statistic averages ``m = N * prod(spatial)``
values. ``gamma`` and ``beta`` have shape ``(C,)``.

:func:`numerical_gradient` is the central-difference check used in the tests and in the book.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "batchnorm_forward",
    "batchnorm_backward",
    "batchnorm_backward_graph",
    "batchnorm_inference",
    "numerical_gradient",
]


def _axes_and_shape(x: np.ndarray, gamma: np.ndarray):
    """Reduction axes (all but 1) and the broadcast shape ``(1, C, 1, ...)`` of per-channel values."""
    if x.ndim < 2:
        raise ValueError(f"expected x of shape (N, C) or (N, C, *spatial), got shape {x.shape}")
    C = x.shape[1]
    if gamma.shape != (C,):
        raise ValueError(f"expected gamma and beta of shape ({C},) to match x's {C} channels, got {gamma.shape}")
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, C) + (1,) * (x.ndim - 2)
    return axes, shape


def batchnorm_forward(x, gamma, beta, eps=1e-5):
    r"""Training-mode forward pass (Algorithm 1 of Ioffe & Szegedy, 2015).

    .. math::
        \mu_B = \frac1m\sum_i x_i,\quad
        \sigma_B^2 = \frac1m\sum_i (x_i-\mu_B)^2,\quad
        \hat x_i = \frac{x_i-\mu_B}{\sqrt{\sigma_B^2+\epsilon}},\quad
        y_i = \gamma\hat x_i + \beta

    Returns ``(y, cache)``; ``cache`` is a dict of every intermediate value (printed in the book,
    reused by the backward passes).
    """
    x = np.asarray(x)
    gamma = np.asarray(gamma, dtype=x.dtype)
    beta = np.asarray(beta, dtype=x.dtype)
    if beta.shape != gamma.shape:
        raise ValueError(f"expected beta of shape {gamma.shape} like gamma, got {beta.shape}")
    axes, shape = _axes_and_shape(x, gamma)
    m = x.size // x.shape[1]
    if m < 2:
        raise ValueError(
            f"expected more than 1 value per channel to compute batch statistics, got x of shape {x.shape}")

    mu = x.mean(axis=axes, keepdims=True)  # μ_B = (1/m) Σ x_i
    xmu = x - mu  # x_i − μ_B
    var = (xmu**2).mean(axis=axes, keepdims=True)  # σ²_B = (1/m) Σ (x_i − μ_B)²  (biased; two-pass, stable)
    std = np.sqrt(var + eps)  # √(σ²_B + ε)
    inv_std = 1.0 / std
    xhat = xmu * inv_std  # x̂_i
    y = gamma.reshape(shape) * xhat + beta.reshape(shape)  # y_i = γ x̂_i + β

    cache = dict(x=x, mu=mu, xmu=xmu, var=var, std=std, inv_std=inv_std, xhat=xhat,
                 gamma=gamma, beta=beta, eps=eps, axes=axes, shape=shape, m=m)
    return y, cache


def batchnorm_backward(dy, cache):
    r"""Closed-form backward pass: two reductions, then one elementwise expression.

    With :math:`g = \partial L/\partial y` and :math:`m` values per channel,

    .. math::
        \frac{\partial L}{\partial\beta} = \sum_i g_i,\qquad
        \frac{\partial L}{\partial\gamma} = \sum_i g_i\hat x_i,\qquad
        \frac{\partial L}{\partial x_i} = \frac{\gamma}{m\sqrt{\sigma_B^2+\epsilon}}
            \Big(m g_i - \sum_j g_j - \hat x_i \sum_j g_j \hat x_j\Big).

    Returns ``(dx, dgamma, dbeta)``.
    """
    dy = np.asarray(dy)
    xhat, axes, shape, m = cache["xhat"], cache["axes"], cache["shape"], cache["m"]
    if dy.shape != xhat.shape:
        raise ValueError(f"expected dy of shape {xhat.shape} like the forward input, got {dy.shape}")
    dbeta = dy.sum(axis=axes)  # Σ g_i
    dgamma = (dy * xhat).sum(axis=axes)  # Σ g_i x̂_i
    k = cache["gamma"].reshape(shape) * cache["inv_std"] / m
    dx = k * (m * dy - dbeta.reshape(shape) - xhat * dgamma.reshape(shape))
    return dx, dgamma, dbeta


def batchnorm_backward_graph(dy, cache):
    """Backward pass node by node through the computational graph of :func:`batchnorm_forward`.

    Each step undoes one forward line, in reverse order; the comment gives the forward line and its
    local derivative. Sums appear wherever the forward broadcast a per-channel value over the batch.
    Returns ``(dx, dgamma, dbeta)``, equal to :func:`batchnorm_backward` up to rounding.
    """
    c = cache
    axes, shape, m = c["axes"], c["shape"], c["m"]
    gamma = c["gamma"].reshape(shape)

    # y = γ x̂ + β            ∂y/∂β = 1, ∂y/∂γ = x̂, ∂y/∂x̂ = γ
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * c["xhat"]).sum(axis=axes)
    dxhat = dy * gamma
    # x̂ = xmu · inv_std       ∂x̂/∂xmu = inv_std, ∂x̂/∂inv_std = xmu (summed: inv_std is per channel)
    dxmu = dxhat * c["inv_std"]
    dinv_std = (dxhat * c["xmu"]).sum(axis=axes, keepdims=True)
    # inv_std = 1 / std        ∂inv_std/∂std = −1/std²
    dstd = -dinv_std / c["std"] ** 2
    # std = √(var + ε)         ∂std/∂var = 1 / (2 std)
    dvar = dstd / (2.0 * c["std"])
    # var = mean(xmu²)         ∂var/∂xmu_i = 2 xmu_i / m
    dxmu = dxmu + dvar * 2.0 * c["xmu"] / m
    # xmu = x − μ              ∂xmu/∂x = 1, ∂xmu/∂μ = −1 (summed)
    dx = dxmu.copy()
    dmu = -dxmu.sum(axis=axes, keepdims=True)
    # μ = mean(x)              ∂μ/∂x_i = 1/m
    dx = dx + dmu / m
    return dx, dgamma, dbeta


def batchnorm_inference(x, gamma, beta, mean, var, eps=1e-5):
    r"""Inference-mode BN (Algorithm 2): a fixed affine map per channel.

    .. math:: y = \frac{\gamma}{\sqrt{\mathrm{Var}[x]+\epsilon}}\,x
                 + \Big(\beta - \frac{\gamma\,\mathrm{E}[x]}{\sqrt{\mathrm{Var}[x]+\epsilon}}\Big)

    ``mean`` and ``var`` are the population statistics, shape ``(C,)``.
    """
    x = np.asarray(x)
    gamma = np.asarray(gamma, dtype=x.dtype)
    _, shape = _axes_and_shape(x, gamma)
    scale = gamma / np.sqrt(np.asarray(var, dtype=x.dtype) + eps)
    shift = np.asarray(beta, dtype=x.dtype) - scale * np.asarray(mean, dtype=x.dtype)
    return scale.reshape(shape) * x + shift.reshape(shape)


def numerical_gradient(f, x, dy=None, h=1e-5):
    r"""Central-difference gradient of ``sum(f(x) * dy)`` with respect to ``x``.

    .. math:: \frac{\partial L}{\partial x_k} \approx \frac{L(x + h e_k) - L(x - h e_k)}{2h}

    ``f`` maps an array to an array; ``dy`` is the upstream gradient (default: all ones, which for
    BN gives a gradient of almost zero and so makes a poor check — the book shows why). ``x`` is
    perturbed in place and restored. Use float64.
    """
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"expected a floating-point array, got dtype {x.dtype}")
    if dy is None:
        dy = np.ones_like(f(x))
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=[["readwrite"]])
    while not it.finished:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        plus = np.sum(f(x) * dy)
        x[i] = old - h
        minus = np.sum(f(x) * dy)
        x[i] = old
        grad[i] = (plus - minus) / (2 * h)
        it.iternext()
    return grad

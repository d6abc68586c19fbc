r"""Batch Normalization in training mode as the paper and the chapter *The algorithm* write it.

Per channel, over the :math:`m` values of the batch (``N`` times the spatial size), the forward pass is
Algorithm 1 of Ioffe & Szegedy (2015) with the two-pass variance, and the backward pass is the closed form
derived in the chapter (the boxed formula):

.. math::
    \frac{\partial L}{\partial x_i} = \frac{\gamma}{m\sqrt{\sigma_B^2+\epsilon}}
    \Big(m\,g_i - \sum_j g_j - \hat x_i \sum_j g_j \hat x_j\Big), \qquad
    \frac{\partial L}{\partial \gamma} = \sum_i g_i \hat x_i, \qquad
    \frac{\partial L}{\partial \beta} = \sum_i g_i .

This is the plain version, line by line. :func:`bnlib.functional.batch_norm` runs the tuned one,
:mod:`bnlib.fast`, which computes the same numbers with fewer passes over memory; inside
``with bnlib.functional.use_closed_form():`` it runs this one instead (tested equal). :func:`input_gradient` is
also the backward of :class:`bnlib.SyncBatchNorm`, with sums over every replica.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .core import channel_shape, reduce_dims, stat_dtype

__all__ = ["BatchNormFunction", "backward", "batch_norm_train", "input_gradient", "normalize"]


def normalize(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Algorithm 1's first three lines: ``(x̂, μ_B, σ²_B, 1/√(σ²_B + ε))``, statistics shaped ``(1, C, 1, ...)``."""
    dims = reduce_dims(x)
    mean = x.mean(dims, keepdim=True)  # μ_B = (1/m) Σ_i x_i   (first pass; rounded to x's dtype)
    d = x - mean  # x_i − μ_B
    d = d - d.mean(dims, keepdim=True)  # minus the rounding error of μ_B (Chan, Golub & LeVeque 1983)
    var = (d * d).mean(dims, keepdim=True)  # σ²_B = (1/m) Σ_i (x_i − μ_B)²   (second pass, never E[x²] − E[x]²)
    rstd = torch.rsqrt(var + eps)  # 1 / √(σ²_B + ε)
    return d * rstd, mean, var, rstd  # x̂_i = (x_i − μ_B) / √(σ²_B + ε)


def input_gradient(dy: Tensor, xhat: Tensor, scale: Tensor, sum_dy: Tensor, sum_dy_xhat: Tensor, m) -> Tensor:
    """The boxed formula: ∂L/∂x from ``dy`` = ∂L/∂y, x̂, ``scale`` = γ/√(σ²_B + ε), Σ dy, Σ dy·x̂ and m."""
    # ∂L/∂x_i = γ/(m√(σ²_B+ε)) · (m g_i − Σ_j g_j − x̂_i Σ_j g_j x̂_j) = γ/√(σ²_B+ε) · (g_i − ḡ − x̂_i · mean(g x̂))
    return scale * (dy - sum_dy / m - xhat * (sum_dy_xhat / m))


def batch_norm_train(input: Tensor, weight: Tensor | None, bias: Tensor | None,
                     eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Algorithm 1: ``(y, μ_B, σ²_B)``, y in ``input``'s dtype, the statistics ``(C,)`` (differentiable as written)."""
    x = input.to(stat_dtype(input))  # float32 arithmetic for float16/bfloat16 inputs
    xhat, mean, var, _ = normalize(x, eps)
    y = xhat if weight is None else xhat * weight.view(channel_shape(x))  # γ x̂
    y = y if bias is None else y + bias.view(channel_shape(x))  # y = γ x̂ + β
    return y.to(input.dtype), mean.view(-1), var.view(-1)


class BatchNormFunction(torch.autograd.Function):
    """Training-mode BN: ``forward(x, weight, bias, eps, update=None)`` returns ``(y, mean, var)``, the batch mean
    and *biased* variance per channel (non-differentiable, for the running averages). ``weight``, ``bias`` may be
    ``None``; ``update(mean, var)`` runs before anything is saved (:func:`bnlib.core.running_stats_updater`)."""

    @staticmethod
    def forward(ctx, input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, update=None):
        y, mean, var = batch_norm_train(input, weight, bias, eps)
        if update is not None:
            update(mean, var)
        ctx.eps, ctx.bias_dtype = eps, None if bias is None else bias.dtype
        ctx.save_for_backward(input, weight)  # x̂ is recomputed: the backward's own graph then reaches x
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy: Tensor, _dmean: Tensor, _dvar: Tensor):
        input, weight = ctx.saved_tensors
        return backward(input, weight, dy, ctx.eps, ctx.bias_dtype) + (None, None)


def backward(input: Tensor, weight: Tensor | None, dy: Tensor, eps: float,
             bias_dtype: torch.dtype | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(∂L/∂x, ∂L/∂γ, ∂L/∂β)`` from ``dy`` = ∂L/∂y (``None`` for a missing γ or β); differentiable as written."""
    x, g = input.to(stat_dtype(input)), dy.to(stat_dtype(input))
    xhat, _, _, rstd = normalize(x, eps)
    dims, shape, m = reduce_dims(x), channel_shape(x), x.numel() // x.shape[1]
    sum_g = g.sum(dims, keepdim=True)  # Σ g_i = ∂L/∂β
    sum_g_xhat = (g * xhat).sum(dims, keepdim=True)  # Σ g_i x̂_i = ∂L/∂γ
    scale = rstd if weight is None else rstd * weight.view(shape)  # γ / √(σ²_B + ε)
    grad_x = input_gradient(g, xhat, scale, sum_g, sum_g_xhat, m).to(input.dtype)
    grad_weight = None if weight is None else sum_g_xhat.view(-1).to(weight.dtype)
    grad_bias = None if bias_dtype is None else sum_g.view(-1).to(bias_dtype)
    return grad_x, grad_weight, grad_bias

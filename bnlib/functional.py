r"""Batch Normalization as a function of tensors, with a hand-written backward pass.

:func:`batch_norm` has exactly the signature and semantics of :func:`torch.nn.functional.batch_norm`
but is written in plain tensor operations, so that every step can be read (chapter *The algorithm*,
``chapters/algorithm.ipynb``). In training mode it calls :class:`BatchNormFunction`, a
:class:`torch.autograd.Function` whose backward is the closed form

.. math::
    \frac{\partial L}{\partial x} = \frac{\gamma}{\sqrt{\sigma_B^2+\epsilon}}
    \Big(g - \overline{g} - \hat x\,\overline{g\hat x}\Big),
    \qquad \overline{\,\cdot\,} = \text{mean over the } m \text{ values of a channel},

which needs just two reductions (:math:`\sum g` and :math:`\sum g\hat x`) instead of the dozen
nodes autograd would record. The backward is written in differentiable operations, so
``create_graph=True`` and double backward work.

Numerics:

* the variance is computed by :func:`torch.var_mean` (a single-pass Welford/Chan reduction in
  PyTorch), never as :math:`E[x^2]-E[x]^2`, which cancels catastrophically when
  :math:`|\mu| \gg \sigma`;
* float16 and bfloat16 inputs are normalized with float32 statistics and the result is returned in
  the input's dtype, as cuDNN and PyTorch do.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["batch_norm", "BatchNormFunction", "check_bn_input"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _reduce_dims(x: Tensor) -> list[int]:
    """Every dimension but the channel dimension 1."""
    return [0] + list(range(2, x.dim()))


def _channel_shape(x: Tensor) -> list[int]:
    """Shape ``(1, C, 1, ...)`` that broadcasts a per-channel vector against ``x``."""
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def check_bn_input(input: Tensor, training: bool, **per_channel: Tensor | None) -> None:
    """Raise a clear error when ``input`` cannot be batch-normalized.

    Checks that ``input`` is ``(N, C, *)`` with a floating dtype, that every per-channel tensor given
    by keyword (e.g. ``weight=...``) has exactly ``C`` elements, and in training mode that each
    channel has more than one value to compute a variance from.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"expected input to be a torch.Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(f"expected input of shape (N, C, *) with at least 2 dimensions, got shape {tuple(input.shape)}")
    if not input.is_floating_point():
        raise TypeError(f"expected a floating-point input, got dtype {input.dtype}")
    C = input.shape[1]
    for name, t in per_channel.items():
        if t is not None and t.numel() != C:
            raise ValueError(
                f"expected {name} to have one value per channel, i.e. {C} elements for input of shape "
                f"{tuple(input.shape)} (channels in dim 1), got {t.numel()}"
            )
    if training and input.numel() // max(C, 1) <= 1:
        raise ValueError(
            f"expected more than 1 value per channel when training, got input of shape {tuple(input.shape)}: "
            "batch statistics need at least two values per channel (use eval() for single examples)"
        )


class BatchNormFunction(torch.autograd.Function):
    """Training-mode BN: forward with batch statistics, closed-form backward.

    ``forward(x, weight, bias, eps)`` returns ``(y, mean, var)`` where ``mean`` and the *biased*
    ``var`` are the batch statistics per channel (float32 or float64), non-differentiable, returned
    so the caller can update running statistics without computing them twice. ``weight`` and
    ``bias`` may be ``None``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        dims, shape = _reduce_dims(x), _channel_shape(x)
        xs = x.float() if x.dtype in _LOW_PRECISION else x  # statistics never in half precision
        var, mean = torch.var_mean(xs, dims, correction=0, keepdim=True)  # σ²_B, μ_B (stable)
        rstd = torch.rsqrt(var + eps)  # 1 / √(σ²_B + ε)
        scale = rstd if weight is None else rstd * weight.to(rstd.dtype).view(shape)  # γ / √(σ²_B + ε)
        shift = -mean * scale  # β − γ μ_B / √(σ²_B + ε)
        if bias is not None:
            shift = shift + bias.to(rstd.dtype).view(shape)
        y = torch.addcmul(shift, xs, scale)  # y = γ x̂ + β as one fused multiply-add
        ctx.eps = eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.mark_non_differentiable(mean, var)
        return y.to(x.dtype), mean.view(-1), var.view(-1)

    @staticmethod
    def backward(ctx, dy: Tensor, _dmean, _dvar):
        x, weight, mean, rstd = ctx.saved_tensors
        dims, shape = _reduce_dims(x), _channel_shape(x)
        m = x.numel() // x.shape[1]
        xs = x.float() if x.dtype in _LOW_PRECISION else x
        g = dy.to(xs.dtype)
        if torch.is_grad_enabled():
            # create_graph=True: recompute the statistics from x so that this backward is itself
            # differentiable with respect to x (the saved ones were computed without a graph).
            var, mean = torch.var_mean(xs, dims, correction=0, keepdim=True)
            rstd = torch.rsqrt(var + ctx.eps)
        xhat = (xs - mean) * rstd  # x̂
        sum_g = g.sum(dims, keepdim=True)  # Σ g       = ∂L/∂β
        sum_gx = (g * xhat).sum(dims, keepdim=True)  # Σ g x̂  = ∂L/∂γ
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            k = rstd if weight is None else rstd * weight.to(rstd.dtype).view(shape)
            # ∂L/∂x = γ/√(σ²+ε) · (g − Σg/m − x̂ Σg x̂/m)
            dx = (k * (g - sum_g / m - xhat * (sum_gx / m))).to(x.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = sum_gx.view(-1).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            dbias = sum_g.view(-1).to(ctx.bias_dtype)
        return dx, dweight, dbias, None


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Batch Normalization with the semantics of :func:`torch.nn.functional.batch_norm`.

    Args:
        input: ``(N, C)`` or ``(N, C, *spatial)``; statistics are per channel (dim 1).
        running_mean, running_var: population estimates of shape ``(C,)``, or ``None``. In training
            mode they are updated in place,
            ``running = (1 - momentum) * running + momentum * batch``, with the *unbiased* batch
            variance (:math:`\frac{m}{m-1}\sigma_B^2`, Algorithm 2). In evaluation mode they are
            used to normalize and must be given.
        weight, bias: :math:`\gamma` and :math:`\beta` of shape ``(C,)``, or ``None`` (1 and 0).
        training: use batch statistics (``True``) or the running ones (``False``).
        momentum: weight of the new batch in the running averages (PyTorch's convention).
        eps: :math:`\epsilon` added to the variance.

    Returns:
        A tensor of the same shape, dtype and memory format as ``input``.
    """
    check_bn_input(input, training, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    if training:
        y, mean, var = BatchNormFunction.apply(input, weight, bias, eps)
        if running_mean is not None or running_var is not None:
            m = input.numel() // input.shape[1]
            with torch.no_grad():
                if running_mean is not None:
                    running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                if running_var is not None:
                    unbiased = var * (m / (m - 1))  # Var[x] estimate: m/(m−1) · σ²_B
                    running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        return y

    if running_mean is None or running_var is None:
        raise ValueError("expected running_mean and running_var in evaluation mode (training=False), got None")
    # Inference (Algorithm 2): a fixed affine map y = x·γ/√(Var+ε) + (β − γE[x]/√(Var+ε)).
    shape = _channel_shape(input)
    dtype = torch.float32 if input.dtype in _LOW_PRECISION else input.dtype
    scale = torch.rsqrt(running_var.to(dtype) + eps)
    if weight is not None:
        scale = scale * weight.to(dtype)
    shift = -running_mean.to(dtype) * scale
    if bias is not None:
        shift = shift + bias.to(dtype)
    return torch.addcmul(shift.view(shape), input.to(dtype), scale.view(shape)).to(input.dtype)

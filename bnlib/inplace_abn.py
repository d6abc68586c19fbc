r"""In-Place Activated Batch Normalization (Rota Bulò, Porzi & Kontschieder, 2018).

A BN layer followed by an activation keeps two full-size tensors for the backward pass: BN keeps its input
:math:`x` (to recompute :math:`\hat x`) and the activation keeps its own input or output. In-Place ABN fuses
the pair into one operation, ``z = leaky_relu(γ·x̂ + β)``, and keeps **only the output** ``z`` (plus a few
numbers per channel). The backward recovers everything else from ``z``:

.. math::
    y = \begin{cases} z & z \ge 0 \\ z / s & z < 0 \end{cases}, \qquad
    \frac{\partial L}{\partial y} = \begin{cases} g & z \ge 0 \\ s\,g & z < 0 \end{cases}, \qquad
    \hat x = \frac{y - \beta}{\gamma},

and then applies BN's closed-form backward to :math:`\hat x` and :math:`\partial L/\partial y`. The activation
must be invertible, so the negative slope :math:`s` must be positive: a ReLU (:math:`s = 0`) maps every
negative :math:`y` to 0 and the backward could not tell them apart.

**γ near zero.** :math:`\hat x = (y-\beta)/\gamma` divides by γ: for :math:`\gamma = 0` the output carries no
information about :math:`\hat x` at all, and for a tiny γ the rounding error of :math:`y` is multiplied by
:math:`1/|\gamma|`. The paper's code avoids this by using :math:`|\gamma| + \epsilon` as the scale, which changes
the function (a standard BN's weights then cannot be loaded unchanged). bnlib keeps BN's function exactly --
its outputs, gradients and running statistics equal ``F.leaky_relu(nn.BatchNorm2d(C)(x), s)`` -- and instead
keeps :math:`\hat x` for the backward in a step where some channel has :math:`|\gamma| <` ``min_abs_gamma``
(default 1e-3): that step saves no memory, but its gradients stay exact. ``InPlaceABN.last_step_kept_xhat``
says which case the last training step took.

Evaluation mode is ``leaky_relu`` of BN's fixed affine map (Algorithm 2), as for the separate pair.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .closed_form import input_gradient
from .core import channel_shape, check_batch, reduce_dims, running_stats_updater, shape_str, stat_dtype
from .modules import BatchNormBase

__all__ = ["InPlaceABN"]


class InPlaceABNFunction(torch.autograd.Function):
    """Training-mode ``leaky_relu(batch_norm(x))`` that saves its output, not its input, for the backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float, slope: float, keep_xhat: bool,
                update: Callable[[Tensor, Tensor], None] | None = None):
        dims, shape = reduce_dims(x), channel_shape(x)
        xs = x.to(stat_dtype(x))                                       # float32 arithmetic for half inputs
        var, mean = torch.var_mean(xs, dim=dims, correction=0)        # μ_B, σ²_B (biased): Algorithm 1
        inv_std = torch.rsqrt(var + eps)                               # 1/√(σ²_B + ε)
        xhat = (xs - mean.view(shape)) * inv_std.view(shape)           # x̂ = (x − μ_B)/√(σ²_B + ε)
        y = torch.addcmul(bias.view(shape), xhat, weight.view(shape))  # y = γ x̂ + β
        z = F.leaky_relu(y, slope)                                     # z = y (y ≥ 0), s·y (y < 0)
        if update is not None:  # the running averages, before saving (core.running_stats_updater says why)
            update(mean, var)
        # Saved for the backward: z (or, where γ is too small to invert, x̂) and per-channel numbers only.
        ctx.save_for_backward(xhat if keep_xhat else z, weight, bias, inv_std)
        ctx.keep_xhat, ctx.slope, ctx.dims, ctx.shape = keep_xhat, slope, dims, shape
        ctx.mark_non_differentiable(mean, var)
        return z.to(x.dtype), mean, var

    @staticmethod
    def backward(ctx, gz: Tensor, _gmean, _gvar):
        saved, weight, bias, inv_std = ctx.saved_tensors
        s, dims, shape = ctx.slope, ctx.dims, ctx.shape
        g = gz.to(inv_std.dtype)
        if ctx.keep_xhat:
            xhat = saved
            g = torch.where(torch.addcmul(bias.view(shape), xhat, weight.view(shape)) >= 0, g, g * s)
        else:
            z = saved
            positive = z >= 0
            g = torch.where(positive, g, g * s)                        # ∂L/∂y: the leaky ReLU's slope
            y = torch.where(positive, z, z / s)                        # y = z (z ≥ 0), z/s (z < 0)
            xhat = (y - bias.view(shape)) / weight.view(shape)         # x̂ = (y − β)/γ
        m = g.numel() // g.shape[1]
        sum_g = g.sum(dims, keepdim=True)                              # Σ ∂L/∂y  = ∂L/∂β
        sum_gx = (g * xhat).sum(dims, keepdim=True)                    # Σ ∂L/∂y·x̂ = ∂L/∂γ
        # BN's closed form (the boxed formula): ∂L/∂x = γ/√(σ²_B+ε) · (g − Σg/m − x̂·Σ(g x̂)/m)
        gx = input_gradient(g, xhat, (weight * inv_std).view(shape), sum_g, sum_gx, m)
        return gx.to(gz.dtype), sum_gx.view(-1).to(weight.dtype), sum_g.view(-1).to(bias.dtype), None, None, None, None


class InPlaceABN(BatchNormBase):
    """BN followed by a leaky ReLU, keeping only the output for the backward pass (In-Place ABN).

    Equal to ``F.leaky_relu(nn.BatchNormNd(num_features, eps=eps, momentum=momentum)(x), negative_slope)`` in
    outputs, gradients (input, γ, β) and running statistics, in training and evaluation mode, for ``(N, C)`` and
    ``(N, C, *spatial)`` inputs; a ``state_dict`` of torch.nn's ``BatchNorm*d`` loads into it unchanged. See the
    module docstring for what is saved and for γ near zero.

    Args:
        num_features: ``C``, the number of channels (dim 1 of the input).
        negative_slope: the leaky ReLU's slope for negative inputs; must be positive (invertible). Default 0.01.
        eps: ε added to the variance. Default 1e-5.
        momentum: weight of the newest batch in the running averages (``None``: cumulative). Default 0.1.
        min_abs_gamma: below this ``|γ|`` a training step keeps x̂ instead of inverting the affine map. Default 1e-3.
    """

    affine_in_eval = False  # a leaky ReLU follows the affine map: nothing to fold into the layer before

    def __init__(self, num_features: int, negative_slope: float = 0.01, eps: float = 1e-5,
                 momentum: float | None = 0.1, *, min_abs_gamma: float = 1e-3, device=None, dtype=None) -> None:
        if not negative_slope > 0:
            raise ValueError(
                f"InPlaceABN needs negative_slope > 0, got {negative_slope!r}: the backward recovers the BN "
                "output from the activation's output, and with a slope of 0 (a ReLU) every negative value maps to 0 "
                "and cannot be recovered; use BatchNorm followed by ReLU instead")
        if not min_abs_gamma >= 0:
            raise ValueError(f"expected min_abs_gamma >= 0, got {min_abs_gamma!r}")
        super().__init__(num_features, eps, momentum, affine=True, track_running_stats=True, device=device,
                         dtype=dtype)
        self.negative_slope = float(negative_slope)
        self.min_abs_gamma = float(min_abs_gamma)
        self.last_step_kept_xhat = False

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"InPlaceABN expected an (N, C) or (N, C, *spatial) input, got {input.dim()}D input "
                             f"of shape {shape_str(input)}")

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or input.numel() == 0:
            # Evaluation (and the empty batch): the pair itself; nothing to save memory on.
            return F.leaky_relu(super().forward(input), self.negative_slope)
        self._check_input_dim(input)
        self._check_num_channels(input)
        check_batch(input, True, self.eps)
        self._count_batch()
        assert self.weight is not None and self.bias is not None  # always affine (see __init__)
        keep = bool((self.weight.detach().abs() < self.min_abs_gamma).any())  # γ too small to invert
        self.last_step_kept_xhat = keep
        update = running_stats_updater(self.running_mean, self.running_var, input.numel() // input.shape[1],
                                       self._batch_weight())
        z, _, _ = InPlaceABNFunction.apply(input, self.weight, self.bias, self.eps, self.negative_slope, keep, update)
        return z

    def extra_repr(self) -> str:
        return (f"{self.num_features}, negative_slope={self.negative_slope}, eps={self.eps}, "
                f"momentum={self.momentum}, min_abs_gamma={self.min_abs_gamma}")

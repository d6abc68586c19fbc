r"""Normalizations with per-example statistics: Layer, Group and Instance Normalization.

Each example is normalized with statistics of its own values, so nothing depends on the rest of the batch:

* :class:`LayerNorm` (Ba, Kiros & Hinton 2016): over the last dimensions of each example;
* :class:`GroupNorm` (Wu & He 2018): over groups of channels (and the spatial positions) of each example;
* :class:`InstanceNorm1d` / :class:`InstanceNorm2d` (Ulyanov, Vedaldi & Lempitsky 2016): over the spatial
  positions of each channel of each example.

They are drop-in replacements for the torch.nn layers of the same names (same arguments, parameter and buffer
names, results to float64 precision), written in plain tensor operations without torch.nn.functional's kernels.
Variances come from :func:`torch.var_mean` with ``correction=0`` (never :math:`E[x^2]-E[x]^2`); float16 and
bfloat16 inputs are normalized with float32 statistics and the output is cast back to the input's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .core import (
    apply_affine,
    channel_shape,
    check_size,
    check_tensor,
    empty_batch,
    register_affine,
    reset_affine,
    to_stat_dtype,
    update_running_stats,
)
from .modules import NormBase

__all__ = ["GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNormBase", "LayerNorm"]


_ShapeLike = int | Sequence[int] | torch.Size


class LayerNorm(nn.Module):
    r"""Layer Normalization (Ba, Kiros & Hinton 2016), same interface and results as :class:`torch.nn.LayerNorm`.

    Each example is normalized with its own mean and (biased) variance over the last
    ``len(normalized_shape)`` dimensions, identically in training and evaluation; nothing depends on
    the rest of the batch and there are no running statistics.

    Args:
        normalized_shape: the trailing shape to normalize over (an int means the last dimension).
        eps: ε added to the variance. Default: 1e-5.
        elementwise_affine: learn ``weight`` (γ, init 1) and ``bias`` (β, init 0), both of shape
            ``normalized_shape`` (one value per normalized element, not per channel).
        bias: with ``elementwise_affine=True``, ``bias=False`` learns only γ.
        device, dtype: where and in which dtype to create the parameters.
    """

    weight: Tensor | None
    bias: Tensor | None

    def __init__(self, normalized_shape: _ShapeLike, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(normalized_shape, (Sequence, torch.Size)):  # an int (or NumPy / tensor integer)
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(check_size("normalized_shape", s) for s in normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        register_affine(self, self.normalized_shape, elementwise_affine, bias, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_affine(self)

    def forward(self, input: Tensor) -> Tensor:
        check_tensor(type(self).__name__, input)
        k = len(self.normalized_shape)
        if input.dim() < k or tuple(input.shape[input.dim() - k:]) != self.normalized_shape:
            raise ValueError(f"LayerNorm expected input with trailing shape {self.normalized_shape}, "
                             f"got input of shape {tuple(input.shape)}")
        xs = to_stat_dtype(input)
        dims = list(range(input.dim() - k, input.dim()))
        # μ = mean over the normalized dims, σ² = (1/H) Σ (x − μ)² (biased), per example
        var, mean = torch.var_mean(xs, dims, correction=0, keepdim=True)
        xhat = (xs - mean) * torch.rsqrt(var + self.eps)  # x̂ = (x − μ) / √(σ² + ε)
        return apply_affine(xhat, self.weight, self.bias, self.normalized_shape).to(input.dtype)  # y = γ ⊙ x̂ + β

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"bias={self.bias is not None}")


class GroupNorm(nn.Module):
    r"""Group Normalization (Wu & He 2018), same interface and results as :class:`torch.nn.GroupNorm`.

    The ``C`` channels of an ``(N, C, *)`` input are split into ``num_groups`` groups of
    ``C / num_groups`` consecutive channels; each example's group is normalized with the mean and
    biased variance of its ``(C / G)·∏spatial`` values, then a per-channel γ, β is applied. ``G = 1``
    is Layer Normalization over ``(C, *)``; ``G = C`` is Instance Normalization.

    Args:
        num_groups: G; must divide ``num_channels``.
        num_channels: C, the size of dim 1.
        eps: ε added to the variance. Default: 1e-5.
        affine: learn per-channel ``weight`` (γ, init 1) and ``bias`` (β, init 0).
        device, dtype: where and in which dtype to create the parameters.
        bias: keyword-only; with ``affine=True`` and ``bias=False`` only γ is learned (torch.nn 2.13).
    """

    weight: Tensor | None
    bias: Tensor | None

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__()
        num_groups, num_channels = check_size("num_groups", num_groups), check_size("num_channels", num_channels)
        if num_channels % num_groups != 0:
            raise ValueError(f"num_channels must be divisible by num_groups, got num_channels={num_channels} "
                             f"and num_groups={num_groups}")
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        register_affine(self, num_channels, affine, bias, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_affine(self)

    def forward(self, input: Tensor) -> Tensor:
        check_tensor(type(self).__name__, input)
        if input.dim() < 2:
            raise ValueError(f"GroupNorm expected input of shape (N, C, *) with at least 2 dimensions, "
                             f"got {input.dim()}D input of shape {tuple(input.shape)}")
        if input.shape[1] != self.num_channels:
            raise ValueError(f"GroupNorm expected {self.num_channels} channels in dim 1, got {input.shape[1]} "
                             f"(input shape {tuple(input.shape)})")
        xs = to_stat_dtype(input)
        per_group = (self.num_channels // self.num_groups) * math.prod(input.shape[2:])  # explicit: N may be 0
        groups = xs.reshape(input.shape[0], self.num_groups, per_group)  # (N, G, C/G · ∏spatial)
        var, mean = torch.var_mean(groups, -1, correction=0, keepdim=True)  # μ_ng, σ²_ng (biased)
        xhat = ((groups - mean) * torch.rsqrt(var + self.eps)).reshape(input.shape)  # (x − μ_ng)/√(σ²_ng + ε)
        return apply_affine(xhat, self.weight, self.bias, channel_shape(input)).to(input.dtype)  # γ_c x̂ + β_c

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"bias={self.bias is not None}")


class InstanceNormBase(NormBase):
    r"""Instance Normalization (Ulyanov, Vedaldi & Lempitsky 2016); see :class:`InstanceNorm2d`.

    Each (example, channel) pair is normalized over its spatial positions. With
    ``track_running_stats=True`` training also updates ``running_mean``/``running_var`` with the
    instance statistics *averaged over the batch* (the variance Bessel-corrected with the number of
    spatial positions L, ``L/(L−1)``), and evaluation normalizes with those running statistics, as
    torch.nn does. As in torch.nn, ``momentum=None`` means momentum 0 (the running statistics stay
    put) and ``num_batches_tracked`` is never incremented; it is kept only so that ``state_dict``
    keys match. Unlike torch.nn, a wrong channel count is an error even when ``affine=False``
    (torch.nn only warns).
    """

    _batched_dims = 0
    _layout = ""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = False,
                 track_running_stats: bool = False, device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)

    def forward(self, input: Tensor) -> Tensor:
        check_tensor(type(self).__name__, input)
        b = self._batched_dims
        if input.dim() not in (b - 1, b):
            raise ValueError(f"{type(self).__name__} expected {self._layout} input, got {input.dim()}D input "
                             f"of shape {tuple(input.shape)}")
        unbatched = input.dim() == b - 1
        x = input.unsqueeze(0) if unbatched else input
        if x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) expected {self.num_features} channels "
                             f"in dim {0 if unbatched else 1}, got {x.shape[1]} (input shape {tuple(input.shape)})")
        if x.numel() == 0:  # an empty batch (N = 0 or no spatial positions): empty output, running stats untouched
            y = empty_batch(x, self.weight, self.bias)
            return y.squeeze(0) if unbatched else y
        shape, dims = channel_shape(x), list(range(2, x.dim()))
        xs = to_stat_dtype(x)
        if self.training or not self.track_running_stats:
            L = math.prod(x.shape[2:])
            if L == 1:
                raise ValueError(f"{type(self).__name__} expected more than 1 spatial element per channel "
                                 f"to compute instance statistics, got input of shape {tuple(input.shape)}")
            var, mean = torch.var_mean(xs, dims, correction=0, keepdim=True)  # μ_nc, σ²_nc over space
            if self.training and self.track_running_stats:
                momentum = 0.0 if self.momentum is None else self.momentum
                with torch.no_grad():  # running averages of the batch averages of μ_nc and of L/(L−1)·σ²_nc
                    update_running_stats(self.running_mean, self.running_var, mean.mean(0), var.mean(0), L,
                                         float(momentum))
        else:
            assert self.running_mean is not None and self.running_var is not None  # track_running_stats
            mean = self.running_mean.to(xs.dtype).view(shape)
            var = self.running_var.to(xs.dtype).view(shape)
        xhat = (xs - mean) * torch.rsqrt(var + self.eps)  # x̂ = (x − μ) / √(σ² + ε)
        y = apply_affine(xhat, self.weight, self.bias, shape).to(input.dtype)
        return y.squeeze(0) if unbatched else y


class InstanceNorm1d(InstanceNormBase):
    """Instance Normalization over ``(N, C, L)`` (or unbatched ``(C, L)``); as :class:`torch.nn.InstanceNorm1d`."""

    _batched_dims = 3
    _layout = "3D (N, C, L) or unbatched 2D (C, L)"


class InstanceNorm2d(InstanceNormBase):
    """Instance Normalization over ``(N, C, H, W)`` (or unbatched ``(C, H, W)``); as :class:`torch.nn.InstanceNorm2d`.

    Args:
        num_features: C.
        eps: ε added to the variance. Default: 1e-5.
        momentum: weight of the new batch in the running averages (used only with
            ``track_running_stats=True``). Default: 0.1.
        affine: learn per-channel γ, β. Default: ``False`` (as torch.nn).
        track_running_stats: keep running statistics and use them in eval mode. Default: ``False``.
        device, dtype: where and in which dtype to create parameters and buffers.
    """

    _batched_dims = 4
    _layout = "4D (N, C, H, W) or unbatched 3D (C, H, W)"

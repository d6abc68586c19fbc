r"""Alternatives to Batch Normalization, written in plain tensor operations.

BN's statistics depend on the other examples of the batch, which hurts with small batches,
non-i.i.d. batches and recurrent or per-example inference. The layers here either take
their statistics from one example (LN, IN, GN), correct the batch statistics towards the population
ones (Batch Renormalization), take them from smaller sub-batches on purpose (Ghost BN) or mix batch
and per-example normalization (Batch Layer Normalization):

* :class:`LayerNorm` (Ba, Kiros & Hinton 2016), :class:`GroupNorm` (Wu & He 2018),
  :class:`InstanceNorm1d` / :class:`InstanceNorm2d` (Ulyanov, Vedaldi & Lempitsky 2016): drop-in
  replacements for the torch.nn layers of the same names (same arguments, parameter and buffer
  names, results to float64 precision), without calling ``torch.nn.functional``'s kernels;
* :class:`BatchRenorm1d` / :class:`BatchRenorm2d` (Ioffe 2017), with :func:`renorm_schedule` and
  :func:`apply_renorm_schedule` for the paper's relaxation of ``r_max`` and ``d_max``;
* :class:`GhostBatchNorm1d` / :class:`GhostBatchNorm2d` (Hoffer, Hubara & Soudry 2017), and
  :class:`GhostBatch`, which applies any normalization layer to ghost batches;
* :class:`BatchLayerNorm` (Ziaee & Çano 2022).

The batch-statistics layers reuse :class:`bnlib.modules._NormBase` (parameters ``weight``/``bias``,
buffers ``running_mean``/``running_var``/``num_batches_tracked``) and
:class:`bnlib.modules._BatchNorm` (counting batches, ``momentum=None`` as a cumulative average, and
the evaluation path with running statistics), so their ``state_dict`` keys are BatchNorm's.

Numerics follow :mod:`bnlib.functional`: variances come from :func:`torch.var_mean` with
``correction=0`` (never :math:`E[x^2]-E[x]^2`), float16/bfloat16 inputs are normalized with float32
statistics and the output is cast back to the input's dtype, and nothing assumes a device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor, nn

from . import functional as bnf
from .functional import _LOW_PRECISION, _channel_shape, _reduce_dims
from .modules import _BatchNorm, _NormBase

__all__ = [
    "LayerNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d",
    "BatchRenorm1d", "BatchRenorm2d", "renorm_schedule", "apply_renorm_schedule",
    "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatch", "BatchLayerNorm",
]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _check_tensor(module: nn.Module, input) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"{type(module).__name__} expected a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"{type(module).__name__} expected a floating-point input, got dtype {input.dtype}")


def _stats_input(x: Tensor) -> Tensor:
    """``x`` in the dtype statistics are computed in: float32 for float16/bfloat16, else unchanged."""
    return x.float() if x.dtype in _LOW_PRECISION else x


def _affine(xhat: Tensor, weight: Tensor | None, bias: Tensor | None, shape: Sequence[int]) -> Tensor:
    """y = γ x̂ + β with γ, β reshaped to ``shape`` (either may be ``None``)."""
    if weight is not None:
        xhat = xhat * weight.to(xhat.dtype).view(shape)
    if bias is not None:
        xhat = xhat + bias.to(xhat.dtype).view(shape)
    return xhat


def _ghosts(input: Tensor, vbs: int) -> tuple[Tensor, list[int]]:
    """``input`` in the statistics dtype, cut into ghost batches of ``vbs`` consecutive rows:
    ``(k, vbs, C, *spatial)``; and the dims a ghost batch's per-channel statistics reduce over."""
    ghosts = _stats_input(input).reshape(input.shape[0] // vbs, vbs, *input.shape[1:])
    return ghosts, [1] + list(range(3, ghosts.dim()))


def _checked_ghosts(layer: nn.Module, input: Tensor, vbs: int) -> tuple[Tensor, list[int]]:
    """:func:`_ghosts` of ``input`` after the checks ``layer`` makes on each chunk of ``vbs`` rows in training."""
    layer._check_input_dim(input)
    layer._check_num_channels(input)
    bnf.check_bn_input(input[:vbs], True)  # every chunk has the shape of the first
    return _ghosts(input, vbs)


def _ema_steps_(running: Tensor, news: Tensor, momenta: Sequence[float]) -> Tensor:
    """``k`` moving-average steps at once: ``running`` before each step, ``(k, C)``; ``running`` is left after the last.

    Step ``j`` is ``running ← (1 − w_j)·running + w_j·news[j]`` (:func:`_ema_`). Unrolled, the state before step
    ``j`` is a fixed combination of the first state and ``news[0 .. j-1]``: row ``j`` of a ``(k+1, k+1)`` matrix of
    weights (Python floats), applied to all of them in one matrix product.
    """
    k = len(momenta)
    rows = [[1.0] + [0.0] * k]  # state 0: the running statistic itself
    for j, w in enumerate(momenta):
        row = [(1 - w) * c for c in rows[-1]]
        row[j + 1] += w
        rows.append(row)
    weights = torch.tensor(rows, dtype=running.dtype, device=running.device)
    states = weights @ torch.cat([running.view(1, -1), news.detach().reshape(k, -1).to(running.dtype)])
    running.copy_(states[k])
    return states[:k]


def _ema_(running: Tensor, new: Tensor, momentum: float) -> None:
    """running ← (1 − momentum)·running + momentum·new, in place (PyTorch's convention)."""
    running.mul_(1 - momentum).add_(new.detach().reshape(-1).to(running.dtype), alpha=momentum)


class _DimCheck:
    """Mixin: ``_check_input_dim`` from the class attributes ``_dims`` and ``_layout``."""

    _dims: tuple = ()
    _layout: str = ""

    def _check_input_dim(self, input: Tensor) -> None:
        _check_tensor(self, input)
        if input.dim() not in self._dims:
            raise ValueError(f"{type(self).__name__} expected {self._layout} input, got {input.dim()}D input "
                             f"of shape {tuple(input.shape)}")


# ----------------------------------------------------------------------------------------------
# Layer, Group and Instance Normalization
# ----------------------------------------------------------------------------------------------

_ShapeLike = Union[int, Sequence[int], torch.Size]


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

    def __init__(self, normalized_shape: _ShapeLike, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(int(s) for s in normalized_shape)
        if any(s < 1 for s in self.normalized_shape):
            raise ValueError(f"expected normalized_shape of positive sizes, got {self.normalized_shape}")
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        _check_tensor(self, input)
        k = len(self.normalized_shape)
        if input.dim() < k or tuple(input.shape[input.dim() - k:]) != self.normalized_shape:
            raise ValueError(f"LayerNorm expected input with trailing shape {self.normalized_shape}, "
                             f"got input of shape {tuple(input.shape)}")
        xs = _stats_input(input)
        dims = list(range(input.dim() - k, input.dim()))
        # μ = mean over the normalized dims, σ² = (1/H) Σ (x − μ)² (biased), per example
        var, mean = torch.var_mean(xs, dims, correction=0, keepdim=True)
        xhat = (xs - mean) * torch.rsqrt(var + self.eps)  # x̂ = (x − μ) / √(σ² + ε)
        return _affine(xhat, self.weight, self.bias, self.normalized_shape).to(input.dtype)  # y = γ ⊙ x̂ + β

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

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__()
        if num_groups < 1 or num_channels < 1:
            raise ValueError(f"expected positive num_groups and num_channels, got {num_groups} and {num_channels}")
        if num_channels % num_groups != 0:
            raise ValueError(f"num_channels must be divisible by num_groups, got num_channels={num_channels} "
                             f"and num_groups={num_groups}")
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.empty(num_channels, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_channels, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        _check_tensor(self, input)
        if input.dim() < 2:
            raise ValueError(f"GroupNorm expected input of shape (N, C, *) with at least 2 dimensions, "
                             f"got {input.dim()}D input of shape {tuple(input.shape)}")
        if input.shape[1] != self.num_channels:
            raise ValueError(f"GroupNorm expected {self.num_channels} channels in dim 1, got {input.shape[1]} "
                             f"(input shape {tuple(input.shape)})")
        xs = _stats_input(input)
        per_group = (self.num_channels // self.num_groups) * math.prod(input.shape[2:])  # explicit: N may be 0
        groups = xs.reshape(input.shape[0], self.num_groups, per_group)  # (N, G, C/G · ∏spatial)
        var, mean = torch.var_mean(groups, -1, correction=0, keepdim=True)  # μ_ng, σ²_ng (biased)
        xhat = ((groups - mean) * torch.rsqrt(var + self.eps)).reshape(input.shape)  # (x − μ_ng)/√(σ²_ng + ε)
        return _affine(xhat, self.weight, self.bias, _channel_shape(input)).to(input.dtype)  # γ_c x̂ + β_c

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"bias={self.bias is not None}")


class _InstanceNorm(_NormBase):
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
        _check_tensor(self, input)
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
            y = bnf._empty_batch(x, self.weight, self.bias)
            return y.squeeze(0) if unbatched else y
        shape, dims = _channel_shape(x), list(range(2, x.dim()))
        xs = _stats_input(x)
        if self.training or not self.track_running_stats:
            L = math.prod(x.shape[2:])
            if L == 1:
                raise ValueError(f"{type(self).__name__} expected more than 1 spatial element per channel "
                                 f"to compute instance statistics, got input of shape {tuple(input.shape)}")
            var, mean = torch.var_mean(xs, dims, correction=0, keepdim=True)  # μ_nc, σ²_nc over space
            if self.training and self.track_running_stats:
                momentum = 0.0 if self.momentum is None else self.momentum
                with torch.no_grad():
                    _ema_(self.running_mean, mean.mean(0), momentum)  # EMA of the batch average of μ_nc
                    _ema_(self.running_var, (var * (L / (L - 1))).mean(0), momentum)  # … of L/(L−1)·σ²_nc
        else:
            mean = self.running_mean.to(xs.dtype).view(shape)
            var = self.running_var.to(xs.dtype).view(shape)
        xhat = (xs - mean) * torch.rsqrt(var + self.eps)  # x̂ = (x − μ) / √(σ² + ε)
        y = _affine(xhat, self.weight, self.bias, shape).to(input.dtype)
        return y.squeeze(0) if unbatched else y


class InstanceNorm1d(_InstanceNorm):
    """Instance Normalization over ``(N, C, L)`` (or unbatched ``(C, L)``); as :class:`torch.nn.InstanceNorm1d`."""

    _batched_dims = 3
    _layout = "3D (N, C, L) or unbatched 2D (C, L)"


class InstanceNorm2d(_InstanceNorm):
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


# ----------------------------------------------------------------------------------------------
# Batch Renormalization
# ----------------------------------------------------------------------------------------------

class _BatchRenorm(_DimCheck, _BatchNorm):
    r"""Batch Renormalization (Ioffe 2017); see :class:`BatchRenorm2d`."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.01, affine: bool = True,
                 r_max: float = 1.0, d_max: float = 0.0, device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, True, device, dtype, bias=bias)
        self.set_limits(r_max, d_max)

    @property
    def r_max(self) -> float:
        return self._r_max

    @r_max.setter
    def r_max(self, value: float) -> None:
        value = float(value)
        if not value >= 1.0:
            raise ValueError(f"expected r_max >= 1 (r is clipped to [1/r_max, r_max]), got {value}")
        self._r_max = value

    @property
    def d_max(self) -> float:
        return self._d_max

    @d_max.setter
    def d_max(self, value: float) -> None:
        value = float(value)
        if not value >= 0.0:
            raise ValueError(f"expected d_max >= 0 (d is clipped to [-d_max, d_max]), got {value}")
        self._d_max = value

    def set_limits(self, r_max: float, d_max: float) -> None:
        """Set the clipping limits (e.g. from :func:`renorm_schedule`) for the following steps."""
        self.r_max, self.d_max = r_max, d_max

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_num_channels(input)
        if not self.training:
            return super().forward(input)  # evaluation: exactly BN with the running statistics
        if input.numel() == 0:  # an empty batch: empty output, running statistics (and the count) untouched
            return bnf._empty_batch(input, self.weight, self.bias)
        bnf.check_bn_input(input, True)
        momentum = self._momentum_for_this_batch()
        dims, shape = _reduce_dims(input), _channel_shape(input)
        xs = _stats_input(input)
        var_b, mu_b = torch.var_mean(xs, dims, correction=0, keepdim=True)  # μ_B, σ²_B (biased)
        sigma_b = torch.sqrt(var_b + self.eps)  # σ_B = √(σ²_B + ε)
        r, d = self._r_d(mu_b, sigma_b, self.running_mean, self.running_var)
        xhat = (xs - mu_b) / sigma_b * r + d  # x̂ = (x − μ_B)/σ_B · r + d
        y = _affine(xhat, self.weight, self.bias, shape).to(input.dtype)  # y = γ x̂ + β
        m = input.numel() // input.shape[1]
        with torch.no_grad():  # μ ← μ + α(μ_B − μ);  running_var ← running_var + α(m/(m−1)·σ²_B − running_var)
            _ema_(self.running_mean, mu_b, momentum)
            _ema_(self.running_var, var_b * (m / (m - 1)), momentum)
        return y

    @torch.no_grad()  # stop_gradient: r and d are constants for backpropagation
    def _r_d(self, mu_b: Tensor, sigma_b: Tensor, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """r and d for batch statistics μ_B, σ_B against the running ``mean`` and ``var`` (same number of values)."""
        mu = mean.to(mu_b.dtype).view(mu_b.shape)  # μ (population estimate)
        sigma = torch.sqrt(var.to(mu_b.dtype).view(mu_b.shape) + self.eps)  # σ = √(running_var + ε)
        r = (sigma_b / sigma).clamp(1.0 / self.r_max, self.r_max)  # r = clip(σ_B/σ, 1/r_max, r_max)
        d = ((mu_b - mu) / sigma).clamp(-self.d_max, self.d_max)  # d = clip((μ_B − μ)/σ, −d_max, d_max)
        return r, d

    def _forward_ghosts(self, input: Tensor, vbs: int) -> Tensor:
        """What :class:`GhostBatch` (this layer, ``vbs``) computes in training, with the elementwise work done once.

        Chunk ``j`` takes its r and d from the running statistics as chunks ``0 .. j-1`` left them; those
        come from the unrolled moving average (:func:`_ema_steps_`), so every step covers all chunks at once.
        """
        ghosts, dims = _checked_ghosts(self, input, vbs)
        var_b, mu_b = torch.var_mean(ghosts, dims, correction=0, keepdim=True)  # μ_j, σ²_j: (k, 1, C, 1, ...)
        sigma_b = torch.sqrt(var_b + self.eps)
        m = ghosts[0].numel() // input.shape[1]
        momenta = [self._momentum_for_this_batch() for _ in range(len(ghosts))]  # chunk j is BN step j
        with torch.no_grad():  # the running statistics each chunk starts from (the buffers: after the last)
            means = _ema_steps_(self.running_mean, mu_b, momenta)
            variances = _ema_steps_(self.running_var, var_b * (m / (m - 1)), momenta)
        r, d = self._r_d(mu_b, sigma_b, means, variances)  # chunk j against the statistics before it
        xhat = ((ghosts - mu_b) / sigma_b * r + d).reshape(input.shape)
        return _affine(xhat, self.weight, self.bias, _channel_shape(input)).to(input.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}"


_RENORM_DOC = r"""

    Training (Ioffe 2017, Algorithm 1):

    * :math:`\hat x = \frac{x-\mu_B}{\sigma_B}\,r + d` with :math:`\sigma_B = \sqrt{\sigma_B^2+\epsilon}`,
    * :math:`r = \mathrm{stop\_grad}(\mathrm{clip}_{[1/r_{max},\,r_{max}]}(\sigma_B/\sigma))`,
    * :math:`d = \mathrm{stop\_grad}(\mathrm{clip}_{[-d_{max},\,d_{max}]}((\mu_B-\mu)/\sigma))`,
    * :math:`\sigma = \sqrt{\text{running\_var}+\epsilon}`, :math:`\mu` = ``running_mean``, both taken
      *before* this batch updates them; :math:`y = \gamma\hat x + \beta`.

    Gradients flow through :math:`\mu_B, \sigma_B` but not through ``r`` and ``d``. Evaluation is
    BN with the running statistics. With ``r_max=1, d_max=0`` (the defaults) this is exactly
    :class:`bnlib.BatchNorm2d` with the same momentum.

    Running statistics: moving averages with weight ``momentum`` (the paper's α = 0.01 is the
    default). *Choice:* the paper moves σ towards σ_B (a moving average of standard deviations);
    here, as in torch.nn's BatchNorm, ``running_var`` is a moving average of the *unbiased* batch
    variance :math:`\frac{m}{m-1}\sigma_B^2` (m values per channel), so the buffers mean the same
    thing as BatchNorm's, a BN ``state_dict`` loads into it and vice versa, and σ is derived from
    ``running_var`` as above. ``momentum=None`` is a cumulative average, as in BatchNorm. Running
    statistics are always tracked (r and d need them).

    ``r_max`` and ``d_max`` are attributes that may be changed between steps (directly,
    through :meth:`set_limits`, or for a whole model with :func:`apply_renorm_schedule`).

    Args:
        num_features: C.
        eps: ε. Default: 1e-5.
        momentum: α, the weight of the new batch in the moving averages. Default: 0.01.
        affine: learn per-channel γ (``weight``) and β (``bias``).
        r_max: ≥ 1. Default 1 (no correction of the scale).
        d_max: ≥ 0. Default 0 (no correction of the shift).
        device, dtype: where and in which dtype to create parameters and buffers.
"""


class BatchRenorm1d(_BatchRenorm):
    __doc__ = "Batch Renormalization over ``(N, C)`` or ``(N, C, L)`` input (Ioffe 2017)." + _RENORM_DOC
    _dims = (2, 3)
    _layout = "2D (N, C) or 3D (N, C, L)"


class BatchRenorm2d(_BatchRenorm):
    __doc__ = "Batch Renormalization over ``(N, C, H, W)`` input (Ioffe 2017)." + _RENORM_DOC
    _dims = (4,)
    _layout = "4D (N, C, H, W)"


def renorm_schedule(step: int, warmup: int = 5000, r_max_final: float = 3.0, d_max_final: float = 5.0,
                    r_max_steps: int = 40000, d_max_steps: int = 25000) -> tuple[float, float]:
    r"""``(r_max, d_max)`` for training step ``step`` following Ioffe (2017).

    The paper trains with ``r_max = 1, d_max = 0`` (plain BN) for the first 5,000 steps and then
    relaxes the limits "gradually" until ``r_max = 3`` at 40k steps and ``d_max = 5`` at 25k steps;
    those are the defaults. *Assumption:* the paper does not give the shape of the relaxation; this
    function interpolates linearly between ``warmup`` and ``r_max_steps`` (resp. ``d_max_steps``)
    and holds the final values afterwards:

    .. math::
        r_{max}(t) = 1 + (r_{final}-1)\,\mathrm{clip}_{[0,1]}\Big(\frac{t-t_0}{T_r-t_0}\Big),\qquad
        d_{max}(t) = d_{final}\,\mathrm{clip}_{[0,1]}\Big(\frac{t-t_0}{T_d-t_0}\Big).
    """
    if warmup < 0 or r_max_steps < warmup or d_max_steps < warmup:
        raise ValueError(f"expected 0 <= warmup <= r_max_steps and warmup <= d_max_steps, got warmup={warmup}, "
                         f"r_max_steps={r_max_steps}, d_max_steps={d_max_steps}")
    if r_max_final < 1 or d_max_final < 0:
        raise ValueError(f"expected r_max_final >= 1 and d_max_final >= 0, got {r_max_final} and {d_max_final}")

    def progress(end: int) -> float:  # clip((t − t0)/(T − t0), 0, 1); a step at T = t0 jumps
        if step <= warmup:
            return 0.0
        return 1.0 if end <= warmup else min(1.0, (step - warmup) / (end - warmup))

    return 1.0 + (r_max_final - 1.0) * progress(r_max_steps), d_max_final * progress(d_max_steps)


def apply_renorm_schedule(model: nn.Module, step: int, **kwargs) -> tuple[float, float]:
    """Set ``r_max``/``d_max`` of every Batch Renormalization layer in ``model`` from :func:`renorm_schedule`.

    ``kwargs`` are passed to :func:`renorm_schedule`; returns the ``(r_max, d_max)`` applied.
    Call it once per training step, before the forward pass.
    """
    r_max, d_max = renorm_schedule(step, **kwargs)
    for module in model.modules():
        if isinstance(module, _BatchRenorm):
            module.set_limits(r_max, d_max)
    return r_max, d_max


# ----------------------------------------------------------------------------------------------
# Ghost Batch Normalization
# ----------------------------------------------------------------------------------------------

class _GhostBatchNorm(_DimCheck, _BatchNorm):
    r"""Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017); see :class:`GhostBatchNorm2d`."""

    def __init__(self, num_features: int, virtual_batch_size: int, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True, track_running_stats: bool = True,
                 device=None, dtype=None, *, bias: bool = True) -> None:
        if not isinstance(virtual_batch_size, int) or isinstance(virtual_batch_size, bool) or virtual_batch_size < 1:
            raise ValueError(f"expected virtual_batch_size to be a positive int, got {virtual_batch_size!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.virtual_batch_size = virtual_batch_size

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_num_channels(input)
        if not (self.training or self.running_mean is None):
            return super().forward(input)  # evaluation: BN with the running statistics
        if input.numel() == 0:  # an empty batch: empty output, running statistics (and the count) untouched
            return bnf._empty_batch(input, self.weight, self.bias)
        bnf.check_bn_input(input, False)
        n, vbs = input.shape[0], self.virtual_batch_size
        if n % vbs != 0:
            raise ValueError(f"{type(self).__name__}: virtual_batch_size={vbs} does not divide the batch size {n} "
                             f"(input shape {tuple(input.shape)})")
        per_ghost = vbs * math.prod(input.shape[2:])  # m: values per channel in one ghost batch
        if per_ghost <= 1:
            raise ValueError(f"{type(self).__name__} expected more than 1 value per channel in each ghost batch, "
                             f"got virtual_batch_size={vbs} with input of shape {tuple(input.shape)}")
        ghosts, dims = _ghosts(input, vbs)  # (k, vbs, C, *spatial): ghost batch j = rows j·vbs …
        var, mean = torch.var_mean(ghosts, dims, correction=0, keepdim=True)  # μ_j, σ²_j per ghost batch, channel
        xhat = ((ghosts - mean) * torch.rsqrt(var + self.eps)).reshape(input.shape)  # (x − μ_j)/√(σ²_j + ε)
        y = _affine(xhat, self.weight, self.bias, _channel_shape(input)).to(input.dtype)  # one shared γ, β
        if self.training and self.track_running_stats:
            with torch.no_grad():
                for j in range(len(ghosts)):  # one running-stat step per ghost batch, in order
                    momentum = self._momentum_for_this_batch()
                    _ema_(self.running_mean, mean[j], momentum)
                    _ema_(self.running_var, var[j] * (per_ghost / (per_ghost - 1)), momentum)
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"


_GHOST_DOC = r"""

    The batch is cut along dim 0 into ``N / virtual_batch_size`` consecutive chunks ("ghost
    batches"); each chunk is batch-normalized with its own mean and biased variance, and one γ, β is
    shared by all. It brings the regularizing noise of small-batch statistics to large-batch
    training. The chunks are processed together by one reshape to ``(k, vbs, C, ...)``.
    ``virtual_batch_size`` must divide the batch size (as Keras's ``virtual_batch_size``).

    Running statistics (*choice*): updated as if each ghost batch were a separate BN step, in order:
    ``k`` updates per forward pass, each with ``momentum`` and the ghost batch's unbiased variance,
    and ``num_batches_tracked`` grows by ``k`` (so ``momentum=None`` averages over ghost batches).
    The result is exactly what torch.nn.BatchNorm gives when applied to the chunks one after the
    other. (Keras instead updates once per full batch with the average of the ghost statistics.)
    Evaluation uses the running statistics, like BN; with ``track_running_stats=False`` ghost-batch
    statistics are used in evaluation too. ``virtual_batch_size`` equal to the batch size is plain BN.

    Args:
        num_features: C.
        virtual_batch_size: rows per ghost batch.
        eps, momentum, affine, track_running_stats, device, dtype: as :class:`bnlib.BatchNorm2d`.
"""


class GhostBatchNorm1d(_GhostBatchNorm):
    __doc__ = "Ghost Batch Normalization over ``(N, C)`` or ``(N, C, L)`` (Hoffer, Hubara & Soudry 2017)." + _GHOST_DOC
    _dims = (2, 3)
    _layout = "2D (N, C) or 3D (N, C, L)"


class GhostBatchNorm2d(_GhostBatchNorm):
    __doc__ = "Ghost Batch Normalization over ``(N, C, H, W)`` (Hoffer, Hubara & Soudry 2017)." + _GHOST_DOC
    _dims = (4,)
    _layout = "4D (N, C, H, W)"


class GhostBatch(nn.Module):
    r"""Any normalization layer applied to ghost batches: ``layer`` on consecutive chunks of the batch.

    In training mode the batch is cut along dim 0 into chunks of ``virtual_batch_size`` rows and
    ``layer`` is applied to each chunk in turn (its running statistics, if any, take one step per
    chunk), and the outputs are concatenated. This is what ``N / virtual_batch_size`` devices with
    unsynchronized normalization layers compute, and for ``layer = BatchNorm`` it is exactly
    :class:`GhostBatchNorm2d` (same output, same running statistics); it makes the same experiment
    possible for layers without a ghost version (Batch Renorm, Batch Layer Norm). Layers that take
    their statistics from one example (LN, GN, IN) give the same result with or without chunks. In
    evaluation mode ``layer`` sees the whole batch.

    A layer that can compute the same thing for all chunks at once defines ``_forward_ghosts(input,
    virtual_batch_size)``, which is then called instead of the loop (Batch Renorm and Batch Layer Norm: one
    set of full-size operations in place of one per chunk; equal to the loop to float rounding, tested).

    Args:
        layer: the normalization module (its parameters and buffers are this module's).
        virtual_batch_size: rows per chunk; must divide the training batch size.
    """

    def __init__(self, layer: nn.Module, virtual_batch_size: int) -> None:
        super().__init__()
        if not isinstance(virtual_batch_size, int) or isinstance(virtual_batch_size, bool) or virtual_batch_size < 1:
            raise ValueError(f"expected virtual_batch_size to be a positive int, got {virtual_batch_size!r}")
        self.layer, self.virtual_batch_size = layer, virtual_batch_size

    def forward(self, input: Tensor) -> Tensor:
        n, vbs = input.shape[0], self.virtual_batch_size
        if not self.training or n == vbs:
            return self.layer(input)
        if n % vbs != 0:
            raise ValueError(f"GhostBatch: virtual_batch_size={vbs} does not divide the batch size {n} "
                             f"(input shape {tuple(input.shape)})")
        forward_ghosts = getattr(self.layer, "_forward_ghosts", None)  # the same result, all chunks at once
        if forward_ghosts is not None and self.layer.training and input.numel() > 0:
            return forward_ghosts(input, vbs)
        return torch.cat([self.layer(chunk) for chunk in input.split(vbs)])

    def extra_repr(self) -> str:
        return f"virtual_batch_size={self.virtual_batch_size}"


# ----------------------------------------------------------------------------------------------
# Batch Layer Normalization
# ----------------------------------------------------------------------------------------------

_BLN_OFFSET = 1e-4  # the constant in the authors' weights 1/m − 1e-4 and 1 − (1/m + 1e-4)


class BatchLayerNorm(_DimCheck, _BatchNorm):
    r"""Batch Layer Normalization (Ziaee & Çano 2022) over ``(N, C)``, ``(N, C, L)`` or ``(N, C, H, W)``.

    BLN mixes a batch-normalized and a feature-normalized (layer-normalized) copy of the input with
    weights that depend on the inverse mini-batch size m, following the authors' code:

    * :math:`x_b = (x-\mu_B)/\sqrt{\sigma_B^2+\epsilon}` — per channel, over the batch (and the
      spatial positions), like BN;
    * :math:`x_f = (x-\mu_F)/\sqrt{\sigma_F^2+\epsilon}` — per example, over all its features
      ``(C, *spatial)``, like LN;
    * :math:`\hat x = x_f\,(1/m - 10^{-4}) + x_b\,(1 - (1/m + 10^{-4}))`, optionally
      :math:`/\sqrt{d_k}`; :math:`y = \gamma\hat x + \beta` with per-channel γ, β.

    At m = 1 the output is almost LN's (x_f weighted 1 − 10⁻⁴, x_b −10⁻⁴); as m grows it tends to
    BN's (x_f weighted ≈ 1/m).

    Documented choices:

    * **m is the number of examples N**, also for convolutional inputs, not N·H·W: the mixing is
      meant to move from LN to BN as fewer/more *examples* share the statistics, and the authors'
      code uses its ``batchsize`` argument (the number of examples) in the weights.
    * **Statistics axes for (N, C, *spatial)**: x_b uses BN's axes (per channel over N·∏spatial) and
      x_f LN's (per example over C·∏spatial). This follows the paper's description and the rest of
      this library (γ, β and running statistics per channel); the authors' Keras code, on
      channels-last 4D input, instead takes batch moments per position over N only and feature
      moments per pixel over the channels only. For ``(N, C)`` inputs the two agree.
    * **The 1/√d_k factor** is off by default (``scale_by_sqrt_dk=False``). In the authors' code d_k
      is the size of the last (feature/channel) axis, here ``num_features`` = C. The factor appears
      in their code but has not been verified to be in the paper; it shrinks the output's variance
      to about 1/C at initialization (γ = 1), which breaks the "close to LN / close to BN" limits
      and is something γ would have to learn back. Pass ``scale_by_sqrt_dk=True`` to reproduce the
      code.
    * **Population statistics**: the authors accumulate the batch means and variances over an epoch
      and scale the variance by m/(m−1). Here ``running_mean``/``running_var`` are BatchNorm's: a
      moving average with ``momentum`` of the batch mean and the *unbiased* batch variance
      (Bessel's factor with the number of values per channel, N·∏spatial, since that is what the
      statistics are computed over). ``momentum=None`` gives a cumulative average, which is the
      authors' per-epoch average if :meth:`reset_running_stats` is called at the start of an epoch.
      In eval mode x_b uses the running statistics; x_f always uses the example's own statistics
      (as in the authors' default).
    * **m at evaluation**: the weights need a batch size although evaluation does not use one.
      The buffer ``batch_size_tracked`` stores the batch size N of the last training batch and
      evaluation uses it (the authors pass the training batch size to the layer's constructor).
      Before any training step (``batch_size_tracked == 0``) or with
      ``track_running_stats=False`` the current input's N is used.

    Args:
        num_features: C.
        eps: ε in both normalizations. Default: 1e-3 (the authors' value).
        momentum: weight of the new batch in the running averages; ``None`` for a cumulative
            average. Default: 0.1.
        affine: learn per-channel γ (``weight``) and β (``bias``).
        track_running_stats: keep running batch statistics (and ``batch_size_tracked``) for eval.
        scale_by_sqrt_dk: divide x̂ by √C as the authors' code does. Default: ``False``.
        device, dtype: where and in which dtype to create parameters and buffers.
    """

    _dims = (2, 3, 4)
    _layout = "2D (N, C), 3D (N, C, L) or 4D (N, C, H, W)"

    def __init__(self, num_features: int, eps: float = 1e-3, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, scale_by_sqrt_dk: bool = False, device=None, dtype=None,
                 *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.scale_by_sqrt_dk = scale_by_sqrt_dk
        if track_running_stats:
            self.register_buffer("batch_size_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("batch_size_tracked", None)

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if getattr(self, "batch_size_tracked", None) is not None:
            self.batch_size_tracked.zero_()

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_num_channels(input)
        use_batch_stats = self.training or self.running_mean is None
        bnf.check_bn_input(input, use_batch_stats)
        shape, n = _channel_shape(input), input.shape[0]
        xs = _stats_input(input)
        if use_batch_stats:
            var_b, mu_b = torch.var_mean(xs, _reduce_dims(input), correction=0, keepdim=True)  # μ_B, σ²_B
            m = n
            if self.training and self.track_running_stats:
                momentum = self._momentum_for_this_batch()
                count = input.numel() // input.shape[1]
                with torch.no_grad():
                    _ema_(self.running_mean, mu_b, momentum)
                    _ema_(self.running_var, var_b * (count / (count - 1)), momentum)  # unbiased σ²_B
                    self.batch_size_tracked.fill_(n)
        else:
            mu_b = self.running_mean.to(xs.dtype).view(shape)
            var_b = self.running_var.to(xs.dtype).view(shape)
            tracked = self.batch_size_tracked.to(xs.dtype)  # a tensor: no host synchronization on CUDA
            m = torch.where(tracked > 0, tracked, torch.full_like(tracked, n))
        x_b = (xs - mu_b) * torch.rsqrt(var_b + self.eps)  # x_b = (x − μ_B)/√(σ²_B + ε)
        return self._mix(input, xs, x_b, m)

    def _mix(self, input: Tensor, xs: Tensor, x_b: Tensor, m) -> Tensor:
        """y = γ x̂ + β from x_b, with x_f computed here and the weights of ``m`` examples."""
        var_f, mu_f = torch.var_mean(xs, list(range(1, xs.dim())), correction=0, keepdim=True)  # μ_F, σ²_F per example
        x_f = (xs - mu_f) * torch.rsqrt(var_f + self.eps)  # x_f = (x − μ_F)/√(σ²_F + ε)
        # x̂ = x_f·(1/m − 1e-4) + x_b·(1 − (1/m + 1e-4))
        xhat = x_f * (1 / m - _BLN_OFFSET) + x_b * (1 - (1 / m + _BLN_OFFSET))
        if self.scale_by_sqrt_dk:
            xhat = xhat / math.sqrt(self.num_features)  # x̂ / √d_k, d_k = C
        return _affine(xhat, self.weight, self.bias, _channel_shape(input)).to(input.dtype)  # y = γ x̂ + β

    def _forward_ghosts(self, input: Tensor, vbs: int) -> Tensor:
        """What :class:`GhostBatch` (this layer, ``vbs``) computes in training, in one pass: x_b per chunk of
        ``vbs`` examples (m = ``vbs``), x_f per example as always, one running-statistics step per chunk, in order."""
        ghosts, dims = _checked_ghosts(self, input, vbs)
        var_b, mu_b = torch.var_mean(ghosts, dims, correction=0, keepdim=True)  # μ_j, σ²_j: (k, 1, C, 1, ...)
        x_b = ((ghosts - mu_b) * torch.rsqrt(var_b + self.eps)).reshape(input.shape)
        if self.track_running_stats:
            count = ghosts[0].numel() // input.shape[1]
            momenta = [self._momentum_for_this_batch() for _ in range(len(ghosts))]  # chunk j is BN step j
            with torch.no_grad():
                _ema_steps_(self.running_mean, mu_b, momenta)
                _ema_steps_(self.running_var, var_b * (count / (count - 1)), momenta)  # unbiased σ²_j
                self.batch_size_tracked.fill_(vbs)
        return self._mix(input, ghosts.reshape(input.shape), x_b, vbs)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale_by_sqrt_dk={self.scale_by_sqrt_dk}"

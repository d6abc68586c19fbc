r"""Batch Layer Normalization (Ziaee & Çano 2022): a mix of batch and per-example normalization.

:class:`BatchLayerNorm` adds a batch-normalized and a layer-normalized copy of its input with weights that depend
on the number of examples, so that it behaves like Layer Normalization for one example and tends to Batch
Normalization for large batches. Its evaluation output depends on each example (the layer-normalized half), so it
is not an affine map: ``affine_in_eval`` is False, and folding and freezing refuse it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .core import (
    DimCheck,
    apply_affine,
    channel_shape,
    check_bn_input,
    empty_batch,
    reduce_dims,
    to_stat_dtype,
    update_running_stats,
    update_running_stats_steps,
)
from .ghost import checked_ghost_batches
from .modules import BatchNormBase

__all__ = ["BatchLayerNorm"]


_BLN_OFFSET = 1e-4  # the constant in the authors' weights 1/m − 1e-4 and 1 − (1/m + 1e-4)


class BatchLayerNorm(DimCheck, BatchNormBase):
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

    batch_size_tracked: Tensor | None
    affine_in_eval = False  # the per-example half depends on each example
    input_dims = (2, 3, 4)
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
        tracked = getattr(self, "batch_size_tracked", None)
        if tracked is not None:
            tracked.zero_()

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_num_channels(input)
        use_batch_stats = self.training or self.running_mean is None
        check_bn_input(input, use_batch_stats)
        if input.numel() == 0:  # an empty batch: empty output, statistics (and count) untouched
            return empty_batch(input, self.weight, self.bias)
        shape, n = channel_shape(input), input.shape[0]
        xs = to_stat_dtype(input)
        if use_batch_stats:
            var_b, mu_b = torch.var_mean(xs, reduce_dims(input), correction=0, keepdim=True)  # μ_B, σ²_B
            m: int | Tensor = n
            if self.training and self.track_running_stats:
                assert self.batch_size_tracked is not None
                self._count_batch()
                count = input.numel() // input.shape[1]
                with torch.no_grad():  # BN's running averages (the variance unbiased), and the batch size
                    update_running_stats(self.running_mean, self.running_var, mu_b, var_b, count, self._batch_weight())
                    self.batch_size_tracked.fill_(n)
        else:
            assert self.running_mean is not None and self.running_var is not None
            assert self.batch_size_tracked is not None
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
        return apply_affine(xhat, self.weight, self.bias, channel_shape(input)).to(input.dtype)  # y = γ x̂ + β

    def _forward_ghosts(self, input: Tensor, vbs: int) -> Tensor:
        """What :class:`GhostBatch` (this layer, ``vbs``) computes in training, in one pass: x_b per chunk of
        ``vbs`` examples (m = ``vbs``), x_f per example as always, one running-statistics step per chunk, in order."""
        ghosts, dims = checked_ghost_batches(self, input, vbs)
        var_b, mu_b = torch.var_mean(ghosts, dims, correction=0, keepdim=True)  # μ_j, σ²_j: (k, 1, C, 1, ...)
        x_b = ((ghosts - mu_b) * torch.rsqrt(var_b + self.eps)).reshape(input.shape)
        if self.track_running_stats:
            assert self.running_mean is not None and self.running_var is not None
            assert self.batch_size_tracked is not None
            count = ghosts[0].numel() // input.shape[1]
            momenta = self._count_batches_and_weights(len(ghosts))  # chunk j is BN step j
            with torch.no_grad():
                update_running_stats_steps(self.running_mean, self.running_var, mu_b, var_b, count, momenta)
                self.batch_size_tracked.fill_(vbs)
        return self._mix(input, ghosts.reshape(input.shape), x_b, vbs)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale_by_sqrt_dk={self.scale_by_sqrt_dk}"

r"""Batch Renormalization (Ioffe 2017): batch statistics corrected towards the population's.

:class:`BatchRenorm1d` / :class:`BatchRenorm2d` normalize with the batch statistics, then correct the result by
``r`` and ``d`` (constants for backpropagation) so that it equals the normalization with the running statistics
within the limits ``r_max`` and ``d_max``; :func:`renorm_schedule` and :func:`apply_renorm_schedule` relax the
limits over training as the paper does. The layers reuse :class:`bnlib.modules.BatchNormBase` (parameters,
buffers, counting batches, ``momentum=None``, and the evaluation path with running statistics), so their
``state_dict`` keys are BatchNorm's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

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

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenormBase", "apply_renorm_schedule", "renorm_schedule"]


class BatchRenormBase(DimCheck, BatchNormBase):
    r"""Batch Renormalization (Ioffe 2017); see :class:`BatchRenorm2d`."""

    running_mean: Tensor  # always kept: r and d need them
    running_var: Tensor

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
            return empty_batch(input, self.weight, self.bias)
        check_bn_input(input, True)
        self._count_batch()
        dims, shape = reduce_dims(input), channel_shape(input)
        xs = to_stat_dtype(input)
        var_b, mu_b = torch.var_mean(xs, dims, correction=0, keepdim=True)  # μ_B, σ²_B (biased)
        sigma_b = torch.sqrt(var_b + self.eps)  # σ_B = √(σ²_B + ε)
        r, d = self._r_d(mu_b, sigma_b, self.running_mean, self.running_var)
        m = input.numel() // input.shape[1]
        # Updated before the output is computed (core.running_stats_updater says why checkpointing needs that):
        with torch.no_grad():  # μ ← μ + α(μ_B − μ);  running_var ← running_var + α(m/(m−1)·σ²_B − running_var)
            update_running_stats(self.running_mean, self.running_var, mu_b, var_b, m, self._batch_weight())
        xhat = (xs - mu_b) / sigma_b * r + d  # x̂ = (x − μ_B)/σ_B · r + d
        return apply_affine(xhat, self.weight, self.bias, shape).to(input.dtype)  # y = γ x̂ + β

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
        come from the unrolled moving average (:func:`bnlib.core.update_running_stats_steps`), so every step covers
        all chunks at once.
        """
        ghosts, dims = checked_ghost_batches(self, input, vbs)
        var_b, mu_b = torch.var_mean(ghosts, dims, correction=0, keepdim=True)  # μ_j, σ²_j: (k, 1, C, 1, ...)
        sigma_b = torch.sqrt(var_b + self.eps)
        m = ghosts[0].numel() // input.shape[1]
        momenta = self._count_batches_and_weights(len(ghosts))  # chunk j is BN step j
        with torch.no_grad():  # the running statistics each chunk starts from (the buffers: after the last)
            means, variances = update_running_stats_steps(self.running_mean, self.running_var, mu_b, var_b, m,
                                                          momenta)
        r, d = self._r_d(mu_b, sigma_b, means, variances)  # chunk j against the statistics before it
        xhat = ((ghosts - mu_b) / sigma_b * r + d).reshape(input.shape)
        return apply_affine(xhat, self.weight, self.bias, channel_shape(input)).to(input.dtype)

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


class BatchRenorm1d(BatchRenormBase):
    __doc__ = "Batch Renormalization over ``(N, C)`` or ``(N, C, L)`` input (Ioffe 2017)." + _RENORM_DOC
    input_dims = (2, 3)
    _layout = "2D (N, C) or 3D (N, C, L)"


class BatchRenorm2d(BatchRenormBase):
    __doc__ = "Batch Renormalization over ``(N, C, H, W)`` input (Ioffe 2017)." + _RENORM_DOC
    input_dims = (4,)
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
        if isinstance(module, BatchRenormBase):
            module.set_limits(r_max, d_max)
    return r_max, d_max

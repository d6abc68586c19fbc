r"""Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017): BN over ghost batches, chunks of the batch.

* :class:`GhostBatchNorm1d` / :class:`GhostBatchNorm2d`: BatchNorm whose training statistics come from
  consecutive chunks of ``virtual_batch_size`` examples, all chunks in one pass;
* :class:`GhostBatch`: any normalization layer applied to ghost batches;
* :func:`ghost_batches` and :func:`checked_ghost_batches`: the one way the batch is cut into ghost batches, also
  used by Batch Renorm's and Batch Layer Norm's one-pass ghost paths.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .core import (
    DimCheck,
    apply_affine,
    channel_shape,
    check_bn_input,
    check_size,
    empty_batch,
    to_stat_dtype,
    update_running_stats_steps,
)
from .modules import BatchNormBase

__all__ = ["GhostBatch", "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNormBase", "checked_ghost_batches",
           "ghost_batches"]


def ghost_batches(input: Tensor, vbs: int) -> tuple[Tensor, list[int]]:
    """``input`` in the statistics dtype, cut into ghost batches of ``vbs`` consecutive rows:
    ``(k, vbs, C, *spatial)``; and the dims a ghost batch's per-channel statistics reduce over."""
    ghosts = to_stat_dtype(input).reshape(input.shape[0] // vbs, vbs, *input.shape[1:])
    return ghosts, [1] + list(range(3, ghosts.dim()))


def checked_ghost_batches(layer: Any, input: Tensor, vbs: int) -> tuple[Tensor, list[int]]:
    """:func:`ghost_batches` of ``input`` after the checks ``layer`` makes on each chunk of ``vbs`` rows in
    training."""
    layer._check_input_dim(input)
    layer._check_num_channels(input)
    check_bn_input(input[:vbs], True)  # every chunk has the shape of the first
    return ghost_batches(input, vbs)


class GhostBatchNormBase(DimCheck, BatchNormBase):
    r"""Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017); see :class:`GhostBatchNorm2d`."""

    def __init__(self, num_features: int, virtual_batch_size: int, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True, track_running_stats: bool = True,
                 device=None, dtype=None, *, bias: bool = True) -> None:
        virtual_batch_size = check_size("virtual_batch_size", virtual_batch_size)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.virtual_batch_size = virtual_batch_size

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_num_channels(input)
        if not (self.training or self.running_mean is None):
            return super().forward(input)  # evaluation: BN with the running statistics
        if input.numel() == 0:  # an empty batch: empty output, running statistics (and the count) untouched
            return empty_batch(input, self.weight, self.bias)
        check_bn_input(input, False)
        n, vbs = input.shape[0], self.virtual_batch_size
        if n % vbs != 0:
            raise ValueError(f"{type(self).__name__}: virtual_batch_size={vbs} does not divide the batch size {n} "
                             f"(input shape {tuple(input.shape)})")
        per_ghost = vbs * math.prod(input.shape[2:])  # m: values per channel in one ghost batch
        if per_ghost <= 1:
            raise ValueError(f"{type(self).__name__} expected more than 1 value per channel in each ghost batch, "
                             f"got virtual_batch_size={vbs} with input of shape {tuple(input.shape)}")
        ghosts, dims = ghost_batches(input, vbs)  # (k, vbs, C, *spatial): ghost batch j = rows j·vbs …
        var, mean = torch.var_mean(ghosts, dims, correction=0, keepdim=True)  # μ_j, σ²_j per ghost batch, channel
        if self.training and self.track_running_stats:
            # one running-statistics step per ghost batch, in order, before the output is computed
            # (core.running_stats_updater says why activation checkpointing needs that order)
            momenta = self._count_batches_and_weights(len(ghosts))
            assert self.running_mean is not None and self.running_var is not None  # track_running_stats
            with torch.no_grad():
                update_running_stats_steps(self.running_mean, self.running_var, mean, var, per_ghost, momenta)
        xhat = ((ghosts - mean) * torch.rsqrt(var + self.eps)).reshape(input.shape)  # (x − μ_j)/√(σ²_j + ε)
        return apply_affine(xhat, self.weight, self.bias, channel_shape(input)).to(input.dtype)  # one shared γ, β

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


class GhostBatchNorm1d(GhostBatchNormBase):
    __doc__ = "Ghost Batch Normalization over ``(N, C)`` or ``(N, C, L)`` (Hoffer, Hubara & Soudry 2017)." + _GHOST_DOC
    input_dims = (2, 3)
    _layout = "2D (N, C) or 3D (N, C, L)"


class GhostBatchNorm2d(GhostBatchNormBase):
    __doc__ = "Ghost Batch Normalization over ``(N, C, H, W)`` (Hoffer, Hubara & Soudry 2017)." + _GHOST_DOC
    input_dims = (4,)
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
        self.layer, self.virtual_batch_size = layer, check_size("virtual_batch_size", virtual_batch_size)

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

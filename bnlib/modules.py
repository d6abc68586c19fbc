"""``BatchNorm1d``, ``BatchNorm2d`` and ``BatchNorm3d``: drop-in replacements for torch.nn's.

Built like PyTorch's ``torch/nn/modules/batchnorm.py`` (chapter *The algorithm* compares them):

* :class:`NormBase` (torch.nn's ``_NormBase``) owns the parameters (``weight`` = γ, ``bias`` = β), the buffers
  (``running_mean``, ``running_var``, ``num_batches_tracked``) and their initialisation;
* :class:`BatchNormBase` (torch.nn's ``_BatchNorm``) owns the running-statistics logic: it checks its input once
  (dimensions, channels, then :func:`bnlib.core.check_batch`) and calls the unchecked
  :func:`bnlib.functional.batch_norm_core`;
* the subclasses only check the number of input dimensions.

Parameter and buffer names, constructor arguments and defaults are torch.nn's, so a ``state_dict``
loads both ways, and the outputs, gradients and running statistics agree with torch.nn to float
tolerance for every combination of ``affine``, ``track_running_stats``, ``momentum`` (including
``None``: a cumulative average) and train/eval mode. As in torch.nn, ``eps`` is checked by the forward (positive
in training, non-negative in evaluation), an empty batch in training still counts in ``num_batches_tracked``, and
``torch.jit.script`` compiles the layers (the forward then runs :func:`bnlib.closed_form.batch_norm_train`, since
TorchScript cannot compile a Python ``autograd.Function``). Sizes are accepted as torch.nn accepts them (an int,
a NumPy integer, an integer 0-dimensional tensor). One difference: a forward that raises does not count its batch
(torch.nn counts it before checking).

Under activation checkpointing (``torch.utils.checkpoint``, reentrant or not) the forward runs again during the
backward, and, as torch.nn's layers do, the recompute counts a batch and updates the running statistics a second
time: the buffers end exactly as torch.nn's, and the count always matches the updates (every bnlib layer with
running statistics updates them before it saves tensors for the backward:
:func:`bnlib.core.running_stats_updater`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from .core import check_batch, check_size, register_affine, reset_affine, shape_str
from .functional import batch_norm_core

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormBase", "NormBase"]


class NormBase(nn.Module):
    """Parameters and buffers shared by every batch-statistics normalization layer.

    Args:
        num_features: ``C``, the number of channels (dim 1 of the input).
        eps: ε added to the variance. Default: 1e-5.
        momentum: weight of the newest batch in the running averages; ``None`` for a cumulative
            (equal-weight) average over all batches seen. Default: 0.1.
        affine: learn a per-channel scale γ (``weight``, init 1) and shift β (``bias``, init 0).
        track_running_stats: keep ``running_mean`` (init 0), ``running_var`` (init 1) and
            ``num_batches_tracked``, and use them in eval mode. If ``False``, batch statistics are
            used in both modes.
        device, dtype: where and in which dtype to create parameters and buffers.
        bias: keyword-only; with ``affine=True`` and ``bias=False`` only γ is learned (as in
            torch.nn from 2.13 on).
    """

    _version = 2  # the state_dict layout of torch.nn's BatchNorm (with num_batches_tracked)
    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__()
        num_features = check_size("num_features", num_features)
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"expected momentum in [0, 1] or None, got {momentum!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        register_affine(self, num_features, affine, bias, **factory)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked",
                                 torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, no batch tracked."""
        if self.running_mean is not None and self.running_var is not None and self.num_batches_tracked is not None:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics, γ to 1 and β to 0."""
        self.reset_running_stats()
        reset_affine(self)

    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    def _check_num_channels(self, input: Tensor) -> None:
        if input.dim() >= 2 and input.shape[1] != self.num_features:
            name = "layer" if torch.jit.is_scripting() else type(self).__name__  # TorchScript has no type()
            raise ValueError(
                f"{name}({self.num_features}) expected input with {self.num_features} channels "
                f"in dim 1, got {input.shape[1]} (input shape {shape_str(input)})"
            )

    def extra_repr(self) -> str:
        return ("{num_features}, eps={eps}, momentum={momentum}, affine={affine}, bias={use_bias}, "
                "track_running_stats={track_running_stats}".format(**self.__dict__, use_bias=self.bias is not None))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # State dicts saved before num_batches_tracked existed (version < 2) load with a count of 0,
        # as in torch.nn.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = (self.num_batches_tracked if self.num_batches_tracked is not None
                               and self.num_batches_tracked.device != torch.device("meta")
                               else torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class BatchNormBase(NormBase):
    """Batch Normalization: normalize with batch statistics in training, running ones in eval.

    ``affine_in_eval``: whether the evaluation output is a per-channel affine map of the input (BN's
    Algorithm 2), which :mod:`bnlib.fold` may fold into the layer before and :mod:`bnlib.frozen` may freeze.
    ``input_dims``: the input dimensions the layer accepts (empty: any from 2 on).
    """

    affine_in_eval: ClassVar[bool] = True
    input_dims: ClassVar[tuple[int, ...]] = ()

    def _count_batch(self) -> None:
        """``num_batches_tracked += 1`` for a batch that updates the running statistics (training, tracking)."""
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)

    def _batch_weight(self) -> float:
        """The weight of the newest batch in the running averages: ``momentum``, or for ``momentum=None``
        (a cumulative average) 1/n for the n-th batch counted by :meth:`_count_batch`."""
        momentum = self.momentum
        if momentum is not None:
            return momentum
        count = self.num_batches_tracked
        if self.training and self.track_running_stats and count is not None:
            return 1.0 / float(count)
        return 0.0

    def _count_batches_and_weights(self, k: int) -> list[float]:
        """:meth:`_count_batch` for ``k`` batches in order, and the weight each gets (:meth:`_batch_weight`)."""
        weights = []
        for _ in range(k):
            self._count_batch()
            weights.append(self._batch_weight())
        return weights

    def forward(self, input: Tensor) -> Tensor:
        # The one validation of this forward: dimensions, channels, dtype, values per channel, eps.
        self._check_input_dim(input)
        self._check_num_channels(input)
        training, running_mean, running_var = self.training, self.running_mean, self.running_var
        # Batch statistics in training, and always when no running statistics are kept.
        use_batch_stats = training or running_mean is None
        check_batch(input, use_batch_stats, self.eps)
        self._count_batch()
        # The running buffers are read in evaluation, and updated in training only with track_running_stats=True.
        with_buffers = not training or self.track_running_stats
        return batch_norm_core(
            input,
            running_mean if with_buffers else None,
            running_var if with_buffers else None,
            self.weight,
            self.bias,
            use_batch_stats,
            self._batch_weight(),
            self.eps,
        )


class BatchNorm1d(BatchNormBase):
    """Batch Normalization over a 2D ``(N, C)`` or 3D ``(N, C, L)`` input.

    Statistics per channel over ``N`` (or ``N·L``) values. Same arguments as
    :class:`torch.nn.BatchNorm1d`; see :class:`NormBase`.
    """

    input_dims = (2, 3)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"BatchNorm1d expected 2D (N, C) or 3D (N, C, L) input, got {input.dim()}D input "
                             f"of shape {shape_str(input)}")


class BatchNorm2d(BatchNormBase):
    """Batch Normalization over a 4D ``(N, C, H, W)`` input (any memory format).

    Statistics per channel over ``N·H·W`` values. Same arguments as :class:`torch.nn.BatchNorm2d`.
    """

    input_dims = (4,)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"BatchNorm2d expected 4D (N, C, H, W) input, got {input.dim()}D input "
                             f"of shape {shape_str(input)}")


class BatchNorm3d(BatchNormBase):
    """Batch Normalization over a 5D ``(N, C, D, H, W)`` input.

    Statistics per channel over ``N·D·H·W`` values. Same arguments as :class:`torch.nn.BatchNorm3d`.
    """

    input_dims = (5,)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"BatchNorm3d expected 5D (N, C, D, H, W) input, got {input.dim()}D input "
                             f"of shape {shape_str(input)}")

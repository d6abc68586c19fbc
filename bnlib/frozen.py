r"""Frozen Batch Normalization: fixed running statistics, γ and β optionally trainable.

When a BN network trained on one task is fine-tuned on another with small batches, its BN layers can
either keep behaving as in training (normalize every batch with that batch's statistics, and move the
running averages towards them) or be *frozen*: normalize every input with the running statistics they
had at the end of pre-training, in training and evaluation alike. A frozen layer is the fixed affine map

.. math::

    y = \gamma \, \frac{x - \hat\mu}{\sqrt{\hat\sigma^2 + \epsilon}} + \beta
      = x \cdot s + (\beta - \hat\mu \, s), \qquad s = \frac{\gamma}{\sqrt{\hat\sigma^2 + \epsilon}},

per channel: exactly what the original layer computes in eval mode. Nothing in it depends on the batch,
so it works for any batch size (including one example), and its output in training equals its output
in evaluation. γ and β may still be learned (``train_affine=True``), as object detectors commonly do
with torchvision's ``FrozenBatchNorm2d`` for the former case and Keras does for neither: a Keras
``BatchNormalization`` with ``trainable=False`` runs in inference mode and learns nothing, which is
:func:`freeze_batchnorm` with ``train_affine=False``.

* :class:`FrozenBatchNorm1d`, :class:`FrozenBatchNorm2d`, :class:`FrozenBatchNorm3d` (and the
  dimension-agnostic :class:`FrozenBatchNorm`): the layer. Its parameters and buffers have the names of
  torch.nn's BatchNorm (``weight``, ``bias``, ``running_mean``, ``running_var``,
  ``num_batches_tracked``), so ``state_dict`` s load both ways;
* :func:`freeze_batchnorm`: replace every batch-statistics layer of a model (as defined once in
  :mod:`bnlib.layers`) by its frozen counterpart.

Why not ``requires_grad_(False)`` on BN's parameters? That stops γ and β from learning, but a layer in
training mode still normalizes with batch statistics and still updates its running statistics. And
``bn.eval()`` alone is undone by the next ``model.train()``. A frozen layer has no training mode to
fall back to.

A frozen layer is deliberately *not* a batch-statistics layer (:func:`bnlib.layers.is_batchnorm` is False
for it): Precise BN (:mod:`bnlib.running_stats`) leaves its statistics alone and SyncBN conversion skips it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .core import check_size
from .layers import is_batchnorm

__all__ = ["FrozenBatchNorm", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "freeze_batchnorm"]


class FrozenBatchNorm(nn.Module):
    """Batch Normalization with fixed statistics, for any ``(N, C, *)`` input.

    Args:
        num_features: ``C``, the number of channels (dim 1 of the input).
        eps: ε added to the variance. Default: 1e-5.
        affine: keep a per-channel scale γ (``weight``, init 1) and shift β (``bias``, init 0).
        train_affine: whether γ and β learn (``requires_grad``). Default: False.
        bias: keyword-only; with ``affine=True`` and ``bias=False`` there is only γ.
        device, dtype: where and in which dtype to create parameters and buffers.

    The statistics start as mean 0 and variance 1; :func:`freeze_batchnorm` (or
    :meth:`from_batchnorm`) copies them from a trained BN layer. They are buffers and never change in
    the forward pass, in either mode. The forward pass is the same in ``train()`` and ``eval()``.
    """

    input_dims: tuple[int, ...] = ()  # allowed input dimensions; empty: any with at least 2
    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor
    _layout = "(N, C, *)"

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True, train_affine: bool = False,
                 device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__()
        num_features = check_size("num_features", num_features)
        if not eps >= 0:
            raise ValueError(f"expected eps >= 0, got {eps!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        self.train_affine = bool(train_affine) and affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory), requires_grad=self.train_affine)
            self.bias = (nn.Parameter(torch.zeros(num_features, **factory), requires_grad=self.train_affine)
                         if bias else None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        # Kept (and never changed) so that state_dicts match torch.nn's BatchNorm key for key.
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    @classmethod
    def from_batchnorm(cls, bn: Any, train_affine: bool = False) -> FrozenBatchNorm:
        """A frozen copy of the BN layer ``bn``: its eps, γ, β and running statistics (copied, not shared).

        Raises:
            ValueError: ``bn`` keeps no running statistics (``track_running_stats=False``) or is a
                layer whose eval-mode output is not an affine map (``affine_in_eval`` False, e.g.
                :class:`bnlib.BatchLayerNorm`).
        """
        if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
            raise ValueError(f"cannot freeze {type(bn).__name__}: it keeps no running statistics "
                             "(track_running_stats=False), so there is nothing to freeze")
        if not getattr(bn, "affine_in_eval", True):
            raise ValueError(f"cannot freeze {type(bn).__name__}: its eval-mode output depends on each example "
                             "(not only on its channel), so it is not a fixed affine map")
        affine = bn.weight is not None
        ref = bn.running_mean
        out = cls(bn.num_features, bn.eps, affine=affine, train_affine=train_affine, device=ref.device,
                  dtype=ref.dtype, bias=bn.bias is not None)
        with torch.no_grad():
            out.running_mean.copy_(bn.running_mean)
            out.running_var.copy_(bn.running_var)
            if bn.num_batches_tracked is not None:
                out.num_batches_tracked.copy_(bn.num_batches_tracked)
            if out.weight is not None:
                out.weight.copy_(bn.weight)
            if out.bias is not None:
                out.bias.copy_(bn.bias)
        out.train(bn.training)
        return out

    def _check_input(self, input: Tensor) -> None:
        if input.dim() < 2 or (self.input_dims and input.dim() not in self.input_dims):
            raise ValueError(f"{type(self).__name__} expected {self._layout} input, got {input.dim()}D input "
                             f"of shape {tuple(input.shape)}")
        if input.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) expected input with {self.num_features} "
                             f"channels in dim 1, got {input.shape[1]} (input shape {tuple(input.shape)})")

    def scale_and_shift(self) -> tuple[Tensor, Tensor]:
        """The per-channel ``(s, t)`` of ``y = x·s + t``: ``s = γ/√(σ̂²+ε)``, ``t = β − μ̂·s``."""
        scale = (self.running_var + self.eps).rsqrt()
        if self.weight is not None:
            scale = scale * self.weight
        offset = -self.running_mean * scale
        if self.bias is not None:
            offset = offset + self.bias
        return scale, offset

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        scale, offset = self.scale_and_shift()
        shape = (1, -1) + (1,) * (input.dim() - 2)
        return input * scale.view(shape).to(input.dtype) + offset.view(shape).to(input.dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, affine={self.affine}, "
                f"train_affine={self.train_affine}")


class FrozenBatchNorm1d(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` for ``(N, C)`` or ``(N, C, L)`` input, the frozen ``BatchNorm1d``."""

    input_dims = (2, 3)
    _layout = "2D (N, C) or 3D (N, C, L)"


class FrozenBatchNorm2d(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` for ``(N, C, H, W)`` input, the frozen ``BatchNorm2d``."""

    input_dims = (4,)
    _layout = "4D (N, C, H, W)"


class FrozenBatchNorm3d(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` for ``(N, C, D, H, W)`` input, the frozen ``BatchNorm3d``."""

    input_dims = (5,)
    _layout = "5D (N, C, D, H, W)"


_FROZEN_BY_DIMS: dict[tuple[int, ...], type[FrozenBatchNorm]] = {
    (2, 3): FrozenBatchNorm1d, (4,): FrozenBatchNorm2d, (5,): FrozenBatchNorm3d}
_TORCH_DIMS = ((nn.BatchNorm1d, (2, 3)), (nn.BatchNorm2d, (4,)), (nn.BatchNorm3d, (5,)),
               (nn.LazyBatchNorm1d, (2, 3)), (nn.LazyBatchNorm2d, (4,)), (nn.LazyBatchNorm3d, (5,)))


def _frozen_class(bn: nn.Module) -> type[FrozenBatchNorm]:
    """The frozen class for ``bn``'s input layout: from the class attribute ``input_dims`` of bnlib's layers or the
    torch.nn class; the dimension-agnostic one for any other (e.g. SyncBatchNorm)."""
    dims = getattr(bn, "input_dims", None)
    if dims is None:
        dims = next((d for cls, d in _TORCH_DIMS if isinstance(bn, cls)), ())
    return _FROZEN_BY_DIMS.get(tuple(dims), FrozenBatchNorm)


def freeze_batchnorm(model: nn.Module, train_affine: bool = False) -> nn.Module:
    """Replace every batch-statistics layer in ``model`` by a frozen copy of it.

    "Batch-statistics layer" is :func:`bnlib.layers.is_batchnorm`: torch.nn's and bnlib's BatchNorm,
    SyncBatchNorm, Batch Renorm and Ghost BN (whose eval-mode output is the affine map above). Each is
    replaced by :class:`FrozenBatchNorm1d` / ``2d`` / ``3d`` (by its layout; :class:`FrozenBatchNorm`
    for SyncBatchNorm) holding copies of its eps, γ, β and running statistics, so the model computes
    in both modes what it computed in eval mode before. Children are replaced in place; a BN layer
    passed as ``model`` itself is returned frozen, so always use the return value::

        model = freeze_batchnorm(model, train_affine=True)

    Build the optimizer afterwards: the new γ and β are new tensors.

    Args:
        model: any module.
        train_affine: whether the frozen layers' γ and β learn (``requires_grad``); other parameters
            are left as they are.

    Returns:
        nn.Module: ``model`` with its BN layers frozen (or the frozen layer, if ``model`` is one).

    Raises:
        ValueError: a BN layer without running statistics (``track_running_stats=False``), or a
            layer whose eval-mode output is not an affine map (see :meth:`FrozenBatchNorm.from_batchnorm`).
    """
    if is_batchnorm(model):
        return _frozen_class(model).from_batchnorm(model, train_affine)
    for name, child in model.named_children():
        new = freeze_batchnorm(child, train_affine)
        if new is not child:
            model.add_module(name, new)
    return model

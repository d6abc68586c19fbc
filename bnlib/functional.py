r"""Batch Normalization as a function of tensors, with a hand-written backward pass.

:func:`batch_norm` has the signature and semantics of :func:`torch.nn.functional.batch_norm` but is written
in plain tensor operations (torch's own batch-norm kernels are never called). Per channel, over the :math:`m`
values of the batch (``N`` times the spatial size), training mode computes

.. math::
    \mu_B = \overline{x}, \qquad \sigma_B^2 = \overline{(x-\mu_B)^2}, \qquad
    y = \gamma\,\frac{x-\mu_B}{\sqrt{\sigma_B^2+\epsilon}} + \beta,
    \qquad \overline{\,\cdot\,} = \text{mean over the } m \text{ values of a channel},

with the closed-form backward

.. math::
    \frac{\partial L}{\partial x} = \frac{\gamma}{\sqrt{\sigma_B^2+\epsilon}}
    \Big(g - \overline{g} - \hat x\,\overline{g\hat x}\Big), \qquad
    \frac{\partial L}{\partial \gamma} = \textstyle\sum g\hat x, \qquad \frac{\partial L}{\partial \beta} = \sum g,

and updates the running averages (:func:`bnlib.core.update_running_stats`). Evaluation mode is the fixed affine
map of Algorithm 2, :math:`y = (x - E[x])\,\gamma/\sqrt{\mathrm{Var}[x]+\epsilon} + \beta`.

Two implementations of the training mode compute the same numbers (tested equal):

* :mod:`bnlib.closed_form`: the formulas above line by line, as the chapter *The algorithm*
  (``chapters/algorithm.ipynb``) derives them. Read this one;
* :mod:`bnlib.fast`: the same closed form with fewer passes over memory and fewer calls into torch, the default.

``with use_closed_form():`` runs the plain one instead of the tuned one (for teaching, and to tell a bug of the
tuning from a bug of the math)::

    with bnlib.functional.use_closed_form():
        y = model(x)          # every bnlib BatchNorm layer runs bnlib.closed_form

Behaviour shared with torch.nn 2.13 beyond the formulas: an empty batch (``N = 0`` or a zero spatial size) gives
an empty output and leaves the running statistics untouched; ``eps`` must be positive in training and
non-negative in evaluation (``ValueError`` at the call, not at construction); a channel holding ``+inf`` gets
``mean = inf`` and ``var = nan`` (so ``running_mean`` becomes ``inf``, ``running_var`` and that channel's output
NaN); the output has torch.nn's memory format (channels-last stays channels-last). Under TorchScript, which cannot
compile a Python ``autograd.Function``, and under the transforms of ``torch.func`` (``vmap``, ``grad``,
``jacrev``, ``jacfwd``) and forward-mode AD, the training mode is :func:`bnlib.closed_form.batch_norm_train` and
autograd derives its derivatives.

Validation happens once per call: :func:`batch_norm` checks its arguments with :func:`check_bn_input`, then runs
the unchecked :func:`batch_norm_core`, which the layers call directly after checking their own input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from . import closed_form, fast
from .core import (
    channel_shape,
    check_bn_input,
    empty_batch,
    in_torch_layout,
    running_stats_updater,
    stat_dtype,
    update_running_stats,
)

__all__ = ["batch_norm", "batch_norm_core", "check_bn_input", "use_closed_form"]

_plain = [False]  # set by use_closed_form()


@contextlib.contextmanager
def use_closed_form() -> Iterator[None]:
    """Inside this block, training-mode BN runs :mod:`bnlib.closed_form` instead of the tuned :mod:`bnlib.fast`.

    It applies to :func:`batch_norm` and to every bnlib layer built on it (``BatchNorm1d/2d/3d``, the recurrent
    :class:`bnlib.StepBatchNorm`, and :class:`bnlib.SyncBatchNorm` without a process group). The blocks nest;
    the setting is global (not per thread).
    """
    before = _plain[0]
    _plain[0] = True
    try:
        yield
    finally:
        _plain[0] = before


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
        running_mean, running_var: population estimates of shape ``(C,)``, or ``None``. In training mode they
            are updated in place, ``running = (1 - momentum) * running + momentum * batch``, with the *unbiased*
            batch variance (:math:`\frac{m}{m-1}\sigma_B^2`, Algorithm 2). In evaluation mode they are used to
            normalize and must be given.
        weight, bias: :math:`\gamma` and :math:`\beta` of shape ``(C,)``, or ``None`` (1 and 0).
        training: use batch statistics (``True``) or the running ones (``False``).
        momentum: weight of the new batch in the running averages (PyTorch's convention).
        eps: :math:`\epsilon` added to the variance; positive in training, non-negative in evaluation.

    Returns:
        A tensor of the same shape and dtype as ``input``, in torch.nn's memory format: channels-last stays
        channels-last, any other strides give a contiguous result.
    """
    check_bn_input(input, training, eps, running_mean=running_mean, running_var=running_var, weight=weight,
                   bias=bias)
    if not training and (running_mean is None or running_var is None):
        raise ValueError("expected running_mean and running_var in evaluation mode (training=False), got None")
    return batch_norm_core(input, running_mean, running_var, weight, bias, training, momentum, eps)



def batch_norm_core(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
                    bias: Tensor | None, training: bool, momentum: float, eps: float) -> Tensor:
    """:func:`batch_norm` on arguments already checked (the layers check their own input, once)."""
    if not training:
        assert running_mean is not None and running_var is not None
        return _inference(input, running_mean, running_var, weight, bias, eps)
    if input.numel() == 0:  # an empty batch: nothing to normalize, no statistics to learn from (as torch.nn)
        return empty_batch(input, weight, bias)
    if torch.jit.is_scripting():
        return _differentiable_with_update(input, running_mean, running_var, weight, bias, momentum, eps)
    return _train(input, running_mean, running_var, weight, bias, momentum, eps)


def _differentiable(input: Tensor, weight: Tensor | None, bias: Tensor | None,
                    eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """The closed form's forward in plain operations; autograd (or a transform) derives its derivatives."""
    y, mean, var = closed_form.batch_norm_train(input, weight, bias, eps)
    return in_torch_layout(y, input), mean.detach(), var.detach()


def _differentiable_with_update(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                                weight: Tensor | None, bias: Tensor | None, momentum: float, eps: float) -> Tensor:
    """:func:`_differentiable`, then the running averages (TorchScript and ``torch.func`` transforms)."""
    y, mean, var = _differentiable(input, weight, bias, eps)
    with torch.no_grad():
        update_running_stats(running_mean, running_var, mean, var, input.numel() // input.shape[1], momentum)
    return y


def _train(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
           bias: Tensor | None, momentum: float, eps: float) -> Tensor:
    """The training mode outside TorchScript: an autograd Function (the tuned one, or the closed form's under
    :func:`use_closed_form`), or plain operations under a ``torch.func`` transform.

    The Function updates the running averages before it saves tensors (:func:`bnlib.core.running_stats_updater`).
    """
    if _transformed(input, running_mean):
        return _differentiable_with_update(input, running_mean, running_var, weight, bias, momentum, eps)
    update = running_stats_updater(running_mean, running_var, input.numel() // input.shape[1], momentum)
    if _plain[0]:
        y, _, _ = closed_form.BatchNormFunction.apply(input, weight, bias, eps, update)
        return in_torch_layout(y, input)
    return fast.BatchNormFunction.apply(input, weight, bias, eps, update)[0]


def _transformed(input: Tensor, running_mean: Tensor | None) -> bool:
    """Whether ``input`` is under a ``torch.func`` transform (vmap, grad, jacrev, jacfwd, ...) or forward-mode AD.

    There the training mode runs the closed form's forward in plain operations, which every transform
    differentiates and batches itself, as torch.nn's; the autograd Functions' hand-written backward covers only
    ordinary (reverse-mode) autograd.
    """
    if torch.compiler.is_compiling():
        return False
    functorch = torch._C._functorch
    if running_mean is not None and functorch.is_batchedtensor(input) and not functorch.is_batchedtensor(running_mean):
        raise RuntimeError("batch_norm got a batched input (torch.func.vmap) while running_mean and running_var, "
                           "updated in place, are not batched: use track_running_stats=False, or batch the buffers")
    return functorch.is_functorch_wrapped_tensor(input) or torch.autograd.forward_ad._current_level >= 0


def _inference(input: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None,
               bias: Tensor | None, eps: float) -> Tensor:
    """Algorithm 2: the fixed affine map y = (x − E[x])·γ/√(Var[x]+ε) + β.

    Subtracting E[x] first (rather than x·s + (β − s E[x])) keeps the digits of x when |E[x]| ≫ √Var[x].
    """
    shape, dtype = channel_shape(input), stat_dtype(input)
    scale = torch.rsqrt(running_var.to(dtype) + eps)  # 1 / √(Var[x] + ε)
    if weight is not None:
        scale = scale * weight  # γ / √(Var[x] + ε)
    y = input.to(dtype) - running_mean.to(dtype).view(shape)  # x − E[x]
    if bias is None:
        y = y * scale.view(shape)  # · γ / √(Var[x] + ε)
    else:
        y = torch.addcmul(bias.view(shape), y, scale.view(shape))  # · γ / √(Var[x] + ε) + β
    return in_torch_layout(y.to(input.dtype), input)


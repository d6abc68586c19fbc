"""What counts as a batch-statistics layer: the one definition the rest of bnlib uses.

A *batch-statistics layer* normalizes each channel (dim 1) of an ``(N, C, *)`` input with the mean and
variance of that channel over the batch (and the spatial positions) in training, and keeps
``running_mean`` / ``running_var`` buffers that estimate the population mean and *unbiased* variance of
its input per channel. Those are the layers whose statistics Precise BN recomputes
(:mod:`bnlib.running_stats`), that folding may merge into the preceding layer (:mod:`bnlib.fold`) and
that the lab kit's parameter studies count as "the BN layers" (:mod:`bnlib.lab.params`).

:data:`BATCH_NORM_TYPES` is torch.nn's ``_BatchNorm`` (``BatchNorm1d/2d/3d``, ``LazyBatchNorm*d``,
``SyncBatchNorm``) and bnlib's :class:`bnlib.modules.BatchNormBase`, which every bnlib batch-statistics layer
subclasses: ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, ``BatchRenorm1d/2d``, ``GhostBatchNorm1d/2d`` and
``BatchLayerNorm``. This is the same test as fvcore's ``precise_bn`` (one tuple of base classes).

Deliberately *not* included:

* **Instance Normalization** (torch.nn's and bnlib's), even with ``track_running_stats=True``. Its statistics
  are per example, and its ``running_var`` is the batch average of the per-example variances, not the
  variance of the layer's input over the batch: Precise BN would write the wrong quantity into it. Neither
  torch.nn nor bnlib derives it from ``_BatchNorm``.
* **Layer and Group Normalization**: per-example statistics and no running buffers.
* :class:`bnlib.recurrent.StepBatchNorm`: one set of statistics per time step (``running_mean`` has shape
  ``(max_steps, C)``), used with a step index that a plain forward pass does not give.

**Batch Layer Normalization** is included: its batch half is Batch Normalization and its buffers have
BatchNorm's meaning, so Precise BN and the parameter studies treat it correctly. Its evaluation output is
not an affine map of the input (the per-example half depends on the example): its class attribute
``affine_in_eval`` is False, and :mod:`bnlib.fold` and :mod:`bnlib.frozen` refuse it; "is a batch-statistics
layer" does not mean "foldable".

Two more ideas live here because every part of bnlib needs them, and each is written once:

* :func:`bn_layers`: the batch-statistics layers *of a model*, by qualified name (as
  ``model.named_modules()`` gives it), optionally only those that keep running statistics;
* :func:`preserved_state`: a context manager that puts a model back exactly as it was (train/eval
  flags, buffers, and on request parameters, their ``requires_grad`` and ``.grad``), for every
  measurement that must leave no trace (Precise BN, evaluation with batch statistics, probes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .modules import BatchNormBase

__all__ = ["BATCH_NORM_TYPES", "bn_layers", "is_batchnorm", "preserved_state"]

#: Base classes of every batch-statistics layer, torch.nn's and bnlib's (see the module docstring).
BATCH_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, BatchNormBase)


def is_batchnorm(module: nn.Module) -> bool:
    """True for a batch-statistics layer of torch.nn or bnlib (an instance of :data:`BATCH_NORM_TYPES`)."""
    return isinstance(module, BATCH_NORM_TYPES)


def bn_layers(model: nn.Module, *, tracking: bool = False) -> dict[str, nn.Module]:
    """The batch-statistics layers of ``model`` (itself included), by qualified name, in module order.

    Args:
        model: any module.
        tracking: only the layers that keep running statistics (``running_mean`` is not None), i.e. those
            whose statistics Precise BN can recompute.

    Returns:
        dict: qualified name (``""`` for ``model`` itself) -> layer; a module shared under two names is
        listed once, under the first.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"bn_layers() expects a torch.nn.Module, got {type(model).__name__}")
    return {name: m for name, m in model.named_modules()
            if is_batchnorm(m) and (not tracking or getattr(m, "running_mean", None) is not None)}


@contextlib.contextmanager
def preserved_state(model: nn.Module, *, parameters: bool = False) -> Iterator[nn.Module]:
    """Context manager: on exit, ``model`` is exactly as it was on entry, whatever the block did.

    Always restored: every submodule's train/eval flag, and every buffer (``running_mean``,
    ``running_var``, ``num_batches_tracked``, ...) -- the same tensor object, with its old values, even if
    the block replaced or resized it. With ``parameters=True`` also every parameter's values,
    ``requires_grad`` and ``.grad`` (kept by value: a gradient that existed comes back equal, one that did
    not exist comes back as None)::

        with preserved_state(model):
            model.train()
            model(x)            # updates the running statistics ...
        # ... which are back to their old values here, and model.training is what it was

    Args:
        model: the module to protect.
        parameters: also restore the parameters, their ``requires_grad`` flags and their gradients.

    Yields:
        The model itself.
    """
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(m, name, buf, None if buf is None else buf.detach().clone())
               for m in model.modules() for name, buf in m._buffers.items()]
    params = []
    if parameters:
        params = [(m, name, p, p.detach().clone(), p.requires_grad,
                   None if p.grad is None else p.grad.detach().clone())
                  for m in model.modules() for name, p in m._parameters.items() if p is not None]
    try:
        yield model
    finally:
        with torch.no_grad():
            for m, name, buf, saved in buffers:
                m._buffers[name] = buf          # the original tensor, even if the block replaced it
                if buf is not None and saved is not None:
                    if buf.shape != saved.shape:
                        buf.resize_(saved.shape)
                    buf.copy_(saved)
            for m, name, p, value, requires_grad, grad in params:
                m._parameters[name] = p
                if p.shape != value.shape:
                    p.data = value
                else:
                    p.copy_(value)
                p.requires_grad_(requires_grad)
                p.grad = grad
        for m, training in modes:
            m.training = training

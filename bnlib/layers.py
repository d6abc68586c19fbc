"""What counts as a batch-statistics layer: the one definition the rest of bnlib uses.

A *batch-statistics layer* normalizes each channel (dim 1) of an ``(N, C, *)`` input with the mean and
variance of that channel over the batch (and the spatial positions) in training, and keeps
``running_mean`` / ``running_var`` buffers that estimate the population mean and *unbiased* variance of
its input per channel. Those are the layers whose statistics Precise BN recomputes
(:mod:`bnlib.running_stats`), that folding may merge into the preceding layer (:mod:`bnlib.fold`) and
that the lab kit's parameter studies count as "the BN layers" (:mod:`bnlib.lab.params`).

:data:`BATCH_NORM_TYPES` is torch.nn's ``_BatchNorm`` (``BatchNorm1d/2d/3d``, ``LazyBatchNorm*d``,
``SyncBatchNorm``) and bnlib's :class:`bnlib.modules._BatchNorm`, which every bnlib batch-statistics layer
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
not an affine map of the input (the per-example half depends on the example), so :mod:`bnlib.fold` refuses
to fold it by name; "is a batch-statistics layer" does not mean "foldable".
"""

from __future__ import annotations

from torch import nn

from .modules import _BatchNorm

__all__ = ["BATCH_NORM_TYPES", "is_batchnorm"]

#: Base classes of every batch-statistics layer, torch.nn's and bnlib's (see the module docstring).
BATCH_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, _BatchNorm)


def is_batchnorm(module: nn.Module) -> bool:
    """True for a batch-statistics layer of torch.nn or bnlib (an instance of :data:`BATCH_NORM_TYPES`)."""
    return isinstance(module, BATCH_NORM_TYPES)

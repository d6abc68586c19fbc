"""The alternatives to Batch Normalization, by family (this module gathers them under one name).

* :mod:`bnlib.per_example`: :class:`LayerNorm`, :class:`GroupNorm`, :class:`InstanceNorm1d`,
  :class:`InstanceNorm2d` (statistics of one example);
* :mod:`bnlib.renorm`: :class:`BatchRenorm1d`, :class:`BatchRenorm2d`, :func:`renorm_schedule`,
  :func:`apply_renorm_schedule` (batch statistics corrected towards the population's);
* :mod:`bnlib.ghost`: :class:`GhostBatchNorm1d`, :class:`GhostBatchNorm2d`, :class:`GhostBatch` (statistics of
  smaller chunks of the batch);
* :mod:`bnlib.batch_layer_norm`: :class:`BatchLayerNorm` (batch and per-example normalization mixed).
"""

from .batch_layer_norm import BatchLayerNorm
from .ghost import GhostBatch, GhostBatchNorm1d, GhostBatchNorm2d
from .per_example import GroupNorm, InstanceNorm1d, InstanceNorm2d, LayerNorm
from .renorm import BatchRenorm1d, BatchRenorm2d, apply_renorm_schedule, renorm_schedule

__all__ = [
    "LayerNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d",
    "BatchRenorm1d", "BatchRenorm2d", "renorm_schedule", "apply_renorm_schedule",
    "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatch", "BatchLayerNorm",
]

"""bnlib: Batch Normalization and its variants, written to be read, and exact against torch.nn.

The package has two parts, visible in its file tree:

* **the normalization library** -- the modules directly in ``bnlib/``. They depend on torch (and
  NumPy for the reference implementation) only, and ``import bnlib`` loads nothing else:

  - ``reference``      NumPy teaching implementation: forward, backward by hand, numerical gradients
  - ``closed_form``    BN in PyTorch as the paper writes it: Algorithm 1 and the closed-form backward, line by line
  - ``fast``           the same closed form, tuned for speed (the default)
  - ``functional``     ``batch_norm`` with torch.nn.functional's semantics, on either of the two
  - ``modules``        ``BatchNorm1d/2d/3d``, drop-in replacements for torch.nn's
  - ``per_example``    LayerNorm, GroupNorm, InstanceNorm
  - ``renorm``         Batch Renormalization
  - ``ghost``          Ghost Batch Normalization
  - ``batch_layer_norm``  Batch Layer Normalization (``variants`` gathers these four families)
  - ``rmsnorm``        RMSNorm (per-token root-mean-square normalization, as in transformers)
  - ``recurrent``      per-time-step BN for recurrent networks
  - ``distributed``    ``SyncBatchNorm`` on torch.distributed (gloo on CPU, NCCL on GPU)
  - ``running_stats``  momentum conventions (PyTorch, Keras, Flax) and Precise BN
  - ``fold``           folding BN into the preceding Conv/Linear for inference
  - ``frozen``         frozen BN (fixed statistics, γ/β optionally trainable) for fine-tuning
  - ``inplace_abn``    In-Place Activated BN: BN + leaky ReLU that keeps only its output for the backward
  - ``layers``         which modules count as batch-statistics layers (one definition)
  - ``checkup``        the common BN mistakes found in a model, with evidence (``bnlib.checkup(model, batch)``)
  - ``core``           what they all share: shapes, validation, layouts, the running-average update
  - ``weight_std``     scaled weight standardization (normalizing the weights instead of the activations)
  - ``adapt``          test-time adaptation: AdaBN, prediction-time BN, the source/target mix, TENT

* **the lab kit** -- the subpackage ``bnlib.lab``: data, models, the training loop, probes and
  measurements, plots, multi-process launch, benchmarks and their measured records. It is what
  the book's chapters use to run experiments; see its own docstring.
"""

__version__ = "0.1.0"

from . import adapt, closed_form, functional, layers, reference, running_stats
from .checkup import checkup
from .distributed import SyncBatchNorm
from .fold import fold_batchnorm
from .frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, freeze_batchnorm
from .inplace_abn import InPlaceABN
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .recurrent import StepBatchNorm, recompute_step_stats
from .rmsnorm import RMSNorm
from .variants import (
    BatchLayerNorm,
    BatchRenorm1d,
    BatchRenorm2d,
    GhostBatch,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    LayerNorm,
    apply_renorm_schedule,
    renorm_schedule,
)
from .weight_std import ScaledStdConv2d, ScaledStdLinear

__all__ = [
    "BatchLayerNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchRenorm1d", "BatchRenorm2d",
    "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "GhostBatch", "GhostBatchNorm1d",
    "GhostBatchNorm2d", "GroupNorm", "InPlaceABN", "InstanceNorm1d", "InstanceNorm2d", "LayerNorm", "RMSNorm",
    "ScaledStdConv2d", "ScaledStdLinear", "StepBatchNorm", "SyncBatchNorm", "adapt", "apply_renorm_schedule",
    "checkup", "closed_form", "fold_batchnorm", "freeze_batchnorm", "functional", "layers", "recompute_step_stats",
    "reference", "renorm_schedule", "running_stats"
]

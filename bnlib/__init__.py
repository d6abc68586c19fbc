"""bnlib: the reference library of the book *Batch Normalization*.

Organised by concept (each module's docstring names the chapter that explains it):

* ``reference``    NumPy teaching implementation (forward, backward by hand, numerical gradients)
* ``functional``   ``batch_norm`` in plain tensor ops with a closed-form autograd backward
* ``modules``      ``BatchNorm1d/2d/3d``, drop-in replacements for torch.nn's
* ``variants``     LayerNorm, GroupNorm, InstanceNorm, Batch Renorm, Ghost BN, Batch Layer Norm
* ``distributed``  ``SyncBatchNorm`` on torch.distributed (gloo on CPU, NCCL on GPU)
* ``running_stats`` momentum conventions and Precise BN population statistics
* ``fold``         folding BN into the preceding Conv/Linear for inference
* ``data``         checksummed MNIST
* ``train``        device choice, the trainer ``fit`` and its ``History``
* ``models``       MLP, CNN, ResNet with a pluggable ``norm=``
* ``probes``       activation and gradient recorders
* ``landscape``    loss-landscape smoothness measurements
* ``plots``        the book's figure style (imported on demand: ``from bnlib import plots``)
* ``timing``, ``bench`` measurement helpers, ``python -m bnlib.bench`` and the measured records
  in ``results/`` (plotted by the appendix *Running on a GPU*)
"""

__version__ = "0.1.0"

from . import functional, reference
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .variants import (BatchLayerNorm, BatchRenorm1d, BatchRenorm2d, GhostBatchNorm1d, GhostBatchNorm2d,
                       GroupNorm, InstanceNorm1d, InstanceNorm2d, LayerNorm, apply_renorm_schedule,
                       renorm_schedule)
from .distributed import SyncBatchNorm
from .fold import fold_batchnorm
from .train import History, class_subset_sampler, device, evaluate, fit, seed_everything
from .models import CNN, MLP, ResNet, make_norm
from .probes import GradNormProbe, HistogramProbe, PercentileProbe, SaturationProbe, grad_norms

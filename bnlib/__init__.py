"""bnlib: the reference library of the book *Batch Normalization*."""
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from . import functional, reference

"""Where and how reproducibly the book's experiments run: the device, and seeding.

* :func:`device` picks the device (argument, then ``BNLIB_DEVICE``, then CUDA, Apple MPS, the CPU);
* :func:`seed_everything` seeds Python, NumPy and PyTorch before a model is built, so that its initial
  weights are reproducible (:func:`bnlib.lab.training.fit` seeds the mini-batch order itself).
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["device", "seed_everything"]

_DEVICE_HELP = "use 'cpu', 'cuda', 'cuda:N' or 'mps' (or unset BNLIB_DEVICE to pick automatically)"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _check_device(dev: torch.device, origin: str) -> torch.device:
    """Raise RuntimeError if ``dev`` cannot be used here; return it otherwise."""
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"{origin} asks for {dev}, but CUDA is not available here; {_DEVICE_HELP}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"{origin} asks for {dev}, but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type == "mps":
        if not _mps_available():
            raise RuntimeError(f"{origin} asks for mps, but MPS is not available here; {_DEVICE_HELP}")
    elif dev.type != "cpu":
        raise ValueError(f"{origin}: unsupported device type {dev.type!r}; {_DEVICE_HELP}")
    return dev


def device(name: str | torch.device | None = None) -> torch.device:
    """Choose the device the book's experiments run on.

    Order of precedence: the ``name`` argument, then the environment variable
    ``BNLIB_DEVICE``, then the best available accelerator (CUDA, then Apple
    MPS), then the CPU.

    Returns:
        torch.device: the chosen device.

    Raises:
        ValueError: ``name`` or ``BNLIB_DEVICE`` is not a device name.
        RuntimeError: the requested device does not exist on this machine.
    """
    if isinstance(name, torch.device):
        return _check_device(name, "device()")
    if name is not None:
        origin, text = "device()", str(name)
    else:
        text = os.environ.get("BNLIB_DEVICE", "").strip()
        origin = "BNLIB_DEVICE"
        if not text:
            if torch.cuda.is_available():
                return torch.device("cuda")
            if _mps_available():
                return torch.device("mps")
            return torch.device("cpu")
    try:
        dev = torch.device(text.lower())
    except (RuntimeError, ValueError):
        raise ValueError(f"{origin}={text!r} is not a device name; {_DEVICE_HELP}") from None
    return _check_device(dev, f"{origin}={text!r}")


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and PyTorch (CPU and all GPUs).

    Call it right before building a model so that its initial weights are
    reproducible; :func:`~bnlib.lab.training.fit` seeds the mini-batch order itself.

    Returns:
        None.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

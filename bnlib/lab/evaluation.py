"""Evaluation: the accuracy of a classifier, with running or with batch statistics.

* :func:`evaluate` -- classification accuracy in eval mode (BN uses its running statistics), or with
  ``train_mode=True`` with the statistics of each test batch;
* :func:`batch_statistics` -- a context manager running a model with batch statistics and leaving no
  trace (modes and buffers restored by :func:`bnlib.layers.preserved_state`);
* :func:`as_parts` / :func:`check_parts` -- a model's inputs as a tuple of tensors (``x`` alone, or
  ``(x, lengths, ...)``), each with one row per label.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn

from ..layers import preserved_state

__all__ = ["evaluate", "batch_statistics"]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (else first buffer; the CPU for a model with neither)."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def as_parts(x: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The model's inputs as a tuple: ``x`` alone, or the tensors of a tuple ``(x, lengths, ...)``."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def check_parts(parts: tuple[torch.Tensor, ...], y: torch.Tensor, what: str) -> int:
    """Returns the number of examples; raises ValueError unless every part and ``y`` have that many."""
    if not parts:
        raise ValueError(f"{what}: the inputs are an empty tuple; expected a tensor or a tuple of tensors")
    n = len(y)
    for k, t in enumerate(parts):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: input part {k} is a {type(t).__name__}; expected a tensor")
        if t.dim() == 0 or len(t) != n:
            shape = tuple(t.shape)
            raise ValueError(f"{what}: input part {k} has shape {shape} but there are {n} labels; "
                             "every input tensor needs one row per label (same first dimension)")
    return n


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: ``model`` in eval mode under no_grad; its modes and buffers as they were on exit."""
    with preserved_state(model), torch.no_grad():
        model.eval()
        yield model


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: run ``model`` with batch statistics (BN in training mode), leaving no trace.

    Inside the ``with`` block the model is in training mode (its Dropout layers stay in eval mode) and
    gradients are off, so every batch-statistics layer normalizes a batch with that batch's own mean
    and variance. On exit, every buffer (``running_mean``, ``running_var``, ``num_batches_tracked``, ...)
    is the same tensor with the same values as before, and every submodule is back in its own
    train/eval mode (:func:`bnlib.layers.preserved_state`)::

        with batch_statistics(model):
            out = model(x)          # BN uses x's statistics; no grad

    This replaces "save the state_dict, train(), forward, load the state_dict back".
    """
    with preserved_state(model), torch.no_grad():
        model.train()
        for m in model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.eval()
        yield model


def _batches(n: int, batch_size: int, merge_single: bool) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive batches of ``batch_size`` over ``n`` examples; with ``merge_single``
    a last batch of one example joins the batch before it."""
    bounds = [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    if merge_single and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def evaluate(model: nn.Module, x: torch.Tensor | Sequence[torch.Tensor], y: torch.Tensor,
             batch_size: int = 10000, *, train_mode: bool = False) -> float:
    """Classification accuracy of ``model`` on ``(x, y)``.

    ``x`` is a tensor, or a tuple of tensors with one row per example (e.g. ``(x, lengths)``); the
    model is then called as ``model(*parts)`` on each batch of the parts.

    With ``train_mode=False`` (default) the model runs in eval mode (BN uses its running statistics).
    With ``train_mode=True`` it runs under :func:`batch_statistics`: each consecutive batch of
    ``batch_size`` test examples is normalized with its own statistics, and the buffers are left as
    they were. A last batch of a single example (``n % batch_size == 1``) has no batch statistics
    (BN in training mode refuses one value per channel), so it is merged into the batch before it,
    which then holds ``batch_size + 1`` examples. Either way, no gradient is computed and the model's
    train/eval modes and buffers are restored. Batches are moved to the model's device if they are not
    there already. Predictions with NaN logits count as class 0 (``argmax`` puts NaN first), so a
    diverged model scores the frequency of class 0, close to chance.

    Returns:
        float: the fraction of correctly classified examples, in [0, 1].
    """
    parts = as_parts(x)
    n = check_parts(parts, y, "evaluate()")
    if n == 0:
        raise ValueError("evaluate() needs at least one example")
    if batch_size < 1:
        raise ValueError(f"evaluate(): batch_size must be a positive integer, got {batch_size}")
    dev = model_device(model)
    mode = batch_statistics(model) if train_mode else _eval_mode(model)
    correct = torch.zeros((), dtype=torch.long, device=dev)
    with mode:
        for i, j in _batches(n, batch_size, merge_single=train_mode):
            xb = [t[i:j].to(dev, non_blocking=True) for t in parts]
            yb = y[i:j].to(dev, non_blocking=True)
            correct += (model(*xb).argmax(dim=1) == yb).sum()
    return correct.item() / n

"""Which training examples each update sees: batch sources for :func:`bnlib.lab.loop.train_loop`.

A *batch source* is a function ``step -> (inputs, labels)``. The default one, :func:`indexed_batches`
over an :class:`EpochOrder`, takes the rows of the training set that a fresh random permutation per
epoch gives; a *sampler* ``(step, generator) -> indices`` such as :func:`class_subset_sampler` replaces
the order (a non-i.i.d. stream of batches, for instance).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["Batch", "EpochOrder", "indexed_batches", "class_subset_sampler"]

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]  # (the model's inputs, the labels)


class EpochOrder:
    """The default order of :func:`~bnlib.lab.training.fit`: ``order(step)`` gives the indices of that
    update's examples.

    Every epoch (``n // batch_size`` updates) walks through a fresh random permutation of the ``n``
    training examples, drawn from ``generator`` on the CPU and moved to ``device`` once; a final
    incomplete batch is dropped, so every batch has ``batch_size`` examples.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, device: torch.device) -> None:
        self.n, self.batch_size, self.generator, self.device = n, batch_size, generator, device
        self.per_epoch = max(1, n // batch_size)
        self.batches: torch.Tensor | None = None  # this epoch's batches, (per_epoch, batch_size)

    def __call__(self, step: int) -> torch.Tensor:
        j = step % self.per_epoch
        if j == 0 or self.batches is None:
            perm = torch.randperm(self.n, generator=self.generator)[: self.per_epoch * self.batch_size]
            self.batches = perm.to(self.device).view(self.per_epoch, self.batch_size)
        return self.batches[j]


def indexed_batches(parts: tuple[torch.Tensor, ...], y: torch.Tensor,
                    order: Callable[[int], torch.Tensor]) -> Callable[[int], Batch]:
    """A batch source: ``step -> (inputs, labels)``, the rows ``order(step)`` of every part and of ``y``."""
    def batch(step: int) -> Batch:
        idx = order(step).to(y.device, non_blocking=True)
        return tuple(t.index_select(0, idx) for t in parts), y.index_select(0, idx)

    return batch


def class_subset_sampler(y: torch.Tensor, batch_size: int, classes_per_batch: int = 2) -> Callable:
    """A non-i.i.d. ``sampler`` for :func:`~bnlib.lab.training.fit`: each batch holds few classes.

    For every batch, ``classes_per_batch`` distinct classes are drawn, then
    ``batch_size`` examples uniformly (with replacement) among the training
    examples of those classes.

    Returns:
        callable ``(step, generator) -> LongTensor`` of ``batch_size`` indices
        into the training set.
    """
    y = torch.as_tensor(y).cpu()
    classes = torch.unique(y)
    if not 1 <= classes_per_batch <= len(classes):
        raise ValueError(f"classes_per_batch must be in 1..{len(classes)}, got {classes_per_batch}")
    by_class = [torch.nonzero(y == c).flatten() for c in classes]

    def sample(step: int, gen: torch.Generator) -> torch.Tensor:
        chosen = torch.randperm(len(by_class), generator=gen)[:classes_per_batch]
        pool = torch.cat([by_class[int(c)] for c in chosen])
        return pool[torch.randint(len(pool), (batch_size,), generator=gen)]

    return sample

r"""A small contrastive pretext task on MNIST (MoCo, He et al. 2020), and the leak through BN's batch statistics.

Two augmented views of each digit go through a query encoder and a key encoder (an exponential moving average
of the query encoder, never trained by gradient). The pretext task: pick each query's own key (the *positive*)
among the keys of earlier batches kept in a queue (the *negatives*), with the InfoNCE loss

.. math::
    \ell = -\log \frac{\exp(q\cdot k_+/\tau)}{\exp(q\cdot k_+/\tau) + \sum_{k_-\in\text{queue}} \exp(q\cdot k_-/\tau)} .

The batch is encoded in ``groups`` sub-batches, as ``groups`` GPUs would each encode their share with their own
BN statistics. Where the key sub-batches come from is what :data:`MODES` varies:

* ``'bn'``: BN, keys grouped like their queries: a query and its positive key are normalized with the
  statistics of the same images (other views), and the negatives, from earlier batches, with other statistics;
* ``'shuffle'``: MoCo's shuffling BN: the keys are permuted before they are split into groups (and put back in
  order after encoding), so a query and its positive key see the statistics of different images;
* ``'gn'``: a per-example normalization (GroupNorm): nothing is shared between examples.

A low pretext loss is only useful if it comes from features that describe the digit. :func:`linear_probe`
measures that: a ridge-regression classifier on the query encoder's frozen features (evaluation mode), fit on
training digits and scored on test digits.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import make_norm
from .training import History, Plan, Step, batch_statistics, device, train_loop

__all__ = ["MODES", "augment", "Encoder", "MoCo", "MocoStep", "train_moco", "features", "linear_probe",
           "probe_accuracy",
           "pretext_accuracy"]

#: The normalizations :func:`train_moco` compares.
MODES = ("bn", "shuffle", "gn")


def augment(x: Tensor, generator: torch.Generator, shift: int = 3, noise: float = 0.1) -> Tensor:
    """A random view of each image of ``x`` ``(N, 1, 28, 28)``: a translation by up to ``shift`` pixels each way
    (zero padding) and Gaussian pixel noise of standard deviation ``noise``. Randomness from ``generator`` (CPU)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))
    dy, dx = (torch.randint(0, 2 * shift + 1, (2, n), generator=generator)).tolist()
    view = torch.stack([padded[i, :, a:a + h, b:b + w] for i, (a, b) in enumerate(zip(dy, dx))])
    return view + noise * torch.randn(view.shape, generator=generator).to(x.device)


class Encoder(nn.Module):
    """Two strided 3x3 convolutions with a norm and ReLU, global average pooling (the *features*, ``width``
    values), and a linear projection to ``dim`` values (the embedding the pretext task compares)."""

    def __init__(self, norm: str = "bn", width: int = 32, dim: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width // 2, 3, stride=2, padding=1, bias=False), make_norm(norm, width // 2, "2d"), nn.ReLU(),
            nn.Conv2d(width // 2, width, 3, stride=2, padding=1, bias=False), make_norm(norm, width, "2d"), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def _grouped(encoder: nn.Module, x: Tensor, groups: int, order: Tensor | None = None) -> Tensor:
    """Encode ``x`` in ``groups`` sub-batches, each with its own batch statistics; with ``order`` (a permutation)
    the sub-batches are cut from ``x[order]`` and the results put back in the order of ``x``."""
    xs = x if order is None else x[order]
    out = torch.cat([encoder(chunk) for chunk in xs.chunk(groups)])
    if order is None:
        return out
    return torch.empty_like(out).index_copy_(0, order, out)  # out[j] belongs to example order[j]


class MoCo(nn.Module):
    """The pretext task as a classifier: ``moco(view_q, view_k)`` returns the scores ``(N, 1 + K)`` of each query
    against its positive key (column 0) and the ``K`` queued negatives, divided by τ, so that InfoNCE is the
    cross-entropy with label 0 and a training step is the book's one update, :class:`bnlib.lab.training.Step`.

    The queries come from ``encoder`` (trained), the keys from ``key_encoder``, a copy of it that follows by a
    moving average (:meth:`update`, after each optimizer step) and is never trained by gradient. Both encode the
    batch in ``groups`` sub-batches; ``mode`` (:data:`MODES`) says how the keys are grouped. ``accuracy`` holds,
    per forward pass, the fraction of queries whose positive scored above every negative (tensors on the device).
    """

    def __init__(self, encoder: Encoder, *, mode: str, groups: int, queue: int, tau: float, momentum: float,
                 generator: torch.Generator) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"expected mode in {MODES}, got {mode!r}")
        self.encoder = encoder
        self.key_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.mode, self.groups, self.tau, self.m, self.gen = mode, groups, tau, momentum, generator
        dev = next(encoder.parameters()).device
        self.register_buffer("queue", F.normalize(torch.randn(queue, encoder.head.out_features, generator=generator),
                                                  dim=1).to(dev))
        self.keys: Tensor | None = None
        self.accuracy: list[Tensor] = []

    def forward(self, view_q: Tensor, view_k: Tensor) -> Tensor:
        q = F.normalize(_grouped(self.encoder, view_q, self.groups), dim=1)
        with torch.no_grad():
            order = (torch.randperm(len(view_k), generator=self.gen).to(view_k.device) if self.mode == "shuffle"
                     else None)
            self.key_encoder.train()
            self.keys = F.normalize(_grouped(self.key_encoder, view_k, self.groups, order), dim=1)
        positive = (q * self.keys).sum(1, keepdim=True)  # q·k₊, (N, 1)
        negative = q @ self.queue.T  # q·k₋ for the queue, (N, K)
        scores = torch.cat([positive, negative], 1) / self.tau
        self.accuracy.append((scores.detach().argmax(1) == 0).float().mean())
        return scores

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: ``k ← m·k + (1 − m)·q`` for every parameter, and this batch's keys into the
        queue (newest first, the oldest dropped)."""
        for pk, pq in zip(self.key_encoder.parameters(), self.encoder.parameters()):
            pk.lerp_(pq, 1 - self.m)
        assert self.keys is not None
        self.queue = torch.cat([self.keys, self.queue[:-len(self.keys)]])


class MocoStep(Step):
    """One MoCo update: :class:`bnlib.lab.training.Step` on the :class:`MoCo` scores (InfoNCE, the positive is
    label 0; the optimizer holds the query encoder's parameters), then :meth:`MoCo.update`."""

    def __call__(self, inputs: tuple[Tensor, ...], labels: Tensor) -> Tensor:
        loss = super().__call__(inputs, labels)
        self.model.update()
        return loss


def train_moco(x: Tensor, mode: str, *, steps: int = 300, batch_size: int = 128, groups: int = 4, queue: int = 1024,
               tau: float = 0.2, momentum: float = 0.99, lr: float = 0.05, width: int = 32, seed: int = 0,
               dev: str | torch.device | None = None) -> tuple[Encoder, History, list[float]]:
    """Pretrain an :class:`Encoder` (norm ``'gn'`` for mode ``'gn'``, else ``'bn'``) on images ``x`` with MoCo.

    The model's weights and the batches (which images, their views, the shuffles) come from ``seed``. Training
    goes through :func:`bnlib.lab.training.train_loop` with SGD (momentum 0.9). Returns the encoder (in training
    mode), the History (``train_loss``: InfoNCE per window; ``test_acc``: the pretext accuracy over the same window)
    and the pretext accuracy of every update.
    """
    dev = device(dev)
    torch.manual_seed(seed)
    model = Encoder("gn" if mode == "gn" else "bn", width=width).to(dev)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    moco = MoCo(model, mode=mode, groups=groups, queue=queue, tau=tau, momentum=momentum, generator=gen)

    def batches(i: int):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        images = x[idx]
        views = augment(images, gen).to(dev), augment(images, gen).to(dev)
        return views, torch.zeros(batch_size, dtype=torch.long, device=dev)  # the positive is score 0

    every = max(1, steps // 10)
    hist = History(config={"model": "Encoder", "mode": mode, "steps": steps, "batch_size": batch_size,
                           "groups": groups, "queue": queue, "tau": tau, "lr": lr, "seed": seed, "device": str(dev)})
    plan = Plan(total=steps, eval_every=every, loss_every=every, evaluate_first=False)
    recent = lambda m: torch.stack(moco.accuracy[-every:]).mean().item()  # noqa: E731 (pretext accuracy)
    train_loop(moco, batches, MocoStep(moco, opt), plan, recent, hist)
    model.train()
    return model, hist, [a.item() for a in moco.accuracy]


@torch.no_grad()
def features(encoder: Encoder, x: Tensor, batch_size: int = 1000) -> Tensor:
    """The encoder's pooled features of ``x`` in evaluation mode (BN with running statistics), on the CPU."""
    dev = next(encoder.parameters()).device
    was = encoder.training
    encoder.eval()
    try:
        return torch.cat([encoder.body(x[i:i + batch_size].to(dev)).cpu() for i in range(0, len(x), batch_size)])
    finally:
        encoder.train(was)


def linear_probe(train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], ridge: float = 1e-3,
                 classes: int = 10) -> float:
    r"""Test accuracy of a linear classifier on fixed features: ridge regression onto one-hot labels,
    :math:`W = (X^\top X + \lambda n I)^{-1} X^\top Y` on standardized features with a bias column (closed form,
    deterministic). ``train``/``test`` are ``(features, labels)``."""
    (xtr, ytr), (xte, yte) = train, test
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    def design(f: Tensor) -> Tensor:  # standardized features and a column of ones, float64
        z = ((f - mu) / sd).double()
        return torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1)
    a, n = design(xtr), len(xtr)
    y = F.one_hot(ytr.long(), classes).double()
    w = torch.linalg.solve(a.T @ a + ridge * n * torch.eye(a.shape[1], dtype=a.dtype), a.T @ y)
    return (design(xte) @ w).argmax(1).eq(yte.long()).double().mean().item()


def probe_accuracy(encoder: Encoder, data: Sequence[tuple[Tensor, Tensor]], n_train: int = 10_000,
                   n_test: int = 2_000) -> float:
    """:func:`linear_probe` on the encoder's features of the first ``n_train`` training and ``n_test`` test
    digits of ``data = ((x_train, y_train), (x_test, y_test))``."""
    (xtr, ytr), (xte, yte) = data
    return linear_probe((features(encoder, xtr[:n_train]), ytr[:n_train]),
                        (features(encoder, xte[:n_test]), yte[:n_test]))


def pretext_accuracy(encoder: Encoder, x: Tensor, *, groups: int, shuffle: bool, generator: torch.Generator) -> float:
    """How often a query finds its own key among the keys of the batch, with the batch statistics of training.

    Two views of the images ``x`` are encoded by ``encoder`` in training mode (without a trace:
    :func:`bnlib.lab.training.batch_statistics`), in ``groups`` sub-batches: the queries in order, the keys in the
    same grouping (``shuffle=False``) or cut from a random permutation (``shuffle=True``). Returns the fraction of
    queries whose most similar key is their own. With BN, a key grouped with its query shares its statistics, and
    the other groups' keys do not: comparing the two groupings on the same weights shows how much the encoder's
    accuracy rests on that.
    """
    dev = next(encoder.parameters()).device
    view_q, view_k = augment(x, generator).to(dev), augment(x, generator).to(dev)
    order = torch.randperm(len(x), generator=generator).to(dev) if shuffle else None
    with batch_statistics(encoder):
        q = F.normalize(_grouped(encoder, view_q, groups), dim=1)
        k = F.normalize(_grouped(encoder, view_k, groups, order), dim=1)
    return ((q @ k.T).argmax(1) == torch.arange(len(x), device=dev)).float().mean().item()

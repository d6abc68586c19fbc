r"""A small recurrent network with a pluggable per-time-step normalization, for variable-length data.

An Elman RNN reads an MNIST digit row by row (28 steps of 28 features) and
classifies it from its last hidden state. At every step the pre-activation
:math:`a_t = W_x x_t + W_h h_{t-1}` is normalized before the nonlinearity,
:math:`h_t = \tanh(\mathrm{norm}(a_t))`, with

* ``norm=None`` / ``'none'``: no normalization (a learned bias instead);
* ``'ln'``: :class:`bnlib.variants.LayerNorm` over the hidden units of each example (Ba et al. 2016);
* ``'bn'``: :class:`StepBatchNorm`, batch statistics **per time step** (Cooijmans et al. 2017):
  step ``t`` has its own running mean and variance; γ and β are shared by all steps;
* a callable ``hidden_size -> nn.Module`` for anything else (applied like ``'ln'``).

Variable-length sequences are right-padded with zero rows (:func:`pad_to_lengths`) and passed with
their ``lengths``. The recurrence is masked: after its last real step a sequence's hidden state is
frozen, so the output never depends on the padding. What the padding *can* still change is the batch
statistics of ``'bn'``: with ``StepBatchNorm(masked=False)`` (the naive layer) the padded rows of
step ``t`` enter the mean and variance of step ``t``; with ``masked=True`` only real rows do, but
then the statistics of late steps come from the few sequences that are that long, and steps that no
training sequence reached have no statistics at all (evaluation then reuses those of the last step
that has some, as Cooijmans et al. do beyond the training length).

:func:`train_sequence` and :func:`evaluate_sequence` are the training loop and accuracy for these
models (Adam, cross-entropy, gradient-norm clipping), since :func:`bnlib.lab.training.fit` passes no lengths.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..recurrent import StepBatchNorm
from ..variants import LayerNorm

__all__ = ["NormRNN", "as_sequences", "random_lengths", "pad_to_lengths",
           "train_sequence", "evaluate_sequence"]


def as_sequences(x: Tensor) -> Tensor:
    """``(N, 1, H, W)`` or ``(N, H, W)`` images -> ``(N, T=H, F=W)`` sequences of rows (other 3D input unchanged)."""
    if x.dim() == 4:
        if x.shape[1] != 1:
            raise ValueError(f"expected single-channel images (N, 1, H, W), got {tuple(x.shape)}")
        return x[:, 0]
    if x.dim() != 3:
        raise ValueError(f"expected (N, T, F) sequences or (N, 1, H, W) images, got {tuple(x.shape)}")
    return x


def random_lengths(n: int, low: int, high: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` lengths drawn uniformly from ``low..high`` (inclusive), on the CPU."""
    if not 1 <= low <= high:
        raise ValueError(f"expected 1 <= low <= high, got {low}, {high}")
    return torch.randint(low, high + 1, (n,), generator=generator)


def pad_to_lengths(x: Tensor, lengths: Tensor) -> Tensor:
    """Keep the first ``lengths[i]`` steps of sequence ``i`` of ``(N, T, F)`` and set the rest to zero."""
    x = as_sequences(x)
    keep = torch.arange(x.shape[1], device=x.device)[None, :] < lengths.to(x.device)[:, None]  # (N, T)
    return x * keep[..., None].to(x.dtype)


class NormRNN(nn.Module):
    """Elman RNN classifier with a normalization of the pre-activation at every step (module docstring).

    Args:
        input_size, hidden_size, num_classes: sizes (defaults 28, 64, 10).
        norm: None/'none', 'ln', 'bn' (:class:`StepBatchNorm`) or a callable ``hidden_size -> Module``.
        max_steps: steps with their own statistics for 'bn' (default 28).
        masked_stats: for 'bn', compute training statistics over real rows only.

    ``forward(x, lengths=None)``: ``x`` is ``(N, T, F)`` (or ``(N, 1, H, W)`` images); ``lengths``
    (default: all ``T``) gives each sequence's number of real steps. Returns logits ``(N, num_classes)``
    from the hidden state after each sequence's last real step.
    """

    def __init__(self, input_size: int = 28, hidden_size: int = 64, num_classes: int = 10,
                 norm: None | str | Callable[[int], nn.Module] = None, max_steps: int = 28,
                 masked_stats: bool = False) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.inp = nn.Linear(input_size, hidden_size, bias=False)
        self.rec = nn.Linear(hidden_size, hidden_size, bias=False)
        nn.init.orthogonal_(self.rec.weight)
        self.step_aware = False
        if norm is None or norm == "none":
            self.norm = nn.Identity()
            self.bias = nn.Parameter(torch.zeros(hidden_size))
        else:
            self.register_parameter("bias", None)
            if norm == "ln":
                self.norm = LayerNorm(hidden_size)
            elif norm == "bn":
                self.norm = StepBatchNorm(hidden_size, max_steps, masked=masked_stats)
                self.step_aware = True
            elif callable(norm) and not isinstance(norm, str):
                self.norm = norm(hidden_size)
            else:
                raise ValueError(f"norm must be None, 'none', 'ln', 'bn' or a callable, got {norm!r}")
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        x = as_sequences(x)
        n, steps, _ = x.shape
        u = self.inp(x)  # W_x x_t for all steps at once: (N, T, H)
        if lengths is None:
            lengths = torch.full((n,), steps, dtype=torch.long)
        lengths = lengths.to(x.device)
        h = x.new_zeros(n, self.hidden_size)
        for t in range(steps):
            mask = t < lengths  # (N,) which sequences are still running at step t
            a = u[:, t] + self.rec(h)
            if self.bias is not None:
                a = a + self.bias
            a = self.norm(a, t, mask) if self.step_aware else self.norm(a)
            h = torch.where(mask[:, None], torch.tanh(a), h)  # padded steps leave h unchanged
        return self.head(h)


def _batches(n: int, batch_size: int, gen: torch.Generator):
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i:i + batch_size]


def train_sequence(model: nn.Module, x: Tensor, y: Tensor, *, steps: int, batch_size: int = 64,
                   lr: float = 2e-3, lengths: tuple[int, int] | None = None, clip: float = 1.0,
                   seed: int = 0, device=None) -> list:
    """Train ``model`` (e.g. :class:`NormRNN`) on ``(x, y)`` with Adam and cross-entropy.

    Each batch is ``batch_size`` random training examples; with ``lengths=(low, high)`` each example
    is truncated to a random length in ``low..high`` (drawn afresh every time) and zero-padded
    (:func:`pad_to_lengths`). Gradients are clipped to norm ``clip``. The model is moved to
    ``device`` (default :func:`bnlib.lab.training.device`) and left in train mode.

    Returns:
        list of the training losses, one per step.
    """
    from .training import device as pick_device
    dev = pick_device(device)
    model.to(dev).train()
    x, y = as_sequences(x).to(dev), y.to(dev)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses, batches = [], _batches(len(x), batch_size, gen)
    for _ in range(steps):
        idx = next(batches).to(dev)
        xb, yb = x[idx], y[idx]
        lb = None
        if lengths is not None:
            lb = random_lengths(batch_size, *lengths, generator=gen)
            xb = pad_to_lengths(xb, lb)
        loss = F.cross_entropy(model(xb, lb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses).cpu().tolist()


@torch.no_grad()
def evaluate_sequence(model: nn.Module, x: Tensor, y: Tensor, lengths: Tensor | None = None,
                      train_mode: bool = False, batch_size: int = 1000) -> float:
    """Accuracy of ``model`` on ``(x, y)``, sequences cut to ``lengths`` (default: full length).

    Runs in eval mode (running statistics), or with ``train_mode=True`` in train mode with batches of
    ``batch_size`` (batch statistics; the running statistics are saved and restored). The model's
    train/eval flag is restored afterwards.
    """
    dev = next(model.parameters()).device
    x = as_sequences(x)
    was_training = model.training
    saved = {k: v.clone() for k, v in model.state_dict().items()} if train_mode else None
    model.train(train_mode)
    correct = 0
    try:
        for i in range(0, len(x), batch_size):
            xb, lb = x[i:i + batch_size].to(dev), None
            if lengths is not None:
                lb = lengths[i:i + batch_size]
                xb = pad_to_lengths(xb, lb)
            correct += (model(xb, lb).argmax(1) == y[i:i + batch_size].to(dev)).sum().item()
    finally:
        if saved is not None:
            model.load_state_dict(saved)
        model.train(was_training)
    return correct / len(x)

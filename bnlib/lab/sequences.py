r"""Row-by-row MNIST, padding, and a small recurrent classifier with a pluggable normalization.

An Elman RNN reads an MNIST digit row by row (28 steps of 28 features) and classifies it from its
last hidden state. The pre-activation of step ``t`` is built from the input term
:math:`W_x x_t` and the recurrent term :math:`W_h h_{t-1}`, and ``norm`` says what is normalized:

* ``'none'``: :math:`h_t = \tanh(W_x x_t + W_h h_{t-1} + b)`;
* ``'ln'`` (Ba, Kiros & Hinton 2016): :math:`h_t = \tanh(\mathrm{LN}(W_x x_t + W_h h_{t-1}))`, layer
  normalization of each example's pre-activation over its hidden units, with LN's own gain and bias;
* ``'bn'`` (Cooijmans et al. 2017): :math:`h_t = \tanh(\mathrm{BN}_t(W_h h_{t-1}) + \mathrm{BN}_t(W_x x_t) + b)`,
  two :class:`bnlib.recurrent.StepBatchNorm` layers with statistics per time step, γ initialised to 0.1
  and no β of their own;
* ``'bn-input'`` (Laurent et al. 2016): only the input term is batch-normalized,
  :math:`h_t = \tanh(\mathrm{BN}_t(W_x x_t) + W_h h_{t-1} + b)`;
* a callable ``hidden_size -> nn.Module``: applied to the summed pre-activation, like ``'ln'``.

Variable-length sequences are right-padded with zero rows (:func:`pad_to_lengths`) and passed with
their ``lengths``: ``model(x, lengths)``. The recurrence is masked (after its last real step a
sequence's hidden state is frozen), so the output never depends on the padding's *values*. What the
padding can still change are the batch statistics of ``'bn'``: with ``masked_stats=False`` (a plain
BN layer) the padded rows of step ``t`` enter the mean and variance of step ``t``; with
``masked_stats=True`` only real rows do.

Training goes through the book's one loop, :func:`bnlib.lab.training.fit`: ``x`` may be the tensor
of images, or the tuple ``(x, lengths)``; :func:`padded_batches` is a ``batches=`` source that cuts
every training sequence to a fresh random length.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ..recurrent import StepBatchNorm
from ..variants import LayerNorm
from .training import EpochOrder

__all__ = ["NormRNN", "NORMS", "as_sequences", "random_lengths", "pad_to_lengths", "padded_batches"]

#: The names ``NormRNN(norm=...)`` accepts.
NORMS = ("none", "ln", "bn", "bn-input")


def as_sequences(x: Tensor) -> Tensor:
    """``(N, 1, H, W)`` images -> ``(N, T=H, F=W)`` sequences of rows (``(N, T, F)`` input unchanged)."""
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


def padded_batches(x: Tensor, y: Tensor, batch_size: int, low: int, high: int) -> Callable:
    """A ``batches=`` source for :func:`bnlib.lab.training.fit`: random examples cut to random lengths.

    Every update draws ``batch_size`` training examples (a fresh permutation every epoch) and a length
    in ``low..high`` for each, and returns ``((padded sequences, lengths), labels)``.
    """
    x, y = as_sequences(x), torch.as_tensor(y)
    orders: dict[torch.Generator, EpochOrder] = {}  # fit's epoch order, on the generator fit passes

    def batch(step: int, gen: torch.Generator):
        order = orders.setdefault(gen, EpochOrder(len(x), batch_size, gen, x.device))
        idx = order(step)
        lengths = random_lengths(batch_size, low, high, gen)
        return (pad_to_lengths(x[idx], lengths), lengths), y[idx.to(y.device)]

    return batch


class NormRNN(nn.Module):
    """Elman RNN classifier with a normalization at every step (see the module docstring).

    Args:
        input_size, hidden_size, num_classes: sizes (defaults 28, 64, 10).
        norm: one of :data:`NORMS` (None means ``'none'``) or a callable ``hidden_size -> Module``.
        max_steps: steps with their own statistics for ``'bn'``/``'bn-input'`` (default 28).
        masked_stats: for ``'bn'``/``'bn-input'``, compute training statistics over real rows only.
        gamma_init: initial γ of the batch-normalized terms (default 0.1, Cooijmans et al.'s).

    ``forward(x, lengths=None)``: ``x`` is ``(N, T, F)`` (or ``(N, 1, H, W)`` images); ``lengths``
    (default: all ``T``) gives each sequence's number of real steps. Returns logits ``(N, num_classes)``
    from the hidden state after each sequence's last real step.
    """

    def __init__(self, input_size: int = 28, hidden_size: int = 64, num_classes: int = 10,
                 norm: None | str | Callable[[int], nn.Module] = None, max_steps: int = 28,
                 masked_stats: bool = False, gamma_init: float = 0.1) -> None:
        super().__init__()
        if norm is None:
            norm = "none"
        if (isinstance(norm, str) and norm not in NORMS) or not (isinstance(norm, str) or callable(norm)):
            raise ValueError(f"norm must be one of {NORMS}, None or a callable, got {norm!r}")
        self.hidden_size = hidden_size
        self.inp = nn.Linear(input_size, hidden_size, bias=False)  # W_x
        self.rec = nn.Linear(hidden_size, hidden_size, bias=False)  # W_h
        nn.init.orthogonal_(self.rec.weight)
        self.norm_x = self.norm_h = self.norm = None
        if norm in ("bn", "bn-input"):
            self.norm_x = StepBatchNorm(hidden_size, max_steps, masked=masked_stats, gamma_init=gamma_init,
                                        bias=False)
            if norm == "bn":
                self.norm_h = StepBatchNorm(hidden_size, max_steps, masked=masked_stats,
                                            gamma_init=gamma_init, bias=False)
        elif norm == "ln":
            self.norm = LayerNorm(hidden_size)
        elif not isinstance(norm, str):
            self.norm = norm(hidden_size)
        # b: after the sum, unless a normalization of the sum brings its own β
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if self.norm is None else None
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        x = as_sequences(x)
        n, steps, _ = x.shape
        mask = None
        if lengths is not None:
            lengths = lengths.to(x.device)
            mask = torch.arange(steps, device=x.device)[None, :] < lengths[:, None]  # (N, T) real steps
        u = self.inp(x)  # W_x x_t for all steps at once: (N, T, H)
        if self.norm_x is not None:
            u = self.norm_x(u, mask=mask)  # per-step statistics, all steps in one pass
        h = x.new_zeros(n, self.hidden_size)
        for t in range(steps):
            r = self.rec(h)  # W_h h_{t-1}
            if self.norm_h is not None:
                r = self.norm_h(r, t, None if mask is None else mask[:, t])
            a = u[:, t] + r
            if self.bias is not None:
                a = a + self.bias
            if self.norm is not None:
                a = self.norm(a)
            h_new = torch.tanh(a)
            h = h_new if mask is None else torch.where(mask[:, t, None], h_new, h)  # padding freezes h
        return self.head(h)

r"""Row-by-row MNIST, padding, and a small recurrent classifier with a pluggable normalization.

A recurrent network reads an MNIST digit row by row (28 steps of 28 features) and classifies it from
its last hidden state. The pre-activation of step ``t`` is built from the input term :math:`W_x x_t`
and the recurrent term :math:`W_h h_{t-1}`, and ``norm`` says what is normalized. With the tanh
(Elman) cell, ``cell='tanh'`` (the default):

* ``'none'``: :math:`h_t = \tanh(W_x x_t + W_h h_{t-1} + b)`;
* ``'ln'`` (Ba, Kiros & Hinton 2016): :math:`h_t = \tanh(\mathrm{LN}(W_x x_t + W_h h_{t-1}))`, layer
  normalization of each example's pre-activation over its hidden units, with LN's own gain and bias;
* ``'bn'`` (Cooijmans et al. 2017): :math:`h_t = \tanh(\mathrm{BN}_t(W_h h_{t-1}) + \mathrm{BN}_t(W_x x_t) + b)`,
  two :class:`bnlib.recurrent.StepBatchNorm` layers with statistics per time step, γ initialised to 0.1
  and no β of their own;
* ``'bn-input'`` (Laurent et al. 2016): only the input term is batch-normalized,
  :math:`h_t = \tanh(\mathrm{BN}_t(W_x x_t) + W_h h_{t-1} + b)`;
* a callable ``hidden_size -> nn.Module``: applied to the summed pre-activation, like ``'ln'``.

With the LSTM cell, ``cell='lstm'``, the pre-activations of the four gates (input, forget, output,
candidate: :math:`4H` values, in the order ``i, f, o, g``) replace the tanh's, the cell state follows
:math:`c_t = \sigma(f) \odot c_{t-1} + \sigma(i) \odot \tanh(g)` and :math:`h_t = \sigma(o) \odot \tanh(c_t)`:

* ``'none'``: the gates are :math:`W_x x_t + W_h h_{t-1} + b` (``torch.nn.LSTM``'s cell);
* ``'ln'``: Ba et al.'s LN-LSTM, :math:`\mathrm{LN}(W_x x_t) + \mathrm{LN}(W_h h_{t-1}) + b` (each term
  normalized over its :math:`4H` values, with a gain and no bias) and
  :math:`h_t = \sigma(o) \odot \tanh(\mathrm{LN}(c_t))`;
* ``'bn'``: Cooijmans et al.'s BN-LSTM, :math:`\mathrm{BN}_t(W_x x_t) + \mathrm{BN}_t(W_h h_{t-1}) + b` and
  :math:`h_t = \sigma(o) \odot \tanh(\mathrm{BN}_t(c_t))`, three :class:`~bnlib.recurrent.StepBatchNorm`
  layers (``norm_x``, ``norm_h``, ``norm_c``) with per-step statistics and γ initialised to 0.1; only
  the cell state's has a β;
* ``'bn-input'``: only :math:`W_x x_t` is batch-normalized;
* a callable ``4H -> nn.Module``: applied to the summed gate pre-activations.

The LSTM's biases are initialised as ``torch.nn.LSTM``'s, uniform on :math:`\pm 1/\sqrt{H}`, with
``forget_bias`` (default 1) added to the forget gate's. LN is ``torch.nn.LayerNorm``
(:class:`bnlib.variants.LayerNorm` computes the same, more slowly, in plain tensor operations).

Variable-length sequences are right-padded with zero rows (:func:`pad_to_lengths`) and passed with
their ``lengths``: ``model(x, lengths)``. The recurrence is masked (after its last real step a
sequence's hidden state, and an LSTM's cell state, is frozen), so the output never depends on the
padding's *values*. What the padding can still change are the batch statistics of ``'bn'``: with
``masked_stats=False`` (a plain BN layer) the padded rows of step ``t`` enter the mean and variance
of step ``t``; with ``masked_stats=True`` only real rows do.

Training goes through the book's one loop, :func:`bnlib.lab.training.fit`: ``x`` may be the tensor
of images, or the tuple ``(x, lengths)``; :func:`padded_batches` is a ``batches=`` source that cuts
every training sequence to a fresh random length.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..recurrent import StepBatchNorm
from .training import EpochOrder

__all__ = ["NormRNN", "NORMS", "CELLS", "as_sequences", "random_lengths", "pad_to_lengths", "padded_batches"]

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


#: The cells ``NormRNN(cell=...)`` accepts.
CELLS = ("tanh", "lstm")


class NormRNN(nn.Module):
    """Recurrent classifier (tanh Elman RNN or LSTM) with a normalization at every step (see the module docstring).

    Args:
        input_size, hidden_size, num_classes: sizes (defaults 28, 64, 10).
        norm: one of :data:`NORMS` (None means ``'none'``) or a callable ``hidden_size -> Module``.
        max_steps: steps with their own statistics for ``'bn'``/``'bn-input'`` (default 28).
        masked_stats: for ``'bn'``/``'bn-input'``, compute training statistics over real rows only.
        gamma_init: initial γ of the batch-normalized terms (default 0.1, Cooijmans et al.'s).
        cell: ``'tanh'`` (default, the Elman RNN) or ``'lstm'`` (see :data:`CELLS` and the module docstring).
        forget_bias: initial bias of the LSTM's forget gate (default 1.0; ignored by the tanh cell).

    ``forward(x, lengths=None)``: ``x`` is ``(N, T, F)`` (or ``(N, 1, H, W)`` images); ``lengths``
    (default: all ``T``) gives each sequence's number of real steps. Returns logits ``(N, num_classes)``
    from the hidden state after each sequence's last real step.
    """

    def __init__(self, input_size: int = 28, hidden_size: int = 64, num_classes: int = 10,
                 norm: None | str | Callable[[int], nn.Module] = None, max_steps: int = 28,
                 masked_stats: bool = False, gamma_init: float = 0.1, cell: str = "tanh",
                 forget_bias: float = 1.0) -> None:
        super().__init__()
        if norm is None:
            norm = "none"
        if (isinstance(norm, str) and norm not in NORMS) or not (isinstance(norm, str) or callable(norm)):
            raise ValueError(f"norm must be one of {NORMS}, None or a callable, got {norm!r}")
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
        self.hidden_size, self.cell = hidden_size, cell
        gates = 4 * hidden_size if cell == "lstm" else hidden_size  # pre-activations per step
        self.inp = nn.Linear(input_size, gates, bias=False)  # W_x
        self.rec = nn.Linear(hidden_size, gates, bias=False)  # W_h
        for k in range(0, gates, hidden_size):  # one orthogonal block per gate
            nn.init.orthogonal_(self.rec.weight[k:k + hidden_size])
        self.norm_x = self.norm_h = self.norm_c = self.norm = None
        if norm in ("bn", "bn-input"):
            self.norm_x = StepBatchNorm(gates, max_steps, masked=masked_stats, gamma_init=gamma_init, bias=False)
            if norm == "bn":
                self.norm_h = StepBatchNorm(gates, max_steps, masked=masked_stats, gamma_init=gamma_init,
                                            bias=False)
                if cell == "lstm":  # the cell state before the output tanh, with its own β
                    self.norm_c = StepBatchNorm(hidden_size, max_steps, masked=masked_stats,
                                                gamma_init=gamma_init, bias=True)
        elif norm == "ln":
            if cell == "lstm":  # Ba et al.'s LN-LSTM: both terms and the cell state, each with its gain
                self.norm_x = nn.LayerNorm(gates, bias=False)
                self.norm_h = nn.LayerNorm(gates, bias=False)
                self.norm_c = nn.LayerNorm(hidden_size)
            else:
                self.norm = nn.LayerNorm(hidden_size)
        elif not isinstance(norm, str):
            self.norm = norm(gates)
        # b: after the sum, unless a normalization of the sum brings its own β
        self.bias = nn.Parameter(torch.zeros(gates)) if self.norm is None else None
        if cell == "lstm" and self.bias is not None:
            with torch.no_grad():  # as torch.nn.LSTM: U(-1/sqrt(H), 1/sqrt(H)); plus forget_bias on the forget gate
                self.bias.uniform_(-hidden_size ** -0.5, hidden_size ** -0.5)
                self.bias[hidden_size:2 * hidden_size] += forget_bias  # gates in the order i, f, o, g
        self.head = nn.Linear(hidden_size, num_classes)

    def _step_norm(self, layer: nn.Module | None, v: Tensor, t: int, mask: Tensor | None) -> Tensor:
        if layer is None:
            return v
        if isinstance(layer, StepBatchNorm):
            return layer(v, t, None if mask is None else mask[:, t])
        return layer(v)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        x = as_sequences(x)
        n, steps, _ = x.shape
        mask = None
        if lengths is not None:
            lengths = lengths.to(x.device)
            mask = torch.arange(steps, device=x.device)[None, :] < lengths[:, None]  # (N, T) real steps
        u = self.inp(x)  # W_x x_t for all steps at once: (N, T, gates)
        if isinstance(self.norm_x, StepBatchNorm):
            u = self.norm_x(u, mask=mask)  # per-step statistics, all steps in one pass
        elif self.norm_x is not None:
            u = self.norm_x(u)  # LN: each example and step by itself
        if self.bias is not None:
            u = u + self.bias
        h = x.new_zeros(n, self.hidden_size)
        c = h if self.cell == "lstm" else None
        H = self.hidden_size
        # unbind/split rather than indexing: the backward of u[:, t] would zero-fill a tensor of u's size per step
        for t, u_t in enumerate(u.unbind(1)):
            a = u_t + self._step_norm(self.norm_h, self.rec(h), t, mask)  # + W_h h_{t-1}
            if self.norm is not None:
                a = self.norm(a)
            if self.cell == "lstm":
                a_sig, a_g = a.split([3 * H, H], 1)
                i_gate, f_gate, o_gate = torch.sigmoid(a_sig).chunk(3, 1)  # input, forget and output gates
                c_new = f_gate * c + i_gate * torch.tanh(a_g)
                h_new = o_gate * torch.tanh(self._step_norm(self.norm_c, c_new, t, mask))
                c = c_new if mask is None else torch.where(mask[:, t, None], c_new, c)
            else:
                h_new = torch.tanh(a)
            h = h_new if mask is None else torch.where(mask[:, t, None], h_new, h)  # padding freezes h (and c)
        return self.head(h)

r"""Batch Normalization inside a recurrent network: statistics per time step (Cooijmans et al. 2017).

A recurrent network applies the same weights at every step, but the distribution of what it
normalizes changes from step to step (the hidden state starts at zero and grows). Cooijmans et al.'s
*recurrent BN* therefore keeps **separate batch statistics for every time step** ``t`` and shares
only γ and β across steps. For a tanh RNN their recipe reads

.. math::

    h_t = \tanh\big(\mathrm{BN}_t(W_h h_{t-1};\ \gamma_h) + \mathrm{BN}_t(W_x x_t;\ \gamma_x) + b\big),

two normalizations, one of the recurrent term and one of the input term, each with its own
per-step statistics, no β of their own (the bias ``b`` plays that role), and γ initialised to 0.1
(γ = 1 drives tanh units into saturation and the gradients through time vanish). At test time step
``t`` uses its own population statistics; a step beyond the longest training length ``T_max``
reuses those of ``T_max``. In their LSTM (the BN-LSTM) the same two normalizations are applied to
the pre-activations of the four gates, and a third one, with a β, normalizes the cell state before
the output's tanh: :math:`h_t = \sigma(o_t) \odot \tanh(\mathrm{BN}_t(c_t;\ \gamma_c, \beta_c))`.

:class:`StepBatchNorm` is that layer. It normalizes ``(N, C)`` inputs of one step ``t`` (called
inside the recurrence) or ``(N, T, C)`` inputs of all steps at once (the input term
:math:`W_x x_t` is known for every step before the recurrence starts). The network that uses it is
:class:`bnlib.lab.sequences.NormRNN` (``cell='tanh'`` or ``cell='lstm'``).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from .core import update_running_stats
from .functional import batch_norm_core
from .layers import preserved_state
from .running_stats import ChannelMoments

__all__ = ["StepBatchNorm", "recompute_step_stats"]


class StepBatchNorm(nn.Module):
    r"""Batch normalization with separate statistics for each time step (Cooijmans et al. 2017).

    ``forward(x, t, mask)`` with ``x`` of shape ``(N, C)`` normalizes the values of step ``t``;
    ``forward(x, mask=mask)`` with ``x`` of shape ``(N, T, C)`` normalizes steps ``0 .. T-1`` at once,
    each with its own statistics (the same result as ``T`` calls, one per step).

    Training: step ``t`` is normalized with the mean and biased variance over the batch (over the
    rows where ``mask`` is True if ``masked``, else over all rows, padding included), and
    ``running_mean[t]``/``running_var[t]`` move towards them with ``momentum`` (the variance
    Bessel-corrected, as in :class:`bnlib.BatchNorm1d`); ``steps_tracked[t]`` counts the updates.
    A step with fewer than 2 usable rows, or ``t >= max_steps``, is normalized with the evaluation
    rule below and updates nothing.

    Evaluation: step ``t`` uses ``running_mean[t]``, ``running_var[t]``. A step that was never
    updated -- in particular every ``t >= max_steps``, beyond the longest training sequence --
    uses the statistics of the last step before it that was (Cooijmans et al.'s rule: beyond
    ``T_max``, the statistics of ``T_max``).

    Args:
        num_features: C.
        max_steps: number of steps with their own statistics (the longest training length).
        masked: compute training statistics over real (unpadded) rows only. Default False: every
            row counts, as a plain BN layer would do on a padded batch.
        eps, momentum: as in BatchNorm (defaults 1e-5, 0.1).
        gamma_init: initial γ. Default 0.1 (Cooijmans et al.'s recommendation for tanh units).
        bias: learn a β. Default True; Cooijmans et al. use none (``bias=False``) because the RNN's
            own bias follows the sum of the two normalized terms.
    """

    running_mean: Tensor
    running_var: Tensor
    steps_tracked: Tensor

    def __init__(self, num_features: int, max_steps: int, masked: bool = False, eps: float = 1e-5,
                 momentum: float = 0.1, gamma_init: float = 0.1, bias: bool = True) -> None:
        super().__init__()
        if max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {max_steps}")
        self.num_features, self.max_steps, self.masked = num_features, max_steps, masked
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.full((num_features,), float(gamma_init)))
        self.bias = nn.Parameter(torch.zeros(num_features)) if bias else None
        self.register_buffer("running_mean", torch.zeros(max_steps, num_features))
        self.register_buffer("running_var", torch.ones(max_steps, num_features))
        self.register_buffer("steps_tracked", torch.zeros(max_steps, dtype=torch.long))

    # -- which statistics a step uses when it does not use the batch's ---------------------------
    def stat_step(self, t: int) -> int:
        """The step whose running statistics step ``t`` uses in evaluation (see the class docstring)."""
        s = min(t, self.max_steps - 1)
        tracked = self.steps_tracked[: s + 1].nonzero()
        return int(tracked[-1]) if len(tracked) else s

    def _running(self, steps: int) -> tuple[Tensor, Tensor]:
        """Running mean and variance used in evaluation for steps ``0 .. steps-1``: ``(T, C)`` each."""
        dev = self.running_mean.device
        last = self.max_steps - 1
        s = torch.arange(steps, device=dev).clamp_max(last)  # min(t, max_steps - 1)
        ids = torch.arange(self.max_steps, device=dev)
        latest = torch.where(self.steps_tracked > 0, ids, -1).cummax(0).values  # last tracked step <= t
        idx = torch.where(latest[s] >= 0, latest[s], s)
        return self.running_mean[idx], self.running_var[idx]

    def _normalize(self, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        y = (x - mean) * torch.rsqrt(var + self.eps) * self.weight
        return y if self.bias is None else y + self.bias

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: Tensor, t: int | None = None, mask: Tensor | None = None) -> Tensor:
        if x.dim() == 3 and t is None:
            return self._forward_all(x, mask)
        if x.dim() != 2 or x.shape[1] != self.num_features or t is None:
            raise ValueError(f"StepBatchNorm expected (N, {self.num_features}) input with a step t, or "
                             f"(N, T, {self.num_features}) input without one; got {tuple(x.shape)}, t={t}")
        masking = self.masked and mask is not None
        rows = x[mask] if masking else x
        n = rows.shape[0]
        if self.training and t < self.max_steps and n == x.shape[0] and n >= 2:
            # no padded row (or no masking): BN of (N, C) with the buffers of step t, bnlib's closed form
            # (the masked and the plain case give the same numbers when no row is padded)
            with torch.no_grad():
                self.steps_tracked[t] += 1
            return batch_norm_core(x, self.running_mean[t], self.running_var[t], self.weight, self.bias, True,
                                   self.momentum, self.eps)
        if self.training and t < self.max_steps and n >= 2:
            var, mean = torch.var_mean(rows, 0, correction=0)  # μ_t, σ²_t over the real rows
            with torch.no_grad():
                update_running_stats(self.running_mean[t], self.running_var[t], mean, var, n, self.momentum)
                self.steps_tracked[t] += 1
        else:
            s = self.stat_step(t)
            mean, var = self.running_mean[s], self.running_var[s]
        return self._normalize(x, mean, var)

    def _forward_all(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """``(N, T, C)``: every step with its own statistics, in one pass over the tensor."""
        n, steps, c = x.shape
        if c != self.num_features:
            raise ValueError(f"StepBatchNorm expected (N, T, {self.num_features}) input, got {tuple(x.shape)}")
        if (self.training and n >= 2 and steps <= self.max_steps
                and (not self.masked or mask is None or bool(mask.all()))):
            # every step has N usable rows: BN of (N, T·C), channel (t, c) with the buffers of step t
            # and the γ, β of feature c, in one call of bnlib's closed form
            with torch.no_grad():
                self.steps_tracked[:steps] += 1
            y = batch_norm_core(x.reshape(n, steps * c), self.running_mean[:steps].view(-1),
                                self.running_var[:steps].view(-1), self.weight.repeat(steps),
                                None if self.bias is None else self.bias.repeat(steps), True, self.momentum, self.eps)
            return y.view(n, steps, c)
        run_mean, run_var = self._running(steps)  # (T, C): the evaluation rule, for every step
        if not self.training:
            return self._normalize(x, run_mean, run_var)
        if self.masked and mask is not None:
            w = mask.to(x.dtype)[..., None]  # (N, T, 1): 1 for real rows
        else:
            w = x.new_ones(n, steps, 1)
        count = w.sum(0)  # (T, 1) usable rows per step
        mean = (x * w).sum(0) / count.clamp_min(1)  # μ_t
        var = (((x - mean) ** 2) * w).sum(0) / count.clamp_min(1)  # σ²_t (biased)
        use = (count[:, 0] >= 2) & (torch.arange(steps, device=x.device) < self.max_steps)  # (T,)
        with torch.no_grad():  # steps that have usable rows move their running statistics (the others: weight 0)
            k = min(steps, self.max_steps)
            weight = use[:k, None].to(x.dtype) * self.momentum  # (k, 1): 0 for a step without 2 usable rows
            counts = count[:k].clamp_min(2)  # (k, 1) values per step (the clamp only for steps of weight 0)
            update_running_stats(self.running_mean[:k], self.running_var[:k], mean[:k], var[:k],
                                 cast(int, counts), cast(float, weight))  # per-step tensors (see its docstring)
            self.steps_tracked[:k] += use[:k].long()
        mean = torch.where(use[:, None], mean, run_mean)
        var = torch.where(use[:, None], var, run_var)
        return self._normalize(x, mean, var)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, max_steps={self.max_steps}, masked={self.masked}, "
                f"momentum={self.momentum}, bias={self.bias is not None}")


@torch.no_grad()
def recompute_step_stats(model: nn.Module, x: Tensor, lengths: Tensor | None = None, batch_size: int = 1024) -> int:
    """Precise statistics per time step: replace the moving averages of every :class:`StepBatchNorm`.

    The moving averages of a recurrent BN are estimated on hidden states that earlier steps produced
    with *batch* statistics, while evaluation runs every step with population statistics; over many
    steps the two drift apart. As Precise BN does for feed-forward networks (Wu & Johnson 2021,
    :func:`bnlib.running_stats.recompute_bn_stats`), this runs the frozen model in training mode over consecutive
    batches of ``batch_size`` rows of ``x`` (with ``lengths`` if given; a last, shorter batch is left out) and
    pools, for every layer and step, the values that step normalizes (its real rows when the layer is
    ``masked``) with :class:`bnlib.running_stats.ChannelMoments`: ``running_mean[t]`` and ``running_var[t]``
    become their exact mean and unbiased variance, ``steps_tracked[t]`` the number of batches that reached
    step ``t``; a step no batch reached gets mean 0, variance 1 and count 0. Parameters, momenta, every other
    buffer and the train/eval flags are left as they were.

    Returns:
        int: the number of batches used.
    """
    layers = [m for m in model.modules() if isinstance(m, StepBatchNorm)]
    if len(x) < batch_size:
        raise ValueError(f"recompute_step_stats needs at least batch_size={batch_size} rows, got {len(x)}")
    moments = {m: [ChannelMoments() for _ in range(m.max_steps)] for m in layers}
    hooks = [m.register_forward_pre_hook(_step_recorder(moments[m]), with_kwargs=True) for m in layers]
    dev = next(iter(model.parameters())).device
    k = 0
    try:
        with preserved_state(model):  # modes and buffers (running statistics, steps_tracked) as they were
            model.train()
            for i in range(0, len(x) - batch_size + 1, batch_size):
                parts: tuple[Tensor, ...] = (x[i:i + batch_size].to(dev),)
                if lengths is not None:
                    parts += (lengths[i:i + batch_size].to(dev),)
                model(*parts)
                k += 1
    finally:
        for h in hooks:
            h.remove()
    for m in layers:
        for t, s in enumerate(moments[m]):
            seen = s.mean is not None and s.n >= 2
            m.running_mean[t] = s.mean.to(m.running_mean.dtype) if s.mean is not None and seen else 0.0
            m.running_var[t] = s.var(unbiased=True).to(m.running_var.dtype) if seen else 1.0
            m.steps_tracked[t] = s.batches if seen else 0
    return k


def _step_recorder(moments: list[ChannelMoments]):
    """A forward pre-hook that adds what each step of a :class:`StepBatchNorm` normalizes to ``moments[t]``."""
    def add(stats: ChannelMoments, rows: Tensor) -> None:
        if len(rows):
            stats.update(rows)

    def hook(module: StepBatchNorm, args: tuple, kwargs: dict) -> None:
        x = args[0]
        t = args[1] if len(args) > 1 else kwargs.get("t")
        mask = args[2] if len(args) > 2 else kwargs.get("mask")
        if not module.masked:
            mask = None
        if t is not None:  # one step, (N, C)
            if t < module.max_steps:
                add(moments[t], x if mask is None else x[mask])
            return
        for s in range(min(x.shape[1], module.max_steps)):  # every step, (N, T, C)
            add(moments[s], x[:, s] if mask is None else x[:, s][mask[:, s]])
    return hook

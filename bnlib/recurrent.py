r"""Batch Normalization of a recurrent network's pre-activations, with statistics per time step.

A recurrent network applies the same weights at every step, but the distribution of its
pre-activations changes from step to step (the hidden state starts at zero and grows). Cooijmans et
al. (2017), "Recurrent Batch Normalization", therefore keep *separate* batch statistics for every time
step ``t`` and share only γ and β across steps. :class:`StepBatchNorm` is that layer for ``(N, C)``
inputs; the network that uses it is :class:`bnlib.lab.sequences.NormRNN`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["StepBatchNorm"]


class StepBatchNorm(nn.Module):
    r"""Batch normalization of ``(N, C)`` inputs with separate statistics for each time step.

    ``forward(x, t, mask)`` normalizes the pre-activations of step ``t``. Training: the mean and
    biased variance over the batch (over the rows where ``mask`` is True if ``masked``, else over all
    rows), and ``running_mean[t]``/``running_var[t]`` move towards them with ``momentum`` (the
    variance Bessel-corrected, as in :class:`bnlib.BatchNorm1d`); ``steps_tracked[t]`` counts the
    updates. If fewer than 2 rows are usable the step is normalized with its running statistics and
    not updated. Evaluation: the running statistics of step ``t``, or, if step ``t`` was never
    updated (or ``t >= max_steps``), those of the last step before it that was.

    Args:
        num_features: C.
        max_steps: number of steps with their own statistics.
        masked: compute training statistics over real (unpadded) rows only.
        eps, momentum: as in BatchNorm (defaults 1e-5, 0.1).
        gamma_init: initial γ (Cooijmans et al. recommend 0.1 for tanh RNNs; default 1.0).
    """

    def __init__(self, num_features: int, max_steps: int, masked: bool = False, eps: float = 1e-5,
                 momentum: float = 0.1, gamma_init: float = 1.0) -> None:
        super().__init__()
        self.num_features, self.max_steps, self.masked = num_features, max_steps, masked
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.full((num_features,), float(gamma_init)))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(max_steps, num_features))
        self.register_buffer("running_var", torch.ones(max_steps, num_features))
        self.register_buffer("steps_tracked", torch.zeros(max_steps, dtype=torch.long))

    def _stat_step(self, t: int) -> int:
        """The step whose running statistics step ``t`` uses in evaluation (see the class docstring)."""
        s = min(t, self.max_steps - 1)
        tracked = self.steps_tracked[: s + 1].nonzero()
        return int(tracked[-1]) if len(tracked) else s

    def forward(self, x: Tensor, t: int, mask: Tensor | None = None) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"StepBatchNorm expected (N, {self.num_features}) input, got {tuple(x.shape)}")
        rows = x[mask] if (self.masked and mask is not None) else x
        if self.training and t < self.max_steps and rows.shape[0] >= 2:
            var, mean = torch.var_mean(rows, 0, correction=0)  # μ_t, σ²_t over the (real) rows
            n = rows.shape[0]
            with torch.no_grad():
                self.running_mean[t].lerp_(mean.detach(), self.momentum)
                self.running_var[t].lerp_(var.detach() * (n / (n - 1)), self.momentum)
                self.steps_tracked[t] += 1
        else:
            s = t if (self.training and t < self.max_steps) else self._stat_step(t)
            mean, var = self.running_mean[s], self.running_var[s]
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias

    def extra_repr(self) -> str:
        return f"{self.num_features}, max_steps={self.max_steps}, masked={self.masked}, momentum={self.momentum}"

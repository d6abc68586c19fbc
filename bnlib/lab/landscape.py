"""Two measurements of Santurkar et al. (2018), "How does batch normalization help optimization?".

They test, at small scale, the two findings of that paper that bear on the "internal covariate shift"
explanation of BatchNorm:

* **Noisy BN** -- :class:`NoisyShift` multiplies and shifts every unit by a random scale and offset
  drawn afresh at every training step, so the distribution a layer receives keeps moving on purpose.
  Placed right after a BN layer (``norm=noisy_norm("bn", ...)`` in :class:`bnlib.lab.models.MLP`) it
  undoes BN's stabilisation of the distribution while keeping the rest of BN.
* **Smoothness of the loss** -- :func:`loss_landscape` walks along the gradient direction from the
  current parameters and reports how much the loss and the gradient change there; the
  :class:`LandscapeRecorder` callback does it at checkpoints of a :func:`bnlib.lab.training.fit` run.

Everything runs on the device of the model (CPU or CUDA) and leaves the model exactly as it found it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from .models import NormSpec, make_norm

__all__ = [
    "NoisyShift",
    "noisy_norm",
    "LandscapeResult",
    "loss_landscape",
    "LandscapeRecorder",
]


# --------------------------------------------------------------------------
# Noisy BN
# --------------------------------------------------------------------------

class NoisyShift(nn.Module):
    r"""Time-varying random scale and shift of every unit: :math:`y = x \cdot s + t`.

    In training mode, every forward pass draws, independently for each unit (feature or channel,
    dimension 1), a scale :math:`s \sim U[s_{lo}, s_{hi}]` and a shift
    :math:`t \sim \mathcal{N}(\mu, \sigma^2)`; all examples of the batch share them, so the whole
    distribution of the unit moves from one step to the next (non-zero mean, non-unit variance).
    In eval mode it applies the average transform, :math:`y = x \cdot \bar s + \mu` with
    :math:`\bar s = (s_{lo} + s_{hi})/2`, so that a network trained with the noise is evaluated
    with the shift and scale it saw on average (as dropout rescales at test time). The random numbers come from PyTorch's global generator on the
    input's device, so :func:`bnlib.lab.training.seed_everything` makes them reproducible.

    Args:
        num_features: ``C``; only used to check the input.
        scale: ``(s_lo, s_hi)``, range of the uniform scale (default (0.5, 1.5)).
        shift_mean, shift_std: mean and standard deviation of the normal shift (default 0.5, 1.0).
    """

    def __init__(self, num_features: int, scale: tuple[float, float] = (0.5, 1.5),
                 shift_mean: float = 0.5, shift_std: float = 1.0) -> None:
        super().__init__()
        if scale[0] > scale[1]:
            raise ValueError(f"scale must be (low, high) with low <= high, got {scale!r}")
        if shift_std < 0:
            raise ValueError(f"shift_std must be >= 0, got {shift_std!r}")
        self.num_features = int(num_features)
        self.scale = (float(scale[0]), float(scale[1]))
        self.shift_mean, self.shift_std = float(shift_mean), float(shift_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns ``x * s + t`` in training mode (fresh ``s``, ``t`` per unit), ``x * s̄ + μ`` in eval mode."""
        if not self.training:
            return x * (0.5 * (self.scale[0] + self.scale[1])) + self.shift_mean
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected input (N, {self.num_features}, ...), got shape {tuple(x.shape)}")
        shape = [1, self.num_features] + [1] * (x.dim() - 2)
        lo, hi = self.scale
        s = lo + (hi - lo) * torch.rand(shape, device=x.device, dtype=x.dtype)
        t = self.shift_mean + self.shift_std * torch.randn(shape, device=x.device, dtype=x.dtype)
        return x * s + t

    def extra_repr(self) -> str:
        return (f"{self.num_features}, scale={self.scale}, shift_mean={self.shift_mean}, "
                f"shift_std={self.shift_std}")


def noisy_norm(base: NormSpec = "bn", **noise) -> Callable[[int], nn.Module]:
    """A ``norm`` callable for :class:`bnlib.lab.models.MLP` / :func:`bnlib.lab.models.make_norm`:
    the normalization ``base`` followed by :class:`NoisyShift` (``**noise`` are its arguments).

    ``noisy_norm("bn")`` is Santurkar et al.'s noisy BN; ``noisy_norm(None)`` puts the same noise in
    a network without normalization.

    Returns:
        callable ``num_features -> nn.Module`` (an ``nn.Sequential(norm, NoisyShift)``, or just the
        ``NoisyShift`` when ``base`` is None).
    """
    def build(num_features: int) -> nn.Module:
        noise_layer = NoisyShift(num_features, **noise)
        if base is None or (isinstance(base, str) and base.lower() == "none"):
            return noise_layer
        return nn.Sequential(make_norm(base, num_features, "1d"), noise_layer)
    return build


# --------------------------------------------------------------------------
# Loss landscape along the gradient
# --------------------------------------------------------------------------

@dataclass
class LandscapeResult:
    """What :func:`loss_landscape` measured at one point.

    Attributes:
        etas: the step sizes η.
        loss0: the loss at the current parameters x.
        grad_norm: ‖∇L(x)‖ over all trainable parameters.
        losses: L(x − η∇L(x)) for each η.
        grad_changes: ‖∇L(x) − ∇L(x − η∇L(x))‖ for each η.
    """

    etas: np.ndarray
    loss0: float
    grad_norm: float
    losses: np.ndarray
    grad_changes: np.ndarray

    @property
    def loss_range(self) -> float:
        """Returns max − min of the loss over the current point and all steps (the loss "variation")."""
        v = np.append(self.losses, self.loss0)
        return float(np.max(v) - np.min(v))

    @property
    def max_grad_change(self) -> float:
        """Returns the largest ‖∇L(x) − ∇L(x − η∇L(x))‖ (the gradient's "predictiveness": smaller is better)."""
        return float(np.max(self.grad_changes))

    @property
    def beta_smoothness(self) -> float:
        """Returns the "effective β-smoothness": max over η of the gradient change per unit of distance
        moved, ‖∇L(x) − ∇L(x − ηg)‖ / ‖ηg‖ (0 if the gradient is zero)."""
        if self.grad_norm == 0:
            return 0.0
        return float(np.max(self.grad_changes / (np.asarray(self.etas) * self.grad_norm)))


def _flat_grad(params: Sequence[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
    """Returns the gradient of ``loss`` with respect to ``params``, flattened into one vector."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])


def loss_landscape(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   batch: tuple[torch.Tensor, torch.Tensor], etas: Sequence[float]) -> LandscapeResult:
    r"""Loss and gradient along the gradient direction, as in Santurkar et al.'s Figure 4.

    With :math:`x` the current (trainable) parameters and :math:`g = \nabla L(x)` on ``batch``,
    computes for each :math:`\eta` in ``etas`` the loss :math:`L(x - \eta g)` and the gradient change
    :math:`\lVert g - \nabla L(x - \eta g)\rVert`, all on the same batch and in the model's current
    mode (train mode: BN uses the batch's statistics, as during training).

    The model is left exactly as it was: parameters, buffers (e.g. BN running statistics, which
    train-mode passes would update), ``.grad`` fields and PyTorch's random number generators
    (so a training run with measurements follows the same trajectory as one without).

    Args:
        model: the network; its outputs go to ``loss_fn``.
        loss_fn: ``loss_fn(model(x), y) -> scalar``, e.g. ``torch.nn.functional.cross_entropy``.
        batch: ``(x, y)``; moved to the model's device.
        etas: step sizes (positive floats).

    Returns:
        LandscapeResult.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    dev = params[0].device
    x, y = batch[0].to(dev), batch[1].to(dev)
    etas = np.asarray([float(e) for e in etas], dtype=float)

    saved_params = [p.detach().clone() for p in params]
    saved_grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    saved_buffers = [b.detach().clone() for b in model.buffers()]
    rng_devices = [dev] if dev.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices):
            loss0 = loss_fn(model(x), y)
            g = _flat_grad(params, loss0).detach()
            losses, changes = [], []
            for eta in etas:
                with torch.no_grad():
                    offset = 0
                    for p, p0 in zip(params, saved_params):
                        n = p.numel()
                        p.copy_(p0 - eta * g[offset:offset + n].view_as(p))
                        offset += n
                loss = loss_fn(model(x), y)
                g_new = _flat_grad(params, loss).detach()
                losses.append(loss.item())
                changes.append(torch.linalg.vector_norm(g - g_new).item())
            loss0_v, gnorm = loss0.item(), torch.linalg.vector_norm(g).item()
    finally:
        with torch.no_grad():
            for p, p0, g0 in zip(params, saved_params, saved_grads):
                p.copy_(p0)
                p.grad = g0
            for b, b0 in zip(model.buffers(), saved_buffers):
                b.copy_(b0)
    return LandscapeResult(etas=etas, loss0=loss0_v, grad_norm=gnorm,
                           losses=np.asarray(losses), grad_changes=np.asarray(changes))


@dataclass
class LandscapeRecorder:
    """A :func:`bnlib.lab.training.fit` callback that runs :func:`loss_landscape` at checkpoints.

    ``fit(model, data, ..., callback=rec, callback_every=k)`` measures at step 0 and every ``k``
    updates, on the fixed ``batch``. Never stops training.

    Attributes:
        loss_fn, batch, etas: as in :func:`loss_landscape`.
        steps: the steps measured at; results: one :class:`LandscapeResult` per step.
    """

    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    batch: tuple[torch.Tensor, torch.Tensor]
    etas: Sequence[float]
    steps: list[int] = field(default_factory=list)
    results: list[LandscapeResult] = field(default_factory=list)

    def __call__(self, step: int, model: nn.Module, history=None) -> bool:
        self.steps.append(int(step))
        self.results.append(loss_landscape(model, self.loss_fn, self.batch, self.etas))
        return False

    def summary(self) -> dict[str, np.ndarray]:
        """Returns ``{'steps', 'loss_range', 'max_grad_change', 'beta_smoothness'}`` as arrays, one value per checkpoint."""
        return {
            "steps": np.asarray(self.steps),
            "loss_range": np.asarray([r.loss_range for r in self.results]),
            "max_grad_change": np.asarray([r.max_grad_change for r in self.results]),
            "beta_smoothness": np.asarray([r.beta_smoothness for r in self.results]),
        }

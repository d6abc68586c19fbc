"""Three measurements of Santurkar et al. (2018), "How does batch normalization help optimization?".

They test, at small scale, the findings of that paper that bear on the "internal covariate shift"
explanation of BatchNorm:

* **Noisy BN** -- :class:`NoisyShift` adds to every activation of every example i.i.d. noise whose mean and
  spread are drawn afresh at every training step (or, as a second intervention, rescales and shifts each unit
  by one random scale and offset shared by the batch), so the distribution a layer receives keeps moving on
  purpose.
  Placed right after a BN layer (``norm=noisy_norm("bn", ...)`` in :class:`bnlib.lab.models.MLP`) it
  undoes BN's stabilisation of the distribution while keeping the rest of BN.
* **Smoothness of the loss** -- :func:`loss_landscape` walks along the gradient direction from the
  current parameters (by multiples of the gradient, or by fixed distances) and reports how much the
  loss and the gradient change there, and the "effective beta-smoothness" (gradient change per unit
  of distance moved, which does not depend on the size of the gradient); the
  :class:`LandscapeRecorder` callback does it at checkpoints of a :func:`bnlib.lab.training.fit` run.
* **Internal covariate shift as a change of gradient** -- :func:`gradient_shift` compares the
  gradient of a layer's parameters before and after the parameters of the layers below it take
  one SGD step on the same batch (‖G - G'‖ and the cosine of their angle); the
  :class:`GradientShiftRecorder` callback does it at checkpoints of a run.

Everything runs on the device of the model (CPU or CUDA) and leaves the model exactly as it found it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from ..layers import preserved_state
from .models import NormSpec, make_norm

__all__ = [
    "NoisyShift",
    "noisy_norm",
    "LandscapeResult",
    "loss_landscape",
    "LandscapeRecorder",
    "GradientShift",
    "gradient_shift",
    "GradientShiftRecorder",
]


# --------------------------------------------------------------------------
# Noisy BN
# --------------------------------------------------------------------------

class NoisyShift(nn.Module):
    r"""Noise after a layer whose distribution changes at every training step.

    In training mode every forward pass draws, for each unit :math:`j` (feature or channel, dimension 1), a
    scale :math:`s_j \sim U[s_{lo}, s_{hi}]` and a shift :math:`t_j \sim \mathcal{N}(\mu, \sigma^2)`: the
    step's noise distribution for that unit. How they act depends on ``per_example``:

    * ``per_example=True`` (the default, Santurkar et al.'s noisy BN): every activation of every example gets its
      own i.i.d. noise from the step's distribution, :math:`y_{ij} = x_{ij} + n_{ij}` with
      :math:`n_{ij} \sim \mathcal{N}(t_j, s_j^2)` (one draw per element of ``x``: per example, unit and
      position). The noise has a non-zero mean and a non-unit variance, and both change from step to step.
    * ``per_example=False`` (the batch-shared variant): :math:`y_{ij} = s_j x_{ij} + t_j`, one scale and shift
      per unit shared by all examples and positions, so the whole distribution of the unit is rescaled and moved
      from one step to the next while the examples keep their order (the "weather" of a batch).

    In both forms the unit's values in a batch are moved by :math:`t_j` on average, and spread by :math:`s_j`
    (as a factor, or as an added standard deviation). In eval mode the average transform is applied:
    :math:`y = x + \mu` for the per-example noise (its mean), :math:`y = x \cdot \bar s + \mu` with
    :math:`\bar s = (s_{lo} + s_{hi})/2` for the batch-shared one, so that a network trained with the noise is
    evaluated with what it saw on average (as dropout rescales at test time). The random numbers come from
    PyTorch's global generator on the input's device, so :func:`bnlib.lab.runtime.seed_everything` makes them
    reproducible.

    Args:
        num_features: ``C``; the input must be ``(N, C, ...)``.
        scale: ``(s_lo, s_hi)``, range of the uniform :math:`s` (default (0.5, 1.5)).
        shift_mean, shift_std: mean and standard deviation of the normal :math:`t` (default 0.5, 1.0).
        per_example: i.i.d. noise for every activation of every example (True), or one scale and shift per unit
            for the whole batch (False).
    """

    def __init__(self, num_features: int, scale: tuple[float, float] = (0.5, 1.5),
                 shift_mean: float = 0.5, shift_std: float = 1.0, per_example: bool = True) -> None:
        super().__init__()
        if not 0 <= scale[0] <= scale[1]:
            raise ValueError(f"scale must be (low, high) with 0 <= low <= high, got {scale!r}")
        if shift_std < 0:
            raise ValueError(f"shift_std must be >= 0, got {shift_std!r}")
        self.num_features = int(num_features)
        self.scale = (float(scale[0]), float(scale[1]))
        self.shift_mean, self.shift_std = float(shift_mean), float(shift_std)
        self.per_example = bool(per_example)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns ``x`` with the step's noise in training mode, with its average effect in eval mode."""
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected input (N, {self.num_features}, ...), got shape {tuple(x.shape)}")
        lo, hi = self.scale
        if not self.training:
            return (x if self.per_example else x * (0.5 * (lo + hi))) + self.shift_mean
        unit = [1, self.num_features] + [1] * (x.dim() - 2)                       # one draw per unit: (1, C, 1, ...)
        s = lo + (hi - lo) * torch.rand(unit, device=x.device, dtype=x.dtype)                 # s_j ~ U[lo, hi]
        t = self.shift_mean + self.shift_std * torch.randn(unit, device=x.device, dtype=x.dtype)  # t_j ~ N(μ, σ²)
        if self.per_example:
            return x + t + s * torch.randn_like(x)                                # n_ij ~ N(t_j, s_j²), i.i.d.
        return x * s + t

    def extra_repr(self) -> str:
        return (f"{self.num_features}, scale={self.scale}, shift_mean={self.shift_mean}, "
                f"shift_std={self.shift_std}, per_example={self.per_example}")


def noisy_norm(base: NormSpec = "bn", **noise) -> Callable[[int], nn.Module]:
    """A ``norm`` callable for :class:`bnlib.lab.models.MLP` / :func:`bnlib.lab.models.make_norm`:
    the normalization ``base`` followed by :class:`NoisyShift` (``**noise`` are its arguments).

    ``noisy_norm("bn")`` is Santurkar et al.'s noisy BN (per-example noise); ``noisy_norm("bn", per_example=False)``
    its batch-shared variant; ``noisy_norm(None, ...)`` puts the same noise in a network without normalization.

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
        etas: the step sizes η (multiples of the gradient).
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
    def step_lengths(self) -> np.ndarray:
        """Returns the distance moved in parameter space at each step, ‖η∇L(x)‖ = η‖∇L(x)‖."""
        return np.asarray(self.etas, dtype=float) * self.grad_norm

    @property
    def loss_range(self) -> float:
        """Returns max − min of the loss over the current point and all steps (the loss "variation")."""
        v = np.append(self.losses, self.loss0)
        return float(np.max(v) - np.min(v))

    @property
    def max_grad_change(self) -> float:
        """Returns the largest ‖∇L(x) − ∇L(x − η∇L(x))‖ (the gradient's "predictiveness": smaller is
        better)."""
        return float(np.max(self.grad_changes))

    @property
    def beta_smoothness(self) -> float:
        """Returns the "effective β-smoothness": max over η of the gradient change per unit of distance
        moved, ‖∇L(x) − ∇L(x − ηg)‖ / ‖ηg‖ (0 if the gradient is zero)."""
        if self.grad_norm == 0:
            return 0.0
        return float(np.max(self.grad_changes / self.step_lengths))


def _flatten(grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Returns ``grads`` as one vector (zeros for the parameters the loss does not depend on)."""
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])


def _flat_grad(params: Sequence[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
    """Returns the gradient of ``loss`` with respect to ``params``, flattened into one vector."""
    return _flatten(torch.autograd.grad(loss, params, allow_unused=True), params)


def _trainable(model: nn.Module) -> list[torch.Tensor]:
    """Returns the model's trainable parameters (raises if there are none)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return params


@contextlib.contextmanager
def _left_as_found(model: nn.Module) -> Iterator[None]:
    """Runs the block, then puts back the model (:func:`bnlib.layers.preserved_state` with its parameters and
    their ``.grad``) and PyTorch's random state.

    Train-mode passes update BN's running statistics, and noise layers draw random numbers; neither
    may leak into the training run that measures.
    """
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    with preserved_state(model, parameters=True), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        yield


def loss_landscape(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   batch: tuple[torch.Tensor, torch.Tensor], etas: Sequence[float] | None = None, *,
                   distances: Sequence[float] | None = None) -> LandscapeResult:
    r"""Loss and gradient along the gradient direction, as in Santurkar et al.'s Figure 4.

    With :math:`x` the current (trainable) parameters and :math:`g = \nabla L(x)` on ``batch``,
    computes for each :math:`\eta` in ``etas`` the loss :math:`L(x - \eta g)` and the gradient change
    :math:`\lVert g - \nabla L(x - \eta g)\rVert`, all on the same batch and in the model's current
    mode (train mode: BN uses the batch's statistics, as during training).

    Steps that are multiples of the gradient move two networks by different distances when their
    gradients differ in size (a BN network's weight gradients scale as 1/‖W‖). Give ``distances``
    instead of ``etas`` to step by the same lengths :math:`d` in parameter space in both:
    :math:`\eta = d / \lVert g \rVert`. :attr:`LandscapeResult.beta_smoothness` divides by the
    distance either way.

    The model is left exactly as it was: parameters, buffers (e.g. BN running statistics, which
    train-mode passes would update), ``.grad`` fields and PyTorch's random number generators
    (so a training run with measurements follows the same trajectory as one without).

    Args:
        model: the network; its outputs go to ``loss_fn``.
        loss_fn: ``loss_fn(model(x), y) -> scalar``, e.g. ``torch.nn.functional.cross_entropy``.
        batch: ``(x, y)``; moved to the model's device.
        etas: step sizes (positive floats), multiples of the gradient.
        distances: step lengths (positive floats) in parameter space; give exactly one of
            ``etas`` and ``distances``. With a zero gradient every η is 0.

    Returns:
        LandscapeResult (its ``etas`` are the multiples actually used).
    """
    params = _trainable(model)
    dev = params[0].device
    x, y = batch[0].to(dev), batch[1].to(dev)
    if (etas is None) == (distances is None):
        raise ValueError("give exactly one of etas and distances")
    steps = np.asarray([float(e) for e in (etas if etas is not None else distances)], dtype=float)
    if steps.size == 0 or np.any(steps <= 0):
        raise ValueError(f"step sizes must be positive, got {steps.tolist()}")

    with _left_as_found(model):
        start = [p.detach().clone() for p in params]
        loss0 = loss_fn(model(x), y)
        g = _flat_grad(params, loss0).detach()
        gnorm = torch.linalg.vector_norm(g).item()
        if etas is not None:
            used = steps
        else:
            used = steps / gnorm if gnorm > 0 else np.zeros_like(steps)
        losses, changes = [], []
        for eta in used:
            with torch.no_grad():
                offset = 0
                for p, p0 in zip(params, start):
                    n = p.numel()
                    p.copy_(p0 - float(eta) * g[offset:offset + n].view_as(p))
                    offset += n
            loss = loss_fn(model(x), y)
            g_new = _flat_grad(params, loss).detach()
            losses.append(loss.item())
            changes.append(torch.linalg.vector_norm(g - g_new).item())
        loss0_v = loss0.item()
    return LandscapeResult(etas=used, loss0=loss0_v, grad_norm=gnorm,
                           losses=np.asarray(losses), grad_changes=np.asarray(changes))


@dataclass
class LandscapeRecorder:
    """A :func:`bnlib.lab.training.fit` callback that runs :func:`loss_landscape` at checkpoints.

    ``fit(model, data, ..., callback=rec, callback_every=k)`` measures at step 0 and every ``k``
    updates, on the fixed ``batch``. Never stops training.

    Attributes:
        loss_fn, batch, etas, distances: as in :func:`loss_landscape` (give one of ``etas`` and
            ``distances``).
        steps: the steps measured at; results: one :class:`LandscapeResult` per step.
    """

    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    batch: tuple[torch.Tensor, torch.Tensor]
    etas: Sequence[float] | None = None
    distances: Sequence[float] | None = None
    steps: list[int] = field(default_factory=list)
    results: list[LandscapeResult] = field(default_factory=list)

    def __call__(self, step: int, model: nn.Module, history=None) -> bool:
        self.steps.append(int(step))
        self.results.append(loss_landscape(model, self.loss_fn, self.batch, self.etas, distances=self.distances))
        return False

    def summary(self) -> dict[str, np.ndarray]:
        """Returns ``{'steps', 'loss_range', 'max_grad_change', 'beta_smoothness', 'grad_norm'}`` as
        arrays, one value per checkpoint."""
        return {
            "steps": np.asarray(self.steps),
            "loss_range": np.asarray([r.loss_range for r in self.results]),
            "max_grad_change": np.asarray([r.max_grad_change for r in self.results]),
            "beta_smoothness": np.asarray([r.beta_smoothness for r in self.results]),
            "grad_norm": np.asarray([r.grad_norm for r in self.results]),
        }


# --------------------------------------------------------------------------
# Internal covariate shift, measured as a change of gradient
# --------------------------------------------------------------------------

@dataclass
class GradientShift:
    r"""What :func:`gradient_shift` measured for one layer at one point.

    Attributes:
        grad_norm: ‖G‖, the layer's gradient at the current parameters.
        shifted_norm: ‖G′‖, its gradient after the earlier layers' update.
        distance: ‖G − G′‖ (Santurkar et al.'s ℓ2 measure of internal covariate shift).
        cosine: cos∠(G, G′) (1: same direction; 0 if either gradient is zero).
    """

    grad_norm: float
    shifted_norm: float
    distance: float
    cosine: float

    @property
    def relative(self) -> float:
        """Returns ‖G − G′‖ / ‖G‖, which does not depend on the scale of the gradient (0 if G = 0)."""
        return self.distance / self.grad_norm if self.grad_norm > 0 else 0.0


def gradient_shift(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   batch: tuple[torch.Tensor, torch.Tensor], layer: Sequence[torch.Tensor],
                   earlier: Sequence[torch.Tensor], lr: float) -> GradientShift:
    r"""Internal covariate shift of one layer as Santurkar et al. (2018, Section 2.2) measure it.

    With all parameters at step :math:`t` and one ``batch``, :math:`G` is the gradient of the loss
    with respect to the ``layer``'s parameters. The ``earlier`` layers (those below it) then take
    one plain SGD step, :math:`W \leftarrow W - \text{lr}\,\nabla_W L`, with their gradient on the
    same batch, while the layer itself and everything above it stay where they were; :math:`G'`
    is the layer's gradient after that update, on the same batch. The difference is due only to
    the change of the layer's inputs, "the shift" the layer has to adapt to.

    The model is left exactly as it was (parameters, ``.grad``, buffers, random state), and runs in
    its current mode (train mode: BN normalizes with ``batch``'s statistics).

    Args:
        model: the network; its outputs go to ``loss_fn``.
        loss_fn: ``loss_fn(model(x), y) -> scalar``.
        batch: ``(x, y)``; moved to the model's device.
        layer: the parameters whose gradient is compared (e.g. ``[model.hidden[2].linear.weight]``).
        earlier: the parameters that are updated (all trainable parameters below the layer); must
            not overlap ``layer``.
        lr: the SGD step size of that update (the training learning rate).

    Returns:
        GradientShift.
    """
    layer, earlier = list(layer), list(earlier)
    if not layer:
        raise ValueError("layer has no parameters")
    if not earlier:
        raise ValueError("earlier has no parameters: the first layer has no layers below it")
    ids = {id(p) for p in layer}
    if any(id(p) in ids for p in earlier):
        raise ValueError("layer and earlier must not share parameters")
    dev = layer[0].device
    x, y = batch[0].to(dev), batch[1].to(dev)
    with _left_as_found(model):
        grads = torch.autograd.grad(loss_fn(model(x), y), layer + earlier, allow_unused=True)
        g_before = _flatten(grads[:len(layer)], layer).detach()
        with torch.no_grad():
            for p, g in zip(earlier, grads[len(layer):]):
                if g is not None:
                    p.sub_(float(lr) * g)
        g_after = _flat_grad(layer, loss_fn(model(x), y)).detach()
        n0 = torch.linalg.vector_norm(g_before).item()
        n1 = torch.linalg.vector_norm(g_after).item()
        dist = torch.linalg.vector_norm(g_before - g_after).item()
        cos = (torch.dot(g_before, g_after).item() / (n0 * n1)) if n0 > 0 and n1 > 0 else 0.0
    return GradientShift(grad_norm=n0, shifted_norm=n1, distance=dist, cosine=cos)


@dataclass
class GradientShiftRecorder:
    """A :func:`bnlib.lab.training.fit` callback that runs :func:`gradient_shift` at checkpoints.

    ``layers(model)`` returns ``{name: (layer_params, earlier_params)}`` for the layers to measure;
    at every checkpoint each is measured on each batch of ``batches`` and the results averaged over
    the batches (``distance``, ``relative``, ``cosine``). Never stops training.

    Attributes:
        loss_fn, lr: as in :func:`gradient_shift`.
        batches: a sequence of ``(x, y)`` batches (e.g. a few of the training batch size).
        layers: ``model -> {name: (layer, earlier)}``.
        steps: the steps measured at; records: ``{name: list of {'distance', 'relative', 'cosine'}}``.
    """

    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]]
    layers: Callable[[nn.Module], Mapping[str, tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]]]
    lr: float
    steps: list[int] = field(default_factory=list)
    records: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    def __call__(self, step: int, model: nn.Module, history=None) -> bool:
        self.steps.append(int(step))
        for name, (layer, earlier) in self.layers(model).items():
            rs = [gradient_shift(model, self.loss_fn, b, layer, earlier, self.lr) for b in self.batches]
            self.records.setdefault(name, []).append({
                "distance": float(np.mean([r.distance for r in rs])),
                "relative": float(np.mean([r.relative for r in rs])),
                "cosine": float(np.mean([r.cosine for r in rs])),
            })
        return False

    def summary(self) -> dict[str, dict[str, np.ndarray]]:
        """Returns ``{name: {'steps', 'distance', 'relative', 'cosine'}}``, one value per checkpoint."""
        return {name: {"steps": np.asarray(self.steps),
                       **{k: np.asarray([r[k] for r in recs]) for k in ("distance", "relative", "cosine")}}
                for name, recs in self.records.items()}

r"""Test-time adaptation through Batch Normalization: new statistics (and new γ, β) for shifted test data.

A BN layer's running statistics describe the training (*source*) distribution of its input. When the test
(*target*) data shift, that description is wrong, and BN is the one layer whose fix needs no labels. Each
method here is a context manager that changes a trained model for the duration of a ``with`` block and then
puts it back exactly as it was (train/eval flags, buffers, parameters, ``requires_grad``, gradients; through
:func:`bnlib.layers.preserved_state`). "The BN layers" are :func:`bnlib.layers.bn_layers`.

* :func:`adabn` -- AdaBN (Li et al. 2016): every BN layer's running mean and variance replaced by the exact
  statistics of its input on unlabeled target data (computed by :func:`bnlib.running_stats.recompute_bn_stats`,
  Precise BN); then ordinary inference.
* :func:`prediction_time_bn` -- prediction-time BN (Nado et al. 2020): each test batch is normalized with its
  own mean and (biased) variance, as in training; the running statistics are not used.
* :func:`source_target_mix` -- Schneider et al. (2020): a pseudo-count :math:`N` of source examples mixed with
  the :math:`n` examples of the test batch,

  .. math:: \mu = \frac{N\mu_s + n\mu_t}{N + n}, \qquad \sigma^2 = \frac{N\sigma_s^2 + n\sigma_t^2}{N + n},

  so :math:`N = 0` is prediction-time BN and :math:`N \to \infty` the source statistics.
* :func:`tent` -- TENT (Wang et al. 2021): BN layers normalize with the test batch's statistics, and only their
  γ and β are trained, online, one optimizer step per test batch, to lower the mean entropy of the batch's
  predictions.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import cast

import torch
from torch import Tensor, nn

from .layers import bn_layers, preserved_state
from .running_stats import recompute_bn_stats

__all__ = ["Tent", "adabn", "entropy", "prediction_time_bn", "source_target_mix", "tent"]


def _check_model(model: nn.Module, fn: str, *, tracking: bool) -> dict[str, nn.Module]:
    """The BN layers of ``model`` (those with running statistics when ``tracking``); an error when there are none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}() expects a torch.nn.Module, got {type(model).__name__}")
    layers = bn_layers(model, tracking=tracking)
    if not layers:
        what = "batch-statistics layers with running statistics" if tracking else "batch-statistics layers"
        raise ValueError(f"{fn}(): the model has no {what} (bnlib.layers.bn_layers); there is nothing to adapt")
    return layers


def _dropout_off(model: nn.Module) -> None:
    """Dropout layers in eval mode: adaptation changes normalization, never the rest of inference."""
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()


@contextlib.contextmanager
def adabn(model: nn.Module, x: Tensor | Iterable, *, batch_size: int = 256,
          num_batches: int | None = None) -> Iterator[nn.Module]:
    """AdaBN: inside the block, every BN layer's running statistics are those of the target data ``x``.

    The statistics are exact (Precise BN over all of ``x``: :func:`bnlib.running_stats.recompute_bn_stats`, with
    each upstream BN layer normalizing its batch of ``batch_size`` target examples as in training, and only the
    examples' statistics written); the model is in eval mode inside the block and restored on exit::

        with adabn(model, x_target):
            logits = model(x_target)

    Args:
        model: a trained model with BN layers that keep running statistics.
        x: unlabeled target examples: a tensor (cut into batches of ``batch_size``) or an iterable of batches.
        batch_size, num_batches: as in :func:`bnlib.running_stats.recompute_bn_stats`.

    Yields:
        The model, in eval mode, with the target statistics.
    """
    _check_model(model, "adabn", tracking=True)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"adabn(): batch_size must be a positive integer, got {batch_size!r}")
    with preserved_state(model, parameters=True):
        recompute_bn_stats(model, x, batch_size=batch_size, num_batches=num_batches)
        model.eval()
        yield model


@contextlib.contextmanager
def prediction_time_bn(model: nn.Module) -> Iterator[nn.Module]:
    """Prediction-time BN: inside the block, every BN layer normalizes each batch with that batch's statistics.

    The BN layers run in training mode (mean and biased variance of the batch, exactly as during training);
    every other module is in eval mode (no dropout). Whatever the forward passes do to the running statistics
    is undone on exit, with every flag, buffer and parameter::

        with prediction_time_bn(model), torch.no_grad():
            logits = model(x_batch)      # x_batch's own statistics

    A batch of one example leaves each channel of a convolutional layer its H·W values (per-image statistics,
    like instance normalization); a fully connected BN layer then has a single value per channel, which BN
    refuses.

    Yields:
        The model.
    """
    layers = _check_model(model, "prediction_time_bn", tracking=False)
    with preserved_state(model, parameters=True):
        model.eval()
        for m in layers.values():
            m.train()
        yield model


def _mixing_hook(source_mean: Tensor, source_var: Tensor, pseudo_count: float) -> Callable:
    """A forward pre-hook writing the mix of the source and the batch statistics into the layer's buffers."""
    def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        x = inputs[0]
        if x.dim() < 2:
            raise ValueError(f"source_target_mix(): expected an input (N, C, *), got shape {tuple(x.shape)}")
        n = x.shape[0]                                           # n: examples in the test batch
        dims = [0] + list(range(2, x.dim()))
        with torch.no_grad():
            var_t, mean_t = torch.var_mean(x.detach().to(source_mean.dtype), dim=dims, correction=0)
            w = 1.0 if math.isinf(pseudo_count) else pseudo_count / (pseudo_count + n)   # w = N / (N + n)
            running_mean, running_var = cast(Tensor, module.running_mean), cast(Tensor, module.running_var)
            running_mean.copy_(w * source_mean + (1 - w) * mean_t)   # μ = (N μ_s + n μ_t) / (N + n)
            running_var.copy_(w * source_var + (1 - w) * var_t)      # σ² = (N σ_s² + n σ_t²) / (N + n)
    return hook


@contextlib.contextmanager
def source_target_mix(model: nn.Module, pseudo_count: float) -> Iterator[nn.Module]:
    r"""Schneider et al. (2020): each batch normalized with a mix of the source and the batch's statistics.

    For a test batch of :math:`n` examples every BN layer normalizes with

    .. math:: \mu = \frac{N\mu_s + n\mu_t}{N + n}, \qquad \sigma^2 = \frac{N\sigma_s^2 + n\sigma_t^2}{N + n}

    where :math:`\mu_s, \sigma^2_s` are its running (source) statistics, :math:`\mu_t, \sigma^2_t` the mean and
    biased variance of its input in this batch, and :math:`N` the pseudo-count: the source statistics weigh as
    much as :math:`N` test examples. ``pseudo_count=0`` is :func:`prediction_time_bn`; ``math.inf`` is the
    source statistics (plain eval mode). The batch's variance is the biased one, the one BN normalizes with in
    training, so that :math:`N = 0` is exactly prediction-time BN (an unbiased estimate would differ by the
    factor :math:`m/(m-1)`, :math:`m = n\cdot H\cdot W` values per channel).

    The model is in eval mode inside the block, and restored exactly on exit::

        with source_target_mix(model, pseudo_count=16), torch.no_grad():
            logits = model(x_batch)

    Args:
        model: a trained model with BN layers that keep running statistics.
        pseudo_count: :math:`N \ge 0` (``math.inf`` allowed).

    Yields:
        The model.
    """
    layers = _check_model(model, "source_target_mix", tracking=True)
    if isinstance(pseudo_count, bool) or not isinstance(pseudo_count, (int, float)) \
            or math.isnan(pseudo_count) or pseudo_count < 0:
        raise ValueError(f"source_target_mix(): pseudo_count must be a number >= 0 (math.inf allowed), "
                         f"got {pseudo_count!r}")
    with preserved_state(model, parameters=True):
        model.eval()
        hooks = [m.register_forward_pre_hook(_mixing_hook(cast(Tensor, m.running_mean).detach().clone(),
                                                          cast(Tensor, m.running_var).detach().clone(),
                                                          float(pseudo_count)))
                 for m in layers.values()]
        try:
            yield model
        finally:
            for h in hooks:
                h.remove()


def entropy(logits: Tensor) -> Tensor:
    """The entropy −Σ_k p_k log p_k of the softmax of each row of ``logits`` (N, K), in nats; shape (N,)."""
    if logits.dim() != 2:
        raise ValueError(f"entropy() expects logits of shape (N, classes), got {tuple(logits.shape)}")
    logp = torch.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(dim=1)


class Tent:
    """The adapting model of :func:`tent`: call it on each test batch to get that batch's logits.

    Each call runs the model on the batch (BN layers with the batch's statistics), returns those logits, and
    then takes one optimizer step on γ and β to lower the batch's mean prediction entropy, as the authors'
    ``forward_and_adapt`` does: a batch's predictions come from the parameters *before* its own update.

    Attributes:
        model: the model being adapted.
        params: the γ and β being trained.
        optimizer: their optimizer.
        steps: optimizer steps taken so far.
        losses: the mean entropy of each batch, before its update.
    """

    def __init__(self, model: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        self.model, self.params, self.optimizer = model, params, optimizer
        self.steps = 0
        self.losses: list[float] = []

    def __call__(self, x: Tensor) -> Tensor:
        """The logits of ``x`` (detached), then one step on γ, β lowering their mean entropy."""
        logits = self.model(x)
        loss = entropy(logits).mean()                 # L = (1/n) Σ_i H(softmax(f(x_i)))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        self.losses.append(loss.item())
        return logits.detach()


@contextlib.contextmanager
def tent(model: nn.Module, *, optimizer: str = "adam", lr: float | None = None,
         momentum: float = 0.9) -> Iterator[Tent]:
    """TENT: inside the block, the model adapts γ and β online to each test batch by entropy minimization.

    Following the authors' ``tent.py``: BN layers normalize every batch with its own statistics (training mode;
    the running statistics are not used); every parameter is frozen except the BN layers' weight (γ) and bias
    (β); each batch gets one optimizer step on the mean softmax entropy of its predictions. Defaults from their
    ``cfgs/tent.yaml``: Adam, lr 1e-3, betas (0.9, 0.999), no weight decay. ``optimizer="sgd"`` uses SGD with
    ``momentum`` (0.9; lr 0.00025 by default, the paper's ImageNet setting). Everything -- γ, β, the running
    statistics, every ``requires_grad`` flag and gradient, every train/eval flag -- is restored on exit::

        with tent(model) as adapt:
            for xb in test_batches:
                logits = adapt(xb)

    Args:
        model: a trained model whose BN layers are affine.
        optimizer: ``"adam"`` or ``"sgd"``.
        lr: learning rate (default 1e-3 for Adam, 2.5e-4 for SGD).
        momentum: SGD's momentum (ignored by Adam).

    Yields:
        :class:`Tent`: call it on each test batch in turn.
    """
    layers = _check_model(model, "tent", tracking=False)
    params = [cast(nn.Parameter, p) for m in layers.values() for p in (m.weight, m.bias) if p is not None]
    if not params:
        raise ValueError("tent(): the model's BN layers have no γ/β (affine=False); there is nothing to train")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"tent(): optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    lr = (1e-3 if optimizer == "adam" else 2.5e-4) if lr is None else lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"tent(): lr must be a finite number > 0, got {lr!r}")
    with preserved_state(model, parameters=True):
        model.train()
        _dropout_off(model)
        model.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        opt = (torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0) if optimizer == "adam"
               else torch.optim.SGD(params, lr=lr, momentum=momentum))
        yield Tent(model, params, opt)

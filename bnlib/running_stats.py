r"""How Batch Normalization's population statistics are estimated.

At inference BN normalizes with *population* statistics :math:`\mathrm{E}[x]` and
:math:`\mathrm{Var}[x]` instead of the statistics of the current batch (Algorithm 2 of Ioffe &
Szegedy, 2015). Frameworks estimate them with an exponential moving average (EMA) during training,
and they disagree on what "momentum" means. The chapter *The algorithm*
(``chapters/algorithm.ipynb``) explains both topics with this module:

* :data:`CONVENTIONS`, :func:`convert_momentum`, :func:`ema_update`, :func:`torch_style_update`
  and :func:`keras_style_update`: the moving-average rules of PyTorch, Keras/TensorFlow, Flax/JAX
  and the papers, and the conversion between their momenta
  (PyTorch's ``m`` weights the new batch, Keras's and Flax's weight the old value:
  ``m_keras = 1 - m_torch``);
* :func:`bias_corrected`: a moving average with the weight of its initial value removed (the start-up
  correction Adam applies to its moments), so that start-up bias and staleness can be told apart;
* :class:`ChannelMoments`: exact per-channel count, mean and sum of squared deviations over any
  number of batches, merged with the pairwise update of Chan, Golub & LeVeque (stable: no
  :math:`E[x^2]-E[x]^2`);
* :func:`recompute_bn_stats` (alias :func:`precise_bn`): *Precise BN* (Wu & Johnson, 2021). After
  training, run the frozen model over many examples with BN in training mode, aggregate the exact
  mean and unbiased variance of every BN layer's input, and write them into the layer's
  ``running_mean`` / ``running_var`` in place of the EMA estimates.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .core import reduce_dims, update_running_stats
from .layers import bn_layers, preserved_state

__all__ = [
    "CONVENTIONS",
    "convert_momentum",
    "ema_update",
    "torch_style_update",
    "keras_style_update",
    "bias_corrected",
    "ChannelMoments",
    "batchnorm_layers",
    "recompute_bn_stats",
    "precise_bn",
]

#: What each framework calls momentum, its defaults, and the variance it keeps (checked in the chapter).
#: ``momentum_weights``: ``'new'`` if momentum is the weight of the new batch statistic, ``'old'`` if it
#: is the weight of the old running value.
CONVENTIONS: dict[str, dict] = {
    "torch": dict(name="PyTorch (torch.nn.BatchNorm*d)", momentum_weights="new", momentum=0.1, eps=1e-5,
                  running_var="unbiased", mode_switch="module.train() / module.eval()",
                  source="torch.nn.modules.batchnorm"),
    "keras": dict(name="Keras 3 / TensorFlow (BatchNormalization)", momentum_weights="old", momentum=0.99,
                  eps=1e-3, running_var="biased",
                  mode_switch="call(training=...); trainable=False forces inference mode",
                  source="keras 3.15.1 on the torch backend (checked by tests/test_keras_conventions.py)"),
    "flax": dict(name="Flax/JAX (flax.linen.BatchNorm)", momentum_weights="old", momentum=0.99, eps=1e-5,
                 running_var="biased", mode_switch="use_running_average=True / False",
                 source="flax 0.12.8, flax/linen/normalization.py"),
    "paper": dict(name="Ioffe & Szegedy 2015 / Ioffe 2017", momentum_weights="new", momentum=None, eps=None,
                  running_var="unbiased", mode_switch="training vs inference network (Algorithm 2)",
                  source="Algorithm 2 (unbiased m/(m-1)); Batch Renorm's update rate alpha = 0.01"),
}

_ALIASES = {"torch": "torch", "pytorch": "torch", "paper": "paper", "keras": "keras", "tf": "keras",
            "tensorflow": "keras", "flax": "flax", "jax": "flax"}


def _convention(name: str) -> str:
    try:
        return _ALIASES[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown convention {name!r}; use one of {sorted(_ALIASES)}") from None


def convert_momentum(value: float, from_: str = "torch", to: str = "keras") -> float:
    """Translate a BN momentum between conventions.

    PyTorch (and the papers' update rate) weight the *new* batch,
    ``running = (1 - m) * running + m * batch``; Keras/TensorFlow and Flax weight the *old* value,
    ``running = m * running + (1 - m) * batch``. So ``convert_momentum(0.1, 'torch', 'keras') == 0.9``
    and Keras's default 0.99 is PyTorch's 0.01.

    Args:
        value: the momentum in the ``from_`` convention, in [0, 1].
        from_, to: ``'torch'`` (``'pytorch'``), ``'paper'``, ``'keras'`` (``'tf'``,
            ``'tensorflow'``), ``'flax'`` (``'jax'``).

    Returns:
        float: the same averaging rule's momentum in the ``to`` convention.
    """
    if value is None or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"expected a momentum in [0, 1], got {value!r} (PyTorch's None has no EMA equivalent)")
    a, b = CONVENTIONS[_convention(from_)], CONVENTIONS[_convention(to)]
    value = float(value)
    return value if a["momentum_weights"] == b["momentum_weights"] else 1.0 - value


def ema_update(running: Tensor, batch: Tensor, momentum: float, convention: str = "torch") -> Tensor:
    """One moving-average step, in place, with ``momentum`` read in the given ``convention``.

    Returns:
        Tensor: ``running``, updated.
    """
    w_new = float(momentum) if CONVENTIONS[_convention(convention)]["momentum_weights"] == "new" \
        else 1.0 - float(momentum)
    with torch.no_grad():
        return running.mul_(1.0 - w_new).add_(batch.to(running.dtype), alpha=w_new)


def _batch_moments(x: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean and biased variance of ``x`` (N, C, *) (two-pass), and the count m."""
    var, mean = torch.var_mean(x, dim=reduce_dims(x), correction=0)
    return mean, var, x.numel() // x.shape[1]


def torch_style_update(running_mean: Tensor, running_var: Tensor, x: Tensor, momentum: float = 0.1) -> None:
    """PyTorch's rule: ``r = (1 - m) r + m * batch`` with the *unbiased* batch variance; in place.

    The update bnlib's layers make (:func:`bnlib.core.update_running_stats`), from the batch ``x``.
    """
    mean, var, m = _batch_moments(x)
    with torch.no_grad():
        update_running_stats(running_mean, running_var, mean, var, m, float(momentum))


def keras_style_update(moving_mean: Tensor, moving_var: Tensor, x: Tensor, momentum: float = 0.99) -> None:
    """Keras's (and Flax's) rule: ``r = m r + (1 - m) * batch`` with the *biased* batch variance; in place.

    A simulation of ``keras.layers.BatchNormalization`` (channels in dim 1 here, as in PyTorch).
    """
    mean, var, _ = _batch_moments(x)
    ema_update(moving_mean, mean, momentum, "keras")
    ema_update(moving_var, var, momentum, "keras")


def bias_corrected(running: Tensor, momentum: float, steps: int, initial: float | Tensor = 0.0) -> Tensor:
    r"""Returns the moving average ``running`` with the weight of its initial value removed.

    After ``t`` updates :math:`r \leftarrow (1 - \alpha)\, r + \alpha\, b` (``momentum`` = α, PyTorch's
    convention) the average is

    .. math:: r_t = (1 - \alpha)^t\, r_0 + \sum_{k=1}^{t} \alpha (1 - \alpha)^{t-k}\, b_k ,

    so the batch values carry a total weight of only :math:`1 - (1 - \alpha)^t` and the initial value
    :math:`r_0` (0 for the mean, 1 for the variance in every framework) the rest. Removing the initial value's
    share and renormalizing,

    .. math:: \tilde r_t = \frac{r_t - (1 - \alpha)^t\, r_0}{1 - (1 - \alpha)^t},

    leaves the weighted mean of the batch values alone, with the same exponential weights; for :math:`r_0 = 0` it
    is Adam's bias correction :math:`r_t / (1 - (1 - \alpha)^t)` (Kingma & Ba, 2015). It removes the start-up
    bias of the average, not its staleness (the old batches' weight).

    Args:
        running: the moving average after ``steps`` updates (not changed).
        momentum: α in (0, 1], the weight of the new batch (PyTorch's convention; Keras's 0.99 is 0.01 here,
            :func:`convert_momentum`).
        steps: the number of updates t ≥ 1 the average has received.
        initial: the value the average started from, r_0 (a number or a tensor shaped like ``running``).

    Returns:
        Tensor: a new tensor, the corrected average.

    Raises:
        ValueError: ``momentum`` outside (0, 1], ``steps`` not a positive integer.
    """
    if momentum is None or not 0.0 < float(momentum) <= 1.0:
        raise ValueError(f"bias_corrected needs a momentum in (0, 1] (the weight of the new batch), got {momentum!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"bias_corrected needs the number of updates as a positive integer, got {steps!r}")
    left = (1.0 - float(momentum)) ** steps  # (1 − α)^t: the initial value's weight
    return (running - left * torch.as_tensor(initial, dtype=running.dtype, device=running.device)) / (1.0 - left)


class ChannelMoments:
    """Exact per-channel statistics of all the values seen, one batch at a time.

    Keeps, per channel, the count ``n``, the mean and ``M2`` = Σ (x − mean)², in float64 (and the number of
    batches added, ``batches``). Each batch
    is reduced on its own (two-pass) and merged with Chan, Golub & LeVeque's pairwise rule::

        δ = mean_b − mean_a,  n = n_a + n_b,
        mean = mean_a + δ n_b / n,   M2 = M2_a + M2_b + δ² n_a n_b / n

    so the result equals the statistics of the concatenated data up to rounding, for any batch sizes.
    """

    def __init__(self) -> None:
        self.n = 0
        self.batches = 0  # number of batches added
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, x: Tensor) -> ChannelMoments:
        """Add a batch ``x`` of shape ``(N, C, *)``; statistics per channel (dim 1)."""
        x = x.detach().to(torch.float64)
        mean_b, var_b, n_b = _batch_moments(x)
        m2_b = var_b * n_b
        self.batches += 1
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return self
        n_a, n = self.n, self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.square() * (n_a * n_b / n)
        self.n = n
        return self

    def var(self, unbiased: bool = True) -> Tensor:
        """The variance per channel: ``M2 / (n − 1)`` (unbiased, default) or ``M2 / n``."""
        if self.mean is None or self.m2 is None:
            raise ValueError("no data seen yet")
        return self.m2 / (self.n - 1 if unbiased else self.n)


def batchnorm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Alias of ``bnlib.layers.bn_layers(model, tracking=True)``, kept for older callers."""
    return bn_layers(model, tracking=True)


def _batches(x, batch_size: int, num_batches: int | None) -> Iterable[Tensor]:
    if isinstance(x, Tensor):
        starts = range(0, len(x), batch_size)
        for i, s in enumerate(starts):
            if num_batches is not None and i >= num_batches:
                return
            yield x[s:s + batch_size]
    else:
        for i, b in enumerate(x):
            if num_batches is not None and i >= num_batches:
                return
            yield b[0] if isinstance(b, (tuple, list)) else b


def _recorder(stats: ChannelMoments):
    """A forward pre-hook that adds the layer's input to ``stats``."""
    def hook(module, inputs):
        stats.update(inputs[0])
    return hook


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, x: Tensor | Iterable, batch_size: int = 256,
                       num_batches: int | None = None) -> dict[str, ChannelMoments]:
    """Precise BN (Wu & Johnson, 2021): replace every BN layer's EMA statistics by exact ones.

    The model is frozen (``torch.no_grad``, no parameter changes). Its BN layers run in training mode,
    so each normalizes with the statistics of its batch exactly as during training, while every other
    module runs in eval mode (dropout off, as at inference). The input of each BN layer is
    aggregated over all batches with :class:`ChannelMoments`; afterwards ``running_mean`` holds the
    exact mean and ``running_var`` the exact *unbiased* variance (PyTorch's convention) of those
    inputs. Momenta, ``num_batches_tracked`` and every module's train/eval flag are restored.

    Args:
        model: any module; torch.nn and bnlib BN layers with ``track_running_stats=True`` are updated.
        x: a tensor of examples (split into ``batch_size`` chunks, in order), or an iterable of
            batches (tensors, or tuples whose first element is the input), e.g. a DataLoader.
        batch_size: examples per forward pass when ``x`` is a tensor; the per-batch normalization of
            upstream BN layers uses it, so use the training batch size (Wu & Johnson).
        num_batches: use at most this many batches (default: all).

    Returns:
        dict: layer name -> :class:`ChannelMoments` of that layer's input.
    """
    layers: dict[str, Any] = bn_layers(model, tracking=True)  # BatchNorm layers: their attributes are BatchNorm's
    if not layers:
        return {}
    moments = {name: ChannelMoments() for name in layers}
    hooks = [m.register_forward_pre_hook(_recorder(moments[name])) for name, m in layers.items()]
    momenta = {m: m.momentum for m in layers.values()}
    dev = next(iter(layers.values())).running_mean.device
    try:
        # Batch statistics in the BN layers, every other module in eval mode; whatever the passes do to the
        # buffers (num_batches_tracked) and to the modes is undone on leaving the block. Momentum 0 keeps the
        # running statistics fixed during the passes (Batch Renorm's r and d read them).
        with preserved_state(model):
            model.eval()
            for m in layers.values():
                m.train()
                m.momentum = 0.0
            seen = 0
            for xb in _batches(x, batch_size, num_batches):
                model(xb.to(dev))
                seen += 1
    finally:
        for h in hooks:
            h.remove()
        for m, momentum in momenta.items():
            m.momentum = momentum
    if seen == 0:
        raise ValueError("recompute_bn_stats() got no batches")
    for name, m in layers.items():
        s = moments[name]
        if s.n < 2 or s.mean is None:
            raise ValueError(f"layer {name!r} saw {s.n} value(s) per channel; need at least 2")
        m.running_mean.copy_(s.mean.to(m.running_mean.dtype))
        m.running_var.copy_(s.var(unbiased=True).to(m.running_var.dtype))
    return moments


#: Alias of :func:`recompute_bn_stats`.
precise_bn = recompute_bn_stats

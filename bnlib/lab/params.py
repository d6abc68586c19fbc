"""Which parameters of a network learn, and how far each update moves them.

A BatchNorm layer has two learned parameters per feature, the scale γ and the shift β. To see what
each contributes, a network can be built with one of them taken away, or trained with everything
else frozen:

* :func:`bn_factory` -- a ``norm=`` argument for :class:`bnlib.lab.models.MLP` /
  :class:`~bnlib.lab.models.CNN` building BN with both parameters (``'full'``), with γ frozen at 1
  (``'gamma=1'``), without β (``'beta=0'``), or with neither (``'none'``: ``affine=False``);
* :func:`bn_parameters` -- the γ and β of the BN layers of a model (:func:`bnlib.layers.bn_layers`);
* :func:`train_only` -- freeze every parameter except those of the given modules (and, optionally,
  of every BN layer), e.g. "only BN" or "only BN and the output layer";
* :func:`count_parameters` -- how many parameters (trainable ones by default) a model has;
* :func:`small_gamma_mask`, :func:`gamma_zeroed` -- the features of a BN layer whose ``|γ|`` is small
  next to the layer's median (the ones training may have switched off), and a context manager that
  sets γ to 0 for chosen features, to measure what the network loses without them;
* :class:`StepSizeRecorder` -- a :func:`bnlib.lab.training.fit` callback recording, for chosen weight
  tensors, the norm ``‖W‖`` and the relative step ``‖W_t − W_{t−1}‖ / ‖W_{t−1}‖`` of every update.
  For a weight followed by BN the output does not depend on ``‖W‖``, so this ratio is the *effective*
  step size of that weight.

:func:`bnlib.lab.training.fit` optimizes only the parameters whose ``requires_grad`` is True, so a model
prepared with :func:`train_only` can be passed to it unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..layers import bn_layers
from ..modules import BatchNorm1d, BatchNorm2d

__all__ = [
    "BN_VARIANTS",
    "bn_factory",
    "bn_parameters",
    "train_only",
    "count_parameters",
    "small_gamma_mask",
    "gamma_zeroed",
    "StepSizeRecorder",
]

#: The variants of :func:`bn_factory`, with what each learns.
BN_VARIANTS = {
    "full": "γ and β learned (the standard layer)",
    "gamma=1": "γ fixed at 1 (kept, requires_grad=False), β learned",
    "beta=0": "γ learned, no β (bias=False)",
    "none": "neither: affine=False, normalization only",
}


def bn_factory(variant: str = "full", kind: str = "1d", **bn_kwargs) -> Callable[[int], nn.Module]:
    """A ``norm=`` callable ``C -> BatchNorm`` for one of :data:`BN_VARIANTS`.

    Args:
        variant: ``'full'``, ``'gamma=1'``, ``'beta=0'`` or ``'none'``.
        kind: ``'1d'`` (:class:`bnlib.BatchNorm1d`, for MLPs) or ``'2d'`` (:class:`bnlib.BatchNorm2d`).
        **bn_kwargs: passed on to the layer (``eps``, ``momentum``, ...).

    Returns:
        callable: ``num_features -> nn.Module``.
    """
    if variant not in BN_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; use one of {', '.join(BN_VARIANTS)}")
    if kind not in ("1d", "2d"):
        raise ValueError(f"kind must be '1d' or '2d', got {kind!r}")
    cls = BatchNorm2d if kind == "2d" else BatchNorm1d

    def make(num_features: int) -> nn.Module:
        if variant == "none":
            return cls(num_features, affine=False, **bn_kwargs)
        if variant == "beta=0":
            return cls(num_features, bias=False, **bn_kwargs)
        layer = cls(num_features, **bn_kwargs)
        if variant == "gamma=1":
            layer.weight.requires_grad_(False)
        return layer

    make.__qualname__ = f"bn_factory({variant!r}, {kind!r})"
    return make


def bn_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Returns every γ (``weight``) and β (``bias``) of the BN layers of ``model`` that exists."""
    return [p for m in bn_layers(model).values() for p in (m.weight, m.bias) if p is not None]


def train_only(model: nn.Module, *modules: nn.Module, bn: bool = False) -> int:
    """Freeze every parameter of ``model`` except those of ``modules`` (and of all BN layers if ``bn``).

    Sets ``requires_grad`` in place: True for the parameters of the given modules (with their
    submodules) and, with ``bn=True``, for every γ and β; False for all others. Frozen parameters
    keep their values, so a freshly built model keeps its random initialization.

    Examples: ``train_only(cnn, bn=True)`` (only BN), ``train_only(cnn, cnn.head, bn=True)``
    (BN and the output layer), ``train_only(cnn, cnn.head)`` (only the output layer).

    Returns:
        int: the number of trainable parameters afterwards.
    """
    keep = {id(p) for m in modules for p in m.parameters()}
    if bn:
        keep |= {id(p) for p in bn_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return count_parameters(model)


def count_parameters(model: nn.Module, trainable: bool = True) -> int:
    """Returns the number of parameters of ``model``: only trainable ones (default) or all."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def small_gamma_mask(layer: nn.Module, rel: float = 0.1) -> torch.Tensor:
    """The features of a BN layer whose ``|γ|`` is below ``rel`` times the layer's median ``|γ|``.

    Such a feature's output ``γ x̂ + β`` is nearly the constant ``β``: the layer has (almost) switched
    it off. The threshold is relative, so it does not depend on the overall scale of the layer's γ.

    Returns:
        torch.BoolTensor: one entry per feature, on the layer's device.
    """
    if getattr(layer, "weight", None) is None:
        raise ValueError("small_gamma_mask needs a BN layer with a learned scale (affine=True)")
    g = layer.weight.detach().abs()
    return g < rel * g.median()


@contextlib.contextmanager
def gamma_zeroed(model: nn.Module, masks: Sequence[torch.Tensor]) -> Iterator[nn.Module]:
    """Context manager: γ set to 0 for the features in ``masks`` (one per BN layer), restored on exit.

    ``masks`` are boolean tensors, one per layer of :func:`bnlib.layers.bn_layers` (``model``), in that
    order. Inside the ``with`` block those features output their constant ``β``; on exit every γ has its
    old value::

        with gamma_zeroed(model, [small_gamma_mask(m) for m in bn_layers(model).values()]):
            acc = training.evaluate(model, x, y)
    """
    layers = list(bn_layers(model).values())
    if len(masks) != len(layers):
        raise ValueError(f"need one mask per BN layer: {len(layers)} layers, {len(masks)} masks")
    saved = []
    with torch.no_grad():
        for m, mask in zip(layers, masks):
            if m.weight is None:
                raise ValueError("gamma_zeroed needs BN layers with a learned scale (affine=True)")
            mask = torch.as_tensor(mask, dtype=torch.bool, device=m.weight.device)
            if mask.shape != m.weight.shape:
                raise ValueError(f"mask of shape {tuple(mask.shape)} for a layer of {m.weight.numel()} features")
            saved.append(m.weight.detach().clone())
            m.weight[mask] = 0.0
    try:
        yield model
    finally:
        with torch.no_grad():
            for m, w in zip(layers, saved):
                m.weight.copy_(w)


class StepSizeRecorder:
    """A :func:`bnlib.lab.training.fit` callback: norms and relative steps of chosen weight tensors.

    Pass it as ``callback=rec, callback_every=1``. At each call it records, for every named tensor,
    ``‖W‖`` and the relative change since the previous call, ``‖W - W_prev‖ / ‖W_prev‖`` -- with
    ``callback_every=1``, the size of one update relative to the weight it changed. For a weight
    followed by BN, the output does not depend on ``‖W‖``, so this ratio (not the learning rate)
    is how far the update moves the function.

    Args:
        params: ``{name: tensor}`` of the weights to watch (e.g. ``{'layer 1': mlp.hidden[0].linear.weight}``).
        every: keep a record only at steps that are multiples of ``every`` (each still measures the
            single step before it); the previous weights are copied at every call.

    Records: ``steps`` (the step of each record), ``norms`` and ``rel_steps`` (``{name: [float]}``).
    The first call (step 0) only stores the weights.
    """

    def __init__(self, params: Mapping[str, torch.Tensor], every: int = 1) -> None:
        if not params:
            raise ValueError("StepSizeRecorder needs at least one tensor to watch")
        self.params = dict(params)
        self.every = max(1, int(every))
        self.steps: list[int] = []
        self.norms: dict[str, list[float]] = {n: [] for n in self.params}
        self.rel_steps: dict[str, list[float]] = {n: [] for n in self.params}
        self._prev: dict[str, torch.Tensor] | None = None
        self._prev_step: int | None = None

    def __call__(self, step: int, model: nn.Module | None = None, history=None) -> bool:
        """Record (see the class docstring); returns False so that training goes on."""
        with torch.no_grad():
            now = {n: p.detach().clone() for n, p in self.params.items()}
            if (self._prev is not None and step % self.every == 0 and self._prev_step is not None
                    and step > self._prev_step):
                self.steps.append(int(step))
                for n in self.params:
                    prev_norm = self._prev[n].norm()
                    self.rel_steps[n].append(((now[n] - self._prev[n]).norm() / prev_norm).item())
                    self.norms[n].append(now[n].norm().item())
        self._prev, self._prev_step = now, int(step)
        return False

    def array(self) -> tuple:
        """Returns ``(steps, norms, rel_steps)``: an array and two ``{name: array}`` dicts."""
        return (np.asarray(self.steps), {n: np.asarray(v) for n, v in self.norms.items()},
                {n: np.asarray(v) for n, v in self.rel_steps.items()})

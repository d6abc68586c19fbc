"""Scaled weight standardization: the weights, not the activations, are normalized (Brock et al. 2021a).

A layer without normalization keeps its signal at unit variance at initialization if every output unit's
weights have mean 0 and squared norm 1/γ², where γ undoes the variance a nonlinearity removes. Scaled weight
standardization enforces this at every forward pass, for each output unit ``i`` (a row of a linear layer's
weight, a filter of a convolution) with fan-in ``N``:

    Ŵ_i = g_i · γ · (W_i − mean(W_i)) / √max(N · var(W_i), ε)

``var`` is the biased variance over the unit's ``N`` weights, ``g_i`` a learnable gain (initialised to 1) and
``γ = 1 / √Var(φ(z))`` for ``z ~ N(0, 1)`` the gain of the nonlinearity ``φ`` whose output the layer reads
(ReLU: ``√2 / √(1 − 1/π) ≈ 1.7129``). ``ε`` floors ``N · var`` as in the reference implementation
(``nfnets/base.py: WSConv2D``, ``1e-4``), so a unit whose weights are all equal does not divide by 0.

Why the mean matters: for inputs ``z_j`` with a common mean ``m`` and variance ``v``, a row ``ŵ`` with
``Σ_j ŵ_j = 0`` and ``Σ_j ŵ_j² = 1/γ²`` gives ``Σ_j ŵ_j z_j`` mean 0 and variance ``v/γ²``; with
``v = Var(φ(z))`` that is 1. The mean ``m`` of a ReLU's output (``1/√(2π)``) is removed by the weights.

:class:`ScaledStdLinear` and :class:`ScaledStdConv2d` are ``nn.Linear`` / ``nn.Conv2d`` whose forward uses
``Ŵ`` (:meth:`standardized_weight`) instead of ``W``; :func:`nonlinearity_gain` gives ``γ``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["NONLINEARITIES", "nonlinearity_gain", "scaled_standardize", "ScaledStdLinear", "ScaledStdConv2d"]

#: The nonlinearities :func:`nonlinearity_gain` knows, as functions of a float64 tensor.
NONLINEARITIES = {
    "linear": lambda z: z,
    "relu": torch.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}

_GAINS: dict[str, float] = {}


def _gaussian_variance(phi) -> float:
    """Var(φ(z)) for z ~ N(0, 1), by the trapezoidal rule on [−12, 12] in float64 (error far below 1e-9)."""
    z = torch.linspace(-12.0, 12.0, 240_001, dtype=torch.float64)
    density = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    y = phi(z)
    mean = torch.trapezoid(y * density, z)
    return float(torch.trapezoid((y - mean) ** 2 * density, z))


def nonlinearity_gain(nonlinearity: str | float) -> float:
    """γ = 1 / √Var(φ(z)), z ~ N(0, 1): the factor that brings a nonlinearity's output back to unit variance.

    Args:
        nonlinearity: a name from :data:`NONLINEARITIES` (``'linear'`` gives 1; ``'relu'`` gives
            ``√2 / √(1 − 1/π) ≈ 1.7129``, since a ReLU of a standard normal has mean ``1/√(2π)`` and
            second moment 1/2), or a positive finite number used as the gain itself.

    Returns:
        float: the gain.
    """
    if isinstance(nonlinearity, bool):
        raise TypeError("nonlinearity must be a name or a positive number, got a bool")
    if isinstance(nonlinearity, (int, float)):
        gain = float(nonlinearity)
        if not (math.isfinite(gain) and gain > 0):
            raise ValueError(f"a numeric nonlinearity gain must be positive and finite, got {nonlinearity!r}")
        return gain
    if not isinstance(nonlinearity, str):
        raise TypeError(f"nonlinearity must be a name or a positive number, got {type(nonlinearity).__name__}")
    name = nonlinearity.lower()
    if name not in NONLINEARITIES:
        raise ValueError(f"unknown nonlinearity {nonlinearity!r}; valid names: {', '.join(NONLINEARITIES)}, "
                         "or a positive number")
    if name not in _GAINS:
        _GAINS[name] = 1.0 / math.sqrt(_gaussian_variance(NONLINEARITIES[name]))
    return _GAINS[name]


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a number, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    return float(eps)


def scaled_standardize(weight: torch.Tensor, gain: torch.Tensor | None = None, gamma: float = 1.0,
                       eps: float = 1e-4) -> torch.Tensor:
    """Returns ``Ŵ_i = gain_i · gamma · (W_i − mean(W_i)) / √max(N · var(W_i), eps)`` for each output unit.

    Args:
        weight: ``(out, ...)``, one output unit per index of dimension 0; its fan-in ``N`` is the number of
            elements of ``weight[i]`` (``in_features`` for a linear layer, ``in/groups · kh · kw`` for a
            convolution). Needs ``N >= 2``.
        gain: None or ``(out,)``, one learnable factor per output unit.
        gamma: the nonlinearity's gain (see :func:`nonlinearity_gain`).
        eps: floor of ``N · var`` (>= 0).
    """
    eps = _check_eps(eps)
    if weight.dim() < 2:
        raise ValueError(f"weight must have an output dimension and at least one input dimension, "
                         f"got shape {tuple(weight.shape)}")
    fan_in = weight[0].numel()
    if fan_in < 2:
        raise ValueError(f"standardizing needs a fan-in of at least 2 (one weight minus its mean is 0), "
                         f"got fan-in {fan_in}")
    dims = tuple(range(1, weight.dim()))
    var, mean = torch.var_mean(weight, dim=dims, correction=0, keepdim=True)
    scale = gamma * torch.rsqrt(torch.clamp(fan_in * var, min=eps))     # γ / √max(N·var, ε)
    if gain is not None:
        if gain.shape != (weight.shape[0],):
            raise ValueError(f"gain must have shape ({weight.shape[0]},), one per output unit, "
                             f"got {tuple(gain.shape)}")
        scale = scale * gain.reshape((-1,) + (1,) * len(dims))
    return (weight - mean) * scale


class _ScaledStd:
    """What the two layers share: the gain, γ, ε and the standardized weight."""

    weight: torch.Tensor  # set by nn.Linear / nn.Conv2d, the other base class

    def _init_std(self, nonlinearity: str | float, eps: float, out: int) -> None:
        self.nonlinearity = nonlinearity
        self.gamma = nonlinearity_gain(nonlinearity)
        self.eps = _check_eps(eps)
        if self.weight[0].numel() < 2:
            raise ValueError(f"{type(self).__name__} needs a fan-in of at least 2, got {self.weight[0].numel()}")
        self.gain = nn.Parameter(torch.ones(out, device=self.weight.device, dtype=self.weight.dtype))

    def standardized_weight(self) -> torch.Tensor:
        """Returns Ŵ, the weight the forward pass uses (differentiable in ``weight`` and ``gain``)."""
        return scaled_standardize(self.weight, self.gain, self.gamma, self.eps)

    def _extra(self) -> str:
        return f"nonlinearity={self.nonlinearity!r}, eps={self.eps}"


class ScaledStdLinear(_ScaledStd, nn.Linear):
    """``nn.Linear`` with scaled weight standardization: ``y = x Ŵᵀ + b``.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        nonlinearity: the nonlinearity whose output this layer reads (a name of :data:`NONLINEARITIES` or a
            positive gain); ``'linear'`` (gain 1) for a layer reading the network's input.
        eps: floor of ``N · var`` (default 1e-4, as the reference implementation).

    Attributes:
        gain: ``(out_features,)``, learnable, initialised to 1.
        gamma: the fixed nonlinearity gain.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 nonlinearity: str | float = "relu", eps: float = 1e-4, device=None, dtype=None) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_std(nonlinearity, eps, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns ``x Ŵᵀ + b``."""
        return F.linear(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self._extra()}"


class ScaledStdConv2d(_ScaledStd, nn.Conv2d):
    """``nn.Conv2d`` with scaled weight standardization (each filter standardized over ``in/groups · kh · kw``).

    The arguments are ``nn.Conv2d``'s (``in_channels``, ``out_channels``, ``kernel_size``, ``stride``, ``padding``,
    ``dilation``, ``groups``, ``bias``, ``padding_mode``, ``device``, ``dtype``), plus:

    Args:
        nonlinearity, eps: as :class:`ScaledStdLinear`.

    Attributes:
        gain: ``(out_channels,)``, learnable, initialised to 1.
        gamma: the fixed nonlinearity gain.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True,
                 padding_mode: Literal["zeros", "reflect", "replicate", "circular"] = "zeros", *,
                 nonlinearity: str | float = "relu", eps: float = 1e-4, device=None, dtype=None) -> None:
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                           dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                           device=device, dtype=dtype)
        self._init_std(nonlinearity, eps, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the convolution of ``x`` with Ŵ (and the bias)."""
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{nn.Conv2d.extra_repr(self)}, {self._extra()}"

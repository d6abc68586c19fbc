"""Residual networks without normalization, and the gradient clipping that lets them train fast.

* :func:`adaptive_clip_` and :func:`with_agc` -- adaptive gradient clipping (AGC; Brock, De, Smith &
  Simonyan 2021): each output unit's gradient is clipped relative to the norm of its weights,
  ``G_i ← λ · max(‖W_i‖, ε) / ‖G_i‖ · G_i`` whenever ``‖G_i‖ / max(‖W_i‖, ε) > λ``;
* :class:`ResidualMLP` -- one pre-activation residual network whose ``residual=`` choice replaces batch
  normalization by what each paper proposes: ``'bn'``, ``'none'``, ``'skipinit'`` (De & Smith 2020),
  ``'fixup'`` (Zhang, Dauphin & Ma 2019), ``'nf'`` (Brock, De & Smith 2021, with scaled weight
  standardization from :mod:`bnlib.weight_std`).

The network is fully connected so that deep versions of it train on MNIST on a CPU in seconds; every
variant has the same skeleton -- a linear stem, ``depth`` residual blocks with two linear layers on the
branch, a final ReLU and a linear head -- and differs only in what the paper changes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn

from bnlib.weight_std import ScaledStdLinear

from .models import kaiming_init, make_norm

__all__ = ["RESIDUALS", "adaptive_clip_", "agc_parameters", "unitwise_norm", "with_agc", "ResidualMLP"]

#: The choices of :class:`ResidualMLP`'s ``residual=``, with what a block computes (f: the branch).
RESIDUALS = {
    "bn": "h + f(h), f = Linear(ReLU(BN(Linear(ReLU(BN(h))))))  (pre-activation ResNet)",
    "none": "h + f(h), f = Linear(ReLU(Linear(ReLU(h))))  (He initialization, nothing else)",
    "skipinit": "h + α·f(h), α a learnable scalar initialised to 0 (De & Smith 2020)",
    "fixup": "h + s·f(h) + b, f's last layer zero, the first scaled by depth^(-1/2), scalar biases (Zhang et al. 2019)",
    "nf": "h + α·f(h/β), f with scaled weight standardization, β² = 1 + i·α² tracked analytically (Brock et al. 2021a)",
}


# --------------------------------------------------------------------------
# Adaptive gradient clipping
# --------------------------------------------------------------------------

def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """Norm of each output unit of a parameter, broadcastable against it.

    A weight ``(out, ...)`` has one norm per index of dimension 0 (a row of a linear layer, a filter of a
    convolution), over all its other dimensions; a bias, gain or scalar (at most one dimension) has one per
    element: its absolute value.
    """
    if x.dim() <= 1:
        return x.abs()
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), keepdim=True)


def _check_agc(clipping: float, eps: float) -> None:
    for name, value in (("clipping", clipping), ("eps", eps)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if clipping <= 0:
        raise ValueError(f"clipping (λ) must be > 0, got {clipping!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")


@torch.no_grad()
def adaptive_clip_(parameters: Iterable[torch.Tensor], clipping: float = 0.01, eps: float = 1e-3) -> None:
    """Clip the gradients of ``parameters`` in place, unit by unit (AGC).

    For each output unit ``i`` (see :func:`unitwise_norm`) with weights ``W_i`` and gradient ``G_i``:
    ``max_i = λ · max(‖W_i‖, ε)``; if ``‖G_i‖ > max_i`` then ``G_i ← G_i · max_i / ‖G_i‖``. Parameters
    without a gradient are skipped.

    Args:
        parameters: the parameters to clip (leave out the final linear layer: :func:`agc_parameters`).
        clipping: λ > 0 (0.01 at batch 4096 in NFNets; larger at smaller batches).
        eps: ε >= 0, the floor of ``‖W_i‖`` that lets zero-initialised parameters move (1e-3 in NFNets).
    """
    _check_agc(clipping, eps)
    for p in parameters:
        if p.grad is None:
            continue
        max_norm = clipping * unitwise_norm(p).clamp(min=eps)          # λ · max(‖W_i‖, ε)
        grad_norm = unitwise_norm(p.grad)
        scale = max_norm / grad_norm.clamp(min=1e-6)                     # < 1 exactly where clipping is due
        p.grad.mul_(torch.where(grad_norm > max_norm, scale, torch.ones_like(scale)))


def agc_parameters(model: nn.Module, exclude: Iterable[str] = ("head",)) -> list[nn.Parameter]:
    """The parameters AGC clips: all trainable ones but those of the submodules named in ``exclude``
    (by default ``head``, the final linear layer, which NFNets do not clip).

    Raises ValueError if a name in ``exclude`` is not a submodule of ``model``.
    """
    exclude = tuple(exclude)
    names = dict(model.named_modules())
    missing = [e for e in exclude if e not in names]
    if missing:
        raise ValueError(f"no submodule named {missing} in {type(model).__name__}")
    skip = {id(p) for e in exclude for p in names[e].parameters()}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in skip]


def with_agc(optimizer: torch.optim.Optimizer, parameters: Iterable[torch.Tensor], clipping: float = 0.01,
             eps: float = 1e-3) -> torch.optim.Optimizer:
    """Returns ``optimizer`` with AGC applied to ``parameters`` before each of its steps (a step pre-hook).

    Use it as :func:`bnlib.lab.training.fit`'s optimizer factory, e.g.
    ``optimizer=lambda params: with_agc(torch.optim.SGD(params, lr=0.1, momentum=0.9), agc_parameters(model))``.
    """
    _check_agc(clipping, eps)
    parameters = list(parameters)
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if any(id(p) not in optimized for p in parameters):
        raise ValueError("with_agc: every clipped parameter must be one the optimizer updates")
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: adaptive_clip_(parameters, clipping, eps))
    return optimizer


# --------------------------------------------------------------------------
# The residual network
# --------------------------------------------------------------------------

class _Bias(nn.Module):
    """One learnable scalar added to its input (Fixup's biases), initialised to 0."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


class ResidualBlock(nn.Module):
    """One block of :class:`ResidualMLP`; what it computes depends on ``residual`` (see :data:`RESIDUALS`).

    Attributes:
        branch: ``nn.Sequential``, the residual branch f.
        alpha: the branch's scalar multiplier: a learnable parameter initialised to 0 (``'skipinit'``) or to 1
            (``'fixup'``), the fixed float α (``'nf'``), or None (``'bn'``, ``'none'``).
        beta: ``'nf'`` only: the analytic standard deviation of the block's input, which divides it.
        shift: ``'fixup'`` only: the scalar bias added after the multiplier.
    """

    def __init__(self, width: int, residual: str, alpha: float, expected_var: float) -> None:
        super().__init__()
        self.residual, self.beta, self.shift = residual, None, None
        self.alpha: nn.Parameter | float | None = None
        if residual == "bn":
            self.branch = nn.Sequential(make_norm("bn", width), nn.ReLU(), nn.Linear(width, width, bias=False),
                                        make_norm("bn", width), nn.ReLU(), nn.Linear(width, width))
        elif residual in ("none", "skipinit"):
            self.branch = nn.Sequential(nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
            if residual == "skipinit":
                self.alpha = nn.Parameter(torch.zeros(()))
        elif residual == "fixup":
            # A scalar bias before each activation and each linear layer; the linear layers have none of their own.
            self.branch = nn.Sequential(_Bias(), nn.ReLU(), _Bias(), nn.Linear(width, width, bias=False),
                                        _Bias(), nn.ReLU(), _Bias(), nn.Linear(width, width, bias=False))
            self.alpha, self.shift = nn.Parameter(torch.ones(())), _Bias()
        else:  # "nf": each ScaledStdLinear reads a ReLU, whose gain γ it carries
            self.branch = nn.Sequential(nn.ReLU(), ScaledStdLinear(width, width, nonlinearity="relu"),
                                        nn.ReLU(), ScaledStdLinear(width, width, nonlinearity="relu"))
            self.alpha, self.beta = float(alpha), math.sqrt(expected_var)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Returns the block's output (see :data:`RESIDUALS`)."""
        if self.beta is not None:
            return h + self.alpha * self.branch(h / self.beta)           # h + α·f(h/β)
        f = self.branch(h)
        if self.shift is not None:
            return h + self.shift(self.alpha * f)                        # h + s·f(h) + b
        return h + f if self.alpha is None else h + self.alpha * f


class ResidualMLP(nn.Module):
    """A deep fully connected residual network with a choice of what replaces batch normalization.

    ``x.flatten(1) -> stem -> depth × ResidualBlock -> [BN] -> ReLU -> head``. The stem is a linear layer
    (scaled weight standardization for ``'nf'``), the head a linear layer giving logits. Initialization per
    variant (every other weight He-normal, fan-in, with zero biases):

    * ``'bn'``: BN before each ReLU of the branch and before the final ReLU (pre-activation ResNet);
    * ``'none'``: the same network without BN: the variance of ``h`` doubles with every block;
    * ``'skipinit'``: ``h + α·f(h)`` with a learnable scalar α = 0, so every block is the identity at first;
    * ``'fixup'``: the head and the last layer of each branch zero, the first layer of each branch scaled by
      ``depth^(−1/(2m−2)) = depth^(−1/2)`` (m = 2 layers per branch), a scalar multiplier (1) per branch and
      scalar biases (0) before each linear layer and activation, after the multiplier and before the head;
    * ``'nf'``: ``h + α·f(h/β_i)`` with scaled weight standardization in the branch, α fixed (default 0.2)
      and ``β_i² = 1 + i·α²`` the input variance predicted for block ``i`` (reset to 1 after the stem).

    Args:
        in_features, width, depth, num_classes: sizes (``depth`` residual blocks of ``width`` units).
        residual: a key of :data:`RESIDUALS`.
        alpha: α of ``'nf'`` (ignored otherwise).

    Attributes:
        stem, blocks (``nn.ModuleList`` of :class:`ResidualBlock`), final (``nn.Sequential``), head.
    """

    def __init__(self, in_features: int = 784, width: int = 64, depth: int = 8, num_classes: int = 10,
                 residual: str = "bn", alpha: float = 0.2) -> None:
        super().__init__()
        if residual not in RESIDUALS:
            raise ValueError(f"unknown residual {residual!r}; valid: {', '.join(repr(r) for r in RESIDUALS)}")
        for name, value in (("in_features", in_features), ("width", width), ("depth", depth),
                            ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
        self.residual, self.depth = residual, depth
        self.stem = (ScaledStdLinear(in_features, width, nonlinearity="linear") if residual == "nf"
                     else nn.Linear(in_features, width))
        self.blocks = nn.ModuleList(ResidualBlock(width, residual, alpha, 1.0 + i * alpha ** 2) for i in range(depth))
        final: list[nn.Module] = [make_norm("bn", width)] if residual == "bn" else []
        final.append(nn.ReLU())
        if residual == "fixup":
            final.append(_Bias())
        self.final = nn.Sequential(*final)
        self.head = nn.Linear(width, num_classes)
        kaiming_init(self)
        if residual == "fixup":
            for block in self.blocks:
                first, last = block.branch[3], block.branch[7]
                first.weight.data.mul_(depth ** (-1.0 / (2 * 2 - 2)))    # L^(−1/(2m−2)), m = 2
                nn.init.zeros_(last.weight)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def expected_variances(self) -> list[float]:
        """``'nf'`` only: the analytic variance of the input of each block and of the last block's output,
        ``[1, 1 + α², ..., 1 + depth·α²]``."""
        if self.residual != "nf":
            raise ValueError(f"expected_variances is the analytic variance of 'nf', not of {self.residual!r}")
        alpha = self.blocks[0].alpha
        return [1.0 + i * alpha ** 2 for i in range(self.depth + 1)]

    def hidden(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Returns ``[h_0, ..., h_depth]``: the stem's output and the output of every block."""
        hs = [self.stem(x.flatten(1))]
        for block in self.blocks:
            hs.append(block(hs[-1]))
        return hs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the logits, shape ``(N, num_classes)``."""
        h = self.stem(x.flatten(1))
        for block in self.blocks:
            h = block(h)
        return self.head(self.final(h))

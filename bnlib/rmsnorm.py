r"""Root Mean Square Layer Normalization (Zhang & Sennrich 2019), a drop-in for :class:`torch.nn.RMSNorm`.

RMSNorm is LayerNorm without the re-centering: each example is divided by the root mean square of its
own features over the normalized dimensions, then scaled by a learned γ,

.. math::
    y_i = \frac{x_i}{\sqrt{\frac{1}{n}\sum_{j=1}^{n} x_j^2 + \epsilon}}\;\gamma_i .

Like LayerNorm it is a per-example (per-token) operation: nothing depends on the rest of the batch, there
are no running statistics, and training and evaluation compute the same thing. It equals LayerNorm without
β when the features have mean 0, and it is invariant to re-scaling its input, not to shifting it.

Where ε goes differs between implementations, which matters for small activations:

* torch.nn.RMSNorm (and this module) adds ε to the mean square, inside the root:
  :math:`x / \sqrt{\overline{x^2} + \epsilon}`; with ``eps=None`` ε is the machine epsilon of the
  computation dtype (float32 for float16/bfloat16/float32 inputs, float64 for float64).
* LLaMA's reference code computes ``x * rsqrt(mean(x**2) + eps)`` in float32 with ``eps=1e-5``: the same
  placement, another default.
* The paper's authors' PyTorch code adds ε (1e-8) to the RMS, outside the root:
  :math:`x / (\sqrt{\overline{x^2}} + \epsilon)`. For the same number ε the two differ most when the RMS is
  near :math:`\sqrt{\epsilon}`; ported weights should carry the convention with them.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .core import apply_affine, check_tensor, to_stat_dtype

__all__ = ["RMSNorm"]

_ShapeLike = int | Sequence[int] | torch.Size


class RMSNorm(nn.Module):
    r"""Root Mean Square Layer Normalization, same interface and results as :class:`torch.nn.RMSNorm`.

    Args:
        normalized_shape: the trailing shape to normalize over (an int means the last dimension).
        eps: ε added to the mean square, inside the square root. Default ``None``: the machine epsilon
            of the dtype the statistics are computed in, ``torch.finfo(torch.float32).eps`` for
            float16/bfloat16/float32 inputs and ``torch.finfo(torch.float64).eps`` for float64.
        elementwise_affine: learn ``weight`` (γ, init 1) of shape ``normalized_shape``. There is no β.
        device, dtype: where and in which dtype to create the parameter.

    float16/bfloat16 inputs are normalized and scaled in float32 and the output is cast back to the input's
    dtype, as torch does. See the module docstring for where other implementations put ε.
    """

    def __init__(self, normalized_shape: _ShapeLike, eps: float | None = None, elementwise_affine: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        shape: Sequence[int] = ((int(normalized_shape),) if isinstance(normalized_shape, (int, numbers.Integral))
                                else normalized_shape)
        self.normalized_shape = tuple(int(s) for s in shape)
        if not self.normalized_shape or any(s < 1 for s in self.normalized_shape):
            raise ValueError(f"RMSNorm expected a non-empty normalized_shape of positive sizes, "
                             f"got {self.normalized_shape}")
        if eps is not None and not eps >= 0:
            raise ValueError(f"RMSNorm expected eps >= 0 or None, got {eps}")
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            nn.init.ones_(self.weight)

    def forward(self, input: Tensor) -> Tensor:
        check_tensor(type(self).__name__, input)
        k = len(self.normalized_shape)
        if input.dim() < k or tuple(input.shape[input.dim() - k:]) != self.normalized_shape:
            expected = ", ".join(["*"] + [str(s) for s in self.normalized_shape])
            raise ValueError(f"RMSNorm: given normalized_shape={list(self.normalized_shape)}, expected input with "
                             f"shape [{expected}], but got input of size {list(input.shape)}")
        xs = to_stat_dtype(input)  # float32 for float16/bfloat16 (torch's opmath type)
        eps = torch.finfo(xs.dtype).eps if self.eps is None else self.eps
        dims = list(range(input.dim() - k, input.dim()))
        ms = xs.pow(2).mean(dims, keepdim=True)  # mean square  (1/n) Σ x_j²  per example
        xhat = xs * torch.rsqrt(ms + eps)  # x̂ = x / √(mean square + ε)
        return apply_affine(xhat, self.weight, None, self.normalized_shape).to(input.dtype)  # y = γ ⊙ x̂

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"

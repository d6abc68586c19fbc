r"""Batch Normalization as a function of tensors, with a hand-written backward pass.

:func:`batch_norm` has exactly the signature and semantics of :func:`torch.nn.functional.batch_norm`
but is written in plain tensor operations, so that every step can be read (chapter *The algorithm*,
``chapters/algorithm.ipynb``). In training mode it calls :class:`BatchNormFunction`, a
:class:`torch.autograd.Function` whose backward is the closed form

.. math::
    \frac{\partial L}{\partial x} = \frac{\gamma}{\sqrt{\sigma_B^2+\epsilon}}
    \Big(g - \overline{g} - \hat x\,\overline{g\hat x}\Big),
    \qquad \overline{\,\cdot\,} = \text{mean over the } m \text{ values of a channel},

which needs just two reductions (:math:`\sum g` and :math:`\sum g\hat x`) instead of the dozen
nodes autograd would record. When a graph of the backward itself is requested
(``create_graph=True``), the backward is computed in differentiable operations instead, so double
backward works.

Numerics:

* the statistics come from the *corrected two-pass* algorithm (Chan, Golub & LeVeque, 1983): a first
  reduction gives a per-channel shift :math:`K \approx \mu_B` (the float mean); the data are
  centred, :math:`d = x - K`, and a second pass gives :math:`\delta = \overline{d}` and
  :math:`\overline{d^2}`, so :math:`\mu_B = K + \delta` and :math:`\sigma_B^2 = \overline{d^2} -
  \delta^2`. Since :math:`\delta` is tiny, nothing cancels; the textbook
  :math:`E[x^2]-E[x]^2` on the raw data is never used (it loses every digit when
  :math:`|\mu| \gg \sigma`, e.g. ``1e3 + 0.01 * noise`` in float32);
* for the same reason the output is computed from the centred data, :math:`y = (d-\delta)\,
  \gamma/\sqrt{\sigma_B^2+\epsilon} + \beta`, not as :math:`x\cdot s + t` (where the two large terms
  would cancel), and the backward's :math:`\sum g\,(x-\mu_B)` as :math:`\sum g\,d - \delta\sum g`,
  not as :math:`\sum g x - \mu_B \sum g`;
* float16 and bfloat16 inputs are normalized with float32 statistics and the result is returned in
  the input's dtype, as cuDNN and PyTorch do;
* the output has the memory format torch.nn gives it (channels-last stays channels-last).

Speed: on a CPU, a fresh full-size tensor costs more than a whole pass over one already allocated
(the operating system must hand over and zero its pages). So each pass writes into the one buffer
that must be allocated anyway: the output ``y`` in the forward, ``dx`` in the backward, used as
scratch space before it receives the result. Per-channel reductions are cheap. ``python -m
bnlib.lab.bench`` compares the speed with torch.nn's C++ kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["batch_norm", "BatchNormFunction", "check_bn_input"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _reduce_dims(x: Tensor) -> list[int]:
    """Every dimension but the channel dimension 1."""
    return [0] + list(range(2, x.dim()))


def _channel_shape(x: Tensor) -> list[int]:
    """Shape ``(1, C, 1, ...)`` that broadcasts a per-channel vector against ``x``."""
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def check_bn_input(input: Tensor, training: bool, **per_channel: Tensor | None) -> None:
    """Raise a clear error when ``input`` cannot be batch-normalized.

    Checks that ``input`` is ``(N, C, *)`` with a floating dtype, that every per-channel tensor given
    by keyword (e.g. ``weight=...``) has exactly ``C`` elements, and in training mode that each
    channel has more than one value to compute a variance from.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"expected input to be a torch.Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(f"expected input of shape (N, C, *) with at least 2 dimensions, got shape {tuple(input.shape)}")
    if not input.is_floating_point():
        raise TypeError(f"expected a floating-point input, got dtype {input.dtype}")
    C = input.shape[1]
    for name, t in per_channel.items():
        if t is not None and t.numel() != C:
            raise ValueError(
                f"expected {name} to have one value per channel, i.e. {C} elements for input of shape "
                f"{tuple(input.shape)} (channels in dim 1), got {t.numel()}"
            )
    if training and input.numel() // max(C, 1) <= 1:
        raise ValueError(
            f"expected more than 1 value per channel when training, got input of shape {tuple(input.shape)}: "
            "batch statistics need at least two values per channel (use eval() for single examples)"
        )


def _stat_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the statistics and of the arithmetic: float32 for half-precision inputs."""
    return torch.float32 if x.dtype in _LOW_PRECISION else x.dtype


def _memory_format(x: Tensor) -> torch.memory_format:
    """The memory format of torch.nn's output for ``x``: channels-last when ``x``'s strides are ordered
    like channels-last (ATen's ``suggest_memory_format``), else contiguous."""
    if x.dim() not in (4, 5) or x.is_contiguous():
        return torch.contiguous_format
    order = (1, 3, 2, 0) if x.dim() == 4 else (1, 4, 3, 2, 0)  # innermost to outermost: C, W, H, (D,) N
    size, stride = x.shape, x.stride()
    smallest = 0
    for d in order:
        if size[d] == 0 or stride[d] < smallest or stride[1] == 0 or (d == 0 and smallest == stride[1]):
            return torch.contiguous_format
        smallest = stride[d] * size[d] if size[d] > 1 else stride[d]
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def _buffer_like(x: Tensor) -> Tensor:
    """An uninitialised tensor shaped like ``x``, in the dtype of the statistics and torch.nn's layout."""
    return torch.empty_like(x, dtype=_stat_dtype(x), memory_format=_memory_format(x))


def _sum_of_squares(d: Tensor, x: Tensor, shift: Tensor, dims: list[int]) -> Tensor:
    """Σ d² per channel (shape ``(1, C, 1, ...)``) of the centred buffer ``d = x − shift``.

    ``d`` is left holding ``x − shift``. In the ``(N, C, L)`` layout (contiguous, with spatial
    dimensions) a fused norm kernel reduces each contiguous row; other layouts square ``d`` in place,
    reduce, and centre ``x`` into it again, which is cheaper than a full-size temporary.
    """
    if d.dim() > 2 and d.is_contiguous():
        rows = torch.linalg.vector_norm(d.view(d.shape[0], d.shape[1], -1), dim=2)  # √(Σ_l d²) per (n, c)
        return rows.square_().sum(0).view(_channel_shape(d))  # Σ_n Σ_l d²
    sum_sq = d.square_().sum(dims, keepdim=True)  # Σ d²
    torch.sub(x, shift, out=d)  # d = x − K again
    return sum_sq


class BatchNormFunction(torch.autograd.Function):
    """Training-mode BN: forward with batch statistics, closed-form backward.

    ``forward(x, weight, bias, eps)`` returns ``(y, mean, var)`` where ``mean`` and the *biased*
    ``var`` are the batch statistics per channel (float32 or float64), non-differentiable, returned
    so the caller can update running statistics without computing them twice. ``weight`` and
    ``bias`` may be ``None``.

    Besides the one unavoidable new tensor per pass (``y``, then ``dx``), which is also the scratch
    space, every step is a per-channel reduction or an in-place operation on it. Forward: Σx;
    ``d = x − K`` into ``y``; Σd, Σd²; ``y = d·scale + offset``. Backward: Σg; ``d`` into ``dx``;
    Σ g·d; ``dx = b·d + c + a·g``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        dims, shape = _reduce_dims(x), _channel_shape(x)
        m = x.numel() // x.shape[1]  # values per channel
        # 1. Shift K ≈ μ_B per channel: the plain mean, one cheap reduction.
        shift = x.sum(dims, keepdim=True, dtype=_stat_dtype(x)).div_(m)  # K = Σx / m
        # 2. Centre into the output buffer (exact when x ≈ K, e.g. with a large offset).
        y = _buffer_like(x)
        torch.sub(x, shift, out=y)  # d = x − K
        # 3. Second pass: mean and mean square of the centred data.
        delta = y.sum(dims, keepdim=True).div_(m)  # δ = mean(d) = μ_B − K, tiny
        mean_sq = _sum_of_squares(y, x, shift, dims).div_(m)  # mean(d²)
        var = torch.addcmul(mean_sq, delta, delta, value=-1).clamp_min_(0)  # σ²_B = mean(d²) − δ²
        rstd = var.add(eps).rsqrt_()  # 1 / √(σ²_B + ε)
        # 4. y = γ (d − δ) / √(σ²_B + ε) + β  =  d·scale + (β − δ·scale), in place.
        scale = rstd if weight is None else rstd * weight.view(shape)  # γ / √(σ²_B + ε)
        if bias is None:
            offset = (delta * scale).neg_()  # −δ·scale
        else:
            offset = torch.addcmul(bias.view(shape), delta, scale, value=-1)  # β − δ·scale
        y.mul_(scale).add_(offset)  # y = d·scale + (β − δ·scale)
        ctx.eps = eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, shift, delta, rstd)
        mean = shift + delta  # μ_B = K + δ
        ctx.mark_non_differentiable(mean, var)
        return y.to(x.dtype), mean.view(-1), var.view(-1)

    @staticmethod
    def backward(ctx, dy: Tensor, _dmean, _dvar):
        x, weight, shift, delta, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a backward that is itself differentiable
            return _differentiable_backward(ctx, x, weight, dy)
        dims, shape = _reduce_dims(x), _channel_shape(x)
        m = x.numel() // x.shape[1]
        # 1. The two reductions, Σg and Σ g x̂ (with x − μ_B = d − δ, both small: no cancellation).
        sum_g = dy.sum(dims, keepdim=True, dtype=rstd.dtype)  # Σ g       = ∂L/∂β
        dx = _buffer_like(x)  # scratch space now, ∂L/∂x at the end
        torch.sub(x, shift, out=dx)  # d = x − K
        sum_gd = dx.mul_(dy).sum(dims, keepdim=True)  # Σ g·d
        sum_gxhat = torch.addcmul(sum_gd, delta, sum_g, value=-1).mul_(rstd)  # Σ g x̂ = (Σ g·d − δ Σg) / √(σ²+ε) = ∂L/∂γ
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # 2. ∂L/∂x = a·(g − Σg/m − x̂ Σgx̂/m) with a = γ/√(σ²+ε) and x̂ = (d − δ)/√(σ²+ε)
            #          = a·g + b·d + c  with  b = −a Σgx̂ / (m √(σ²+ε)),  c = −a Σg/m − b δ.
            a = rstd if weight is None else rstd * weight.view(shape)
            b = a * rstd * sum_gxhat * (-1.0 / m)
            c = torch.addcmul(a * sum_g * (-1.0 / m), b, delta, value=-1)
            torch.sub(x, shift, out=dx)  # d = x − K again
            grad_x = dx.mul_(b).add_(c).addcmul_(dy, a).to(x.dtype)  # b·d + c + a·g, in place
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = sum_gxhat.view(-1).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = sum_g.view(-1).to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias, None


def _differentiable_backward(ctx, x: Tensor, weight: Tensor | None, dy: Tensor):
    """The closed-form backward in plain differentiable operations, for double backward.

    The statistics are recomputed from ``x`` (two-pass) so that the graph of this backward reaches
    ``x``; slower than :meth:`BatchNormFunction.backward`, used only with ``create_graph=True``.
    """
    dims, shape = _reduce_dims(x), _channel_shape(x)
    xs, g = x.to(_stat_dtype(x)), dy.to(_stat_dtype(x))
    mean = xs.mean(dims, keepdim=True)  # μ_B
    xc = xs - mean  # x − μ_B
    rstd = torch.rsqrt((xc * xc).mean(dims, keepdim=True) + ctx.eps)  # 1 / √(σ²_B + ε)
    xhat = xc * rstd  # x̂
    mean_g = g.mean(dims, keepdim=True)  # Σg / m
    mean_gxhat = (g * xhat).mean(dims, keepdim=True)  # Σ g x̂ / m
    grad_x = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        a = rstd if weight is None else rstd * weight.view(shape)  # γ / √(σ²_B + ε)
        grad_x = (a * (g - mean_g - xhat * mean_gxhat)).to(x.dtype)  # a (g − ḡ − x̂ · mean(g x̂))
    m = x.numel() // x.shape[1]
    if weight is not None and ctx.needs_input_grad[1]:
        grad_weight = (mean_gxhat * m).view(-1).to(weight.dtype)  # Σ g x̂
    if ctx.needs_input_grad[2]:
        grad_bias = (mean_g * m).view(-1).to(ctx.bias_dtype)  # Σ g
    return grad_x, grad_weight, grad_bias, None


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Batch Normalization with the semantics of :func:`torch.nn.functional.batch_norm`.

    Args:
        input: ``(N, C)`` or ``(N, C, *spatial)``; statistics are per channel (dim 1).
        running_mean, running_var: population estimates of shape ``(C,)``, or ``None``. In training
            mode they are updated in place,
            ``running = (1 - momentum) * running + momentum * batch``, with the *unbiased* batch
            variance (:math:`\frac{m}{m-1}\sigma_B^2`, Algorithm 2). In evaluation mode they are
            used to normalize and must be given.
        weight, bias: :math:`\gamma` and :math:`\beta` of shape ``(C,)``, or ``None`` (1 and 0).
        training: use batch statistics (``True``) or the running ones (``False``).
        momentum: weight of the new batch in the running averages (PyTorch's convention).
        eps: :math:`\epsilon` added to the variance.

    Returns:
        A tensor of the same shape and dtype as ``input``, in torch.nn's memory format: channels-last
        stays channels-last, any other strides give a contiguous result.
    """
    check_bn_input(input, training, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    if training:
        if not eps > 0:  # a constant channel would give 0/0 (torch.nn refuses it too)
            raise ValueError(f"expected eps > 0 when training (a constant channel has zero variance), got {eps!r}")
        y, mean, var = BatchNormFunction.apply(input, weight, bias, eps)
        if running_mean is not None or running_var is not None:
            m = input.numel() // input.shape[1]
            with torch.no_grad():
                if running_mean is not None:
                    running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                if running_var is not None:
                    # Var[x] estimate: the unbiased m/(m−1)·σ²_B, the factor folded into the weight
                    running_var.mul_(1 - momentum).add_(var.to(running_var.dtype), alpha=momentum * m / (m - 1))
        return y

    if running_mean is None or running_var is None:
        raise ValueError("expected running_mean and running_var in evaluation mode (training=False), got None")
    # Inference (Algorithm 2): a fixed affine map, y = (x − E[x])·γ/√(Var[x]+ε) + β. Subtracting E[x]
    # first (rather than x·s + (β − s E[x])) keeps the digits of x when |E[x]| ≫ √Var[x].
    shape, dtype = _channel_shape(input), _stat_dtype(input)
    scale = torch.rsqrt(running_var.to(dtype) + eps)  # 1 / √(Var[x] + ε)
    if weight is not None:
        scale = scale * weight  # γ / √(Var[x] + ε)
    y = input.to(dtype) - running_mean.to(dtype).view(shape)  # x − E[x]
    if bias is None:
        y = y * scale.view(shape)  # · γ / √(Var[x] + ε)
    else:
        y = torch.addcmul(bias.view(shape), y, scale.view(shape))  # · γ / √(Var[x] + ε) + β
    # torch.nn's layout (channels-last stays channels-last, other strides become contiguous).
    return y.to(input.dtype).contiguous(memory_format=_memory_format(input))

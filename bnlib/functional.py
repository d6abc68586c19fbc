r"""Batch Normalization as a function of tensors, with a hand-written backward pass.

:func:`batch_norm` has the signature and semantics of :func:`torch.nn.functional.batch_norm` but is written
in plain tensor operations, so that every step can be read (chapter *The algorithm*,
``chapters/algorithm.ipynb``). Per channel, over the :math:`m` values of the batch (``N`` times the spatial
size), training mode computes

.. math::
    \mu_B = \overline{x}, \qquad \sigma_B^2 = \overline{(x-\mu_B)^2}, \qquad
    y = \gamma\,\frac{x-\mu_B}{\sqrt{\sigma_B^2+\epsilon}} + \beta,
    \qquad \overline{\,\cdot\,} = \text{mean over the } m \text{ values of a channel},

in :class:`BatchNormFunction`, a :class:`torch.autograd.Function` whose backward is the closed form

.. math::
    \frac{\partial L}{\partial x} = \frac{\gamma}{\sqrt{\sigma_B^2+\epsilon}}
    \Big(g - \overline{g} - \hat x\,\overline{g\hat x}\Big), \qquad
    \frac{\partial L}{\partial \gamma} = \textstyle\sum g\hat x, \qquad \frac{\partial L}{\partial \beta} = \sum g,

which needs two reductions (:math:`\sum g` and :math:`\sum g\hat x`) instead of the dozen nodes autograd would
record. When a graph of the backward itself is requested (``create_graph=True``), the backward is computed in
differentiable operations instead (:func:`_differentiable_backward`), so double backward works. Evaluation mode
is the fixed affine map of Algorithm 2, :math:`y = (x - E[x])\,\gamma/\sqrt{\mathrm{Var}[x]+\epsilon} + \beta`.

Numerics:

* the statistics come from the *corrected two-pass* algorithm (Chan, Golub & LeVeque, 1983): a first reduction
  gives a per-channel shift :math:`K \approx \mu_B` (the float mean, summed pairwise); the data are centred,
  :math:`d = x - K` (exact, since :math:`x` and :math:`K` are close), and a second pass gives
  :math:`\delta = \overline{d} = \mu_B - K`, what the rounding of :math:`K` left (up to an ulp of
  :math:`|\mu_B|`, which for ``1e3 + 0.01 * noise`` in float32 is 0.6 % of :math:`\sigma_B`), and
  :math:`\sigma_B^2 = \overline{(d-\delta)^2}`. Nothing cancels; the textbook :math:`E[x^2]-E[x]^2` on the raw
  data is never used (it loses every digit when :math:`|\mu| \gg \sigma`). Where :math:`d` is kept for the
  backward, :math:`\delta` is subtracted from it once (:math:`d \leftarrow d - \delta = x - \mu_B`); where it is
  not, :math:`\delta` enters the formulas: :math:`\sigma_B^2 = \overline{d^2} - \delta^2`;
* for the same reason the output is computed from the centred data, :math:`y = (d-\delta)\,
  \gamma/\sqrt{\sigma_B^2+\epsilon} + \beta`, not as :math:`x\cdot s + t` (where the two large terms would
  cancel), and the backward's :math:`\sum g\,(x-\mu_B)` as :math:`\sum g\,(d - \delta)`;
* the mean returned (and averaged into ``running_mean``) is :math:`K`, :math:`\mu_B` to the precision of a float;
* float16 and bfloat16 inputs are normalized with float32 statistics and the result is returned in the input's
  dtype, as cuDNN and PyTorch do.

Behaviour shared with torch.nn 2.13 beyond the formulas: an empty batch (``N = 0`` or a zero spatial size) gives
an empty output and leaves the running statistics untouched; ``eps`` must be positive in training and
non-negative in evaluation (``ValueError`` at the call, not at construction); a channel holding ``+inf`` gets
``mean = inf`` and ``var = nan`` (so ``running_mean`` becomes ``inf``, ``running_var`` and that channel's output
NaN); the output has torch.nn's memory format (channels-last stays channels-last).

Validation happens once per call: :func:`batch_norm` checks its arguments with :func:`check_bn_input`, then runs
the unchecked :func:`_batch_norm`, which the modules call directly after checking their own input.

Speed. Everything is computed from ordinary tensor operations; torch's own batch-norm kernels
(``torch.batch_norm``, ``native_batch_norm``, cuDNN's) are never called. The tricks that make the eager path fast
are kept out of the math, in the helpers at the end of the file, each saying why:

* every reduction runs over the layout ATen reduces fastest (:func:`_rows`: a contiguous ``(N, C, H, W)`` is
  reduced row by row, then over ``N``, several times faster than one reduction over ``(0, 2, 3)``; wide
  ``(N, C)`` sums that cannot cancel are one matrix–vector product, :func:`_columns`);
* inputs below 4 MiB keep :math:`d = x - \mu_B` for the backward (:func:`_keeps_centred`), which then needs
  no recentring; larger ones keep only ``x``, as torch.nn, and each pass writes into the one buffer that must be
  allocated anyway (the output ``y`` in the forward, ``dx`` in the backward), since a fresh full-size tensor
  costs more than a pass over one already allocated;
* those large buffers are taken in 2 MiB pages (:func:`_empty`): a fresh 32 MB tensor in 4 KiB pages costs
  8192 page faults, more than the arithmetic;
* at an MLP's sizes the cost is the number of calls into torch, not the bytes: no call is made that changes
  nothing (:func:`_as`, :func:`_flat`), numbers are cached 0-dimensional tensors (:func:`_constant`), the gradients
  of the two statistics outputs are not materialized as zero tensors, and the two running averages are updated
  by one call (plus one for the unbiased variance).

``python -m bnlib.lab.bench`` compares the speed with torch.nn's C++ kernels.
"""

from __future__ import annotations

import functools

import numpy
import torch
from torch import Tensor

__all__ = ["BatchNormFunction", "batch_norm", "check_bn_input"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_KEEP_BYTES = 4 * 2**20  # see _keeps_centred
_HUGE_PAGE_BYTES = 4 * 2**20  # see _empty


# ----------------------------------------------------------------------------------------------
# The closed form: training-mode forward and backward
# ----------------------------------------------------------------------------------------------

class BatchNormFunction(torch.autograd.Function):
    """Training-mode BN: forward with batch statistics, closed-form backward.

    ``forward(x, weight, bias, eps)`` returns ``(y, mean, var)`` where ``mean`` and the *biased* ``var`` are the
    batch statistics per channel (float32 or float64), non-differentiable, returned so the caller can update
    running statistics without computing them twice. ``weight`` and ``bias`` may be ``None``. ``x`` must have
    at least one value per channel (the empty batch is handled by :func:`_batch_norm`).

    Per-channel quantities have the shape that broadcasts against ``x`` (:func:`_per_channel`), and every sum
    or mean is over the ``m`` values of a channel (:func:`_channel_sum`).
    """

    @staticmethod
    def forward(ctx, input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        x = _as(input, _stat_dtype(input))  # float32 for half-precision input, converted once
        m = x.numel() // x.shape[1]
        inv_m = _constant(1.0 / m, x)
        shift = _channel_sum(x, pairwise=True).mul_(inv_m)  # K = mean(x) ≈ μ_B, within an ulp or two of |μ_B|
        d = _centred_buffer(x, shift)  # d = x − K (exact: x and K are close)
        sum_d = _channel_sum(d)  # Σd = m·δ with δ = μ_B − K, what the rounding of K left
        keep = _keeps_centred(d)  # keep d for the backward (y gets a buffer of its own), or turn d into y
        if keep:
            d.sub_(sum_d, alpha=1.0 / m)  # d = x − μ_B = (x − K) − δ: centred to the last digit, so δ is 0 below
            delta = None
        else:
            delta = sum_d.mul_(inv_m)  # δ, used in the formulas below (no extra pass over d)
        sum_sq, y = _channel_sum_of_squares(d, x, shift, keep)  # Σ d², and a full-size buffer free for y (or None)
        var = sum_sq.mul_(inv_m)  # mean(d²)
        if delta is not None:
            var.addcmul_(delta, delta, value=-1).clamp_min_(0)  # σ²_B = mean(d²) − δ²
        rstd = var.add(_constant(eps, var)).rsqrt_()  # 1 / √(σ²_B + ε)
        scale = rstd if weight is None else rstd * _per_channel(weight, x)  # γ / √(σ²_B + ε)
        # y = γ (x − μ_B) / √(σ²_B + ε) + β = (d − δ)·scale + β
        if delta is not None:
            offset = torch.mul(delta, scale).neg_() if bias is None else torch.addcmul(
                _per_channel(bias, x), delta, scale, value=-1)  # β − δ·scale
        else:
            offset = None if bias is None else _per_channel(bias, x)
        y = _affine(d, scale, offset, out=y)  # d·scale + offset
        ctx.eps = eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(input, weight, shift, delta, rstd, scale, d if keep else None)
        ctx.set_materialize_grads(False)  # no zero tensors for the gradients of mean and var (never used)
        mean_out, var_out = _flat(shift), _flat(var)  # (C,), as returned; μ_B ≈ K to the precision of a float
        ctx.mark_non_differentiable(mean_out, var_out)
        return _as(y, input.dtype), mean_out, var_out

    @staticmethod
    def backward(ctx, dy: Tensor | None, _dmean, _dvar):
        x, weight, shift, delta, rstd, scale, d = ctx.saved_tensors
        if dy is None:  # y took no part in the loss
            return None, None, None, None
        if torch.is_grad_enabled():  # create_graph=True: a backward that is itself differentiable
            return _differentiable_backward(ctx, x, weight, dy)
        input_dtype = x.dtype
        x, dy = _as(x, shift.dtype), _as(dy, shift.dtype)  # float32 for half precision, converted once
        # The two reductions Σg and Σ g x̂ with x̂ = (x − μ_B) / √(σ²_B + ε), from centred data (no cancellation).
        sum_g = _channel_sum(dy)  # Σg = ∂L/∂β
        if d is not None:  # d = x − μ_B kept by the forward: read only (the graph may be run again)
            grad_x = d * dy  # g·d, in the buffer that becomes ∂L/∂x
            sum_gd = _channel_sum(grad_x)  # Σ g·(x − μ_B)
        else:  # d = x − K again, in the buffer that becomes ∂L/∂x; x − μ_B = d − δ
            d = grad_x = _centred_buffer(x, shift)
            sum_gd = _channel_sum_of_products(d, dy, x, shift).addcmul_(delta, sum_g, value=-1)  # Σ g·d − δ Σg
        sum_gxhat = sum_gd.mul_(rstd)  # Σ g x̂ = ∂L/∂γ
        grad_weight = grad_bias = None
        if not ctx.needs_input_grad[0]:
            grad_x = None
        else:
            # ∂L/∂x = a·(g − Σg/m − x̂ Σgx̂/m) with a = γ/√(σ²_B+ε) (the forward's scale), x̂ = (d − δ)/√(σ²_B+ε)
            #       = a·g + b·d + c  with  b = −a Σgx̂ / (m √(σ²_B+ε)),  c = −a Σg/m − b δ.
            a = scale
            minus_a_over_m = a * _constant(-x.shape[1] / x.numel(), a)
            b = torch.mul(minus_a_over_m, rstd).mul_(sum_gxhat)
            c = minus_a_over_m.mul_(sum_g)
            if delta is not None:
                c.addcmul_(b, delta, value=-1)
            grad_x = _as(_affine(d, b, c, out=grad_x).addcmul_(dy, a), input_dtype)  # b·d + c + a·g
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = _as(_flat(sum_gxhat), weight.dtype)  # ∂L/∂γ = Σ g x̂
        if ctx.needs_input_grad[2]:
            grad_bias = _as(_flat(sum_g), ctx.bias_dtype)  # ∂L/∂β = Σg
        return grad_x, grad_weight, grad_bias, None


def _differentiable_backward(ctx, x: Tensor, weight: Tensor | None, dy: Tensor):
    """The closed-form backward in plain differentiable operations, for double backward.

    The statistics are recomputed from ``x`` (two-pass) so that the graph of this backward reaches ``x``; slower
    than :meth:`BatchNormFunction.backward`, used only with ``create_graph=True``.
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


def _autograd_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                      eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """The training-mode forward in differentiable operations (autograd derives the backward).

    Used where :class:`BatchNormFunction` cannot run: in TorchScript, which cannot compile a Python
    ``autograd.Function``. Same ``(y, mean, var)`` as :meth:`BatchNormFunction.forward`, to float tolerance.
    """
    dims, shape = _reduce_dims(x), _channel_shape(x)
    xs = x.to(_stat_dtype(x))
    var, mean = torch.var_mean(xs, dims, correction=0, keepdim=True)  # σ²_B, μ_B (a stable two-pass kernel)
    scale = torch.rsqrt(var + eps)  # 1 / √(σ²_B + ε)
    if weight is not None:
        scale = scale * weight.view(shape)  # γ / √(σ²_B + ε)
    y = (xs - mean) * scale  # γ (x − μ_B) / √(σ²_B + ε)
    if bias is not None:
        y = y + bias.view(shape)  # + β
    return _in_torch_layout(y.to(x.dtype), x), mean.detach().view(-1), var.detach().view(-1)


# ----------------------------------------------------------------------------------------------
# The function: training (batch statistics, running averages) and evaluation (running statistics)
# ----------------------------------------------------------------------------------------------

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
        running_mean, running_var: population estimates of shape ``(C,)``, or ``None``. In training mode they
            are updated in place, ``running = (1 - momentum) * running + momentum * batch``, with the *unbiased*
            batch variance (:math:`\frac{m}{m-1}\sigma_B^2`, Algorithm 2). In evaluation mode they are used to
            normalize and must be given.
        weight, bias: :math:`\gamma` and :math:`\beta` of shape ``(C,)``, or ``None`` (1 and 0).
        training: use batch statistics (``True``) or the running ones (``False``).
        momentum: weight of the new batch in the running averages (PyTorch's convention).
        eps: :math:`\epsilon` added to the variance; positive in training, non-negative in evaluation.

    Returns:
        A tensor of the same shape and dtype as ``input``, in torch.nn's memory format: channels-last stays
        channels-last, any other strides give a contiguous result.
    """
    check_bn_input(input, training, eps, running_mean=running_mean, running_var=running_var, weight=weight,
                   bias=bias)
    if not training and (running_mean is None or running_var is None):
        raise ValueError("expected running_mean and running_var in evaluation mode (training=False), got None")
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
                bias: Tensor | None, training: bool, momentum: float, eps: float) -> Tensor:
    """:func:`batch_norm` on arguments already checked (the modules check their own input, once)."""
    if not training:
        assert running_mean is not None and running_var is not None
        return _inference(input, running_mean, running_var, weight, bias, eps)
    if input.numel() == 0:  # an empty batch: nothing to normalize, no statistics to learn from (as torch.nn)
        return _empty_batch(input, weight, bias)
    if torch.jit.is_scripting():
        y, mean, var = _autograd_forward(input, weight, bias, eps)
    else:
        y, mean, var = BatchNormFunction.apply(input, weight, bias, eps)
    m = input.numel() // input.shape[1]
    if (running_mean is not None and running_mean.requires_grad) or (running_var is not None
                                                                      and running_var.requires_grad):
        with torch.no_grad():
            _update_running_stats(running_mean, running_var, mean, var, m, momentum)
    else:  # the statistics are not differentiable: no graph is recorded (and no context is needed)
        _update_running_stats(running_mean, running_var, mean, var, m, momentum)
    return y


def _update_running_stats(running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor, var: Tensor,
                          m: int, momentum: float) -> None:
    """running ← (1 − momentum)·running + momentum·batch, the variance unbiased: m/(m−1)·σ²_B (Algorithm 2)."""
    if running_mean is not None and running_var is not None and not torch.jit.is_scripting():
        # Both averages in one call (one kernel launch fewer), then the variance's unbiasing term:
        # lerp(v, σ², w) + w·(m/(m−1) − 1)·σ² = (1 − w)·v + w·m/(m−1)·σ².
        var = _as(var, running_var.dtype)
        torch._foreach_lerp_([running_mean, running_var], [_as(mean, running_mean.dtype), var], momentum)
        running_var.add_(var, alpha=momentum * (m / (m - 1) - 1))
        return
    if running_mean is not None:
        running_mean.lerp_(_as(mean, running_mean.dtype), momentum)
    if running_var is not None:
        running_var.lerp_(_as(var, running_var.dtype) * (m / (m - 1)), momentum)


def _inference(input: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None,
               bias: Tensor | None, eps: float) -> Tensor:
    """Algorithm 2: the fixed affine map y = (x − E[x])·γ/√(Var[x]+ε) + β.

    Subtracting E[x] first (rather than x·s + (β − s E[x])) keeps the digits of x when |E[x]| ≫ √Var[x].
    """
    shape, dtype = _channel_shape(input), _stat_dtype(input)
    scale = torch.rsqrt(running_var.to(dtype) + eps)  # 1 / √(Var[x] + ε)
    if weight is not None:
        scale = scale * weight  # γ / √(Var[x] + ε)
    y = input.to(dtype) - running_mean.to(dtype).view(shape)  # x − E[x]
    if bias is None:
        y = y * scale.view(shape)  # · γ / √(Var[x] + ε)
    else:
        y = torch.addcmul(bias.view(shape), y, scale.view(shape))  # · γ / √(Var[x] + ε) + β
    return _in_torch_layout(y.to(input.dtype), input)


def _empty_batch(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """The output for a batch with no values: empty, yet in the graph of γ and β (their gradient is 0)."""
    shape = _channel_shape(input)
    y = input.to(_stat_dtype(input))
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return _in_torch_layout(y.to(input.dtype), input)


# ----------------------------------------------------------------------------------------------
# Shapes and validation
# ----------------------------------------------------------------------------------------------

def _reduce_dims(x: Tensor) -> list[int]:
    """Every dimension but the channel dimension 1."""
    return [0] + list(range(2, x.dim()))


def _channel_shape(x: Tensor) -> list[int]:
    """Shape ``(1, C, 1, ...)`` that broadcasts a per-channel vector against ``x``."""
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def _stat_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the statistics and of the arithmetic: float32 for half-precision inputs."""
    return torch.float32 if x.dtype == torch.float16 or x.dtype == torch.bfloat16 else x.dtype  # _LOW_PRECISION


def check_bn_input(input: Tensor, training: bool, eps: float | None = None, **per_channel: Tensor | None) -> None:
    """Raise a clear error when ``input`` cannot be batch-normalized.

    Checks that ``input`` is an ``(N, C, *)`` tensor and that every per-channel tensor given by keyword (e.g.
    ``weight=...``) has exactly ``C`` elements, then the checks of :func:`_check_batch` (dtype, values per
    channel, ``eps`` when given).
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"expected input to be a torch.Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(
            f"expected input of shape (N, C, *) with at least 2 dimensions, got shape {tuple(input.shape)}"
        )
    C = input.shape[1]
    for name, t in per_channel.items():
        if t is not None and t.numel() != C:
            raise ValueError(
                f"expected {name} to have one value per channel, i.e. {C} elements for input of shape "
                f"{tuple(input.shape)} (channels in dim 1), got {t.numel()}"
            )
    _check_batch(input, training, eps)


def shape_str(x: Tensor) -> str:
    """``x``'s shape written as Python writes a tuple, ``(1, 3)`` (TorchScript cannot call ``tuple()``)."""
    dims = [str(n) for n in x.shape]
    return "(" + dims[0] + ",)" if len(dims) == 1 else "(" + ", ".join(dims) + ")"


def _check_batch(input: Tensor, training: bool, eps: float | None = None) -> None:
    """The checks that depend on the batch, for an ``(N, C, *)`` tensor (TorchScript-compatible).

    A floating dtype; in training mode not exactly one value per channel (no variance to compute; an empty
    batch is allowed, as in torch.nn); ``eps`` (when given) positive in training and non-negative in evaluation,
    torch.nn's rule: with ε = 0 a constant channel gives 0/0.
    """
    if not input.is_floating_point():
        raise TypeError(f"expected a floating-point input, got dtype {input.dtype}")
    if training and input.numel() == input.shape[1]:
        raise ValueError(
            f"expected more than 1 value per channel when training, got input of shape {shape_str(input)}: "
            "batch statistics need at least two values per channel (use eval() for single examples)"
        )
    if eps is not None:
        if training and not eps > 0:
            raise ValueError(f"batch_norm eps must be positive during training (expected eps > 0: a constant "
                             f"channel has zero variance), got {eps}")
        if not training and eps < 0:
            raise ValueError(f"batch_norm eps must be non-negative (expected eps >= 0), got {eps}")


# ----------------------------------------------------------------------------------------------
# Allocation, layout and special-value helpers (speed and torch.nn parity, no new math)
# ----------------------------------------------------------------------------------------------

def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    """A ``(C,)`` tensor shaped to broadcast against ``x``: ``(C,)`` itself for ``(N, C)``, else ``(1, C, 1, ...)``."""
    return v if x.dim() == 2 else v.view(_channel_shape(x))


def _rows(t: Tensor) -> Tensor | None:
    """``t`` as an ``(N, C, L)`` view when it is contiguous with spatial dimensions, else ``None``.

    Why: ATen reduces a contiguous row fastest; one reduction over ``(0, 2, 3)`` of an ``(N, C, H, W)`` tensor
    is several times slower than a reduction over each row followed by one over ``N``.
    """
    return t.view(t.shape[0], t.shape[1], -1) if t.dim() > 2 and t.is_contiguous() else None


def _channel_sum(t: Tensor, pairwise: bool = False) -> Tensor:
    """Σ over every dimension but 1, in the statistics dtype and shaped by :func:`_per_channel`.

    Why this way: the fastest reduction for each layout (:func:`_columns`, :func:`_rows`). ATen's reductions sum
    pairwise (cascade): a few ulps of the result however many values there are, the accuracy the mean of the
    two-pass variance needs; ``pairwise=True`` asks for them where a faster, less accurate one exists
    (:func:`_columns`).
    """
    dtype = _stat_dtype(t)
    if t.dim() == 2:
        return _columns(t) if t.dtype == dtype and not pairwise else t.sum(0, dtype=dtype)
    rows = _rows(t)
    if rows is not None:
        return rows.sum(2, dtype=dtype).sum(0).view(_channel_shape(t))
    return t.sum(_reduce_dims(t), keepdim=True, dtype=dtype)


def _columns(t: Tensor) -> Tensor:
    """The column sums ``Σ_n t[n, :]`` of an ``(N, C)`` tensor.

    Why: for wide rows (an MLP's ``(256, 1024)``) a matrix–vector product with a vector of ones (one BLAS call)
    reads the columns about twice as fast as ``t.sum(0)``. It adds the ``N`` rows one after the other, so its
    rounding error grows with ``N`` (up to N ulps of the largest term) where ATen's sum stays at a few ulps: fine
    for sums of centred data and of the gradient (Σd, Σd², Σg, Σg·d: an error relative to σ, not to |μ|), not for
    the mean of ``x``; and only for ``N ≤ 4096``.
    Traced code (``torch.compile``) keeps ``t.sum(0)``, which the compiler fuses itself.
    """
    n, c = t.shape
    if c < 512 or n > 4096 or torch.compiler.is_compiling():
        return t.sum(0)
    return torch.mv(t.t(), _ones(n, t.dtype, t.device))


@functools.lru_cache(maxsize=64)
def _ones(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A vector of ``n`` ones, made once per (n, dtype, device) (see :func:`_columns`)."""
    with torch.inference_mode(False), torch.no_grad():
        return torch.ones(n, dtype=dtype, device=device)


def _constant(value: float, like: Tensor) -> Tensor | float:
    """``value`` as a 0-dimensional tensor of ``like``'s dtype and device, made once (:func:`_scalar_tensor`).

    Why: an operation with a Python number wraps the number in a tensor of its own and converts it to the
    tensor's dtype, two more calls into torch, which on a ``(C,)`` vector doubles the operation's cost.
    Traced code keeps the number (the compiler folds it into its kernel).
    """
    if torch.compiler.is_compiling():
        return value
    return _scalar_tensor(value, like.dtype, like.device)


@functools.lru_cache(maxsize=256)
def _scalar_tensor(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The cached tensor of :func:`_constant` (made outside inference mode, so any later call may use it)."""
    with torch.inference_mode(False), torch.no_grad():
        return torch.tensor(value, dtype=dtype, device=device)


def _affine(t: Tensor, scale: Tensor, offset: Tensor | None, out: Tensor | None) -> Tensor:
    """``t·scale + offset`` with per-channel ``scale`` and ``offset`` (``None``: 0), written to ``out`` (``None``:
    a new tensor; ``out`` may be ``t`` itself).

    Why: for ``(N, C)`` one ``addcmul``; for maps a multiplication then an addition, because ATen's ``addcmul``
    with two per-channel operands is not vectorised along the rows there, three to four times slower than the
    two passes.
    """
    if offset is None:
        return torch.mul(t, scale, out=out)
    if t.dim() == 2:
        return torch.addcmul(offset, t, scale, out=out)
    return torch.mul(t, scale, out=out).add_(offset)


def _channel_sum_of_squares(d: Tensor, x: Tensor, mean: Tensor, keep: bool) -> tuple[Tensor, Tensor | None]:
    """Σ d² per channel (shaped as :func:`_channel_sum`) for ``d = x − mean``, ``d`` unchanged; and a full-size
    buffer the caller may overwrite with ``y`` (``None``: allocate one).

    Why this way: a kept ``d`` (:func:`_keeps_centred`) takes the temporary ``d·d``, which then receives ``y``.
    A ``d`` that becomes ``y`` gets no new full-size buffer: with rows, a fused norm kernel gives √(Σ d²) per row
    (one pass, but with two threads on a busy machine its parallel reduction stalls far more often than a sum's);
    otherwise ``d`` is squared in place, reduced and centred again from ``x``.
    """
    if keep:
        square = d * d
        return _channel_sum(square), square
    rows = _rows(d)
    if rows is not None:
        return torch.linalg.vector_norm(rows, dim=2).square_().sum(0).view(_channel_shape(d)), d
    sum_sq = _channel_sum(d.square_())
    torch.sub(x, mean, out=d)
    return sum_sq, d


def _channel_sum_of_products(d: Tensor, g: Tensor, x: Tensor, shift: Tensor) -> Tensor:
    """Σ d·g per channel (shaped as :func:`_channel_sum`) for ``d = x − shift``, in ``d``'s buffer, which is
    centred again from ``x`` afterwards (as :func:`_channel_sum_of_squares`: no new full-size buffer)."""
    total = _channel_sum(d.mul_(g))
    torch.sub(x, shift, out=d)
    return total


def _keeps_centred(d: Tensor) -> bool:
    """Whether the forward keeps ``d = x − μ_B`` for the backward (and writes ``y`` to a buffer of its own).

    Why: the backward then neither recomputes ``d`` nor centres its buffer a second time (three passes over
    memory fewer, and at an MLP's sizes three calls into torch fewer); the price is one saved tensor of the
    input's size until the backward, so only below 4 MiB per layer. Larger inputs keep nothing beyond ``x``
    (as torch.nn) and work in place.
    """
    return d.numel() * d.element_size() < _KEEP_BYTES


def _centred_buffer(x: Tensor, shift: Tensor) -> Tensor:
    """``x − shift`` in a new buffer in the statistics dtype and torch.nn's layout.

    Why: it is the one full-size allocation of the pass; the caller keeps working in it in place and returns it.
    Large buffers come from :func:`_empty`; a small contiguous ``x`` gives a contiguous result directly.
    """
    if x.is_contiguous() and x.numel() * shift.element_size() < _HUGE_PAGE_BYTES:
        return x - shift  # (shift has the statistics dtype)
    return torch.sub(x, shift, out=_empty(x, shift.dtype))


def _empty(x: Tensor, dtype: torch.dtype) -> Tensor:
    """An uninitialised tensor of ``x``'s shape, in ``dtype`` and torch.nn's memory format for ``x``.

    Why: a large output is written to fresh memory, and on Linux the kernel maps fresh memory page by page on
    first write; for a 32 MB tensor the 8192 faults of 4 KiB pages cost several passes over memory. NumPy's
    allocator asks the kernel for 2 MiB pages for allocations of 4 MiB or more (``madvise``), which makes those
    faults 512 times fewer; the tensor uses NumPy's memory (its storage keeps the array alive) and is no view, so
    it may be changed in place like any other output. Small tensors, other devices and traced code take
    :func:`torch.empty_like`.
    """
    fmt = _memory_format(x)
    nbytes = x.numel() * dtype.itemsize
    if nbytes < _HUGE_PAGE_BYTES or x.device.type != "cpu" or torch.compiler.is_compiling():
        return torch.empty_like(x, dtype=dtype, memory_format=fmt)
    storage = torch.from_numpy(numpy.empty(nbytes, dtype=numpy.uint8)).untyped_storage()
    strides = torch.empty_like(x, dtype=dtype, memory_format=fmt, device="meta").stride()
    return torch.empty(0, dtype=dtype).set_(storage, 0, x.shape, strides)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, skipping the call when ``t`` has that dtype already.

    Why (as :func:`_flat`): at the sizes of a small MLP a BN step is a few dozen tiny operations, and each call
    into torch costs about as much as the arithmetic.
    """
    return t if t.dtype == dtype else t.to(dtype)


def _flat(t: Tensor) -> Tensor:
    """``t.view(-1)``, skipping the call when ``t`` is one-dimensional already (see :func:`_as`)."""
    return t if t.dim() == 1 else t.view(-1)


def _memory_format(x: Tensor) -> torch.memory_format:
    """The memory format of torch.nn's output for ``x``.

    Why: torch.nn keeps channels-last inputs channels-last and makes any other strides contiguous.
    """
    if not _suggests_channels_last(x):
        return torch.contiguous_format
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def _suggests_channels_last(x: Tensor) -> bool:
    """Whether ``x``'s strides are ordered like channels-last (ATen's ``suggest_memory_format``).

    Why: the test behind :func:`_memory_format`, written so that TorchScript compiles it (no memory_format type).
    """
    if x.dim() != 4 and x.dim() != 5 or x.is_contiguous():
        return False
    order = [1, 3, 2, 0] if x.dim() == 4 else [1, 4, 3, 2, 0]  # innermost to outermost: C, W, H, (D,) N
    size, stride = x.shape, x.stride()
    smallest = 0
    for d in order:
        if size[d] == 0 or stride[d] < smallest or stride[1] == 0 or (d == 0 and smallest == stride[1]):
            return False
        smallest = stride[d] * size[d] if size[d] > 1 else stride[d]
    return True


def _in_torch_layout(y: Tensor, input: Tensor) -> Tensor:
    """``y`` in the memory format torch.nn gives the output for ``input``.

    Why: the elementwise operations follow the input's strides, which may be neither contiguous nor channels-last.
    """
    if not _suggests_channels_last(input):
        return y.contiguous()
    return y.contiguous(memory_format=torch.channels_last if input.dim() == 4 else torch.channels_last_3d)

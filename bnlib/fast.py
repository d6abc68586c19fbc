r"""The tuned training-mode Batch Normalization: the closed form with fewer passes over memory and fewer calls.

:class:`BatchNormFunction` computes exactly what :mod:`bnlib.closed_form` computes (tested equal: outputs,
gradients, statistics, every dtype and layout) and is what :func:`bnlib.functional.batch_norm` runs by default.
Read :mod:`bnlib.closed_form` for the math; this module is about speed, and about keeping the digits.

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

Speed. Everything is computed from ordinary tensor operations; torch's own batch-norm kernels
(``torch.batch_norm``, ``native_batch_norm``, cuDNN's) are never called. The tricks are kept out of the math, in
the helpers at the end of the file, each saying why:

* every reduction runs over the layout ATen reduces fastest (:func:`_rows`: a contiguous ``(N, C, H, W)`` is
  reduced row by row, then over ``N``, several times faster than one reduction over ``(0, 2, 3)``; wide
  ``(N, C)`` sums that cannot cancel are one matrix–vector product, :func:`_columns`);
* inputs below :data:`KEEP_CENTRED_BYTES` (4 MiB) keep :math:`d = x - \mu_B` for the backward
  (:func:`_keeps_centred`), which then needs no recentring; larger ones keep only ``x``, as torch.nn, and each
  pass writes into the one buffer that must be allocated anyway (the output ``y`` in the forward, ``dx`` in the
  backward), since a fresh full-size tensor costs more than a pass over one already allocated;
* buffers of :data:`LARGE_BUFFER_BYTES` (4 MiB) or more are taken from NumPy's allocator, which maps them in
  2 MiB pages (:func:`_empty`): a fresh 32 MB tensor in 4 KiB pages costs 8192 page faults, more than the
  arithmetic. Such a tensor is an ordinary tensor in every respect but one: its storage belongs to NumPy, so
  ``resize_`` cannot grow it (``y.clone()`` gives one that can). Most of bnlib's lead over torch.nn at
  ``(128, 64, 32, 32)`` in the CPU benchmark record (``bnlib/lab/results/cpu-2core``) is this allocation, not
  arithmetic: PyTorch's own allocator can take 2 MiB pages for every large tensor (``THP_MEM_ALLOC_ENABLE=1``),
  which would speed up torch.nn's kernel too; the record runs PyTorch with its defaults;
* at an MLP's sizes the cost is the number of calls into torch, not the bytes: no call is made that changes
  nothing (:func:`_as`, :func:`_flat`), numbers are cached 0-dimensional tensors (:func:`_constant`), the gradients
  of the two statistics outputs are not materialized as zero tensors, and the two running averages are updated
  by one call (:func:`bnlib.core.update_running_stats`).

When a graph of the backward itself is requested (``create_graph=True``), the backward of
:mod:`bnlib.closed_form` runs instead (its operations are differentiable), so double backward works.
``python -m bnlib.lab.bench`` compares the speed with torch.nn's C++ kernels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy
import torch
from torch import Tensor

from . import closed_form
from .core import channel_shape, memory_format, reduce_dims, stat_dtype

__all__ = ["KEEP_CENTRED_BYTES", "LARGE_BUFFER_BYTES", "BatchNormFunction"]

#: Inputs smaller than this keep x − μ_B for the backward (:func:`_keeps_centred`).
KEEP_CENTRED_BYTES = 4 * 2**20
#: Buffers of this size or more come from NumPy's allocator, in 2 MiB pages (:func:`_empty`).
LARGE_BUFFER_BYTES = 4 * 2**20


# ----------------------------------------------------------------------------------------------
# The closed form, tuned: training-mode forward and backward
# ----------------------------------------------------------------------------------------------

class BatchNormFunction(torch.autograd.Function):
    """Training-mode BN: forward with batch statistics, closed-form backward.

    ``forward(x, weight, bias, eps, update=None)`` returns ``(y, mean, var)`` where ``mean`` and the *biased*
    ``var`` are the batch statistics per channel (float32 or float64), non-differentiable. ``update(mean, var)``,
    when given, updates the running averages with them inside the forward, before anything is saved
    (:func:`bnlib.core.running_stats_updater` says why). ``weight`` and ``bias`` may be ``None``. ``x`` must have at
    least one value per channel (the empty batch is handled by :func:`bnlib.functional.batch_norm_core`).

    Per-channel quantities have the shape that broadcasts against ``x`` (:func:`_per_channel`), and every sum
    or mean is over the ``m`` values of a channel (:func:`_channel_sum`).
    """

    @staticmethod
    def forward(ctx, input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                update: Callable[[Tensor, Tensor], None] | None = None):
        x = _as(input, stat_dtype(input))  # float32 for half-precision input, converted once
        m = x.numel() // x.shape[1]
        inv_m = _constant(1.0 / m, x)
        shift = _channel_sum(x, pairwise=True).mul_(inv_m)  # K = mean(x) ≈ μ_B, within an ulp or two of |μ_B|
        d = _centred_buffer(x, shift)  # d = x − K (exact: x and K are close)
        sum_d = _channel_sum(d)  # Σd = m·δ with δ = μ_B − K, what the rounding of K left
        keep_centred = _keeps_centred(d)  # keep d for the backward (y gets a buffer of its own), or turn d into y
        if keep_centred:
            d.sub_(sum_d, alpha=1.0 / m)  # d = x − μ_B = (x − K) − δ: centred to the last digit, so δ is 0 below
            delta = None
        else:
            delta = sum_d.mul_(inv_m)  # δ, used in the formulas below (no extra pass over d)
        # Σ d², and a full-size buffer free for y (or None)
        sum_sq, y = _channel_sum_of_squares(d, x, shift, keep_centred)
        var = sum_sq.mul_(inv_m)  # mean(d²)
        if delta is not None:
            var.addcmul_(delta, delta, value=-1).clamp_min_(0)  # σ²_B = mean(d²) − δ²
        rstd = var.add(_constant(eps, var)).rsqrt_()  # 1 / √(σ²_B + ε)
        scale = rstd if weight is None else rstd * _per_channel(weight, x)  # γ / √(σ²_B + ε)
        # y = γ (x − μ_B) / √(σ²_B + ε) + β = (d − δ)·scale + β
        offset: Tensor | None
        if delta is not None:
            offset = torch.mul(delta, scale).neg_() if bias is None else torch.addcmul(
                _per_channel(bias, x), delta, scale, value=-1)  # β − δ·scale
        else:
            offset = None if bias is None else _per_channel(bias, x)
        y = _affine(d, scale, offset, out=y)  # d·scale + offset
        mean_out, var_out = _flat(shift), _flat(var)  # (C,), as returned; μ_B ≈ K to the precision of a float
        if update is not None:
            update(mean_out, var_out)  # the running averages, before anything is saved
        ctx.eps = eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(input, weight, shift, delta, rstd, scale, d if keep_centred else None)
        ctx.set_materialize_grads(False)  # no zero tensors for the gradients of mean and var (never used)
        ctx.mark_non_differentiable(mean_out, var_out)
        return _as(y, input.dtype), mean_out, var_out

    @staticmethod
    def backward(ctx, dy: Tensor | None, _dmean, _dvar):
        x, weight, shift, delta, rstd, scale, d = ctx.saved_tensors
        if dy is None:  # y took no part in the loss
            return None, None, None, None, None
        if torch.is_grad_enabled():  # create_graph=True: a backward that is itself differentiable
            return closed_form.backward(x, weight, dy, ctx.eps, ctx.bias_dtype) + (None, None)
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
        return grad_x, grad_weight, grad_bias, None, None


# ----------------------------------------------------------------------------------------------
# Allocation, layout and special-value helpers (speed and torch.nn parity, no new math)
# ----------------------------------------------------------------------------------------------

def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    """A ``(C,)`` tensor shaped to broadcast against ``x``: ``(C,)`` itself for ``(N, C)``, else ``(1, C, 1, ...)``."""
    return v if x.dim() == 2 else v.view(channel_shape(x))


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
    dtype = stat_dtype(t)
    if t.dim() == 2:
        return _columns(t) if t.dtype == dtype and not pairwise else t.sum(0, dtype=dtype)
    rows = _rows(t)
    if rows is not None:
        return rows.sum(2, dtype=dtype).sum(0).view(channel_shape(t))
    return t.sum(reduce_dims(t), keepdim=True, dtype=dtype)


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


def _channel_sum_of_squares(d: Tensor, x: Tensor, mean: Tensor,
                            keep_centred: bool) -> tuple[Tensor, Tensor | None]:
    """Σ d² per channel (shaped as :func:`_channel_sum`) for ``d = x − mean``, ``d`` unchanged; and a full-size
    buffer the caller may overwrite with ``y`` (``None``: allocate one).

    Why this way: a kept ``d`` (:func:`_keeps_centred`) takes the temporary ``d·d``, which then receives ``y``.
    A ``d`` that becomes ``y`` gets no new full-size buffer: with rows, a fused norm kernel gives √(Σ d²) per row
    (one pass, but with two threads on a busy machine its parallel reduction stalls far more often than a sum's);
    otherwise ``d`` is squared in place, reduced and centred again from ``x``.
    """
    if keep_centred:
        square = d * d
        return _channel_sum(square), square
    rows = _rows(d)
    if rows is not None:
        return torch.linalg.vector_norm(rows, dim=2).square_().sum(0).view(channel_shape(d)), d
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
    return d.numel() * d.element_size() < KEEP_CENTRED_BYTES


def _centred_buffer(x: Tensor, shift: Tensor) -> Tensor:
    """``x − shift`` in a new buffer in the statistics dtype and torch.nn's layout.

    Why: it is the one full-size allocation of the pass; the caller keeps working in it in place and returns it.
    Large buffers come from :func:`_empty`; a small contiguous ``x`` gives a contiguous result directly.
    """
    if x.is_contiguous() and x.numel() * shift.element_size() < LARGE_BUFFER_BYTES:
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
    fmt = memory_format(x)
    nbytes = x.numel() * dtype.itemsize
    if nbytes < LARGE_BUFFER_BYTES or x.device.type != "cpu" or torch.compiler.is_compiling():
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



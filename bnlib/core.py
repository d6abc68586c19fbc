"""What every normalization layer of bnlib shares: shapes, dtypes, validation, layouts, running averages.

Each idea here is written once and used by :mod:`bnlib.functional`, :mod:`bnlib.closed_form`, :mod:`bnlib.fast`,
the layers (:mod:`bnlib.modules`, the variants, :mod:`bnlib.recurrent`, :mod:`bnlib.distributed`) and the tools
built on them. The names are public inside the package; the functions below the validation are written so that
TorchScript compiles them (no ``tuple()``, no ``type()``, no memory-format objects), since the layers' forward
passes call them.

* shapes and dtypes: :func:`reduce_dims`, :func:`channel_shape`, :func:`stat_dtype` (float32 statistics for
  float16/bfloat16 inputs, :data:`LOW_PRECISION`), :func:`to_stat_dtype`;
* validation, one family: :func:`check_tensor` (a floating-point tensor), :func:`check_bn_input` (an
  ``(N, C, *)`` input and its per-channel tensors), :func:`check_batch` (what training needs of a batch),
  :func:`check_size` (a size argument, accepted as torch.nn accepts it);
* layout: :func:`in_torch_layout` (the memory format torch.nn gives its output) and :func:`memory_format`;
* :func:`empty_batch`: the output for a batch without values;
* :func:`apply_affine`: ``y = γ x̂ + β``;
* the running averages of Algorithm 2, :func:`update_running_stats` (one step) and
  :func:`update_running_stats_steps` (several steps at once, unrolled).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

__all__ = [
    "LOW_PRECISION", "apply_affine", "channel_shape", "check_batch", "check_bn_input", "check_size", "check_tensor",
    "empty_batch", "in_torch_layout", "memory_format", "reduce_dims", "register_affine", "reset_affine", "shape_str",
    "stat_dtype", "to_stat_dtype", "running_stats_updater", "update_running_stats", "update_running_stats_steps",
    "DimCheck",
]

#: Input dtypes normalized with float32 statistics (as cuDNN and PyTorch do).
LOW_PRECISION = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Shapes and dtypes
# ----------------------------------------------------------------------------------------------

def reduce_dims(x: Tensor) -> list[int]:
    """Every dimension but the channel dimension 1: the dimensions a per-channel statistic reduces over."""
    return [0] + list(range(2, x.dim()))


def channel_shape(x: Tensor) -> list[int]:
    """Shape ``(1, C, 1, ...)`` that broadcasts a per-channel vector against ``x``."""
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def stat_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the statistics and of the arithmetic: float32 for half-precision inputs (:data:`LOW_PRECISION`)."""
    return torch.float32 if x.dtype == torch.float16 or x.dtype == torch.bfloat16 else x.dtype


def to_stat_dtype(x: Tensor) -> Tensor:
    """``x`` in the dtype statistics are computed in (:func:`stat_dtype`); ``x`` itself when it has that dtype."""
    dtype = stat_dtype(x)
    return x if x.dtype == dtype else x.to(dtype)


def shape_str(x: Tensor) -> str:
    """``x``'s shape written as Python writes a tuple, ``(1, 3)`` (TorchScript cannot call ``tuple()``)."""
    dims = [str(n) for n in x.shape]
    return "(" + dims[0] + ",)" if len(dims) == 1 else "(" + ", ".join(dims) + ")"


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------

def check_size(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int, accepted as torch.nn accepts sizes (:func:`operator.index`: ints, NumPy integers,
    integer 0-dimensional tensors), and at least ``minimum``.

    Raises:
        TypeError: ``value`` is no integer (a bool, a float, a string, ...), as torch.nn's factories raise.
        ValueError: ``value`` is smaller than ``minimum``.
    """
    if isinstance(value, bool):
        raise TypeError(f"expected {name} to be an int, got bool {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"expected {name} to be an int, got {type(value).__name__} {value!r}") from None
    if n < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"expected {name} to be {what}, got {n}")
    return n


def check_tensor(owner: str, input) -> None:
    """``input`` is a floating-point tensor; else a ``TypeError`` naming ``owner`` (a layer or function)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{owner} expected a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"{owner} expected a floating-point input, got dtype {input.dtype}")


class DimCheck:
    """Mixin for a layer whose input must have one of the dimensions ``input_dims`` (``_layout`` names them)."""

    input_dims: ClassVar[tuple[int, ...]] = ()
    _layout: ClassVar[str] = ""

    def _check_input_dim(self, input: Tensor) -> None:
        check_tensor(type(self).__name__, input)
        if input.dim() not in self.input_dims:
            raise ValueError(f"{type(self).__name__} expected {self._layout} input, got {input.dim()}D input "
                             f"of shape {tuple(input.shape)}")


def check_bn_input(input: Tensor, training: bool, eps: float | None = None, **per_channel: Tensor | None) -> None:
    """Raise a clear error when ``input`` cannot be batch-normalized.

    Checks that ``input`` is an ``(N, C, *)`` tensor and that every per-channel tensor given by keyword (e.g.
    ``weight=...``) has exactly ``C`` elements, then the checks of :func:`check_batch` (dtype, values per
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
    check_batch(input, training, eps)


def check_batch(input: Tensor, training: bool, eps: float | None = None) -> None:
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
# Layout: the memory format of torch.nn's output
# ----------------------------------------------------------------------------------------------

def suggests_channels_last(x: Tensor) -> bool:
    """Whether ``x``'s strides are ordered like channels-last (ATen's ``suggest_memory_format``).

    Written so that TorchScript compiles it (no memory_format type).
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


def memory_format(x: Tensor) -> torch.memory_format:
    """The memory format of torch.nn's output for ``x``: channels-last stays channels-last, anything else is
    made contiguous."""
    if not suggests_channels_last(x):
        return torch.contiguous_format
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def in_torch_layout(y: Tensor, input: Tensor) -> Tensor:
    """``y`` in the memory format torch.nn gives the output for ``input`` (elementwise operations follow the
    input's strides, which may be neither contiguous nor channels-last)."""
    if not suggests_channels_last(input):
        return y.contiguous()
    return y.contiguous(memory_format=torch.channels_last if input.dim() == 4 else torch.channels_last_3d)


# ----------------------------------------------------------------------------------------------
# Outputs and running statistics
# ----------------------------------------------------------------------------------------------

def empty_batch(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """The output for a batch with no values: empty, yet in the graph of γ and β (their gradient is 0)."""
    shape = channel_shape(input)
    y = input.to(stat_dtype(input))
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return in_torch_layout(y.to(input.dtype), input)


def apply_affine(xhat: Tensor, weight: Tensor | None, bias: Tensor | None, shape: Sequence[int]) -> Tensor:
    """y = γ x̂ + β with γ, β reshaped to ``shape`` (either may be ``None``: 1 and 0)."""
    if weight is not None:
        xhat = xhat * weight.to(xhat.dtype).view(shape)
    if bias is not None:
        xhat = xhat + bias.to(xhat.dtype).view(shape)
    return xhat


def register_affine(module: nn.Module, shape: int | tuple[int, ...], affine: bool, bias: bool = True, *,
                    device=None, dtype=None) -> None:
    """γ (``weight``) and β (``bias``) of ``shape`` on ``module``, under torch.nn's names and rules: ``affine=False``
    registers both as ``None``, ``bias=False`` learns γ only. Their values are set by :func:`reset_affine`."""
    factory = {"device": device, "dtype": dtype}
    weight = nn.Parameter(torch.empty(shape, **factory)) if affine else None
    module.register_parameter("weight", weight)
    module.register_parameter("bias", nn.Parameter(torch.empty(shape, **factory)) if affine and bias else None)


def reset_affine(module: nn.Module) -> None:
    """γ = 1 and β = 0, for those of :func:`register_affine`'s parameters that exist."""
    params = dict(module.named_parameters(recurse=False))
    if "weight" in params:
        nn.init.ones_(params["weight"])
    if "bias" in params:
        nn.init.zeros_(params["bias"])


def update_running_stats(running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor, var: Tensor,
                         m: int, momentum: float) -> None:
    r"""One step of the running averages (Algorithm 2, PyTorch's momentum), in place:

    .. math::
        \text{running\_mean} \leftarrow (1-w)\,\text{running\_mean} + w\,\mu_B, \qquad
        \text{running\_var} \leftarrow (1-w)\,\text{running\_var} + w\,\tfrac{m}{m-1}\,\sigma_B^2,

    with ``w = momentum``, the batch mean ``mean`` and *biased* variance ``var`` (any shape with one value per
    element of the buffers) over ``m`` values per channel. Either buffer may be ``None``. Outside TorchScript,
    ``m`` and ``momentum`` may also be tensors that broadcast against the buffers (a count and a weight per row,
    e.g. per time step); the annotations say int and float because TorchScript compiles this function.
    The caller makes the statistics non-differentiable (or runs under :func:`torch.no_grad`).
    """
    if (not torch.jit.is_scripting() and running_mean is not None and running_var is not None
            and not isinstance(m, Tensor) and not isinstance(momentum, Tensor)):
        # Both averages in one call (one kernel launch fewer), then the variance's unbiasing term:
        # lerp(v, σ², w) + w·(m/(m−1) − 1)·σ² = (1 − w)·v + w·m/(m−1)·σ².
        mean = mean if mean.dtype == running_mean.dtype else mean.to(running_mean.dtype)
        var = var if var.dtype == running_var.dtype else var.to(running_var.dtype)
        if mean.shape != running_mean.shape:
            mean, var = mean.view(running_mean.shape), var.view(running_var.shape)
        torch._foreach_lerp_([running_mean, running_var], [mean, var], momentum)
        running_var.add_(var, alpha=momentum * (m / (m - 1) - 1))
        return
    if running_mean is not None:
        running_mean.lerp_(mean.to(running_mean.dtype).view(running_mean.shape), momentum)  # (1 − w)·r + w·μ_B
    if running_var is not None:
        unbiased = var.to(running_var.dtype).view(running_var.shape) * (m / (m - 1))  # m/(m−1)·σ²_B
        running_var.lerp_(unbiased, momentum)  # (1 − w)·r + w·m/(m−1)·σ²_B


def running_stats_updater(running_mean: Tensor | None, running_var: Tensor | None, m: int,
                          momentum: float) -> Callable[[Tensor, Tensor], None]:
    """:func:`update_running_stats` bound to a layer's buffers, ``update(mean, var)``, for an autograd Function to call
    inside its forward, *before* it saves tensors for the backward.

    Why there: activation checkpointing recomputes a forward during the backward, and its non-reentrant mode stops
    the recompute at the last tensor the original forward saved. torch.nn's kernels update their buffers before
    they save, so the recompute counts the batch *and* updates the statistics a second time; an update made after
    the Function returned would be skipped there while the batch is still counted.
    """
    def update(mean: Tensor, var: Tensor) -> None:
        with torch.no_grad():  # the running averages are never part of a graph
            update_running_stats(running_mean, running_var, mean, var, m, momentum)
    return update


def update_running_stats_steps(running_mean: Tensor, running_var: Tensor, means: Tensor, variances: Tensor, m: int,
                               momenta: Sequence[float]) -> tuple[Tensor, Tensor]:
    r"""``k = len(momenta)`` steps of :func:`update_running_stats` at once, for ``k`` batches in order (ghost batches).

    ``means`` and ``variances`` hold the ``k`` batches' statistics (leading dimension ``k``, then one value per
    element of the buffers; biased variances over ``m`` values each). Unrolled, the state before step ``j`` is a
    fixed combination of the first state and the first ``j`` batches' statistics: row ``j`` of a ``(k+1, k+1)``
    matrix of weights (Python floats), applied to all of them in one matrix product.

    Returns:
        ``(means_before, variances_before)``: the running statistics each step starts from, ``(k, C)``; the buffers
        are left as after the last step.
    """
    k = len(momenta)
    rows = [[1.0] + [0.0] * k]  # state 0: the running statistic itself
    for j, w in enumerate(momenta):
        row = [(1 - w) * c for c in rows[-1]]  # (1 − w_j)·state_j
        row[j + 1] += w  # + w_j·batch_j
        rows.append(row)
    out = []
    for running, news in ((running_mean, means.detach()), (running_var, variances.detach() * (m / (m - 1)))):
        weights = torch.tensor(rows, dtype=running.dtype, device=running.device)
        states = weights @ torch.cat([running.view(1, -1), news.reshape(k, -1).to(running.dtype)])
        running.copy_(states[k])
        out.append(states[:k])
    return out[0], out[1]

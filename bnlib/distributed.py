r"""Synchronized Batch Normalization: batch statistics over the union of every replica's batch.

With data parallelism (:class:`torch.nn.parallel.DistributedDataParallel`) each of the :math:`R`
replicas sees only its own slice of the batch, and a plain BatchNorm layer normalizes with the
statistics of that slice. :class:`SyncBatchNorm` instead normalizes every replica's slice with the
mean and variance of the *whole* batch, so that :math:`R` replicas with :math:`m_r` examples each
compute exactly what one device would compute on the concatenated :math:`m = \sum_r m_r` examples:
outputs, input gradients, running statistics, and parameter gradients once summed over replicas.
Chapter *Batch normalization across devices* (``chapters/distributed.ipynb``) explains it.

PyTorch's own :class:`torch.nn.SyncBatchNorm` refuses CPU tensors ("SyncBatchNorm expected input
tensor to be on GPU"); this one is written with plain ``torch.distributed`` collectives, so it runs
on CPU with the ``gloo`` backend and on GPUs with ``nccl`` alike.

The math (per channel; the communication is one collective in the forward pass and one in the
backward pass):

**Forward.** Replica :math:`r` computes, in two passes over its data (a shift :math:`K_r` = the plain mean,
then :func:`torch.var_mean` of :math:`x - K_r`, as :mod:`bnlib.functional` does), its
count :math:`n_r`, mean :math:`\mu_r` and centred sum of squares
:math:`M_{2,r} = \sum_{i \in r} (x_i - \mu_r)^2`. One ``all_gather`` gives every replica the table
:math:`(n_r, \mu_r, M_{2,r})_{r=1..R}`, which each combines identically with Chan et al.'s parallel
formula (the pairwise update :math:`M_{2,AB} = M_{2,A} + M_{2,B} + \frac{n_A n_B}{n_A+n_B}
(\mu_B-\mu_A)^2` applied to :math:`R` parts at once):

.. math::
    n = \sum_r n_r, \qquad
    \mu = \frac{1}{n}\sum_r n_r \mu_r, \qquad
    M_2 = \sum_r \Big( M_{2,r} + n_r (\mu_r - \mu)^2 \Big), \qquad
    \sigma^2 = M_2 / n .

Every term of :math:`M_2` is a sum of non-negative numbers, so nothing cancels: unlike the
"all-reduce :math:`\sum x` and :math:`\sum x^2`" shortcut (i.e. :math:`E[x^2]-E[x]^2`), this stays
accurate when :math:`|\mu| \gg \sigma`. The table is exchanged and combined in float64 (it is only
:math:`R \times (2C+1)` numbers), so counts are exact and the merge adds no rounding of note.
The output is computed from centred data, :math:`y = ((x - K) - \delta)\,\gamma/\sqrt{\sigma^2+\epsilon}
+ \beta` with :math:`K = \mathrm{fl}(\mu)` and the small :math:`\delta = \mu - K`, not as
:math:`x\cdot s + (\beta - \mu s)`, where two large terms would cancel.

**Backward.** With :math:`\hat x = (x-\mu)/\sqrt{\sigma^2+\epsilon}` and :math:`g = \partial L /
\partial y`, the closed form of :mod:`bnlib.functional` needs two sums over the *whole* batch,

.. math::
    \frac{\partial L}{\partial x_i} = \frac{\gamma}{\sqrt{\sigma^2+\epsilon}}
    \Big(g_i - \frac{1}{n}\sum_{j} g_j - \hat x_i \frac{1}{n}\sum_{j} g_j \hat x_j\Big),

so each replica computes its local :math:`\sum g` and :math:`\sum g\hat x` and one ``all_reduce``
(sum) of the :math:`2C` numbers gives the global ones; :math:`n` is the global count.

**Parameter gradients** are the *local* sums: ``bias.grad`` :math:`= \sum_{i \in r} g_i` and
``weight.grad`` :math:`= \sum_{i \in r} g_i \hat x_i`. Summed over replicas they are the gradients
of :math:`\sum_r L_r`; :class:`~torch.nn.parallel.DistributedDataParallel` all-reduces them like any
other parameter's gradient (it averages, i.e. it gives the gradient of the mean of the replicas'
losses), so nothing special is needed.

**Running statistics** are updated on every replica with the global mean and the global unbiased
variance :math:`\frac{n}{n-1}\sigma^2`, so they stay identical on every replica.

Behaviour at the edges:

* without an initialized process group, with a group of one process, or in eval mode there is no
  communication and the layer is exactly :class:`bnlib.BatchNorm2d` & co.;
* replicas may hold different numbers of examples, including none at all (an empty ``(0, C, ...)``
  slice contributes :math:`n_r = 0` and still takes part in both collectives); at least two values
  per channel over *all* replicas are needed in training, otherwise every replica raises the same
  ``ValueError`` and ``num_batches_tracked`` does not move; when every slice is empty the output is
  empty and the running statistics stay as they are (the batch is counted, as torch.nn counts an
  empty batch);
* every replica must call the layer the same number of times, and backpropagate through it, as
  with any collective (and as with :class:`torch.nn.SyncBatchNorm`); a replica that raises before
  the collective (e.g. wrong channel count) leaves the others waiting until the process group's
  timeout;
* double backward (``create_graph=True``) is not supported in synchronized mode.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .closed_form import input_gradient
from .core import channel_shape, check_bn_input, reduce_dims, stat_dtype, update_running_stats
from .layers import is_batchnorm
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase

__all__ = ["SyncBatchNorm", "SyncBatchNormFunction", "communication_timer"]


# ----------------------------------------------------------------------------------------------
# Optional timing of the collectives (for the chapter's cost measurements)
# ----------------------------------------------------------------------------------------------

class CommTime:
    """Seconds and number of calls spent in SyncBatchNorm's collectives (see :func:`communication_timer`)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def __repr__(self) -> str:
        return f"CommTime(seconds={self.seconds:.6f}, calls={self.calls})"


class _CommTimer:
    """Runs a collective, adding its wall-clock time to every active :class:`CommTime`."""

    def __init__(self) -> None:
        self.active: list[CommTime] = []

    def run(self, fn, tensor: Tensor):
        if not self.active:
            return fn()
        cuda = tensor.is_cuda
        if cuda:  # NCCL collectives are asynchronous with respect to the host
            torch.cuda.synchronize(tensor.device)
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize(tensor.device)
        elapsed = time.perf_counter() - t0
        for t in self.active:  # nested timers each see every collective inside them
            t.seconds += elapsed
            t.calls += 1
        return out


_TIMER = _CommTimer()


@contextmanager
def communication_timer():
    """Measure the time spent in SyncBatchNorm's collectives inside the ``with`` block.

    Yields a :class:`CommTime` whose ``seconds`` and ``calls`` grow as SyncBatchNorm layers run
    their ``all_gather`` (forward) and ``all_reduce`` (backward); timers may be nested::

        with communication_timer() as t:
            loss = model(x).sum(); loss.backward()
        print(t.seconds, t.calls)

    On CUDA the device is synchronized around each collective while timing (slower, but honest).
    """
    timer = CommTime()
    _TIMER.active.append(timer)
    try:
        yield timer
    finally:
        _TIMER.active.remove(timer)


# ----------------------------------------------------------------------------------------------
# The autograd function
# ----------------------------------------------------------------------------------------------

def _exchange_dtype(x: Tensor) -> torch.dtype:
    # float64 for the (n, μ, M2) table wherever the backend has it; MPS has no float64.
    return torch.float32 if x.device.type == "mps" else torch.float64


def global_batch_stats(xs: Tensor, process_group, world_size: int):
    r"""Mean, biased variance and count of each channel over every replica's batch.

    ``xs`` is this replica's ``(N_r, C, *)`` slice in the statistics dtype. Returns ``(mean, var,
    n)``: two ``(C,)`` tensors in float64 (float32 on MPS) and the total count per channel as a
    0-dim tensor of the same dtype, identical on every replica. Local statistics by the corrected
    two-pass algorithm of :mod:`bnlib.functional` (shift by the plain mean :math:`K_r`, then
    :func:`torch.var_mean` of the centred data, so nothing cancels even when :math:`|\mu_r| \gg
    \sigma_r`), one ``all_gather`` of :math:`(n_r, \mu_r, M_{2,r})`, then Chan's combination (see
    the module docstring). Raises ``ValueError`` on every replica when the whole batch has exactly
    one value per channel; an empty whole batch gives ``n = 0`` (and zeros for the statistics).
    """
    C = xs.shape[1]
    n_local = xs.numel() // C
    ex = _exchange_dtype(xs)
    if n_local > 0:
        dims = reduce_dims(xs)
        shift = xs.mean(dims, keepdim=True)  # K_r ≈ μ_r, the plain mean
        var_l, delta = torch.var_mean(xs - shift, dims, correction=0)  # σ²_r and δ_r = μ_r − K_r (tiny)
        mean_l = shift.view(-1).to(ex) + delta.to(ex)  # μ_r = K_r + δ_r
        m2_l = var_l.to(ex) * n_local  # M2_r = Σ (x − μ_r)² = n_r σ²_r
    else:  # an empty slice: contributes nothing (and var_mean of nothing would be NaN)
        mean_l = m2_l = torch.zeros(C, dtype=ex, device=xs.device)
    packed = torch.cat([torch.full((1,), float(n_local), dtype=ex, device=xs.device), mean_l, m2_l])
    gathered = [torch.empty_like(packed) for _ in range(world_size)]
    _TIMER.run(lambda: dist.all_gather(gathered, packed, group=process_group), packed)
    table = torch.stack(gathered)  # (R, 1 + 2C): n_r | μ_r | M2_r
    counts, means, m2s = table[:, :1], table[:, 1:1 + C], table[:, 1 + C:]
    n = counts.sum()
    if n == 1:
        raise ValueError(
            f"expected more than 1 value per channel when training, got {int(n)} over all {world_size} "
            f"replicas (this replica's input has shape {list(xs.shape)}): batch statistics need at least "
            "two values per channel (use eval() for single examples)"
        )
    if n == 0:  # every slice is empty: nothing to normalize, nothing to learn from
        zeros = torch.zeros(C, dtype=ex, device=xs.device)
        return zeros, zeros, n
    mean = (counts * means).sum(0) / n  # μ = Σ n_r μ_r / n
    m2 = (m2s + counts * (means - mean) ** 2).sum(0)  # M2 = Σ [M2_r + n_r (μ_r − μ)²]
    return mean, m2 / n, n


def _split_mean(mean: Tensor, dtype: torch.dtype, shape: list[int]) -> tuple[Tensor, Tensor]:
    r"""The global mean μ (float64) as a shift :math:`K` in ``dtype`` plus the small remainder :math:`\delta = \mu - K`.

    :math:`K` is μ rounded to ``dtype``, so :math:`x - K` is exact for the values near μ (Sterbenz), and
    :math:`x - \mu = (x - K) - \delta` keeps the digits float32 would lose in :math:`x - \mathrm{fl}(\mu)`
    (up to half an ulp of μ, e.g. 5e-4 at μ = 1e4).
    """
    shift = mean.to(dtype)  # K = fl(μ)
    delta = (mean - shift.to(mean.dtype)).to(dtype)  # δ = μ − K, tiny
    return shift.view(shape), delta.view(shape)


class SyncBatchNormFunction(torch.autograd.Function):
    r"""Training-mode BN with statistics over every replica: one collective forward, one backward.

    ``forward(x, weight, bias, eps, process_group, world_size, on_batch=None)`` returns ``(y, mean, var, n)``:
    the output, the global per-channel mean and *biased* variance (non-differentiable, in the
    statistics dtype) and the global count per channel (a 0-dim float64 tensor). ``on_batch(mean, var, n)``, when
    given, runs once those exist and before anything is saved for the backward: the module counts the batch and
    updates its running averages there (:func:`bnlib.core.running_stats_updater` says why).

    Like :mod:`bnlib.functional`, the output is computed from centred data,
    :math:`y = ((x - K) - \delta)\,\gamma/\sqrt{\sigma^2+\epsilon} + \beta`, never as
    :math:`x s + (\beta - \mu s)`, whose two large terms cancel when :math:`|\mu| \gg \sigma`.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, process_group,
                world_size: int, on_batch: Callable[[Tensor, Tensor, Tensor], None] | None = None):
        shape = channel_shape(x)
        sd = stat_dtype(x)
        xs = x.to(sd)
        mean64, var64, n = global_batch_stats(xs, process_group, world_size)
        shift, delta = _split_mean(mean64, sd, shape)  # μ = K + δ
        var = var64.to(sd)
        rstd = torch.rsqrt(var + eps).view(shape)  # 1 / √(σ² + ε)
        scale = rstd if weight is None else rstd * weight.to(sd).view(shape)  # γ / √(σ² + ε)
        xc = (xs - shift).sub_(delta)  # x − μ = (x − K) − δ: small numbers, nothing cancels
        if bias is None:
            y = xc.mul_(scale)  # γ (x − μ) / √(σ² + ε)
        else:
            y = torch.addcmul(bias.to(sd).view(shape), xc, scale)  # γ (x − μ) / √(σ² + ε) + β
        ctx.process_group, ctx.world_size = process_group, world_size
        ctx.bias_dtype = None if bias is None else bias.dtype
        mean = mean64.to(sd)
        if on_batch is not None:  # counts the batch and updates the running averages, before saving
            on_batch(mean, var, n)  # (bnlib.core.running_stats_updater says why activation checkpointing needs that)
        ctx.save_for_backward(x, weight, shift, delta, rstd, n)
        ctx.mark_non_differentiable(mean, var, n)
        return y.to(x.dtype), mean, var, n

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor, _dmean, _dvar, _dn):
        x, weight, shift, delta, rstd, n = ctx.saved_tensors
        dims, shape = reduce_dims(x), channel_shape(x)
        C = x.shape[1]
        xs = x.to(stat_dtype(x))
        g = dy.to(xs.dtype)
        xhat = (xs - shift).sub_(delta).mul_(rstd)  # x̂ = ((x − K) − δ) / √(σ² + ε), global statistics
        sum_g = g.sum(dims)  # local Σ g      = this replica's ∂L/∂β
        sum_gx = (g * xhat).sum(dims)  # local Σ g x̂ = this replica's ∂L/∂γ
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            both = torch.cat([sum_g, sum_gx])
            _TIMER.run(lambda: dist.all_reduce(both, op=dist.ReduceOp.SUM, group=ctx.process_group), both)
            glob_g, glob_gx = both[:C].view(shape), both[C:].view(shape)  # Σ over every replica
            scale = rstd if weight is None else rstd * weight.to(rstd.dtype).view(shape)  # γ / √(σ² + ε)
            # the closed form's ∂L/∂x with the sums and the count n over the whole batch
            dx = input_gradient(g, xhat, scale, glob_g, glob_gx, n.to(xs.dtype)).to(x.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = sum_gx.to(weight.dtype)
        if ctx.needs_input_grad[2]:
            dbias = sum_g.to(ctx.bias_dtype)
        return dx, dweight, dbias, None, None, None, None


# ----------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------

def _is_convertible(module: nn.Module) -> bool:
    """A batch-statistics layer (:func:`bnlib.layers.is_batchnorm`) that is plain BatchNorm: torch.nn's
    BatchNorm*d / SyncBatchNorm / LazyBatchNorm*d and bnlib's exact BatchNorm1d/2d/3d.

    bnlib's variants (Batch Renormalization, Ghost BN, Batch Layer Norm) subclass bnlib's BatchNorm but
    normalize differently, so they are left alone, and so is a bnlib SyncBatchNorm (already converted).
    """
    if not is_batchnorm(module) or isinstance(module, SyncBatchNorm):
        return False
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or type(module) in (BatchNorm1d, BatchNorm2d,
                                                                                    BatchNorm3d)


class SyncBatchNorm(BatchNormBase):
    r"""Batch Normalization with statistics over the batches of every process of a group.

    Same arguments as :class:`torch.nn.SyncBatchNorm`: those of :class:`bnlib.BatchNorm2d` plus
    ``process_group`` (``None``: the default group, i.e. every process). Accepts any input of shape
    ``(N, C, *)`` with at least 2 dimensions; statistics are per channel over ``N`` and ``*`` on
    every replica together.

    In training mode inside an initialized process group of more than one process, the forward
    pass runs one ``all_gather`` and the backward pass one ``all_reduce`` (see the module
    docstring for the math). Otherwise (no process group, a group of one, eval mode) it is exactly
    bnlib's BatchNorm, with no communication. Works with ``gloo`` (CPU) and ``nccl`` (GPU).

    ``weight.grad`` and ``bias.grad`` on each replica are that replica's contribution; summed over
    replicas they are the gradients of the sum of the replicas' losses. DDP's gradient all-reduce
    averages them over the replicas, which gives the gradient of the mean of the replicas' losses.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *,
                 bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm expected input of shape (N, C, *) with at least 2 dimensions, "
                             f"got {input.dim()}D input of shape {tuple(input.shape)}")

    def _sync_world_size(self) -> int:
        """Processes to synchronize with; 1 (no communication) without an initialized group."""
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)  # -1 if this process is not in the group

    def forward(self, input: Tensor) -> Tensor:
        world_size = self._sync_world_size() if self.training else 1
        if world_size <= 1:
            return super().forward(input)  # bnlib's BatchNorm, no communication
        self._check_input_dim(input)
        self._check_num_channels(input)
        # Local checks only; "at least two values per channel" needs the global count and is
        # checked (identically on every replica) after the forward collective.
        check_bn_input(input, False, weight=self.weight, bias=self.bias,
                           running_mean=self.running_mean, running_var=self.running_var)
        if not self.eps > 0:  # as in training mode without a process group (a constant channel gives 0/0)
            raise ValueError(f"batch_norm eps must be positive during training, got {self.eps}")

        def on_batch(mean: Tensor, var: Tensor, n: Tensor) -> None:
            # Called inside the Function's forward once the global statistics exist, so a forward that raised
            # (e.g. one value per channel over all replicas) is no batch; and before it saves tensors, so an
            # activation checkpoint's recompute counts and updates again, as torch.nn's layers do.
            self._count_batch()
            if self.track_running_stats and n > 0:  # an empty global batch leaves the statistics alone
                with torch.no_grad():  # the global mean and the global n/(n−1)·σ²
                    update_running_stats(self.running_mean, self.running_var, mean, var, int(n), self._batch_weight())

        y, _, _, _ = SyncBatchNormFunction.apply(input, self.weight, self.bias, self.eps, self.process_group,
                                                 world_size, on_batch)
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every BatchNorm layer in ``module`` (recursively) by a bnlib :class:`SyncBatchNorm`.

        Converts torch.nn's ``BatchNorm1d/2d/3d`` (and ``SyncBatchNorm``) and bnlib's
        ``BatchNorm1d/2d/3d``; instance norms and other layers are left alone. Like
        :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`, the new layers take over the old
        layers' parameter and buffer tensors themselves (so device, dtype, values and
        ``requires_grad`` are kept, and an optimizer built before the conversion still sees the
        same parameters), as well as ``eps``, ``momentum``, the flags and the training mode.
        Children are replaced in place; the (possibly new) root is returned, so always use the
        return value::

            model = SyncBatchNorm.convert_sync_batchnorm(model)
        """
        out: Any = module
        if _is_convertible(module):
            bn: Any = module  # a BatchNorm layer: its attributes are BatchNorm's
            for t in list(bn.parameters(recurse=False)) + list(bn.buffers(recurse=False)):
                if nn.parameter.is_lazy(t):
                    raise ValueError(f"cannot convert {type(bn).__name__} with uninitialized (lazy) "
                                     "parameters; run one forward pass first")
            has_bias = bn.bias is not None if bn.affine else True
            out = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                      process_group, device="meta", bias=has_bias)  # placeholders, replaced just below
            if bn.affine:
                out.weight = bn.weight
                if has_bias:
                    out.bias = bn.bias
            if bn.track_running_stats:
                out.running_mean = bn.running_mean
                out.running_var = bn.running_var
                out.num_batches_tracked = bn.num_batches_tracked
            out.train(bn.training)
            if hasattr(module, "qconfig"):
                out.qconfig = bn.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out

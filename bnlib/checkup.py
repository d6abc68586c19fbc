r"""A checkup of the Batch Normalization in a model: the common mistakes, found with evidence.

:func:`checkup` looks at any ``torch.nn.Module`` -- torch.nn's and bnlib's batch-statistics layers alike,
found through the one definition :func:`bnlib.layers.bn_layers` -- and returns a :class:`Report`: a
sequence of :class:`Finding` s, each with the layer's qualified name (``.layer``, as
``model.named_modules()`` gives it), a short stable identifier (``.check``), a message that states the
problem, the evidence measured and the fix (``.message``), and the measured numbers (``.evidence``). The
report prints as a table and converts to plain data (:meth:`Report.to_dict`). A check reports a finding
only when the evidence for it is there; the report also lists the checks that could not run for lack of
input (no batch, no loader, ...).

What is checked (identifier: when it is reported):

* ``bias-before-bn``: a convolution or linear layer with a bias feeds a BN layer directly. BN subtracts
  the per-channel batch mean, so a per-channel constant added before it cancels: the bias gets no
  gradient and only costs memory (BN's shift β does its job).
* ``dropout-before-bn``: dropout feeds a BN layer directly. In training BN's statistics are those of the
  dropped-out activations, at inference dropout is off and the variance the layer sees differs: the
  "variance shift" of Li et al. (2019). With a batch, the ratio of the two variances is measured.
* ``keras-momentum``: ``momentum > 0.5``, as 0.99 would be in Keras's convention (where momentum weighs the
  *old* value). In PyTorch's (and bnlib's) convention it weighs the *new* batch, so the running
  statistics are little more than the last batch's (:func:`bnlib.running_stats.convert_momentum`).
* ``few-values`` (batch given): fewer than ``min_values`` values per channel for a BN layer in training
  (batch size times spatial positions; per ghost batch for Ghost BN). With ``m`` values every normalized
  value lies within :math:`\pm\sqrt{m-1}` (biased variance), whatever the input; with one value the
  layer raises.
* ``stale-stats`` (batch given): the statistics of the layer's input on the batch (computed as in
  training: every BN layer upstream normalizes with its batch's statistics) are far from the running
  ones -- never updated, or left behind by weight averaging, pruning, re-initialisation or a change of
  data. The distance is measured per channel and summarised by its root mean square over the channels:
  the mean's shift in units of the batch's standard deviation, and the factor between the variances.
* ``precise-bn`` (loader given): the running statistics against Precise-BN statistics
  (:func:`bnlib.running_stats.recompute_bn_stats`) over ``num_batches`` batches, with the same distance;
  with a ``metric``, its value before and after recalibration (a finding when it changes by more than
  ``metric_tolerance``).
* ``train-mode-at-eval`` (``evaluating=True``): BN layers in training mode while the caller evaluates
  (``model.eval()`` forgotten): each prediction depends on the rest of the batch, and the running
  statistics move.
* ``eval-bn-learns`` (model in training mode): a BN layer in eval mode -- statistics frozen -- whose γ and
  β still require gradients (the fine-tuning trap: a later ``model.train()`` unfreezes the statistics, and
  the optimizer moves γ and β); ``frozen-affine-batch-stats``, the reverse: γ and β frozen while the layer
  is in training mode, so it still normalizes with batch statistics and its running statistics move.
* ``no-running-stats``: ``track_running_stats=False`` where it is probably not meant: when evaluating
  (predictions then depend on the batch and a batch of one fails), or in a model whose other BN layers do
  keep running statistics.
* ``cumulative-momentum``: ``momentum=None`` in a model in training mode: the running statistics are the
  plain average of every batch since the last reset, the first (from the untrained network) weighing as
  much as the last. (Used on purpose after training, to recompute statistics: not reported in eval mode.)
* ``padding-in-stats`` (batch and ``padding_mask`` given): padded positions of a sequence batch enter the
  batch statistics of a BN layer over time (input ``(N, C, T)``, or ``(N·T, C)`` flattened batch-major).

"Right before a BN layer" is found in one of two ways. With a batch, the model runs once on it and
forward hooks record which module produced each tensor: a module is right before a BN layer when its
output *is* the layer's input (the data flow of the run, so a functional ``F.relu`` in between breaks the
link, and an ``nn.Identity`` is looked through). Without a batch, only the registration order inside
``nn.Sequential`` containers is known: a module directly followed by a BN layer in a ``Sequential`` counts
as right before it; pairs wired by a custom ``forward`` are then not seen.

The model is left exactly as it was: every pass runs under
:func:`bnlib.layers.preserved_state` ``(model, parameters=True)`` (train/eval flags, buffers, parameters,
``requires_grad`` and gradients), without gradients, and with the random number generators forked (the
caller's random stream is not advanced).
"""

from __future__ import annotations

import contextlib
import math
import textwrap
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from .layers import bn_layers, preserved_state
from .running_stats import recompute_bn_stats
from .variants import BatchLayerNorm

__all__ = ["CHECKS", "Finding", "Report", "checkup"]

#: Every check's identifier, with what it looks for (in the order findings are listed).
CHECKS: dict[str, str] = {
    "bias-before-bn": "a convolution/linear bias right before a BN layer (cancelled by BN: no gradient)",
    "dropout-before-bn": "dropout right before a BN layer (variance shift, Li et al. 2019)",
    "keras-momentum": "momentum > 0.5: a value in Keras's convention (PyTorch's weighs the new batch)",
    "few-values": "too few values per channel in training (needs a batch)",
    "stale-stats": "running statistics far from the batch's (needs a batch)",
    "precise-bn": "running statistics against Precise BN over a loader; a metric's change (needs a loader)",
    "train-mode-at-eval": "BN layers in training mode while evaluating (needs evaluating=True)",
    "eval-bn-learns": "a BN layer in eval mode in a model in training whose γ/β still learn",
    "frozen-affine-batch-stats": "γ/β frozen while the BN layer is in training mode (statistics still move)",
    "no-running-stats": "track_running_stats=False where it is probably not meant",
    "cumulative-momentum": "momentum=None in a model in training (a plain average since the start)",
    "padding-in-stats": "padded sequence positions in a BN layer's statistics (needs a batch and padding_mask)",
}

#: A mean shift larger than this many standard deviations (RMS over channels) is reported ...
MEAN_TOLERANCE = 0.5
#: ... and so is a variance off by more than this factor (geometric RMS over channels) ...
VAR_FACTOR_TOLERANCE = 2.0
#: ... provided the shift is also this many times its sampling noise (standard errors), counting only
#: the examples (values at the positions of one example are correlated, so they are not counted).
NOISE_MULTIPLE = 5.0
#: Padded positions are reported when they move the mean by this many standard deviations or the
#: variance by this factor (a deterministic effect: no noise floor).
PADDING_TOLERANCE = (0.05, 1.05)

_DROPOUT_TYPES = (nn.modules.dropout._DropoutNd,)
_BIAS_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


# --------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One problem found: where (``layer``), which check (``check``), what and what to do (``message``).

    ``evidence`` holds the measured numbers behind the message (plain Python values).
    """

    layer: str
    check: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The finding as plain data: ``layer``, ``check``, ``message``, ``evidence``."""
        return {"layer": self.layer, "check": self.check, "message": self.message, "evidence": dict(self.evidence)}


class Report(Sequence[Finding]):
    """The findings of :func:`checkup`, in the order of :data:`CHECKS` and then of the model's layers.

    A sequence of :class:`Finding` (``len``, indexing, iteration); ``str(report)`` is a table;
    :meth:`to_dict` is plain data. ``skipped`` maps each check that could not run to the reason
    (``"needs a batch"``, ...); ``layers`` lists the BN layers examined.
    """

    def __init__(self, findings: Iterable[Finding], layers: Sequence[str], skipped: dict[str, str]) -> None:
        order = {check: i for i, check in enumerate(CHECKS)}
        rank = {name: i for i, name in enumerate(layers)}
        self._findings = sorted(findings, key=lambda f: (order[f.check], rank.get(f.layer, -1)))
        self.layers = tuple(layers)
        self.skipped = dict(skipped)

    def __getitem__(self, index):
        return self._findings[index]

    def __len__(self) -> int:
        return len(self._findings)

    @property
    def checks(self) -> set[str]:
        """The identifiers of the checks that reported something."""
        return {f.check for f in self._findings}

    def to_dict(self) -> dict[str, Any]:
        """Plain data: ``findings`` (a list of :meth:`Finding.to_dict`), ``layers``, ``skipped``."""
        return {"findings": [f.to_dict() for f in self._findings], "layers": list(self.layers),
                "skipped": dict(self.skipped)}

    def __str__(self) -> str:
        head = f"bnlib.checkup: {len(self)} finding(s) in {len(self.layers)} BN layer(s)"
        lines = [head]
        if self._findings:
            w_layer = max(len("layer"), *(len(f.layer or "(model)") for f in self._findings))
            w_check = max(len("check"), *(len(f.check) for f in self._findings))
            width = max(40, 110 - w_layer - w_check - 4)
            lines.append(f"{'layer':<{w_layer}}  {'check':<{w_check}}  message")
            lines.append(f"{'-' * w_layer}  {'-' * w_check}  {'-' * width}")
            for f in self._findings:
                wrapped = textwrap.wrap(f.message, width) or [""]
                lines.append(f"{f.layer or '(model)':<{w_layer}}  {f.check:<{w_check}}  {wrapped[0]}")
                lines.extend(f"{'':<{w_layer}}  {'':<{w_check}}  {rest}" for rest in wrapped[1:])
        for check, why in self.skipped.items():
            lines.append(f"not checked: {check} ({why})")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)


# --------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------


@dataclass
class _Seen:
    """What one BN layer's input looked like in a traced pass."""

    shape: tuple[int, ...]
    values: int                  # values per channel the layer normalizes over in training
    examples: int                # size of dim 0
    mean: Tensor | None = None   # per channel, float64 (None when fewer than two values)
    var: Tensor | None = None    # per channel, unbiased, float64
    padding: tuple[float, float, float] | None = None  # (padded share, mean shift, variance factor)


def _moments(x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-channel mean and unbiased variance of ``x`` (N, C, *) in float64, over ``mask`` (N, *) if given."""
    x = x.detach().to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)  # (C, values)
    if mask is not None:
        x = x[:, mask.reshape(-1)]
    return x.mean(dim=1), x.var(dim=1, correction=1)


def _gap(mean: Tensor, var: Tensor, ref_mean: Tensor, ref_var: Tensor, eps: float) -> tuple[float, float]:
    """How far (mean, var) is from the reference (ref_mean, ref_var), over the channels.

    Returns the RMS over channels of the mean shift in reference standard deviations,
    ``(mean - ref_mean) / sqrt(ref_var + eps)``, and the variance factor ``exp(RMS |ln((var + eps) /
    (ref_var + eps))|)`` (1 when equal; 2 when off by a factor of 2 either way).
    """
    mean, var = mean.double().cpu(), var.double().cpu()
    ref_mean, ref_var = ref_mean.double().cpu(), ref_var.double().cpu()
    shift = ((mean - ref_mean) / (ref_var + eps).sqrt()).square().mean().sqrt()
    log_factor = ((var + eps) / (ref_var + eps)).log().square().mean().sqrt()
    return float(shift), float(log_factor.exp())


def _beyond_noise(shift: float, factor: float, examples: int) -> bool:
    """Whether a gap (from :func:`_gap`) is both large and several standard errors beyond sampling noise.

    With ``n`` independent examples the mean's standard error is ``1/sqrt(n)`` standard deviations and the
    log-variance's ``sqrt(2/(n-1))``.
    """
    n = max(examples, 2)
    mean_floor = max(MEAN_TOLERANCE, NOISE_MULTIPLE / math.sqrt(n))
    factor_floor = max(VAR_FACTOR_TOLERANCE, math.exp(NOISE_MULTIPLE * math.sqrt(2.0 / (n - 1))))
    return shift > mean_floor or factor > factor_floor


def _values_per_channel(layer: nn.Module, shape: tuple[int, ...]) -> int:
    """Values each channel's training statistics are computed over (per ghost batch for Ghost BN)."""
    n = shape[0]
    vbs = getattr(layer, "virtual_batch_size", None)
    if isinstance(vbs, int) and vbs > 0:
        n = min(n, vbs)
    return n * math.prod(shape[2:])


def _input_of(batch: Any) -> Tensor:
    """The model's input in a batch: the batch itself, or the first element of a tuple/list (x, y)."""
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if not isinstance(x, Tensor):
        raise TypeError(f"checkup() expects a batch that is a tensor, or a tuple/list whose first element is "
                        f"the input tensor (as a DataLoader yields); got {type(x).__name__}")
    return x


def _model_device(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for b in model.buffers():
        return b.device
    return None


def _check_device(x: Tensor, device: torch.device | None, what: str) -> None:
    if device is not None and x.device != device:
        raise ValueError(f"checkup(): {what} is on {x.device} but the model is on {device}; move one of them "
                         f"(e.g. batch.to({str(device)!r})) so that they are on the same device")


def _cannot_run(exc: Exception, x: Tensor, what: str) -> ValueError:
    """The error for a model that raised ``exc`` on ``x``: names the batch's shape and the model's error."""
    return ValueError(f"checkup(): the model cannot run on {what} of shape {tuple(x.shape)} and dtype {x.dtype} "
                      f"({type(exc).__name__}: {exc}); pass a batch that model(batch) accepts, on the model's device")


@contextlib.contextmanager
def _untouched(model: nn.Module, device: torch.device | None) -> Iterator[None]:
    """The model restored bit for bit, no gradients, and the caller's random streams left where they were."""
    devices = [device.index or 0] if device is not None and device.type == "cuda" else []
    with preserved_state(model, parameters=True), torch.no_grad(), torch.random.fork_rng(devices=devices):
        yield


class _Trace:
    """Forward hooks that record, during one pass, which module produced each BN layer's input and
    what that input's statistics were."""

    def __init__(self, model: nn.Module, bns: dict[str, nn.Module], mask: Tensor | None) -> None:
        self.bns, self.mask = bns, mask
        self.names = {m: name for name, m in model.named_modules()}
        self.producer: dict[int, tuple[weakref.ref[Tensor], str]] = {}  # id(tensor) -> (tensor, module name)
        self.before: dict[str, set[str]] = {name: set() for name in bns}
        self.seen: dict[str, _Seen] = {}
        self.running: str | None = None  # the BN layer whose forward started last and has not ended
        self.handles = []
        bn_set = set(bns.values())
        for m in self.names:
            if m in bn_set:
                self.handles.append(m.register_forward_pre_hook(self._bn_input))
                self.handles.append(m.register_forward_hook(self._produced))
            elif not any(True for _ in m.children()) and not isinstance(m, nn.Identity):
                self.handles.append(m.register_forward_hook(self._produced))

    def _produced(self, module: nn.Module, inputs, output) -> None:
        if isinstance(output, Tensor):
            self.producer[id(output)] = (weakref.ref(output), self.names[module])
        if self.names[module] == self.running:
            self.running = None

    def _bn_input(self, module: nn.Module, inputs) -> None:
        name = self.names[module]
        self.running = name
        x = inputs[0] if inputs else None
        if not isinstance(x, Tensor) or x.dim() < 2:
            return
        ref = self.producer.get(id(x))
        if ref is not None and ref[0]() is x:
            self.before[name].add(ref[1])
        if name in self.seen:  # a layer called twice: the first call's statistics
            return
        shape = tuple(x.shape)
        seen = _Seen(shape, _values_per_channel(module, shape), shape[0])
        if x.numel() // x.shape[1] >= 2:
            seen.mean, seen.var = _moments(x)
            seen.padding = self._padding(x, module, seen)
        self.seen[name] = seen

    def _padding(self, x: Tensor, module: nn.Module, seen: _Seen) -> tuple[float, float, float] | None:
        """Padded share and how the padded positions move the statistics, for a BN layer over time."""
        if self.mask is None:
            return None
        n, t = self.mask.shape
        if x.dim() == 3 and x.shape[0] == n and x.shape[2] == t:
            real = ~self.mask                                   # (N, T) against x (N, C, T)
        elif x.dim() == 2 and x.shape[0] == n * t:
            real = (~self.mask).reshape(n * t)                  # (N·T,) against x (N·T, C)
        else:
            return None
        share = 1.0 - float(real.double().mean())
        if share == 0.0 or int(real.sum()) < 2:
            return None
        assert seen.mean is not None and seen.var is not None  # set by _bn_input before it calls this
        mean_real, var_real = _moments(x, real.to(x.device))
        shift, factor = _gap(seen.mean, seen.var, mean_real, var_real, cast(float, module.eps))
        return share, shift, factor

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _sequential_pairs(model: nn.Module, bns: dict[str, nn.Module]) -> dict[str, set[str]]:
    """For each BN layer, the module registered right before it in an ``nn.Sequential`` (Identity skipped)."""
    names = {m: name for name, m in model.named_modules()}
    before: dict[str, set[str]] = {name: set() for name in bns}
    bn_names = {m: name for name, m in bns.items()}
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        prev = None
        for child in seq.children():
            if child in bn_names and prev is not None:
                before[bn_names[child]].add(names[prev])
            if not isinstance(child, nn.Identity):
                prev = child
    return before


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


# --------------------------------------------------------------------------
# The checkup
# --------------------------------------------------------------------------


def checkup(
    model: nn.Module,
    batch: Any = None,
    *,
    loader: Iterable | None = None,
    num_batches: int = 10,
    metric: Callable[[nn.Module], float] | None = None,
    metric_tolerance: float = 0.01,
    evaluating: bool = False,
    padding_mask: Tensor | None = None,
    min_values: int = 8,
) -> Report:
    """Examine the BN layers of ``model`` for the common mistakes; return a :class:`Report`.

    Args:
        model: any ``torch.nn.Module``; its BN layers are :func:`bnlib.layers.bn_layers` (torch.nn's and
            bnlib's). Left exactly as it was.
        batch: a training batch: a tensor, or a tuple/list whose first element is the input tensor (as a
            DataLoader yields ``(x, y)``), on the model's device. Enables the checks that need the data
            (``few-values``, ``stale-stats``, ``padding-in-stats``, the measured variance shift of
            ``dropout-before-bn``) and the traced "right before" (see the module docstring). Without
            it, the first batch of ``loader`` is used, if there is one. With ``evaluating=True``, a batch
            of the evaluation data (``few-values``, a property of training batches, is then not checked).
        loader: an iterable of such batches (a DataLoader of training data); its first ``num_batches``
            batches are used for Precise BN (``precise-bn``).
        num_batches: how many batches of ``loader`` to use.
        metric: ``metric(model) -> float`` (e.g. accuracy or loss on held-out data), called on the model in
            eval mode with its own statistics and with Precise-BN statistics; needs ``loader``.
        metric_tolerance: a metric change larger than this is reported.
        evaluating: the caller evaluates (or deploys) the model: BN layers must be in eval mode.
        padding_mask: for a batch of padded sequences, a bool tensor ``(N, T)``, True at padded positions
            (the convention of ``torch.nn.MultiheadAttention``'s ``key_padding_mask``).
        min_values: fewer values per channel than this in training is reported (``few-values``).

    Returns:
        Report: the findings (empty when nothing is wrong), the BN layers examined and the checks skipped.

    Raises:
        TypeError: ``model`` is not a module, or a batch is not a tensor (or a tuple starting with one).
        ValueError: a batch on another device than the model, one the model cannot run on (the model's
            error is chained), a ``loader`` that yields no batch, a malformed ``padding_mask``, a
            ``metric`` without ``loader`` or returning no number.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"checkup() expects a torch.nn.Module, got {type(model).__name__}")
    if metric is not None and loader is None:
        raise ValueError("checkup(): metric needs a loader (its batches recalibrate the statistics)")
    if not isinstance(min_values, int) or min_values < 2:
        raise ValueError(f"checkup(): min_values must be an int >= 2, got {min_values!r}")
    bns = bn_layers(model)
    names = list(bns)
    device = _model_device(model)
    findings: list[Finding] = []
    skipped: dict[str, str] = {}

    loader_batches: list[Tensor] = []
    if loader is not None:
        if not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"checkup(): num_batches must be a positive int, got {num_batches!r}")
        for b in loader:
            loader_batches.append(_input_of(b))
            if len(loader_batches) == num_batches:
                break
        if not loader_batches:
            raise ValueError("checkup(): the loader yielded no batches; pass a loader over (training) data")
        for i, xb in enumerate(loader_batches):
            _check_device(xb, device, f"batch {i} of the loader")
    x = _input_of(batch) if batch is not None else (loader_batches[0] if loader_batches else None)
    if x is not None:
        _check_device(x, device, "the batch")
    mask = _check_mask(padding_mask, x)

    # ---- one traced pass on the batch: BN layers in training mode, everything else in eval mode
    seen: dict[str, _Seen] = {}
    before: dict[str, set[str]] | None = None
    raised: str | None = None  # the BN layer that raised on too few values
    if x is not None and bns:
        seen, before, raised = _trace(model, bns, x, mask, device)
    if before is None:
        before = _sequential_pairs(model, bns)
    modules = dict(model.named_modules())

    # ---- structure
    for name, bn in bns.items():
        for prev_name in sorted(before[name]):
            prev = modules[prev_name]
            finding = _bias_before(model, name, bn, prev_name, prev, seen.get(name))
            if finding is not None:
                findings.append(finding)
            if isinstance(prev, _DROPOUT_TYPES) and prev.p > 0:
                findings.append(_dropout_before(model, bns, name, bn, prev_name, prev, x, device, seen))
    # ---- configuration
    tracking = [name for name, bn in bns.items() if getattr(bn, "running_mean", None) is not None]
    for name, bn in bns.items():
        momentum = getattr(bn, "momentum", 0.1)
        if momentum is not None and momentum > 0.5:
            findings.append(Finding(name, "keras-momentum", (
                f"momentum={momentum:g}: in PyTorch's convention (bnlib's too) momentum weighs the NEW batch, "
                f"running = (1 - {momentum:g}) * running + {momentum:g} * batch, so the running statistics are "
                f"essentially the last batch's ({momentum:.0%} of it). {momentum:g} is a typical Keras value, "
                f"where momentum weighs the old value: Keras's {momentum:g} is PyTorch's {1 - momentum:.2g} "
                f"(bnlib.running_stats.convert_momentum({momentum:g}, 'keras', 'torch')). Fix: "
                f"momentum={1 - momentum:.2g}, or PyTorch's default 0.1."), {"momentum": float(momentum)}))
        if momentum is None and name in tracking and model.training:
            tracked = getattr(bn, "num_batches_tracked", None)
            n = int(tracked) if tracked is not None else 0
            findings.append(Finding(name, "cumulative-momentum", (
                f"momentum=None in a model in training mode: the running statistics are the plain average of "
                f"every batch since the last reset ({n} so far; the next one weighs 1/{n + 1}), so the statistics "
                f"of the first batches, computed by the untrained network, weigh as much as the last ones and the "
                f"average trails the network. momentum=None is meant for recomputing statistics "
                f"after training (Precise BN: bnlib.running_stats.recompute_bn_stats). Fix: a momentum such as "
                f"0.1 while training."), {"num_batches_tracked": n}))
        if name not in tracking:
            why = None
            if evaluating:
                why = ("the model is being evaluated: without running statistics the layer normalizes every "
                       "batch with that batch's own statistics also in eval mode, so each prediction depends on "
                       "the other examples of the batch, and a batch of one fails")
            elif tracking:
                why = (f"the model's other {len(tracking)} BN layer(s) keep running statistics, so this one "
                       f"looks like a slip: in eval mode it alone still normalizes with the batch's statistics "
                       f"(predictions depend on the rest of the batch)")
            if why is not None:
                findings.append(Finding(name, "no-running-stats", (
                    f"track_running_stats=False: {why}. Fix: track_running_stats=True (the default), then "
                    f"train or recompute the statistics (bnlib.running_stats.recompute_bn_stats)."),
                    {"evaluating": bool(evaluating), "tracking_layers": len(tracking)}))
    # ---- modes
    bn_params = {id(p) for bn in bns.values() for p in bn.parameters()}
    trains_others = any(p.requires_grad for p in model.parameters() if id(p) not in bn_params)
    for name, bn in bns.items():
        affine = [p for p in (getattr(bn, "weight", None), getattr(bn, "bias", None)) if isinstance(p, nn.Parameter)]
        if evaluating and bn.training:
            findings.append(Finding(name, "train-mode-at-eval", (
                "in training mode while the model is being evaluated (model.eval() forgotten?): it normalizes "
                "with each batch's statistics, so every prediction depends on the rest of the batch, and its "
                "running statistics move with the evaluation data. Fix: model.eval() before evaluating."),
                {"training": True}))
        if evaluating or not model.training:
            continue
        if not bn.training and name in tracking and any(p.requires_grad for p in affine):
            findings.append(Finding(name, "eval-bn-learns", (
                "in eval mode inside a model in training mode, with γ/β still requiring gradients: its "
                "statistics are frozen but the optimizer moves γ and β, and the next model.train() puts the "
                "layer back into training mode (statistics unfrozen). Fix: to freeze the layer for good, "
                "bnlib.freeze_batchnorm(model, train_affine=...) (stays frozen through model.train(); "
                "train_affine=True keeps γ/β learning on purpose); to train it, model.train()."),
                {"training": False, "affine_requires_grad": True}))
        if bn.training and affine and not any(p.requires_grad for p in affine) and trains_others:
            findings.append(Finding(name, "frozen-affine-batch-stats", (
                "γ and β do not require gradients, but the layer is in training mode: it still normalizes "
                "with batch statistics and its running statistics keep moving, so it is not frozen. Fix: "
                "bnlib.freeze_batchnorm(model) (fixed statistics, in both modes), or bn.eval() after every "
                "model.train()."), {"training": True, "affine_requires_grad": False}))

    # ---- the batch
    if x is None:
        for check in ("few-values", "stale-stats"):
            skipped[check] = "needs a batch"
    elif evaluating:  # an evaluation batch says nothing about the size of the training batches
        skipped["few-values"] = "the batch is an evaluation batch: evaluating=True"
    if raised is not None and not evaluating:
        s = seen[raised]
        findings.append(Finding(raised, "few-values", (
            f"raises in training on this batch: its input {_fmt_shape(s.shape)} has {s.values} value per "
            f"channel, and batch statistics need at least two (a batch of one). Fix: larger batches (e.g. "
            f"drop_last=True in the DataLoader so that no last batch of one is left), or eval mode for single "
            f"examples."), {"values_per_channel": s.values, "shape": list(s.shape)}))
    for name, s in seen.items():
        bn = bns[name]
        if name != raised and s.values < min_values and not _frozen(model, bn) and not evaluating:
            bound = math.sqrt(s.values - 1)
            findings.append(Finding(name, "few-values", (
                f"{s.values} values per channel in training (input {_fmt_shape(s.shape)}"
                f"{', per ghost batch' if hasattr(bn, 'virtual_batch_size') else ''}): with m values every "
                f"normalized value lies within ±sqrt(m - 1) = ±{bound:.2g} whatever the input, and the "
                f"statistics are noisy. Fix: larger batches, or a normalization without batch statistics "
                f"(GroupNorm, LayerNorm), or frozen statistics (bnlib.freeze_batchnorm)."),
                {"values_per_channel": s.values, "bound": bound}))
        if name in tracking and s.mean is not None:
            assert s.var is not None  # _Trace sets mean and var together
            # a tracking layer: BN's running buffers are tensors (``tracking`` checked running_mean is not None)
            running_mean, running_var = cast(Tensor, bn.running_mean), cast(Tensor, bn.running_var)
            shift, factor = _gap(running_mean, running_var, s.mean, s.var, cast(float, bn.eps))
            if _beyond_noise(shift, factor, s.examples):
                tracked = getattr(bn, "num_batches_tracked", None)
                never = tracked is not None and int(tracked) == 0
                findings.append(Finding(name, "stale-stats", (
                    f"running statistics far from this batch's: the running mean is off by {shift:.2f} standard "
                    f"deviations and the running variance by a factor {factor:.2f} (RMS over {s.mean.numel()} "
                    f"channels; {s.examples} examples)"
                    + ("; num_batches_tracked is 0: never updated" if never else "")
                    + ". In eval mode the layer normalizes with the wrong statistics (after weight averaging, "
                      "pruning, re-initialisation or a change of data). Fix: recompute them "
                      "(bnlib.running_stats.recompute_bn_stats(model, training_batches))."),
                    {"mean_shift": shift, "var_factor": factor, "examples": s.examples, "never_updated": never}))
    # ---- padding
    if padding_mask is None:
        skipped["padding-in-stats"] = "needs a batch and padding_mask"
    for name, s in seen.items():
        if s.padding is None:
            continue
        share, shift, factor = s.padding
        if shift > PADDING_TOLERANCE[0] or factor > PADDING_TOLERANCE[1]:
            findings.append(Finding(name, "padding-in-stats", (
                f"{share:.0%} of the positions this layer normalizes over (input {_fmt_shape(s.shape)}) are "
                f"padding: they enter its batch mean and variance, which move by {shift:.2f} standard deviations "
                f"and a factor {factor:.2f} against the real positions' (RMS over channels), and with them the "
                f"output at real positions and the running statistics. Fix: statistics over real positions only "
                f"(bnlib.StepBatchNorm(..., masked=True) for per-step statistics), or batches of similar lengths."),
                {"padded_share": share, "mean_shift": shift, "var_factor": factor}))
    # ---- Precise BN over the loader
    if loader is None:
        skipped["precise-bn"] = "needs a loader"
    elif tracking:
        findings.extend(_precise(model, bns, tracking, loader_batches, metric, metric_tolerance, device))
    return Report(findings, names, skipped)


def _check_mask(padding_mask: Tensor | None, x: Tensor | None) -> Tensor | None:
    if padding_mask is None:
        return None
    if x is None:
        raise ValueError("checkup(): padding_mask needs a batch (the padded batch it describes)")
    if not isinstance(padding_mask, Tensor) or padding_mask.dtype != torch.bool or padding_mask.dim() != 2:
        raise ValueError("checkup(): padding_mask must be a bool tensor (N, T), True at padded positions; got "
                         + (f"{padding_mask.dtype} of shape {tuple(padding_mask.shape)}"
                            if isinstance(padding_mask, Tensor) else type(padding_mask).__name__))
    if padding_mask.shape[0] != x.shape[0]:
        raise ValueError(f"checkup(): padding_mask has {padding_mask.shape[0]} rows but the batch has "
                         f"{x.shape[0]} examples")
    return padding_mask


def _training_modes(model: nn.Module, bns: dict[str, nn.Module]) -> None:
    """Modes for measuring: BN layers as in training (frozen ones stay in eval mode), everything else in eval."""
    frozen = {bn for bn in bns.values() if _frozen(model, bn)}
    model.eval()
    for bn in bns.values():
        if bn not in frozen:
            bn.train()


def _frozen(model: nn.Module, bn: nn.Module) -> bool:
    """A BN layer in eval mode inside a model in training mode: it trains with its running statistics."""
    return model.training and not bn.training


def _trace(model, bns, x, mask, device):
    """One pass on ``x`` with BN layers as in training (everything else in eval mode), recorded by a
    :class:`_Trace`; returns (what each BN layer saw, who fed it, the layer that raised on one value)."""
    trace = _Trace(model, bns, mask)
    try:
        with _untouched(model, device):
            _training_modes(model, bns)
            try:
                model(x)
            except Exception as exc:  # noqa: BLE001 - a batch of one, or re-raised as a clear error
                raised = trace.running
                if raised is None or raised not in trace.seen or trace.seen[raised].values > 1:
                    raise _cannot_run(exc, x, "the batch") from exc
            else:
                return trace.seen, trace.before, None
    finally:
        trace.remove()
    # A batch of one stopped the pass at ``raised``: the structure comes from a pass in eval mode.
    structure = _Trace(model, bns, None)
    try:
        with _untouched(model, device):
            model.eval()
            model(x)
        before = structure.before
    except Exception:  # noqa: BLE001 - e.g. layers without running statistics: registration order instead
        before = None
    finally:
        structure.remove()
    return trace.seen, before, raised


def _bias_before(model, name, bn, prev_name, prev, seen) -> Finding | None:
    """``bias-before-bn`` for the module ``prev`` right before the BN layer ``bn``, when its bias is dead."""
    if not isinstance(prev, _BIAS_TYPES) or prev.bias is None:
        return None
    if isinstance(bn, BatchLayerNorm):  # its per-example half is not invariant to a per-channel shift
        return None
    if _frozen(model, bn):  # it trains with fixed statistics: the bias still acts
        return None
    if isinstance(prev, nn.Linear):
        if prev.out_features != bn.num_features or (seen is not None and len(seen.shape) != 2):
            return None  # the bias runs along another dimension than BN's channels
    elif prev.out_channels != bn.num_features:
        return None
    kind = type(prev).__name__
    size = prev.bias.numel()
    return Finding(name, "bias-before-bn", (
        f"{prev_name} ({kind}) right before this layer has a bias ({size} values): BN subtracts each channel's "
        f"batch mean, so the bias cancels, gets no gradient and only costs memory (BN's β is the shift). Fix: "
        f"bias=False on {prev_name}."), {"before": prev_name, "bias_size": size})


def _dropout_before(model, bns, name, bn, prev_name, prev, x, device, seen) -> Finding:
    """``dropout-before-bn``, with the variance shift measured on the batch when there is one."""
    evidence: dict[str, Any] = {"before": prev_name, "p": float(prev.p)}
    measured = ""
    if x is not None and name in seen and seen[name].var is not None:
        train = _Trace(model, {name: bn}, None)
        try:
            with _untouched(model, device):
                _training_modes(model, bns)
                prev.train()
                model(x)
        finally:
            train.remove()
        var_train = train.seen[name].var if name in train.seen else None
        if var_train is not None:
            factor = float(var_train.mean() / seen[name].var.mean())
            evidence["variance_ratio"] = factor
            measured = (f" Measured on the batch: the variance of this layer's input is {factor:.2f} times larger "
                        f"with dropout on (training) than off (inference), averaged over channels.")
    return Finding(name, "dropout-before-bn", (
        f"{prev_name} (dropout, p={prev.p:g}) right before this layer: BN's running variance is accumulated "
        f"with dropout on and applied with dropout off, so at inference the layer rescales its input wrongly "
        f"(the variance shift of Li et al. 2019).{measured} Fix: put dropout after the last BN layer (or "
        f"before a layer without batch statistics), or lower p."), evidence)


def _precise(model, bns, tracking, batches, metric, tolerance, device) -> list[Finding]:
    """``precise-bn``: the running statistics against Precise BN's over ``batches``; a metric's change."""
    findings = []
    examples = sum(int(b.shape[0]) for b in batches)
    before_metric: float | None = None
    after_metric: float | None = None
    if metric is not None:
        with _untouched(model, device):
            model.eval()
            before_metric = _call_metric(metric, model)
    with _untouched(model, device):
        running = {name: (bns[name].running_mean.clone(), bns[name].running_var.clone()) for name in tracking}
        try:
            moments = recompute_bn_stats(model, batches, num_batches=len(batches))
        except Exception as exc:  # noqa: BLE001 - re-raised naming the loader
            raise ValueError(f"checkup(): Precise BN over the loader's {len(batches)} batch(es) failed "
                             f"({type(exc).__name__}: {exc}); pass a loader of batches that model(batch) accepts, "
                             f"with at least two values per channel in all") from exc
        if metric is not None:
            model.eval()
            after_metric = _call_metric(metric, model)
    for name in tracking:
        m = moments[name]
        assert m.mean is not None  # recompute_bn_stats raises for a layer that saw no data
        shift, factor = _gap(running[name][0], running[name][1], m.mean, m.var(unbiased=True), bns[name].eps)
        if _beyond_noise(shift, factor, examples):
            findings.append(Finding(name, "precise-bn", (
                f"running statistics far from Precise BN's over {len(batches)} batch(es) ({examples} examples): "
                f"the running mean is off by {shift:.2f} standard deviations and the running variance by a "
                f"factor {factor:.2f} (RMS over {m.mean.numel()} channels). Fix: "
                f"bnlib.running_stats.recompute_bn_stats(model, training_batches) after training (or after any "
                f"change to the weights)."), {"mean_shift": shift, "var_factor": factor, "examples": examples}))
    if before_metric is not None and after_metric is not None and abs(after_metric - before_metric) > tolerance:
        findings.append(Finding("", "precise-bn", (
            f"recalibrating the BN statistics with Precise BN over {len(batches)} batch(es) changes the metric "
            f"from {before_metric:.4g} to {after_metric:.4g} ({after_metric - before_metric:+.4g}, more than "
            f"{tolerance:g}). Fix: bnlib.running_stats.recompute_bn_stats(model, training_batches) before "
            f"evaluating (more batches give a better estimate)."),
            {"metric_before": before_metric, "metric_after": after_metric}))
    return findings


def _call_metric(metric, model) -> float:
    value = metric(model)
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"checkup(): metric(model) must return a finite number, got {value!r}")
    return float(value)

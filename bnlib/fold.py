"""Folding BatchNorm into the preceding convolution or linear layer.

At inference time a BatchNorm layer in eval mode no longer looks at the
batch: it applies a fixed per-channel affine map built from its running
statistics ``mu``, ``sigma^2`` and its learned parameters ``gamma``, ``beta``.
When that map is applied directly to the output of a linear operation
``y = W x + b`` (a ``Conv1d/2d/3d``, a ``ConvTranspose1d/2d/3d`` or a
``Linear``), the two maps compose into a single linear operation. With the
per-output-channel scale

    s_c = gamma_c / sqrt(sigma^2_c + eps)

the folded layer has

    W'_c = s_c * W_c                      (every weight feeding output channel c)
    b'_c = (b_c - mu_c) * s_c + beta_c    (b_c = 0 when the layer had no bias)

and ``BN(W x + b) == W' x + b'`` exactly (up to rounding). For
``affine=False`` use ``gamma = 1`` and ``beta = 0``. The chapter
"Batch normalization in convolutional networks" derives this and explains why
the scale is per *output* channel: a BatchNorm2d after a convolution normalizes
each feature map with one set of statistics shared over the batch and all
spatial positions, which is what makes the fold possible.

Public API
----------
``fold_batchnorm(model, strict=True, method="auto") -> nn.Module``
    Returns a folded deep copy in eval mode; the argument is never modified.
    Every folded BN is replaced by ``nn.Identity`` and the layer before it gets
    the folded weight and a (possibly new) bias. The report of what was done is
    attached to the result and can be read with ``fold_report(folded)``.
``fold_batchnorm_with_report(model, strict=True, method="auto")``
    Same, returning ``(folded_model, FoldReport)``.
``fold_report(folded_model) -> FoldReport``
    ``.folded``: list of ``(layer_name, bn_name)`` pairs that were folded;
    ``.skipped``: list of ``(bn_name, reason)`` for every BN left in place;
    ``.method``: ``"fx"`` or ``"sequential"``, the detection used.
``count_batchnorms(model) -> int``, ``is_batchnorm(module) -> bool``.

How "directly follows" is decided
---------------------------------
``method="fx"`` traces a deep copy with ``torch.fx`` (BN layers, including
bnlib's own, and the foldable layers are kept as leaf modules). A BN call is
folded when its only argument is the output of a single call of a foldable
layer, that output has no other user, and neither the layer nor the BN module
is called anywhere else in the graph. This handles arbitrary ``forward``
methods, e.g. a residual block that does ``self.bn1(self.conv1(x))`` and adds
a skip connection.

``method="sequential"`` only looks at consecutive children of containers whose
``forward`` is ``nn.Sequential.forward``: there the output of child ``i`` goes
to child ``i + 1`` and nowhere else. BN layers anywhere else cannot be
analysed and are reported as not foldable.

``method="auto"`` (default) uses fx and falls back to the Sequential rule if
the model cannot be symbolically traced (e.g. data-dependent control flow).

What is refused
---------------
A BN is left in place (``strict=False``) or reported in a ``FoldError``
(``strict=True``; the error lists every offending BN by qualified name and
reason) when:

* its input is not the output of a foldable layer (e.g. it follows a ReLU,
  a pooling, an addition), or that output is also used elsewhere;
* it has ``track_running_stats=False`` or no running buffers: such a BN
  normalizes with batch statistics even in eval mode, so it is not an affine
  map and cannot be folded;
* the layer or BN is called more than once (shared modules), has forward
  hooks or parametrizations (``weight_norm``, ``spectral_norm``, ...), or the
  layer is a subclass that overrides ``forward`` (e.g. a weight-standardized
  conv) -- folding into the stored weight would then be wrong;
* channel counts do not match, or the BN is never called.

Accepted layers: ``nn.Conv1d/2d/3d`` (any ``groups``, hence depthwise; any
``padding_mode``), ``nn.ConvTranspose1d/2d/3d`` (weight layout
``(in, out/groups, k...)`` handled group-wise) and ``nn.Linear``. For
``Linear -> BatchNorm1d`` the BN must see a ``(N, C)`` input (the usual case);
a ``Linear`` applied to ``(N, L, C)`` followed by ``BatchNorm1d`` would
normalize dimension ``L`` and is not a per-output-feature map -- such a model
would almost always fail the channel-count check, but fx cannot see shapes,
so this assumption is the caller's responsibility.

The fold is computed in float64 and cast back to the parameter dtype, so in
float32 the folded model matches the unfolded eval model to about 1e-6.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from .layers import BATCH_NORM_TYPES, is_batchnorm
from .variants import BatchLayerNorm

__all__ = [
    "FoldError",
    "FoldReport",
    "count_batchnorms",
    "fold_batchnorm",
    "fold_batchnorm_with_report",
    "fold_report",
    "is_batchnorm",
]

_REPORT_ATTR = "_bnlib_fold_report"

# Layers we know how to fold into, identified by their *forward* function so that
# subclasses with a different forward (weight standardization, QAT, ...) are refused.
_FOLDABLE_FORWARDS = {
    nn.Conv1d.forward,
    nn.Conv2d.forward,
    nn.Conv3d.forward,
    nn.ConvTranspose1d.forward,
    nn.ConvTranspose2d.forward,
    nn.ConvTranspose3d.forward,
    nn.Linear.forward,
}
_FOLDABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                   nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


class FoldError(ValueError):
    """Raised by ``fold_batchnorm(..., strict=True)`` when a BN cannot be folded."""


@dataclass
class FoldReport:
    """What ``fold_batchnorm`` did: folded pairs, skipped BNs with reasons, method."""

    method: str
    folded: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


# --------------------------------------------------------------------------- helpers

def count_batchnorms(model: nn.Module) -> int:
    """Number of distinct BatchNorm modules in ``model`` (including itself)."""
    return sum(1 for m in model.modules() if is_batchnorm(m))


def _name(qualname: str) -> str:
    return qualname if qualname else "<root>"


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _layer_problem(layer: nn.Module) -> str | None:
    if not isinstance(layer, _FOLDABLE_TYPES):
        return f"its input comes from a {type(layer).__name__}, not a Conv/ConvTranspose/Linear"
    if type(layer).forward not in _FOLDABLE_FORWARDS:
        return f"the preceding {type(layer).__name__} overrides forward()"
    if torch.nn.utils.parametrize.is_parametrized(layer) or _has_hooks(layer):
        return "the preceding layer has parametrizations or forward hooks"
    if isinstance(layer.weight, nn.parameter.UninitializedParameter):
        return "the preceding layer is uninitialized (lazy)"
    return None


def _bn_problem(bn: nn.Module) -> str | None:
    if not getattr(bn, "track_running_stats", False) or bn.running_mean is None \
            or bn.running_var is None:
        return ("track_running_stats=False: it normalizes with batch statistics "
                "even in eval mode, so it is not an affine map")
    if isinstance(bn.running_mean, nn.parameter.UninitializedBuffer):
        return "it is uninitialized (lazy)"
    if isinstance(bn, BatchLayerNorm):
        return ("it is a BatchLayerNorm: its per-example (layer-norm) half makes the eval-mode output "
                "depend on each example, so it is not an affine map")
    var = bn.running_var.detach()
    if not bool(torch.isfinite(var).all()) or bool((var < 0).any()) or not bool(torch.isfinite(bn.running_mean).all()):
        return ("its running_var/running_mean holds NaN, Inf or negative values: folding would give "
                "non-finite weights (recompute the statistics, e.g. with bnlib.running_stats.precise_bn)")
    if _has_hooks(bn):
        return "it has forward hooks"
    return None


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


@torch.no_grad()
def _fold_pair(layer: nn.Module, bn: nn.Module) -> None:
    """Fold eval-mode ``bn`` into ``layer`` in place (float64 math)."""
    w = layer.weight
    dt = torch.float64
    var = bn.running_var.to(dt)
    mean = bn.running_mean.to(dt)
    scale = torch.rsqrt(var + bn.eps)
    shift = torch.zeros_like(mean)
    if bn.affine and bn.weight is not None:
        scale = scale * bn.weight.to(dt)
    if bn.affine and bn.bias is not None:
        shift = bn.bias.to(dt)

    w64 = w.to(dt)
    k = w.dim() - 2  # number of kernel dims (0 for Linear)
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        # weight: (in, out/groups, *k); output channel g*(out/groups)+j sits in
        # block g (rows) and column j.
        g = layer.groups
        cin, cpg = w.shape[0], w.shape[1]
        w_new = (w64.reshape(g, cin // g, cpg, *w.shape[2:])
                 * scale.reshape(g, 1, cpg, *([1] * k))).reshape(w.shape)
    else:
        # Conv / Linear weight: (out, in/groups, *k) or (out, in).
        w_new = w64 * scale.reshape(-1, *([1] * (w.dim() - 1)))

    b = layer.bias.to(dt) if layer.bias is not None else torch.zeros_like(mean)
    b_new = (b - mean) * scale + shift

    # New Parameter objects (not in-place): a weight tied to another module is untied
    # rather than silently changing that other module.
    layer.weight = nn.Parameter(w_new.to(w.dtype), requires_grad=w.requires_grad)
    bias_dtype = layer.bias.dtype if layer.bias is not None else w.dtype
    layer.bias = nn.Parameter(b_new.to(device=w.device, dtype=bias_dtype),
                              requires_grad=w.requires_grad)


def _set_module(root: nn.Module, qualname: str, new: nn.Module) -> None:
    parent_name, _, attr = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


# --------------------------------------------------------------------- detection

def _pairs_fx(model: nn.Module, names: dict[int, str]):
    """Return (pairs, skipped) using torch.fx; raises if the model is not traceable."""
    bn_types = BATCH_NORM_TYPES

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):  # noqa: D401
            return isinstance(m, (bn_types, _FOLDABLE_TYPES)) \
                or super().is_leaf_module(m, qualname)

    graph = _Tracer().trace(model)

    calls: dict[int, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            m = model.get_submodule(node.target)
            calls[id(m)] = calls.get(id(m), 0) + 1

    pairs, skipped, seen = [], [], set()
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        bn = model.get_submodule(node.target)
        if not isinstance(bn, bn_types) or id(bn) in seen:
            continue
        seen.add(id(bn))
        bn_name = names[id(bn)]
        reason = _bn_problem(bn)
        if reason is None and calls[id(bn)] != 1:
            reason = f"the BN module is called {calls[id(bn)]} times"
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if reason is None and (src is None or not isinstance(src, fx.Node)
                               or src.op != "call_module"):
            what = "its input" if src is None else f"its input ({getattr(src, 'name', src)})"
            reason = f"{what} is not the output of a Conv/ConvTranspose/Linear module"
        layer = None
        if reason is None:
            layer = model.get_submodule(src.target)
            reason = _layer_problem(layer)
        if reason is None and calls[id(layer)] != 1:
            reason = f"the preceding layer {names[id(layer)]!r} is called {calls[id(layer)]} times"
        if reason is None and len(src.users) != 1:
            reason = (f"the output of the preceding layer {names[id(layer)]!r} is also "
                      f"used elsewhere ({len(src.users)} users)")
        if reason is None and _out_channels(layer) != bn.num_features:
            reason = (f"channel mismatch: layer has {_out_channels(layer)} outputs, "
                      f"BN has num_features={bn.num_features}")
        if reason is None:
            pairs.append((layer, bn))
        else:
            skipped.append((bn_name, reason))

    for m in model.modules():
        if isinstance(m, bn_types) and id(m) not in seen:
            skipped.append((names[id(m)], "it is never called in the traced forward()"))
    return pairs, skipped


def _pairs_sequential(model: nn.Module, names: dict[int, str], why: str):
    bn_types = BATCH_NORM_TYPES
    refs: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        refs[id(m)] = refs.get(id(m), 0) + 1

    pairs, found = [], {}
    for container in model.modules():
        if not isinstance(container, nn.Sequential) \
                or type(container).forward is not nn.Sequential.forward:
            continue
        children = list(container.children())
        for prev, bn in zip(children, children[1:]):
            if not isinstance(bn, bn_types) or id(bn) in found:
                continue
            reason = _bn_problem(bn) or _layer_problem(prev)
            if reason is None and (refs[id(prev)] > 1 or refs[id(bn)] > 1):
                reason = "the layer or BN is registered more than once (shared module)"
            if reason is None and _out_channels(prev) != bn.num_features:
                reason = (f"channel mismatch: layer has {_out_channels(prev)} outputs, "
                          f"BN has num_features={bn.num_features}")
            found[id(bn)] = reason
            if reason is None:
                pairs.append((prev, bn))

    skipped = []
    for m in model.modules():
        if isinstance(m, bn_types):
            if id(m) not in found:
                skipped.append((names[id(m)], "cannot tell what it follows: it is not directly "
                                f"after a layer in an nn.Sequential ({why})"))
            elif found[id(m)] is not None:
                skipped.append((names[id(m)], found[id(m)]))
    return pairs, skipped


# ---------------------------------------------------------------------- public API

def fold_batchnorm_with_report(model: nn.Module, strict: bool = True,
                               method: str = "auto") -> tuple[nn.Module, FoldReport]:
    """Like :func:`fold_batchnorm` but returns ``(folded_model, report)``."""
    if method not in ("auto", "fx", "sequential"):
        raise ValueError(f"method must be 'auto', 'fx' or 'sequential', got {method!r}")
    folded = copy.deepcopy(model).eval()
    names = {}
    for qn, m in folded.named_modules():  # first (canonical) name of every module
        names.setdefault(id(m), _name(qn))

    used = "fx"
    if method in ("auto", "fx"):
        try:
            pairs, skipped = _pairs_fx(folded, names)
        except Exception as exc:  # torch.fx raises many kinds of errors
            if method == "fx":
                raise
            used = "sequential"
            pairs, skipped = _pairs_sequential(
                folded, names, f"torch.fx could not trace the model: {type(exc).__name__}")
    else:
        used = "sequential"
        pairs, skipped = _pairs_sequential(folded, names, "method='sequential'")

    report = FoldReport(method=used, skipped=skipped)
    if strict and skipped:
        lines = "\n".join(f"  - {n}: {r}" for n, r in skipped)
        raise FoldError(f"{len(skipped)} BatchNorm layer(s) cannot be folded "
                        f"(detection: {used}); pass strict=False to leave them in place:\n"
                        f"{lines}")

    all_names: dict[int, list[str]] = {}
    for qn, m in folded.named_modules(remove_duplicate=False):
        all_names.setdefault(id(m), []).append(qn)
    for layer, bn in pairs:
        _fold_pair(layer, bn)
        report.folded.append((names[id(layer)], names[id(bn)]))
        for qn in all_names[id(bn)]:
            _set_module(folded, qn, nn.Identity())
    return folded, report


def fold_batchnorm(model: nn.Module, strict: bool = True, method: str = "auto") -> nn.Module:
    """Return an eval-mode deep copy of ``model`` with BatchNorm folded into the
    Conv/ConvTranspose/Linear layer it directly follows.

    ``model`` itself is not modified (parameters, buffers, training flag).
    Folded BNs become ``nn.Identity``; a layer without bias gets one.
    With ``strict=True`` a :class:`FoldError` naming every unfoldable BN and
    the reason is raised; with ``strict=False`` such BNs are left in place and
    listed in ``fold_report(result).skipped``. ``method`` selects the
    detection: ``"fx"``, ``"sequential"`` or ``"auto"`` (fx, falling back to
    Sequential adjacency if tracing fails). See the module docstring.
    """
    folded, report = fold_batchnorm_with_report(model, strict=strict, method=method)
    object.__setattr__(folded, _REPORT_ATTR, report)
    return folded


def fold_report(folded_model: nn.Module) -> FoldReport:
    """The :class:`FoldReport` attached to a model returned by :func:`fold_batchnorm`."""
    try:
        return object.__getattribute__(folded_model, _REPORT_ATTR)
    except AttributeError:
        raise ValueError("this model was not produced by bnlib.fold.fold_batchnorm") from None

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
``fold_batchnorm(model, strict=True, method="auto", example_input=None) -> nn.Module``
    Returns a folded deep copy in eval mode; the argument is never modified.
    Every folded BN is replaced by ``nn.Identity`` (or, after a ``Linear``, by
    a :class:`LinearFoldGuard`, below) and the layer before it gets the folded
    weight and a (possibly new) bias. With ``strict=True`` a :class:`FoldError`
    lists every BN that cannot be folded, by qualified name and reason.

``count_batchnorms(model) -> int`` (``len(bnlib.layers.bn_layers(model))``), ``is_batchnorm(module) -> bool``.

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
* the BN is a subclass whose ``forward`` is not the one of the library class it extends (torch.nn's or
  bnlib's): its eval-mode output need not be BN's affine map;
* its evaluation output is not an affine map at all (the class attribute ``affine_in_eval`` is False, e.g.
  Batch Layer Normalization, whose per-example half depends on each example);
* channel counts do not match, or the BN is never called.

A TorchScript module (``torch.jit.script``) is refused with a ``TypeError``: its code is compiled, so no
module can be replaced in it. Fold the eager model, then script the folded one.

Accepted layers: ``nn.Conv1d/2d/3d`` (any ``groups``, hence depthwise; any
``padding_mode``), ``nn.ConvTranspose1d/2d/3d`` (weight layout
``(in, out/groups, k...)`` handled group-wise) and ``nn.Linear``.

``Linear -> BatchNorm`` is one affine map only when the BN sees the Linear's
output as ``(N, C)``. A ``Linear`` applied to ``(N, L, C)`` acts on the last
dimension, but ``BatchNorm1d`` normalizes dimension 1 (``L``): each of the
``L`` positions gets its own scale, which no Linear weight can absorb -- and
when ``L`` equals the number of features the channel counts even match. fx
cannot see shapes, so:

* with ``example_input`` (a batch the model accepts) the model is run once,
  the input of every BN is recorded, and a ``Linear -> BN`` pair whose BN
  input is not 2-D is refused by name; a 2-D one is folded into a plain
  ``nn.Identity``;
* without it, the pair is folded and the BN replaced by a
  :class:`LinearFoldGuard`: an identity for ``(N, C)`` input that raises a
  ``ValueError`` naming the folded BN for any other shape, so the folded
  model never silently computes something else.

The fold is computed in float64 and cast back to the parameter dtype, so in
float32 the folded model matches the unfolded eval model to about 1e-6.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .layers import BATCH_NORM_TYPES, bn_layers, is_batchnorm

__all__ = [
    "FoldError",
    "LinearFoldGuard",
    "count_batchnorms",
    "fold_batchnorm",
    "is_batchnorm",
]

# The modules whose BN classes' forward is BN (Algorithm 2 in eval mode); a subclass defined elsewhere that
# overrides forward may compute anything.
_BN_MODULES = {"torch.nn.modules.batchnorm", "bnlib.modules", "bnlib.distributed", "bnlib.renorm", "bnlib.ghost",
               "bnlib.batch_layer_norm"}

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


class LinearFoldGuard(nn.Module):
    """Stands where a BatchNorm was folded into the ``Linear`` before it (see the module docstring).

    Passes a 2-D ``(N, C)`` input through unchanged -- the only shape for which the fold is exact --
    and raises ValueError, naming the folded BN, for any other.
    """

    def __init__(self, bn_name: str, num_features: int) -> None:
        super().__init__()
        self.bn_name, self.num_features = bn_name, num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(
                f"BatchNorm {self.bn_name!r} was folded into the Linear before it, which is exact only when "
                f"that Linear's output is (N, {self.num_features}); here it has shape {tuple(x.shape)}, and "
                "BatchNorm would normalize dimension 1, not the Linear's features. Fold with "
                "fold_batchnorm(model, example_input=x) to check the shapes, or do not fold this model.")
        return x

    def extra_repr(self) -> str:
        return f"{self.bn_name!r}, num_features={self.num_features}"


# --------------------------------------------------------------------------- helpers

def count_batchnorms(model: nn.Module) -> int:
    """Number of distinct BatchNorm modules in ``model`` (including itself): ``len(bn_layers(model))``."""
    return len(bn_layers(model))


def _name(qualname: str) -> str:
    return qualname if qualname else "<root>"


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _layer_problem(layer: Any) -> str | None:
    if not isinstance(layer, _FOLDABLE_TYPES):
        return f"its input comes from a {type(layer).__name__}, not a Conv/ConvTranspose/Linear"
    if type(layer).forward not in _FOLDABLE_FORWARDS:
        return f"the preceding {type(layer).__name__} overrides forward()"
    if torch.nn.utils.parametrize.is_parametrized(layer) or _has_hooks(layer):
        return "the preceding layer has parametrizations or forward hooks"
    if isinstance(layer.weight, nn.parameter.UninitializedParameter):
        return "the preceding layer is uninitialized (lazy)"
    return None


def _bn_problem(bn: Any) -> str | None:
    if not getattr(bn, "track_running_stats", False) or bn.running_mean is None \
            or bn.running_var is None:
        return ("track_running_stats=False: it normalizes with batch statistics "
                "even in eval mode, so it is not an affine map")
    if isinstance(bn.running_mean, nn.parameter.UninitializedBuffer):
        return "it is uninitialized (lazy)"
    if not getattr(bn, "affine_in_eval", True):
        return (f"it is a {type(bn).__name__}, whose eval-mode output depends on each example (not only on its "
                "channel), so it is not an affine map")
    owner = next(cls for cls in type(bn).__mro__ if "forward" in cls.__dict__)
    if owner.__module__ not in _BN_MODULES:
        return (f"its class {type(bn).__name__} overrides forward() (in {owner.__module__}.{owner.__qualname__}), "
                "so its eval-mode output need not be BatchNorm's affine map")
    var = bn.running_var.detach()
    if not bool(torch.isfinite(var).all()) or bool((var < 0).any()) or not bool(torch.isfinite(bn.running_mean).all()):
        return ("its running_var/running_mean holds NaN, Inf or negative values: folding would give "
                "non-finite weights (recompute the statistics, e.g. with bnlib.running_stats.precise_bn)")
    if _has_hooks(bn):
        return "it has forward hooks"
    return None


def _out_channels(layer: Any) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


@torch.no_grad()
def _fold_pair(layer: Any, bn: Any) -> None:
    """Fold eval-mode ``bn`` into ``layer`` in place (float64 math)."""
    w = layer.weight
    dt = torch.float64
    var = bn.running_var.to(dt)
    mean = bn.running_mean.to(dt)
    scale = torch.rsqrt(var + bn.eps)
    beta = torch.zeros_like(mean)
    if bn.affine and bn.weight is not None:
        scale = scale * bn.weight.to(dt)
    if bn.affine and bn.bias is not None:
        beta = bn.bias.to(dt)

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
    b_new = (b - mean) * scale + beta

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
        layer: Any = None
        if reason is None:
            assert isinstance(src, fx.Node)
            layer = model.get_submodule(str(src.target))
            reason = _layer_problem(layer)
        if reason is None and calls[id(layer)] != 1:
            reason = f"the preceding layer {names[id(layer)]!r} is called {calls[id(layer)]} times"
        if reason is None and isinstance(src, fx.Node) and len(src.users) != 1:
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
            else:
                reason = found[id(m)]
                if reason is not None:
                    skipped.append((names[id(m)], reason))
    return pairs, skipped


def _bn_input_dims(model: nn.Module, example_input) -> dict[int, tuple[int, ...]]:
    """Shape of the input of every BN in one eval-mode forward pass of ``example_input``."""
    shapes: dict[int, tuple[int, ...]] = {}

    def record(module, args):
        shapes.setdefault(id(module), tuple(args[0].shape))

    handles = [m.register_forward_pre_hook(record) for m in bn_layers(model).values()]
    try:
        with torch.no_grad():
            model(*(example_input if isinstance(example_input, tuple) else (example_input,)))
    finally:
        for h in handles:
            h.remove()
    return shapes


def _linear_problem(layer: nn.Module, bn: nn.Module, shapes: dict[int, tuple[int, ...]],
                    layer_name: str) -> str | None:
    """Why ``Linear -> bn`` is not one affine map for ``example_input`` (None: it is)."""
    if id(bn) not in shapes:
        return "it is not called when the model runs example_input"
    shape = shapes[id(bn)]
    if len(shape) == 2:
        return None
    return (f"the Linear {layer_name!r} gives it a {len(shape)}-D input {shape}: BatchNorm normalizes dimension 1 "
            f"(size {shape[1]}), not the Linear's {layer.out_features} output features, so the pair is not one "
            "affine map")


# ---------------------------------------------------------------------- public API

def fold_batchnorm(model: nn.Module, strict: bool = True, method: str = "auto",
                   example_input: torch.Tensor | tuple | None = None) -> nn.Module:
    """Return an eval-mode deep copy of ``model`` with BatchNorm folded into the
    Conv/ConvTranspose/Linear layer it directly follows.

    ``model`` itself is not modified (parameters, buffers, training flag).
    Folded BNs become ``nn.Identity`` (a :class:`LinearFoldGuard` after a
    Linear, unless ``example_input`` showed the BN's input to be 2-D); a layer
    without bias gets one. With ``strict=True`` a :class:`FoldError` naming
    every unfoldable BN and the reason is raised; with ``strict=False`` such
    BNs are left in place (``count_batchnorms`` counts them). ``method``
    selects the detection: ``"fx"``, ``"sequential"`` or ``"auto"`` (fx,
    falling back to Sequential adjacency if tracing fails). ``example_input``:
    a batch (or tuple of the forward's arguments) run once to check the shapes
    of Linear -> BN pairs. See the module docstring.
    """
    if method not in ("auto", "fx", "sequential"):
        raise ValueError(f"method must be 'auto', 'fx' or 'sequential', got {method!r}")
    if any(isinstance(m, torch.jit.ScriptModule) for m in model.modules()):
        raise TypeError(f"fold_batchnorm() cannot fold a TorchScript module ({type(model).__name__}): its code is "
                        "compiled, so no layer can be replaced in it. Fold the eager model, then script the result: "
                        "torch.jit.script(fold_batchnorm(model))")
    folded = copy.deepcopy(model).eval()
    names: dict[int, str] = {}
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

    shapes = None if example_input is None else _bn_input_dims(folded, example_input)
    if shapes is not None:
        checked = []
        for layer, bn in pairs:
            reason = (_linear_problem(layer, bn, shapes, names[id(layer)])
                      if isinstance(layer, nn.Linear) else None)
            if reason is None:
                checked.append((layer, bn))
            else:
                skipped.append((names[id(bn)], reason))
        pairs = checked

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
        unproven = isinstance(layer, nn.Linear) and shapes is None
        for qn in all_names[id(bn)]:
            _set_module(folded, qn, LinearFoldGuard(names[id(bn)], bn.num_features) if unproven
                        else nn.Identity())
    return folded

"""Probes: hook-based recorders of what happens inside a network as it trains.

Used in "Why normalize?" and "The algorithm" (the percentiles of a sigmoid
input over training, Figure 1 (b, c) of Ioffe & Szegedy; saturation;
gradient norms), in "Restoring the distribution" (activation histograms) and
in "Batch normalization in convolutional networks" (histograms, saturation
and gradient norms of deep plain networks).

How a probe is used
-------------------
A probe attaches a hook when it is created and records only while its
``active`` attribute is True, labelling each record with its ``step``
attribute. Two ways to drive it:

* with :func:`bnlib.lab.training.fit`: ``fit(model, data, probes=[p], probe_every=k)``
  switches the probes on for the forward and backward pass of every k-th
  update, with ``p.step`` = the number of updates done so far (0 = the
  initial model). The recorded batch is the training batch, in train mode --
  the inputs the nonlinearity actually receives during training.
* by hand: set ``p.active = True`` (and ``p.step``), run a forward pass, set
  it back; or use ``with p.recording(step): model(x)``.

A probe stays attached until :meth:`Probe.remove`; used as a context manager
(``with PercentileProbe(...) as p:``) it removes its hooks on exit and keeps
its records. All records are plain Python lists of numbers
(:meth:`Probe.to_dict` is JSON-serialisable); ``.array()`` gives NumPy views.

Example, Figure 1 (b, c)::

    probe = PercentileProbe(model.hidden[-1].norm, unit=0)   # a sigmoid input
    hist = fit(model, data, steps=50_000, probes=[probe], probe_every=500)
    probe.remove()
    plot_percentiles(*probe.array())
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

__all__ = [
    "Probe",
    "PercentileProbe",
    "HistogramProbe",
    "SaturationProbe",
    "GradNormProbe",
    "grad_norms",
    "quantiles",
]


def quantiles(x: torch.Tensor, q: Sequence[float]) -> List[float]:
    """Percentiles ``q`` (in 0..100) of all values of ``x``.

    Linear interpolation between order statistics, the same as
    ``numpy.percentile``'s default; works for tensors of any size (unlike
    ``torch.quantile``) and on any device.

    Returns:
        list[float]: one value per entry of ``q``.
    """
    v = x.detach().flatten().float().sort().values
    n = v.numel()
    if n == 0:
        raise ValueError("quantiles of an empty tensor")
    pos = torch.tensor([p / 100.0 * (n - 1) for p in q], dtype=torch.float64, device=v.device)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    frac = (pos - lo).to(v.dtype)
    out = v[lo] + (v[hi] - v[lo]) * frac
    return out.tolist()


def _select_unit(y: torch.Tensor, unit: Optional[int]) -> torch.Tensor:
    """Returns all of ``y`` (unit None) or feature/channel ``unit`` of it (dim 1)."""
    if unit is None:
        return y
    return y.select(1, unit)


class Probe:
    """Base class: attach/remove hooks, ``active``/``step`` switches, records.

    Subclasses register their hooks in ``__init__`` with :meth:`_add_hook`
    and append to ``self.steps`` plus the lists named in ``_records``.
    """

    _records: Tuple[str, ...] = ("steps",)

    def __init__(self, active: bool = True) -> None:
        self.active = active
        self.step: Optional[int] = None
        self.steps: List[int] = []
        self._handles: list = []

    # -- hooks ------------------------------------------------------------
    def _add_hook(self, handle) -> None:
        self._handles.append(handle)

    @property
    def attached(self) -> bool:
        """Returns True while the probe's hooks are registered."""
        return bool(self._handles)

    def remove(self) -> None:
        """Remove the probe's hooks; its records stay. Safe to call twice.

        Returns:
            None.
        """
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @contextlib.contextmanager
    def recording(self, step: Optional[int] = None) -> Iterator["Probe"]:
        """Context manager: record the passes run inside it under label ``step``.

        Returns:
            a context manager yielding the probe.
        """
        old = self.active, self.step
        self.active, self.step = True, step
        try:
            yield self
        finally:
            self.active, self.step = old

    def _next_step(self) -> int:
        """Returns the label of a new record: ``self.step``, or a counter if unset."""
        return self.step if self.step is not None else len(self.steps)

    # -- results ----------------------------------------------------------
    def reset(self) -> None:
        """Forget all records (hooks stay attached).

        Returns:
            None.
        """
        for name in self._records:
            getattr(self, name).clear()

    def to_dict(self) -> Dict[str, object]:
        """Returns the records as a dict of plain Python values."""
        raise NotImplementedError


class PercentileProbe(Probe):
    """Percentiles of a module's output over the batch.

    Args:
        module: the module whose output is watched; for the input of an
            MLP's sigmoid, ``model.hidden[k].norm``.
        unit: a feature (column of an ``(N, C)`` output) or channel (of
            ``(N, C, H, W)``) index; None for all values of the layer.
        q: percentiles in 0..100 (default 15, 50, 85, as in the paper).

    Records: ``steps`` and ``values`` (one list of ``len(q)`` numbers per record).
    """

    _records = ("steps", "values")

    def __init__(self, module: nn.Module, unit: Optional[int] = None,
                 q: Sequence[float] = (15, 50, 85), active: bool = True) -> None:
        super().__init__(active)
        self.unit = unit
        self.q = [float(p) for p in q]
        self.values: List[List[float]] = []
        self._add_hook(module.register_forward_hook(self._hook))

    def _hook(self, module, inputs, output) -> None:
        if self.active:
            self.steps.append(self._next_step())
            self.values.append(quantiles(_select_unit(output, self.unit), self.q))

    def array(self) -> Tuple[np.ndarray, np.ndarray]:
        """Returns ``(steps, values)``: arrays of shape ``(T,)`` and ``(T, len(q))``."""
        return np.asarray(self.steps), np.asarray(self.values, dtype=float).reshape(len(self.steps), len(self.q))

    def to_dict(self) -> Dict[str, object]:
        """Returns ``{'steps', 'values', 'q', 'unit'}`` as plain Python values."""
        return {"steps": self.steps, "values": self.values, "q": self.q, "unit": self.unit}


class HistogramProbe(Probe):
    """Histograms of a module's output values.

    Args:
        module: the module whose output is watched.
        bins: number of bins.
        range: ``(low, high)`` of the bins. Fixed by default to (-6, 6) so
            that histograms at different steps are comparable; None uses each
            record's own min and max. Values outside the range are not counted
            (``counts`` then sums to less than the number of values).
        unit: feature/channel index, or None for the whole layer.

    Records: ``steps``, ``counts`` (a list of ``bins`` ints per record),
    ``edges`` (``bins + 1`` floats per record) and ``total`` (values seen).
    """

    def __init__(self, module: nn.Module, bins: int = 60,
                 range: Optional[Tuple[float, float]] = (-6.0, 6.0),
                 unit: Optional[int] = None, active: bool = True) -> None:
        super().__init__(active)
        self.bins, self.range, self.unit = int(bins), range, unit
        self.counts: List[List[int]] = []
        self.edges: List[List[float]] = []
        self.total: List[int] = []
        self._add_hook(module.register_forward_hook(self._hook))

    def _hook(self, module, inputs, output) -> None:
        if not self.active:
            return
        v = _select_unit(output, self.unit).detach().float().flatten()
        if self.range is None:
            lo, hi = v.min().item(), v.max().item()
            if hi <= lo:
                hi = lo + 1e-6
        else:
            lo, hi = float(self.range[0]), float(self.range[1])
        try:
            counts = torch.histc(v, bins=self.bins, min=lo, max=hi)
        except (RuntimeError, NotImplementedError):  # histc missing on some backends
            counts = torch.histc(v.cpu(), bins=self.bins, min=lo, max=hi)
        self.steps.append(self._next_step())
        self.counts.append([int(c) for c in counts.tolist()])
        self.edges.append(np.linspace(lo, hi, self.bins + 1).tolist())
        self.total.append(v.numel())

    def array(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns ``(steps, counts, edges)`` with shapes ``(T,)``, ``(T, bins)``, ``(T, bins+1)``."""
        return (np.asarray(self.steps), np.asarray(self.counts).reshape(len(self.steps), self.bins),
                np.asarray(self.edges).reshape(len(self.steps), self.bins + 1))

    def to_dict(self) -> Dict[str, object]:
        """Returns ``{'steps', 'counts', 'edges', 'total', 'unit'}`` as plain Python values."""
        return {"steps": self.steps, "counts": self.counts, "edges": self.edges,
                "total": self.total, "unit": self.unit}


#: Default saturation thresholds of :class:`SaturationProbe`, on the activation's output.
SATURATION = {
    # sigmoid(y) < 0.02 or > 0.98, i.e. |pre-activation| > 3.89: gradient < 0.0196, ~8 % of its peak.
    "sigmoid": (0.02, 0.98),
    # |tanh(y)| > 0.98, i.e. |pre-activation| > 2.30: gradient < 0.0396, ~4 % of its peak.
    "tanh": (-0.98, 0.98),
    # ReLU "saturates" where it outputs exactly 0 (no gradient flows).
    "relu": (0.0, float("inf")),
}


class SaturationProbe(Probe):
    """Fraction of saturated units in the output of an activation module.

    Attach it to the activation itself (e.g. ``model.hidden[k].act``). A value
    ``y`` counts as saturated when ``y <= low`` or ``y >= high`` (strictly
    ``<``/``>`` for sigmoid and tanh), with (low, high) from :data:`SATURATION`
    for ``kind`` in ``'sigmoid'`` (0.02, 0.98), ``'tanh'`` (|y| > 0.98) and
    ``'relu'`` (y == 0), unless ``thresholds=(low, high)`` is given.

    Records: ``steps`` and ``fraction`` (over all values of the batch, or of
    one ``unit``).
    """

    _records = ("steps", "fraction")

    def __init__(self, module: nn.Module, kind: str = "sigmoid",
                 thresholds: Optional[Tuple[float, float]] = None,
                 unit: Optional[int] = None, active: bool = True) -> None:
        super().__init__(active)
        if thresholds is None:
            if kind not in SATURATION:
                raise ValueError(f"unknown kind {kind!r}; use one of {sorted(SATURATION)} or give thresholds=")
            thresholds = SATURATION[kind]
        self.kind = kind
        self.low, self.high = float(thresholds[0]), float(thresholds[1])
        self.unit = unit
        self.fraction: List[float] = []
        self._add_hook(module.register_forward_hook(self._hook))

    def _hook(self, module, inputs, output) -> None:
        if not self.active:
            return
        y = _select_unit(output, self.unit).detach()
        if self.kind == "relu":
            sat = y <= self.low
        else:
            sat = (y < self.low) | (y > self.high)
        self.steps.append(self._next_step())
        self.fraction.append(sat.float().mean().item())

    def to_dict(self) -> Dict[str, object]:
        """Returns ``{'steps', 'fraction', 'kind', 'low', 'high', 'unit'}`` as plain Python values."""
        return {"steps": self.steps, "fraction": self.fraction, "kind": self.kind,
                "low": self.low, "high": self.high, "unit": self.unit}


def _default_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Returns the named Linear and Conv layers of ``model`` (the ones with weights that matter)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))}


def grad_norms(model: nn.Module, layers: Optional[Dict[str, nn.Module]] = None) -> Dict[str, float]:
    """L2 norm of the current gradients (``.grad``) of each layer, after ``backward()``.

    Args:
        model: the network.
        layers: ``{name: module}``; default every Linear and Conv layer.
            A layer's norm is over all its own parameters (weight and bias).

    Returns:
        dict[str, float]: layer name -> gradient norm, for layers that have
        gradients.
    """
    layers = _default_layers(model) if layers is None else layers
    out = {}
    for name, m in layers.items():
        grads = [p.grad for p in m.parameters(recurse=False) if p.grad is not None]
        if grads:
            out[name] = torch.sqrt(sum((g.detach().float() ** 2).sum() for g in grads)).item()
    return out


class GradNormProbe(Probe):
    """Per-layer gradient norms, recorded during the backward pass.

    Registers a hook on each parameter of the chosen layers; while the probe
    is active, the gradient of each backward pass is measured. With
    ``fit(probes=[...])`` this is the gradient of the probed update.

    Args:
        model: the network.
        layers: ``{name: module}``; default every Linear and Conv layer (see
            :func:`grad_norms`).

    Records: ``steps`` and ``norms`` (``{layer name: [one float per record]}``).
    """

    def __init__(self, model: nn.Module, layers: Optional[Dict[str, nn.Module]] = None,
                 active: bool = True) -> None:
        super().__init__(active)
        layers = _default_layers(model) if layers is None else layers
        self.names = list(layers)
        self.norms: Dict[str, List[float]] = {n: [] for n in self.names}
        self._sq: Dict[str, torch.Tensor] = {}   # squared norms of the pass in progress
        self._seen: set = set()                  # parameters already seen in that pass
        self._pass_step: Optional[int] = None
        for name, m in layers.items():
            for p in m.parameters(recurse=False):
                if p.requires_grad:
                    self._add_hook(p.register_hook(self._make_hook(name, id(p))))

    def _make_hook(self, name: str, key: int):
        def hook(grad: torch.Tensor) -> None:
            if not self.active:
                return
            step = self._next_step()
            # A new backward pass starts when the label changes or a parameter repeats.
            if step != self._pass_step or key in self._seen:
                self._finish()
                step = self._next_step()
                self._pass_step = step
            self._seen.add(key)
            sq = (grad.detach().float() ** 2).sum()
            self._sq[name] = self._sq[name] + sq if name in self._sq else sq
        return hook

    def _finish(self) -> None:
        """Move the pass in progress (if any) into the records."""
        if self._pass_step is None:
            return
        self.steps.append(self._pass_step)
        for n in self.names:
            sq = self._sq.get(n)
            self.norms[n].append(float("nan") if sq is None else sq.sqrt().item())
        self._sq.clear()
        self._seen.clear()
        self._pass_step = None

    @contextlib.contextmanager
    def recording(self, step: Optional[int] = None) -> Iterator["GradNormProbe"]:
        """Context manager: record the backward passes run inside it under label ``step``.

        Returns:
            a context manager yielding the probe.
        """
        with super().recording(step):
            yield self
        self._finish()

    def remove(self) -> None:
        """Remove the hooks, keeping (and completing) the records.

        Returns:
            None.
        """
        self._finish()
        super().remove()

    def reset(self) -> None:
        """Forget all records (hooks stay attached).

        Returns:
            None.
        """
        self._sq.clear()
        self._seen.clear()
        self._pass_step = None
        self.steps.clear()
        for v in self.norms.values():
            v.clear()

    def to_dict(self) -> Dict[str, object]:
        """Returns ``{'steps', 'norms'}`` as plain Python values (pending pass included)."""
        self._finish()
        return {"steps": self.steps, "norms": self.norms}

    def array(self) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
        """Returns ``(steps, {layer: norms})`` as NumPy arrays."""
        d = self.to_dict()
        return np.asarray(d["steps"]), {k: np.asarray(v) for k, v in d["norms"].items()}

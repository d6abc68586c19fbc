"""Probes: hooks that record what a layer outputs while a network trains.

A probe watches one module. While its ``active`` attribute is True, every forward pass of that module
adds a record, labelled with the probe's ``step`` attribute. :class:`PercentileProbe` records
percentiles of the output, e.g. the 15th, 50th and 85th percentile of a sigmoid's input over training
(Figure 1 (b, c) of Ioffe & Szegedy 2015).

How a probe is driven
---------------------
* by the training loop: ``fit(model, data, probes=[p], probe_every=k)`` (:func:`bnlib.lab.training.fit`)
  switches the probes on for the forward and backward pass of every k-th update, with ``p.step`` = the
  number of updates done so far (0 = the initial model). The recorded batch is the training batch, in
  train mode: what the nonlinearity actually receives during training.
* by hand: ``with p.recording(step): model(x)``, or set ``p.active`` (and ``p.step``) yourself.

A probe stays attached until :meth:`Probe.remove`; used as a context manager
(``with PercentileProbe(...) as p:``) it removes its hook on exit and keeps its records. Records are
plain Python lists of numbers (:meth:`Probe.to_dict` is JSON-serialisable); ``.array()`` gives NumPy arrays.

Example::

    probe = PercentileProbe(model.hidden[-1].norm, unit=0)   # the input of one sigmoid
    hist = fit(model, data, steps=50_000, probes=[probe], probe_every=500)
    probe.remove()
    plot_percentiles(probe)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

__all__ = ["Probe", "PercentileProbe", "quantiles"]


def quantiles(x: torch.Tensor, q: Sequence[float]) -> list[float]:
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
    # The p-th percentile sits at position p/100 · (n − 1) of the sorted values v_0 <= ... <= v_{n-1};
    # between the order statistics v_lo and v_hi around it, interpolate linearly.
    pos = torch.tensor([p / 100.0 * (n - 1) for p in q], dtype=torch.float64, device=v.device)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    frac = (pos - lo).to(v.dtype)
    out = v[lo] + (v[hi] - v[lo]) * frac  # v_lo + (v_hi − v_lo) · (pos − lo)
    return out.tolist()


def _select_unit(y: torch.Tensor, unit: int | None) -> torch.Tensor:
    """Returns all of ``y`` (unit None) or feature/channel ``unit`` of it (dim 1)."""
    if unit is None:
        return y
    return y.select(1, unit)


class Probe:
    """Base class: attach/remove hooks, ``active``/``step`` switches, records.

    Subclasses register their hooks in ``__init__`` with :meth:`_add_hook`
    and append to ``self.steps`` plus the lists named in ``_records``.
    """

    _records: tuple[str, ...] = ("steps",)

    def __init__(self, active: bool = True) -> None:
        self.active = active
        self.step: int | None = None
        self.steps: list[int] = []
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

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @contextlib.contextmanager
    def recording(self, step: int | None = None) -> Iterator[Probe]:
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

    def to_dict(self) -> dict[str, object]:
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

    def __init__(self, module: nn.Module, unit: int | None = None,
                 q: Sequence[float] = (15, 50, 85), active: bool = True) -> None:
        super().__init__(active)
        self.unit = unit
        self.q = [float(p) for p in q]
        self.values: list[list[float]] = []
        self._add_hook(module.register_forward_hook(self._hook))

    def _hook(self, module, inputs, output) -> None:
        if self.active:
            self.steps.append(self._next_step())
            self.values.append(quantiles(_select_unit(output, self.unit), self.q))

    def array(self) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(steps, values)``: arrays of shape ``(T,)`` and ``(T, len(q))``."""
        return np.asarray(self.steps), np.asarray(self.values, dtype=float).reshape(len(self.steps), len(self.q))

    def to_dict(self) -> dict[str, object]:
        """Returns ``{'steps', 'values', 'q', 'unit'}`` as plain Python values."""
        return {"steps": self.steps, "values": self.values, "q": self.q, "unit": self.unit}

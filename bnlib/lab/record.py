"""The record of one training run: :class:`History`, and its JSON form.

A History holds what a run measured (training loss per window of updates, test accuracy at the
evaluations, speed, divergence) and the arguments it ran with (``config``). Two runs with the same
seeds on the same machine give histories for which :meth:`History.same_results` is True; only the
timings differ. :meth:`History.to_json` / :meth:`History.from_json` store and load it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["History"]


def _same_float_lists(a: Sequence[float], b: Sequence[float]) -> bool:
    if len(a) != len(b):
        return False
    for u, v in zip(a, b):
        if u != v and not (isinstance(u, float) and isinstance(v, float) and math.isnan(u) and math.isnan(v)):
            return False
    return True


@dataclass
class History:
    """What one training run produced.

    Three aligned groups of lists:

    * ``step``, ``train_loss``, ``lr``: the mean training loss over each
      window of ``loss_every`` updates, recorded at the number of updates
      completed at the end of the window, with the learning rate of that
      window's last update;
    * ``test_step``, ``test_acc``, ``wall_time``: test accuracy after
      ``test_step`` updates (0 = the initial model) and the seconds elapsed
      since :func:`~bnlib.lab.training.fit` started;
    * scalars: ``steps_per_s`` (training updates per second, evaluation time
      excluded), ``diverged`` / ``diverged_at`` (the first update whose loss
      was NaN or infinite), ``interrupted`` (stopped by Ctrl-C: see
      :class:`FitInterrupted`) and ``config`` (the arguments of the run).
    """

    step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    test_step: list[int] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    wall_time: list[float] = field(default_factory=list)
    steps_per_s: float = 0.0
    diverged: bool = False
    diverged_at: int | None = None
    interrupted: bool = False
    config: dict[str, Any] = field(default_factory=dict)

    _TIMING_FIELDS = ("wall_time", "steps_per_s")

    # -- convenience ------------------------------------------------------
    @property
    def final_acc(self) -> float | None:
        """Returns the last recorded test accuracy, or None if there is none."""
        return self.test_acc[-1] if self.test_acc else None

    @property
    def best_acc(self) -> float | None:
        """Returns the highest recorded test accuracy, or None if there is none."""
        return max(self.test_acc) if self.test_acc else None

    def steps_to_reach(self, acc: float) -> int | None:
        """Returns the first evaluated step whose test accuracy is >= ``acc``, or None."""
        for s, a in zip(self.test_step, self.test_acc):
            if a >= acc:
                return s
        return None

    def same_results(self, other: History) -> bool:
        """Returns True if both runs recorded the same numbers, timings aside.

        NaN equals NaN here, so two identically diverged runs compare equal.
        """
        for f in dataclasses.fields(self):
            if f.name in self._TIMING_FIELDS:
                continue
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, list):
                if not _same_float_lists(a, b):
                    return False
            elif a != b:
                return False
        return True

    # -- serialisation -----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Returns the history as a dict of plain Python values (JSON-ready)."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        """Returns a History built from :meth:`to_dict`'s output (unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the history to ``path`` as JSON (NaN/inf as JavaScript literals).

        Returns:
            None.
        """
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> History:
        """Returns the History stored in ``path`` by :meth:`to_json`."""
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def __repr__(self) -> str:
        acc = "None" if self.final_acc is None else f"{self.final_acc:.4f}"
        last = self.test_step[-1] if self.test_step else 0
        div = f", diverged_at={self.diverged_at}" if self.diverged else ""
        return (f"History(steps={last}, final_acc={acc}, "
                f"steps_per_s={self.steps_per_s:.0f}{div})")


def plain(v: Any) -> Any:
    """Returns ``v`` converted to plain Python types (lists, dicts, floats, ...)."""
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, (np.generic, torch.Tensor)):
        return v.item() if getattr(v, "ndim", 0) == 0 else plain(v.tolist())
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return describe(v)


def describe(obj: Any) -> str:
    """Returns a short, stable description of a callable or other object for ``config``."""
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if name is not None:
        return name
    return type(obj).__name__

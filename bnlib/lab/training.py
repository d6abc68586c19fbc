"""Training loop, evaluation and run records for the book's experiments.

Every chapter that trains a model goes through :func:`fit`: "Why normalize?"
and "The algorithm" (the MNIST MLP of Ioffe & Szegedy, Figure 1), "Restoring
the distribution", "Batch normalization in convolutional networks",
"Limitations and alternatives" (small and non-i.i.d. batches, via
``sampler``) and "Batch normalization across devices".

The loop is written for speed on a laptop CPU as much as for a GPU:

* the data set is moved to the device once; mini-batches are gathered there
  from indices drawn on the CPU with a seeded :class:`torch.Generator`;
* the loss of each step stays on the device; it is copied to the host only at
  *sync points* (every ``check_every`` steps, at evaluations, at callbacks and
  at the end), so no step waits for the GPU;
* a run that diverges (a non-finite loss) stops and says so in its
  :class:`History` instead of raising.

Reproducibility pattern (the caller builds the model, so the caller seeds it)::

    seed_everything(0)
    model = MLP(norm="bn")
    hist = fit(model, data, steps=50_000, seed=0)

Running this twice on the CPU gives two histories for which
``History.same_results`` is True (only the timings differ).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "device",
    "seed_everything",
    "History",
    "fit",
    "evaluate",
    "class_subset_sampler",
]

_DEVICE_HELP = (
    "use 'cpu', 'cuda', 'cuda:N' or 'mps' (or unset BNLIB_DEVICE to pick "
    "automatically)"
)


# --------------------------------------------------------------------------
# Device and seeding
# --------------------------------------------------------------------------

def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _check_device(dev: torch.device, origin: str) -> torch.device:
    """Raise RuntimeError if ``dev`` cannot be used here; return it otherwise."""
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"{origin} asks for {dev}, but CUDA is not available here; {_DEVICE_HELP}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"{origin} asks for {dev}, but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type == "mps":
        if not _mps_available():
            raise RuntimeError(f"{origin} asks for mps, but MPS is not available here; {_DEVICE_HELP}")
    elif dev.type != "cpu":
        raise ValueError(f"{origin}: unsupported device type {dev.type!r}; {_DEVICE_HELP}")
    return dev


def device(name: str | torch.device | None = None) -> torch.device:
    """Choose the device the book's experiments run on.

    Order of precedence: the ``name`` argument, then the environment variable
    ``BNLIB_DEVICE``, then the best available accelerator (CUDA, then Apple
    MPS), then the CPU.

    Returns:
        torch.device: the chosen device.

    Raises:
        ValueError: ``name`` or ``BNLIB_DEVICE`` is not a device name.
        RuntimeError: the requested device does not exist on this machine.
    """
    if isinstance(name, torch.device):
        return _check_device(name, "device()")
    if name is not None:
        origin, text = "device()", str(name)
    else:
        text = os.environ.get("BNLIB_DEVICE", "").strip()
        origin = "BNLIB_DEVICE"
        if not text:
            if torch.cuda.is_available():
                return torch.device("cuda")
            if _mps_available():
                return torch.device("mps")
            return torch.device("cpu")
    try:
        dev = torch.device(text.lower())
    except (RuntimeError, ValueError):
        raise ValueError(f"{origin}={text!r} is not a device name; {_DEVICE_HELP}") from None
    return _check_device(dev, f"{origin}={text!r}")


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and PyTorch (CPU and all GPUs).

    Call it right before building a model so that its initial weights are
    reproducible; :func:`fit` seeds the mini-batch order itself.

    Returns:
        None.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


_pick_device = device  # fit() has an argument called ``device``


# --------------------------------------------------------------------------
# History
# --------------------------------------------------------------------------

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
      since :func:`fit` started;
    * scalars: ``steps_per_s`` (training updates per second, evaluation time
      excluded), ``diverged`` / ``diverged_at`` (the first update whose loss
      was NaN or infinite) and ``config`` (the arguments of the run).
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
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

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


def _plain(v: Any) -> Any:
    """Returns ``v`` converted to plain Python types (lists, dicts, floats, ...)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (np.generic, torch.Tensor)):
        return v.item() if getattr(v, "ndim", 0) == 0 else _plain(v.tolist())
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return _describe(v)


def _describe(obj: Any) -> str:
    """Returns a short, stable description of a callable or other object for ``config``."""
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if name is not None:
        return name
    return type(obj).__name__


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------

def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 10000) -> float:
    """Classification accuracy of ``model`` on ``(x, y)``.

    Runs in eval mode (BN uses its running statistics) under ``torch.no_grad``,
    then restores the model's previous train/eval mode. Batches are moved to
    the model's device if they are not there already. Predictions with NaN
    logits count as class 0 (``argmax`` puts NaN first), so a diverged model
    scores the frequency of class 0, close to chance.

    Returns:
        float: the fraction of correctly classified examples, in [0, 1].
    """
    n = len(x)
    if n == 0:
        raise ValueError("evaluate() needs at least one example")
    dev = _model_device(model)
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=dev)
    try:
        with torch.no_grad():
            for i in range(0, n, batch_size):
                xb = x[i:i + batch_size].to(dev, non_blocking=True)
                yb = y[i:i + batch_size].to(dev, non_blocking=True)
                correct += (model(xb).argmax(dim=1) == yb).sum()
    finally:
        model.train(was_training)
    return correct.item() / n


# --------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------

def class_subset_sampler(y: torch.Tensor, batch_size: int, classes_per_batch: int = 2) -> Callable:
    """A non-i.i.d. ``sampler`` for :func:`fit`: each batch holds few classes.

    For every batch, ``classes_per_batch`` distinct classes are drawn, then
    ``batch_size`` examples uniformly (with replacement) among the training
    examples of those classes. Used in "Limitations and alternatives".

    Returns:
        callable ``(step, generator) -> LongTensor`` of ``batch_size`` indices
        into the training set.
    """
    y = torch.as_tensor(y).cpu()
    classes = torch.unique(y)
    if not 1 <= classes_per_batch <= len(classes):
        raise ValueError(f"classes_per_batch must be in 1..{len(classes)}, got {classes_per_batch}")
    by_class = [torch.nonzero(y == c).flatten() for c in classes]

    def sample(step: int, gen: torch.Generator) -> torch.Tensor:
        chosen = torch.randperm(len(by_class), generator=gen)[:classes_per_batch]
        pool = torch.cat([by_class[int(c)] for c in chosen])
        return pool[torch.randint(len(pool), (batch_size,), generator=gen)]

    return sample


# --------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------

def _show_progress(progress: bool | None) -> bool:
    """Returns whether :func:`fit` should draw a progress bar (see fit's docstring)."""
    if progress is not None:
        return bool(progress)
    env = os.environ.get("BNLIB_PROGRESS", "").strip()
    if env in ("0", "1"):
        return env == "1"
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _make_optimizer(optimizer, params, lr: float, momentum: float, weight_decay: float):
    """Returns a torch optimizer from a name, an instance or a factory ``params -> optimizer``."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if callable(optimizer):
        return optimizer(params)
    name = str(optimizer).lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {optimizer!r}; use 'sgd', 'adam', 'adamw', "
                     "a torch.optim.Optimizer or a callable params -> optimizer")


def fit(
    model: nn.Module,
    data: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 60,
    optimizer: Any = "sgd",
    lr: float = 0.1,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    eval_every: int | None = None,
    loss_every: int | None = None,
    eval_batch_size: int = 10000,
    max_eval: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    lr_schedule: Callable[[int], float] | None = None,
    sampler: Callable[[int, torch.Generator], torch.Tensor] | None = None,
    callback: Callable[[int, nn.Module, History], bool | None] | None = None,
    callback_every: int | None = None,
    probes: Sequence[Any] | None = None,
    probe_every: int | None = None,
    check_every: int = 50,
    max_loss: float | None = None,
) -> History:
    """Train ``model`` for classification with cross-entropy and mini-batch SGD.

    Args:
        model: any ``nn.Module`` mapping a batch of ``x`` to class logits. It
            is moved to the device in place and left in train mode.
        data: ``((x_train, y_train), (x_test, y_test))`` tensors, as returned
            by :func:`bnlib.lab.data.load_mnist`. Moved to the device once.
        steps, epochs: length of training; give exactly one. An epoch is
            ``len(x_train) // batch_size`` updates.
        batch_size: examples per update (default 60, as in the paper's MNIST
            experiment).
        optimizer: ``'sgd'`` (with ``momentum``), ``'adam'``, ``'adamw'``, a
            ``torch.optim.Optimizer`` or a callable ``params -> optimizer``.
        lr, momentum, weight_decay: optimizer settings (ignored when an
            optimizer instance or factory is given).
        eval_every: evaluate the test accuracy every this many updates, plus
            before the first and after the last (default: ``steps // 50``).
        loss_every: window (in updates) over which the training loss is
            averaged before it is recorded (default: ``eval_every``).
        eval_batch_size: batch size of evaluation (memory only, not results).
        max_eval: evaluate on the first ``max_eval`` test examples only.
        seed: seeds the mini-batch order (not the model: see
            :func:`seed_everything`).
        device: device to train on; default :func:`device`.
        progress: True/False forces a progress bar on/off. None (default):
            on only if ``BNLIB_PROGRESS=1``, off if ``BNLIB_PROGRESS=0``,
            otherwise on only when stdout is a terminal -- so notebooks run by
            nbclient/nbval (and Jupyter in general) show no bar unless asked.
        lr_schedule: ``step -> lr``, a pure function giving the learning rate
            of update number ``step`` (0-based); overrides ``lr``.
        sampler: ``(step, generator) -> LongTensor`` of training indices for
            update ``step``; replaces the default order, which walks through
            a fresh random permutation of the training set every epoch
            (dropping a final incomplete batch, so every batch has
            ``batch_size`` examples). Use the generator for randomness so runs
            stay reproducible. See :func:`class_subset_sampler`.
        callback: ``callback(step, model, history)`` called before training
            (step 0) and every ``callback_every`` updates (default
            ``eval_every``); the history is up to date when it is called.
            Returning True stops training.
        probes: objects with ``active`` and ``step`` attributes, such as those
            of :mod:`bnlib.lab.probes`. They are switched on for the forward and
            backward pass of every ``probe_every``-th update only (default
            ``eval_every``), with ``probe.step`` set to the number of updates
            done before that pass (0 = the initial model), and restored to
            their previous ``active`` state at the end.
        check_every: copy losses to the host and check them for divergence at
            least every this many updates.
        max_loss: if given, a loss above it also counts as divergence.

    Divergence: when a loss is NaN or infinite (or above ``max_loss``),
    training stops at the next sync point, ``diverged=True`` and
    ``diverged_at`` (the first such update) are recorded, the loss window is
    closed at that update, and one last test accuracy is recorded at
    ``diverged_at``: the accuracy of the model as it is, evaluated like any
    other (near chance for NaN weights). No exception is raised.

    Returns:
        History: the record of the run.
    """
    (x_train, y_train), (x_test, y_test) = data
    n_train = len(x_train)
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps= and epochs=")
    if sampler is None and n_train < batch_size:
        raise ValueError(f"batch_size={batch_size} exceeds the {n_train} training examples")
    per_epoch = max(1, n_train // batch_size)
    total = int(steps) if steps is not None else int(round(epochs * per_epoch))
    if total < 1:
        raise ValueError(f"nothing to train: {total} steps")
    eval_every = int(eval_every or max(1, total // 50))
    loss_every = int(loss_every or eval_every)
    callback_every = int(callback_every or eval_every)
    probe_every = int(probe_every or eval_every)
    check_every = max(1, int(check_every))

    dev = _pick_device(device)
    model.to(dev)
    x_train = x_train.to(dev)
    y_train = y_train.to(dev, dtype=torch.long)
    if max_eval is not None:
        x_test, y_test = x_test[:max_eval], y_test[:max_eval]
    x_test = x_test.to(dev)
    y_test = y_test.to(dev, dtype=torch.long)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = _make_optimizer(optimizer, params, lr, momentum, weight_decay)
    groups = opt.param_groups
    gen = torch.Generator().manual_seed(seed)
    probes = list(probes or ())
    probe_states = [p.active for p in probes]
    for p in probes:
        p.active = False

    hist = History(config=_plain({
        "model": type(model).__name__,
        "num_params": sum(p.numel() for p in params),
        "steps": total, "batch_size": batch_size,
        "optimizer": optimizer if isinstance(optimizer, str) else _describe(optimizer),
        "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
        "lr_schedule": None if lr_schedule is None else _describe(lr_schedule),
        "sampler": None if sampler is None else _describe(sampler),
        "seed": seed, "device": str(dev), "eval_every": eval_every,
        "loss_every": loss_every, "max_eval": max_eval, "n_train": n_train,
    }))

    def lr_of(i: int) -> float:  # learning rate of update i (0-based)
        return float(lr_schedule(i)) if lr_schedule is not None else float(groups[0]["lr"])

    t_start = time.perf_counter()
    eval_time = 0.0

    def record_eval(step: int) -> None:
        nonlocal eval_time
        t0 = time.perf_counter()
        acc = evaluate(model, x_test, y_test, eval_batch_size)
        eval_time += time.perf_counter() - t0
        hist.test_step.append(step)
        hist.test_acc.append(acc)
        hist.wall_time.append(time.perf_counter() - t_start)

    # Losses waiting on the device, and the running window on the host.
    pending: list[torch.Tensor] = []
    flushed = 0                       # updates whose loss is on the host
    win_sum, win_n = 0.0, 0

    def flush() -> bool:
        """Move pending losses to the host; returns True if the run diverged."""
        nonlocal flushed, win_sum, win_n
        if not pending:
            return False
        values = torch.stack(pending).float().cpu().tolist()
        pending.clear()
        for v in values:
            flushed += 1
            win_sum += v
            win_n += 1
            bad = not math.isfinite(v) or (max_loss is not None and v > max_loss)
            if bad or flushed % loss_every == 0 or flushed == total:
                hist.step.append(flushed)
                hist.train_loss.append(win_sum / win_n)
                hist.lr.append(lr_of(flushed - 1))
                win_sum, win_n = 0.0, 0
            if bad:
                hist.diverged, hist.diverged_at = True, flushed
                return True
        return False

    bar = None
    if _show_progress(progress):
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc=type(model).__name__, unit="step", leave=True)

    model.train()
    record_eval(0)
    stop = bool(callback is not None and callback(0, model, hist))
    batches = None
    step = 0
    try:
        while step < total and not stop:
            i = step                      # updates done before this one
            if sampler is not None:
                idx = sampler(i, gen).to(dev, non_blocking=True)
            else:
                j = i % per_epoch
                if j == 0 or batches is None:
                    perm = torch.randperm(n_train, generator=gen)[: per_epoch * batch_size]
                    batches = perm.to(dev).view(per_epoch, batch_size)
                idx = batches[j]
            xb = x_train.index_select(0, idx)
            yb = y_train.index_select(0, idx)
            probing = bool(probes) and i % probe_every == 0
            if probing:
                for p in probes:
                    p.step, p.active = i, True
            if lr_schedule is not None:
                new_lr = float(lr_schedule(i))
                for g in groups:
                    g["lr"] = new_lr
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if probing:
                for p in probes:
                    p.active = False
            opt.step()
            pending.append(loss.detach())
            step = i + 1

            is_eval = step % eval_every == 0 or step == total
            is_cb = callback is not None and step % callback_every == 0
            if is_eval or is_cb or len(pending) >= check_every:
                n_new = len(pending)
                if flush():
                    record_eval(hist.diverged_at)
                    break
                if bar is not None:
                    bar.update(n_new)
                if is_eval:
                    record_eval(step)
                    if bar is not None and hist.train_loss:
                        bar.set_postfix(loss=f"{hist.train_loss[-1]:.3f}", acc=f"{hist.test_acc[-1]:.4f}")
                if is_cb and callback(step, model, hist):
                    stop = True
        if stop and not hist.diverged:
            # Stopped by the callback: close the record at the current step.
            if flush():
                record_eval(hist.diverged_at)
            else:
                if win_n:
                    hist.step.append(flushed)
                    hist.train_loss.append(win_sum / win_n)
                    hist.lr.append(lr_of(flushed - 1))
                if hist.test_step[-1] != step:
                    record_eval(step)
    finally:
        if bar is not None:
            bar.close()
        for p, state in zip(probes, probe_states):
            p.active = state
        model.train()

    train_time = time.perf_counter() - t_start - eval_time
    hist.steps_per_s = step / train_time if train_time > 0 else float("inf")
    return hist

"""Training loop, evaluation and run records for the book's experiments.

Every training run of the book goes through one loop, :func:`train_loop`, built from pieces a
reader can take one at a time:

* a **batch source** ``step -> (inputs, labels)``: :class:`EpochOrder` (a fresh permutation per
  epoch) or a ``sampler``, turned into batches by :func:`indexed_batches`;
* a **step** ``(inputs, labels) -> loss``: :class:`Step` (forward, cross-entropy, backward,
  optimizer); the data-parallel step of :mod:`bnlib.lab.launch` subclasses it;
* a **plan** (:class:`Plan`): when to evaluate, record the loss, call back, probe;
* an **evaluator** ``model -> accuracy``: :func:`evaluate`, with ``train_mode=True`` (or the
  context manager :func:`batch_statistics`) for BN with the statistics of each test batch;
* the **run record** :class:`History`.

:func:`fit` is the single-process front end (its arguments are checked before anything runs);
``bnlib.lab.launch.train_replica`` runs the same loop in each data-parallel process.

The loop is written for speed on a laptop CPU as much as for a GPU:

* the data set is moved to the device once; mini-batches are gathered there
  from indices drawn on the CPU with a seeded :class:`torch.Generator`;
* the loss of each step stays on the device; it is copied to the host only at
  *sync points* (every ``check_every`` steps, at evaluations, at callbacks and
  at the end), so no step waits for the GPU;
* a run that diverges (a non-finite loss) stops and says so in its
  :class:`History` instead of raising; Ctrl-C raises :class:`FitInterrupted`,
  which carries the History so far.

Reproducibility pattern (the caller builds the model, so the caller seeds it)::

    seed_everything(0)
    model = MLP(norm="bn")
    hist = fit(model, data, steps=50_000, seed=0)

Running this twice on the CPU gives two histories for which
``History.same_results`` is True (only the timings differ).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
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
    "FitInterrupted",
    "evaluate",
    "batch_statistics",
    "class_subset_sampler",
    "train_loop",
    "Plan",
    "Step",
    "EpochOrder",
    "indexed_batches",
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


def _parts(x: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The model's inputs as a tuple: ``x`` alone, or the tensors of a tuple ``(x, lengths, ...)``."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _check_parts(parts: tuple[torch.Tensor, ...], y: torch.Tensor, what: str) -> int:
    """Returns the number of examples; raises ValueError unless every part and ``y`` have that many."""
    if not parts:
        raise ValueError(f"{what}: the inputs are an empty tuple; expected a tensor or a tuple of tensors")
    n = len(y)
    for k, t in enumerate(parts):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: input part {k} is a {type(t).__name__}; expected a tensor")
        if t.dim() == 0 or len(t) != n:
            shape = tuple(t.shape)
            raise ValueError(f"{what}: input part {k} has shape {shape} but there are {n} labels; "
                             "every input tensor needs one row per label (same first dimension)")
    return n


def _saved_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for m, training in modes:
        m.training = training


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: ``model`` in eval mode under no_grad; every submodule's mode restored on exit."""
    modes = _saved_modes(model)
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        _restore_modes(modes)


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: run ``model`` with batch statistics (BN in training mode), leaving no trace.

    Inside the ``with`` block the model is in training mode (its Dropout layers stay in eval mode) and
    gradients are off, so every batch-statistics layer normalizes a batch with that batch's own mean
    and variance. On exit, every buffer (``running_mean``, ``running_var``, ``num_batches_tracked``, ...)
    is the same tensor with the same values as before, and every submodule is back in its own
    train/eval mode::

        with batch_statistics(model):
            out = model(x)          # BN uses x's statistics; no grad

    This replaces "save the state_dict, train(), forward, load the state_dict back".
    """
    modes = _saved_modes(model)
    buffers = [(m, name, buf, buf.detach().clone())
               for m in model.modules() for name, buf in m.named_buffers(recurse=False)]
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        with torch.no_grad():
            for m, name, buf, saved in buffers:
                setattr(m, name, buf)      # the original tensor, even if the forward replaced it
                buf.copy_(saved)
        _restore_modes(modes)


def evaluate(model: nn.Module, x: torch.Tensor | Sequence[torch.Tensor], y: torch.Tensor,
             batch_size: int = 10000, *, train_mode: bool = False) -> float:
    """Classification accuracy of ``model`` on ``(x, y)``.

    ``x`` is a tensor, or a tuple of tensors with one row per example (e.g. ``(x, lengths)``); the
    model is then called as ``model(*parts)`` on each batch of the parts.

    With ``train_mode=False`` (default) the model runs in eval mode (BN uses its running statistics).
    With ``train_mode=True`` it runs under :func:`batch_statistics`: each consecutive batch of
    ``batch_size`` test examples is normalized with its own statistics, and the buffers are left as
    they were. Either way, no gradient is computed and the model's train/eval mode is restored.
    Batches are moved to the model's device if they are not there already. Predictions with NaN
    logits count as class 0 (``argmax`` puts NaN first), so a diverged model scores the frequency of
    class 0, close to chance.

    Returns:
        float: the fraction of correctly classified examples, in [0, 1].
    """
    parts = _parts(x)
    n = _check_parts(parts, y, "evaluate()")
    if n == 0:
        raise ValueError("evaluate() needs at least one example")
    if batch_size < 1:
        raise ValueError(f"evaluate(): batch_size must be a positive integer, got {batch_size}")
    dev = _model_device(model)
    mode = batch_statistics(model) if train_mode else _eval_mode(model)
    correct = torch.zeros((), dtype=torch.long, device=dev)
    with mode:
        for i in range(0, n, batch_size):
            xb = [t[i:i + batch_size].to(dev, non_blocking=True) for t in parts]
            yb = y[i:i + batch_size].to(dev, non_blocking=True)
            correct += (model(*xb).argmax(dim=1) == yb).sum()
    return correct.item() / n


# --------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------

def class_subset_sampler(y: torch.Tensor, batch_size: int, classes_per_batch: int = 2) -> Callable:
    """A non-i.i.d. ``sampler`` for :func:`fit`: each batch holds few classes.

    For every batch, ``classes_per_batch`` distinct classes are drawn, then
    ``batch_size`` examples uniformly (with replacement) among the training
    examples of those classes.

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
# The loop's pieces: batch sources, the update step, the loss window
# --------------------------------------------------------------------------

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]  # (the model's inputs, the labels)


class EpochOrder:
    """The default order of :func:`fit`: ``order(step)`` gives the indices of that update's examples.

    Every epoch (``n // batch_size`` updates) walks through a fresh random permutation of the ``n``
    training examples, drawn from ``generator`` on the CPU and moved to ``device`` once; a final
    incomplete batch is dropped, so every batch has ``batch_size`` examples.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, device: torch.device) -> None:
        self.n, self.batch_size, self.generator, self.device = n, batch_size, generator, device
        self.per_epoch = max(1, n // batch_size)
        self.batches: torch.Tensor | None = None  # this epoch's batches, (per_epoch, batch_size)

    def __call__(self, step: int) -> torch.Tensor:
        j = step % self.per_epoch
        if j == 0 or self.batches is None:
            perm = torch.randperm(self.n, generator=self.generator)[: self.per_epoch * self.batch_size]
            self.batches = perm.to(self.device).view(self.per_epoch, self.batch_size)
        return self.batches[j]


def indexed_batches(parts: tuple[torch.Tensor, ...], y: torch.Tensor,
                    order: Callable[[int], torch.Tensor]) -> Callable[[int], Batch]:
    """A batch source: ``step -> (inputs, labels)``, the rows ``order(step)`` of every part and of ``y``."""
    def batch(step: int) -> Batch:
        idx = order(step).to(y.device, non_blocking=True)
        return tuple(t.index_select(0, idx) for t in parts), y.index_select(0, idx)

    return batch


class Step:
    """One update: forward, cross-entropy, backward, optional gradient clipping, optimizer step.

    ``step(inputs, labels)`` calls ``model(*inputs)`` and returns the loss, still on the device (so no
    update waits for the host). Subclass it to time or wrap the update (the data-parallel step of
    :mod:`bnlib.lab.launch` does).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, clip_grad_norm: float | None = None):
        self.model, self.optimizer, self.clip_grad_norm = model, optimizer, clip_grad_norm

    def __call__(self, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(self.model(*inputs), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        self.optimizer.step()
        return loss.detach()


@dataclass
class Plan:
    """When things happen in :func:`train_loop` (all counts are updates)."""

    total: int                    # updates to run
    eval_every: int               # evaluate after every this many updates (and at the end)
    loss_every: int               # close a window of the training loss every this many updates
    callback_every: int = 0       # call the callback every this many updates (0: never after step 0)
    probe_every: int = 0          # switch the probes on for every this many-th update (0: never)
    check_every: int = 50         # copy losses to the host at least every this many updates
    max_loss: float | None = None  # a loss above it counts as divergence
    evaluate_first: bool = True   # also evaluate the initial model (step 0)


class _LossWindow:
    """Losses of the updates, kept on the device until a sync point, then averaged into the History.

    :meth:`flush` copies them to the host, closes a window every ``loss_every`` updates (and at the
    last update) and returns True at the first non-finite loss (or one above ``max_loss``): the window
    is closed at that update and ``diverged_at`` is set.
    """

    def __init__(self, hist: History, plan: Plan, lr_of: Callable[[int], float]) -> None:
        self.hist, self.plan, self.lr_of = hist, plan, lr_of
        self.pending: list[torch.Tensor] = []
        self.flushed = 0             # updates whose loss is on the host
        self.sum, self.n = 0.0, 0    # the open window

    def close(self) -> None:
        """Record the open window (if any) at the number of updates flushed so far."""
        if self.n:
            self.hist.step.append(self.flushed)
            self.hist.train_loss.append(self.sum / self.n)
            self.hist.lr.append(self.lr_of(self.flushed - 1))
            self.sum, self.n = 0.0, 0

    def flush(self) -> bool:
        if not self.pending:
            return False
        values = torch.stack(self.pending).float().cpu().tolist()
        self.pending.clear()
        max_loss = self.plan.max_loss
        for v in values:
            self.flushed += 1
            self.sum += v
            self.n += 1
            bad = not math.isfinite(v) or (max_loss is not None and v > max_loss)
            if bad or self.flushed % self.plan.loss_every == 0 or self.flushed == self.plan.total:
                self.close()
            if bad:
                self.hist.diverged, self.hist.diverged_at = True, self.flushed
                return True
        return False


class _Evaluations:
    """``record(at)``: the test accuracy after ``at`` updates into the History, with the seconds since
    the start; ``seconds`` adds up the time spent evaluating (left out of ``steps_per_s``)."""

    def __init__(self, evaluator: Callable[[nn.Module], float], model: nn.Module, hist: History) -> None:
        self.evaluator, self.model, self.hist = evaluator, model, hist
        self.start = time.perf_counter()
        self.seconds = 0.0

    def record(self, at: int) -> None:
        t0 = time.perf_counter()
        acc = self.evaluator(self.model)
        self.seconds += time.perf_counter() - t0
        self.hist.test_step.append(at)
        self.hist.test_acc.append(acc)
        self.hist.wall_time.append(time.perf_counter() - self.start)


class FitInterrupted(KeyboardInterrupt):
    """Raised by :func:`fit` (and :func:`train_loop`) on Ctrl-C: the run so far is in ``.history``.

    It is a :class:`KeyboardInterrupt`, so an interrupted notebook cell or script stops as usual; catch
    it to keep the partial record (``interrupted=True``, losses up to the last finished update)::

        try:
            hist = fit(model, data, steps=50_000)
        except FitInterrupted as stop:
            hist = stop.history
    """

    def __init__(self, history: History) -> None:
        super().__init__(f"training interrupted after {history.step[-1] if history.step else 0} updates")
        self.history = history


# --------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------

def train_loop(
    model: nn.Module,
    batches: Callable[[int], Batch],
    step: Step,
    plan: Plan,
    evaluator: Callable[[nn.Module], float],
    hist: History,
    *,
    lr_schedule: Callable[[int], float] | None = None,
    probes: Sequence[Any] = (),
    callback: Callable[[int, nn.Module, History], bool | None] | None = None,
    progress: bool = False,
    any_replica: Callable[[bool], bool] = bool,
) -> History:
    """Run ``plan.total`` updates and record them in ``hist``: the one loop behind every training run.

    Update ``i`` (0-based) takes ``batches(i)``, sets the learning rate ``lr_schedule(i)`` if given,
    switches the ``probes`` on when ``i % plan.probe_every == 0`` and calls ``step``. Losses stay on the
    device until a sync point: an evaluation (``evaluator(model)``, every ``plan.eval_every`` updates
    and at the end), a callback (``callback(i + 1, model, hist)``, every ``plan.callback_every``; True
    stops the run) or ``plan.check_every`` pending losses. ``any_replica`` turns this process's "the
    run diverged" into the decision of all processes (data-parallel runs stop together).

    Returns ``hist``; raises :class:`FitInterrupted` (with ``hist``) on Ctrl-C.
    """
    groups = step.optimizer.param_groups

    def lr_of(i: int) -> float:  # learning rate of update i
        return float(lr_schedule(i)) if lr_schedule is not None else float(groups[0]["lr"])

    window = _LossWindow(hist, plan, lr_of)
    evals = _Evaluations(evaluator, model, hist)
    record_eval = evals.record

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=plan.total, desc=type(model).__name__, unit="step", leave=True)
    probe_states = [p.active for p in probes]
    for p in probes:
        p.active = False
    done = 0  # updates completed
    model.train()
    try:
        if plan.evaluate_first:
            record_eval(0)
        stop = bool(callback is not None and callback(0, model, hist))
        while done < plan.total and not stop:
            inputs, labels = batches(done)
            probing = bool(probes) and plan.probe_every > 0 and done % plan.probe_every == 0
            if probing:
                for p in probes:
                    p.step, p.active = done, True
            if lr_schedule is not None:
                for g in groups:
                    g["lr"] = lr_of(done)
            window.pending.append(step(inputs, labels))
            if probing:
                for p in probes:
                    p.active = False
            done += 1

            is_eval = done % plan.eval_every == 0 or done == plan.total
            is_cb = callback is not None and plan.callback_every > 0 and done % plan.callback_every == 0
            if is_eval or is_cb or len(window.pending) >= plan.check_every:
                n_new = len(window.pending)
                if any_replica(window.flush()):
                    if not hist.diverged:  # another replica diverged: stop together
                        hist.diverged, hist.diverged_at = True, done
                    record_eval(hist.diverged_at)
                    break
                if bar is not None:
                    bar.update(n_new)
                if is_eval:
                    record_eval(done)
                    if bar is not None and hist.train_loss:
                        bar.set_postfix(loss=f"{hist.train_loss[-1]:.3f}", acc=f"{hist.test_acc[-1]:.4f}")
                stop = bool(is_cb and callback(done, model, hist))
        if stop and not hist.diverged:  # stopped by the callback: close the record at this update
            if window.flush():
                record_eval(hist.diverged_at)
            else:
                window.close()
                if not hist.test_step or hist.test_step[-1] != done:
                    record_eval(done)
    except KeyboardInterrupt:
        window.flush()
        window.close()
        hist.interrupted = True
        raise FitInterrupted(hist) from None
    finally:
        if bar is not None:
            bar.close()
        for p, state in zip(probes, probe_states):
            p.active = state
        model.train()
        train_time = time.perf_counter() - evals.start - evals.seconds
        hist.steps_per_s = done / train_time if train_time > 0 else float("inf")
    return hist


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


_OPTIMIZERS = {"sgd", "adam", "adamw"}


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
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _positive_int(name: str, value: Any, default: int | None = None) -> int:
    """``value`` (or ``default`` when it is None) as an int >= 1; ValueError saying what was expected."""
    if value is None and default is not None:
        return default
    whole = isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole or value < 1:
        raise ValueError(f"fit(): {name} must be a positive integer, got {value!r}")
    return int(value)


def _finite(name: str, value: Any, minimum: float | None = 0.0) -> float:
    """``value`` as a finite float (>= ``minimum`` if given); ValueError saying what was expected."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"fit(): {name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or (minimum is not None and v < minimum):
        bound = "" if minimum is None else f" >= {minimum:g}"
        raise ValueError(f"fit(): {name} must be a finite number{bound}, got {value!r}")
    return v


def _check_fit_args(data: Any, steps: Any, epochs: Any, batch_size: Any, optimizer: Any, lr: Any,
                    momentum: Any, weight_decay: Any, sampler: Any, batches: Any, max_loss: Any,
                    clip_grad_norm: Any) -> tuple[tuple[torch.Tensor, ...], torch.Tensor,
                                                  tuple[torch.Tensor, ...], torch.Tensor, int]:
    """Validate :func:`fit`'s arguments before anything runs; returns the data's parts and the update count."""
    try:
        (x_train, y_train), (x_test, y_test) = data
    except (TypeError, ValueError):
        raise ValueError("fit(): data must be ((x_train, y_train), (x_test, y_test)); "
                         f"got a {type(data).__name__}") from None
    train, test = _parts(x_train), _parts(x_test)
    n_train = _check_parts(train, y_train, "fit() training set")
    n_test = _check_parts(test, y_test, "fit() test set")
    if n_test == 0:
        raise ValueError("fit(): the test set is empty; evaluation needs at least one example")
    batch_size = _positive_int("batch_size", batch_size)
    if n_train == 0:
        raise ValueError("fit(): the training set is empty (0 examples)"
                         + ("; a sampler or batch source still needs examples to index" if sampler or batches
                            else ""))
    if sampler is not None and batches is not None:
        raise ValueError("fit(): give at most one of sampler= and batches=")
    for name, fn in (("sampler", sampler), ("batches", batches)):
        if fn is not None and not callable(fn):
            raise TypeError(f"fit(): {name} must be callable (step, generator) -> ..., got {type(fn).__name__}")
    if sampler is None and batches is None and n_train < batch_size:
        raise ValueError(f"fit(): batch_size={batch_size} exceeds the {n_train} training examples")
    if (steps is None) == (epochs is None):
        raise ValueError("fit(): give exactly one of steps= and epochs=")
    if steps is not None:
        total = _positive_int("steps", steps)
    else:
        e = _finite("epochs", epochs)
        total = int(round(e * max(1, n_train // batch_size)))
        if total < 1:
            raise ValueError(f"fit(): epochs={epochs} is less than one update ({n_train // batch_size} per epoch)")
    if isinstance(optimizer, str) and optimizer.lower() not in _OPTIMIZERS:
        raise ValueError(f"fit(): unknown optimizer {optimizer!r}; use 'sgd', 'adam', 'adamw', "
                         "a torch.optim.Optimizer or a callable params -> optimizer")
    _finite("lr", lr)
    _finite("momentum", momentum)
    _finite("weight_decay", weight_decay)
    if max_loss is not None:
        _finite("max_loss", max_loss, None)
    if clip_grad_norm is not None and _finite("clip_grad_norm", clip_grad_norm) <= 0:
        raise ValueError(f"fit(): clip_grad_norm must be positive, got {clip_grad_norm!r}")
    return train, y_train, test, y_test, total


def fit(
    model: nn.Module,
    data: tuple[tuple[Any, torch.Tensor], tuple[Any, torch.Tensor]],
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
    batches: Callable[[int, torch.Generator], tuple[Any, torch.Tensor]] | None = None,
    clip_grad_norm: float | None = None,
) -> History:
    """Train ``model`` for classification with cross-entropy and mini-batch SGD.

    Args:
        model: any ``nn.Module`` mapping a batch of ``x`` to class logits. It
            is moved to the device in place and left in train mode.
        data: ``((x_train, y_train), (x_test, y_test))`` tensors, as returned
            by :func:`bnlib.lab.data.load_mnist`. Moved to the device once.
            ``x_train`` and ``x_test`` may be tuples of tensors with one row
            per example, e.g. ``(x, lengths)``: the model is then called as
            ``model(*parts)``.
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
            update ``step``; replaces the default order (:class:`EpochOrder`).
            Use the generator for randomness so runs stay reproducible. See
            :func:`class_subset_sampler`.
        batches: ``(step, generator) -> (x, y)``, the whole batch of update
            ``step`` (``x`` a tensor or a tuple of tensors), for batches that
            are not rows of the training set, e.g. sequences cut to lengths
            drawn afresh every time. Replaces ``sampler`` and the default order.
        clip_grad_norm: clip the gradients' total norm to this before every
            update (default: no clipping).
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

    Every argument is checked before anything runs; a wrong one raises ValueError (or TypeError)
    saying what was expected.

    Divergence: when a loss is NaN or infinite (or above ``max_loss``),
    training stops at the next sync point, ``diverged=True`` and
    ``diverged_at`` (the first such update) are recorded, the loss window is
    closed at that update, and one last test accuracy is recorded at
    ``diverged_at``: the accuracy of the model as it is, evaluated like any
    other (near chance for NaN weights). No exception is raised.

    Ctrl-C: :class:`FitInterrupted` (a KeyboardInterrupt) is raised; its ``history`` holds the run so
    far, marked ``interrupted=True``.

    Returns:
        History: the record of the run.
    """
    train, y_train, test, y_test, total = _check_fit_args(
        data, steps, epochs, batch_size, optimizer, lr, momentum, weight_decay, sampler, batches, max_loss,
        clip_grad_norm)
    eval_every = _positive_int("eval_every", eval_every, max(1, total // 50))
    plan = Plan(total=total, eval_every=eval_every,
                loss_every=_positive_int("loss_every", loss_every, eval_every),
                callback_every=_positive_int("callback_every", callback_every, eval_every),
                probe_every=_positive_int("probe_every", probe_every, eval_every),
                check_every=max(1, int(check_every)), max_loss=max_loss)
    eval_batch_size = _positive_int("eval_batch_size", eval_batch_size)
    n_eval = _positive_int("max_eval", max_eval, len(y_test))

    dev = _pick_device(device)
    model.to(dev)
    train = tuple(t.to(dev) for t in train)
    y_train = y_train.to(dev, dtype=torch.long)
    test = tuple(t[:n_eval].to(dev) for t in test)
    y_test = y_test[:n_eval].to(dev, dtype=torch.long)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = _make_optimizer(optimizer, params, lr, momentum, weight_decay)
    gen = torch.Generator().manual_seed(seed)
    if batches is not None:
        source = _custom_batches(batches, gen, dev)
    else:
        order = (EpochOrder(len(y_train), batch_size, gen, dev) if sampler is None
                 else lambda i: sampler(i, gen))
        source = indexed_batches(train, y_train, order)

    hist = History(config=_plain({
        "model": type(model).__name__,
        "num_params": sum(p.numel() for p in params),
        "steps": total, "batch_size": batch_size,
        "optimizer": optimizer if isinstance(optimizer, str) else _describe(optimizer),
        "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
        "lr_schedule": None if lr_schedule is None else _describe(lr_schedule),
        "sampler": None if sampler is None else _describe(sampler),
        "seed": seed, "device": str(dev), "eval_every": eval_every,
        "loss_every": plan.loss_every, "max_eval": max_eval, "n_train": len(y_train),
    }))
    return train_loop(model, source, Step(model, opt, clip_grad_norm), plan,
                      lambda m: evaluate(m, test, y_test, eval_batch_size), hist,
                      lr_schedule=lr_schedule, probes=list(probes or ()),
                      callback=callback, progress=_show_progress(progress))


def _custom_batches(batches: Callable, gen: torch.Generator, dev: torch.device) -> Callable[[int], Batch]:
    """fit's ``batches=`` as a batch source of the loop: ``step -> (inputs on dev, labels on dev)``."""
    def batch(step: int) -> Batch:
        x, y = batches(step, gen)
        return tuple(t.to(dev, non_blocking=True) for t in _parts(x)), y.to(dev, dtype=torch.long)

    return batch

"""The one training loop of the book, :func:`train_loop`, and the pieces it is made of.

Every training run goes through it: :func:`bnlib.lab.training.fit` in one process and
``bnlib.lab.launch.train_replica`` in each data-parallel process. Its pieces:

* a **batch source** ``step -> (inputs, labels)`` (:mod:`bnlib.lab.samplers`);
* a **step** ``(inputs, labels) -> loss``: :class:`Step` (forward, cross-entropy, backward,
  optimizer); the data-parallel step of :mod:`bnlib.lab.launch` subclasses it;
* a **plan** (:class:`Plan`): when to evaluate, record the loss, call back, probe;
* an **evaluator** ``model -> accuracy`` (:func:`bnlib.lab.evaluation.evaluate`);
* the **run record** (:class:`bnlib.lab.record.History`).

The loop is written for speed on a laptop CPU as much as for a GPU: the loss of each step stays on
the device and is copied to the host only at *sync points* (every ``check_every`` steps, at
evaluations, at callbacks and at the end), so no step waits for the GPU. A run that diverges (a
non-finite loss) stops and says so in its History instead of raising; Ctrl-C raises
:class:`FitInterrupted`, which carries the History so far.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .record import History
from .samplers import Batch

__all__ = ["Step", "Plan", "FitInterrupted", "train_loop"]


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
    """Raised by :func:`~bnlib.lab.training.fit` (and :func:`train_loop`) on Ctrl-C: the run so far is in
    ``.history``.

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

def _training_modes(model: nn.Module, keep_eval: Sequence[nn.Module]) -> None:
    """``model`` in train mode, except the modules of ``keep_eval`` (and their submodules), in eval mode."""
    model.train()
    for m in keep_eval:
        m.eval()


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
    keep_eval: Sequence[nn.Module] = (),
) -> History:
    """Run ``plan.total`` updates and record them in ``hist``: the one loop behind every training run.

    Update ``i`` (0-based) takes ``batches(i)``, sets the learning rate ``lr_schedule(i)`` if given,
    switches the ``probes`` on when ``i % plan.probe_every == 0`` and calls ``step``. Losses stay on the
    device until a sync point: an evaluation (``evaluator(model)``, every ``plan.eval_every`` updates
    and at the end), a callback (``callback(i + 1, model, hist)``, every ``plan.callback_every``; True
    stops the run) or ``plan.check_every`` pending losses. ``any_replica`` turns this process's "the
    run diverged" into the decision of all processes (data-parallel runs stop together).

    The model trains in train mode, except the modules of ``keep_eval``, held in eval mode (a BN layer
    there normalizes with its running statistics and leaves them unchanged); it is left that way.

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
    _training_modes(model, keep_eval)
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
        _training_modes(model, keep_eval)
        train_time = time.perf_counter() - evals.start - evals.seconds
        hist.steps_per_s = done / train_time if train_time > 0 else float("inf")
    return hist

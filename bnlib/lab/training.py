"""Training a classifier in one call: :func:`fit`, and the kit's training API in one place.

:func:`fit` is the single-process front end of the book's one training loop. It checks every argument
before anything runs, moves the model and the data to the device, builds the pieces of the loop and
runs :func:`bnlib.lab.loop.train_loop`. The pieces live in modules a reader can take one at a time:

* :mod:`bnlib.lab.runtime`     -- :func:`device` (where to run) and :func:`seed_everything`;
* :mod:`bnlib.lab.record`      -- the run record :class:`History` and its JSON form;
* :mod:`bnlib.lab.evaluation`  -- :func:`evaluate` and :func:`batch_statistics`;
* :mod:`bnlib.lab.samplers`    -- batch sources: :class:`EpochOrder`, :func:`indexed_batches`,
  :func:`class_subset_sampler`;
* :mod:`bnlib.lab.loop`        -- :func:`train_loop`, :class:`Step`, :class:`Plan`, :class:`FitInterrupted`.

This module re-exports all of them, so ``from bnlib.lab.training import ...`` and
``training.evaluate(...)`` keep working.

The options of :func:`fit` come in four small groups (frozen dataclasses), each also accepted as
plain keyword arguments (``fit(model, data, steps=100, lr=0.05)`` is
``fit(model, data, steps=100, optim=Optim(lr=0.05))``):

* :class:`Optim`     -- how each update moves the weights (optimizer, learning rate, clipping);
* :class:`Sampling`  -- which examples each update sees (batch size, order, seed);
* :class:`Recording` -- what the History records and when (evaluations, loss windows, divergence);
* :class:`Hooks`     -- what else runs during training (callback, probes, progress bar).

Reproducibility pattern (the caller builds the model, so the caller seeds it)::

    seed_everything(0)
    model = MLP(norm="bn")
    hist = fit(model, data, steps=50_000, seed=0)

Running this twice on the CPU gives two histories for which ``History.same_results`` is True (only
the timings differ).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..layers import bn_layers, preserved_state
from .evaluation import as_parts, batch_statistics, check_parts, evaluate, model_device
from .loop import FitInterrupted, Plan, Step, train_loop
from .record import History, describe, plain
from .runtime import device, seed_everything
from .samplers import Batch, EpochOrder, class_subset_sampler, indexed_batches

__all__ = [
    "device",
    "seed_everything",
    "History",
    "fit",
    "Optim",
    "Sampling",
    "Recording",
    "Hooks",
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

_pick_device = device  # fit() has an argument called ``device``


# --------------------------------------------------------------------------
# The option groups of fit
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Optim:
    """How each update moves the weights.

    Attributes:
        optimizer: ``'sgd'`` (with ``momentum``), ``'adam'``, ``'adamw'``, a ``torch.optim.Optimizer``
            or a callable ``params -> optimizer``.
        lr, momentum, weight_decay: optimizer settings (ignored when an optimizer instance or factory
            is given).
        lr_schedule: ``step -> lr``, a pure function giving the learning rate of update number
            ``step`` (0-based); overrides ``lr``.
        clip_grad_norm: clip the gradients' total norm to this before every update (None: no clipping).
    """

    optimizer: Any = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_schedule: Callable[[int], float] | None = None
    clip_grad_norm: float | None = None


@dataclass(frozen=True)
class Sampling:
    """Which training examples each update sees.

    Attributes:
        batch_size: examples per update (default 60, as in the paper's MNIST experiment).
        seed: seeds the mini-batch order (not the model: see :func:`seed_everything`).
        sampler: ``(step, generator) -> LongTensor`` of training indices for update ``step``; replaces
            the default order (:class:`EpochOrder`). Use the generator for randomness so runs stay
            reproducible. See :func:`class_subset_sampler`.
        batches: ``(step, generator) -> (x, y)``, the whole batch of update ``step`` (``x`` a tensor or
            a tuple of tensors), for batches that are not rows of the training set, e.g. sequences cut
            to lengths drawn afresh every time. Replaces ``sampler`` and the default order.
    """

    batch_size: int = 60
    seed: int = 0
    sampler: Callable[[int, torch.Generator], torch.Tensor] | None = None
    batches: Callable[[int, torch.Generator], tuple[Any, torch.Tensor]] | None = None


@dataclass(frozen=True)
class Recording:
    """What the :class:`History` records, and when (all counts are updates).

    Attributes:
        eval_every: evaluate the test accuracy every this many updates, plus before the first and after
            the last (default: ``steps // 50``).
        loss_every: window over which the training loss is averaged before it is recorded (default:
            ``eval_every``).
        eval_batch_size: batch size of evaluation (memory only, not results).
        max_eval: evaluate on the first ``max_eval`` test examples only.
        check_every: copy losses to the host and check them for divergence at least every this many
            updates.
        max_loss: if given, a loss above it also counts as divergence.
    """

    eval_every: int | None = None
    loss_every: int | None = None
    eval_batch_size: int = 10000
    max_eval: int | None = None
    check_every: int = 50
    max_loss: float | None = None


@dataclass(frozen=True)
class Hooks:
    """What else runs during training.

    Attributes:
        callback: ``callback(step, model, history)`` called before training (step 0) and every
            ``callback_every`` updates (default ``eval_every``); the history is up to date when it is
            called. Returning True stops training.
        probes: objects with ``active`` and ``step`` attributes, such as those of
            :mod:`bnlib.lab.probes`. They are switched on for the forward and backward pass of every
            ``probe_every``-th update only (default ``eval_every``), with ``probe.step`` set to the
            number of updates done before that pass (0 = the initial model), and restored to their
            previous ``active`` state at the end.
        progress: True/False forces a progress bar on/off. None (default): on only if
            ``BNLIB_PROGRESS=1``, off if ``BNLIB_PROGRESS=0``, otherwise on only when stdout is a
            terminal -- so notebooks run by nbclient/nbval (and Jupyter in general) show no bar unless
            asked.
    """

    callback: Callable[[int, nn.Module, History], bool | None] | None = None
    callback_every: int | None = None
    probes: Sequence[Any] | None = None
    probe_every: int | None = None
    progress: bool | None = None


_GROUPS: dict[str, type] = {"optim": Optim, "sampling": Sampling, "recording": Recording, "hooks": Hooks}
_GROUP_OF = {f.name: group for group, cls in _GROUPS.items() for f in dataclasses.fields(cls)}


def _option_groups(given: dict[str, Any], flat: dict[str, Any]) -> dict[str, Any]:
    """The four option groups of :func:`fit`: each given one (or its defaults), with the plain keyword
    arguments ``flat`` written into the group they belong to."""
    unknown = sorted(set(flat) - set(_GROUP_OF))
    if unknown:
        raise TypeError(f"fit() got an unexpected keyword argument {unknown[0]!r}; its options are steps, epochs, "
                        f"device, keep_eval, the groups {', '.join(_GROUPS)} and their fields "
                        f"{', '.join(_GROUP_OF)}")
    groups = {}
    for name, cls in _GROUPS.items():
        group = given[name] if given[name] is not None else cls()
        if not isinstance(group, cls):
            raise TypeError(f"fit(): {name}= must be a {cls.__name__}, got a {type(group).__name__}")
        groups[name] = dataclasses.replace(group, **{k: v for k, v in flat.items() if _GROUP_OF[k] == name})
    return groups


# --------------------------------------------------------------------------
# Checking the arguments
# --------------------------------------------------------------------------

def _show_progress(progress: bool | None) -> bool:
    """Returns whether :func:`fit` should draw a progress bar (see :class:`Hooks`)."""
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


def _make_optimizer(o: Optim, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """Returns a torch optimizer from a name, an instance or a factory ``params -> optimizer``."""
    if isinstance(o.optimizer, torch.optim.Optimizer):
        return o.optimizer
    if callable(o.optimizer):
        return o.optimizer(params)
    name = str(o.optimizer).lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


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


def _check_fit_args(data: Any, steps: Any, epochs: Any, o: Optim, s: Sampling,
                    r: Recording) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, tuple[torch.Tensor, ...],
                                           torch.Tensor, int]:
    """Validate :func:`fit`'s arguments before anything runs; returns the data's parts and the update count."""
    try:
        (x_train, y_train), (x_test, y_test) = data
    except (TypeError, ValueError):
        raise ValueError("fit(): data must be ((x_train, y_train), (x_test, y_test)); "
                         f"got a {type(data).__name__}") from None
    train, test = as_parts(x_train), as_parts(x_test)
    n_train = check_parts(train, y_train, "fit() training set")
    n_test = check_parts(test, y_test, "fit() test set")
    if n_test == 0:
        raise ValueError("fit(): the test set is empty; evaluation needs at least one example")
    batch_size = _positive_int("batch_size", s.batch_size)
    sampler, batches = s.sampler, s.batches
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
    if isinstance(o.optimizer, str) and o.optimizer.lower() not in _OPTIMIZERS:
        raise ValueError(f"fit(): unknown optimizer {o.optimizer!r}; use 'sgd', 'adam', 'adamw', "
                         "a torch.optim.Optimizer or a callable params -> optimizer")
    _finite("lr", o.lr)
    _finite("momentum", o.momentum)
    _finite("weight_decay", o.weight_decay)
    if r.max_loss is not None:
        _finite("max_loss", r.max_loss, None)
    if o.clip_grad_norm is not None and _finite("clip_grad_norm", o.clip_grad_norm) <= 0:
        raise ValueError(f"fit(): clip_grad_norm must be positive, got {o.clip_grad_norm!r}")
    return train, y_train, test, y_test, total


def _kept_in_eval(model: nn.Module, keep_eval: Any) -> list[nn.Module]:
    """fit's ``keep_eval=`` as a list of submodules of ``model`` (True: every BN layer of it)."""
    if keep_eval is None or keep_eval is False:
        return []
    if keep_eval is True:
        return list(bn_layers(model).values())
    if isinstance(keep_eval, (nn.Module, str)) or not isinstance(keep_eval, Iterable):
        raise TypeError("fit(): keep_eval must be True (every BN layer) or a list of submodules or of their "
                        f"qualified names, got {type(keep_eval).__name__}")
    named = dict(model.named_modules())
    ids = {id(m) for m in named.values()}
    kept = []
    for item in keep_eval:
        if isinstance(item, str):
            if item not in named:
                raise ValueError(f"fit(): keep_eval names {item!r}, which is not a submodule of the model")
            item = named[item]
        elif not isinstance(item, nn.Module) or id(item) not in ids:
            raise ValueError(f"fit(): keep_eval holds a {type(item).__name__} that is not a submodule of the model")
        kept.append(item)
    return kept


def _check_labels(model: nn.Module, test: tuple[torch.Tensor, ...], labels: dict[str, torch.Tensor],
                  probes: Sequence[Any] = ()) -> None:
    """Raise ValueError unless every label is a class index of ``model``'s output, ``0 <= y < C``.

    ``C`` is the width of the model's output on two test examples in eval mode (the model, its buffers
    and the random number generators are left as they were, and the ``probes`` record nothing). For a
    model with lazy modules, whose output width is unknown before its first forward pass, only
    ``y >= 0`` is checked. Checked here, before the first update, because an out-of-range label
    otherwise stops the run midway (on a GPU, as a device-side assertion that leaves the process
    unusable). Floating-point labels are accepted when every one is a whole number.
    """
    for what, y in labels.items():
        fractional = y.dtype.is_floating_point and not bool((y == y.round()).all())
        if fractional or y.dtype.is_complex or y.dtype == torch.bool:
            raise ValueError(f"fit(): the {what} labels ({y.dtype}) are not all class indices; "
                             "expected whole numbers 0, 1, ..., C - 1")
        if len(y) and int(y.min()) < 0:
            raise ValueError(f"fit(): the {what} labels include {int(y.min())}; class indices start at 0")
    if any(nn.parameter.is_lazy(t) for t in itertools.chain(model.parameters(), model.buffers())):
        return  # the width of a lazy model's output is known only after its first forward pass
    dev = model_device(model)
    cuda = [dev] if dev.type == "cuda" else []
    active = [p.active for p in probes]
    try:
        for p in probes:
            p.active = False
        with preserved_state(model), torch.no_grad(), torch.random.fork_rng(devices=cuda):
            model.eval()
            out = model(*(t[:2].to(dev) for t in test))
    finally:
        for p, state in zip(probes, active):
            p.active = state
    if out.dim() < 2:
        raise ValueError(f"fit(): the model's output has shape {tuple(out.shape)}; expected (N, classes) logits")
    classes = out.shape[1]
    for what, y in labels.items():
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
            raise ValueError(f"fit(): the {what} labels range over [{int(y.min())}, {int(y.max())}], but the model "
                             f"outputs {classes} classes: every label must be in [0, {classes - 1}]")


# --------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------

def fit(
    model: nn.Module,
    data: tuple[tuple[Any, torch.Tensor], tuple[Any, torch.Tensor]],
    *,
    steps: int | None = None,
    epochs: float | None = None,
    optim: Optim | None = None,
    sampling: Sampling | None = None,
    recording: Recording | None = None,
    hooks: Hooks | None = None,
    device: str | torch.device | None = None,
    keep_eval: bool | Iterable[nn.Module | str] | None = None,
    **options: Any,
) -> History:
    """Train ``model`` for classification with cross-entropy and mini-batch SGD (or another optimizer).

    Args:
        model: any ``nn.Module`` mapping a batch of ``x`` to class logits. It is moved to the device in
            place and left in train mode (the ``keep_eval`` modules in eval mode).
        data: ``((x_train, y_train), (x_test, y_test))`` tensors, as returned by
            :func:`bnlib.lab.data.load_mnist`. Moved to the device once. ``x_train`` and ``x_test`` may
            be tuples of tensors with one row per example, e.g. ``(x, lengths)``: the model is then
            called as ``model(*parts)``. Labels are class indices ``0 <= y < C`` (``C`` the width of the
            model's output), checked before the first update.
        steps, epochs: length of training; give exactly one. An epoch is ``len(x_train) // batch_size``
            updates.
        optim, sampling, recording, hooks: the option groups :class:`Optim`, :class:`Sampling`,
            :class:`Recording`, :class:`Hooks` (defaults when omitted).
        device: device to train on; default :func:`device`.
        keep_eval: modules held in eval mode while the rest of the model trains: ``True`` for every BN
            layer of the model (:func:`bnlib.layers.bn_layers`), or a list of submodules or of their
            qualified names. A BN layer in eval mode normalizes with its running statistics and does
            not update them ("frozen BN", Keras's ``trainable=False``); its γ and β still learn unless
            their ``requires_grad`` is False (see :func:`bnlib.lab.params.train_only`).
        **options: any field of the four groups as a plain keyword argument (``lr=0.05``,
            ``batch_size=64``, ``eval_every=100``, ``callback=...``); it overrides that field of the
            group given (or of the defaults).

    Every argument is checked before anything runs; a wrong one raises ValueError (or TypeError) saying
    what was expected.

    Divergence: when a loss is NaN or infinite (or above ``max_loss``), training stops at the next sync
    point, ``diverged=True`` and ``diverged_at`` (the first such update) are recorded, the loss window
    is closed at that update, and one last test accuracy is recorded at ``diverged_at``: the accuracy of
    the model as it is, evaluated like any other (near chance for NaN weights). No exception is raised.

    Ctrl-C: :class:`FitInterrupted` (a KeyboardInterrupt) is raised; its ``history`` holds the run so
    far, marked ``interrupted=True``.

    Returns:
        History: the record of the run.
    """
    groups = _option_groups({"optim": optim, "sampling": sampling, "recording": recording, "hooks": hooks},
                            options)
    o, s, r, h = groups["optim"], groups["sampling"], groups["recording"], groups["hooks"]
    train, y_train, test, y_test, total = _check_fit_args(data, steps, epochs, o, s, r)
    kept = _kept_in_eval(model, keep_eval)
    probes = list(h.probes or ())
    _check_labels(model, test, {"training": y_train, "test": y_test}, probes)
    eval_every = _positive_int("eval_every", r.eval_every, max(1, total // 50))
    plan = Plan(total=total, eval_every=eval_every,
                loss_every=_positive_int("loss_every", r.loss_every, eval_every),
                callback_every=_positive_int("callback_every", h.callback_every, eval_every),
                probe_every=_positive_int("probe_every", h.probe_every, eval_every),
                check_every=max(1, int(r.check_every)), max_loss=r.max_loss)
    eval_batch_size = _positive_int("eval_batch_size", r.eval_batch_size)
    n_eval = _positive_int("max_eval", r.max_eval, len(y_test))

    dev = _pick_device(device)
    model.to(dev)
    train = tuple(t.to(dev) for t in train)
    y_train = y_train.to(dev, dtype=torch.long)
    test = tuple(t[:n_eval].to(dev) for t in test)
    y_test = y_test[:n_eval].to(dev, dtype=torch.long)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = _make_optimizer(o, params)
    gen = torch.Generator().manual_seed(s.seed)
    if s.batches is not None:
        source = _custom_batches(s.batches, gen, dev)
    else:
        sampler = s.sampler
        order = (EpochOrder(len(y_train), s.batch_size, gen, dev) if sampler is None
                 else lambda i: sampler(i, gen))
        source = indexed_batches(train, y_train, order)

    config = {
        "model": type(model).__name__,
        "num_params": sum(p.numel() for p in params),
        "steps": total, "batch_size": s.batch_size,
        "optimizer": o.optimizer if isinstance(o.optimizer, str) else describe(o.optimizer),
        "lr": o.lr, "momentum": o.momentum, "weight_decay": o.weight_decay,
        "lr_schedule": None if o.lr_schedule is None else describe(o.lr_schedule),
        "sampler": None if s.sampler is None else describe(s.sampler),
        "seed": s.seed, "device": str(dev), "eval_every": eval_every,
        "loss_every": plan.loss_every, "max_eval": r.max_eval, "n_train": len(y_train),
    }
    if kept:
        names = {id(m): name for name, m in model.named_modules()}
        config["keep_eval"] = [names[id(m)] for m in kept]
    hist = History(config=plain(config))
    return train_loop(model, source, Step(model, opt, o.clip_grad_norm), plan,
                      lambda m: evaluate(m, test, y_test, eval_batch_size), hist,
                      lr_schedule=o.lr_schedule, probes=probes,
                      callback=h.callback, progress=_show_progress(h.progress), keep_eval=kept)


def _custom_batches(batches: Callable, gen: torch.Generator, dev: torch.device) -> Callable[[int], Batch]:
    """fit's ``batches=`` as a batch source of the loop: ``step -> (inputs on dev, labels on dev)``."""
    def batch(step: int) -> Batch:
        x, y = batches(step, gen)
        return tuple(t.to(dev, non_blocking=True) for t in as_parts(x)), y.to(dev, dtype=torch.long)

    return batch

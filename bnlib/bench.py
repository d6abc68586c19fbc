"""Benchmarks of bnlib against torch.nn: ``python -m bnlib.bench``.

The chapter *The algorithm* (``chapters/algorithm.ipynb``) and the *Performance* section of the
README quote these numbers. The BatchNorm section times one training-mode forward **and** backward
pass (``y = bn(x)``, then the gradients with respect to ``x``, ``γ`` and ``β``; running statistics
updated) of three implementations:

* ``torch``: :class:`torch.nn.BatchNorm1d`/``2d`` (ATen's C++ kernels), the baseline;
* ``bnlib``: :class:`bnlib.BatchNorm1d`/``2d``, i.e. :func:`bnlib.functional.batch_norm`, plain
  tensor operations with the closed-form backward of :class:`bnlib.functional.BatchNormFunction`;
* ``naive``: :func:`naive_batch_norm`, the textbook forward in tensor operations with the backward
  left to autograd, for context: this is what the closed form saves.

The candidates are timed *interleaved* in one process (:func:`bnlib.timing.compare`: torch, bnlib,
naive, then again in a rotated order, ...), so a slow spell of a shared machine hits them alike. The
table reports median times and the median over repetitions of the per-repetition ratio to torch.

``main()`` runs a list of sections (:data:`SECTIONS`), each a function ``(args) -> None`` that
prints its own table; a new benchmark is a new function appended to that list.

Command line::

    python -m bnlib.bench [--repeat 30] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .modules import BatchNorm1d, BatchNorm2d
from .timing import compare

__all__ = ["DEFAULT_SHAPES", "naive_batch_norm", "bench_batchnorm", "format_batchnorm_table", "SECTIONS", "main"]

# (N, C) is BatchNorm1d, (N, C, H, W) BatchNorm2d: a ResNet-like early layer, an MLP's hidden layer,
# a ResNet-like late layer.
DEFAULT_SHAPES: Tuple[Tuple[int, ...], ...] = ((128, 64, 32, 32), (256, 1024), (32, 256, 14, 14))

_LAYERS = {2: (BatchNorm1d, nn.BatchNorm1d), 4: (BatchNorm2d, nn.BatchNorm2d)}


def naive_batch_norm(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor, bias: Tensor,
                     momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Training-mode BN as the textbook writes it; autograd records every step for the backward."""
    dims = [0] + list(range(2, x.dim()))
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)  # μ_B
    var = ((x - mean) ** 2).mean(dims, keepdim=True)  # σ²_B (two-pass)
    xhat = (x - mean) / torch.sqrt(var + eps)  # x̂
    with torch.no_grad():  # running statistics, unbiased variance
        m = x.numel() // x.shape[1]
        running_mean.mul_(1 - momentum).add_(mean.view(-1), alpha=momentum)
        running_var.mul_(1 - momentum).add_(var.view(-1), alpha=momentum * m / (m - 1))
    return xhat * weight.view(shape) + bias.view(shape)  # y = γ x̂ + β


def _fwd_bwd(layer: Callable[[Tensor], Tensor], x: Tensor, g: Tensor, params: Sequence[Tensor]) -> Callable[[], None]:
    """One training step of a BN layer: forward, then the gradients of ``(y·g).sum()``.

    ``torch.autograd.grad`` (not ``.backward()``) so that no time goes into accumulating ``.grad``.
    """
    inputs = [x, *params]

    def step() -> None:
        torch.autograd.grad(layer(x), inputs, g)

    return step


def bench_batchnorm(shapes: Iterable[Sequence[int]] = DEFAULT_SHAPES, repeat: int = 30, warmup: int = 3,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    naive: bool = True) -> List[dict]:
    """Time a training-mode forward+backward pass of torch.nn's, bnlib's and a naive BatchNorm.

    Args:
        shapes: input shapes, ``(N, C)`` (BatchNorm1d) or ``(N, C, H, W)`` (BatchNorm2d).
        repeat: interleaved repetitions per shape (medians are taken over them).
        warmup: untimed calls of each candidate first.
        device, dtype: where and in which dtype to run.
        naive: also time :func:`naive_batch_norm` (autograd backward).

    Returns:
        One dict per shape: ``shape``, ``layer`` (e.g. ``"BatchNorm2d"``), ``torch_ms``, ``bnlib_ms``,
        ``ratio`` (median over repetitions of bnlib's time / torch's, timed in the same repetition),
        and with ``naive`` also ``naive_ms`` and ``naive_ratio``; plus ``threads``
        (``torch.get_num_threads()``), ``device`` and ``dtype``.
    """
    rows = []
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        shape = tuple(shape)
        if len(shape) not in _LAYERS:
            raise ValueError(f"expected shapes (N, C) or (N, C, H, W), got {shape}")
        ours_cls, torch_cls = _LAYERS[len(shape)]
        C = shape[1]
        x = torch.randn(shape, generator=gen).to(device, dtype).requires_grad_()
        g = torch.randn(shape, generator=gen).to(device, dtype)
        ours = ours_cls(C, device=device, dtype=dtype).train()
        theirs = torch_cls(C, device=device, dtype=dtype).train()
        fns = {"torch": _fwd_bwd(theirs, x, g, list(theirs.parameters())),
               "bnlib": _fwd_bwd(ours, x, g, list(ours.parameters()))}
        if naive:
            weight = torch.ones(C, device=device, dtype=dtype, requires_grad=True)
            bias = torch.zeros(C, device=device, dtype=dtype, requires_grad=True)
            rm, rv = torch.zeros(C, device=device, dtype=dtype), torch.ones(C, device=device, dtype=dtype)
            fns["naive"] = _fwd_bwd(lambda t: naive_batch_norm(t, rm, rv, weight, bias), x, g, [weight, bias])
        res = compare(fns, repeat=repeat, warmup=warmup, device=device, baseline="torch")
        row = {"shape": shape, "layer": torch_cls.__name__, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
               "threads": torch.get_num_threads()}
        for name in fns:
            # Ratio of times taken in the same repetition, then the median: robust to slow spells.
            paired = [t / b for t, b in zip(res.samples[name], res.samples["torch"])]
            row[f"{name}_ms"] = res.medians[name] * 1e3
            if name != "torch":
                row[("ratio" if name == "bnlib" else f"{name}_ratio")] = statistics.median(paired)
        rows.append(row)
    return rows


def format_batchnorm_table(rows: Sequence[dict]) -> str:
    """The rows of :func:`bench_batchnorm` as a text table."""
    has_naive = any("naive_ms" in r for r in rows)
    head = f"{'shape':<20} {'layer':<12} {'torch ms':>9} {'bnlib ms':>9} {'ratio':>6}"
    if has_naive:
        head += f" {'naive ms':>9} {'ratio':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (f"{str(r['shape']):<20} {r['layer']:<12} {r['torch_ms']:9.3f} {r['bnlib_ms']:9.3f} "
                f"{r['ratio']:5.2f}x")
        if has_naive and "naive_ms" in r:
            line += f" {r['naive_ms']:9.3f} {r['naive_ratio']:5.2f}x"
        lines.append(line)
    return "\n".join(lines)


def batchnorm_section(args: argparse.Namespace) -> None:
    """Section: BatchNorm forward+backward, bnlib and a naive version against torch.nn."""
    rows = bench_batchnorm(repeat=args.repeat, device=args.device)
    print(f"BatchNorm, training mode, forward + backward: {rows[0]['dtype']} on {rows[0]['device']}, "
          f"{rows[0]['threads']} threads, median of {args.repeat} interleaved repetitions; "
          "ratio = time / torch.nn's time")
    print(format_batchnorm_table(rows))


def bench_training(rounds: int = 5, steps: int = 300, device: Optional[str] = None) -> List[dict]:
    """Training steps/s of Ioffe & Szegedy's MNIST MLP (784-100-100-100-10, sigmoid, batch 60).

    Three variants: BN from bnlib, BN from torch.nn, and no BN. Each round trains every variant for
    ``steps`` SGD updates with :func:`bnlib.train.fit` (the rotation of the order changes each
    round, as in :func:`bnlib.timing.compare`); the table gives the median over rounds of
    :attr:`History.steps_per_s` (evaluation excluded). Uses the real MNIST training set.
    """
    from .data import load_mnist
    from .models import MLP
    from .train import fit, seed_everything

    data = load_mnist()
    variants = {"bnlib BN": "bn", "torch.nn BN": "bn-torch", "no BN": None}
    models = {}
    for name, norm in variants.items():
        seed_everything(0)
        models[name] = MLP(activation="sigmoid", norm=norm)
    rates: Dict[str, List[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            hist = fit(models[name], data, steps=steps, batch_size=60, lr=0.5, eval_every=steps,
                       max_eval=1000, seed=r, device=device, progress=False)
            rates[name].append(hist.steps_per_s)
    return [{"model": name, "steps_per_s": statistics.median(v)} for name, v in rates.items()]


def training_section(args: argparse.Namespace) -> None:
    """Section: training steps/s of the Ioffe MLP with bnlib BN, torch.nn BN and no BN."""
    rows = bench_training(device=args.device)
    print(f"Training, Ioffe & Szegedy's MLP (784-100-100-100-10, sigmoid, batch 60, SGD) on {args.device}, "
          f"{torch.get_num_threads()} threads, median of 5 rounds of 300 steps")
    print(f"{'model':<14} {'steps/s':>8}")
    print("-" * 23)
    for r in rows:
        print(f"{r['model']:<14} {r['steps_per_s']:8.0f}")


# The benchmarks main() runs, in order: functions (args) -> None that print their results.
SECTIONS: List[Callable[[argparse.Namespace], None]] = [batchnorm_section, training_section]


def _default_device() -> str:
    """bnlib's device choice (``BNLIB_DEVICE``, then CUDA, MPS, CPU), or the CPU if that fails."""
    try:
        from .train import device
        return str(device())
    except Exception:  # noqa: BLE001 - a benchmark should still run on the CPU
        return "cpu"


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run every section of :data:`SECTIONS` and print their tables."""
    parser = argparse.ArgumentParser(prog="python -m bnlib.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=30, help="interleaved repetitions per measurement (default 30)")
    parser.add_argument("--device", default=None, help="device to run on (default: bnlib's choice, else cpu)")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = _default_device()
    start = time.perf_counter()
    for section in SECTIONS:
        section(args)
        print()
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()

"""Benchmarks of bnlib's BatchNorm against torch.nn, and the measured records: ``python -m bnlib.lab.bench``.

``main()`` runs a list of sections (:data:`SECTIONS`), each a function ``(args) -> rows`` that prints
its own table; a new benchmark is a new function added to that list.

* ``batchnorm`` -- one training-mode forward **and** backward pass (``y = bn(x)``, then the gradients
  with respect to ``x``, ``γ`` and ``β``; running statistics updated) of three implementations:
  ``torch`` (:class:`torch.nn.BatchNorm1d`/``2d``, ATen's C++ kernels, the baseline), ``bnlib``
  (:class:`bnlib.BatchNorm1d`/``2d``) and ``naive`` (:func:`naive_batch_norm`, the textbook forward in
  tensor operations with the backward left to autograd: what a closed-form backward saves).
* ``bandwidth`` -- the same passes as a share of the memory bandwidth. Forward and backward must at
  least read ``x`` and write ``y`` (forward), then read ``x`` and ``∂L/∂y`` and write ``∂L/∂x``
  (backward): five passes over a tensor of the input's size. That traffic divided by the time is the
  achieved bandwidth; the same traffic at the speed of a plain copy is the *floor*, the least time any
  implementation can take. For known GPUs the datasheet bandwidth is given too.
* ``compile`` -- bnlib's layer eager against ``torch.compile(layer, fullgraph=True)``, and the time of
  the first call, which compiles the forward and the backward; skipped, with the reason printed, where
  compiling fails.
* ``fold`` -- the inference speed-up of folding BN into the preceding convolution.
* ``training`` -- training steps per second of Ioffe & Szegedy's MNIST MLP with no BN, torch.nn's BN
  and bnlib's BN.
* ``figure1`` -- Ioffe & Szegedy's Figure 1 at full scale (50,000 steps, twice), with its wall time;
  runs only when asked for.

Candidates are timed *interleaved* in one process (:func:`bnlib.lab.timing.compare`: torch, bnlib,
naive, then again in a rotated order, ...), so a slow spell of a shared machine hits them alike. The
tables give median times and the median over repetitions of the per-repetition ratio to torch.

``--json PATH`` also writes every section's rows and a description of the machine (device name, torch,
CUDA and cuDNN versions, threads, date) to a JSON file. The records in ``bnlib/lab/results/`` are such
files (written by ``tools/device_run.sh``); :func:`load_records` reads them and the book's appendix
*Speed and memory* plots them.

Clocks. By default every time is wall time. ``--clock cpu`` times the CPU sections by this process's CPU time
instead (:func:`time.process_time`): on a machine shared with other jobs it leaves out the time the operating
system gives to them, which wall time counts against whichever candidate was running. It is meaningful with one
thread only (with several it adds up the threads' times), and the first-call compile time stays wall time (the
compiler runs in child processes). The record says which clock was used (``environment["clock"]``) and how
loaded the machine was (``environment["load_average"]``, at the start).

Command line::

    python -m bnlib.lab.bench [--repeat 30] [--device cpu] [--dtype float32] [--shapes 256x1024,...]
                              [--threads N] [--clock wall|cpu]
                              [--sections batchnorm,bandwidth,compile,fold,training,figure1] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import time
import timeit
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.utils.benchmark as torch_benchmark
from torch import Tensor, nn

from ..fold import fold_batchnorm
from ..modules import BatchNorm1d, BatchNorm2d
from .data import load_mnist
from .models import CNN, MLP
from .timing import compare, synchronize
from .training import device as choose_device
from .training import fit, seed_everything

__all__ = ["DEFAULT_SHAPES", "naive_batch_norm", "bench_batchnorm", "format_batchnorm_table", "environment",
           "copy_bandwidth", "nominal_bandwidth", "bench_bandwidth", "bench_compile", "bench_fold", "bench_training",
           "bench_figure1", "SECTIONS", "DEFAULT_SECTIONS", "RESULTS", "load_records", "main"]

# Data of the MNIST shape for bench_training / bench_figure1: ((x_train, y_train), (x_test, y_test)).
Data = tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]

# The clocks of --clock: wall time, or this process's CPU time (see the module docstring).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}

# (N, C) is BatchNorm1d, (N, C, H, W) BatchNorm2d: a ResNet-like early layer, an MLP's hidden layer,
# a ResNet-like late layer.
DEFAULT_SHAPES: tuple[tuple[int, ...], ...] = ((128, 64, 32, 32), (256, 1024), (32, 256, 14, 14))

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


def _paired_median(samples: Sequence[float], baseline: Sequence[float]) -> float:
    """Median over repetitions of ``samples[r] / baseline[r]``: a ratio of two times taken in the same
    repetition, so a slow spell of the machine divides out, then the median, robust to outliers."""
    return statistics.median(t / b for t, b in zip(samples, baseline))


def _case(shape: Sequence[int], gen: torch.Generator, device, dtype: torch.dtype):
    """One benchmark case: the shape as a tuple, bnlib's and torch.nn's layer class for it, an input
    ``x`` (requiring grad) and an output gradient ``g``, both drawn from ``gen``."""
    shape = tuple(shape)
    if len(shape) not in _LAYERS:
        raise ValueError(f"expected shapes (N, C) or (N, C, H, W), got {shape}")
    ours_cls, torch_cls = _LAYERS[len(shape)]
    x = torch.randn(shape, generator=gen).to(device, dtype).requires_grad_()
    g = torch.randn(shape, generator=gen).to(device, dtype)
    return shape, ours_cls, torch_cls, x, g


def bench_batchnorm(shapes: Iterable[Sequence[int]] = DEFAULT_SHAPES, repeat: int = 30, warmup: int = 3,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    naive: bool = True, clock: Callable[[], float] = time.perf_counter) -> list[dict]:
    """Time a training-mode forward+backward pass of torch.nn's, bnlib's and a naive BatchNorm.

    Args:
        shapes: input shapes, ``(N, C)`` (BatchNorm1d) or ``(N, C, H, W)`` (BatchNorm2d).
        repeat: interleaved repetitions per shape (medians are taken over them).
        warmup: untimed calls of each candidate first.
        device, dtype: where and in which dtype to run.
        naive: also time :func:`naive_batch_norm` (autograd backward).
        clock: the clock of :func:`bnlib.lab.timing.compare` (one of :data:`CLOCKS`).

    Returns:
        One dict per shape: ``shape``, ``layer`` (e.g. ``"BatchNorm2d"``), ``torch_ms``, ``bnlib_ms``,
        ``ratio`` (median over repetitions of bnlib's time / torch's, timed in the same repetition),
        and with ``naive`` also ``naive_ms`` and ``naive_ratio``; plus ``threads``
        (``torch.get_num_threads()``), ``device`` and ``dtype``.
    """
    rows = []
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        shape, ours_cls, torch_cls, x, g = _case(shape, gen, device, dtype)
        C = shape[1]
        ours = ours_cls(C, device=device, dtype=dtype).train()
        theirs = torch_cls(C, device=device, dtype=dtype).train()
        fns = {"torch": _fwd_bwd(theirs, x, g, list(theirs.parameters())),
               "bnlib": _fwd_bwd(ours, x, g, list(ours.parameters()))}
        if naive:
            weight = torch.ones(C, device=device, dtype=dtype, requires_grad=True)
            bias = torch.zeros(C, device=device, dtype=dtype, requires_grad=True)
            rm, rv = torch.zeros(C, device=device, dtype=dtype), torch.ones(C, device=device, dtype=dtype)
            fns["naive"] = _fwd_bwd(lambda t: naive_batch_norm(t, rm, rv, weight, bias), x, g, [weight, bias])
        res = compare(fns, repeat=repeat, warmup=warmup, device=device, baseline="torch", clock=clock)
        row = {"shape": shape, "layer": torch_cls.__name__, "device": str(device),
               "dtype": str(dtype).replace("torch.", ""),
               "threads": torch.get_num_threads()}
        for name in fns:
            row[f"{name}_ms"] = res.medians[name] * 1e3
            if name != "torch":
                row["ratio" if name == "bnlib" else f"{name}_ratio"] = _paired_median(res.samples[name],
                                                                                     res.samples["torch"])
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


def batchnorm_section(args: argparse.Namespace) -> list[dict]:
    """Section: BatchNorm forward+backward, bnlib and a naive version against torch.nn."""
    rows = bench_batchnorm(args.shapes, repeat=args.repeat, device=args.device, dtype=args.dtype, clock=args.clock)
    print(f"BatchNorm, training mode, forward + backward: {rows[0]['dtype']} on {rows[0]['device']}, "
          f"{rows[0]['threads']} threads, median of {args.repeat} interleaved repetitions; "
          "ratio = time / torch.nn's time")
    print(format_batchnorm_table(rows))
    return rows


# ---------------------------------------------------------------------------------------------
# The machine

# Datasheet peak memory bandwidth of GPUs a reader is likely to run the book on (GB/s = 1e9 B/s),
# matched against torch.cuda.get_device_name() in order (first match wins). Sources: NVIDIA's
# product datasheets for each card.
NOMINAL_BANDWIDTH_GBS: tuple[tuple[str, float], ...] = (
    ("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100-SXM4-80GB", 2039.0),
    ("A100-PCIE-80GB", 1935.0), ("A100", 1555.0), ("V100", 900.0), ("A10G", 600.0), ("L4", 300.0),
    ("T4", 320.0), ("RTX 4090", 1008.0), ("RTX 3090", 936.0),
)


def _cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux), else :func:`platform.processor`."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str | torch.device = "cpu") -> dict:
    """What a measurement was taken on: device name, versions, threads and the date (UTC).

    Returns:
        A dict with ``device`` (``"cuda:0"``...), ``device_type``, ``device_name`` (the GPU's name, or
        the CPU's model), ``torch``, ``cuda`` and ``cudnn`` (versions; None on a CPU-only torch),
        ``python``, ``platform``, ``cpu_count``, ``threads`` (torch's intra-op threads), ``load_average``
        (the operating system's 1, 5 and 15 minute load averages, where it reports them), and ``date``
        (ISO 8601, UTC).
    """
    dev = torch.device(device)
    on_cuda = dev.type == "cuda"
    if on_cuda:
        props = torch.cuda.get_device_properties(dev)
        name = props.name
        extra = {"gpu_memory_gib": round(props.total_memory / 2**30, 1),
                 "multiprocessors": props.multi_processor_count,
                 "capability": f"{props.major}.{props.minor}"}
    else:
        name, extra = _cpu_name(), {}
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"device": str(dev), "device_type": dev.type, "device_name": name, **extra,
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn,
            "python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()}


def nominal_bandwidth(device_name: str) -> float | None:
    """The datasheet memory bandwidth (GB/s) of a GPU named ``device_name``, or None if unknown."""
    for key, gbs in NOMINAL_BANDWIDTH_GBS:
        if key.lower() in device_name.lower():
            return gbs
    return None


def copy_bandwidth(device: str | torch.device = "cpu", mib: int | None = None, min_run_time: float = 0.5,
                   clock: Callable[[], float] = timeit.default_timer) -> float:
    """Achievable memory bandwidth (GB/s, 1e9 bytes per second) of a plain ``dst.copy_(src)``.

    The copy is of ``mib`` MiB of float32 (default 64 on a CPU, 1024 on a GPU: well beyond the caches)
    and moves ``2 · size`` bytes: each byte read once and written once. A single measurement with no
    rival, so ``torch.utils.benchmark.Timer.blocked_autorange`` times it (for at least
    ``min_run_time`` seconds, in blocks long enough that reading the clock costs nothing), under
    torch's current thread count and, on a GPU, synchronizing the device at each reading. ``clock``
    times a CPU copy (one of :data:`CLOCKS`).
    """
    dev = torch.device(device)
    if mib is None:
        mib = 1024 if dev.type == "cuda" else 64
    src = torch.ones(mib * 2**20 // 4, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of the pages, outside the measurement
    timer = torch_benchmark.Timer(stmt="dst.copy_(src)", globals={"dst": dst, "src": src},
                                  num_threads=torch.get_num_threads(),
                                  # the default clock synchronizes any accelerator present; a CPU copy needs none
                                  **({} if dev.type == "cuda" else {"timer": clock}))
    seconds = timer.blocked_autorange(min_run_time=min_run_time).median
    return 2 * src.numel() * src.element_size() / seconds / 1e9


def bench_bandwidth(batchnorm_rows: Sequence[dict], device: str | torch.device = "cpu",
                    copy_gbs: float | None = None, clock: Callable[[], float] = timeit.default_timer) -> list[dict]:
    """Memory bandwidth achieved by the forward+backward passes timed by :func:`bench_batchnorm`.

    A training-mode forward and backward pass must at least read ``x`` and write ``y`` (forward), then
    read ``x`` and ``∂L/∂y`` and write ``∂L/∂x`` (backward): five passes over ``bytes / 5`` bytes, the
    input's size. Achieved bandwidth = ``bytes / time``; any extra pass over memory shows up as a lower
    figure. The floor is the time those five passes take at the speed of a plain copy,
    ``bytes / copy_gbs``, so ``of_copy = floor_ms / time``.

    Args:
        batchnorm_rows: rows of :func:`bench_batchnorm` (``shape``, ``layer``, ``dtype``, ``torch_ms``,
            ``bnlib_ms``, ``ratio``).
        device: where the rows were measured.
        copy_gbs: the copy bandwidth to compare with; default :func:`copy_bandwidth` measured now.
        clock: the clock of that copy measurement (the one the rows were timed with).

    Returns:
        One dict per row: ``shape``, ``layer``, ``bytes`` (the minimum traffic), ``torch_ms``,
        ``bnlib_ms``, ``ratio``, ``floor_ms``, ``copy_gbs``, ``nominal_gbs`` (datasheet, None when the
        device is not listed), ``torch_gbs``, ``bnlib_gbs``, ``torch_of_copy``, ``bnlib_of_copy``,
        ``torch_of_nominal``, ``bnlib_of_nominal``.
    """
    dev = torch.device(device)
    if copy_gbs is None:
        copy_gbs = copy_bandwidth(dev, clock=clock)
    nominal = nominal_bandwidth(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None
    out = []
    for r in batchnorm_rows:
        nbytes = 5 * math.prod(r["shape"]) * getattr(torch, r["dtype"]).itemsize  # 5 passes over the input's size
        row = {"shape": tuple(r["shape"]), "layer": r["layer"], "bytes": nbytes, "torch_ms": r["torch_ms"],
               "bnlib_ms": r["bnlib_ms"], "ratio": r["ratio"], "floor_ms": nbytes / (copy_gbs * 1e9) * 1e3,
               "copy_gbs": copy_gbs, "nominal_gbs": nominal}
        for name in ("torch", "bnlib"):
            gbs = nbytes / (r[f"{name}_ms"] * 1e-3) / 1e9
            row[f"{name}_gbs"] = gbs
            row[f"{name}_of_copy"] = gbs / copy_gbs
            row[f"{name}_of_nominal"] = None if nominal is None else gbs / nominal
        out.append(row)
    return out


def bandwidth_section(args: argparse.Namespace) -> list[dict]:
    """Section: per shape, time, ratio and bandwidth of BN's forward+backward against a plain copy and the floor."""
    rows = args.results.get("batchnorm") or bench_batchnorm(args.shapes, repeat=args.repeat, device=args.device,
                                                            dtype=args.dtype, naive=False, clock=args.clock)
    out = bench_bandwidth(rows, device=args.device, clock=args.clock)
    nominal = out[0]["nominal_gbs"]
    print(f"Memory bandwidth of BN forward + backward, {rows[0]['dtype']}. A plain copy reaches "
          f"{out[0]['copy_gbs']:.0f} GB/s here" + (f" (datasheet: {nominal:.0f} GB/s)" if nominal else "")
          + "; floor = 5 passes over the input (read x, write y; read x, read dy, write dx) at that speed")
    head = (f"{'shape':<20} {'torch ms':>9} {'bnlib ms':>9} {'ratio':>6} {'floor ms':>9} "
            f"{'torch GB/s':>10} {'of copy':>7} {'bnlib GB/s':>10} {'of copy':>7}")
    print(head)
    print("-" * len(head))
    for r in out:
        print(f"{str(r['shape']):<20} {r['torch_ms']:9.3f} {r['bnlib_ms']:9.3f} {r['ratio']:5.2f}x "
              f"{r['floor_ms']:9.3f} {r['torch_gbs']:10.1f} {r['torch_of_copy']:7.0%} "
              f"{r['bnlib_gbs']:10.1f} {r['bnlib_of_copy']:7.0%}")
    return out


# ---------------------------------------------------------------------------------------------
# torch.compile


def _error_line(exc: BaseException) -> str:
    """``'TypeName: first line of the message'``, short enough for a table and a JSON record."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


def bench_compile(shapes: Iterable[Sequence[int]] = DEFAULT_SHAPES, repeat: int = 30, warmup: int = 3,
                  device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  backend: str = "inductor", clock: Callable[[], float] = time.perf_counter) -> list[dict]:
    """bnlib's BatchNorm eager against ``torch.compile(layer, fullgraph=True)``, forward+backward in train mode.

    For each shape, compilation starts from scratch (``torch.compiler.reset()``, so every shape is compiled
    for its own static size and the first-call time includes the whole compile). The first call of the
    compiled layer, which traces and compiles the forward and the backward, is timed on its own; then
    torch.nn's layer, bnlib's eager layer and the compiled one are timed interleaved, as in
    :func:`bench_batchnorm`. ``fullgraph=True`` makes a graph break an error instead of a silent fallback.

    Args:
        shapes, repeat, warmup, device, dtype: as in :func:`bench_batchnorm`.
        backend: the ``torch.compile`` backend (``'inductor'`` fuses into generated kernels; ``'eager'``
            only traces, for quick checks).
        clock: the clock of the interleaved timings (the first call is always timed in wall time).

    Returns:
        One dict per shape: ``shape``, ``layer``, ``device``, ``dtype``, ``threads``, ``backend``,
        ``error`` (None, or why compiling or running the compiled layer failed; then no timings),
        ``compile_s`` (the first call), ``torch_ms``, ``eager_ms``, ``compiled_ms``, ``eager_ratio`` and
        ``compiled_ratio`` (per-repetition time / torch's, median), ``speedup`` (eager / compiled, median).
    """
    rows = []
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        shape, ours_cls, torch_cls, x, g = _case(shape, gen, device, dtype)
        C = shape[1]
        eager = ours_cls(C, device=device, dtype=dtype).train()
        theirs = torch_cls(C, device=device, dtype=dtype).train()
        to_compile = ours_cls(C, device=device, dtype=dtype).train()
        row = {"shape": shape, "layer": ours_cls.__name__, "device": str(device),
               "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(), "backend": backend,
               "error": None}
        try:
            torch.compiler.reset()
            compiled = torch.compile(to_compile, fullgraph=True, backend=backend)
            step = _fwd_bwd(compiled, x, g, list(to_compile.parameters()))
            synchronize(device)
            t0 = time.perf_counter()
            step()  # traces and compiles the forward and the backward
            synchronize(device)
            row["compile_s"] = time.perf_counter() - t0
            fns = {"torch": _fwd_bwd(theirs, x, g, list(theirs.parameters())),
                   "eager": _fwd_bwd(eager, x, g, list(eager.parameters())), "compiled": step}
            res = compare(fns, repeat=repeat, warmup=warmup, device=device, baseline="torch", clock=clock)
        except Exception as exc:  # noqa: BLE001 - any failure to compile is reported, not fatal
            row["error"] = _error_line(exc)
            rows.append(row)
            continue
        for name in fns:
            row[f"{name}_ms"] = res.medians[name] * 1e3
        for name in ("eager", "compiled"):
            row[f"{name}_ratio"] = _paired_median(res.samples[name], res.samples["torch"])
        row["speedup"] = _paired_median(res.samples["eager"], res.samples["compiled"])
        rows.append(row)
    return rows


def compile_section(args: argparse.Namespace) -> list[dict]:
    """Section: bnlib's BatchNorm eager against ``torch.compile(..., fullgraph=True)``, first-compile time too."""
    rows = bench_compile(args.shapes, repeat=args.repeat, device=args.device, dtype=args.dtype, clock=args.clock)
    print(f"torch.compile(bnlib BatchNorm, fullgraph=True), forward + backward, {rows[0]['dtype']} on "
          f"{rows[0]['device']}, backend {rows[0]['backend']}; ratio = time / torch.nn's eager time")
    head = (f"{'shape':<20} {'compile s':>9} {'torch ms':>9} {'eager ms':>9} {'ratio':>6} {'compiled ms':>11} "
            f"{'ratio':>6} {'speed-up':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if r["error"] is not None:
            print(f"{str(r['shape']):<20} skipped: {r['error']}")
            continue
        print(f"{str(r['shape']):<20} {r['compile_s']:9.1f} {r['torch_ms']:9.3f} {r['eager_ms']:9.3f} "
              f"{r['eager_ratio']:5.2f}x {r['compiled_ms']:11.3f} {r['compiled_ratio']:5.2f}x {r['speedup']:7.2f}x")
    return rows


# ---------------------------------------------------------------------------------------------
# Folding BN into the convolutions for inference

# Two CNNs: a small one (3 conv layers) and a deep one (8).
FOLD_MODELS: dict[str, dict] = {"small CNN (3 conv)": dict(channels=(16, 32, 32)),
                                "deep CNN (8 conv)": dict(channels=(16, 16, 16, 16), depth_per_stage=2)}


def bench_fold(batch_sizes: Sequence[int] = (1, 256), repeat: int = 30, device: str | torch.device = "cpu",
               models: dict[str, dict] | None = None, clock: Callable[[], float] = time.perf_counter) -> list[dict]:
    """Inference time of a CNN with BN against the same CNN with BN folded into its convolutions.

    The networks (:data:`FOLD_MODELS`, ``bnlib.lab.models.CNN`` with ``norm="bn"``, seeded, in eval mode,
    untrained but with random running statistics and BN parameters so that folding has something to
    fold; the time does not depend on the values) take batches of MNIST-shaped input
    ``(B, 1, 28, 28)``. Batch 1 is timed with 5 calls per sample (it is short).

    Returns:
        One dict per model and batch size: ``model``, ``batch``, ``bn_ms``, ``folded_ms``, ``speedup``
        (median time with BN / median time folded), ``max_abs_diff`` (largest difference of the two
        networks' outputs on that batch, computed in float64 on the CPU: TF32 convolutions on a GPU
        would hide the folding's own error).
    """
    dev = torch.device(device)
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name, kw in (models or FOLD_MODELS).items():
        seed_everything(0)
        model = CNN(norm="bn", **kw).eval()
        with torch.no_grad():  # statistics and affine parameters as after training, not the identity
            for m in model.modules():
                if isinstance(m, BatchNorm2d):
                    m.running_mean.normal_(0.0, 0.5, generator=gen)
                    m.running_var.uniform_(0.5, 2.0, generator=gen)
                    m.weight.uniform_(0.5, 1.5, generator=gen)
                    m.bias.normal_(0.0, 0.1, generator=gen)
        model.to(dev)
        folded = fold_batchnorm(model)
        reference = copy.deepcopy(model).cpu().double()  # the check runs in float64 on the CPU
        exact = fold_batchnorm(reference)
        for bs in batch_sizes:
            x = torch.randn(bs, 1, 28, 28, generator=gen)
            with torch.no_grad():
                diff = (reference(x.double()) - exact(x.double())).abs().max().item()
                x = x.to(dev)
                res = compare({"with BN": lambda: model(x), "folded": lambda: folded(x)}, repeat=repeat,
                              warmup=3, number=5 if bs == 1 else 1, device=dev, clock=clock)
            rows.append({"model": name, "batch": bs, "bn_ms": res.medians["with BN"] * 1e3,
                         "folded_ms": res.medians["folded"] * 1e3, "speedup": res.speedup("with BN", "folded"),
                         "max_abs_diff": diff})
    return rows


def fold_section(args: argparse.Namespace) -> list[dict]:
    """Section: inference speed-up of folding BN into the convolutions."""
    rows = bench_fold(repeat=args.repeat, device=args.device, clock=args.clock)
    print(f"Inference with BN against BN folded into the convolutions, on {args.device}, median of "
          f"{args.repeat} interleaved repetitions")
    print(f"{'model':<20} {'batch':>5} {'with BN ms':>10} {'folded ms':>10} {'speed-up':>8}")
    print("-" * 57)
    for r in rows:
        print(f"{r['model']:<20} {r['batch']:5d} {r['bn_ms']:10.3f} {r['folded_ms']:10.3f} {r['speedup']:7.2f}x")
    return rows


def bench_training(rounds: int = 5, steps: int = 300, device: str | None = None,
                   data: Data | None = None, clock: Callable[[], float] | None = None) -> list[dict]:
    """Training steps/s of Ioffe & Szegedy's MNIST MLP (784-100-100-100-10, sigmoid, batch 60).

    Three variants: BN from bnlib, BN from torch.nn, and no BN. Each round trains every variant for
    ``steps`` SGD updates with :func:`bnlib.lab.training.fit` (the rotation of the order changes each
    round, as in :func:`bnlib.lab.timing.compare`); the table gives the median over rounds of
    :attr:`History.steps_per_s` (evaluation excluded).

    Args:
        rounds, steps: rounds of ``steps`` updates per variant.
        device: where to train (default: :func:`bnlib.lab.training.fit`'s choice).
        data: ``((x_train, y_train), (x_test, y_test))`` of MNIST's shape; default the real MNIST
            (:func:`bnlib.lab.data.load_mnist`).
        clock: None for the History's own rate (wall time, evaluation excluded); else a clock of
            :data:`CLOCKS` read around each call of ``fit`` (its one small evaluation included).

    Returns:
        One dict per variant, in the order bnlib BN, torch.nn BN, no BN: ``model``, ``steps_per_s``, and
        ``ratio_to_torch`` (median over rounds of the variant's rate / torch.nn BN's rate in the same round).
    """
    data = load_mnist() if data is None else data
    variants = {"bnlib BN": "bn", "torch.nn BN": "bn-torch", "no BN": None}
    models = {}
    for name, norm in variants.items():
        seed_everything(0)
        models[name] = MLP(activation="sigmoid", norm=norm)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = None if clock is None else clock()
            hist = fit(models[name], data, steps=steps, batch_size=60, lr=0.5, eval_every=steps,
                       max_eval=1000, seed=r, device=device, progress=False)
            rates[name].append(hist.steps_per_s if clock is None else steps / (clock() - t0))
    return [{"model": name, "steps_per_s": statistics.median(v),
             "ratio_to_torch": _paired_median(v, rates["torch.nn BN"])} for name, v in rates.items()]


def training_section(args: argparse.Namespace) -> list[dict]:
    """Section: training steps/s of the Ioffe MLP with bnlib BN, torch.nn BN and no BN."""
    rows = bench_training(device=args.device, clock=None if args.clock_name == "wall" else args.clock)
    print(f"Training, Ioffe & Szegedy's MLP (784-100-100-100-10, sigmoid, batch 60, SGD) on {args.device}, "
          f"{torch.get_num_threads()} threads, median of 5 rounds of 300 steps")
    print(f"{'model':<14} {'steps/s':>8} {'/ torch.nn BN':>13}")
    print("-" * 37)
    for r in rows:
        print(f"{r['model']:<14} {r['steps_per_s']:8.0f} {r['ratio_to_torch']:12.2f}x")
    return rows


def bench_figure1(steps: int = 50_000, device: str | None = None,
                  variants: dict[str, str | None] | None = None, data: Data | None = None,
                  clock: Callable[[], float] | None = None) -> list[dict]:
    """Ioffe & Szegedy's Figure 1 at full scale, timed: the MNIST MLP trained with and without BN.

    The paper's setting (784-100-100-100-10 sigmoid MLP, batch 60, SGD) at learning rate 0.3, seed 0,
    test accuracy on the 10,000 test images every 1,000 steps, with BN from bnlib by default
    (``variants`` maps a label to a ``norm=`` of :class:`bnlib.lab.models.MLP`; ``data`` as in
    :func:`bench_training`).

    ``clock``: None for wall time; else a clock of :data:`CLOCKS`, which then gives both ``seconds`` and
    ``steps_per_s`` (``steps / seconds``, evaluations included).

    Returns:
        One dict per variant: ``model``, ``norm``, ``steps``, ``seconds`` (time of the whole run,
        evaluations included), ``steps_per_s``, ``final_acc``, ``steps_to_baseline`` (the first
        evaluation at or above the first variant's final accuracy), and the curve ``test_step``,
        ``test_acc``.
    """
    data = load_mnist() if data is None else data
    variants = variants or {"no BN": None, "BN": "bn"}
    rows, hists = [], []
    for name, norm in variants.items():
        seed_everything(0)
        model = MLP(norm=norm)
        now = clock or time.perf_counter
        t0 = now()
        hist = fit(model, data, steps=steps, batch_size=60, lr=0.3, eval_every=min(1000, steps), seed=0,
                   device=device, progress=False)
        seconds = now() - t0
        hists.append(hist)
        rows.append({"model": name, "norm": norm, "steps": steps, "seconds": seconds,
                     "steps_per_s": hist.steps_per_s if clock is None else steps / seconds, "final_acc": hist.final_acc,
                     "test_step": list(hist.test_step), "test_acc": list(hist.test_acc)})
    target = hists[0].final_acc
    for row, hist in zip(rows, hists):
        row["steps_to_baseline"] = hist.steps_to_reach(target)
    return rows


def figure1_section(args: argparse.Namespace) -> list[dict]:
    """Section: Figure 1 of Ioffe & Szegedy at full scale (50,000 steps), with wall times."""
    rows = bench_figure1(steps=args.figure1_steps, device=args.device,
                         clock=None if args.clock_name == "wall" else args.clock)
    print(f"Figure 1 (MNIST MLP, {rows[0]['steps']:,} steps, batch 60, lr 0.3) on {args.device}")
    print(f"{'model':<8} {'seconds':>8} {'steps/s':>8} {'final acc':>9} {'reaches no-BN final at':>23}")
    print("-" * 60)
    for r in rows:
        reach = "-" if r["steps_to_baseline"] is None else f"step {r['steps_to_baseline']:,}"
        print(f"{r['model']:<8} {r['seconds']:8.1f} {r['steps_per_s']:8.0f} {100 * r['final_acc']:8.2f}% {reach:>23}")
    return rows


# The benchmarks main() runs, in order: name -> function (args) -> rows (a list of dicts) that
# prints its own table. ``args.results`` holds the rows of the sections already run.
SECTIONS: dict[str, Callable[[argparse.Namespace], list[dict]]] = {
    "batchnorm": batchnorm_section,
    "bandwidth": bandwidth_section,
    "compile": compile_section,
    "fold": fold_section,
    "training": training_section,
    "figure1": figure1_section,
}
# What runs without --sections: all but the 50,000-step Figure 1 (minutes on a CPU).
DEFAULT_SECTIONS = ("batchnorm", "bandwidth", "compile", "fold", "training")


def _default_device() -> str:
    """bnlib's device choice (``BNLIB_DEVICE``, then CUDA, MPS, CPU), or the CPU if that fails."""
    try:
        return str(choose_device())
    except Exception:  # noqa: BLE001 - a benchmark should still run on the CPU
        return "cpu"


# Measured records shipped with bnlib: one folder per machine, holding what tools/device_run.sh
# writes (bench.json, bench-bf16.json, bench-figure1.json, chapters.json). The appendix *Running on
# a GPU* plots them.
RESULTS = Path(__file__).resolve().parent / "results"


def load_records(root: os.PathLike | None = None) -> dict[str, dict[str, dict]]:
    """The measured records: ``{machine folder: {file stem: parsed JSON}}``.

    Args:
        root: the folder holding one sub-folder per machine (default :data:`RESULTS`, the records
            shipped with bnlib).

    Returns:
        Machines in name order, each ``{"bench": ..., "chapters": ..., ...}`` (only the files that
        exist). Every file must carry an ``environment`` (see :func:`environment`).

    Raises:
        FileNotFoundError: ``root`` is not a folder or holds no record.
        ValueError: a file has no ``environment``.
    """
    root = RESULTS if root is None else Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"expected a folder of measured records, got {root}")
    records: dict[str, dict[str, dict]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = {f.stem: json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))}
        for stem, data in files.items():
            if "environment" not in data:
                raise ValueError(f"expected {folder / stem}.json to have an 'environment' entry")
        if files:
            records[folder.name] = files
    if not records:
        raise FileNotFoundError(f"no measured records (<machine>/<name>.json) in {root}")
    return records


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the chosen sections of :data:`SECTIONS`, print their tables, optionally write JSON.

    Returns:
        ``{"environment": ..., "seconds": ..., <section name>: rows, ...}``, what ``--json`` writes.
    """
    parser = argparse.ArgumentParser(prog="python -m bnlib.lab.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=30, help="interleaved repetitions per measurement (default 30)")
    parser.add_argument("--device", default=None, help="device to run on (default: bnlib's choice, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"],
                        help="dtype of the BatchNorm benchmark (default float32)")
    parser.add_argument("--shapes", default=None, metavar="NxC[xHxW],...",
                        help="BatchNorm input shapes, e.g. 256x1024,32x256x14x14 (default: DEFAULT_SHAPES)")
    parser.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                        help=f"comma-separated sections to run, in order, from {','.join(SECTIONS)} "
                             f"(default: {','.join(DEFAULT_SECTIONS)})")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's intra-op threads for the run (default: as set, e.g. by OMP_NUM_THREADS)")
    parser.add_argument("--clock", default="wall", choices=list(CLOCKS),
                        help="wall time (default), or this process's CPU time: steadier on a shared machine, "
                             "one thread only")
    parser.add_argument("--figure1-steps", type=int, default=50_000, help="training steps of the figure1 section")
    parser.add_argument("--json", metavar="PATH", help="also write the results and the machine's description here")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.sections.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        parser.error(f"unknown section(s) {unknown}; expected a comma-separated list from {list(SECTIONS)}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"expected --threads >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() > 1:
        parser.error(f"--clock cpu adds up the CPU time of all threads; use it with one thread, not "
                     f"{torch.get_num_threads()}")
    args.clock_name, args.clock = args.clock, CLOCKS[args.clock]
    if args.device is None:
        args.device = _default_device()
    args.dtype = getattr(torch, args.dtype)
    try:
        args.shapes = DEFAULT_SHAPES if args.shapes is None else [
            tuple(int(n) for n in item.lower().split("x")) for item in args.shapes.split(",")]
    except ValueError:
        parser.error(f"expected --shapes like 256x1024,32x256x14x14, got {args.shapes!r}")
    args.results = {}
    out = {"environment": {**environment(args.device), "clock": args.clock_name}}
    start = time.perf_counter()
    for name in names:
        args.results[name] = SECTIONS[name](args)
        print()
        out["seconds"] = round(time.perf_counter() - start, 1)
        out.update(args.results)
        if args.json:  # after every section, so that a run cut short keeps what it measured
            _write_json(out, args.json)
    print(f"({out['seconds']:.0f} s)")
    if args.json:
        print(f"results written to {args.json}")
    return out


def _write_json(obj: dict, path: str) -> None:
    """Write ``obj`` to ``path`` as JSON, atomically (a temporary file, then a rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)  # tuples become lists
        f.write("\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()

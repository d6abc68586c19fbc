r"""Fused kernels for BN followed by ReLU: how many bytes each variant moves, and what a compiler generates.

BatchNorm and ReLU do a few arithmetic operations per value; their speed is set by the bytes they move between
memory and the processor. This module counts those bytes in two ways:

* a **traffic model** (:data:`VARIANTS`, :func:`traffic`): for each way of running the pair, the passes over
  full-size tensors it makes and, in each pass, which tensors it reads and writes. The eager passes are those of
  ATen's CPU kernels (two-pass statistics per channel, then the normalization; ReLU's backward reads the saved
  output); the compiled passes are those that Inductor generates for the pair (:func:`kernel_passes` reads them
  from the generated code, and the book checks that the two agree);
* a **reader of generated C++** (:func:`kernel_passes`): every top-level loop nest of an Inductor CPU kernel whose
  iteration space is the whole tensor is one pass, and its full-size loads and stores, with the element size of
  each pointer, are that pass's traffic.

Bytes per element of the input, float32 (``itemsize`` 4, a bool mask 1)::

    variant                       forward  forward+backward
    eager BN, then ReLU                24                56
    compiled, fused (training)         13                35      # a bool mask is written for the backward
    compiled, no backward to come      12                 -
    eager BN (eval), then ReLU         16                 -
    compiled (eval), one pass           8                 -
    folded into the convolution         8                 -      # only the ReLU is left

Dividing a variant's bytes by the speed of a plain copy gives the least time it can take on a machine
(:func:`floor_seconds`); a measured time far above that floor means the time goes into something other than
moving bytes.

:func:`generated_code` returns the code Inductor writes for a function (``torch._inductor.utils.run_and_get_code``);
:func:`compiler_problem` says, in one line, why ``torch.compile`` cannot run here (``None`` when it can).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["Pass", "VARIANTS", "traffic", "passes", "floor_seconds", "KernelPass", "cpp_kernels", "kernel_passes",
           "generated_code", "compiler_problem", "bn_relu", "training_step", "forward_pass"]


@dataclass(frozen=True)
class Pass:
    """One pass over full-size tensors: the tensors it reads and writes (names; a name's size is in ``SIZES``)."""

    what: str
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()

    def bytes_per_element(self, itemsize: int = 4) -> int:
        """Returns the bytes this pass moves per element of the input."""
        return sum(_size(t, itemsize) for t in (*self.reads, *self.writes))


# Tensors whose element is not the input's dtype: the ReLU's mask is a bool (one byte).
SIZES: dict[str, int] = {"mask": 1}


def _size(tensor: str, itemsize: int) -> int:
    return SIZES.get(tensor, itemsize)


# x: BN's input, y: BN's output, z: ReLU's output, g: ∂L/∂z, gy: ∂L/∂y, dx: ∂L/∂x, mask: z <= 0 (bool).
VARIANTS: dict[str, dict[str, tuple[Pass, ...]]] = {
    "eager": {  # torch.nn.BatchNorm2d (ATen's CPU kernel), then torch.nn.ReLU
        "forward": (Pass("BN: mean", reads=("x",)),                       # Σx per channel
                    Pass("BN: variance", reads=("x",)),                   # Σ(x - μ)² per channel
                    Pass("BN: normalize", reads=("x",), writes=("y",)),   # y = γ(x - μ)/σ + β
                    Pass("ReLU", reads=("y",), writes=("z",))),           # z = max(y, 0), z kept
        "backward": (Pass("ReLU backward", reads=("g", "z"), writes=("gy",)),      # gy = g·[z > 0]
                     Pass("BN: sums", reads=("gy", "x")),                          # Σgy, Σgy(x - μ)
                     Pass("BN: input gradient", reads=("gy", "x"), writes=("dx",))),
    },
    "compiled": {  # torch.compile of the pair: one fused kernel per direction
        "forward": (Pass("statistics (Welford)", reads=("x",)),
                    Pass("normalize + ReLU", reads=("x",), writes=("z", "mask"))),   # the mask is kept
        "backward": (Pass("sums", reads=("mask", "g", "x")),
                     Pass("input gradient", reads=("mask", "g", "x"), writes=("dx",))),
    },
    "compiled, no grad": {  # the same pair compiled, run without a backward to come: no mask is written
        "forward": (Pass("statistics (Welford)", reads=("x",)),
                    Pass("normalize + ReLU", reads=("x",), writes=("z",))),
    },
    "eager eval": {  # evaluation mode: BN is a fixed affine map per channel, then ReLU
        "forward": (Pass("BN: affine map", reads=("x",), writes=("y",)),
                    Pass("ReLU", reads=("y",), writes=("z",))),
    },
    "compiled eval": {  # the affine map and the ReLU fused: one elementwise pass
        "forward": (Pass("affine map + ReLU", reads=("x",), writes=("z",)),),
    },
    "folded": {  # BN folded into the convolution before it (bnlib.fold): only the ReLU is left
        "forward": (Pass("ReLU", reads=("y",), writes=("z",)),),
    },
}


def passes(variant: str, backward: bool = True) -> tuple[Pass, ...]:
    """The passes of ``variant`` (a key of :data:`VARIANTS`): the forward, and the backward too if asked."""
    if variant not in VARIANTS:
        raise KeyError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    steps = VARIANTS[variant]
    if backward and "backward" not in steps:
        raise ValueError(f"variant {variant!r} is inference only: it has no backward pass")
    return steps["forward"] + (steps["backward"] if backward else ())


def traffic(variant: str, backward: bool = True, itemsize: int = 4) -> int:
    """Bytes moved per element of the input by ``variant`` (forward, or forward and backward)."""
    return sum(p.bytes_per_element(itemsize) for p in passes(variant, backward))


def floor_seconds(variant: str, numel: int, copy_bytes_per_s: float, backward: bool = True,
                  itemsize: int = 4) -> float:
    """The least time ``variant`` can take on ``numel`` elements: its bytes at the speed of a plain copy.

    ``copy_bytes_per_s`` counts every byte read and every byte written (as :func:`bnlib.lab.bench.copy_bandwidth`).
    """
    if copy_bytes_per_s <= 0:
        raise ValueError(f"copy_bytes_per_s must be positive, got {copy_bytes_per_s}")
    return traffic(variant, backward, itemsize) * numel / copy_bytes_per_s


# ----------------------------------------------------------------------------------------- generated code

# Element sizes of the pointer types Inductor's CPU kernels take.
_CTYPE_BYTES = {"float": 4, "double": 8, "bool": 1, "int64_t": 8, "int32_t": 4, "int8_t": 1, "uint8_t": 1,
                "bfloat16": 2, "half": 2, "at::BFloat16": 2, "at::Half": 2}
_PARAM = re.compile(r"(?:const\s+)?([\w:]+)\s*\*\s*(\w+)")
_FOR = re.compile(r"for\s*\(\s*int64_t\s+(\w+)\s*=\s*static_cast<int64_t>\((\d+)L\)\s*;\s*\1\s*<\s*"
                  r"static_cast<int64_t>\((\d+)L\)")
_PTR = re.compile(r"\b((?:in_out|in|out)_ptr\d+)\b")


@dataclass
class KernelPass:
    """One top-level loop nest of a generated kernel: its iteration space and its full-size traffic.

    Attributes:
        elements: the number of iterations, in elements (product of the loops' bounds).
        reads, writes: ``{pointer name: bytes per element}`` of the accesses indexed by every loop variable.
    """

    elements: int
    reads: dict[str, int] = field(default_factory=dict)
    writes: dict[str, int] = field(default_factory=dict)

    def bytes_per_element(self) -> int:
        """Returns the bytes this nest moves per iteration."""
        return sum(self.reads.values()) + sum(self.writes.values())


def cpp_kernels(code: str) -> list[str]:
    """The C++ sources inside the Python module Inductor generates (each ``cpp_pybinding(..., r'''...''')``)."""
    return re.findall(r"r'''(.*?)'''", code, flags=re.S)


def _body_blocks(source: str) -> tuple[dict[str, int], list[str]]:
    """The pointer sizes of ``kernel(...)`` and the top-level ``{...}`` blocks of its body."""
    head = re.search(r"kernel\s*\((.*?)\)\s*\{", source, flags=re.S)
    if head is None:
        raise ValueError("no 'kernel(...) {' found: not the C++ of an Inductor CPU kernel")
    sizes = {}
    for ctype, name in _PARAM.findall(head.group(1)):
        if ctype not in _CTYPE_BYTES:
            raise ValueError(f"pointer {name} has the type {ctype}*, whose size is not known here")
        sizes[name] = _CTYPE_BYTES[ctype]
    blocks, depth, start = [], 0, None
    for i in range(head.end(), len(source)):
        ch = source[i]
        if ch == "{":
            depth += 1
            if depth == 1:
                start = i
        elif ch == "}":
            if depth == 0:  # the closing brace of the body
                break
            if depth == 1:
                blocks.append(source[start:i + 1])
            depth -= 1
    return sizes, blocks


def kernel_passes(source: str) -> list[KernelPass]:
    """The loop nests of one generated C++ kernel, each with the bytes its full-size accesses move per element.

    A nest's iteration space is the product, over its loop variables, of each variable's largest bound (a
    vectorized loop and its scalar tail share the variable). An access counts when its index uses every loop
    variable of the nest (a per-channel parameter ``in_ptr3[x1]`` does not); it is a write when it is a
    ``.store(ptr + ...)`` or an assignment ``ptr[...] = ...``, else a read. Nests with no loop (a counter's
    increment) are left out.
    """
    sizes, blocks = _body_blocks(source)
    result = []
    for block in blocks:
        bounds: dict[str, int] = {}
        for var, _lo, hi in _FOR.findall(block):
            bounds[var] = max(bounds.get(var, 0), int(hi))
        if not bounds:
            continue
        nest = KernelPass(elements=math.prod(bounds.values()))
        for line in block.splitlines():
            for m in _PTR.finditer(line):
                ptr, rest = m.group(1), line[m.end():]
                if not all(re.search(rf"\b{v}\b", rest) for v in bounds):
                    continue
                store = re.search(rf"\.store\(\s*{ptr}\b", line) or re.match(r"\s*\[[^\]]*\]\s*=(?!=)", rest)
                (nest.writes if store else nest.reads)[ptr] = sizes[ptr]
        result.append(nest)
    return result


def generated_code(fn: Callable[..., object], *args) -> list[str]:
    """Runs ``fn(*args)`` (a compiled function) and returns the Python modules Inductor generated for it."""
    from torch._inductor.utils import run_and_get_code

    _, codes = run_and_get_code(fn, *args)
    return codes


def compiler_problem() -> str | None:
    """``None`` if ``torch.compile`` works here (it needs a C++ compiler on a CPU), else the reason, in one line."""
    try:
        f = torch.compile(lambda t: torch.relu(t) + 1, fullgraph=True)
        f(torch.zeros(8))
    except Exception as exc:  # no C++ compiler, an unsupported Python or platform
        first = (str(exc).strip().splitlines() or [""])[0]
        return f"{type(exc).__name__}: {first[:200]}"
    return None


# ----------------------------------------------------------------------------------------- what is timed

def bn_relu(shape: Sequence[int], seed: int = 0,
            device: str | torch.device = "cpu") -> tuple[nn.Module, Tensor, Tensor]:
    """``nn.Sequential(BatchNorm{1,2}d, ReLU)`` for inputs of ``shape`` (N, C) or (N, C, H, W), an input, a gradient."""
    if len(shape) not in (2, 4):
        raise ValueError(f"expected an (N, C) or (N, C, H, W) shape, got {tuple(shape)}")
    bn = nn.BatchNorm1d(shape[1]) if len(shape) == 2 else nn.BatchNorm2d(shape[1])
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen).to(device).requires_grad_()
    g = torch.randn(*shape, generator=gen).to(device)
    return nn.Sequential(bn, nn.ReLU()).to(device).train(), x, g


def training_step(block: Callable[[Tensor], Tensor], x: Tensor, g: Tensor,
                  params: Sequence[Tensor]) -> Callable[[], tuple]:
    """A training step of ``block``: the forward, then the gradients of ``(z·g).sum()`` for ``x`` and ``params``."""
    inputs = (x, *params)
    return lambda: torch.autograd.grad(block(x), inputs, g)


def forward_pass(block: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[], Tensor]:
    """The forward of ``block`` alone, with no graph recorded for a backward (``torch.no_grad``)."""
    def run() -> Tensor:
        with torch.no_grad():
            return block(x)
    return run

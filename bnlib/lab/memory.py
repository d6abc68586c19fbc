"""Activation memory: the bytes a training step keeps alive for its backward pass, counted exactly.

Autograd keeps, for every operation that needs it, some of its inputs or outputs until the backward pass has
used them. :func:`saved_for_backward` runs one forward pass under :func:`torch.autograd.graph.saved_tensors_hooks`
and sees every tensor saved that way. It counts each piece of memory once (two operations that save the same
tensor -- a ReLU's output is also the next convolution's input -- share it), leaves the parameters and buffers out
(they exist whether or not a backward follows) and attributes each piece to the type of the innermost module whose
forward saved it first::

    report = saved_for_backward(model, x)
    report.total            # bytes kept for the backward
    report.by_type          # {"Conv2d": ..., "BatchNorm2d": ..., "ReLU": ...}

Counting saved tensors instead of reading the allocator makes the figure exact and identical on every machine
and device: it is what the backward *needs*, not what an allocator happened to reserve.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["SavedBytes", "saved_for_backward"]


@dataclass
class SavedBytes:
    """Bytes kept for the backward pass: in all, and by the type of module that saved them."""

    total: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    tensors: int = 0

    def mib(self) -> float:
        """Returns the total in MiB."""
        return self.total / 2**20


def saved_for_backward(model: nn.Module, *inputs: Tensor,
                       forward: Callable[..., Tensor] | None = None) -> SavedBytes:
    """The activation memory one forward pass of ``model`` keeps for the backward pass.

    Args:
        model: the module; its parameters are not counted.
        inputs: the forward pass's inputs (a batch).
        forward: what to run instead of ``model(*inputs)`` (e.g. a loss of the output); the hooks see every
            module of ``model`` that it calls.

    Returns:
        SavedBytes: distinct storage bytes saved for the backward, in all and by module type ("(outside)" for
        operations run outside any module of ``model``, such as a loss computed in ``forward``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"saved_for_backward() expects a torch.nn.Module, got {type(model).__name__}")
    # Parameters and buffers exist whether or not a backward follows: not activation memory.
    params = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    stack: list[str] = []
    seen: set[int] = set()
    report = SavedBytes()

    def enter(module, args):
        stack.append(type(module).__name__)

    def leave(module, args, output):
        stack.pop()

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen and storage.nbytes() > 0:
            seen.add(ptr)
            owner = stack[-1] if stack else "(outside)"
            report.total += storage.nbytes()
            report.by_type[owner] = report.by_type.get(owner, 0) + storage.nbytes()
            report.tensors += 1
        return t

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave, always_call=True))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward(*inputs) if forward is not None else model(*inputs)
    finally:
        for h in handles:
            h.remove()
    del out
    return report

"""Activation memory counted from the tensors autograd saves for the backward pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import bnlib
from bnlib.lab.memory import saved_for_backward

X = (4, 8, 16, 16)
ACT = 4 * 8 * 16 * 16 * 4  # bytes of one float32 activation of that shape
SMALL = 1024               # per-channel statistics: a few vectors of 8 floats


def _net(kind: str, blocks: int = 3) -> nn.Sequential:
    def block():
        conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        if kind == "abn":
            return nn.Sequential(conv, bnlib.InPlaceABN(8))
        act = nn.ReLU() if kind == "relu" else nn.LeakyReLU(0.01)
        return nn.Sequential(conv, nn.BatchNorm2d(8), act)
    return nn.Sequential(*(block() for _ in range(blocks)))


@pytest.mark.parametrize("kind, full_size", [("relu", 1 + 2 * 3), ("leaky", 1 + 3 * 3 - 1), ("abn", 1 + 3)])
def test_counts_each_saved_activation_once(kind, full_size):
    """The first conv's input, then per block: BN's input, and the ReLU's output (which the next conv saves too,
    counted once); a leaky ReLU saves its input instead, so the next conv's input is a third tensor (none after
    the last block); In-Place ABN saves only its output, shared with the next conv."""
    torch.manual_seed(0)
    report = saved_for_backward(_net(kind), torch.randn(X))
    assert full_size * ACT <= report.total < full_size * ACT + SMALL, report


def test_parameters_and_buffers_are_not_activations():
    lin = nn.Linear(100, 100)
    report = saved_for_backward(lin, torch.randn(1, 100))
    assert report.total == 100 * 4          # only the input; the 40 KB weight is a parameter
    assert report.by_type == {"Linear": 400}


def test_checkpointed_blocks_keep_only_their_inputs():
    class Checkpointed(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            for b in self.net:
                x = checkpoint(b, x, use_reentrant=False)
            return x

    torch.manual_seed(0)
    report = saved_for_backward(Checkpointed(_net("relu")), torch.randn(X))
    assert report.total == 3 * ACT


def test_a_forward_with_a_loss_and_bad_input():
    net = _net("abn", blocks=1)
    x = torch.randn(X)
    plain = saved_for_backward(net, x)
    with_loss = saved_for_backward(net, x, forward=lambda t: (net(t) * 2).square().mean())
    assert with_loss.total == plain.total + ACT      # square() saves its input, a new tensor: outside the model
    assert with_loss.by_type["(outside)"] == ACT
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        saved_for_backward(lambda t: t, x)

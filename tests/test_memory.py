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


def test_kit_resnet_in_place_abn_and_checkpointing():
    """The kit's ResNet: In-Place ABN saves exactly the inputs of the BN layers it replaces; checkpointed blocks
    compute the same gradients and keep less; both helpers refuse other models."""
    import copy

    import torch.nn.functional as F

    from bnlib.lab import models

    torch.manual_seed(0)
    base = models.ResNet(width=4, blocks_per_stage=1, norm="bn-torch")
    abn = models.with_inplace_abn(copy.deepcopy(base))
    ckpt = models.checkpoint_blocks(copy.deepcopy(base))
    x, y = torch.randn(4, 1, 12, 12), torch.tensor([0, 1, 2, 3])
    replaced = [base.stem[1], *(b.norm1 for b in base.blocks)]
    assert sum(isinstance(m, bnlib.InPlaceABN) for m in abn.modules()) == len(replaced) == 4
    sizes = []
    hooks = [m.register_forward_pre_hook(lambda m, a: sizes.append(a[0].numel() * 4)) for m in replaced]
    with torch.no_grad():
        copy.deepcopy(base)(x)
    for h in hooks:
        h.remove()
    loss = {}
    report = {}
    for name, net in (("base", base), ("abn", abn), ("ckpt", ckpt)):
        report[name] = saved_for_backward(net, x, forward=lambda t, net=net: F.cross_entropy(net(t), y))
    saved = report["base"].total - report["abn"].total
    assert abs(saved - sum(sizes)) <= SMALL, (saved, sizes)
    assert report["ckpt"].total < report["abn"].total
    grads = {}
    for name, net in (("base", base), ("ckpt", ckpt)):
        net.zero_grad()
        loss[name] = F.cross_entropy(net(x), y)
        loss[name].backward()
        grads[name] = torch.cat([p.grad.flatten() for p in net.parameters()])
    torch.testing.assert_close(grads["ckpt"], grads["base"], rtol=1e-5, atol=1e-6)
    # the recomputation during the one backward pass ran the blocks' BN layers once more (not the stem's)
    assert ckpt.stem[1].num_batches_tracked == base.stem[1].num_batches_tracked
    assert ckpt.blocks[0].module.norm1.num_batches_tracked == base.blocks[0].norm1.num_batches_tracked + 1
    with pytest.raises(TypeError, match="expects a ResNet"):
        models.checkpoint_blocks(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="expects a ResNet"):
        models.with_inplace_abn(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="needs BN layers"):
        models.with_inplace_abn(models.ResNet(width=4, blocks_per_stage=1, norm="gn"))

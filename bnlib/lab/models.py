"""Classifiers with a pluggable normalization layer, and the factory that builds that layer.

* :class:`MLP` -- fully connected; by default the MNIST network of Ioffe & Szegedy (2015, Section 4.1):
  784-100-100-100-10 with sigmoid units, each hidden layer ``Linear -> norm -> activation``;
* :class:`CNN` -- plain (VGG-style, non-residual) stages of 3x3 convolutions; ``depth_per_stage`` makes
  it deep and ``bn_position`` moves the norm after the activation;
* :class:`ResNet` -- a small residual network (He et al. 2016) for 28x28 / 32x32 images.

Every model takes ``norm=``, resolved per layer by :func:`make_norm`: a name from :data:`NORM_NAMES`
(bnlib's layers from :mod:`bnlib.modules` and :mod:`bnlib.variants`, or ``'bn-torch'``, torch.nn's own
BatchNorm for comparison), None, or a callable ``num_features -> nn.Module`` such as
``functools.partial(make_norm, "bn", kind="2d", momentum=0.01)``. Nothing here fixes a device: move a
model with ``.to(device)`` (:func:`bnlib.lab.training.fit` does it for you).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from bnlib import modules, variants

__all__ = [
    "NORM_NAMES",
    "GN_GROUPS",
    "make_norm",
    "make_activation",
    "MLP",
    "CNN",
    "ResNet",
    "Checkpointed",
    "checkpoint_blocks",
    "with_inplace_abn",
]

NormSpec = None | str | Callable[..., nn.Module]
ActivationSpec = None | str | Callable[[], nn.Module]

#: Number of groups of ``'gn'``: the largest divisor of ``C`` that is at most this.
GN_GROUPS = 8

#: The names :func:`make_norm` accepts, with what they build.
NORM_NAMES = {
    "none": "no normalization (nn.Identity)",
    "bn": "bnlib BatchNorm1d / BatchNorm2d",
    "bn-torch": "torch.nn BatchNorm1d / BatchNorm2d",
    "ln": "bnlib LayerNorm(C) for '1d'; GroupNorm(1, C) for '2d' (over C, H, W)",
    "gn": f"bnlib GroupNorm with the largest divisor of C that is <= {GN_GROUPS} groups",
    "in": "bnlib InstanceNorm2d(C, affine=True) ('2d' only)",
    "brn": "bnlib BatchRenorm1d / BatchRenorm2d",
    "bln": "bnlib BatchLayerNorm(C)",
}


def _gn_groups(c: int) -> int:
    """Returns the number of groups ``'gn'`` uses for ``c`` channels."""
    return max(g for g in range(1, min(GN_GROUPS, c) + 1) if c % g == 0)


def make_norm(norm: NormSpec, num_features: int, kind: str = "1d", **kwargs: Any) -> nn.Module:
    """Build the normalization layer for ``num_features`` features or channels.

    Args:
        norm: None or ``'none'``; a name from :data:`NORM_NAMES`; or a callable
            ``num_features -> nn.Module`` for anything else, e.g. Ghost BN, which needs a virtual
            batch size: ``functools.partial(GhostBatchNorm2d, virtual_batch_size=16)``.
        num_features: ``C``, the size of dimension 1 of the input.
        kind: ``'1d'`` for MLP features, input ``(N, C)``; ``'2d'`` for convolutional maps, input
            ``(N, C, H, W)``.
        **kwargs: passed on to the layer's constructor, e.g. ``momentum=0.01, eps=1e-3`` for
            ``'bn'``, ``num_groups=4`` for ``'gn'`` (which otherwise takes the largest divisor of ``C``
            up to :data:`GN_GROUPS`), ``affine=False`` for ``'in'`` (affine by default here), or the
            keyword arguments of a callable ``norm``. ``'none'`` ignores them, as ``nn.Identity`` does.
            A keyword the layer does not take raises the layer's own TypeError.

    Returns:
        nn.Module: the layer (``nn.Identity`` for no normalization).
    """
    if kind not in ("1d", "2d"):
        raise ValueError(f"kind must be '1d' or '2d', got {kind!r}")
    if norm is None:
        return nn.Identity()
    if callable(norm) and not isinstance(norm, str):
        return norm(num_features, **kwargs)
    if not isinstance(norm, str):
        raise TypeError(f"norm must be None, a name or a callable, got {type(norm).__name__}")
    name = norm.lower()
    two_d = kind == "2d"
    if name == "none":
        return nn.Identity()
    if name == "bn":
        return (modules.BatchNorm2d if two_d else modules.BatchNorm1d)(num_features, **kwargs)
    if name == "bn-torch":
        return (nn.BatchNorm2d if two_d else nn.BatchNorm1d)(num_features, **kwargs)
    if name == "ln":
        # Over (C, H, W) for maps: one group holding every channel is layer normalization.
        return variants.GroupNorm(1, num_features, **kwargs) if two_d else variants.LayerNorm(num_features, **kwargs)
    if name == "gn":
        groups = kwargs.pop("num_groups", None)
        return variants.GroupNorm(_gn_groups(num_features) if groups is None else groups, num_features, **kwargs)
    if name == "in":
        if not two_d:
            raise ValueError("norm='in' (instance norm) needs conv maps; use kind='2d'")
        kwargs.setdefault("affine", True)
        return variants.InstanceNorm2d(num_features, **kwargs)
    if name == "bln":
        return variants.BatchLayerNorm(num_features, **kwargs)
    if name == "brn":
        return (variants.BatchRenorm2d if two_d else variants.BatchRenorm1d)(num_features, **kwargs)
    valid = ", ".join(repr(n) for n in NORM_NAMES)
    raise ValueError(f"unknown norm {norm!r}; valid names: None, {valid}, or a callable num_features -> nn.Module")


def _normalizes(norm: NormSpec) -> bool:
    """Whether ``norm`` names a normalization layer (any, not only batch statistics): False for None and "none"."""
    return not (norm is None or (isinstance(norm, str) and norm.lower() == "none"))


_ACTIVATIONS = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "identity": nn.Identity,
    "linear": nn.Identity,
    "none": nn.Identity,
}


def make_activation(activation: ActivationSpec) -> nn.Module:
    """Build an activation from a name (``'sigmoid'``, ``'tanh'``, ``'relu'``,
    ``'gelu'``, ``'identity'``/``'linear'``/``'none'``, None) or a zero-argument
    callable such as ``nn.ELU``.

    Returns:
        nn.Module: the activation layer.
    """
    if activation is None:
        return nn.Identity()
    if isinstance(activation, str):
        try:
            return _ACTIVATIONS[activation.lower()]()
        except KeyError:
            raise ValueError(f"unknown activation {activation!r}; valid names: "
                             f"{', '.join(_ACTIVATIONS)}, or a callable returning a module") from None
    return activation()


# --------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------

class HiddenLayer(nn.Module):
    """One hidden layer of :class:`MLP`: ``linear -> norm -> act``.

    The output of ``self.norm`` is the input of the nonlinearity (the quantity
    plotted in Figure 1 (b, c) of the paper); attach probes there.
    """

    def __init__(self, linear: nn.Linear, norm: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.linear, self.norm, self.act = linear, norm, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns ``act(norm(linear(x)))``."""
        return self.act(self.norm(self.linear(x)))


class MLP(nn.Module):
    """Fully connected classifier; the MNIST network of Ioffe & Szegedy by default.

    Input of any shape ``(N, ...)`` is flattened to ``(N, in_features)``. Each
    hidden layer is ``Linear -> norm -> activation`` (the paper's placement:
    BN normalizes ``Wu + b`` right before the nonlinearity); the output layer
    is a plain ``Linear`` giving logits.

    Args:
        in_features, widths, num_classes: layer sizes (default 784-100-100-100-10).
        activation: see :func:`make_activation` (default ``'sigmoid'``).
        norm: see :func:`make_norm` (default None: no normalization).
        init: ``'gaussian'`` draws every weight from N(0, init_std²) and sets
            biases to 0 -- the paper's "small random Gaussian values";
            ``'default'`` keeps PyTorch's initialization.
        init_std: standard deviation of ``'gaussian'`` (default 0.1).
        bias: bias of the hidden ``Linear`` layers. True (default) keeps it
            always; False drops it; None drops it only when a normalization
            layer follows, whose shift β makes the bias redundant (BN subtracts
            the batch mean, so a bias before it has no effect).

    Attributes:
        hidden: ``nn.ModuleList`` of :class:`HiddenLayer`, each with
            ``.linear``, ``.norm`` and ``.act``.
        out: the output ``nn.Linear``.
    """

    def __init__(
        self,
        in_features: int = 784,
        widths: Sequence[int] = (100, 100, 100),
        num_classes: int = 10,
        activation: ActivationSpec = "sigmoid",
        norm: NormSpec = None,
        init: str = "gaussian",
        init_std: float = 0.1,
        bias: bool | None = True,
    ) -> None:
        super().__init__()
        if init not in ("gaussian", "default"):
            raise ValueError(f"init must be 'gaussian' or 'default', got {init!r}")
        use_bias = (not _normalizes(norm)) if bias is None else bool(bias)
        layers, prev = [], in_features
        for w in widths:
            layers.append(HiddenLayer(nn.Linear(prev, w, bias=use_bias), make_norm(norm, w, "1d"),
                                      make_activation(activation)))
            prev = w
        self.hidden = nn.ModuleList(layers)
        self.out = nn.Linear(prev, num_classes)
        if init == "gaussian":
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0.0, init_std)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the logits, shape ``(N, num_classes)``."""
        x = x.flatten(1)
        for layer in self.hidden:
            x = layer(x)
        return self.out(x)


# --------------------------------------------------------------------------
# CNN
# --------------------------------------------------------------------------

def _conv_bias(conv_bias: bool | None, norm: NormSpec, norm_follows_conv: bool) -> bool:
    """Returns whether a convolution keeps its bias (see :class:`CNN`, ``conv_bias``)."""
    if conv_bias is not None:
        return bool(conv_bias)
    return not (norm_follows_conv and _normalizes(norm))


class ConvBlock(nn.Module):
    """``conv -> norm -> act`` (``position='before'``) or ``conv -> act -> norm`` (``'after'``)."""

    def __init__(self, conv: nn.Conv2d, norm: nn.Module, act: nn.Module, position: str = "before") -> None:
        super().__init__()
        self.conv, self.norm, self.act = conv, norm, act
        self.position = position

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the block's output map."""
        x = self.conv(x)
        if self.position == "before":
            return self.act(self.norm(x))
        return self.norm(self.act(x))


class CNN(nn.Module):
    """Plain (non-residual) convolutional classifier.

    ``len(channels)`` stages of ``depth_per_stage`` blocks of 3x3 convolutions
    (padding 1), each block ``conv -> norm -> act``; 2x2 max-pooling between
    stages; then global average pooling and a linear head. For MNIST,
    ``channels=(16, 32, 64, 128), depth_per_stage=2`` gives 8 conv layers.

    Args:
        in_channels, channels, num_classes: sizes.
        norm: see :func:`make_norm` (default None).
        activation: see :func:`make_activation` (default ``'relu'``).
        depth_per_stage: conv blocks per stage.
        conv_bias: None (default) drops the conv bias when a normalization
            layer directly follows the conv (its shift β takes the bias's
            role) and keeps it otherwise -- including with
            ``bn_position='after'``, where the activation sits in between;
            True/False forces it.
        bn_position: ``'before'`` the activation (the paper's placement) or
            ``'after'`` it.
        init: ``'default'`` (PyTorch's) or ``'kaiming'`` (He normal, fan-in,
            for ReLU; zero biases).

    Attributes:
        stages: ``nn.ModuleList`` of ``nn.Sequential`` of :class:`ConvBlock`.
        blocks: flat list of all :class:`ConvBlock` (each has ``.conv``, ``.norm``, ``.act``).
        head: the final ``nn.Linear``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64),
        num_classes: int = 10,
        norm: NormSpec = None,
        activation: ActivationSpec = "relu",
        depth_per_stage: int = 1,
        conv_bias: bool | None = None,
        bn_position: str = "before",
        init: str = "default",
    ) -> None:
        super().__init__()
        if bn_position not in ("before", "after"):
            raise ValueError(f"bn_position must be 'before' or 'after', got {bn_position!r}")
        if init not in ("default", "kaiming"):
            raise ValueError(f"init must be 'default' or 'kaiming', got {init!r}")
        if depth_per_stage < 1 or not channels:
            raise ValueError("need at least one stage and depth_per_stage >= 1")
        bias = _conv_bias(conv_bias, norm, bn_position == "before")
        stages, prev = [], in_channels
        for c in channels:
            blocks = []
            for _ in range(depth_per_stage):
                conv = nn.Conv2d(prev, c, 3, padding=1, bias=bias)
                blocks.append(ConvBlock(conv, make_norm(norm, c, "2d"), make_activation(activation), bn_position))
                prev = c
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(prev, num_classes)
        if init == "kaiming":
            kaiming_init(self)

    @property
    def blocks(self) -> list:
        """Returns all :class:`ConvBlock` in forward order."""
        return [b for stage in self.stages for b in stage]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the logits, shape ``(N, num_classes)``."""
        for k, stage in enumerate(self.stages):
            if k > 0:
                x = self.pool(x)
            x = stage(x)
        return self.head(x.mean(dim=(2, 3)))


def kaiming_init(model: nn.Module) -> None:
    """He-normal (fan-in, ReLU) weights and zero biases for every conv and linear layer."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------
# ResNet
# --------------------------------------------------------------------------

class BasicBlock(nn.Module):
    """Residual block: ``act(norm2(conv2(act(norm1(conv1(x))))) + shortcut(x))``.

    ``shortcut`` is the identity, or a strided 1x1 conv followed by a norm when
    the shape changes.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, norm: NormSpec, activation, conv_bias: bool | None) -> None:
        super().__init__()
        bias = _conv_bias(conv_bias, norm, True)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = make_norm(norm, c_out, "2d")
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias)
        self.norm2 = make_norm(norm, c_out, "2d")
        self.act2 = make_activation(activation)
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=bias),
                                          make_norm(norm, c_out, "2d"))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the block's output map."""
        h = self.act1(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return self.act2(h + self.shortcut(x))


class ResNet(nn.Module):
    """Small ResNet for 28x28 (MNIST) or 32x32 images.

    A 3x3 stem conv with ``width`` channels, then ``len(blocks_per_stage)``
    stages of :class:`BasicBlock` with ``width * 2**k`` channels (stride 2 at
    the start of every stage but the first), global average pooling and a
    linear head. The default (3 stages of 2 blocks, width 16) is ResNet-14
    sized: ~0.17 M parameters.

    Args:
        in_channels, num_classes: sizes.
        width: channels of the stem and first stage.
        blocks_per_stage: blocks in each stage; an int means 3 stages of it.
        norm: see :func:`make_norm` (default ``'bn'``, as in He et al.).
        activation: see :func:`make_activation` (default ``'relu'``).
        conv_bias: as in :class:`CNN` (None: drop it before a normalization).
        zero_init_residual: initialise the scale γ of the last normalization layer of every block
            (``norm2``) to 0, so that each block starts as the identity on its shortcut and the
            network as a shallow one (Goyal et al. 2017, "zero γ"; torchvision's option of the same
            name). Needs a ``norm`` with a learned scale.

    Attributes:
        blocks: flat list of the :class:`BasicBlock` modules in forward order.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 16,
        blocks_per_stage: int | Sequence[int] = 2,
        norm: NormSpec = "bn",
        activation: ActivationSpec = "relu",
        conv_bias: bool | None = None,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(blocks_per_stage, int):
            blocks_per_stage = (blocks_per_stage,) * 3
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=_conv_bias(conv_bias, norm, True)),
            make_norm(norm, width, "2d"),
            make_activation(activation),
        )
        stages, prev = [], width
        for k, n in enumerate(blocks_per_stage):
            c = width * 2 ** k
            stage = [BasicBlock(prev if i == 0 else c, c, 2 if (k > 0 and i == 0) else 1, norm, activation, conv_bias)
                     for i in range(n)]
            stages.append(nn.Sequential(*stage))
            prev = c
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(prev, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for block in self.blocks:
                gamma = getattr(block.norm2, "weight", None)
                if not isinstance(gamma, nn.Parameter):
                    raise ValueError(f"zero_init_residual needs a normalization layer with a learned scale γ, "
                                     f"got {type(block.norm2).__name__} for norm={norm!r}")
                nn.init.zeros_(gamma)

    @property
    def blocks(self) -> list:
        """Returns all :class:`BasicBlock` in forward order."""
        return [b for stage in self.stages for b in stage]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the logits, shape ``(N, num_classes)``."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x.mean(dim=(2, 3)))


# ---------------------------------------------------------------------------------------------------- memory

class Checkpointed(nn.Module):
    """``module`` under activation checkpointing: in training, its forward keeps only its input for the backward
    and runs again during the backward pass to rebuild what it needs (``torch.utils.checkpoint``, non-reentrant).
    In evaluation, or without gradients, it is ``module`` unchanged.

    The recomputation runs ``module``'s BN layers in training mode once more per step: they update their running
    statistics twice with the same batch (the same data, so the average moves as with a larger momentum)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns ``module(x)``."""
        if self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint
            return checkpoint(self.module, x, use_reentrant=False)
        return self.module(x)


def checkpoint_blocks(model: ResNet) -> ResNet:
    """Wraps every residual block of ``model`` in :class:`Checkpointed`, in place, and returns ``model``.

    The parameters are the same objects (their names gain ``.module``): the network computes the same function
    and the same gradients, and keeps only each block's input for the backward pass.
    """
    if not isinstance(model, ResNet):
        raise TypeError(f"checkpoint_blocks() expects a ResNet, got {type(model).__name__}")
    for stage in model.stages:
        assert isinstance(stage, nn.Sequential)
        for i in range(len(stage)):
            if not isinstance(stage[i], Checkpointed):
                stage[i] = Checkpointed(stage[i])
    return model


def with_inplace_abn(model: ResNet, negative_slope: float = 0.01) -> ResNet:
    """Replaces, in place, every BN layer of ``model`` that is followed directly by its activation (the stem's, and
    ``norm1``/``act1`` of each block) by :class:`bnlib.InPlaceABN` with that ``negative_slope``, and the activation by
    ``nn.Identity``; returns ``model``.

    The BN layer's parameters and running statistics are copied, so for a slope near 0 the network computes nearly
    the function it computed with ReLUs. A block's second BN is followed by the residual addition, not by the
    activation, and stays as it is (the residual sum is what the block's last ReLU reads).
    """
    from bnlib.inplace_abn import InPlaceABN

    if not isinstance(model, ResNet):
        raise TypeError(f"with_inplace_abn() expects a ResNet, got {type(model).__name__}")

    def fuse(owner: nn.Module, norm_name: str, act_name: str) -> None:
        bn = getattr(owner, norm_name)
        if not isinstance(bn, (nn.modules.batchnorm._BatchNorm, modules.BatchNormBase)) or isinstance(bn, InPlaceABN):
            raise ValueError(f"with_inplace_abn() needs BN layers before the activations, found {type(bn).__name__}")
        device = next(bn.parameters()).device
        abn = InPlaceABN(bn.num_features, negative_slope, eps=bn.eps, momentum=bn.momentum).to(device)
        abn.load_state_dict(bn.state_dict())
        setattr(owner, norm_name, abn)
        setattr(owner, act_name, nn.Identity())

    fuse(model.stem, "1", "2")
    for block in model.blocks:
        fuse(block, "norm1", "act1")
    return model

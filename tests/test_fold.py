"""Tests for bnlib.fold: folding eval-mode BatchNorm into the preceding layer."""
import pytest
import torch
from torch import nn

from bnlib import BatchLayerNorm
from bnlib.fold import FoldError, LinearFoldGuard, count_batchnorms, fold_batchnorm, is_batchnorm

TOL = 1e-5
FAMILIES = ["torch", "bnlib"]


def bn_cls(family, dim):
    """BatchNorm{dim}d class from torch.nn or from bnlib.modules."""
    if family == "torch":
        return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim]
    import bnlib.modules as bm  # must exist: bnlib BN is a supported input
    return {1: bm.BatchNorm1d, 2: bm.BatchNorm2d, 3: bm.BatchNorm3d}[dim]


CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def make_input(dim, channels, n=4, size=6):
    return torch.randn(n, channels, *([size] * dim)) if dim else torch.randn(n, channels)


def prepare(model, x, steps=3):
    """Random BN affine params + non-trivial running stats from a few train batches."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if is_batchnorm(m) and m.affine:
                m.weight.uniform_(0.5, 2.0)
                m.bias.normal_(0.0, 1.0)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(x * 3.0 + 1.5 + torch.randn_like(x))
    return model


def assert_folds(model, x, expect_bn_left=0, **kw):
    folded = fold_batchnorm(model, **kw)
    model.eval()
    with torch.no_grad():
        ref, out = model(x), folded(x)
    assert out.dtype == ref.dtype
    assert (out - ref).abs().max().item() <= TOL
    assert count_batchnorms(folded) == expect_bn_left
    assert not folded.training
    return folded


def folded_names(folded):
    """Qualified names of the BNs a fold replaced (by nn.Identity or a LinearFoldGuard)."""
    return sorted(n for n, m in folded.named_modules() if isinstance(m, (nn.Identity, LinearFoldGuard)))


def left_bns(folded):
    return sorted(n for n, m in folded.named_modules() if is_batchnorm(m))


def bn_modules_have_nontrivial_stats(model):
    for m in model.modules():
        if is_batchnorm(m) and m.track_running_stats:
            assert not torch.allclose(m.running_mean, torch.zeros_like(m.running_mean))
            assert not torch.allclose(m.running_var, torch.ones_like(m.running_var))


# ----------------------------------------------------------------- basic layers

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_bn(family, dim, bias):
    torch.manual_seed(dim)
    model = nn.Sequential(CONV[dim](3, 5, 3, padding=1, bias=bias), bn_cls(family, dim)(5),
                          nn.ReLU())
    x = make_input(dim, 3, size=5 if dim == 3 else 6)
    prepare(model, x)
    bn_modules_have_nontrivial_stats(model)
    folded = assert_folds(model, x)
    assert isinstance(folded[1], nn.Identity)
    assert folded[0].bias is not None  # created when bias=False
    assert folded_names(folded) == ["1"]


@pytest.mark.parametrize("family", FAMILIES)
def test_linear_bn1d(family):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(7, 6), bn_cls(family, 1)(6), nn.ReLU(),
                          nn.Linear(6, 4, bias=False), bn_cls(family, 1)(4))
    x = make_input(0, 7, n=8)
    prepare(model, x)
    folded = assert_folds(model, x)
    assert folded[3].bias is not None
    assert isinstance(folded[1], LinearFoldGuard) and isinstance(folded[4], LinearFoldGuard)
    proven = assert_folds(model, x, example_input=x)        # shapes checked: plain identities
    assert type(proven[1]) is nn.Identity and type(proven[4]) is nn.Identity


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("groups", [2, 8])  # grouped, depthwise (groups == in == out)
def test_grouped_and_depthwise_conv(family, groups):
    torch.manual_seed(groups)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=groups, bias=False),
                          bn_cls(family, 2)(8))
    x = make_input(2, 8)
    prepare(model, x)
    assert_folds(model, x)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dim,groups", [(1, 1), (2, 1), (2, 2), (3, 2)])
def test_conv_transpose(family, dim, groups):
    torch.manual_seed(10 + dim)
    model = nn.Sequential(CONVT[dim](4, 6, 3, stride=2, groups=groups), bn_cls(family, dim)(6))
    x = make_input(dim, 4, size=4)
    prepare(model, x)
    assert_folds(model, x)


@pytest.mark.parametrize("family", FAMILIES)
def test_eps_and_affine_false(family):
    torch.manual_seed(3)
    BN = bn_cls(family, 2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BN(4, eps=0.3, affine=False),
                          nn.Conv2d(4, 4, 1), BN(4, eps=1e-3))
    x = make_input(2, 3)
    prepare(model, x)
    assert_folds(model, x)


def test_float64_dtype_kept():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)).double()
    x = make_input(2, 3).double()
    prepare(model, x)
    folded = assert_folds(model, x)
    assert folded[0].weight.dtype == folded[0].bias.dtype == torch.float64


# ------------------------------------------------------------------- nesting

class Block(nn.Module):
    """Custom module holding a Sequential."""

    def __init__(self, family, c_in, c_out):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                                  bn_cls(family, 2)(c_out), nn.ReLU())

    def forward(self, x):
        return self.body(x) * 0.5


class ResBlock(nn.Module):
    """ResNet basic block: conv->bn inside a custom forward, plus a projection skip."""

    def __init__(self, family, c_in, c_out):
        super().__init__()
        BN = bn_cls(family, 2)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1 = BN(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = BN(c_out)
        self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), BN(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.down(x))


class Net(nn.Module):
    def __init__(self, family):
        super().__init__()
        self.stem = Block(family, 3, 4)
        self.layers = nn.Sequential(ResBlock(family, 4, 6), ResBlock(family, 6, 6))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 36, 5), bn_cls(family, 1)(5))

    def forward(self, x):
        return self.head(self.layers(self.stem(x)))


@pytest.mark.parametrize("family", FAMILIES)
def test_nested_resnet(family):
    torch.manual_seed(5)
    model = Net(family)
    x = make_input(2, 3)
    prepare(model, x)
    n_bn = count_batchnorms(model)
    assert n_bn == 1 + 2 * 3 + 1
    folded = assert_folds(model, x)
    assert len(folded_names(folded)) == n_bn and left_bns(folded) == []
    assert "layers.0.bn1" in folded_names(folded) and "layers.1.down.1" in folded_names(folded)
    assert isinstance(folded.layers[0].bn2, nn.Identity)
    assert type(folded) is Net  # the user's classes are kept, not an fx GraphModule


@pytest.mark.parametrize("family", FAMILIES)
def test_original_untouched(family):
    torch.manual_seed(6)
    model = Net(family)
    x = make_input(2, 3)
    prepare(model, x)
    model.train()
    model.layers[1].eval()  # mixed flags must be preserved too
    flags = {n: m.training for n, m in model.named_modules()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {n: m.training for n, m in model.named_modules()}
    assert count_batchnorms(model) == 8
    assert folded.stem.body[0].weight.data_ptr() != model.stem.body[0].weight.data_ptr()
    assert model.stem.body[0].bias is None


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("family", FAMILIES)
def test_bn_after_relu(family):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn_cls(family, 2)(4), nn.ReLU(),
                          bn_cls(family, 2)(4))
    x = make_input(2, 3)
    prepare(model, x)
    with pytest.raises(FoldError, match=r"(?s)\b3: .*ReLU"):
        fold_batchnorm(model)
    folded = assert_folds(model, x, expect_bn_left=1, strict=False)
    assert isinstance(folded[1], nn.Identity) and is_batchnorm(folded[3])
    assert left_bns(folded) == ["3"] and folded_names(folded) == ["1"]


class SharedOutput(nn.Module):
    def __init__(self, family):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = bn_cls(family, 2)(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y  # conv output has a second user


@pytest.mark.parametrize("family", FAMILIES)
def test_conv_output_used_elsewhere(family):
    model = SharedOutput(family)
    x = make_input(2, 3)
    prepare(model, x)
    with pytest.raises(FoldError, match=r"bn: .*used elsewhere"):
        fold_batchnorm(model)
    assert_folds(model, x, expect_bn_left=1, strict=False)


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(self.conv(x)))  # same conv module called twice


def test_shared_conv_refused():
    model = SharedConv()
    x = make_input(2, 4)
    prepare(model, x)
    with pytest.raises(FoldError, match="called 2 times"):
        fold_batchnorm(model)
    assert_folds(model, x, expect_bn_left=1, strict=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_track_running_stats_false(family):
    torch.manual_seed(8)
    BN = bn_cls(family, 2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BN(4, track_running_stats=False),
                          nn.Conv2d(4, 4, 1), BN(4))
    x = make_input(2, 3)
    prepare(model, x)
    with pytest.raises(FoldError, match=r"1: track_running_stats=False"):
        fold_batchnorm(model)
    folded = assert_folds(model, x, expect_bn_left=1, strict=False)
    assert is_batchnorm(folded[1]) and isinstance(folded[3], nn.Identity)


def test_conv_subclass_with_custom_forward_refused():
    class WSConv(nn.Conv2d):  # weight standardization: stored weight is not the used one
        def forward(self, x):
            w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True))
            return self._conv_forward(x, w, self.bias)

    model = nn.Sequential(WSConv(3, 4, 3), nn.BatchNorm2d(4))
    x = make_input(2, 3)
    prepare(model, x)
    with pytest.raises(FoldError, match="overrides forward"):
        fold_batchnorm(model)


# ------------------------------------------------------ detection fallbacks

class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self, family):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), bn_cls(family, 2)(4), nn.ReLU())
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = bn_cls(family, 2)(4)

    def forward(self, x):
        y = self.features(x)
        if y.sum() > 0:
            y = y * 2
        return self.bn(self.conv(y))


@pytest.mark.parametrize("family", FAMILIES)
def test_untraceable_falls_back_to_sequential(family):
    torch.manual_seed(9)
    model = Untraceable(family)
    x = make_input(2, 3)
    prepare(model, x)
    with pytest.raises(FoldError, match=r"(?s)detection: sequential.*bn: cannot tell"):
        fold_batchnorm(model)
    folded = assert_folds(model, x, expect_bn_left=1, strict=False)
    assert folded_names(folded) == ["features.1"] and left_bns(folded) == ["bn"]
    with pytest.raises(Exception):
        fold_batchnorm(model, method="fx")


@pytest.mark.parametrize("family", FAMILIES)
def test_sequential_method(family):
    model = Net(family)
    x = make_input(2, 3)
    prepare(model, x)
    # stem, down and head BNs sit in Sequentials; bn1/bn2 are in a custom forward.
    folded = fold_batchnorm(model, strict=False, method="sequential")
    assert len(folded_names(folded)) == 4
    assert left_bns(folded) == sorted(f"layers.{i}.bn{j}" for i in (0, 1) for j in (1, 2))
    model.eval()
    with torch.no_grad():
        assert (folded(x) - model(x)).abs().max().item() <= TOL
    with pytest.raises(ValueError):
        fold_batchnorm(model, method="bogus")


def test_helpers():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.InstanceNorm2d(2),
                          nn.LayerNorm(2), nn.BatchNorm1d(2))
    assert count_batchnorms(model) == 2
    assert not is_batchnorm(model[2])


def test_bnlib_batchnorm_detected():
    import bnlib.modules as bm
    bn = bm.BatchNorm2d(3)
    assert is_batchnorm(bn) and isinstance(bn, bm.BatchNormBase)
    assert count_batchnorms(nn.Sequential(nn.Conv2d(3, 3, 1), bn)) == 1


@pytest.mark.parametrize("bad", [float("nan"), -1.0])
def test_nan_or_negative_running_var_is_refused_by_name(bad):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model[1].running_var[2] = bad
    with pytest.raises(FoldError, match=r"1: its running_var"):
        fold_batchnorm(model)


def test_batch_layer_norm_is_not_folded():
    model = nn.Sequential(nn.Linear(3, 4), BatchLayerNorm(4)).eval()
    with pytest.raises(FoldError, match="BatchLayerNorm"):
        fold_batchnorm(model)


# ------------------------------------------------------- Linear on (N, L, C) followed by BatchNorm1d

def _sequence_linear_bn(family):
    """Linear(4 -> 5) applied to (N, L=5, 4), then BatchNorm1d(5): BN normalizes L, not the features."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(4, 5), bn_cls(family, 1)(5))
    x = torch.randn(16, 5, 4) * 2 + 1
    prepare(model, x)
    return model.eval(), x


@pytest.mark.parametrize("family", FAMILIES)
def test_linear_on_sequences_then_bn1d_is_refused_by_name(family):
    model, x = _sequence_linear_bn(family)
    with pytest.raises(FoldError, match=r"(?s)- 1: the Linear '0' gives it a 3-D input \(16, 5, 5\).*dimension 1"):
        fold_batchnorm(model, example_input=x)
    kept = fold_batchnorm(model, strict=False, example_input=x)
    assert left_bns(kept) == ["1"]
    with torch.no_grad():
        assert torch.equal(kept(x), model(x))


@pytest.mark.parametrize("family", FAMILIES)
def test_linear_fold_without_example_input_refuses_other_shapes_at_run_time(family):
    model, x = _sequence_linear_bn(family)
    folded = fold_batchnorm(model)          # shapes unknown: folded, guarded
    with pytest.raises(ValueError, match=r"BatchNorm '1' was folded into the Linear before it.*\(16, 5, 5\)"):
        folded(x)
    x2 = torch.randn(8, 4)
    model2 = nn.Sequential(nn.Linear(4, 5), bn_cls(family, 1)(5))
    prepare(model2, x2)
    model2.eval()
    with torch.no_grad():
        assert (fold_batchnorm(model2)(x2) - model2(x2)).abs().max() <= TOL


def test_example_input_must_reach_the_bn():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5)).eval()

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x):
            return x if x.shape[0] == 1 else self.body(x)

    with pytest.raises(FoldError, match="not called when the model runs example_input"):
        fold_batchnorm(Skip(), method="sequential", example_input=torch.randn(1, 4))

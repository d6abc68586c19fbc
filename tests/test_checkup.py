"""Tests of bnlib.checkup: every check reports its mistake and stays silent without it; the model is left
bit for bit as it was; clear errors; no false alarm on the kit's models as the chapters build them."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnlib
from bnlib.checkup import CHECKS, Finding, Report, checkup
from bnlib.running_stats import recompute_bn_stats


def checks_of(report: Report, layer: str | None = None) -> list[str]:
    return [f.check for f in report if layer is None or f.layer == layer]


def only(report: Report, check: str) -> list[Finding]:
    return [f for f in report if f.check == check]


def images(n: int = 32, seed: int = 0, offset: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g) * scale + offset


def settle(model: nn.Module, x: torch.Tensor, passes: int = 60) -> nn.Module:
    """Running statistics converged on ``x``'s distribution (forward passes in training mode, no learning)."""
    mode = model.training
    model.train()
    with torch.no_grad():
        for i in range(passes):
            model(x[torch.randperm(len(x), generator=torch.Generator().manual_seed(i))])
    model.train(mode)
    return model


def conv_net(bias: bool = False, momentum: float | None = 0.1, track: bool = True,
             norm=nn.BatchNorm2d) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=bias),
                         norm(8, momentum=momentum, track_running_stats=track),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


class ConvFunctionalRelu(nn.Module):
    """conv -> F.relu -> BN: the conv's bias is not cancelled (the ReLU sits in between)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(F.relu(self.conv(x))).mean((2, 3))


class ConvBN(nn.Module):
    """conv -> BN wired in forward (not a Sequential): seen only with a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = bnlib.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)).mean((2, 3))


# --------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------


def test_report_is_a_sequence_a_table_and_plain_data():
    model = conv_net(bias=True, momentum=0.99)
    report = checkup(model)
    assert isinstance(report, Report) and len(report) == 2 and report.layers == ("1",)
    assert [f.check for f in report] == ["bias-before-bn", "keras-momentum"]  # in the order of CHECKS
    assert all(isinstance(f, Finding) and f.layer == "1" for f in report)
    text = str(report)
    lines = text.splitlines()
    assert lines[0] == "bnlib.checkup: 2 finding(s) in 1 BN layer(s)"
    assert lines[1].split() == ["layer", "check", "message"] and set(lines[2].replace(" ", "")) == {"-"}
    assert lines[3].startswith("1      bias-before-bn ")
    assert "not checked: stale-stats (needs a batch)" in text and "not checked: precise-bn (needs a loader)" in text
    data = report.to_dict()
    assert json.loads(json.dumps(data)) == data  # plain data
    assert data["findings"][0] == {"layer": "1", "check": "bias-before-bn", "message": report[0].message,
                                   "evidence": {"before": "0", "bias_size": 8}}
    assert set(CHECKS) >= report.checks


def test_clean_model_has_no_findings_and_says_so():
    model = settle(conv_net(), images(64))
    report = checkup(model, images(64, seed=1))
    assert list(report) == [] and str(report).splitlines()[0] == "bnlib.checkup: 0 finding(s) in 1 BN layer(s)"
    assert checkup(nn.Linear(3, 2)).layers == () and len(checkup(nn.Linear(3, 2), torch.randn(4, 3))) == 0


def test_exported_from_bnlib():
    assert bnlib.checkup is checkup


# --------------------------------------------------------------------------
# Structure: what sits right before a BN layer
# --------------------------------------------------------------------------


def test_bias_before_bn_found_in_sequential_and_traced_and_really_dead():
    model = conv_net(bias=True)
    for report in (checkup(model), checkup(model, images())):  # registration order; traced pass
        (f,) = only(report, "bias-before-bn")
        assert f.layer == "1" and f.evidence == {"before": "0", "bias_size": 8}
        assert "bias=False on 0" in f.message
    traced = checkup(ConvBN(), images())
    assert only(traced, "bias-before-bn")[0].evidence["before"] == "conv"
    assert "bias-before-bn" not in checks_of(checkup(ConvBN()))  # wired in forward: needs the batch
    # The evidence is real: in training the bias gets no gradient.
    model.train()
    model(images()).square().sum().backward()
    assert model[0].bias.grad.abs().max() < 1e-5 * model[0].weight.grad.abs().max()


def test_bias_before_bn_not_reported_without_a_dead_bias():
    assert "bias-before-bn" not in checks_of(checkup(conv_net(bias=False), images()))
    assert "bias-before-bn" not in checks_of(checkup(ConvFunctionalRelu(), images()))  # ReLU in between
    frozen = conv_net(bias=True)
    frozen.train()
    frozen[1].eval()  # fixed statistics while training: the bias acts
    assert "bias-before-bn" not in checks_of(checkup(frozen, images()))
    bln = nn.Sequential(nn.Linear(6, 8), bnlib.BatchLayerNorm(8))  # its per-example half sees the bias
    assert "bias-before-bn" not in checks_of(checkup(bln, torch.randn(16, 6)))
    other_dim = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(3))  # (N, 3, 5) -> bias along the last dim
    assert "bias-before-bn" not in checks_of(checkup(other_dim, torch.randn(16, 3, 5)))


def dropout_net(p: float = 0.5, where: str = "before") -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Linear(6, 16, bias=False), nn.ReLU()]
    if where == "before":
        layers += [nn.Dropout(p), nn.BatchNorm1d(16)]
    else:
        layers += [nn.BatchNorm1d(16), nn.Dropout(p)]
    return nn.Sequential(*layers, nn.Linear(16, 2))


def test_dropout_before_bn_with_the_variance_shift_measured():
    model = dropout_net()
    (f,) = only(checkup(model), "dropout-before-bn")
    assert f.layer == "3" and f.evidence == {"before": "2", "p": 0.5}
    x = torch.randn(256, 6)
    (f,) = only(checkup(model, x), "dropout-before-bn")
    # Inverted dropout with keep rate q: Var_train = E[h²]/q - E[h]² against Var(h) at inference.
    with torch.no_grad():
        h = model[1](model[0](x))
    expected = float(((h.square().mean(0) / 0.5 - h.mean(0).square()) / h.var(0)).mean())
    assert f.evidence["variance_ratio"] == pytest.approx(expected, rel=0.25)
    assert f.evidence["variance_ratio"] > 2 and "times larger with dropout on" in f.message


def test_dropout_elsewhere_is_not_reported():
    assert "dropout-before-bn" not in checks_of(checkup(dropout_net(where="after"), torch.randn(64, 6)))
    assert "dropout-before-bn" not in checks_of(checkup(dropout_net(p=0.0), torch.randn(64, 6)))


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


def test_keras_momentum():
    (f,) = only(checkup(conv_net(momentum=0.99)), "keras-momentum")
    assert f.evidence == {"momentum": 0.99} and "momentum=0.01" in f.message
    for momentum in (0.1, 0.01, 0.5):
        assert "keras-momentum" not in checks_of(checkup(conv_net(momentum=momentum)))


def test_cumulative_momentum_while_training_only():
    model = conv_net(momentum=None)
    model.train()
    (f,) = only(checkup(model), "cumulative-momentum")
    assert f.evidence == {"num_batches_tracked": 0}
    model.eval()  # recomputing statistics after training: on purpose
    assert "cumulative-momentum" not in checks_of(checkup(model))
    assert "cumulative-momentum" not in checks_of(checkup(conv_net(momentum=0.1).train()))


def test_no_running_stats_when_probably_not_meant():
    mixed = nn.Sequential(nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
                          nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8, track_running_stats=False))
    (f,) = only(checkup(mixed), "no-running-stats")
    assert f.layer == "4" and f.evidence["tracking_layers"] == 1
    alone = conv_net(track=False)
    assert "no-running-stats" not in checks_of(checkup(alone))  # consistent, and not evaluating
    alone.eval()
    (f,) = only(checkup(alone, evaluating=True), "no-running-stats")
    assert "depends on the other examples" in f.message
    assert "no-running-stats" not in checks_of(checkup(conv_net().eval(), evaluating=True))


# --------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------


def test_train_mode_at_eval():
    model = settle(conv_net(), images(64))
    model.train()
    (f,) = only(checkup(model, evaluating=True), "train-mode-at-eval")
    assert f.layer == "1" and "model.eval()" in f.message
    assert "train-mode-at-eval" not in checks_of(checkup(model.eval(), evaluating=True))
    assert "train-mode-at-eval" not in checks_of(checkup(model.train()))  # training: as it should be


def test_eval_bn_learns_and_the_reverse():
    model = conv_net()
    model.train()
    model[1].eval()  # "frozen" statistics, γ/β still learning
    report = checkup(model)
    assert checks_of(report) == ["eval-bn-learns"] and "freeze_batchnorm" in report[0].message
    model[1].requires_grad_(False)  # frozen for real
    assert checks_of(checkup(model)) == []
    model[1].train()  # the reverse: γ/β frozen, statistics still moving
    report = checkup(model)
    assert checks_of(report) == ["frozen-affine-batch-stats"]
    model.requires_grad_(False)  # nothing is trained at all
    model[1].train()
    assert checks_of(checkup(model)) == []
    assert checks_of(checkup(conv_net().eval())) == []  # an eval-mode model is not being trained


# --------------------------------------------------------------------------
# Given a batch
# --------------------------------------------------------------------------


def test_few_values_per_channel():
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    (f,) = only(checkup(model, torch.randn(4, 6)), "few-values")
    assert f.evidence["values_per_channel"] == 4 and f.evidence["bound"] == pytest.approx(3 ** 0.5)
    assert "±1.7" in f.message
    (f,) = only(checkup(model, torch.randn(1, 6)), "few-values")  # a batch of one raises in training
    assert "raises in training" in f.message and f.evidence == {"values_per_channel": 1, "shape": [1, 8]}
    ghost = nn.Sequential(nn.Linear(6, 8, bias=False), bnlib.GhostBatchNorm1d(8, virtual_batch_size=4))
    (f,) = only(checkup(ghost, torch.randn(64, 6)), "few-values")
    assert f.evidence["values_per_channel"] == 4 and "per ghost batch" in f.message


def test_enough_values_per_channel_is_not_reported():
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8))
    assert "few-values" not in checks_of(checkup(model, torch.randn(32, 6)))
    # Two images of 8x8: 128 values per channel.
    assert "few-values" not in checks_of(checkup(conv_net(), images(2)))
    # Evaluating: the batch is not a training batch.
    assert "few-values" not in checks_of(checkup(model.eval(), torch.randn(1, 6), evaluating=True))
    frozen = conv_net()
    frozen[1].eval()
    frozen[1].requires_grad_(False)
    assert "few-values" not in checks_of(checkup(frozen, images(1)[:, :, :1, :1]))  # frozen: no batch statistics


def test_stale_statistics():
    x = images(128)
    fresh = conv_net()  # never updated: mean 0, variance 1 against inputs shifted by 3
    (f,) = only(checkup(fresh, x + 3), "stale-stats")
    assert f.evidence["never_updated"] and "never updated" in f.message
    model = settle(conv_net(), x)
    with torch.no_grad():
        model[0].weight.mul_(3)  # e.g. weights averaged or rescaled after the statistics were taken
    (f,) = only(checkup(model, images(128, seed=1)), "stale-stats")
    assert f.evidence["var_factor"] == pytest.approx(9, rel=0.1) and not f.evidence["never_updated"]


def test_matching_statistics_are_not_stale():
    x = images(256)
    model = settle(conv_net(), x)
    report = checkup(model, images(64, seed=3))
    assert "stale-stats" not in checks_of(report)
    # A small batch: the noise floor rises with it, no false alarm.
    for seed in range(20):
        assert "stale-stats" not in checks_of(checkup(model, images(4, seed=seed)))


class TimeConv(nn.Module):
    """A convolution over time, then BN over (N, C, T); pooled over the real steps."""

    def __init__(self, flatten: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(4, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm1d(8)
        self.flatten = flatten

    def forward(self, x):
        h = self.conv(x)
        if self.flatten:  # (N, C, T) -> (N·T, C), batch-major
            n, c, t = h.shape
            return self.bn(h.transpose(1, 2).reshape(n * t, c))
        return self.bn(h)


def padded_batch(n: int = 16, t: int = 12):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, t, generator=g) + 2
    lengths = torch.randint(3, t + 1, (n,), generator=g)
    mask = torch.arange(t)[None, :] >= lengths[:, None]  # True at padded positions
    return x.masked_fill(mask[:, None, :], 0.0), mask


@pytest.mark.parametrize("flatten", [False, True], ids=["NCT", "NT-C"])
def test_padding_in_statistics(flatten):
    x, mask = padded_batch()
    (f,) = only(checkup(TimeConv(flatten), x, padding_mask=mask), "padding-in-stats")
    assert f.evidence["padded_share"] == pytest.approx(float(mask.double().mean()))
    assert f.evidence["mean_shift"] > 0.2 and "masked=True" in f.message


def test_padding_not_reported_without_padding_or_time():
    x, mask = padded_batch()
    assert "padding-in-stats" not in checks_of(checkup(TimeConv(), x, padding_mask=torch.zeros_like(mask)))
    pooled = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1, bias=False), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                           nn.BatchNorm1d(8))  # BN after pooling over time: (N, C)
    assert "padding-in-stats" not in checks_of(checkup(pooled, x, padding_mask=mask))
    assert checkup(TimeConv(), x).skipped["padding-in-stats"] == "needs a batch and padding_mask"


# --------------------------------------------------------------------------
# Given a loader: Precise BN
# --------------------------------------------------------------------------


def loader_of(x: torch.Tensor, batch_size: int = 32):
    return [(x[i:i + batch_size], torch.zeros(len(x[i:i + batch_size]))) for i in range(0, len(x), batch_size)]


def test_precise_bn_finds_stale_statistics_and_the_metric_change():
    x = images(256)
    model = settle(conv_net(), x)
    with torch.no_grad():
        model[0].weight.mul_(3)
    target = torch.zeros(64, 4)

    def loss(m):  # the metric: a loss on held-out data, in eval mode
        with torch.no_grad():
            return F.mse_loss(m(images(64, seed=9)), target).item()

    report = checkup(model, loader=loader_of(x), num_batches=4, metric=loss)
    whole, layer = only(report, "precise-bn")  # the model's line first
    assert layer.layer == "1" and layer.evidence["var_factor"] == pytest.approx(9, rel=0.1)
    assert layer.evidence["examples"] == 128  # 4 batches of 32
    assert whole.layer == "" and whole.evidence["metric_before"] != whole.evidence["metric_after"]
    # The metric after recalibration is the one of the recalibrated model.
    fixed = settle(conv_net(), x)
    with torch.no_grad():
        fixed[0].weight.mul_(3)
    recompute_bn_stats(fixed, loader_of(x), num_batches=4)
    assert whole.evidence["metric_after"] == pytest.approx(loss(fixed.eval()), rel=1e-6)


def test_precise_bn_silent_on_recalibrated_statistics():
    x = images(256)
    model = settle(conv_net(), x)
    recompute_bn_stats(model, loader_of(x))

    def loss(m):
        with torch.no_grad():
            return m(images(64, seed=9)).square().mean().item()

    report = checkup(model, loader=loader_of(x), metric=loss)
    assert "precise-bn" not in checks_of(report) and "precise-bn" not in report.skipped
    assert "stale-stats" not in checks_of(report)  # the loader's first batch served as the batch


# --------------------------------------------------------------------------
# The model is left exactly as it was
# --------------------------------------------------------------------------


def snapshot(model: nn.Module):
    return ([(n, m.training) for n, m in model.named_modules()],
            [(n, b, b.clone()) for n, b in model.named_buffers()],
            [(n, p, p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone())
             for n, p in model.named_parameters()])


def assert_same(model: nn.Module, snap) -> None:
    modes, buffers, params = snap
    assert [(n, m.training) for n, m in model.named_modules()] == modes
    now = dict(model.named_buffers())
    for n, b, value in buffers:
        assert now[n] is b and b.dtype == value.dtype and torch.equal(b, value), n  # same object, same bits
    now = dict(model.named_parameters())
    for n, p, value, requires_grad, grad in params:
        assert now[n] is p and torch.equal(p.detach(), value) and p.requires_grad == requires_grad, n
        assert (p.grad is None) == (grad is None) and (grad is None or torch.equal(p.grad, grad)), n


def test_model_left_bit_for_bit():
    x = images(64)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None), nn.ReLU(),
                          nn.Dropout(0.3), nn.Conv2d(8, 8, 3, padding=1), bnlib.BatchNorm2d(8, momentum=0.99),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    settle(model, x, passes=3)
    model.train()
    model[5].eval()
    model[0].requires_grad_(False)
    model(x).sum().backward()  # gradients present (and None on the frozen conv)
    snap = snapshot(model)
    rng = torch.get_rng_state()
    report = checkup(model, x[:16], loader=loader_of(x, 16), num_batches=3,
                     metric=lambda m: m(x[:8]).sum().item(), evaluating=False)
    assert len(report) >= 4  # it did run every kind of pass (dropout shift measured, Precise BN, metric)
    assert_same(model, snap)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream is untouched
    with pytest.raises(ValueError):
        checkup(model, x[:, :2])  # an error half-way leaves it as it was too
    assert_same(model, snap)


# --------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------


def test_errors_are_clear():
    model = conv_net()
    with pytest.raises(TypeError, match="expects a torch.nn.Module, got list"):
        checkup([model])
    with pytest.raises(TypeError, match="tensor, or a tuple/list whose first element"):
        checkup(model, [[1, 2, 3]])
    with pytest.raises(ValueError, match="the batch is on meta but the model is on cpu"):
        checkup(model, images().to("meta"))
    with pytest.raises(ValueError, match=r"cannot run on the batch of shape \(32, 5, 8, 8\).*RuntimeError") as info:
        checkup(model, torch.randn(32, 5, 8, 8))
    assert isinstance(info.value.__cause__, RuntimeError)  # the model's own error, chained
    with pytest.raises(ValueError, match="the loader yielded no batches"):
        checkup(model, loader=[])
    with pytest.raises(ValueError, match="batch 0 of the loader is on meta"):
        checkup(model, loader=[images().to("meta")])
    with pytest.raises(ValueError, match="metric needs a loader"):
        checkup(model, images(), metric=lambda m: 0.0)
    with pytest.raises(ValueError, match="must return a finite number"):
        checkup(model, loader=loader_of(images()), metric=lambda m: "good")
    with pytest.raises(ValueError, match="padding_mask must be a bool tensor"):
        checkup(TimeConv(), torch.randn(4, 4, 6), padding_mask=torch.zeros(4, 6))
    with pytest.raises(ValueError, match="padding_mask has 3 rows but the batch has 4"):
        checkup(TimeConv(), torch.randn(4, 4, 6), padding_mask=torch.zeros(3, 6, dtype=torch.bool))


# --------------------------------------------------------------------------
# No false alarm on the kit's models, as the chapters build and train them
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist():
    from bnlib.lab.data import load_mnist
    (x, y), _ = load_mnist()
    return x[:3000], y[:3000]


def trained(model: nn.Module, mnist, steps: int = 100):
    """The model trained as the chapters do (the kit's loop, on the kit's device), and the data moved there."""
    from bnlib.lab.training import fit
    x, y = mnist
    fit(model, ((x, y), (x[:500], y[:500])), steps=steps, batch_size=60, lr=0.05, progress=False, eval_every=steps)
    device = next(model.parameters()).device
    return model, x.to(device), y.to(device)


# As the chapters build them (the kit drops a bias before a normalization unless told otherwise).
KIT_MODELS = {
    "mlp-bn-no-bias": lambda lab: lab.MLP(norm="bn", bias=None),
    "mlp-bn-bias-false": lambda lab: lab.MLP(norm="bn", bias=False),
    "mlp-bn-torch": lambda lab: lab.MLP(norm="bn-torch", bias=False),
    "mlp-bln": lambda lab: lab.MLP(norm="bln", bias=True),
    "cnn-bn": lambda lab: lab.CNN(norm="bn", channels=(8, 16)),
    "cnn-bn-small": lambda lab: lab.CNN(norm="bn", channels=(16, 32, 32)),
    "cnn-bn-deep": lambda lab: lab.CNN(norm="bn", channels=(16, 16, 16, 16), depth_per_stage=2),
    "cnn-bn-after": lambda lab: lab.CNN(norm="bn", channels=(8, 16), bn_position="after"),
    "cnn-brn": lambda lab: lab.CNN(norm="brn", channels=(8, 16)),
    "cnn-gn": lambda lab: lab.CNN(norm="gn", channels=(8, 16)),
    "cnn-ghost": lambda lab: lab.CNN(norm=functools.partial(bnlib.GhostBatchNorm2d, virtual_batch_size=20),
                                     channels=(8, 16)),
    "resnet": lambda lab: lab.ResNet(width=8, blocks_per_stage=2, zero_init_residual=True),
}


@pytest.mark.parametrize("name", list(KIT_MODELS))
def test_no_structural_or_mode_finding_on_the_kits_models(name):
    from bnlib import lab
    torch.manual_seed(0)
    model = KIT_MODELS[name](lab)
    x = torch.rand(60, 1, 28, 28)
    # As built (never trained), the running statistics are the initial ones: at most that is reported.
    for report in (checkup(model), checkup(model, x)):
        assert all(f.check == "stale-stats" and f.evidence["never_updated"] for f in report), str(report)
    model.eval()
    assert all(f.check == "stale-stats" for f in checkup(model, x, evaluating=True))


# Trained briefly as the chapters train (their brief runs are 150 to 600 updates). Batch Renorm is left out:
# with its update rate 0.01 (the paper's) its running statistics are still far from the network's after a
# few hundred updates, which the checkup rightly reports.
@pytest.mark.parametrize("name", ["mlp-bn-no-bias", "mlp-bln", "cnn-bn", "cnn-bn-after", "cnn-ghost", "resnet"])
def test_no_false_alarm_on_the_kits_trained_models(name, mnist):
    from bnlib import lab
    torch.manual_seed(0)
    if name == "resnet":
        model, x, y = trained(lab.ResNet(width=8, blocks_per_stage=1), mnist)
    else:
        model, x, y = trained(KIT_MODELS[name](lab), mnist)
    batch = (x[-60:], y[-60:])
    report = checkup(model, batch, loader=loader_of(x[:600], 60), num_batches=5)
    assert list(report) == [], str(report)
    model.eval()
    assert list(checkup(model, batch, evaluating=True)) == []


def test_the_paper_mlp_keeps_its_dead_biases_and_they_are_reported(mnist):
    # MLP(norm="bn") keeps the hidden biases on purpose (the paper's network); they are dead, as reported.
    from bnlib import lab
    torch.manual_seed(0)
    model, x, y = trained(lab.MLP(norm="bn"), mnist)
    report = checkup(model, (x[-60:], y[-60:]))
    assert checks_of(report) == ["bias-before-bn"] * 3
    assert [f.evidence["before"] for f in report] == [f"hidden.{i}.linear" for i in range(3)]
    model.zero_grad()
    F.cross_entropy(model(x[:60]), y[:60]).backward()
    for i in range(3):
        assert model.hidden[i].linear.bias.grad.abs().max() < 1e-6

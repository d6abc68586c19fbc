"""bnlib.lab.tasks and bnlib.lab.transformer: the tasks, sequence BN with a padding mask, causality, training."""

import math

import pytest
import torch

import bnlib
from bnlib.lab import tasks as T
from bnlib.lab.training import seed_everything
from bnlib.lab.transformer import (
    BatchStatProbe,
    CausalTransformer,
    SequenceBatchNorm,
    answer_accuracy,
    generate,
    logits,
    make_token_norm,
    token_losses,
    train_lm,
)
from bnlib.layers import bn_layers

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
NORMS = ["bn", "ln", "rms", None]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def small(task, norm, seed=0, **kw):
    seed_everything(seed)
    return CausalTransformer(task.vocab_size, task.seq_len, d_model=32, n_layers=2, n_heads=4, norm=norm, **kw)


# ---------------------------------------------------------------------------------------------- tasks

@pytest.mark.parametrize("kind", T.TASKS)
def test_task_sequences(kind):
    task = T.SequenceTask(kind, vocab=5, length=6, min_length=2)
    b = task.sample(40, gen())
    assert b.tokens.shape == b.targets.shape == b.mask.shape == b.part.shape == (40, task.seq_len)
    for i in range(40):
        k = int(b.mask[i].sum()) // 2
        assert b.mask[i, :2 * k].all() and not b.mask[i, 2 * k:].any()
        seq = torch.cat([b.tokens[i, :2 * k], b.targets[i, 2 * k - 1:2 * k]])  # the whole real sequence
        prompt, answer = seq[:k], seq[k + 1:]
        assert seq[k] == T.SEP and ((prompt >= 2) & (prompt < task.vocab_size)).all()
        expected = {"copy": prompt, "reverse": prompt.flip(0), "sort": prompt.sort().values}[kind]
        assert torch.equal(answer, expected)
        assert torch.equal(b.targets[i, :2 * k], seq[1:])  # next token at every real position
        assert (b.targets[i, 2 * k:] == T.IGNORE).all() and (b.tokens[i, 2 * k:] == T.PAD).all()
        assert b.part[i, :2 * k].tolist() == [T.PROMPT] * (k - 1) + [T.SEP_PART] + [T.ANSWER] * k
    assert b.mask.sum(1).min() < b.mask.sum(1).max()  # lengths do vary


def test_task_deterministic_and_fixed_length():
    task = T.SequenceTask("copy", vocab=8, length=5)
    a, b = task.sample(16, gen(3)), task.sample(16, gen(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a.mask.all() and task.seq_len == 10 and task.vocab_size == 10
    assert task.prompt_entropy == pytest.approx(math.log(8))
    with pytest.raises(ValueError, match="kind"):
        T.SequenceTask("add")
    with pytest.raises(ValueError, match="min_length"):
        T.SequenceTask("copy", length=4, min_length=5)


# ---------------------------------------------------------------------------------------------- sequence BN

def test_sequence_bn_is_batchnorm1d_over_the_real_tokens():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, dtype=torch.float64) * 2 + 1
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    seq_bn = SequenceBatchNorm(4, momentum=0.3).double()
    ref = bnlib.BatchNorm1d(4, momentum=0.3).double()
    with torch.no_grad():
        seq_bn.weight.uniform_(0.5, 1.5, generator=gen(1))
        seq_bn.bias.normal_(generator=gen(2))
    ref.load_state_dict(seq_bn.state_dict())
    y = seq_bn(x, mask)
    torch.testing.assert_close(y[mask], ref(x[mask]), rtol=0, atol=0)
    assert (y[~mask] == 0).all()
    torch.testing.assert_close(seq_bn.running_mean, ref.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(seq_bn.running_var, ref.running_var, rtol=0, atol=0)
    # padded values never reach the statistics, nor the outputs of real tokens
    x2 = x.clone()
    x2[~mask] = 1e3
    torch.testing.assert_close(SequenceBatchNorm(4).double()(x2, mask)[mask],
                               SequenceBatchNorm(4).double()(x, mask)[mask], rtol=0, atol=0)
    # without the mask they do: every position is a token
    plain = SequenceBatchNorm(4).double()
    torch.testing.assert_close(plain(x), bnlib.BatchNorm1d(4).double()(x.reshape(15, 4)).view(3, 5, 4))
    assert not torch.allclose(plain(x2)[mask], plain(x)[mask])
    # gradients flow through the gathered tokens only
    xg = x.clone().requires_grad_()
    seq_bn(xg, mask).pow(2).sum().backward()
    assert (xg.grad[~mask] == 0).all() and xg.grad[mask].abs().sum() > 0


def test_sequence_bn_errors_and_registry():
    layer = SequenceBatchNorm(4)
    with pytest.raises(ValueError, match=r"\(N, T, C\)"):
        layer(torch.randn(3, 4))
    with pytest.raises(ValueError, match="bool mask of shape"):
        layer(torch.randn(2, 3, 4), torch.ones(2, 3))
    model = small(T.SequenceTask(), "bn")
    assert len(bn_layers(model)) == 5  # two per block and the final norm
    assert isinstance(make_token_norm("rms", 8), bnlib.RMSNorm)
    assert isinstance(make_token_norm("ln", 8), bnlib.LayerNorm)
    assert isinstance(make_token_norm("none", 8), torch.nn.Identity)
    with pytest.raises(ValueError, match="expected norm"):
        make_token_norm("gn", 8)


# ---------------------------------------------------------------------------------------------- causality

def _future_changed(model, task, train):
    """Max change of the logits at positions < j when only token j of every sequence changes."""
    b = task.sample(8, gen(5))
    j = 6
    changed = b.tokens.clone()
    changed[:, j] = 2 + (changed[:, j] - 2 + 1) % task.vocab  # another symbol
    model.train(train)
    with torch.no_grad():
        a, c = model(b.tokens, b.mask), model(changed, b.mask)
    return (a[:, :j] - c[:, :j]).abs().max().item(), (a[:, j:] - c[:, j:]).abs().max().item()


@pytest.mark.parametrize("norm", ["ln", "rms", None])
@pytest.mark.parametrize("train", [True, False])
def test_per_token_norms_are_causal(norm, train):
    task = T.SequenceTask("copy", vocab=8, length=6)
    past, later = _future_changed(small(task, norm), task, train)
    assert past == 0.0 and later > 0.0


def test_bn_leaks_the_future_in_training_mode_only():
    task = T.SequenceTask("copy", vocab=8, length=6)
    model = small(task, "bn")
    model.train()
    with torch.no_grad():  # give the running statistics something to hold
        model(task.sample(32, gen(9)).tokens)
    past_train, _ = _future_changed(model, task, train=True)
    past_eval, later_eval = _future_changed(model, task, train=False)
    assert past_train > 1e-4  # earlier positions moved: batch statistics saw the changed later token
    assert past_eval == 0.0 and later_eval > 0.0


def test_logits_modes_and_prefix_sees_no_future():
    task = T.SequenceTask("copy", vocab=8, length=6)
    model = small(task, "bn")
    b = task.sample(8, gen(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    out = {s: logits(model, b, s) for s in ("batch", "prefix", "running")}
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # 'prefix' at the last position is the full batch's forward; at earlier ones it sees no later token
    torch.testing.assert_close(out["prefix"][:, -1], out["batch"][:, -1])
    changed = b.tokens.clone()
    changed[:, 7] = 2 + (changed[:, 7] - 2 + 1) % task.vocab
    other = logits(model, T.Batch(changed, b.targets, b.mask, b.part), "prefix")
    assert torch.equal(other[:, :7], out["prefix"][:, :7])
    with pytest.raises(ValueError, match="stats"):
        logits(model, b, "ema")
    ln = small(task, "ln")
    ref = logits(ln, b, "running")
    for s in ("batch", "prefix"):  # per-token norms: the three modes agree
        torch.testing.assert_close(logits(ln, b, s), ref)


def test_token_losses_are_cross_entropy_and_zero_at_padding():
    task = T.SequenceTask("copy", vocab=6, length=5, min_length=2)
    model = small(task, "rms")
    b = task.sample(10, gen(4))
    losses = token_losses(model, b)
    lp = torch.log_softmax(logits(model, b), -1)
    real = b.mask
    torch.testing.assert_close(losses[real], -lp[real].gather(-1, b.targets[real][:, None])[:, 0])
    assert (losses[~real] == 0).all()


# ---------------------------------------------------------------------------------------------- training

@pytest.mark.parametrize("norm", NORMS)
def test_trains_with_each_norm(norm):
    task = T.SequenceTask("copy", vocab=6, length=5, min_length=3)
    model = small(task, norm)
    held_out = task.sample(64, gen(77))
    before = token_losses(model, held_out)[held_out.mask].mean().item()
    hist = train_lm(model, task, steps=80, batch_size=16, lr=3e-3, seed=1, eval_batch=held_out, dev="cpu")
    after = token_losses(model, held_out)[held_out.mask].mean().item()
    assert len(hist.train_loss) == 10 and hist.test_step[-1] == 80
    assert hist.train_loss[-1] < hist.train_loss[0] - 0.1
    assert after < before - 0.1  # held out, in evaluation mode (BN: running statistics)
    assert hist.test_acc[-1] == answer_accuracy(model, held_out)


def test_training_is_deterministic_and_unmasked_stats_differ():
    task = T.SequenceTask("copy", vocab=6, length=5, min_length=2)
    runs = []
    for masked in (True, True, False):
        model = small(task, "bn")
        hist = train_lm(model, task, steps=10, batch_size=8, seed=3, masked_stats=masked, dev="cpu")
        runs.append((hist.train_loss, model.blocks[0].norm1.running_mean.clone()))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][1], runs[2][1])  # padded positions entered the unmasked statistics


def test_generation_is_teacher_forced_argmax_in_eval_mode():
    task = T.SequenceTask("reverse", vocab=6, length=4)
    model = small(task, "bn")
    train_lm(model, task, steps=30, batch_size=16, seed=0, dev="cpu")
    b = task.sample(6, gen(8))
    pred = logits(model, b).argmax(-1)
    k = task.length
    for i in range(6):
        out = generate(model, b.tokens[i, :k + 1], k)  # prompt and SEP, then k tokens
        teacher = pred[i, k:2 * k]
        # the first generated token is the teacher-forced argmax; the others agree while the model was right
        assert out[0] == teacher[0]
        first_wrong = next((j for j in range(k) if teacher[j] != b.targets[i, k + j]), k)
        assert torch.equal(out[:first_wrong + 1][:k], teacher[:first_wrong + 1][:k])
    with pytest.raises(ValueError, match="1D prompt"):
        generate(model, b.tokens[:2], 3)


@pytest.mark.parametrize("dev", DEVICES)
def test_device_agnostic(dev):
    task = T.SequenceTask("sort", vocab=6, length=4, min_length=2)
    model = small(task, "bn")
    train_lm(model, task, steps=3, batch_size=8, seed=0, dev=dev)
    assert next(model.parameters()).device.type == dev
    b = task.sample(4, gen(1))
    for s in ("batch", "prefix", "running"):
        assert token_losses(model, b, s).device.type == dev
    assert generate(model, b.tokens[0, :5], 4).shape == (4,)


# ---------------------------------------------------------------------------------------------- fluctuation probe

def _deviation(rows, layer):
    var, mean = torch.var_mean(rows.double(), 0, correction=0)
    rm, rv = layer.running_mean.double(), layer.running_var.double()
    return ((mean - rm) ** 2 / rv).mean().item(), ((var / rv - 1) ** 2).mean().item()


def test_batch_stat_probe_sequence_bn():
    torch.manual_seed(0)
    layer = SequenceBatchNorm(4)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
        layer.running_var.copy_(torch.tensor([1.0, 2.0, 0.5, 4.0]))
    x = torch.randn(3, 5, 4) * 2 + 1
    mask = torch.rand(3, 5, generator=gen(1)) > 0.3
    expected = _deviation(x[mask], layer)  # the running statistics before this batch's update
    with BatchStatProbe(layer) as probe:
        layer(x, mask)
        layer.eval()
        layer(x, mask)  # evaluation passes are not recorded
        layer.train()
        with probe.recording(7):
            layer(x)  # no mask: every position
    assert probe.steps == [0, 7]
    assert probe.mean_dev[0] == pytest.approx(expected[0], rel=1e-6)
    assert probe.var_dev[0] == pytest.approx(expected[1], rel=1e-6)
    assert not probe.attached and probe.to_dict()["mean_dev"] == probe.mean_dev
    with pytest.raises(ValueError, match="running statistics"):
        BatchStatProbe(torch.nn.LayerNorm(4))


def test_batch_stat_probe_bn2d_and_training_loops():
    layer = bnlib.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5, generator=gen(2)) * 3
    probe = BatchStatProbe(layer)
    expected = _deviation(x.transpose(0, 1).reshape(3, -1).T, layer)
    layer(x)
    assert probe.mean_dev[0] == pytest.approx(expected[0], rel=1e-6)
    assert probe.var_dev[0] == pytest.approx(expected[1], rel=1e-6)
    probe.remove()
    task = T.SequenceTask("copy", vocab=6, length=4)
    model = small(task, "bn")
    probe = BatchStatProbe(model.blocks[0].norm1, active=False)
    train_lm(model, task, steps=6, batch_size=4, seed=0, probes=[probe], probe_every=2, dev="cpu")
    assert probe.steps == [0, 2, 4] and not probe.active
    assert all(v > 0 for v in probe.mean_dev + probe.var_dev)

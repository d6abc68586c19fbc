"""Tests of bnlib.lab.sequences (the RNN of the chapter "Limitations and alternatives")."""

import torch

from bnlib.lab import sequences as sq


def test_pad_to_lengths_zeroes_the_tail():
    x = torch.rand(3, 1, 5, 4) + 1
    lengths = torch.tensor([5, 2, 1])
    p = sq.pad_to_lengths(x, lengths)
    assert p.shape == (3, 5, 4)
    for i, L in enumerate(lengths.tolist()):
        assert torch.equal(p[i, :L], x[i, 0, :L])
        assert torch.all(p[i, L:] == 0)


def test_output_ignores_padding_for_ln_and_masked_bn_in_eval():
    torch.manual_seed(0)
    x = torch.randn(6, 7, 3)
    lengths = torch.tensor([7, 3, 5, 2, 7, 4])
    for norm, kw in [("ln", {}), ("none", {}), ("bn", {"masked_stats": True})]:
        m = sq.NormRNN(input_size=3, hidden_size=8, norm=norm, max_steps=7, **kw)
        m.train()
        m(x, lengths)  # one training pass to fill running statistics
        m.eval()
        noisy = x.clone()
        noisy[torch.arange(7)[None, :] >= lengths[:, None]] = 100.0  # garbage in the padding
        assert torch.allclose(m(sq.pad_to_lengths(x, lengths), lengths), m(noisy, lengths), atol=1e-6)


def test_step_batchnorm_statistics_per_step_and_masking():
    torch.manual_seed(0)
    bn = sq.StepBatchNorm(4, max_steps=3, masked=True, momentum=1.0)
    a = torch.randn(5, 4)
    mask = torch.tensor([True, True, True, False, False])
    y = bn(a, 1, mask)
    real = a[:3]
    var, mean = torch.var_mean(real, 0, correction=0)
    assert torch.allclose(y[:3], (real - mean) / torch.sqrt(var + bn.eps), atol=1e-5)
    assert torch.allclose(bn.running_mean[1], mean)
    assert torch.allclose(bn.running_var[1], var * 3 / 2)
    assert bn.steps_tracked.tolist() == [0, 1, 0]
    # naive: the padded rows enter the statistics
    naive = sq.StepBatchNorm(4, max_steps=3, masked=False, momentum=1.0)
    naive(a, 1, mask)
    assert torch.allclose(naive.running_mean[1], a.mean(0))
    # evaluation beyond the tracked steps reuses the last tracked step's statistics
    bn.eval()
    assert bn._stat_step(2) == 1 and bn._stat_step(10) == 1
    assert torch.allclose(bn(a, 2), bn(a, 1))


def test_rnn_trains_and_evaluates():
    torch.manual_seed(0)
    x = torch.rand(64, 1, 6, 5)
    y = (x[:, 0, :, 0].sum(1) > 3).long()
    m = sq.NormRNN(input_size=5, hidden_size=8, num_classes=2, norm="bn", max_steps=6)
    losses = sq.train_sequence(m, x, y, steps=5, batch_size=16, lengths=(3, 6), device="cpu")
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    acc = sq.evaluate_sequence(m, x, y, train_mode=True, batch_size=16)
    assert 0.0 <= acc <= 1.0
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # train-mode eval restores stats
    assert m.training

"""Tests of bnlib.lab.sequences: row-by-row MNIST, padding and the recurrent classifier."""

import pytest
import torch

from bnlib.lab import sequences, training


def test_pad_to_lengths_zeroes_the_tail():
    x = torch.rand(3, 1, 5, 4) + 1
    lengths = torch.tensor([5, 2, 1])
    p = sequences.pad_to_lengths(x, lengths)
    assert p.shape == (3, 5, 4)
    for i, n in enumerate(lengths.tolist()):
        assert torch.equal(p[i, :n], x[i, 0, :n])
        assert torch.all(p[i, n:] == 0)


def test_output_ignores_padding_for_ln_and_masked_bn_in_eval():
    torch.manual_seed(0)
    x = torch.randn(6, 7, 3)
    lengths = torch.tensor([7, 3, 5, 2, 7, 4])
    for norm, kw in [("ln", {}), ("none", {}), ("bn", {"masked_stats": True}), ("bn-input", {"masked_stats": True})]:
        m = sequences.NormRNN(input_size=3, hidden_size=8, norm=norm, max_steps=7, **kw)
        m.train()
        m(x, lengths)  # one training pass to fill running statistics
        m.eval()
        noisy = x.clone()
        noisy[torch.arange(7)[None, :] >= lengths[:, None]] = 100.0  # garbage in the padding
        assert torch.allclose(m(sequences.pad_to_lengths(x, lengths), lengths), m(noisy, lengths), atol=1e-6)


def test_recurrent_bn_is_cooijmans_form():
    m = sequences.NormRNN(input_size=3, hidden_size=8, norm="bn", max_steps=5)
    assert m.norm_x is not m.norm_h  # separate statistics for W_x x and W_h h
    assert torch.equal(m.norm_x.weight, torch.full((8,), 0.1)) and m.norm_x.bias is None
    assert m.bias is not None and m.norm is None
    laurent = sequences.NormRNN(input_size=3, hidden_size=8, norm="bn-input", max_steps=5)
    assert laurent.norm_h is None and laurent.norm_x is not None
    ln = sequences.NormRNN(input_size=3, hidden_size=8, norm="ln")
    assert ln.bias is None and ln.norm is not None
    with pytest.raises(ValueError, match="norm must be"):
        sequences.NormRNN(norm="gn")


def test_the_input_term_is_normalized_per_step():
    torch.manual_seed(0)
    m = sequences.NormRNN(input_size=3, hidden_size=4, norm="bn", max_steps=6)
    m.norm_x.momentum = 1.0
    x = torch.randn(16, 6, 3) * torch.arange(1, 7).view(1, 6, 1)  # the scale grows with the step
    m(x)
    assert m.norm_x.steps_tracked.tolist() == [1] * 6
    assert m.norm_x.running_var[5].mean() > 4 * m.norm_x.running_var[0].mean()


def test_fit_trains_sequences_with_padded_batches_and_evaluates_tuples():
    torch.manual_seed(0)
    x = torch.rand(64, 1, 6, 5)
    y = (x[:, 0, :, 0].sum(1) > 3).long()
    m = sequences.NormRNN(input_size=5, hidden_size=8, num_classes=2, norm="bn", max_steps=6)
    lengths = sequences.random_lengths(64, 3, 6, torch.Generator().manual_seed(1))
    test = ((sequences.pad_to_lengths(x, lengths), lengths), y)
    hist = training.fit(m, ((x, y), test), steps=5, batch_size=16, optimizer="adam", lr=1e-3, clip_grad_norm=1.0, eval_every=5,
                        batches=sequences.padded_batches(x, y, 16, 3, 6), device="cpu")
    assert len(hist.test_acc) == 2 and all(torch.isfinite(torch.tensor(hist.train_loss)))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    acc = training.evaluate(m, *test, batch_size=16, train_mode=True)
    assert 0.0 <= acc <= 1.0
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # train-mode eval restores stats


def test_padded_batches_draw_fresh_lengths():
    x, y = torch.rand(20, 4, 3), torch.arange(20)
    source = sequences.padded_batches(x, y, 5, 1, 4)
    g = torch.Generator().manual_seed(0)
    (xb, lb), yb = source(0, g)
    assert xb.shape == (5, 4, 3) and lb.shape == (5,) and yb.shape == (5,)
    assert all(torch.all(xb[i, n:] == 0) for i, n in enumerate(lb.tolist()))
    assert torch.equal(xb[0, :lb[0]], x[yb[0], :lb[0]])

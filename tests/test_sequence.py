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
    hist = training.fit(m, ((x, y), test), steps=5, batch_size=16, optimizer="adam", lr=1e-3, clip_grad_norm=1.0,
                        eval_every=5,
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


def test_lstm_without_normalization_is_torchs_lstm():
    torch.manual_seed(0)
    m = sequences.NormRNN(input_size=3, hidden_size=5, num_classes=4, norm="none", cell="lstm")
    ref = torch.nn.LSTM(3, 5, batch_first=True)
    i, f, o, g = (slice(k * 5, (k + 1) * 5) for k in range(4))  # NormRNN's gate order; torch's is i, f, g, o
    with torch.no_grad():
        ref.weight_ih_l0.copy_(torch.cat([m.inp.weight[s] for s in (i, f, g, o)]))
        ref.weight_hh_l0.copy_(torch.cat([m.rec.weight[s] for s in (i, f, g, o)]))
        ref.bias_ih_l0.copy_(torch.cat([m.bias[s] for s in (i, f, g, o)]))
        ref.bias_hh_l0.zero_()
    x = torch.randn(7, 6, 3)
    out, _ = ref(x)
    assert torch.allclose(m(x), m.head(out[:, -1]), atol=1e-6)
    assert m.bias[f].min() > 1 - 5 ** -0.5 and m.bias[i].abs().max() <= 5 ** -0.5  # forget bias 1 + torch's init


def test_lstm_normalizations_are_cooijmans_and_ba_forms():
    bn = sequences.NormRNN(input_size=3, hidden_size=8, norm="bn", max_steps=5, cell="lstm")
    assert bn.norm_x.num_features == bn.norm_h.num_features == 32 and bn.norm_x is not bn.norm_h
    assert bn.norm_c.num_features == 8 and bn.norm_c.bias is not None  # BN of the cell state, with β
    assert all(torch.equal(n.weight, torch.full_like(n.weight, 0.1)) for n in (bn.norm_x, bn.norm_h, bn.norm_c))
    assert bn.norm_x.bias is None and bn.norm_h.bias is None and bn.bias is not None
    ln = sequences.NormRNN(input_size=3, hidden_size=8, norm="ln", cell="lstm")
    assert isinstance(ln.norm_x, torch.nn.LayerNorm) and ln.norm_x.normalized_shape == (32,)
    assert ln.norm_x.bias is None and ln.norm_h.bias is None and ln.norm_c.bias is not None and ln.norm is None
    with pytest.raises(ValueError, match="cell must be"):
        sequences.NormRNN(cell="gru")


def test_lstm_ignores_padding_and_freezes_its_state():
    torch.manual_seed(0)
    x = torch.randn(6, 7, 3)
    lengths = torch.tensor([7, 3, 5, 2, 7, 4])
    for norm, kw in [("none", {}), ("ln", {}), ("bn", {"masked_stats": True})]:
        m = sequences.NormRNN(input_size=3, hidden_size=8, norm=norm, max_steps=7, cell="lstm", **kw)
        m.train()
        m(x, lengths)
        m.eval()
        noisy = x.clone()
        noisy[torch.arange(7)[None, :] >= lengths[:, None]] = 100.0
        out = m(noisy, lengths)
        assert torch.allclose(m(sequences.pad_to_lengths(x, lengths), lengths), out, atol=1e-6)
        short = torch.stack([m(x[i:i + 1, :n])[0] for i, n in enumerate(lengths.tolist())])  # each cut to its length
        assert torch.allclose(out, short, atol=1e-5)


def test_lstm_bn_tracks_statistics_for_every_step_of_all_three_terms():
    torch.manual_seed(0)
    m = sequences.NormRNN(input_size=3, hidden_size=4, norm="bn", max_steps=6, cell="lstm")
    m(torch.randn(16, 6, 3))
    for layer in (m.norm_x, m.norm_h, m.norm_c):
        assert layer.steps_tracked.tolist() == [1] * 6

"""Tests of bnlib.lab.probes on tiny models whose recorded values are known."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from bnlib.lab.probes import (GradNormProbe, HistogramProbe, PercentileProbe, SaturationProbe, grad_norms,
                          quantiles)
from bnlib.lab.training import fit, seed_everything




def fixed_linear():
    """Linear(1 -> 2) computing (x, 2x)."""
    lin = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0], [2.0]]))
    return lin


def test_quantiles_match_numpy():
    x = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(0))
    q = [0, 15, 50, 85, 100]
    assert np.allclose(quantiles(x, q), np.percentile(x.numpy(), q), atol=1e-6)


def test_percentile_probe_known_values():
    lin = fixed_linear()
    x = torch.arange(101.0).unsqueeze(1)            # column 0 = 0..100, column 1 = 0..200
    with PercentileProbe(lin, unit=1) as p1, PercentileProbe(lin) as pall:
        lin(x)
        with torch.no_grad():
            lin(x)
    assert p1.steps == [0, 1]
    assert np.allclose(p1.values, [[30, 100, 170]] * 2)
    both = np.concatenate([np.arange(101.0), 2 * np.arange(101.0)])
    assert np.allclose(pall.values[0], np.percentile(both, [15, 50, 85]))
    steps, values = p1.array()
    assert steps.shape == (2,) and values.shape == (2, 3)
    json.dumps(p1.to_dict())
    # Detached on exit: no hook left, records kept.
    assert not lin._forward_hooks and not p1.attached
    lin(x)
    assert len(p1.steps) == 2


def test_percentile_probe_conv_channel_and_switches():
    conv = nn.Identity()
    x = torch.zeros(2, 3, 4, 4)
    x[:, 1] = torch.arange(32.0).view(2, 4, 4)      # channel 1 holds 0..31
    p = PercentileProbe(conv, unit=1, q=(50,), active=False)
    conv(x)
    assert p.steps == []                             # inactive: nothing recorded
    with p.recording(step=7):
        conv(x)
    assert p.steps == [7] and np.allclose(p.values, [[15.5]]) and not p.active
    p.reset()
    assert p.steps == [] and p.values == [] and p.q == [50.0]
    p.remove()
    p.remove()                                       # twice is fine
    assert not conv._forward_hooks


def test_histogram_probe_counts():
    ident = nn.Identity()
    with HistogramProbe(ident, bins=4, range=(0.0, 4.0)) as h:
        ident(torch.tensor([0.5, 1.5, 1.6, 3.9, 10.0]))
    assert h.counts == [[1, 2, 0, 1]] and h.total == [5]
    assert np.allclose(h.edges[0], [0, 1, 2, 3, 4])
    with HistogramProbe(ident, bins=2, range=None) as h2:
        ident(torch.tensor([-1.0, 0.0, 1.0]))
    assert sum(h2.counts[0]) == 3 and h2.edges[0][0] == -1.0 and h2.edges[0][-1] == 1.0
    json.dumps(h2.to_dict())


def test_saturation_probe_thresholds():
    sig, tanh, relu = nn.Sigmoid(), nn.Tanh(), nn.ReLU()
    with SaturationProbe(sig) as s, SaturationProbe(tanh, kind="tanh") as t, \
            SaturationProbe(relu, kind="relu") as r:
        sig(torch.tensor([-5.0, -1.0, 0.0, 1.0, 5.0]))   # sigmoid(±5) is saturated
        tanh(torch.tensor([-3.0, 0.0, 3.0]))              # |tanh(3)| = 0.995 > 0.98
        relu(torch.tensor([-1.0, 0.0, 2.0, 3.0]))
    assert s.fraction == pytest.approx([0.4])
    assert t.fraction == pytest.approx([2 / 3])
    assert r.fraction == pytest.approx([0.5])
    with pytest.raises(ValueError):
        SaturationProbe(sig, kind="softsign")


def test_grad_norms_and_probe_agree():
    seed_everything(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x = torch.randn(5, 4)
    probe = GradNormProbe(model)
    model(x).pow(2).sum().backward()
    expected = grad_norms(model)
    assert set(expected) == {"0", "2"}
    manual = torch.cat([model[0].weight.grad.flatten(), model[0].bias.grad]).norm().item()
    assert expected["0"] == pytest.approx(manual)
    model.zero_grad()
    model(x).pow(2).sum().backward()                 # a second pass: a second record
    d = probe.to_dict()
    assert d["steps"] == [0, 1]
    assert d["norms"]["0"] == pytest.approx([manual, manual])
    json.dumps(d)
    probe.remove()
    model(x).pow(2).sum().backward()
    assert probe.steps == [0, 1]                     # hooks gone


def test_fit_switches_probes_on_every_k_steps():
    seed_everything(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 2))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(100, 4, generator=g), torch.randint(0, 2, (100,), generator=g)
    pct = PercentileProbe(model[0], unit=3)
    sat = SaturationProbe(model[1])
    grads = GradNormProbe(model)
    fit(model, ((x, y), (x, y)), steps=20, batch_size=10, eval_every=10,
        probes=[pct, sat, grads], probe_every=5, device="cpu")
    for p in (pct, sat, grads):
        assert p.to_dict()["steps"] == [0, 5, 10, 15]   # evaluation passes are not recorded
        assert p.active                                   # restored
        p.remove()
    assert len(grads.norms["0"]) == 4


def test_plots_of_probe_records():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from bnlib.lab.plots import plot_histograms, plot_percentiles

    ident = nn.Identity()
    with PercentileProbe(ident) as p, HistogramProbe(ident, bins=10) as h:
        for step in range(3):
            with p.recording(step), h.recording(step):
                ident(torch.randn(50) * (step + 1))
    ax = plot_percentiles(p, label="BN")
    assert len(ax.lines) == 1 and len(ax.collections) == 1
    fig = plot_histograms({"layer 1": h, "layer 2": [(c, e) for c, e in zip(h.counts, h.edges)]},
                          col_labels=["a", "b", "c"])
    assert len(fig.axes) == 6
    plt.close("all")

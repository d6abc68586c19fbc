"""Tests of bnlib.lab.probes on tiny models whose recorded values are known."""

import json

import matplotlib
import numpy as np
import torch
import torch.nn as nn

from bnlib.lab.probes import PercentileProbe, quantiles
from bnlib.lab.training import fit, seed_everything

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the non-interactive backend

from bnlib.lab.plots import plot_histograms, plot_percentiles  # noqa: E402


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


def test_fit_switches_probes_on_every_k_steps():
    seed_everything(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 2))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(100, 4, generator=g), torch.randint(0, 2, (100,), generator=g)
    pct = PercentileProbe(model[0], unit=3)
    fit(model, ((x, y), (x, y)), steps=20, batch_size=10, eval_every=10, probes=[pct], probe_every=5, device="cpu")
    assert pct.to_dict()["steps"] == [0, 5, 10, 15]   # evaluation passes are not recorded
    assert pct.active                                  # restored
    assert len(pct.values) == 4 and all(len(v) == 3 for v in pct.values)
    pct.remove()


def test_plots_of_probe_records():
    ident = nn.Identity()
    with PercentileProbe(ident) as p:
        for step in range(3):
            with p.recording(step):
                ident(torch.randn(50) * (step + 1))
    ax = plot_percentiles(p, label="BN")
    assert len(ax.lines) == 1 and len(ax.collections) == 1
    steps, values = p.array()
    assert np.array_equal(ax.lines[0].get_xdata(), steps)
    assert np.allclose(ax.lines[0].get_ydata(), values[:, 1])    # the median line
    edges = np.linspace(-3, 3, 11)
    cells = [(np.histogram(np.random.default_rng(k).normal(size=100), bins=edges)[0], edges, f"step {k}")
             for k in range(3)]
    fig = plot_histograms({"layer 1": cells, "layer 2": cells[:2]}, col_labels=["a", "b", "c"])
    assert len(fig.axes) == 6 and not fig.axes[5].get_visible()  # the missing cell is hidden
    plt.close("all")

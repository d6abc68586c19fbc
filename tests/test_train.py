"""Tests of bnlib.lab.training: fit, evaluate, History, device selection."""

import math

import pytest
import torch
import torch.nn as nn

from bnlib.lab.training import History, class_subset_sampler, device, evaluate, fit, seed_everything


def blobs(n=400, n_test=200, dim=8, seed=0):
    """Two linearly separable Gaussian blobs; returns ((x, y), (x_test, y_test))."""
    g = torch.Generator().manual_seed(seed)
    def make(k):
        y = torch.randint(0, 2, (k,), generator=g)
        x = torch.randn(k, dim, generator=g) * 0.5
        x[:, 0] += (2 * y - 1).float() * 2.0
        return x, y
    return make(n), make(n_test)


def tiny_model(seed=0, norm=False):
    seed_everything(seed)
    layers = [nn.Linear(8, 16)] + ([nn.BatchNorm1d(16)] if norm else []) + [nn.Sigmoid(), nn.Linear(16, 2)]
    return nn.Sequential(*layers)


def test_fit_learns_separable_data():
    h = fit(tiny_model(), blobs(), steps=300, batch_size=20, lr=0.5, eval_every=100, device="cpu")
    assert h.final_acc > 0.9
    assert not h.diverged and h.diverged_at is None
    assert h.test_step == [0, 100, 200, 300]
    assert h.step == [100, 200, 300] and len(h.train_loss) == len(h.lr) == 3
    assert h.train_loss[-1] < h.train_loss[0]
    assert len(h.wall_time) == len(h.test_acc) and h.steps_per_s > 0
    assert h.config["steps"] == 300 and h.config["lr"] == 0.5


def test_same_seed_same_history():
    hs = [fit(tiny_model(norm=True), blobs(), steps=120, batch_size=16, eval_every=40, loss_every=10,
              momentum=0.9, seed=3, device="cpu") for _ in range(2)]
    assert hs[0].same_results(hs[1])
    other = fit(tiny_model(norm=True), blobs(), steps=120, batch_size=16, eval_every=40, loss_every=10,
                momentum=0.9, seed=4, device="cpu")
    assert not hs[0].same_results(other)


def test_divergence_is_recorded_not_raised():
    (x, _), (xt, _) = blobs()
    g = torch.Generator().manual_seed(0)
    noisy = ((x, torch.randint(0, 2, (len(x),), generator=g)), (xt, torch.randint(0, 2, (len(xt),), generator=g)))
    seed_everything(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    h = fit(model, noisy, steps=500, batch_size=20, lr=1e6, momentum=0.9, eval_every=250, device="cpu")
    assert h.diverged
    assert 1 <= h.diverged_at <= 500
    assert h.step[-1] == h.diverged_at and not math.isfinite(h.train_loss[-1])
    assert h.test_step[-1] == h.diverged_at
    assert 0.0 <= h.final_acc <= 1.0


def test_epochs_and_argument_checks():
    data = blobs(n=100)
    h = fit(tiny_model(), data, epochs=2, batch_size=25, device="cpu")
    assert h.test_step[-1] == 8
    with pytest.raises(ValueError):
        fit(tiny_model(), data, device="cpu")
    with pytest.raises(ValueError):
        fit(tiny_model(), data, steps=5, epochs=1, device="cpu")
    with pytest.raises(ValueError):
        fit(tiny_model(), data, steps=5, optimizer="rmsprop-ish", device="cpu")


def test_lr_schedule_sampler_callback_and_probe_switching():
    data = blobs()
    seen = []

    def callback(step, model, hist):
        seen.append((step, model.training, len(hist.test_step)))
        return step >= 60          # stop early

    h = fit(tiny_model(), data, steps=200, batch_size=10, eval_every=50, loss_every=10,
            lr_schedule=lambda i: 0.1 if i < 30 else 0.01, callback=callback, callback_every=20,
            sampler=class_subset_sampler(data[0][1], 10, classes_per_batch=1), device="cpu")
    assert [s for s, _, _ in seen] == [0, 20, 40, 60]
    assert all(training for _, training, _ in seen)
    assert h.step[-1] == 60 and h.test_step[-1] == 60
    assert h.lr[:3] == [0.1, 0.1, 0.1] and h.lr[-1] == 0.01


def test_class_subset_sampler_draws_few_classes():
    y = torch.arange(10).repeat(20)
    sample = class_subset_sampler(y, 30, classes_per_batch=2)
    idx = sample(0, torch.Generator().manual_seed(0))
    assert idx.shape == (30,) and len(torch.unique(y[idx])) <= 2


def test_evaluate_restores_mode():
    model = tiny_model(norm=True)
    (x, y), _ = blobs()
    model.train()
    acc = evaluate(model, x, y, batch_size=64)
    assert 0.0 <= acc <= 1.0 and model.training


def test_history_json_round_trip(tmp_path):
    h = History(step=[1, 2], train_loss=[0.5, float("nan")], lr=[0.1, 0.1], test_step=[0, 2],
                test_acc=[0.1, 0.8], wall_time=[0.0, 1.0], steps_per_s=12.5, diverged=True,
                diverged_at=2, config={"lr": 0.1, "model": "MLP"})
    path = tmp_path / "h.json"
    h.to_json(path)
    back = History.from_json(path)
    assert back.same_results(h) and back.wall_time == h.wall_time and back.steps_per_s == 12.5
    assert History.from_dict(h.to_dict()).same_results(h)


def test_steps_to_reach_and_final_acc():
    h = History(test_step=[0, 10, 20, 30], test_acc=[0.1, 0.5, 0.95, 0.9])
    assert h.steps_to_reach(0.5) == 10
    assert h.steps_to_reach(0.9) == 20
    assert h.steps_to_reach(0.99) is None
    assert h.final_acc == 0.9 and History().final_acc is None


def test_device_choice_and_override(monkeypatch):
    monkeypatch.delenv("BNLIB_DEVICE", raising=False)
    auto = device()
    assert auto.type in ("cpu", "cuda", "mps")
    monkeypatch.setenv("BNLIB_DEVICE", "cpu")
    assert device() == torch.device("cpu")
    monkeypatch.setenv("BNLIB_DEVICE", "banana")
    with pytest.raises(ValueError, match="BNLIB_DEVICE"):
        device()
    monkeypatch.setenv("BNLIB_DEVICE", "tpu")
    with pytest.raises((ValueError, RuntimeError)):
        device()
    if not torch.cuda.is_available():
        monkeypatch.setenv("BNLIB_DEVICE", "cuda")
        with pytest.raises(RuntimeError, match="CUDA"):
            device()
    assert device("cpu") == torch.device("cpu")


def test_plots_of_histories():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bnlib.lab.plots import BN_COLOR, NO_BN_COLOR, plot_curves, plot_lr_sweep

    ok = History(step=[10, 20], train_loss=[1.0, 0.5], lr=[0.1, 0.1], test_step=[0, 10, 20],
                 test_acc=[0.1, 0.6, 0.9])
    bad = History(step=[10], train_loss=[float("nan")], lr=[10.0], test_step=[0, 10],
                  test_acc=[0.1, 0.098], diverged=True, diverged_at=10)
    ax = plot_curves({"BN": ok, "no BN": bad})
    colors = {line.get_color() for line in ax.lines}
    assert colors == {BN_COLOR, NO_BN_COLOR}
    plot_curves({"BN": ok}, metric="train_loss")
    ax = plot_lr_sweep({"bn": {0.1: ok, 10.0: bad}, "none": {0.1: 0.8, 1.0: 0.9}})
    assert ax.get_xscale() == "log"
    plt.close("all")

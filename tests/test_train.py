"""Tests of bnlib.lab.training: fit, evaluate, History, device selection."""

import copy
import math

import pytest
import torch
import torch.nn as nn

from bnlib.lab.training import (
    EpochOrder,
    FitInterrupted,
    History,
    Plan,
    Step,
    batch_statistics,
    class_subset_sampler,
    device,
    evaluate,
    fit,
    indexed_batches,
    seed_everything,
    train_loop,
)


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


# --------------------------------------------------------------------------
# Evaluation with batch statistics, tuple inputs, argument checks, Ctrl-C
# --------------------------------------------------------------------------

def _hand_written_train_mode_acc(model, x, y, batch_size):
    """The pattern evaluate(train_mode=True) replaces: save the state, train(), forward, restore."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    was_training = model.training
    model.train()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            correct += (model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
    model.load_state_dict(saved)
    model.train(was_training)
    return correct / len(x)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def test_evaluate_train_mode_uses_batch_statistics_and_leaves_no_trace():
    model = tiny_model(norm=True)
    fit(model, blobs(), steps=30, batch_size=20, device="cpu")
    (x, y), _ = blobs(seed=1)
    x = x + 6                                      # far from the running statistics
    model.eval()
    model[1].train()                               # a mix of modes must come back as it was
    state, modes = _snapshot(model)
    acc_batch = evaluate(model, x, y, batch_size=50, train_mode=True)
    after_state, after_modes = _snapshot(model)
    assert acc_batch == _hand_written_train_mode_acc(copy.deepcopy(model), x, y, 50)
    assert after_modes == modes
    assert all(torch.equal(state[k], after_state[k]) for k in state)
    assert acc_batch != evaluate(model, x, y, batch_size=50)      # running statistics: another number


def test_batch_statistics_restores_buffers_and_modes_even_on_error():
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 2)).eval()
    x = torch.randn(32, 8) * 4 + 2
    state, modes = _snapshot(model)
    with batch_statistics(model) as m:
        out = m(x)
        assert m[1].training and not m[2].training   # BN uses the batch, Dropout stays off
        assert not out.requires_grad
    z = (model[0](x) - model[0](x).mean(0)) / (model[0](x).var(0, unbiased=False) + 1e-5).sqrt()
    assert torch.allclose(out, model[3](z * model[1].weight + model[1].bias), atol=1e-5)
    with pytest.raises(RuntimeError, match="boom"), batch_statistics(model):
        model(x)
        raise RuntimeError("boom")
    after_state, after_modes = _snapshot(model)
    assert after_modes == modes and all(torch.equal(state[k], after_state[k]) for k in state)
    assert torch.is_grad_enabled()


class LengthModel(nn.Module):
    """Mean of the first ``lengths[i]`` rows of sequence i, then a linear layer: needs (x, lengths)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 2)

    def forward(self, x, lengths):
        keep = (torch.arange(x.shape[1])[None, :] < lengths[:, None]).float()
        mean = (x * keep[..., None]).sum(1) / lengths[:, None].float()
        return self.out(self.norm(mean))


def sequence_blobs(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    lengths = torch.randint(1, 6, (n,), generator=g)
    x = torch.randn(n, 5, 4, generator=g)
    x[:, :, 0] += (2 * y - 1).float()[:, None] * 1.5
    x[torch.arange(5)[None, :] >= lengths[:, None]] = 100.0    # padding that must be ignored
    return (x, lengths), y


def test_fit_and_evaluate_accept_tuple_inputs():
    seed_everything(0)
    model = LengthModel()
    train, test = sequence_blobs(), sequence_blobs(seed=1)
    h = fit(model, (train, test), steps=60, batch_size=20, lr=0.2, eval_every=30, device="cpu")
    assert h.final_acc > 0.9
    assert evaluate(model, *test) == h.final_acc
    assert evaluate(model, *test, batch_size=7, train_mode=True) > 0.8
    with pytest.raises(ValueError, match="part 1 has shape"):
        evaluate(model, (test[0][0], test[0][1][:-1]), test[1])


def test_fit_custom_batches_and_clipping():
    data = blobs()
    (x, y), _ = data
    calls = []

    def batches(step, gen):
        calls.append(step)
        idx = torch.randint(len(x), (10,), generator=gen)
        return x[idx] * 0.5, y[idx]

    h = fit(tiny_model(), data, steps=40, batches=batches, clip_grad_norm=0.1, eval_every=20, device="cpu")
    assert calls == list(range(40)) and h.test_step == [0, 20, 40]
    model = tiny_model()
    step_sizes = []
    fit(model, data, steps=5, lr=1.0, clip_grad_norm=1e-3, eval_every=5, device="cpu",
        callback=lambda s, m, hh: step_sizes.append([p.detach().clone() for p in m.parameters()]),
        callback_every=1)
    for before, after in zip(step_sizes, step_sizes[1:]):
        moved = torch.cat([(a - b).flatten() for a, b in zip(after, before)]).norm()
        assert moved <= 1e-3 * (1 + 1e-4)       # lr · ‖g‖ with ‖g‖ clipped to 1e-3


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=5, batch_size=0), "batch_size must be a positive integer, got 0"),
    (dict(steps=5, batch_size=-3), "batch_size must be a positive integer"),
    (dict(steps=5, batch_size=2.5), "batch_size must be a positive integer"),
    (dict(steps=0), "steps must be a positive integer"),
    (dict(epochs=float("nan")), "epochs must be a finite number"),
    (dict(steps=5, lr=float("nan")), "lr must be a finite number"),
    (dict(steps=5, lr=float("inf")), "lr must be a finite number"),
    (dict(steps=5, lr=-0.1), "lr must be a finite number >= 0"),
    (dict(steps=5, momentum=float("nan")), "momentum must be"),
    (dict(steps=5, eval_every=0), "eval_every must be a positive integer"),
    (dict(steps=5, max_eval=0), "max_eval must be a positive integer"),
    (dict(steps=5, optimizer="rmsprop-ish"), "unknown optimizer"),
    (dict(steps=5, clip_grad_norm=0.0), "clip_grad_norm must be positive"),
    (dict(steps=5, batch_size=1000), "exceeds the 400 training examples"),
])
def test_fit_refuses_bad_arguments_up_front(kwargs, message):
    model = tiny_model()
    before = _snapshot(model)[0]
    with pytest.raises(ValueError, match=message):
        fit(model, blobs(), device="cpu", **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # nothing ran


def test_fit_refuses_bad_data_up_front():
    (x, y), test = blobs()
    with pytest.raises(ValueError, match=r"shape \(399, 8\) but there are 400 labels"):
        fit(tiny_model(), ((x[:-1], y), test), steps=5, device="cpu")
    with pytest.raises(ValueError, match="training set is empty.*sampler"):
        fit(tiny_model(), ((x[:0], y[:0]), test), steps=5, device="cpu", sampler=lambda i, g: torch.zeros(4).long())
    with pytest.raises(ValueError, match="test set is empty"):
        fit(tiny_model(), ((x, y), (x[:0], y[:0])), steps=5, device="cpu")
    with pytest.raises(ValueError, match=r"data must be \(\(x_train, y_train\), \(x_test, y_test\)\)"):
        fit(tiny_model(), (x, y), steps=5, device="cpu")
    with pytest.raises(ValueError, match="at most one of sampler= and batches="):
        fit(tiny_model(), ((x, y), test), steps=5, device="cpu", sampler=lambda i, g: None,
            batches=lambda i, g: None)


def test_ctrl_c_keeps_the_partial_history():
    def callback(step, model, hist):
        if step == 30:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        fit(tiny_model(), blobs(), steps=100, batch_size=20, eval_every=20, loss_every=5,
            callback=callback, callback_every=10, device="cpu")
    assert isinstance(info.value, FitInterrupted)
    h = info.value.history
    assert h.interrupted and not h.diverged
    assert h.step == [5, 10, 15, 20, 25, 30] and len(h.train_loss) == 6
    assert h.test_step == [0, 20] and h.steps_per_s > 0
    assert History.from_dict(h.to_dict()).interrupted


def test_train_loop_stops_when_any_replica_diverges():
    """Data-parallel runs pass ``any_replica`` (an all-reduce): one replica's divergence stops them all."""
    (x, y), (xt, yt) = blobs()
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = indexed_batches((x,), y, EpochOrder(len(x), 20, torch.Generator().manual_seed(0), x.device))
    plan = Plan(total=100, eval_every=100, loss_every=10, check_every=10)
    votes = []

    def other_replica_diverged_at_30(flag):
        votes.append(flag)
        return len(votes) == 3

    h = train_loop(model, batches, Step(model, opt), plan, lambda m: evaluate(m, xt, yt), History(),
                   any_replica=other_replica_diverged_at_30)
    assert votes == [False, False, False]
    assert h.diverged and h.diverged_at == 30 and h.step == [10, 20, 30] and h.test_step == [0, 30]


def test_option_groups_equal_the_plain_keywords():
    from bnlib.lab.training import Hooks, Optim, Recording, Sampling
    plain = fit(tiny_model(norm=True), blobs(), steps=60, batch_size=16, lr=0.2, momentum=0.9, eval_every=20,
                loss_every=10, seed=2, device="cpu")
    grouped = fit(tiny_model(norm=True), blobs(), steps=60, optim=Optim(lr=0.2, momentum=0.9),
                  sampling=Sampling(batch_size=16, seed=2), recording=Recording(eval_every=20, loss_every=10),
                  hooks=Hooks(progress=False), device="cpu")
    assert plain.same_results(grouped)
    mixed = fit(tiny_model(norm=True), blobs(), steps=60, optim=Optim(lr=5.0, momentum=0.9), lr=0.2,
                sampling=Sampling(batch_size=16, seed=2), eval_every=20, loss_every=10, device="cpu")
    assert plain.same_results(mixed)  # a plain keyword overrides the field of the group given
    with pytest.raises(TypeError, match="unexpected keyword argument 'learning_rate'"):
        fit(tiny_model(), blobs(), steps=5, learning_rate=0.1, device="cpu")
    with pytest.raises(TypeError, match="optim= must be a Optim"):
        fit(tiny_model(), blobs(), steps=5, optim=Sampling(), device="cpu")


def test_keep_eval_holds_chosen_bn_layers_in_eval_mode():
    data = blobs()
    model = tiny_model(norm=True)
    bn = model[1]
    mean0, count0 = bn.running_mean.clone(), int(bn.num_batches_tracked)
    seen = []
    h = fit(model, data, steps=30, batch_size=10, eval_every=10, keep_eval=True, device="cpu",
            callback=lambda step, m, hist: seen.append((m.training, m[1].training)), callback_every=10)
    assert seen == [(True, False)] * 4                  # the rest trains, the BN layer is held in eval mode
    assert torch.equal(bn.running_mean, mean0) and int(bn.num_batches_tracked) == count0   # never updated
    assert not torch.equal(bn.weight, torch.ones_like(bn.weight))                         # gamma still learns
    assert model.training and not bn.training and h.config["keep_eval"] == ["1"]
    # by name or by module; the same run as holding every BN layer
    for by_name in (True, False):
        again = tiny_model(norm=True)
        keep = ["1"] if by_name else [again[1]]
        h2 = fit(again, data, steps=30, batch_size=10, eval_every=10, keep_eval=keep, device="cpu")
        assert h2.same_results(h)
    with pytest.raises(ValueError, match="not a submodule"):
        fit(tiny_model(norm=True), data, steps=5, keep_eval=[nn.BatchNorm1d(16)], device="cpu")
    with pytest.raises(ValueError, match="'9'"):
        fit(tiny_model(norm=True), data, steps=5, keep_eval=["9"], device="cpu")
    with pytest.raises(TypeError, match="keep_eval"):
        fit(tiny_model(norm=True), data, steps=5, keep_eval=model[1], device="cpu")


@pytest.mark.parametrize("where, labels", [("training", lambda y: y * 3), ("test", lambda y: y - 1),
                                          ("training", lambda y: y.float() + 0.5)])
def test_fit_checks_labels_before_the_first_update(where, labels):
    (x, y), (xt, yt) = blobs()
    data = ((x, labels(y)), (xt, yt)) if where == "training" else ((x, y), (xt, labels(yt)))
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=f"the {where} labels"):
        fit(model, data, steps=5, batch_size=10, device="cpu")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())   # nothing ran


def test_fit_accepts_whole_float_labels_and_checks_leave_no_trace():
    (x, y), (xt, yt) = blobs()
    runs = [fit(tiny_model(norm=True), ((x, y_), (xt, yt)), steps=20, batch_size=10, device="cpu")
            for y_ in (y, y.float())]
    assert runs[0].same_results(runs[1]) and runs[0].config["n_train"] == len(y)


@pytest.mark.parametrize("n", [201, 101, 1])
def test_evaluate_train_mode_merges_a_last_batch_of_one(n):
    model = tiny_model(norm=True)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 8, generator=g), torch.randint(0, 2, (n,), generator=g)
    if n == 1:   # one example in all has no batch statistics: BN's own error
        with pytest.raises(ValueError):
            evaluate(model, x, y, batch_size=100, train_mode=True)
        return
    acc = evaluate(model, x, y, batch_size=100, train_mode=True)
    with batch_statistics(model):   # the same batches by hand: the last two examples normalized together
        logits = [model(x[i:j]) for i, j in ([(0, 101)] if n == 101 else [(0, 100), (100, 201)])]
    expected = (torch.cat(logits).argmax(1) == y).sum().item() / n
    assert acc == pytest.approx(expected, abs=1e-12)


def test_training_exports_the_pieces_from_their_modules():
    from bnlib.lab import evaluation, loop, record, runtime, samplers, training
    for module in (runtime, record, evaluation, samplers, loop):
        for name in module.__all__:
            if name != "Batch":
                assert getattr(training, name) is getattr(module, name), (module.__name__, name)
    old = ["device", "seed_everything", "History", "fit", "FitInterrupted", "evaluate", "batch_statistics",
           "class_subset_sampler", "train_loop", "Plan", "Step", "EpochOrder", "indexed_batches"]
    assert set(old) <= set(training.__all__)

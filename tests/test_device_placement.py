"""Device placement: nothing in bnlib's forward and backward passes may create tensors on the CPU.

CUDA refuses arithmetic between a CUDA tensor and a CPU tensor (0-dim CPU scalars aside). So does
PyTorch's ``meta`` device, which holds shapes but no data, so running the layers and models on
``meta`` catches a stray CPU tensor on a machine without a GPU. (Code that reads values, e.g.
``.item()``, cannot run on ``meta``; it is exercised on every available device by the second part.)
"""

import pytest
import torch
import torch.nn.functional as F

import bnlib
from bnlib import functional as BF
from bnlib import running_stats
from bnlib import variants as V
from bnlib.distributed import SyncBatchNorm
from bnlib.fold import fold_batchnorm
from bnlib.lab import landscape, models, probes
from bnlib.lab import sequences as sequence
from bnlib.lab.training import evaluate, fit

META = torch.device("meta")


def _train_and_eval(module, shape, dtype=torch.float32):
    """Forward + backward in training mode, then forward in eval mode, all on ``meta``."""
    module = module.to(META)
    x = torch.randn(*shape, device=META, dtype=dtype, requires_grad=True)
    module.train()
    y = module(x)
    assert y.device == META and y.shape[0] == shape[0]
    y.float().sum().backward()
    assert x.grad is not None and x.grad.device == META
    module.eval()
    with torch.no_grad():
        assert module(x).device == META


LAYERS = [
    (lambda: bnlib.BatchNorm1d(4), (8, 4)),
    (lambda: bnlib.BatchNorm1d(4), (8, 4, 5)),
    (lambda: bnlib.BatchNorm2d(4, bias=False), (8, 4, 3, 3)),
    (lambda: bnlib.BatchNorm3d(4, affine=False), (8, 4, 2, 3, 3)),
    (lambda: bnlib.BatchNorm2d(4, track_running_stats=False), (8, 4, 3, 3)),
    (lambda: SyncBatchNorm(4), (8, 4, 3, 3)),  # no process group: plain BN
    (lambda: V.LayerNorm((4, 3, 3)), (8, 4, 3, 3)),
    (lambda: V.GroupNorm(2, 4), (8, 4, 3, 3)),
    (lambda: V.InstanceNorm2d(4, affine=True, track_running_stats=True), (8, 4, 3, 3)),
    (lambda: V.BatchRenorm2d(4, r_max=3.0, d_max=5.0), (8, 4, 3, 3)),
    (lambda: V.GhostBatchNorm1d(4, virtual_batch_size=2), (8, 4)),
    (lambda: V.BatchLayerNorm(4), (8, 4, 3, 3)),
    (lambda: landscape.NoisyShift(4), (8, 4)),
]


@pytest.mark.parametrize("make, shape", LAYERS, ids=[f"{type(m()).__name__}-{len(s)}d" for m, s in LAYERS])
def test_layers_create_no_cpu_tensors(make, shape):
    _train_and_eval(make(), shape)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_batch_norm_dtypes_create_no_cpu_tensors(dtype):
    _train_and_eval(bnlib.BatchNorm2d(4), (8, 4, 3, 3), dtype)
    _train_and_eval(V.GroupNorm(2, 4), (8, 4, 3, 3), dtype)


def test_double_backward_creates_no_cpu_tensors():
    x = torch.randn(8, 4, device=META, requires_grad=True)
    w = torch.ones(4, device=META, requires_grad=True)
    y = BF.batch_norm(x, None, None, w, None, training=True)
    (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    g.sum().backward()
    assert w.grad.device == META


@pytest.mark.parametrize("norm", ["none", "bn", "bn-torch", "ln", "gn", "brn", "bln"])
def test_models_create_no_cpu_tensors(norm):
    _train_and_eval(models.MLP(norm=norm), (8, 1, 28, 28))
    _train_and_eval(models.CNN(channels=(4, 8), norm=norm), (8, 1, 28, 28))
    _train_and_eval(models.ResNet(width=4, blocks_per_stage=1, norm=norm), (8, 1, 28, 28))


@pytest.mark.parametrize("norm", [None, "ln", "bn"])
def test_rnn_with_cpu_lengths_creates_no_cpu_tensors(norm):
    rnn = sequence.NormRNN(input_size=5, hidden_size=6, norm=norm, max_steps=7).to(META)
    x = torch.randn(4, 7, 5, device=META)
    lengths = torch.tensor([7, 3, 5, 1])  # on the CPU, as random_lengths makes them
    out = rnn(sequence.pad_to_lengths(x, lengths), lengths)
    out.sum().backward()
    assert out.device == META and rnn.inp.weight.grad.device == META


# ------------------------------------------------------------------------------------------------------------
# The library's helpers on every available device (CPU always, CUDA when present)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _tiny_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return (x, y), (x[:32], y[:32])


@pytest.mark.parametrize("device", DEVICES)
def test_training_helpers_on_device(device):
    torch.manual_seed(0)
    model = models.MLP(in_features=64, widths=(8, 8), num_classes=3,
                       norm=landscape.noisy_norm("bn", shift_std=0.1))
    data = _tiny_data()
    pct = probes.PercentileProbe(model.hidden[0].norm, unit=0, active=False)
    rec = landscape.LandscapeRecorder(F.cross_entropy, (data[0][0][:16], data[0][1][:16]), [0.1, 1.0])
    h = fit(model, data, steps=6, batch_size=8, lr=0.1, eval_every=3, device=device,
            probes=[pct], probe_every=3, callback=rec, callback_every=3, progress=False)
    dev = torch.device(device)
    assert next(model.parameters()).device.type == dev.type
    assert h.test_step == [0, 3, 6] and len(pct.steps) == 2
    assert len(rec.results) == 3
    # Inputs on the CPU, model on the device.
    assert 0.0 <= evaluate(model, *data[1]) <= 1.0
    moments = running_stats.recompute_bn_stats(model, data[0][0], batch_size=16)
    assert all(m.mean.device.type == dev.type for m in moments.values())


@pytest.mark.parametrize("device", DEVICES)
def test_sequence_and_fold_on_device(device):
    torch.manual_seed(0)
    x, y = torch.rand(48, 6, 5), torch.randint(0, 3, (48,))
    rnn = sequence.NormRNN(input_size=5, hidden_size=6, num_classes=3, norm="bn", max_steps=6)
    lengths = sequence.random_lengths(48, 2, 6, torch.Generator().manual_seed(1))
    test = ((sequence.pad_to_lengths(x, lengths), lengths), y)
    hist = fit(rnn, ((x, y), test), steps=3, batch_size=8, optimizer="adam", lr=1e-3, eval_every=3,
               batches=sequence.padded_batches(x, y, 8, 2, 6), device=device)
    assert len(hist.train_loss) >= 1
    for train_mode in (False, True):
        assert 0.0 <= evaluate(rnn, *test, batch_size=16, train_mode=train_mode) <= 1.0

    cnn = models.CNN(channels=(4, 8), norm="bn").to(device)
    cnn.train()(torch.rand(16, 1, 8, 8, device=device))  # running statistics away from 0 and 1
    folded = fold_batchnorm(cnn.eval())
    xb = torch.rand(4, 1, 8, 8, device=device)
    with torch.no_grad():
        assert (folded(xb) - cnn(xb)).abs().max().item() < 1e-2  # TF32 convolutions on some GPUs

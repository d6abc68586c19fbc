"""bnlib's description of Keras's BatchNormalization (running_stats.CONVENTIONS["keras"]) against Keras itself.

Keras 3 runs on the PyTorch backend (no TensorFlow needed); the module is skipped when keras is not installed.
"""

import os

import pytest
import torch

os.environ.setdefault("KERAS_BACKEND", "torch")  # must be set before the first `import keras`
keras = pytest.importorskip("keras")

import bnlib  # noqa: E402
from bnlib import running_stats  # noqa: E402

pytestmark = pytest.mark.skipif(keras.backend.backend() != "torch", reason="needs Keras on the torch backend")


def _as_torch(v):
    return torch.as_tensor(keras.ops.convert_to_numpy(v))


def _batches(n=5, m=32, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale, shift = torch.tensor([1.0, 2.0, 0.5, 3.0])[:c], torch.tensor([0.0, 1.0, -2.0, 5.0])[:c]
    return [torch.randn(m, c, generator=g) * scale + shift for _ in range(n)]


def test_keras_defaults_match_conventions():
    layer = keras.layers.BatchNormalization()
    conv = running_stats.CONVENTIONS["keras"]
    assert layer.momentum == conv["momentum"]
    assert layer.epsilon == conv["eps"]
    assert conv["momentum_weights"] == "old"


def test_converted_bnlib_layer_matches_keras_and_stores_unbiased_variance():
    kl = keras.layers.BatchNormalization()
    bl = bnlib.BatchNorm1d(4, eps=kl.epsilon, momentum=running_stats.convert_momentum(kl.momentum, "keras", "torch"))
    mean_b, var_b = torch.zeros(4), torch.ones(4)
    for x in _batches():
        torch.testing.assert_close(_as_torch(kl(x, training=True)), bl(x).detach(), rtol=1e-5, atol=1e-5)
        running_stats.keras_style_update(mean_b, var_b, x, momentum=kl.momentum)
    torch.testing.assert_close(_as_torch(kl.moving_mean), bl.running_mean)
    torch.testing.assert_close(_as_torch(kl.moving_mean), mean_b)
    # Keras keeps the biased variance (as CONVENTIONS says), bnlib the unbiased one
    assert running_stats.CONVENTIONS["keras"]["running_var"] == "biased"
    torch.testing.assert_close(_as_torch(kl.moving_variance), var_b)
    assert (bl.running_var > _as_torch(kl.moving_variance)).all()


def test_trainable_false_is_inference_mode():
    kl = keras.layers.BatchNormalization()
    for x in _batches(n=3):
        kl(x, training=True)
    kl.trainable = False
    x = _batches(n=1, seed=1)[0]
    before = _as_torch(kl.moving_variance).clone()
    assert torch.equal(_as_torch(kl(x, training=True)), _as_torch(kl(x, training=False)))
    assert torch.equal(_as_torch(kl.moving_variance), before)

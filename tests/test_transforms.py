"""bnlib's BatchNorm under torch.func's transforms and forward-mode AD, against torch.nn (training mode)."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwad
from torch.func import grad, jacfwd, jacrev, vmap

import bnlib

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _pair(track: bool):
    ours = bnlib.BatchNorm1d(5, track_running_stats=track).double()
    theirs = torch.nn.BatchNorm1d(5, track_running_stats=track).double()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 + 1


TRANSFORMS = {
    "vmap": lambda m, x: vmap(m)(x),
    "grad": lambda m, x: grad(lambda t: (m(t) ** 3).sum())(x[0]),
    "jacrev": lambda m, x: jacrev(m)(x[0]),
    "jacfwd": lambda m, x: jacfwd(m)(x[0]),
    "vmap of grad": lambda m, x: vmap(grad(lambda t: (m(t) ** 3).sum()))(x),
}


@pytest.mark.parametrize("name", TRANSFORMS)
def test_transform_matches_torch(name):
    ours, theirs = _pair(track=False)
    x = _x(3, 8, 5)
    torch.testing.assert_close(TRANSFORMS[name](ours, x), TRANSFORMS[name](theirs, x))


@pytest.mark.parametrize("name", ["vmap", "grad", "jacrev", "jacfwd"])
def test_transform_with_running_statistics_is_refused_as_by_torch(name):
    """torch.nn refuses to update unbatched (or captured) running buffers inside a transform; so does bnlib."""
    ours, theirs = _pair(track=True)
    x = _x(3, 8, 5)
    with pytest.raises(RuntimeError):
        TRANSFORMS[name](theirs, x)
    with pytest.raises(RuntimeError):
        TRANSFORMS[name](ours, x)


@pytest.mark.parametrize("track", [False, True])
def test_forward_mode_ad_matches_torch(track):
    ours, theirs = _pair(track)
    x, tangent = _x(8, 5), _x(8, 5).flip(0)
    results = []
    for m in (ours, theirs):
        with fwad.dual_level():
            y = m(fwad.make_dual(x, tangent))
            primal, jvp = fwad.unpack_dual(y)
        results.append((primal, jvp, *m.buffers()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_grad_of_functional_batch_norm_matches_torch():
    x, w, b = _x(8, 5), torch.linspace(0.5, 1.5, 5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)

    def loss(fn):
        return lambda t: (fn(t, None, None, w, b, training=True) ** 3).sum()

    torch.testing.assert_close(grad(loss(bnlib.functional.batch_norm))(x),
                               grad(loss(torch.nn.functional.batch_norm))(x))

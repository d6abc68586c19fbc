"""bnlib.lab.glue emits what myst_nb.glue emits, so stored outputs do not depend on which one ran."""

import pytest

pytest.importorskip("IPython")
myst_nb = pytest.importorskip("myst_nb")

from IPython.core.interactiveshell import InteractiveShell  # noqa: E402

from bnlib.lab.glue import glue, plain  # noqa: E402


def _published(fn, *args, **kw):
    shell = InteractiveShell.instance()
    sent = []
    original = shell.display_pub.publish
    shell.display_pub.publish = lambda data, metadata=None, **k: sent.append((data, metadata))
    try:
        fn(*args, **kw)
    finally:
        shell.display_pub.publish = original
    return sent


@pytest.mark.parametrize("value", [0.9812, 14378, "text", [1, 2]])
@pytest.mark.parametrize("display", [False, True])
def test_same_output_as_myst_nb(value, display):
    ours = _published(glue, "key", value, display=display)
    theirs = _published(myst_nb.glue, "key", value, display=display)
    assert ours == theirs and len(ours) == 1


def test_outside_ipython_does_nothing(capsys):
    InteractiveShell.clear_instance()
    glue("key", 1.0)
    assert capsys.readouterr().out == ""


def test_numpy_and_torch_scalars_are_stored_as_python_numbers():
    import numpy as np
    import torch

    cases = [(np.float64(0.25), 0.25), (np.float32(0.5), 0.5), (np.int64(7), 7), (np.array(1.5), 1.5),
             (torch.tensor(0.75), 0.75), (torch.tensor(3), 3), (torch.tensor(2.0, requires_grad=True), 2.0)]
    for value, python in cases:
        assert _published(glue, "key", value) == _published(glue, "key", python)
        assert type(plain(value)) is type(python)
    for kept in (np.array([1.0, 2.0]), torch.tensor([1.0]), "0.5", [1, 2]):
        assert plain(kept) is kept

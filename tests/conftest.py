"""Shared pytest fixtures and markers for bnlib's unit tests."""

import pytest
import torch


def pytest_configure(config):
    """Register the markers, so that ``-m "not mnist"`` selects the offline tests and typos are caught."""
    config.addinivalue_line(
        "markers", "recent_torch: compares with what only recent torch releases do (torch.nn's bias= keyword and "
        "eps checks of 2.13, torch.compile of the fast path); deselected by make test-oldest-torch"
    )
    config.addinivalue_line(
        "markers", "mnist: loads the real MNIST (downloads it when not cached); deselect with -m 'not mnist'"
    )


@pytest.fixture(autouse=True)
def one_thread():
    """Small models run far faster on one thread, above all on a busy machine; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

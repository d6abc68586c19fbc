"""Shared pytest fixtures for bnlib's unit tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Small models run far faster on one thread, above all on a busy machine; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

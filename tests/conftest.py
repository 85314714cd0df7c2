"""Fixtures shared by the training tests."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU spinning OpenMP threads slow a
    step down by up to 10x: train these tests on one thread (`pytestmark = pytest.mark.usefixtures(...)`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

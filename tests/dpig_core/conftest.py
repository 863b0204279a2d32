"""Fixtures for the dpig_core tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """Run a module's tiny-tensor tests on one intra-op thread, then restore the setting.

    Tensors of a few kB gain nothing from a second thread, and on a busy 2-core machine the
    thread hand-offs cost more than the work (the model tests ran 4× slower with 2 threads
    while another process held a core).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

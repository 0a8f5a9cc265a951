"""Fixtures shared by the test modules."""

import pytest
import torch

from robustfeat.build import build_splits
from robustfeat.config import load_config


@pytest.fixture(scope="module")
def cfg(request):
    """The `demo` preset shrunk by the module's own ``TINY`` overrides (trains in seconds)."""
    return load_config("demo", overrides=request.module.TINY)


@pytest.fixture(scope="module")
def splits(cfg):
    return build_splits(cfg)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny batches run faster on one thread, especially on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

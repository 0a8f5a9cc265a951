"""Fixtures shared by the test modules, and the test device.

``--device cuda`` (or ROBUSTFEAT_TEST_DEVICE=cuda) runs the device-dependent tests (those taking the
``device`` fixture, marked ``device``: ``pytest -m device --device cuda``) on a GPU; without one they
are skipped with the reason. The default is the CPU, where they run with the rest. ``--slow`` (or
ROBUSTFEAT_SLOW_TESTS=1) also runs the tests marked ``slow`` (an inductor compilation: minutes on 2
CPU cores).
"""

import os

import pytest
import torch

from robustfeat.build import build_splits
from robustfeat.config import load_config


def pytest_addoption(parser):
    parser.addoption("--device", default=os.environ.get("ROBUSTFEAT_TEST_DEVICE", "cpu"),
                     help="device of the device-dependent tests: cpu (default), cuda or cuda:N "
                          "(env ROBUSTFEAT_TEST_DEVICE)")
    parser.addoption("--slow", action="store_true", default=os.environ.get("ROBUSTFEAT_SLOW_TESTS") == "1",
                     help="also run the tests marked slow (env ROBUSTFEAT_SLOW_TESTS=1)")


def pytest_configure(config):
    name = config.getoption("--device")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise pytest.UsageError(f"--device={name!r} is invalid: expected cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise pytest.UsageError(f"--device={name!r} is invalid: expected cpu, cuda or cuda:N")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow (an inductor compilation): run with --slow or ROBUSTFEAT_SLOW_TESTS=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device of the device-dependent tests (``--device``; the CPU by default)."""
    dev = torch.device(request.config.getoption("--device"))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            pytest.skip(f"--device {dev}: this torch build ({torch.__version__}) sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            pytest.skip(f"--device {dev}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


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

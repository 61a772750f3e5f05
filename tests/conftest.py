"""Test setup: the Triton backend runs under Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is imported anywhere, hence at the top of conftest.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import lossops  # noqa: E402

KERNEL_BACKENDS = ["cpp", "triton"]
ALL_BACKENDS = ["cpp", "triton", "reference"]


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    """Runs the test once per backend, with that backend selected."""
    with lossops.backend(request.param):
        yield request.param


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request):
    with lossops.backend(request.param):
        yield request.param


def pytest_addoption(parser):
    parser.addoption("--fuzz-long", action="store_true",
                     help="tests/test_fuzz.py: the long hypothesis profile (same as LOSSOPS_FUZZ_PROFILE=long)")


def pytest_configure(config):
    if config.getoption("--fuzz-long"):  # read by test_fuzz at import, which comes after configure
        os.environ["LOSSOPS_FUZZ_PROFILE"] = "long"


@pytest.fixture
def one_thread():
    # Tiny models: threads only add OpenMP barriers, which cost 10x on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

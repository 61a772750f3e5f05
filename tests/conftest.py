"""Test setup: the Triton backend runs under Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is imported anywhere, hence at the top of conftest.
"""
import json
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import lossops  # noqa: E402
from _interpreter_speedup import install as _install_interpreter_speedup  # noqa: E402

_install_interpreter_speedup()


def _gradchecks_in_fast_mode() -> None:
    """Under the sanitizers (.ci/sanitize.sh): gradcheck's numerical Jacobian calls the same kernels on the same
    shapes once per input element, which shows a sanitizer nothing the analytical pass does not; fast mode checks
    one random projection of the Jacobian with a few calls (the full Jacobians are checked by the main suite)."""
    import torch.autograd

    def fast(check):
        def run(*args, **kwargs):
            if kwargs.get("check_batched_grad") or kwargs.get("check_forward_ad"):
                return check(*args, **kwargs)
            kwargs["fast_mode"] = True
            return check(*args, **kwargs)
        return run
    torch.autograd.gradcheck = fast(torch.autograd.gradcheck)
    torch.autograd.gradgradcheck = fast(torch.autograd.gradgradcheck)


if os.environ.get("LOSSOPS_SANITIZED") == "1":
    _gradchecks_in_fast_mode()


def _sample_iterators_without_stack_walk() -> None:
    """torch's OpInfo sample and error iterators (TrackedInputIter) look for the running unittest.TestCase method
    when they are made, so that a failing sample can print a repro command: `extract_test_fn` walks
    `inspect.stack()`, which reads the source lines of every frame of pytest's deep stack, once per
    `sample_inputs` call (at collection, and in every OpInfo test). Only a frame whose `self` is a
    unittest.TestCase can match; these tests are pytest functions, so the walk always ends in None, which is what
    this returns at once."""
    from torch.testing._internal import common_utils

    common_utils.extract_test_fn = lambda: None


_sample_iterators_without_stack_walk()

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


@pytest.fixture(params=[True, False], ids=["widened", "native"])
def product_route(request, monkeypatch):
    """Low-precision products in float32 blocks (_WideProducts, what a CPU without oneDNN's bfloat16/float16 kernels
    takes) or in the operands' dtype (what one with them takes), whichever this CPU has. Yields (widened, counts):
    counts holds how many widened logits products ("logits") and gradient contractions ("contract") were made."""
    from lossops.losses import linear_cross_entropy as linear_ce
    monkeypatch.setattr(linear_ce, "_native_cpu_products", lambda dtype: not request.param)
    counts = {"logits": 0, "contract": 0}
    for name in counts:
        def counted(self, *args, _name=name, _method=getattr(linear_ce._WideProducts, name), **kwargs):
            counts[_name] += 1
            return _method(self, *args, **kwargs)
        monkeypatch.setattr(linear_ce._WideProducts, name, counted)
    yield request.param, counts


def pytest_addoption(parser):
    parser.addoption("--fuzz-long", action="store_true",
                     help="tests/test_fuzz.py: the long hypothesis profile (same as LOSSOPS_FUZZ_PROFILE=long)")


def pytest_configure(config):
    if config.getoption("--fuzz-long"):  # read by test_fuzz at import, which comes after configure
        os.environ["LOSSOPS_FUZZ_PROFILE"] = "long"
    # pytest-xdist's default (load) scheduling first hands each worker a quarter of its share as one block of
    # consecutive tests, so the longest tests, which pytest_collection_modifyitems puts first, would all go to the
    # first worker. Two at a time instead: a worker gets its next tests as it finishes one (while its tests are
    # short, xdist still sends more at once), so the longest ones spread over the workers and nothing long is left
    # to run alone at the end. An explicit --maxschedchunk wins.
    if getattr(config.option, "maxschedchunk", 0) is None:
        config.option.maxschedchunk = 2


# Measured seconds of the suite's slowest tests (scripts/test_durations.py writes the file from a junit XML).
_DURATIONS_FILE = Path(__file__).with_name("durations.json")
_DURATIONS = json.loads(_DURATIONS_FILE.read_text()) if _DURATIONS_FILE.exists() else {}


def pytest_collection_modifyitems(config, items):
    """Longest first (tests/durations.json), the rest in collection order after them: on several workers the long
    tests then start early and run side by side, instead of whichever the schedule reaches last keeping one worker
    busy after the other has finished (the suite's last 1% took half its time so)."""
    items.sort(key=lambda item: -_DURATIONS.get(item.nodeid, 0.0))


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

"""Backend selection (lossops._backend) and the per-ISA C++ builds (lossops._cpp)."""
import os
import threading

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lossops
import lossops._cpp
from lossops import _backend, _eager
from _cases import ISA_ORDER, cpu_supports, forced_isa, run_python


@pytest.fixture
def clean_selection(monkeypatch):
    """No process-wide choice and no LOSSOPS_BACKEND, restored afterwards."""
    monkeypatch.setattr(_backend, "_global", None)
    monkeypatch.delenv("LOSSOPS_BACKEND", raising=False)


@pytest.fixture
def served_by(monkeypatch):
    """Records which backend's kernels each call reached (the reference backend reaches none)."""
    calls = []
    real = _backend.kernel

    def recording(backend, module, name):
        calls.append(backend)
        return real(backend, module, name)

    monkeypatch.setattr(_backend, "kernel", recording)
    _eager.bind()
    for route in _eager.routes():  # the C++ eager path serves on the cpp backend too
        for entry in ("call", "call_in_place"):
            def recording_call(*arguments, real_call=getattr(route, entry)):
                loss = real_call(*arguments)
                if loss is not None:
                    calls.append("cpp")
                return loss

            monkeypatch.setattr(route, entry, recording_call)
    return calls


def _ce():
    x = torch.randn(4, 5, requires_grad=True)
    target = torch.tensor([0, 4, 2, 1])
    loss = lossops.cross_entropy(x, target, label_smoothing=0.1)
    assert_close(loss, F.cross_entropy(x, target, label_smoothing=0.1))
    return loss


def test_auto_picks_cpp_on_cpu(clean_selection, served_by):
    assert lossops.get_backend() == "auto"
    assert _backend.resolve(torch.device("cpu")) == "cpp"
    _ce()
    assert served_by == ["cpp"]


def test_set_backend_is_process_wide(clean_selection, served_by):
    lossops.set_backend("reference")
    assert lossops.get_backend() == "reference"
    seen_in_thread = []
    thread = threading.Thread(target=lambda: seen_in_thread.append(lossops.get_backend()))
    thread.start()
    thread.join()
    assert seen_in_thread == ["reference"]
    _ce()
    assert served_by == []
    lossops.set_backend("cpp")
    _ce()
    assert served_by == ["cpp"]


def test_context_managers_nest_and_restore(clean_selection, served_by):
    lossops.set_backend("reference")
    with lossops.backend("cpp"):
        assert lossops.get_backend() == "cpp"
        with lossops.backend("triton"):
            assert lossops.get_backend() == "triton"
            with lossops.backend("auto"):
                assert _backend.resolve(torch.device("cpu")) == "cpp"
            assert lossops.get_backend() == "triton"
        with pytest.raises(KeyError), lossops.backend("reference"):
            raise KeyError("an exception inside still restores the outer choice")
        assert lossops.get_backend() == "cpp"
        _ce()
    assert lossops.get_backend() == "reference"
    assert served_by == ["cpp"]


def test_context_is_local_to_its_thread(clean_selection):
    seen_in_thread = []
    with lossops.backend("reference"):
        thread = threading.Thread(target=lambda: seen_in_thread.append(lossops.get_backend()))
        thread.start()
        thread.join()
    assert seen_in_thread == ["auto"]


def test_precedence_context_then_global_then_env(clean_selection, monkeypatch):
    monkeypatch.setenv("LOSSOPS_BACKEND", "reference")
    assert lossops.get_backend() == "reference"
    lossops.set_backend("cpp")
    assert lossops.get_backend() == "cpp"
    with lossops.backend("triton"):
        assert lossops.get_backend() == "triton"


# One fresh process answers every question that needs one (environment variables read once at import,
# TRITON_INTERPRET never set): starting torch costs seconds on the shared machine.
_PROBE_SCRIPT = """
import torch, lossops
from lossops import _backend, _cpp
print("selected", lossops.get_backend(), _backend.resolve(torch.device("cpu")))
print("capability", torch.backends.cpu.get_cpu_capability(), _cpp.capability())
with lossops.backend("triton"):
    try:
        lossops.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]))
        print("triton_on_cpu no error")
    except RuntimeError as e:
        print("triton_on_cpu RuntimeError", e)
"""


@pytest.fixture(scope="session")  # as test_bench.quick_run
def fresh_process():
    result = run_python(_PROBE_SCRIPT, {"LOSSOPS_BACKEND": "reference", "ATEN_CPU_CAPABILITY": "avx2"},
                        drop=("TRITON_INTERPRET", "LOSSOPS_CPU_CAPABILITY"))
    assert result.returncode == 0, result.stderr
    return {line.split()[0]: line.split(maxsplit=1)[1] for line in result.stdout.splitlines()}


def test_env_var_selects_backend_in_fresh_process(fresh_process):
    assert fresh_process["selected"] == "reference reference"


def test_triton_on_cpu_without_interpreter_is_a_clear_error(fresh_process):
    assert fresh_process["triton_on_cpu"].startswith("RuntimeError")
    assert "TRITON_INTERPRET" in fresh_process["triton_on_cpu"]


@pytest.mark.parametrize("name", ["cpp", "triton"])
def test_kernel_backend_on_unsupported_device_is_a_clear_error(name):
    x = torch.randn(3, 4, device="meta")
    with lossops.backend(name), pytest.raises(RuntimeError, match="meta"):
        lossops.cross_entropy(x, torch.zeros(3, dtype=torch.long, device="meta"))


def test_auto_serves_other_devices_with_reference(clean_selection, served_by):
    x = torch.randn(3, 4, device="meta")
    loss = lossops.cross_entropy(x, torch.zeros(3, dtype=torch.long, device="meta"), reduction="none")
    assert loss.device.type == "meta" and loss.shape == (3,)
    assert served_by == []


# --- per-ISA C++ builds -------------------------------------------------------------------------------------------

_ISA_CASES = {
    "fp32": (torch.float32, dict(label_smoothing=0.1, weight=True)),
    "bf16": (torch.bfloat16, dict(reduction="none")),
    "fp64_extras": (torch.float64, dict(lse_square_scale=0.01, softcap=5.0, ignore_index=3)),
    "fp32_prob": (torch.float32, dict(label_smoothing=0.2)),
}


def _run_isa_cases():
    torch.manual_seed(0)
    results = {"capability": lossops._cpp.capability()}
    with lossops.backend("cpp"):
        for name, (dtype, kwargs) in _ISA_CASES.items():
            x = (4 * torch.randn(5, 2049, 3)).to(dtype).requires_grad_()  # 2049: two 2048-wide blocks
            kwargs = dict(kwargs, **({"weight": (torch.rand(2049) + 0.5).to(dtype)} if "weight" in kwargs else {}))
            prob = name.endswith("prob")
            target = torch.randn(5, 2049, 3).softmax(1).to(dtype) if prob else torch.randint(0, 2049, (5, 3))
            loss = lossops.cross_entropy(x, target, **kwargs)
            loss.backward(torch.ones_like(loss))
            results[name] = (x.detach(), target, kwargs, loss.detach(), x.grad)
    return results


@pytest.fixture(scope="session")  # as test_bench.quick_run
def isa_results():
    """Each ISA build, in this process (a fresh torch process costs ~10 s on the shared machine)."""
    results = {}
    for isa in filter(cpu_supports, ISA_ORDER):
        with forced_isa(isa):
            results[isa] = _run_isa_cases()
    return results


def test_every_isa_build_is_loadable_here(isa_results):
    """Every build this CPU can run is installed, and forcing it loads that build (not a fallback)."""
    assert {isa: r["capability"] for isa, r in isa_results.items()} == {
        isa: isa.upper() for isa in ISA_ORDER if cpu_supports(isa)}


@pytest.mark.parametrize("case", ["fp32", "bf16", "fp64_extras", "fp32_prob"])
def test_isa_builds_agree_with_torch_and_each_other(isa_results, case):
    baseline = isa_results["default"][case]
    x, target, kwargs, _, _ = baseline
    for isa, results in isa_results.items():
        _, _, _, loss, grad = results[case]
        if "lse_square_scale" not in kwargs:  # torch has no z-loss/softcap; those are compared across ISAs
            x_ref = x.detach().float().requires_grad_()
            expected = F.cross_entropy(x_ref, target.float() if target.is_floating_point() else target,
                                       **{k: v.float() if isinstance(v, torch.Tensor) else v
                                          for k, v in kwargs.items()})
            expected.backward(torch.ones_like(expected))
            tol = dict(rtol=1e-5, atol=1e-6) if x.dtype == torch.float32 else {}
            assert_close(loss, expected.to(loss.dtype), **tol, msg=lambda m: f"{isa}: {m}")
            assert_close(grad, x_ref.grad.to(grad.dtype), **tol, msg=lambda m: f"{isa}: {m}")
        assert_close(loss, baseline[3], msg=lambda m: f"{isa} vs default: {m}")
        assert_close(grad, baseline[4], msg=lambda m: f"{isa} vs default: {m}")


@pytest.mark.skipif("LOSSOPS_CPU_CAPABILITY" in os.environ, reason="the build is forced")
def test_default_pick_is_the_best_this_cpu_supports():
    expected = {"AVX512": "AVX512", "AVX2": "AVX2"}.get(torch.backends.cpu.get_cpu_capability(), "DEFAULT")
    assert lossops._cpp.capability() == expected


def test_default_pick_follows_aten_cpu_capability(fresh_process):
    """ATEN_CPU_CAPABILITY=avx2 (set in the fresh process) lowers torch's choice, and ours with it."""
    torch_choice, ours = fresh_process["capability"].split()
    assert torch_choice == "AVX2" and ours == "AVX2" or not cpu_supports("avx2")

"""Which implementation serves a call: "cpp" (C++ CPU kernels), "triton" (GPU, or CPU under
TRITON_INTERPRET=1) or "reference" (plain PyTorch).

"auto" picks cpp for CPU tensors, triton for CUDA tensors and reference for anything else (e.g. MPS).
Precedence: the innermost `lossops.backend(...)` context, then `lossops.set_backend(...)`, then the
LOSSOPS_BACKEND environment variable, then "auto".
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.metadata
import os
import sys

import torch
import torch.autograd.forward_ad as _forward_ad

from . import _cpp
from ._version import __version__

BACKENDS = ("auto", "cpp", "triton", "reference")

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("lossops_backend", default=None)
_global: str | None = None


def _validated(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"lossops: unknown backend {name!r}; expected one of {BACKENDS}")
    return name


def set_backend(name: str) -> None:
    """Sets the process-wide backend ("auto", "cpp", "triton" or "reference")."""
    global _global
    _global = _validated(name)


# os.environ.get encodes its key on every call, a cost every tiny loss call would pay. On POSIX CPython,
# os.environ keeps its contents in a plain dict of bytes (updated by every assignment and deletion through it),
# read directly here while os.environ is still the object it was at import.
_ENVIRON = os.environ
_ENVIRON_BYTES = (os.environ._data if os.name == "posix" and isinstance(getattr(os.environ, "_data", None), dict)
                  else None)


def _requested_by_environment() -> str | None:
    if _ENVIRON_BYTES is None or os.environ is not _ENVIRON:
        return os.environ.get("LOSSOPS_BACKEND")
    value = _ENVIRON_BYTES.get(b"LOSSOPS_BACKEND")
    return None if value is None else os.fsdecode(value)


def get_backend() -> str:
    """The backend requested right now (may be "auto")."""
    name = _override.get() or _global or _requested_by_environment() or "auto"
    return name if name in BACKENDS else _validated(name)


@contextlib.contextmanager
def backend(name: str):
    """Context manager: `with lossops.backend("reference"): ...` (thread- and task-local)."""
    token = _override.set(_validated(name))
    try:
        yield
    finally:
        _override.reset(token)


TARGET_CHECKS = ("device", "immediate")
_target_checks: str | None = None


def set_target_checks(mode: str) -> None:
    """How out-of-range class indices are reported where reading a value back costs a host synchronisation (the
    GPU route): "device" (the default) asserts on the device, as torch's CUDA losses do (no sync, CUDA-graph
    capturable; the error surfaces at the next synchronising call and poisons the CUDA context); "immediate"
    reads the kernels' flag after each launch and raises IndexError naming the value (one sync per call).
    Calls on CPU memory always raise the immediate IndexError: there the read costs nothing.
    LOSSOPS_TARGET_CHECKS sets the default."""
    global _target_checks
    if mode not in TARGET_CHECKS:
        raise ValueError(f"lossops: unknown target-check mode {mode!r}; expected one of {TARGET_CHECKS}")
    _target_checks = mode


def target_checks() -> str:
    """The target-check mode in force ("device" or "immediate"), see set_target_checks."""
    mode = _target_checks or os.environ.get("LOSSOPS_TARGET_CHECKS") or "device"
    return mode if mode in TARGET_CHECKS else "device"


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _constant_under_compile(fn):
    """torch.compiler.assume_constant_result, without making `import lossops` import Dynamo: that decorator
    imports torch._dynamo (a longer import than all of lossops', which plain `import torch` does not make) only to
    set the mark Dynamo's tracer looks for. tests/test_compile.py checks that the mark set here is the one torch's
    decorator sets."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


# Dynamo cannot trace ContextVar.get or the cached imports below: under torch.compile the choice is made
# once, when the function is compiled, and becomes a constant of the graph.
@_constant_under_compile
def resolve(device: torch.device) -> str:
    """The concrete backend for tensors on `device`, or a RuntimeError saying why none can serve it.

    Forward-mode AD and functorch's grad/jvp transforms take the reference backend whatever was asked: the
    kernels' ops carry a backward formula only, and plain PyTorch has every derivative (jvp, hessian).
    """
    if derivatives_beyond_kernels():
        return "reference"
    name = get_backend()
    if name == "auto":
        if device.type == "cpu":
            return "cpp" if _cpp_available() else "reference"
        if device.type == "cuda":
            return "triton" if _triton_available() else "reference"
        return "reference"
    if name == "cpp" and device.type != "cpu":
        raise RuntimeError(f"lossops: the cpp backend serves CPU tensors only, got a tensor on {device}; "
                           "use backend 'triton' or 'auto'")
    if name == "cpp" and not _cpp_available():
        raise RuntimeError("lossops: the C++ extension (lossops._C) is not built; "
                           "run `pip install --no-build-isolation -e .`")
    if name == "triton":
        if not _triton_available():
            raise RuntimeError("lossops: the triton backend needs the `triton` package")
        if device.type == "cpu" and not triton_interpreted():
            raise RuntimeError("lossops: the triton backend runs on CPU tensors only under Triton's interpreter; "
                               "set TRITON_INTERPRET=1 before triton is imported, or use backend 'cpp'")
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"lossops: the triton backend cannot serve tensors on {device}")
    return name


def derivatives_beyond_kernels() -> bool:
    """Whether derivatives the kernels do not provide may be asked of this call: a forward-AD dual level is
    open, or a functorch transform that differentiates (grad, jvp, and what is built on them: jacrev,
    jacfwd, hessian) is active. vmap alone runs the kernels."""
    if _forward_ad._current_level >= 0:
        return True
    if not torch._C._are_functorch_transforms_active():
        return False
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    return any(i.key() in (TransformType.Grad, TransformType.Jvp) for i in retrieve_all_functorch_interpreters())


_cpp_loaded = False


def _cpp_available() -> bool:
    # Asked on every call (backend resolution, gradient buffers): once loaded, the library stays loaded.
    global _cpp_loaded
    if _cpp_loaded:
        return True
    try:
        _cpp.module()
    except ImportError:
        return False
    _cpp_loaded = True
    return True


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def kernel(backend: str, module: str, name: str):
    """A family's kernel on a concrete backend, called with keyword arguments only: the C++ host module checks
    them against the names the kernel registered (csrc/kernel_abi.h), Python against the Triton function's."""
    if backend == "cpp":
        return functools.partial(_cpp.module().call_kernel, name)
    if backend == "triton":
        return getattr(importlib.import_module(f"lossops.triton_kernels.{module}"), name)
    raise ValueError(f"lossops: backend {backend!r} has no kernels")


def empty_gradient(like: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous buffer shaped like `like` for a gradient written in forward.

    On CPU it comes from the C++ module, on transparent huge pages when large (faulting in a fresh N x C
    buffer page by page costs more than computing the gradient), and is the buffer the previous step freed
    when it has the same size (see set_gradient_cache).
    """
    if like.device.type == "cpu" and _cpp_available():
        return _cpp.module().empty_gradient_like(like)
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


def set_gradient_cache(enabled: bool) -> None:
    """CPU: keep the last freed large gradient buffers (from 1 MiB; up to three of one size, as a loss with three
    gradients of one shape needs) for the next calls that need that size, so a training loop does not fault in
    (and have the OS zero) a fresh N x C buffer every step. On by default (LOSSOPS_GRADIENT_CACHE=0 turns the
    default off). Peak memory within a step is unchanged (a request of another size frees the kept buffers
    first); between steps the last step's gradients of one size stay allocated. Turning it off frees them."""
    _cpp.set_gradient_cache(enabled)


def gradient_cache_enabled() -> bool:
    return _cpp.gradient_cache_enabled()


def empty_cache() -> int:
    """Frees the gradient buffers kept for the next step (like torch.cuda.empty_cache); returns their bytes."""
    return _cpp.empty_cache()


def gradient_cache_bytes() -> int:
    """Bytes held by the kept gradient buffers right now (0 when none)."""
    return _cpp.gradient_cache_bytes()


def show_config() -> str:
    """What this installation runs on: version, the C++ kernel build serving CPU calls, backends, Triton."""
    lines = [f"lossops {__version__}, torch {torch.__version__}"]
    try:
        built = [isa for isa in _cpp.ISAS if _cpp.kernel_library(isa)]
        lines.append(f"C++ kernels: {_cpp.capability()} build in use (built: {', '.join(built)}; "
                     f"this CPU: {torch.backends.cpu.get_cpu_capability()})")
    except ImportError as e:
        lines.append(f"C++ kernels: not available ({e})")
    triton = importlib.util.find_spec("triton")
    if triton is None:
        lines.append("Triton: not installed (pip install triton for the GPU backend)")
    else:
        mode = ", interpreter (TRITON_INTERPRET=1)" if triton_interpreted() else ""
        lines.append(f"Triton: {importlib.metadata.version('triton')}{mode}")
    usable = [name for name in BACKENDS[1:] if name == "reference"
              or (name == "cpp" and _cpp_available())
              or (name == "triton" and triton is not None and (torch.cuda.is_available() or triton_interpreted()))]
    lines.append(f"backends usable here: {', '.join(usable)}; selected: {get_backend()}")
    return "\n".join(lines)

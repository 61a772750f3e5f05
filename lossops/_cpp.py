"""Loads the C++ kernels built for the best instruction set this CPU supports.

lossops._C (the host module: bindings, gradient buffers) is built once; the kernels are built per ISA as
lossops/_kernels_default.so, _kernels_avx2.so and _kernels_avx512.so (see csrc/kernel_abi.h), and _C loads
one of them. The choice follows PyTorch's own (torch.backends.cpu.get_cpu_capability(), which honours
ATEN_CPU_CAPABILITY); LOSSOPS_CPU_CAPABILITY=default|avx2|avx512 forces one, e.g. to test every variant on
one machine.
"""
from __future__ import annotations

import functools
import importlib.machinery
import os

import torch

ISAS = ("default", "avx2", "avx512")
_PREFERENCE = {"AVX512": ("avx512", "avx2", "default"), "AVX2": ("avx2", "default")}


def _candidates() -> tuple[str, ...]:
    forced = os.environ.get("LOSSOPS_CPU_CAPABILITY")
    if forced:
        return (forced.lower(),)
    return _PREFERENCE.get(torch.backends.cpu.get_cpu_capability(), ("default",))


def host():
    """lossops._C without loading a kernel library (kernel calls go through it to the loaded one)."""
    from . import _C
    return _C


def kernel_library(isa: str) -> str | None:
    """The path of the kernel library built for `isa`, or None when it was not built."""
    folder = os.path.dirname(os.path.abspath(host().__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(folder, f"_kernels_{isa}{suffix}")
        if os.path.exists(path):
            return path
    return None


@functools.lru_cache(maxsize=None)
def module():
    """lossops._C, serving calls from the kernel library of the best ISA this CPU supports."""
    lib = host()
    errors = []
    for isa in _candidates():
        path = kernel_library(isa)
        if path is None:
            errors.append(f"no _kernels_{isa} library was built" + ("" if isa in ISAS else f" (known: {ISAS})"))
            continue
        try:
            lib.load_kernels(path)
        except RuntimeError as e:
            errors.append(str(e))
            continue
        return lib
    raise ImportError("lossops: no C++ kernel library could be loaded (" + "; ".join(errors) + ")")


def capability() -> str:
    return module().capability()


# --- the kept gradient buffers (csrc/allocation.cpp), one set per process in the host module ---------------------

def set_gradient_cache(enabled: bool) -> None:
    host().set_gradient_cache(bool(enabled))


def gradient_cache_enabled() -> bool:
    return host().gradient_cache_enabled()


def empty_cache() -> int:
    return host().release_gradient_cache()


def gradient_cache_bytes() -> int:
    return host().gradient_cache_bytes()

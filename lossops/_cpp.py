"""Loads the C++ kernels built for the best instruction set this CPU supports.

setup.py builds the same sources as lossops._C (baseline), lossops._C_avx2 and lossops._C_avx512. The
choice follows PyTorch's own (torch.backends.cpu.get_cpu_capability(), which honours ATEN_CPU_CAPABILITY);
LOSSOPS_CPU_CAPABILITY=default|avx2|avx512 forces one, e.g. to test every variant on one machine.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

_PREFERENCE = {"AVX512": ("avx512", "avx2", "default"), "AVX2": ("avx2", "default")}


def _candidates() -> tuple[str, ...]:
    forced = os.environ.get("LOSSOPS_CPU_CAPABILITY")
    if forced:
        return (forced.lower(),)
    return _PREFERENCE.get(torch.backends.cpu.get_cpu_capability(), ("default",))


@functools.lru_cache(maxsize=None)
def module():
    errors = []
    for isa in _candidates():
        name = "lossops._C" if isa == "default" else f"lossops._C_{isa}"
        try:
            return importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
    raise ImportError("lossops: no C++ kernel module could be loaded (" + "; ".join(errors) + ")")


def capability() -> str:
    return module().CPU_CAPABILITY

"""Loads the C++ kernels built for the best instruction set this CPU supports.

setup.py builds the same sources as lossops._C (baseline), lossops._C_avx2 and lossops._C_avx512. The
choice follows PyTorch's own (torch.backends.cpu.get_cpu_capability(), which honours ATEN_CPU_CAPABILITY);
LOSSOPS_CPU_CAPABILITY=default|avx2|avx512 forces one, e.g. to test every variant on one machine.
"""
from __future__ import annotations

import functools
import importlib
import os
import sys
from typing import Optional

import torch

_PREFERENCE = {"AVX512": ("avx512", "avx2", "default"), "AVX2": ("avx2", "default")}


def _candidates() -> tuple[str, ...]:
    forced = os.environ.get("LOSSOPS_CPU_CAPABILITY")
    if forced:
        return (forced.lower(),)
    return _PREFERENCE.get(torch.backends.cpu.get_cpu_capability(), ("default",))


def _module_name(isa: str) -> str:
    return "lossops._C" if isa == "default" else f"lossops._C_{isa}"


@functools.lru_cache(maxsize=None)
def module():
    errors = []
    for isa in _candidates():
        name = _module_name(isa)
        try:
            loaded = importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
            continue
        if _gradient_cache_choice is not None:
            loaded.set_gradient_cache(_gradient_cache_choice)
        return loaded
    raise ImportError("lossops: no C++ kernel module could be loaded (" + "; ".join(errors) + ")")


def capability() -> str:
    return module().CPU_CAPABILITY


# --- the kept gradient buffer (csrc/allocation.cpp) ---------------------------------------------------------------
# Each ISA build has its own slot; these functions act on every build loaded in this process.
_gradient_cache_choice: Optional[bool] = None  # set_gradient_cache's last word, applied to builds loaded later


def _loaded() -> list:
    names = (_module_name(isa) for isa in ("default", "avx2", "avx512"))
    return [sys.modules[name] for name in names if name in sys.modules]


def set_gradient_cache(enabled: bool) -> None:
    global _gradient_cache_choice
    _gradient_cache_choice = bool(enabled)
    for m in _loaded():
        m.set_gradient_cache(_gradient_cache_choice)


def gradient_cache_enabled() -> bool:
    # The serving build holds the setting (LOSSOPS_GRADIENT_CACHE read at its load, or set_gradient_cache's).
    return module().gradient_cache_enabled()


def empty_cache() -> int:
    return sum(m.release_gradient_cache() for m in _loaded())


def gradient_cache_bytes() -> int:
    return sum(m.gradient_cache_bytes() for m in _loaded())

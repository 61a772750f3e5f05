"""Whether a call may take the C++ eager path (csrc/eager_path.cpp): one call into C++ that runs the kernel,
reduces, casts and creates the autograd node, instead of the torch.library custom op.

It serves plain CPU tensors in eager mode on the cpp backend. It is tried before the Python checks: the C++
returns None for anything it does not recognise, bad arguments included, and the Python path then raises, so
each error keeps one source. Everything that needs the op to be visible to PyTorch takes the custom op:
torch.compile (Dynamo sees the constant False below and traces the op), tensor subclasses (DTensor, fake and
functional tensors), dispatch and function modes (opcheck, FlopCounterMode, make_fx), functorch transforms,
forward-mode AD and autocast.
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad

from . import _backend, _cpp


_Tensor = torch.Tensor
_is_compiling = torch.compiler.is_compiling
_torch_function_mode = torch._C._is_torch_function_mode_enabled
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_active = torch._C._are_functorch_transforms_active
_autocast = torch.is_autocast_enabled


def _no_mode_active() -> bool:
    return not (_is_compiling() or _torch_function_mode() or _dispatch_modes() or _functorch_active()
                or _forward_ad._current_level >= 0 or _autocast("cpu"))


def applies(*tensors) -> bool:
    for t in tensors:
        if t is not None and type(t) is not _Tensor:
            return False
    return _no_mode_active()


def cpp_module(input, target, *others):
    """For a call that has not been through the Python checks yet: the C++ module when every tensor is a plain
    CPU tensor, neither torch.compile nor forward AD is active and the cpp backend would serve it, else None.
    The C++ eager functions make the rest of applies()'s checks themselves (function and dispatch modes,
    functorch, autocast: thread-local reads there) and return None when one is active; at a few microseconds
    a call, each Python layer counts."""
    if type(input) is not _Tensor or not input.is_cpu or type(target) is not _Tensor:
        return None
    for t in others:
        if t is not None and type(t) is not _Tensor:
            return None
    if _is_compiling() or _forward_ad._current_level >= 0 or _backend.get_backend() not in ("auto", "cpp"):
        return None
    try:
        return _cpp.module()
    except ImportError:
        return None

"""Whether a call may take the C++ eager path (csrc/eager_path.cpp): one call into C++ that runs the kernel,
reduces, casts and creates the autograd node, instead of the torch.library custom op.

It serves plain CPU tensors in eager mode on the cpp backend. It is tried before the Python checks: the C++
returns None for anything it does not recognise, bad arguments included, and the Python path then raises, so
each error keeps one source. Everything that needs the op to be visible to PyTorch takes the custom op: torch.compile (Dynamo sees the constant False
below and traces the op), tensor subclasses (DTensor, fake and functional tensors), dispatch and function
modes (opcheck, FlopCounterMode, make_fx), functorch transforms, forward-mode AD and autocast.
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad

from . import _backend, _cpp


def applies(*tensors) -> bool:
    if torch.compiler.is_compiling():
        return False
    for t in tensors:
        if t is not None and type(t) is not torch.Tensor:
            return False
    return not (torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack()
                or torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0
                or torch.is_autocast_enabled("cpu"))


def cpp_module(input, *others):
    """For a call that has not been through the Python checks yet: the C++ module when applies() and the cpp
    backend would serve it, else None."""
    if not (type(input) is torch.Tensor and input.is_cpu and applies(input, *others)
            and _backend.get_backend() in ("auto", "cpp")):
        return None
    try:
        return _cpp.module()
    except ImportError:
        return None

"""Argument validation shared by every op and every backend.

It runs inside each op's Python entry point, which torch.compile traces, so the same errors are raised in
eager and in compiled code; value-dependent checks (target ranges) live in the kernels.
"""
from __future__ import annotations

import numbers

import torch

try:
    from numpy import bool_ as np_bool
except ImportError:  # numpy is optional for torch
    np_bool = bool

REDUCTIONS = ("none", "mean", "sum")


def reduction(reduction: str, size_average=None, reduce=None) -> str:
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction
        reduction = _reduction.legacy_get_string(size_average, reduce, emit_warning=True)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction (expected one of {REDUCTIONS})")
    return reduction


def tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"lossops: {name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def floating(name: str, value: torch.Tensor, exception=TypeError) -> torch.Tensor:
    tensor(name, value)
    if not value.is_floating_point():
        raise exception(f"lossops: {name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def same_device(reference: torch.Tensor, reference_name: str = "input", /, **others) -> None:
    for name, value in others.items():
        if value is not None and value.device != reference.device:
            raise RuntimeError(f"lossops: {name} is on {value.device} but {reference_name} is on {reference.device}; "
                               "all tensors must be on the same device")


def same_dtype(reference: torch.Tensor, **others) -> None:
    """Where torch requires a tensor to have the input's dtype (autocast casts them together, so not there)."""
    if autocast_enabled(reference.device):
        return
    for name, value in others.items():
        if value is not None and value.dtype != reference.dtype:
            raise RuntimeError(f"lossops: {name} has dtype {value.dtype} but input has dtype {reference.dtype}; "
                               "they must match")


def class_weight(weight, num_classes: int, input: torch.Tensor, name: str = "weight"):
    if weight is None:
        return None
    floating(name, weight, exception=RuntimeError)  # torch: "expected scalar type Float but found Long"
    same_device(input, **{name: weight})
    if weight.dim() != 1 or weight.numel() != num_classes:
        raise RuntimeError(f"lossops: {name} must be a 1-D tensor of {num_classes} elements (one per class), "
                           f"got shape {tuple(weight.shape)}")
    return weight


def broadcastable(name: str, value, shape: torch.Size, input: torch.Tensor, exception=ValueError):
    """An optional per-element tensor (weight, pos_weight) that must broadcast to the loss's shape."""
    if value is None:
        return None
    floating(name, value)
    same_device(input, **{name: value})
    try:
        ok = torch.broadcast_shapes(value.shape, shape) == shape
    except RuntimeError:
        ok = False
    if not ok:
        raise exception(f"lossops: {name} of shape {tuple(value.shape)} cannot be broadcast to the loss's shape "
                        f"{tuple(shape)}")
    return value


def host_readable(t: torch.Tensor) -> bool:
    """Whether reading t's values on the host costs no synchronisation (CPU memory). Every check that reads a value
    back branches here, so the GPU route's sync-free branch can be exercised on CPU (tests/test_gpu_route.py)."""
    return t.device.type == "cpu"


def class_index_in_range(name: str, target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """For paths without an in-kernel check: one reduction, then an IndexError naming an offending value (on an
    accelerator a device-side assertion instead: no host sync)."""
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if not host_readable(bad):
        torch._assert_async(~bad.any(), f"lossops: a {name} value is out of bounds (valid: 0..{num_classes - 1}, "
                                         f"ignore_index is {ignore_index})")
        return
    if bool(bad.any()):
        value = int(target[bad].reshape(-1)[0])
        raise IndexError(f"lossops: {name} value {value} is out of bounds (valid: 0..{num_classes - 1}, "
                         f"ignore_index is {ignore_index})")


def last_dim_target(target: torch.Tensor, name: str, input: torch.Tensor) -> None:
    """Class indices for an input whose last dimension is the features or classes: shape input.shape[:-1]."""
    if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
        raise RuntimeError(f"lossops: target must be an integer tensor of class indices, got dtype {target.dtype}")
    if target.shape != input.shape[:-1]:
        raise RuntimeError(f"lossops: expected target of shape {tuple(input.shape[:-1])} for {name} of shape "
                           f"{tuple(input.shape)}, got {tuple(target.shape)}")


def margin_scores(input: torch.Tensor) -> None:
    """The scores of torch's multi-class and multi-label margin losses: a non-empty vector, a matrix with classes, or
    a 0-d tensor (one row of one class); torch's error otherwise."""
    if not ((input.dim() == 2 and input.shape[1] != 0) or (input.dim() == 1 and input.shape[0] != 0)
            or input.dim() == 0):
        raise RuntimeError(f"Expected non-empty vector or matrix with optional 0-dim batch size, but got: "
                           f"{list(input.shape)} (lossops: the input's shape)")


def real(name: str, value) -> float:
    """A float argument taken as torch's argument parser takes one: a real number or a one-element tensor.
    Anything else is a TypeError, as there; float() alone would accept "0.5" and give ValueError for "a"."""
    if isinstance(value, (str, bytes)) or (isinstance(value, torch.Tensor) and value.numel() != 1):
        raise TypeError(f"lossops: {name} must be a number, got {type(value).__name__} {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"lossops: {name} must be a number, got {type(value).__name__} {value!r}") from None


def integer(name: str, value) -> int:
    """An int argument taken as torch's argument parser takes one: an int (not a bool) or an integer tensor of
    one element; anything else is a TypeError, and a value beyond int64 a ValueError, as there."""
    if isinstance(value, torch.Tensor):
        ok = value.numel() == 1 and not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
    else:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np_bool))
    if not ok:
        raise TypeError(f"lossops: {name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if not -2 ** 63 <= value < 2 ** 63:
        raise ValueError(f"lossops: {name} must fit in int64, got {value}")
    return value


def in_range(name: str, value: float, low: float, high: float | None = None, exception=ValueError) -> float:
    value = real(name, value)
    if value != value or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise exception(f"lossops: {name} must be {bound}, got {value}")
    return value


def positive_or_none(name: str, value):
    """Optional strictly positive finite float (None: off)."""
    if value is None:
        return None
    value = real(name, value)
    if not value > 0 or value == float("inf"):
        raise ValueError(f"lossops: {name} must be a positive finite number or None, got {value}")
    return value


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_dtype(input: torch.Tensor) -> torch.dtype:
    """Under autocast torch runs losses in float32; otherwise the loss has the input's dtype."""
    if input.dtype != torch.float64 and autocast_enabled(input.device):
        return torch.float32
    return input.dtype


def broadcast_shape(input_shape, target_shape, names: tuple[str, str] = ("input", "target")) -> torch.Size:
    """torch's broadcasting rule in plain Python, so torch.compile traces it and raises the same error; the error
    names the two shapes' tensors (`names`)."""
    ndim = max(len(input_shape), len(target_shape))
    a = (1,) * (ndim - len(input_shape)) + tuple(input_shape)
    b = (1,) * (ndim - len(target_shape)) + tuple(target_shape)
    out = []
    for dim, (x, y) in enumerate(zip(a, b)):
        if x != y and x != 1 and y != 1:
            raise RuntimeError(f"lossops: {names[1]} of shape {tuple(target_shape)} cannot be broadcast with "
                               f"{names[0]} of shape {tuple(input_shape)}: the size of tensor a ({x}) must match the "
                               f"size of tensor b ({y}) at non-singleton dimension {dim}")
        out.append(y if x == 1 else x)
    return torch.Size(out)


def distinct_memory(t: torch.Tensor) -> bool:
    """Whether no two elements of `t` share memory. Sufficient test: with the dimensions of size > 1 sorted by
    stride, each stride reaches past everything the smaller-strided dimensions span (what torch proves for
    dense tensors; a sliced view passes, an expanded or overlapping one does not)."""
    dims = sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size > 1)
    span = 0  # the largest offset the dimensions so far reach
    for stride, size in dims:
        if stride <= span:
            return False
        span += (size - 1) * stride
    return True


def autocast_enabled(device: torch.device) -> bool:
    """torch.is_autocast_enabled for a device type that may have no autocast at all (meta): then False. (A set of
    names rather than torch.amp.is_autocast_available, which Dynamo cannot trace in torch 2.11.)"""
    return device.type not in _NO_AUTOCAST and torch.is_autocast_enabled(device.type)


_NO_AUTOCAST = frozenset({"meta"})

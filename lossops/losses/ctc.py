"""CTC loss: `lossops.ctc_loss` and `lossops.nn.CTCLoss`, exactly torch.nn.functional.ctc_loss, fused.

The kernels (csrc/ctc.cpp, triton_kernels/ctc.py) run the alpha recursion over the extended labels forward in
time and, when a gradient is needed, the beta recursion backward in time in the same call, writing each time
step's gradient as soon as its beta row exists: nothing of size (T, N, C) is kept but the gradient itself
(alpha lives in a per-sequence workspace of T x (2S + 1) values, beta in two rows). Each sequence is computed by
one thread (C++) or one program (Triton) in a fixed order, so results are bitwise the same for any thread
count and on every run.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend, _checks, _family, _reduce

KERNEL = _family.Kernel("ctc_loss", "ctc", ("log_probs", "targets", "target_offsets", "input_lengths",
                                            "target_lengths", "blank", "zero_infinity", "grad", "grad_scale"))


@dataclasses.dataclass(frozen=True)
class CTCOptions:
    blank: int = 0
    reduction: str = "mean"
    zero_infinity: bool = False


Lengths = Union[Tensor, Sequence[int], int]


def ctc_loss(log_probs: Tensor, targets: Tensor, input_lengths: Lengths, target_lengths: Lengths, blank: int = 0,
             reduction: str = "mean", zero_infinity: bool = False) -> Tensor:
    """Drop-in for torch.nn.functional.ctc_loss, fused forward+backward.

    log_probs (T, N, C) or unbatched (T, C), need not be normalised; float64/32, bf16 and fp16 (accumulated in
    float32, float64 for float64). targets padded (N, S) or concatenated 1-D; lengths as tensors or sequences
    of ints. The gradient with respect to log_probs is torch's (and warp-ctc's): exp(log_probs) - posterior,
    the gradient with respect to the logits under a log_softmax, not the raw derivative of the loss with
    respect to log_probs (a float64 gradcheck therefore holds for ctc_loss(log_softmax(z), ...), as for torch).
    Where torch reads past the class dimension (a target value outside [0, C)), lossops raises an IndexError.
    """
    reduction = _checks.reduction(reduction)
    blank = _checks.integer("blank", blank)
    if not isinstance(zero_infinity, bool):
        raise TypeError(f"lossops: zero_infinity must be a bool, got {type(zero_infinity).__name__} {zero_infinity!r}")
    _checks.floating("log_probs", log_probs)
    _checks.tensor("targets", targets)
    if log_probs.dim() not in (2, 3):
        raise RuntimeError(f"lossops: log_probs must be (T, N, C) or unbatched (T, C), got shape "
                           f"{tuple(log_probs.shape)}")
    batched = log_probs.dim() == 3
    lp = log_probs if batched else log_probs.unsqueeze(1)
    T, N, C = lp.shape
    if not 0 <= blank < C:
        raise RuntimeError(f"lossops: blank must be in the label range [0, {C}), got {blank}")
    if targets.is_complex() or targets.dtype == torch.bool:
        raise RuntimeError(f"lossops: targets must hold class indices (integers), got dtype {targets.dtype}")
    device = log_probs.device
    input_lengths = _lengths("input_lengths", input_lengths, N, device, batched)
    target_lengths = _lengths("target_lengths", target_lengths, N, device, batched)
    _checks.same_device(log_probs, targets=targets)
    if not batched and targets.dim() == 1:
        targets = targets.unsqueeze(0)
    padded = targets.dim() == 2
    if targets.dim() not in (1, 2) or (padded and targets.shape[0] != N):
        raise RuntimeError(f"lossops: targets must be padded (N={N}, S) or concatenated 1-D, got shape "
                           f"{tuple(targets.shape)}")
    backend = _backend.resolve(device)
    if not torch.compiler.is_compiling() and all(type(t) is torch.Tensor for t in (input_lengths, target_lengths)):
        _check_lengths(input_lengths, target_lengths, T, targets, padded)
    options = CTCOptions(blank, reduction, zero_infinity)
    if backend == "reference":
        _check_target_values(targets, target_lengths, padded, C)
        return reference_ctc(log_probs, targets if batched or not padded else targets[0], input_lengths if batched
                             else input_lengths[0], target_lengths if batched else target_lengths[0], options)
    target_lengths64 = target_lengths.to(torch.int64)
    if padded:
        offsets = torch.arange(N, dtype=torch.int64, device=device) * targets.shape[1]
    else:
        offsets = torch.cumsum(target_lengths64, 0) - target_lengths64
    tensors = {"log_probs": lp, "targets": targets.reshape(-1).to(torch.int64).contiguous(), "target_offsets": offsets,
               "input_lengths": input_lengths.to(torch.int64).contiguous(),
               "target_lengths": target_lengths64.contiguous()}
    loss = CTC.apply(backend, tensors, options, {"log_probs": torch.is_grad_enabled() and log_probs.requires_grad})
    if reduction == "none" and not batched:
        loss = loss.reshape(())
    return loss.to(_checks.output_dtype(log_probs))


def _lengths(name: str, value: Lengths, batch: int, device, batched: bool) -> Tensor:
    if isinstance(value, Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise RuntimeError(f"lossops: {name} must be integral, got dtype {value.dtype}")
        if value.device != device and not (value.device.type == "cpu" and value.dim() == 0):
            raise RuntimeError(f"lossops: {name} is on {value.device} but log_probs is on {device}")
        value = value.to(device).reshape(-1) if value.dim() == 0 and not batched else value.to(device)
    else:
        items = [value] if isinstance(value, int) and not batched else list(value) if not isinstance(value, int) \
            else None
        if items is None or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            raise TypeError(f"lossops: {name} must be a tensor or a sequence of ints, got {value!r}")
        value = torch.tensor(items, dtype=torch.int64, device=device)
    if value.dim() != 1 or value.shape[0] != batch:
        raise RuntimeError(f"lossops: {name} must have one entry per sequence ({batch}), got shape {tuple(value.shape)}")
    return value


def _check_lengths(input_lengths: Tensor, target_lengths: Tensor, T: int, targets: Tensor, padded: bool) -> None:
    """Host checks of the lengths (the kernels re-check before reading, on every backend)."""
    lengths = torch.stack([input_lengths.to(torch.int64), target_lengths.to(torch.int64)]).cpu()
    for name, row, high in (("input_lengths", lengths[0], T), ("target_lengths", lengths[1], None)):
        low = int(row.min()) if row.numel() else 0
        if low < 0:
            raise RuntimeError(f"lossops: {name} must be non-negative, got {low}")
        if high is not None and row.numel() and int(row.max()) > high:
            raise RuntimeError(f"lossops: {name} value {int(row.max())} exceeds the time steps of log_probs ({high})")
    if padded and lengths[1].numel() and int(lengths[1].max()) > targets.shape[1]:
        raise RuntimeError(f"lossops: target_lengths value {int(lengths[1].max())} exceeds the padded targets' "
                           f"length {targets.shape[1]}")
    if not padded and int(lengths[1].sum()) > targets.numel():
        raise RuntimeError(f"lossops: target_lengths sum to {int(lengths[1].sum())} but the concatenated targets "
                           f"have {targets.numel()} values")


def _check_target_values(targets: Tensor, target_lengths: Tensor, padded: bool, C: int) -> None:
    """The reference backend's check (the kernels check before they read): torch's CPU kernel reads past the class
    row for a target value outside [0, C)."""
    lengths = target_lengths.to(torch.int64).reshape(-1)
    if padded:
        used = torch.arange(targets.shape[-1], device=targets.device) < lengths[:, None]
    else:
        used = torch.arange(targets.numel(), device=targets.device) < lengths.sum()
    bad = used & ((targets < 0) | (targets >= C))
    if bool(bad.any()):
        raise IndexError(f"lossops: targets value {int(targets[bad][0])} is out of bounds for {C} classes")


def _run(family, backend, t, o, grads):
    lp = t["log_probs"]
    acc = _checks.opmath_dtype(lp.dtype)
    N = lp.shape[1]
    lengths = t["target_lengths"].clamp_min(1).to(acc)
    if o.reduction == "mean":
        scale = 1 / (lengths * N)
    else:
        scale = torch.ones(N, dtype=acc, device=lp.device)
    grad = _backend.empty_gradient(lp.contiguous() if not lp.is_contiguous() else lp) if grads["log_probs"] else None
    (nll,) = family.kernel(backend, log_probs=lp, targets=t["targets"], target_offsets=t["target_offsets"],
                           input_lengths=t["input_lengths"], target_lengths=t["target_lengths"], blank=o.blank,
                           zero_infinity=o.zero_infinity, grad=grad, grad_scale=scale)
    if o.reduction == "none":
        loss = nll
    elif o.reduction == "sum":
        loss = nll.sum()
    else:
        loss = (nll / lengths).mean() if N else nll.sum() / 0
    return loss, {"log_probs": grad}


def _loss_like(t, o):
    lp = t["log_probs"]
    return lp.new_empty((lp.shape[1],) if o.reduction == "none" else (), dtype=_checks.opmath_dtype(lp.dtype))


def reference_ctc(log_probs, targets, input_lengths, target_lengths, options: CTCOptions) -> Tensor:
    """torch's own ctc_loss (the "reference" backend), after lossops' checks; low precision runs in float32."""
    low = log_probs.dtype in (torch.bfloat16, torch.float16)
    loss = F.ctc_loss(log_probs.float() if low else log_probs, targets.long(), input_lengths, target_lengths,
                      options.blank, options.reduction, options.zero_infinity)
    return loss.to(_checks.output_dtype(log_probs))


def _sequences(dtype, T=12, N=3, C=6, S=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    log_probs = torch.randn(T, N, C, generator=gen, dtype=torch.float64).log_softmax(2).to(dtype)
    targets = torch.randint(1, C, (N, S), generator=gen)
    targets[0, 1] = targets[0, 0]  # a repeated label needs a blank between
    return [log_probs, targets, torch.tensor([T, T - 2, T - 5, T - 1][:N]), torch.tensor([S, S - 1, 2, S][:N])]


def _selfcheck_inputs(dtype):
    return _sequences(dtype, T=50, N=4, C=20, S=12)


def _bench_inputs(shape, dtype, device):
    T, N, C, S = shape
    x = torch.randn(T, N, C, device=device).log_softmax(2).to(dtype).requires_grad_()
    targets = torch.randint(1, C, (N, S), device=device)
    return (x, targets, torch.full((N,), T, dtype=torch.int64), torch.full((N,), S, dtype=torch.int64))


CTC = _family.register(_family.Family(
    name="ctc_loss",
    inputs=(_family.Input("log_probs", differentiable=True), _family.Input("targets"), _family.Input("target_offsets"),
            _family.Input("input_lengths"), _family.Input("target_lengths")),
    options=CTCOptions, kernel=KERNEL, run=_run, loss_like=_loss_like, item_shape=lambda t, o: (1, -1, 1),
    reference=reference_ctc, function=ctc_loss, torch_fn=F.ctc_loss,
    cases=(_family.Case(_sequences, dict(reduction="mean"), F.ctc_loss,
                        bad=("target_out_of_range", dict(blank=6), dict(blank=-1))),
           _family.Case(functools.partial(_sequences, T=5, S=3), dict(reduction="none", zero_infinity=True),
                        F.ctc_loss)),
    selfcheck=({}, F.ctc_loss, _selfcheck_inputs),
    bench=_family.Bench(F.ctc_loss, None, ((200, 32, 30, 50), (150, 16, 1000, 40), (500, 8, 30, 150), (50, 2, 10, 10)),
                        quick_shapes=((20, 2, 10, 5),), columns="T, N, C, S", make_inputs=_bench_inputs),
))
CTC.module = _family.make_module(CTC, "CTCLoss", inputs=4, doc="Drop-in for torch.nn.CTCLoss.")

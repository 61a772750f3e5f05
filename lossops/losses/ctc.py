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
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend, _checks, _eager, _family

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
    if type(blank) is int and type(zero_infinity) is bool and not _eager.compiling():
        # One call into C++ (csrc/eager_path.cpp) for plain CPU tensors; None for anything it does not serve,
        # bad values included, which then take the path below and its messages.
        loss = EAGER_ROUTE.call(reduction, log_probs, targets, input_lengths, target_lengths, blank, zero_infinity)
        if loss is not None:
            return loss
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
    _checks.same_device(log_probs, targets=targets)
    if not batched and targets.dim() == 1:
        targets = targets.unsqueeze(0)
    padded = targets.dim() == 2
    if targets.dim() not in (1, 2) or (padded and targets.shape[0] != N):
        raise RuntimeError(f"lossops: targets must be padded (N={N}, S) or concatenated 1-D, got shape "
                           f"{tuple(targets.shape)}")
    input_lengths = _lengths("input_lengths", input_lengths, N, device, batched, T)
    target_lengths = _lengths("target_lengths", target_lengths, N, device, batched,
                              targets.shape[1] if padded else None)
    if not padded and not torch.compiler.is_compiling():
        _check_total_target_length(target_lengths, targets)
    backend = _backend.resolve(device)
    options = CTCOptions(blank, reduction, zero_infinity)
    if backend == "reference":
        _check_target_values(targets, target_lengths, padded, C)
        return reference_ctc(log_probs, targets if batched or not padded else targets[0], input_lengths if batched
                             else input_lengths[0], target_lengths if batched else target_lengths[0], options)
    if padded:
        width = targets.shape[1]
        offsets = (torch.arange(0, N * width, width, dtype=torch.int64, device=device) if width
                   else torch.zeros(N, dtype=torch.int64, device=device))
    else:
        offsets = torch.cumsum(target_lengths, 0) - target_lengths
    # Padded targets stay (N, S): the kernels read them through the offsets, and the Triton one sizes its label
    # block from S without asking the device for the longest target.
    tensors = {"log_probs": lp, "targets": targets.to(torch.int64).contiguous(), "target_offsets": offsets,
               "input_lengths": input_lengths.contiguous(), "target_lengths": target_lengths.contiguous()}
    loss = CTC.apply(backend, tensors, options, {"log_probs": torch.is_grad_enabled() and log_probs.requires_grad})
    if reduction == "none" and not batched:
        loss = loss.reshape(())
    return loss.to(_checks.output_dtype(log_probs))


def _lengths(name: str, value: Lengths, batch: int, device, batched: bool, high: Optional[int]) -> Tensor:
    """The lengths as an int64 tensor on log_probs' device, checked where that costs no device sync: sequences
    of ints and CPU tensors here; tensors on an accelerator by a device-side assertion (no host sync, so
    the call can be captured in a CUDA graph). high: the largest value allowed, None for no bound here."""
    if isinstance(value, Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise RuntimeError(f"lossops: {name} must be integral, got dtype {value.dtype}")
        if value.device != device and not (value.device.type == "cpu" and value.dim() == 0):
            raise RuntimeError(f"lossops: {name} is on {value.device} but log_probs is on {device}")
        if value.dim() == 0 and not batched:
            value = value.reshape(1)
        items = value.tolist() if _checks.host_readable(value) and not torch.compiler.is_compiling() else None
        value = value.to(device=device, dtype=torch.int64)
    else:
        items = [value] if isinstance(value, int) and not batched else list(value) if not isinstance(value, int) \
            else None
        if items is None or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            raise TypeError(f"lossops: {name} must be a tensor or a sequence of ints, got {value!r}")
        value = torch.tensor(items, dtype=torch.int64, device=device)
    if value.dim() != 1 or value.shape[0] != batch:
        raise RuntimeError(f"lossops: {name} must have one entry per sequence ({batch}), "
                           f"got shape {tuple(value.shape)}")
    if items is not None:
        if items and min(items) < 0:
            raise RuntimeError(f"lossops: {name} must be non-negative, got {min(items)}")
        if high is not None and items and max(items) > high:
            raise RuntimeError(f"lossops: {name} value {max(items)} exceeds {_BOUNDS[name].format(high)}")
    elif not torch.compiler.is_compiling() and value.numel():
        bound = torch.iinfo(torch.int64).max if high is None else high
        torch._assert_async((value >= 0).all() & (value <= bound).all(),
                            f"lossops: {name} must lie in [0, {bound}]")
    return value


_BOUNDS = {"input_lengths": "the time steps of log_probs ({})", "target_lengths": "the padded targets' length {}"}


def _check_total_target_length(target_lengths: Tensor, targets: Tensor) -> None:
    """Concatenated targets: the lengths must not add up to more values than there are."""
    if _checks.host_readable(target_lengths):
        total = sum(target_lengths.tolist())  # Python integers: huge lengths cannot wrap around to a small sum
        if total > targets.numel():
            raise RuntimeError(f"lossops: target_lengths sum to {total} but the concatenated targets have "
                               f"{targets.numel()} values")
    elif target_lengths.numel():
        # each length bounded first, so the int64 sum cannot wrap
        torch._assert_async((target_lengths <= targets.numel()).all() & (target_lengths.sum() <= targets.numel()),
                            f"lossops: target_lengths sum to more than the {targets.numel()} concatenated targets")


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
    if o.reduction == "mean":  # each sequence's loss over its target length (at least 1), then over the batch
        scale = t["target_lengths"].clamp_min(1).to(acc).mul_(N).reciprocal_()
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
        loss = torch.dot(nll, scale) if N else nll.sum() / 0  # an empty batch's mean is nan, as torch's
    return loss, {"log_probs": grad}


def _loss_like(t, o):
    lp = t["log_probs"]
    return lp.new_empty((lp.shape[1],) if o.reduction == "none" else (), dtype=_checks.opmath_dtype(lp.dtype))


def reference_ctc(log_probs, targets, input_lengths, target_lengths, options: CTCOptions) -> Tensor:
    """torch's own ctc_loss (the "reference" backend), after lossops' checks; low precision runs in float32.

    A log-probability of -inf is raised to the dtype's lowest finite value first: torch's gradient there is
    exp(-inf) - exp(-inf + inf) = NaN, whose limit is 0. The loss is the same (e^lowest is 0 as e^-inf is), the
    posterior through such an emission now underflows to 0, and the clamp's own gradient there is 0: the limit.
    """
    low = log_probs.dtype in (torch.bfloat16, torch.float16)
    lp = log_probs.float() if low else log_probs
    lp = lp.clamp_min(torch.finfo(lp.dtype).min)
    loss = F.ctc_loss(lp, targets.long(), input_lengths, target_lengths,
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


def _torch_ctc_upcast(log_probs, *args, **kwargs):
    """What a torch user writes for bf16/fp16 log_probs, which torch's CPU ctc_loss refuses: the benchmark's eager."""
    low = log_probs.dtype in (torch.bfloat16, torch.float16)
    return F.ctc_loss(log_probs.float() if low else log_probs, *args, **kwargs)


# For plain CPU calls with int64 length tensors (lossops._eager): the mean over each sequence's target length.
EAGER_ROUTE = _eager.EagerRoute(
    "sequences", "target_lengths",
    scalars=(_eager.Scalar("blank", "int", below_classes=True), _eager.Scalar("zero_infinity", "flag")),
    gradients={"grad": "log_probs"}, node="LossopsCtcLossBackward")

CTC = _family.register(_family.Family(
    name="ctc_loss",
    inputs=(_family.Input("log_probs", differentiable=True), _family.Input("targets"), _family.Input("target_offsets"),
            _family.Input("input_lengths"), _family.Input("target_lengths")),
    options=CTCOptions, kernel=KERNEL, run=_run, loss_like=_loss_like, item_shape=lambda t, o: (1, -1, 1),
    eager_routes=(EAGER_ROUTE,),
    reference=reference_ctc, function=ctc_loss, torch_fn=F.ctc_loss,
    cases=(_family.Case(_sequences, dict(reduction="mean"), F.ctc_loss,
                        bad=("target_out_of_range", dict(blank=6), dict(blank=-1))),
           _family.Case(functools.partial(_sequences, T=5, S=3), dict(reduction="none", zero_infinity=True),
                        F.ctc_loss)),
    selfcheck=({}, F.ctc_loss, _selfcheck_inputs),
    bench=_family.Bench(_torch_ctc_upcast, None,
                        ((200, 32, 30, 50), (150, 16, 1000, 40), (500, 8, 30, 150), (50, 2, 10, 10)),
                        quick_shapes=((20, 2, 10, 5),), columns="T, N, C, S", make_inputs=_bench_inputs,
                        grid_shapes=((50, 2, 10, 10), (200, 32, 30, 50), (150, 16, 1000, 40), (500, 8, 30, 150)),
                        grid_quick_shapes=((20, 2, 10, 5),),
                        targets=tuple(_family.SpeedTarget(s, 4.0) for s in ((200, 32, 30, 50), (150, 16, 1000, 40),
                                                                            (500, 8, 30, 150))))
))
CTC.module = _family.make_module(CTC, "CTCLoss", inputs=4, doc="Drop-in for torch.nn.CTCLoss.")

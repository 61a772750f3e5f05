"""`lossops.triplet_margin_loss` and `lossops.triplet_margin_with_distance_loss`: torch's functions, fused, as the
custom ops `lossops::triplet_margin_loss` and `lossops::triplet_margin_with_distance_loss`.

torch's definition (aten's triplet_margin_loss, torch.nn.functional.triplet_margin_with_distance_loss): with
dist(x, y) = ||x - y + eps||_p over the last dimension (torch's pairwise_distance, eps added to every difference),
the loss max(margin + dist(a, p) - dist(a, n), 0), where swap replaces dist(a, n) by min(dist(a, n), dist(p, n));
the mean is over the loss's elements. Inputs have one number of dimensions and broadcast as torch's differences
do. The distance-function variant's default distance is pairwise_distance with p=2, eps=1e-6; a PairwiseDistance
Module or torch's pairwise_distance with its defaults is that distance too. Kernels: csrc/triplet_margin.cpp,
triton_kernels/triplet_margin.py (one pass over each row triple: its norms and the three gradients).
What the kernels do not take (integer or complex inputs, 0-d inputs, a p outside (0, inf), a distance function of
the caller's, arguments of types torch converts, a last dimension one pair broadcasts differently) takes torch's
own function, whose errors are then torch's.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules import module as _module

from .. import _backend, _checks, _eager, _family, _reduce
from .._family import GridShapes as G
from .._elementwise import denominator_tensor

KERNEL = _family.Kernel("triplet_margin_loss", "triplet_margin",
                        ("anchor", "positive", "negative", "margin", "p", "eps", "swap", "grad_anchor",
                         "grad_positive", "grad_negative", "grad_scale", "per_element"))
_POSITIVE = math.ulp(0.0)  # the smallest positive float: margin > 0 and p > 0 as inclusive bounds
_GRADIENTS = {"grad_anchor": "anchor", "grad_positive": "positive", "grad_negative": "negative"}
_SCALARS = (_eager.Scalar("margin", low=_POSITIVE), _eager.Scalar("p", low=_POSITIVE), _eager.Scalar("eps"),
            _eager.Scalar("swap", kind="flag"))
# torch's options for plain CPU calls of three (N, D) rows (lossops._eager): the mean over the rows.
EAGER_ROUTE = _eager.EagerRoute("row_triples", "batch", scalars=_SCALARS, gradients=_GRADIENTS,
                                node="LossopsTripletMarginLossBackward")
DISTANCE_EAGER_ROUTE = _eager.EagerRoute("row_triples", "batch", scalars=_SCALARS, gradients=_GRADIENTS,
                                         node="LossopsTripletMarginWithDistanceLossBackward")
INPUTS = (_family.Input("anchor", differentiable=True), _family.Input("positive", differentiable=True),
          _family.Input("negative", differentiable=True), _family.Input("denominator"))
LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class TripletMarginOptions:
    margin: float = 1.0
    p: float = 2.0
    eps: float = 1e-6
    swap: bool = False
    reduction: str = "mean"


def _run(family, backend, t, o, grads):
    g = {name: _backend.empty_gradient(t[name]) if grads[name] else None for name in _GRADIENTS.values()}
    row_loss, total = KERNEL(backend, anchor=t["anchor"], positive=t["positive"], negative=t["negative"],
                             margin=o.margin, p=o.p, eps=o.eps, swap=o.swap, grad_anchor=g["anchor"],
                             grad_positive=g["positive"], grad_negative=g["negative"],
                             grad_scale=_reduce.gradient_scale(o.reduction, t["denominator"]),
                             per_element=o.reduction == "none")
    return _reduce.reduce(o.reduction, row_loss, total, t["denominator"]), g


def _loss_like(t, o):
    a = t["anchor"]
    return a.new_empty(a.shape[:1] if o.reduction == "none" else (), dtype=_checks.opmath_dtype(a.dtype))


def _item_shape(t, _o):
    return (t["anchor"].shape[0], 1)  # a row's grad_output scales its gradient rows


def _triples(dtype):
    return [torch.randn(6, 5, dtype=dtype), torch.randn(6, 5, dtype=dtype), torch.randn(6, 5, dtype=dtype)]


def _selfcheck_triples(dtype):
    return tuple(torch.randn(512, 64, dtype=dtype) for _ in range(3))


def _bench_triples(shape, dtype, device):
    return tuple(torch.randn(shape, dtype=dtype, device=device).requires_grad_() for _ in range(3))


def _plain_number(value) -> bool:
    return type(value) in (float, int)


def _broadcast(a_shape, b_shape, names: str = "") -> torch.Size:
    """torch's broadcast of two shapes, with torch's error for a tensor a and b (traceable by torch.compile), which
    names the two tensors (`names`) where given."""
    ndim = max(len(a_shape), len(b_shape))
    a = (1,) * (ndim - len(a_shape)) + tuple(a_shape)
    b = (1,) * (ndim - len(b_shape)) + tuple(b_shape)
    for dim, (x, y) in enumerate(zip(a, b)):
        if x != y and x != 1 and y != 1:
            raise RuntimeError(f"The size of tensor a ({x}) must match the size of tensor b ({y}) at non-singleton "
                               f"dimension {dim}" + (f" (lossops: {names} of shapes {tuple(a_shape)} and "
                                                     f"{tuple(b_shape)})" if names else ""))
    return torch.Size(y if x == 1 else x for x, y in zip(a, b))


def _fused(anchor, positive, negative, options: TripletMarginOptions, family, autocast_float32: bool):
    """The loss through the family's op, or None where the kernels do not serve the call (torch's function then
    does). The arguments' types and torch's checks have been made; the shapes' errors are raised here, in torch's
    order (the two distances, the swap distance, then their difference)."""
    pair_ap = _broadcast(anchor.shape, positive.shape, "anchor and positive")
    pair_an = _broadcast(anchor.shape, negative.shape, "anchor and negative")
    pair_pn = _broadcast(positive.shape, negative.shape, "positive and negative") if options.swap else pair_ap
    if anchor.dim() == 0:
        return None
    rows = _broadcast(pair_ap[:-1], pair_an[:-1])
    _checks.same_device(anchor, "anchor", positive=positive, negative=negative)
    dtype = torch.promote_types(torch.promote_types(anchor.dtype, positive.dtype), negative.dtype)
    features = {pair_ap[-1], pair_an[-1], pair_pn[-1]}
    if not dtype.is_floating_point or len(features) != 1 or not 0 < options.p < math.inf:
        return None
    backend = _backend.resolve(anchor.device)
    if backend == "reference":
        return None
    shape = (rows.numel(), pair_ap[-1])
    first, second, third = _kernel_triple(anchor, positive, negative, dtype)
    a, p, n = (x.expand(*rows, shape[1]).reshape(shape).contiguous() for x in (first, second, third))
    grad_enabled = torch.is_grad_enabled()
    loss = family.apply(
        backend, {"anchor": a, "positive": p, "negative": n, "denominator": denominator_tensor(shape[0], a)}, options,
        {name: grad_enabled and x.requires_grad for name, x in (("anchor", a), ("positive", p), ("negative", n))})
    loss = loss.reshape(rows) if options.reduction == "none" else loss
    return loss.to(torch.float32 if autocast_float32 and dtype != torch.float64 else dtype)


def _kernel_triple(anchor: Tensor, positive: Tensor, negative: Tensor, dtype: torch.dtype):
    """The kernel's inputs in the dtypes it reads: all in the promoted dtype, except that a low-precision anchor
    beside float32 positive and negative is read as it is (their differences are formed in float32, as torch's
    promotion forms them), and three tensors of one low-precision dtype are read as they are (the kernel accumulates
    in float32: under autocast torch computes in float32 too, and otherwise only more exactly)."""
    if anchor.dtype in LOW_PRECISION:
        if positive.dtype == negative.dtype == anchor.dtype:
            return anchor, positive, negative
        if positive.dtype == negative.dtype == torch.float32:
            return anchor, positive, negative
    return anchor.to(dtype), positive.to(dtype), negative.to(dtype)


def triplet_margin_loss(anchor: Tensor, positive: Tensor, negative: Tensor, margin: float = 1.0, p: float = 2,
                        eps: float = 1e-6, swap: bool = False, size_average=None, reduce=None,
                        reduction: str = "mean") -> Tensor:
    """Drop-in for torch.nn.functional.triplet_margin_loss, fused forward+backward (the three inputs' gradients)."""
    # The C++ eager path first: None for anything it does not serve, errors included, which the checks below raise
    if size_average is None and reduce is None and not _eager.compiling():
        loss = EAGER_ROUTE.call(reduction, anchor, positive, negative, margin, p, eps, swap)
        if loss is not None:
            return loss
    reduction = _checks.reduction(reduction, size_average, reduce)
    if margin <= 0:  # torch's check, made in Python on whatever margin is
        raise ValueError(f"margin must be greater than 0, got {margin}")

    def torch_function():
        return F.triplet_margin_loss(anchor, positive, negative, margin=margin, p=p, eps=eps, swap=swap,
                                     reduction=reduction)

    tensors = (anchor, positive, negative)
    if not (all(isinstance(t, Tensor) for t in tensors) and all(map(_plain_number, (margin, p, eps)))
            and type(swap) is bool):
        return torch_function()  # torch's argument parser: its conversions and its TypeErrors
    if not anchor.dim() == positive.dim() == negative.dim():
        raise RuntimeError(f"The anchor, positive, and negative tensors are expected to have the same number of "
                           f"dimensions, but got: anchor {anchor.dim()}D, positive {positive.dim()}D, and negative "
                           f"{negative.dim()}D inputs")
    options = TripletMarginOptions(float(margin), float(p), float(eps), swap, reduction)
    loss = _fused(anchor, positive, negative, options, TRIPLET_MARGIN_LOSS,
                  autocast_float32=_checks.autocast_enabled(anchor.device))
    return torch_function() if loss is None else loss


def _pairwise_distance_options(distance_function):
    """(p, eps) where distance_function is torch's pairwise_distance as it would run: None (the default), the
    function itself, or a PairwiseDistance Module with no hooks and keepdim=False; else None."""
    if distance_function is None or distance_function is torch.pairwise_distance:
        return 2.0, 1e-6
    if type(distance_function) is torch.nn.PairwiseDistance and not distance_function.keepdim:
        m = distance_function
        hooks = (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                 or _module._global_forward_hooks or _module._global_forward_pre_hooks
                 or _module._global_backward_hooks or _module._global_backward_pre_hooks)
        if not hooks and _plain_number(m.norm) and _plain_number(m.eps):
            return float(m.norm), float(m.eps)
    return None


def triplet_margin_with_distance_loss(anchor: Tensor, positive: Tensor, negative: Tensor, *, distance_function=None,
                                      margin: float = 1.0, swap: bool = False, reduction: str = "mean") -> Tensor:
    """Drop-in for torch.nn.functional.triplet_margin_with_distance_loss. The default distance (and torch's
    pairwise_distance, or a PairwiseDistance Module, as the distance) is fused forward+backward; any other distance
    function is torch's function, with autograd through the caller's distance."""
    distance = _pairwise_distance_options(distance_function)
    if distance is not None and not _eager.compiling():
        loss = DISTANCE_EAGER_ROUTE.call(reduction, anchor, positive, negative, margin, *distance, swap)
        if loss is not None:
            return loss

    def torch_function():
        return F.triplet_margin_with_distance_loss(anchor, positive, negative, distance_function=distance_function,
                                                   margin=margin, swap=swap, reduction=reduction)

    # torch's checks, in its order and words (made in Python there too, on whatever the arguments are)
    if reduction not in _checks.REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if margin <= 0:
        raise ValueError(f"margin must be greater than 0, got {margin}")
    if not anchor.ndim == positive.ndim == negative.ndim:
        raise RuntimeError(f"The anchor, positive, and negative tensors are expected to have the same number of "
                           f"dimensions, but got: anchor {anchor.ndim}D, positive {positive.ndim}D, and negative "
                           f"{negative.ndim}D inputs")
    tensors = (anchor, positive, negative)
    if (distance is None or not all(isinstance(t, Tensor) for t in tensors) or not _plain_number(margin)
            or type(swap) is not bool):
        return torch_function()  # the caller's distance, or torch's handling of other argument types
    options = TripletMarginOptions(float(margin), *distance, swap, reduction)
    loss = _fused(anchor, positive, negative, options, TRIPLET_MARGIN_WITH_DISTANCE_LOSS, autocast_float32=False)
    return torch_function() if loss is None else loss


def reference_triplet_margin(anchor, positive, negative, denominator, options: TripletMarginOptions) -> Tensor:
    """Plain PyTorch (the "reference" backend), on the op's (N, D) rows: torch's function."""
    return F.triplet_margin_loss(anchor, positive, negative, margin=options.margin, p=options.p, eps=options.eps,
                                 swap=options.swap, reduction=options.reduction)


def reference_triplet_margin_with_distance(anchor, positive, negative, denominator,
                                           options: TripletMarginOptions) -> Tensor:
    """Plain PyTorch (the "reference" backend), on the op's (N, D) rows: torch's function with its distance."""
    return F.triplet_margin_with_distance_loss(
        anchor, positive, negative, margin=options.margin, swap=options.swap, reduction=options.reduction,
        distance_function=lambda x, y: torch.pairwise_distance(x, y, options.p, options.eps))


def _check_margin(name):
    def check(margin, **_):
        if margin <= 0:  # torch's Modules check it when constructed
            raise ValueError(f"{name}: expected margin to be greater than 0, got {margin} instead")
    return check


_BENCH_SHAPES = dict(shapes=((256, 1000), (4096, 1024), (4096, 4096)), columns="features",
                     make_inputs=_bench_triples, grid_shapes=G.TINY + G.MID + G.ELEMENTWISE_LARGE,
                     grid_quick_shapes=G.TINY)

TRIPLET_MARGIN_LOSS = _family.register(_family.Family(
    name="triplet_margin_loss", inputs=INPUTS, options=TripletMarginOptions, kernel=KERNEL, run=_run,
    loss_like=_loss_like, item_shape=_item_shape, reference=reference_triplet_margin,
    function=triplet_margin_loss, torch_fn=F.triplet_margin_loss, eager_routes=(EAGER_ROUTE,),
    bad_inputs="row_triples",
    cases=(_family.Case(_triples, dict(margin=0.5), F.triplet_margin_loss, target=2,
                        bad=(dict(margin=0.0), dict(margin=-1.0))),
           _family.Case(_triples, dict(p=1.5, swap=True), F.triplet_margin_loss, target=2)),
    selfcheck=(dict(margin=0.3, swap=True), lambda *a: F.triplet_margin_loss(*a, margin=0.3, swap=True),
               _selfcheck_triples),
    bench=_family.Bench(F.triplet_margin_loss, lambda x: x, **_BENCH_SHAPES)))
TRIPLET_MARGIN_LOSS.module = _family.make_module(TRIPLET_MARGIN_LOSS, "TripletMarginLoss", inputs=3,
                                                 check=_check_margin("TripletMarginLoss"),
                                                 doc="Drop-in for torch.nn.TripletMarginLoss.")

TRIPLET_MARGIN_WITH_DISTANCE_LOSS = _family.register(_family.Family(
    name="triplet_margin_with_distance_loss", inputs=INPUTS, options=TripletMarginOptions, kernel=KERNEL, run=_run,
    loss_like=_loss_like, item_shape=_item_shape, reference=reference_triplet_margin_with_distance,
    function=triplet_margin_with_distance_loss, torch_fn=F.triplet_margin_with_distance_loss,
    eager_routes=(DISTANCE_EAGER_ROUTE,), bad_inputs="row_triples",
    cases=(_family.Case(_triples, dict(margin=0.5, swap=True), F.triplet_margin_with_distance_loss, target=2,
                        bad=(dict(margin=0.0),)),),
    selfcheck=(dict(margin=0.3), lambda *a: F.triplet_margin_with_distance_loss(*a, margin=0.3),
               _selfcheck_triples),
    bench=_family.Bench(F.triplet_margin_with_distance_loss, lambda x: x, **_BENCH_SHAPES)))


class TripletMarginWithDistanceLoss(_family.make_module(
        TRIPLET_MARGIN_WITH_DISTANCE_LOSS, "TripletMarginWithDistanceLoss", inputs=3, keyword_only=True,
        check=_check_margin("TripletMarginWithDistanceLoss"))):
    """Drop-in for torch.nn.TripletMarginWithDistanceLoss: as torch's, no distance_function stores a
    PairwiseDistance() (a child Module), which the fused path recognises as the default distance."""

    def __init__(self, *, distance_function=None, margin: float = 1.0, swap: bool = False,
                 reduction: str = "mean"):
        super().__init__(distance_function=torch.nn.PairwiseDistance() if distance_function is None
                         else distance_function, margin=margin, swap=swap, reduction=reduction)

    def extra_repr(self):  # the distance function shows as the child Module it is
        return _family.options_repr({"margin": self.margin, "swap": self.swap, "reduction": self.reduction},
                                    {"margin": 1.0, "swap": False, "reduction": "mean"})


TripletMarginWithDistanceLoss.__module__ = "lossops.nn"
TRIPLET_MARGIN_WITH_DISTANCE_LOSS.module = TripletMarginWithDistanceLoss

"""Focal losses: `lossops.sigmoid_focal_loss` (+ `sigmoid_focal_loss_index`) and `lossops.softmax_focal_loss`.

Sigmoid focal has torchvision.ops.sigmoid_focal_loss's semantics (alpha < 0 disables the alpha term, soft
targets allowed) on the shared elementwise driver (lossops/_elementwise.py; kernels csrc/focal.cpp and
triton_kernels/focal.py), with a gradient that stays finite for every gamma >= 0 (see csrc/focal.cpp).
Softmax focal is a per-row variant of cross-entropy: its own op `lossops::softmax_focal_loss` on the
cross-entropy kernel (lossops.losses.cross_entropy.declare_rows, with focal_gamma set).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks, _eager, _elementwise, _family, _reduce, _sharding
from .._family import GridShapes as G
from .cross_entropy import declare_rows, row_softmax_loss, rows_class_dim

SIGMOID_FOCAL_KERNEL = _elementwise.kernel("sigmoid_focal", "focal", ("alpha", "gamma"))


@dataclasses.dataclass(frozen=True)
class SigmoidFocalOptions(_elementwise.ElementwiseOptions):
    alpha: float = 0.25
    gamma: float = 2.0


@dataclasses.dataclass(frozen=True)
class SoftmaxFocalOptions:
    gamma: float = 2.0
    ignore_index: int = -100
    reduction: str = "mean"
    uniform_alpha: Optional[float] = None  # alpha given as a float: every class; the mean counts targets


def _focal_kernel_options(_tensors, o):
    return {"alpha": o.alpha, "gamma": o.gamma}


def sigmoid_focal_loss(inputs: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "none", *, weight: Optional[Tensor] = None, avg_factor=None) -> Tensor:
    """torchvision.ops.sigmoid_focal_loss, fused: alpha_t * (1 - p_t)^gamma * BCE-with-logits per element.

    Extras (defaults reproduce torchvision): `weight`, per-element weights broadcastable to the inputs (the
    mean still divides by the number of elements), and `avg_factor`, which replaces the mean's denominator
    (mmdetection's convention). Gradients with respect to targets come from the plain-PyTorch reference.
    """
    reduction = _checks.reduction(reduction)
    alpha, gamma = _alpha(alpha), _gamma(gamma)
    if weight is None and avg_factor is None:
        options = SigmoidFocalOptions(alpha=alpha, gamma=gamma)
        loss = _elementwise.eager(SIGMOID_FOCAL, inputs, targets, reduction, options)
        if loss is not None:
            return loss
    _checks.floating("inputs", inputs)
    _checks.floating("targets", targets)
    if targets.size() != inputs.size():
        raise ValueError(f"Target size ({targets.size()}) must be the same as input size ({inputs.size()})")
    _checks.same_device(inputs, targets=targets)
    weight = _checks.broadcastable("weight", weight, inputs.shape, inputs)
    factor = _elementwise.avg_factor(avg_factor, reduction)
    denominator = inputs.numel() if factor is None else factor

    def reference():
        loss = reference_sigmoid_focal(inputs, targets, alpha, gamma, weight)
        return _elementwise.reduce_reference(loss, reduction, denominator).to(_checks.output_dtype(inputs))

    return _elementwise.elementwise_loss(SIGMOID_FOCAL, inputs, targets.to(inputs.dtype),
                                         options=SigmoidFocalOptions(reduction, alpha=alpha, gamma=gamma),
                                         denominator=denominator, reference=reference, weight=weight,
                                         kernel_target_grad=False)


def sigmoid_focal_loss_index(inputs: Tensor, target_index: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                             reduction: str = "none", *, ignore_index: int = -100, weight: Optional[Tensor] = None,
                             avg_factor=None) -> Tensor:
    """Sigmoid focal loss with class-index targets (detection style), without building the one-hot targets.

    inputs (N, C) logits, target_index (N,) integers: c in [0, C) is a one-hot target on class c, C is
    background (all-zero target row), ignore_index rows contribute 0 to the loss and the gradient. Equals
    sigmoid_focal_loss(inputs[kept], one_hot(target_index[kept]), ...): the mean divides by C times the
    number of non-ignored rows (nan when every row is ignored, like cross_entropy), or by avg_factor.
    """
    reduction = _checks.reduction(reduction)
    alpha, gamma = _alpha(alpha), _gamma(gamma)
    _checks.floating("inputs", inputs)
    _checks.tensor("target_index", target_index)
    _checks.same_device(inputs, target_index=target_index)
    if inputs.dim() != 2:
        raise ValueError(f"lossops: sigmoid_focal_loss_index expects (N, C) inputs, got shape {tuple(inputs.shape)}")
    if target_index.is_floating_point() or target_index.is_complex() or target_index.dtype == torch.bool:
        raise TypeError(f"lossops: target_index must be an integer tensor, got dtype {target_index.dtype}")
    if target_index.shape != inputs.shape[:1]:
        raise ValueError(f"lossops: target_index must have shape ({inputs.shape[0]},) for inputs of shape "
                         f"{tuple(inputs.shape)}, got {tuple(target_index.shape)}")
    weight = _checks.broadcastable("weight", weight, inputs.shape, inputs)
    factor = _elementwise.avg_factor(avg_factor, reduction)
    denominator = factor
    if denominator is None:
        denominator = (target_index != ignore_index).sum(dtype=_checks.opmath_dtype(inputs.dtype)) * inputs.shape[1]

    def reference():
        loss = reference_sigmoid_focal_index(inputs, target_index, alpha, gamma, weight, ignore_index)
        return _elementwise.reduce_reference(loss, reduction, denominator).to(_checks.output_dtype(inputs))

    options = SigmoidFocalOptions(reduction, ignore_index=ignore_index, alpha=alpha, gamma=gamma)
    return _elementwise.elementwise_loss(SIGMOID_FOCAL_INDEX, inputs, target_index.to(torch.int64), options=options,
                                         denominator=denominator, reference=reference, weight=weight)


def softmax_focal_loss(input: Tensor, target: Tensor, alpha: Union[None, float, Tensor] = None, gamma: float = 2.0,
                       ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Multi-class focal loss on the softmax: -alpha_y * (1 - p_y)^gamma * log p_y per non-ignored target.

    Layouts and class-index targets as cross_entropy. alpha: None (no weighting), a float (every class; the
    mean divides by the number of non-ignored targets) or a per-class tensor (acts as cross_entropy's weight,
    the mean divides by the sum of the targets' alphas), so gamma=0 equals cross_entropy(weight=alpha).
    """
    tensor_alpha = isinstance(alpha, Tensor)
    if not _eager.compiling():
        # As for cross_entropy: the C++ eager path returns None for anything it does not serve, errors included.
        if alpha is None or tensor_alpha:
            loss = EAGER_PER_CLASS_ALPHA.call(reduction, input, target, alpha, ignore_index, gamma)
        else:
            loss = EAGER_UNIFORM_ALPHA.call(reduction, input, target, None, ignore_index, gamma, alpha)
        if loss is not None:
            return loss
    reduction = _checks.reduction(reduction)
    gamma = _gamma(gamma)
    _checks.floating("input", input)
    _checks.tensor("target", target)
    if input.dim() >= 1 and target.shape == input.shape:
        raise ValueError(f"lossops: softmax_focal_loss takes class-index targets, got a target of the input's shape "
                         f"{tuple(input.shape)}")
    uniform = None
    if alpha is not None and not isinstance(alpha, Tensor):
        uniform = _checks.in_range("alpha", alpha, 0.0)
        if math.isinf(uniform):
            raise ValueError(f"lossops: alpha must be finite, got {uniform}")
    options = SoftmaxFocalOptions(gamma, ignore_index, reduction, uniform)
    return row_softmax_loss(SOFTMAX_FOCAL, input, target, alpha if isinstance(alpha, Tensor) else None, options,
                            weight_name="alpha")


def _gamma(gamma) -> float:
    value = _checks.in_range("gamma", gamma, 0.0)
    if math.isinf(value):
        raise ValueError(f"lossops: gamma must be finite, got {value}")
    return value


def _alpha(alpha) -> float:
    """torchvision: alpha weighs positives and 1 - alpha negatives (any finite value, as torchvision takes it);
    a negative alpha disables the term."""
    value = float(alpha)
    if not math.isfinite(value):
        raise ValueError(f"lossops: alpha must be a finite number (negative disables it), got {value}")
    return value


def _focal_power(q: Tensor, gamma: float) -> Tensor:
    """q ** gamma with a finite gradient at q = 0 for 0 < gamma < 1. There the true derivative of the loss is 0
    (q^(gamma-1) multiplies dq, which vanishes like q), and autograd of q ** gamma would give inf * 0 = nan.
    The power runs in float64, where a float32 q >= 1e-45 cannot overflow q^(gamma-1)."""
    positive = q > 0
    powered = torch.where(positive, q, 1).double().pow(gamma)
    return torch.where(positive, powered, 0.0 ** gamma).to(q.dtype)


def reference_sigmoid_focal(inputs: Tensor, targets: Tensor, alpha: float, gamma: float,
                            weight: Optional[Tensor]) -> Tensor:
    """torchvision's formula in plain PyTorch (per element, in the accumulation dtype), with 1 - p_t written as
    p (1 - t) + (1 - p) t, which stays exact near 0, and the power from _focal_power."""
    acc = _checks.opmath_dtype(inputs.dtype)
    x, t = inputs.to(acc), targets.to(acc)
    p = torch.sigmoid(x)
    # torch's BCE, (1 - t) x - logsigmoid(x), with the log1p term added last so that it is not rounded away
    ce = (1 - t) * x + torch.relu(-x) + torch.log1p(torch.exp(-x.abs()))
    loss = ce * _focal_power(p * (1 - t) + (1 - p) * t, gamma)
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss if weight is None else loss * weight


def reference_sigmoid_focal_index(inputs: Tensor, target_index: Tensor, alpha: float, gamma: float,
                                  weight: Optional[Tensor], ignore_index: int) -> Tensor:
    classes = inputs.shape[1]
    _checks.class_index_in_range("target_index", target_index, classes + 1, ignore_index)
    onehot = target_index.unsqueeze(1) == torch.arange(classes, device=inputs.device)
    loss = reference_sigmoid_focal(inputs, onehot.to(inputs.dtype), alpha, gamma, weight)
    return torch.where((target_index != ignore_index).unsqueeze(1), loss, 0)


def reference_softmax_focal(input: Tensor, target: Tensor, weight: Optional[Tensor],
                            options: SoftmaxFocalOptions) -> Tensor:
    """-alpha_y (1 - p_y)^gamma log p_y in plain PyTorch, reduced as softmax_focal_loss documents."""
    acc = _checks.opmath_dtype(input.dtype)
    class_dim = 1 if input.dim() > 1 else 0
    ignore_index, focal_gamma = options.ignore_index, options.gamma
    _checks.class_index_in_range("target", target, input.shape[class_dim], ignore_index)
    keep = target != ignore_index
    safe = torch.where(keep, target, 0).long()
    if input.shape[class_dim] == 0:  # no classes: every target is ignored (checked above), nothing to gather
        logp = input.to(acc).sum(class_dim)
    else:
        logp = torch.log_softmax(input.to(acc), class_dim)
        logp = logp.gather(class_dim, safe.unsqueeze(class_dim)).squeeze(class_dim)
    if options.uniform_alpha is not None:  # rounded to the input's dtype first, as a per-class tensor would be
        w = torch.full((), options.uniform_alpha, dtype=input.dtype, device=input.device).to(acc)
    else:
        w = torch.ones((), dtype=acc, device=input.device) if weight is None else weight.to(acc)[safe]
    loss = torch.where(keep, -w * _focal_power(-torch.expm1(logp), focal_gamma) * logp, 0)
    if weight is not None:
        denominator = (w * keep).sum()
    else:
        denominator = keep.sum(dtype=acc)
    return _elementwise.reduce_reference(loss, options.reduction, denominator).to(_checks.output_dtype(input))


def _softmax_focal_kernel_options(t, o: SoftmaxFocalOptions):
    weight = t["weight"]
    if o.uniform_alpha is not None:  # in the input's dtype, as a per-class alpha tensor would be
        logits3 = t["input"]
        weight = torch.full((logits3.shape[1],), o.uniform_alpha, dtype=logits3.dtype, device=logits3.device)
    return weight, dict(ignore_index=o.ignore_index, reduction=o.reduction, focal_gamma=o.gamma,
                        weight_normalizes_mean=o.uniform_alpha is None)


def _classes(dtype):
    return [torch.randn(6, 5, dtype=dtype), torch.tensor([0, 4, -100, 2, 2, 1])]


def _background_classes(dtype):
    """Detection-style: class C (=5) is background."""
    return [torch.randn(6, 5, dtype=dtype), torch.tensor([0, 5, -100, 2, 4, 5])]


def _logits_and_binary(dtype):
    return [torch.randn(6, 5, dtype=dtype), torch.randint(0, 2, (6, 5)).to(dtype)]


def _selfcheck_classes(dtype):
    return torch.randn(64, 1000, dtype=dtype) * 3, torch.randint(0, 1000, (64,))


def _selfcheck_binary(dtype):
    return torch.randn(512, 80, dtype=dtype) * 4, torch.rand(512, 80, dtype=dtype).round()


def torchvision_sigmoid_focal_loss(x, target, alpha=0.25, gamma=2.0, reduction="mean"):
    """torchvision.ops.sigmoid_focal_loss, written out (torchvision is not a dependency): the benchmark's eager
    side and the self-check's truth."""
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


def plain_softmax_focal_loss(x, target, gamma=2.0, reduction="mean"):
    """Softmax focal loss in eager PyTorch, as a user would write it: the benchmark's eager side."""
    log_p = F.log_softmax(x, dim=1).gather(1, target[:, None]).squeeze(1)
    loss = -((1 - log_p.exp()) ** gamma) * log_p
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


def _binary_target(x: Tensor) -> Tensor:
    return torch.randint(0, 2, x.shape, device=x.device).to(x.dtype)


def class_index(x: Tensor) -> Tensor:
    return torch.randint(0, x.shape[1], x.shape[:1], device=x.device)


SIGMOID_FOCAL = _elementwise.declare(
    "sigmoid_focal_loss", SigmoidFocalOptions, SIGMOID_FOCAL_KERNEL, _focal_kernel_options,
    eager_gradients=("input",),  # the targets' gradient comes from the reference
    function=sigmoid_focal_loss, bad_inputs="elementwise",
    cases=(_family.Case(_logits_and_binary, dict(reduction="mean"), bad=(dict(gamma=-0.5),)),),
    selfcheck=(dict(reduction="mean"), torchvision_sigmoid_focal_loss, _selfcheck_binary),
    bench=_family.Bench(torchvision_sigmoid_focal_loss, _binary_target, ((256, 80), (65536, 80), (4096, 1000)),
                        quick_shapes=((128, 80), (128, 320)), kwargs={"alpha": 0.25, "gamma": 2.0, "reduction": "mean"},
                        grid_shapes=G.TINY + G.SMALL_CLASSES + G.MID + G.ELEMENTWISE_LARGE, grid_quick_shapes=G.TINY,
                        targets=(_family.SpeedTarget((1000, 80), 2.0),
                                 _family.SpeedTarget((65536, 80), 5.0, dtype="float32", threads="all"))))
SIGMOID_FOCAL_INDEX = _elementwise.declare(
    "sigmoid_focal_loss_index", SigmoidFocalOptions, SIGMOID_FOCAL_KERNEL, _focal_kernel_options, eager_gradients=(),
    function=sigmoid_focal_loss_index, sharding=_sharding.Sharding(lambda x: 1),  # target_index: (N,) of (N, C)
    cases=(_family.Case(_background_classes, dict(reduction="sum"), bad=("target_out_of_range",)),))
def _softmax_focal_denominator(a: dict) -> Tensor:
    """The mean's denominator for one rank's rows: the targets' alphas (a tensor alpha) or their count."""
    x, t, alpha = a["input"], a["target"], a["alpha"]
    return _reduce.class_index_denominator(t, alpha if isinstance(alpha, Tensor) else None, a["ignore_index"],
                                           x.shape[rows_class_dim(x)], _checks.opmath_dtype(x.dtype))


# For plain CPU calls (lossops._eager): alpha None or per class acts as cross_entropy's weight (the mean over the
# kept targets' alphas, or their count); a float alpha weighs every class alike and the mean counts the kept targets.
_FOCAL_SCALARS = (_eager.Scalar("ignore_index", "int"), _eager.Scalar("focal_gamma", "real", 0.0))
_FOCAL_CONSTANTS = {"label_smoothing": 0.0, "lse_square_scale": 0.0, "softcap": None}
EAGER_PER_CLASS_ALPHA = _eager.EagerRoute("class_rows", "kept_weight", _FOCAL_SCALARS, {"grad": "input"},
                                          _FOCAL_CONSTANTS, node="LossopsSoftmaxFocalLossBackward")
EAGER_UNIFORM_ALPHA = _eager.EagerRoute(
    "class_rows", "kept_rows", _FOCAL_SCALARS + (_eager.Scalar("weight", "real", 0.0, fills_weight=True),),
    {"grad": "input"}, _FOCAL_CONSTANTS, node="LossopsSoftmaxFocalLossBackward")

SOFTMAX_FOCAL = declare_rows(
    "softmax_focal_loss", SoftmaxFocalOptions, _softmax_focal_kernel_options, reference=reference_softmax_focal,
    function=softmax_focal_loss, bad_inputs="classes", eager_routes=(EAGER_PER_CLASS_ALPHA, EAGER_UNIFORM_ALPHA),
    sharding=_sharding.Sharding(rows_class_dim, whole=("alpha",), denominator=_softmax_focal_denominator),
    cases=(_family.Case(_classes, dict(gamma=1.5), bad=("target_out_of_range", dict(gamma=-1.0))),),
    selfcheck=(dict(gamma=0.0), F.cross_entropy, _selfcheck_classes),
    bench=_family.Bench(plain_softmax_focal_loss, class_index,
                        ((256, 1000), (65536, 80), (4096, 8192), (4096, 32000)),
                        kwargs={"gamma": 2.0, "reduction": "mean"},
                        grid_shapes=G.TINY + G.SMALL_CLASSES + G.MID + ((4096, 32000),), grid_quick_shapes=G.TINY))
SOFTMAX_FOCAL.module = _family.make_module(
    SOFTMAX_FOCAL, "SoftmaxFocalLoss",
    doc="lossops.softmax_focal_loss as a module; a per-class alpha tensor is a buffer (moves with .to()).")

"""Cross-entropy: `lossops.cross_entropy` (the op `lossops::cross_entropy`) and the softmax-row machinery it
shares with softmax focal loss (lossops/focal.py).

Call path: cross_entropy() validates (lossops._checks) -> row_softmax_loss() views the input as (outer, C, inner)
without moving the class dimension and calls the family's op -> the op runs the backend's fused kernel:
  - C++ (csrc/cross_entropy.cpp) through softmax_rows(), which returns the loss and, when a gradient is needed,
    writes it in the same pass while the row is in cache -> backward multiplies it by grad_output (lossops._reduce);
  - Triton (triton_kernels/cross_entropy.py): forward reads each row once and keeps its statistics (the op's state
    output) -> backward reads the row again and writes the gradient with grad_output applied on the device.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend, _checks, _eager, _family, _reduce, _sharding
from . import token_options, token_stats
from .._family import GridShapes as G
from ..distributed import vocab_parallel_cross_entropy

# One kernel for every loss over softmax rows; focal_gamma (None: off) makes it softmax focal loss.
KERNEL = _family.Kernel("cross_entropy", "cross_entropy",
                        ("input", "target", "weight", "grad", "ignore_index", "label_smoothing", "lse_square_scale",
                         "softcap", "focal_gamma", "grad_scale", "row_state"))
ROW_INPUTS = (_family.Input("input", differentiable=True), _family.Input("target"),
              _family.Input("weight", optional=True))
# torch's options on class-index targets, for plain CPU calls (lossops._eager): the mean over the kept targets'
# weights (their count without weights).
EAGER_ROUTE = _eager.EagerRoute(
    "class_rows", "kept_weight",
    scalars=(_eager.Scalar("ignore_index", "int"), _eager.Scalar("label_smoothing", "real", 0.0, 1.0)),
    gradients={"grad": "input"}, constants={"lse_square_scale": 0.0, "softcap": None, "focal_gamma": None},
    node="LossopsCrossEntropyBackward")


@dataclasses.dataclass(frozen=True)
class CrossEntropyOptions:
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    lse_square_scale: float = 0.0
    softcap: Optional[float] = None


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, size_average=None,
                  ignore_index: int = -100, reduce=None, reduction: str = "mean", label_smoothing: float = 0.0,
                  *, lse_square_scale: float = 0.0, softcap: Optional[float] = None,
                  inplace_backward: bool = False, temperature: float = 1.0, token_weight: Optional[Tensor] = None,
                  num_items_in_batch=None, return_token_stats: bool = False):
    """Drop-in for torch.nn.functional.cross_entropy, fused forward+backward.

    Extras (defaults reproduce torch exactly):
      lse_square_scale: z-loss; adds lse_square_scale * logsumexp(row)**2 to each non-ignored row's loss.
        It is not multiplied by the class weights, and the mean divides it by the number of non-ignored
        rows (the cross-entropy term by the sum of their weights), so rescaling weight leaves it unchanged.
      softcap: logits <- softcap * tanh(logits / softcap) before the softmax (gradient flows through it).
      inplace_backward: backward writes the gradient with respect to the logits over the logits' storage,
        so no second N x C buffer is allocated; until backward the logits are untouched (metrics and other
        terms computed from them are exact), after it they hold that gradient (grad_output applied). Refused
        for leaf tensors. A node that saved the logits and runs its backward after this loss's fails its
        version check instead of reading the gradient, as does a second backward (retain_graph=True).
        Falls back to out-of-place under torch.compile.
      temperature: the softmax of logits / temperature (after softcap), with its gradient.
      token_weight: one weight per token (the target's shape; for probability targets the input's without the
        class dimension): each token's loss is multiplied by it and the mean divides by the kept tokens' weights.
      num_items_in_batch: an int or a one-element tensor (no host sync); the loss is the sum / num_items_in_batch,
        as Hugging Face's Trainer normalises under gradient accumulation (reduction "mean" only).
      The rules combining them with weight, label smoothing and z-loss: lossops/losses/token_options.py.
      return_token_stats: True returns a LossWithTokenStats (loss, target_logprob, entropy, correct, logsumexp,
        z_loss), per token with the target's shape (class-index targets; lossops/losses/token_stats.py).
    """
    # The C++ eager path first, before any other layer (DTensors and other subclasses fail its type check and
    # reach the DTensor-aware full path below): at a few microseconds a call, a wrapper's frame was a tenth.
    # It checks what it relies on and returns None for anything else (errors included), which then takes the
    # full path and its messages.
    if (return_token_stats is False and not token_options.requested(temperature, token_weight, num_items_in_batch)
            and size_average is None and reduce is None and softcap is None and type(inplace_backward) is bool
            and type(lse_square_scale) is float and lse_square_scale == 0 and not _eager.compiling()):
        call = EAGER_ROUTE.call_in_place if inplace_backward else EAGER_ROUTE.call
        loss = call(reduction, input, target, weight, ignore_index, label_smoothing)
        if loss is not None:
            return loss
    return CROSS_ENTROPY.full_path(input, target, weight, size_average, ignore_index, reduce, reduction,
                                   label_smoothing, lse_square_scale=lse_square_scale, softcap=softcap,
                                   inplace_backward=inplace_backward, temperature=temperature,
                                   token_weight=token_weight, num_items_in_batch=num_items_in_batch,
                                   return_token_stats=return_token_stats)


def _full_cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, size_average=None,
                        ignore_index: int = -100, reduce=None, reduction: str = "mean", label_smoothing: float = 0.0,
                        *, lse_square_scale: float = 0.0, softcap: Optional[float] = None,
                        inplace_backward: bool = False, temperature: float = 1.0,
                        token_weight: Optional[Tensor] = None, num_items_in_batch=None,
                        return_token_stats: bool = False):
    """cross_entropy past its C++ eager path: every check, backend and input kind."""
    if return_token_stats is not False:
        return _with_token_stats(input, target, weight, size_average, ignore_index, reduce, reduction,
                                 label_smoothing, lse_square_scale, softcap, inplace_backward, temperature,
                                 token_weight, num_items_in_batch, return_token_stats)
    if token_options.requested(temperature, token_weight, num_items_in_batch):
        return _with_token_options(input, target, weight, size_average, ignore_index, reduce, reduction,
                                   label_smoothing, lse_square_scale, softcap, inplace_backward, temperature,
                                   token_weight, num_items_in_batch)
    reduction = _checks.reduction(reduction, size_average, reduce)
    label_smoothing = _checks.in_range("label_smoothing", label_smoothing, 0.0, 1.0, exception=RuntimeError)
    lse_square_scale = _checks.in_range("lse_square_scale", lse_square_scale, 0.0)
    cap = _checks.positive_or_none("softcap", softcap)
    if weight is not None:  # torch's cross_entropy refuses a weight of another dtype than the input's
        _checks.same_dtype(_checks.floating("input", input),
                           weight=_checks.floating("weight", weight, exception=RuntimeError))
    options = CrossEntropyOptions(ignore_index, reduction, label_smoothing, lse_square_scale, cap)
    return row_softmax_loss(CROSS_ENTROPY, input, target, weight, options, inplace_backward=inplace_backward)


def _with_token_options(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing,
                        lse_square_scale, softcap, inplace_backward, temperature, token_weight, num_items_in_batch):
    reduction = _checks.reduction(reduction, size_average, reduce)
    scale = token_options.temperature(temperature)
    softcap = token_options.scaled_softcap(softcap, scale)
    _checks.tensor("input", input)
    _checks.tensor("target", target)
    if scale != 1.0:
        input = input / scale
    probabilities = target.shape == input.shape
    item_shape = (input.shape[:1] + input.shape[2:] if input.dim() > 1 else ()) if probabilities else target.shape

    def per_token(class_weight, token_reduction, z_loss_scale):
        return cross_entropy(input, target, class_weight, ignore_index=ignore_index, reduction=token_reduction,
                             label_smoothing=label_smoothing, lse_square_scale=z_loss_scale, softcap=softcap,
                             inplace_backward=inplace_backward)

    return token_options.reduce_tokens(per_token, target, item_shape, weight,
                                       _checks.integer("ignore_index", ignore_index),
                                       reduction, lse_square_scale, token_weight, num_items_in_batch, probabilities)


def _with_token_stats(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing,
                      lse_square_scale, softcap, inplace_backward, temperature, token_weight, num_items_in_batch,
                      return_token_stats):
    _checks.tensor("input", input)
    _checks.tensor("target", target)
    token_stats.check_request(return_token_stats)  # anything but False: True, or a TypeError
    token_stats.check_targets(target)
    # The temperature is applied here, once, for the loss and the statistics alike.
    scale = token_options.temperature(temperature)
    cap = token_options.scaled_softcap(softcap, scale)
    if scale != 1.0:
        input = input / scale
    loss = cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing,
                         lse_square_scale=lse_square_scale, softcap=cap, inplace_backward=inplace_backward,
                         token_weight=token_weight, num_items_in_batch=num_items_in_batch)
    backend = _backend.resolve(input.device)
    if backend == "reference":
        rows = token_stats.reference_rows(input, target, ignore_index, cap, rows_class_dim(input))
    else:
        rows = token_stats.rows_stats(class_rows(input), target.reshape(-1).to(torch.int64).contiguous(),
                                      ignore_index, cap, backend)
    return token_stats.finish(loss, target, ignore_index, float(lse_square_scale), *rows)


def class_rows(input: Tensor) -> Tensor:
    """The (outer, C, inner) view the row kernels take, the class dimension left where it is."""
    num_classes = input.shape[1] if input.dim() >= 2 else input.shape[0]
    return input.reshape(1, num_classes, 1) if input.dim() == 1 else input.flatten(2) if input.dim() > 2 \
        else input.unsqueeze(-1)


def row_softmax_loss(family: _family.Family, input: Tensor, target: Tensor, weight: Optional[Tensor], options, *,
                     weight_name: str = "weight", inplace_backward: bool = False) -> Tensor:
    """Shared entry for every loss over softmax(input, dim=1): layout, checks, backend choice, the family's op.
    weight: the per-class tensor the family's op takes (weight_name: what the caller called it, for errors)."""
    _checks.floating("input", input)
    _checks.tensor("target", target)
    _checks.same_device(input, target=target)
    ignore_index = _checks.integer("ignore_index", options.ignore_index)
    if input.dim() == 0:
        raise ValueError("lossops: input must have at least one dimension (classes), got a 0-d tensor")
    num_classes = input.shape[1] if input.dim() >= 2 else input.shape[0]
    weight = _checks.class_weight(weight, num_classes, input, weight_name)
    probabilities = target.shape == input.shape
    _check_target(input, target, probabilities, ignore_index)

    needs_grad = torch.is_grad_enabled() and input.requires_grad
    if inplace_backward and needs_grad:
        _check_inplace_backward(input)
    backend = _backend.resolve(input.device)
    if backend == "reference" or (torch.is_grad_enabled() and (
            (probabilities and target.requires_grad) or (weight is not None and weight.requires_grad))):
        # Gradients with respect to probability targets and class weights come from the plain-PyTorch path.
        return family.reference(input, target, weight, options)

    logits3 = class_rows(input)
    if probabilities:
        target_k = (target.reshape(1, num_classes, 1) if input.dim() == 1 else target.flatten(2) if input.dim() > 2
                    else target.unsqueeze(-1))
        if target_k.dtype != input.dtype:  # kernels read the input's dtype or the accumulation dtype
            target_k = target_k.to(_checks.opmath_dtype(input.dtype))
    else:
        target_k = target.reshape(-1).to(torch.int64).contiguous()
    item_shape = target.shape if not probabilities else input.shape[:1] + input.shape[2:] if input.dim() > 1 else ()

    tensors = {"input": logits3, "target": target_k, "weight": weight}
    if inplace_backward and needs_grad and not torch.compiler.is_compiling():
        # The gradient lands in logits3: a view of the input's storage wherever class_rows could make one (contiguous
        # or class-sliced logits); where it had to copy, in that copy, still correct, with one buffer more.
        loss = _family.in_place_loss(family, input, backend, tensors, options)
    else:
        loss = family.apply(backend, tensors, options, {"input": needs_grad})
    if options.reduction == "none":
        loss = loss.reshape(item_shape)
    out_dtype = _checks.output_dtype(input)
    if probabilities:  # torch's loss is input * target: a float64 target makes a float64 loss
        out_dtype = torch.promote_types(out_dtype, target.dtype)
    return loss.to(out_dtype)


def _check_inplace_backward(input: Tensor) -> None:
    """inplace_backward=True writes the gradient over the logits: a leaf would lose its values and its .grad,
    and memory that several elements share (an expanded or overlapping view) would be written twice."""
    if input.is_leaf:
        raise RuntimeError("lossops: inplace_backward=True would overwrite a leaf tensor that requires grad "
                           "(its values and its .grad would be lost); pass inplace_backward=False")
    if not _checks.distinct_memory(input):
        raise RuntimeError(f"lossops: inplace_backward=True needs logits whose elements each have memory of their "
                           f"own, got a view of shape {tuple(input.shape)} with strides {input.stride()} (expanded or "
                           f"overlapping); pass inplace_backward=False, or a .contiguous() copy")


def _check_target(input: Tensor, target: Tensor, probabilities: bool, ignore_index: int) -> None:
    if probabilities:
        if not target.is_floating_point():
            raise RuntimeError(f"lossops: expected a floating point target for class probabilities (target has the "
                               f"input's shape {tuple(input.shape)}), got dtype {target.dtype}")
        if ignore_index >= 0:
            raise RuntimeError(f"lossops: ignore_index is not supported for class-probability targets, "
                               f"got {ignore_index}")
        return
    if target.dtype not in (torch.int64, torch.uint8):  # torch's nll_loss accepts exactly these two
        raise RuntimeError(f"lossops: class-index target must be an int64 or uint8 tensor, got dtype {target.dtype} "
                           f"and shape {tuple(target.shape)} (probability targets must have the input's shape "
                           f"{tuple(input.shape)})")
    expected = input.shape[:1] + input.shape[2:] if input.dim() >= 2 else torch.Size([])
    if input.dim() >= 2 and target.dim() >= 1 and target.shape[0] != input.shape[0]:
        raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
                         f"({target.shape[0]}).")
    if target.shape != expected:
        raise RuntimeError(f"lossops: expected target of shape {tuple(expected)} for input of shape "
                           f"{tuple(input.shape)}, got {tuple(target.shape)}")


def _denominator(logits3: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                 weight_normalizes_mean: bool) -> Tensor:
    acc = _checks.opmath_dtype(logits3.dtype)
    if target.is_floating_point():  # torch divides probability-target losses by the number of rows
        return torch.full((), logits3.shape[0] * logits3.shape[2], dtype=acc, device=logits3.device)
    return _reduce.class_index_denominator(target, weight if weight_normalizes_mean else None, ignore_index,
                                           logits3.shape[1], acc)


def mean_weights(target: Tensor, weight: Optional[Tensor], ignore_index: int, num_classes: int, reduction: str,
                 lse_square_scale: float, acc: torch.dtype) -> tuple[Optional[Tensor], Tensor]:
    """Cross-entropy with class-index targets: (the class weights the kernel multiplies by, the mean's denominator).

    The z-loss is not class-weighted: its mean is over the kept rows, the cross-entropy's over their weights. The
    kernels scale a whole row by one factor, so with both the weights carry count / sum_w instead (the
    cross-entropy part is linear in them) and every row is divided by the count.
    """
    denominator = _reduce.class_index_denominator(target, weight, ignore_index, num_classes, acc)
    weight = None if weight is None else weight.to(acc).contiguous()
    if reduction == "mean" and weight is not None and lse_square_scale > 0:
        count = _reduce.class_index_denominator(target, None, ignore_index, num_classes, acc)
        weight = weight * torch.where(count > 0, count / denominator, 1)
        denominator = count
    return weight, denominator


def softmax_rows(backend: str, logits3: Tensor, target: Tensor, weight: Optional[Tensor], grad: Optional[Tensor], *,
                 ignore_index: int, reduction: str, label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                 softcap: Optional[float] = None, focal_gamma: Optional[float] = None,
                 weight_normalizes_mean: bool = True, grad_output: Optional[Tensor] = None,
                 row_state: Optional[Tensor] = None) -> Optional[Tensor]:
    """The reduced loss over softmax rows of a (outer, C, inner) view, the gradient written into `grad` when given.

    weight_normalizes_mean: the mean divides by the kept targets' weights (False: by their count).
    grad_output: a scalar upstream gradient folded into the gradient's scale (one pass, no second multiply).
    row_state: without `grad`, an empty tensor the kernel may fill with what a later call with `grad` resumes from;
    with `grad` and a filled state, only the gradient is written and None is returned (csrc/cross_entropy.cpp).
    """
    acc = _checks.opmath_dtype(logits3.dtype)
    if focal_gamma is None and not target.is_floating_point():
        weight, denominator = mean_weights(target, weight, ignore_index, logits3.shape[1], reduction,
                                           lse_square_scale, acc)
    else:
        denominator = _denominator(logits3, target, weight, ignore_index, weight_normalizes_mean)
        weight = None if weight is None else weight.to(acc).contiguous()
    scale = _reduce.gradient_scale(reduction, denominator)
    if grad_output is not None:
        scale = scale * grad_output.to(scale.dtype)
    row_loss, _lse, total = KERNEL(backend, input=logits3, target=target, weight=weight, grad=grad,
                                   ignore_index=ignore_index, label_smoothing=label_smoothing,
                                   lse_square_scale=lse_square_scale, softcap=softcap, focal_gamma=focal_gamma,
                                   grad_scale=scale, row_state=row_state)
    if grad is not None and row_state is not None and row_state.numel():
        return None
    return _reduce.reduce(reduction, row_loss, total, denominator)


def _rows_run(family, backend, t, o, grads, in_place=False):
    """in_place (InPlaceGradient): no gradient now; the state backward's _rows_gradient resumes from."""
    weight, arguments = family.kernel_options(t, o)
    if family.gradient_in_backward(backend, o):
        loss, state = _backend.kernel(backend, "cross_entropy", "cross_entropy_forward")(
            input=t["input"], target=t["target"], **_gradient_in_backward_arguments(t["input"], t["target"], weight,
                                                                                     arguments))
        return loss, {"input": None}, state
    if in_place:
        row_state = t["input"].new_empty(0, dtype=_checks.opmath_dtype(t["input"].dtype))
        return softmax_rows(backend, t["input"], t["target"], weight, None, **arguments, row_state=row_state), \
            {"input": None}, row_state
    grad = _backend.empty_gradient(t["input"]) if grads["input"] else None
    return softmax_rows(backend, t["input"], t["target"], weight, grad, **arguments), {"input": grad}


def _rows_gradient(family, backend, t, o, grad_loss, needs, state, out=None):
    """The gradient of the loss _rows_run returned, into `out` when given (inplace_backward: the logits themselves):
    from the state on a backend that forms it in backward, else (a backend that writes it in forward) from the row
    kernel run again, which reads each row before writing it, with grad_output in its scale: resumed from the row
    state an in-place forward saved (None or empty: the whole kernel)."""
    if not needs["input"]:
        return {}
    weight, arguments = family.kernel_options(t, o)
    if not family.gradient_in_backward(backend, o):
        logits3 = t["input"]
        grad = _backend.empty_gradient(logits3) if out is None else out
        per_row = arguments["reduction"] == "none"
        softmax_rows(backend, logits3, t["target"], weight, grad, **arguments,
                     grad_output=None if per_row else grad_loss, row_state=state)
        if per_row:  # one upstream value per row: applied after the kernel, in the same buffer
            grad.mul_(grad_loss.reshape(_rows_item_shape(t, o)))
        return {"input": grad}
    arguments = _gradient_in_backward_arguments(t["input"], t["target"], weight, arguments)
    del arguments["weighted_mean"]
    grad = _backend.empty_gradient(t["input"]) if out is None else out
    _backend.kernel(backend, "cross_entropy", "cross_entropy_backward")(
        input=t["input"], target=t["target"], grad=grad, state=state, grad_loss=grad_loss, **arguments)
    return {"input": grad}


def _gradient_in_backward_arguments(logits3: Tensor, target: Tensor, weight: Optional[Tensor], arguments: dict) -> dict:
    """softmax_rows' arguments as cross_entropy_forward / cross_entropy_backward take them: the class weights in the
    accumulation dtype, and whether the mean divides by the kept targets' weights (mean_weights' rule for a
    class-weighted z-loss mean: the weights carry count / sum_w and the mean divides by the count)."""
    arguments = dict(arguments)
    weighted_mean = arguments.pop("weight_normalizes_mean", True)
    acc = _checks.opmath_dtype(logits3.dtype)
    arguments.setdefault("label_smoothing", 0.0)
    arguments.setdefault("lse_square_scale", 0.0)
    arguments.setdefault("softcap", None)
    arguments.setdefault("focal_gamma", None)
    if (arguments["focal_gamma"] is None and not target.is_floating_point() and weight is not None
            and arguments["reduction"] == "mean" and arguments["lse_square_scale"] > 0):
        weight, _ = mean_weights(target, weight, arguments["ignore_index"], logits3.shape[1], "mean",
                                 arguments["lse_square_scale"], acc)
        weighted_mean = False
    weight = None if weight is None else weight.to(acc).contiguous()
    return dict(arguments, weight=weight, weighted_mean=weighted_mean)


def _rows_loss_like(t, o):
    logits3 = t["input"]
    rows = logits3.shape[0] * logits3.shape[2]
    return logits3.new_empty((rows,) if o.reduction == "none" else (), dtype=_checks.opmath_dtype(logits3.dtype))


def _rows_item_shape(t, o):
    logits3 = t["input"]
    return (logits3.shape[0], 1, logits3.shape[2])


def row_state_like(width: int):
    """state_like for a class-rows family whose backward kernel reads `width` values a row, then the mean's
    denominator, in the accumulation dtype."""
    def state_like(t, o):
        logits3 = t["input"]
        rows = logits3.shape[0] * logits3.shape[2]
        return logits3.new_empty((rows * width + 1,), dtype=_checks.opmath_dtype(logits3.dtype))
    return state_like


def declare_rows(name: str, options: type, kernel_options, **declaration) -> _family.Family:
    """A loss over softmax rows on the cross-entropy kernel: kernel_options(tensors, options) -> (per-class
    weight or None, softmax_rows' keyword arguments)."""
    return _family.register(_family.Family(name=name, inputs=ROW_INPUTS, options=options, kernel=KERNEL,
                                           run=_rows_run, loss_like=_rows_loss_like, item_shape=_rows_item_shape,
                                           kernel_options=kernel_options, recompute=_rows_gradient,
                                           gradient_in_backward=_triton_backward, state_like=row_state_like(3),
                                           overwritable="input", **declaration))


def _triton_backward(backend: str, options) -> bool:
    # The Triton route reads the logits once in forward and once in backward, where the gradient is written with
    # grad_output applied (triton_kernels/cross_entropy.py); the C++ route writes it in forward, while the row is
    # in cache, and scales it in place.
    return backend == "triton"


def reference_cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor],
                            options: CrossEntropyOptions) -> Tensor:
    """Plain-PyTorch cross-entropy with the extras; the "reference" backend."""
    softcap, lse_square_scale = options.softcap, options.lse_square_scale
    logits = softcap * torch.tanh(input / softcap) if softcap is not None else input
    index_mean = options.reduction == "mean" and target.shape != input.shape
    loss = F.cross_entropy(logits, target, weight, ignore_index=options.ignore_index,
                           reduction="sum" if index_mean else options.reduction,
                           label_smoothing=options.label_smoothing)
    if index_mean:  # lossops' rule for a mean over nothing (NaN, zero gradient), where torch's gradient is NaN
        classes = input.shape[1] if input.dim() > 1 else input.shape[0]
        loss = _reduce.mean(loss, _reduce.class_index_denominator(target, weight, options.ignore_index, classes,
                                                                  loss.dtype))
    if lse_square_scale == 0:
        return loss
    class_dim = 1 if input.dim() > 1 else 0
    lse = torch.logsumexp(logits.float() if logits.dtype != torch.float64 else logits, dim=class_dim)
    z = lse_square_scale * lse * lse
    if target.shape == input.shape:
        denominator = lse.new_tensor(float(lse.numel()))
    else:  # not class-weighted: the mean is over the kept rows whatever the weights
        keep = target != options.ignore_index
        z = z * keep
        denominator = keep.sum().to(lse.dtype)
    reduction = options.reduction
    z_reduced = z if reduction == "none" else z.sum() if reduction == "sum" else _reduce.mean(z.sum(), denominator)
    return (loss + z_reduced).to(loss.dtype)


def _classes(dtype):
    return [torch.randn(6, 5, dtype=dtype), torch.tensor([0, 4, -100, 2, 2, 1])]


def _classes_4d_weighted(dtype):
    target = torch.randint(0, 5, (2, 3, 4))
    target[0, 0, 0] = -100
    return [torch.randn(2, 5, 3, 4, dtype=dtype), target, torch.rand(5, dtype=dtype) + 0.5]


def _probabilities(dtype):
    return [torch.randn(6, 5, dtype=dtype), torch.randn(6, 5, dtype=dtype).softmax(1)]


def _selfcheck_inputs(dtype):
    return torch.randn(64, 1000, dtype=dtype) * 3, torch.randint(0, 1000, (64,))


def class_index(x: Tensor) -> Tensor:
    return torch.randint(0, x.shape[1], x.shape[:1], device=x.device)


def rows_class_dim(x: Tensor) -> int:
    return 1 if x.dim() >= 2 else 0


def _mean_denominator(a: dict) -> Tensor:
    """What cross_entropy's mean divides one rank's rows by (lossops._dtensor sums it over the mesh)."""
    x, t = a["input"], a["target"]
    classes = x.shape[rows_class_dim(x)]
    acc = _checks.opmath_dtype(x.dtype)
    if t.shape == x.shape:  # probabilities: the mean is over items
        return torch.full((), x.numel() // max(classes, 1), dtype=acc, device=x.device)
    return _reduce.class_index_denominator(t, a["weight"], a["ignore_index"], classes, acc)


def mean_terms(function, a: dict, ignore_index: int, cross_entropy_denominator) -> Optional[list]:
    """One rank's (sum, denominator) terms of a class-weighted mean with z-loss (None when the mean is one plain
    sum): the z-loss is averaged over the kept rows, the cross-entropy over their weights."""
    if a["weight"] is None or not a["lse_square_scale"] or a["target"].is_floating_point():
        return None
    total = function(**dict(a, reduction="sum"))
    cross_entropy_only = function(**dict(a, reduction="sum", lse_square_scale=0.0))
    rows = (a["target"] != ignore_index).sum().to(total.dtype)
    return [(cross_entropy_only, cross_entropy_denominator(a)), (total - cross_entropy_only, rows)]


def _mean_terms(function, a: dict):
    return mean_terms(function, a, a["ignore_index"], _mean_denominator)


def _vocab_parallel(a: dict, input, mesh) -> Tensor:
    """Logits sharded on the class dimension: lossops.distributed's vocabulary-parallel cross-entropy."""
    local, target = a["input"], a["target"]
    if target.shape == local.shape or target.is_floating_point():
        raise ValueError("lossops: cross_entropy with logits sharded on the class dimension takes class-index "
                         "targets; probability targets would be sharded too (not supported)")
    return vocab_parallel_cross_entropy(local.movedim(rows_class_dim(local), -1), target, group=mesh.get_group(),
                                        ignore_index=a["ignore_index"], reduction=a["reduction"],
                                        label_smoothing=a["label_smoothing"], weight=a["weight"],
                                        lse_square_scale=a["lse_square_scale"], softcap=a["softcap"])


CROSS_ENTROPY = declare_rows(
    "cross_entropy", CrossEntropyOptions,
    lambda t, o: (t["weight"], dict(ignore_index=o.ignore_index, reduction=o.reduction,
                                    label_smoothing=o.label_smoothing, lse_square_scale=o.lse_square_scale,
                                    softcap=o.softcap)),
    reference=reference_cross_entropy, function=cross_entropy, full_path=_full_cross_entropy, bad_inputs="classes",
    eager_routes=(EAGER_ROUTE,),
    torch_fn=F.cross_entropy,
    sharding=_sharding.Sharding(rows_class_dim, whole=("weight",), denominator=_mean_denominator,
                                parallel_classes=_vocab_parallel, local_sums=_mean_terms,
                                replicated_only=token_options.DEFAULTS),
    cases=(_family.Case(_classes, dict(label_smoothing=0.1), F.cross_entropy,
                        bad=("target_out_of_range", dict(label_smoothing=1.5))),
           _family.Case(_classes_4d_weighted, dict(reduction="none", lse_square_scale=0.01, softcap=4.0),
                        bad=(dict(softcap=-1.0),)),
           _family.Case(_probabilities, dict(reduction="sum"), F.cross_entropy)),
    selfcheck=(dict(label_smoothing=0.1), lambda x, y: F.cross_entropy(x, y, label_smoothing=0.1), _selfcheck_inputs),
    bench=_family.Bench(F.cross_entropy, class_index,
                        ((256, 1000), (4096, 1024), (4096, 8192), (4096, 32000), (4096, 128256)),
                        columns="vocab size", inplace_variant=True,
                        grid_shapes=G.TINY + G.SMALL_CLASSES + G.CLASS_DIM_1 + G.MID + G.LLM,
                        grid_quick_shapes=G.TINY + ((2, 5, 4, 4),),
                        targets=(_family.SpeedTarget((65536, 10), 3.0), _family.SpeedTarget((65536, 100), 3.0),
                                 _family.SpeedTarget((8, 21, 128, 128), 2.0),
                                 _family.SpeedTarget((4, 150, 64, 64), 2.0),
                                 _family.SpeedTarget((4096, 32000), 8.0, dtype="bfloat16"))))
CROSS_ENTROPY.module = _family.make_module(CROSS_ENTROPY, "CrossEntropyLoss",
                                           per_call=("token_weight", "num_items_in_batch"),
                                           doc="Drop-in for torch.nn.CrossEntropyLoss, plus lossops.cross_entropy's "
                                               "keyword extras.")

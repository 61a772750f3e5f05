"""Cross-entropy: `lossops.cross_entropy`, its custom op `lossops::cross_entropy`, and its autograd.

Call path: cross_entropy() validates (lossops._checks) and views the input as (outer, C, inner) without
moving the class dimension -> the custom op runs the backend's fused kernel (csrc/cross_entropy.cpp or
triton_kernels/cross_entropy.py), which returns the loss and, when a gradient is needed, writes it in the
same pass -> backward multiplies that gradient by grad_output (lossops._reduce).

The same op also serves softmax focal loss (focal_gamma >= 0), which differs only per row.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend, _checks, _eager, _reduce


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, size_average=None,
                  ignore_index: int = -100, reduce=None, reduction: str = "mean", label_smoothing: float = 0.0,
                  *, lse_square_scale: float = 0.0, softcap: Optional[float] = None,
                  inplace_backward: bool = False) -> Tensor:
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
    """
    if (size_average is None and reduce is None and softcap is None and not inplace_backward
            and type(lse_square_scale) is float and lse_square_scale == 0 and type(reduction) is str
            and type(ignore_index) is int and -2 ** 63 <= ignore_index < 2 ** 63
            and type(label_smoothing) in (float, int) and (cpp := _eager.cpp_module(input, target, weight))):
        # The C++ eager path checks what it relies on and returns None for anything else (errors included),
        # which then takes the path below and its messages.
        loss = cpp.eager_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing)
        if loss is not None:
            return loss
    reduction = _checks.reduction(reduction, size_average, reduce)
    label_smoothing = _checks.in_range("label_smoothing", label_smoothing, 0.0, 1.0, exception=RuntimeError)
    lse_square_scale = _checks.in_range("lse_square_scale", lse_square_scale, 0.0)
    cap = _checks.positive_or_none("softcap", softcap)
    if weight is not None:  # torch's cross_entropy refuses a weight of another dtype than the input's
        _checks.same_dtype(_checks.floating("input", input),
                           weight=_checks.floating("weight", weight, exception=RuntimeError))
    return row_softmax_loss(input, target, weight, ignore_index, reduction, label_smoothing=label_smoothing,
                            lse_square_scale=lse_square_scale, softcap=cap, inplace_backward=inplace_backward,
                            reference=reference_cross_entropy)


def row_softmax_loss(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str, *,
                     label_smoothing: float = 0.0, lse_square_scale: float = 0.0, softcap: float = 0.0,
                     focal_gamma: float = -1.0, weight_normalizes_mean: bool = True,
                     inplace_backward: bool = False, reference=None) -> Tensor:
    """Shared entry for every loss over softmax(input, dim=1): layout, checks, backend choice, op call."""
    _checks.floating("input", input)
    _checks.tensor("target", target)
    _checks.same_device(input, target=target)
    ignore_index = _checks.integer("ignore_index", ignore_index)
    if input.dim() == 0:
        raise ValueError("lossops: input must have at least one dimension (classes), got a 0-d tensor")
    num_classes = input.shape[1] if input.dim() >= 2 else input.shape[0]
    # Softmax focal (focal_gamma >= 0) calls its per-class tensor alpha: errors name what the caller passed.
    weight = _checks.class_weight(weight, num_classes, input, "alpha" if focal_gamma >= 0 else "weight")
    probabilities = target.shape == input.shape
    _check_target(input, target, probabilities, ignore_index)

    backend = _backend.resolve(input.device)
    if backend == "reference" or (probabilities and target.requires_grad):
        # Gradients with respect to probability targets come from the plain-PyTorch path.
        return reference(input, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale,
                         softcap, focal_gamma=focal_gamma, weight_normalizes_mean=weight_normalizes_mean)

    logits3 = input.reshape(1, num_classes, 1) if input.dim() == 1 else input.flatten(2) if input.dim() > 2 \
        else input.unsqueeze(-1)
    if probabilities:
        target_k = (target.reshape(1, num_classes, 1) if input.dim() == 1 else target.flatten(2) if input.dim() > 2
                    else target.unsqueeze(-1))
        if target_k.dtype != input.dtype:  # kernels read the input's dtype or the accumulation dtype
            target_k = target_k.to(_checks.opmath_dtype(input.dtype))
    else:
        target_k = target.reshape(-1).to(torch.int64).contiguous()
    item_shape = target.shape if not probabilities else input.shape[:1] + input.shape[2:] if input.dim() > 1 else ()

    needs_grad = torch.is_grad_enabled() and input.requires_grad
    if inplace_backward and needs_grad and not torch.compiler.is_compiling():
        loss = _InplaceRowSoftmaxLoss.apply(input, logits3, target_k, weight, ignore_index, reduction,
                                            label_smoothing, lse_square_scale, softcap, focal_gamma,
                                            weight_normalizes_mean, backend)
    else:
        loss, _ = torch.ops.lossops.cross_entropy(logits3, target_k, weight, ignore_index, reduction,
                                                  label_smoothing, lse_square_scale, softcap, focal_gamma,
                                                  weight_normalizes_mean, needs_grad, backend)
    if reduction == "none":
        loss = loss.reshape(item_shape)
    out_dtype = _checks.output_dtype(input)
    if probabilities:  # torch's loss is input * target: a float64 target makes a float64 loss
        out_dtype = torch.promote_types(out_dtype, target.dtype)
    return loss.to(out_dtype)


def _check_target(input: Tensor, target: Tensor, probabilities: bool, ignore_index: int) -> None:
    if probabilities:
        if not target.is_floating_point():
            raise RuntimeError(f"lossops: expected a floating point target for class probabilities (target has the "
                               f"input's shape {tuple(input.shape)}), got dtype {target.dtype}")
        if ignore_index >= 0:
            raise RuntimeError(f"lossops: ignore_index is not supported for class-probability targets, got {ignore_index}")
        return
    if target.dtype not in (torch.int64, torch.uint8):  # torch's nll_loss accepts exactly these two
        raise RuntimeError(f"lossops: class-index target must be an int64 or uint8 tensor, got dtype {target.dtype} and "
                           f"shape {tuple(target.shape)} (probability targets must have the input's shape {tuple(input.shape)})")
    expected = input.shape[:1] + input.shape[2:] if input.dim() >= 2 else torch.Size([])
    if input.dim() >= 2 and target.dim() >= 1 and target.shape[0] != input.shape[0]:
        raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target batch_size ({target.shape[0]}).")
    if target.shape != expected:
        raise RuntimeError(f"lossops: expected target of shape {tuple(expected)} for input of shape "
                           f"{tuple(input.shape)}, got {tuple(target.shape)}")


def _denominator(logits3: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                 weight_normalizes_mean: bool) -> Tensor:
    acc = _checks.opmath_dtype(logits3.dtype)
    if target.is_floating_point():  # torch divides probability-target losses by the number of rows
        return torch.tensor(logits3.shape[0] * logits3.shape[2], dtype=acc, device=logits3.device)
    return _reduce.class_index_denominator(target, weight if weight_normalizes_mean else None, ignore_index,
                                           logits3.shape[1], acc)


def _run_kernel(logits3: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str,
                label_smoothing: float, lse_square_scale: float, softcap: float, focal_gamma: float,
                weight_normalizes_mean: bool, grad: Optional[Tensor], backend: str,
                grad_output: Optional[Tensor] = None) -> Tensor:
    """grad_output: a scalar upstream gradient folded into the gradient's scale (one pass, no second multiply)."""
    acc = _checks.opmath_dtype(logits3.dtype)
    denominator = _denominator(logits3, target, weight, ignore_index, weight_normalizes_mean)
    weight = None if weight is None else weight.to(acc).contiguous()
    if (reduction == "mean" and weight is not None and lse_square_scale > 0 and focal_gamma < 0
            and not target.is_floating_point()):
        # The z-loss is not class-weighted: its mean is over the kept rows, the cross-entropy's over their
        # weights. The kernels scale a whole row by one factor, so the weights carry count / sum_w instead
        # (the cross-entropy part is linear in them) and every row is divided by the count.
        count = _reduce.class_index_denominator(target, None, ignore_index, logits3.shape[1], acc)
        weight = weight * torch.where(count > 0, count / denominator, 1)
        denominator = count
    scale = _reduce.gradient_scale(reduction, denominator)
    if grad_output is not None:
        scale = scale * grad_output.to(scale.dtype)
    kernels = _backend.kernels(backend, "cross_entropy")
    row_loss, _lse, total = kernels.cross_entropy(
        logits3, target, weight, grad, ignore_index, label_smoothing,
        lse_square_scale, softcap, focal_gamma, scale)
    return _reduce.reduce(reduction, row_loss, total, denominator)


@torch.library.custom_op("lossops::cross_entropy", mutates_args=())
def _cross_entropy_op(logits3: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str,
                      label_smoothing: float, lse_square_scale: float, softcap: float, focal_gamma: float,
                      weight_normalizes_mean: bool, compute_grad: bool, backend: str) -> tuple[Tensor, Tensor]:
    grad = _backend.empty_gradient(logits3) if compute_grad else None
    loss = _run_kernel(logits3, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap,
                       focal_gamma, weight_normalizes_mean, grad, backend)
    return loss, grad if grad is not None else logits3.new_empty((0,))


@_cross_entropy_op.register_fake
def _(logits3, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap, focal_gamma,
      weight_normalizes_mean, compute_grad, backend):
    acc = _checks.opmath_dtype(logits3.dtype)
    rows = logits3.shape[0] * logits3.shape[2]
    loss = logits3.new_empty((rows,) if reduction == "none" else (), dtype=acc)
    grad = logits3.new_empty(logits3.shape) if compute_grad else logits3.new_empty((0,))
    return loss, grad


def _setup_context(ctx, inputs, output):
    logits3, reduction, compute_grad = inputs[0], inputs[4], inputs[10]
    ctx.save_for_backward(output[1])
    ctx.compute_grad = compute_grad
    ctx.item_shape = (logits3.shape[0], 1, logits3.shape[2]) if reduction == "none" else None
    _reduce.mark_gradient_outputs(ctx, output[1])


def _backward(ctx, grad_loss, _unused):
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        raise RuntimeError("lossops: gradients with respect to class-index targets or class weights are not "
                           "defined (torch does not define them either)")
    if not ctx.compute_grad:
        raise RuntimeError("lossops: the forward ran with compute_grad=False; call lossops.cross_entropy "
                           "with grad mode enabled and an input that requires grad")
    (grad,) = ctx.saved_tensors
    return (_reduce.apply_grad_output(ctx, grad, grad_loss, ctx.item_shape),) + (None,) * 11


_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


class _InplaceRowSoftmaxLoss(torch.autograd.Function):
    """inplace_backward=True: forward only reads the logits; backward writes the gradient over them.

    One N x C buffer in total, and nothing reads a half-overwritten tensor: reads between the loss and backward
    (an accuracy metric, another loss term) see the logits. A node that saved the logits and runs its backward
    after ours fails its version check instead of using the gradient, and so does a second backward through
    this loss (retain_graph=True): the logits it would need are gone.
    """

    @staticmethod
    def forward(ctx, input, logits3, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale,
                softcap, focal_gamma, weight_normalizes_mean, backend):
        if input.is_leaf:
            raise RuntimeError("lossops: inplace_backward=True would overwrite a leaf tensor that requires grad "
                               "(its values and its .grad would be lost); pass inplace_backward=False")
        loss = _run_kernel(logits3, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale,
                           softcap, focal_gamma, weight_normalizes_mean, None, backend)
        ctx.save_for_backward(input, target, weight)
        ctx.options = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                           lse_square_scale=lse_square_scale, softcap=softcap, focal_gamma=focal_gamma,
                           weight_normalizes_mean=weight_normalizes_mean, backend=backend)
        ctx.logits3_shape = logits3.shape
        ctx.consumed = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.consumed:
            raise RuntimeError("lossops: inplace_backward=True wrote the first backward's gradient over the logits, "
                               "so a second backward through this loss (retain_graph=True) has nothing to recompute "
                               "from; use inplace_backward=False")
        if grad_loss is None:
            return (None,) * 12
        _reduce.refuse_double_backward()
        input, target, weight = ctx.saved_tensors
        ctx.consumed = True
        o = ctx.options
        # reshape views the logits' own storage whenever it can (contiguous or class-sliced logits); where it
        # has to copy, the gradient lands in that copy: still correct, one buffer more.
        logits3 = input.reshape(ctx.logits3_shape)
        per_row = o["reduction"] == "none"
        _run_kernel(logits3, target, weight, o["ignore_index"], o["reduction"], o["label_smoothing"],
                    o["lse_square_scale"], o["softcap"], o["focal_gamma"], o["weight_normalizes_mean"], logits3,
                    o["backend"], grad_output=None if per_row else grad_loss)
        if per_row:  # one upstream value per row: applied after the kernel, in the same buffer
            logits3.mul_(grad_loss.reshape(ctx.logits3_shape[0], 1, ctx.logits3_shape[2]))
        # Nodes that saved the logits and have not run yet now fail their version check.
        torch.autograd.graph.increment_version(input)
        return (logits3.reshape(input.shape),) + (None,) * 11


def reference_cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                            reduction: str, label_smoothing: float, lse_square_scale: float, softcap: float,
                            **_focal_options) -> Tensor:
    """Plain-PyTorch cross-entropy with the extras; the "reference" backend."""
    logits = softcap * torch.tanh(input / softcap) if softcap > 0 else input
    loss = F.cross_entropy(logits, target, weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if lse_square_scale == 0:
        return loss
    class_dim = 1 if input.dim() > 1 else 0
    lse = torch.logsumexp(logits.float() if logits.dtype != torch.float64 else logits, dim=class_dim)
    z = lse_square_scale * lse * lse
    if target.shape == input.shape:
        denominator = lse.new_tensor(float(lse.numel()))
    else:  # not class-weighted: the mean is over the kept rows whatever the weights
        keep = target != ignore_index
        z = z * keep
        denominator = keep.sum().to(lse.dtype)
    z_reduced = z if reduction == "none" else z.sum() if reduction == "sum" else z.sum() / denominator
    return (loss + z_reduced).to(loss.dtype)

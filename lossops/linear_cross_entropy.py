"""Fused linear + cross-entropy: `lossops.linear_cross_entropy`, its custom op `lossops::linear_cross_entropy`.

Equal to cross_entropy(input @ linear_weight.T + linear_bias, target, weight) without ever holding the N x V logits
(torch.nn.functional.linear_cross_entropy's signature; the custom op's hidden/weight/bias are input/linear_weight/
linear_bias, its class_weight the class weights). The tokens
are processed in chunks of rows; for each chunk the logits go into one reused buffer, the backend's fused
cross-entropy kernel (lossops.cross_entropy's) turns them into d(loss)/d(logits) in place, and that buffer is
immediately contracted into grad_hidden[chunk] = dlogits @ W, grad_W += dlogits.T @ hidden[chunk] and
grad_b += dlogits.sum(0). The mean's denominator is computed over all rows first, so the kernel scales each
chunk's gradient by the same 1/denominator; backward only multiplies the three gradients by grad_output.

reduction="none" cannot be pre-scaled (each row gets its own grad_output), so its forward computes only the
losses and backward (the op lossops::linear_cross_entropy_backward) recomputes the chunks, scaling each
row of dlogits by its grad_output before the contractions.

Low-precision inputs: grad_W and grad_b are accumulated across chunks in float32 and cast once at the end.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend, _checks, _dtensor, _reduce
from .losses.cross_entropy import KERNEL as ROW_KERNEL, CrossEntropyOptions, mean_weights, reference_cross_entropy

# Chunk logits are at most 1/_CHUNKS_PER_PASS of the full logits, and at most about _CHUNK_BYTES once the
# logits are huge, but never fewer than _MIN_CHUNK_ROWS rows (smaller matmuls lose too much speed).
_CHUNKS_PER_PASS = 8
_CHUNK_BYTES = 256 << 20
_MIN_CHUNK_ROWS = 128


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *, linear_bias: Optional[Tensor] = None,
                         weight: Optional[Tensor] = None, reduction: str = "mean", ignore_index: Optional[int] = None,
                         label_smoothing: float = 0.0, options=None, lse_square_scale: float = 0.0,
                         softcap: Optional[float] = None, chunk_size: Optional[int] = None) -> Tensor:
    """Drop-in for torch.nn.functional.linear_cross_entropy: cross_entropy(linear(input, linear_weight,
    linear_bias), target, weight=weight, ...) without materialising the logits.

    input (..., D) (torch: (N, D) or (D,); more leading dimensions are lossops' extension, the target then has
    the same leading shape); linear_weight (V, D); linear_bias (V,); weight: per-class weights (V,), in the
    fused path. ignore_index=None means -100, as torch maps it. options: a torch.nn.LinearCrossEntropyOptions;
    its batch_chunk_size sets the chunk size (lossops' own policy otherwise; its other fields concern torch's
    implementation), and the fused path serves every call, options or not. Extras as lossops.cross_entropy:
    lse_square_scale, softcap; chunk_size: rows of tokens per chunk (default: 1/8 of the rows, capped near
    256 MiB of logits). A (V, d1, ..., dK, D) weight or probability targets take the reference path (F.linear,
    then cross_entropy), with the same semantics.
    """
    ignore_index = -100 if ignore_index is None else ignore_index
    reduction = _checks.reduction(reduction)
    label_smoothing = _checks.in_range("label_smoothing", label_smoothing, 0.0, 1.0, exception=RuntimeError)
    lse_square_scale = _checks.in_range("lse_square_scale", lse_square_scale, 0.0)
    cap = _checks.positive_or_none("softcap", softcap)
    if options is not None and chunk_size is None:
        chunk_size = getattr(options, "batch_chunk_size", None)
    hidden, bias = input, linear_bias
    if torch.is_autocast_enabled(hidden.device.type) and hidden.is_floating_point() and linear_weight.is_floating_point():
        # As F.linear would under autocast: the matmuls run in the autocast dtype, the loss in float32.
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, linear_weight = hidden.to(dtype), linear_weight.to(dtype)
        bias = None if bias is None or not bias.is_floating_point() else bias.to(dtype)
    ce_options = CrossEntropyOptions(ignore_index, reduction, label_smoothing, lse_square_scale, cap)
    if linear_weight.dim() > 2 or (target.is_floating_point() and target.dim() == hidden.dim()):
        return _reference(hidden, linear_weight, bias, target, weight, ce_options)
    _check_arguments(hidden, linear_weight, target, bias, chunk_size)
    if weight is not None:
        _checks.class_weight(weight, linear_weight.shape[0], hidden)
        _checks.same_dtype(hidden, weight=weight)

    backend = _backend.resolve(hidden.device)
    if backend == "reference":
        return _reference(hidden, linear_weight, bias, target, weight, ce_options)

    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    target1 = target.reshape(-1).to(torch.int64).contiguous()
    rows = chunk_size if chunk_size is not None else default_chunk_size(hidden2.shape[0], linear_weight.shape[0],
                                                                         hidden.element_size())
    grad_mask = [torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, linear_weight, bias)]
    loss, *_ = torch.ops.lossops.linear_cross_entropy(hidden2, linear_weight, bias, target1, weight, ignore_index,
                                                      reduction, label_smoothing, lse_square_scale, cap, rows,
                                                      grad_mask, backend)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    return loss.to(_checks.output_dtype(hidden))


def _reference(hidden, linear_weight, bias, target, weight, options) -> Tensor:
    """F.linear then lossops' plain-PyTorch cross-entropy (torch's reference formulation, plus the extras)."""
    out_shape = linear_weight.shape[:-1]  # (V,) or torch's K-dimensional (V, d1, ..., dK)
    logits = F.linear(hidden, linear_weight.reshape(-1, linear_weight.shape[-1]),
                      None if bias is None else bias.reshape(-1))
    logits = logits.reshape(hidden.shape[:-1] + out_shape)
    if hidden.dim() > 1 and logits.dim() > 2 and linear_weight.dim() == 2:  # lossops' (..., D): classes last
        logits = logits.movedim(-1, 1)
        if target.is_floating_point() and target.dim() == logits.dim():
            target = target.movedim(-1, 1)
    return reference_cross_entropy(logits, target, weight, options).to(_checks.output_dtype(hidden))


def _ignore_index(a: dict) -> int:
    return -100 if a["ignore_index"] is None else a["ignore_index"]


def _mean_denominator(a: dict) -> Tensor:
    return _reduce.class_index_denominator(a["target"], a["weight"], _ignore_index(a), a["linear_weight"].shape[0],
                                           _checks.opmath_dtype(a["input"].dtype))


def _mean_terms(function, a: dict):
    """With class weights the z-loss is averaged over the rows, the cross-entropy over their weights: two sums."""
    if a["weight"] is None or not a["lse_square_scale"]:
        return None
    total = function(**dict(a, reduction="sum"))
    cross_entropy_only = function(**dict(a, reduction="sum", lse_square_scale=0.0))
    rows = (a["target"] != _ignore_index(a)).sum().to(total.dtype)
    return [(cross_entropy_only, _mean_denominator(a)), (total - cross_entropy_only, rows)]


def _vocab_parallel(a: dict, input, mesh) -> Tensor:
    """The weight sharded on its rows (classes): lossops.distributed's vocabulary-parallel linear cross-entropy."""
    from .distributed import vocab_parallel_linear_cross_entropy
    return vocab_parallel_linear_cross_entropy(a["input"], a["linear_weight"], a["target"], group=mesh.get_group(),
                                               local_bias=a["linear_bias"], ignore_index=_ignore_index(a),
                                               reduction=a["reduction"], label_smoothing=a["label_smoothing"],
                                               weight=a["weight"], lse_square_scale=a["lse_square_scale"],
                                               softcap=a["softcap"])


# input (..., D): its last dimension is the features, which the target does not have.
SHARDING = _dtensor.Sharding(lambda input: input.dim() - 1, whole=("linear_weight", "linear_bias", "weight"),
                             denominator=_mean_denominator, parallel_classes=_vocab_parallel, local_sums=_mean_terms,
                             classes_sharded_by="linear_weight", split_with_classes=("linear_bias",),
                             class_dim_name="feature")
linear_cross_entropy = _dtensor.accepting_dtensors(linear_cross_entropy, SHARDING)


def default_chunk_size(num_rows: int, vocab: int, itemsize: int) -> int:
    rows = -(-num_rows // _CHUNKS_PER_PASS)
    cap = max(_CHUNK_BYTES // max(vocab * itemsize, 1), _MIN_CHUNK_ROWS)
    return max(1, min(rows, cap))


def _check_arguments(input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Optional[Tensor],
                     chunk_size: Optional[int]) -> None:
    _checks.floating("input", input)
    _checks.floating("linear_weight", linear_weight)
    _checks.tensor("target", target)
    _checks.same_device(input, linear_weight=linear_weight, target=target, linear_bias=linear_bias)
    if input.dim() < 1:
        raise ValueError("lossops: input must have at least one dimension (features), got a 0-d tensor")
    if linear_weight.dim() != 2 or linear_weight.shape[1] != input.shape[-1]:
        raise RuntimeError(f"lossops: linear_weight must have shape (vocab, {input.shape[-1]}) to match input of "
                           f"shape {tuple(input.shape)}, got {tuple(linear_weight.shape)}")
    if linear_weight.dtype != input.dtype:
        raise RuntimeError(f"lossops: input and linear_weight must have the same dtype, got {input.dtype} and "
                           f"{linear_weight.dtype}")
    if linear_bias is not None:
        _checks.floating("linear_bias", linear_bias)
        if linear_bias.shape != linear_weight.shape[:1] or linear_bias.dtype != linear_weight.dtype:
            raise RuntimeError(f"lossops: linear_bias must be a {linear_weight.dtype} tensor of shape "
                               f"({linear_weight.shape[0]},), got {linear_bias.dtype} of shape "
                               f"{tuple(linear_bias.shape)}")
    check_last_dim_target(target, "input", input)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"lossops: chunk_size must be a positive int or None, got {chunk_size!r}")


def check_last_dim_target(target: Tensor, name: str, input: Tensor) -> None:
    """Class indices for an input whose last dimension is the features or classes: shape input.shape[:-1]."""
    if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
        raise RuntimeError(f"lossops: target must be an integer tensor of class indices, got dtype {target.dtype}")
    if target.shape != input.shape[:-1]:
        raise RuntimeError(f"lossops: expected target of shape {tuple(input.shape[:-1])} for {name} of shape "
                           f"{tuple(input.shape)}, got {tuple(target.shape)}")


def _chunked_pass(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                  class_weight: Optional[Tensor], ignore_index: int, label_smoothing: float, lse_square_scale: float,
                  softcap: Optional[float], chunk_size: int, grad_mask: list[bool], backend: str, grad_scale: Tensor,
                  row_scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor, list[Optional[Tensor]]]:
    """One pass over the token chunks: (per-row loss, summed loss, [grad_hidden, grad_weight, grad_bias]).

    Gradients are computed for the True entries of grad_mask, the kernel scaling them by grad_scale (a
    0-d tensor) and, when row_scale is given, each row of dlogits by its entry before the contractions.
    """
    num_rows, vocab = hidden.shape[0], weight.shape[0]
    acc = _checks.opmath_dtype(hidden.dtype)
    want_h, want_w, want_b = grad_mask[0], grad_mask[1], grad_mask[2] and bias is not None
    need_dlogits = want_h or want_w or want_b
    # grad_W and grad_b are sums over chunks: accumulated in at least float32, cast once at the end.
    grad_h = _backend.empty_gradient(hidden) if want_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
    grad_b = torch.zeros(vocab, dtype=acc, device=weight.device) if want_b else None
    vocab_block = min(vocab, max(1, chunk_size * vocab // max(hidden.shape[1], 1)))

    row_loss = torch.empty(num_rows, dtype=acc, device=hidden.device)
    total = torch.zeros((), dtype=acc, device=hidden.device)
    buffer = hidden.new_empty((min(chunk_size, num_rows), vocab))  # one logits buffer, reused by every chunk
    for start in range(0, num_rows, chunk_size):
        stop = min(start + chunk_size, num_rows)
        h, logits = hidden[start:stop], buffer[:stop - start]
        if bias is None:
            torch.mm(h, weight.t(), out=logits)
        else:
            torch.addmm(bias, h, weight.t(), out=logits)
        logits3 = logits.unsqueeze(-1)
        loss, _lse, chunk_total = ROW_KERNEL(
            backend, input=logits3, target=target[start:stop], weight=class_weight,
            grad=logits3 if need_dlogits else None,
            ignore_index=ignore_index, label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
            softcap=softcap, focal_gamma=None, grad_scale=grad_scale)
        row_loss[start:stop] = loss
        total += chunk_total
        if not need_dlogits:
            continue
        dlogits = logits
        if row_scale is not None:
            dlogits.mul_(row_scale[start:stop, None])
        if want_h:
            torch.mm(dlogits, weight, out=grad_h[start:stop])
        if want_b:
            grad_b += dlogits.sum(0, dtype=acc)
        if want_w and grad_w.dtype == dlogits.dtype:
            grad_w.addmm_(dlogits.t(), h)
        elif want_w:
            # No mixed-dtype addmm on CPU: bounded vocabulary blocks of the product, each added in float32.
            for v0 in range(0, vocab, vocab_block):
                grad_w[v0:v0 + vocab_block] += dlogits[:, v0:v0 + vocab_block].t() @ h
    grads = [grad_h, None if grad_w is None else grad_w.to(weight.dtype),
             None if grad_b is None else grad_b.to(weight.dtype)]
    return row_loss, total, grads


def _empty_or(grad: Optional[Tensor], like: Tensor) -> Tensor:
    return grad if grad is not None else like.new_empty((0,))


@torch.library.custom_op("lossops::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                             class_weight: Optional[Tensor], ignore_index: int, reduction: str, label_smoothing: float,
                             lse_square_scale: float, softcap: Optional[float], chunk_size: int, grad_mask: list[bool],
                             backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_hidden, grad_weight, grad_bias); the gradients are empty where not computed in forward
    (not requested, or reduction='none', whose backward recomputes them)."""
    acc = _checks.opmath_dtype(hidden.dtype)
    class_weight, denominator = mean_weights(target, class_weight, ignore_index, weight.shape[0], reduction,
                                             lse_square_scale, acc)
    mask = grad_mask if reduction != "none" else [False, False, False]
    row_loss, total, grads = _chunked_pass(hidden, weight, bias, target, class_weight, ignore_index, label_smoothing,
                                           lse_square_scale, softcap, chunk_size, mask, backend,
                                           _reduce.gradient_scale(reduction, denominator))
    loss = _reduce.reduce(reduction, row_loss, total, denominator)
    return (loss,) + tuple(_empty_or(g, hidden) for g in grads)


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, bias, target, class_weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap,
      chunk_size, grad_mask, backend):
    acc = _checks.opmath_dtype(hidden.dtype)
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=acc)
    computed = [m and reduction != "none" for m in grad_mask]
    shapes = (hidden.shape, weight.shape, weight.shape[:1])
    grads = tuple(hidden.new_empty(shape if c and not (i == 2 and bias is None) else (0,))
                  for i, (c, shape) in enumerate(zip(computed, shapes)))
    return (loss,) + grads


@torch.library.custom_op("lossops::linear_cross_entropy_backward", mutates_args=())
def _linear_cross_entropy_backward_op(grad_loss: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                      target: Tensor, class_weight: Optional[Tensor], ignore_index: int,
                                      label_smoothing: float, lse_square_scale: float, softcap: Optional[float],
                                      chunk_size: int, grad_mask: list[bool], backend: str
                                      ) -> tuple[Tensor, Tensor, Tensor]:
    """reduction='none': recomputes the chunks, each row of dlogits scaled by its grad_loss."""
    acc = _checks.opmath_dtype(hidden.dtype)
    one = torch.ones((), dtype=acc, device=hidden.device)
    class_weight = None if class_weight is None else class_weight.to(acc).contiguous()
    _, _, grads = _chunked_pass(hidden, weight, bias, target, class_weight, ignore_index, label_smoothing,
                                lse_square_scale, softcap, chunk_size, grad_mask, backend, one,
                                row_scale=grad_loss.to(hidden.dtype))
    return tuple(_empty_or(g, hidden) for g in grads)


@_linear_cross_entropy_backward_op.register_fake
def _(grad_loss, hidden, weight, bias, target, class_weight, ignore_index, label_smoothing, lse_square_scale, softcap,
      chunk_size, grad_mask, backend):
    shapes = (hidden.shape, weight.shape, weight.shape[:1])
    return tuple(hidden.new_empty(shape if m and not (i == 2 and bias is None) else (0,))
                 for i, (m, shape) in enumerate(zip(grad_mask, shapes)))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, target, class_weight = inputs[:5]
    ctx.reduction, ctx.options = inputs[6], inputs[5:]
    if ctx.reduction == "none":
        ctx.save_for_backward(hidden, weight, bias, target, class_weight)
    else:
        ctx.save_for_backward(*output[1:])
        # apply_grad_output remembers the scale it applied per gradient (for a second backward).
        ctx.scales = [SimpleNamespace() for _ in range(3)]
    _reduce.mark_gradient_outputs(ctx, *output[1:])


def _backward(ctx, grad_loss, *_unused):
    if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
        raise RuntimeError("lossops: linear_cross_entropy computes no gradient with respect to the class-index "
                           "target or the class weights")
    if grad_loss is None:  # the loss is not used downstream: zero gradients
        return (None,) * len(ctx.needs_input_grad)
    if ctx.reduction != "none":
        grads = [_reduce.apply_grad_output(state, g, grad_loss) if needed else None
                 for state, g, needed in zip(ctx.scales, ctx.saved_tensors, ctx.needs_input_grad[:3])]
    else:
        if torch.is_grad_enabled() and grad_loss.requires_grad:
            raise RuntimeError("lossops: double backward through linear_cross_entropy is not supported")
        hidden, weight, bias, target, class_weight = ctx.saved_tensors
        ignore_index, _, label_smoothing, lse_square_scale, softcap, chunk_size, _, backend = ctx.options
        grads = torch.ops.lossops.linear_cross_entropy_backward(
            grad_loss, hidden, weight, bias, target, class_weight, ignore_index, label_smoothing, lse_square_scale,
            softcap, chunk_size, list(ctx.needs_input_grad[:3]), backend)
    grads = [g if needed else None for g, needed in zip(grads, ctx.needs_input_grad[:3])]
    return tuple(grads) + (None,) * (len(ctx.needs_input_grad) - 3)


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)

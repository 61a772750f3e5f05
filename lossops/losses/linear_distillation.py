"""Fused linear distillation: `lossops.linear_distillation_loss`, the custom op `lossops::linear_distillation_loss`.

distillation_loss(F.linear(student_input, student_weight, student_bias), F.linear(teacher_input, teacher_weight,
teacher_bias), target, ...) without ever holding either model's N x V logits: the tokens are processed in chunks on
linear_cross_entropy's chunked pass (its _Chunks and _Gradients). For each chunk both models' logits go into two
reused buffers, the distillation kernel (lossops.distillation_loss's) writes d(loss)/d(student logits) over the
student's buffer, and that buffer is contracted at once into grad_input[chunk], grad_weight and grad_bias. The mean's
denominator is counted over all tokens first, so every chunk's gradient carries the same 1/denominator and backward
only multiplies the three gradients by grad_output. reduction="none" (one grad_output per token) forms no gradient
in forward: backward recomputes the chunks and scales each row of d(loss)/d(logits) before the contractions.
A teacher that requires grad takes the unfused formula (its gradients need both models' logits).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend, _checks, _family, _reduce
from .distillation import (DISTILLATION, KERNEL, DistillationOptions, check_options, kernel_arguments,
                           reference_distillation_loss, token_count, token_sharding, token_targets,
                           torch_distillation_loss)
from .linear_cross_entropy import (MIN_CHUNK_BYTES, _Chunks, _Gradients, chunk_rows, wide_products_for, widened_linear,
                                   widened_products)

# Both models' chunks of logits (and everything else the op holds beyond the student's gradients) within a quarter
# of one float32 tokens x vocab logits tensor (linear_cross_entropy.chunk_rows).
LOGITS_BUDGET = 1 / 4

_DIFFERENTIABLE = ("hidden", "weight", "bias")


@dataclasses.dataclass(frozen=True)
class LinearDistillationOptions(DistillationOptions):
    chunk_size: int = 1  # rows of tokens per chunk (the public function applies the default policy)


def linear_distillation_loss(student_input: Tensor, student_weight: Tensor, teacher_input: Tensor,
                             teacher_weight: Tensor, target: Optional[Tensor] = None, *,
                             student_bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
                             divergence: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                             ignore_index: int = -100, reduction: str = "mean", hard_weight: float = 0.0,
                             soft_weight: float = 1.0, chunk_size: Optional[int] = None) -> Tensor:
    """lossops.distillation_loss on F.linear(student_input, student_weight, student_bias) and the teacher's, in
    chunks of tokens: neither model's (tokens, vocab) logits is ever formed.

    student_input (..., D_s), student_weight (V, D_s); teacher_input (..., D_t) with the same leading shape,
    teacher_weight (V, D_t); biases (V,). Gradients: the student's input, weight and bias. A teacher tensor that
    requires grad (a model's parameters do unless frozen) takes the unfused formula, which forms both models' logits
    and gives the teacher's gradients too: detach or freeze the teacher to keep the fused path. chunk_size: tokens per
    chunk (default: both chunks' logits and what else the op holds within 1/4 of the tokens' float32 logits; near
    256 MiB but at least 128 tokens once the logits are huge; under 1 MiB of chunks, one chunk, unless its products
    are widened on this CPU and both weights' float32 copies exceed that budget). Keywords as distillation_loss.
    """
    options = check_options(divergence, beta, temperature, ignore_index, reduction, hard_weight, soft_weight,
                            target is not None)
    if _checks.autocast_enabled(student_input.device):
        # As F.linear would under autocast: the matmuls run in the autocast dtype, the loss in float32.
        dtype = torch.get_autocast_dtype(student_input.device.type)
        student_input, student_weight, teacher_input, teacher_weight, student_bias, teacher_bias = (
            None if t is None or not t.is_floating_point() else t.to(dtype)
            for t in (student_input, student_weight, teacher_input, teacher_weight, student_bias, teacher_bias))
    _check_linear("student", student_input, student_weight, student_bias)
    _check_linear("teacher", teacher_input, teacher_weight, teacher_bias)
    if teacher_input.shape[:-1] != student_input.shape[:-1]:
        raise ValueError(f"lossops: teacher_input must have the tokens of student_input "
                         f"{tuple(student_input.shape[:-1])} (its leading dimensions), got "
                         f"{tuple(teacher_input.shape[:-1])}")
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(f"lossops: teacher_weight must have the vocabulary of student_weight "
                         f"({student_weight.shape[0]} rows), got shape {tuple(teacher_weight.shape)}")
    if teacher_input.dtype != student_input.dtype:
        raise TypeError(f"lossops: teacher_input must have the dtype of student_input ({student_input.dtype}), got "
                        f"{teacher_input.dtype}")
    _checks.same_device(student_input, student_weight=student_weight, teacher_input=teacher_input,
                        teacher_weight=teacher_weight, target=target, student_bias=student_bias,
                        teacher_bias=teacher_bias)
    target1 = token_targets(target, student_input.shape[:-1])
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"lossops: chunk_size must be a positive int or None, got {chunk_size!r}")

    backend = _backend.resolve(student_input.device)
    teacher_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (teacher_input, teacher_weight, teacher_bias))
    if backend == "reference" or teacher_grad:  # the teacher's gradients come from the unfused formula
        return reference_distillation_loss(F.linear(student_input, student_weight, student_bias),
                                           F.linear(teacher_input, teacher_weight, teacher_bias), target, options)
    features = student_input.shape[-1]
    hidden = student_input.reshape(-1, features)
    tokens, vocab = hidden.shape[0], student_weight.shape[0]
    widened = widened_products(hidden.dtype, hidden.device)
    rows = chunk_size if chunk_size is not None else chunk_rows(
        tokens, vocab, hidden.element_size(), LOGITS_BUDGET, logits_buffers=2,
        widened_features=max(features, teacher_input.shape[-1]) if widened else 0)
    one_chunk = chunk_size is None and rows >= tokens
    if one_chunk and widened:
        # widened_linear copies both weights to float32 whole: only where that fits the op's byte budget
        one_chunk = (vocab * (features + teacher_input.shape[-1]) * 4
                     <= max(LOGITS_BUDGET * tokens * vocab * 4, MIN_CHUNK_BYTES))
    if one_chunk:
        # One chunk would hold every token, so both logits tensors are formed either way: torch's linear and the
        # distillation loss's own op (one C++ call on plain CPU tensors) then cost a few calls, where the chunked
        # op's machinery costs more than a small problem's arithmetic. Same loss, gradients through the linear.
        linear = widened_linear if widened else F.linear
        student_logits = linear(student_input, student_weight, student_bias)
        teacher_logits = linear(teacher_input, teacher_weight, teacher_bias)
        return DISTILLATION.function(student_logits, teacher_logits, target, divergence=divergence, beta=beta,
                                     temperature=temperature, ignore_index=ignore_index, reduction=reduction,
                                     hard_weight=hard_weight, soft_weight=soft_weight)
    wants = {name: torch.is_grad_enabled() and t is not None and t.requires_grad
             for name, t in (("hidden", student_input), ("weight", student_weight), ("bias", student_bias))}
    tensors = {"hidden": hidden, "weight": student_weight, "bias": student_bias,
               "teacher_hidden": teacher_input.reshape(-1, teacher_input.shape[-1]),
               "teacher_weight": teacher_weight, "teacher_bias": teacher_bias,
               "target": target1}
    chunked = LinearDistillationOptions(options.divergence, options.beta, options.temperature, options.ignore_index,
                                        options.reduction, options.hard_weight, options.soft_weight, rows)
    loss = LINEAR_DISTILLATION.apply(backend, tensors, chunked, wants)
    if options.reduction == "none":
        loss = loss.reshape(student_input.shape[:-1])
    return loss.to(_checks.output_dtype(student_input))


def _check_linear(model: str, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    _checks.floating(f"{model}_input", input)
    _checks.floating(f"{model}_weight", weight)
    if input.dim() < 1:
        raise ValueError(f"lossops: {model}_input must have at least one dimension (features), got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != input.shape[-1]:
        raise ValueError(f"lossops: {model}_weight must have shape (vocab, {input.shape[-1]}) to match {model}_input "
                         f"of shape {tuple(input.shape)}, got {tuple(weight.shape)}")
    if weight.dtype != input.dtype:
        raise TypeError(f"lossops: {model}_input and {model}_weight must have the same dtype, got {input.dtype} and "
                        f"{weight.dtype}")
    if bias is not None:
        _checks.floating(f"{model}_bias", bias)
        if bias.shape != weight.shape[:1] or bias.dtype != weight.dtype:
            raise ValueError(f"lossops: {model}_bias must be a {weight.dtype} tensor of shape ({weight.shape[0]},), "
                             f"got {bias.dtype} of shape {tuple(bias.shape)}")


def _model_chunks(backend: str, t: dict, o: LinearDistillationOptions) -> tuple[_Chunks, _Chunks]:
    """The student's and the teacher's chunks (the same token rows, each model's logits in a buffer of its own)."""
    wide = wide_products_for((t["hidden"], t["teacher_hidden"]), t["weight"], o.chunk_size)
    student = _Chunks(backend, {"hidden": t["hidden"], "weight": t["weight"], "bias": t["bias"],
                                "target": t["target"]}, o, wide)
    teacher = _Chunks(backend, {"hidden": t["teacher_hidden"], "weight": t["teacher_weight"],
                                "bias": t["teacher_bias"], "target": t["target"]}, o, wide)
    return student, teacher


def _chunk_loss(backend, t, o, start, stop, student_logits, teacher_logits, grad_scale, write_gradient):
    """The distillation kernel on one chunk: (per-token loss, summed loss); d(loss)/d(student logits) written over
    the student's logits (times grad_scale) when write_gradient."""
    target = None if t["target"] is None else t["target"][start:stop]
    return KERNEL(backend, student=student_logits, teacher=teacher_logits, target=target,
                  grad=student_logits if write_gradient else None, grad_scale=grad_scale, **kernel_arguments(o))


def _run(family, backend, t, o, grads):
    hidden = t["hidden"]
    acc = _checks.opmath_dtype(hidden.dtype)
    denominator = token_count(t["target"], hidden.shape[0], o.ignore_index, hidden)
    scale = _reduce.gradient_scale(o.reduction, denominator)
    student, teacher = _model_chunks(backend, t, o)
    gradients = _Gradients(student, {n: grads.get(n, False) and o.reduction != "none" for n in _DIFFERENTIABLE})
    row_loss = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
    total = torch.zeros((), dtype=acc, device=hidden.device)
    for (start, stop, h, logits), (_, _, _, teacher_logits) in zip(student, teacher):
        row_loss[start:stop], chunk_total = _chunk_loss(backend, t, o, start, stop, logits, teacher_logits, scale,
                                                        gradients.wanted())
        total += chunk_total
        if gradients.wanted():
            gradients.add(start, stop, h, logits)
    return _reduce.reduce(o.reduction, row_loss, total, denominator), gradients.result()


def _recompute(family, backend, t, o, grad_loss, needs):
    """reduction="none": the chunks again, each row of d(loss)/d(logits) scaled by its grad_loss."""
    student, teacher = _model_chunks(backend, t, o)
    gradients = _Gradients(student, needs)
    if not gradients.wanted():
        return gradients.result()
    hidden = t["hidden"]
    one = torch.ones((), dtype=_checks.opmath_dtype(hidden.dtype), device=hidden.device)
    row_scale = grad_loss.reshape(-1).to(hidden.dtype)
    for (start, stop, h, logits), (_, _, _, teacher_logits) in zip(student, teacher):
        _chunk_loss(backend, t, o, start, stop, logits, teacher_logits, one, True)
        logits.mul_(row_scale[start:stop, None])
        gradients.add(start, stop, h, logits)
    return gradients.result()


def _loss_like(t, o):
    hidden = t["hidden"]
    return hidden.new_empty((hidden.shape[0],) if o.reduction == "none" else (),
                            dtype=_checks.opmath_dtype(hidden.dtype))


def _students_and_teachers(dtype):
    gen = torch.Generator().manual_seed(0)
    student_input = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    student_weight = torch.randn(11, 5, generator=gen, dtype=torch.float64)
    teacher_input = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    teacher_weight = torch.randn(11, 8, generator=gen, dtype=torch.float64)
    target = torch.tensor([0, 10, -100, 3, 3, 7])
    return [x.to(dtype) for x in (student_input, student_weight, teacher_input, teacher_weight)] + [target]


def torch_linear_distillation_loss(student_input, student_weight, teacher_input, teacher_weight, target=None,
                                   **kwargs):
    """What a torch user writes (the benchmark's eager, and what torch.compile compiles): both models' logits, then
    the plain distillation formula."""
    return torch_distillation_loss(F.linear(student_input, student_weight), F.linear(teacher_input, teacher_weight),
                                   target, **kwargs)


def _bench_inputs(shape, dtype, device):
    tokens, features, vocab = shape
    student = (torch.randn(tokens, features, dtype=dtype, device=device) / features ** 0.5).requires_grad_()
    student_weight = torch.randn(vocab, features, dtype=dtype, device=device).requires_grad_()
    teacher = torch.randn(tokens, features, dtype=dtype, device=device) / features ** 0.5
    teacher_weight = torch.randn(vocab, features, dtype=dtype, device=device) * 2
    target = torch.randint(0, vocab, (tokens,), device=device)
    target[::17] = -100
    return student, student_weight, teacher, teacher_weight, target


def _matrix_products(student, student_weight, teacher, teacher_weight, target, gradients: bool):
    """The products every implementation makes, as plain torch.mm into buffers allocated here: both models' logits
    and, with gradients, the student's input and weight gradients from d(loss)/d(logits) (a random stand-in). Where
    the fused losses widen the products (widened_products), the fastest form is float32's: the operands are copied to
    float32 here, outside the timed products."""
    if widened_products(student.dtype, student.device):
        student, student_weight, teacher, teacher_weight = (
            t.detach().float() for t in (student, student_weight, teacher, teacher_weight))
    logits = [torch.empty(student.shape[0], student_weight.shape[0], dtype=student.dtype, device=student.device)
              for _ in range(2)]
    grad_logits = torch.randn_like(logits[0]) if gradients else None
    grad_input, grad_weight = torch.empty_like(student), torch.empty_like(student_weight)

    def run():
        torch.mm(student, student_weight.t(), out=logits[0])
        torch.mm(teacher, teacher_weight.t(), out=logits[1])
        if grad_logits is not None:
            torch.mm(grad_logits, student_weight, out=grad_input)
            torch.mm(grad_logits.t(), student, out=grad_weight)
    return run


LINEAR_DISTILLATION = _family.register(_family.Family(
    name="linear_distillation_loss",
    inputs=(_family.Input("hidden", differentiable=True), _family.Input("weight", differentiable=True),
            _family.Input("bias", optional=True, differentiable=True), _family.Input("teacher_hidden"),
            _family.Input("teacher_weight"), _family.Input("teacher_bias", optional=True),
            _family.Input("target", optional=True)),
    options=LinearDistillationOptions, kernel=KERNEL, run=_run, recompute=_recompute, loss_like=_loss_like,
    gradient_in_backward=lambda backend, options: options.reduction == "none",
    function=linear_distillation_loss,
    sharding=token_sharding("student_input", whole=("student_weight", "student_bias", "teacher_weight", "teacher_bias"),
                            class_dim_name="feature"),
    cases=(_family.Case(_students_and_teachers, dict(chunk_size=4, temperature=2.0, hard_weight=0.5), target=4,
                        bad=(dict(chunk_size=0), dict(beta=2.0))),
           _family.Case(_students_and_teachers, dict(divergence="jsd", reduction="none", chunk_size=4), target=4)),
    # (tokens, features, vocab): the issue's case is 2048 x 512 x 32000, held to its four products' time
    bench=_family.Bench(torch_linear_distillation_loss, None, ((1024, 256, 8192), (2048, 512, 32000)),
                        quick_shapes=((64, 32, 128),), columns="features", make_inputs=_bench_inputs,
                        grid_shapes=((64, 32, 128), (1024, 256, 8192), (2048, 512, 32000)),
                        grid_quick_shapes=((64, 32, 128),), floor=_matrix_products, floor_name="matmuls",
                        targets=(_family.SpeedTarget((2048, 512, 32000), 1.0, within_floor=1.3),))))
LINEAR_DISTILLATION.module = _family.make_module(LINEAR_DISTILLATION, "LinearDistillationLoss", inputs=5,
                                                 doc="lossops.linear_distillation_loss as a Module.")

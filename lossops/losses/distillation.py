"""Knowledge distillation: `lossops.distillation_loss`, the custom op `lossops::distillation_loss`.

One divergence between the teacher's and the student's softened distributions per token (classes last, any leading
dimensions), p_t = softmax(teacher / T), p_s = softmax(student / T):
  forward_kl  KL(p_t || p_s);   reverse_kl  KL(p_s || p_t);   tvd  1/2 sum |p_t - p_s|;
  jsd         beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s, where beta = 0 is forward
              KL and beta = 1 reverse KL (Liger-Kernel's convention; the formula itself tends to 0 at both ends).
Each token's loss is soft_weight * divergence + hard_weight * cross_entropy(student, target) (no temperature in the
cross-entropy, no T^2 factor anywhere); tokens whose target is ignore_index contribute nothing and the mean divides
by the kept tokens (every token without a target). The fused kernels (csrc/distillation.cpp,
triton_kernels/distillation.py) read both rows of a token and write the student's gradient in forward; a teacher
that requires grad takes the plain-PyTorch path (reference_distillation_loss), which gives its gradient too.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend, _checks, _eager, _family, _reduce, _sharding
from .._family import GridShapes as G

DIVERGENCES = ("forward_kl", "reverse_kl", "tvd", "jsd")
# The kernels' divergence codes; jsd at beta 0 or 1 runs as forward or reverse KL.
_FORWARD_KL, _REVERSE_KL, _TVD, _JSD = range(4)
KERNEL = _family.Kernel("distillation", "distillation",
                        ("student", "teacher", "target", "grad", "divergence", "beta", "temperature", "ignore_index",
                         "hard_weight", "soft_weight", "grad_scale"))
# Plain CPU calls (lossops._eager): the kernel's row losses, their mean over the kept tokens (every token without a
# target) and the student's gradient, in one C++ call. The divergence arrives as its kernel code (divergence_code).
EAGER_ROUTE = _eager.EagerRoute(
    "token_rows", "kept_rows",
    scalars=(_eager.Scalar("divergence", "int", _FORWARD_KL, _JSD), _eager.Scalar("beta", "real", 0.0, 1.0),
             _eager.Scalar("temperature", "real", math.ulp(0.0)), _eager.Scalar("ignore_index", "int"),
             _eager.Scalar("hard_weight", "real", 0.0), _eager.Scalar("soft_weight", "real", 0.0)),
    gradients={"grad": "student"}, node="LossopsDistillationLossBackward")
_CODES = {name: code for code, name in enumerate(DIVERGENCES)}


@dataclasses.dataclass(frozen=True)
class DistillationOptions:
    divergence: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    ignore_index: int = -100
    reduction: str = "mean"
    hard_weight: float = 0.0
    soft_weight: float = 1.0


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor] = None, *,
                      divergence: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                      ignore_index: int = -100, reduction: str = "mean", hard_weight: float = 0.0,
                      soft_weight: float = 1.0) -> Tensor:
    """The distillation loss of student_logits against teacher_logits (..., classes), fused forward+backward.

    target (the logits' shape without the class dimension, class indices) marks ignored tokens (ignore_index) and
    feeds the hard term hard_weight * cross_entropy(student_logits, target), which takes no temperature.
    reduction: "mean" over the kept tokens, "sum", or "none" (one value per token, the target's shape). There is
    no T^2 factor: multiply by temperature ** 2 for Hinton's scaling. Gradients: the student's logits; the
    teacher's too when they require grad (computed by the plain-PyTorch formula).
    """
    # The C++ eager path first (docs/eager-path.md): it returns None for anything it does not serve, bad arguments
    # included, and the full path's checks then raise. A hard term without a target is left to those checks.
    if (type(divergence) is str and (code := _CODES.get(divergence)) is not None
            and (target is not None or (type(hard_weight) in (float, int) and hard_weight == 0))
            and not _eager.compiling()):
        if code == _JSD and type(beta) in (float, int) and beta in (0, 1):
            code = _FORWARD_KL if beta == 0 else _REVERSE_KL
        loss = EAGER_ROUTE.call(reduction, student_logits, teacher_logits, target, code, beta, temperature,
                                ignore_index, hard_weight, soft_weight)
        if loss is not None:
            return loss
    return DISTILLATION.full_path(student_logits, teacher_logits, target, divergence=divergence, beta=beta,
                                  temperature=temperature, ignore_index=ignore_index, reduction=reduction,
                                  hard_weight=hard_weight, soft_weight=soft_weight)


def _full_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor] = None, *,
                            divergence: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                            ignore_index: int = -100, reduction: str = "mean", hard_weight: float = 0.0,
                            soft_weight: float = 1.0) -> Tensor:
    """distillation_loss past its C++ eager path: every check, backend and input kind."""
    options = check_options(divergence, beta, temperature, ignore_index, reduction, hard_weight, soft_weight,
                            target is not None)
    student2, teacher2, target1 = check_logits(student_logits, teacher_logits, target)
    backend = _backend.resolve(student_logits.device)
    if backend == "reference" or (torch.is_grad_enabled() and teacher_logits.requires_grad):
        return reference_distillation_loss(student_logits, teacher_logits, target, options)
    wants = torch.is_grad_enabled() and student_logits.requires_grad
    loss = DISTILLATION.apply(backend, {"student_logits": student2, "teacher_logits": teacher2, "target": target1},
                              options, {"student_logits": wants})
    if options.reduction == "none":
        loss = loss.reshape(student_logits.shape[:-1])
    return loss.to(_checks.output_dtype(student_logits))


def check_options(divergence, beta, temperature, ignore_index, reduction, hard_weight, soft_weight,
                  has_target: bool) -> DistillationOptions:
    """The keyword arguments as a DistillationOptions record; each bad one raises an error naming it."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"lossops: divergence must be one of {DIVERGENCES}, got {divergence!r}")
    beta = _checks.in_range("beta", beta, 0.0, 1.0)
    temperature = _checks.real("temperature", temperature)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"lossops: temperature must be a positive finite number, got {temperature}")
    hard_weight = _finite_non_negative("hard_weight", hard_weight)
    soft_weight = _finite_non_negative("soft_weight", soft_weight)
    if hard_weight > 0 and not has_target:
        raise ValueError(f"lossops: hard_weight={hard_weight} adds a cross-entropy on target, but target is None")
    return DistillationOptions(divergence, beta, temperature, _checks.integer("ignore_index", ignore_index),
                               _checks.reduction(reduction), hard_weight, soft_weight)


def _finite_non_negative(name: str, value) -> float:
    value = _checks.in_range(name, value, 0.0)
    if not math.isfinite(value):
        raise ValueError(f"lossops: {name} must be finite, got {value}")
    return value


def check_logits(student: Tensor, teacher: Tensor, target: Optional[Tensor], student_name: str = "student_logits",
                 teacher_name: str = "teacher_logits") -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(student, teacher) as (tokens, classes) matrices with contiguous classes, and the target as int64 (tokens,)."""
    _checks.floating(student_name, student)
    _checks.floating(teacher_name, teacher)
    _checks.same_device(student, **{teacher_name: teacher, "target": target})
    if student.dim() == 0:
        raise ValueError(f"lossops: {student_name} must have at least one dimension (classes), got a 0-d tensor")
    if teacher.shape != student.shape:
        raise ValueError(f"lossops: {teacher_name} must have the shape of {student_name} {tuple(student.shape)}, "
                         f"got {tuple(teacher.shape)}")
    acc = _checks.opmath_dtype(student.dtype)
    if teacher.dtype not in (student.dtype, acc):
        if not _checks.autocast_enabled(student.device):
            raise TypeError(f"lossops: {teacher_name} must have the dtype of {student_name} ({student.dtype}) or "
                            f"{acc}, got {teacher.dtype}")
        teacher = teacher.to(acc)  # the kernels read it in the accumulation dtype, unrounded
    classes = student.shape[-1]
    return _token_rows(student, classes), _token_rows(teacher, classes), token_targets(target, student.shape[:-1])


def token_targets(target: Optional[Tensor], tokens: torch.Size) -> Optional[Tensor]:
    """The class-index target of each token as a flat int64 tensor (None stays None)."""
    if target is None:
        return None
    _checks.tensor("target", target)
    if target.dtype not in (torch.int64, torch.uint8, torch.int32):
        raise TypeError(f"lossops: target must hold class indices (an integer tensor), got dtype {target.dtype}")
    if target.shape != tokens:
        raise ValueError(f"lossops: target must have one class index per token, shape {tuple(tokens)}, got "
                         f"{tuple(target.shape)}")
    return target.reshape(-1).to(torch.int64).contiguous()


def _token_rows(logits: Tensor, classes: int) -> Tensor:
    rows = logits.reshape(-1, classes)
    return rows if classes <= 1 or rows.stride(1) == 1 else rows.contiguous()


def divergence_code(options: DistillationOptions) -> int:
    if options.divergence == "jsd":
        return _FORWARD_KL if options.beta == 0 else _REVERSE_KL if options.beta == 1 else _JSD
    return DIVERGENCES.index(options.divergence)


def token_count(target: Optional[Tensor], rows: int, ignore_index: int, like: Tensor) -> Tensor:
    """What the mean divides by: the kept tokens (a tensor, no host sync; 0 makes the mean NaN, as torch's)."""
    dtype = _checks.opmath_dtype(like.dtype)
    if target is None:
        return torch.full((), rows, dtype=dtype, device=like.device)
    return (target != ignore_index).sum().to(dtype)


def kept_tokens(student: Tensor, target: Optional[Tensor], ignore_index: int) -> Tensor:
    """The mean's denominator for one rank's tokens of classes-last logits (or hidden states) on a DTensor mesh."""
    tokens = student.numel() // max(student.shape[-1], 1) if student.dim() else 1
    return token_count(None if target is None else target.reshape(-1), tokens, ignore_index, student)


def token_sharding(first: str, whole: tuple[str, ...] = (), class_dim_name: str = "class") -> _sharding.Sharding:
    """Sharded on the tokens (any leading dimension of `first`, classes or features last); the mean divides by the
    kept tokens of every rank. The last dimension is refused: no vocabulary-parallel distillation is written."""
    return _sharding.Sharding(lambda x: x.dim() - 1, whole=whole, class_dim_name=class_dim_name,
                              denominator=lambda a: kept_tokens(a[first], a["target"], a["ignore_index"]))


def kernel_arguments(options: DistillationOptions) -> dict:
    """The kernel's option parameters (both backends)."""
    return dict(divergence=divergence_code(options), beta=options.beta, temperature=options.temperature,
                ignore_index=options.ignore_index, hard_weight=options.hard_weight, soft_weight=options.soft_weight)


def _run(family, backend, t, o, grads):
    student, teacher, target = t["student_logits"], t["teacher_logits"], t["target"]
    if backend == "cpp":
        # Host numbers: reading a CPU count costs no sync, and on small inputs the tensor ops around the kernel (the
        # count's, the scale's and its guard's) cost more than the kernel itself.
        denominator = student.shape[0] if target is None else int((target != o.ignore_index).sum())
        scale = (1.0 / denominator if denominator else 0.0) if o.reduction == "mean" else 1.0
    else:
        denominator = token_count(target, student.shape[0], o.ignore_index, student)
        scale = _reduce.gradient_scale(o.reduction, denominator)
    grad = _backend.empty_gradient(student) if grads["student_logits"] else None
    row_loss, total = KERNEL(backend, student=student, teacher=teacher, target=target, grad=grad, grad_scale=scale,
                             **kernel_arguments(o))
    # a mean over no kept token is 0 / 0: NaN, with the zero gradients the zero scale wrote
    return _reduce.reduce(o.reduction, row_loss, total, denominator), {"student_logits": grad}


def _loss_like(t, o):
    student = t["student_logits"]
    return student.new_empty((student.shape[0],) if o.reduction == "none" else (),
                             dtype=_checks.opmath_dtype(student.dtype))


def _kept_and_safe(p: Tensor, *logs: Tensor) -> tuple[Tensor, ...]:
    """Where p > 0, and the log-probabilities with 0 where it is not: p * (a - b) there is 0 (0 log 0 = 0) with
    no 0 * inf in the values or the gradients."""
    kept = p > 0
    return (kept, *(torch.where(kept, log, 0) for log in logs))


def _relative_entropy_terms(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    kept, log_p, log_q = _kept_and_safe(p, log_p, log_q)
    return torch.where(kept, p * (log_p - log_q), 0)


def divergence_per_token(student: Tensor, teacher: Tensor, options: DistillationOptions) -> Tensor:
    """The divergence of every token (classes last), in plain PyTorch with 0 log 0 = 0."""
    log_ps = F.log_softmax(student / options.temperature, dim=-1)
    log_pt = F.log_softmax(teacher / options.temperature, dim=-1)
    ps, pt = log_ps.exp(), log_pt.exp()
    code = divergence_code(options)
    if code == _FORWARD_KL:
        return _relative_entropy_terms(pt, log_pt, log_ps).sum(-1)
    if code == _REVERSE_KL:
        return _relative_entropy_terms(ps, log_ps, log_pt).sum(-1)
    if code == _TVD:
        return 0.5 * (pt - ps).abs().sum(-1)
    beta = options.beta
    m = beta * pt + (1 - beta) * ps
    log_m = torch.log(torch.where(m > 0, m, 1))  # m = 0 only where both terms are 0: no 0 * inf in the gradient
    return (beta * _relative_entropy_terms(pt, log_pt, log_m).sum(-1)
            + (1 - beta) * _relative_entropy_terms(ps, log_ps, log_m).sum(-1))


def reference_distillation_loss(student: Tensor, teacher: Tensor, target: Optional[Tensor],
                                options: DistillationOptions) -> Tensor:
    """Plain PyTorch (the "reference" backend, and the path for a teacher that requires grad)."""
    acc = _checks.opmath_dtype(student.dtype)
    s, t = student.to(acc), teacher.to(acc)
    per_token = options.soft_weight * divergence_per_token(s, t, options)
    if target is None:
        kept = None
    else:
        kept = target != options.ignore_index
        if options.hard_weight > 0:
            hard = F.cross_entropy(s.reshape(-1, s.shape[-1]), target.reshape(-1).long(),
                                   ignore_index=options.ignore_index, reduction="none")
            per_token = per_token + options.hard_weight * hard.reshape(per_token.shape)
        per_token = torch.where(kept, per_token, 0)
    out = _checks.output_dtype(student)
    if options.reduction == "none":
        return per_token.to(out)
    total = per_token.sum()
    if options.reduction == "sum":
        return total.to(out)
    count = per_token.new_tensor(float(per_token.numel())) if kept is None else kept.sum().to(acc)
    return _reduce.mean(total, count).to(out)


def torch_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor] = None, *,
                            divergence: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                            ignore_index: int = -100, reduction: str = "mean", hard_weight: float = 0.0,
                            soft_weight: float = 1.0) -> Tensor:
    """What a torch user writes (the tests' oracle, the benchmark's eager and what torch.compile compiles):
    log_softmax of both models and F.kl_div, in the logits' dtype."""
    log_ps = F.log_softmax(student_logits / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_logits / temperature, dim=-1)
    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "forward_kl" if beta == 0 else "reverse_kl"
    if divergence == "forward_kl":
        per_token = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1)
    elif divergence == "reverse_kl":
        per_token = F.kl_div(log_pt, log_ps, reduction="none", log_target=True).sum(-1)
    elif divergence == "tvd":
        per_token = 0.5 * (log_pt.exp() - log_ps.exp()).abs().sum(-1)
    else:
        log_m = torch.log(beta * log_pt.exp() + (1 - beta) * log_ps.exp())
        per_token = (beta * F.kl_div(log_m, log_pt, reduction="none", log_target=True).sum(-1)
                     + (1 - beta) * F.kl_div(log_m, log_ps, reduction="none", log_target=True).sum(-1))
    per_token = soft_weight * per_token
    if target is None:
        return per_token if reduction == "none" else per_token.sum() if reduction == "sum" else per_token.mean()
    if hard_weight:
        hard = F.cross_entropy(student_logits.flatten(0, -2), target.flatten(), ignore_index=ignore_index,
                               reduction="none")
        per_token = per_token + hard_weight * hard.reshape(per_token.shape)
    kept = target != ignore_index
    per_token = per_token * kept
    if reduction == "none":
        return per_token
    return per_token.sum() if reduction == "sum" else per_token.sum() / kept.sum()


def _student_teacher_target(dtype):
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64)
    teacher = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64) * 2
    target = torch.tensor([[0, 6, -100], [3, 3, 1]])
    return [student.to(dtype), teacher.to(dtype), target]


def _selfcheck_inputs(dtype):
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(256, 1000, generator=gen).to(dtype), torch.randn(256, 1000, generator=gen).to(dtype))


def _bench_inputs(shape, dtype, device):
    student = torch.randn(shape, dtype=dtype, device=device).requires_grad_()
    teacher = torch.randn(shape, dtype=dtype, device=device) * 2
    return student, teacher


DISTILLATION = _family.register(_family.Family(
    name="distillation_loss", inputs=(_family.Input("student_logits", differentiable=True),
                                      _family.Input("teacher_logits"), _family.Input("target", optional=True)),
    options=DistillationOptions, kernel=KERNEL, run=_run, loss_like=_loss_like,
    item_shape=lambda t, o: (t["student_logits"].shape[0], 1), reference=reference_distillation_loss,
    function=distillation_loss, full_path=_full_distillation_loss, torch_fn=torch_distillation_loss,
    eager_routes=(EAGER_ROUTE,), sharding=token_sharding("student_logits"),
    # No torch_fn in the cases: under autocast torch's formula runs log_softmax in bf16, a worse answer than the
    # kernels' float32 one (tests/test_distillation.py holds both to a float64 truth instead).
    cases=(_family.Case(_student_teacher_target, dict(temperature=2.0, hard_weight=0.5),
                        bad=(dict(beta=1.5), dict(temperature=0.0), dict(divergence="kl"))),
           _family.Case(_student_teacher_target, dict(divergence="jsd", beta=0.3, reduction="none")),
           _family.Case(_student_teacher_target, dict(divergence="reverse_kl", reduction="sum")),
           _family.Case(_student_teacher_target, dict(divergence="tvd", soft_weight=0.5, hard_weight=0.25))),
    selfcheck=(dict(divergence="jsd"), lambda s, t: torch_distillation_loss(s, t, divergence="jsd"),
               _selfcheck_inputs),
    bench=_family.Bench(torch_distillation_loss, None, ((256, 1000), (4096, 1024), (4096, 32000)),
                        columns="classes", make_inputs=_bench_inputs,
                        grid_shapes=G.TINY + G.MID + G.LLM[:1], grid_quick_shapes=G.TINY,
                        targets=(_family.SpeedTarget((4096, 32000), 3.0),))))
DISTILLATION.module = _family.make_module(DISTILLATION, "DistillationLoss", inputs=3,
                                          doc="lossops.distillation_loss as a Module.")

"""`lossops.cosine_embedding_loss`: torch's function, fused, as the custom op `lossops::cosine_embedding_loss`.

torch's definition (aten's cosine_embedding_loss): for rows x1, x2 and target y, cos = x1 . x2 / sqrt((|x1|^2 +
1e-12)(|x2|^2 + 1e-12)), the loss 1 - cos where y = 1, max(0, cos - margin) where y = -1, 0 for any other y; the
mean is over the rows. Inputs are (N, D) with a (N,) target, or (D,) with a 0-d target; they broadcast as torch's
products do. The target only selects a formula: it gets no gradient (as in torch). Kernels:
csrc/cosine_embedding.cpp, triton_kernels/cosine_embedding.py (one pass over each row pair: its three sums and both
gradients). Integer inputs take torch's own function (the reference).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend, _checks, _eager, _family, _reduce
from .._family import GridShapes as G
from .._elementwise import denominator_tensor

KERNEL = _family.Kernel("cosine_embedding_loss", "cosine_embedding",
                        ("input1", "input2", "target", "margin", "grad_input1", "grad_input2", "grad_scale",
                         "per_element"))
# torch's options for plain CPU calls of (N, D) rows and a (N,) target (lossops._eager): the mean over the rows.
EAGER_ROUTE = _eager.EagerRoute("row_pairs", "batch", scalars=(_eager.Scalar("margin"),),
                                gradients={"grad_input1": "input1", "grad_input2": "input2"},
                                node="LossopsCosineEmbeddingLossBackward")
INPUTS = (_family.Input("input1", differentiable=True), _family.Input("input2", differentiable=True),
          _family.Input("target"), _family.Input("denominator"))


@dataclasses.dataclass(frozen=True)
class CosineEmbeddingOptions:
    margin: float = 0.0
    reduction: str = "mean"


def _run(family, backend, t, o, grads):
    x1, x2 = t["input1"], t["input2"]
    g1 = _backend.empty_gradient(x1) if grads["input1"] else None
    g2 = _backend.empty_gradient(x2) if grads["input2"] else None
    common = dict(input1=x1, input2=x2, target=t["target"], margin=o.margin, grad_input1=g1, grad_input2=g2)
    if backend == "triton":  # the launch scales the gradients and reduces the loss: no torch op around it
        reduced = _backend.kernel(backend, KERNEL.module, KERNEL.name).reduced
        return reduced(**common, reduction=o.reduction, denominator=t["denominator"]), {"input1": g1, "input2": g2}
    row_loss, total = KERNEL(backend, **common, grad_scale=_reduce.gradient_scale(o.reduction, t["denominator"]),
                             per_element=o.reduction == "none")
    return _reduce.reduce(o.reduction, row_loss, total, t["denominator"]), {"input1": g1, "input2": g2}


def _loss_like(t, o):
    x1 = t["input1"]
    return x1.new_empty(x1.shape[:1] if o.reduction == "none" else (), dtype=_checks.opmath_dtype(x1.dtype))


def _item_shape(t, _o):
    return (t["input1"].shape[0], 1)  # a row's grad_output scales its gradient row


def _pairs(dtype):
    return [torch.randn(6, 5, dtype=dtype), torch.randn(6, 5, dtype=dtype),
            torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0], dtype=dtype)]


def _selfcheck_pairs(dtype):
    return (torch.randn(512, 64, dtype=dtype), torch.randn(512, 64, dtype=dtype),
            torch.randint(0, 2, (512,)).to(dtype) * 2 - 1)


def _bench_pairs(shape, dtype, device):
    x1 = torch.randn(shape, dtype=dtype, device=device).requires_grad_()
    return (x1, torch.randn(shape, dtype=dtype, device=device),
            torch.randint(0, 2, shape[:1], device=device).to(dtype) * 2 - 1)


def cosine_embedding_loss(input1: Tensor, input2: Tensor, target: Tensor, margin: float = 0, size_average=None,
                          reduce=None, reduction: str = "mean") -> Tensor:
    """Drop-in for torch.nn.functional.cosine_embedding_loss, fused forward+backward (both inputs' gradients)."""
    # The C++ eager path first: None for anything it does not serve, errors included, which the checks below raise
    if size_average is None and reduce is None and type(margin) in (float, int) and not _eager.compiling():
        loss = EAGER_ROUTE.call(reduction, input1, input2, target, margin)
        if loss is not None:
            return loss
    reduction = _checks.reduction(reduction, size_average, reduce)
    options = CosineEmbeddingOptions(_checks.real("margin", margin), reduction)
    operands = {"input1": input1, "input2": input2, "target": target}
    for name, value in operands.items():
        _checks.tensor(name, value)
    _checks.same_device(input1, "input1", input2=input2, target=target)
    if target.dim() not in (0, 1):
        raise RuntimeError(f"0D or 1D target tensor expected, multi-target not supported (lossops: target of shape "
                           f"{tuple(target.shape)})")
    if target.dim() == 1 and (input1.dim() != 2 or input2.dim() != 2):
        raise RuntimeError(f"1D target tensor expects 2D input tensors, but found inputs with sizes "
                           f"{list(input1.shape)} and {list(input2.shape)}.")
    if target.dim() == 0 and (input1.dim() != 1 or input2.dim() != 1):
        raise RuntimeError(f"0D target tensor expects 1D input tensors, but found inputs with sizes "
                           f"{list(input1.shape)} and {list(input2.shape)}.")
    if target.is_complex() or input1.is_complex() or input2.is_complex():
        raise RuntimeError("lossops: cosine_embedding_loss takes real tensors, got "
                           f"{input1.dtype}, {input2.dtype} and {target.dtype}")
    pair_shape = _checks.broadcast_shape(input1.shape, input2.shape)
    rows = _checks.broadcast_shape(pair_shape[:-1], target.shape)

    def reference():
        return F.cosine_embedding_loss(input1, input2, target, margin=options.margin, reduction=options.reduction)

    dtype = torch.promote_types(input1.dtype, input2.dtype)
    backend = _backend.resolve(input1.device)
    if not dtype.is_floating_point or backend == "reference":
        return reference()
    # (N, D) rows, the target (it only selects a formula: no gradient, as in torch) one per row
    shape = (rows.numel(), pair_shape[-1])
    first, second = _kernel_pair(input1, input2, dtype)
    x1, x2 = _as_rows(first, rows, shape), _as_rows(second, rows, shape)
    y = target.detach().to(_checks.opmath_dtype(dtype)).expand(rows).reshape(shape[0]).contiguous()
    grad_enabled = torch.is_grad_enabled()
    loss = COSINE_EMBEDDING_LOSS.apply(
        backend, {"input1": x1, "input2": x2, "target": y, "denominator": denominator_tensor(shape[0], x1)}, options,
        {"input1": grad_enabled and x1.requires_grad, "input2": grad_enabled and x2.requires_grad})
    loss = loss.reshape(rows) if options.reduction == "none" else loss
    autocast = dtype != torch.float64 and _checks.autocast_enabled(input1.device)
    return loss.to(torch.float32 if autocast else dtype)  # torch computes it in float32 under autocast


def _as_rows(x: Tensor, rows: torch.Size, shape: tuple) -> Tensor:
    """x as contiguous (N, D) rows: broadcast rows are expanded (their gradients summed back by autograd)."""
    return x.expand(*rows, shape[1]).reshape(shape).contiguous()


LOW_PRECISION = (torch.bfloat16, torch.float16)


def _kernel_pair(input1: Tensor, input2: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The kernel's two inputs in the dtypes it reads: both in the promoted dtype, except under autocast (where torch
    computes the loss in float32): there inputs of one low-precision dtype are read as they are, and one
    low-precision input beside a float32 one is read as it is, passed first with the other in float32. The loss is
    symmetric in its inputs, bit for bit (its sums are of products), so the order is free."""
    if _checks.autocast_enabled(input1.device):
        low1, low2 = input1.dtype in LOW_PRECISION, input2.dtype in LOW_PRECISION
        if low1 and low2 and input1.dtype == input2.dtype:
            return input1, input2
        if low1 != low2 and dtype == torch.float32:
            return (input1, input2) if low1 else (input2, input1)
    return input1.to(dtype), input2.to(dtype)


def reference_cosine_embedding(input1, input2, target, denominator, options: CosineEmbeddingOptions) -> Tensor:
    """Plain PyTorch (the "reference" backend), on the op's (N, D) rows: torch's function."""
    return F.cosine_embedding_loss(input1, input2, target, margin=options.margin, reduction=options.reduction)


COSINE_EMBEDDING_LOSS = _family.register(_family.Family(
    name="cosine_embedding_loss", inputs=INPUTS, options=CosineEmbeddingOptions, kernel=KERNEL, run=_run,
    loss_like=_loss_like, item_shape=_item_shape, reference=reference_cosine_embedding,
    function=cosine_embedding_loss, torch_fn=F.cosine_embedding_loss, eager_routes=(EAGER_ROUTE,),
    bad_inputs="row_pairs",
    cases=(_family.Case(_pairs, dict(margin=0.2), F.cosine_embedding_loss, target=2),),
    selfcheck=(dict(margin=0.3), lambda *a: F.cosine_embedding_loss(*a, margin=0.3), _selfcheck_pairs),
    bench=_family.Bench(F.cosine_embedding_loss, lambda x: x, ((256, 1000), (4096, 1024), (4096, 4096)),
                        kwargs=dict(margin=0.3), columns="features", make_inputs=_bench_pairs,
                        grid_shapes=G.TINY + G.MID + G.ELEMENTWISE_LARGE, grid_quick_shapes=G.TINY)))
COSINE_EMBEDDING_LOSS.module = _family.make_module(COSINE_EMBEDDING_LOSS, "CosineEmbeddingLoss", inputs=3,
                                                   doc="Drop-in for torch.nn.CosineEmbeddingLoss.")

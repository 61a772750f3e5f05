"""DTensor inputs: every lossops loss on a 1-D device mesh (torch.distributed.tensor), computed on the local
shards with the reduction made across the mesh.

A loss's `Sharding` (lossops._sharding, in its family declaration) says how its tensors line up with the input's
dimensions. Then:
  - everything Replicate: each rank computes the whole loss; the result is a Replicate DTensor;
  - the input sharded on a batch / token / spatial dimension (Shard(d), d not the class dimension): the other
    tensors are sharded alike (a plain tensor or a Replicate DTensor is split here; per-class weights stay whole),
    each rank computes its rows, and the reduction runs over the mesh: 'none' gives a DTensor sharded like the
    input, 'sum' a Replicate sum, 'mean' the global sum over the global denominator (the sum of the non-ignored
    targets' weights over all ranks, not a mean of per-rank means);
  - cross-entropy logits sharded on the class dimension: the vocabulary-parallel algorithm of
    lossops.distributed (fused shard kernels, partial logsumexp statistics), as torch's loss_parallel();
  - anything else (Partial inputs, meshes of more than one dimension, class-sharded losses without a
    vocabulary-parallel algorithm) raises a ValueError naming the placement.
A plain tensor beside DTensor arguments, the input included, counts as whole: Replicate on their mesh.
Gradients flow back through DTensor's to_local / from_local, so each input's gradient is a DTensor with that
input's placements.
"""
from __future__ import annotations

import functools
import inspect
import sys
from typing import Callable, Optional

import torch

from . import _checks, distributed
from ._family import OPS, Family
from ._sharding import Sharding


def serve_dtensors(families: dict[str, Family]) -> None:
    """Makes each family's public function also serve DTensor inputs (lossops runs this once every family is
    registered): the function itself, or, where it runs the C++ eager path first, the full path it hands every
    other call to (Family.full_path). The family's sharding record is read when a DTensor call comes."""
    for family in families.values():
        if family.function is None or hasattr(family.function, "sharding_of"):
            continue  # served already
        sharding_of = _sharding_of(family)
        if family.full_path is not None:
            family.full_path = accepting_dtensors(family.full_path, sharding_of, family.name)
            family.function.sharding_of = sharding_of
        else:
            family.function = accepting_dtensors(family.function, sharding_of)


def _sharding_of(family: Family) -> Callable[[], Optional[Sharding]]:
    return lambda: family.sharding


def accepting_dtensors(function: Callable, sharding, name: Optional[str] = None) -> Callable:
    """`function`, also serving DTensor inputs (the input or any other argument a DTensor); a plain call costs a
    type check per argument. sharding: a Sharding, None, or a function returning one (a family's, read when a
    DTensor call comes). name: the public function's, for errors (default: function's own)."""
    signature = inspect.signature(function)
    first = next(iter(signature.parameters))
    sharding_of = sharding if callable(sharding) else lambda: sharding

    @functools.wraps(function)
    def call(*args, **kwargs):
        x = args[0] if args else kwargs.get(first)
        if (type(x) is torch.Tensor or not _is_dtensor(x)) and not _other_dtensor(x, args, kwargs):
            return function(*args, **kwargs)
        return _call(function, signature, sharding_of(), args, kwargs, name or function.__name__)

    call.sharding_of = sharding_of
    return call


_registered_ops: set = set()


def register_op_strategies() -> None:
    """Lets DTensor run lossops' custom ops when they are called directly (torch.ops.lossops.*): replicated in,
    replicated out, so DTensor gathers sharded inputs first (correct, not fast; the public functions above shard
    properly). Done once torch.distributed.tensor is in use: importing it costs half a second."""
    if "torch.distributed.tensor" not in sys.modules:
        return
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.experimental import register_sharding
    for family in OPS.values():
        op = family.op._opoverload
        if op in _registered_ops:
            continue
        outputs = len(op._schema.returns)

        def replicated(*args, _outputs=outputs, **kwargs):
            inputs = [Replicate() if hasattr(a, "placements") or hasattr(a, "shape") else None for a in args]
            return [([Replicate()] * _outputs, inputs)]

        register_sharding(op)(replicated)
        _registered_ops.add(op)


def _is_dtensor(value) -> bool:
    return type(value).__name__ == "DTensor" and type(value).__module__.startswith("torch.distributed.tensor")


def _other_dtensor(x, args, kwargs) -> bool:
    """Whether another argument is a DTensor when the input x is a plain tensor (an input that is no tensor at
    all goes to the function's own checks)."""
    return isinstance(x, torch.Tensor) and (any(map(_is_dtensor, args)) or any(map(_is_dtensor, kwargs.values())))


def _call(function, signature, sharding, args, kwargs, name):
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    register_op_strategies()
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    a = dict(bound.arguments)
    names = list(a)
    x = a[names[0]]
    if not _is_dtensor(x):  # a plain input beside DTensor arguments: whole, as a plain target beside DTensor logits
        other = next(v for v in a.values() if _is_dtensor(v))
        x = a[names[0]] = DTensor.from_local(x, other.device_mesh, [Replicate()] * other.device_mesh.ndim,
                                             run_check=False)
    mesh = x.device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"lossops: {name} takes DTensors on a 1-D device mesh, got a {mesh.ndim}-D mesh "
                         f"{tuple(mesh.shape)} (flatten it, or pass the mesh dimension the loss is sharded on)")
    for key, value in a.items():
        if _is_dtensor(value) and value.device_mesh != mesh:
            raise ValueError(f"lossops: {name}: {key} lives on another device mesh than {names[0]}")
    if "reduction" in a:  # legacy size_average / reduce become a reduction here, once
        a["reduction"] = _checks.reduction(a["reduction"], a.pop("size_average", None), a.pop("reduce", None))
        for legacy in ("size_average", "reduce"):
            if legacy in signature.parameters:
                a[legacy] = None
    (placement,) = x.placements
    sharded = next((v for v in a.values() if _is_dtensor(v) and not isinstance(v.placements[0], Replicate)), None)
    if sharding is not None and sharded is not None:
        for key, default in sharding.replicated_only.items():
            value = a.get(key, default)
            if value is not None if default is None else value != default:
                raise ValueError(f"lossops: {name}: {key}={a[key]!r} is supported with replicated DTensor inputs "
                                 f"only, not with an argument placed as {sharded.placements[0]}")
    owner = a.get(sharding.classes_sharded_by) if sharding is not None and sharding.classes_sharded_by else None
    if _is_dtensor(owner) and isinstance(owner.placements[0], Shard):
        return _classes_sharded_by_argument(sharding, a, names, placement, mesh, name)
    if isinstance(placement, Partial) or any(_is_dtensor(v) and isinstance(v.placements[0], Partial)
                                             for v in a.values()):
        raise ValueError(f"lossops: {name} does not take Partial DTensors (pending reductions); redistribute "
                         "them to Replicate() or Shard() first")
    if isinstance(placement, Replicate):
        local = {k: _whole(v, mesh) for k, v in a.items()}
        result = function(**local)
        if isinstance(result, tuple):  # a NamedTuple of per-token outputs (return_token_stats=True)
            return type(result)(*(DTensor.from_local(r, mesh, [Replicate()], run_check=False) for r in result))
        return DTensor.from_local(result, mesh, [Replicate()], run_check=False)
    if not isinstance(placement, Shard) or sharding is None or not sharding.batch_sharding:
        raise ValueError(f"lossops: {name} does not support {names[0]} placed as {placement} on a device mesh; "
                         "only Replicate()" + (" and Shard() of an item dimension" if sharding else ""))
    d = placement.dim % x.dim()
    class_dim = sharding.class_dim(x) if sharding.class_dim is not None else None
    if d == class_dim:
        if sharding.parallel_classes is None:
            raise ValueError(f"lossops: {name} does not support {names[0]} sharded on its {sharding.class_dim_name} "
                             f"dimension (Shard({d})); shard a batch dimension or replicate it")
        local = {k: (v.to_local() if k == names[0] else _whole(v, mesh)) for k, v in a.items()}
        loss = sharding.parallel_classes(local, x, mesh)
        return DTensor.from_local(loss, mesh, [Replicate()], run_check=False)
    return _batch_sharded(function, sharding, a, names, x, d, class_dim, mesh)


def _classes_sharded_by_argument(sharding, a, names, placement, mesh, name):
    from torch.distributed.tensor import DTensor, Replicate
    owner_name = sharding.classes_sharded_by
    owner = a[owner_name]
    if owner.placements[0].dim % owner.dim() != 0:
        raise ValueError(f"lossops: {name} supports {owner_name} sharded on its rows (the classes, Shard(0)), got "
                         f"{owner.placements[0]}")
    if not isinstance(placement, Replicate):
        raise ValueError(f"lossops: {name} with {owner_name} sharded on the classes needs {names[0]} replicated, got "
                         f"{placement}")
    local = {}
    for key, value in a.items():
        if key == owner_name:
            local[key] = value.to_local()
        elif key in sharding.split_with_classes and isinstance(value, torch.Tensor):
            local[key] = _split(value, 0, mesh)
        else:
            local[key] = _whole(value, mesh) if isinstance(value, torch.Tensor) else value
    loss = sharding.parallel_classes(local, a[names[0]], mesh)
    return DTensor.from_local(loss, mesh, [Replicate()], run_check=False)


def _whole(value, mesh):
    from torch.distributed.tensor import Replicate
    if _is_dtensor(value):
        return value.redistribute(mesh, [Replicate()]).to_local()
    return value


def _summed_gradient(value, mesh):
    """A whole tensor used by every rank's rows (a replicated head's weight): its gradient is the sum of the
    ranks' parts, all-reduced in backward, so it comes back complete (Replicate) on every rank."""
    local = _whole(value, mesh)
    if not local.requires_grad or not torch.is_grad_enabled():
        return local
    return distributed._SumGradOverGroup.apply(local, mesh.get_group())


def _split(value, dim: int, mesh):
    """This rank's part of `value` along `dim`, exactly as DTensor shards it (a plain tensor counts as whole)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    if not _is_dtensor(value):
        value = DTensor.from_local(value, mesh, [Replicate()], run_check=False)
    return value.redistribute(mesh, [Shard(dim)]).to_local()


def _item_dim(value: torch.Tensor, x: torch.Tensor, d: int, class_dim: Optional[int]) -> Optional[int]:
    """The dimension of `value` that lines up with the input's sharded dimension d, or None (kept whole)."""
    if value.dim() == x.dim():  # the input's shape (or one broadcasting to it)
        return d if value.shape[d] == x.shape[d] and x.shape[d] != 1 else None
    if class_dim is not None and value.dim() == x.dim() - 1:  # per item: the input's shape without the class dim
        k = d if d < class_dim else d - 1
        return k if value.shape[k] == x.shape[d] else None
    k = d - (x.dim() - value.dim())  # broadcasting from the right
    return k if 0 <= k < value.dim() and value.shape[k] == x.shape[d] and x.shape[d] != 1 else None


def _batch_sharded(function, sharding, a, names, x, d, class_dim, mesh):
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    local = {}
    for key, value in a.items():
        if key == names[0]:
            local[key] = value.to_local()
        elif isinstance(value, torch.Tensor):
            k = None if key in sharding.whole else _item_dim(value, x, d, class_dim)
            local[key] = _summed_gradient(value, mesh) if k is None else _split(value, k, mesh)
        else:
            local[key] = value
    reduction = a.get("reduction", "mean")
    if reduction == "none":
        out = function(**local)
        if class_dim is None or out.dim() == x.dim():
            shape, k = x.shape, d
        else:
            shape, k = x.shape[:class_dim] + x.shape[class_dim + 1:], (d if d < class_dim else d - 1)
        return DTensor.from_local(out, mesh, [Shard(k)], run_check=False, shape=shape,
                                  stride=torch.empty(shape, device="meta").stride())

    def global_value(t):
        return DTensor.from_local(t, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()])

    if reduction == "sum":
        return global_value(function(**dict(local, reduction="sum")))
    avg_factor = a.get("avg_factor")
    if avg_factor is not None:  # mmdetection's convention: a global denominator given by the caller
        total = global_value(function(**dict(local, reduction="sum", avg_factor=None)))
        return total / (avg_factor.to_local() if _is_dtensor(avg_factor) else avg_factor)
    terms = sharding.local_sums(function, local) if sharding.local_sums is not None else None
    if terms is None:
        total = function(**dict(local, reduction="sum"))
        if sharding.denominator is not None:
            denominator = sharding.denominator(local)
        else:
            denominator = torch.full((), local[names[0]].numel(), dtype=total.dtype, device=total.device)
        terms = [(total, denominator)]
    loss = None
    for total, denominator in terms:
        term = global_value(total) / global_value(denominator.to(total.dtype).detach())
        loss = term if loss is None else loss + term
    return loss

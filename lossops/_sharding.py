"""How a loss's tensors line up with its input on a DTensor device mesh: the record a family declares
(lossops._family.Family.sharding) and lossops._dtensor reads when a DTensor call comes."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch


@dataclasses.dataclass(frozen=True)
class Sharding:
    """How a loss's tensor arguments line up with its input (the first argument) on a device mesh.

    class_dim: the input's class dimension (softmax losses: 1, or 0 for a 1-D input); None when every dimension
      is an item dimension (elementwise losses). Arguments with fewer dimensions than the input, whose shape is
      the input's without the class dimension, are per-item targets; arguments of the input's shape (or
      broadcasting to it) are split along the same dimension where they have it; `whole` names arguments that
      are never split (per-class weights).
    denominator(arguments) -> the mean's denominator for one rank's arguments (None: the number of loss items).
    parallel_classes(arguments, input, mesh) -> the loss when the class dimension is sharded (None: refused).
    local_sums(function, arguments) -> [(local sum, local denominator)] when the mean is a sum of terms with
      different denominators (cross-entropy's z-loss beside class weights); None: one term.
    """
    class_dim: Optional[Callable[[torch.Tensor], int]] = None
    whole: tuple[str, ...] = ()
    denominator: Optional[Callable[[dict], torch.Tensor]] = None
    parallel_classes: Optional[Callable] = None
    local_sums: Optional[Callable] = None
    batch_sharding: bool = True  # False: only Replicate inputs (e.g. CTC, whose lengths are host lists)
    # an argument whose Shard(0) shards the classes (linear cross-entropy's weight), and those split with it
    classes_sharded_by: Optional[str] = None
    split_with_classes: tuple[str, ...] = ()
    class_dim_name: str = "class"
    # arguments served only when every input is replicated (their sharded rules are not written): refused
    # with a ValueError otherwise, where leaving them out of a sharded mean would be silently wrong
    replicated_only: dict = dataclasses.field(default_factory=dict)  # name -> its default

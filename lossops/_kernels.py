"""Kernel declarations: a kernel's name, the module that holds it in lossops.triton_kernels, and its keyword
parameters, the same on both backends. Families declare theirs (lossops._family), as do the shared kernels below
them (the vocabulary-parallel shard kernels in lossops.distributed, the token statistics)."""
from __future__ import annotations

import dataclasses

from . import _backend


# Every kernel declared anywhere (families' and helpers' such as the vocabulary-parallel shard kernels), by name:
# what tests/test_kernel_abi.py holds both backends to.
KERNELS: dict[str, "Kernel"] = {}


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A kernel as both backends expose it: the C++ library registers `name` with these keyword parameters
    (LOSSOPS_REGISTER_KERNEL), lossops.triton_kernels.<module> defines a function `name` taking the same ones."""
    name: str
    module: str
    parameters: tuple[str, ...]

    def __post_init__(self):
        KERNELS.setdefault(self.name, self)

    def __call__(self, backend: str, **arguments):
        return _backend.kernel(backend, self.module, self.name)(**arguments)

"""lossops: fused forward+backward loss kernels for PyTorch (C++ on CPU, Triton on GPU)."""
from ._backend import (backend, empty_cache, get_backend, gradient_cache_bytes, gradient_cache_enabled, set_backend,
                       set_gradient_cache, set_target_checks, show_config, target_checks)
from . import losses as _losses  # registers every loss family
from ._family import FAMILIES as _FAMILIES
from . import distributed, monitor, nn
from ._dtensor import register_op_strategies as _register_op_strategies
from .losses.token_stats import LossWithTokenStats

_register_op_strategies()  # when torch.distributed.tensor is already imported; else on the first DTensor call

SETTINGS = ["backend", "get_backend", "set_backend", "set_gradient_cache", "gradient_cache_enabled", "empty_cache",
            "gradient_cache_bytes", "show_config", "set_target_checks", "target_checks"]
globals().update({name: family.function for name, family in _FAMILIES.items()})
__all__ = ["monitor", "nn", "distributed", "LossWithTokenStats", *SETTINGS, *_FAMILIES]
__version__ = "0.1.0"

"""lossops: fused forward+backward loss kernels for PyTorch (C++ on CPU, Triton on GPU)."""
# Re-exported settings ("name as name": an explicit re-export; SETTINGS below lists them for __all__).
from ._backend import backend as backend, empty_cache as empty_cache, get_backend as get_backend
from ._backend import gradient_cache_bytes as gradient_cache_bytes, gradient_cache_enabled as gradient_cache_enabled
from ._backend import set_backend as set_backend, set_gradient_cache as set_gradient_cache
from ._backend import set_target_checks as set_target_checks, show_config as show_config
from ._backend import target_checks as target_checks
from ._version import __version__ as __version__
from . import losses  # noqa: F401 -- imported for its side effect: registers every loss family
from ._family import FAMILIES as _FAMILIES
from . import _dtensor, distributed, monitor, nn
from .losses.token_stats import LossWithTokenStats

# Every public function also serves DTensor inputs, lossops.nn's Modules with it (they call family.function).
_dtensor.serve_dtensors(_FAMILIES)
_dtensor.register_op_strategies()  # when torch.distributed.tensor is already imported; else on the first DTensor call

SETTINGS = ["backend", "get_backend", "set_backend", "set_gradient_cache", "gradient_cache_enabled", "empty_cache",
            "gradient_cache_bytes", "show_config", "set_target_checks", "target_checks"]
globals().update({name: family.function for name, family in _FAMILIES.items()})
__all__ = ["monitor", "nn", "distributed", "LossWithTokenStats", *SETTINGS, *_FAMILIES]

"""lossops: fused forward+backward loss kernels for PyTorch (C++ on CPU, Triton on GPU)."""
from ._backend import (backend, empty_cache, get_backend, gradient_cache_bytes, gradient_cache_enabled, set_backend,
                       set_gradient_cache, show_config)
from .cross_entropy import cross_entropy
from .bce import binary_cross_entropy_with_logits
from .focal import sigmoid_focal_loss, sigmoid_focal_loss_index, softmax_focal_loss
from .regression import huber_loss, l1_loss, mse_loss, smooth_l1_loss
from .linear_cross_entropy import linear_cross_entropy
from . import distributed, monitor, nn

__all__ = ["monitor", "backend", "get_backend", "set_backend", "set_gradient_cache", "gradient_cache_enabled",
           "empty_cache", "gradient_cache_bytes", "show_config", "cross_entropy", "binary_cross_entropy_with_logits", "sigmoid_focal_loss",
           "sigmoid_focal_loss_index", "softmax_focal_loss", "smooth_l1_loss", "huber_loss", "l1_loss", "mse_loss",
           "linear_cross_entropy", "nn", "distributed"]
__version__ = "0.1.0"

"""lossops: fused forward+backward loss kernels for PyTorch (C++ on CPU, Triton on GPU)."""
from ._backend import backend, get_backend, set_backend
from .cross_entropy import cross_entropy
from . import nn

__all__ = ["backend", "get_backend", "set_backend", "cross_entropy", "nn"]
__version__ = "0.1.0"

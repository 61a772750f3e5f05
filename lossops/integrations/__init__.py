"""Adapters that route other libraries' training losses through lossops' fused kernels.

Each adapter is imported on its own (`import lossops.integrations.transformers`) and needs its library
installed (`pip install lossops[transformers]`); `import lossops` never imports any of them.
"""

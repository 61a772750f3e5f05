"""Microbenchmarks of lossops against PyTorch eager, torch.compile and the memory floors (see bench/README.md
and docs/benchmarks.md)."""

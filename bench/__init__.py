"""Microbenchmarks of lossops against PyTorch eager, torch.compile and the memory floors (see README.md)."""

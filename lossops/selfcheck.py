"""`python -m lossops.selfcheck`: every op against PyTorch on random inputs, on every usable backend.

Prints one line per (op, backend, dtype) with the largest loss and gradient differences and exits 1 if
any exceeds its tolerance. Part of the README's main job: a quick proof the build on this machine is sound.
"""
from __future__ import annotations

import math
import sys

import torch
import lossops
from lossops._family import FAMILIES

TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-10}


def _cases():
    """(name, lossops function, truth, input maker) for each loss family that declares a self-check."""
    cases = []
    for name, family in FAMILIES.items():
        if family.selfcheck is None:
            continue
        kwargs, truth, make = family.selfcheck
        label = name + "".join(f"({k}={v})" for k, v in kwargs.items() if k == "gamma")
        cases.append((label, lambda *a, _fn=family.function, _kw=kwargs: _fn(*a, **_kw), truth, make))
    return cases


def _backends():
    names = ["cpp", "reference"]
    if torch.cuda.is_available():
        names.insert(1, "triton")
    return names


def run() -> int:
    torch.manual_seed(0)
    failures = 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(lossops.show_config())
    print(f"self-check against torch {torch.__version__}")
    for name, ours, theirs, make in _cases():
        for backend in _backends():
            for dtype in (torch.float32, torch.float64):
                x, *rest = make(dtype)
                dev = "cpu" if backend == "cpp" else device
                x = x.to(dev).requires_grad_()
                rest = [r.to(dev) if isinstance(r, torch.Tensor) else r for r in rest]
                with lossops.backend(backend):
                    loss = ours(x, *rest)
                grad, = torch.autograd.grad(loss, x)
                x_ref = x.detach().clone().requires_grad_()
                expected = theirs(x_ref, *rest)
                grad_ref, = torch.autograd.grad(expected, x_ref)
                loss_err = (loss.double() - expected.double()).abs().item() / max(1.0, expected.abs().item())
                grad_err = ((grad - grad_ref).abs().max().item() / max(grad_ref.abs().max().item(), 1e-30))
                ok = loss_err <= TOLERANCE[dtype] and grad_err <= TOLERANCE[dtype] and math.isfinite(loss.item())
                failures += not ok
                print(f"  {'ok  ' if ok else 'FAIL'} {name:34s} {backend:9s} {str(dtype):14s} "
                      f"loss rel err {loss_err:.1e}  grad rel err {grad_err:.1e}")
    print("self-check passed" if not failures else f"self-check FAILED ({failures} mismatches)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(run())

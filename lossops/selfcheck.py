"""`python -m lossops.selfcheck`: every op against PyTorch on random inputs, on every usable backend.

Prints one line per (op, backend, dtype) with the largest loss and gradient differences and exits 1 if
any exceeds its tolerance. Part of the README's main job: a quick proof the build on this machine is sound.
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

import lossops

TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-10}


def _sigmoid_focal_truth(x, t, alpha=0.25, gamma=2.0):
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    return (alpha * t + (1 - alpha) * (1 - t)) * ce * (1 - p_t) ** gamma


def _cases():
    """(name, lossops function, torch function, input maker) for each op."""
    def logits_index(dtype):
        return torch.randn(64, 1000, dtype=dtype) * 3, torch.randint(0, 1000, (64,))

    def pair(dtype):
        return torch.randn(4096, dtype=dtype), torch.randn(4096, dtype=dtype)

    def logits_binary(dtype):
        return torch.randn(512, 80, dtype=dtype) * 4, torch.rand(512, 80, dtype=dtype).round()

    return [
        ("cross_entropy", lambda x, y: lossops.cross_entropy(x, y, label_smoothing=0.1),
         lambda x, y: F.cross_entropy(x, y, label_smoothing=0.1), logits_index),
        ("softmax_focal_loss(gamma=0)", lambda x, y: lossops.softmax_focal_loss(x, y, gamma=0.0), F.cross_entropy,
         logits_index),
        ("sigmoid_focal_loss", lambda x, t: lossops.sigmoid_focal_loss(x, t, reduction="mean"),
         lambda x, t: _sigmoid_focal_truth(x, t).mean(), logits_binary),
        ("binary_cross_entropy_with_logits", lossops.binary_cross_entropy_with_logits,
         F.binary_cross_entropy_with_logits, logits_binary),
        ("smooth_l1_loss", lambda x, t: lossops.smooth_l1_loss(x, t, beta=0.5),
         lambda x, t: F.smooth_l1_loss(x, t, beta=0.5), pair),
        ("huber_loss", lossops.huber_loss, F.huber_loss, pair),
        ("l1_loss", lossops.l1_loss, F.l1_loss, pair),
        ("mse_loss", lossops.mse_loss, F.mse_loss, pair),
    ]


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
                x, t = make(dtype)
                dev = "cpu" if backend == "cpp" else device
                x = x.to(dev).requires_grad_()
                t = t.to(dev)
                with lossops.backend(backend):
                    loss = ours(x, t)
                grad, = torch.autograd.grad(loss, x)
                x_ref = x.detach().clone().requires_grad_()
                expected = theirs(x_ref, t)
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

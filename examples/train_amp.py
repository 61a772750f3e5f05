"""Mixed-precision training with lossops.cross_entropy, torch.autocast and torch.amp.GradScaler.

    python examples/train_amp.py                       # CPU bf16 here; CUDA (bf16, or fp16 on older GPUs) if present
    python examples/train_amp.py --steps 50 --hidden 64 --monitor-dir runs/amp

The task is generated in code: inputs are Gaussian vectors and the label is the arg-max of a fixed random
"teacher" network, so it is learnable but not linearly separable. The model is an MLP with LayerNorm, trained
with AdamW (weight decay on weight matrices only) and gradient clipping.

GradScaler matters for fp16, whose range is small enough for gradients to underflow; bf16 has fp32's range and
does not need it, but the loop is the same so the one script serves both. A step whose scaled gradients hold
an inf/NaN is skipped by the scaler, which then halves its scale: `--dtype fp16 --init-scale 1e10` shows that
(fp16 autocast runs on CPU too). Under bf16 even the largest fp32 scale seldom overflows a gradient.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lossops  # noqa: E402
from lossops.monitor import GradientMonitor  # noqa: E402
from _common import Progress, adamw, autocast_dtype, pick_device, set_threads, text_curve  # noqa: E402


class MLP(nn.Module):
    def __init__(self, features: int, hidden: int, classes: int, layers: int):
        super().__init__()
        blocks, width = [], features
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.GELU()]
            width = hidden
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def teacher_data(samples: int, features: int, classes: int, generator: torch.Generator):
    x = torch.randn(samples, features, generator=generator)
    w1 = torch.randn(features, 4 * classes, generator=generator) / math.sqrt(features)
    w2 = torch.randn(4 * classes, classes, generator=generator) / math.sqrt(4 * classes)
    return x, (torch.tanh(x @ w1) @ w2).argmax(1)


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # unscaled loss of every step
    skipped: list[bool] = field(default_factory=list)  # GradScaler skipped the optimizer step (found inf/NaN)
    scales: list[float] = field(default_factory=list)  # GradScaler scale after each step's update()
    grad_norms: list[float] = field(default_factory=list)  # unscaled, before clipping
    unhandled_steps: list[int] = field(default_factory=list)  # non-finite gradients the scaler did not skip
    params_finite: bool = True
    accuracy: float = float("nan")  # on held-out teacher samples
    device: str = ""
    dtype: str = ""

    @property
    def skipped_steps(self) -> int:
        return sum(self.skipped)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--samples", type=int, default=20000, help="size of the generated training set")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--clip", type=float, default=1.0, help="max gradient norm")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16"], help="autocast dtype")
    p.add_argument("--init-scale", type=float, default=2.0 ** 16, help="GradScaler's initial scale")
    p.add_argument("--growth-interval", type=int, default=2000, help="GradScaler's growth interval")
    p.add_argument("--monitor-dir", default=None, help="log loss and gradient norms here (lossops.monitor)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def train(args: argparse.Namespace) -> TrainResult:
    set_threads(args.threads)
    device = pick_device(args.device)
    dtype = autocast_dtype(device, args.dtype)
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    x_all, y_all = teacher_data(args.samples + 2000, args.features, args.classes, generator)
    x_train, y_train = x_all[:args.samples].to(device), y_all[:args.samples].to(device)
    x_test, y_test = x_all[args.samples:].to(device), y_all[args.samples:].to(device)

    model = MLP(args.features, args.hidden, args.classes, args.layers).to(device)
    optimizer = adamw(model, args.lr, args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, init_scale=args.init_scale, growth_interval=args.growth_interval)
    monitor = GradientMonitor(model, args.monitor_dir) if args.monitor_dir else None
    result = TrainResult(device=str(device), dtype=str(dtype).removeprefix("torch."))
    progress = Progress(args.steps, "train", enabled=not args.quiet)

    for step in range(args.steps):
        index = torch.randint(args.samples, (args.batch_size,), generator=generator).to(device)
        with torch.autocast(device.type, dtype=dtype):
            loss = lossops.cross_entropy(model(x_train[index]), y_train[index])
        optimizer.zero_grad(set_to_none=True)
        scaled = scaler.scale(loss)
        # Read after scale(): before its first call get_scale() reports the Python float init_scale, which the
        # fp32 scale tensor may round below, and that would look like a skipped step.
        scale = scaler.get_scale()
        scaled.backward()
        if monitor is not None:
            monitor.step(loss, grad_scale=scale)
        # Unscale before clipping so max-norm applies to the true gradients; this is also where the scaler
        # records whether they hold an inf/NaN.
        scaler.unscale_(optimizer)
        grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), args.clip))
        scaler.step(optimizer)
        scaler.update()
        # update() lowers the scale exactly when it found an inf/NaN, which is also when step() was skipped.
        skipped = scaler.get_scale() < scale
        result.losses.append(float(loss.detach()))
        result.skipped.append(skipped)
        result.scales.append(scaler.get_scale())
        result.grad_norms.append(grad_norm)
        if not math.isfinite(grad_norm) and not skipped:
            result.unhandled_steps.append(step)
        progress.update(step + 1, loss=result.losses[-1], scale=result.scales[-1])

    if monitor is not None:
        monitor.close()
    result.params_finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
        result.accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    return result


def summary(result: TrainResult) -> str:
    head = (f"device {result.device}, autocast {result.dtype}: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}, "
            f"held-out accuracy {100 * result.accuracy:.1f}%, GradScaler skipped {result.skipped_steps} of "
            f"{len(result.losses)} steps (final scale {result.scales[-1]:.3g}), "
            f"unhandled non-finite steps: {len(result.unhandled_steps)}")
    return head + "\n\n" + text_curve(result.losses, title="loss per step")


def main(argv: Optional[list[str]] = None) -> TrainResult:
    result = train(parse_args(argv))
    print(summary(result))
    return result


if __name__ == "__main__":
    main()

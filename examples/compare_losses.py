"""Cross-entropy vs MSE vs L1 vs focal loss for image classification: the guide's comparison, reproducible here.

    python examples/compare_losses.py --out runs/compare          # writes results.md, results.json, accuracy.png

The guide's table was measured on CIFAR-10, which cannot be downloaded here. This script uses scikit-learn's 8x8
handwritten digits (1797 images, shipped inside the package), or, without scikit-learn or with
`--data synthetic`, 8x8 glyphs generated in code. Its accuracies are therefore not comparable to the guide's
numbers, and on data this easy the ranking of the losses need not match either.

Every loss trains the same small CNN from the same initial weights on the same batch order, so the loss is the
only difference. MSE and L1 compare the softmax probabilities with one-hot targets, as a regression loss
applied to classification does; focal loss is the softmax focal loss with gamma = 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lossops  # noqa: E402
from _common import Progress, adamw, set_threads  # noqa: E402


def _one_hot_regression(loss_name: str) -> Callable[[Tensor, Tensor], Tensor]:
    def loss(logits: Tensor, target: Tensor) -> Tensor:
        one_hot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
        return getattr(lossops, loss_name)(logits.softmax(1), one_hot)
    return loss


@dataclass(frozen=True)
class LossSpec:
    key: str
    label: str
    fn: Callable[[Tensor, Tensor], Tensor]
    guide_cifar10: float  # the guide's CIFAR-10 test accuracy, %


LOSSES = {spec.key: spec for spec in [
    LossSpec("ce", "Cross-entropy", lambda logits, y: lossops.cross_entropy(logits, y), 92.3),
    LossSpec("mse", "MSE (softmax vs one-hot)", _one_hot_regression("mse_loss"), 78.5),
    LossSpec("l1", "L1 (softmax vs one-hot)", _one_hot_regression("l1_loss"), 75.2),
    LossSpec("focal", "Focal (softmax, gamma=2)", lambda logits, y: lossops.softmax_focal_loss(logits, y, gamma=2.0),
             93.1),
]}


def synthetic_glyphs(samples: int, generator: torch.Generator, classes: int = 10) -> tuple[Tensor, Tensor]:
    """8x8 images: a random stroke pattern per class, shifted by up to a pixel, rescaled and noised."""
    prototypes = (torch.rand(classes, 1, 10, 10, generator=generator) > 0.7).float()
    prototypes = F.avg_pool2d(prototypes, 3, stride=1, padding=1)  # thicken the dots into strokes
    shifts = torch.stack([prototypes[:, :, i:i + 8, j:j + 8] for i in range(3) for j in range(3)], 1)
    labels = torch.randint(classes, (samples,), generator=generator)
    images = shifts[labels, torch.randint(9, (samples,), generator=generator)]
    brightness = 0.6 + 0.8 * torch.rand(samples, 1, 1, 1, generator=generator)
    images = brightness * images / images.amax((2, 3), keepdim=True).clamp_min(1e-6)
    return images + 0.25 * torch.randn(images.shape, generator=generator), labels


def load_images(source: str, generator: torch.Generator, synthetic_samples: int = 1800):
    """(images N x 1 x 8 x 8 in [0, 1] plus noise, labels, description); 'auto' prefers the real digits."""
    if source in ("auto", "digits"):
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            if source == "digits":
                raise ImportError("--data digits needs scikit-learn (pip install scikit-learn)") from None
        else:
            digits = load_digits()
            images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
            return images, torch.tensor(digits.target), "scikit-learn 8x8 digits"
    images, labels = synthetic_glyphs(synthetic_samples, generator)
    return images, labels, "synthetic 8x8 glyphs (generated in code)"


class SmallCNN(nn.Module):
    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Linear(2 * width * 4 * 4, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    model.eval()
    correct = (model(images).argmax(1) == labels).sum()
    model.train()
    return 100.0 * float(correct) / len(labels)


def train_one(spec: LossSpec, data, args: argparse.Namespace) -> dict:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(args.seed)  # same initial weights and batch order for every loss
    model = SmallCNN(args.width)
    optimizer = adamw(model, args.lr, args.weight_decay)
    steps_per_epoch = -(-len(x_train) // args.batch_size)
    progress = Progress(args.epochs * steps_per_epoch, f"{spec.key:>5}", enabled=not args.quiet)
    curve, start = [], time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train))
        for i in range(steps_per_epoch):
            index = order[i * args.batch_size:(i + 1) * args.batch_size]
            loss = spec.fn(model(x_train[index]), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            progress.update(epoch * steps_per_epoch + i + 1, loss=float(loss.detach()))
        curve.append(accuracy(model, x_test, y_test))
    return {"key": spec.key, "loss": spec.label, "accuracy": curve[-1], "best_accuracy": max(curve),
            "curve": curve, "guide_cifar10": spec.guide_cifar10, "seconds": time.perf_counter() - start}


def markdown_table(results: list[dict], data_name: str) -> str:
    lines = [f"| Loss | Test accuracy on {data_name} (%) | Best epoch (%) | Guide, CIFAR-10 (%) | Train time (s) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['loss']} | {r['accuracy']:.1f} | {r['best_accuracy']:.1f} | {r['guide_cifar10']:.1f} | "
              f"{r['seconds']:.1f} |" for r in results]
    return "\n".join(lines)


def save_plot(results: list[dict], data_name: str, path: str) -> bool:
    """Writes the accuracy curves; False (with a warning) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        warnings.warn("matplotlib is not installed: no accuracy plot written", RuntimeWarning)
        return False
    matplotlib.use("Agg")  # no display here, and no GUI backend may be installed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.plot(range(1, len(r["curve"]) + 1), r["curve"], marker="o", label=r["loss"])
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"Loss comparison on {data_name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/compare_losses", help="directory for results.md/json and accuracy.png")
    p.add_argument("--data", default="auto", choices=["auto", "digits", "synthetic"])
    p.add_argument("--losses", default=",".join(LOSSES), help=f"comma-separated subset of {','.join(LOSSES)}")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--width", type=int, default=16, help="channels of the first conv layer")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--limit", type=int, default=None, help="use only this many images (quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    unknown = set(args.losses.split(",")) - set(LOSSES)
    if unknown:
        p.error(f"unknown losses {sorted(unknown)}; choose from {list(LOSSES)}")
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    images, labels, data_name = load_images(args.data, generator)
    order = torch.randperm(len(labels), generator=generator)[:args.limit]
    n_test = max(1, int(len(order) * args.test_fraction))
    test, train = order[:n_test], order[n_test:]
    data = (images[train], labels[train], images[test], labels[test])

    results = [train_one(LOSSES[key], data, args) for key in args.losses.split(",")]
    table = markdown_table(results, data_name)
    os.makedirs(args.out, exist_ok=True)
    note = (f"{len(train)} training / {len(test)} test images, {args.epochs} epochs. The guide's column was measured "
            f"on CIFAR-10 (32x32 colour photos), a different and much harder data set: its numbers do not carry "
            f"over, and the ranking of the losses need not either.")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"{table}\n\n{note}\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"data": data_name, "train": len(train), "test": len(test), "results": results}, f, indent=1)
    plotted = save_plot(results, data_name, os.path.join(args.out, "accuracy.png"))
    print(f"{table}\n\n{note}\nwritten to {args.out}" + ("" if plotted else " (no plot: matplotlib missing)"))
    return {"data": data_name, "results": results, "table": table, "plotted": plotted}


if __name__ == "__main__":
    main()

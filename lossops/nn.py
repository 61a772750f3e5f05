"""nn.Module wrappers: each forward calls the functional op with the module's stored arguments."""
from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor
from torch.nn import _reduction

from . import bce as _bce
from . import focal as _focal
from . import regression as _regression

# `from . import cross_entropy` would bind lossops.cross_entropy, which the package rebinds to the function.
_ce = importlib.import_module(f"{__package__}.cross_entropy")


def _reduction_of(reduction, size_average=None, reduce=None):
    """What torch's loss Modules do when constructed: the legacy size_average/reduce become a reduction (with
    torch's warning); the reduction itself is checked when the Module is called, by the functional op."""
    if size_average is not None or reduce is not None:
        return _reduction.legacy_get_string(size_average, reduce)
    return reduction


class CrossEntropyLoss(torch.nn.Module):
    """Drop-in for torch.nn.CrossEntropyLoss, plus lossops.cross_entropy's keyword extras."""

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, ignore_index: int = -100, reduce=None,
                 reduction: str = "mean", label_smoothing: float = 0.0, *, lse_square_scale: float = 0.0,
                 softcap: Optional[float] = None, inplace_backward: bool = False):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = _reduction_of(reduction, size_average, reduce)
        self.label_smoothing = label_smoothing
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.inplace_backward = inplace_backward

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return _ce.cross_entropy(input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                                 label_smoothing=self.label_smoothing, lse_square_scale=self.lse_square_scale,
                                 softcap=self.softcap, inplace_backward=self.inplace_backward)


class LinearCrossEntropyLoss(torch.nn.Module):
    """lossops.linear_cross_entropy as a module: forward(hidden, weight, target, bias=None)."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0, *,
                 lse_square_scale: float = 0.0, softcap: Optional[float] = None, chunk_size: Optional[int] = None):
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.chunk_size = chunk_size

    def forward(self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        from .linear_cross_entropy import linear_cross_entropy
        return linear_cross_entropy(hidden, weight, target, bias, ignore_index=self.ignore_index,
                                    reduction=self.reduction, label_smoothing=self.label_smoothing,
                                    lse_square_scale=self.lse_square_scale, softcap=self.softcap,
                                    chunk_size=self.chunk_size)


class _RegressionLoss(torch.nn.Module):
    """Base of the regression modules: forward(input, target, *, weight=None, avg_factor=None) calls `function`
    with the module's reduction and options (lossops.regression documents the keyword extras)."""

    function = None

    def __init__(self, size_average=None, reduce=None, reduction: str = "mean"):
        super().__init__()
        self.reduction = _reduction_of(reduction, size_average, reduce)

    def options(self) -> dict:
        return {}

    def forward(self, input: Tensor, target: Tensor, *, weight: Optional[Tensor] = None, avg_factor=None) -> Tensor:
        return type(self).function(input, target, reduction=self.reduction, weight=weight, avg_factor=avg_factor,
                                   **self.options())


class L1Loss(_RegressionLoss):
    """Drop-in for torch.nn.L1Loss."""
    function = staticmethod(_regression.l1_loss)


class MSELoss(_RegressionLoss):
    """Drop-in for torch.nn.MSELoss."""
    function = staticmethod(_regression.mse_loss)


class SmoothL1Loss(_RegressionLoss):
    """Drop-in for torch.nn.SmoothL1Loss."""
    function = staticmethod(_regression.smooth_l1_loss)

    def __init__(self, size_average=None, reduce=None, reduction: str = "mean", beta: float = 1.0):
        super().__init__(size_average, reduce, reduction)
        self.beta = beta

    def options(self) -> dict:
        return {"beta": self.beta}


class HuberLoss(_RegressionLoss):
    """Drop-in for torch.nn.HuberLoss."""
    function = staticmethod(_regression.huber_loss)

    def __init__(self, reduction: str = "mean", delta: float = 1.0):
        if not isinstance(delta, (float, int)):  # torch.nn.HuberLoss checks this type when constructed
            raise TypeError(f"delta must be a float or int, got: {type(delta)}")
        super().__init__(reduction=reduction)
        self.delta = delta

    def options(self) -> dict:
        return {"delta": self.delta}


class BCEWithLogitsLoss(torch.nn.Module):
    """Drop-in for torch.nn.BCEWithLogitsLoss."""

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, reduce=None, reduction: str = "mean",
                 pos_weight: Optional[Tensor] = None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)
        self.reduction = _reduction_of(reduction, size_average, reduce)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return _bce.binary_cross_entropy_with_logits(input, target, self.weight, reduction=self.reduction,
                                                     pos_weight=self.pos_weight)


class FocalLoss(torch.nn.Module):
    """Sigmoid focal loss (torchvision semantics). Float targets of the inputs' shape go to
    lossops.sigmoid_focal_loss; integer (N,) class indices (C = background) to sigmoid_focal_loss_index."""

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "mean", *, ignore_index: int = -100):
        super().__init__()
        self.alpha, self.gamma, self.reduction, self.ignore_index = alpha, gamma, reduction, ignore_index

    def forward(self, inputs: Tensor, targets: Tensor, *, weight: Optional[Tensor] = None, avg_factor=None) -> Tensor:
        if targets.is_floating_point():
            return _focal.sigmoid_focal_loss(inputs, targets, self.alpha, self.gamma, self.reduction, weight=weight,
                                             avg_factor=avg_factor)
        return _focal.sigmoid_focal_loss_index(inputs, targets, self.alpha, self.gamma, self.reduction,
                                               ignore_index=self.ignore_index, weight=weight, avg_factor=avg_factor)


class SoftmaxFocalLoss(torch.nn.Module):
    """lossops.softmax_focal_loss as a module; a per-class alpha tensor is a buffer (moves with .to())."""

    def __init__(self, alpha=None, gamma: float = 2.0, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        if isinstance(alpha, Tensor):
            self.register_buffer("alpha", alpha)
        else:
            self.alpha = alpha
        self.gamma, self.ignore_index, self.reduction = gamma, ignore_index, reduction

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return _focal.softmax_focal_loss(input, target, self.alpha, self.gamma, self.ignore_index, self.reduction)


class MultiTaskLoss(torch.nn.Module):
    """A classification loss plus a regression loss, weighted by fixed weights or learned uncertainty.

    classification: "cross_entropy", "focal" (sigmoid focal: float or index targets, see FocalLoss) or
    "softmax_focal", or any callable(input, target); regression: "smooth_l1" or any callable. The options
    dicts go to the named losses' constructors (e.g. {"gamma": 1.0}, {"beta": 0.1}).

    learn_weights=False: total = weights[0] * L_cls + weights[1] * L_reg.
    learn_weights=True (Kendall, Gal & Cipolla 2018, "Multi-task learning using uncertainty to weigh losses"):
    one learned log-variance s_i = log(sigma_i^2) per task (the parameter `log_vars`, initialised to 0) and
        total = exp(-s_cls) * L_cls + 0.5 * exp(-s_reg) * L_reg + 0.5 * (s_cls + s_reg),
    i.e. 1/sigma^2 for a softmax likelihood, 1/(2 sigma^2) for a Gaussian one, plus log(sigma) for each.
    Add `log_vars` to the optimizer (it is a parameter of this module).
    """

    CLASSIFICATION = {"cross_entropy": CrossEntropyLoss, "focal": FocalLoss, "softmax_focal": SoftmaxFocalLoss}
    REGRESSION = {"smooth_l1": SmoothL1Loss}

    def __init__(self, classification="cross_entropy", regression="smooth_l1", *, weights=(1.0, 1.0),
                 learn_weights: bool = False, classification_options: Optional[dict] = None,
                 regression_options: Optional[dict] = None):
        super().__init__()
        self.classification = self._loss("classification", classification, self.CLASSIFICATION, classification_options)
        self.regression = self._loss("regression", regression, self.REGRESSION, regression_options)
        self.learn_weights = learn_weights
        if learn_weights:
            self.log_vars = torch.nn.Parameter(torch.zeros(2))
        else:
            if len(weights) != 2:
                raise ValueError(f"lossops: MultiTaskLoss weights must be (classification, regression), got {weights}")
            self.register_buffer("weights", torch.as_tensor(weights, dtype=torch.float32))

    @staticmethod
    def _loss(role, loss, known, options):
        if isinstance(loss, str):
            if loss not in known:
                raise ValueError(f"lossops: unknown {role} loss {loss!r}; expected one of {sorted(known)} or a callable")
            return known[loss](**(options or {}))
        if not callable(loss):
            raise TypeError(f"lossops: {role} must be a loss name or a callable, got {type(loss).__name__}")
        return loss

    def task_weights(self) -> Tensor:
        """The current multipliers of (L_cls, L_reg)."""
        if self.learn_weights:
            return torch.exp(-self.log_vars) * self.log_vars.new_tensor([1.0, 0.5])
        return self.weights

    def forward(self, cls_input: Tensor, cls_target: Tensor, reg_input: Tensor, reg_target: Tensor) -> Tensor:
        losses = torch.stack([self.classification(cls_input, cls_target).float(),
                              self.regression(reg_input, reg_target).float()])
        total = (self.task_weights().to(losses.device) * losses).sum()
        if self.learn_weights:
            total = total + 0.5 * self.log_vars.sum()
        return total

"""nn.Module wrappers: each forward calls the functional op with the module's stored arguments.

The Module of each loss family is made from its declaration (lossops._family.make_module) and exported here;
the ones below combine or wrap several functions.
"""
from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.adaptive import _ASMoutput

from ._family import FAMILIES as _FAMILIES, options_repr as _family_options_repr
from .losses import focal as _focal, linear_cross_entropy as _linear_cross_entropy

globals().update({family.module.__name__: family.module for family in _FAMILIES.values() if family.module})


class LinearCrossEntropyLoss(torch.nn.modules.loss._WeightedLoss):
    """Drop-in for torch.nn.LinearCrossEntropyLoss: owns its Linear layer (`self.linear`, the same parameters and
    state_dict keys as torch's), forward(input, target) runs lossops.linear_cross_entropy. lossops' extras
    (lse_square_scale, softcap, chunk_size, temperature, return_token_stats) are keyword arguments. For a model
    that owns its head, call lossops.linear_cross_entropy(hidden, head.weight, target) instead."""

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple = (), bias: bool = False,
                 device=None, dtype=None, reduction: str = "mean", weight: Optional[Tensor] = None,
                 ignore_index: Optional[int] = None, label_smoothing: float = 0.0, options=None,
                 lse_square_scale: float = 0.0, softcap: Optional[float] = None, chunk_size: Optional[int] = None,
                 temperature: float = 1.0, return_token_stats: bool = False):
        if weight is not None and weight.shape != (num_classes,):
            raise RuntimeError(f"expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}")
        if label_smoothing < 0 or label_smoothing > 1.0:
            raise RuntimeError(f"expected label_smoothing to be in range [0, 1], got {label_smoothing}")
        super().__init__(weight=weight, size_average=None, reduce=None, reduction=reduction)
        self.num_classes = num_classes
        self.out_features = tuple(out_features)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.linear = torch.nn.Linear(in_features, math.prod(self.out_features, start=num_classes), bias=bias,
                                      device=device, dtype=dtype)
        self.options = options
        self.lse_square_scale, self.softcap, self.chunk_size = lse_square_scale, softcap, chunk_size
        self.temperature, self.return_token_stats = temperature, return_token_stats

    def extra_repr(self):
        defaults = {name: p.default for name, p in inspect.signature(type(self).__init__).parameters.items()}
        names = ("reduction", "ignore_index", "label_smoothing", "options", "lse_square_scale", "softcap", "chunk_size",
                 "temperature", "return_token_stats", "weight")
        options = _family_options_repr({name: getattr(self, name) for name in names}, defaults)
        head = f"num_classes={self.num_classes}" + (f", out_features={self.out_features}" if self.out_features else "")
        return head + (", " + options if options else "")

    def forward(self, input: Tensor, target: Tensor, *, token_weight: Optional[Tensor] = None,
                num_items_in_batch=None):
        """torch's forward(input, target); token_weight and num_items_in_batch as lossops.linear_cross_entropy."""
        linear_weight = self.linear.weight.reshape((self.num_classes, *self.out_features, self.linear.in_features))
        linear_bias = (None if self.linear.bias is None
                       else self.linear.bias.reshape((self.num_classes, *self.out_features)))
        return _linear_cross_entropy.linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=self.weight, reduction=self.reduction,
            ignore_index=self.ignore_index, label_smoothing=self.label_smoothing, options=self.options,
            lse_square_scale=self.lse_square_scale, softcap=self.softcap, chunk_size=self.chunk_size,
            token_weight=token_weight, num_items_in_batch=num_items_in_batch, temperature=self.temperature,
            return_token_stats=self.return_token_stats)


class FocalLoss(torch.nn.Module):
    """Sigmoid focal loss (torchvision semantics). Float targets of the inputs' shape go to
    lossops.sigmoid_focal_loss; integer (N,) class indices (C = background) to sigmoid_focal_loss_index."""

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "mean", *, ignore_index: int = -100):
        super().__init__()
        self.alpha, self.gamma, self.reduction, self.ignore_index = alpha, gamma, reduction, ignore_index

    def extra_repr(self):
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}" + (
            f", ignore_index={self.ignore_index}" if self.ignore_index != -100 else "")

    def forward(self, inputs: Tensor, targets: Tensor, *, weight: Optional[Tensor] = None, avg_factor=None) -> Tensor:
        if targets.is_floating_point():
            return _focal.sigmoid_focal_loss(inputs, targets, self.alpha, self.gamma, self.reduction, weight=weight,
                                             avg_factor=avg_factor)
        return _focal.sigmoid_focal_loss_index(inputs, targets, self.alpha, self.gamma, self.reduction,
                                               ignore_index=self.ignore_index, weight=weight, avg_factor=avg_factor)


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

    CLASSIFICATION = {"cross_entropy": _FAMILIES["cross_entropy"].module, "focal": FocalLoss,
                      "softmax_focal": _FAMILIES["softmax_focal_loss"].module}
    REGRESSION = {"smooth_l1": _FAMILIES["smooth_l1_loss"].module}

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
                raise ValueError(f"lossops: unknown {role} loss {loss!r}; "
                                 f"expected one of {sorted(known)} or a callable")
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


class AdaptiveLogSoftmaxWithLoss(torch.nn.Module):
    """Drop-in for torch.nn.AdaptiveLogSoftmaxWithLoss (Grave et al. 2017, "Efficient softmax approximation for
    GPUs"): the same constructor, attributes, submodules (`head`, `tail`) and state_dict keys, so state dicts load
    both ways; forward(input, target) returns torch's `_ASMoutput(output, loss)`.

    Classes below cutoffs[0] are scored by the head, which also holds one logit per tail cluster; a class in tail
    cluster k has log p = log p_head(cluster k) + log p_cluster_k(class). forward computes each of those negative
    log-probabilities with lossops.cross_entropy(..., reduction="none") on the head's logits (every row) and on each
    cluster's logits (its rows only), so the logits' gradients come from lossops' fused kernels; the projections
    are torch's Linear layers. log_prob and predict form the full distribution with torch's log_softmax.
    """

    def __init__(self, in_features: int, n_classes: int, cutoffs: Sequence[int], div_value: float = 4.0,
                 head_bias: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        cutoffs = list(cutoffs)
        if not cutoffs:
            raise ValueError("cutoffs should be a sequence of length larger than 0")
        strictly_increasing = all(low < high for low, high in itertools.pairwise(cutoffs))
        if not (strictly_increasing and cutoffs[0] > 0 and cutoffs[-1] < n_classes
                and all(int(cutoff) == cutoff for cutoff in cutoffs)):
            raise ValueError("cutoffs should be a sequence of unique, positive integers sorted in an increasing "
                             "order, where each value is between 1 and n_classes-1")
        self.in_features = in_features
        self.n_classes = n_classes
        self.cutoffs = cutoffs + [n_classes]  # the end of each cluster: the shortlist's first, the last tail's last
        self.div_value = div_value
        self.head_bias = head_bias
        self.shortlist_size = self.cutoffs[0]
        self.n_clusters = len(self.cutoffs) - 1
        self.head_size = self.shortlist_size + self.n_clusters
        factory = dict(device=device, dtype=dtype)
        self.head = torch.nn.Linear(in_features, self.head_size, bias=head_bias, **factory)
        self.tail = torch.nn.ModuleList()
        for cluster, (start, stop) in enumerate(itertools.pairwise(self.cutoffs)):
            # rarer clusters get narrower projections: in_features / div_value^(1 + cluster index)
            hidden = int(in_features // div_value ** (cluster + 1))
            self.tail.append(torch.nn.Sequential(torch.nn.Linear(in_features, hidden, bias=False, **factory),
                                                 torch.nn.Linear(hidden, stop - start, bias=False, **factory)))

    def reset_parameters(self) -> None:
        self.head.reset_parameters()
        for projection in self.tail:
            for linear in projection:
                linear.reset_parameters()

    def forward(self, input: Tensor, target: Tensor) -> _ASMoutput:
        """input (N, in_features) with target (N,), or unbatched (in_features,) with a 0-d target. output: each
        row's log-probability of its target, the target's shape; loss: the mean of -output."""
        self._check_shapes(input, target)
        batched = target.dim() == 1
        if not batched:
            input, target = input.unsqueeze(0), target.unsqueeze(0)
        self._check_target(target)
        target = target.long()  # torch takes int32 targets too; lossops' cross_entropy takes int64

        # 0 for a shortlist class, k for a class of tail cluster k - 1
        cluster_of_row = torch.bucketize(target, target.new_tensor(self.cutoffs), right=True)
        head_target = torch.where(cluster_of_row == 0, target, self.shortlist_size - 1 + cluster_of_row)
        cross_entropy = _FAMILIES["cross_entropy"].function  # the DTensor-serving one lossops installs at import
        tail_logprob = input.new_zeros(target.shape[0])
        for cluster, projection in enumerate(self.tail):
            rows = (cluster_of_row == cluster + 1).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue  # an empty cluster is not evaluated: its projection gets no gradient, as in torch
            cluster_nll = cross_entropy(projection(input.index_select(0, rows)),
                                        target.index_select(0, rows) - self.cutoffs[cluster], reduction="none")
            tail_logprob = tail_logprob.index_copy(0, rows, -cluster_nll)
        output = tail_logprob - cross_entropy(self.head(input), head_target, reduction="none")
        loss = (-output).mean()
        return _ASMoutput(output if batched else output.squeeze(0), loss)

    @staticmethod
    def _check_shapes(input: Tensor, target: Tensor) -> None:
        if target.dim() == 1:
            if input.size(0) != target.size(0):
                raise RuntimeError("Input and target should have the same size in the batch dimension.")
            if input.dim() != 2:
                raise RuntimeError(f"1D target tensor expects 2D input tensors, but found inputs with size "
                                   f"{input.size()}")
        elif target.dim() == 0:
            if input.dim() != 1:
                raise RuntimeError(f"0D target tensor expects 1D input tensors, but found inputs with size "
                                   f"{input.size()}")
        else:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")

    def _check_target(self, target: Tensor) -> None:
        if target.numel() and bool(((target < 0) | (target >= self.n_classes)).any()):
            raise RuntimeError(f"Target values should be in [0, {self.n_classes - 1}], but values in range "
                               f"[{target.min().item()}, {target.max().item()}] were found. ")
        if target.dtype not in (torch.int32, torch.int64):
            raise RuntimeError(f"AdaptiveLogSoftmaxWithLoss: target must be an int64 or int32 tensor of class "
                               f"indices, got {target.dtype}")

    def _full_log_prob(self, input: Tensor, head_output: Tensor) -> Tensor:
        head_logprob = F.log_softmax(head_output, dim=1)
        columns = [head_logprob[:, :self.shortlist_size]]
        for cluster, projection in enumerate(self.tail):
            cluster_logprob = head_logprob[:, self.shortlist_size + cluster].unsqueeze(1)
            columns.append(F.log_softmax(projection(input), dim=1) + cluster_logprob)
        return torch.cat(columns, dim=1)

    def log_prob(self, input: Tensor) -> Tensor:
        """The log-probability of every class: (N, in_features) -> (N, n_classes)."""
        return self._full_log_prob(input, self.head(input))

    def predict(self, input: Tensor) -> Tensor:
        """The most probable class of each row, log_prob(input).argmax(dim=1); the tail clusters are evaluated only
        for the rows whose head ranks a cluster above every shortlist class (a class in a cluster is never more
        probable than the cluster itself)."""
        head_output = self.head(input)
        prediction = head_output.argmax(dim=1)
        outside_shortlist = prediction >= self.shortlist_size
        if not outside_shortlist.any():
            return prediction
        if outside_shortlist.all():
            return self._full_log_prob(input, head_output).argmax(dim=1)
        prediction[outside_shortlist] = self._full_log_prob(input[outside_shortlist],
                                                            head_output[outside_shortlist]).argmax(dim=1)
        return prediction

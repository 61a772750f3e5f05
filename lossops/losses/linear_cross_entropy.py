"""Fused linear + cross-entropy: `lossops.linear_cross_entropy`, its custom op `lossops::linear_cross_entropy`.

Equal to cross_entropy(input @ linear_weight.T + linear_bias, target, weight) without ever holding the N x V logits
(torch.nn.functional.linear_cross_entropy's signature; the custom op's hidden/weight/bias are input/linear_weight/
linear_bias, its class_weight the class weights). The tokens
are processed in chunks of rows; for each chunk the logits go into one reused buffer, the backend's fused
cross-entropy kernel (lossops.cross_entropy's) turns them into d(loss)/d(logits) in place, and that buffer is
immediately contracted into grad_hidden[chunk] = dlogits @ W, grad_W += dlogits.T @ hidden[chunk] and
grad_b += dlogits.sum(0). The mean's denominator is computed over all rows first, so the kernel scales each
chunk's gradient by the same 1/denominator; backward only multiplies the three gradients by grad_output.

reduction="none" cannot be pre-scaled (each row gets its own grad_output), so its forward computes only the
losses and backward (the op lossops::linear_cross_entropy_backward) recomputes the chunks, scaling each
row of dlogits by its grad_output before the contractions.

return_token_stats=True takes the op lossops::linear_cross_entropy_with_token_stats, declared alike with the token
statistics (lossops/losses/token_stats.py) as outputs after the loss: the same pass computes them on each chunk of
logits before the loss kernel overwrites it.

Low-precision inputs: grad_W and grad_b are accumulated across chunks in float32 and cast once at the end.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend, _checks, _family, _reduce, _sharding
from ..distributed import vocab_parallel_linear_cross_entropy
from .cross_entropy import (KERNEL as ROW_KERNEL, CrossEntropyOptions, mean_terms, mean_weights,
                            reference_cross_entropy)
from . import token_options, token_stats
from .token_stats import STATS_GRAD_KERNEL, STATS_KERNEL

# The default chunks of the fused linear losses come from a byte budget (chunk_rows): every chunk-sized buffer an op
# holds at once, and _TOKEN_BYTES a token for its per-token values (losses, targets, statistics), within a fraction
# of one float32 N x V logits tensor (LOGITS_BUDGET here; the distillation, which holds two models' chunks, has its
# own). Once the logits are huge the chunks hold about _CHUNK_BYTES, but never fewer than _MIN_CHUNK_ROWS rows
# (smaller matmuls lose too much speed: each chunk's product re-reads the whole weight); small logits are not split
# below MIN_CHUNK_BYTES, where each chunk's calls would cost more than the memory saved is worth.
LOGITS_BUDGET = 1 / 8
_TOKEN_BYTES = 64
_CHUNK_BYTES = 256 << 20
_MIN_CHUNK_ROWS = 128
MIN_CHUNK_BYTES = 1 << 20
_DIFFERENTIABLE = ("hidden", "weight", "bias")
# _WideProducts' float32 blocks: a product block of at most _WIDE_PRODUCT_BYTES (what a core's L2 holds while it
# is rounded into the logits) and a weight block of at most _WIDE_WEIGHT_BYTES, but not under _MIN_WIDE_BLOCK
# vocabulary rows, where the products would lose their matmul efficiency, unless the chunk byte budget asks for fewer.
_WIDE_PRODUCT_BYTES = 1 << 20
_WIDE_WEIGHT_BYTES = 8 << 20
_MIN_WIDE_BLOCK = 128
# A chunk's logits on CPU in float32/float64 (torch's BLAS product): the weight _LOGITS_WEIGHT_BYTES of vocabulary
# rows at a time, each block's output written straight into the chunk's logits (a strided out=). The whole weight in
# one call streams it from memory for a chunk of only a few hundred rows; a block that stays in cache while every
# row of the chunk is multiplied by it is measurably faster (docs/tuning.md). At least _MIN_LOGITS_BLOCK rows, so
# that wide models do not split the product into calls too narrow for the matmul kernel.
_LOGITS_WEIGHT_BYTES = 1 << 20
_MIN_LOGITS_BLOCK = 64


@dataclasses.dataclass(frozen=True)
class LinearCrossEntropyOptions(CrossEntropyOptions):
    """cross_entropy's options and the chunk size (torch.nn.LinearCrossEntropyOptions is torch's chunking
    policy, a different record)."""
    chunk_size: int = 1  # rows of tokens per chunk (the public function applies the default policy)


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *, linear_bias: Optional[Tensor] = None,
                         weight: Optional[Tensor] = None, reduction: str = "mean", ignore_index: Optional[int] = None,
                         label_smoothing: float = 0.0, options=None, lse_square_scale: float = 0.0,
                         softcap: Optional[float] = None, chunk_size: Optional[int] = None, temperature: float = 1.0,
                         token_weight: Optional[Tensor] = None, num_items_in_batch=None,
                         return_token_stats: bool = False):
    """Drop-in for torch.nn.functional.linear_cross_entropy: cross_entropy(linear(input, linear_weight,
    linear_bias), target, weight=weight, ...) without materialising the logits.

    input (..., D) (torch: (N, D) or (D,); more leading dimensions are lossops' extension, the target then has
    the same leading shape); linear_weight (V, D); linear_bias (V,); weight: per-class weights (V,), in the
    fused path. ignore_index=None means -100, as torch maps it. options: a torch.nn.LinearCrossEntropyOptions;
    its batch_chunk_size sets the chunk size (lossops' own policy otherwise; its other fields concern torch's
    implementation), and the fused path serves every call, options or not. Extras as lossops.cross_entropy:
    lse_square_scale, softcap; chunk_size: rows of tokens per chunk (default: the chunk of logits and what else the
    op holds within 1/8 of the rows' float32 logits; chunks near 256 MiB but of at least 128 rows once the logits are
    huge; under 1 MiB of logits, one chunk). A (V, d1, ..., dK, D) weight or probability targets take the
    reference path (F.linear, then cross_entropy), with the same semantics. temperature, token_weight (the target's
    shape) and num_items_in_batch as lossops.cross_entropy; the temperature divides the hidden states and bias (not the
    N x V logits) before the fused pass. return_token_stats=True returns a LossWithTokenStats as
    lossops.cross_entropy does, its statistics computed on each chunk of logits inside the fused pass.
    """
    stats = [] if token_stats.check_request(return_token_stats) else None
    if stats is not None:
        _checks.tensor("target", target)
        token_stats.check_targets(target)
    if stats is not None or token_options.requested(temperature, token_weight, num_items_in_batch):
        scale = token_options.temperature(temperature)
        softcap = token_options.scaled_softcap(softcap, scale)
        if scale != 1.0:
            input = input / scale
            linear_bias = None if linear_bias is None else linear_bias / scale
        reduction = _checks.reduction(reduction)
        index = -100 if ignore_index is None else _checks.integer("ignore_index", ignore_index)
        _checks.tensor("target", target)

        def per_token(class_weight, token_reduction, z_loss_scale):
            # The first call also collects the token statistics (they do not depend on these arguments).
            sink = stats if stats is not None and not stats else None
            return _fused(input, linear_weight, target, linear_bias, class_weight, token_reduction, index,
                          label_smoothing, options, z_loss_scale, softcap, chunk_size, sink)

        probabilities = target.is_floating_point() and target.dim() == input.dim()
        loss = token_options.reduce_tokens(per_token, target, target.shape[:-1] if probabilities else target.shape,
                                           weight, index, reduction, lse_square_scale, token_weight,
                                           num_items_in_batch, probabilities)
        if stats is None:
            return loss
        return token_stats.finish(loss, target, index, float(lse_square_scale), *stats)
    return _fused(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing, options,
                  lse_square_scale, softcap, chunk_size)


def _fused(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing, options,
           lse_square_scale, softcap, chunk_size, stats_sink: Optional[list] = None) -> Tensor:
    """The loss (checks, layout, backend, op); with stats_sink, also the token statistics appended to it as
    (logsumexp, target_logprob, entropy, argmax) per row."""
    ignore_index = -100 if ignore_index is None else ignore_index
    reduction = _checks.reduction(reduction)
    label_smoothing = _checks.in_range("label_smoothing", label_smoothing, 0.0, 1.0, exception=RuntimeError)
    lse_square_scale = _checks.in_range("lse_square_scale", lse_square_scale, 0.0)
    cap = _checks.positive_or_none("softcap", softcap)
    if options is not None and chunk_size is None:
        chunk_size = getattr(options, "batch_chunk_size", None)
    hidden, bias = input, linear_bias
    if _checks.autocast_enabled(hidden.device) and hidden.is_floating_point() and linear_weight.is_floating_point():
        # As F.linear would under autocast: the matmuls run in the autocast dtype, the loss in float32.
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, linear_weight = hidden.to(dtype), linear_weight.to(dtype)
        bias = None if bias is None or not bias.is_floating_point() else bias.to(dtype)
    ce_options = CrossEntropyOptions(ignore_index, reduction, label_smoothing, lse_square_scale, cap)
    if linear_weight.dim() > 2 or (target.is_floating_point() and target.dim() == hidden.dim()):
        if stats_sink is not None:
            raise ValueError(f"lossops: return_token_stats=True needs a (vocab, features) linear_weight, got shape "
                             f"{tuple(linear_weight.shape)}")
        return _reference(hidden, linear_weight, bias, target, weight, ce_options)
    _check_arguments(hidden, linear_weight, target, bias, chunk_size)
    if weight is not None:
        _checks.class_weight(weight, linear_weight.shape[0], hidden)
        _checks.same_dtype(hidden, weight=weight)

    backend = _backend.resolve(hidden.device)
    if backend == "reference":
        if stats_sink is not None:
            logits = F.linear(hidden, linear_weight, bias)
            stats_sink.extend(token_stats.reference_rows(logits, target, ignore_index, cap, logits.dim() - 1))
        return _reference(hidden, linear_weight, bias, target, weight, ce_options)

    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    target1 = target.reshape(-1).to(torch.int64).contiguous()
    # the token statistics' gradient takes a second chunk of logits in backward
    widened_features = hidden2.shape[1] if widened_products(hidden2.dtype, hidden2.device) else 0
    rows = chunk_size if chunk_size is not None else chunk_rows(hidden2.shape[0], linear_weight.shape[0],
                                                                hidden.element_size(), LOGITS_BUDGET,
                                                                logits_buffers=1 if stats_sink is None else 2,
                                                                widened_features=widened_features)
    wants = {name: torch.is_grad_enabled() and t is not None and t.requires_grad
             for name, t in (("hidden", hidden), ("weight", linear_weight), ("bias", bias))}
    tensors = {"hidden": hidden2, "weight": linear_weight, "bias": bias, "target": target1, "class_weight": weight}
    options = LinearCrossEntropyOptions(ignore_index, reduction, label_smoothing, lse_square_scale, cap, rows)
    if stats_sink is None:
        loss = LINEAR_CROSS_ENTROPY.apply(backend, tensors, options, wants)
    else:
        loss, *rows = LINEAR_CROSS_ENTROPY_WITH_TOKEN_STATS.apply(backend, tensors, options, wants)
        stats_sink.extend(rows)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    return loss.to(_checks.output_dtype(hidden))


def _reference(hidden, linear_weight, bias, target, weight, options) -> Tensor:
    """F.linear then lossops' plain-PyTorch cross-entropy (torch's reference formulation, plus the extras)."""
    out_shape = linear_weight.shape[:-1]  # (V,) or torch's K-dimensional (V, d1, ..., dK)
    logits = F.linear(hidden, linear_weight.reshape(-1, linear_weight.shape[-1]),
                      None if bias is None else bias.reshape(-1))
    logits = logits.reshape(hidden.shape[:-1] + out_shape)
    if hidden.dim() > 1 and logits.dim() > 2 and linear_weight.dim() == 2:  # lossops' (..., D): classes last
        logits = logits.movedim(-1, 1)
        if target.is_floating_point() and target.dim() == logits.dim():
            target = target.movedim(-1, 1)
    return reference_cross_entropy(logits, target, weight, options).to(_checks.output_dtype(hidden))


def _ignore_index(a: dict) -> int:
    return -100 if a["ignore_index"] is None else a["ignore_index"]


def _mean_denominator(a: dict) -> Tensor:
    return _reduce.class_index_denominator(a["target"], a["weight"], _ignore_index(a), a["linear_weight"].shape[0],
                                           _checks.opmath_dtype(a["input"].dtype))


def _mean_terms(function, a: dict):
    return mean_terms(function, a, _ignore_index(a), _mean_denominator)


def _vocab_parallel(a: dict, input, mesh) -> Tensor:
    """The weight sharded on its rows (classes): lossops.distributed's vocabulary-parallel linear cross-entropy."""
    return vocab_parallel_linear_cross_entropy(a["input"], a["linear_weight"], a["target"], group=mesh.get_group(),
                                               local_bias=a["linear_bias"], ignore_index=_ignore_index(a),
                                               reduction=a["reduction"], label_smoothing=a["label_smoothing"],
                                               weight=a["weight"], lse_square_scale=a["lse_square_scale"],
                                               softcap=a["softcap"])


# input (..., D): its last dimension is the features, which the target does not have.
SHARDING = _sharding.Sharding(lambda input: input.dim() - 1, whole=("linear_weight", "linear_bias", "weight"),
                              denominator=_mean_denominator, parallel_classes=_vocab_parallel, local_sums=_mean_terms,
                              classes_sharded_by="linear_weight", split_with_classes=("linear_bias",),
                              class_dim_name="feature", replicated_only=token_options.DEFAULTS)


def chunk_rows(num_rows: int, vocab: int, itemsize: int, budget: float, logits_buffers: int = 1,
               widened_features: int = 0) -> int:
    """Token rows per chunk of a fused linear loss, from a byte budget: `budget` (a fraction) of one float32
    num_rows x vocab logits tensor holds _TOKEN_BYTES a token and every chunk-sized buffer the op has at once: its
    `logits_buffers` chunks of logits (the distillation holds the student's and the teacher's) and, for logits of
    less than 4 bytes, a product block of the same size (_Gradients' or _WideProducts'), plus, where the products are
    widened (widened_features: the widest model's features), _WideProducts' float32 hidden rows and their gradient.
    Huge logits: about _CHUNK_BYTES of chunks, but at least _MIN_CHUNK_ROWS rows; small logits: chunks of at least
    MIN_CHUNK_BYTES. The rows are spread evenly over the chunks that many rows need."""
    per_row = max(vocab * itemsize * (logits_buffers + (itemsize < 4)) + 8 * widened_features, 1)
    within_budget = int((budget * num_rows * vocab * 4 - _TOKEN_BYTES * num_rows) // per_row)
    most = max(1, min(within_budget, max(_CHUNK_BYTES // per_row, _MIN_CHUNK_ROWS)), MIN_CHUNK_BYTES // per_row)
    chunks = -(-num_rows // most)
    return max(1, -(-num_rows // max(chunks, 1)))


def _check_arguments(input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Optional[Tensor],
                     chunk_size: Optional[int]) -> None:
    _checks.floating("input", input)
    _checks.floating("linear_weight", linear_weight)
    _checks.tensor("target", target)
    _checks.same_device(input, linear_weight=linear_weight, target=target, linear_bias=linear_bias)
    if input.dim() < 1:
        raise ValueError("lossops: input must have at least one dimension (features), got a 0-d tensor")
    if linear_weight.dim() != 2 or linear_weight.shape[1] != input.shape[-1]:
        raise RuntimeError(f"lossops: linear_weight must have shape (vocab, {input.shape[-1]}) to match input of "
                           f"shape {tuple(input.shape)}, got {tuple(linear_weight.shape)}")
    if linear_weight.dtype != input.dtype:
        raise RuntimeError(f"lossops: input and linear_weight must have the same dtype, got {input.dtype} and "
                           f"{linear_weight.dtype}")
    if linear_bias is not None:
        _checks.floating("linear_bias", linear_bias)
        if linear_bias.shape != linear_weight.shape[:1] or linear_bias.dtype != linear_weight.dtype:
            raise RuntimeError(f"lossops: linear_bias must be a {linear_weight.dtype} tensor of shape "
                               f"({linear_weight.shape[0]},), got {linear_bias.dtype} of shape "
                               f"{tuple(linear_bias.shape)}")
    _checks.last_dim_target(target, "input", input)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"lossops: chunk_size must be a positive int or None, got {chunk_size!r}")


@functools.lru_cache(maxsize=None)
def _native_cpu_products(dtype: torch.dtype) -> bool:
    """Whether torch multiplies dtype on this CPU with oneDNN's kernels (bfloat16: AVX-512 or newer; float16:
    AVX512-FP16 or AMX-FP16). Without them its bfloat16 and float16 matmuls take portable loops, one or two orders
    of magnitude slower than its float32 one."""
    if dtype == torch.bfloat16:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return True


def widened_products(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the fused linear losses multiply dtype's operands in float32 (_WideProducts): bfloat16 and float16 on a
    CPU without native kernels for them. Each product is still rounded to dtype where it is stored, as a native
    low-precision matmul (float32 accumulation) rounds it."""
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not _native_cpu_products(dtype)


def widened_linear(input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """F.linear with widened products (widened_products): float32 operands, the product rounded to input's dtype;
    differentiable, its gradients rounded to their leaves' dtypes. Autocast, which would cast the float32 operands
    back to the low-precision dtype, is off for the product."""
    with torch.autocast(input.device.type, enabled=False):
        return F.linear(input.float(), weight.float(), None if bias is None else bias.float()).to(input.dtype)


class _WideProducts:
    """The chunks' products in float32, for operands whose own CPU matmul is slow (widened_products): the weight a
    block of vocabulary rows at a time, so the float32 copies (a weight block and a block of the chunk's logits or
    their gradient) take no more bytes than one chunk of low-precision logits. One workspace serves every chunk, and
    both models of the distillation."""

    def __init__(self, rows: int, vocab: int, features: int, itemsize: int, device: torch.device):
        within_budget = rows * vocab * itemsize // (4 * (rows + features))
        # A block's float32 product is rounded into the logits (or its gradient read) while it is still in cache.
        in_cache = max(_MIN_WIDE_BLOCK, min(_WIDE_PRODUCT_BYTES // (4 * rows), _WIDE_WEIGHT_BYTES // (4 * features)))
        self.block = max(1, min(vocab, within_budget, in_cache))
        self.weight_block = torch.empty(self.block * features, device=device)
        self.product_block = torch.empty(rows * self.block, device=device)
        self.hidden = torch.empty(rows * features, device=device)
        self.grad_hidden = torch.empty(rows * features, device=device)

    @staticmethod
    def _view(buffer: Tensor, rows: int, columns: int) -> Tensor:
        return buffer[:rows * columns].view(rows, columns)

    def _blocks(self, weight: Tensor):
        """(v0, v1, weight[v0:v1] in float32) per block of vocabulary rows."""
        for v0 in range(0, weight.shape[0], self.block):
            v1 = min(v0 + self.block, weight.shape[0])
            yield v0, v1, self._view(self.weight_block, v1 - v0, weight.shape[1]).copy_(weight[v0:v1])

    def _hidden(self, h: Tensor) -> Tensor:
        return self._view(self.hidden, *h.shape).copy_(h)

    def logits(self, h: Tensor, weight: Tensor, bias: Optional[Tensor], out: Tensor) -> None:
        """out = h @ weight.T + bias."""
        h32 = self._hidden(h)
        for v0, v1, w32 in self._blocks(weight):
            product = self._view(self.product_block, h.shape[0], v1 - v0)
            if bias is None:
                torch.mm(h32, w32.t(), out=product)
            else:
                product.copy_(bias[v0:v1].expand_as(product)).addmm_(h32, w32.t())
            out[:, v0:v1].copy_(product)

    def contract(self, h: Tensor, dlogits: Tensor, weight: Tensor, grad_hidden: Optional[Tensor],
                 grad_weight_sum: Optional[Tensor]) -> None:
        """grad_hidden = dlogits @ weight (stored in its dtype) and grad_weight_sum += dlogits.T @ h (float32)."""
        if grad_hidden is None and grad_weight_sum is None:
            return
        h32 = self._hidden(h) if grad_weight_sum is not None else None
        gh32 = self._view(self.grad_hidden, *h.shape) if grad_hidden is not None else None
        for v0, v1, w32 in self._blocks(weight):
            g32 = self._view(self.product_block, h.shape[0], v1 - v0).copy_(dlogits[:, v0:v1])
            if gh32 is not None:
                if v0 == 0:
                    torch.mm(g32, w32, out=gh32)
                else:
                    gh32.addmm_(g32, w32)
            if grad_weight_sum is not None:
                grad_weight_sum[v0:v1].addmm_(g32.t(), h32)
        if grad_hidden is not None:
            grad_hidden.copy_(gh32)


def wide_products_for(hiddens: Sequence[Tensor], weight: Tensor, rows: int) -> Optional[_WideProducts]:
    """The workspace of the chunks of these models' hidden rows (rows of tokens a chunk), or None where the products
    run in the operands' own dtype (also where there is nothing to multiply: no tokens, features or vocabulary)."""
    hidden = hiddens[0]
    rows, features = min(rows, hidden.shape[0]), max(h.shape[1] for h in hiddens)
    if not widened_products(hidden.dtype, hidden.device) or min(rows, features, weight.shape[0]) == 0:
        return None
    return _WideProducts(rows, weight.shape[0], features, hidden.element_size(), hidden.device)


class _Chunks:
    """The fused pass's token chunks: each chunk's logits, hidden[chunk] @ weight.T + bias, computed into one
    buffer that every chunk reuses, so at most chunk_size x V logits exist at a time."""

    def __init__(self, backend: str, t: dict, o: LinearCrossEntropyOptions, wide: Optional[_WideProducts] = None):
        self.backend, self.options = backend, o
        self.hidden, self.weight, self.bias, self.target = t["hidden"], t["weight"], t["bias"], t["target"]
        self.wide = wide if wide is not None else wide_products_for((self.hidden,), self.weight, o.chunk_size)
        self.logits_block = max(self.weight.shape[0], 1)
        if self.wide is None and self.weight.device.type == "cpu" and self.weight.dtype in (torch.float32,
                                                                                             torch.float64):
            row_bytes = max(self.weight.shape[1] * self.weight.element_size(), 1)
            self.logits_block = max(_MIN_LOGITS_BLOCK, _LOGITS_WEIGHT_BYTES // row_bytes)

    def __iter__(self):
        """(start, stop, hidden[start:stop], the chunk's logits) per chunk; the logits are overwritten by the next."""
        num_rows, size = self.hidden.shape[0], self.options.chunk_size
        buffer = self.hidden.new_empty((min(size, num_rows), self.weight.shape[0]))
        for start in range(0, num_rows, size):
            stop = min(start + size, num_rows)
            h, logits = self.hidden[start:stop], buffer[:stop - start]
            if self.wide is not None:
                self.wide.logits(h, self.weight, self.bias, out=logits)
            else:
                self._product(h, logits)
            yield start, stop, h, logits

    def _product(self, h: Tensor, logits: Tensor) -> None:
        """logits = h @ weight.T + bias, logits_block vocabulary rows of the weight per call."""
        for v0 in range(0, self.weight.shape[0], self.logits_block):
            v1 = min(v0 + self.logits_block, self.weight.shape[0])
            out, weight = logits[:, v0:v1], self.weight[v0:v1].t()
            if self.bias is None:
                torch.mm(h, weight, out=out)
            else:
                torch.addmm(self.bias[v0:v1], h, weight, out=out)

    def loss_kernel(self, start: int, stop: int, logits: Tensor, class_weight: Optional[Tensor],
                    grad_scale: Tensor, write_gradient: bool):
        """The cross-entropy kernel on one chunk: (per-row loss, summed loss), d(loss)/d(logits) written over the
        logits (scaled by grad_scale, a 0-d tensor) when write_gradient."""
        o, logits3 = self.options, logits.unsqueeze(-1)
        loss, _lse, total = ROW_KERNEL(self.backend, input=logits3, target=self.target[start:stop], weight=class_weight,
                                       grad=logits3 if write_gradient else None, ignore_index=o.ignore_index,
                                       label_smoothing=o.label_smoothing, lse_square_scale=o.lse_square_scale,
                                       softcap=o.softcap, focal_gamma=None, grad_scale=grad_scale, row_state=None)
        return loss, total

    def statistics_kernel(self, start: int, stop: int, logits: Tensor, out: tuple[Tensor, Tensor]) -> None:
        """The chunk's token statistics into out = (stats (N, 3), argmax (N,)), before the loss kernel overwrites it."""
        out[0][start:stop], out[1][start:stop] = STATS_KERNEL(
            self.backend, input=logits.unsqueeze(-1), target=self.target[start:stop],
            ignore_index=self.options.ignore_index, softcap=self.options.softcap)

    def statistics_gradient_kernel(self, start: int, stop: int, logits: Tensor, statistics_gradient: tuple,
                                   grad: Tensor) -> None:
        """The token statistics' gradient with respect to the chunk's logits into grad; statistics_gradient is
        (logsumexp, coefficients) over all rows (lossops/losses/token_stats.py)."""
        logsumexp, coefficients = statistics_gradient
        STATS_GRAD_KERNEL(self.backend, input=logits.unsqueeze(-1), target=self.target[start:stop],
                          grad=grad.unsqueeze(-1), lse=logsumexp[start:stop], coefficients=coefficients[start:stop],
                          ignore_index=self.options.ignore_index, softcap=self.options.softcap)


class _Gradients:
    """grad_hidden chunk by chunk, grad_weight and grad_bias summed over the chunks from each chunk's d(loss)/d(logits)
    (in at least float32, cast once at the end)."""

    def __init__(self, chunks: _Chunks, wanted: dict):
        hidden, weight, bias = chunks.hidden, chunks.weight, chunks.bias
        acc, vocab = _checks.opmath_dtype(hidden.dtype), weight.shape[0]
        self.weight, self.wide = weight, chunks.wide
        self.grad_hidden = _backend.empty_gradient(hidden) if wanted["hidden"] else None
        self.grad_weight_sum = torch.zeros(weight.shape, dtype=acc, device=weight.device) if wanted["weight"] else None
        wants_bias = wanted["bias"] and bias is not None
        self.grad_bias_sum = torch.zeros(vocab, dtype=acc, device=weight.device) if wants_bias else None
        # the mixed-dtype product's blocks hold as many elements as a chunk of logits (chunk_rows counts them)
        self.vocab_block = min(vocab, max(1, chunks.options.chunk_size * vocab // max(hidden.shape[1], 1)))

    def wanted(self) -> bool:
        return self.grad_hidden is not None or self.grad_weight_sum is not None or self.grad_bias_sum is not None

    def add(self, start: int, stop: int, h: Tensor, dlogits: Tensor) -> None:
        if self.grad_bias_sum is not None:
            self.grad_bias_sum += dlogits.sum(0, dtype=self.grad_bias_sum.dtype)
        if self.wide is not None:
            self.wide.contract(h, dlogits, self.weight,
                               None if self.grad_hidden is None else self.grad_hidden[start:stop], self.grad_weight_sum)
            return
        if self.grad_hidden is not None:
            torch.mm(dlogits, self.weight, out=self.grad_hidden[start:stop])
        if self.grad_weight_sum is not None and self.grad_weight_sum.dtype == dlogits.dtype:
            self.grad_weight_sum.addmm_(dlogits.t(), h)
        elif self.grad_weight_sum is not None:
            # No mixed-dtype addmm on CPU: bounded vocabulary blocks of the product, each added in float32.
            block = self.vocab_block
            for v0 in range(0, self.weight.shape[0], block):
                self.grad_weight_sum[v0:v0 + block] += dlogits[:, v0:v0 + block].t() @ h

    def result(self) -> dict:
        return {"hidden": self.grad_hidden, "weight": self._cast(self.grad_weight_sum),
                "bias": self._cast(self.grad_bias_sum)}

    def _cast(self, summed: Optional[Tensor]) -> Optional[Tensor]:
        return None if summed is None else summed.to(self.weight.dtype)


def _forward_pass(chunks: _Chunks, class_weight: Optional[Tensor], grad_scale: Tensor, gradients: _Gradients,
                  statistics_out: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
    """The loss over every chunk: (per-row loss, summed loss); the wanted gradients formed from each chunk's
    d(loss)/d(logits), scaled by grad_scale; the token statistics into statistics_out when given."""
    hidden = chunks.hidden
    acc = _checks.opmath_dtype(hidden.dtype)
    row_loss = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
    total = torch.zeros((), dtype=acc, device=hidden.device)
    for start, stop, h, logits in chunks:
        if statistics_out is not None:
            chunks.statistics_kernel(start, stop, logits, statistics_out)
        row_loss[start:stop], chunk_total = chunks.loss_kernel(start, stop, logits, class_weight, grad_scale,
                                                               gradients.wanted())
        total += chunk_total
        if gradients.wanted():
            gradients.add(start, stop, h, logits)
    return row_loss, total


def _backward_pass(chunks: _Chunks, class_weight: Optional[Tensor], gradients: _Gradients,
                   grad_loss: Optional[Tensor], statistics_gradient: Optional[tuple[Tensor, Tensor]]) -> None:
    """The wanted gradients from the chunks again: each row of d(loss)/d(logits) scaled by its grad_loss (None: no
    loss gradient), plus the token statistics' gradient when statistics_gradient (logsumexp, coefficients)."""
    if not gradients.wanted():
        return
    hidden = chunks.hidden
    one = torch.ones((), dtype=_checks.opmath_dtype(hidden.dtype), device=hidden.device)
    row_scale = None if grad_loss is None else grad_loss.to(hidden.dtype)
    statistics_buffer = None
    if statistics_gradient is not None:
        statistics_buffer = hidden.new_empty((min(chunks.options.chunk_size, hidden.shape[0]), chunks.weight.shape[0]))
    for start, stop, h, logits in chunks:
        statistics_dlogits = None
        if statistics_buffer is not None:  # read from the logits before the loss kernel overwrites them
            statistics_dlogits = statistics_buffer[:stop - start]
            chunks.statistics_gradient_kernel(start, stop, logits, statistics_gradient, statistics_dlogits)
        if row_scale is None:
            gradients.add(start, stop, h, statistics_dlogits)
            continue
        chunks.loss_kernel(start, stop, logits, class_weight, one, write_gradient=True)
        logits.mul_(row_scale[start:stop, None])
        if statistics_dlogits is not None:
            logits += statistics_dlogits
        gradients.add(start, stop, h, logits)


def _forward(backend, t, o, grads, statistics_out=None):
    """The mean's denominator over all rows, then one pass over the chunks. reduction='none' forms no gradient
    here (each row has its own grad_output): _recompute does, in backward."""
    hidden, weight = t["hidden"], t["weight"]
    acc = _checks.opmath_dtype(hidden.dtype)
    class_weight, denominator = mean_weights(t["target"], t["class_weight"], o.ignore_index, weight.shape[0],
                                             o.reduction, o.lse_square_scale, acc)
    chunks = _Chunks(backend, t, o)
    gradients = _Gradients(chunks, {n: grads.get(n, False) and o.reduction != "none" for n in _DIFFERENTIABLE})
    row_loss, total = _forward_pass(chunks, class_weight, _reduce.gradient_scale(o.reduction, denominator), gradients,
                                    statistics_out)
    return _reduce.reduce(o.reduction, row_loss, total, denominator), gradients.result()


def _run(family, backend, t, o, grads):
    return _forward(backend, t, o, grads)


def _run_with_stats(family, backend, t, o, grads):
    """_run, and the token statistics of every chunk's logits as the op's statistics outputs."""
    hidden = t["hidden"]
    stats = torch.empty((hidden.shape[0], 3), dtype=_checks.opmath_dtype(hidden.dtype), device=hidden.device)
    argmax = torch.empty(hidden.shape[0], dtype=torch.int64, device=hidden.device)
    loss, written = _forward(backend, t, o, grads, statistics_out=(stats, argmax))
    return loss, written, (*(stats[:, k].clone() for k in range(3)), argmax)


def _recompute(family, backend, t, o, grad_loss, needs, statistics_gradient=None):
    """reduction='none': the chunks again, each row of dlogits scaled by its grad_loss (None: no loss gradient),
    plus the token statistics' gradient when statistics_gradient (logsumexp, coefficients) is given."""
    acc = _checks.opmath_dtype(t["hidden"].dtype)
    class_weight = None if t["class_weight"] is None else t["class_weight"].to(acc).contiguous()
    chunks = _Chunks(backend, t, o)
    gradients = _Gradients(chunks, needs)
    _backward_pass(chunks, class_weight, gradients, grad_loss, statistics_gradient)
    return gradients.result()


def _rows_like(t):
    hidden = t["hidden"]
    return hidden.new_empty((hidden.shape[0],), dtype=_checks.opmath_dtype(hidden.dtype))


def _loss_like(t, o):
    rows = _rows_like(t)
    return rows if o.reduction == "none" else rows.new_empty(())


def _hidden_and_vocab(dtype):
    return [torch.randn(6, 8, dtype=dtype), torch.randn(11, 8, dtype=dtype), torch.tensor([0, 10, -100, 3, 3, 7])]


# What the loss's op and its return_token_stats=True form (the op lossops::linear_cross_entropy_with_token_stats)
# share: the token statistics are four more outputs after the loss, filled by the same chunked pass; backward adds
# their gradient through one more pass over the chunks (the logits are gone by then), or folds it into
# reduction="none"'s recomputation.
_OP_DECLARATION = dict(
    inputs=(_family.Input("hidden", differentiable=True), _family.Input("weight", differentiable=True),
            _family.Input("bias", optional=True, differentiable=True), _family.Input("target"),
            _family.Input("class_weight", optional=True)),
    options=LinearCrossEntropyOptions, kernel=ROW_KERNEL, recompute=_recompute, loss_like=_loss_like,
    gradient_in_backward=lambda backend, options: options.reduction == "none")

LINEAR_CROSS_ENTROPY = _family.register(_family.Family(
    name="linear_cross_entropy", run=_run, function=linear_cross_entropy, sharding=SHARDING,
    cases=(_family.Case(_hidden_and_vocab, dict(chunk_size=4), target=2,
                        bad=("target_out_of_range", dict(chunk_size=0))),), **_OP_DECLARATION))

LINEAR_CROSS_ENTROPY_WITH_TOKEN_STATS = _family.register(_family.Family(
    name="linear_cross_entropy_with_token_stats", run=_run_with_stats, statistics=token_stats.statistics(_rows_like),
    public=False, **_OP_DECLARATION))

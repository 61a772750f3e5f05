"""Vocabulary-parallel cross-entropy on 2 and 3 gloo CPU processes against single-process torch.

One spawn of 3 processes (forked from tests/_cases.py's forkserver) serves both sizes: the whole world
(group=None), then a 2-rank subgroup (which also exercises the group argument).
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import lossops
from _cases import spawn
from lossops.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

N, D, V = 13, 6, 23  # V splits unevenly over 2 and 3 ranks
OPTIONS = [dict(), dict(ignore_index=5), dict(label_smoothing=0.2), dict(ignore_index=5, label_smoothing=0.1),
           dict(weight=True), dict(weight=True, ignore_index=5, label_smoothing=0.1),
           dict(lse_square_scale=1e-2), dict(softcap=4.0), dict(weight=True, lse_square_scale=1e-2, softcap=3.0,
                                                                label_smoothing=0.1, ignore_index=5)]
# Each option set runs on one backend in turn (every backend meets every kind, at a third of the calls).
BACKENDS = ["cpp", "triton", "reference"]
REDUCTIONS = ["mean", "sum", "none"]


def _data(options, seed):
    # Same seed on every rank: each builds the full problem and keeps its shard.
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, dtype=torch.float64, generator=gen) * 3
    target = torch.randint(0, V, (N,), generator=gen)
    target[::3] = options.get("ignore_index", -100)
    if options.get("weight"):
        options = dict(options, weight=torch.rand(V, dtype=torch.float64, generator=gen) + 0.2)
    return logits, target, torch.rand(N, dtype=torch.float64, generator=gen) + 0.5, options


def _single_process(logits, target, reduction, options):
    """torch's cross_entropy on the full logits; lossops' reference where torch has no such option."""
    if options.get("lse_square_scale") or options.get("softcap"):
        with lossops.backend("reference"):
            return lossops.cross_entropy(logits, target, reduction=reduction, **options)
    return F.cross_entropy(logits, target, reduction=reduction, **options)


def _shard(world_size, rank):
    bounds = [int(b) for b in torch.linspace(0, V, world_size + 1).round()]
    return slice(bounds[rank], bounds[rank + 1])


def _scaled(loss, grad_output, reduction):
    # A non-uniform upstream gradient for 'none', and a scale != 1 otherwise.
    return (loss * grad_output).sum() if reduction == "none" else loss * 2.5


def _check_logits(shard, group, options, reduction, seed):
    logits, target, grad_output, options = _data(options, seed)
    local = logits[:, shard].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, group, reduction=reduction, **options)
    full = logits.clone().requires_grad_()
    expected = _single_process(full, target, reduction, options)
    torch.testing.assert_close(loss, expected)
    _scaled(loss, grad_output, reduction).backward()
    _scaled(expected, grad_output, reduction).backward()
    torch.testing.assert_close(local.grad, full.grad[:, shard])


def _check_linear(shard, group, options, reduction, seed):
    logits, target, grad_output, options = _data(options, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    hidden = torch.randn(2, N // 2 + 1, D, dtype=torch.float64, generator=gen)[:, :N // 2]  # batch dims
    target = target[:hidden.shape[0] * hidden.shape[1]].reshape(hidden.shape[:-1])
    grad_output = grad_output[:target.numel()].reshape(target.shape)
    weight = torch.randn(V, D, dtype=torch.float64, generator=gen)
    bias = torch.randn(V, dtype=torch.float64, generator=gen)
    ours = [t.clone().requires_grad_() for t in (hidden, weight[shard], bias[shard])]
    ref = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss = vocab_parallel_linear_cross_entropy(ours[0], ours[1], target, group, local_bias=ours[2],
                                               reduction=reduction, **options)
    expected = _single_process(F.linear(*ref).permute(0, 2, 1), target, reduction, options)
    torch.testing.assert_close(loss, expected)
    _scaled(loss, grad_output, reduction).backward()
    _scaled(expected, grad_output, reduction).backward()
    torch.testing.assert_close(ours[0].grad, ref[0].grad)  # the full gradient, summed over ranks
    torch.testing.assert_close(ours[1].grad, ref[1].grad[shard])
    torch.testing.assert_close(ours[2].grad, ref[2].grad[shard])


def _check_all(world_size, rank, group):
    shard = _shard(world_size, rank)
    for seed, options in enumerate(OPTIONS):
        for index, reduction in enumerate(REDUCTIONS):
            with lossops.backend(BACKENDS[(seed + index) % len(BACKENDS)]):
                _check_logits(shard, group, options, reduction, seed)
                _check_linear(shard, group, options, reduction, seed)
    # Every rank rejects a target beyond the last shard at the same point, so none is left waiting in a collective.
    logits, target, _, _ = _data({}, 0)
    target[1] = V
    with pytest.raises(IndexError, match=f"target {V} is out of bounds .*classes over all ranks is {V}"):
        vocab_parallel_cross_entropy(logits[:, shard], target, group)
    # All targets ignored: nan like torch's mean, and still a zero gradient.
    local = logits[:, shard].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, torch.full((N,), -100), group)
    loss.backward()
    assert loss.isnan() and not local.grad.any()


def _worker(rank, world_size, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        _check_all(world_size, rank, None)
        pair = dist.new_group([0, 1])  # every rank must take part in creating it
        if rank < 2:
            _check_all(2, rank, pair)
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_on_3_and_2_ranks_matches_single_process(tmp_path):
    spawn(_worker, 3, 3, str(tmp_path / "store"))


def test_requires_initialized_process_group():
    with pytest.raises(RuntimeError, match="initialized torch.distributed process group"):
        vocab_parallel_cross_entropy(torch.randn(3, 4), torch.zeros(3, dtype=torch.int64))


def test_validates_before_communicating():
    with pytest.raises(RuntimeError, match=r"expected target of shape \(3,\) .* got \(4,\)"):
        vocab_parallel_cross_entropy(torch.randn(3, 4), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"local_weight must have shape \(V_local, 5\)"):
        vocab_parallel_linear_cross_entropy(torch.randn(3, 5), torch.randn(4, 6), torch.zeros(3, dtype=torch.int64))


def test_exported_from_package():
    assert lossops.distributed.vocab_parallel_cross_entropy is vocab_parallel_cross_entropy


# --- the shard kernels on one process, against their plain-PyTorch twins (whose end-to-end result the spawned
# test holds against torch), where the edge cases are cheap to reach -------------------------------------------

def _shard_problem(dtype, layout, classes=9):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(7, classes, dtype=torch.float64, generator=gen) * 3).to(dtype)
    if layout == "transposed":  # class stride 7, row stride 1
        x = x.t().contiguous().t()
    elif layout == "sliced":  # a column slice of a wider tensor
        x = torch.cat([x, x[:, :3]], 1)[:, 2:2 + classes]
    if classes:
        x[4] = float("-inf")  # a row with no finite logit
    target = torch.tensor([0, 5, 12, -100, 8, 20, 3])  # owned for offsets 4..12, others elsewhere or ignored
    return x, target


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("option", ["plain", "weight", "softcap"])
def test_shard_kernels_match_their_reference(kernel_backend, dtype, layout, option):
    from lossops.distributed import _grad_reference, _shard_kernel, _stats_reference
    x, target = _shard_problem(dtype, layout)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weight = torch.rand(x.shape[1], dtype=acc) + 0.5 if option == "weight" else None
    softcap = 2.5 if option == "softcap" else None
    common = dict(input=x, target=target, weight=weight, class_offset=4)
    (stats,) = _shard_kernel(kernel_backend, "cross_entropy_shard_stats")(**common, ignore_index=-100, softcap=softcap)
    (expected,) = _stats_reference(**common, ignore_index=-100, softcap=softcap)
    tolerance = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats, expected, equal_nan=True, **tolerance)
    assert stats[3].eq(0).all()  # the ignored row
    lse = torch.rand(7, dtype=acc, generator=torch.Generator().manual_seed(1)) + 3
    coefficients = torch.randn(7, 3, dtype=acc, generator=torch.Generator().manual_seed(2))
    coefficients[3] = 0
    common.update(lse=lse, coefficients=coefficients, softcap=softcap)
    grad = torch.full(x.shape, float("nan"), dtype=dtype)
    _shard_kernel(kernel_backend, "cross_entropy_shard_grad")(**common, grad=grad)
    expected = _grad_reference(**common, grad=torch.empty(x.shape, dtype=dtype))[0]
    low = dict(rtol=1.6e-2, atol=1e-2) if dtype == torch.bfloat16 else tolerance
    torch.testing.assert_close(grad, expected, equal_nan=True, **low)
    assert grad[3].eq(0).all()  # every element written, the ignored row with zeros


def test_shard_kernels_without_local_classes(kernel_backend):
    from lossops.distributed import _shard_kernel
    x, target = _shard_problem(torch.float32, "contiguous", classes=0)
    (stats,) = _shard_kernel(kernel_backend, "cross_entropy_shard_stats")(
        input=x, target=target, weight=None, class_offset=4, ignore_index=-100, softcap=None)
    kept = target != -100
    assert stats[kept, 0].eq(float("-inf")).all() and stats[kept, 1:].eq(0).all()

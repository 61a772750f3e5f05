"""DTensor inputs on 1-, 2- and 3-rank gloo meshes against single-process losses on the full tensors.

The oracle is torch's function on the full tensors (lossops' reference backend for lossops' own extras), not
torch's DTensor path, which is wrong in places (a batch-sharded weighted mean, class-sharded logits with class
weights and an ignored target). One spawn of 3 processes serves every mesh: the 3-rank world, a 2-rank subgroup
(uneven shards at N = 13) and, on the third rank meanwhile, a 1-rank mesh.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import lossops
from _cases import spawn

N, C, H, D = 13, 7, 5, 6


def _full(seed, *shape, scale=3.0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * scale


def _class_target(seed, shape, ignore=True):
    target = torch.randint(0, C, shape, generator=torch.Generator().manual_seed(seed))
    if ignore:
        target.view(-1)[::4] = -100
    return target


def _compare(mesh, fn, oracle, tensors, placements, kwargs, grad_of=(0,)):
    """fn on DTensors placed as given (None: passed as a plain full tensor) against oracle on the full tensors;
    values, then gradients through a non-uniform upstream gradient, and each gradient's placement."""
    from torch.distributed.tensor import distribute_tensor
    leaves = [t.clone().requires_grad_(i in grad_of) for i, t in enumerate(tensors)]
    dts = []
    for i, (t, p) in enumerate(zip(tensors, placements)):
        if p is None:
            dts.append(t)
        else:
            d = distribute_tensor(t.clone(), mesh, [p])
            dts.append(d.requires_grad_() if i in grad_of else d)
    ours = fn(*dts, **kwargs)
    expected = oracle(*leaves, **kwargs)
    assert type(ours).__name__ == "DTensor", type(ours)
    full = ours.full_tensor()
    torch.testing.assert_close(full, expected)
    upstream = _full(99, *expected.shape, scale=1.0) + 2 if expected.dim() else torch.tensor(2.5, dtype=torch.float64)
    (full * upstream).sum().backward()
    (expected * upstream).sum().backward()
    for i in grad_of:
        assert dts[i].grad.placements == dts[i].placements, (dts[i].grad.placements, dts[i].placements)
        torch.testing.assert_close(dts[i].grad.full_tensor(), leaves[i].grad)


def _lossops_reference(fn):
    def run(*args, **kwargs):
        with lossops.backend("reference"):
            return fn(*args, **kwargs)
    return run


def _check_cross_entropy(mesh, backend):
    from torch.distributed.tensor import Replicate, Shard
    logits, weight = _full(1, N, C), torch.rand(C, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + .3
    target = _class_target(3, (N,))
    options = [dict(), dict(weight=weight), dict(weight=weight, label_smoothing=0.2), dict(label_smoothing=0.1)]
    extras = [dict(lse_square_scale=0.02, weight=weight), dict(softcap=3.0, label_smoothing=0.1)]
    with lossops.backend(backend):
        for reduction in ("mean", "sum", "none"):
            for kw in options:
                kw = dict(kw, reduction=reduction)
                # batch-sharded logits; target as a DTensor and as a plain (full) tensor
                _compare(mesh, lossops.cross_entropy, F.cross_entropy, [logits, target], [Shard(0), Shard(0)], kw)
                if backend != "triton":  # the kernels get the same shards as above; the split is backend-free
                    _compare(mesh, lossops.cross_entropy, F.cross_entropy, [logits, target], [Shard(0), None], kw)
                # class-sharded logits: vocabulary-parallel (torch's loss_parallel raises here with weight + ignore)
                _compare(mesh, lossops.cross_entropy, F.cross_entropy, [logits, target], [Shard(1), Replicate()], kw)
            for kw in extras:
                kw = dict(kw, reduction=reduction)
                oracle = _lossops_reference(lossops.cross_entropy)
                _compare(mesh, lossops.cross_entropy, oracle, [logits, target], [Shard(0), Shard(0)], kw)
                _compare(mesh, lossops.cross_entropy, oracle, [logits, target], [Shard(1), Replicate()], kw)
        # (N, C, H) logits sharded on H; probabilities sharded on the batch; everything replicated
        spatial, spatial_target = _full(4, N, C, H), _class_target(5, (N, H))
        _compare(mesh, lossops.cross_entropy, F.cross_entropy, [spatial, spatial_target], [Shard(2), Shard(1)],
                 dict(weight=weight))
        _compare(mesh, lossops.cross_entropy, F.cross_entropy, [spatial, spatial_target], [Shard(1), Replicate()],
                 dict(weight=weight, reduction="none"))
        probabilities = _full(6, N, C).softmax(1)
        _compare(mesh, lossops.cross_entropy, F.cross_entropy, [logits, probabilities], [Shard(0), Shard(0)],
                 dict(label_smoothing=0.1))
        _compare(mesh, lossops.cross_entropy, F.cross_entropy, [logits, target], [Replicate(), Replicate()],
                 dict(weight=weight))


def _check_linear_cross_entropy(mesh, backend):
    from torch.distributed.tensor import Replicate, Shard
    hidden, weight, bias = _full(7, N, D, scale=1.0), _full(8, C, D, scale=1.0), _full(9, C, scale=1.0)
    target = _class_target(10, (N,))

    def oracle(h, w, t, b, **kw):
        return F.cross_entropy(F.linear(h, w, b), t, **kw)

    def ours(h, w, t, b, **kw):
        return lossops.linear_cross_entropy(h, w, t, linear_bias=b, **kw)

    with lossops.backend(backend):
        class_weight = torch.rand(C, dtype=torch.float64, generator=torch.Generator().manual_seed(11)) + 0.5
        for reduction, kw in (("mean", dict(weight=class_weight)), ("none", {}), ("mean", {})):
            kw = dict(kw, reduction=reduction, label_smoothing=0.1)
            # column-parallel head: weight and bias sharded on the classes, hidden replicated
            _compare(mesh, ours, oracle, [hidden, weight, target, bias],
                     [Replicate(), Shard(0), Replicate(), Shard(0)], kw, grad_of=(0, 1, 3))
            # batch-sharded tokens, replicated head
            _compare(mesh, ours, oracle, [hidden, weight, target, bias],
                     [Shard(0), Replicate(), Shard(0), Replicate()], kw, grad_of=(0, 1, 3))


def _check_elementwise_and_focal(mesh, backend):
    from torch.distributed.tensor import Replicate, Shard
    from lossops.losses.focal import torchvision_sigmoid_focal_loss as torchvision_focal
    x, soft = _full(11, N, C), torch.rand(N, C, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    binary = soft.round()
    pos_weight = torch.rand(C, dtype=torch.float64, generator=torch.Generator().manual_seed(13)) + 0.5
    target = _class_target(14, (N,))
    alpha = torch.rand(C, dtype=torch.float64, generator=torch.Generator().manual_seed(15)) + 0.2

    def torch_softmax_focal(inp, t, alpha=None, gamma=2.0, reduction="mean"):
        with lossops.backend("reference"):
            return lossops.softmax_focal_loss(inp, t, alpha, gamma, reduction=reduction)

    with lossops.backend(backend):
        for reduction in ("mean", "sum", "none"):
            for dim in (0, 1):
                _compare(mesh,
                         lambda a, b, pw, **kw: lossops.binary_cross_entropy_with_logits(a, b, pos_weight=pw, **kw),
                         lambda a, b, pw, **kw: F.binary_cross_entropy_with_logits(a, b, pos_weight=pw, **kw),
                         [x, soft, pos_weight], [Shard(dim), Shard(dim), None], dict(reduction=reduction))
                _compare(mesh, lossops.sigmoid_focal_loss, torchvision_focal, [x, binary], [Shard(dim), Shard(dim)],
                         dict(reduction=reduction))
                for name in ("l1_loss", "mse_loss", "smooth_l1_loss", "huber_loss"):
                    _compare(mesh, getattr(lossops, name), getattr(F, name), [x, soft], [Shard(dim), Shard(dim)],
                             dict(reduction=reduction))
            _compare(mesh, lossops.softmax_focal_loss, torch_softmax_focal, [x, target, alpha],
                     [Shard(0), Shard(0), Replicate()], dict(reduction=reduction))


def _check_distillation(mesh, backend):
    """Logits (and hidden states) sharded on a token dimension: the mean divides by the kept tokens of every rank."""
    from torch.distributed.tensor import Replicate, Shard
    student, teacher = _full(30, N, H, C), _full(31, N, H, C)
    target = _class_target(32, (N, H))
    oracle = _lossops_reference(lossops.distillation_loss)
    with lossops.backend(backend):
        for reduction in ("mean", "sum", "none"):
            for kw in (dict(), dict(divergence="jsd", beta=0.3, hard_weight=0.5, temperature=2.0)):
                kw = dict(kw, reduction=reduction)
                for dim in (0, 1):  # either leading dimension; the target as a DTensor and as a plain tensor
                    _compare(mesh, lossops.distillation_loss, oracle, [student, teacher, target],
                             [Shard(dim), Shard(dim), Shard(dim)], kw)
                    if backend != "triton":  # the kernels get the same shards as above; the split is backend-free
                        _compare(mesh, lossops.distillation_loss, oracle, [student, teacher, target],
                                 [Shard(dim), None, None], kw)
            # no target: every token counts; a teacher that requires grad gets its gradient through the shards
            _compare(mesh, lossops.distillation_loss, oracle, [student, teacher], [Shard(0), Shard(0)],
                     dict(reduction=reduction, divergence="tvd"), grad_of=(0, 1))
        _compare(mesh, lossops.distillation_loss, oracle, [student, teacher, target],
                 [Replicate(), Replicate(), Replicate()], dict(divergence="reverse_kl"))
        hidden, weight, bias = _full(33, N, H, D, scale=1.0), _full(34, C, D, scale=1.0), _full(35, C, scale=1.0)
        teacher_hidden, teacher_weight = _full(36, N, H, D + 2, scale=1.0), _full(37, C, D + 2, scale=1.0)

        def linear_oracle(h, w, th, tw, t, b, **kw):
            return oracle(F.linear(h, w, b), F.linear(th, tw), t, **kw)

        def linear(h, w, th, tw, t, b, **kw):
            return lossops.linear_distillation_loss(h, w, th, tw, t, student_bias=b, chunk_size=7, **kw)

        for reduction in ("mean", "none"):
            _compare(mesh, linear, linear_oracle, [hidden, weight, teacher_hidden, teacher_weight, target, bias],
                     [Shard(0), Replicate(), Shard(0), Replicate(), Shard(0), Replicate()],
                     dict(reduction=reduction, divergence="jsd", hard_weight=0.5), grad_of=(0, 1, 5))
    with pytest.raises(ValueError, match="distillation_loss does not support student_logits sharded on its class"):
        from torch.distributed.tensor import distribute_tensor
        lossops.distillation_loss(distribute_tensor(student, mesh, [Shard(2)]), teacher)


def _check_refusals(mesh):
    from torch.distributed.tensor import Partial, Shard, distribute_tensor, DTensor
    x = distribute_tensor(_full(16, N, C), mesh, [Shard(1)])
    with pytest.raises(ValueError, match=r"softmax_focal_loss does not support input sharded on its class dimension"):
        lossops.softmax_focal_loss(x, _class_target(17, (N,)))
    partial = DTensor.from_local(_full(18, N, C), mesh, [Partial()])
    with pytest.raises(ValueError, match="does not take Partial DTensors"):
        lossops.cross_entropy(partial, _class_target(17, (N,)))
    log_probs = distribute_tensor(_full(19, 10, N, C).log_softmax(2), mesh, [Shard(1)])
    with pytest.raises(ValueError, match=r"ctc_loss does not support log_probs placed as S\(1\) .*only Replicate"):
        lossops.ctc_loss(log_probs, torch.ones(N, 3, dtype=torch.long), [10] * N, [3] * N)
    # token options on sharded inputs: refused (their sharded means are not written), served when replicated
    from torch.distributed.tensor import Replicate
    logits, target = _full(22, N, C), _class_target(23, (N,))
    for kwargs in (dict(temperature=2.0), dict(token_weight=torch.ones(N)), dict(num_items_in_batch=3)):
        with pytest.raises(ValueError, match=f"cross_entropy: {next(iter(kwargs))}=.* replicated DTensor inputs only"):
            lossops.cross_entropy(distribute_tensor(logits, mesh, [Shard(0)]), target, **kwargs)
        replicated = lossops.cross_entropy(distribute_tensor(logits, mesh, [Replicate()]), target, **kwargs)
        torch.testing.assert_close(replicated.full_tensor(), lossops.cross_entropy(logits, target, **kwargs))
    with pytest.raises(ValueError, match="cross_entropy: return_token_stats=True is supported with replicated"):
        lossops.cross_entropy(distribute_tensor(logits, mesh, [Shard(0)]), target, return_token_stats=True)
    replicated = lossops.cross_entropy(distribute_tensor(logits, mesh, [Replicate()]), target, return_token_stats=True)
    for got, expected in zip(replicated, lossops.cross_entropy(logits, target, return_token_stats=True)):
        torch.testing.assert_close(got.full_tensor(), expected)
    head = distribute_tensor(_full(24, C, 4), mesh, [Shard(0)])
    with pytest.raises(ValueError, match="linear_cross_entropy: temperature=2.0 is supported with replicated"):
        lossops.linear_cross_entropy(distribute_tensor(_full(25, N, 4), mesh, [Replicate()]), head, target,
                                     temperature=2.0)


def _check_direct_op_call(mesh):
    """torch.ops.lossops.* called with DTensors: replicated, the same value as on plain tensors."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    x, y = _full(20, N, C), _full(21, N, C)
    args = dict(input=x, target=y, weight=None, aux=None, denominator=torch.tensor(float(x.numel()), dtype=x.dtype),
                reduction="mean", ignore_index=-100, weight_layout=[1, 1], aux_layout=[1, 1], grad_input=False,
                grad_target=False, backend="cpp")
    expected = torch.ops.lossops.mse_loss(**args)[0]
    placed = dict(args, input=distribute_tensor(x, mesh, [Shard(0)]), target=distribute_tensor(y, mesh, [Shard(0)]),
                  denominator=distribute_tensor(args["denominator"], mesh, [Replicate()]))
    torch.testing.assert_close(torch.ops.lossops.mse_loss(**placed)[0].full_tensor(), expected)


def _check_all(mesh, backend):
    _check_cross_entropy(mesh, backend)
    _check_linear_cross_entropy(mesh, backend)
    if backend == "cpp":
        _check_elementwise_and_focal(mesh, backend)
        _check_refusals(mesh)
        _check_direct_op_call(mesh)


def _worker(rank, world_size, init_file, backend, check=_check_all):
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        # Every rank takes part in creating each mesh and group.
        own = init_device_mesh("cpu", (world_size, 1), mesh_dim_names=("world", "own"))["own"]
        world = init_device_mesh("cpu", (world_size,))
        pair = dist.new_group([0, 1])
        check(world, backend)
        # The smaller meshes test the DTensor layer, the same for both backends: the C++ run covers them (under
        # the interpreter each Triton call costs about a millisecond).
        if backend == "triton":
            pass
        elif rank < 2:
            check(DeviceMesh.from_group(pair, "cpu"), backend)
        else:
            # A 1-rank mesh on the rank outside the pair, meanwhile: its rank on that mesh (0) is not its global
            # rank, so a global rank used in place of the mesh's shows here (the other ranks' would repeat it).
            check(own, backend)
        # No rank tears its gloo connections down while another still uses them: rank 2, done first, aborted the
        # spawn now and then ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_dtensor_losses_on_1_2_and_3_ranks_match_single_process(tmp_path, backend):
    spawn(_worker, 3, 3, str(tmp_path / "store"), backend)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_dtensor_distillation_on_1_2_and_3_ranks_matches_single_process(tmp_path, backend):
    spawn(_worker, 3, 3, str(tmp_path / "store"), backend, _check_distillation)


def test_plain_calls_do_not_go_through_the_dtensor_path():
    # the wrapper's only cost on a plain call is a type check; the function is still torch's signature
    import inspect
    assert "inplace_backward" in inspect.signature(lossops.cross_entropy).parameters
    x = torch.randn(4, 3, requires_grad=True)
    assert type(lossops.cross_entropy(x, torch.tensor([0, 1, 2, 0]))) is torch.Tensor

"""lossops.triplet_margin_loss / triplet_margin_with_distance_loss and their Modules against torch's, on every
backend."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lossops
from _cases import assert_float64_gradients_match, backend_cases, forward_backward, leaf_copies, pairwise
from _elementwise_cases import check_opinfo_sample, check_reduced_precision, opinfo_params

# (anchor, positive, negative) shapes without the feature dimension: torch's differences broadcast
LAYOUTS = {"rows": ((5,), (5,), (5,)), "unbatched": ((), (), ()), "positive_row": ((5,), (1,), (5,)),
           "anchor_row": ((1,), (5,), (5,)), "batch_dims": ((2, 3), (2, 3), (1, 3))}
OPTIONS = dict(reduction=("none", "mean", "sum"), p=(2.0, 1.0, 1.5, 3.0, 0.5), swap=(False, True),
               margin=(1e-3, 0.5, 3.0), eps=(1e-6, 0.0, 0.3), layout=list(LAYOUTS))


def _operands(case, features):
    torch.manual_seed(0)
    shapes = LAYOUTS[case["layout"]]
    return [torch.randn(*s, features, dtype=torch.float64).requires_grad_() for s in shapes]


def _kwargs(case):
    return {k: case[k] for k in ("margin", "p", "eps", "swap", "reduction")}


def _on_kink(inputs, kwargs):
    """Whether a row sits within reach of gradcheck's step of a kink (the hinge at 0, a swap tie)."""
    a, p, n = (x.detach() for x in inputs)
    dp = torch.pairwise_distance(a, p, kwargs["p"], kwargs["eps"])
    dn = torch.pairwise_distance(a, n, kwargs["p"], kwargs["eps"])
    ds = torch.pairwise_distance(p, n, kwargs["p"], kwargs["eps"])
    near = ((kwargs["margin"] + dp - torch.minimum(dn, ds) if kwargs["swap"] else kwargs["margin"] + dp - dn)
            .abs() < 1e-4).any()
    return bool(near) or (kwargs["swap"] and bool(((dn - ds).abs() < 1e-4).any()))


CASES = backend_cases({"cpp": pairwise(OPTIONS), "reference": pairwise(OPTIONS), "triton": pairwise(OPTIONS)})


@pytest.mark.parametrize("backend, case", CASES, indirect=["backend"])
def test_float64_matches_torch_and_gradcheck(backend, case):
    """Values and the three gradients equal torch's; float64 gradcheck (Triton's interpreter: projected on random
    directions, then its gradients equal the C++ backend's gradchecked ones on a wider row)."""
    kwargs = _kwargs(case)
    inputs = _operands(case, features=6)

    def ours(*a):
        return lossops.triplet_margin_loss(*a, **kwargs)

    assert_close(forward_backward(ours, inputs),
                 forward_backward(lambda *a: F.triplet_margin_loss(*a, **kwargs), leaf_copies(inputs)))
    if not _on_kink(inputs, kwargs):
        assert torch.autograd.gradcheck(ours, tuple(inputs), fast_mode=backend == "triton")
    if backend == "triton":
        wide = _operands(case, features=40)
        if not _on_kink(wide, kwargs):
            assert_float64_gradients_match(ours, wide, backend)


@pytest.mark.parametrize("backend, case", backend_cases({
    b: pairwise(dict(reduction=("none", "mean", "sum"), swap=(False, True), margin=(0.2, 2.0),
                     layout=("rows", "unbatched", "positive_row"))) for b in ("cpp", "triton", "reference")}),
    indirect=["backend"])
def test_with_distance_default_matches_torch_and_gradcheck(backend, case):
    inputs = _operands(dict(case), features=5)
    kwargs = {k: case[k] for k in ("margin", "swap", "reduction")}
    for distance in (None, torch.nn.PairwiseDistance(), torch.pairwise_distance):
        def ours(*a):
            return lossops.triplet_margin_with_distance_loss(*a, distance_function=distance, **kwargs)

        def theirs(*a):
            return F.triplet_margin_with_distance_loss(*a, distance_function=distance, **kwargs)

        assert_close(forward_backward(ours, inputs), forward_backward(theirs, leaf_copies(inputs)))
    if not _on_kink(inputs, dict(kwargs, p=2.0, eps=1e-6)):
        assert torch.autograd.gradcheck(ours, tuple(inputs), fast_mode=backend == "triton")


def test_with_distance_recognises_torchs_distance_and_nothing_else(monkeypatch):
    """torch's pairwise distance (a PairwiseDistance Module with its p and eps) takes the fused op; a caller's
    distance, a PairwiseDistance with keepdim or with a hook, takes torch's function, through which autograd runs."""
    from test_cpp_eager_path import custom_op_only

    family = lossops.losses.triplet_margin.TRIPLET_MARGIN_WITH_DISTANCE_LOSS
    calls = []
    monkeypatch.setattr(family, "apply", functools.partial(lambda apply, *a: calls.append(a) or apply(*a),
                                                           family.apply))
    hooked = torch.nn.PairwiseDistance(p=1.5, eps=0.1)
    seen = []
    hooked.register_forward_hook(lambda *_: seen.append(1))
    cosine = lambda x, y: 1 - F.cosine_similarity(x, y)  # noqa: E731
    inputs = [torch.randn(4, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    for distance, fused in ((torch.nn.PairwiseDistance(p=1.5, eps=0.1), True), (hooked, False),
                            (cosine, False), (torch.nn.PairwiseDistance(keepdim=True), False)):
        calls.clear()
        with lossops.backend("cpp"), custom_op_only(monkeypatch):
            got = forward_backward(lambda *a: lossops.triplet_margin_with_distance_loss(
                *a, distance_function=distance, swap=True, reduction="none"), inputs)
        want = forward_backward(lambda *a: F.triplet_margin_with_distance_loss(
            *a, distance_function=distance, swap=True, reduction="none"), leaf_copies(inputs))
        assert_close(got, want)
        assert bool(calls) == fused, distance
    assert len(seen) == 6  # the hook ran for each of the three distances, in our call and in torch's


def test_kinks_ties_zero_distances_and_nonfinite(backend):
    """torch's subgradients: the hinge exactly at 0 (gradient passes), a distance of exactly 0 (eps=0, equal rows:
    p=2's and p>1's masked 0, p<1's zero elements), swap's tie dN = dS (halved), NaN rows."""
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 2.0], [0.5, -1.0], [float("nan"), 1.0], [2.0, 0.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 2.0], [0.5, 1.0], [0.0, 1.0], [1.0, 0.0]])
    n = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 2.0], [0.5, 3.0], [1.0, 1.0], [3.0, 0.0]])
    for p_norm in (2.0, 1.0, 1.5, 0.5):
        for swap in (False, True):
            kwargs = dict(margin=1.0, p=p_norm, eps=0.0, swap=swap, reduction="none")
            inputs = [x.clone().double().requires_grad_() for x in (a, p, n)]
            ours = forward_backward(lambda *t: lossops.triplet_margin_loss(*t, **kwargs), inputs)
            theirs = forward_backward(lambda *t: F.triplet_margin_loss(*t, **kwargs), leaf_copies(inputs))
            assert_close(ours, theirs, equal_nan=True, msg=lambda m: f"p={p_norm} swap={swap}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("swap", [False, True])
def test_reduced_precision_matches_torch(backend, dtype, swap):
    n, d = (16, 40) if backend == "triton" else (300, 257)
    torch.manual_seed(0)
    positive, negative = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)

    def ours(x):
        return lossops.triplet_margin_loss(x, positive.to(x.dtype), negative.to(x.dtype), margin=0.5, swap=swap,
                                           reduction="sum")

    def truth(x):
        return F.triplet_margin_loss(x, positive.to(x.dtype), negative.to(x.dtype), margin=0.5, swap=swap,
                                     reduction="sum")

    check_reduced_precision(ours, truth, torch.randn(n, d, dtype=torch.float64), dtype, "triplet_margin_loss",
                            rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend, name, dtype, index", opinfo_params(
    ["nn.functional.triplet_margin_loss", "nn.functional.triplet_margin_with_distance_loss"]),
    indirect=["backend"])
def test_opinfo_samples(backend, name, dtype, index):
    short = name.split(".")[-1]
    check_opinfo_sample(getattr(lossops, short), getattr(F, short), name, dtype, index)


def _opinfo_errors(name):
    from torch.testing._internal.common_methods_invocations import op_db

    (info,) = [op for op in op_db if op.name == name]
    return list(info.error_inputs(torch.device("cpu")))


@pytest.mark.parametrize("name", ["triplet_margin_loss", "triplet_margin_with_distance_loss"])
def test_opinfo_error_inputs(backend, name):
    errors = _opinfo_errors(f"nn.functional.{name}")
    assert len(errors) >= 4
    for error in errors:
        sample = error.sample_input
        with pytest.raises(error.error_type, match=error.error_regex):
            getattr(lossops, name)(sample.input, *sample.args, **sample.kwargs)


def _module_samples(class_name, dtype):
    """torch's own inputs of the Module: its module_db samples (none in torch 2.13) and its criterion_tests entries
    (input_fn: anchor and positive; target_fn: negative), as (constructor kwargs, anchor, positive, negative)."""
    from torch.testing._internal.common_modules import module_db
    from torch.testing._internal.common_nn import criterion_tests

    torch.manual_seed(0)
    samples = []
    for info in (m for m in module_db if m.module_cls.__name__ == class_name):
        samples += [(dict(s.constructor_input.kwargs), *s.forward_input.args)
                    for s in info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True,
                                                     training=True)]
    for test in criterion_tests:
        if test["fullname"].startswith(class_name + "_"):
            module = test["constructor"]()
            anchor, positive = (x.to(dtype).requires_grad_() for x in test["input_fn"]())
            kwargs = {k: getattr(module, k) for k in ("margin", "p", "eps", "swap", "reduction") if hasattr(module, k)}
            samples.append((kwargs, anchor, positive, test["target_fn"]().to(dtype).requires_grad_()))
    return samples


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("class_name, minimum", [("TripletMarginLoss", 3), ("TripletMarginWithDistanceLoss", 0)])
def test_torch_module_samples(backend, dtype, class_name, minimum):
    samples = _module_samples(class_name, dtype)
    assert len(samples) >= minimum
    for kwargs, *inputs in samples:
        got = forward_backward(getattr(lossops.nn, class_name)(**kwargs), inputs)
        want = forward_backward(getattr(torch.nn, class_name)(**kwargs), leaf_copies(inputs))
        assert_close(got, want)


def test_modules_match_torch_modules(backend):
    inputs = [torch.randn(5, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    for ours, theirs in ((lossops.nn.TripletMarginLoss(0.3, 1.5, 0.01, True, reduction="sum"),
                          torch.nn.TripletMarginLoss(0.3, 1.5, 0.01, True, reduction="sum")),
                         (lossops.nn.TripletMarginWithDistanceLoss(margin=0.4, swap=True, reduction="none"),
                          torch.nn.TripletMarginWithDistanceLoss(margin=0.4, swap=True, reduction="none"))):
        assert_close(forward_backward(ours, inputs), forward_backward(theirs, leaf_copies(inputs)))
    default = lossops.nn.TripletMarginWithDistanceLoss()
    assert type(default.distance_function) is torch.nn.PairwiseDistance  # as torch's, a child Module
    theirs = torch.nn.TripletMarginWithDistanceLoss()
    assert dict(default.named_children()).keys() == dict(theirs.named_children()).keys()
    assert repr(lossops.nn.TripletMarginWithDistanceLoss(margin=0.5)) == (
        "TripletMarginWithDistanceLoss(\n  margin=0.5\n  (distance_function): PairwiseDistance()\n)")
    with pytest.raises(TypeError):  # keyword-only, as torch's
        lossops.nn.TripletMarginWithDistanceLoss(None, 1.0)


@pytest.mark.parametrize("call, error, match", [
    (lambda a, p, n: lossops.triplet_margin_loss(a, p, n, margin=0.0), ValueError, "margin must be greater than 0"),
    (lambda a, p, n: lossops.triplet_margin_loss(a, p, n, margin=-1), ValueError, "margin must be greater than 0"),
    (lambda a, p, n: lossops.triplet_margin_loss(a, p, n, reduction="max"), ValueError, "max"),
    (lambda a, p, n: lossops.triplet_margin_loss(a[0], p, n), RuntimeError, "same number of dimensions"),
    (lambda a, p, n: lossops.triplet_margin_loss(a, p[:2], n), RuntimeError, "size of tensor a"),
    (lambda a, p, n: lossops.triplet_margin_loss(a, p, n[:, :2]), RuntimeError, "size of tensor a"),
    (lambda a, p, n: lossops.triplet_margin_loss(a[:1], p[:2], n, swap=True), RuntimeError, "size of tensor a"),
    (lambda a, p, n: lossops.triplet_margin_loss(a, p, n, swap=1), TypeError, "swap"),
    (lambda a, p, n: lossops.triplet_margin_loss(a, p, n, p="2"), TypeError, "p"),
    (lambda a, p, n: lossops.triplet_margin_loss(a, [1.0], n), TypeError, "positive"),
    (lambda a, p, n: lossops.triplet_margin_with_distance_loss(a, p, n, margin=0.0), ValueError, "margin"),
    (lambda a, p, n: lossops.triplet_margin_with_distance_loss(a, p, n, reduction="max"), ValueError, "max"),
    (lambda a, p, n: lossops.triplet_margin_with_distance_loss(a[0], p, n), RuntimeError, "same number"),
    (lambda a, p, n: lossops.triplet_margin_with_distance_loss(a, p[:2], n), RuntimeError, "size of tensor a"),
])
def test_bad_arguments(backend, call, error, match):
    def make():
        return torch.randn(3, 4, requires_grad=True), torch.randn(3, 4), torch.randn(3, 4)

    with pytest.raises(error, match=match):
        call(*make()).sum().backward()
    with pytest.raises(error):  # torch raises the same type
        with lossops.backend("reference"):
            call(*make())


def test_dtypes_broadcasting_and_torchs_own_cases_like_torch(backend):
    """Mixed dtypes promote as torch's differences do; what the kernels do not take (integers, 0-d inputs, p = inf
    or 0, a tensor margin, a last dimension that one pair broadcasts) gives torch's values."""
    x = torch.randn(4, 3, requires_grad=True)
    x64 = torch.randn(4, 3, dtype=torch.float64)
    xb = torch.randn(4, 3).bfloat16().requires_grad_()
    cases = [((x, x64, x.detach() * 2), {}), ((xb, x.detach(), x64.float()), {}),
             ((xb, xb.detach() * 2, xb.detach()), {}),
             ((torch.arange(6.0).reshape(2, 3).long(), torch.ones(2, 3).long(), torch.zeros(2, 3).long()), {}),
             ((torch.tensor(1.0, requires_grad=True), torch.tensor(2.0), torch.tensor(0.5)), {}),
             ((x, x64.float(), x.detach() + 1), dict(p=float("inf"))), ((x, x64.float(), x.detach() + 1), dict(p=0)),
             ((x, x64.float(), x.detach() + 1), dict(margin=torch.tensor(0.5))),
             ((x[:, :1], x64.float()[:, :1], x.detach() + 1), dict(reduction="none")),
             ((torch.empty(0, 3, requires_grad=True), torch.empty(0, 3), torch.empty(0, 3)), {}),
             ((torch.randn(4, 0, requires_grad=True), torch.empty(4, 0), torch.empty(4, 0)), dict(reduction="none"))]
    for inputs, kwargs in cases:
        ours = forward_backward(lambda *a: lossops.triplet_margin_loss(*a, **kwargs), list(inputs))
        theirs = forward_backward(lambda *a: F.triplet_margin_loss(*a, **kwargs), leaf_copies(inputs))
        assert ours[0].dtype == theirs[0].dtype and ours[0].shape == theirs[0].shape, (kwargs, ours[0], theirs[0])
        low = any(t.dtype == torch.bfloat16 for t in inputs)  # one bf16 rounding apart at most
        assert_close(ours, theirs, equal_nan=True, atol=1e-2 if low else 1e-5, rtol=1e-2 if low else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("options", [dict(), dict(swap=True, p=1.5, eps=0.1, margin=0.2), dict(p=1.0)])
@pytest.mark.parametrize("grads", ["all", "anchor"])
def test_eager_path_matches_the_custom_op(monkeypatch, dtype, reduction, options, grads):
    """Plain CPU calls of three (N, D) rows take the C++ eager path (one call, its own autograd node): the custom
    op's values and gradients, bit for bit."""
    from test_cpp_eager_path import assert_same_as_custom_op

    def make():
        torch.manual_seed(0)
        return tuple(torch.randn(7, 9, dtype=dtype, requires_grad=i == 0 or grads == "all") for i in range(3))

    grad_output = torch.randn(7, dtype=dtype) if reduction == "none" else None
    assert_same_as_custom_op(monkeypatch, lambda *a: lossops.triplet_margin_loss(*a, reduction=reduction, **options),
                             make, "LossopsTripletMarginLossBackward", grad_output)
    distance = {k: v for k, v in options.items() if k not in ("p", "eps")}
    distance["distance_function"] = torch.nn.PairwiseDistance(options.get("p", 2.0), options.get("eps", 1e-6))
    assert_same_as_custom_op(
        monkeypatch, lambda *a: lossops.triplet_margin_with_distance_loss(*a, reduction=reduction, **distance), make,
        "LossopsTripletMarginWithDistanceLossBackward", grad_output)


@pytest.mark.parametrize("shape", [(20_001, 7), (96, 5_003)])
@pytest.mark.parametrize("options", [dict(), dict(p=1.5, swap=True)])
def test_cpp_bitwise_identical_across_thread_counts(shape, options):
    """Rows are independent and each is summed in one fixed order, the total in index order: 1 or 2 threads give
    the same bits."""
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randn(shape, generator=gen).requires_grad_() for _ in range(3)]
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            with lossops.backend("cpp"):
                results.append(forward_backward(lambda *a: lossops.triplet_margin_loss(*a, **options),
                                                leaf_copies(inputs)))
    finally:
        torch.set_num_threads(threads)
    assert_close(results[0], results[1], rtol=0, atol=0)
    assert_close(results[0], forward_backward(lambda *a: F.triplet_margin_loss(*a, **options), leaf_copies(inputs)),
                 rtol=1e-4, atol=1e-5)

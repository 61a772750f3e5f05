"""lossops.nn.AdaptiveLogSoftmaxWithLoss against torch.nn.AdaptiveLogSoftmaxWithLoss holding the same state_dict, on
every backend: output, loss, the gradients of the input and of every parameter, log_prob, predict, torch's errors.

torch's module_db (torch.testing._internal.common_modules) has no AdaptiveLogSoftmaxWithLoss samples, so the inputs
are made here: cutoff sets with one and several clusters, clusters of one class and projections of width 0.
"""
import warnings

import pytest
import torch

import lossops
from _cases import assert_float64_gradients_match

CONFIGS = {
    "one-cluster": dict(in_features=16, n_classes=10, cutoffs=[4]),
    "three-clusters-head-bias": dict(in_features=16, n_classes=20, cutoffs=[3, 9, 15], div_value=2.0, head_bias=True),
    # one-class clusters (class 1, class 11) and projections of width 8 // 4**2 = 0 and 8 // 4**3 = 0
    "narrow": dict(in_features=8, n_classes=12, cutoffs=[1, 2, 11], head_bias=True),
}


def make_pair(config, dtype=torch.float64, seed=0):
    """torch's Module with random parameters and ours holding its state_dict."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's Linear warns that initialising a width-0 projection is a no-op
        torch.manual_seed(seed)
        theirs = torch.nn.AdaptiveLogSoftmaxWithLoss(**config, dtype=dtype)
        ours = lossops.nn.AdaptiveLogSoftmaxWithLoss(**config, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def covering_target(n_classes, cutoffs, n, seed=1):
    """n class indices with every cluster (the shortlist included) present, the rest random."""
    gen = torch.Generator().manual_seed(seed)
    starts = [0, *cutoffs]
    target = torch.randint(0, n_classes, (n,), generator=gen)
    target[:len(starts)] = torch.tensor(starts)
    return target[torch.randperm(n, generator=gen)]


def forward_and_gradients(module, x, target, seed=2):
    """output, loss, and the gradients of x and of each named parameter (None where the parameter is unused) of
    output·u + c·loss for a random upstream u and c (multiples of 1/8: exact in every dtype)."""
    x = x.detach().clone().requires_grad_()
    result = module(x, target)
    gen = torch.Generator().manual_seed(seed)
    upstream = [(torch.randint(-32, 33, t.shape, generator=gen) / 8).to(t.dtype) for t in result]
    names, params = zip(*module.named_parameters())
    grads = torch.autograd.grad(tuple(result), (x, *params), upstream, allow_unused=True)
    return result.output.detach(), result.loss.detach(), dict(zip(("input", *names), grads))


def assert_same_results(ours, theirs, x, target):
    got, want = forward_and_gradients(ours, x, target), forward_and_gradients(theirs, x, target)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], equal_nan=True)
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        assert (got[2][name] is None) == (want[2][name] is None), name
        if want[2][name] is not None:
            torch.testing.assert_close(got[2][name], want[2][name], msg=lambda m: f"gradient of {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_forward_and_gradients_match_torch(backend, config, dtype):
    ours, theirs = make_pair(config, dtype)
    x = torch.randn(13, config["in_features"], dtype=dtype)
    assert_same_results(ours, theirs, x, covering_target(config["n_classes"], config["cutoffs"], 13))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_unbatched_input(backend, config, dtype):
    ours, theirs = make_pair(config, dtype)
    for target in [0, config["cutoffs"][0], config["n_classes"] - 1]:
        x = torch.randn(config["in_features"], dtype=dtype)
        result = ours(x, torch.tensor(target))
        assert result.output.shape == () and result.loss.shape == ()
        assert_same_results(ours, theirs, x, torch.tensor(target))


@pytest.mark.parametrize("targets", [[0, 1, 2, 3, 0], [5, 6, 7, 5, 6], [4, 9, 0], [7], [0], []],
                         ids=["shortlist-only", "first-cluster-only", "one-cluster-empty", "one-row-in-a-cluster",
                              "one-row-in-the-shortlist", "empty-batch"])
def test_target_subsets_match_torch(backend, targets):
    """Clusters no target falls in are not evaluated (their projections get no gradient, as torch's); an empty
    batch gives torch's NaN loss."""
    ours, theirs = make_pair(dict(in_features=16, n_classes=12, cutoffs=[4, 8]))
    target = torch.tensor(targets, dtype=torch.int64)
    assert_same_results(ours, theirs, torch.randn(len(targets), 16, dtype=torch.float64), target)


def test_int32_target(backend):
    ours, theirs = make_pair(CONFIGS["three-clusters-head-bias"])
    target = covering_target(20, [3, 9, 15], 9).int()
    assert_same_results(ours, theirs, torch.randn(9, 16, dtype=torch.float64), target)


def test_output_and_loss_are_types_of_torch():
    ours, _ = make_pair(CONFIGS["one-cluster"])
    result = ours(torch.randn(3, 16, dtype=torch.float64), torch.tensor([0, 5, 9]))
    assert type(result) is torch.nn.modules.adaptive._ASMoutput
    assert result._fields == ("output", "loss")


def test_the_loss_goes_through_lossops_cross_entropy(monkeypatch):
    """The head's and every evaluated cluster's negative log-probabilities come from lossops.cross_entropy."""
    family = lossops._FAMILIES["cross_entropy"]
    calls = []

    def counting(input, target, *args, **kwargs):
        calls.append((tuple(input.shape), kwargs.get("reduction")))
        return original(input, target, *args, **kwargs)

    original = family.function
    monkeypatch.setattr(family, "function", counting)
    ours, _ = make_pair(CONFIGS["three-clusters-head-bias"])
    ours(torch.randn(4, 16, dtype=torch.float64), torch.tensor([0, 4, 5, 19]))
    assert sorted(calls) == sorted([((2, 6), "none"), ((1, 5), "none"), ((4, 6), "none")])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_log_prob_and_predict_match_torch(config, dtype):
    ours, theirs = make_pair(config, dtype)
    x = torch.randn(17, config["in_features"], dtype=dtype)
    log_prob = ours.log_prob(x)
    torch.testing.assert_close(log_prob, theirs.log_prob(x))
    torch.testing.assert_close(log_prob.exp().sum(1), torch.ones(17, dtype=dtype))
    assert torch.equal(ours.predict(x), theirs.predict(x))
    assert torch.equal(ours.predict(x), log_prob.argmax(1))


@pytest.mark.parametrize("rows", ["all-in-the-shortlist", "all-outside", "mixed"])
def test_predict_when_the_head_ranks_a_cluster_first(rows):
    """predict's three cases: no row, every row, and some rows whose head ranks a cluster above the shortlist."""
    ours, theirs = make_pair(dict(in_features=6, n_classes=9, cutoffs=[3, 6], head_bias=True))
    with torch.no_grad():
        for module in (ours, theirs):
            module.head.weight.zero_()
            module.head.weight[3, 0] = 10.0  # the first cluster's logit follows the first feature
    x = torch.randn(12, 6, dtype=torch.float64)
    x[:, 0] = {"all-in-the-shortlist": -1.0, "all-outside": 1.0, "mixed": torch.arange(12) % 2 - 0.5}[rows]
    head_first = ours.head(x).argmax(1) >= 3
    assert head_first.tolist() == (x[:, 0] > 0).tolist()
    prediction = ours.predict(x)
    assert torch.equal(prediction, theirs.predict(x))
    assert torch.equal(prediction, ours.log_prob(x).argmax(1))


@pytest.mark.parametrize("backend_name", ["cpp", "reference"])
def test_float64_gradcheck(backend_name):
    module, _ = make_pair(dict(in_features=6, n_classes=9, cutoffs=[3, 6], div_value=2.0, head_bias=True))
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    target = covering_target(9, [3, 6], 7)
    names, params = zip(*module.named_parameters())

    def outputs(x, *params):
        result = torch.func.functional_call(module, dict(zip(names, params)), (x, target))
        return tuple(result)

    with lossops.backend(backend_name):
        assert torch.autograd.gradcheck(outputs, (x, *(p.detach().requires_grad_() for p in params)))


def test_triton_float64_gradients_equal_the_gradchecked_cpp_ones():
    module, _ = make_pair(dict(in_features=6, n_classes=9, cutoffs=[3, 6], div_value=2.0, head_bias=True))
    names, params = zip(*module.named_parameters())
    target = covering_target(9, [3, 6], 7)

    def outputs(x, *params):
        return tuple(torch.func.functional_call(module, dict(zip(names, params)), (x, target)))

    inputs = [torch.randn(7, 6, dtype=torch.float64, requires_grad=True),
              *(p.detach().requires_grad_() for p in params)]
    assert_float64_gradients_match(outputs, inputs, "triton")


def raised(call):
    try:
        call()
    except Exception as e:  # noqa: BLE001 - which exception is what is compared
        return type(e), str(e)
    return None


@pytest.mark.parametrize("n_classes, cutoffs", [
    (10, []), (10, [0, 3]), (10, [-1, 3]), (10, [3, 2]), (10, [3, 3]), (10, [3, 10]), (10, [3, 9]), (10, [2.5, 4]),
    (10, (2, 5)), (10, range(1, 9)),
])
def test_cutoffs_are_checked_as_torch(n_classes, cutoffs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # width-0 projections
        ours = raised(lambda: lossops.nn.AdaptiveLogSoftmaxWithLoss(8, n_classes, cutoffs))
        assert ours == raised(lambda: torch.nn.AdaptiveLogSoftmaxWithLoss(8, n_classes, cutoffs))


@pytest.mark.parametrize("input_shape, target", [
    ((5, 8), torch.tensor([0, 1, 2, 3])),          # batch sizes differ
    ((5,), torch.tensor([0, 1, 2, 3, 4])),         # 1-D target, 1-D input
    ((5, 2, 8), torch.tensor([0, 1, 2, 3, 4])),    # 1-D target, 3-D input
    ((5, 8), torch.tensor(1)),                     # 0-d target, 2-D input
    ((), torch.tensor([1])),                       # 0-d input: torch's IndexError
    ((2, 8), torch.tensor([[0, 1]])),              # multi-target
    ((4, 7), torch.tensor([0, 1, 2, 3])),          # input features differ from in_features
    ((4, 8), torch.tensor([0, 1, -1, 3])),         # a target below 0
    ((4, 8), torch.tensor([0, 12, 2, 3])),         # a target at n_classes
    ((4, 8), torch.tensor([-3, 1, 2, 40])),        # both
    ((8,), torch.tensor(-1)),                      # unbatched, out of range
])
def test_bad_inputs_raise_as_torch(backend, input_shape, target):
    ours, theirs = make_pair(dict(in_features=8, n_classes=12, cutoffs=[4, 8]))
    x = torch.randn(input_shape, dtype=torch.float64)
    error = raised(lambda: ours(x, target))
    assert error is not None
    assert error == raised(lambda: theirs(x, target))


def test_floating_point_target_raises_a_runtime_error_as_torch():
    ours, theirs = make_pair(dict(in_features=8, n_classes=12, cutoffs=[4, 8]))
    x, target = torch.randn(3, 8, dtype=torch.float64), torch.tensor([0.0, 5.0, 9.0])
    assert raised(lambda: ours(x, target))[0] is raised(lambda: theirs(x, target))[0] is RuntimeError


def test_log_prob_and_predict_take_batches_only_as_torch():
    ours, theirs = make_pair(dict(in_features=8, n_classes=12, cutoffs=[4, 8]))
    x = torch.randn(8, dtype=torch.float64)
    for method in ("log_prob", "predict"):
        error = raised(lambda: getattr(ours, method)(x))
        assert error is not None and error == raised(lambda: getattr(theirs, method)(x)), method


def test_state_dict_loads_both_ways_and_attributes_match():
    config = CONFIGS["three-clusters-head-bias"]
    ours, theirs = make_pair(config, seed=3)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for name in ("in_features", "n_classes", "cutoffs", "div_value", "head_bias", "shortlist_size", "n_clusters",
                 "head_size"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert repr(ours) == repr(theirs)

    torch.manual_seed(4)
    trained = lossops.nn.AdaptiveLogSoftmaxWithLoss(**config, dtype=torch.float64)
    theirs.load_state_dict(trained.state_dict())
    x, target = torch.randn(6, 16, dtype=torch.float64), covering_target(20, [3, 9, 15], 6)
    torch.testing.assert_close(theirs(x, target).output, trained(x, target).output)
    torch.testing.assert_close(theirs.log_prob(x), trained.log_prob(x))


def test_reset_parameters_and_device_dtype_arguments():
    module = lossops.nn.AdaptiveLogSoftmaxWithLoss(16, 20, [3, 9], head_bias=True, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in module.parameters())
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    module.reset_parameters()
    for name, p in module.named_parameters():
        assert p.shape == before[name].shape and not torch.equal(p, before[name]), name

"""lossops.nn Modules check their arguments when torch's do: the same exception type, at the same moment.

torch.nn.HuberLoss refuses a delta that is not a float or int when it is constructed; the other losses only
turn size_average/reduce into a reduction then, and everything else (the reduction string included) is
checked by the functional op on the first call. Each row is one invalid (or borderline valid) argument; the
outcome is where it surfaced ("init", "call" or "ok") and the exception type, torch's being the expectation.
"""
import warnings

import numpy as np
import pytest
import torch

import lossops

N, C = 4, 5


def class_call():
    return torch.randn(N, C, requires_grad=True), torch.tensor([0, 1, 2, 3])


def elementwise_call():
    return torch.randn(N, C, requires_grad=True), torch.rand(N, C)


def probability_call():
    return torch.rand(N, C, requires_grad=True), torch.rand(N, C)


def ranking_call():
    return torch.randn(N, C, requires_grad=True), torch.randn(N, C, requires_grad=True), torch.rand(N, C).sign()


def label_lists_call():
    return torch.randn(N, C, requires_grad=True), torch.tensor([[0, 1, -1, 2, 2], [3, -1, 0, 0, 0], [4, 0, 1, 2, 3],
                                                                [-1, 0, 0, 0, 0]])


def cosine_call():
    return torch.randn(N, C, requires_grad=True), torch.randn(N, C, requires_grad=True), torch.rand(N).sign()


def triplet_call():
    return tuple(torch.randn(N, C, requires_grad=True) for _ in range(3))


def gaussian_call():
    return torch.randn(N, C, requires_grad=True), torch.randn(N, C), (torch.rand(N, C) + 0.1).requires_grad_()


def _tensor(*shape, dtype=torch.float32):
    return torch.ones(shape, dtype=dtype)


REDUCTIONS = [dict(reduction="avg"), dict(reduction="MEAN"), dict(reduction=None), dict(reduction=1),
              dict(size_average=torch.tensor([1, 2])), dict(size_average=False), dict(reduce=False)]
BUFFER_MISUSE = [[1.0] * C, 1.0, "a"]

ROWS = {
    "CrossEntropyLoss": (class_call, REDUCTIONS + [
        *(dict(weight=w) for w in BUFFER_MISUSE),
        dict(weight=_tensor(C, dtype=torch.int64)), dict(weight=_tensor(C, dtype=torch.bool)),
        dict(weight=_tensor(C, dtype=torch.complex64)), dict(weight=_tensor(C, dtype=torch.float64)),
        dict(weight=_tensor(C + 1)), dict(weight=_tensor(1, C)),
        dict(ignore_index=1.5), dict(ignore_index="a"), dict(ignore_index=None), dict(ignore_index=True),
        dict(ignore_index=2 ** 70), dict(ignore_index=torch.tensor(1.5)), dict(ignore_index=torch.tensor([1, 2])),
        dict(ignore_index=torch.tensor(1)), dict(ignore_index=np.int64(2)), dict(ignore_index=np.float64(1.0)),
        dict(label_smoothing=1.5), dict(label_smoothing="0.1"), dict(label_smoothing="a"), dict(label_smoothing=None),
        dict(label_smoothing=1 + 0j), dict(label_smoothing=[0.1]), dict(label_smoothing=torch.tensor([0.1, 0.2])),
        dict(label_smoothing=torch.tensor(1.5)), dict(label_smoothing=torch.tensor(0.1)),
        dict(label_smoothing=np.float32(0.1)), dict(label_smoothing=True),
    ]),
    "BCEWithLogitsLoss": (elementwise_call, REDUCTIONS + [
        *(dict(weight=w) for w in BUFFER_MISUSE), *(dict(pos_weight=w) for w in BUFFER_MISUSE),
        dict(weight=_tensor(C + 1)), dict(weight=_tensor(C, dtype=torch.complex64)),
        dict(weight=_tensor(C, dtype=torch.int64)), dict(weight=_tensor(C, dtype=torch.bool)),
        dict(weight=_tensor(C, dtype=torch.float64)),
        dict(pos_weight=_tensor(C + 1)), dict(pos_weight=_tensor(C, dtype=torch.complex64)),
        dict(pos_weight=_tensor(C, dtype=torch.bool)), dict(pos_weight=_tensor(C, dtype=torch.int64)),
    ]),
    "SmoothL1Loss": (elementwise_call, REDUCTIONS + [
        dict(beta=-1.0), dict(beta=-1), dict(beta=float("nan")), dict(beta="a"), dict(beta="0.5"), dict(beta=None),
        dict(beta=1 + 0j), dict(beta=[1.0]), dict(beta=torch.tensor([1.0, 2.0])), dict(beta=torch.tensor(-1.0)),
        dict(beta=torch.tensor(0.5)), dict(beta=np.float64(0.5)), dict(beta=float("inf")), dict(beta=True),
        dict(beta=0),
    ]),
    "HuberLoss": (elementwise_call, [r for r in REDUCTIONS if "reduction" in r] + [
        dict(delta=1 + 0j), dict(delta="a"), dict(delta=None), dict(delta=[1.0]), dict(delta=torch.tensor(1.0)),
        dict(delta=np.float32(0.5)), dict(delta=np.int64(2)), dict(delta=np.float64(0.5)),
        dict(delta=-1.0), dict(delta=0.0), dict(delta=0), dict(delta=-2), dict(delta=float("nan")),
        dict(delta=float("inf")), dict(delta=True),
    ]),
    "BCELoss": (probability_call, REDUCTIONS + [
        *(dict(weight=w) for w in BUFFER_MISUSE),
        dict(weight=_tensor(C + 1)), dict(weight=_tensor(C, dtype=torch.complex64)),
        dict(weight=_tensor(C, dtype=torch.int64)), dict(weight=_tensor(C, dtype=torch.bool)),
        dict(weight=_tensor(C, dtype=torch.float64)), dict(weight=_tensor(N, 1)), dict(weight=_tensor(2, N, C)),
    ]),
    "NLLLoss": (class_call, REDUCTIONS + [
        *(dict(weight=w) for w in BUFFER_MISUSE),
        dict(weight=_tensor(C, dtype=torch.int64)), dict(weight=_tensor(C, dtype=torch.bool)),
        dict(weight=_tensor(C, dtype=torch.float64)), dict(weight=_tensor(C + 1)), dict(weight=_tensor(1, C)),
        dict(ignore_index=1.5), dict(ignore_index="a"), dict(ignore_index=None), dict(ignore_index=True),
        dict(ignore_index=2 ** 70), dict(ignore_index=torch.tensor(1)), dict(ignore_index=np.int64(2)),
    ]),
    "SoftMarginLoss": (elementwise_call, REDUCTIONS),
    "HingeEmbeddingLoss": (elementwise_call, REDUCTIONS + [
        dict(margin=m) for m in ("a", "0.5", None, 1 + 0j, [1.0], torch.tensor(1.0), torch.tensor([1.0, 2.0]),
                                 np.float32(0.5), np.int64(2), True, 1, -1.0, float("nan"), float("inf"))
    ]),
    "PoissonNLLLoss": (elementwise_call, REDUCTIONS + [
        *(dict(log_input=v) for v in ("a", None, 1, 2, 0.5, np.bool_(True), torch.tensor(True))),
        *(dict(full=v) for v in ("a", None, 1, 0.5, np.bool_(False), torch.tensor(True))),
        *(dict(eps=v) for v in ("a", None, 1, -1.0, float("nan"), [1e-3], torch.tensor(1e-3),
                                torch.tensor([1e-3, 1.0]), np.float64(1e-3), True)),
    ]),
    "MarginRankingLoss": (ranking_call, REDUCTIONS + [
        dict(margin=m) for m in ("a", "0.5", None, 1 + 0j, [1.0], torch.tensor(1.0), torch.tensor([1.0, 2.0]),
                                 np.float32(0.5), np.int64(2), True, 1, -1.0, float("nan"), float("inf"))
    ]),
    "CosineEmbeddingLoss": (cosine_call, REDUCTIONS + [
        dict(margin=m) for m in ("a", "0.5", None, 1 + 0j, [1.0], torch.tensor(1.0), torch.tensor([1.0, 2.0]),
                                 np.float32(0.5), np.int64(2), True, 1, -1.0, float("nan"), float("inf"))
    ]),
    "TripletMarginLoss": (triplet_call, REDUCTIONS + [
        *(dict(margin=m) for m in ("a", "0.5", None, 1 + 0j, [1.0], torch.tensor(1.0), torch.tensor([1.0, 2.0]),
                                   np.float32(0.5), np.int64(2), True, 1, 0, 0.0, -1.0, float("nan"), float("inf"))),
        *(dict(p=v) for v in ("a", None, 1, 1.5, 0, -1.0, float("nan"), float("inf"), torch.tensor(2.0), True)),
        *(dict(eps=v) for v in ("a", None, 0, -1.0, float("nan"), torch.tensor(1e-3), np.float64(1e-3))),
        *(dict(swap=v) for v in ("a", None, 1, 0.5, np.bool_(True), torch.tensor(True), True)),
    ]),
    "TripletMarginWithDistanceLoss": (triplet_call, [r for r in REDUCTIONS if "reduction" in r] + [
        *(dict(margin=m) for m in ("a", "0.5", None, 1 + 0j, [1.0], torch.tensor(1.0), torch.tensor([1.0, 2.0]),
                                   np.float32(0.5), np.int64(2), True, 1, 0, -1.0, float("nan"), float("inf"))),
        *(dict(swap=v) for v in ("a", None, 1, np.bool_(True), torch.tensor(True), True)),
        *(dict(distance_function=f) for f in (None, "a", torch.nn.PairwiseDistance(p=1.0), torch.pairwise_distance,
                                              torch.nn.PairwiseDistance(keepdim=True),
                                              lambda x, y: (x - y).abs().sum(-1))),
    ]),
    "GaussianNLLLoss": (gaussian_call, [r for r in REDUCTIONS if "reduction" in r] + [
        *(dict(full=v) for v in ("a", None, 1, 0.5, np.bool_(False), torch.tensor(True))),
        *(dict(eps=v) for v in ("a", None, 1, -1.0, float("nan"), [1e-3], torch.tensor(1e-3),
                                torch.tensor([1e-3, 1.0]), np.float64(1e-3), True)),
    ]),
    "MultiLabelSoftMarginLoss": (elementwise_call, REDUCTIONS + [
        *(dict(weight=w) for w in BUFFER_MISUSE),
        dict(weight=_tensor(C + 1)), dict(weight=_tensor(C, dtype=torch.complex64)),
        dict(weight=_tensor(C, dtype=torch.int64)), dict(weight=_tensor(C, dtype=torch.bool)),
        dict(weight=_tensor(C, dtype=torch.float64)), dict(weight=_tensor(N, 1)), dict(weight=_tensor(2, N, C)),
    ]),
    "MultiMarginLoss": (class_call, REDUCTIONS + [
        *(dict(weight=w) for w in BUFFER_MISUSE),
        dict(weight=_tensor(C, dtype=torch.int64)), dict(weight=_tensor(C, dtype=torch.bool)),
        dict(weight=_tensor(C, dtype=torch.float64)), dict(weight=_tensor(C + 1)), dict(weight=_tensor(1, C)),
        *(dict(p=v) for v in (3, 0, 2.0, 1.5, "a", None, True, np.int64(2), torch.tensor(2))),
        # torch registers the weight buffer before it checks p: a list weight is a TypeError there
        dict(weight=[0.1, 0.2], p=3), dict(weight=_tensor(2, C), p=3),
        *(dict(margin=m) for m in ("a", "0.5", None, 1 + 0j, [1.0], torch.tensor(1.0), torch.tensor([1.0, 2.0]),
                                   np.float32(0.5), np.int64(2), True, 1, -1.0, float("nan"), float("inf"))),
    ]),
    "MultiLabelMarginLoss": (label_lists_call, REDUCTIONS),
    "L1Loss": (elementwise_call, REDUCTIONS),
    "MSELoss": (elementwise_call, REDUCTIONS),
    "KLDivLoss": (elementwise_call, REDUCTIONS + [
        dict(reduction="batchmean"), dict(log_target=True), dict(log_target=1), dict(log_target=None),
        dict(log_target="a"), dict(reduction="batchmean", size_average=False),
    ]),
}


def _describe(value):
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}-{str(value.dtype)[6:]}"
    if callable(value) and hasattr(value, "__name__"):  # functions: by name (their repr holds an address)
        return value.__name__
    return repr(value)


CASES = [pytest.param(name, kwargs, id=f"{name}-" + ",".join(f"{k}={_describe(v)}" for k, v in kwargs.items()))
         for name, (_, rows) in ROWS.items() for kwargs in rows]


def outcome(cls, kwargs, make_call):
    """Where an argument is refused ("init", "call") or "ok", and the exception type."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # size_average/reduce are deprecated (both warn alike)
        try:
            module = cls(**kwargs)
        except Exception as e:  # noqa: BLE001 - which exception is what is compared
            return "init", type(e)
        try:
            module(*make_call()).sum().backward()
        except Exception as e:  # noqa: BLE001
            return "call", type(e)
    return "ok", None


@pytest.mark.parametrize("name, kwargs", CASES)
def test_same_exception_at_the_same_moment_as_torch(backend, name, kwargs):
    make_call = ROWS[name][0]
    theirs = outcome(getattr(torch.nn, name), kwargs, make_call)
    ours = outcome(getattr(lossops.nn, name), kwargs, make_call)
    assert ours == theirs, f"torch: {theirs}, lossops: {ours}"


# Values torch accepts without a word that lossops refuses on purpose (see tests/test_bad_inputs.py): refused
# when called, the moment torch checks the argument's neighbours.
OURS_ONLY = [("CrossEntropyLoss", dict(label_smoothing=-0.1)), ("CrossEntropyLoss", dict(label_smoothing=float("nan")))]


@pytest.mark.parametrize("name, kwargs", OURS_ONLY, ids=[f"{n}-{k}" for n, k in OURS_ONLY])
def test_stricter_checks_also_wait_for_the_call(backend, name, kwargs):
    assert outcome(getattr(torch.nn, name), kwargs, ROWS[name][0]) == ("ok", None)
    assert outcome(getattr(lossops.nn, name), kwargs, ROWS[name][0]) == ("call", RuntimeError)


def test_every_module_with_a_torch_counterpart_is_covered():
    ours = {name for name in dir(lossops.nn) if isinstance(getattr(lossops.nn, name), type)
            and issubclass(getattr(lossops.nn, name), torch.nn.Module) and not name.startswith("_")}
    # LinearCrossEntropyLoss, CTCLoss and AdaptiveLogSoftmaxWithLoss take other inputs than these rows:
    # test_linear_cross_entropy.py, test_ctc.py and test_adaptive_log_softmax.py check them against torch's Modules.
    counterparts = {name for name in ours if hasattr(torch.nn, name)} - {"LinearCrossEntropyLoss", "CTCLoss",
                                                                          "AdaptiveLogSoftmaxWithLoss"}
    assert counterparts == set(ROWS)

"""The Triton kernels' multi-block path, under the interpreter with the GPU's block cap: rows longer than one block
are looped over with an online logsumexp, the last block partly masked. Each case is checked against torch in
float64 on the same values (loss and gradient)."""
import pytest
import torch
import torch.nn.functional as F

import lossops
from lossops.triton_kernels.common import MAX_BLOCK, launch_config

D64 = torch.float64
# Three float32 blocks, the last one 1/4 full; float64 tiles are smaller (launch_config), so this is many of them.
CLASSES = 2 * MAX_BLOCK + MAX_BLOCK // 4 + 3


def test_rows_span_several_blocks_with_a_partial_last_one():
    for acc in (torch.float32, D64):
        block = launch_config(CLASSES, acc=acc)["BLOCK"]
        assert CLASSES > 2 * block and CLASSES % block != 0


def _batch(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, dtype=D64, generator=g) * 4).to(dtype)
    classes = shape[1]
    t = torch.randint(0, classes, shape[:1] + shape[2:], generator=g)
    t.view(-1)[0] = -100
    # Targets in the last, partly masked block and on its last column, where a masking error would show.
    t.view(-1)[1] = classes - 1
    t.view(-1)[-1] = classes - 5
    return x, t


def _loss_and_grad(fn, x, *args, **kwargs):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, *args, **kwargs)
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (grad,) = torch.autograd.grad(loss, x, upstream)
    return loss.detach(), grad


def _capped_cross_entropy(x, t, softcap=None, **kwargs):
    z = x if softcap is None else softcap * torch.tanh(x / softcap)
    return F.cross_entropy(z, t, **kwargs)


@pytest.mark.parametrize("layout", ["rows", "class-dim-1"])
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1, weight=True), dict(softcap=20.0)],
                         ids=["plain", "smoothing-weight", "softcap"])
@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_cross_entropy_multi_block(layout, options, dtype):
    shape = (3, CLASSES) if layout == "rows" else (2, CLASSES, 2)
    x, t = _batch(shape, dtype)
    options = dict(options)
    if options.pop("weight", False):
        options["weight"] = torch.linspace(0.5, 2.0, CLASSES, dtype=D64)
    with lossops.backend("triton"):
        ours = _loss_and_grad(lossops.cross_entropy, x, t, reduction="none",
                              **{k: v.to(dtype) if torch.is_tensor(v) else v for k, v in options.items()})
    truth = _loss_and_grad(_capped_cross_entropy, x.to(D64), t, reduction="none", **options)
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for got, expected in zip(ours, truth):
        torch.testing.assert_close(got.to(D64), expected, **tolerance)


def test_probability_targets_multi_block():
    x, _ = _batch((2, CLASSES), torch.float32)
    q = torch.rand((2, CLASSES), dtype=D64).softmax(1)
    with lossops.backend("triton"):
        ours = _loss_and_grad(lossops.cross_entropy, x, q.float(), reduction="none", label_smoothing=0.05)
    truth = _loss_and_grad(F.cross_entropy, x.to(D64), q, reduction="none", label_smoothing=0.05)
    for got, expected in zip(ours, truth):
        torch.testing.assert_close(got.to(D64), expected, rtol=1e-5, atol=1e-6)


def test_softmax_focal_multi_block():
    x, t = _batch((3, CLASSES), torch.float32)
    gamma = 1.5

    def focal(z, target):
        keep = target != -100
        log_p = z.log_softmax(1).gather(1, torch.where(keep, target, 0)[:, None])[:, 0]
        return torch.where(keep, -(1 - log_p.exp()) ** gamma * log_p, 0)

    with lossops.backend("triton"):
        ours = _loss_and_grad(lossops.softmax_focal_loss, x, t, gamma=gamma, reduction="none")
    truth = _loss_and_grad(focal, x.to(D64), t)
    for got, expected in zip(ours, truth):
        torch.testing.assert_close(got.to(D64), expected, rtol=1e-5, atol=1e-6)


# --- several rows per program ---------------------------------------------------------------------------------------

def _one_row_per_program(monkeypatch):
    """Makes the cross-entropy row kernels launch one row per program, as they did before ROWS existed."""
    from lossops.triton_kernels import cross_entropy as ce

    def single_rows(*args, **kwargs):
        config = launch_config(*args, **kwargs)
        if "ROWS" in config:
            config["ROWS"] = 1
        return config
    monkeypatch.setattr(ce, "launch_config", single_rows)


def _row_kernel_outputs(x, target, weight, **options):
    """Every output of the three row-kernel routes: the forward with a separate and an in-place gradient, and the
    family route's forward and backward (saved state included)."""
    from lossops.triton_kernels import cross_entropy as ce
    acc = D64 if x.dtype == D64 else torch.float32
    common = dict(target=target, weight=weight, ignore_index=-100, **options)
    grad = torch.empty_like(x)
    outputs = list(ce.cross_entropy(input=x, grad=grad, grad_scale=torch.tensor(0.75, dtype=acc), **common))
    in_place = x.clone()
    outputs += ce.cross_entropy(input=in_place, grad=in_place, grad_scale=torch.tensor(0.75, dtype=acc), **common)
    loss, state = ce.cross_entropy_forward(input=x, reduction="mean", weighted_mean=True, **common)
    route_grad = torch.empty_like(x)
    ce.cross_entropy_backward(input=x, grad=route_grad, state=state, grad_loss=torch.tensor(1.25, dtype=acc),
                              reduction="mean", **common)
    return outputs + [grad, in_place, loss, state, route_grad]


def _row_case(case, classes):
    dtype = D64 if case == "float64" else torch.float32
    acc = D64 if dtype == D64 else torch.float32
    rows_per_program = launch_config(classes, acc=acc, gather=case == "class-dim-1", rows=True)["ROWS"]
    # Two programs, the second partly filled.
    shape = (2, classes, 2 * rows_per_program // 3 + 1) if case == "class-dim-1" else (rows_per_program + 3, classes, 1)
    x, target = _batch(shape, dtype, seed=classes)
    target = target.reshape(-1)
    weight = None
    options = dict(label_smoothing=0.0, lse_square_scale=0.0, softcap=None, focal_gamma=None)
    if case == "index-options":
        weight = torch.linspace(0.5, 2.0, classes, dtype=acc)
        options.update(label_smoothing=0.1, lse_square_scale=1e-3, softcap=3.0)
    elif case == "focal":
        weight = torch.linspace(0.5, 2.0, classes, dtype=acc)
        options.update(focal_gamma=2.0)
    elif case == "probabilities":
        target = torch.rand(shape, dtype=D64, generator=torch.Generator().manual_seed(1)).softmax(1).to(dtype)
        options.update(label_smoothing=0.1, softcap=3.0)
    return rows_per_program, x, target, weight, options


@pytest.mark.parametrize("classes", [10, 100])
@pytest.mark.parametrize("case", ["index", "index-options", "focal", "probabilities", "class-dim-1", "float64"])
def test_several_rows_per_program_match_one_row_per_program(monkeypatch, classes, case):
    """A small class count takes several rows per program (launch_config's ROWS), the last program partly filled;
    every output is the same, to the bit, as with one row per program."""
    rows_per_program, x, target, weight, options = _row_case(case, classes)
    assert rows_per_program > 1
    several = _row_kernel_outputs(x, target, weight, **options)
    _one_row_per_program(monkeypatch)
    single = _row_kernel_outputs(x, target, weight, **options)
    assert len(several) == len(single)
    for a, b in zip(several, single):
        assert a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_several_rows_per_program_flag_an_invalid_target(monkeypatch):
    """An out-of-range target in a program's block of rows raises the same error as with one row per program, and
    the in-place gradient leaves the logits as they were."""
    _, x, target, weight, options = _row_case("index", 10)
    target[5] = 13

    def error_and_logits():
        logits = x.clone()
        with pytest.raises(IndexError) as error:
            _row_kernel_outputs(logits, target, weight, **options)
        from lossops.triton_kernels import cross_entropy as ce
        with pytest.raises(IndexError):
            ce.cross_entropy(input=logits, grad=logits, grad_scale=torch.tensor(1.0), target=target, weight=weight,
                             ignore_index=-100, **options)
        assert torch.equal(logits, x)
        return str(error.value)

    several = error_and_logits()
    assert "13" in several
    _one_row_per_program(monkeypatch)
    assert error_and_logits() == several

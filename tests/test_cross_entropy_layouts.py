"""Cross-entropy over the layouts and row counts that decide how the C++ kernel vectorises: rows of few classes
(one row per SIMD lane, groups of 16-32 rows with a ragged last group), class-dim-1 layouts read in place,
(N, C) rows transposed in register blocks, longer rows one at a time, and strided views of each, on every ISA
build this CPU runs."""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lossops
from _cases import ISA_ORDER, forced_isa, isa_available, lowp_error_no_worse

ISAS = [isa for isa in ISA_ORDER if isa_available(isa)]


# Each maker draws the same float64 values for a given seed and lays them out in `dtype`.
def _contiguous(shape, dtype):
    return (torch.randn(*shape, dtype=torch.float64) * 3).to(dtype)


def _channels_last(shape, dtype):  # lanes strided by C, classes contiguous
    return _contiguous(shape, dtype).contiguous(memory_format=torch.channels_last)


def _class_sliced(shape, dtype):  # (N, C) rows inside wider rows
    return _contiguous((shape[0], shape[1] + 5, *shape[2:]), dtype)[:, 2:2 + shape[1]]


def _class_major(shape, dtype):  # (N, C) logits stored as (C, N): every class's rows contiguous
    return _contiguous((shape[1], shape[0]), dtype).t()


LAYOUTS = {"contiguous": _contiguous, "channels_last": _channels_last, "class_sliced": _class_sliced,
           "class_major": _class_major}
# Row counts on both sides of the lane groups (8, 16, 32 rows per group across the ISA builds and dtypes).
# Rows either side of the lane kernel's class limits, and long rows.
SHAPES = [(1, 3), (7, 2), (31, 10), (33, 10), (23, 47), (21, 48), (65, 100), (40, 101), (9, 161), (19, 700),
          (3, 5, 33), (2, 21, 9, 11), (2, 7, 4, 4)]
OPTIONS = [{}, {"label_smoothing": 0.15}, {"weight": True}, {"weight": True, "label_smoothing": 0.1},
           {"reduction": "none"}, {"reduction": "sum", "lse_square_scale": 0.01}, {"softcap": 4.0}]


def _cases():
    for shape in SHAPES:
        for layout, make in LAYOUTS.items():
            if layout == "channels_last" and len(shape) != 4 or layout == "class_major" and len(shape) != 2:
                continue
            yield pytest.param(shape, layout, id=f"{'x'.join(map(str, shape))}-{layout}")


def _torch_loss(x, t, opts, weight):
    """torch's cross_entropy plus the lossops extras, written out: z-loss (lse^2 per counted row) and softcap."""
    logits = opts["softcap"] * torch.tanh(x / opts["softcap"]) if "softcap" in opts else x
    reduction = opts.get("reduction", "mean")
    loss = F.cross_entropy(logits, t, weight=weight, label_smoothing=opts.get("label_smoothing", 0.0),
                           reduction=reduction)
    if "lse_square_scale" in opts:
        lse = torch.logsumexp(logits, dim=1)
        loss = loss + opts["lse_square_scale"] * (lse.square() * (t != -100)).sum()
    return loss


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape,layout", list(_cases()))
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_matches_torch_in_float32_and_float64(isa, shape, layout, options):
    seed = sum(shape) * 7 + len(layout)
    C = shape[1]
    torch.manual_seed(seed)
    target = torch.randint(0, C, (shape[0],) + tuple(shape[2:]))
    target.view(-1)[::4] = -100
    weight64 = torch.rand(C, dtype=torch.float64) + 0.2 if options.get("weight") else None
    extras = {k: v for k, v in options.items() if k != "weight"}
    torch.manual_seed(seed)
    x64 = LAYOUTS[layout](shape, torch.float64).requires_grad_()
    truth = _torch_loss(x64, target, options, weight64)
    truth.sum().backward()
    with forced_isa(isa):
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
            torch.manual_seed(seed)
            x = LAYOUTS[layout](shape, dtype).requires_grad_()
            assert x.stride() == x64.stride()
            w = None if weight64 is None else weight64.to(dtype)
            loss = lossops.cross_entropy(x, target, weight=w, **extras)
            loss.sum().backward()
            assert_close(loss.double(), truth.detach(), rtol=tol, atol=tol, equal_nan=True)  # all ignored: nan
            assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol * 0.1)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,layout", [((33, 10), "contiguous"), ((40, 101), "class_sliced"),
                                          ((2, 21, 9, 11), "contiguous"), ((2, 21, 9, 11), "channels_last"),
                                          ((33, 10), "class_major")])
def test_low_precision_error_no_worse_than_torch(isa, dtype, shape, layout):
    torch.manual_seed(3)
    C = shape[1]
    x_low = LAYOUTS[layout](shape, dtype)
    target = torch.randint(0, C, (shape[0],) + tuple(shape[2:]))
    x64 = x_low.double().requires_grad_()
    truth = F.cross_entropy(x64, target, reduction="none")
    truth.sum().backward()
    x_torch = x_low.detach().requires_grad_()
    theirs = F.cross_entropy(x_torch, target, reduction="none")
    theirs.sum().backward()
    with forced_isa(isa):
        x = x_low.detach().requires_grad_()
        ours = lossops.cross_entropy(x, target, reduction="none")
        ours.sum().backward()
    lowp_error_no_worse(ours, theirs, truth, "loss")
    lowp_error_no_worse(x.grad, x_torch.grad, x64.grad, "gradient")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", [(37, 10), (37, 100), (3, 6, 35)])
def test_non_finite_logits_stay_in_their_row(isa, shape):
    """A NaN row is NaN and an ignored NaN row is 0, without touching the other lanes of its group; -inf at a
    non-target class is a probability of 0."""
    torch.manual_seed(5)
    C = shape[1]
    x = torch.randn(*shape)
    target = torch.randint(1, C, (shape[0],) + tuple(shape[2:]))
    rows = x.movedim(1, -1).reshape(-1, C)  # a copy: edit, then move back
    flat_target = target.reshape(-1)
    rows[3, 2] = float("nan")
    rows[5, 1] = float("nan")
    flat_target[5] = -100
    rows[7, 0] = float("-inf")
    x = rows.reshape(*[shape[0], *shape[2:], C]).movedim(-1, 1).contiguous().requires_grad_()
    with forced_isa(isa):
        loss = lossops.cross_entropy(x, target, reduction="none")
        loss.sum().backward()
    per_row = loss.reshape(-1)
    grad_rows = x.grad.movedim(1, -1).reshape(-1, C)
    assert per_row[3].isnan() and grad_rows[3].isnan().all()
    assert per_row[5] == 0 and (grad_rows[5] == 0).all()
    keep = torch.ones(per_row.numel(), dtype=torch.bool)
    keep[[3, 5]] = False
    reference = F.cross_entropy(x.detach().movedim(1, -1).reshape(-1, C)[keep], flat_target[keep], reduction="none")
    assert_close(per_row[keep], reference)
    assert grad_rows[7, 0] == 0 and torch.isfinite(grad_rows[keep]).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape,dtype", [((65543, 40), torch.float32), ((65543, 80), torch.bfloat16),
                                         ((32771, 100), torch.float32),
                                         ((3, 21, 181, 191), torch.float32), ((3, 21, 181, 383), torch.bfloat16)])
def test_gradient_reused_from_the_previous_step(isa, shape, dtype):
    """Gradients of 8 MiB or more come from the kept buffer from the second call on, and are then written with
    non-temporal stores: the second step must be as right as the first."""
    torch.manual_seed(11)
    C = shape[1]
    x = torch.randn(*shape).to(dtype).requires_grad_()
    target = torch.randint(0, C, (shape[0],) + tuple(shape[2:]))
    target.view(-1)[::5] = -100
    x64 = x.detach().double().requires_grad_()
    F.cross_entropy(x64, target, label_smoothing=0.1).backward()
    with forced_isa(isa):
        grads, buffers = [], []
        for _ in range(2):
            (grad,) = torch.autograd.grad(lossops.cross_entropy(x, target, label_smoothing=0.1), x)
            grads.append(grad.clone())
            buffers.append(grad.data_ptr())
            del grad  # back to the kept buffer for the next step
    assert buffers[0] == buffers[1]  # the second step did write into the kept (resident) buffer
    tol = 1e-7 if dtype == torch.float32 else 2e-3
    for grad in grads:
        assert_close(grad.double(), x64.grad, rtol=0.02, atol=tol)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", [(64, 1), (40, 7), (3, 40), (37, 300), (2, 5, 33)])
def test_certain_rows_have_loss_exactly_zero(isa, shape):
    """A row whose target holds all the probability (one class, or every other logit -inf or far below) has
    loss 0 and gradient 0, exactly, as in torch: e^0 must be exactly 1 in the fast exponential."""
    C = shape[1]
    x = torch.full(shape, -200.0)
    target = torch.randint(0, C, (shape[0],) + tuple(shape[2:]))
    if C > 2:
        x.select(1, 1).fill_(float("-inf"))
    x.scatter_(1, target.unsqueeze(1), 0.0)
    x.requires_grad_()
    with forced_isa(isa):
        loss = lossops.cross_entropy(x, target, reduction="none")
        (grad,) = torch.autograd.grad(loss.sum(), x)
    assert (F.cross_entropy(x.detach(), target, reduction="none") == 0).all()  # torch's own answer
    assert (loss == 0).all(), loss.max()
    assert (grad == 0).all(), grad.abs().max()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 100), (19, 700)])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "weight": True}, {"softcap": 3.0}],
                         ids=["plain", "smoothing-weight", "softcap"])
def test_in_place_equals_out_of_place(isa, dtype, shape, options):
    """Writing the gradient over the logits gives the out-of-place gradient exactly: every row is read (and its
    target's logit taken) before it is overwritten."""
    torch.manual_seed(13)
    C = shape[1]
    x0 = (torch.randn(*shape) * 4).to(dtype)
    target = torch.randint(0, C, (shape[0],))
    target[::6] = -100
    kwargs = {k: v for k, v in options.items() if k != "weight"}
    if options.get("weight"):
        kwargs["weight"] = (torch.rand(C) + 0.5).to(dtype)
    with forced_isa(isa):
        out_of_place = x0.clone().requires_grad_()
        (grad,) = torch.autograd.grad(lossops.cross_entropy(out_of_place, target, **kwargs), out_of_place)
        leaf = x0.clone().requires_grad_()
        logits = leaf * 1  # a non-leaf the in-place gradient may overwrite
        (in_place,) = torch.autograd.grad(lossops.cross_entropy(logits, target, inplace_backward=True, **kwargs), leaf)
    assert torch.equal(in_place, grad)


# (rows, C) or (N, C, d): one exponential block, several (the last block holding the row's max, so each block's
# exponentials have their own ref), a row past the exponential cache, and classes strided over a trailing dimension.
RESUMED_SHAPES = [(9, 700), (5, 5000), (2, 140000), (3, 2500, 4)]
RESUMED_OPTIONS = {
    "plain": {},
    "smoothing-weight-ignored": {"label_smoothing": 0.2, "weight": True, "ignore": True},
    "softcap-z-loss": {"softcap": 6.0, "lse_square_scale": 1e-3},
    "probabilities": {"probabilities": True, "label_smoothing": 0.1},
}


def _resumed_case(shape, dtype, options):
    gen = torch.Generator().manual_seed(5)
    C = shape[1]
    x0 = torch.randn(*shape, generator=gen) * 4
    x0.select(1, C - 1).add_(25.0)  # the last block holds each row's max: the earlier blocks' refs are below it
    x0 = x0.to(dtype)
    item_shape = shape[:1] + shape[2:]
    if options.get("probabilities"):
        target = torch.rand(*shape, generator=gen).softmax(1).to(dtype)
    else:
        target = torch.randint(0, C, item_shape, generator=gen)
        if options.get("ignore"):
            target.view(-1)[::3] = -100
    weight = (torch.rand(C, generator=gen) + 0.5).to(dtype) if options.get("weight") else None
    return x0, target, weight


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", RESUMED_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("options", RESUMED_OPTIONS.values(), ids=RESUMED_OPTIONS.keys())
def test_in_place_gradient_resumed_from_row_state_equals_out_of_place(isa, dtype, shape, options):
    """With inplace_backward=True the forward saves each row's statistics and backward writes the gradient from them
    in one read of the row: loss and gradient have the out-of-place bits (grad_output 1, which out of place is a
    second multiply) for every option, several exponential blocks, rows past the exponential cache and strided
    classes, on the C++ eager route and the custom op."""
    x0, target, weight = _resumed_case(shape, dtype, options)
    kwargs = {k: options[k] for k in ("label_smoothing", "softcap", "lse_square_scale") if k in options}

    def loss_fn(x, **kw):
        return lossops.cross_entropy(x, target, weight, **kwargs, **kw)
    with forced_isa(isa):
        out_of_place = x0.clone().requires_grad_()
        loss = loss_fn(out_of_place)
        (grad,) = torch.autograd.grad(loss, out_of_place)
        leaf = x0.clone().requires_grad_()
        logits = leaf * 1
        in_place_loss = loss_fn(logits, inplace_backward=True)
        assert torch.equal(logits.detach(), x0)
        (in_place,) = torch.autograd.grad(in_place_loss, leaf)
    assert torch.equal(in_place_loss, loss)
    assert torch.equal(in_place, grad)
    assert torch.equal(logits.detach(), grad)


def _kernel_call(x3, target, grad=None, row_state=None, focal_gamma=None):
    return lossops._backend.kernel("cpp", "cross_entropy", "cross_entropy")(
        input=x3, target=target, weight=None, grad=grad, ignore_index=-100, label_smoothing=0.0, lse_square_scale=0.0,
        softcap=None, focal_gamma=focal_gamma, grad_scale=torch.tensor(1.0), row_state=row_state)


@pytest.mark.parametrize("C, blocks", [(700, 1), (5000, 3), (140000, 0)])
@pytest.mark.parametrize("focal_gamma", [None, 2.0], ids=["cross_entropy", "focal"])
def test_row_state_is_saved_and_resumed_from(C, blocks, focal_gamma):
    """The kernel's row state: a forward without a gradient fills rows x (4 + exponential blocks) values (max and
    log-sum first); a call with the gradient buffer and that state writes the one-pass gradient's bits from it,
    computes no loss, and follows the state (a larger log-sum divides every probability)."""
    torch.manual_seed(0)
    x3 = torch.randn(3, C, 1) * 3
    x3[:, -1] += 20.0
    target = torch.randint(0, C, (3,))
    state = torch.empty(0)
    _kernel_call(x3, target, row_state=state, focal_gamma=focal_gamma)
    width = 4 + blocks
    assert state.shape == (3 * width,)
    assert_close(state[0::width] + state[1::width], torch.logsumexp(x3[..., 0], 1))
    expected, resumed = torch.empty_like(x3), torch.empty_like(x3)
    _kernel_call(x3, target, grad=expected, focal_gamma=focal_gamma)
    result = _kernel_call(x3, target, grad=resumed, row_state=state, focal_gamma=focal_gamma)
    assert torch.equal(resumed, expected)
    assert result[0].numel() == 0 and result[1].numel() == 0 and result[2].isnan()
    if focal_gamma is None:
        state[1::width] += 1.0
        _kernel_call(x3, target, grad=resumed, row_state=state)
        softmax = torch.softmax(x3[..., 0], 1)
        assert_close(resumed[..., 0] + F.one_hot(target, C), softmax / torch.e)


def test_lane_rows_save_no_state_and_backward_runs_the_whole_kernel():
    """Rows the lane kernel serves (few classes) save nothing; an empty state with the gradient buffer is the plain
    call, so in-place backward over them still gets the whole kernel's gradient."""
    x3 = torch.randn(8, 10, 1)
    target = torch.randint(0, 10, (8,))
    state = torch.empty(0)
    _kernel_call(x3, target, row_state=state)
    assert state.numel() == 0
    expected, got = torch.empty_like(x3), torch.empty_like(x3)
    _kernel_call(x3, target, grad=expected)
    loss, _, total = _kernel_call(x3, target, grad=got, row_state=state)
    assert torch.equal(got, expected) and loss.shape == (8,) and total.isfinite()

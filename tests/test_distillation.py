"""distillation_loss against the plain torch formulas (log_softmax and F.kl_div, written out independently here):
values and the student's gradient on every backend, for every divergence and option; the teacher's gradient;
float64 gradcheck; bf16 against a float64 truth; extreme logits; ignored tokens; bad arguments."""
import math

import pytest
import torch
import torch.nn.functional as F

import lossops

DIVERGENCES = ["forward_kl", "reverse_kl", "tvd", "jsd"]
OPTIONS = [dict(), dict(temperature=2.5), dict(hard_weight=0.7, soft_weight=0.4), dict(reduction="sum"),
           dict(reduction="none", temperature=0.5, hard_weight=1.0), dict(beta=0.2), dict(beta=0.0), dict(beta=1.0),
           dict(ignore_index=3, reduction="none")]


def torch_formula(student, teacher, target=None, divergence="forward_kl", beta=0.5, temperature=1.0,
                  ignore_index=-100, reduction="mean", hard_weight=0.0, soft_weight=1.0):
    """The issue's definitions, in torch, per token: KL(p_t||p_s), KL(p_s||p_t), TVD, Liger's generalised JSD."""
    ls = torch.log_softmax(student / temperature, -1)
    lt = torch.log_softmax(teacher / temperature, -1)
    ps, pt = ls.exp(), lt.exp()

    def kl(log_p, log_q):  # KL(p || q) per token
        return (log_p.exp() * (log_p - log_q)).sum(-1)

    if divergence == "jsd" and beta == 0:
        d = kl(lt, ls)
    elif divergence == "jsd" and beta == 1:
        d = kl(ls, lt)
    elif divergence == "jsd":
        log_m = (beta * pt + (1 - beta) * ps).log()
        d = beta * kl(lt, log_m) + (1 - beta) * kl(ls, log_m)
    else:
        d = {"forward_kl": lambda: kl(lt, ls), "reverse_kl": lambda: kl(ls, lt),
             "tvd": lambda: 0.5 * (pt - ps).abs().sum(-1)}[divergence]()
    per_token = soft_weight * d
    kept = torch.ones(per_token.shape, dtype=torch.bool) if target is None else target != ignore_index
    if hard_weight:
        ce = F.cross_entropy(student.reshape(-1, student.shape[-1]), target.reshape(-1), ignore_index=ignore_index,
                             reduction="none").reshape(per_token.shape)
        per_token = per_token + hard_weight * ce
    per_token = torch.where(kept, per_token, 0)
    if reduction == "none":
        return per_token
    return per_token.sum() if reduction == "sum" else per_token.sum() / kept.sum()


def _inputs(shape=(3, 4, 37), dtype=torch.float64, seed=0, ignored=True):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5).to(dtype).requires_grad_()
    teacher = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2).to(dtype)
    target = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    if ignored:
        target.view(-1)[::5] = -100
    return student, teacher, target


def _grad(loss, *inputs):
    g = torch.rand(loss.shape, dtype=loss.dtype, generator=torch.Generator().manual_seed(7)) + 0.5
    return torch.autograd.grad(loss, inputs, g)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_matches_torch(backend, divergence, options):
    student, teacher, target = _inputs()
    if options.get("ignore_index") == 3:  # -100 is then a class index out of range
        target[target == -100] = 3
    loss = lossops.distillation_loss(student, teacher, target, divergence=divergence, **options)
    ref = torch_formula(student, teacher, target, divergence=divergence, **options)
    assert loss.shape == ref.shape and loss.dtype == ref.dtype
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_grad(loss, student)[0], _grad(ref, student)[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_without_target_the_mean_is_over_every_token(backend, divergence):
    student, teacher, _ = _inputs(shape=(5, 300))  # 300 classes: more than one vector, a partial last one
    loss = lossops.distillation_loss(student, teacher, divergence=divergence, temperature=1.7)
    ref = torch_formula(student, teacher, divergence=divergence, temperature=1.7)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_grad(loss, student)[0], _grad(ref, student)[0], rtol=1e-9, atol=1e-12)
    per_token = lossops.distillation_loss(student, teacher, divergence=divergence, temperature=1.7, reduction="none")
    assert per_token.shape == (5,)
    torch.testing.assert_close(per_token.mean(), loss, rtol=1e-12, atol=0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_teacher_gradient_when_it_requires_grad(backend, divergence):
    student, teacher, target = _inputs(shape=(4, 9))
    teacher.requires_grad_()
    loss = lossops.distillation_loss(student, teacher, target, divergence=divergence, temperature=2.0,
                                     hard_weight=0.3)
    ref = torch_formula(student, teacher, target, divergence=divergence, temperature=2.0, hard_weight=0.3)
    for ours, theirs in zip(_grad(loss, student, teacher), _grad(ref, student, teacher)):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("options", [dict(), dict(temperature=1.7, hard_weight=0.6, reduction="none"),
                                     dict(beta=0.25, reduction="sum", soft_weight=2.0)], ids=str)
def test_gradcheck(backend, divergence, options):
    student, teacher, target = _inputs(shape=(3, 6))
    teacher.requires_grad_(backend == "reference")

    def fn(s, t):
        return lossops.distillation_loss(s, t, target, divergence=divergence, **options)

    assert torch.autograd.gradcheck(fn, (student, teacher), fast_mode=backend == "triton")


def test_jsd_at_beta_0_and_1_is_forward_and_reverse_kl(backend):
    student, teacher, target = _inputs(shape=(4, 11))
    for beta, other in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        jsd = lossops.distillation_loss(student, teacher, target, divergence="jsd", beta=beta)
        torch.testing.assert_close(jsd, lossops.distillation_loss(student, teacher, target, divergence=other),
                                   rtol=0, atol=0)
    middle = lossops.distillation_loss(student, teacher, target, divergence="jsd", beta=1e-6)
    assert 0 < middle < 1e-4  # the formula itself tends to 0 at the ends


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_bfloat16_no_worse_than_torch(backend, divergence):
    student, teacher, target = _inputs(shape=(32, 1000), ignored=False)
    truth = torch_formula(student.detach(), teacher, target, divergence=divergence, hard_weight=0.5)
    sb, tb = student.detach().bfloat16(), teacher.bfloat16()
    ours = lossops.distillation_loss(sb, tb, target, divergence=divergence, hard_weight=0.5)
    theirs = torch_formula(sb, tb, target, divergence=divergence, hard_weight=0.5)
    assert ours.dtype == torch.bfloat16
    assert (ours.double() - truth).abs() <= (theirs.double() - truth).abs() * 1.01 + 1e-3 * truth.abs()
    # the gradient too, each element against the float64 truth
    sb.requires_grad_()
    g_ours = torch.autograd.grad(lossops.distillation_loss(sb, tb, target, divergence=divergence), sb)[0].double()
    g_torch = torch.autograd.grad(torch_formula(sb, tb, target, divergence=divergence), sb)[0].double()
    g_true = torch.autograd.grad(torch_formula(student, teacher, target, divergence=divergence), student)[0]
    assert (g_ours - g_true).norm() <= (g_torch - g_true).norm() * 1.01 + 1e-12


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_float32_teacher_for_a_bfloat16_student_is_read_unrounded(backend, divergence):
    student, teacher, target = _inputs(shape=(6, 50))
    sb = student.detach().bfloat16().requires_grad_()
    loss = lossops.distillation_loss(sb, teacher.float(), target, divergence=divergence, temperature=2.0)
    exact = torch_formula(sb.detach().double().requires_grad_(), teacher.float().double(), target,
                          divergence=divergence, temperature=2.0)
    assert loss.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), exact, rtol=4e-3, atol=1e-4)  # the bf16 output's rounding alone
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss32 = lossops.distillation_loss(sb, teacher.float(), target, divergence=divergence, temperature=2.0)
    assert loss32.dtype == torch.float32
    torch.testing.assert_close(loss32.double(), exact.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extreme_logits_give_no_nan_where_the_math_is_finite(backend, divergence):
    """Teacher probabilities that underflow to 0 (in float32 and float64) where the student's are not: reverse KL
    and JSD must use the log-probabilities, never log(0); a class both models rule out (-inf) contributes 0."""
    student = torch.tensor([[0.0, 1.0, -2.0, -math.inf], [3.0, -1e4, 0.5, -math.inf]], dtype=torch.float64,
                           requires_grad=True)
    teacher = torch.tensor([[2000.0, 0.0, -900.0, -math.inf], [1.0, 2.0, -3000.0, -math.inf]], dtype=torch.float64)
    loss = lossops.distillation_loss(student, teacher, divergence=divergence, reduction="none")
    grad = torch.autograd.grad(loss.sum(), student)[0]
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    # the same tokens without the class both rule out, where the torch formula is finite too
    s2, t2 = student.detach()[:, :3].clone().requires_grad_(), teacher[:, :3]
    ref = torch_formula(s2, t2, divergence=divergence, reduction="none")
    if torch.isfinite(ref).all():
        torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad[:, :3], torch.autograd.grad(
        lossops.distillation_loss(s2, t2, divergence=divergence, reduction="none").sum(), s2)[0])
    assert (grad[:, 3] == 0).all()
    for dtype in (torch.float32, torch.bfloat16):
        low = lossops.distillation_loss(student.detach().to(dtype), teacher.to(dtype), divergence=divergence,
                                        reduction="none")
        assert torch.isfinite(low).all()


def test_every_token_ignored(backend):
    student, teacher, target = _inputs(shape=(3, 5))
    target.fill_(-100)
    loss = lossops.distillation_loss(student, teacher, target, hard_weight=1.0)
    assert torch.isnan(loss)
    (grad,) = torch.autograd.grad(loss, student)
    assert (grad == 0).all()
    assert (lossops.distillation_loss(student, teacher, target, reduction="sum") == 0).item()


def test_module_matches_the_function(backend):
    student, teacher, target = _inputs()
    module = lossops.nn.DistillationLoss(divergence="tvd", temperature=2.0, hard_weight=0.5)
    assert "divergence='tvd'" in repr(module)
    torch.testing.assert_close(module(student, teacher, target), lossops.distillation_loss(
        student, teacher, target, divergence="tvd", temperature=2.0, hard_weight=0.5), rtol=0, atol=0)


@pytest.mark.parametrize("call, error, match", [
    (lambda s, t, y: lossops.distillation_loss(s, t[:, :-1], y), ValueError, "teacher_logits"),
    (lambda s, t, y: lossops.distillation_loss(s, t, y[:-1]), ValueError, "target"),
    (lambda s, t, y: lossops.distillation_loss(s, t.float(), y), TypeError, "teacher_logits"),
    (lambda s, t, y: lossops.distillation_loss(s, t, y, beta=1.5), ValueError, "beta"),
    (lambda s, t, y: lossops.distillation_loss(s, t, y, beta=-0.1), ValueError, "beta"),
    (lambda s, t, y: lossops.distillation_loss(s, t, y, temperature=0.0), ValueError, "temperature"),
    (lambda s, t, y: lossops.distillation_loss(s, t, y, temperature=-2.0), ValueError, "temperature"),
    (lambda s, t, y: lossops.distillation_loss(s, t, y, divergence="kl"), ValueError, "divergence"),
    (lambda s, t, y: lossops.distillation_loss(s, t, hard_weight=0.5), ValueError, "hard_weight"),
    (lambda s, t, y: lossops.distillation_loss(s, t, y, reduction="batchmean"), ValueError, "reduction"),
    (lambda s, t, y: lossops.distillation_loss(s, t, y.float()), TypeError, "target"),
    (lambda s, t, y: lossops.distillation_loss(s.long(), t, y), TypeError, "student_logits"),
])
def test_bad_arguments(backend, call, error, match):
    student, teacher, target = _inputs(shape=(4, 6))
    with pytest.raises(error, match=match):
        call(student, teacher, target)


def test_target_out_of_range_raises(kernel_backend):
    student, teacher, target = _inputs(shape=(4, 6))
    target[1] = 6
    with pytest.raises(IndexError, match="out of bounds"):
        lossops.distillation_loss(student, teacher, target)

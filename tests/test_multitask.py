"""lossops.nn.MultiTaskLoss: fixed weights, and learned uncertainty weights (Kendall et al. 2018)."""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lossops


def _batch(n=32):
    x = torch.randn(n, 6)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long(), x[:, 2:4] * 5.0


def test_fixed_weights_combine_torch_losses(backend):
    cls_in, reg_in = torch.randn(8, 3), torch.randn(8, 2)
    cls_t, reg_t = torch.randint(0, 3, (8,)), torch.randn(8, 2)
    loss = lossops.nn.MultiTaskLoss(weights=(0.3, 2.0), regression_options={"beta": 0.5})(cls_in, cls_t, reg_in, reg_t)
    assert_close(loss, 0.3 * F.cross_entropy(cls_in, cls_t) + 2.0 * F.smooth_l1_loss(reg_in, reg_t, beta=0.5))


def test_learned_weights_follow_kendall_formula(backend):
    module = lossops.nn.MultiTaskLoss("softmax_focal", learn_weights=True, classification_options={"gamma": 1.0})
    with torch.no_grad():
        module.log_vars.copy_(torch.tensor([0.4, -0.2]))
    cls_in, cls_t, reg_in, reg_t = torch.randn(8, 3), torch.randint(0, 3, (8,)), torch.randn(8, 2), torch.randn(8, 2)
    l_cls = lossops.softmax_focal_loss(cls_in, cls_t, gamma=1.0)
    l_reg = F.smooth_l1_loss(reg_in, reg_t)
    expected = torch.exp(torch.tensor(-0.4)) * l_cls + 0.5 * torch.exp(torch.tensor(0.2)) * l_reg + 0.5 * (0.4 - 0.2)
    assert_close(module(cls_in, cls_t, reg_in, reg_t), expected)


# A 40-step training run: the Triton interpreter would take 30 s; the weighting logic is backend-independent.
@pytest.mark.parametrize("backend", ["cpp", "reference"], indirect=True)
def test_learned_weights_move_in_training(backend):
    # The regression targets are scaled up so that its loss stays much larger than the classification
    # loss: the learned log-variance of regression must grow (down-weighting it) and that of
    # classification must fall below it.
    torch.manual_seed(0)
    trunk = torch.nn.Linear(6, 16)
    cls_head, reg_head = torch.nn.Linear(16, 3), torch.nn.Linear(16, 2)
    loss_fn = lossops.nn.MultiTaskLoss("cross_entropy", learn_weights=True)
    params = [*trunk.parameters(), *cls_head.parameters(), *reg_head.parameters(), *loss_fn.parameters()]
    opt = torch.optim.Adam(params, lr=0.05)
    start = loss_fn.log_vars.detach().clone()
    for _ in range(40):
        x, cls_t, reg_t = _batch()
        h = torch.relu(trunk(x))
        loss = loss_fn(cls_head(h), cls_t, reg_head(h), reg_t * 10)
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = loss_fn.log_vars.detach() - start
    assert moved.abs().min() > 0.1, moved
    assert loss_fn.log_vars[1] > loss_fn.log_vars[0]
    assert loss_fn.task_weights()[1] < 0.5  # regression's multiplier fell below its initial 0.5


def test_sigmoid_focal_classification_and_custom_callables(backend):
    module = lossops.nn.MultiTaskLoss("focal", lambda a, b: (a - b).abs().sum(), weights=(1.0, 0.1))
    logits, index = torch.randn(5, 4), torch.tensor([0, 4, 2, 1, 4])
    reg_in, reg_t = torch.randn(5, 2), torch.randn(5, 2)
    expected = lossops.sigmoid_focal_loss_index(logits, index, reduction="mean") + 0.1 * (reg_in - reg_t).abs().sum()
    assert_close(module(logits, index, reg_in, reg_t), expected)


@pytest.mark.parametrize("kwargs, error", [
    (dict(classification="hinge"), ValueError),
    (dict(regression=3), TypeError),
    (dict(weights=(1.0,)), ValueError),
])
def test_bad_configuration(kwargs, error):
    with pytest.raises(error):
        lossops.nn.MultiTaskLoss(**kwargs)

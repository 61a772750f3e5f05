"""Calls at the edge of each op's domain, where a loss library is most easily silently wrong: infinite targets and
weights, zero denominators, missing targets, meta tensors, malformed normalisers, and the Modules' reprs."""
import pytest
import torch
import torch.nn.functional as F

import lossops

INF = float("inf")


def _same_with_nans(ours, theirs):
    assert torch.equal(ours.isnan(), theirs.isnan()), (ours, theirs)
    torch.testing.assert_close(ours.nan_to_num(), theirs.nan_to_num(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("target, pos_weight", [
    (torch.full((5,), INF), None), (torch.full((5,), -INF), None),
    (torch.tensor([0.5, 0.0, 1.0, 0.3, 1.0]), torch.tensor(INF)),
], ids=["target+inf", "target-inf", "pos_weight-inf"])
def test_bce_with_logits_infinite_target_or_pos_weight_as_torch(backend, target, pos_weight):
    x = torch.tensor([1.0, -1.0, 0.0, 2.0, -30.0])
    ours = lossops.binary_cross_entropy_with_logits(x, target, pos_weight=pos_weight, reduction="none")
    _same_with_nans(ours, F.binary_cross_entropy_with_logits(x, target, pos_weight=pos_weight, reduction="none"))


def test_zero_weighted_denominator_is_nan_with_zero_gradient(backend):
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    loss = lossops.cross_entropy(x, torch.tensor([1, 2, 1, 2]), weight=weight)
    loss.backward()
    assert torch.isnan(loss)
    assert torch.equal(x.grad, torch.zeros_like(x.grad))


@pytest.mark.parametrize("name", ["cross_entropy", "mse_loss", "binary_cross_entropy_with_logits",
                                  "softmax_focal_loss"])
def test_a_missing_target_is_a_clear_type_error(backend, name):
    with pytest.raises(TypeError, match="target"):
        getattr(lossops, name)(torch.randn(4, 3), None)


@pytest.mark.parametrize("name", ["mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "sigmoid_focal_loss",
                                  "binary_cross_entropy_with_logits"])
def test_meta_tensors_give_the_loss_shape(name):
    x = torch.randn(4, 3, device="meta")
    out = getattr(lossops, name)(x, x, reduction="none")
    assert out.device.type == "meta" and out.shape == (4, 3)


def test_avg_factor_must_be_one_number(backend):
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"avg_factor.*shape \(2,\)"):
        lossops.smooth_l1_loss(x, x * 2, avg_factor=torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(lossops.smooth_l1_loss(x, x * 2, avg_factor=torch.tensor([2.0])),
                               F.smooth_l1_loss(x, x * 2, reduction="sum") / 2)


def test_return_token_stats_compiles_with_dynamic_shapes():
    def loss(x, t):
        return lossops.cross_entropy(x, t, return_token_stats=True, temperature=1.5).entropy.sum()
    compiled = torch.compile(loss, fullgraph=True, dynamic=True)
    for rows in (8, 11):
        x, t = torch.randn(rows, 5), torch.randint(0, 5, (rows,))
        torch.testing.assert_close(compiled(x, t), loss(x, t))


def test_module_reprs_show_their_options():
    assert "gamma=3.0" in repr(lossops.nn.SoftmaxFocalLoss(gamma=3.0))
    assert "label_smoothing=0.1" in repr(lossops.nn.CrossEntropyLoss(label_smoothing=0.1))
    assert "weight=Tensor(3,)" in repr(lossops.nn.CrossEntropyLoss(weight=torch.ones(3)))
    assert repr(lossops.nn.MSELoss()) == "MSELoss()"
    assert "alpha=0.5" in repr(lossops.nn.FocalLoss(alpha=0.5))
    assert "num_classes=10" in repr(lossops.nn.LinearCrossEntropyLoss(8, 10, lse_square_scale=0.1))
    assert "lse_square_scale=0.1" in repr(lossops.nn.LinearCrossEntropyLoss(8, 10, lse_square_scale=0.1))

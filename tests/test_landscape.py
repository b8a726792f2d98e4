"""bn_course.landscape: the loss along the gradient, scale invariance, effective learning rate."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from bn_course import seed_everything
from bn_course.covariate_shift import Snapshots
from bn_course.landscape import (
    WeightNormRecorder, effective_learning_rate, landscape_along_training, landscape_summary,
    loss_along_gradient, loss_and_gradient, predicted_norm_growth, scale_invariance,
    weight_norm_experiment, weights_feeding_batchnorm)
from bn_course.models import mlp


def mse(out, y):
    return ((out - y) ** 2).mean()


@pytest.fixture
def least_squares():
    """L(w) = mean((X w - y)^2): gradient 2 X^T (X w - y) / N, Hessian H = 2 X^T X / N."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).double()
    x = torch.randn(20, 3, dtype=torch.float64)
    y = torch.randn(20, 1, dtype=torch.float64)
    return model, x, y


def test_loss_and_gradient_is_the_flattened_autograd_gradient(least_squares):
    model, x, y = least_squares
    loss, g = loss_and_gradient(model, x, y, mse)
    w = model.weight.detach().reshape(-1)
    assert loss == pytest.approx(float(((x @ w - y[:, 0]) ** 2).mean()))
    assert torch.allclose(g, 2 * x.T @ (x @ w - y[:, 0]) / 20)


def test_walk_along_the_gradient_of_a_quadratic_matches_the_closed_form(least_squares):
    model, x, y = least_squares
    H = 2 * x.T @ x / 20
    loss0, g = loss_and_gradient(model, x, y, mse)
    steps = [0.1, 0.5, 1.0]
    walk = loss_along_gradient(model, x, y, steps, mse)
    for s, loss_s, change, dist in zip(steps, walk["loss"], walk["grad_change"], walk["distance"]):
        assert loss_s == pytest.approx((loss0 - s * g @ g + s ** 2 / 2 * g @ H @ g).item(), rel=1e-10)
        assert change == pytest.approx(s * (H @ g).norm().item(), rel=1e-10)
        assert dist == pytest.approx(s * g.norm().item(), rel=1e-12)
    summary = landscape_summary(walk)
    assert summary["smoothness"] == pytest.approx((H @ g).norm().item() / g.norm().item(), rel=1e-9)
    assert summary["smoothness"] <= torch.linalg.eigvalsh(H).max().item() * (1 + 1e-9)
    assert summary["loss_range"] == pytest.approx(max([loss0] + walk["loss"]) - min([loss0] + walk["loss"]))
    assert walk["loss0"] == pytest.approx(loss0)


def test_walk_leaves_the_model_untouched_and_checks_step_sizes():
    seed_everything(0)
    model = mlp(hidden=(8, 8), norm="batch")
    x, y = torch.randn(10, 64), torch.randint(0, 10, (10,))
    before = copy.deepcopy(model.state_dict())
    loss_along_gradient(model, x, y, [0.1, 1.0])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="positive numbers"):
        loss_along_gradient(model, x, y, [0.1, -1.0])
    with pytest.raises(ValueError, match="positive numbers"):
        loss_along_gradient(model, x, y, [])


def test_landscape_along_training_walks_at_every_snapshot():
    seed_everything(0)
    model = mlp(hidden=(8, 8), norm="batch")
    snaps = Snapshots(every=1)
    x, y = torch.randn(10, 64), torch.randint(0, 10, (10,))
    snaps(step=1, model=model, x=x, y=y)
    r = landscape_along_training(snaps, [0.1, 0.2])
    summary = landscape_summary(loss_along_gradient(model, x, y, [0.1, 0.2]))
    assert r["steps"] == [1]
    for key, value in summary.items():
        assert r[key][0].item() == pytest.approx(value, rel=1e-5)
    with pytest.raises(ValueError, match="no snapshots"):
        landscape_along_training(Snapshots(), [0.1])


def test_landscape_summary_by_hand():
    walk = {"loss0": 1.0, "loss": [0.8, 0.5, 1.4], "grad_change": [0.1, 0.3, 0.9], "distance": [0.1, 0.2, 0.4]}
    s = landscape_summary(walk)
    assert s == pytest.approx({"loss_range": 0.9, "max_grad_change": 0.9, "smoothness": 2.25})


def test_which_weights_feed_batchnorm():
    assert [n for n, _ in weights_feeding_batchnorm(mlp(norm="batch"))] == ["linear1", "linear2", "linear3"]
    assert weights_feeding_batchnorm(mlp(norm="none")) == []
    assert weights_feeding_batchnorm(mlp(norm="batch", norm_position="after")) == []


def test_weights_feeding_bn_are_scale_invariant_and_others_are_not():
    seed_everything(1)
    model = mlp(hidden=(16, 16), norm="batch")
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    for c in (0.5, 3.0, 10.0):
        r = scale_invariance(model, x, y, model.linear2, c)
        assert r["loss_scaled"] == pytest.approx(r["loss"], rel=1e-4)
        assert r["grad_norm_scaled"] * c == pytest.approx(r["grad_norm"], rel=1e-3)
        assert abs(r["radial_cosine"]) < 1e-4
    plain = mlp(hidden=(16, 16))
    r = scale_invariance(plain, x, y, plain.linear2, 3.0)
    assert abs(r["loss_scaled"] - r["loss"]) > 1e-3
    with pytest.raises(ValueError, match="c must be a positive"):
        scale_invariance(model, x, y, model.linear2, 0)
    with pytest.raises(ValueError, match="module of model"):
        scale_invariance(model, x, y, plain.linear2, 2.0)


def test_effective_learning_rate_and_norm_growth():
    assert effective_learning_rate(0.1, 2.0) == pytest.approx(0.025)
    assert predicted_norm_growth(4.0, 0.5, 2.0) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="weight norm must be positive"):
        effective_learning_rate(0.1, 0.0)
    with pytest.raises(ValueError, match="no layers to record"):
        WeightNormRecorder([])


@pytest.mark.parametrize("seed", [3, 4])
def test_norm_growth_law_and_weight_decay_for_other_seeds(seed):
    """Notebook 06's scale-invariance conclusions on 150 steps instead of 400."""
    free = weight_norm_experiment(seed, steps=150, lr=1.0, weight_decay=0.0)
    decayed = weight_norm_experiment(seed, steps=150, lr=1.0, weight_decay=1e-3)
    n2 = free["norms"] ** 2
    predicted = predicted_norm_growth(n2[:-1], 1.0, free["grad_norms"])
    assert ((n2[1:] - predicted).abs() / n2[1:]).max() < 1e-4
    assert (n2[1:] - n2[:-1] >= -1e-4 * n2[:-1]).all(), "without weight decay the norm never shrinks"
    assert (free["norms"][-1] > 1.05 * free["norms"][0]).all()
    assert (decayed["norms"][-1] < free["norms"][-1]).all()
    assert (decayed["effective_lr"][-1] > free["effective_lr"][-1]).all()


def test_loss_along_gradient_names_a_batch_that_does_not_fit_the_model():
    model = mlp(norm="batch")
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    with pytest.raises(ValueError, match=r"each example of x must hold 64 numbers.*got \(8, 63\)"):
        loss_along_gradient(model, torch.randn(8, 63), y, [0.1])
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got dtype torch.int64"):
        loss_along_gradient(model, x.long(), y, [0.1])
    with pytest.raises(TypeError, match="y must be a 1-D int64 tensor of class labels"):
        loss_along_gradient(model, x, y.float(), [0.1])
    with pytest.raises(ValueError, match=r"labels must lie in 0..9"):
        scale_invariance(model, x, y + 10, model.linear2, 2.0)


def test_scale_invariance_accepts_numpy_and_tensor_scalars_as_c():
    seed_everything(1)
    model = mlp(hidden=(16, 16), norm="batch")
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    expected = scale_invariance(model, x, y, model.linear2, 2.0)
    assert scale_invariance(model, x, y, model.linear2, torch.tensor(2.0)) == pytest.approx(expected)
    assert scale_invariance(model, x, y, model.linear2, np.float32(2.0)) == pytest.approx(expected)
    for bad in ("2", torch.tensor(-2.0), torch.ones(2)):
        with pytest.raises(ValueError, match="c must be a positive number"):
            scale_invariance(model, x, y, model.linear2, bad)


@pytest.mark.parametrize("bad", [None, [1.0, 2.0], "abc", torch.randn(4)], ids=["None", "list", "str", "tensor"])
def test_functions_taking_a_model_reject_a_non_module(bad):
    from bn_course.landscape import loss_and_gradient, weights_feeding_batchnorm
    name = type(bad).__name__
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    with pytest.raises(TypeError, match=rf"^loss_and_gradient: model must be a torch.nn.Module .*got {name}\."):
        loss_and_gradient(bad, x, y)
    with pytest.raises(TypeError, match=rf"^weights_feeding_batchnorm: model must be a torch.nn.Module .*got {name}\."):
        weights_feeding_batchnorm(bad)


def test_loss_and_gradient_rejects_a_model_whose_output_is_not_logits():
    from bn_course.landscape import loss_and_gradient
    x, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 3, 4, 5, 6, 9])
    with pytest.raises(ValueError, match=r"^loss_and_gradient: the model's output has shape \(8, 4\); "
                                         r"loss_and_gradient expects logits of shape \(N, n_classes\)"):
        loss_and_gradient(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), x, y)


def test_weight_norm_experiment_names_bad_steps():
    for steps in (None, "400", 0):
        with pytest.raises(ValueError, match="steps must be a positive integer"):
            weight_norm_experiment(steps=steps)


def test_effective_learning_rate_of_a_tensor_of_norms():
    norms = torch.tensor([[1.0, 2.0], [4.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(effective_learning_rate(0.1, norms), 0.1 / norms ** 2)
    for bad in (torch.tensor([1.0, 0.0]), torch.tensor([1.0, float("nan")]), -1.0, "2"):
        with pytest.raises(ValueError, match="weight norm must be positive"):
            effective_learning_rate(0.1, bad)

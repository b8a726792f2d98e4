"""bn_course.train: deterministic runs, divergence detected, evaluation, callbacks, clear errors."""

import math

import numpy as np
import pytest
import torch

import bn_course
from bn_course.data import load_digits_split
from bn_course.models import mlp
from bn_course.train import History, evaluate, is_divergent, train


@pytest.fixture(scope="module")
def data():
    return load_digits_split()


def _run(data, seed=0, **kwargs):
    bn_course.seed_everything(seed)
    model = mlp(hidden=(32, 32), norm=kwargs.pop("norm", "batch"))
    return train(model, data, kwargs.pop("steps", 40), kwargs.pop("lr", 0.1), progress=False,
                 eval_every=10, seed=seed, **kwargs)


def test_same_seed_same_history(data):
    a, b = _run(data, seed=1), _run(data, seed=1)
    assert a.batch_loss == b.batch_loss and a.test_accuracy == b.test_accuracy
    assert _run(data, seed=2).batch_loss != a.batch_loss


def test_history_records_what_it_promises(data):
    h = _run(data, steps=45)
    assert h.steps == [0, 10, 20, 30, 40, 45]
    assert len(h.batch_loss) == 45
    assert len(h.train_loss) == len(h.test_accuracy) == len(h.train_accuracy) == len(h.test_loss) == 6
    assert not h.diverged and h.diverged_step is None
    assert h.final_accuracy == h.test_accuracy[-1] > 0.8  # 45 steps of BN-MLP learn the digits
    assert h.steps_to(0.0) == 0 and h.steps_to(1.01) is None
    assert h.summary()["steps_run"] == 45


@pytest.mark.parametrize("optimizer, momentum", [("sgd", 0.0), ("sgd", 0.9), ("adam", 0.0)])
def test_optimizers_learn(data, optimizer, momentum):
    lr = 0.01 if optimizer == "adam" else 0.1
    h = _run(data, optimizer=optimizer, momentum=momentum, lr=lr, norm="none", steps=100)
    assert h.train_loss[-1] < 0.5 * h.train_loss[0]


def test_huge_learning_rate_is_detected_as_divergence(data):
    h = _run(data, norm="none", lr=1e4, steps=200)
    assert h.diverged and h.diverged_step is not None and h.diverged_step <= 200
    assert len(h.batch_loss) == h.diverged_step < 200  # stopped early
    assert h.steps[-1] == h.diverged_step  # evaluated once at the divergence


def test_is_divergent():
    assert is_divergent(float("nan"), 2.3, 10) and is_divergent(math.inf, None, 10)
    assert is_divergent(24.0, 2.3, 10) and not is_divergent(22.0, 2.3, 10)


def test_callback_sees_every_step_and_can_stop(data):
    seen = []

    def callback(step, model, x, y, loss, history, **_):
        seen.append((step, x.shape[0], loss))
        history.extra.setdefault("steps", []).append(step)
        return step == 7

    h = _run(data, callback=callback)
    assert [s for s, _, _ in seen] == list(range(1, 8)) and seen[0][1] == 60
    assert h.extra["steps"] == list(range(1, 8)) and h.steps[-1] == 7


def test_evaluate_restores_the_mode(data):
    model = mlp(hidden=(8,), norm="batch")
    model.train()
    loss, acc = evaluate(model, data.x_test, data.y_test)
    assert model.training and 0 <= acc <= 1 and loss > 0
    model.eval()
    evaluate(model, data.x_test[:5], data.y_test[:5])
    assert not model.training


def test_runs_on_the_course_device(data):
    device = bn_course.get_device()
    h = _run(data.to(device), steps=5)
    assert len(h.batch_loss) == 5


@pytest.mark.parametrize("kwargs, error, match", [
    ({"steps": 0}, ValueError, "steps"),
    ({"lr": -1.0}, ValueError, "lr"),
    ({"optimizer": "rmsprop"}, ValueError, "optimizer"),
    ({"optimizer": "adam", "momentum": 0.9}, ValueError, "momentum"),
    ({"batch_size": 10_000}, ValueError, "batch_size"),
])
def test_bad_arguments(data, kwargs, error, match):
    with pytest.raises(error, match=match):
        _run(data, **kwargs)


def test_lr_may_be_a_numpy_or_tensor_scalar(data):
    expected = _run(data, steps=5, lr=0.25).batch_loss
    assert _run(data, steps=5, lr=np.float32(0.25)).batch_loss == expected
    assert _run(data, steps=5, lr=torch.tensor(0.25)).batch_loss == expected
    for bad in ("0.25", torch.tensor([0.25, 0.5]), np.float32(-0.25)):
        with pytest.raises(ValueError, match="lr must be a positive number"):
            _run(data, steps=5, lr=bad)


def test_data_without_the_four_tensors():
    with pytest.raises(TypeError, match="x_train"):
        train(mlp(), object(), 10, 0.1, progress=False)


def test_empty_history():
    assert math.isnan(History().final_accuracy)


def test_eval_train_false_skips_the_training_set(data):
    h = _run(data, steps=20, eval_train=False)
    assert all(math.isnan(v) for v in h.train_loss + h.train_accuracy)
    assert h.test_accuracy == _run(data, steps=20).test_accuracy


def test_bad_model_and_steps_get_clear_errors(data):
    from torch import nn
    model = mlp(hidden=(8,), norm="batch")
    for bad in (None, -1, 2.5, "10", True):
        with pytest.raises(ValueError, match=f"steps must be a positive integer, got {bad!r}"):
            train(model, data, bad, 0.1, progress=False)
    for bad, name in ((None, "NoneType"), ("mlp", "str"), (torch.randn(3), "Tensor")):
        with pytest.raises(TypeError, match=f"train: model must be a torch.nn.Module .*got {name}"):
            train(bad, data, 5, 0.1, progress=False)
        with pytest.raises(TypeError, match=f"evaluate: model must be a torch.nn.Module .*got {name}"):
            evaluate(bad, data.x_test, data.y_test)
    with pytest.raises(ValueError, match="train: model ReLU has no parameters to train"):
        train(nn.ReLU(), data, 5, 0.1, progress=False)


def test_evaluate_rejects_a_model_whose_output_is_not_logits():
    from torch import nn
    x, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 3, 4, 5, 6, 9])
    for model, shape in ((nn.ReLU(), r"\(8, 4\)"), (nn.Linear(4, 3), r"\(8, 3\)"), (nn.Flatten(0), r"\(32,\)")):
        model.train()
        with pytest.raises(ValueError, match=rf"^evaluate: the model's output has shape {shape}; evaluate expects "
                                             r"logits of shape \(N, n_classes\) with N = 8 .*n_classes > the "
                                             r"largest label \(9\)"):
            evaluate(model, x, y)
        assert model.training  # the mode is restored after the refusal
    loss, acc = evaluate(nn.Linear(4, 10), x, y)
    assert math.isfinite(loss) and 0.0 <= acc <= 1.0


def test_make_optimizer_rejects_a_non_module():
    from bn_course.train import make_optimizer
    for bad in (None, [1.0, 2.0], "abc", torch.randn(4)):
        with pytest.raises(TypeError, match=rf"^make_optimizer: model must be a torch.nn.Module .*got {type(bad).__name__}\."):
            make_optimizer(bad, "sgd", 0.1)


def test_evaluate_names_bad_data_and_batch_size():
    model = mlp()
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    with pytest.raises(ValueError, match="evaluate: x and y must be tensors with one label per example"):
        evaluate(model, None, y)
    with pytest.raises(ValueError, match="one label per example, got Tensor \\(8, 64\\) and Tensor \\(5,\\)"):
        evaluate(model, x, y[:5])
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        evaluate(model, x, y, batch_size=0)


def test_evaluate_rejects_labels_that_are_not_class_indices():
    from torch import nn
    model, x = nn.Linear(4, 3), torch.randn(3, 4)
    for y in (torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0, 1, 2], dtype=torch.int32)):
        with pytest.raises(TypeError, match=r"^evaluate: y must be a 1-D int64 tensor of class labels .*"
                                            rf"dtype {y.dtype}.*y\.long\(\)"):
            evaluate(model, x, y)
    with pytest.raises(TypeError, match=r"^evaluate: y must be a 1-D int64 tensor .*of shape \(3, 1\)"):
        evaluate(model, x, torch.tensor([[0], [1], [2]]))
    with pytest.raises(ValueError, match=r"^evaluate: labels must be >= 0, got values from -1 to 2"):
        evaluate(model, x, torch.tensor([-1, 0, 2]))

"""bn_course.recording: hooks capture the right tensors, leave no trace, and the statistics are right."""

import pytest
import torch

from bn_course.data import load_digits_split
from bn_course.models import cnn, mlp
from bn_course.recording import (PercentileTracker, activation_inputs, layer_norms, named_activations,
                                 percentiles, preserved_buffers, saturation_fraction)
from bn_course.train import train


def test_activation_inputs_are_the_preactivations():
    torch.manual_seed(0)
    model = mlp(hidden=(7, 5), activation="sigmoid")
    x = torch.randn(11, 64)
    z = activation_inputs(model, x)
    assert list(z) == ["act1", "act2"]
    assert torch.allclose(z["act1"], model.linear1(x))
    assert torch.allclose(z["act2"], model.linear2(torch.sigmoid(model.linear1(x))))
    assert not model._forward_pre_hooks and not model.act1._forward_pre_hooks  # hooks removed


def test_batch_stats_normalize_without_touching_running_statistics():
    torch.manual_seed(0)
    model = mlp(hidden=(6,), norm="batch")
    x = 3 + 2 * torch.randn(50, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    z = activation_inputs(model, x, batch_stats=True)["act1"]
    assert torch.allclose(z.mean(0), torch.zeros(6), atol=1e-5)  # gamma=1, beta=0 at init
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.train()
    assert model.training
    z_eval = activation_inputs(model, x, batch_stats=False)["act1"]
    assert not torch.allclose(z_eval, z, atol=1e-3) and model.training


def test_preserved_buffers_restores_after_an_error():
    model = mlp(hidden=(4,), norm="batch")
    with pytest.raises(RuntimeError):
        with preserved_buffers(model):
            model(torch.randn(8, 64))
            raise RuntimeError("boom")
    assert int(model.norm1.num_batches_tracked) == 0


def test_percentiles_match_numpy():
    z = torch.randn(1000, 3)
    got = percentiles(z, (15, 50, 85), dim=0)
    expected = torch.tensor([[float(torch.quantile(z[:, j], q)) for j in range(3)] for q in (0.15, 0.5, 0.85)])
    assert got.shape == (3, 3) and torch.allclose(got, expected)
    assert percentiles(torch.arange(101.0), (0, 50, 100)).tolist() == [0.0, 50.0, 100.0]
    with pytest.raises(ValueError, match="between 0 and 100"):
        percentiles(z, (150,))


def test_saturation_fraction():
    z = torch.tensor([-10.0, -4.0, 0.0, 4.0, 5.0])
    assert saturation_fraction(z, "sigmoid") == pytest.approx(2 / 5)
    assert saturation_fraction(z, "relu") == pytest.approx(3 / 5)
    assert saturation_fraction(z, "tanh") == pytest.approx(4 / 5)
    # the thresholds of notebook 01's definition (slope below 5% of its maximum), just either side
    assert saturation_fraction(torch.tensor([4.35, -4.38]), "sigmoid") == pytest.approx(1 / 2)
    assert saturation_fraction(torch.tensor([2.17, -2.19]), "tanh") == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="activation"):
        saturation_fraction(z, "gelu")


def test_layer_norms_match_a_manual_backward():
    torch.manual_seed(0)
    model = mlp(hidden=(9, 7), norm="batch")
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    rows = layer_norms(model, x, y)
    assert [r["name"] for r in rows] == ["linear1", "linear2", "out"]
    assert all(p.grad is None for p in model.parameters())  # no side effect on .grad
    h1 = model.act1(model.norm1(model.linear1(x))).detach().requires_grad_(True)
    h2 = model.act2(model.norm2(model.linear2(h1)))
    torch.nn.functional.cross_entropy(model.out(h2), y, reduction="sum").backward()
    assert rows[1]["activation_rms"] == pytest.approx(float(h1.detach().pow(2).mean().sqrt()), rel=1e-5)
    assert rows[1]["gradient_rms"] == pytest.approx(float(h1.grad.pow(2).mean().sqrt()), rel=1e-5)
    assert rows[0]["activation_rms"] == pytest.approx(float(x.pow(2).mean().sqrt()), rel=1e-5)
    assert len(rows[0]["gradient_percentiles"]) == 3


def test_layer_norms_for_a_cnn():
    rows = layer_norms(cnn(norm="batch"), torch.randn(8, 64), torch.randint(0, 10, (8,)))
    assert [r["name"] for r in rows] == ["conv1", "conv2", "out"]
    assert all(r["weight_grad_norm"] > 0 for r in rows)


def test_percentile_tracker_during_training():
    data = load_digits_split(n_train=300)
    torch.manual_seed(0)
    model = mlp(hidden=(16, 16), activation="sigmoid", norm="batch")
    at_init = percentiles(activation_inputs(model, data.x_test)["act2"], dim=0)
    tracker = PercentileTracker(model, data.x_test, name="act2", every=5, activation="sigmoid")
    h = train(model, data, 20, 0.5, progress=False, callback=tracker)
    assert tracker.steps == [0, 5, 10, 15, 20]
    assert tracker.values.shape == (5, 3, 16)
    v = tracker.values
    assert torch.equal(v[0], at_init)
    assert bool((v[:, 0] <= v[:, 1]).all() and (v[:, 1] <= v[:, 2]).all())
    assert not torch.equal(v[-1], v[0])  # training moved them
    assert len(tracker.saturation) == 5 and not h.diverged


def test_tracker_on_cnn_channels():
    torch.manual_seed(0)
    model = cnn(channels=(4, 8), norm="batch")
    tracker = PercentileTracker(model, torch.randn(10, 64), name="act2", every=1)
    assert tracker.values.shape == (1, 3, 8)


def test_unknown_names():
    model = mlp(hidden=(4,))
    with pytest.raises(KeyError, match="act7"):
        activation_inputs(model, torch.randn(3, 64), names=["act7"])
    with pytest.raises(KeyError, match="act7"):
        PercentileTracker(model, torch.randn(3, 64), name="act7")
    assert list(named_activations(model)) == ["act1"]


@pytest.mark.parametrize("bad", [None, [1.0, 2.0], "abc", torch.randn(4)], ids=["None", "list", "str", "tensor"])
def test_functions_taking_a_model_reject_a_non_module(bad):
    from bn_course import recording
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    calls = {
        "named_activations": lambda: recording.named_activations(bad),
        "named_weight_layers": lambda: recording.named_weight_layers(bad),
        "preserved_buffers": lambda: recording.preserved_buffers(bad),
        "activation_inputs": lambda: recording.activation_inputs(bad, x),
        "layer_norms": lambda: recording.layer_norms(bad, x, y),
        "PercentileTracker": lambda: recording.PercentileTracker(bad, x),
    }
    for where, call in calls.items():
        with pytest.raises(TypeError, match=rf"^{where}: model must be a torch.nn.Module .*got {type(bad).__name__}\."):
            call()


def test_layer_norms_rejects_a_model_whose_output_is_not_logits():
    from torch import nn
    from bn_course.recording import layer_norms
    x, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 3, 4, 5, 6, 9])
    with pytest.raises(ValueError, match=r"^layer_norms: the model's output has shape \(8, 4\); layer_norms expects "
                                         r"logits of shape \(N, n_classes\).*largest label \(9\)"):
        layer_norms(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), x, y)

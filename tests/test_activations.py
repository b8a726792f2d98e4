"""bn_course.activations: per-layer statistics of a deep MLP at initialization (notebook 01)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from bn_course.activations import (dead_fraction, forward_layers, init_statistics, init_weights,
                                   saturated_fraction, weight_grad_rms)
from bn_course.data import load_digits_split


@pytest.fixture(scope="module")
def batch():
    d = load_digits_split()
    return d.x_train[:256], d.y_train[:256]


def torch_mlp(weights, w_out, activation):
    """The same network from nn.Linear layers: the oracle."""
    act = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.ReLU}[activation]
    layers = []
    for w in weights:
        lin = nn.Linear(*w.shape, bias=False)
        lin.weight.data = w.T.clone()
        layers += [lin, act()]
    head = nn.Linear(*w_out.shape, bias=False)
    head.weight.data = w_out.T.clone()
    return nn.Sequential(*layers), head


def test_init_weights_shapes_scale_and_determinism():
    weights, w_out = init_weights(depth=3, width=200, in_features=64, init_scale=2.0, seed=5)
    assert [tuple(w.shape) for w in weights] == [(64, 200), (200, 200), (200, 200)]
    assert tuple(w_out.shape) == (200, 10)
    assert weights[0].std().item() == pytest.approx(2.0 / math.sqrt(64), rel=0.05)
    assert weights[1].std().item() == pytest.approx(2.0 / math.sqrt(200), rel=0.05)
    again, _ = init_weights(depth=3, width=200, in_features=64, init_scale=2.0, seed=5)
    other, _ = init_weights(depth=3, width=200, in_features=64, init_scale=2.0, seed=6)
    assert torch.equal(weights[2], again[2]) and not torch.equal(weights[2], other[2])


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "relu"])
def test_forward_and_gradients_match_torch_modules(batch, activation):
    x, y = batch
    weights, w_out = init_weights(4, 32, 64, 1.5, seed=1)
    body, head = torch_mlp(weights, w_out, activation)
    hs = forward_layers(x, weights, activation)
    torch.testing.assert_close(hs[-1], body(x))
    torch.testing.assert_close(hs[1], body[:4](x))
    nn.functional.cross_entropy(head(body(x)), y).backward()
    expected = [lin.weight.grad.pow(2).mean().sqrt().item() for lin in body if isinstance(lin, nn.Linear)]
    np.testing.assert_allclose(weight_grad_rms(x, y, weights, w_out, activation), expected, rtol=1e-5)


def test_saturation_and_dead_units_by_hand():
    # tanh slope 1 - h^2 < 0.05 <=> |h| > 0.9747
    assert saturated_fraction(torch.tensor([0.0, 0.5, 0.97, 0.98, -0.99]), "tanh") == pytest.approx(0.4)
    # sigmoid slope h (1 - h) / 0.25 < 0.05 <=> h < 0.0127 or h > 0.9873
    assert saturated_fraction(torch.tensor([0.5, 0.01, 0.02, 0.995]), "sigmoid") == pytest.approx(0.5)
    assert saturated_fraction(torch.tensor([0.0, 0.0, 1.0, 3.0]), "relu") == pytest.approx(0.5)
    h = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])  # unit 0 is zero for both examples
    assert dead_fraction(h) == pytest.approx(1 / 3)


def test_statistics_fields(batch):
    x, y = batch
    s = init_statistics(x, y, depth=6, width=32, init_scale=1.0, activation="relu", seed=0)
    assert s.depth == 6 and len(s.h) == 6 and s.h[0].shape == (256, 32)
    for field in (s.mean, s.std, s.saturated, s.dead, s.grad_rms):
        assert field.shape == (6,) and np.all(np.isfinite(field))
    np.testing.assert_allclose(s.std[2], s.h[2].std(ddof=1), rtol=1e-4)
    t = init_statistics(x, y, depth=6, width=32, init_scale=1.0, activation="tanh", seed=0)
    assert np.all(t.dead == 0)
    light = init_statistics(x, y, depth=6, width=32, init_scale=1.0, activation="relu", seed=0,
                            keep_activations=False)
    assert light.h == [] and np.array_equal(light.std, s.std) and np.array_equal(light.grad_rms, s.grad_rms)


@pytest.mark.parametrize("seed", [1, 2, 3, 7])
def test_notebook_01_conclusions_hold_for_other_seeds(batch, seed):
    """The same asserts as 01_why_normalize, at reduced size (width 128, 256 examples)."""
    x, y = batch

    def run(activation, scale, depth=20):
        return init_statistics(x, y, depth=depth, width=128, init_scale=scale, activation=activation, seed=seed)

    def ratio(s):
        return s.std[-1] / s.std[0]

    t_small, t_one, t_big = run("tanh", 0.5), run("tanh", 1.0), run("tanh", 4.0)
    assert ratio(t_small) < 1e-4 and 0.4 < ratio(t_small) ** (1 / 19) < 0.6
    assert 0.1 < ratio(t_one) < 1 and 0.5 < ratio(t_big) < 2
    assert t_big.saturated[-1] > 0.4 and t_one.saturated[-1] < 0.01
    assert t_big.grad_rms[0] / t_big.grad_rms[-1] > 300
    assert t_small.grad_rms[0] / t_one.grad_rms[0] < 1e-3
    for scale in (0.5, 1.0, 2.0, 4.0):
        s = run("sigmoid", scale)
        assert 0.35 < s.mean.min() and s.mean.max() < 0.65
        assert s.grad_rms[0] / s.grad_rms[-1] < 1e-3
    r_one, r_he, r_two = run("relu", 1.0), run("relu", math.sqrt(2)), run("relu", 2.0)
    assert ratio(r_one) < 1e-2 and 0.25 < ratio(r_he) < 4 and ratio(r_two) > 100
    assert r_he.dead[0] == 0 and r_he.dead[-1] > 0.05
    assert np.array_equal(r_one.dead, r_he.dead) and np.array_equal(r_two.dead, r_he.dead)
    assert r_one.grad_rms[0] / r_he.grad_rms[0] < 1e-2
    assert r_two.grad_rms[0] / r_he.grad_rms[0] > 100
    assert 1 / 20 < r_he.grad_rms[0] / r_he.grad_rms[-1] < 20  # He's scale: within a factor of 20
    # the gap grows with depth
    first = {s: np.array([run("relu", s, depth=d).grad_rms[0] for d in (2, 5, 10, 20, 30)])
             for s in (1.0, math.sqrt(2), 2.0)}
    assert np.all(np.diff(first[1.0] / first[math.sqrt(2)]) < 0)
    assert np.all(np.diff(first[2.0] / first[math.sqrt(2)]) > 0)


def test_bad_input_is_named(batch):
    x, y = batch
    with pytest.raises(ValueError, match="activation must be one of"):
        init_statistics(x, y, depth=3, activation="gelu")
    with pytest.raises(ValueError, match="depth must be a positive integer"):
        init_statistics(x, y, depth=0)
    with pytest.raises(ValueError, match="init_scale must be positive"):
        init_statistics(x, y, depth=3, init_scale=-1.0)
    with pytest.raises(ValueError, match=r"x must be a float tensor of shape \(N, in_features\)"):
        init_statistics(x.reshape(-1, 1, 8, 8), y, depth=3)
    with pytest.raises(ValueError, match="y must hold 256 class labels"):
        init_statistics(x, y[:10], depth=3)


def test_float64_input_gives_the_float32_statistics(batch):
    x, y = batch
    s32 = init_statistics(x, y, depth=4, width=32, activation="tanh", seed=0)
    s64 = init_statistics(x.double(), y, depth=4, width=32, activation="tanh", seed=0)
    assert s64.h[0].dtype == np.float64
    np.testing.assert_allclose(s64.std, s32.std, rtol=1e-5)
    np.testing.assert_allclose(s64.grad_rms, s32.grad_rms, rtol=1e-4)


def test_bad_dtypes_and_labels_are_named(batch):
    x, y = batch
    with pytest.raises(ValueError, match=r"x must be a float tensor .*\(256, 64\) of dtype torch.int64"):
        init_statistics(x.long(), y, depth=3)
    with pytest.raises(TypeError, match="y must be a 1-D int64 tensor of class labels.*got dtype torch.float32"):
        init_statistics(x, y.float(), depth=3)
    with pytest.raises(ValueError, match=r"labels must lie in 0..9 .*got values from 0 to 10"):
        init_statistics(x, torch.where(y == 9, 10, y), depth=3)


def test_output_statistics_reject_what_is_not_a_layer_output():
    for fn in (dead_fraction, lambda h: saturated_fraction(h, "tanh")):
        for bad, kind in ((None, "NoneType"), ([[0.0, 1.0]], "list"), (np.zeros((2, 3)), "ndarray")):
            with pytest.raises(TypeError, match=f"h must be a torch.Tensor of layer outputs .*got {kind}"):
                fn(bad)
        with pytest.raises(ValueError, match=r"h is empty, shape \(0, 4\)"):
            fn(torch.zeros(0, 4))
        with pytest.raises(TypeError, match="h must be a floating-point tensor .*torch.int64"):
            fn(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"dead_fraction: h must have shape \(N, width\).*\(8,\)"):
        dead_fraction(torch.randn(8))

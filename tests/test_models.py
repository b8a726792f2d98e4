"""bn_course.models: shapes, layer order, no bias before batch norm, init scale, clear errors."""

import math

import pytest
import torch
from torch import nn

from bn_course.models import NORM_COLORS, cnn, mlp


@pytest.mark.parametrize("norm", ["none", "batch", "layer", "group"])
@pytest.mark.parametrize("position", ["before", "after"])
def test_mlp_shapes(norm, position):
    model = mlp(hidden=(20, 12, 8), norm=norm, norm_position=position)
    assert model(torch.randn(5, 64)).shape == (5, 10)


def test_mlp_layer_order_and_names():
    model = mlp(hidden=(8, 8), activation="sigmoid", norm="batch")
    assert list(dict(model.named_children())) == ["linear1", "norm1", "act1", "linear2", "norm2", "act2", "out"]
    assert isinstance(model.norm1, nn.BatchNorm1d) and isinstance(model.act1, nn.Sigmoid)
    after = mlp(hidden=(8,), norm="batch", norm_position="after")
    assert list(dict(after.named_children())) == ["linear1", "act1", "norm1", "out"]
    assert list(dict(mlp(hidden=(8,)).named_children())) == ["linear1", "act1", "out"]


def test_no_bias_in_layers_that_feed_a_norm():
    for norm in ("batch", "layer", "group"):
        model = mlp(norm=norm)
        assert all(getattr(model, f"linear{i}").bias is None for i in (1, 2, 3))
        assert model.out.bias is not None
    assert all(getattr(mlp(), f"linear{i}").bias is not None for i in (1, 2, 3))
    assert mlp(norm="batch", norm_position="after").linear1.bias is not None
    assert cnn(norm="batch").conv1.bias is None and cnn().conv1.bias is not None


@pytest.mark.parametrize("norm", ["none", "batch", "layer", "group"])
def test_cnn_accepts_flat_rows_and_images(norm):
    model = cnn(norm=norm)
    x = torch.randn(6, 64)
    assert torch.allclose(model(x), model(x.reshape(6, 1, 8, 8)))
    assert model(x).shape == (6, 10)
    if norm == "batch":
        assert isinstance(model.norm1, nn.BatchNorm2d)


def test_init_scale_sets_the_weight_std():
    torch.manual_seed(0)
    model = mlp(hidden=(400, 400), init_scale=2.0)
    for layer in (model.linear1, model.linear2):
        expected = 2.0 / math.sqrt(layer.in_features)
        assert abs(float(layer.weight.detach().std()) / expected - 1) < 0.02
        assert float(layer.bias.detach().abs().max()) == 0.0


@pytest.mark.parametrize("kwargs, match", [
    ({"norm": "batchnorm"}, "norm must be one of"),
    ({"activation": "gelu"}, "activation must be one of"),
    ({"norm_position": "middle"}, "norm_position"),
    ({"init_scale": -1}, "init_scale"),
    ({"hidden": (10, 0)}, "positive integers"),
    ({"norm": "group", "hidden": (10,), "groups": 4}, "divide"),
])
def test_mlp_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mlp(**kwargs)


def test_cnn_bad_input():
    with pytest.raises(ValueError, match="divisible"):
        cnn(channels=(4, 4, 4, 4))
    with pytest.raises(ValueError, match=r"\(N, 64\)"):
        cnn()(torch.randn(2, 10))


def test_norm_colors_are_distinct_matplotlib_colors():
    from matplotlib.colors import is_color_like, to_rgba

    assert {"none", "batch", "layer", "group", "renorm"} <= set(NORM_COLORS)
    assert all(is_color_like(c) for c in NORM_COLORS.values())
    assert len({to_rgba(c) for c in NORM_COLORS.values()}) == len(NORM_COLORS)


def test_norm_layer_checks_the_feature_count():
    from bn_course.models import norm_layer
    for norm in ("batch", "layer", "group", "none"):
        for bad in (None, 0, -1, 2.5):
            with pytest.raises(ValueError, match=f"num_features must be a positive integer .*got {bad!r}"):
                norm_layer(norm, bad)


def test_bad_models_widths_and_groups_raise_clear_errors():
    from bn_course.models import norm_layer, scale_init_
    for bad in (None, [1.0, 2.0], "abc", torch.randn(4)):
        name = type(bad).__name__
        with pytest.raises(TypeError, match=rf"^scale_init_: model must be a torch.nn.Module .*got {name}\."):
            scale_init_(bad, 1.0)
    for bad in (None, 100, 2.5, "abc"):
        with pytest.raises(TypeError, match=r"^hidden must be a sequence of positive integers, one width per layer"):
            mlp(hidden=bad)
        with pytest.raises(TypeError, match=r"^channels must be a sequence of positive integers, one width per layer"):
            cnn(channels=bad)
    with pytest.raises(ValueError, match=r"must hold positive integers"):
        mlp(hidden=(100, True))
    for bad in (None, [2], "4", 0, -1, 2.5, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match=r"^groups must be a positive integer \(the number of GroupNorm groups"):
            norm_layer("group", 8, groups=bad)
        with pytest.raises(ValueError, match=r"^groups must be a positive integer"):
            mlp(norm="group", groups=bad)
        with pytest.raises(ValueError, match=r"^groups must be a positive integer"):
            cnn(norm="group", groups=bad)
    assert isinstance(norm_layer("group", 8, groups=2), nn.GroupNorm)
    assert isinstance(mlp(hidden=[8, 8]), nn.Sequential)


def test_scale_init_rejects_a_bad_init_scale():
    from bn_course.models import scale_init_
    for bad in (None, [1.0], "abc", -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match=r"^scale_init_: init_scale must be a non-negative finite number"):
            scale_init_(mlp(), bad)
    assert isinstance(scale_init_(mlp(), 0), nn.Sequential)  # zero weights: allowed, as before

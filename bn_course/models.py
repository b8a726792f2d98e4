"""Small models whose normalization is a parameter: an MLP and a CNN for the digits.

API overview
------------
``mlp(in_features=64, hidden=(100, 100, 100), out_features=10, activation="relu",
norm="none", norm_position="before", init_scale=None, groups=4) -> nn.Sequential``
    Hidden layer ``i`` (1-based) is ``linear{i} -> norm{i} -> act{i}`` when
    ``norm_position="before"`` (the 2015 paper's placement: the norm sees the
    activation's input) or ``linear{i} -> act{i} -> norm{i}`` when ``"after"``.
    The last layer is ``out``. With ``norm="none"`` there is no ``norm{i}``.
``cnn(in_channels=1, channels=(16, 32), out_features=10, activation="relu", norm="none",
norm_position="before", init_scale=None, groups=4, image_size=8) -> nn.Sequential``
    ``images`` (accepts flat ``(N, in_channels * image_size**2)`` rows, e.g. the digits' (N, 64),
    or ``(N, in_channels, image_size, image_size)``), then per block ``conv{i} -> norm{i} -> act{i}
    -> pool{i}`` (3x3 convolutions, 2x2 max pooling), then ``gap`` (global average
    pooling), ``flatten`` and the linear ``out``.

Options shared by both:

- ``norm``: ``"none"``, ``"batch"`` (``nn.BatchNorm1d`` / ``nn.BatchNorm2d``), ``"layer"``
  (``nn.LayerNorm`` over the features; ``GroupNorm`` with one group for the CNN, i.e.
  over channels and pixels), ``"group"`` (``nn.GroupNorm(groups, C)``).
- A linear/conv layer that feeds a norm directly has no bias: the norm subtracts the
  mean (batch norm removes a per-feature bias exactly) and adds its own shift ``beta``.
- ``activation``: ``"relu"``, ``"sigmoid"``, ``"tanh"`` or ``"identity"``.
- ``init_scale``: ``None`` keeps PyTorch's default initialization; a number ``s`` draws
  every weight (hidden and output layers) from ``N(0, s**2 / fan_in)`` and sets biases
  to zero. ``s = 1`` keeps the variance of a linear layer's output equal to that of its
  input; ``s = sqrt(2)`` does so for ReLU layers (He initialization).

``norm_layer(norm, num_features, groups=4, spatial=False)``
    The normalization module for one of the ``norm`` names below (None for ``"none"``).
``scale_init_(model, init_scale) -> model``
    Draws every ``nn.Linear`` and ``nn.Conv2d`` weight from ``N(0, init_scale**2 / fan_in)`` and
    zeroes their biases, in place.

The module names (``linear1``, ``norm1``, ``act1``, ..., ``out``) are what
``bn_course.recording`` reports layers by.

``NORM_COLORS`` maps each normalization variant the notebooks plot (the ``norm`` names
above, plus ``"renorm"`` for Batch Renormalization) to its matplotlib color.
"""

import math
from collections import OrderedDict

import torch
from torch import nn

from bn_course._validate import check_num_features, check_positive_int, real_number
from bn_course.train import check_model

NORMS = ("none", "batch", "layer", "group")
# The course's one color convention for plotting normalization variants (tab:orange: "without BN, He init").
NORM_COLORS = {"none": "tab:red", "batch": "tab:blue", "layer": "tab:green", "group": "tab:purple", "renorm": "tab:brown"}
POSITIONS = ("before", "after")
ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "identity": nn.Identity}


def _check_choice(value, choices, name):
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}.")


def _check_options(activation, norm, norm_position, init_scale):
    _check_choice(activation, tuple(ACTIVATIONS), "activation")
    _check_choice(norm, NORMS, "norm")
    _check_choice(norm_position, POSITIONS, "norm_position")
    if init_scale is not None and (not isinstance(init_scale, (int, float)) or not init_scale > 0):
        raise ValueError(f"init_scale must be None or a positive number, got {init_scale!r}.")


def _check_widths(widths, name):
    if not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths):
        raise ValueError(f"{name} must hold positive integers, got {tuple(widths)!r}.")


def _as_widths(widths, name, example):
    """``widths`` (one per layer, e.g. ``hidden``) as a tuple; a clear error if it is not a sequence."""
    if isinstance(widths, (str, bytes)) or not hasattr(widths, "__iter__"):
        raise TypeError(f"{name} must be a sequence of positive integers, one width per layer "
                        f"(e.g. {name}={example}), got {type(widths).__name__} {widths!r}.")
    return tuple(widths)


def norm_layer(norm, num_features, groups=4, spatial=False):
    """The normalization module for ``num_features`` features (channels if ``spatial``)."""
    _check_choice(norm, NORMS, "norm")
    check_num_features(num_features)
    check_positive_int(groups, "groups", "the number of GroupNorm groups, dividing each layer's width")
    if norm == "batch":
        return nn.BatchNorm2d(num_features) if spatial else nn.BatchNorm1d(num_features)
    if norm == "layer":
        return nn.GroupNorm(1, num_features) if spatial else nn.LayerNorm(num_features)
    if norm == "group":
        if num_features % groups:
            raise ValueError(f"GroupNorm needs groups to divide the number of features: "
                             f"{num_features} features, groups={groups}.")
        return nn.GroupNorm(groups, num_features)
    return None


def scale_init_(model, init_scale):
    """Draw every nn.Linear and nn.Conv2d weight from N(0, init_scale**2 / fan_in); zero their biases."""
    check_model(model, "scale_init_")
    scale = real_number(init_scale)
    if scale is None or not 0 <= scale < math.inf:
        raise ValueError(f"scale_init_: init_scale must be a non-negative finite number (each weight's std is "
                         f"init_scale / sqrt(fan_in)), got {init_scale!r}.")
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            fan_in = int(math.prod(module.weight.shape[1:]))
            with torch.no_grad():
                module.weight.normal_(0.0, init_scale / math.sqrt(fan_in))
                if module.bias is not None:
                    module.bias.zero_()
    return model


def _block(layers, i, weight_layer, norm_module, activation, norm_position):
    """Append one hidden block, named linear/conv{i}, norm{i}, act{i}, in the chosen order."""
    kind = "conv" if isinstance(weight_layer, nn.Conv2d) else "linear"
    layers[f"{kind}{i}"] = weight_layer
    if norm_module is not None and norm_position == "before":
        layers[f"norm{i}"] = norm_module
    layers[f"act{i}"] = ACTIVATIONS[activation]()
    if norm_module is not None and norm_position == "after":
        layers[f"norm{i}"] = norm_module


def mlp(in_features=64, hidden=(100, 100, 100), out_features=10, activation="relu", norm="none",
        norm_position="before", init_scale=None, groups=4):
    """A multilayer perceptron: (N, in_features) -> logits (N, out_features).

    See the module docstring for the layer names and options.
    """
    _check_options(activation, norm, norm_position, init_scale)
    hidden = _as_widths(hidden, "hidden", "(100, 100)")
    _check_widths((in_features, out_features) + hidden, "in_features, out_features and hidden")
    layers = OrderedDict()
    width = in_features
    for i, h in enumerate(hidden, start=1):
        norm_module = norm_layer(norm, h, groups)
        feeds_norm = norm_module is not None and norm_position == "before"
        _block(layers, i, nn.Linear(width, h, bias=not feeds_norm), norm_module, activation, norm_position)
        width = h
    layers["out"] = nn.Linear(width, out_features)
    model = nn.Sequential(layers)
    return scale_init_(model, init_scale) if init_scale is not None else model


class AsImages(nn.Module):
    """Accept flat (N, C*H*W) rows or (N, C, H, W) images; return images."""

    def __init__(self, channels=1, size=8):
        super().__init__()
        self.shape = (channels, size, size)

    def forward(self, x):
        if x.dim() == 2 and x.shape[1] == math.prod(self.shape):
            return x.reshape(-1, *self.shape)
        if x.dim() == 4 and tuple(x.shape[1:]) == self.shape:
            return x
        raise ValueError(f"the CNN expects input of shape (N, {math.prod(self.shape)}) or "
                         f"(N, {', '.join(map(str, self.shape))}), got shape {tuple(x.shape)}.")

    def extra_repr(self):
        return f"shape={self.shape}"


def cnn(in_channels=1, channels=(16, 32), out_features=10, activation="relu", norm="none",
        norm_position="before", init_scale=None, groups=4, image_size=8):
    """A small convolutional network of Conv -> Norm -> Act -> MaxPool blocks.

    (N, in_channels * image_size**2) or (N, in_channels, image_size, image_size)
    -> logits (N, out_features). Each block halves the image size, so
    ``image_size`` must be divisible by ``2 ** len(channels)``.
    """
    _check_options(activation, norm, norm_position, init_scale)
    channels = _as_widths(channels, "channels", "(16, 32)")
    _check_widths((in_channels, out_features) + channels, "in_channels, out_features and channels")
    if image_size % (2 ** len(channels)):
        raise ValueError(f"{len(channels)} blocks halve the image {len(channels)} times, so image_size "
                         f"must be divisible by {2 ** len(channels)}; got image_size={image_size}.")
    layers = OrderedDict(images=AsImages(in_channels, image_size))
    width = in_channels
    for i, c in enumerate(channels, start=1):
        norm_module = norm_layer(norm, c, groups, spatial=True)
        feeds_norm = norm_module is not None and norm_position == "before"
        conv = nn.Conv2d(width, c, kernel_size=3, padding=1, bias=not feeds_norm)
        _block(layers, i, conv, norm_module, activation, norm_position)
        layers[f"pool{i}"] = nn.MaxPool2d(2)
        width = c
    layers["gap"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["out"] = nn.Linear(width, out_features)
    model = nn.Sequential(layers)
    return scale_init_(model, init_scale) if init_scale is not None else model



"""Activation and gradient statistics of a deep MLP at initialization, layer by layer.

Used by ``01_why_normalize`` to show, before any training, what goes wrong without
normalization: activations shrink, grow or saturate with depth, ReLU units die, and
the gradients that reach the first layers vanish or explode.

The network, for l = 1..depth (no biases, no normalization)::

    z_l = h_{l-1} @ W_l          # W_l: (fan_in, width), entries ~ N(0, init_scale**2 / fan_in)
    h_l = f(z_l)                 # f: tanh, sigmoid or relu;  h_0 = x: (N, in_features)

followed by a linear read-out ``logits = h_depth @ W_out`` (entries ~ N(0, 1 / width))
and the cross-entropy loss on the labels ``y``. ``init_scale = 1`` is LeCun's
initialization, ``init_scale = sqrt(2)`` is He's (made for ReLU).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bn_course.data import check_class_labels

ACTIVATIONS = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": torch.relu}
N_CLASSES = 10  # the digits: the read-out's outputs

# A unit is "saturated" where the slope of its activation is below this fraction of the
# activation's largest slope: almost no gradient flows back through it.
SATURATION_SLOPE = 0.05


@dataclass
class InitStatistics:
    """Per-layer statistics of one deep MLP at initialization; every array has shape (depth,).

    mean, std:  mean and standard deviation of the layer's output h_l over the batch and units
    saturated:  fraction of outputs where the activation's slope is < 5% of its maximum
                (for ReLU: where the slope is 0, i.e. the output is 0)
    dead:       fraction of units whose output is 0 for every example of the batch (ReLU only;
                0 for tanh and sigmoid)
    grad_rms:   root mean square of the loss gradient with respect to W_l
    h:          the outputs themselves, a list of (N, width) arrays, for histograms
                (empty when computed with keep_activations=False)
    """

    activation: str
    init_scale: float
    mean: np.ndarray
    std: np.ndarray
    saturated: np.ndarray
    dead: np.ndarray
    grad_rms: np.ndarray
    h: list

    @property
    def depth(self):
        return len(self.std)


def _check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}.")


def init_weights(depth, width, in_features, init_scale, seed=0, device=None):
    """Gaussian weights W_1..W_depth, then W_out, drawn in that order from one seeded generator.

    W_1: (in_features, width), W_2..W_depth: (width, width), entries ~ N(0, init_scale**2 / fan_in);
    W_out: (width, 10), entries ~ N(0, 1 / width). Returns (weights, W_out).
    """
    for name, value in (("depth", depth), ("width", width), ("in_features", in_features)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if not init_scale > 0:
        raise ValueError(f"init_scale must be positive, got {init_scale!r}.")
    g = torch.Generator().manual_seed(seed)
    weights, fan_in = [], in_features
    for _ in range(depth):
        weights.append(torch.randn(fan_in, width, generator=g) * init_scale / math.sqrt(fan_in))
        fan_in = width
    w_out = torch.randn(width, N_CLASSES, generator=g) / math.sqrt(width)
    return [w.to(device) for w in weights], w_out.to(device)


def forward_layers(x, weights, activation):
    """The outputs h_1..h_depth of every layer. x: (N, in_features) -> list of (N, width) tensors."""
    _check_activation(activation)
    f = ACTIVATIONS[activation]
    h, outputs = x, []
    for w in weights:
        h = f(h @ w)
        outputs.append(h)
    return outputs


def saturated_fraction(h, activation):
    """Fraction of the entries of h = f(z) where the slope f'(z) is below 5% of its maximum.

    tanh' = 1 - h**2 (max 1); sigmoid' = h (1 - h) (max 1/4); relu' = 0 where h = 0.
    """
    _check_activation(activation)
    _check_outputs(h, "saturated_fraction", "of any shape")
    if activation == "tanh":
        slope = (1 - h**2) / 1.0
    elif activation == "sigmoid":
        slope = h * (1 - h) / 0.25
    else:
        slope = (h > 0).to(h.dtype)
    return float((slope < SATURATION_SLOPE).to(torch.float32).mean())


def _check_outputs(h, where, layout):
    """h: a non-empty floating-point tensor of a layer's outputs (``layout`` says its shape)."""
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"{where}: h must be a torch.Tensor of layer outputs {layout}, got {type(h).__name__}.")
    if not h.is_floating_point():
        raise TypeError(f"{where}: h must be a floating-point tensor (an activation's output), got dtype {h.dtype}.")
    if h.numel() == 0:
        raise ValueError(f"{where}: h is empty, shape {tuple(h.shape)}: there is no output to measure.")


def dead_fraction(h):
    """Fraction of units (columns of h: (N, width)) whose output is 0 for every example."""
    _check_outputs(h, "dead_fraction", "(N, width)")
    if h.dim() != 2:
        raise ValueError(f"dead_fraction: h must have shape (N, width), one column per unit, "
                         f"got shape {tuple(h.shape)} ({h.dim()}D).")
    return float((h.amax(dim=0) <= 0).to(torch.float32).mean())


def weight_grad_rms(x, y, weights, w_out, activation):
    """RMS of dL/dW_l for each layer, L the mean cross-entropy of the read-out on labels y.

    x: (N, in_features), y: (N,) int64, weights: depth matrices W_l (in, out), w_out: (width, 10)
    -> a NumPy array (depth,), one RMS per hidden layer.
    """
    weights = [w.detach().clone().requires_grad_(True) for w in weights]
    h = forward_layers(x, weights, activation)[-1]
    loss = F.cross_entropy(h @ w_out, y)
    grads = torch.autograd.grad(loss, weights)
    return np.array([float(gw.pow(2).mean().sqrt()) for gw in grads])


def _check_data(x, y, n_classes=N_CLASSES):
    """x: (N, in_features) float tensor; y: (N,) int64 labels in 0..n_classes-1 (the read-out's outputs)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor of shape (N, in_features), got "
                         f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))} of dtype "
                         f"{getattr(x, 'dtype', None)}. Convert integer data first, e.g. x.float().")
    check_class_labels(y, n_classes, n=x.shape[0], outputs="the read-out")


def init_statistics(x, y, depth, width=256, init_scale=1.0, activation="tanh", seed=0,
                    keep_activations=True):
    """Statistics of every layer of a freshly initialized deep MLP on the batch (x, y).

    x: (N, in_features) float tensor (any float dtype), y: (N,) int64 labels in 0..9. Returns an InitStatistics;
    keep_activations=False leaves out the activations themselves (saves memory in sweeps).
    """
    _check_activation(activation)
    _check_data(x, y)
    weights, w_out = init_weights(depth, width, x.shape[1], init_scale, seed, device=x.device)
    # the weights are drawn in float32 (the same numbers for every dtype); compute in x's dtype
    weights, w_out = [w.to(x.dtype) for w in weights], w_out.to(x.dtype)
    with torch.no_grad():
        hs = forward_layers(x, weights, activation)
    return InitStatistics(
        activation=activation,
        init_scale=float(init_scale),
        mean=np.array([float(h.mean()) for h in hs]),
        std=np.array([float(h.std()) for h in hs]),
        saturated=np.array([saturated_fraction(h, activation) for h in hs]),
        dead=np.array([dead_fraction(h) if activation == "relu" else 0.0 for h in hs]),
        grad_rms=weight_grad_rms(x, y, weights, w_out, activation),
        h=[h.cpu().numpy() for h in hs] if keep_activations else [],
    )


def plot_layer_histograms(stats, n_panels=5, axes=None):
    """Histograms of h_l for n_panels layers spread from the first to the last.

    stats: an InitStatistics. Draws into ``axes`` (a sequence of n_panels matplotlib axes)
    or a new figure. Returns the figure.
    """
    import matplotlib.pyplot as plt

    layers = sorted(set(np.linspace(0, stats.depth - 1, min(n_panels, stats.depth)).round().astype(int)))
    if axes is None:
        fig, axes = plt.subplots(1, len(layers), figsize=(2.6 * len(layers), 2.6), sharey=True)
        axes = np.atleast_1d(axes)
    fig = axes[0].figure
    for ax, l in zip(axes, layers):
        values = stats.h[l].ravel()
        ax.hist(values, bins=40, color="tab:blue")
        ax.set_title(f"layer {l + 1}\nstd {stats.std[l]:.2g}", fontsize=9)
        ax.set_xlabel("activation $h_l$")
    axes[0].set_ylabel("count")
    fig.suptitle(f"{stats.activation}, init scale {stats.init_scale:.2g}, depth {stats.depth}", fontsize=10)
    fig.tight_layout()
    return fig

"""Look inside a network: what each layer sees and what flows back, through hooks.

API overview
------------
``named_activations(model)``, ``named_weight_layers(model)`` -> ``{name: module}``
    The activation modules (ReLU, Sigmoid, Tanh) and the weight layers (Linear, Conv) of
    ``model``, in order: the names the functions below report layers by.
``preserved_buffers(model)``
    Context manager: the running statistics (every buffer) are put back on exit, so a
    measurement in training mode does not change what the model will do later.
``activation_inputs(model, x, names=None, batch_stats=True) -> {name: tensor}``
    The input of every activation module (``act1``, ``act2``, ... in
    ``bn_course.models``): the pre-activations ``z`` that a sigmoid or ReLU sees, shape
    ``(N, features)`` or ``(N, C, H, W)``. ``batch_stats=True`` runs the model in
    training mode (a batch norm layer normalizes with the statistics of ``x``, as it does
    while training) without changing its running statistics; ``False`` runs it in
    evaluation mode.
``percentiles(z, q=(15, 50, 85), dim=None) -> tensor``
    The q-th percentiles of ``z`` (over all of it, or along ``dim``; e.g. ``dim=0`` of an
    ``(N, units)`` tensor gives one set of percentiles per unit, shape ``(len(q), units)``).
``saturation_fraction(z, activation) -> float``
    The fraction of pre-activations where the activation's slope is below 5% of its maximum,
    notebook 01's definition of saturated (|z| > 4.36 for a sigmoid, |z| > 2.18 for tanh), or
    ``relu`` input <= 0.
``layer_norms(model, x, y, q=(15, 50, 85)) -> list of dict``
    One row per weight layer (``linear1``, ..., ``out``; ``conv1``, ...) from one
    forward and backward pass in training mode (parameters' ``.grad`` and running
    statistics untouched): the root-mean-square of the layer's input (the activations
    it receives) and of the loss gradient with respect to that input, their
    percentiles, and the norm of the gradient of the layer's weight. The loss is the
    *summed* cross-entropy, so gradients are per example and do not shrink with N.
``PercentileTracker(model, x_probe, name="act3", q=(15, 50, 85), every=10)``
    A ``train(..., callback=...)`` callback: every ``every`` steps it records the
    percentiles of each unit's input to activation ``name`` on a fixed probe batch
    (``.steps``, ``.values`` of shape ``(records, len(q), units)``, ``.saturation``).
"""

import contextlib
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from bn_course._validate import check_positive_int
from bn_course.activations import ACTIVATIONS, saturated_fraction
from bn_course.train import check_logits, check_model

ACTIVATION_TYPES = (nn.ReLU, nn.Sigmoid, nn.Tanh)
WEIGHT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def named_activations(model):
    """name -> module for every activation module (ReLU, Sigmoid, Tanh) of ``model``, in order."""
    check_model(model, "named_activations")
    return OrderedDict((n, m) for n, m in model.named_modules() if isinstance(m, ACTIVATION_TYPES))


def named_weight_layers(model):
    """name -> module for every Linear/Conv layer of ``model``, in order."""
    check_model(model, "named_weight_layers")
    return OrderedDict((n, m) for n, m in model.named_modules() if isinstance(m, WEIGHT_TYPES))


def _select(modules, names, what):
    if names is None:
        return modules
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(f"no {what} named {missing} in the model; it has {list(modules)}.")
    return OrderedDict((n, modules[n]) for n in names)


def preserved_buffers(model):
    """Put every buffer (running_mean, running_var, num_batches_tracked) back on exit.

    A context manager: ``with preserved_buffers(model): ...``.
    """
    check_model(model, "preserved_buffers")
    return _preserved_buffers(model)


@contextlib.contextmanager
def _preserved_buffers(model):
    saved = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(saved[name])


@contextlib.contextmanager
def _mode(model, training):
    was_training = model.training
    model.train(training)
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def activation_inputs(model, x, names=None, batch_stats=True):
    """{activation name: its input z} for one forward pass of ``x``; see the module docstring."""
    check_model(model, "activation_inputs")
    modules = _select(named_activations(model), names, "activation")
    captured = OrderedDict()
    hooks = [m.register_forward_pre_hook(lambda _m, inputs, n=n: captured.__setitem__(n, inputs[0].detach()))
             for n, m in modules.items()]
    try:
        with preserved_buffers(model), _mode(model, batch_stats):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return captured


def percentiles(z, q=(15, 50, 85), dim=None):
    """The q-th percentiles (0..100) of ``z``: a tensor of shape (len(q),) or (len(q), ...) along ``dim``."""
    qs = torch.tensor([float(v) / 100 for v in q], dtype=torch.float32, device=z.device)
    if not ((qs >= 0) & (qs <= 1)).all():
        raise ValueError(f"percentiles must lie between 0 and 100, got {tuple(q)}.")
    z = z.detach().float()
    return torch.quantile(z.flatten(), qs) if dim is None else torch.quantile(z, qs, dim=dim)


def saturation_fraction(z, activation):
    """Fraction of pre-activations ``z`` (any shape) where ``activation`` passes (almost) no gradient.

    Notebook 01's definition (``bn_course.activations.saturated_fraction``), applied to f(z): the
    slope is below 5% of its maximum. sigmoid: |z| > 4.36; tanh: |z| > 2.18; relu: z <= 0.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}.")
    return saturated_fraction(ACTIVATIONS[activation](z.detach()), activation)


def _rms(t):
    return float(t.detach().float().pow(2).mean().sqrt())


def layer_norms(model, x, y, q=(15, 50, 85)):
    """Per weight layer: size of its input and of the loss gradient there; see the module docstring."""
    check_model(model, "layer_norms")
    modules = named_weight_layers(model)
    inputs = OrderedDict()
    hooks = [m.register_forward_pre_hook(lambda _m, args, n=n: inputs.__setitem__(n, args[0]))
             for n, m in modules.items()]
    try:
        with preserved_buffers(model), _mode(model, True), torch.enable_grad():
            x = x.detach().requires_grad_(True)
            out = model(x)
            check_logits(out, y, "layer_norms")
            loss = F.cross_entropy(out, y, reduction="sum")
            names = list(inputs)
            weights = [modules[n].weight for n in names]
            grads = torch.autograd.grad(loss, [inputs[n] for n in names] + weights)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for i, name in enumerate(names):
        h, g_h, g_w = inputs[name], grads[i], grads[len(names) + i]
        rows.append({
            "layer": i + 1,
            "name": name,
            "activation_rms": _rms(h),
            "gradient_rms": _rms(g_h),
            "weight_grad_norm": float(g_w.norm()),
            "activation_percentiles": percentiles(h, q).tolist(),
            "gradient_percentiles": percentiles(g_h, q).tolist(),
        })
    return rows


class PercentileTracker:
    """Callback for ``bn_course.train.train``: percentiles of one activation's input over training.

    model:   the model being trained
    x_probe: a fixed batch (N, ...) the percentiles are measured on (e.g. the test set)
    name:    which activation module's input to record ("act3" = last hidden layer of the
             default MLP)
    q:       the percentiles, 0..100
    every:   record every this many steps (and once at construction, step 0)
    activation: for the saturation fraction ("sigmoid", "tanh" or "relu"); None to skip

    After training: ``steps`` (list), ``values`` (tensor (records, len(q), units)),
    ``saturation`` (list of floats, if ``activation`` is given).
    """

    def __init__(self, model, x_probe, name="act3", q=(15, 50, 85), every=10, activation=None):
        check_model(model, "PercentileTracker")
        check_positive_int(every, "every")
        self.model, self.x_probe, self.name, self.q = model, x_probe, name, tuple(q)
        self.every, self.activation = every, activation
        _select(named_activations(model), [name], "activation")
        self.steps, self._values, self.saturation = [], [], []
        self.record(0)

    def record(self, step):
        z = activation_inputs(self.model, self.x_probe, names=[self.name])[self.name]
        z = z.reshape(z.shape[0], -1) if z.dim() == 2 else z.transpose(0, 1).reshape(z.shape[1], -1).T
        self.steps.append(step)
        self._values.append(percentiles(z, self.q, dim=0).cpu())
        if self.activation is not None:
            self.saturation.append(saturation_fraction(z, self.activation))

    @property
    def values(self):
        """(records, len(q), units): percentile ``k`` of unit ``j`` at record ``r``."""
        return torch.stack(self._values)

    def __call__(self, step, **_):
        if step % self.every == 0:
            self.record(step)
        return False

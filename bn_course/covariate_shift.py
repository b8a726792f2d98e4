"""Internal covariate shift, measured; and "noisy" batch norm.

The 2015 paper says batch norm works by reducing *internal covariate shift* (ICS): the
change of a layer's input distribution caused by updates of the layers before it.
Santurkar et al. (2018, "How does batch normalization help optimization?") turned that
sentence into two experiments, which notebook 06 repeats at laptop scale:

1. **ICS measured through the gradient.** At one training step, let ``G_k`` be the
   gradient of the loss with respect to the weights of layer ``k``. Now let every layer
   *before* ``k`` take its SGD step on the same batch, and recompute the gradient of
   layer ``k``: ``G'_k``. If the earlier updates barely change what layer ``k`` should
   do, ``G'_k`` is close to ``G_k``. The ICS of layer ``k`` is ``||G_k - G'_k||``
   (also reported relative to ``||G_k||``) and the cosine between them.

2. **Noisy BN.** After every BN layer, distort the output with a random per-channel
   scale and shift drawn afresh at every training step (:class:`NoisyShift`). The input
   distribution of every later layer then jumps at every step -- far more covariate
   shift than a plain network has. If BN helped *because* it removes that shift, the
   noisy network should train badly.
"""

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from bn_course import seed_everything
from bn_course._validate import check_num_features, check_positive_int, real_number
from bn_course.data import check_class_labels, load_digits_split
from bn_course.models import mlp
from bn_course.recording import WEIGHT_TYPES, named_weight_layers
from bn_course.torch_bn import is_batchnorm
from bn_course.train import check_model, train


def _check_model_input(model, x):
    """x must be a float tensor of at least 2 rows that the model's first weight layer accepts.

    x must have the dtype of the first Linear/Conv layer's weight. If that layer is an ``nn.Linear``,
    each example must hold ``in_features`` numbers: x is (N, in_features) (or images that the model
    flattens first). For a first Conv layer the shape is not checked (the course's CNN accepts flat
    rows or images).
    """
    check_model(model)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}. "
                        "Convert it first, e.g. x.float().")
    first = next((m for m in model.modules() if isinstance(m, WEIGHT_TYPES)), None)
    if first is not None and first.weight.dtype != x.dtype:
        raise TypeError(f"x has dtype {x.dtype} but the model's weights have dtype {first.weight.dtype}; "
                        f"convert one so that they match, e.g. x.to({first.weight.dtype}).")
    if x.dim() == 0 or x.shape[0] < 2:
        raise ValueError(f"a batch of at least 2 examples is needed (the variance of a single example is "
                         f"undefined), got x of shape {tuple(x.shape)}.")
    if isinstance(first, nn.Linear) and x[0].numel() != first.in_features:
        raise ValueError(f"each example of x must hold {first.in_features} numbers (the model's first layer "
                         f"is Linear({first.in_features}, {first.out_features})): x should have shape "
                         f"(N, {first.in_features}), got {tuple(x.shape)}.")


def _check_labels(model, y):
    """y must be (N,) int64 class labels in 0..C-1, C the out_features of the model's last Linear layer."""
    last = [m for m in model.modules() if isinstance(m, WEIGHT_TYPES)][-1:]
    n_classes = last[0].out_features if last and isinstance(last[0], nn.Linear) else None
    check_class_labels(y, n_classes, outputs="the model")


def _check_model_and_batch(model, x, y, labels=True):
    """The checks of every measurement on one batch: model, x (see :func:`_check_model_input`), y.

    labels: True when the loss is the cross-entropy, so y must hold class labels
    (:func:`_check_labels`); False for another ``loss_fn``, whose targets may be anything.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"x and y must be torch tensors, got {type(x).__name__} and {type(y).__name__}.")
    _check_model_input(model, x)
    if y.dim() == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same number of examples, got {x.shape[0]} and "
                         f"{y.shape[0] if y.dim() else 'a 0-dim y'}.")
    if labels:
        _check_labels(model, y)


def weight_layers(model):
    """The layers with a weight matrix (Linear, Conv), in the order they were registered.

    For models built as (nested) ``nn.Sequential``, registration order is forward order.
    Returns a list of ``(name, module)``.
    """
    layers = list(named_weight_layers(model).items())
    if not layers:
        raise ValueError("the model has no Linear or Conv layer to measure.")
    return layers


def _params_before(model, weight):
    """Every parameter registered before ``weight``: the layers the forward pass goes through first."""
    before = []
    for p in model.parameters():
        if p is weight:
            return before
        before.append(p)
    raise ValueError("weight is not a parameter of the model.")


def _weight_grad(model, x, y, weight, loss_fn):
    loss = loss_fn(model(x), y)
    (g,) = torch.autograd.grad(loss, [weight])
    return g.detach()


def internal_covariate_shift(model, x, y, lr, loss_fn=F.cross_entropy):
    """ICS of every weight layer but the first, at the model's current parameters.

    model: a classifier; it is not modified (the measurement works on a copy, in training mode).
    x: (N, ...) one batch; y: (N,) its labels; lr: the SGD step the earlier layers take.

    For layer k (k >= 1): ``G_k`` = d loss / d W_k now; ``G'_k`` = the same gradient after every
    parameter before ``W_k`` took the step ``p <- p - lr * dloss/dp`` on the same batch.

    Returns a dict of lists, one entry per measured layer:
    ``layer`` (names), ``diff_norm`` = ||G - G'||, ``rel_diff`` = ||G - G'|| / ||G||,
    ``cosine`` = <G, G'> / (||G|| ||G'||).
    """
    _check_model_and_batch(model, x, y, labels=loss_fn is F.cross_entropy)
    if real_number(lr) is None or not real_number(lr) > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}.")
    lr = real_number(lr)  # a Python float, also for np.float32(0.1) or torch.tensor(0.1)
    work = copy.deepcopy(model).train()
    params = list(work.parameters())
    loss = loss_fn(work(x), y)
    grads = dict(zip(map(id, params), torch.autograd.grad(loss, params)))
    result = {"layer": [], "diff_norm": [], "rel_diff": [], "cosine": []}
    for k, (name, layer) in enumerate(weight_layers(work)):
        if k == 0:
            continue  # nothing comes before the first layer
        weight = layer.weight
        g_before = grads[id(weight)]
        earlier = _params_before(work, weight)
        saved = [p.detach().clone() for p in earlier]
        with torch.no_grad():
            for p in earlier:
                p.sub_(lr * grads[id(p)])
        g_after = _weight_grad(work, x, y, weight, loss_fn)
        with torch.no_grad():
            for p, s in zip(earlier, saved):
                p.copy_(s)
        diff = (g_before - g_after).norm().item()
        norm_before = g_before.norm().item()
        cos = F.cosine_similarity(g_before.flatten(), g_after.flatten(), dim=0, eps=1e-12).item()
        result["layer"].append(name)
        result["diff_norm"].append(diff)
        result["rel_diff"].append(diff / max(norm_before, 1e-12))
        result["cosine"].append(cos)
    return result


class NoisyShift(nn.Module):
    """A random per-channel scale and shift, drawn afresh at every training forward pass.

    In training mode: ``out[:, c] = scale[c] * x[:, c] + shift[c]`` with, at every call,
    ``shift[c] ~ Uniform(-max_shift, max_shift)`` (non-zero mean) and
    ``log(scale[c]) ~ Uniform(-log(max_scale), log(max_scale))`` (non-unit variance).
    The mean and variance of every channel therefore jump from step to step: the layer
    after it sees a new input distribution at every step. In evaluation mode it is the identity.

    x: (N, C, *spatial) -> out: same shape.
    """

    def __init__(self, num_features, max_shift=1.0, max_scale=2.0, generator=None):
        super().__init__()
        check_num_features(num_features)
        shift, scale = real_number(max_shift), real_number(max_scale)
        if shift is None or not 0 <= shift < math.inf:
            raise ValueError(f"max_shift must be >= 0 and finite, got {max_shift!r}.")
        if scale is None or not 1 <= scale < math.inf:
            raise ValueError(f"max_scale must be >= 1 and finite (scales are drawn in [1/max_scale, max_scale]), "
                             f"got {max_scale!r}.")
        self.num_features = num_features
        self.max_shift = float(max_shift)
        self.max_scale = float(max_scale)
        self.generator = generator

    def extra_repr(self):
        return f"{self.num_features}, max_shift={self.max_shift}, max_scale={self.max_scale}"

    def draw(self, device=None):
        """One (scale, shift) pair, each of shape (C,)."""
        gen_device = self.generator.device if self.generator is not None else None
        u = torch.rand(2, self.num_features, generator=self.generator, device=gen_device)
        shift = (2 * u[0] - 1) * self.max_shift
        scale = torch.exp((2 * u[1] - 1) * math.log(self.max_scale))
        return scale.to(device), shift.to(device)

    def forward(self, x):
        if not x.is_floating_point():
            raise TypeError(f"NoisyShift expects a floating-point input (it scales and shifts it), got dtype "
                            f"{x.dtype}. Convert it first, e.g. x.float().")
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"NoisyShift({self.num_features}) expects an input of shape (N, {self.num_features}, ...), "
                             f"got {tuple(x.shape)}.")
        if not self.training:
            return x
        scale, shift = self.draw(x.device)
        view = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.to(x.dtype).view(view) + shift.to(x.dtype).view(view)


def add_noise_after(model, where="batchnorm", max_shift=1.0, max_scale=2.0, generator=None):
    """A copy of ``model`` with a :class:`NoisyShift` right after each chosen layer.

    where: "batchnorm" -- after every BN layer (the noisy-BN network);
           "linear"    -- after every Linear/Conv layer but the last (the same noise in a
                          network without BN, at the same place: the pre-activations).
    The original model is not modified.
    """
    if where not in ("batchnorm", "linear"):
        raise ValueError(f"where must be 'batchnorm' or 'linear', got {where!r}.")
    noisy = copy.deepcopy(model)
    if where == "batchnorm":
        targets = [m for m in noisy.modules() if is_batchnorm(m)]
    else:
        targets = [m for _, m in weight_layers(noisy)][:-1]
    if not targets:
        raise ValueError(f"the model has no {'BN' if where == 'batchnorm' else 'hidden Linear/Conv'} layer "
                         "to put noise after.")
    wanted = set(map(id, targets))

    def channels(m):
        return m.num_features if is_batchnorm(m) else m.weight.shape[0]

    def rewrite(parent):
        for name, child in parent.named_children():
            if id(child) in wanted:
                noise = NoisyShift(channels(child), max_shift, max_scale, generator)
                setattr(parent, name, nn.Sequential(child, noise))
            else:
                rewrite(child)

    rewrite(noisy)
    return noisy


class LayerInputMoments:
    """Record, at every training forward pass, the per-unit mean and std of one layer's input.

    layer: a module (e.g. ``weight_layers(model)[2][1]``, the third weight layer). A forward
    pre-hook sees the batch the layer receives while the model is in training mode.
    After training: ``means`` and ``stds``, tensors of shape (T, C); call ``remove()`` when done.
    """

    def __init__(self, layer):
        self._means, self._stds = [], []
        self._hook = layer.register_forward_pre_hook(self._record)

    def _record(self, module, inputs):
        if module.training:
            z = inputs[0].detach()
            z = z.transpose(0, 1).reshape(z.shape[1], -1)  # (C, N * spatial)
            self._means.append(z.mean(dim=1).cpu())
            self._stds.append(z.std(dim=1).cpu())

    @property
    def means(self):
        return torch.stack(self._means)

    @property
    def stds(self):
        return torch.stack(self._stds)

    def remove(self):
        self._hook.remove()


def input_drift(means, stds):
    """How far a layer's input distribution moves from one step to the next, in units of its spread.

    means, stds: (T, C) per-step, per-unit batch mean and std (from :class:`LayerInputMoments`).
    Returns mean over steps and units of ``|mean_t - mean_{t-1}|``, divided by the average std.
    Some drift is always there (every step sees a new batch); extra drift means shifting inputs.
    """
    if tuple(means.shape) != tuple(stds.shape) or means.dim() != 2:
        raise ValueError(f"means and stds must both have shape (T, C), one row per step and one column per unit, "
                         f"got {tuple(means.shape)} and {tuple(stds.shape)}.")
    if means.shape[0] < 2:
        raise ValueError(f"need at least 2 recorded steps to measure a drift, got {means.shape[0]}.")
    return ((means[1:] - means[:-1]).abs().mean() / stds.mean().clamp_min(1e-12)).item()


def _digits(data, device):
    return load_digits_split(device=device) if data is None else data


class Snapshots:
    """A ``train(..., callback=...)`` callback that keeps snapshots to measure after training.

    Every ``every`` steps it stores a copy of the model (just updated) and the batch ``(x, y)``
    that step trained on. Iterating gives ``(step, model, x, y)``; the copies are independent of
    the model that goes on training, so any measurement can be made later, on the same points.
    """

    def __init__(self, every=50):
        check_positive_int(every, "every")
        self.every = every
        self.steps, self.models, self.batches = [], [], []

    def __call__(self, step, model, x, y, **_):
        if step % self.every == 0:
            self.steps.append(step)
            self.models.append(copy.deepcopy(model))
            self.batches.append((x, y))
        return False

    def __len__(self):
        return len(self.steps)

    def __iter__(self):
        for step, model, (x, y) in zip(self.steps, self.models, self.batches):
            yield step, model, x, y


def ics_along_training(snapshots, lr):
    """:func:`internal_covariate_shift` at every snapshot (:class:`Snapshots`) of a training run.

    lr: the step the earlier layers take (use the training learning rate).
    Returns a dict: ``steps`` (T,), ``layers`` (L names), ``rel_diff``, ``cosine``, ``diff_norm``
    (each a (T, L) tensor).
    """
    if len(snapshots) == 0:
        raise ValueError("no snapshots to measure (was the run shorter than `every` steps?).")
    rows = {"rel_diff": [], "cosine": [], "diff_norm": []}
    for _, model, x, y in snapshots:
        r = internal_covariate_shift(model, x, y, lr)
        for key in rows:
            rows[key].append(r[key])
    out = {"steps": list(snapshots.steps), "layers": r["layer"]}
    out.update({key: torch.tensor(value) for key, value in rows.items()})
    return out


NOISE_VARIANTS = ("none", "batch", "noisy batch", "noisy none")


def train_and_record(variant, seed=0, steps=400, lr=0.1, max_shift=1.0, max_scale=2.0, eval_every=25,
                     probe=2, hidden=(100, 100, 100), callback=None, data=None, device=None, progress=False,
                     init_scale=None):
    """Train one network of notebook 06 and record the input of one layer at every step.

    variant: "none" (no BN), "batch" (BN), "noisy batch" (BN, then :class:`NoisyShift` after each BN),
             "noisy none" (no BN, the same noise after each hidden Linear) -- the noisy-BN experiment.
    probe: index of the weight layer whose input distribution is recorded (2 = the third).
    init_scale: None for PyTorch's default initialization, or ``models.mlp``'s s (sqrt(2): He's).
    callback: an extra ``train`` callback, e.g. :class:`Snapshots` to measure later.
    Test accuracy is evaluated every ``eval_every`` steps (the training set is not evaluated).
    Returns a dict: ``history`` and ``drift`` (:func:`input_drift` of the probe layer's input over
    all training steps), plus ``means`` (T, C) of that input, for plots.
    """
    if variant not in NOISE_VARIANTS:
        raise ValueError(f"variant must be one of {NOISE_VARIANTS}, got {variant!r}.")
    if not (isinstance(steps, int) and steps >= 2):
        raise ValueError(f"steps must be an integer >= 2: the drift compares the probe layer's input "
                         f"from one step to the next, got {steps!r}.")
    data = _digits(data, device)
    seed_everything(seed)
    norm = "batch" if "batch" in variant else "none"
    model = mlp(hidden=hidden, norm=norm, init_scale=init_scale)
    if variant.startswith("noisy"):
        generator = torch.Generator().manual_seed(10_000 + seed)
        model = add_noise_after(model, "batchnorm" if norm == "batch" else "linear", max_shift, max_scale, generator)
    layers = weight_layers(model)
    if not (isinstance(probe, int) and 0 <= probe < len(layers)):
        raise ValueError(f"probe must be the index of a weight layer, 0..{len(layers) - 1} for this model "
                         f"({', '.join(name for name, _ in layers)}), got {probe!r}.")
    recorder = LayerInputMoments(layers[probe][1])
    try:
        history = train(model, data, steps, lr, seed=seed, device=device, progress=progress, eval_every=eval_every,
                        callback=callback, eval_train=False)
    finally:
        recorder.remove()
    return {"history": history, "drift": input_drift(recorder.means, recorder.stds), "means": recorder.means}

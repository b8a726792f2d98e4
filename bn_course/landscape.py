"""The loss landscape along the gradient, scale invariance and the effective learning rate.

Two ideas that notebook 06 measures:

1. **Smoothness along the gradient** (Santurkar et al., 2018). At the current parameters
   ``theta`` with gradient ``g`` (one batch, training mode), walk along the gradient:
   ``theta_s = theta - s * g`` for a few step sizes ``s``. Record

   - the loss ``L(theta_s)``: its *range* over the step sizes says how much the loss can
     change in one step (small range = a step is safe);
   - the gradient change ``||grad L(theta_s) - g||``: how well the gradient here predicts
     the gradient one step away;
   - the *effective smoothness* ``max_s ||grad L(theta_s) - g|| / ||theta_s - theta||``:
     a measured, local version of the beta in "the gradient is beta-Lipschitz".

2. **Scale invariance.** A weight matrix ``W`` that feeds a BN layer can be multiplied by
   any ``c > 0`` without changing the output: ``BN(c W x) = BN(W x)``. Differentiating that
   identity gives ``grad L(c W) = grad L(W) / c`` and ``<grad L(W), W> = 0``. So plain SGD
   (no weight decay) can only make ``||W||`` grow: ``||W_{t+1}||^2 = ||W_t||^2 + lr^2 ||g_t||^2``,
   and the step that matters -- the change of direction of ``W`` -- has size about
   ``lr / ||W||^2`` times the gradient of the normalized weights: the *effective learning rate*.
"""

import copy

import torch
import torch.nn.functional as F

from bn_course import seed_everything
from bn_course._validate import check_positive_int, real_number
from bn_course.covariate_shift import _check_model_and_batch, _digits
from bn_course.models import mlp
from bn_course.recording import WEIGHT_TYPES
from bn_course.torch_bn import is_batchnorm
from bn_course.train import check_logits, check_model, train


def loss_and_gradient(model, x, y, loss_fn=F.cross_entropy):
    """The loss on one batch and its gradient with respect to every parameter, flattened.

    model is run as it is (training mode uses batch statistics). Returns (loss: float, g: (P,)).
    """
    check_model(model, "loss_and_gradient")
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x)
    if loss_fn is F.cross_entropy:
        check_logits(out, y, "loss_and_gradient")
    loss = loss_fn(out, y)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])
    return loss.item(), flat.detach()


def _set_params(model, flat):
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        i = 0
        for p in params:
            n = p.numel()
            p.copy_(flat[i:i + n].view_as(p))
            i += n


def loss_along_gradient(model, x, y, step_sizes, loss_fn=F.cross_entropy):
    """Walk from the current parameters along minus the gradient and measure the landscape.

    model: not modified (a copy is measured, in training mode). x: (N, ...); y: (N,).
    step_sizes: a sequence of positive floats s; the points visited are theta - s * g.

    Returns a dict: ``step_sizes`` (S,), ``loss`` (S,) the loss at each point, ``loss0`` the loss
    here, ``grad_change`` (S,) ``||grad L(theta - s g) - g||``, ``distance`` (S,) ``s * ||g||``,
    ``grad_norm`` ``||g||``.
    """
    _check_model_and_batch(model, x, y, labels=loss_fn is F.cross_entropy)
    steps = [float(s) for s in step_sizes]
    if not steps or any(not (s > 0) for s in steps):
        raise ValueError(f"step_sizes must be a non-empty sequence of positive numbers, got {list(step_sizes)!r}.")
    work = copy.deepcopy(model).train()
    theta = torch.cat([p.detach().reshape(-1) for p in work.parameters() if p.requires_grad]).clone()
    loss0, g = loss_and_gradient(work, x, y, loss_fn)
    out = {"step_sizes": steps, "loss": [], "grad_change": [], "distance": [], "loss0": loss0,
           "grad_norm": g.norm().item()}
    for s in steps:
        _set_params(work, theta - s * g)
        loss_s, g_s = loss_and_gradient(work, x, y, loss_fn)
        out["loss"].append(loss_s)
        out["grad_change"].append((g_s - g).norm().item())
        out["distance"].append(s * out["grad_norm"])
    return out


def landscape_summary(walk):
    """Three numbers from one :func:`loss_along_gradient` walk.

    loss_range: max - min of the loss over the step sizes (the current loss included);
    max_grad_change: the largest ``||grad L(theta_s) - g||``;
    smoothness: effective beta = max over s of grad_change / distance (0 if the gradient is 0).
    """
    losses = [walk["loss0"]] + list(walk["loss"])
    ratios = [c / d for c, d in zip(walk["grad_change"], walk["distance"]) if d > 0]
    return {
        "loss_range": max(losses) - min(losses),
        "max_grad_change": max(walk["grad_change"]),
        "smoothness": max(ratios) if ratios else 0.0,
    }


def weights_feeding_batchnorm(model):
    """The Linear/Conv layers whose output goes straight into a BN layer.

    Looks at the leaf modules in registration order (forward order for Sequential models)
    and returns ``(name, module)`` for each weight layer whose next leaf is a BN.
    """
    check_model(model, "weights_feeding_batchnorm")
    leaves = [(name, m) for name, m in model.named_modules() if not list(m.children())]
    found = []
    for (name, m), (_, nxt) in zip(leaves, leaves[1:]):
        if isinstance(m, WEIGHT_TYPES) and is_batchnorm(nxt):
            found.append((name, m))
    return found


def scale_invariance(model, x, y, layer, c, loss_fn=F.cross_entropy):
    """Multiply one layer's weight by ``c`` and compare loss and gradient before and after.

    model: not modified; a copy in training mode is measured. layer: a module of ``model``
    with a ``weight`` (e.g. from :func:`weights_feeding_batchnorm`). c: a positive float.

    Returns a dict: ``loss``, ``loss_scaled`` (the loss with W -> c W), ``grad_norm``,
    ``grad_norm_scaled`` (for a scale-invariant W this is grad_norm / c), and ``radial_cosine``
    = cos(grad, W) (0 for a scale-invariant W: the gradient is orthogonal to W).
    """
    _check_model_and_batch(model, x, y, labels=loss_fn is F.cross_entropy)
    if real_number(c) is None or not real_number(c) > 0:
        raise ValueError(f"c must be a positive number, got {c!r}.")
    c = real_number(c)  # a Python float, also for np.float32(2.0) or torch.tensor(2.0)
    names = {id(m): n for n, m in model.named_modules()}
    if id(layer) not in names or not isinstance(getattr(layer, "weight", None), torch.Tensor):
        raise ValueError("layer must be a module of model that has a weight.")
    work = copy.deepcopy(model).train()
    w = work.get_submodule(names[id(layer)]).weight

    def measure():
        loss = loss_fn(work(x), y)
        (g,) = torch.autograd.grad(loss, [w])
        return loss.item(), g

    loss, g = measure()
    radial = F.cosine_similarity(g.flatten(), w.detach().flatten(), dim=0, eps=1e-30).item()
    with torch.no_grad():
        w.mul_(c)
    loss_scaled, g_scaled = measure()
    return {"loss": loss, "loss_scaled": loss_scaled, "grad_norm": g.norm().item(),
            "grad_norm_scaled": g_scaled.norm().item(), "radial_cosine": radial}


def weight_norm(layer):
    """Frobenius norm ``||W||`` of a layer's weight, as a float."""
    return layer.weight.detach().norm().item()


def effective_learning_rate(lr, norm):
    """The step size a scale-invariant weight really takes: ``lr / ||W||^2``.

    norm: a number or a tensor of norms (any shape) -> the same shape."""
    smallest = float(norm.min()) if isinstance(norm, torch.Tensor) and norm.numel() else real_number(norm)
    if smallest is None or not smallest > 0:
        raise ValueError(f"the weight norm must be positive, got {norm!r}.")
    return lr / norm ** 2


class WeightNormRecorder:
    """Record ``||W||`` of chosen layers at each call; use it as a training callback.

    recorder = WeightNormRecorder([layer1, layer2]); recorder(step) appends the norms.
    ``recorder.steps`` (T,), ``recorder.norms`` (T, L) as nested lists.
    """

    def __init__(self, layers):
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("no layers to record (does the model have weights feeding a BN layer?).")
        self.steps = []
        self.norms = []

    def __call__(self, step, *args, **kwargs):
        self.steps.append(int(step))
        self.norms.append([weight_norm(m) for m in self.layers])


def predicted_norm_growth(norm_sq, lr, grad_norm):
    """Plain SGD on a scale-invariant weight: ``||W_{t+1}||^2 = ||W_t||^2 + lr^2 ||g_t||^2``."""
    return norm_sq + lr ** 2 * grad_norm ** 2


def landscape_along_training(snapshots, step_sizes):
    """Walk along the gradient (:func:`loss_along_gradient`) at every snapshot of a training run.

    snapshots: a ``bn_course.covariate_shift.Snapshots`` (each holds a model copy and the batch
    that step trained on). step_sizes: the step sizes of each walk, e.g. ``lr * f`` for f in (0.5, 1, 2, 4).
    Returns a dict: ``steps`` (T,), ``loss_range``, ``max_grad_change``, ``smoothness`` and
    ``grad_norm`` (each a (T,) tensor; see :func:`landscape_summary`).
    """
    if len(snapshots) == 0:
        raise ValueError("no snapshots to measure (was the run shorter than `every` steps?).")
    rows = {"loss_range": [], "max_grad_change": [], "smoothness": [], "grad_norm": []}
    for _, model, x, y in snapshots:
        walk = loss_along_gradient(model, x, y, step_sizes)
        rows["grad_norm"].append(walk["grad_norm"])
        for key, value in landscape_summary(walk).items():
            rows[key].append(value)
    out = {key: torch.tensor(value) for key, value in rows.items()}
    out["steps"] = list(snapshots.steps)
    return out


def weight_norm_experiment(seed=0, steps=400, lr=0.1, weight_decay=0.0, hidden=(100, 100, 100),
                           data=None, device=None, progress=False):
    """Train a BN MLP with plain SGD and record, every step, the norm of each weight feeding a BN.

    Returns a dict: ``layers`` (names), ``norms`` (T+1, L) ``||W||`` before training and after
    each step, ``grad_norms`` (T, L) ``||g||`` of the gradient each step used,
    ``effective_lr`` (T+1, L) ``lr / ||W||^2``, and ``history``.
    """
    check_positive_int(steps, "steps")  # before steps // 20 is taken
    data = _digits(data, device)
    seed_everything(seed)
    model = mlp(hidden=hidden, norm="batch")
    feeding = weights_feeding_batchnorm(model)
    recorder = WeightNormRecorder([m for _, m in feeding])
    recorder(0)
    grad_norms = []

    def record(step, **_):
        grad_norms.append([m.weight.grad.norm().item() for _, m in feeding])
        recorder(step)

    history = train(model, data, steps, lr, weight_decay=weight_decay, seed=seed, device=device,
                    progress=progress, callback=record, eval_every=max(1, steps // 20))
    norms = torch.tensor(recorder.norms, dtype=torch.float64)
    return {"layers": [n for n, _ in feeding], "norms": norms,
            "grad_norms": torch.tensor(grad_norms, dtype=torch.float64),
            "effective_lr": effective_learning_rate(lr, norms), "history": history}

"""Tools and experiments for the practical traps of batch norm (notebook 08).

- ``batchnorm_layers``: the batch norm layers of a model, in order;
- ``trained_bn_mlp``: the notebook's model, an MLP with BN before each ReLU, trained with plain SGD;
- ``shift_domain``: the shifted domain of the fine-tuning experiment (contrast and brightness changed);
- ``predict_in_train_mode``: what a model predicts when ``model.eval()`` was forgotten;
- ``precise_bn_stats``: replace the lagging running averages by exact population statistics;
- ``single_class_batches``: a non-i.i.d. minibatch stream, every batch drawn from one class;
- ``train_on_stream``: a minimal SGD loop over any such stream;
- ``FrozenBatchNorm`` / ``freeze_batchnorm``: batch norm turned into a fixed per-channel
  affine map, for fine-tuning with BN frozen;
- the notebook's experiments (``forgetting_eval``, ``running_stat_lag``, ``non_iid_training``,
  ``fine_tuning_shifted``, ``bn_placement``), functions of ``data`` and ``seed`` so that the tests
  can rerun them with other seeds.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn

import bn_course
from bn_course._validate import check_positive_int
from bn_course.data import batches
from bn_course.fold import bn_scale_shift, check_running_stats
from bn_course.models import mlp
from bn_course.torch_bn import check_layer_input, is_batchnorm, per_channel
from bn_course.train import check_model, evaluate, train


def batchnorm_layers(model):
    """The batch norm layers of ``model``, in the order ``model.modules()`` lists them."""
    check_model(model, "batchnorm_layers")
    return [m for m in model.modules() if is_batchnorm(m)]


@torch.no_grad()
def predict_in_train_mode(model, x, batch_size):
    """Predicted classes when a model is (wrongly) run in training mode, ``batch_size`` rows at a time.

    Batch norm then normalizes with each batch's own statistics. Runs on a copy, so the
    model's running statistics are not touched. x: (N, ...) -> (N,) int64.
    """
    check_model(model, "predict_in_train_mode")
    clone = copy.deepcopy(model).train()
    return torch.cat([clone(x[i:i + batch_size]).argmax(dim=1) for i in range(0, int(x.shape[0]), batch_size)])


@torch.no_grad()
def precise_bn_stats(model, x, batch_size=512):
    """Set every batch norm's running statistics to the exact population statistics of ``x``.

    The running averages of training are exponential averages of batch statistics from
    *earlier* weights; with the weights fixed, this recomputes, layer after layer, the mean
    and unbiased variance of each batch norm's input over all of ``x`` with the model in
    evaluation mode (so each layer sees what it will see at inference, the layers before
    it already recalibrated). Modifies ``model`` in place and returns it, back in the mode
    (training or evaluation) it was in. x: (N, ...) floating point, the training inputs; each
    batch norm needs at least 2 values per channel in all of x (N * prod(spatial) >= 2).
    """
    check_model(model, "precise_bn_stats")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"precise_bn_stats: x must be a torch.Tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(f"precise_bn_stats: x must be a floating-point tensor, got dtype {x.dtype}. "
                        "Convert it first, e.g. x.float().")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"precise_bn_stats: x must hold at least one sample along axis 0, (N, ...), "
                         f"got shape {tuple(x.shape)}.")
    check_positive_int(batch_size, "batch_size", where="precise_bn_stats")
    for bn in batchnorm_layers(model):  # every layer checked before any is changed
        check_running_stats(bn, "precise_bn_stats")
    was_training = model.training
    model.eval()
    saved = {bn: (bn.running_mean.clone(), bn.running_var.clone()) for bn in batchnorm_layers(model)}
    for bn in batchnorm_layers(model):
        total, total_sq, count = 0.0, 0.0, 0
        captured = {}
        hook = bn.register_forward_hook(lambda mod, inputs, out: captured.__setitem__("z", inputs[0]))
        for i in range(0, int(x.shape[0]), batch_size):
            model(x[i:i + batch_size])
            z = captured["z"].double()
            dims = [0] + list(range(2, z.dim()))
            total = total + z.sum(dim=dims)
            total_sq = total_sq + (z * z).sum(dim=dims)
            count += z.numel() // z.shape[1]
        hook.remove()
        if count < 2:  # put back what earlier layers had, so that a refused call changes nothing
            for layer, (mean0, var0) in saved.items():
                layer.running_mean.copy_(mean0)
                layer.running_var.copy_(var0)
            model.train(was_training)
            raise ValueError(
                f"precise_bn_stats: {type(bn).__name__}({bn.num_features}) sees {count} value per channel "
                f"in all of x (shape {tuple(x.shape)}); the unbiased variance needs at least 2 values per "
                "channel in total. Pass more samples in x."
            )
        mean = total / count
        # The one-pass formula that notebook 03 warns about, made safe here by float64: it loses about
        # log10((mean / std)**2) of float64's 16 digits, a few at most for a layer's activations.
        var = (total_sq - count * mean * mean) / (count - 1)
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(var.clamp_min(0).to(bn.running_var.dtype))
    return model.train(was_training)


def single_class_batches(x, y, batch_size, seed=0):
    """Endless non-i.i.d. minibatches: each batch holds ``batch_size`` examples of one class.

    The class of each batch is drawn at random (seeded), so over many steps every class
    is seen equally often: only the *composition* of each batch is wrong.
    x: (N, ...), y: (N,) -> yields (x_batch, y_batch).
    """
    g = torch.Generator().manual_seed(seed)
    y_cpu = y.cpu()
    classes = torch.unique(y_cpu)
    members = {int(c): torch.nonzero(y_cpu == c).flatten() for c in classes}
    smallest = min(len(v) for v in members.values())
    if batch_size > smallest:
        raise ValueError(f"batch_size={batch_size} is larger than the smallest class ({smallest} examples).")
    while True:
        c = int(classes[torch.randint(len(classes), (1,), generator=g)])
        idx = members[c][torch.randperm(len(members[c]), generator=g)[:batch_size]].to(x.device)
        yield x[idx], y[idx]


def train_on_stream(model, stream, steps, lr, momentum=0.0):
    """Plain SGD on cross-entropy for ``steps`` batches from ``stream``; returns the batch losses.

    For streams that ``bn_course.train.train`` does not draw itself (e.g. ``single_class_batches``).
    """
    check_model(model, "train_on_stream")
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum)
    losses = []
    for _ in range(steps):
        xb, yb = next(stream)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


class FrozenBatchNorm(nn.Module):
    """Batch norm frozen into its evaluation-mode map, ``out = a * x + b`` per channel.

    ``a = gamma / sqrt(running_var + eps)`` and ``b = beta - a * running_mean`` are buffers,
    not parameters: training mode changes nothing, no statistic is updated, nothing is learned.
    """

    def __init__(self, bn):
        super().__init__()
        check_running_stats(bn, "FrozenBatchNorm")
        a, b = bn_scale_shift(bn)
        dtype = bn.running_mean.dtype
        self.num_features = bn.num_features
        self.register_buffer("a", a.to(dtype))
        self.register_buffer("b", b.to(dtype))

    def extra_repr(self):
        return f"{self.num_features}"

    def forward(self, x):
        """x: (N, C, *spatial) with C = num_features -> a * x + b per channel, shape of x."""
        check_layer_input(x, self.num_features, f"{type(self).__name__}({self.num_features})")
        return x * per_channel(self.a, x.dim()) + per_channel(self.b, x.dim())


def freeze_batchnorm(model):
    """A copy of ``model`` with every batch norm layer replaced by its ``FrozenBatchNorm``."""
    check_model(model, "freeze_batchnorm")
    frozen = copy.deepcopy(model)
    for parent in frozen.modules():
        for name, child in list(parent.named_children()):
            if is_batchnorm(child):
                setattr(parent, name, FrozenBatchNorm(child))
    return frozen


# --- the experiments of notebook 08 (the tests rerun them with other seeds) ---------------------

def accuracy(pred, y):
    """Fraction of predictions equal to the labels."""
    return (pred == y).float().mean().item()


def trained_bn_mlp(data, seed=0, steps=400, lr=0.1, batch_size=60, **options):
    """An MLP (64-64 hidden) with batch norm before each ReLU, trained on ``data`` with plain SGD."""
    bn_course.seed_everything(seed)
    model = mlp(hidden=(64, 64), norm="batch", **options)
    train(model, data, steps, lr, batch_size=batch_size, seed=seed, progress=False, eval_every=steps)
    return model


def forgetting_eval(data, seed=0, steps=400):
    """Test accuracy of a trained BN MLP in eval mode and, wrongly, in train mode.

    Returns a dict: "eval mode", "train mode, batch n" for n in 64, 8, 2, "train mode, one
    class per batch" (each class's test images as one batch), and "batch 1 error" (the
    message of the error a batch of 1 raises, or None).
    """
    model = trained_bn_mlp(data, seed, steps=steps)
    result = {"eval mode": evaluate(model, data.x_test, data.y_test)[1]}
    for n in (64, 8, 2):
        result[f"train mode, batch {n}"] = accuracy(predict_in_train_mode(model, data.x_test, n), data.y_test)
    classes = range(int(data.y_test.max()) + 1)
    by_class = [predict_in_train_mode(model, data.x_test[data.y_test == c], int(data.x_test.shape[0]))
                for c in classes]
    labels = torch.cat([data.y_test[data.y_test == c] for c in classes])
    result["train mode, one class per batch"] = accuracy(torch.cat(by_class), labels)
    try:
        predict_in_train_mode(model, data.x_test, 1)
        result["batch 1 error"] = None
    except ValueError as error:
        result["batch 1 error"] = str(error)
    return result


def running_stat_lag(data, seed=0, steps=100, momentum=0.01, init_scale=3.0):
    """Test accuracy and loss of a briefly trained BN MLP with its running averages, then with
    precise statistics (``precise_bn_stats`` on the training set, weights unchanged).

    Returns a dict: ema_acc, precise_acc, ema_loss, precise_loss and var_error (per BN layer,
    the median over channels of |running_var - precise var| / precise var).
    """
    bn_course.seed_everything(seed)
    model = mlp(hidden=(100, 100, 100), norm="batch", init_scale=init_scale)
    for layer in batchnorm_layers(model):
        layer.momentum = momentum
    train(model, data, steps, 0.1, batch_size=60, seed=seed, progress=False, eval_every=steps)
    ema_loss, ema_acc = evaluate(model, data.x_test, data.y_test)
    ema_var = [layer.running_var.clone() for layer in batchnorm_layers(model)]
    precise_bn_stats(model, data.x_train)
    precise_loss, precise_acc = evaluate(model, data.x_test, data.y_test)
    var_error = [((v - layer.running_var).abs() / layer.running_var).median().item()
                 for v, layer in zip(ema_var, batchnorm_layers(model))]
    return {"ema_acc": ema_acc, "precise_acc": precise_acc, "ema_loss": ema_loss,
            "precise_loss": precise_loss, "var_error": var_error}


def non_iid_training(data, seed=0, steps=400, batch_size=32, lr=0.05, norms=("none", "batch", "layer")):
    """Test accuracy (eval mode) of an MLP per normalization, trained on shuffled batches
    and on single-class batches. Returns {(norm, "shuffled" or "one class"): accuracy}.
    """
    result = {}
    for norm in norms:
        for kind in ("shuffled", "one class"):
            bn_course.seed_everything(seed)
            model = mlp(hidden=(64, 64), norm=norm).to(data.x_train.device)
            if kind == "shuffled":
                train(model, data, steps, lr, batch_size=batch_size, seed=seed, progress=False, eval_every=steps)
            else:
                train_on_stream(model, single_class_batches(data.x_train, data.y_train, batch_size, seed), steps, lr)
            result[(norm, kind)] = evaluate(model, data.x_test, data.y_test)[1]
    return result


def shift_domain(x, gain=0.7, offset=0.5):
    """The shifted domain of notebook 08: contrast and brightness changed, gain * x + offset."""
    return gain * x + offset


def fine_tuning_shifted(data, seed=0, per_class=5, steps=100, lr=0.05, batch_sizes=(10, 2)):
    """Accuracy on the shifted test set of a pretrained BN MLP, fine-tuned on ``per_class``
    shifted training images per class in four ways.

    Returns a dict: "no fine-tuning", "statistics only" (``precise_bn_stats`` on the small
    shifted set, no gradient step), and "BN live, batch b" / "BN frozen, batch b" for each b.
    """
    pretrained = trained_bn_mlp(data, seed)
    g = torch.Generator().manual_seed(seed)
    y_cpu = data.y_train.cpu()
    pick = torch.cat([torch.nonzero(y_cpu == c).flatten()[torch.randperm(int((y_cpu == c).sum()), generator=g)[:per_class]]
                      for c in range(int(y_cpu.max()) + 1)]).to(data.x_train.device)
    x_small, y_small = shift_domain(data.x_train[pick]), data.y_train[pick]
    x_test = shift_domain(data.x_test)
    result = {"no fine-tuning": evaluate(pretrained, x_test, data.y_test)[1]}
    recalibrated = precise_bn_stats(copy.deepcopy(pretrained), x_small)
    result["statistics only"] = evaluate(recalibrated, x_test, data.y_test)[1]
    for batch_size in batch_sizes:
        for name, model in (("BN live", copy.deepcopy(pretrained)), ("BN frozen", freeze_batchnorm(pretrained))):
            train_on_stream(model, batches(x_small, y_small, batch_size, seed), steps, lr)
            result[f"{name}, batch {batch_size}"] = evaluate(model, x_test, data.y_test)[1]
    return result


def bn_placement(data, seed=0, steps=400):
    """Test accuracy of the BN MLP with BN before vs after the ReLU: {"before": acc, "after": acc}."""
    result = {}
    for position in ("before", "after"):
        model = trained_bn_mlp(data, seed, steps=steps, norm_position=position)
        result[position] = evaluate(model, data.x_test, data.y_test)[1]
    return result

"""The relatives of batch norm, written from scratch with one shared step.

Every normalization here is the same two lines, only over different axes::

    x_hat = (x - mean(x)) / sqrt(var(x) + eps)     # statistics over `dims`
    out   = gamma * x_hat + beta                   # learned, per channel (or per feature)

For an input ``x`` of shape ``(N, C, *spatial)``:

=================  ===========================================  ==========================
normalization      statistics over                               depends on other samples?
=================  ===========================================  ==========================
BatchNorm          N and spatial, per channel                    yes (the batch)
LayerNorm          the trailing ``normalized_shape`` dims        no
InstanceNorm       spatial, per sample and channel               no
GroupNorm          C/G channels and spatial, per sample & group  no
=================  ===========================================  ==========================

Batch Renormalization and Ghost Batch Normalization keep batch norm's axes but
change *which* statistics are used in training (see their classes).

The end of the module holds the experiments of notebook 09 (``batch_size_sweep``,
``cnn_small_batch``, ``hard_batches``), functions of ``data`` and ``seed`` so that the
tests can rerun them with other seeds.
"""

import math
import numbers

import torch
from torch import nn

import bn_course
from bn_course._validate import (check_bool, check_enough_values, check_eps, check_num_features, check_positive_int,
                                 real_number)
from bn_course.models import cnn, mlp
from bn_course.pitfalls import single_class_batches, train_on_stream
from bn_course.sweep import run_grid
from bn_course.torch_bn import LOW_PRECISION, BatchNorm, BatchNormFunction, per_channel
from bn_course.train import check_model, evaluate, train


# --- input checks ------------------------------------------------------------------------

def check_float_tensor(x, where):
    """x must be a floating-point torch.Tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where} must be a torch.Tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(
            f"{where} must be a floating-point tensor, got dtype {x.dtype}. Convert it first, e.g. x.float()."
        )


def check_min_rank(x, rank, layout, where):
    """x must have at least ``rank`` dimensions, laid out as ``layout`` says."""
    if x.dim() < rank:
        raise ValueError(
            f"{where} expects an input of shape {layout} with at least {rank} dimensions, "
            f"got shape {tuple(x.shape)} ({x.dim()}D)."
        )


def check_num_channels(x, num_channels, where):
    """Axis 1 of x must hold ``num_channels`` channels."""
    if x.shape[1] != num_channels:
        raise ValueError(
            f"{where} was built for {num_channels} channels but got an input with {x.shape[1]} "
            f"channels (axis 1 of shape {tuple(x.shape)})."
        )


def check_values_per_group(m, shape, where, what):
    """Statistics need at least two values, or x_hat is 0 whatever the input."""
    if m <= 1:
        raise ValueError(
            f"{where}: expected more than 1 value per {what} to compute a variance, got input of shape "
            f"{tuple(shape)} ({m} value). The variance of one value is 0, so x_hat would be 0 for every input."
        )


def check_affine_params(gamma, beta, shape, meaning, where):
    """gamma and beta (each may be None) must be tensors of ``shape``; ``meaning`` says why."""
    for name, p in (("gamma", gamma), ("beta", beta)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor of shape {shape} or None, got {type(p).__name__}.")
        if tuple(p.shape) != tuple(shape):
            raise ValueError(f"{where}: {name} must have shape {shape}, {meaning}, got shape {tuple(p.shape)}.")


def check_normalized_shape(normalized_shape, where):
    """normalized_shape as a tuple of positive ints: an int (the last dim only) or a non-empty sequence of ints."""
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        normalized_shape = (normalized_shape,)
    ok = isinstance(normalized_shape, (tuple, list, torch.Size)) and len(normalized_shape) > 0 and all(
        isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1 for n in normalized_shape)
    if not ok:
        raise ValueError(
            f"{where}: normalized_shape must be a positive integer or a non-empty tuple of positive integers "
            f"(the sizes of the trailing dims to normalize over), got {normalized_shape!r}."
        )
    return tuple(int(n) for n in normalized_shape)


def per_channel_meaning(x):
    """How check_affine_params explains the shape (C,) of a per-channel gamma or beta."""
    return f"one value per channel of an input with C={x.shape[1]} channels (axis 1 of shape {tuple(x.shape)})"


def compute_dtype(x, gamma, beta, where):
    """The dtype to normalize x in: x's own, or float32 for float16/bfloat16 input, whether gamma and
    beta are float32 (mixed precision), x's dtype or None: torch's layer_norm, group_norm and
    instance_norm also compute in float32 and round the output once (in float16 the variance of
    values with a std above 256 would overflow to inf and the output silently collapse to beta).
    The output is converted back to x's dtype. Any other dtype mismatch between x and gamma or beta
    is an error."""
    dtype = torch.float32 if x.dtype in LOW_PRECISION else x.dtype
    for name, p in (("gamma", gamma), ("beta", beta)):
        if p is None or p.dtype == x.dtype:
            continue
        if not (x.dtype in LOW_PRECISION and p.dtype == torch.float32):
            raise TypeError(f"{where}: {name} has dtype {p.dtype} but the input has dtype {x.dtype}; "
                            f"convert one so that they match, e.g. x.to({p.dtype}), or {name}.to({x.dtype}) "
                            f"(for a module: module.to({x.dtype})).")
    return dtype


# --- the shared step -----------------------------------------------------------------------

def standardize(x, dims, eps=1e-5):
    """(x - mu) / sqrt(var + eps), with mu and the biased var taken over ``dims``.

    x: any shape; dims: the dims the statistics are taken over. Returns x_hat (shape of x),
    mu and var (shape of x with ``dims`` kept as size 1).
    """
    check_float_tensor(x, "standardize input")
    check_eps(eps, "standardize: eps")
    var, mu = torch.var_mean(x, dim=dims, keepdim=True, correction=0)
    x_hat = (x - mu) * torch.rsqrt(var + eps)
    return x_hat, mu, var


# --- LayerNorm -----------------------------------------------------------------------------

def scale_and_shift_channels(x_hat, gamma=None, beta=None):
    """Step 4 per channel: gamma * x_hat + beta, with gamma, beta of shape (C,) or None."""
    if gamma is not None:
        x_hat = x_hat * per_channel(gamma, x_hat.dim())
    if beta is not None:
        x_hat = x_hat + per_channel(beta, x_hat.dim())
    return x_hat


def add_affine_params(module, shape, weight=True, bias=True):
    """Register ``weight`` (ones) and ``bias`` (zeros) of ``shape`` on module, or None for each
    that is switched off, as torch.nn's normalization layers do."""
    module.register_parameter("weight", nn.Parameter(torch.ones(shape)) if weight else None)
    module.register_parameter("bias", nn.Parameter(torch.zeros(shape)) if weight and bias else None)


def layer_norm(x, normalized_shape, gamma=None, beta=None, eps=1e-5):
    """Layer normalization: statistics over the trailing ``normalized_shape`` dims of each sample.

    x: (*, *normalized_shape); normalized_shape: a tuple, or an int for the last dim only;
    gamma, beta: normalized_shape or None. Returns the shape (and dtype) of x.
    Matches torch.nn.functional.layer_norm.
    """
    normalized_shape = check_normalized_shape(normalized_shape, "layer_norm")
    where = f"layer_norm(normalized_shape={normalized_shape})"
    check_float_tensor(x, f"{where} input")
    check_eps(eps, f"{where}: eps")
    k = len(normalized_shape)
    if x.dim() < k or tuple(x.shape[x.dim() - k:]) != normalized_shape:
        raise ValueError(
            f"{where}: the input's last {k} dimensions must equal normalized_shape={normalized_shape}, "
            f"got input of shape {tuple(x.shape)}."
        )
    check_affine_params(gamma, beta, normalized_shape, "that of normalized_shape (one value per normalized element)",
                        where)
    check_values_per_group(int(math.prod(normalized_shape)), x.shape, where, "sample")
    in_dtype = x.dtype
    x = x.to(compute_dtype(x, gamma, beta, where))
    dims = list(range(x.dim() - k, x.dim()))
    x_hat, _, _ = standardize(x, dims, eps)
    out = x_hat
    if gamma is not None:
        out = out * gamma
    if beta is not None:
        out = out + beta
    return out.to(in_dtype)


class LayerNorm(nn.Module):
    """Drop-in for ``torch.nn.LayerNorm``: per-sample statistics over the last dims.

    Same arguments (normalized_shape, eps, elementwise_affine, bias) and the same
    ``weight``/``bias`` parameters of shape ``normalized_shape``.
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True):
        super().__init__()
        self.normalized_shape = check_normalized_shape(normalized_shape, "LayerNorm")
        check_eps(eps, "LayerNorm: eps")
        check_bool(elementwise_affine, "elementwise_affine", "LayerNorm")
        check_bool(bias, "bias", "LayerNorm")
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        add_affine_params(self, self.normalized_shape, weight=elementwise_affine, bias=bias)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"

    def forward(self, x):
        """x: (*, *normalized_shape) -> the shape and dtype of x, each sample normalized over its last dims."""
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


# --- GroupNorm -----------------------------------------------------------------------------

def check_groups(num_groups, num_channels):
    """num_groups must be a positive divisor of num_channels."""
    check_num_features(num_channels, "num_channels")
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
        raise ValueError(f"GroupNorm: num_groups must be a positive integer that divides num_channels={num_channels}, "
                         f"got {num_groups!r}.")
    if num_groups < 1 or num_channels % num_groups != 0:
        raise ValueError(
            f"GroupNorm: num_groups={num_groups} must divide num_channels={num_channels} "
            f"(each group holds C / G channels). Divisors of {num_channels}: "
            f"{[g for g in range(1, num_channels + 1) if num_channels % g == 0]}."
        )


def group_norm(x, num_groups, gamma=None, beta=None, eps=1e-5):
    """Group normalization: each sample's channels split into ``num_groups`` groups,
    statistics over the channels of a group and all spatial positions.

    x: (N, C, *spatial); gamma, beta: (C,) or None. Returns the shape (and dtype) of x.
    num_groups=1 is LayerNorm over (C, *spatial); num_groups=C is InstanceNorm.
    """
    where = f"group_norm(num_groups={num_groups})"
    check_float_tensor(x, f"{where} input")
    check_min_rank(x, 2, "(N, C, *spatial)", where)
    N, C = x.shape[0], x.shape[1]
    check_groups(num_groups, C)
    check_eps(eps, f"{where}: eps")
    if N == 0:
        raise ValueError(f"{where}: got an empty input, shape {tuple(x.shape)}: there are no samples to normalize.")
    check_affine_params(gamma, beta, (C,), per_channel_meaning(x), where)
    m = (C // num_groups) * int(math.prod(x.shape[2:]))
    check_values_per_group(m, x.shape, where, "group")
    in_dtype = x.dtype
    x = x.to(compute_dtype(x, gamma, beta, where))
    grouped = x.reshape(N, num_groups, -1)               # (N, G, C/G * prod(spatial))
    x_hat, _, _ = standardize(grouped, [2], eps)
    x_hat = x_hat.reshape(x.shape)
    return scale_and_shift_channels(x_hat, gamma, beta).to(in_dtype)


class GroupNorm(nn.Module):
    """Drop-in for ``torch.nn.GroupNorm(num_groups, num_channels, eps, affine)``."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True):
        super().__init__()
        check_groups(num_groups, num_channels)
        check_eps(eps, "GroupNorm: eps")
        check_bool(affine, "affine", "GroupNorm")
        self.num_groups, self.num_channels = num_groups, num_channels
        self.eps, self.affine = eps, affine
        add_affine_params(self, num_channels, weight=affine)

    def extra_repr(self):
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"

    def forward(self, x):
        """x: (N, C, *spatial) -> the shape of x; statistics per sample and group of C / num_groups channels."""
        check_float_tensor(x, "GroupNorm input")
        check_min_rank(x, 2, "(N, C, *spatial)", "GroupNorm")
        check_num_channels(x, self.num_channels, f"GroupNorm({self.num_groups}, {self.num_channels})")
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


# --- InstanceNorm --------------------------------------------------------------------------

def instance_norm(x, gamma=None, beta=None, eps=1e-5):
    """Instance normalization: statistics over the spatial dims of each sample and channel.

    x: (N, C, *spatial) with at least one spatial dim; gamma, beta: (C,) or None.
    Returns the shape (and dtype) of x.
    """
    check_float_tensor(x, "instance_norm input")
    check_min_rank(x, 3, "(N, C, *spatial)", "instance_norm")
    check_eps(eps, "instance_norm: eps")
    check_affine_params(gamma, beta, (x.shape[1],), per_channel_meaning(x), "instance_norm")
    check_values_per_group(int(math.prod(x.shape[2:])), x.shape, "instance_norm", "sample and channel")
    in_dtype = x.dtype
    x = x.to(compute_dtype(x, gamma, beta, "instance_norm"))
    x_hat, _, _ = standardize(x, list(range(2, x.dim())), eps)
    return scale_and_shift_channels(x_hat, gamma, beta).to(in_dtype)


class InstanceNorm(nn.Module):
    """Like ``torch.nn.InstanceNorm1d/2d/3d(num_features, eps, affine)`` for batched input.

    Uses each sample's own statistics in training and evaluation alike
    (``track_running_stats=False``, PyTorch's default; running statistics are not offered).
    """

    def __init__(self, num_features, eps=1e-5, affine=False):
        super().__init__()
        check_num_features(num_features)
        check_eps(eps, "InstanceNorm: eps")
        check_bool(affine, "affine", "InstanceNorm")
        self.num_features, self.eps, self.affine = num_features, eps, affine
        add_affine_params(self, num_features, weight=affine)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"

    def forward(self, x):
        """x: (N, C, *spatial) -> the shape of x; statistics per sample and channel, over the spatial dims."""
        check_float_tensor(x, "InstanceNorm input")
        check_min_rank(x, 3, "(N, C, *spatial)", "InstanceNorm")
        check_num_channels(x, self.num_features, f"InstanceNorm({self.num_features})")
        return instance_norm(x, self.weight, self.bias, self.eps)


# Batch Renormalization and Ghost BN subclass ``bn_course.torch_bn.BatchNorm`` for its parameters,
# buffers, state_dict keys, input checks (``_check``) and evaluation mode, and use its public pieces:
# ``BatchNormFunction`` (which hands back the batch statistics) and ``update_running_averages``.

# --- Batch Renormalization -----------------------------------------------------------------

class BatchRenorm(BatchNorm):
    """Batch Renormalization (Ioffe, 2017): batch norm whose training output uses the
    running statistics, corrected by the batch's.

    In training, per channel, with s_B = sqrt(var_B + eps) and s_run = sqrt(running_var + eps)::

        r     = clip(s_B / s_run,                  1 / r_max, r_max)   # no gradient
        d     = clip((mu_B - running_mean) / s_run,   -d_max, d_max)   # no gradient
        x_hat = (x - mu_B) / s_B * r + d
        out   = gamma * x_hat + beta

    Without clipping, x_hat = (x - running_mean) / s_run: the inference transform, so
    training and evaluation agree. With r_max = 1 and d_max = 0 this is plain batch norm.
    The gradient still flows through mu_B and var_B (as in batch norm); r and d are
    treated as constants. Running statistics are updated as in ``BatchNorm``; evaluation
    mode is batch norm's evaluation mode.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, r_max=3.0, d_max=5.0):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=True)
        r, d = real_number(r_max), real_number(d_max)
        if r is None or d is None or not 1 <= r < math.inf or not 0 <= d < math.inf:
            raise ValueError(f"BatchRenorm needs numbers r_max >= 1 and d_max >= 0 (finite), got r_max={r_max!r}, "
                             f"d_max={d_max!r}. r_max = 1 and d_max = 0 make it plain BatchNorm.")
        self.r_max, self.d_max = float(r_max), float(d_max)

    def extra_repr(self):
        return super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}"

    def forward(self, x):
        """x: (N, C, *spatial) -> the shape of x. Training: x_hat_B * r + d (the class docstring);
        evaluation: BatchNorm's."""
        if not self.training:
            return super().forward(x)
        self._check(x)
        check_enough_values(tuple(x.shape), f"{type(self).__name__}({self.num_features}) input")
        in_dtype = x.dtype
        x = x.to(self._compute_dtype(x))  # float16/bfloat16: computed in float32, as BatchNorm
        stats = {}  # BatchNormFunction fills in the batch's mu, biased var and m (no gradient)
        x_hat_B = BatchNormFunction.apply(x, None, None, self.eps, stats)  # (x - mu_B) / s_B, gradient as in BN
        mu_B, var_B, m = stats["mu"], stats["var"], stats["m"]
        s_B = torch.sqrt(var_B + self.eps)
        s_run = torch.sqrt(self.running_var.to(x.dtype) + self.eps)
        r = (s_B / s_run).clamp(1 / self.r_max, self.r_max)
        d = ((mu_B - self.running_mean.to(x.dtype)) / s_run).clamp(-self.d_max, self.d_max)
        x_hat = x_hat_B * per_channel(r, x.dim()) + per_channel(d, x.dim())
        self.update_running_averages(mu_B, var_B * m / (m - 1))
        if not self.affine:
            return x_hat.to(in_dtype)
        weight, bias = self._affine(x.dtype)
        out = x_hat * per_channel(weight, x.dim()) + per_channel(bias, x.dim())
        return out.to(in_dtype)


# --- Ghost Batch Normalization -------------------------------------------------------------

class GhostBatchNorm(BatchNorm):
    """Ghost Batch Normalization (Hoffer, Hubara & Soudry, 2017): in training, split the
    batch into "ghost" batches of ``ghost_batch_size`` samples and batch-normalize each
    with its own statistics; each ghost batch updates the running statistics in turn.

    The same as running ``BatchNorm`` on ``x[0:g]``, ``x[g:2g]``, ... one after the other
    (the last ghost batch may be smaller). Evaluation mode is batch norm's.
    """

    def __init__(self, num_features, ghost_batch_size=32, eps=1e-5, momentum=0.1, affine=True):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=True)
        check_positive_int(ghost_batch_size, "ghost_batch_size", "samples per ghost batch", where="GhostBatchNorm")
        self.ghost_batch_size = int(ghost_batch_size)

    def extra_repr(self):
        return super().extra_repr() + f", ghost_batch_size={self.ghost_batch_size}"

    def check_ghost_batches(self, x):
        """In training every ghost batch, the last (N % ghost_batch_size samples, when not 0)
        included, needs more than 1 value per channel. (An empty x is left to BatchNorm's check.)"""
        g, N = self.ghost_batch_size, int(x.shape[0])
        if N % g != 0:
            last = N % g
            smallest = f"the last ghost batch holds N % ghost_batch_size = {N} % {g} = {last} sample"
        else:
            last = g
            smallest = f"each ghost batch holds ghost_batch_size = {g} sample"
        m = last * int(math.prod(x.shape[2:]))
        if N > 0 and m <= 1:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) input: expected more than 1 value per channel in "
                f"every ghost batch when training, got input of shape {tuple(x.shape)}: {smallest}, "
                f"{m} value per channel. The variance of a single value is 0, so x_hat would be 0 for every "
                "input. Use ghost_batch_size >= 2 and a batch size N with N % ghost_batch_size != 1, "
                "or evaluation mode."
            )

    def forward(self, x):
        """x: (N, C, *spatial) -> the shape of x. Training: BatchNorm on each ghost batch in turn;
        evaluation: BatchNorm's."""
        if not self.training:
            return super().forward(x)
        self._check(x)  # before splitting
        self.check_ghost_batches(x)
        outs = []
        for chunk in torch.split(x, self.ghost_batch_size, dim=0):
            outs.append(super().forward(chunk))  # BatchNorm on each ghost batch in turn
        return torch.cat(outs, dim=0)


# --- swapping the normalization of a model -------------------------------------------------

def replace_batchnorm(model, make):
    """Replace, in place, every ``nn.BatchNorm1d/2d/3d`` of ``model`` by ``make(num_features)``.

    E.g. ``replace_batchnorm(mlp(norm="batch"), lambda C: BatchRenorm(C))``. Returns ``model``.
    """
    check_model(model, "replace_batchnorm")
    if not callable(make):
        raise TypeError(f"replace_batchnorm: make must be a function num_features -> module, "
                        f"e.g. lambda C: BatchRenorm(C), got {type(make).__name__}.")
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(parent, name, make(child.num_features))
    return model


# --- the experiments of notebook 09 (the tests rerun them with other seeds) ---------------------

SWEEP_BATCH_SIZES = (2, 4, 8, 16, 32, 64, 128)


def make_mlp(norm, hidden=(64, 64), r_max=3.0, d_max=5.0):
    """The MLP of notebook 09 with ``norm`` in "none", "batch", "layer", "group" or "renorm"
    (batch norm replaced by ``BatchRenorm(r_max, d_max)``)."""
    if norm == "renorm":
        return replace_batchnorm(mlp(hidden=hidden, norm="batch"), lambda C: BatchRenorm(C, r_max=r_max, d_max=d_max))
    return mlp(hidden=hidden, norm=norm)


def train_mlp(data, norm, batch_size, seed=0, steps=400, lr=0.05):
    """Train ``make_mlp(norm)`` with SGD on shuffled batches; returns its ``History``."""
    bn_course.seed_everything(seed)
    model = make_mlp(norm)
    return train(model, data, steps, lr, batch_size=batch_size, seed=seed, progress=False, eval_every=steps)


def batch_size_sweep(data, seeds=(0,), batch_sizes=SWEEP_BATCH_SIZES, norms=("batch", "group", "layer"),
                     steps=400, lr=0.05, progress=True):
    """Test accuracy (eval mode) of the MLP for every norm x batch size x seed, same number of steps.

    Returns ``bn_course.sweep.run_grid``'s tidy rows (norm, batch_size, seed, final_accuracy, ...).
    """
    def run(norm, batch_size, seed):
        return train_mlp(data, norm, batch_size, seed, steps, lr)

    return run_grid(run, {"norm": list(norms), "batch_size": list(batch_sizes)}, seeds=seeds, progress=progress)


def cnn_small_batch(data, seed=0, batch_size=2, steps=400, lr=0.05):
    """Test accuracy of a small CNN with batch norm trained with tiny batches.

    Returns {"accuracy": ..., "values_per_channel": [m of each BN layer]}: in a CNN each
    channel's statistics are taken over N x H x W values, not N.
    """
    bn_course.seed_everything(seed)
    model = cnn(channels=(16, 32), norm="batch").to(data.x_train.device)
    sizes = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: sizes.append(inp[0].numel() // inp[0].shape[1]))
             for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(data.x_train[:batch_size])
    for h in hooks:
        h.remove()
    history = train(model, data, steps, lr, batch_size=batch_size, seed=seed, progress=False, eval_every=steps)
    return {"accuracy": history.final_accuracy, "values_per_channel": sizes}


def hard_batches(data, seed=0, steps=400, lr=0.05, small_batches=(2, 4), one_class_batch=32,
                 norms=("batch", "renorm", "group"), known=None):
    """Test accuracy (eval mode) per norm on tiny shuffled batches and on single-class batches.

    ``known``: accuracies already measured with the same seed, steps and lr, as
    {(norm, batch_size): accuracy} (e.g. from ``batch_size_sweep``); those runs are not repeated.
    Returns {(norm, "batch 2"): acc, ..., (norm, "one class"): acc}.
    """
    known = known or {}
    result = {}
    for norm in norms:
        for b in small_batches:
            if (norm, b) in known:
                result[(norm, f"batch {b}")] = known[(norm, b)]
            else:
                result[(norm, f"batch {b}")] = train_mlp(data, norm, b, seed, steps, lr).final_accuracy
        bn_course.seed_everything(seed)
        model = make_mlp(norm).to(data.x_train.device)
        train_on_stream(model, single_class_batches(data.x_train, data.y_train, one_class_batch, seed), steps, lr)
        result[(norm, "one class")] = evaluate(model, data.x_test, data.y_test)[1]
    return result

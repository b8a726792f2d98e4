"""Folding batch norm into the layer before it, for inference.

In evaluation mode batch norm is one fixed affine map per channel::

    out = gamma * (z - running_mean) / sqrt(running_var + eps) + beta
        = a * z + (beta - a * running_mean),      a = gamma / sqrt(running_var + eps)

When ``z = W * x + c`` comes from a convolution or a linear layer (bias ``c``, as in
notebook 08), scaling the layer's output channel ``k`` by ``a[k]`` is the same as
scaling its weights, so the pair is one layer with

    W_folded = a[k] * W[k]                                  (every weight of output channel k)
    b_folded = a[k] * (c[k] - running_mean[k]) + beta[k]

This holds for any stride, padding, dilation and groups: all of them only
decide *which* inputs output channel ``k`` sees, never how it is scaled.

Run ``python -m bn_course.fold`` to time a small CNN with and without folding.
"""

import copy
import statistics

import torch
from torch import nn

from bn_course.bench import alternate_times
from bn_course.torch_bn import is_batchnorm
from bn_course.train import check_model

FOLDABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def check_batchnorm(bn, where):
    """``bn`` must be a batch-norm layer: nn.BatchNorm1d/2d/3d or bn_course's BatchNorm."""
    if not is_batchnorm(bn):
        raise TypeError(f"{where}: expected a batch-norm layer (nn.BatchNorm1d/2d/3d or bn_course's BatchNorm), "
                        f"got {type(bn).__name__}.")


def _out_channels(layer):
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def check_running_stats(bn, where, consequence=""):
    """``bn`` must keep running statistics (track_running_stats=True), the buffers that evaluation
    mode normalizes with; ``consequence`` says what their absence means for the caller."""
    check_batchnorm(bn, where)
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{where}: {type(bn).__name__}({bn.num_features}) has no running statistics "
            "(track_running_stats=False), so even in evaluation mode it normalizes with each batch's own "
            f"statistics{consequence}. Re-create the batch norm with track_running_stats=True (copying its "
            "weight and bias), then set its statistics by training or with "
            "bn_course.pitfalls.precise_bn_stats(model, x_train)."
        )


def check_foldable(layer, bn):
    """Raise a clear error when ``bn`` cannot be folded into ``layer``."""
    if not isinstance(layer, FOLDABLE_LAYERS) or isinstance(layer, nn.modules.lazy.LazyModuleMixin):
        raise TypeError(
            f"fold_batchnorm can fold into nn.Conv1d/2d/3d or nn.Linear, got {type(layer).__name__}. "
            "(A transposed convolution keeps its output channels on axis 1 of the weight, "
            "so its folding formula differs; lazy layers must run once first.)"
        )
    if not is_batchnorm(bn):
        raise TypeError(
            f"fold_batchnorm folds a batch norm layer (nn.BatchNorm1d/2d/3d or bn_course BatchNorm), "
            f"got {type(bn).__name__}. Only batch norm is a fixed per-channel affine map at inference: "
            "LayerNorm, GroupNorm and InstanceNorm use each sample's own statistics."
        )
    check_running_stats(bn, "fold_batchnorm", ": it is not a fixed affine map and cannot be folded")
    C = _out_channels(layer)
    if bn.num_features != C:
        raise ValueError(
            f"channel mismatch: {type(layer).__name__} has {C} output channels but "
            f"{type(bn).__name__} normalizes num_features={bn.num_features}. "
            "The batch norm must directly follow this layer."
        )


def bn_scale_shift(bn):
    """The eval-mode batch norm as ``out = a * z + b`` per channel; a, b: (C,), in float64.

    a = gamma / sqrt(running_var + eps),  b = beta - a * running_mean
    """
    check_running_stats(bn, "bn_scale_shift")
    var = bn.running_var.detach().double()
    mu = bn.running_mean.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mu)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mu)  # None: affine=False or bias=False
    a = gamma / torch.sqrt(var + bn.eps)
    return a, beta - a * mu


@torch.no_grad()
def fold_batchnorm(conv, bn):
    """A new layer equal, in evaluation mode, to ``conv`` followed by ``bn``.

    conv: nn.Conv1d/2d/3d (any stride, padding, dilation, groups, with or without
    bias) or nn.Linear, weight of shape (C_out, C_in / groups, *kernel) or (C_out, C_in).
    bn: nn.BatchNorm1d/2d/3d or bn_course.torch_bn.BatchNorm with running statistics
    and num_features == C_out.

    Returns a copy of ``conv`` (same class, options, device and dtype) whose weight
    and bias absorb the batch norm; it always has a bias. ``conv`` and ``bn`` are not
    modified. The arithmetic is done in float64 and rounded once to conv's dtype,
    so the folded layer is exact up to that dtype's rounding.
    """
    check_foldable(conv, bn)
    a, b = bn_scale_shift(bn)                                # BN in eval mode: out = a * z + b
    W = conv.weight.detach().double()
    c = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(a)

    W_folded = W * a.reshape((-1,) + (1,) * (W.dim() - 1))  # scale output channel k by a[k]
    b_folded = a * c + b                                     # a * (c - running_mean) + beta

    folded = copy.deepcopy(conv)
    dtype, device = conv.weight.dtype, conv.weight.device
    folded.weight = nn.Parameter(W_folded.to(device=device, dtype=dtype))
    folded.bias = nn.Parameter(b_folded.to(device=device, dtype=dtype))
    folded.train(False)
    return folded


def fold_sequential(model):
    """A copy of ``model`` in eval mode with every (conv or linear, batch norm) pair folded.

    Walks ``nn.Sequential`` containers (at any depth); where a foldable layer is
    directly followed by a batch norm over its channels, the layer is replaced by
    ``fold_batchnorm(layer, bn)`` and the batch norm by ``nn.Identity()``.
    Other modules are kept as they are. ``model`` is not modified.
    """
    check_model(model, "fold_sequential")
    folded = copy.deepcopy(model).eval()
    _fold_in_place(folded)
    return folded


def _fold_in_place(module):
    for child in module.children():
        _fold_in_place(child)
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            layer, bn = module._modules[first], module._modules[second]
            if (isinstance(layer, FOLDABLE_LAYERS) and is_batchnorm(bn)
                    and bn.track_running_stats and bn.num_features == _out_channels(layer)):
                module._modules[first] = fold_batchnorm(layer, bn)
                module._modules[second] = nn.Identity()


def count_batchnorms(model):
    """How many batch norm layers ``model`` contains."""
    check_model(model, "count_batchnorms")
    return sum(is_batchnorm(m) for m in model.modules())


# --- benchmark -------------------------------------------------------------------------

def small_cnn(channels=(16, 32, 32), num_classes=10, in_channels=1):
    """A small conv -> BN -> ReLU CNN for 8 x 8 digit images (bias-free convs, as usual before BN)."""
    layers, c_in = [], in_channels
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
        c_in = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


def _randomize_bn(model, generator):
    """Give every batch norm non-trivial running stats and affine parameters, as after training."""
    with torch.no_grad():
        for m in model.modules():
            if is_batchnorm(m):
                m.running_mean.normal_(0, 0.5, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0, 0.2, generator=generator)


@torch.no_grad()
def time_pair(model_a, model_b, x, repeats=30, warmup=3):
    """Time ``model_a(x)`` and ``model_b(x)`` in alternation, ``repeats`` times each.

    Each repeat times the two back to back (``bench.alternate_times``), so both see the same
    load on a shared machine. Returns a dict with the median and the minimum time of each
    (``median_a``, ``median_b``, ``min_a``, ``min_b``, in seconds) and ``ratio``, the median of
    the per-repeat ratios time_a / time_b. The minimum is the time with the least interference.
    """
    check_model(model_a, "time_pair", "model_a")
    check_model(model_b, "time_pair", "model_b")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"time_pair: x must be a torch.Tensor (the input both models are timed on), "
                        f"got {type(x).__name__}.")
    times_a, times_b = alternate_times(lambda: model_a(x), lambda: model_b(x), repeats, warmup, x.device)
    return {"median_a": statistics.median(times_a), "median_b": statistics.median(times_b),
            "min_a": min(times_a), "min_b": min(times_b),
            "ratio": statistics.median(a / b for a, b in zip(times_a, times_b))}


def benchmark_folding(batch_sizes=(1, 64, 512), repeats=30, seed=0, device="cpu", threads=1):
    """Time a small CNN in eval mode, unfolded (conv + BN) vs folded, on 8 x 8 inputs.

    Returns a list of dicts with keys batch_size, unfolded_ms, folded_ms (medians),
    unfolded_min_ms, folded_min_ms (fastest runs), speedup (median of the per-repeat ratios
    unfolded / folded, see ``time_pair``) and max_abs_error (largest difference between
    the two models' outputs). ``threads`` (None: leave as it is) sets torch's thread count
    for the timing, and is put back afterwards.
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _time_folding(batch_sizes, repeats, seed, device)
    finally:
        torch.set_num_threads(before)


def _time_folding(batch_sizes, repeats, seed, device):
    """benchmark_folding's rows, at the current thread count."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = small_cnn()
    _randomize_bn(model, g)
    model = model.to(device).eval()
    folded = fold_sequential(model)
    rows = []
    for n in batch_sizes:
        x = torch.randn(n, 1, 8, 8, generator=g).to(device)
        with torch.no_grad():
            err = (model(x) - folded(x)).abs().max().item()
        t = time_pair(model, folded, x, repeats=repeats)
        rows.append({"batch_size": n, "unfolded_ms": 1e3 * t["median_a"], "folded_ms": 1e3 * t["median_b"],
                     "unfolded_min_ms": 1e3 * t["min_a"], "folded_min_ms": 1e3 * t["min_b"],
                     "speedup": t["ratio"], "max_abs_error": err})
    return rows


def format_table(rows):
    """The benchmark rows as a plain-text table."""
    lines = [f"{'batch':>6} {'conv+BN (ms)':>13} {'folded (ms)':>12} {'speed-up':>9} "
             f"{'fastest: conv+BN':>17} {'folded':>7} {'max |diff|':>11}"]
    for r in rows:
        lines.append(f"{r['batch_size']:>6} {r['unfolded_ms']:>13.3f} {r['folded_ms']:>12.3f} "
                     f"{r['speedup']:>8.2f}x {r['unfolded_min_ms']:>17.3f} {r['folded_min_ms']:>7.3f} "
                     f"{r['max_abs_error']:>11.2e}")
    return "\n".join(lines)


def main():
    import argparse

    p = argparse.ArgumentParser(description="Folded vs unfolded inference time of a small CNN (median of repeats).")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256, 1024])
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    rows = benchmark_folding(args.batch_sizes, args.repeats, device=args.device, threads=args.threads)
    print(f"small CNN (3 x conv3x3-BN-ReLU, 8x8 input), eval mode, device={args.device}, "
          f"threads={args.threads}, medians of {args.repeats} alternating runs")
    print(format_table(rows))


if __name__ == "__main__":
    main()

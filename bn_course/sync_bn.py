"""Synchronized batch norm: one set of statistics for the batches of every process.

In data-parallel training each of P processes holds a shard of the batch. Plain
BN normalizes each shard with its own mean and variance; synchronized BN makes
every process use the statistics of the whole batch, as if one process held it.
It needs three all-reduces (sums over the processes) of a few numbers per channel:

forward, round 1   ``[sum(x), m]``              -> mu  = sum(x) / m          (m: values per channel, all processes)
forward, round 2   ``sum((x - mu)**2)``         -> var = that sum / m        (two-pass: no cancellation)
backward           ``[sum(dout), sum(dout * x_hat)]``
                   -> dx = gamma / sqrt(var + eps) * (dout - sum(dout)/m - x_hat * sum(dout*x_hat)/m)

Shapes: ``x`` is this process's shard ``(n_p, C, *spatial)``; sums are per channel ``(C,)``.
``dgamma`` and ``dbeta`` stay local (sums over this shard): data-parallel training
sums or averages parameter gradients over the processes anyway, as for any weight.

Without an initialized process group (or with one process) every all-reduce is a
no-op and ``SyncBatchNorm`` is exactly ``bn_course.torch_bn.BatchNorm``.
"""

import numbers

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from bn_course._validate import check_eps, check_positive_int, values_per_channel
from bn_course.torch_bn import LOW_PRECISION, BatchNorm, check_input, check_params, per_channel, reduce_dims


def world_size(group=None):
    """How many processes take part: 1 when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def all_reduce_sum(t, group=None):
    """Replace ``t`` by its sum over every process of ``group`` (in place); a no-op for one process."""
    if world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def sync_mean_var(x, group=None):
    """Per-channel mean and biased variance of the batch of *all* processes.

    x: this process's shard (n_p, C, *spatial), n_p may differ between processes (even be 0).
    Returns mu (C,), var (C,) and m, the number of values per channel over all processes (int).
    Two all-reduces: [sum(x), count], then the sum of squared deviations from the global mu.
    float16/bfloat16 x is summed in float32 and mu, var are float32: in float16 a sum or a variance
    above 65504 would be inf, and a count above 2048 rounded.
    """
    dims = reduce_dims(x)
    C = x.shape[1]
    local_m = values_per_channel(tuple(x.shape))
    if x.dtype in LOW_PRECISION:
        x = x.float()
    sums = torch.cat([x.sum(dim=dims), x.new_full((1,), local_m)])          # (C + 1,)
    all_reduce_sum(sums, group)                                              # round 1
    m = int(round(float(sums[C])))
    if m <= 1:  # every process sees the same m, so every process raises: none is left waiting
        raise ValueError(
            f"SyncBatchNorm: expected more than 1 value per channel over all {world_size(group)} "
            f"process(es) together, got {m}. The variance of a single value is 0. Use a larger batch."
        )
    mu = sums[:C] / m
    sq = ((x - per_channel(mu, x.dim())) ** 2).sum(dim=dims)                 # (C,)
    all_reduce_sum(sq, group)                                                # round 2
    return mu, sq / m, m


class SyncBatchNormFunction(torch.autograd.Function):
    """Normalize with given global statistics; the backward all-reduces the two gradient sums.

    forward(x, gamma, beta, mu, var, m, eps, group) -> out, shape of x.
    x: this process's (N, C, *spatial); gamma, beta: (C,) or None; mu, var: (C,), the global
    statistics from ``sync_mean_var`` (no gradient of their own: the compact backward below
    already accounts for x's effect through them); m: the global number of values per channel.

    backward(dout) -> dx (shape of x), dgamma, dbeta ((C,), the same global sums on every
    process, or None), then None for mu, var, m, eps and group.
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, mu, var, m, eps, group):
        inv_std = torch.rsqrt(var + eps)
        x_hat = (x - per_channel(mu, x.dim())) * per_channel(inv_std, x.dim())
        out = x_hat
        if gamma is not None:
            out = out * per_channel(gamma, x.dim())
        if beta is not None:
            out = out + per_channel(beta, x.dim())
        ctx.save_for_backward(x_hat, inv_std, gamma)
        ctx.m, ctx.group, ctx.has_beta = m, group, beta is not None
        return out

    @staticmethod
    @once_differentiable  # the hand-written backward is not itself differentiable: say so, as BatchNorm
    def backward(ctx, dout):
        x_hat, inv_std, gamma = ctx.saved_tensors
        dims = reduce_dims(dout)
        C = dout.shape[1]
        dbeta = dout.sum(dim=dims)                        # this shard's sums ...
        dgamma = (dout * x_hat).sum(dim=dims)
        sums = all_reduce_sum(torch.cat([dbeta, dgamma]), ctx.group)  # ... and every shard's
        sum_dout, sum_dout_x_hat = sums[:C], sums[C:]
        scale = inv_std if gamma is None else gamma * inv_std
        dx = per_channel(scale, dout.dim()) * (
            dout - per_channel(sum_dout / ctx.m, dout.dim())
            - x_hat * per_channel(sum_dout_x_hat / ctx.m, dout.dim()))
        return (dx, dgamma if gamma is not None else None, dbeta if ctx.has_beta else None,
                None, None, None, None, None)


def sync_batchnorm(x, gamma, beta, eps=1e-5, group=None):
    """Training-mode batch norm with statistics over the batches of all processes of ``group``.

    x: (n_p, C, *spatial); gamma, beta: (C,) or None. Returns out, shape and dtype of x
    (float16/bfloat16 input is computed in float32 and rounded once, as ``SyncBatchNorm``).
    """
    check_input(x, "x")
    check_params(x, gamma, beta)
    check_eps(eps)
    in_dtype = x.dtype
    if in_dtype in LOW_PRECISION:
        x, gamma, beta = (None if t is None else t.float() for t in (x, gamma, beta))
    with torch.no_grad():
        mu, var, m = sync_mean_var(x.detach(), group)
    return SyncBatchNormFunction.apply(x, gamma, beta, mu, var, m, eps, group).to(in_dtype)


class SyncBatchNorm(BatchNorm):
    """``bn_course.torch_bn.BatchNorm`` whose training statistics span every process.

    Same arguments, buffers and ``state_dict`` as ``BatchNorm`` (and ``nn.BatchNorm*d``),
    plus ``process_group`` (default: all processes). The running statistics are updated
    with the global mean and unbiased variance, identically on every process.
    Evaluation mode uses the running statistics and needs no communication. First
    derivatives only, as ``BatchNorm`` (the backward is marked ``once_differentiable``).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None, *, bias=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.process_group = process_group

    def forward(self, x):
        if not self.training and self.track_running_stats:
            return super().forward(x)  # running statistics: nothing to synchronize
        self._check(x)
        in_dtype = x.dtype
        x = x.to(self._compute_dtype(x))  # float16/bfloat16: computed in float32, as BatchNorm
        with torch.no_grad():
            mu, var, m = sync_mean_var(x.detach(), self.process_group)
        if self.training and self.track_running_stats:
            self.update_running_averages(mu, var * m / (m - 1))  # unbiased, over all processes
        out = SyncBatchNormFunction.apply(x, *self._affine(x.dtype), mu, var, m, self.eps, self.process_group)
        return out.to(in_dtype)


# --- the experiment of notebook 10, run in each process by bn_course.launch ---------------------

def shard(t, rank, world_size):
    """This rank's part of a batch: ``world_size`` nearly equal slices along axis 0."""
    if not isinstance(t, torch.Tensor) or t.dim() < 1:
        raise TypeError(f"shard: t must be a torch.Tensor with a batch axis (axis 0), got "
                        f"{type(t).__name__} of shape {tuple(getattr(t, 'shape', ()))}.")
    check_positive_int(world_size, "world_size", "the number of processes", where="shard")
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 0 <= rank < world_size:
        raise ValueError(f"shard: rank must be an integer from 0 to world_size - 1 = {world_size - 1}, got {rank!r}.")
    return torch.tensor_split(t, int(world_size), dim=0)[int(rank)]


def _one_run(module, batches, rank, world_size):
    """Train-mode steps on this rank's shards; the last step's out, dx, dgamma, dbeta and the buffers."""
    for x_full, dout_full in batches:
        x = shard(x_full, rank, world_size).clone().requires_grad_(True)
        out = module(x)
        dx, dgamma, dbeta = torch.autograd.grad(out, (x, module.weight, module.bias),
                                                shard(dout_full, rank, world_size))
    return {"out": out.detach(), "dx": dx, "dgamma": dgamma, "dbeta": dbeta,
            "running_mean": module.running_mean.clone(), "running_var": module.running_var.clone(),
            "num_batches_tracked": int(module.num_batches_tracked)}


def _try_torch_sync_batchnorm(x, num_features):
    """Run torch.nn.SyncBatchNorm on this process's tensor; the error message if it refuses."""
    layer = torch.nn.SyncBatchNorm(num_features).to(dtype=x.dtype, device=x.device)
    try:
        return {"out": layer(x).detach(), "error": None}
    except Exception as err:  # reported to the notebook, not hidden
        return {"out": None, "error": f"{type(err).__name__}: {err}"}


def sync_bn_demo(rank, world_size, batches, gamma, beta, momentum=0.1, per_process=True):
    """Worker for ``bn_course.launch``: the same steps with synchronized and with per-process BN.

    batches: list of (x_full, dout_full), the *whole* batch (identical on every rank; each
    rank takes its shard). gamma, beta: (C,). Returns a dict of this rank's results:
    ``sync`` and ``local`` (see ``_one_run``; ``local`` only if ``per_process``, which needs
    more than one value per channel in each shard) and ``torch_sync`` (what
    torch.nn.SyncBatchNorm did with this rank's first shard).
    """
    C = gamma.numel()
    results = {}
    variants = [("sync", SyncBatchNorm)] + ([("local", BatchNorm)] if per_process else [])
    for name, cls in variants:
        module = cls(C, momentum=momentum, dtype=gamma.dtype)
        with torch.no_grad():
            module.weight.copy_(gamma)
            module.bias.copy_(beta)
        results[name] = _one_run(module, batches, rank, world_size)
    results["torch_sync"] = _try_torch_sync_batchnorm(shard(batches[0][0], rank, world_size), C)
    return results


def single_process_reference(batches, gamma, beta, momentum=0.1):
    """What one process holding every batch whole computes: the target of synchronized BN."""
    module = BatchNorm(gamma.numel(), momentum=momentum, dtype=gamma.dtype)
    with torch.no_grad():
        module.weight.copy_(gamma)
        module.bias.copy_(beta)
    return _one_run(module, batches, rank=0, world_size=1)


def gather_shards(per_rank, key):
    """Concatenate one per-shard result (out or dx) of every rank back into the whole batch."""
    return torch.cat([r[key] for r in per_rank], dim=0)


def max_differences(per_rank, reference):
    """Largest absolute difference from the one-process reference, per quantity.

    per_rank: the ``sync`` or ``local`` results of every rank (a list); reference: the dict of
    ``single_process_reference``. Parameter gradients are summed over the ranks, as
    data-parallel training does; running statistics are compared rank by rank.
    """
    diff = {}
    for key in ("out", "dx"):
        diff[key] = float((gather_shards(per_rank, key) - reference[key]).abs().max())
    for key in ("dgamma", "dbeta"):
        diff[key] = float((sum(r[key] for r in per_rank) - reference[key]).abs().max())
    for key in ("running_mean", "running_var"):
        diff[key] = max(float((r[key] - reference[key]).abs().max()) for r in per_rank)
    return diff

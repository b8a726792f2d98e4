"""Batch norm that moves as few bytes as it can: the from-scratch math, fused by ``torch.compile``.

BN does a handful of arithmetic operations per value, so its speed is set by how
many times it reads and writes a tensor the size of ``x`` (a *pass*). The least a
training step can do, for a tensor larger than the caches:

forward   3 passes: read x (mean and variance in one sweep), read x and write out
backward  5 passes: read dout and x (the two sums), read dout and x and write dx

Written as separate PyTorch operations (``bn_course.torch_bn``), each operation is
its own pass and writes an intermediate tensor; ``torch.compile`` fuses the two
functions below into one reduction loop and one elementwise loop each (C++ on a
CPU, Triton on a GPU), which is the 3 + 5 = 8 passes above. The backward
recomputes ``x_hat`` from ``x`` instead of saving it: that costs arithmetic, which
is free here, and saves a pass.

``FusedBatchNorm`` is a drop-in for ``bn_course.torch_bn.BatchNorm`` (and so for
``nn.BatchNorm*d``); ``compile=False`` runs the very same functions eagerly.
"""

import torch
from torch.autograd.function import once_differentiable

from bn_course._validate import check_channels, check_enough_values, check_eps
from bn_course.torch_bn import BatchNorm, check_input, check_params, per_channel, reduce_dims

# torch.compile specializes on shape, dtype and layout; allow more variants than its default of 8
# before it silently falls back to the (unfused) eager code.
_RECOMPILE_LIMIT = 64


def forward_math(x, gamma, beta, eps):
    """Training-mode forward in two sweeps over x.

    x: (N, C, *spatial); gamma, beta: (C,) or None.
    Returns out (shape of x), mu (C,), var (C,) biased, inv_std (C,).
    """
    check_input(x, "x")  # plain Python on type, dtype and shape: torch.compile traces it away
    check_params(x, gamma, beta)
    check_enough_values(tuple(x.shape), "x")
    check_eps(eps)
    var, mu = torch.var_mean(x, dim=reduce_dims(x), correction=0)  # sweep 1: one pass of x
    inv_std = torch.rsqrt(var + eps)
    scale = inv_std if gamma is None else gamma * inv_std          # C values: negligible
    out = (x - per_channel(mu, x.dim())) * per_channel(scale, x.dim())  # sweep 2: read x, write out
    if beta is not None:
        out = out + per_channel(beta, x.dim())
    return out, mu, var, inv_std


def backward_math(dout, x, mu, inv_std, gamma):
    """The compact backward, recomputing x_hat from x.

    dout, x: (N, C, *spatial); mu, inv_std: (C,); gamma: (C,) or None.
    Returns dx (shape of x), dgamma (C,), dbeta (C,).
    """
    _check_backward_args(dout, x, mu, inv_std, gamma)
    dims = reduce_dims(x)
    m = x.numel() // x.shape[1]
    x_hat = (x - per_channel(mu, x.dim())) * per_channel(inv_std, x.dim())
    dbeta = dout.sum(dim=dims)                                     # sweep 1: read dout and x
    dgamma = (dout * x_hat).sum(dim=dims)
    scale = inv_std if gamma is None else gamma * inv_std
    dx = per_channel(scale, x.dim()) * (                           # sweep 2: read both, write dx
        dout - per_channel(dbeta / m, x.dim()) - x_hat * per_channel(dgamma / m, x.dim()))
    return dx, dgamma, dbeta


def _check_backward_args(dout, x, mu, inv_std, gamma):
    """backward_math's inputs: x and dout floating tensors of one shape (N, C, *spatial), mu and
    inv_std tensors of shape (C,), gamma (C,) or None. Checks on types and shapes only."""
    check_input(x, "x")
    check_input(dout, "dout")
    if dout.shape != x.shape:
        raise ValueError(f"dout must have the shape of x, {tuple(x.shape)}, got shape {tuple(dout.shape)}.")
    for name, t in (("mu", mu), ("inv_std", inv_std)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (C,), got {type(t).__name__}.")
        check_channels(tuple(x.shape), tuple(t.shape), name, "x")
    check_params(x, gamma, None)


_compiled = {}


def compiled(fn):
    """``torch.compile(fn)``, made once and kept: a static-shape graph per input shape and layout."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False)
    return _compiled[fn]


def _run(fn, use_compile, *args):
    """fn(*args), through its compiled version when ``use_compile``."""
    if not use_compile:
        return fn(*args)
    try:
        with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
            return compiled(fn)(*args)
    except (torch._dynamo.exc.BackendCompilerFailed, torch._inductor.exc.InductorError) as err:
        raise RuntimeError(
            f"torch.compile could not build the fused batch norm on this machine ({type(err).__name__}). "
            "On a CPU it needs a working C++ compiler (gcc, clang or MSVC); on a GPU, Triton. "
            "FusedBatchNorm(..., compile=False) runs the same functions without compiling. "
            f"The compiler said:\n{str(err)[:2000]}"
        ) from err


class FusedBatchNormFunction(torch.autograd.Function):
    """forward(x, gamma, beta, eps, use_compile) -> out, mu, var (mu and var not differentiable).

    x: (N, C, *spatial); gamma, beta: (C,) or None; out: shape (and memory layout) of x; mu, var:
    (C,), var biased. backward(dout, _, _) -> dx (shape of x), dgamma, dbeta ((C,) or None), None, None.
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, eps, use_compile):
        out, mu, var, inv_std = _run(forward_math, use_compile, x, gamma, beta, eps)
        ctx.save_for_backward(x, mu, inv_std, gamma)
        ctx.use_compile = use_compile
        ctx.mark_non_differentiable(mu, var)
        return out, mu, var

    @staticmethod
    @once_differentiable  # the backward is not itself differentiable: say so, as BatchNorm
    def backward(ctx, dout, _dmu, _dvar):
        x, mu, inv_std, gamma = ctx.saved_tensors
        dx, dgamma, dbeta = _run(backward_math, ctx.use_compile, dout.contiguous(memory_format=_layout(x)),
                                 x, mu, inv_std, gamma)
        return (dx, dgamma if ctx.needs_input_grad[1] else None,
                dbeta if ctx.needs_input_grad[2] else None, None, None)


def _layout(x):
    """The memory format x is stored in, so dout can be brought to the same (no-op when it already is)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def fused_batchnorm(x, gamma, beta, eps=1e-5, use_compile=True):
    """Training-mode batch norm through the fused functions. Returns out, mu (C,), var (C,) biased.

    x: (N, C, *spatial); gamma, beta: (C,) or None.
    """
    check_input(x, "x")
    check_params(x, gamma, beta)
    check_enough_values(tuple(x.shape), "x")
    check_eps(eps)
    return FusedBatchNormFunction.apply(x, gamma, beta, eps, use_compile)


class FusedBatchNorm(BatchNorm):
    """``bn_course.torch_bn.BatchNorm`` whose training step runs the fused (compiled) functions.

    Same arguments, buffers and ``state_dict`` as ``BatchNorm``, plus ``compile``:
    ``True`` (default) fuses with ``torch.compile`` on first use of each input shape
    (that first call takes seconds: it generates and compiles code), ``False`` runs
    the same functions eagerly. Evaluation mode is ``BatchNorm``'s one affine map. First
    derivatives only, as ``BatchNorm`` (the backward is marked ``once_differentiable``).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, compile=True, device=None, dtype=None, *, bias=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.compile = compile

    def _normalize_batch(self, x):
        """BatchNorm's training step through the fused functions (evaluation mode stays BatchNorm's
        one affine map per channel: nothing to fuse)."""
        return fused_batchnorm(x, *self._affine(x.dtype), self.eps, self.compile)

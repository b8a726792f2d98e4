"""Batch norm as hand-written Triton kernels: the fewest passes over memory, for contiguous (N, C, *spatial).

``bn_course.fused_bn`` lets ``torch.compile`` write the kernels. Here we write them
ourselves, in Triton (Python that compiles to GPU code). Three kernels, each launched
once per direction, so a training step is six launches, two of them tiny:

forward    1. ``_partial_sums``   per (channel, slice of the batch): sums of (x - k) and (x - k)**2,
                                  k = the channel's first value (a shift against cancellation); reads x
           2. ``_finalize``       per channel: mean, var, inv_std and out's scale and shift   (C values)
           3. ``_affine_rows``    out = scale * x + shift; reads x, writes out
backward   1. ``_partial_sums``   sums of dout and dout * (x - mean); reads dout and x
           2. ``_finalize``       per channel: dbeta, dgamma and dx's three coefficients      (C values)
           3. ``_affine_rows``    dx = a * dout + b * x + d; reads dout and x, writes dx

That is 3 + 5 passes over a tensor of x's size: the least a training step can do
(``bn_course.bench.PASSES``). dx = a * dout + b * x + d is the compact backward
dx = gamma * inv_std * (dout - dbeta / m - x_hat * dgamma / m) with x_hat = (x - mean) * inv_std
expanded, so that the per-element work is two multiply-adds.

Why split each channel's sum over many programs? A GPU has many multiprocessors
(132 on an H100); one program per channel would leave most of them idle when C is
small (64 here), which is what the native NCHW kernel does (notebook 10).

On a GPU the kernels are compiled. On a CPU they run in Triton's *interpreter*
(NumPy, one program at a time): slow, but the same arithmetic, so it is how the tests
check the kernels on a machine with no GPU. Needs Triton (Linux; it comes with PyTorch's CUDA builds).
"""

import math

import torch
from torch.autograd.function import once_differentiable

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError as err:  # pragma: no cover - depends on the platform
    raise ImportError(
        "bn_course.triton_bn needs Triton, which installs on Linux only: pip install triton==3.7.1 "
        "(PyTorch's CUDA builds bring it). Elsewhere, bn_course.fused_bn gives a fused batch norm "
        "through torch.compile."
    ) from err

from bn_course._validate import check_enough_values, check_eps
from bn_course.torch_bn import BatchNorm, check_input, check_params

# The kernels use only Triton's built-in operations (tl.full, tl.reduce, ...), not its library functions
# written in Triton (tl.zeros, tl.sum): those are compiled-only unless TRITON_INTERPRET=1 was set before
# triton was imported, and we want both modes in one process. _add is tl.sum's own combine function
# (the interpreter recognizes it and sums with NumPy).
_add = tl.standard._sum_combine

BLOCK = 1024      # values a program loads at once (its loop runs over a row in BLOCKs)
PROGRAMS = 2048   # about how many programs the partial sums use: several per multiprocessor
NUM_WARPS = 4     # 128 threads per program


def _partial_sums_kernel(a_ptr, b_ptr, k_ptr, k_stride, part_ptr, N, C, L,
                         BLOCK: tl.constexpr, PRODUCT: tl.constexpr):
    """Program (c, s) sums channel c over images s, s + S, s + 2S, ... ; a, b: (N, C, L) contiguous.

    PRODUCT False: sums of (a - k) and (a - k)**2.    PRODUCT True: sums of a and a * (b - k).
    k = k_ptr[c * k_stride]. Writes part[c, s, 0] and part[c, s, 1]; part: (C, S, 2).
    """
    c = tl.program_id(0)
    s = tl.program_id(1)
    S = tl.num_programs(1)
    k = tl.load(k_ptr + c * k_stride)
    acc0 = tl.full([BLOCK], 0.0, k.dtype)
    acc1 = tl.full([BLOCK], 0.0, k.dtype)
    for n in range(s, N, S):
        row = (n * C + c).to(tl.int64) * L        # where row (n, c) starts
        for start in range(0, L, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < L
            a = tl.load(a_ptr + row + offs, mask=mask, other=0.0)
            if PRODUCT:
                b = tl.load(b_ptr + row + offs, mask=mask, other=0.0)
                acc0 += a
                acc1 += a * tl.where(mask, b - k, 0.0)
            else:
                d = tl.where(mask, a - k, 0.0)
                acc0 += d
                acc1 += d * d
    out = part_ptr + (c * S + s) * 2
    tl.store(out, tl.reduce(acc0, 0, _add))
    tl.store(out + 1, tl.reduce(acc1, 0, _add))


def _finalize_kernel(part_ptr, k_ptr, k_stride, gamma_ptr, beta_ptr, stats_ptr, coef_ptr, grads_ptr, S, m, eps,
                     BLOCK_S: tl.constexpr, BACKWARD: tl.constexpr, HAS_GAMMA: tl.constexpr,
                     HAS_BETA: tl.constexpr):
    """Program c: adds channel c's S partial sums and makes the per-channel numbers.

    forward:  part holds sums of (x - k) and (x - k)**2, k = x[0, c, 0]. Writes stats[c, :] = mean,
              var, inv_std and coef[c, :] = scale, shift, 0.
    backward: part holds sums of dout and dout * (x - mean); stats is the forward's (C, 3) table.
              Writes coef[c, :] = a, d, b and grads[0, c] = dgamma, grads[1, c] = dbeta.
    """
    c = tl.program_id(0)
    i = tl.arange(0, BLOCK_S)
    p0 = tl.reduce(tl.load(part_ptr + (c * S + i) * 2, mask=i < S, other=0.0), 0, _add)
    p1 = tl.reduce(tl.load(part_ptr + (c * S + i) * 2 + 1, mask=i < S, other=0.0), 0, _add)
    gamma = tl.load(gamma_ptr + c) if HAS_GAMMA else 1.0
    if not BACKWARD:
        k = tl.load(k_ptr + c * k_stride)
        d_mean = p0 / m                           # mean of (x - k)
        var = tl.maximum(p1 / m - d_mean * d_mean, 0.0)
        mean = k + d_mean
        inv_std = 1.0 / tl.sqrt(var + eps)
        scale = gamma * inv_std
        shift = tl.load(beta_ptr + c) - mean * scale if HAS_BETA else -mean * scale
        tl.store(stats_ptr + c * 3, mean)
        tl.store(stats_ptr + c * 3 + 1, var)
        tl.store(stats_ptr + c * 3 + 2, inv_std)
        tl.store(coef_ptr + c * 3, scale)
        tl.store(coef_ptr + c * 3 + 1, shift)
        tl.store(coef_ptr + c * 3 + 2, 0.0 * scale)
    else:
        mean = tl.load(stats_ptr + c * 3)
        inv_std = tl.load(stats_ptr + c * 3 + 2)
        dbeta = p0
        dgamma = p1 * inv_std                     # sum of dout * x_hat
        a = gamma * inv_std
        b = -a * inv_std * dgamma / m
        d = -a * dbeta / m - b * mean
        tl.store(coef_ptr + c * 3, a)
        tl.store(coef_ptr + c * 3 + 1, d)
        tl.store(coef_ptr + c * 3 + 2, b)
        tl.store(grads_ptr + c, dgamma)
        tl.store(grads_ptr + tl.num_programs(0) + c, dbeta)


def _affine_rows_kernel(a_ptr, b_ptr, out_ptr, coef_ptr, C, L, BLOCK: tl.constexpr, TWO_INPUTS: tl.constexpr):
    """Program r, one row (n, c) of L values: out = p * a + q (+ r * b), with p, q, r = coef[c, :]."""
    row = tl.program_id(0)
    c = row % C
    p = tl.load(coef_ptr + c * 3)
    q = tl.load(coef_ptr + c * 3 + 1)
    start_of_row = row.to(tl.int64) * L
    for start in range(0, L, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < L
        a = tl.load(a_ptr + start_of_row + offs, mask=mask)
        y = a * p + q
        if TWO_INPUTS:
            r = tl.load(coef_ptr + c * 3 + 2)
            b = tl.load(b_ptr + start_of_row + offs, mask=mask)
            y += b * r
        tl.store(out_ptr + start_of_row + offs, y, mask=mask)


# Each kernel twice: compiled for a GPU, interpreted (NumPy) for tensors on the CPU.
_KERNELS = {name: {"cuda": triton.jit(fn), "cpu": InterpretedFunction(fn)}
            for name, fn in (("partial_sums", _partial_sums_kernel), ("finalize", _finalize_kernel),
                             ("affine_rows", _affine_rows_kernel))}


# Older interpreters cannot run these kernels (Triton 3.6's fails on `range(s, N, S)` with s a program id).
INTERPRETER_MIN_VERSION = (3, 7)


def runs_on(device):
    """Whether the kernels run on ``device``: a CUDA GPU, or the CPU with a recent enough interpreter."""
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and _version(triton.__version__) >= INTERPRETER_MIN_VERSION)


def _kernel(name, x):
    if x.device.type not in ("cuda", "cpu"):
        raise ValueError(f"bn_course.triton_bn runs on a CUDA GPU (compiled) or the CPU (interpreted), "
                         f"got a tensor on {x.device}.")
    if not runs_on(x.device):
        raise RuntimeError(
            f"running the Triton kernels on the CPU needs Triton's interpreter from version "
            f"{'.'.join(map(str, INTERPRETER_MIN_VERSION))} on (the course pins 3.7.1); this is Triton "
            f"{triton.__version__}. On a GPU this version works: move the tensors there, e.g. x.cuda().")
    return _KERNELS[name][x.device.type]


def _version(text):
    """'3.7.1' -> (3, 7): the major and minor version numbers."""
    return tuple(int(part) for part in text.split(".")[:2])


def slices_per_channel(N, C):
    """S: how many programs share each channel's sums (about PROGRAMS in all, at most one per image)."""
    return max(1, min(N, PROGRAMS // C))


def _sizes(x):
    """N, C, L (values per row: the product of the spatial dims) and the grid's slices per channel S."""
    N, C = x.shape[0], x.shape[1]
    return N, C, math.prod(x.shape[2:]), slices_per_channel(N, C)


def _block(L):
    """Values loaded at once: a power of 2, at most BLOCK, no wider than a row needs (at least 16)."""
    return max(16, min(BLOCK, triton.next_power_of_2(L)))


def check_triton_input(x, gamma, beta):
    """Everything the kernels need: a float32/float64 tensor (N, C, *spatial), contiguous, with
    gamma and beta of shape (C,) or None and more than one value per channel."""
    check_input(x, "x")
    check_params(x, gamma, beta)
    check_enough_values(tuple(x.shape), "x")
    check_layout(x)
    for name, p in (("gamma", gamma), ("beta", beta)):
        if p is not None and p.device != x.device:
            raise ValueError(f"{name} is on {p.device} but x is on {x.device}; the kernels read both from "
                             f"one device: move {name} there, e.g. {name}.to(x.device).")


def check_layout(x):
    """float32 or float64, stored as contiguous (N, C, *spatial) rows."""
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the Triton kernels compute in float32 or float64, got x of dtype {x.dtype}; "
                        "convert it, e.g. x.float() (TritonBatchNorm does this for you).")
    if not x.is_contiguous():
        raise ValueError("the Triton kernels read x as contiguous (N, C, *spatial) rows; this x is not "
                         "(channels_last, or a transposed view). Use x.contiguous(), or "
                         "bn_course.fused_bn.FusedBatchNorm, which handles any layout.")


def triton_forward(x, gamma, beta, eps=1e-5):
    """Training-mode forward. x: (N, C, *spatial) contiguous float32/float64; gamma, beta: (C,) or None.

    Returns out (shape of x) and stats (C, 3): columns mean, var (biased), inv_std.
    """
    N, C, L, S = _sizes(x)
    part = torch.empty((C, S, 2), dtype=x.dtype, device=x.device)
    stats = torch.empty((C, 3), dtype=x.dtype, device=x.device)   # mean, var, inv_std
    coef = torch.empty((C, 3), dtype=x.dtype, device=x.device)    # scale, shift, (unused)
    out = torch.empty_like(x)
    _kernel("partial_sums", x)[(C, S)](x, x, x, L, part, N, C, L, BLOCK=_block(L), PRODUCT=False,
                                       num_warps=NUM_WARPS)
    _kernel("finalize", x)[(C,)](part, x, L, x if gamma is None else gamma, x if beta is None else beta,
                                 stats, coef, x, S, N * L, eps, BLOCK_S=triton.next_power_of_2(S),
                                 BACKWARD=False, HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None)
    _kernel("affine_rows", x)[(N * C,)](x, x, out, coef, C, L, BLOCK=_block(L), TWO_INPUTS=False,
                                        num_warps=NUM_WARPS)
    return out, stats


def triton_backward(dout, x, stats, gamma):
    """dout, x: (N, C, *spatial) contiguous; stats: (C, 3) mean, var, inv_std from the forward.

    Returns dx (shape of x), dgamma (C,), dbeta (C,).
    """
    N, C, L, S = _sizes(x)
    part = torch.empty((C, S, 2), dtype=x.dtype, device=x.device)
    grads = torch.empty((2, C), dtype=x.dtype, device=x.device)   # dgamma, dbeta
    coef = torch.empty((C, 3), dtype=x.dtype, device=x.device)    # a, d, b
    dx = torch.empty_like(x)
    _kernel("partial_sums", x)[(C, S)](dout, x, stats, 3, part, N, C, L, BLOCK=_block(L), PRODUCT=True,
                                       num_warps=NUM_WARPS)
    _kernel("finalize", x)[(C,)](part, x, 0, x if gamma is None else gamma, x, stats, coef, grads, S, N * L, 0.0,
                                 BLOCK_S=triton.next_power_of_2(S), BACKWARD=True,
                                 HAS_GAMMA=gamma is not None, HAS_BETA=False)
    _kernel("affine_rows", x)[(N * C,)](dout, x, dx, coef, C, L, BLOCK=_block(L), TWO_INPUTS=True,
                                        num_warps=NUM_WARPS)
    return dx, grads[0], grads[1]


class TritonBatchNormFunction(torch.autograd.Function):
    """forward(x, gamma, beta, eps) -> out, mean, var (mean and var not differentiable)."""

    @staticmethod
    def forward(ctx, x, gamma, beta, eps):
        out, stats = triton_forward(x, gamma, beta, eps)
        mean, var = stats[:, 0], stats[:, 1]
        ctx.save_for_backward(x, stats, gamma)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    @once_differentiable  # the kernels' backward is not itself differentiable: say so, as BatchNorm
    def backward(ctx, dout, _dmean, _dvar):
        x, stats, gamma = ctx.saved_tensors
        dx, dgamma, dbeta = triton_backward(dout.contiguous(), x, stats, gamma)
        return (dx, dgamma if ctx.needs_input_grad[1] else None,
                dbeta if ctx.needs_input_grad[2] else None, None)


def triton_batchnorm(x, gamma, beta, eps=1e-5):
    """Training-mode batch norm through the Triton kernels. Returns out, mean (C,), var (C,) biased.

    x: (N, C, *spatial) contiguous, float32 or float64, on a CUDA GPU or the CPU (interpreted: slow).
    """
    check_triton_input(x, gamma, beta)
    check_eps(eps)
    return TritonBatchNormFunction.apply(x, gamma, beta, eps)


class TritonBatchNorm(BatchNorm):
    """``bn_course.torch_bn.BatchNorm`` whose training step runs the Triton kernels.

    Same arguments, buffers and ``state_dict`` as ``BatchNorm`` (and so as ``nn.BatchNorm*d``).
    Input must be contiguous (N, C, *spatial). Evaluation mode is ``BatchNorm``'s one
    affine map per channel. First derivatives only, as ``BatchNorm`` (the backward is marked
    ``once_differentiable``).
    """

    def _normalize_batch(self, x):
        """BatchNorm's training step through the Triton kernels; ``BatchNorm.forward`` has already checked
        x and converted float16/bfloat16 input to float32."""
        check_layout(x)
        return TritonBatchNormFunction.apply(x, *self._affine(x.dtype), self.eps)

"""Batch normalization in PyTorch, the three versions of notebook 04.

- ``batchnorm_autograd``: the four training-mode steps in torch ops; autograd derives
  the backward pass.
- ``BatchNormFunction``: a ``torch.autograd.Function`` with the compact backward pass
  written by hand.
- ``BatchNorm``: an ``nn.Module``, a drop-in replacement for ``torch.nn.BatchNorm1d/2d/3d``
  for any input rank >= 2: same outputs, gradients, running buffers, evaluation
  behavior and ``state_dict`` keys, so state dicts load both ways.

Shapes: ``x`` is ``(N, C)`` or ``(N, C, *spatial)``; statistics are per channel, over
every dim except 1; ``m = N * prod(spatial)`` values per channel; ``gamma``, ``beta``,
``mu``, ``var`` and the running statistics are ``(C,)``.

The experiments of notebook 04's "classic bugs" live in ``bn_course.classic_bugs``.
"""

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from bn_course._validate import (check_bool, check_channels, check_enough_values, check_eps, check_momentum,
                                 check_num_features, check_rank, values_per_channel)

# Input dtypes that PyTorch normalizes in float32: with float32 parameters (mixed precision) or with
# parameters of the input's own dtype.
LOW_PRECISION = (torch.float16, torch.bfloat16)


def reduce_dims(x):
    """The dims the statistics are taken over: every dim but 1 (the channels)."""
    return [0] + list(range(2, x.dim()))


def per_channel(v, ndim):
    """Reshape a ``(C,)`` tensor to ``(1, C, 1, ..., 1)`` so it broadcasts against x."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def check_input(x, where="input"):
    """Reject what batch norm cannot normalize (not a tensor, integer dtype, rank < 2),
    with a message that names the problem."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where} must be a torch.Tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(
            f"{where} must be a floating-point tensor, got dtype {x.dtype}. "
            "Convert it first, e.g. x.float()."
        )
    check_rank(tuple(x.shape), where)


def check_layer_input(x, num_features, name):
    """The input of a layer ``name`` built for ``num_features`` channels: a floating tensor
    (N, C, *spatial) with C = num_features."""
    check_input(x, f"{name} input")
    if x.shape[1] != num_features:
        raise ValueError(
            f"{name} got an input with {x.shape[1]} channels (axis 1 of shape "
            f"{tuple(x.shape)}); the channel count must equal num_features={num_features}."
        )


def check_params(x, gamma, beta, where="x"):
    """gamma and beta (each may be None) must be tensors of shape (C,) with the dtype of x."""
    for name, p in (("gamma", gamma), ("beta", beta)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (C,) or None, got {type(p).__name__}.")
        check_channels(tuple(x.shape), tuple(p.shape), name, where)
        if p.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {p.dtype} but {where} has dtype {x.dtype}; "
                            f"convert one so that they match, e.g. {name}.to({x.dtype}).")


def batchnorm_autograd(x, gamma, beta, eps=1e-5):
    """The four training-mode steps written with torch ops; autograd derives the backward.

    x: (N, C, *spatial); gamma, beta: (C,) or None (no scale, no shift) -> out: shape of x.
    """
    check_input(x, "x")
    check_params(x, gamma, beta)
    check_enough_values(tuple(x.shape), "x")
    check_eps(eps)
    dims = reduce_dims(x)
    mu = x.mean(dim=dims, keepdim=True)                            # step 1
    var = ((x - mu) ** 2).mean(dim=dims, keepdim=True)             # step 2
    x_hat = (x - mu) / torch.sqrt(var + eps)                       # step 3
    out = x_hat if gamma is None else per_channel(gamma, x.dim()) * x_hat  # step 4
    return out if beta is None else out + per_channel(beta, x.dim())


class BatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm with the compact backward pass written by hand.

    Use as ``BatchNormFunction.apply(x, gamma, beta, eps) -> out``, with x and out
    ``(N, C, *spatial)``, gamma and beta ``(C,)``. forward saves ``x_hat`` (shape of x),
    ``inv_std = 1 / sqrt(var + eps)`` ``(1, C, 1, ...)`` and ``gamma`` ``(C,)``; backward
    turns ``dout`` (shape of x) into, per channel::

        dbeta  = sum(dout)
        dgamma = sum(dout * x_hat)
        dx     = gamma * inv_std * (dout - dbeta / m - x_hat * dgamma / m)

    ``gamma`` and ``beta`` may be ``None`` (no scale, no shift). ``stats``, when given a
    dict, receives the batch's ``mu`` and biased ``var`` (each ``(C,)``) and ``m``, so that
    the module can update its running averages without another pass over x.

    Written for speed as well as clarity: each statistic is one plain reduction
    (``torch.var_mean`` over several dims was several times slower on CPU when measured),
    and temporaries that nothing else holds are reused in place rather than allocated
    again: large fresh allocations cost as much as the arithmetic here.
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, eps, stats=None):
        """x: (N, C, *spatial); gamma, beta: (C,) or None; eps: float -> out: shape of x."""
        check_input(x, "x")
        check_params(x, gamma, beta)
        check_enough_values(tuple(x.shape), "x")
        check_eps(eps)
        dims, ndim = reduce_dims(x), x.dim()
        mu = x.mean(dim=dims, keepdim=True)                        # step 1
        x_mu = x - mu
        sq = torch.square(x_mu)                                    # scratch, reused for out below
        var = sq.mean(dim=dims, keepdim=True)                      # step 2 (two-pass: stable)
        inv_std = torch.rsqrt(var + eps)
        x_hat = x_mu.mul_(inv_std)                                 # step 3, in x_mu's memory
        if gamma is None:                                          # step 4, into sq's memory
            out = sq.copy_(x_hat)
        else:
            out = torch.mul(x_hat, per_channel(gamma, ndim), out=sq)
        if beta is not None:
            out.add_(per_channel(beta, ndim))
        ctx.save_for_backward(x_hat, inv_std, gamma)
        ctx.has_beta = beta is not None
        if stats is not None:  # hand the batch statistics to the caller (the module's running averages)
            stats.update(mu=mu.reshape(-1), var=var.reshape(-1), m=x.numel() // x.shape[1])
        return out

    @staticmethod
    @once_differentiable  # the backward below is not itself differentiable: say so, don't be wrong
    def backward(ctx, dout):
        """dout: shape of x -> (dx: shape of x, dgamma: (C,), dbeta: (C,), None, None)."""
        x_hat, inv_std, gamma = ctx.saved_tensors
        dims, ndim = reduce_dims(dout), dout.dim()
        m = dout.numel() // dout.shape[1]
        dbeta = dout.sum(dim=dims)
        dout_x_hat = dout * x_hat
        dgamma = dout_x_hat.sum(dim=dims)
        dx = None
        if ctx.needs_input_grad[0]:
            scale = inv_std if gamma is None else per_channel(gamma, ndim) * inv_std
            # dx = scale * (dout - dbeta/m - x_hat * dgamma/m), written into dout_x_hat's memory
            dx = torch.addcmul(per_channel(-dbeta / m, ndim), x_hat, per_channel(-dgamma / m, ndim),
                               out=dout_x_hat)
            dx.add_(dout).mul_(scale)
        return (dx,
                None if gamma is None else dgamma,
                dbeta if ctx.has_beta else None,
                None, None)


class BatchNorm(nn.Module):
    """Batch normalization over axis 1 of an (N, C) or (N, C, *spatial) input.

    Behaves like ``torch.nn.BatchNorm1d/2d/3d``:

    - training mode normalizes with the batch's mean and biased variance and updates
      ``running_mean`` and ``running_var`` (the unbiased variance) with
      ``new = (1 - momentum) * old + momentum * batch``; ``momentum=None`` uses the
      cumulative average ``1 / num_batches_tracked`` instead;
    - evaluation mode normalizes with the running statistics (when tracked), which
      works for any batch size, even one sample;
    - ``affine=False`` has no ``weight``/``bias`` (``bias=False``: a weight only);
      ``track_running_stats=False`` keeps no buffers and always uses batch statistics;
    - float16/bfloat16 input is computed in float32 (with float32 parameters, or with the layer's
      own float16/bfloat16 ones, as torch) and returned in the input's dtype; any other dtype
      mismatch is an error, as in PyTorch.

    Where it differs: first derivatives only (the backward pass is written by hand and
    marked ``once_differentiable``: no gradient of a gradient, as in a gradient penalty, and
    no ``torch.func`` transforms); ``eps`` must be positive; an empty batch is an error; and
    in float32 the batch mean is accumulated in float32, so for data far from 0 compared
    with its spread (mean 1e4, spread 1: float32 values there are 1e-3 apart) the output
    can be several times less accurate than PyTorch's CPU kernel, which accumulates in
    float64 (measured: from about as accurate to about 50 times less, depending on the shape
    and the data). Notebook 03 shows the same effect in NumPy.
    """

    _version = 2  # nn.BatchNorm's state_dict version (it has num_batches_tracked)

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, bias=True):
        super().__init__()
        check_num_features(num_features)
        check_eps(eps)
        if momentum is not None:  # None: cumulative moving average
            check_momentum(momentum)
        for name, value in (("affine", affine), ("track_running_stats", track_running_stats), ("bias", bias)):
            check_bool(value, name)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.zeros(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        """State dicts saved before version 2 (PyTorch < 0.4.1) have no num_batches_tracked: count 0,
        as nn.BatchNorm does, so that they still load."""
        key = prefix + "num_batches_tracked"
        if local_metadata.get("version", 1) < 2 and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    def reset_running_stats(self):
        """Back to PyTorch's initial statistics: mean 0, variance 1, no batches seen."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self):
        """Initial statistics, and gamma = 1, beta = 0: the layer starts as a plain normalization."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, bias={self.bias is not None}, "
                f"track_running_stats={self.track_running_stats}")

    def _param_dtype(self):
        """The dtype of the weight or the running statistics (None when it has neither)."""
        for t in (self.weight, self.running_mean):
            if t is not None:
                return t.dtype
        return None

    def _check(self, x):
        """x must be a floating tensor (N, C, *spatial) with C = num_features, in the layer's dtype."""
        name = f"{type(self).__name__}({self.num_features})"
        check_layer_input(x, self.num_features, name)
        p = self._param_dtype()
        if p is not None and x.dtype != p and not (x.dtype in LOW_PRECISION and p == torch.float32):
            raise TypeError(
                f"{name} input has dtype {x.dtype} but the layer's parameters and buffers are "
                f"{p}; convert one to match, e.g. x.to({p}) or layer.to({x.dtype})."
            )

    def _compute_dtype(self, x):
        """float32 for float16/bfloat16 input, whatever the parameters' dtype, as torch: in float16 the
        variance of values with a spread above 256 would overflow. Otherwise x's own dtype."""
        return torch.float32 if x.dtype in LOW_PRECISION else x.dtype

    def _affine(self, dtype):
        """(weight, bias) in ``dtype``, each None when absent. The casts are differentiable (a float16
        parameter gets its gradient in float16) and return the parameters themselves when they match."""
        return tuple(None if p is None else p.to(dtype) for p in (self.weight, self.bias))

    def _momentum_factor(self):
        """The weight f of the new batch: momentum, or 1 / num_batches_tracked when it is None."""
        if self.momentum is None:  # cumulative moving average
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    @torch.no_grad()
    def update_running_averages(self, mu, var_unbiased):
        """new = (1 - f) * old + f * batch, f = momentum (or 1 / num_batches_tracked); mu, var_unbiased: (C,)."""
        self.num_batches_tracked.add_(1)
        f = self._momentum_factor()
        # in the statistics' dtype, then rounded once into the buffer: float16 buffers get the average of
        # float32 statistics (a float16 copy of a variance above 65504 would be inf before the average)
        self.running_mean.copy_(self.running_mean * (1 - f) + mu * f)
        self.running_var.copy_(self.running_var * (1 - f) + var_unbiased * f)

    def _eval_forward(self, x):
        """x: (N, C, *spatial) -> out, same shape: out = a * x + b per channel, with
        a = gamma / sqrt(running_var + eps) and b = beta - a * running_mean."""
        a = torch.rsqrt(self.running_var.to(x.dtype) + self.eps)
        b = -self.running_mean.to(x.dtype) * a
        weight, bias = self._affine(x.dtype)
        if weight is not None:
            a = a * weight
            b = b * weight
        if bias is not None:
            b = b + bias
        return torch.addcmul(per_channel(b, x.dim()), x, per_channel(a, x.dim()))

    def _normalize_batch(self, x):
        """x: (N, C, *spatial), checked -> out (shape of x), mu (C,), var (C,) biased: the batch's own
        statistics. The one step that fused_bn and triton_bn replace with their kernels."""
        stats = {}
        out = BatchNormFunction.apply(x, *self._affine(x.dtype), self.eps, stats)
        return out, stats["mu"], stats["var"]

    def forward(self, x):
        """x: (N, C, *spatial) -> out: shape of x. Training mode: batch statistics (and the
        running averages updated); evaluation mode: the running statistics."""
        self._check(x)
        in_dtype = x.dtype
        x = x.to(self._compute_dtype(x))  # float16/bfloat16: computed in float32, rounded once at the end
        if self.training or not self.track_running_stats:
            check_enough_values(tuple(x.shape), f"{type(self).__name__}({self.num_features}) input")
            out, mu, var = self._normalize_batch(x)
            if self.training and self.track_running_stats:
                m = values_per_channel(tuple(x.shape))
                self.update_running_averages(mu, var * (m / (m - 1)))  # unbiased (Bessel); one tensor op
        else:
            out = self._eval_forward(x)
        return out.to(in_dtype)


def is_batchnorm(module):
    """True for a batch norm layer: nn.BatchNorm1d/2d/3d or this module's BatchNorm (and its subclasses)."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, BatchNorm))

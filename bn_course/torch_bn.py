"""Batch normalization in PyTorch: from autograd ops, as an autograd.Function, as a module.

``BatchNorm`` is a drop-in replacement for ``torch.nn.BatchNorm1d/2d/3d`` for any
input rank >= 2: same outputs, gradients, running buffers, evaluation
behaviour and ``state_dict`` keys, so state dicts load both ways.
"""

import torch
from torch import nn

from bn_course._validate import check_channels, check_enough_values, check_rank


def reduce_dims(x):
    """The dims the statistics are taken over: every dim but 1 (the channels)."""
    return [0] + list(range(2, x.dim()))


def per_channel(v, ndim):
    """Reshape a ``(C,)`` tensor to ``(1, C, 1, ..., 1)`` so it broadcasts against x."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def check_input(x, where="input"):
    """Reject what batch norm cannot normalize, with a message that names the problem."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where} must be a torch.Tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(
            f"{where} must be a floating-point tensor, got dtype {x.dtype}. "
            "Convert it first, e.g. x.float()."
        )
    check_rank(tuple(x.shape), where)


def batchnorm_autograd(x, gamma, beta, eps=1e-5):
    """The four training-mode steps written with torch ops; autograd derives the backward.

    x: (N, C, *spatial); gamma, beta: (C,) -> out: shape of x.
    """
    check_input(x, "x")
    check_enough_values(tuple(x.shape), "x")
    dims = reduce_dims(x)
    mu = x.mean(dim=dims, keepdim=True)                            # step 1
    var = ((x - mu) ** 2).mean(dim=dims, keepdim=True)             # step 2
    x_hat = (x - mu) / torch.sqrt(var + eps)                       # step 3
    return per_channel(gamma, x.dim()) * x_hat + per_channel(beta, x.dim())  # step 4


class BatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm with the compact backward pass written by hand.

    forward(x, gamma, beta, eps) -> out, and saves (x_hat, inv_std, gamma) for backward::

        dbeta  = sum(dout)
        dgamma = sum(dout * x_hat)
        dx     = gamma * inv_std * (dout - dbeta / m - x_hat * dgamma / m)

    ``gamma`` and ``beta`` may be ``None`` (no affine parameters).
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, eps):
        dims = reduce_dims(x)
        var, mu = torch.var_mean(x, dim=dims, keepdim=True, correction=0)
        inv_std = torch.rsqrt(var + eps)
        x_hat = (x - mu) * inv_std
        out = x_hat
        if gamma is not None:
            out = torch.addcmul(per_channel(beta, x.dim()), x_hat, per_channel(gamma, x.dim()))
        ctx.save_for_backward(x_hat, inv_std, gamma)
        return out

    @staticmethod
    def backward(ctx, dout):
        x_hat, inv_std, gamma = ctx.saved_tensors
        dims = reduce_dims(dout)
        m = dout.numel() // dout.shape[1]
        dbeta = dout.sum(dim=dims)
        dgamma = (dout * x_hat).sum(dim=dims)
        dx = None
        if ctx.needs_input_grad[0]:
            scale = inv_std if gamma is None else per_channel(gamma, dout.dim()) * inv_std
            # dout - dbeta/m - x_hat * dgamma/m, as one fused multiply-add per element
            centered = dout - per_channel(dbeta / m, dout.dim())
            dx = torch.addcmul(centered, x_hat, per_channel(dgamma / m, dout.dim()), value=-1) * scale
        if gamma is None:
            return dx, None, None, None
        return dx, dgamma, dbeta, None


class BatchNorm(nn.Module):
    """Batch normalization over axis 1 of an (N, C) or (N, C, *spatial) input.

    Behaves like ``torch.nn.BatchNorm1d/2d/3d``:

    - training mode normalizes with the batch's mean and biased variance and updates
      ``running_mean`` and ``running_var`` (the unbiased variance) with
      ``new = (1 - momentum) * old + momentum * batch``; ``momentum=None`` uses the
      cumulative average ``1 / num_batches_tracked`` instead;
    - evaluation mode normalizes with the running statistics (when tracked);
    - ``affine=False`` has no ``weight``/``bias``; ``track_running_stats=False`` keeps
      no buffers and always uses batch statistics.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
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

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self):
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")

    def _check(self, x):
        check_input(x, f"{type(self).__name__} input")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) got an input with {x.shape[1]} "
                f"channels (axis 1 of shape {tuple(x.shape)}); the channel count must equal "
                f"num_features={self.num_features}."
            )

    def _momentum_factor(self):
        if self.momentum is None:  # cumulative moving average
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    @torch.no_grad()
    def _update_running_stats(self, x):
        dims = reduce_dims(x)
        var, mu = torch.var_mean(x.detach(), dim=dims, correction=1)  # unbiased, as PyTorch
        self.num_batches_tracked.add_(1)
        f = self._momentum_factor()
        self.running_mean.mul_(1 - f).add_(mu.to(self.running_mean.dtype), alpha=f)
        self.running_var.mul_(1 - f).add_(var.to(self.running_var.dtype), alpha=f)

    def forward(self, x):
        self._check(x)
        use_batch_stats = self.training or not self.track_running_stats
        if not use_batch_stats:
            a = torch.rsqrt(self.running_var + self.eps)
            b = -self.running_mean * a
            if self.affine:
                a = a * self.weight
                b = b * self.weight + self.bias
            return x * per_channel(a.to(x.dtype), x.dim()) + per_channel(b.to(x.dtype), x.dim())

        check_enough_values(tuple(x.shape), f"{type(self).__name__} input")
        if self.training and self.track_running_stats:
            self._update_running_stats(x)
        return BatchNormFunction.apply(x, self.weight, self.bias, self.eps)

"""Batch normalization in NumPy: forward, two backward passes, running statistics.

Shapes: ``x`` is ``(N, C)`` or ``(N, C, *spatial)``. Statistics are taken per
channel, over every axis except axis 1, exactly as PyTorch does; ``m`` below is
the number of values each channel's statistics are computed from
(``N * prod(spatial)``).

Training mode, for each channel::

    mu    = mean(x)                      # step 1: batch mean
    var   = mean((x - mu)**2)            # step 2: batch variance (biased, 1/m)
    x_hat = (x - mu) / sqrt(var + eps)   # step 3: normalize (eps inside the root)
    out   = gamma * x_hat + beta         # step 4: scale and shift
"""

import numpy as np

from bn_course._validate import check_channels, check_enough_values, check_rank


def _as_float_array(x, name):
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(
            f"{name} must be a floating-point array (float32 or float64), got dtype {x.dtype}. "
            f"Convert it first, e.g. {name}.astype(np.float32)."
        )
    return x


def reduce_axes(x):
    """The axes the statistics are taken over: every axis but 1 (the channels)."""
    return (0,) + tuple(range(2, x.ndim))


def per_channel(v, ndim):
    """Reshape a ``(C,)`` vector to ``(1, C, 1, ..., 1)`` so it broadcasts against x."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _check_params(x, gamma, beta):
    check_rank(x.shape, "x")
    gamma = _as_float_array(gamma, "gamma")
    beta = _as_float_array(beta, "beta")
    check_channels(x.shape, gamma.shape, "gamma", "x")
    check_channels(x.shape, beta.shape, "beta", "x")
    # Compute in the input's precision: a float64 gamma must not promote float32 data.
    return gamma.astype(x.dtype, copy=False), beta.astype(x.dtype, copy=False)


def batch_mean_var(x):
    """Per-channel mean and biased variance of x, two-pass (numerically stable).

    x: (N, C, *spatial) -> mean, var: (C,)
    """
    axes = reduce_axes(x)
    mu = x.mean(axis=axes)
    var = ((x - per_channel(mu, x.ndim)) ** 2).mean(axis=axes)
    return mu, var


def batchnorm_forward(x, gamma, beta, eps=1e-5):
    """Training-mode batch norm.

    x: (N, C, *spatial) float array; gamma, beta: (C,).
    Returns ``out`` with the shape of x, and a ``cache`` dict for the backward pass.
    """
    x = _as_float_array(x, "x")
    gamma, beta = _check_params(x, gamma, beta)
    check_enough_values(x.shape, "x")

    axes = reduce_axes(x)
    mu = x.mean(axis=axes, keepdims=True)            # step 1
    x_mu = x - mu
    var = (x_mu ** 2).mean(axis=axes, keepdims=True)  # step 2
    std = np.sqrt(var + eps)
    inv_std = 1.0 / std
    x_hat = x_mu * inv_std                            # step 3
    g = per_channel(gamma, x.ndim)
    out = g * x_hat + per_channel(beta, x.ndim)       # step 4

    cache = {"x_mu": x_mu, "var": var, "std": std, "inv_std": inv_std,
             "x_hat": x_hat, "gamma": g, "eps": eps, "axes": axes}
    return out, cache


def _check_dout(dout, cache):
    dout = _as_float_array(dout, "dout")
    if dout.shape != cache["x_hat"].shape:
        raise ValueError(
            f"dout must have the shape of the forward output {cache['x_hat'].shape}, "
            f"got {dout.shape}."
        )
    return dout.astype(cache["x_hat"].dtype, copy=False)


def batchnorm_backward_staged(dout, cache):
    """Backward pass walking the computational graph node by node.

    Each line is one node of the forward pass, in reverse order, applying the
    chain rule locally. dout: shape of x. Returns dx (shape of x), dgamma, dbeta (C,).
    """
    dout = _check_dout(dout, cache)
    axes = cache["axes"]
    m = dout.size // cache["x_hat"].shape[1]

    # out = gamma * x_hat + beta
    dbeta = dout.sum(axis=axes)
    dgamma = (dout * cache["x_hat"]).sum(axis=axes)
    dx_hat = dout * cache["gamma"]
    # x_hat = x_mu * inv_std: x_mu feeds this node and the variance node
    dinv_std = (dx_hat * cache["x_mu"]).sum(axis=axes, keepdims=True)
    dx_mu = dx_hat * cache["inv_std"]
    # inv_std = 1 / std
    dstd = -dinv_std / cache["std"] ** 2
    # std = sqrt(var + eps)
    dvar = dstd * 0.5 / cache["std"]
    # var = mean(x_mu ** 2)
    dsq = np.broadcast_to(dvar / m, dout.shape)
    dx_mu = dx_mu + 2.0 * cache["x_mu"] * dsq
    # x_mu = x - mu: x gets dx_mu directly, mu gets minus its sum
    dmu = -dx_mu.sum(axis=axes, keepdims=True)
    # mu = mean(x)
    dx = dx_mu + dmu / m
    return dx, dgamma, dbeta


def batchnorm_backward(dout, cache):
    """Compact backward pass (the simplified closed form).

    dx = gamma / sqrt(var + eps) * (dout - mean(dout) - x_hat * mean(dout * x_hat))

    with the means taken per channel. Returns dx (shape of x), dgamma, dbeta (C,).
    """
    dout = _check_dout(dout, cache)
    axes = cache["axes"]
    x_hat = cache["x_hat"]
    m = dout.size // x_hat.shape[1]

    dbeta = dout.sum(axis=axes)
    dgamma = (dout * x_hat).sum(axis=axes)
    scale = cache["gamma"] * cache["inv_std"]
    ndim = dout.ndim
    dx = scale * (dout - per_channel(dbeta / m, ndim) - x_hat * per_channel(dgamma / m, ndim))
    return dx, dgamma, dbeta


def update_running_stats(running_mean, running_var, x, momentum=0.1):
    """PyTorch's exponential moving average of the batch statistics.

    new = (1 - momentum) * old + momentum * batch, with the *unbiased* batch
    variance (divided by m - 1). Keras writes the same rule with its
    ``momentum=0.99`` meaning ``1 - 0.1``. Returns the new (running_mean, running_var).
    """
    x = _as_float_array(x, "x")
    check_rank(x.shape, "x")
    check_channels(x.shape, np.shape(running_mean), "running_mean", "x")
    check_channels(x.shape, np.shape(running_var), "running_var", "x")
    check_enough_values(x.shape, "x")
    mu, var = batch_mean_var(x)
    m = x.size // x.shape[1]
    var_unbiased = var * m / (m - 1)
    new_mean = (1 - momentum) * running_mean + momentum * mu
    new_var = (1 - momentum) * running_var + momentum * var_unbiased
    return new_mean.astype(x.dtype), new_var.astype(x.dtype)


def batchnorm_inference(x, gamma, beta, running_mean, running_var, eps=1e-5):
    """Evaluation-mode batch norm: the running statistics replace the batch's.

    Per channel this is one affine map, out = a * x + b, with
    a = gamma / sqrt(running_var + eps) and b = beta - a * running_mean.
    Works for any batch size, including 1.
    """
    x = _as_float_array(x, "x")
    gamma, beta = _check_params(x, gamma, beta)
    check_channels(x.shape, np.shape(running_mean), "running_mean", "x")
    check_channels(x.shape, np.shape(running_var), "running_var", "x")
    a = gamma / np.sqrt(np.asarray(running_var, dtype=x.dtype) + eps)
    b = beta - a * np.asarray(running_mean, dtype=x.dtype)
    return per_channel(a, x.ndim) * x + per_channel(b, x.ndim)

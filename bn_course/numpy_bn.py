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

from bn_course._validate import (check_channels, check_enough_values, check_eps, check_momentum,
                                 check_positive_int, check_rank, real_number)


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


def _check_stats_input(x):
    """x for a per-channel statistic: a float array (N, C, *spatial) with at least 2 values per channel."""
    x = _as_float_array(x, "x")
    check_rank(x.shape, "x")
    check_enough_values(x.shape, "x")
    return x


def batch_mean_var(x):
    """Per-channel mean and biased variance of x, two-pass (numerically stable).

    x: (N, C, *spatial) -> mean, var: (C,)
    """
    x = _check_stats_input(x)
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
    check_eps(eps)

    axes = reduce_axes(x)
    mu = x.mean(axis=axes, keepdims=True)            # step 1
    x_mu = x - mu
    var = (x_mu ** 2).mean(axis=axes, keepdims=True)  # step 2
    std = np.sqrt(var + eps)
    inv_std = 1.0 / std
    x_hat = x_mu * inv_std                            # step 3
    g = per_channel(gamma, x.ndim)
    out = g * x_hat + per_channel(beta, x.ndim)       # step 4

    cache = {"x_mu": x_mu, "std": std, "inv_std": inv_std, "x_hat": x_hat, "gamma": g, "axes": axes}
    return out, cache


def _check_dout(dout, cache):
    if not isinstance(cache, dict) or not {"x_mu", "std", "inv_std", "x_hat", "gamma", "axes"} <= cache.keys():
        raise TypeError(f"cache must be the dict returned by batchnorm_forward (second output), "
                        f"got {type(cache).__name__}.")
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
    axes, x_mu, std = cache["axes"], cache["x_mu"], cache["std"]
    m = dout.size // dout.shape[1]                           # values per channel
    dbeta = dout.sum(axis=axes)                              # out = gamma * x_hat + beta
    dgamma = (dout * cache["x_hat"]).sum(axis=axes)
    dx_hat = dout * cache["gamma"]
    dinv_std = (dx_hat * x_mu).sum(axis=axes, keepdims=True)  # x_hat = x_mu * inv_std
    dx_mu = dx_hat * cache["inv_std"]
    dstd = -dinv_std / std ** 2                              # inv_std = 1 / std
    dvar = dstd / (2 * std)                                  # std = sqrt(var + eps)
    dx_mu = dx_mu + 2 * x_mu * dvar / m                      # var = mean(x_mu ** 2): x_mu's second path
    dmu = -dx_mu.sum(axis=axes, keepdims=True)               # x_mu = x - mu
    dx = dx_mu + dmu / m                                     # mu = mean(x)
    return dx, dgamma, dbeta


def batchnorm_backward(dout, cache):
    """Compact backward pass (the simplified closed form).

    dx = gamma / sqrt(var + eps) * (dout - mean(dout) - x_hat * mean(dout * x_hat))

    with the means taken per channel. dout: shape of x.
    Returns dx (shape of x), dgamma, dbeta (C,).

    Batch norm is memory-bound: the time goes into passes over the big arrays, not
    into arithmetic. So dx is built in one array, updated in place, instead of
    allocating a temporary array for every term.
    """
    dout = _check_dout(dout, cache)
    x_hat = cache["x_hat"]
    ndim = dout.ndim
    m = dout.size // x_hat.shape[1]

    # The two per-channel sums, on (N, C, S) views: einsum multiplies and adds in one
    # sweep, without the temporary array that (dout * x_hat).sum(...) would allocate.
    N, C = dout.shape[:2]
    dout3, x_hat3 = dout.reshape(N, C, -1), x_hat.reshape(N, C, -1)
    dbeta = np.einsum("ncs->c", dout3)
    dgamma = np.einsum("ncs,ncs->c", dout3, x_hat3)
    dx = x_hat * per_channel(-dgamma / m, ndim)   # - x_hat * mean(dout * x_hat)
    dx += dout                                    # + dout
    dx -= per_channel(dbeta / m, ndim)            # - mean(dout)
    dx *= cache["gamma"] * cache["inv_std"]       # * gamma / sqrt(var + eps)
    return dx, dgamma, dbeta


def update_running_stats(running_mean, running_var, x, momentum=0.1):
    """PyTorch's exponential moving average of the batch statistics.

    new = (1 - momentum) * old + momentum * batch, with the *unbiased* batch
    variance (divided by m - 1). ``momentum`` is the weight of the new batch.
    Keras writes the same rule the other way round, ``new = k * old + (1 - k) * batch``
    with its ``momentum=k`` the weight of the old value: Keras' default 0.99 is
    PyTorch's ``momentum=0.01``, and PyTorch's default 0.1 is Keras' 0.9.

    running_mean, running_var: (C,); x: (N, C, *spatial).
    Returns the new (running_mean, running_var), in x's dtype.
    """
    x = _as_float_array(x, "x")
    check_rank(x.shape, "x")
    check_channels(x.shape, np.shape(running_mean), "running_mean", "x")
    check_channels(x.shape, np.shape(running_var), "running_var", "x")
    check_enough_values(x.shape, "x")
    check_momentum(momentum)
    running_mean = np.asarray(running_mean, dtype=x.dtype)
    running_var = np.asarray(running_var, dtype=x.dtype)
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
    x: (N, C, *spatial); gamma, beta, running_mean, running_var: (C,) -> out, shape and dtype of x.
    """
    x = _as_float_array(x, "x")
    gamma, beta = _check_params(x, gamma, beta)
    check_channels(x.shape, np.shape(running_mean), "running_mean", "x")
    check_channels(x.shape, np.shape(running_var), "running_var", "x")
    check_eps(eps)
    running_var = np.asarray(running_var, dtype=x.dtype)
    if not np.all(running_var >= 0):  # also catches NaN, for which every comparison is False
        raise ValueError(
            f"running_var must be non-negative (it is a variance) and not NaN, got {running_var}. "
            "Was it computed as E[x^2] - E[x]^2 in low precision?"
        )
    a = gamma / np.sqrt(running_var + eps)
    b = beta - a * np.asarray(running_mean, dtype=x.dtype)
    return per_channel(a, x.ndim) * x + per_channel(b, x.ndim)


# ---------------------------------------------------------------------------------------
# Checking and measuring (notebook 03): gradient check, variance algorithms, timing
# ---------------------------------------------------------------------------------------

def numerical_gradient(f, a, h=1e-5):
    """Central finite differences of a scalar function ``f()`` with respect to array ``a``.

    ``a`` is nudged in place, one entry at a time, and restored:
    grad[i] = (f(a + h e_i) - f(a - h e_i)) / (2 h). Use float64. Returns the shape of a.
    """
    if not callable(f):
        raise TypeError(f"f must be a function of no arguments that returns a number, got {type(f).__name__}.")
    if not isinstance(a, np.ndarray) or not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"a must be a floating-point NumPy array (it is nudged in place), got "
                        f"{type(a).__name__ if not isinstance(a, np.ndarray) else 'dtype ' + str(a.dtype)}.")
    _check_step(h)
    grad = np.zeros_like(a)
    flat, flat_grad = a.reshape(-1), grad.reshape(-1)   # views: writing them writes a, grad
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        f_plus = f()
        flat[i] = old - h
        f_minus = f()
        flat[i] = old
        flat_grad[i] = (f_plus - f_minus) / (2 * h)
    return grad


def _check_step(h):
    if real_number(h) is None or not 0 < real_number(h) < np.inf:
        raise ValueError(f"h must be a positive finite number (the finite-difference step), got {h!r}.")


def relative_error(a, b):
    """|a - b| / (|a| + |b|) with Euclidean norms: 0 when equal, 1 when b = -a, about 0.71 for
    independent random arrays of equal norm."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"relative_error compares arrays of the same shape, got {a.shape} and {b.shape}.")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("nan")  # a NaN or inf gradient is not "no error"
    scale = np.linalg.norm(a) + np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / scale) if scale > 0 else 0.0


def gradient_check(shape=(4, 3, 2, 2), seed=0, eps=1e-5, h=1e-5, dtype=np.float64):
    """Compare both backward passes with finite differences.

    The scalar checked is L = sum(out * dout) for a fixed random dout, whose gradient with
    respect to out is dout. Meant for float64; in float32 the nudge h is lost in rounding.
    Returns {"compact": {"dx": err, "dgamma": err, "dbeta": err}, "staged": {...}} with
    relative errors.
    """
    _check_step(h)
    check_eps(eps)
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = rng.normal(1.0, 2.0, size=shape).astype(dtype)
    gamma = rng.normal(1.0, 0.5, size=C).astype(dtype)
    beta = rng.normal(0.0, 0.5, size=C).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    h = dtype(h)

    def loss():
        return float(np.sum(batchnorm_forward(x, gamma, beta, eps)[0] * dout))

    numeric = {"dx": numerical_gradient(loss, x, h), "dgamma": numerical_gradient(loss, gamma, h),
               "dbeta": numerical_gradient(loss, beta, h)}
    _, cache = batchnorm_forward(x, gamma, beta, eps)
    errors = {}
    for name, backward in (("compact", batchnorm_backward), ("staged", batchnorm_backward_staged)):
        grads = dict(zip(("dx", "dgamma", "dbeta"), backward(dout, cache)))
        errors[name] = {k: relative_error(grads[k], numeric[k]) for k in numeric}
    return errors


def _values_by_channel(x):
    """(N, C, *spatial) -> (m, C): each column holds one channel's m values."""
    return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])


def variance_one_pass(x):
    """The textbook shortcut var = E[x^2] - E[x]^2, per channel: (N, C, *spatial) -> (C,).

    Numerically unstable: when the mean is large compared with the spread, the two terms
    are huge and nearly equal, and their difference loses most of its digits.
    """
    x = _check_stats_input(x)
    axes = reduce_axes(x)
    return (x ** 2).mean(axis=axes) - x.mean(axis=axes) ** 2


def variance_welford(x):
    """Welford's streaming algorithm, one value per channel at a time: (N, C, *spatial) -> (C,).

    Keeps a running mean and M2 (the sum of squared deviations); stable, and needs a single
    pass over data that arrives piece by piece. Returns the biased variance M2 / m.
    """
    x = _check_stats_input(x)
    values = _values_by_channel(x)
    mean = np.zeros(values.shape[1], dtype=x.dtype)
    M2 = np.zeros(values.shape[1], dtype=x.dtype)
    for k, row in enumerate(values, start=1):
        delta = row - mean
        mean += delta / k
        M2 += delta * (row - mean)
    return M2 / values.shape[0]


def variance_errors(offset, shape=(2048, 4), seed=0, dtype=np.float32):
    """Relative error of three variance algorithms on ``offset + N(0, 1)`` data in ``dtype``.

    The truth is the two-pass variance of the very same (rounded) data computed in float64;
    the error is the worst channel's |estimate - truth| / truth (1 means 100% off).
    Returns {"one-pass": err, "two-pass": err, "Welford": err}.
    """
    if real_number(offset) is None or not np.isfinite(real_number(offset)):
        raise ValueError(f"offset must be a finite number (the mean of the data), got {offset!r}.")
    rng = np.random.default_rng(seed)
    x = (offset + rng.standard_normal(shape)).astype(dtype)
    truth = batch_mean_var(x.astype(np.float64))[1]
    estimates = {"one-pass": variance_one_pass(x), "two-pass": batch_mean_var(x)[1],
                 "Welford": variance_welford(x)}
    return {name: float(np.max(np.abs(v.astype(np.float64) - truth) / truth))
            for name, v in estimates.items()}


def time_backward(shape=(64, 64, 32, 32), repeats=7, seed=0, dtype=np.float32):
    """Median time in seconds of the staged and the compact backward pass.

    The two are timed back to back (the one that goes first alternating), by the CPU time of this
    thread (NumPy's element-wise work runs in the calling thread), so other jobs on the machine
    barely move the ratio. Returns {"staged": seconds, "compact": seconds, "ratio": the median
    of the ``repeats`` per-pair ratios staged / compact}.
    """
    import time

    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    C = shape[1]
    _, cache = batchnorm_forward(x, np.ones(C, dtype), np.zeros(C, dtype))
    times = {"staged": [], "compact": []}
    backward = {"staged": batchnorm_backward_staged, "compact": batchnorm_backward}
    for i in range(repeats):
        for name in (("staged", "compact") if i % 2 == 0 else ("compact", "staged")):
            start = time.thread_time()
            backward[name](dout, cache)
            times[name].append(time.thread_time() - start)
    ratios = [s / c for s, c in zip(times["staged"], times["compact"])]
    return {"staged": float(np.median(times["staged"])), "compact": float(np.median(times["compact"])),
            "ratio": float(np.median(ratios))}


def track_running_mean(momentum, steps=50, batch_shape=(32, 4), true_mean=3.0, seed=0):
    """Feed ``steps`` batches drawn from N(true_mean, 1) to the running-statistics update.

    Starts from PyTorch's initial buffers (mean 0, variance 1) and returns the running mean
    after each step, shape (steps, C): how fast it forgets its start shows the momentum's lag.
    """
    check_positive_int(steps, "steps", "the number of batches")
    check_momentum(momentum)
    rng = np.random.default_rng(seed)
    C = batch_shape[1]
    running_mean, running_var = np.zeros(C), np.ones(C)
    history = []
    for _ in range(steps):
        x = rng.normal(true_mean, 1.0, size=batch_shape)
        running_mean, running_var = update_running_stats(running_mean, running_var, x, momentum)
        history.append(running_mean)
    return np.array(history)

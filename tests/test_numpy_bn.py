"""bn_course.numpy_bn against PyTorch (the oracle) and against finite differences."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bn_course import numpy_bn as nb

SHAPES = [(8, 3), (4, 3, 5), (2, 3, 4, 5), (2, 3, 2, 3, 4)]  # ranks 2..5
DTYPES = [np.float32, np.float64]
TOL = {np.float32: dict(rtol=1e-4, atol=1e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}
BN_MODULE = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
             5: torch.nn.BatchNorm3d}


def make(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = rng.normal(0.5, 2.0, size=shape).astype(dtype)
    gamma = rng.normal(1.0, 0.5, size=C).astype(dtype)
    beta = rng.normal(0.0, 0.5, size=C).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    return x, gamma, beta, dout


def torch_reference(x, gamma, beta, dout, eps):
    """Output and gradients from F.batch_norm in training mode, via autograd."""
    xt, gt, bt = (torch.tensor(a, requires_grad=True) for a in (x, gamma, beta))
    out = F.batch_norm(xt, None, None, gt, bt, training=True, eps=eps)
    out.backward(torch.tensor(dout))
    return [t.detach().numpy() for t in (out, xt.grad, gt.grad, bt.grad)]


ids = [f"rank{len(s)}" for s in SHAPES]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_forward_and_both_backwards_match_pytorch(shape, dtype):
    x, gamma, beta, dout = make(shape, dtype)
    eps = 1e-3
    out_ref, dx_ref, dgamma_ref, dbeta_ref = torch_reference(x, gamma, beta, dout, eps)
    out, cache = nb.batchnorm_forward(x, gamma, beta, eps)
    np.testing.assert_allclose(out, out_ref, **TOL[dtype])
    for backward in (nb.batchnorm_backward, nb.batchnorm_backward_staged):
        dx, dgamma, dbeta = backward(dout, cache)
        np.testing.assert_allclose(dx, dx_ref, **TOL[dtype])
        np.testing.assert_allclose(dgamma, dgamma_ref, **TOL[dtype])
        np.testing.assert_allclose(dbeta, dbeta_ref, **TOL[dtype])


@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_staged_equals_compact(shape):
    x, gamma, beta, dout = make(shape, np.float64, seed=1)
    _, cache = nb.batchnorm_forward(x, gamma, beta)
    for a, b in zip(nb.batchnorm_backward(dout, cache), nb.batchnorm_backward_staged(dout, cache)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_output_is_normalized_per_channel(shape):
    x, _, _, _ = make(shape, np.float64, seed=2)
    C = shape[1]
    out, _ = nb.batchnorm_forward(x, np.ones(C), np.zeros(C), eps=1e-12)
    axes = nb.reduce_axes(x)
    np.testing.assert_allclose(out.mean(axis=axes), 0.0, atol=1e-12)
    np.testing.assert_allclose(out.var(axis=axes), 1.0, rtol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_dtype_is_kept(dtype):
    x, gamma, beta, dout = make((4, 3, 2, 2), dtype)
    # float64 parameters must not promote float32 data
    out, cache = nb.batchnorm_forward(x, gamma.astype(np.float64), beta.astype(np.float64))
    assert out.dtype == dtype
    for backward in (nb.batchnorm_backward, nb.batchnorm_backward_staged):
        assert all(g.dtype == dtype for g in backward(dout, cache))
    assert all(s.dtype == dtype for s in nb.update_running_stats(np.zeros(3), np.ones(3), x))
    assert nb.batchnorm_inference(x, gamma, beta, np.zeros(3), np.ones(3)).dtype == dtype


def test_input_is_not_modified():
    x, gamma, beta, dout = make((4, 3, 2), np.float64)
    copies = [a.copy() for a in (x, gamma, beta, dout)]
    _, cache = nb.batchnorm_forward(x, gamma, beta)
    nb.batchnorm_backward(dout, cache)
    nb.batchnorm_backward_staged(dout, cache)
    nb.update_running_stats(np.zeros(3), np.ones(3), x)
    for a, b in zip((x, gamma, beta, dout), copies):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("shape", [(5, 2), (3, 2, 3), (2, 3, 2, 2)])
def test_finite_differences_float64(shape, seed):
    errors = nb.gradient_check(shape=shape, seed=seed)
    for name in ("compact", "staged"):
        for grad, err in errors[name].items():
            assert err < 1e-7, (name, grad, err)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_finite_differences_are_useless_in_float32(seed):
    """The notebook's claim: the same check in float32 is off by more than 1e-3."""
    errors = nb.gradient_check(shape=(3, 2, 2, 2), seed=seed, dtype=np.float32)
    assert max(errors["compact"].values()) > 1e-3


def test_numerical_gradient_of_a_known_function():
    a = np.array([[1.0, -2.0], [0.5, 3.0]])
    grad = nb.numerical_gradient(lambda: float(np.sum(a ** 3)), a)
    np.testing.assert_allclose(grad, 3 * a ** 2, rtol=1e-8)
    np.testing.assert_array_equal(a, [[1.0, -2.0], [0.5, 3.0]])  # restored


def test_relative_error():
    assert nb.relative_error([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert nb.relative_error([0.0], [0.0]) == 0.0
    assert nb.relative_error([1.0], [-1.0]) == pytest.approx(1.0)
    assert nb.relative_error([1.0], [1.0 + 1e-6]) == pytest.approx(5e-7, rel=1e-3)
    for seed in range(5):  # notebook 03: about 1/sqrt(2) for independent arrays, whatever their overall size
        rng = np.random.default_rng(seed)
        a, b = rng.standard_normal(10_000), rng.standard_normal(10_000)
        assert abs(nb.relative_error(a, b) - 2 ** -0.5) < 0.03
        assert nb.relative_error(1000 * a, 1000 * b) == pytest.approx(nb.relative_error(a, b))


def test_output_variance_is_slightly_below_one():
    # notebook 03: with eps, each channel's output variance is sigma^2 / (sigma^2 + eps) < 1
    for seed in range(5):
        x = np.random.default_rng(seed).normal(loc=[5.0, -2.0, 0.0], scale=[3.0, 0.5, 10.0], size=(16, 3))
        out, _ = nb.batchnorm_forward(x, np.ones(3), np.zeros(3), eps=1e-5)
        assert np.all(out.var(axis=0) < 1)
        np.testing.assert_allclose(out.var(axis=0), x.var(axis=0) / (x.var(axis=0) + 1e-5), rtol=1e-10)


@pytest.mark.parametrize("momentum", [0.1, 0.3, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_running_stats_match_pytorch_buffers(shape, dtype, momentum):
    C = shape[1]
    bn = BN_MODULE[len(shape)](C, momentum=momentum).to(torch.float64 if dtype == np.float64 else torch.float32)
    running_mean, running_var = np.zeros(C, dtype), np.ones(C, dtype)
    for step in range(4):
        x, _, _, _ = make(shape, dtype, seed=10 + step)
        x = x + step  # a drifting input, so the averages move
        bn(torch.tensor(x))
        running_mean, running_var = nb.update_running_stats(running_mean, running_var, x, momentum)
    np.testing.assert_allclose(running_mean, bn.running_mean.numpy(), **TOL[dtype])
    np.testing.assert_allclose(running_var, bn.running_var.numpy(), **TOL[dtype])


def test_keras_momentum_is_the_other_way_round():
    """Keras: new = k * old + (1 - k) * batch. Keras k = 0.99 is PyTorch momentum 0.01."""
    x, _, _, _ = make((16, 3), np.float64)
    old_mean, old_var = np.full(3, 2.0), np.full(3, 3.0)
    k = 0.99
    mu, var = x.mean(axis=0), x.var(axis=0, ddof=1)
    keras = (k * old_mean + (1 - k) * mu, k * old_var + (1 - k) * var)
    ours = nb.update_running_stats(old_mean, old_var, x, momentum=1 - k)
    np.testing.assert_allclose(ours, keras, rtol=1e-12)


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_inference_matches_eval_mode_pytorch(shape, dtype, batch):
    shape = (batch,) + shape[1:]
    C = shape[1]
    x, gamma, beta, _ = make(shape, dtype, seed=3)
    rng = np.random.default_rng(4)
    running_mean = rng.normal(0, 1, C).astype(dtype)
    running_var = rng.uniform(0.5, 2.0, C).astype(dtype)
    bn = BN_MODULE[len(shape)](C, eps=1e-3).to(torch.float64 if dtype == np.float64 else torch.float32)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(gamma))
        bn.bias.copy_(torch.tensor(beta))
        bn.running_mean.copy_(torch.tensor(running_mean))
        bn.running_var.copy_(torch.tensor(running_var))
        expected = bn.eval()(torch.tensor(x)).numpy()
    out = nb.batchnorm_inference(x, gamma, beta, running_mean, running_var, eps=1e-3)
    np.testing.assert_allclose(out, expected, **TOL[dtype])


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_small_momentum_lags(seed):
    """The notebook's claim, on other seeds: after 50 steps momentum 0.1 is near the true mean 3,
    momentum 0.01 (Keras' 0.99) is still far from it."""
    lag = {m: np.abs(nb.track_running_mean(m, steps=50, true_mean=3.0, seed=seed)[-1] - 3.0).max()
           for m in (0.1, 0.01)}
    assert lag[0.1] < 0.3 and lag[0.01] > 1.2


def test_track_running_mean_matches_the_update():
    history = nb.track_running_mean(0.2, steps=3, batch_shape=(5, 2), true_mean=1.0, seed=7)
    rng = np.random.default_rng(7)
    mean, var = np.zeros(2), np.ones(2)
    for step in range(3):
        mean, var = nb.update_running_stats(mean, var, rng.normal(1.0, 1.0, size=(5, 2)), 0.2)
        np.testing.assert_allclose(history[step], mean)


# ----------------------------------------------------------------- numerical stability

@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_one_pass_variance_breaks_two_pass_and_welford_do_not(seed):
    """The notebook's claim, on other seeds and a smaller batch."""
    errors = nb.variance_errors(1e4, shape=(512, 3), seed=seed)
    assert errors["one-pass"] > 1.0
    assert errors["two-pass"] < 1e-2 and errors["Welford"] < 1e-2
    small = nb.variance_errors(0.0, shape=(512, 3), seed=seed)
    assert max(small.values()) < 1e-4  # without an offset all three are fine


def test_welford_and_one_pass_agree_with_numpy_in_float64():
    x, _, _, _ = make((6, 3, 2, 2), np.float64)
    expected = x.var(axis=(0, 2, 3))
    np.testing.assert_allclose(nb.variance_welford(x), expected, rtol=1e-12)
    np.testing.assert_allclose(nb.variance_one_pass(x), expected, rtol=1e-10)
    np.testing.assert_allclose(nb.batch_mean_var(x)[1], expected, rtol=1e-12)


def test_time_backward_returns_two_positive_medians_and_their_paired_ratio():
    times = nb.time_backward(shape=(4, 3, 8, 8), repeats=3, seed=1)
    assert set(times) == {"staged", "compact", "ratio"}
    assert all(t > 0 for t in times.values())


# ------------------------------------------------------------------------- bad input

def test_wrong_rank():
    with pytest.raises(ValueError, match=r"at least 2 dimensions, got shape \(5,\)"):
        nb.batchnorm_forward(np.ones(5), np.ones(5), np.zeros(5))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        nb.update_running_stats(np.zeros(1), np.ones(1), np.ones(5))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        nb.batchnorm_inference(np.ones(5), np.ones(1), np.zeros(1), np.zeros(1), np.ones(1))


@pytest.mark.parametrize("name", ["gamma", "beta"])
def test_parameter_channel_mismatch(name):
    x = np.ones((4, 3, 2))
    params = {"gamma": np.ones(3), "beta": np.zeros(3)}
    params[name] = np.ones(4)
    with pytest.raises(ValueError, match=rf"{name} must have shape \(3,\).*C=3 channels.*got shape \(4,\)"):
        nb.batchnorm_forward(x, params["gamma"], params["beta"])
    params[name] = np.ones((1, 3))  # a broadcastable but wrong shape is refused too
    with pytest.raises(ValueError, match=rf"{name} must have shape \(3,\)"):
        nb.batchnorm_inference(x, params["gamma"], params["beta"], np.zeros(3), np.ones(3))


@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_running_stats_channel_mismatch(name):
    x = np.random.default_rng(0).standard_normal((4, 3))
    stats = {"running_mean": np.zeros(3), "running_var": np.ones(3)}
    stats[name] = np.zeros(2)
    with pytest.raises(ValueError, match=rf"{name} must have shape \(3,\)"):
        nb.update_running_stats(stats["running_mean"], stats["running_var"], x)
    with pytest.raises(ValueError, match=rf"{name} must have shape \(3,\)"):
        nb.batchnorm_inference(x, np.ones(3), np.zeros(3), stats["running_mean"], stats["running_var"])


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1, 1), (1, 3, 1, 1, 1)])
def test_one_value_per_channel_in_training(shape):
    x = np.ones(shape)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nb.batchnorm_forward(x, np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nb.update_running_stats(np.zeros(3), np.ones(3), x)
    # evaluation mode handles a single example
    assert nb.batchnorm_inference(x, np.ones(3), np.zeros(3), np.zeros(3), np.ones(3)).shape == shape


def test_integer_dtype():
    with pytest.raises(TypeError, match="x must be a floating-point array.*got dtype int"):
        nb.batchnorm_forward(np.ones((4, 3), dtype=np.int64), np.ones(3), np.zeros(3))
    with pytest.raises(TypeError, match="gamma must be a floating-point array"):
        nb.batchnorm_forward(np.ones((4, 3)), np.ones(3, dtype=int), np.zeros(3))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        nb.update_running_stats(np.zeros(3), np.ones(3), np.ones((4, 3), dtype=np.int32))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        nb.batchnorm_inference(np.ones((4, 3), dtype=int), np.ones(3), np.zeros(3), np.zeros(3), np.ones(3))


@pytest.mark.parametrize("backward", [nb.batchnorm_backward, nb.batchnorm_backward_staged])
def test_dout_shape_and_dtype(backward):
    x, gamma, beta, _ = make((4, 3, 2), np.float64)
    _, cache = nb.batchnorm_forward(x, gamma, beta)
    with pytest.raises(ValueError, match=r"dout must have the shape of the forward output \(4, 3, 2\), got \(4, 3\)"):
        backward(np.ones((4, 3)), cache)
    with pytest.raises(TypeError, match="dout must be a floating-point array"):
        backward(np.ones((4, 3, 2), dtype=int), cache)


@pytest.mark.parametrize("momentum", [-0.1, 1.5, "0.1", None])
def test_bad_momentum(momentum):
    with pytest.raises(ValueError, match="momentum must be a number between 0 and 1"):
        nb.update_running_stats(np.zeros(3), np.ones(3), np.ones((4, 3)), momentum)


def test_negative_running_var_in_inference():
    with pytest.raises(ValueError, match="running_var must be non-negative"):
        nb.batchnorm_inference(np.ones((2, 3)), np.ones(3), np.zeros(3), np.zeros(3), np.array([1.0, -0.5, 1.0]))


def test_nan_running_var_in_inference():
    with pytest.raises(ValueError, match="running_var must be non-negative .* and not NaN"):
        nb.batchnorm_inference(np.ones((2, 3)), np.ones(3), np.zeros(3), np.zeros(3), np.array([1.0, np.nan, 1.0]))


@pytest.mark.parametrize("eps", [0, -1e-5, "1e-5", None])
def test_eps_must_be_a_positive_number(eps):
    x, gamma, beta, _ = make((4, 3), np.float64)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        nb.batchnorm_forward(x, gamma, beta, eps)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        nb.batchnorm_inference(x, gamma, beta, np.zeros(3), np.ones(3), eps)


def test_an_empty_batch_is_named():
    with pytest.raises(ValueError, match=r"empty input, shape \(0, 3\)"):
        nb.batchnorm_forward(np.ones((0, 3)), np.ones(3), np.zeros(3))


# --- bad input found by fuzzing: one clear sentence, never a deep NumPy error or a wrong answer ---

@pytest.mark.parametrize("fn", [nb.batch_mean_var, nb.variance_one_pass, nb.variance_welford])
def test_statistics_reject_bad_input(fn):
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        fn(np.random.randn(8))
    with pytest.raises(TypeError, match="floating-point array"):
        fn(np.ones((8, 4), dtype=np.int64))
    with pytest.raises(TypeError, match="floating-point array"):
        fn(None)
    with pytest.raises(ValueError, match="empty input"):
        fn(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fn(np.random.randn(1, 4))


@pytest.mark.parametrize("backward", [nb.batchnorm_backward, nb.batchnorm_backward_staged])
def test_backward_rejects_a_cache_that_is_not_forwards(backward):
    with pytest.raises(TypeError, match="cache must be the dict returned by batchnorm_forward"):
        backward(np.random.randn(8, 4), None)
    with pytest.raises(TypeError, match="cache must be the dict returned by batchnorm_forward"):
        backward(np.random.randn(8, 4), {"x_hat": np.zeros((8, 4))})


def test_relative_error_rejects_mismatched_shapes_and_reports_nan():
    with pytest.raises(ValueError, match="same shape"):
        nb.relative_error(np.ones((8, 4)), np.ones((1, 4)))
    with pytest.raises(ValueError, match="same shape"):
        nb.relative_error(None, np.ones(3))
    assert np.isnan(nb.relative_error(np.full(3, np.nan), np.ones(3)))  # not 0.0: a NaN gradient is wrong


def test_numerical_gradient_and_gradient_check_reject_bad_input():
    with pytest.raises(TypeError, match="f must be a function"):
        nb.numerical_gradient(None, np.ones(3))
    with pytest.raises(TypeError, match="a must be a floating-point NumPy array"):
        nb.numerical_gradient(lambda: 0.0, [1.0, 2.0])
    with pytest.raises(ValueError, match="h must be a positive finite number"):
        nb.numerical_gradient(lambda: 0.0, np.ones(3), h=0)
    with pytest.raises(ValueError, match="h must be a positive finite number"):
        nb.gradient_check(h=None)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        nb.gradient_check(eps=float("nan"))


def test_variance_errors_and_track_running_mean_reject_bad_options():
    for offset in (None, "abc", float("nan"), float("inf")):
        with pytest.raises(ValueError, match="offset must be a finite number"):
            nb.variance_errors(offset)
    for steps in (0, -1, 2.5, None):
        with pytest.raises(ValueError, match="steps must be a positive integer"):
            nb.track_running_mean(0.1, steps=steps)
    with pytest.raises(ValueError, match="momentum must be a number between 0 and 1"):
        nb.track_running_mean("abc")


def test_eps_must_be_finite():
    x = np.random.randn(8, 4)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        nb.batchnorm_forward(x, np.ones(4), np.zeros(4), eps=float("inf"))


# --- gaps: the smallest batch (2 values per channel), and arrays that are not C-contiguous ---

def _layouts():
    rng = np.random.default_rng(20)
    base = rng.normal(0.5, 2.0, size=(3, 6, 4, 5))
    return [("smallest-batch", base[:2, :3, 0, 0].copy()),         # m = 2: unbiased var is twice the biased
            ("transposed", base[:, :3].transpose(0, 1, 3, 2)),    # strided view
            ("every-other-channel", base[:, ::2]),
            ("fortran-order", np.asfortranarray(base[:, :3]))]


@pytest.mark.parametrize("name,x", _layouts(), ids=[n for n, _ in _layouts()])
def test_smallest_batch_and_non_contiguous_arrays_match_pytorch(name, x):
    C = x.shape[1]
    _, gamma, beta, _ = make((2, C), np.float64, seed=21)
    dout = np.random.default_rng(22).standard_normal(x.shape)
    expected = torch_reference(np.ascontiguousarray(x), gamma, beta, np.ascontiguousarray(dout), 1e-3)
    out, cache = nb.batchnorm_forward(x, gamma, beta, 1e-3)
    np.testing.assert_allclose(out, expected[0], **TOL[np.float64])
    for backward in (nb.batchnorm_backward, nb.batchnorm_backward_staged):
        for got, ref in zip(backward(dout, cache), expected[1:]):
            np.testing.assert_allclose(got, ref, **TOL[np.float64])
    bn = BN_MODULE[x.ndim](C, momentum=0.3).double()
    bn(torch.tensor(np.ascontiguousarray(x)))
    running = nb.update_running_stats(np.zeros(C), np.ones(C), x, momentum=0.3)
    np.testing.assert_allclose(running, (bn.running_mean.numpy(), bn.running_var.numpy()), **TOL[np.float64])
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(gamma)), bn.bias.copy_(torch.tensor(beta))
        np.testing.assert_allclose(nb.batchnorm_inference(x, gamma, beta, *running),
                                   bn.eval()(torch.tensor(np.ascontiguousarray(x))).numpy(), **TOL[np.float64])

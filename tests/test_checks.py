"""The exercise checkers: pass a correct answer, flag the stub, name each known mistake, never raise."""

import numpy as np
import pytest
import torch

from bn_course import checks, numpy_bn, torch_bn


def axes_of(x):
    return (0,) + tuple(range(2, x.ndim))


def pc(v, ndim):
    return np.reshape(v, (1, -1) + (1,) * (ndim - 2))


def run(checker, fn, capsys):
    """Run a checker; it must return a bool and never raise. Returns (result, printed text)."""
    result = checker(fn)
    assert isinstance(result, bool)
    return result, capsys.readouterr().out


def stub(*args):
    raise NotImplementedError


def returns_none(*args):
    return None


FUNCTION_CHECKERS = ["check_batchnorm_forward", "check_batchnorm_backward", "check_running_stats_update",
                     "check_fold_linear", "check_batch_renorm_x_hat"]


@pytest.mark.parametrize("checker", FUNCTION_CHECKERS)
@pytest.mark.parametrize("fn", [stub, returns_none], ids=["raises", "returns None"])
def test_a_stub_is_not_attempted(checker, fn, capsys):
    """The untouched stub, or a body without ``return``: "not attempted yet", and the hint for the second."""
    ok, out = run(getattr(checks, checker), fn, capsys)
    assert not ok and "Not attempted yet" in out, out
    assert ("return` statement" in out) == (fn is returns_none), out


def boom(*args):
    raise ZeroDivisionError("learner bug")


# ---------------------------------------------------------------------------------- forward

def forward_good(x, gamma, beta, eps):
    return numpy_bn.batchnorm_forward(x, gamma, beta, eps)[0]


def forward_variant(ddof=0, eps_mode="inside", axes=None, swap=False, affine=True):
    def fn(x, gamma, beta, eps):
        ax = axes_of(x) if axes is None else axes(x)
        mu = x.mean(axis=ax, keepdims=True)
        var = x.var(axis=ax, keepdims=True, ddof=ddof)
        if eps_mode == "inside":
            x_hat = (x - mu) / np.sqrt(var + eps)
        elif eps_mode == "outside":
            x_hat = (x - mu) / (np.sqrt(var) + eps)
        else:
            x_hat = (x - mu) / np.sqrt(var)
        if not affine:
            return x_hat
        g, b = (beta, gamma) if swap else (gamma, beta)
        return pc(g, x.ndim) * x_hat + pc(b, x.ndim)
    return fn


FORWARD_MISTAKES = {
    "unbiased variance": forward_variant(ddof=1),
    "epsilon outside the square root": forward_variant(eps_mode="outside"),
    "epsilon ignored": forward_variant(eps_mode="none"),
    "gamma and beta swapped": forward_variant(swap=True),
    "gamma and beta not applied": forward_variant(affine=False),
    "per sample, across the channels": forward_variant(axes=lambda x: (1,)),
    "channels included": forward_variant(axes=lambda x: tuple(range(x.ndim))),
    "over the batch axis only": forward_variant(axes=lambda x: (0,)),
    "instance norm": forward_variant(axes=lambda x: tuple(range(2, x.ndim)) or (0,)),
}


def _forward_written(step3, step4=lambda g, x_hat, b: g * x_hat + b, var_fn=None):
    """A learner's forward with step 3 (x_hat from x - mu, var, eps) and step 4 written out."""
    def fn(x, gamma, beta, eps):
        ax = axes_of(x)
        mu = x.mean(axis=ax, keepdims=True)
        var = (var_fn or (lambda d: (d ** 2).mean(axis=ax, keepdims=True)))(x - mu)
        return step4(pc(gamma, x.ndim), step3(x - mu, var, eps), pc(beta, x.ndim))
    return fn


FORWARD_MISTAKES.update({
    "beta not added": _forward_written(lambda d, v, e: d / np.sqrt(v + e), lambda g, xh, b: g * xh),
    "gamma not applied": _forward_written(lambda d, v, e: d / np.sqrt(v + e), lambda g, xh, b: xh + b),
    "square root missing": _forward_written(lambda d, v, e: d / (v + e)),
    "epsilon added after the division": _forward_written(lambda d, v, e: d / np.sqrt(v) + e),
    "standard deviation where the variance belongs": _forward_written(lambda d, v, e: d / np.sqrt(np.sqrt(v) + e)),
    "variance summed, not averaged": _forward_written(
        lambda d, v, e: d / np.sqrt(v + e), var_fn=lambda d: (d ** 2).sum(axis=axes_of(d), keepdims=True)),
})


def test_forward_names_eps_added_to_the_output(capsys):
    def eps_at_the_end(x, gamma, beta, eps):
        ax = axes_of(x)
        mu, var = x.mean(axis=ax, keepdims=True), x.var(axis=ax, keepdims=True)
        return pc(gamma, x.ndim) * (x - mu) / np.sqrt(var) + eps + pc(beta, x.ndim)
    ok, out = run(checks.check_batchnorm_forward, eps_at_the_end, capsys)
    assert not ok and "epsilon added after the division" in out, out


def test_forward_accepts_correct(capsys):
    ok, out = run(checks.check_batchnorm_forward, forward_good, capsys)
    assert ok and "Correct" in out


@pytest.mark.parametrize("name", FORWARD_MISTAKES)
def test_forward_names_each_mistake(name, capsys):
    ok, out = run(checks.check_batchnorm_forward, FORWARD_MISTAKES[name], capsys)
    assert not ok
    assert name in out, out
    if "channels" in name or "batch axis" in name or "instance" in name:
        assert "statistics over the wrong axes" in out


@pytest.mark.parametrize("fn, needle", [
    (boom, "ZeroDivisionError: learner bug"),
    (lambda x, g, b, eps: np.zeros(3), "has shape (3,), expected (6, 3)"),
    (lambda x, g, b, eps: np.full(x.shape, np.nan), "NaN"),
    (lambda x, g, b, eps: "hello", "array of floats"),
    (lambda x, g, b, eps: (forward_good(x, g, b, eps), {}), "tuple"),
    (lambda x, g, b, eps: forward_good(x, g, b, eps).tolist(), "Python list"),
    (lambda x, g, b, eps: forward_good(x, g, b, eps).astype(np.float64), "float32 input gave a float64"),
    (lambda x, g, b, eps: np.zeros_like(x) if x.dtype == np.float32 else forward_good(x, g, b, eps),
     "on a float32 input of shape (5, 3) (eps=1e-5): out differs from the reference"),
    (lambda x, g, b, eps: forward_good(x, g, b, eps).astype(np.float32), "float64 input gave a float32 output"),
    (lambda x, g, b, eps: torch.from_numpy(forward_good(x, g, b, eps)), "fn returned a torch tensor"),
    (lambda x, g, b, eps: forward_good(x, g, b, eps) + 1e-3, "largest absolute difference"),
    (lambda x: x, "TypeError"),
    (42, "expected a function"),
])
def test_forward_never_raises_on_broken_answers(fn, needle, capsys):
    ok, out = run(checks.check_batchnorm_forward, fn, capsys)
    assert not ok and needle in out, out


def test_forward_2d_only_code_gets_the_spatial_hint(capsys):
    def only_2d(x, gamma, beta, eps):
        mu, var = x.mean(axis=0), x.var(axis=0)
        return gamma * (x - mu) / np.sqrt(var + eps) + beta
    ok, out = run(checks.check_batchnorm_forward, only_2d, capsys)
    assert not ok and "(N, C) input but not an (N, C, H, W)" in out


def test_forward_fixed_axes_get_the_axes_hint(capsys):
    axes = (0, 2, 3)  # notebook 02's global, just above the exercise

    def fixed_axes(x, gamma, beta, eps=1e-5):
        mu = x.mean(axis=axes, keepdims=True)
        var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return gamma.reshape(shape) * (x - mu) / np.sqrt(var + eps) + beta.reshape(shape)

    ok, out = run(checks.check_batchnorm_forward, fixed_axes, capsys)
    assert not ok and "AxisError" in out, out
    assert "compute the axes from x.ndim, (0,) + tuple(range(2, x.ndim))" in out, out
    assert "a fixed axes = (0, 2, 3) only fits 4-D input" in out, out


def test_forward_flags_in_place_change(capsys):
    def in_place(x, gamma, beta, eps):
        out = forward_good(x, gamma, beta, eps)
        x -= x.mean(axis=axes_of(x), keepdims=True)
        return out
    ok, out = run(checks.check_batchnorm_forward, in_place, capsys)
    assert not ok and "in place" in out


# --------------------------------------------------------------------------------- backward

def backward_good(dout, x, gamma, eps):
    _, cache = numpy_bn.batchnorm_forward(x, gamma, np.zeros_like(gamma), eps)
    return numpy_bn.batchnorm_backward(dout, cache)


def backward_variant(through_mu=True, through_var=True, times_m=False, sums=False, swap=False,
                     from_x=False, use_gamma=True, ddof=0, use_eps=True):
    def fn(dout, x, gamma, eps):
        ax = axes_of(x)
        m = x.size // x.shape[1]
        mu = x.mean(axis=ax, keepdims=True)
        var = x.var(axis=ax, keepdims=True, ddof=ddof)
        inv_std = 1 / np.sqrt(var + (eps if use_eps else 0.0))
        x_hat = (x - mu) * inv_std
        red = (lambda a: a.sum(axis=ax, keepdims=True)) if sums else (lambda a: a.mean(axis=ax, keepdims=True))
        inner = dout
        if through_mu:
            inner = inner - red(dout)
        if through_var:
            inner = inner - x_hat * red(dout * x_hat)
        dx = (pc(gamma, x.ndim) if use_gamma else 1) * inv_std * inner * (m if times_m else 1)
        dbeta = dout.sum(axis=ax)
        dgamma = (dout * (x if from_x else x_hat)).sum(axis=ax)
        return (dx, dbeta, dgamma) if swap else (dx, dgamma, dbeta)
    return fn


BACKWARD_MISTAKES = {
    "no gradient through the mean and the variance": backward_variant(through_mu=False, through_var=False),
    "no gradient through the variance": backward_variant(through_var=False),
    "no gradient through the mean": backward_variant(through_mu=False),
    "missing 1/m": backward_variant(times_m=True),
    "sums where means belong": backward_variant(sums=True),
    "dgamma and dbeta swapped": backward_variant(swap=True),
    "dgamma computed from x instead of x_hat": backward_variant(from_x=True),
    "gamma missing from dx": backward_variant(use_gamma=False),
    "unbiased variance": backward_variant(ddof=1),
    "epsilon ignored": backward_variant(use_eps=False),
}


def _backward_written(params=np.sum, sign_mu=-1, sign_var=-1, var_inner=lambda dout, x_hat: dout * x_hat,
                      power=0.5):
    """A learner's compact backward with one of its pieces changed."""
    def fn(dout, x, gamma, eps):
        ax = axes_of(x)
        mu, var = x.mean(axis=ax, keepdims=True), x.var(axis=ax, keepdims=True)
        x_hat = (x - mu) / np.sqrt(var + eps)
        mean = lambda a: a.mean(axis=ax, keepdims=True)  # noqa: E731
        dx = pc(gamma, x.ndim) / (var + eps) ** power * (
            dout + sign_mu * mean(dout) + sign_var * x_hat * mean(var_inner(dout, x_hat)))
        return dx, params(dout * x_hat, axis=ax), params(dout, axis=ax)
    return fn


BACKWARD_MISTAKES.update({
    "dgamma and dbeta averaged instead of summed": _backward_written(params=np.mean),
    "square root missing": _backward_written(power=1.0),
    "wrong sign of the variance term": _backward_written(sign_var=+1),
    "wrong sign of the mean term": _backward_written(sign_mu=+1),
    "x_hat missing inside the variance term": _backward_written(var_inner=lambda dout, x_hat: dout),
})


def _backward_eps_outside(x_hat_right=False):
    """A learner's compact backward that recomputes inv_std as 1 / (sqrt(var) + eps)."""
    def fn(dout, x, gamma, eps):
        ax = axes_of(x)
        mu, var = x.mean(axis=ax, keepdims=True), x.var(axis=ax, keepdims=True)
        inv_std = 1 / (np.sqrt(var) + eps)
        x_hat = (x - mu) / np.sqrt(var + eps) if x_hat_right else (x - mu) * inv_std
        mean = lambda a: a.mean(axis=ax, keepdims=True)  # noqa: E731
        dx = pc(gamma, x.ndim) * inv_std * (dout - mean(dout) - x_hat * mean(dout * x_hat))
        return dx, (dout * x_hat).sum(axis=ax), dout.sum(axis=ax)
    return fn


BACKWARD_MISTAKES["epsilon outside the square root"] = _backward_eps_outside()


def test_backward_names_eps_outside_the_root_in_dx_only(capsys):
    ok, out = run(checks.check_batchnorm_backward, _backward_eps_outside(x_hat_right=True), capsys)
    assert not ok and ": epsilon outside the square root:" in out and "x_hat is right" in out, out


def test_backward_accepts_correct_and_staged(capsys):
    ok, out = run(checks.check_batchnorm_backward, backward_good, capsys)
    assert ok and "Correct" in out

    def staged(dout, x, gamma, eps):
        _, cache = numpy_bn.batchnorm_forward(x, gamma, np.zeros_like(gamma), eps)
        return numpy_bn.batchnorm_backward_staged(dout, cache)
    assert run(checks.check_batchnorm_backward, staged, capsys)[0]


@pytest.mark.parametrize("name", BACKWARD_MISTAKES)
def test_backward_names_each_mistake(name, capsys):
    ok, out = run(checks.check_batchnorm_backward, BACKWARD_MISTAKES[name], capsys)
    assert not ok
    assert f": {name}:" in out, out


@pytest.mark.parametrize("fn, needle", [
    (boom, "ZeroDivisionError"),
    (lambda dout, x, g, eps: backward_good(dout, x, g, eps)[0], "should return three arrays"),
    (lambda dout, x, g, eps: backward_good(dout, x, g, eps)[:2], "of 2 items"),
    (lambda dout, x, g, eps: (dout, np.zeros((1, x.shape[1])), np.zeros(x.shape[1])), "keepdims"),
    (lambda dout, x, g, eps: (dout, dout.sum(axis=1), dout.sum(axis=1)), "sum or average over every axis"),
    (lambda dout, x, g, eps: (dout * np.nan, g, g), "NaN"),
])
def test_backward_never_raises_on_broken_answers(fn, needle, capsys):
    ok, out = run(checks.check_batchnorm_backward, fn, capsys)
    assert not ok and needle in out, out


def test_backward_partial_mistake_names_the_component(capsys):
    def dbeta_is_dgamma(dout, x, gamma, eps):
        dx, dgamma, _ = backward_good(dout, x, gamma, eps)
        return dx, dgamma, dgamma
    ok, out = run(checks.check_batchnorm_backward, dbeta_is_dgamma, capsys)
    assert not ok and "dbeta: dgamma and dbeta swapped" in out, out


# ---------------------------------------------------------------------------- running stats

def running_variant(ddof=1, reverse=False, std=False, var_from_mean=False, keep_old=True,
                    update=True, order=False, fixed_momentum=None):
    def fn(running_mean, running_var, x, momentum):
        momentum = fixed_momentum if fixed_momentum is not None else momentum
        ax = axes_of(x)
        mu, var = x.mean(axis=ax), x.var(axis=ax, ddof=ddof)
        if std:
            var = np.sqrt(var)
        if var_from_mean:
            var = mu
        if not update:
            return running_mean, running_var
        if not keep_old:
            return mu, var
        w = (1 - momentum) if reverse else momentum
        new = ((1 - w) * running_mean + w * mu, (1 - w) * running_var + w * var)
        return new[::-1] if order else new
    return fn


RUNNING_MISTAKES = {
    "momentum convention reversed": running_variant(reverse=True),
    "biased variance": running_variant(ddof=0),
    "standard deviation instead of variance": running_variant(std=True),
    "running variance updated with the mean": running_variant(var_from_mean=True),
    "old value ignored": running_variant(keep_old=False),
    "running statistics not updated": running_variant(update=False),
    "mean and variance returned in the wrong order": running_variant(order=True),
    "momentum ignored": running_variant(fixed_momentum=0.1),
}


def _running_with_n_correction(running_mean, running_var, x, momentum):
    ax, n = axes_of(x), x.shape[0]
    var = x.var(axis=ax) * n / (n - 1)  # N / (N - 1) where m / (m - 1) belongs
    return ((1 - momentum) * running_mean + momentum * x.mean(axis=ax),
            (1 - momentum) * running_var + momentum * var)


RUNNING_MISTAKES["unbiased correction with N instead of m"] = _running_with_n_correction


def test_running_in_place_update_returning_none_is_told_to_return(capsys):
    def in_place_no_return(running_mean, running_var, x, momentum):
        running_mean[:] = numpy_bn.update_running_stats(running_mean, running_var, x, momentum)[0]
    ok, out = run(checks.check_running_stats_update, in_place_no_return, capsys)
    assert not ok and "in place but returned None" in out, out


def test_running_2d_only_code_gets_the_spatial_hint(capsys):
    def only_2d(running_mean, running_var, x, momentum):
        mu, var = x.mean(axis=0), x.var(axis=0, ddof=1)
        return (1 - momentum) * running_mean + momentum * mu, (1 - momentum) * running_var + momentum * var
    ok, out = run(checks.check_running_stats_update, only_2d, capsys)
    assert not ok and "(N, C) input but not an (N, C, H, W)" in out, out


def test_running_accepts_correct(capsys):
    ok, out = run(checks.check_running_stats_update, numpy_bn.update_running_stats, capsys)
    assert ok and "Correct" in out


def test_running_accepts_an_in_place_update(capsys):
    def in_place(running_mean, running_var, x, momentum):
        ax = axes_of(x)
        running_mean *= 1 - momentum
        running_mean += momentum * x.mean(axis=ax)
        running_var *= 1 - momentum
        running_var += momentum * x.var(axis=ax, ddof=1)
        return running_mean, running_var
    assert run(checks.check_running_stats_update, in_place, capsys)[0]


@pytest.mark.parametrize("name", RUNNING_MISTAKES)
def test_running_names_each_mistake(name, capsys):
    ok, out = run(checks.check_running_stats_update, RUNNING_MISTAKES[name], capsys)
    assert not ok
    assert f": {name}:" in out, out


@pytest.mark.parametrize("fn, needle", [
    (boom, "ZeroDivisionError"),
    (lambda rm, rv, x, mom: rm, "should return two arrays"),
    (lambda rm, rv, x, mom: (x.mean(axis=1), x.var(axis=1)), "has shape"),
    (lambda rm, rv, x, mom: (rm * np.inf, rv), "NaN or inf"),
])
def test_running_never_raises_on_broken_answers(fn, needle, capsys):
    ok, out = run(checks.check_running_stats_update, fn, capsys)
    assert not ok and needle in out, out


# ------------------------------------------------------------------------ autograd.Function

def make_function(forward_fn=None, backward_fn=None, n_grads=4):
    """An autograd.Function whose forward/backward are NumPy functions of the exercise signatures."""

    class Learner(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, gamma, beta, eps):
            ctx.save_for_backward(x, gamma)
            ctx.eps = eps
            fwd = forward_fn or forward_good
            out = fwd(x.detach().numpy(), gamma.detach().numpy(), beta.detach().numpy(), eps)
            return torch.from_numpy(np.ascontiguousarray(out))

        @staticmethod
        def backward(ctx, dout):
            x, gamma = ctx.saved_tensors
            bwd = backward_fn or backward_good
            grads = bwd(dout.numpy(), x.detach().numpy(), gamma.detach().numpy(), ctx.eps)
            grads = tuple(torch.from_numpy(np.ascontiguousarray(g)) for g in grads) + (None,)
            return grads[:n_grads]

    return Learner


def test_function_accepts_correct(capsys):
    ok, out = run(checks.check_batchnorm_function, torch_bn.BatchNormFunction, capsys)
    assert ok and "Correct" in out
    assert run(checks.check_batchnorm_function, make_function(), capsys)[0]


def test_function_stub_is_not_attempted(capsys):
    class Stub(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, gamma, beta, eps):
            raise NotImplementedError

        @staticmethod
        def backward(ctx, dout):
            raise NotImplementedError

    class NoMethods(torch.autograd.Function):
        pass

    for cls in (Stub, NoMethods):
        ok, out = run(checks.check_batchnorm_function, cls, capsys)
        assert not ok and "Not attempted yet: forward" in out, out


def test_function_backward_stub_is_not_attempted(capsys):
    class ForwardOnly(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, gamma, beta, eps):
            return torch_bn.BatchNormFunction.forward(ctx, x, gamma, beta, eps)

        @staticmethod
        def backward(ctx, dout):
            raise NotImplementedError

    ok, out = run(checks.check_batchnorm_function, ForwardOnly, capsys)
    assert not ok and "Not attempted yet: backward (forward is correct)" in out


@pytest.mark.parametrize("name", ["unbiased variance", "epsilon outside the square root",
                                  "gamma and beta swapped", "per sample, across the channels"])
def test_function_names_forward_mistakes(name, capsys):
    ok, out = run(checks.check_batchnorm_function, make_function(forward_fn=FORWARD_MISTAKES[name]), capsys)
    assert not ok and name in out and out.startswith("Not quite: forward"), out


@pytest.mark.parametrize("name", ["no gradient through the mean", "no gradient through the mean and the variance",
                                  "missing 1/m", "dgamma and dbeta swapped", "epsilon outside the square root"])
def test_function_names_backward_mistakes(name, capsys):
    ok, out = run(checks.check_batchnorm_function, make_function(backward_fn=BACKWARD_MISTAKES[name]), capsys)
    assert not ok and f": {name}:" in out and "backward" in out, out


def test_function_wrong_number_of_grads(capsys):
    ok, out = run(checks.check_batchnorm_function, make_function(n_grads=3), capsys)
    assert not ok and "wrong number of gradients" in out and "(dx, dgamma, dbeta, None)" in out, out


def test_function_grad_of_wrong_shape(capsys):
    def keepdims_grads(dout, x, gamma, eps):
        dx, dgamma, dbeta = backward_good(dout, x, gamma, eps)
        return dx, pc(dgamma, x.ndim), pc(dbeta, x.ndim)
    ok, out = run(checks.check_batchnorm_function, make_function(backward_fn=keepdims_grads), capsys)
    assert not ok and "gradient of the wrong shape" in out, out


def test_function_none_gradient(capsys):
    def no_dx(dout, x, gamma, eps):
        return (None,) + tuple(backward_good(dout, x, gamma, eps)[1:])

    class NoDx(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, gamma, beta, eps):
            ctx.save_for_backward(x, gamma)
            ctx.eps = eps
            return torch.from_numpy(forward_good(x.numpy(), gamma.numpy(), beta.numpy(), eps))

        @staticmethod
        def backward(ctx, dout):
            x, gamma = ctx.saved_tensors
            _, dgamma, dbeta = backward_good(dout.numpy(), x.numpy(), gamma.numpy(), ctx.eps)
            return None, torch.from_numpy(dgamma), torch.from_numpy(dbeta), None

    ok, out = run(checks.check_batchnorm_function, NoDx, capsys)
    assert not ok and "returned None for dx" in out


@pytest.mark.parametrize("cls, needle", [
    (torch.nn.BatchNorm1d, "subclass of torch.autograd.Function"),
    (torch_bn.BatchNormFunction.apply, "subclass of torch.autograd.Function"),
    (None, "subclass of torch.autograd.Function"),
])
def test_function_rejects_non_functions(cls, needle, capsys):
    ok, out = run(checks.check_batchnorm_function, cls, capsys)
    assert not ok and needle in out


def test_function_forward_raising_or_returning_junk(capsys):
    class Raises(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, gamma, beta, eps):
            return x.mean(dim=(0, 2, 3)) * gamma  # fine in 4D, wrong shape; raises on 2D

        @staticmethod
        def backward(ctx, dout):
            return dout, None, None, None

    class Tuple(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, gamma, beta, eps):
            return torch_bn.BatchNormFunction.forward(ctx, x, gamma, beta, eps), x.mean()

        @staticmethod
        def backward(ctx, dout, dmean):
            return dout, None, None, None

    for cls in (Raises, Tuple):
        ok, out = run(checks.check_batchnorm_function, cls, capsys)
        assert not ok and out.startswith("Not quite:"), out


def learner_function(forward_body, backward_body=None):
    """An autograd.Function written in torch, the way the notebook's exercise asks, with one
    step replaced: forward_body(ctx, x, gamma, beta, eps) and backward_body(ctx, dout)."""

    def backward_right(ctx, dout):
        x_hat, inv_std, gamma = ctx.saved_tensors
        dims, shape = [0] + list(range(2, dout.dim())), (1, -1) + (1,) * (dout.dim() - 2)
        m = dout.numel() // dout.shape[1]
        dbeta, dgamma = dout.sum(dim=dims), (dout * x_hat).sum(dim=dims)
        dx = gamma.reshape(shape) * inv_std * (dout - dbeta.reshape(shape) / m
                                               - x_hat * dgamma.reshape(shape) / m)
        return dx, dgamma, dbeta, None

    class Learner(torch.autograd.Function):
        forward = staticmethod(forward_body)
        backward = staticmethod(backward_body or backward_right)

    return Learner


def torch_forward(ctx, x, gamma, beta, eps, dims=None, save=True, reshape=True, in_place=False,
                  save_eps=False):
    dims = [0] + list(range(2, x.dim())) if dims is None else dims
    shape = (1, -1) + (1,) * (x.dim() - 2) if reshape else (-1,)
    mu = x.mean(dim=dims, keepdim=True)
    x_mu = x.sub_(mu) if in_place else x - mu
    inv_std = 1 / torch.sqrt((x_mu ** 2).mean(dim=dims, keepdim=True) + eps)
    x_hat = x_mu * inv_std
    if save:
        ctx.save_for_backward(x_hat, inv_std, gamma, *([eps] if save_eps else []))
    return gamma.reshape(shape) * x_hat + beta.reshape(shape)


def test_function_written_in_torch_is_accepted(capsys):
    assert run(checks.check_batchnorm_function, learner_function(torch_forward), capsys)[0]


@pytest.mark.parametrize("options, needle", [
    (dict(reshape=False), "(N, C) input but not an (N, C, H, W)"),   # gamma (C,) against (N, C, H, W)
    (dict(save=False), "ctx.saved_tensors gives back exactly"),      # nothing saved, three unpacked
    (dict(save_eps=True), "ctx.eps = eps"),                         # a float in save_for_backward
    (dict(in_place=True), "changed its input x in place"),          # x.sub_(mu): the caller's x is lost
])
def test_function_explains_torch_mistakes(options, needle, capsys):
    cls = learner_function(lambda ctx, x, gamma, beta, eps: torch_forward(ctx, x, gamma, beta, eps, **options))
    ok, out = run(checks.check_batchnorm_function, cls, capsys)
    assert not ok and needle in out, out


def test_function_backward_for_2d_only_gets_the_spatial_hint(capsys):
    def backward_2d(ctx, dout):
        x_hat, inv_std, gamma = ctx.saved_tensors
        m = dout.shape[0]
        dbeta, dgamma = dout.sum(dim=0), (dout * x_hat).sum(dim=0)
        return gamma * inv_std * (dout - dbeta / m - x_hat * dgamma / m), dgamma, dbeta, None

    ok, out = run(checks.check_batchnorm_function, learner_function(torch_forward, backward_2d), capsys)
    assert not ok and "backward, on an input of shape (4, 3, 2, 5)" in out, out
    assert "(N, C) input but not an (N, C, H, W)" in out, out


def test_function_names_eps_outside_the_root_in_backward_only(capsys):
    def forward_saving_x(ctx, x, gamma, beta, eps):
        ctx.save_for_backward(x, gamma)
        ctx.eps = eps
        return torch_forward(ctx, x, gamma, beta, eps, save=False)

    def backward_eps_outside(ctx, dout):
        x, gamma = ctx.saved_tensors
        dims, shape = [0] + list(range(2, x.dim())), (1, -1) + (1,) * (x.dim() - 2)
        m = dout.numel() // dout.shape[1]
        mu = x.mean(dim=dims, keepdim=True)
        inv_std = 1 / (torch.sqrt(((x - mu) ** 2).mean(dim=dims, keepdim=True)) + ctx.eps)
        x_hat = (x - mu) * inv_std
        dbeta, dgamma = dout.sum(dim=dims), (dout * x_hat).sum(dim=dims)
        dx = gamma.reshape(shape) * inv_std * (dout - dbeta.reshape(shape) / m
                                               - x_hat * dgamma.reshape(shape) / m)
        return dx, dgamma, dbeta, None

    cls = learner_function(forward_saving_x, backward_eps_outside)
    ok, out = run(checks.check_batchnorm_function, cls, capsys)
    assert not ok and out.startswith("Not quite: backward"), out
    assert ": epsilon outside the square root:" in out, out


def test_function_forward_without_return_is_asked_about_return(capsys):
    def forward_no_return(ctx, x, gamma, beta, eps):
        torch_forward(ctx, x, gamma, beta, eps)

    ok, out = run(checks.check_batchnorm_function, learner_function(forward_no_return), capsys)
    assert not ok and "Not attempted yet" in out and "`return` statement" in out, out


# ------------------------------------------------------------------------------ fold linear

def fold_variant(eps_value=None, use_gamma=True, use_beta=True, swap=False):
    """A learner's fold_linear; eps_value replaces the eps argument (0.0: eps left out)."""
    def fn(W, c, gamma, beta, running_mean, running_var, eps):
        eps = eps if eps_value is None else eps_value
        a = (gamma if use_gamma else 1.0) / torch.sqrt(running_var + eps)
        W_folded = a[:, None] * W
        b_folded = a * (c - running_mean) + (beta if use_beta else 0.0)
        return (b_folded, W_folded) if swap else (W_folded, b_folded)
    return fn


@pytest.mark.parametrize("fn, needle", [
    (fold_variant(eps_value=1e-5), "W_folded: a fixed number used instead of the eps argument"),
    (fold_variant(eps_value=1e-3), "W_folded: a fixed number used instead of the eps argument"),
    (fold_variant(eps_value=0.0), "W_folded: epsilon left out"),
    (fold_variant(use_gamma=False), "W_folded: gamma forgotten"),
    (fold_variant(use_beta=False), "b_folded: beta forgotten"),
    (fold_variant(swap=True), "returned (b_folded, W_folded), in swapped order"),
])
def test_fold_names_each_new_mistake(fn, needle, capsys):
    ok, out = run(checks.check_fold_linear, fn, capsys)
    assert not ok and needle in out, out


def test_fold_fixed_eps_is_not_called_left_out(capsys):
    ok, out = run(checks.check_fold_linear, fold_variant(eps_value=1e-5), capsys)
    assert not ok and "epsilon left out" not in out, out


# ---------------------------------------------------------------------- batch renorm x_hat

def renorm_solution(x, running_mean, running_var, r_max, d_max, eps):
    mu_B = x.mean(dim=0)
    s_B = torch.sqrt(x.var(dim=0, unbiased=False) + eps)
    s_run = torch.sqrt(running_var + eps)
    r = (s_B / s_run).detach().clamp(1 / r_max, r_max)
    d = ((mu_B - running_mean) / s_run).detach().clamp(-d_max, d_max)
    return (x - mu_B) / s_B * r + d


def renorm_variant(unbiased=False, eps_outside=False, eps_value=None, clip_r=True, clip_d=True, r_lower=True,
                   invert_r=False, d_sign=1, d_over_s_B=False, use_r=True, use_d=True, detach_r=True,
                   detach_d=True, detach_stats=False):
    """A learner's batch_renorm_x_hat with one piece changed (written as a learner would, not as the checker)."""
    def fn(x, running_mean, running_var, r_max, d_max, eps):
        eps = eps if eps_value is None else eps_value
        mu_B, var_B = x.mean(dim=0), x.var(dim=0, unbiased=unbiased)
        std = (lambda v: v.sqrt() + eps) if eps_outside else (lambda v: (v + eps).sqrt())
        s_B, s_run = std(var_B), std(running_var)
        if detach_stats:
            mu_B, s_B = mu_B.detach(), s_B.detach()
        r = s_run / s_B if invert_r else s_B / s_run
        d = d_sign * (mu_B - running_mean) / (s_B if d_over_s_B else s_run)
        r, d = (r.detach() if detach_r else r), (d.detach() if detach_d else d)
        if clip_r:
            r = torch.clamp(r, 1 / r_max, r_max) if r_lower else torch.clamp(r, -r_max, r_max)
        if clip_d:
            d = torch.clamp(d, -d_max, d_max)
        x_hat = (x - mu_B) / s_B
        if use_r:
            x_hat = x_hat * r
        return x_hat + d if use_d else x_hat
    return fn


RENORM_MISTAKES = {
    "no clipping": renorm_variant(clip_r=False, clip_d=False),
    "r not clipped": renorm_variant(clip_r=False),
    "d not clipped": renorm_variant(clip_d=False),
    "r clipped only from above": renorm_variant(r_lower=False),
    "r inverted": renorm_variant(invert_r=True),
    "d with the wrong sign": renorm_variant(d_sign=-1),
    "unbiased variance": renorm_variant(unbiased=True),
    "epsilon outside the square root": renorm_variant(eps_outside=True),
    "epsilon ignored": renorm_variant(eps_value=1e-5),
    "d divided by s_B": renorm_variant(d_over_s_B=True),
    "r and d not applied": renorm_variant(use_r=False, use_d=False),
    "r not applied": renorm_variant(use_r=False),
    "d not added": renorm_variant(use_d=False),
    "r and d not detached": renorm_variant(detach_r=False, detach_d=False),
    "r not detached": renorm_variant(detach_r=False),
    "d not detached": renorm_variant(detach_d=False),
    "batch statistics detached": renorm_variant(detach_stats=True),
}


def test_renorm_tables_cover_every_mistake():
    named = {name for name, _, _ in checks.RENORM_MISTAKES + checks.RENORM_GRAD_MISTAKES}
    assert named == set(RENORM_MISTAKES)


def test_renorm_reference_equals_the_package_and_float64_by_hand():
    """The checker's _renorm (no switches) equals norms.BatchRenorm, and a float64 computation by hand."""
    for (N, channels, seed), r_max, d_max, eps, dtype, _ in checks.RENORM_CASES:
        x, rm, rv = checks._renorm_case(N, channels, seed, "float64")
        x = x.requires_grad_(True)
        ours = checks._renorm(x, rm, rv, r_max, d_max, eps)
        package = checks._renorm_reference(x, rm, rv, r_max, d_max, eps)
        by_hand = renorm_solution(x, rm, rv, r_max, d_max, eps)
        w = torch.randn_like(x)
        grads = [torch.autograd.grad((t * w).sum(), x)[0] for t in (ours, package, by_hand)]
        for t, g in ((package, grads[1]), (by_hand, grads[2])):
            assert torch.allclose(ours, t, rtol=1e-12, atol=1e-12)
            assert torch.allclose(grads[0], g, rtol=1e-12, atol=1e-12)


def test_renorm_cases_check_both_branches_of_the_clips():
    """Each case says whether the clips act; the clipping cases clip r above and below and d both ways."""
    both_ways = 0
    for (N, channels, seed), r_max, d_max, eps, dtype, clipping in checks.RENORM_CASES:
        x, rm, rv = checks._renorm_case(N, channels, seed, dtype)
        x, rm, rv = x.double(), rm.double(), rv.double()
        s_B, s_run = torch.sqrt(x.var(dim=0, unbiased=False) + eps), torch.sqrt(rv + eps)
        r, d = s_B / s_run, (x.mean(dim=0) - rm) / s_run
        r_hi, r_lo, d_out = r > r_max, r < 1 / r_max, d.abs() > d_max
        assert bool((r_hi | r_lo | d_out).any()) == clipping
        assert bool((~r_hi & ~r_lo & ~d_out).any())  # and a channel with nothing clipped
        # no raw value within 5% of a bound, so float32 rounding cannot move a channel across it
        for value, bound in ((r, r_max), (r, 1 / r_max), (d.abs(), d_max)):
            assert bool(((value - bound).abs() > 0.05 * bound).all())
        both_ways += bool(r_hi.any() and r_lo.any() and (d > d_max).any() and (d < -d_max).any())
    assert both_ways >= 2
    assert {case[4] for case in checks.RENORM_CASES} == {"float32", "float64"}
    assert len({(case[0][0], len(case[0][1])) for case in checks.RENORM_CASES}) == len(checks.RENORM_CASES)


def test_renorm_accepts_correct(capsys):
    ok, out = run(checks.check_batch_renorm_x_hat, renorm_solution, capsys)
    assert ok and "Correct" in out, out

    def through_the_package(x, running_mean, running_var, r_max, d_max, eps):
        from bn_course import norms
        layer = norms.BatchRenorm(x.shape[1], eps=eps, r_max=r_max, d_max=d_max, affine=False).to(x.dtype)
        layer.running_mean.copy_(running_mean)
        layer.running_var.copy_(running_var)
        return layer(x)
    assert run(checks.check_batch_renorm_x_hat, through_the_package, capsys)[0]


@pytest.mark.parametrize("name", RENORM_MISTAKES)
def test_renorm_names_each_mistake(name, capsys):
    ok, out = run(checks.check_batch_renorm_x_hat, RENORM_MISTAKES[name], capsys)
    assert not ok and out.startswith("Not quite: on x of shape")
    assert f": {name}:" in out, out


def _renorm_in_place(what):
    def fn(x, running_mean, running_var, r_max, d_max, eps):
        x_hat = renorm_solution(x, running_mean, running_var, r_max, d_max, eps)
        with torch.no_grad():
            {"x": x, "running_mean": running_mean, "running_var": running_var}[what].mul_(0.9)
        return x_hat
    return fn


@pytest.mark.parametrize("fn, needle", [
    (boom, "ZeroDivisionError: learner bug"),
    (lambda x, rm, rv, r_max, d_max, eps: renorm_solution(x, rm, rv, r_max, d_max, eps)[:, :2], "has shape"),
    (lambda x, rm, rv, r_max, d_max, eps: renorm_solution(x, rm, rv, r_max, d_max, eps).T, "has shape"),
    (lambda x, rm, rv, r_max, d_max, eps: x.mean(dim=0), "has shape"),
    (lambda x, rm, rv, r_max, d_max, eps: renorm_solution(x, rm, rv, r_max, d_max, eps).detach().numpy(),
     "fn returned a NumPy array"),
    (lambda x, rm, rv, r_max, d_max, eps: np.asarray(x.detach()), "fn returned a NumPy array"),
    (lambda x, rm, rv, r_max, d_max, eps: (renorm_solution(x, rm, rv, r_max, d_max, eps), rm), "tuple of 2 items"),
    (lambda x, rm, rv, r_max, d_max, eps: [renorm_solution(x, rm, rv, r_max, d_max, eps)], "list of 1 items"),
    (lambda x, rm, rv, r_max, d_max, eps: "x_hat", "fn returned str"),
    (lambda x, rm, rv, r_max, d_max, eps: x * float("nan"), "NaN"),
    (lambda x, rm, rv, r_max, d_max, eps: renorm_solution(x, rm, rv, r_max, d_max, eps) + 1e-3,
     "largest absolute difference"),
    (lambda x, rm, rv, r_max, d_max, eps: renorm_solution(x, rm, rv, r_max, d_max, eps).float(),
     "float64 input gave a torch.float32 output"),
    (lambda x, rm, rv, r_max, d_max, eps: renorm_solution(x.double(), rm.double(), rv.double(), r_max, d_max, eps),
     "float32 input gave a torch.float64 output"),
    (lambda x, rm, rv, r_max, d_max, eps: renorm_solution(x, rm, rv, r_max, d_max, eps).detach(),
     "does not require grad"),
    (lambda x, rm, rv, r_max, d_max, eps: renorm_solution(x.detach().requires_grad_(), rm, rv, r_max, d_max, eps),
     "does not depend on x"),
    (lambda x, rm, rv, r_max, d_max, eps: torch.from_numpy((x.numpy() - x.numpy().mean(0))),
     "This exercise is in PyTorch"),
    (lambda x, rm, rv, r_max, d_max, eps: x - x.mean(dim=1), "one value per channel"),
    (lambda x, rm, rv, r_max, d_max, eps: torch.zeros_like(x) if x.dtype == torch.float32
     else renorm_solution(x, rm, rv, r_max, d_max, eps), "right on float64 input"),
    (_renorm_in_place("x"), "changed x in place"),
    (_renorm_in_place("running_mean"), "changed running_mean in place"),
    (_renorm_in_place("running_var"), "changed running_var in place"),
    (lambda x: x, "TypeError"),
    (42, "expected a function"),
])
def test_renorm_never_raises_on_broken_answers(fn, needle, capsys):
    ok, out = run(checks.check_batch_renorm_x_hat, fn, capsys)
    assert not ok and out.startswith("Not quite:") and needle in out, out


def test_renorm_mistake_is_named_only_where_it_shows(capsys):
    """A case where a mistake gives the right numbers (no clipping, nothing clipped) does not name it."""
    def off_in_the_last_digits(x, rm, rv, r_max, d_max, eps):  # right, then off by 5e-5 where nothing is clipped
        x_hat = renorm_solution(x, rm, rv, r_max, d_max, eps)
        return x_hat + 5e-5 if r_max == 3.0 else x_hat
    ok, out = run(checks.check_batch_renorm_x_hat, off_in_the_last_digits, capsys)
    assert not ok and "nothing is clipped" in out and "largest absolute difference" in out, out
    assert "no clipping" not in out and "not clipped" not in out, out


# ---------------------------------------------------------------------------- never raises

class Hostile:
    """A return value that breaks whatever touches it."""

    def __array__(self, *args, **kwargs):
        raise RuntimeError("no array for you")

    def __len__(self):
        raise RuntimeError("no len for you")


@pytest.mark.parametrize("checker", [checks.check_batchnorm_forward, checks.check_batchnorm_backward,
                                     checks.check_running_stats_update, checks.check_batch_renorm_x_hat])
def test_hostile_return_values_do_not_escape(checker, capsys):
    ok, out = run(checker, lambda *args: Hostile(), capsys)
    assert not ok and out.startswith("Not quite:"), out
    ok, out = run(checker, lambda *args: (Hostile(), Hostile(), Hostile()), capsys)
    assert not ok and out.startswith("Not quite:"), out


def test_last_line_of_defence(capsys):
    broken_checker = checks._never_raises(lambda fn: 1 / 0)
    assert broken_checker(None) is False
    assert "ZeroDivisionError" in capsys.readouterr().out

"""Exercise checkers: call one on your function, read what it prints.

Each checker runs your function on a few small inputs, compares the result with
a reference implementation and returns ``True`` when it is right. When it is
wrong, it prints what differs and, when the result matches a *known* mistake
(for instance the unbiased variance, or epsilon outside the square root), it
names that mistake and explains why it is one. A checker never raises: whatever
your function does (raises, returns ``None``, returns the wrong shape, NaN...)
it prints a message and returns ``False``. An untouched stub (one that raises
``NotImplementedError`` or returns ``None``) is reported as "not attempted yet".

The signatures the checkers expect:

=============================  =================================================================
checker                        your function
=============================  =================================================================
check_batchnorm_forward        ``fn(x, gamma, beta, eps) -> out`` (NumPy, training mode)
check_batchnorm_backward       ``fn(dout, x, gamma, eps) -> (dx, dgamma, dbeta)`` (NumPy)
check_running_stats_update     ``fn(running_mean, running_var, x, momentum) -> (new_mean, new_var)``
                               (NumPy, PyTorch's convention:
                               ``new = (1 - momentum) * old + momentum * batch``,
                               batch variance unbiased)
check_batchnorm_function       a ``torch.autograd.Function`` subclass ``cls`` used as
                               ``cls.apply(x, gamma, beta, eps) -> out``
check_fold_linear              ``fn(W, c, gamma, beta, running_mean, running_var, eps)
                               -> (W_folded, b_folded)`` (torch tensors; notebook 08)
check_batch_renorm_x_hat       ``fn(x, running_mean, running_var, r_max, d_max, eps) -> x_hat``
                               (torch tensors, x of shape (N, C); Batch Renormalization's
                               training-mode x_hat, r and d without gradient; notebook 09)
=============================  =================================================================

Shapes: ``x`` and ``dout`` are ``(N, C)`` or ``(N, C, *spatial)``; ``gamma``, ``beta``,
``running_mean``, ``running_var`` and the gradients ``dgamma``, ``dbeta`` are ``(C,)``.
"""

import functools

import numpy as np

__all__ = [
    "check_batchnorm_forward",
    "check_batchnorm_backward",
    "check_running_stats_update",
    "check_batchnorm_function",
    "check_fold_linear",
    "check_batch_renorm_x_hat",
]

# float64 inputs: a correct answer agrees to ~1e-12; every named mistake differs by > 1e-2.
RTOL, ATOL = 1e-5, 1e-7
# Recognizing a mistake is looser: e.g. "eps ignored" may mean eps=0 or a hard-coded 1e-5.
MISTAKE_RTOL, MISTAKE_ATOL = 1e-4, 1e-4


# ---------------------------------------------------------------------------------------
# Small helpers: calling the learner's code safely and printing verdicts
# ---------------------------------------------------------------------------------------

class _NotAttempted(Exception):
    """The learner's function is still the stub (``returned_none``: it returned None, not raised)."""

    def __init__(self, returned_none=False):
        super().__init__()
        self.returned_none = returned_none


class _Raised(Exception):
    """The learner's function raised; carries a readable description and the original ``error``."""

    def __init__(self, description, error=None):
        super().__init__(description)
        self.error = error


def _call(fn, *args):
    """Call fn(*args); turn a stub into _NotAttempted and any other error into _Raised."""
    try:
        with np.errstate(all="ignore"):
            result = fn(*args)
    except NotImplementedError:
        raise _NotAttempted() from None
    except Exception as err:  # noqa: BLE001 - the learner's code may raise anything
        raise _Raised(f"{type(err).__name__}: {str(err).strip()}", err) from None
    if result is None:
        raise _NotAttempted(returned_none=True)
    return result


def _never_raises(checker):
    """Last line of defence: whatever happens inside a checker, print it and return False."""
    @functools.wraps(checker)
    def wrapper(fn):
        try:
            return checker(fn)
        except Exception as err:  # noqa: BLE001
            print(f"Not quite: checking your answer failed with {type(err).__name__}: {err}. "
                  "Look at what your function returns (type, shape, dtype).")
            return False
    return wrapper


SPATIAL_HINT = (" Your function handles an (N, C) input but not an (N, C, H, W) one: take the "
                "statistics over every axis except 1 (axes (0, 2, 3) here, with keepdims=True) and "
                "reshape gamma and beta to (1, C, 1, 1) so they line up with the channel axis.")
TORCH_RESULT_HINT = ("fn returned a torch tensor; this exercise is NumPy: compute with NumPy "
                     "(x.mean(...), np.sqrt(...)) on the arrays you are given and return a NumPy "
                     "array, with the shape and dtype of x.")


def _not_attempted(what, returned_none=False):
    hint = (" If you did write code: does your function end with a `return` statement?"
            if returned_none else "")
    print(f"Not attempted yet: {what} still raises NotImplementedError or returns None. "
          "Fill in the stub, run its cell, then run this check again." + hint)
    return False


def _fail(message):
    print("Not quite: " + message)
    return False


def _passed(message):
    print("Correct! " + message)
    return True


def _as_array(value, name):
    """The learner's result as a float ndarray, or a string saying why it is not usable."""
    try:
        if hasattr(value, "detach"):  # a torch tensor slipped into a NumPy exercise
            value = value.detach().cpu().numpy()
        arr = np.asarray(value)
    except Exception as err:  # noqa: BLE001
        return None, f"{name} could not be read as an array ({type(err).__name__}: {err})."
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating)
                                   or np.issubdtype(arr.dtype, np.integer)):
        return None, (f"{name} should be an array of floats, got {type(value).__name__} "
                      f"with dtype {arr.dtype}.")
    return arr, None


def _compare(value, expected, name, rtol=RTOL, atol=ATOL):
    """None when value matches expected (within rtol, atol), else a sentence describing the difference."""
    arr, problem = _as_array(value, name)
    if problem:
        return problem
    if arr.shape != expected.shape:
        hint = ""
        if arr.size == expected.size:
            hint = (" It has the right number of entries: a leftover keepdims=True, or a "
                    "reshape missing?")
        elif expected.ndim == 1:
            hint = (" One value per channel is expected: sum or average over every axis except "
                    "axis 1 (the channels), i.e. axis 0 and all spatial axes.")
        return f"{name} has shape {arr.shape}, expected {expected.shape}.{hint}"
    if not np.all(np.isfinite(arr)):
        return (f"{name} contains NaN or inf. Look for a division by zero or the square root of a "
                "negative number (is epsilon added inside the square root?).")
    if not np.allclose(arr, expected, rtol=rtol, atol=atol):
        err = float(np.max(np.abs(arr - expected)))
        return f"{name} differs from the reference: largest absolute difference {err:.3g}."
    return None


def _is_structural(problem):
    """A problem of type, shape or NaN, reported before any named mistake is looked for."""
    return problem is not None and "differs from the reference" not in problem


def _matches(value, expected, strict=False):
    """Does value equal expected (strictly: the correctness tolerance; else the mistake one)?"""
    arr, problem = _as_array(value, "")
    rtol, atol = (RTOL, ATOL) if strict else (MISTAKE_RTOL, MISTAKE_ATOL)
    return (problem is None and arr.shape == expected.shape
            and np.allclose(arr, expected, rtol=rtol, atol=atol))


def _matching_mistake(value, expected, mistakes, compute):
    """The first (name, why) of ``mistakes`` (rows name, why, options) whose output, ``compute(options)`` as
    NumPy, matches value where it differs from expected; None when none does."""
    for name, why, options in mistakes:
        wrong = compute(options)
        if not np.allclose(wrong, expected, rtol=RTOL, atol=ATOL) and _matches(value, wrong):
            return name, why
    return None


def _axes_but_1(ndim):
    return (0,) + tuple(range(2, ndim))


def _pc(v, ndim):
    """(C,) -> (1, C, 1, ...) for broadcasting."""
    return np.reshape(v, (1, -1) + (1,) * (ndim - 2))


_AXIS_NAMES = {2: "NC", 3: "NCL", 4: "NCHW", 5: "NCDHW"}


def _describe_axes(axes, ndim):
    """(0, 2, 3) -> '(N, H, W)' for a 4-D input."""
    names = _AXIS_NAMES.get(ndim, [f"axis{i}" for i in range(ndim)])
    return "(" + ", ".join(names[a] for a in axes) + ")"


def _x_shape_name(ndim):
    return _describe_axes(tuple(range(ndim)), ndim)


def _make_case(shape, seed, offset=0.5, scale=2.0):
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = offset + scale * rng.standard_normal(shape)
    gamma = np.array([1.5, -0.5, 2.0, 0.7][:C])
    beta = np.array([0.3, 1.0, -1.2, 0.1][:C])
    dout = rng.standard_normal(shape)
    return x, gamma, beta, dout


CASES = [  # (shape, eps): a dense layer's (N, C) batch and a conv layer's (N, C, H, W) batch
    ((6, 3), 0.1),
    ((4, 3, 2, 5), 0.1),  # W != C, so a gamma broadcast along the last axis fails loudly
]
# float32 input: the output is compared with the float64 reference at float32's precision.
FLOAT32_RTOL, FLOAT32_ATOL = 1e-4, 1e-4


def _raised_hint(err, shape):
    """The hint for a _Raised error of the learner's NumPy function on an input of this shape."""
    if (isinstance(err.error, np.exceptions.AxisError)
            and len(shape) < max(len(case_shape) for case_shape, _ in CASES)):
        return (f" This input has shape {shape}, and the test cases include (N, C) and "
                "(N, C, H, W) inputs: compute the axes from x.ndim, "
                "(0,) + tuple(range(2, x.ndim)); a fixed axes = (0, 2, 3) only fits 4-D input.")
    return SPATIAL_HINT if len(shape) > 2 else ""


# ---------------------------------------------------------------------------------------
# Forward pass
# ---------------------------------------------------------------------------------------

def _forward(x, gamma, beta, eps, axes=None, ddof=0, eps_mode="inside", swap=False, affine=True,
             var_as_sum=False):
    """Reference forward, with switches that reproduce the common mistakes.

    eps_mode: "inside" (right), "outside" sqrt(var) + eps, "after" (x - mu) / sqrt(var) + eps,
    "ignored" (eps = 1e-5 whatever is passed), "no_sqrt" (x - mu) / (var + eps),
    "std" (x - mu) / sqrt(std + eps). affine: True, False (x_hat), "gamma" (no beta), "beta" (no gamma).
    """
    axes = _axes_but_1(x.ndim) if axes is None else axes
    mu = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True, ddof=ddof)
    if var_as_sum:
        var = ((x - mu) ** 2).sum(axis=axes, keepdims=True)
    if eps_mode == "inside":
        x_hat = (x - mu) / np.sqrt(var + eps)
    elif eps_mode == "outside":
        x_hat = (x - mu) / (np.sqrt(var) + eps)
    elif eps_mode == "after":
        x_hat = (x - mu) / np.sqrt(var) + eps
    elif eps_mode == "no_sqrt":
        x_hat = (x - mu) / (var + eps)
    elif eps_mode == "std":
        x_hat = (x - mu) / np.sqrt(np.sqrt(var) + eps)
    else:  # "ignored"
        x_hat = (x - mu) / np.sqrt(var + 1e-5)
    if affine is False:
        return x_hat
    g, b = (beta, gamma) if swap else (gamma, beta)
    if affine == "gamma":
        return _pc(g, x.ndim) * x_hat
    if affine == "beta":
        return x_hat + _pc(b, x.ndim)
    return _pc(g, x.ndim) * x_hat + _pc(b, x.ndim)


def _forward_mistakes(x, gamma, beta, eps):
    """(name, explanation, output) for each recognized mistake on this input."""
    n = x.ndim
    good = _axes_but_1(n)
    out = [
        ("unbiased variance",
         "you divided the batch variance by m - 1 (np.var(..., ddof=1) or torch.var's default). "
         "Training-mode batch norm normalizes with the biased variance, the plain mean of "
         "(x - mu)**2 over the m values of a channel; the unbiased one only enters the running "
         "variance.",
         _forward(x, gamma, beta, eps, ddof=1)),
        ("epsilon outside the square root",
         "you computed (x - mu) / (sqrt(var) + eps). Epsilon belongs inside: "
         "(x - mu) / sqrt(var + eps). It is a variance-sized safety term, added where the "
         "variance is, and the backward formulas assume that form.",
         _forward(x, gamma, beta, eps, eps_mode="outside")),
        ("epsilon ignored",
         "your result does not use the eps argument (a hard-coded 1e-5, or none). Use the "
         "eps you are given.",
         _forward(x, gamma, beta, eps, eps_mode="ignored")),
        ("gamma and beta swapped",
         "you computed beta * x_hat + gamma. gamma is the scale (it multiplies x_hat) and beta "
         "the shift (it is added).",
         _forward(x, gamma, beta, eps, swap=True)),
        ("gamma and beta not applied",
         "you returned x_hat. Step 4 scales and shifts it: out = gamma * x_hat + beta.",
         _forward(x, gamma, beta, eps, affine=False)),
        ("beta not added",
         "you returned gamma * x_hat. Step 4 also shifts it: out = gamma * x_hat + beta.",
         _forward(x, gamma, beta, eps, affine="gamma")),
        ("gamma not applied",
         "you returned x_hat + beta. Step 4 also scales it: out = gamma * x_hat + beta.",
         _forward(x, gamma, beta, eps, affine="beta")),
        ("square root missing",
         "you divided by var + eps. x - mu has the units of x, the variance those units squared: "
         "divide by the standard deviation, np.sqrt(var + eps), so that x_hat has unit variance.",
         _forward(x, gamma, beta, eps, eps_mode="no_sqrt")),
        ("epsilon added after the division",
         "you computed (x - mu) / sqrt(var) + eps: eps ended up outside the fraction (operator "
         "precedence?). It belongs under the square root, (x - mu) / np.sqrt(var + eps), where "
         "it keeps the division finite when a channel is constant.",
         _forward(x, gamma, beta, eps, eps_mode="after")),
        ("epsilon added after the division",
         "you computed gamma * (x - mu) / sqrt(var) + eps + beta: eps ended up outside the "
         "fraction (operator precedence?). It belongs under the square root, "
         "(x - mu) / np.sqrt(var + eps), where it keeps the division finite when a channel is "
         "constant.",
         _forward(x, gamma, beta, 0.0, eps_mode="outside") + eps),
        ("standard deviation where the variance belongs",
         "you computed (x - mu) / sqrt(std + eps), taking the square root twice. Step 2 is the "
         "variance, mean((x - mu)**2), and step 3 takes its square root once: "
         "(x - mu) / np.sqrt(var + eps).",
         _forward(x, gamma, beta, eps, eps_mode="std")),
        ("variance summed, not averaged",
         "you computed the variance as sum((x - mu)**2). It is the mean over the m values of a "
         "channel: divide that sum by m (or use .mean(...) / np.var(...)).",
         _forward(x, gamma, beta, eps, var_as_sum=True)),
    ]
    # statistics over the wrong axes
    candidates = {(1,): "per sample, across the channels (that is layer norm, not batch norm)",
                  tuple(range(n)): ("over everything, channels included (one mean for the "
                                    "whole batch)")}
    if n > 2:
        candidates[(0,)] = ("over the batch axis only, so every spatial position got its own "
                            "statistics (a conv layer's channel shares one mean and variance "
                            "over N and all positions)")
        candidates[tuple(range(1, n))] = "per sample, over channels and positions (layer norm)"
        candidates[tuple(range(2, n))] = ("per sample and channel, over positions only "
                                          "(instance norm)")
    for axes, where in candidates.items():
        if axes != good:
            out.append((
                "statistics over the wrong axes",
                f"your mean and variance were taken over axes {axes} {_describe_axes(axes, n)}: "
                f"{where}. Batch norm takes one mean and one variance per channel, over every "
                f"axis except axis 1: axes {good} {_describe_axes(good, n)} for an input of "
                f"shape {_x_shape_name(n)}.",
                _forward(x, gamma, beta, eps, axes=axes)))
    return out


def _diagnose(value, mistakes):
    """The first (name, explanation) whose output matches value, else None."""
    for name, why, expected in mistakes:
        if _matches(value, expected):
            return name, why
    return None


@_never_raises
def check_batchnorm_forward(fn):
    """Check a NumPy training-mode forward pass ``fn(x, gamma, beta, eps) -> out``.

    x: (N, C) or (N, C, *spatial); gamma, beta: (C,); out: a NumPy array, shape and dtype of x
    (float64 and float32 inputs are tried). Prints what is wrong (naming common mistakes) and
    returns True or False; never raises.
    """
    if not callable(fn):
        return _fail(f"expected a function fn(x, gamma, beta, eps), got {type(fn).__name__}.")
    try:
        for seed, (shape, eps) in enumerate(CASES):
            x, gamma, beta, _ = _make_case(shape, seed)
            x_in = x.copy()
            out = _call(fn, x_in, gamma.copy(), beta.copy(), eps)
            expected = _forward(x, gamma, beta, eps)
            if isinstance(out, tuple):
                return _fail(f"fn returned a tuple of {len(out)} items; it should return only "
                             "out, the normalized array (shape of x).")
            if isinstance(out, list):
                return _fail("fn returned a Python list; return the NumPy array itself "
                             "(no .tolist()), with the shape and dtype of x.")
            if hasattr(out, "detach"):
                return _fail(TORCH_RESULT_HINT)
            problem = _compare(out, expected, "out")
            if problem:
                found = _diagnose(out, _forward_mistakes(x, gamma, beta, eps))
                if found:
                    return _fail(f"on an input of shape {shape}: {found[0]}: {found[1]}")
                hint = SPATIAL_HINT if len(shape) > 2 else ""
                return _fail(f"on an input of shape {shape}: {problem} Check the four steps: "
                             "mean, biased variance, x_hat = (x - mu) / sqrt(var + eps), "
                             "gamma * x_hat + beta, per channel." + hint)
            if not np.array_equal(x_in, x):
                return _fail("your function changed its input x in place (e.g. x -= mu). "
                             "Work on new arrays so the caller's data is left alone.")
            if not isinstance(out, np.ndarray):
                return _fail(f"fn returned {type(out).__name__}; return a NumPy array with the "
                             "shape and dtype of x.")
            if out.dtype != x.dtype:
                return _fail(f"a {x.dtype} input gave a {out.dtype} output. Return out in x's "
                             "dtype: drop the .astype(...) or dtype=... that changes it.")
        # precision: float32 in, float32 out (the shapes passed above: no shape hint if it raises)
        shape = (5, 3)
        x, gamma, beta, _ = _make_case(shape, 7)
        x32, g32, b32 = x.astype(np.float32), gamma.astype(np.float32), beta.astype(np.float32)
        out = _call(fn, x32, g32, b32, 1e-5)
        if hasattr(out, "detach"):
            return _fail(TORCH_RESULT_HINT)
        arr, problem = _as_array(out, "out")
        if problem:
            return _fail(problem)
        dtype = arr.dtype
        if dtype != np.float32:
            return _fail(f"a float32 input gave a {dtype} output. Keep the input's precision: "
                         "avoid float64 constants or arrays (np.float64(...), np.array([...]) "
                         "of Python floats) in the computation.")
        expected = _forward(x32.astype(np.float64), g32.astype(np.float64),
                            b32.astype(np.float64), 1e-5)
        problem = _compare(arr, expected, "out", rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL)
        if problem:
            return _fail(f"on a float32 input of shape {shape} (eps=1e-5): {problem} Your function "
                         "is right on float64 input: does it treat float32 input differently?")
    except _NotAttempted as stub:
        return _not_attempted("the forward pass", stub.returned_none)
    except _Raised as err:
        return _fail(f"your function raised {err}." + _raised_hint(err, shape))
    return _passed("Your forward pass matches the reference on (N, C) and (N, C, H, W) inputs "
                   "and keeps float32 as float32.")


# ---------------------------------------------------------------------------------------
# Backward pass
# ---------------------------------------------------------------------------------------

def _backward(dout, x, gamma, eps, ddof=0, eps_mode="inside", through_mu=True, through_var=True,
              means_as_sums=False, times_m=False, use_gamma=True, dgamma_from_x=False, swap=False,
              params_as_means=False, sign_mu=-1, sign_var=-1, var_term_plain=False, no_sqrt=False):
    """Reference backward (compact form), with switches that reproduce the common mistakes.

    eps_mode: "inside" (right), "ignored" (eps = 1e-5 whatever is passed), "outside"
    (inv_std = 1 / (sqrt(var) + eps), used for x_hat and dx), "outside_in_dx" (x_hat right,
    but dx scaled by 1 / (sqrt(var) + eps)).
    """
    n = x.ndim
    axes = _axes_but_1(n)
    m = x.size // x.shape[1]
    mu = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True, ddof=ddof)
    inv_std = 1.0 / np.sqrt(var + (1e-5 if eps_mode == "ignored" else eps))
    inv_std_outside = 1.0 / (np.sqrt(var) + eps)
    x_hat = (x - mu) * (inv_std_outside if eps_mode == "outside" else inv_std)
    if eps_mode in ("outside", "outside_in_dx"):
        inv_std = inv_std_outside
    param_reduce = np.mean if params_as_means else np.sum
    dbeta = param_reduce(dout, axis=axes)
    dgamma = param_reduce(dout * (x if dgamma_from_x else x_hat), axis=axes)
    reduce = (lambda a: a.sum(axis=axes, keepdims=True)) if means_as_sums else \
        (lambda a: a.mean(axis=axes, keepdims=True))
    inner = dout.copy()
    if through_mu:
        inner = inner + sign_mu * reduce(dout)
    if through_var:
        inner = inner + sign_var * x_hat * reduce(dout if var_term_plain else dout * x_hat)
    scale = (_pc(gamma, n) if use_gamma else 1.0) * (inv_std ** 2 if no_sqrt else inv_std)
    dx = scale * inner * (m if times_m else 1)
    if swap:
        dgamma, dbeta = dbeta, dgamma
    return dx, dgamma, dbeta


def _backward_mistakes(dout, x, gamma, eps):
    """(name, explanation, (dx, dgamma, dbeta)) for each recognized mistake."""
    return [
        ("no gradient through the mean and the variance",
         "your dx is gamma * dout / sqrt(var + eps), as if mu and var were constants. They are "
         "computed from x, so every x_i also moves the output through them: "
         "dx = gamma / sqrt(var + eps) * (dout - mean(dout) - x_hat * mean(dout * x_hat)).",
         _backward(dout, x, gamma, eps, through_mu=False, through_var=False)),
        ("no gradient through the variance",
         "your dx lacks the term - x_hat * mean(dout * x_hat), which is the path from x through "
         "var. The variance depends on x, so its gradient flows back too.",
         _backward(dout, x, gamma, eps, through_var=False)),
        ("no gradient through the mean",
         "your dx lacks the term - mean(dout), which is the path from x through mu. The mean "
         "depends on every x_i, so its gradient flows back too.",
         _backward(dout, x, gamma, eps, through_mu=False)),
        ("missing 1/m",
         "your dx is m times too large (m = values per channel). In the form "
         "dx = 1/m * gamma / sqrt(var + eps) * (m * dout - sum(dout) - x_hat * sum(dout * x_hat)) "
         "the leading 1/m is easy to drop.",
         _backward(dout, x, gamma, eps, times_m=True)),
        ("sums where means belong",
         "you used sum(dout) and sum(dout * x_hat) in dx where the means (sums divided by m) "
         "belong: the 1/m comes from the derivative of mu = sum(x) / m.",
         _backward(dout, x, gamma, eps, means_as_sums=True)),
        ("dgamma and dbeta swapped",
         "dbeta = sum(dout) (beta is added, so its gradient is dout summed per channel) and "
         "dgamma = sum(dout * x_hat) (gamma multiplies x_hat).",
         _backward(dout, x, gamma, eps, swap=True)),
        ("dgamma computed from x instead of x_hat",
         "gamma multiplies x_hat, not x, so dgamma = sum(dout * x_hat) per channel.",
         _backward(dout, x, gamma, eps, dgamma_from_x=True)),
        ("gamma missing from dx",
         "out = gamma * x_hat + beta, so the gradient reaching x_hat is gamma * dout: dx carries "
         "a factor gamma per channel.",
         _backward(dout, x, gamma, eps, use_gamma=False)),
        ("unbiased variance",
         "your dx uses the variance divided by m - 1. The forward pass normalizes with the "
         "biased variance (divided by m), and the backward pass must differentiate that same "
         "computation.",
         _backward(dout, x, gamma, eps, ddof=1)),
        ("epsilon ignored",
         "your dx does not use the eps argument. The forward pass divides by sqrt(var + eps), "
         "so the backward pass has the same 1 / sqrt(var + eps).",
         _backward(dout, x, gamma, eps, eps_mode="ignored")),
        ("epsilon outside the square root",
         "your backward pass uses 1 / (sqrt(var) + eps). The forward pass divides by "
         "sqrt(var + eps), with epsilon inside the square root, and the backward pass must "
         "differentiate that same computation: inv_std = 1 / np.sqrt(var + eps).",
         _backward(dout, x, gamma, eps, eps_mode="outside")),
        ("epsilon outside the square root",
         "your x_hat is right, but dx is scaled by 1 / (sqrt(var) + eps). The forward pass divides "
         "by sqrt(var + eps), with epsilon inside the square root, so dx carries "
         "gamma / sqrt(var + eps): inv_std = 1 / np.sqrt(var + eps).",
         _backward(dout, x, gamma, eps, eps_mode="outside_in_dx")),
        ("dgamma and dbeta averaged instead of summed",
         "gamma and beta are shared by all m values of a channel, so the gradients from those m "
         "values add up: dgamma = sum(dout * x_hat) and dbeta = sum(dout) per channel, not means.",
         _backward(dout, x, gamma, eps, params_as_means=True)),
        ("square root missing",
         "your dx has the factor 1 / (var + eps). The forward pass divides by the standard "
         "deviation, so dx carries gamma / sqrt(var + eps).",
         _backward(dout, x, gamma, eps, no_sqrt=True)),
        ("wrong sign of the variance term",
         "your dx adds x_hat * mean(dout * x_hat); it must subtract it: "
         "dx = gamma / sqrt(var + eps) * (dout - mean(dout) - x_hat * mean(dout * x_hat)). "
         "Both correction terms remove something from dout.",
         _backward(dout, x, gamma, eps, sign_var=+1)),
        ("wrong sign of the mean term",
         "your dx adds mean(dout); it must subtract it: "
         "dx = gamma / sqrt(var + eps) * (dout - mean(dout) - x_hat * mean(dout * x_hat)). "
         "Both correction terms remove something from dout.",
         _backward(dout, x, gamma, eps, sign_mu=+1)),
        ("x_hat missing inside the variance term",
         "your dx has x_hat * mean(dout) where x_hat * mean(dout * x_hat) belongs: the path "
         "through the variance carries sum(dout * x_hat), the same sum as dgamma.",
         _backward(dout, x, gamma, eps, var_term_plain=True)),
    ]


def _check_three_grads(grads, expected, mistakes, shape):
    """None when the three gradients match, else the message to print."""
    names = ("dx", "dgamma", "dbeta")
    problems = [p for p in (_compare(g, e, n) for g, e, n in zip(grads, expected, names)) if p]
    if not problems:
        return None
    if any(_is_structural(p) for p in problems):
        structural = [p for p in problems if _is_structural(p)]
        return f"On an input of shape {shape}: " + " ".join(structural)
    for name, why, wrong in mistakes:
        if all(_matches(g, w) for g, w in zip(grads, wrong)):
            return f"On an input of shape {shape}: {name}: {why}"
    # partial match: name the mistake that explains the wrong component(s)
    for name, why, wrong in mistakes:
        explains = [n for g, e, w, n in zip(grads, expected, wrong, names)
                    if not _matches(g, e, strict=True) and _matches(g, w)]
        if explains:
            return f"On an input of shape {shape}: {', '.join(explains)}: {name}: {why}"
    return f"On an input of shape {shape}: " + " ".join(problems)


@_never_raises
def check_batchnorm_backward(fn):
    """Check a NumPy backward pass ``fn(dout, x, gamma, eps) -> (dx, dgamma, dbeta)``.

    dout, x: (N, C) or (N, C, *spatial); gamma: (C,). dx has the shape of x; dgamma, dbeta (C,).
    The forward pass it differentiates is training-mode batch norm with the biased variance.
    Prints what is wrong (naming common mistakes) and returns True or False; never raises.
    """
    if not callable(fn):
        return _fail(f"expected a function fn(dout, x, gamma, eps), got {type(fn).__name__}.")
    try:
        for seed, (shape, eps) in enumerate(CASES):
            x, gamma, _, dout = _make_case(shape, 10 + seed)
            grads = _call(fn, dout.copy(), x.copy(), gamma.copy(), eps)
            if not isinstance(grads, (tuple, list)) or len(grads) != 3:
                what = f"a {type(grads).__name__}" + (f" of {len(grads)} items"
                                                      if isinstance(grads, (tuple, list)) else "")
                return _fail(f"fn returned {what}; it should return three arrays "
                             "(dx, dgamma, dbeta).")
            message = _check_three_grads(grads, _backward(dout, x, gamma, eps),
                                         _backward_mistakes(dout, x, gamma, eps), shape)
            if message:
                return _fail(message)
    except _NotAttempted as stub:
        return _not_attempted("the backward pass", stub.returned_none)
    except _Raised as err:
        return _fail(f"your function raised {err}." + (SPATIAL_HINT if len(shape) > 2 else ""))
    return _passed("dx, dgamma and dbeta match the reference on (N, C) and (N, C, H, W) inputs.")


# ---------------------------------------------------------------------------------------
# Running statistics
# ---------------------------------------------------------------------------------------

def _running(running_mean, running_var, x, momentum, ddof=1, reverse=False, std=False,
             var_from_mean=False, correct_with_n=False):
    """Reference running-statistics update, with switches for the common mistakes."""
    axes = _axes_but_1(x.ndim)
    mu = x.mean(axis=axes)
    var = x.var(axis=axes, ddof=ddof)
    if correct_with_n:  # biased variance times N / (N - 1), N the batch size instead of m
        n = x.shape[0]
        var = x.var(axis=axes) * n / (n - 1)
    if std:
        var = np.sqrt(var)
    if var_from_mean:
        var = mu
    keep = momentum if reverse else 1 - momentum
    return keep * running_mean + (1 - keep) * mu, keep * running_var + (1 - keep) * var


def _running_mistakes(running_mean, running_var, x, momentum):
    args = (running_mean, running_var, x, momentum)
    new_mean, new_var = _running(*args)
    batch_mean = x.mean(axis=_axes_but_1(x.ndim))
    batch_var = x.var(axis=_axes_but_1(x.ndim), ddof=1)
    return [
        ("momentum convention reversed",
         "you kept momentum of the old value and mixed in (1 - momentum) of the batch. In "
         "PyTorch, momentum is the weight of the NEW batch: new = (1 - momentum) * old + "
         "momentum * batch, so momentum=0.1 moves the average 10% of the way. (Keras writes "
         "the same rule with momentum=0.99 meaning 'keep 99%'.)",
         _running(*args, reverse=True)),
        ("biased variance",
         "you averaged the biased batch variance (divided by m). The running variance "
         "estimates the population variance for inference, so PyTorch uses the unbiased "
         "batch variance, divided by m - 1.",
         _running(*args, ddof=0)),
        ("unbiased correction with N instead of m",
         "you multiplied the biased variance by N / (N - 1), N the batch size. A channel's "
         "statistics come from m = N * H * W values (every position of every example), so the "
         "unbiased variance is the biased one times m / (m - 1): np.var(..., ddof=1) over axes "
         "(0, 2, 3) does it.",
         _running(*args, correct_with_n=True)),
        ("standard deviation instead of variance",
         "you averaged the batch standard deviation into running_var. It tracks the "
         "variance (squared spread), unbiased.",
         _running(*args, std=True)),
        ("running variance updated with the mean",
         "new_var was updated with the batch mean (a copy-paste slip): it must average the "
         "batch variance.",
         _running(*args, var_from_mean=True)),
        ("old value ignored",
         "your result is just the batch statistics: the running averages must blend the old "
         "value in, new = (1 - momentum) * old + momentum * batch.",
         (batch_mean, batch_var)),
        ("running statistics not updated",
         "your result equals the old running_mean and running_var.",
         (running_mean.copy(), running_var.copy())),
        ("mean and variance returned in the wrong order",
         "return (new_mean, new_var), in that order.",
         (new_var, new_mean)),
    ]


@_never_raises
def check_running_stats_update(fn):
    """Check ``fn(running_mean, running_var, x, momentum) -> (new_mean, new_var)``.

    PyTorch's convention: ``new = (1 - momentum) * old + momentum * batch``, with the batch
    mean and the *unbiased* batch variance (divided by m - 1) of each channel.
    running_mean, running_var: (C,); x: (N, C) or (N, C, *spatial). Several steps are run,
    starting from PyTorch's initial values (mean 0, variance 1), with two momentum values.
    Prints what is wrong (naming common mistakes) and returns True or False; never raises.
    """
    if not callable(fn):
        return _fail(f"expected a function fn(running_mean, running_var, x, momentum), "
                     f"got {type(fn).__name__}.")
    try:
        for case, (shape, momentum) in enumerate([((8, 3), 0.1), ((4, 3, 2, 5), 0.3)]):
            C = shape[1]
            running_mean, running_var = np.zeros(C), np.ones(C)  # PyTorch's initial buffers
            for step in range(3):
                x, _, _, _ = _make_case(shape, 20 + 3 * case + step, offset=2.0 + step)
                mean_in, var_in = running_mean.copy(), running_var.copy()
                try:
                    result = _call(fn, mean_in, var_in, x.copy(), momentum)
                except _NotAttempted as stub:
                    changed = not (np.array_equal(mean_in, running_mean)
                                   and np.array_equal(var_in, running_var))
                    if stub.returned_none and changed:
                        return _fail("your function changed running_mean and running_var in place "
                                     "but returned None. End it with "
                                     "`return running_mean, running_var` (the new values).")
                    raise
                if not isinstance(result, (tuple, list)) or len(result) != 2:
                    return _fail(f"fn returned {type(result).__name__}; it should return two "
                                 "arrays (new_mean, new_var).")
                expected = _running(running_mean, running_var, x, momentum)
                problems = [p for p in (_compare(r, e, n) for r, e, n in
                                        zip(result, expected, ("new_mean", "new_var"))) if p]
                if problems:
                    where = f"step {step + 1} with momentum={momentum} on x of shape {shape}: "
                    if any(_is_structural(p) for p in problems):
                        return _fail(where + " ".join(p for p in problems if _is_structural(p)))
                    mistakes = _running_mistakes(running_mean, running_var, x, momentum)
                    for name, why, wrong in mistakes:
                        if all(_matches(r, w) for r, w in zip(result, wrong)):
                            return _fail(where + f"{name}: {why}")
                    for name, why, wrong in mistakes:
                        if any(_matches(r, w) and not _matches(r, e, strict=True)
                               for r, w, e in zip(result, wrong, expected)):
                            return _fail(where + f"{name}: {why}")
                    if all(_matches(r, e) for r, e in zip(result, _running(
                            running_mean, running_var, x, 0.1))):
                        return _fail(where + "momentum ignored: your result uses momentum=0.1 "
                                     "whatever momentum is passed.")
                    return _fail(where + " ".join(problems))
                running_mean, running_var = expected
    except _NotAttempted as stub:
        return _not_attempted("the running-statistics update", stub.returned_none)
    except _Raised as err:
        hint = (" Your function handles an (N, C) input but not an (N, C, H, W) one: a channel's "
                "mean and variance are taken over every axis except 1, axes (0, 2, 3) here."
                if len(shape) > 2 else "")
        return _fail(f"your function raised {err}.{hint}")
    return _passed("Your update matches PyTorch's convention over several steps, with "
                   "momentum 0.1 and 0.3, on (N, C) and (N, C, H, W) inputs.")


# ---------------------------------------------------------------------------------------
# torch.autograd.Function
# ---------------------------------------------------------------------------------------

FUNCTION_SPATIAL_HINT = (
    " Your Function handles an (N, C) input but not an (N, C, H, W) one: take the statistics "
    "with dim=[0, 2, 3] (every dim but 1) and keepdim=True, reshape gamma and beta to (1, C, 1, 1) "
    "so they line up with the channel axis, and in backward sum dgamma and dbeta over the same dims, "
    "with m = dout.numel() // dout.shape[1] values per channel.")
SAVE_HINT = (" ctx.save_for_backward(...) takes tensors only; keep a plain number such as eps as an "
             "attribute instead: ctx.eps = eps.")
UNPACK_HINT = (" ctx.saved_tensors gives back exactly the tensors forward passed to "
               "ctx.save_for_backward(...), in the same order: save (x_hat, inv_std, gamma) in forward "
               "and unpack the same three in backward.")


def _function_hint(message, shape):
    """The hint that goes with an error raised inside the learner's forward or backward."""
    if "save_for_backward can only save" in message:
        return SAVE_HINT
    if "values to unpack" in message:
        return UNPACK_HINT
    return FUNCTION_SPATIAL_HINT if len(shape) > 2 else ""


@_never_raises
def check_batchnorm_function(cls):
    """Check a ``torch.autograd.Function`` subclass used as ``cls.apply(x, gamma, beta, eps)``.

    x: (N, C) or (N, C, *spatial); gamma, beta: (C,). The forward output and the gradients
    that your backward returns for x, gamma and beta are compared with the reference (float64).
    Prints what is wrong (naming common mistakes) and returns True or False; never raises.
    """
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of the course
        return _fail("PyTorch is not installed.")
    if not (isinstance(cls, type) and issubclass(cls, torch.autograd.Function)):
        return _fail(f"expected a subclass of torch.autograd.Function (the class itself, e.g. "
                     f"check_batchnorm_function(MyBatchNorm)), got {cls!r}.")
    if isinstance(cls, type) and cls.forward is torch.autograd.Function.forward:
        return _not_attempted("forward")
    try:
        for seed, (shape, eps) in enumerate(CASES):
            x, gamma, beta, dout = _make_case(shape, 30 + seed)
            xt, gt, bt = (torch.tensor(a, dtype=torch.float64, requires_grad=True)
                          for a in (x, gamma, beta))
            try:
                out = _call(cls.apply, xt, gt, bt, eps)
            except _NotAttempted as stub:
                return _not_attempted("forward", stub.returned_none)
            except _Raised as err:
                return _fail(f"forward, on an input of shape {shape}, raised {str(err).rstrip('.')}."
                             + _function_hint(str(err), shape))
            changed = [name for name, t, a in (("x", xt, x), ("gamma", gt, gamma), ("beta", bt, beta))
                       if not np.array_equal(t.detach().cpu().numpy(), a)]
            if changed:
                return _fail(f"forward changed its input {' and '.join(changed)} in place (x -= mu, "
                             "x.sub_(...), ...), so the caller's tensor now holds other numbers. "
                             "Compute into new tensors instead, e.g. x_hat = (x - mu) * inv_std.")
            if not isinstance(out, torch.Tensor):
                return _fail(f"forward returned {type(out).__name__}; it should return one "
                             "tensor, out, with the shape of x.")
            if out.dtype != torch.float64:
                return _fail(f"a float64 input gave a {out.dtype} output: keep the input's dtype.")
            out_np = out.detach().cpu().numpy()
            expected = _forward(x, gamma, beta, eps)
            problem = _compare(out_np, expected, "forward's out")
            if problem:
                found = _diagnose(out_np, _forward_mistakes(x, gamma, beta, eps))
                if found:
                    return _fail(f"forward, on an input of shape {shape}: {found[0]}: {found[1]}")
                return _fail(f"forward, on an input of shape {shape}: {problem}")
            if not out.requires_grad:
                return _fail("out does not require grad: use cls.apply(...) and do not detach.")
            try:
                with np.errstate(all="ignore"):
                    out.backward(torch.tensor(dout))
            except NotImplementedError:
                return _not_attempted("backward (forward is correct)")
            except RuntimeError as err:
                text = str(err)
                if "incorrect number of gradients" in text:
                    return _fail(
                        "backward returned the wrong number of gradients: " + text.split("\n")[0]
                        + ". backward must return one value per input of forward, in order: "
                        "(dx, dgamma, dbeta, None) - None for eps, which is a plain number.")
                if "invalid gradient" in text:
                    return _fail("backward returned a gradient of the wrong shape: "
                                 + text.split("\n")[0] + ". dx has the shape of x; dgamma and "
                                 "dbeta have shape (C,): sum over every axis except axis 1.")
                first_line = text.splitlines()[0] if text else ""
                return _fail(f"backward, on an input of shape {shape}, raised RuntimeError: "
                             f"{first_line.rstrip('.')}." + _function_hint(first_line, shape))
            except Exception as err:  # noqa: BLE001
                return _fail(f"backward, on an input of shape {shape}, raised {type(err).__name__}: "
                             f"{str(err).rstrip('.')}." + _function_hint(str(err), shape))
            grads = []
            for name, t in (("dx", xt), ("dgamma", gt), ("dbeta", bt)):
                if t.grad is None:
                    return _fail(f"backward returned None for {name}; return a gradient for each "
                                 "of x, gamma and beta (and None for eps).")
                grads.append(t.grad.detach().cpu().numpy())
            message = _check_three_grads(grads, _backward(dout, x, gamma, eps),
                                         _backward_mistakes(dout, x, gamma, eps), shape)
            if message:
                return _fail("backward, o" + message[1:])
    except Exception as err:  # noqa: BLE001 - never raise on a learner's class
        return _fail(f"something went wrong running your Function: {type(err).__name__}: {err}")
    return _passed("forward and backward match the reference on (N, C) and (N, C, H, W) inputs.")


# ---------------------------------------------------------------------------------------
# Folding an eval-mode batch norm into the linear layer before it (notebook 08)
# ---------------------------------------------------------------------------------------

def _fold(W, c, gamma, beta, mu, var, eps, columns=False, eps_mode="inside", sqrt=True, invert=False,
          use_c=True, scale_c=True, scale_mu=True, use_mu=True, use_gamma=True, use_beta=True):
    """The folded (W_folded, b_folded), or a named variant of it (the mistakes below).

    eps_mode: "inside" (right), "outside" sqrt(var) + eps, "none" sqrt(var), "fixed" sqrt(var + 1e-5).
    """
    import torch
    if not sqrt:
        std = var + eps
    elif eps_mode == "inside":
        std = torch.sqrt(var + eps)
    elif eps_mode == "outside":
        std = torch.sqrt(var) + eps
    elif eps_mode == "fixed":
        std = torch.sqrt(var + 1e-5)
    else:
        std = torch.sqrt(var)
    scale = gamma if use_gamma else torch.ones_like(gamma)
    a = std / scale if invert else scale / std
    W_folded = W * a.reshape(1, -1) if columns else W * a.reshape(-1, 1)
    shift = beta if use_beta else torch.zeros_like(beta)
    b_folded = shift + ((a * c if scale_c else c) if use_c else 0)
    if use_mu:
        b_folded = b_folded - (a * mu if scale_mu else mu)
    return W_folded, b_folded


FOLD_EPS_LEFT_OUT = (
    "epsilon left out",
    "The eval-mode BN divides by sqrt(running_var + eps); without eps the folded layer is not "
    "the same function (and divides by zero for a channel with zero variance).", {"eps_mode": "none"})
FOLD_EPS_FIXED = (
    "a fixed number used instead of the eps argument",
    "Your result stays the same whatever eps is passed: a number written into the code (1e-5?) "
    "stands where the eps argument belongs. Each BN layer has its own eps (bn.eps), so use the one "
    "you are given: a = gamma / sqrt(running_var + eps).", {"eps_mode": "fixed"})
FOLD_W_MISTAKES = [
    ("inputs scaled instead of outputs",
     "a[k] scales output k of the layer, i.e. row k of W (shape (C_out, C_in)): "
     "W_folded = a[:, None] * W. Your W * a scales column k, which is input k.", {"columns": True}),
    ("epsilon outside the square root",
     "BN divides by sqrt(running_var + eps), so a = gamma / sqrt(running_var + eps), not "
     "gamma / (sqrt(running_var) + eps).", {"eps_mode": "outside"}),
    FOLD_EPS_LEFT_OUT,
    FOLD_EPS_FIXED,
    ("gamma forgotten",
     "BN scales x_hat by gamma, so a = gamma / sqrt(running_var + eps) (not 1 / sqrt(...)), and a "
     "scales both W and the bias.", {"use_gamma": False}),
    ("variance used instead of standard deviation",
     "x_hat divides by the standard deviation: a = gamma / sqrt(running_var + eps) (with the square root).",
     {"sqrt": False}),
    ("a turned upside down", "a = gamma / sqrt(running_var + eps): gamma on top.", {"invert": True}),
]
FOLD_B_MISTAKES = [
    ("beta forgotten",
     "BN adds beta after scaling, so the folded bias ends with it: "
     "b_folded = a * (c - running_mean) + beta.", {"use_beta": False}),
    ("the layer's bias c forgotten",
     "The layer adds c before BN, and BN scales it by a: b_folded = a * (c - running_mean) + beta.",
     {"use_c": False}),
    ("the layer's bias c not scaled",
     "c is added before BN, so BN multiplies it by a too: b_folded = a * (c - running_mean) + beta.",
     {"scale_c": False}),
    ("running_mean forgotten",
     "The eval-mode BN first subtracts running_mean: b_folded = a * (c - running_mean) + beta.",
     {"use_mu": False}),
    ("running_mean not scaled",
     "running_mean is subtracted before the division, so it is scaled by a as well: "
     "b_folded = a * (c - running_mean) + beta.", {"scale_mu": False}),
]


def _fold_ignores_eps(fn, inputs, result, other_eps=1.0):
    """Does fn, run again with eps=other_eps, return the same (W_folded, b_folded) as result?

    inputs: (W, c, gamma, beta, running_mean, running_var). True means the eps argument is not used.
    """
    try:
        again = _call(fn, *[t.clone() for t in inputs], other_eps)
        if not isinstance(again, (tuple, list)) or len(again) != 2:
            return False
        for new, old in zip(again, result):
            old_arr, problem = _as_array(old, "")
            if problem or not _matches(new, old_arr, strict=True):
                return False
        return True
    except Exception:  # noqa: BLE001 - the learner's code may raise anything
        return False


@_never_raises
def check_fold_linear(fn):
    """Check ``fn(W, c, gamma, beta, running_mean, running_var, eps) -> (W_folded, b_folded)``.

    The layer is ``z = x @ W.T + c`` (``nn.Linear``: W of shape (C_out, C_in), c of shape (C_out,)),
    followed by an eval-mode batch norm with gamma, beta, running_mean, running_var of shape (C_out,).
    The folded layer ``x @ W_folded.T + b_folded`` must be the same function. Inputs are float64
    torch tensors; eps is large (0.1) so that a misplaced eps shows (and a wrong answer is run again
    with eps=1.0 to see whether it uses eps at all). Prints what is wrong (naming
    common mistakes) and returns True or False; never raises.
    """
    import torch
    if not callable(fn):
        return _fail("expected a function fn(W, c, gamma, beta, running_mean, running_var, eps), "
                     f"got {type(fn).__name__}.")
    eps = 0.1
    for case, (C_out, C_in) in enumerate([(4, 4), (5, 3)]):
        g = torch.Generator().manual_seed(40 + case)
        W = torch.randn(C_out, C_in, generator=g, dtype=torch.float64)
        c = torch.randn(C_out, generator=g, dtype=torch.float64)
        gamma = torch.rand(C_out, generator=g, dtype=torch.float64) + 0.5
        beta = torch.randn(C_out, generator=g, dtype=torch.float64)
        mu = torch.randn(C_out, generator=g, dtype=torch.float64) + 1.0
        var = torch.rand(C_out, generator=g, dtype=torch.float64) * 2 + 0.5
        args = [t.clone() for t in (W, c, gamma, beta, mu, var)]
        where = f"with W of shape {(C_out, C_in)}: "
        try:
            result = _call(fn, *args, eps)
        except _NotAttempted as stub:
            return _not_attempted("the folding function", stub.returned_none)
        except _Raised as err:
            hint = (" A size mismatch usually means a is multiplied along the wrong axis of W: "
                    "a has one value per output, row k of W, so write a[:, None] * W "
                    "(or a.reshape(-1, 1) * W)." if "size" in str(err) else "")
            return _fail(where + f"your function raised {err}.{hint}")
        if not all(torch.equal(t, u) for t, u in zip(args, (W, c, gamma, beta, mu, var))):
            return _fail(where + "your function changed its inputs in place (e.g. W *= a). Folding must "
                         "leave the trained layer and BN untouched: compute new tensors instead.")
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            return _fail(where + f"fn returned {type(result).__name__}; it should return two tensors "
                         "(W_folded, b_folded).")
        expected = [t.numpy() for t in _fold(W, c, gamma, beta, mu, var, eps)]
        first, _ = _as_array(result[0], "W_folded")
        second, _ = _as_array(result[1], "b_folded")
        if (first is not None and second is not None
                and first.shape == expected[1].shape and second.shape == expected[0].shape):
            return _fail(where + "your function returned (b_folded, W_folded), in swapped order. Return "
                         "(W_folded, b_folded): the weight first, then the bias, as nn.Linear's "
                         "(weight, bias).")
        for value, exp, name, mistakes in ((result[0], expected[0], "W_folded", FOLD_W_MISTAKES),
                                           (result[1], expected[1], "b_folded", FOLD_B_MISTAKES)):
            problem = _compare(value, exp, name)
            if problem is None:
                continue
            if _is_structural(problem):
                hint = (" W_folded has W's shape (C_out, C_in); b_folded has one value per output, (C_out,)."
                        if "shape" in problem else "")
                return _fail(where + problem + hint)
            index = 0 if name == "W_folded" else 1
            if index == 0 and _matches(value, exp.T):
                return _fail(where + "W_folded is transposed. Keep W's layout, (C_out, C_in): row k holds "
                             "the weights of output k, and a[k] scales that row: a[:, None] * W.")
            if index == 0 and _fold_ignores_eps(fn, (W, c, gamma, beta, mu, var), result):
                # no eps at all, or a number written in its place (a hard-coded 1e-5 differs from
                # no eps by more than 1e-6 relative here, far above float64 rounding)
                without_eps = _fold(W, c, gamma, beta, mu, var, eps, eps_mode="none")[0].numpy()
                left_out = np.allclose(_as_array(value, name)[0], without_eps, rtol=1e-9, atol=1e-12)
                label, why, _ = FOLD_EPS_LEFT_OUT if left_out else FOLD_EPS_FIXED
                return _fail(where + f"{name}: {label}. {why}")
            found = _matching_mistake(value, exp, mistakes,
                                      lambda options: _fold(W, c, gamma, beta, mu, var, eps, **options)[index].numpy())
            if found:
                return _fail(where + f"{name}: {found[0]}. {found[1]}")
            return _fail(where + problem + " Write the eval-mode BN as out = a * z + b per output k, with "
                         "a = gamma / sqrt(running_var + eps) and b = beta - a * running_mean, then put "
                         "z = W x + c into it.")
    return _passed("x @ W_folded.T + b_folded equals the linear layer followed by the eval-mode batch "
                   "norm, for square and non-square W.")


# ---------------------------------------------------------------------------------------
# Batch Renormalization's training-mode x_hat (notebook 09)
# ---------------------------------------------------------------------------------------

def _renorm_case(N, channels, seed, dtype="float64"):
    """x (N, C) whose batch mean and biased std are exactly the given ones, and the running stats.

    channels: one (mu_B, sigma_B, running_mean, running_var) per channel. Returns float64 or float32
    torch tensors (x, running_mean, running_var).
    """
    import torch
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, len(channels), generator=g, dtype=torch.float64)
    z = (z - z.mean(dim=0)) / z.std(dim=0, unbiased=False)
    mu, sigma, running_mean, running_var = (torch.tensor(v, dtype=torch.float64) for v in zip(*channels))
    dt = getattr(torch, dtype)
    return (mu + sigma * z).to(dt), running_mean.to(dt), running_var.to(dt)


# (N, per channel (mu_B, sigma_B, running_mean, running_var), seed), r_max, d_max, eps, dtype, clipping
RENORM_CASES = [
    # r above r_max (channel 0) and below 1 / r_max (1), d above d_max (2) and below -d_max (3), none (4)
    ((8, [(0.5, 2.0, 0.5, 0.9), (1.0, 0.5, 0.7, 1.9), (2.0, 1.1, -0.2, 1.3), (-1.0, 0.9, 0.8, 1.0),
          (0.3, 1.3, 0.6, 1.1)], 1), 1.5, 0.5, 0.1, "float64", True),
    # running statistics close to the batch's: nothing is clipped
    ((6, [(0.4, 1.2, 0.1, 1.0), (-0.5, 0.8, -0.2, 1.1), (1.5, 2.0, 1.9, 3.0)], 2), 3.0, 5.0, 0.1, "float64", False),
    # a longer batch, a small eps, both clips acting in both directions
    ((16, [(3.0, 0.3, 0.0, 1.0), (-2.0, 3.0, 0.0, 1.0), (0.2, 1.0, 0.0, 1.0), (0.0, 1.5, 0.5, 2.0)], 3),
     2.0, 1.0, 1e-3, "float64", True),
    # float32, PyTorch's eps: the clips act on channels 0 and 1, not on 2
    ((12, [(1.8, 3.0, 0.0, 1.0), (-2.0, 0.4, 0.5, 1.5), (0.5, 1.2, 0.2, 1.4)], 4), 2.0, 1.0, 1e-5, "float32", True),
]


def _renorm(x, running_mean, running_var, r_max, d_max, eps, ddof=0, eps_mode="inside", clip_r=True, clip_d=True,
            r_lower=True, invert_r=False, d_sign=1, d_over_s_B=False, use_r=True, use_d=True, detach_r=True,
            detach_d=True, detach_stats=False):
    """Batch Renorm's training-mode x_hat for x (N, C), with switches that reproduce the common mistakes.

    Without switches it equals bn_course.norms.BatchRenorm(C, affine=False) in training mode (tested).
    eps_mode: "inside" (right), "outside" sqrt(var) + eps, "ignored" (eps = 1e-5 whatever is passed).
    """
    import torch
    mu_B = x.mean(dim=0)
    var_B = ((x - mu_B) ** 2).sum(dim=0) / (x.shape[0] - ddof)
    e = 1e-5 if eps_mode == "ignored" else eps
    if eps_mode == "outside":
        s_B, s_run = torch.sqrt(var_B) + eps, torch.sqrt(running_var) + eps
    else:
        s_B, s_run = torch.sqrt(var_B + e), torch.sqrt(running_var + e)
    if detach_stats:
        mu_B, s_B = mu_B.detach(), s_B.detach()
    r = s_run / s_B if invert_r else s_B / s_run
    d = d_sign * (mu_B - running_mean) / (s_B if d_over_s_B else s_run)
    r = r.detach() if detach_r else r
    d = d.detach() if detach_d else d
    if clip_r:
        r = r.clamp(1 / r_max, r_max) if r_lower else r.clamp(max=r_max)
    if clip_d:
        d = d.clamp(-d_max, d_max)
    return (x - mu_B) / s_B * (r if use_r else 1.0) + (d if use_d else 0.0)


def _renorm_reference(x, running_mean, running_var, r_max, d_max, eps):
    """x_hat from the package's BatchRenorm (affine=False, training mode), in x's dtype, with x's graph."""
    import torch

    from bn_course import norms
    layer = norms.BatchRenorm(x.shape[1], eps=eps, r_max=r_max, d_max=d_max, affine=False).to(x.dtype)
    with torch.no_grad():
        layer.running_mean.copy_(running_mean)
        layer.running_var.copy_(running_var)
    return layer.train()(x)


RENORM_MISTAKES = [
    ("no clipping",
     "you used r = s_B / s_run and d = (mu_B - running_mean) / s_run without clipping them. Unclipped, "
     "x_hat is exactly (x - running_mean) / s_run, the inference transform, and a bad running estimate "
     "(early in training) takes over. Clip both: r to [1 / r_max, r_max] with .clamp(1 / r_max, r_max), "
     "d to [-d_max, d_max] with .clamp(-d_max, d_max).", {"clip_r": False, "clip_d": False}),
    ("r not clipped",
     "d is clipped but r is not. r = (s_B / s_run).clamp(1 / r_max, r_max): the correction of the scale "
     "stays within a factor r_max.", {"clip_r": False}),
    ("d not clipped",
     "r is clipped but d is not. d = ((mu_B - running_mean) / s_run).clamp(-d_max, d_max): the correction "
     "of the shift stays within d_max running standard deviations.", {"clip_d": False}),
    ("r clipped only from above",
     "r must stay between 1 / r_max and r_max; you clipped it at r_max only (.clamp(max=r_max), or "
     ".clamp(-r_max, r_max), whose lower bound never acts since r > 0). A batch whose spread is much "
     "smaller than the running one then gets an r close to 0. Use .clamp(1 / r_max, r_max).",
     {"r_lower": False}),
    ("r inverted",
     "you computed r = s_run / s_B; it is r = s_B / s_run. Then, where nothing is clipped, "
     "(x - mu_B) / s_B * r = (x - mu_B) / s_run: the batch's standard deviation cancels and the running "
     "one is left, as at inference.", {"invert_r": True}),
    ("d with the wrong sign",
     "you computed d = (running_mean - mu_B) / s_run; it is d = (mu_B - running_mean) / s_run. Then, where "
     "nothing is clipped, (x - mu_B) / s_run + d = (x - running_mean) / s_run, the inference transform.",
     {"d_sign": -1}),
    ("unbiased variance",
     "your s_B uses the batch variance divided by m - 1 (torch.var's default, unbiased=True). Batch "
     "renorm normalizes like batch norm, with the biased variance: x.var(dim=0, unbiased=False), the mean "
     "of (x - mu_B)**2. (It shows where r is clipped: elsewhere s_B cancels out of x_hat.)", {"ddof": 1}),
    ("epsilon outside the square root",
     "you computed sqrt(var) + eps. Epsilon belongs inside, with the variance: s_B = sqrt(var_B + eps) "
     "and s_run = sqrt(running_var + eps).", {"eps_mode": "outside"}),
    ("epsilon ignored",
     "your result does not use the eps argument (a hard-coded 1e-5, or none). Use the eps you are given, "
     "in both s_B = sqrt(var_B + eps) and s_run = sqrt(running_var + eps).", {"eps_mode": "ignored"}),
    ("d divided by s_B",
     "d measures how far the batch mean is from the running mean in running standard deviations: "
     "d = (mu_B - running_mean) / s_run, not / s_B.", {"d_over_s_B": True}),
    ("r and d not applied",
     "you returned batch norm's x_hat_B = (x - mu_B) / s_B. Batch renorm corrects it: "
     "x_hat = x_hat_B * r + d.", {"use_r": False, "use_d": False}),
    ("r not applied",
     "you added d but did not multiply by r: x_hat = (x - mu_B) / s_B * r + d.", {"use_r": False}),
    ("d not added",
     "you multiplied by r but did not add d: x_hat = (x - mu_B) / s_B * r + d.", {"use_d": False}),
]
RENORM_GRAD_MISTAKES = [
    ("r and d not detached",
     "x_hat is right, but the gradient flows through r and d. They are constants in the backward pass: "
     "r = (s_B / s_run).detach().clamp(1 / r_max, r_max), and d likewise, so that dx_hat/dx is r times "
     "batch norm's Jacobian. With the gradient through them, where nothing is clipped, "
     "x_hat = (x - running_mean) / s_run and the gradient ignores that mu_B and s_B depend on x, as if the "
     "layer did not normalize the batch at all.", {"detach_r": False, "detach_d": False}),
    ("r not detached",
     "x_hat is right and d is a constant, but the gradient flows through r (into s_B). r is a constant in "
     "the backward pass: r = (s_B / s_run).detach().clamp(1 / r_max, r_max), so that dx_hat/dx is r times "
     "batch norm's Jacobian.", {"detach_r": False}),
    ("d not detached",
     "x_hat is right and r is a constant, but the gradient flows through d (into mu_B). d is a constant in "
     "the backward pass: d = ((mu_B - running_mean) / s_run).detach().clamp(-d_max, d_max), so that "
     "dx_hat/dx is r times batch norm's Jacobian.", {"detach_d": False}),
    ("batch statistics detached",
     "x_hat is right, but no gradient flows through mu_B and s_B (detached, or computed from x.detach()). "
     "Only r and d are constants: mu_B and s_B depend on x, and the gradient must see it, as in batch "
     "norm, so that dx_hat/dx is r times batch norm's Jacobian.", {"detach_stats": True}),
]
RENORM_TORCH_HINT = (" This exercise is in PyTorch: compute with torch operations on the tensors you are "
                     "given (x.mean(dim=0), x.var(dim=0, unbiased=False), torch.sqrt, .clamp, .detach()), "
                     "so that autograd can follow, and return a tensor.")


@_never_raises
def check_batch_renorm_x_hat(fn):
    """Check ``fn(x, running_mean, running_var, r_max, d_max, eps) -> x_hat`` (torch tensors; notebook 09).

    x: (N, C); running_mean, running_var: (C,); x_hat: (N, C), Batch Renormalization's training-mode
    ``(x - mu_B) / s_B * r + d`` with ``s_B = sqrt(var_B + eps)`` (biased var_B), ``s_run =
    sqrt(running_var + eps)``, ``r = clip(s_B / s_run, 1 / r_max, r_max)``, ``d = clip((mu_B -
    running_mean) / s_run, -d_max, d_max)``, r and d without gradient. The reference is
    ``bn_course.norms.BatchRenorm(C, affine=False)`` in training mode. Several shapes, with the clips acting
    and not, float64 (also the gradient with respect to x) and float32. Prints what is wrong (naming common
    mistakes) and returns True or False; never raises.
    """
    import torch
    if not callable(fn):
        return _fail("expected a function fn(x, running_mean, running_var, r_max, d_max, eps), "
                     f"got {type(fn).__name__}.")
    for (N, channels, seed), r_max, d_max, eps, dtype, clipping in RENORM_CASES:
        x, running_mean, running_var = _renorm_case(N, channels, seed, dtype)
        shape = tuple(x.shape)
        where = (f"on x of shape {shape} ({dtype}), r_max={r_max}, d_max={d_max}, eps={eps} "
                 f"({'the clips act on some channels' if clipping else 'nothing is clipped'}): ")
        x_leaf = x.clone().requires_grad_(dtype == "float64")
        x_in = x_leaf.clone()  # what the learner gets; x_leaf is what the gradient is taken for
        mean_in, var_in = running_mean.clone(), running_var.clone()
        try:
            out = _call(fn, x_in, mean_in, var_in, r_max, d_max, eps)
        except _NotAttempted as stub:
            return _not_attempted("batch_renorm_x_hat", stub.returned_none)
        except _Raised as err:
            text = str(err)
            hint = ""
            if "numpy" in text.lower():
                hint = RENORM_TORCH_HINT
            elif "must match the size" in text or "size of tensor" in text:
                hint = (" mu_B and var_B hold one value per channel, shape (C,): reduce over the batch, "
                        "x.mean(dim=0), and broadcast them against x (N, C) as they are.")
            return _fail(where + f"your function raised {text.rstrip('.')}." + hint)
        changed = [name for name, new, old in (("x", x_in, x), ("running_mean", mean_in, running_mean),
                                               ("running_var", var_in, running_var))
                   if not (new.shape == old.shape and torch.equal(new.detach(), old))]
        if changed:
            return _fail(where + f"your function changed {' and '.join(changed)} in place (x -= mu_B, "
                         "running_mean.mul_(...), ...), so the caller's tensors now hold other numbers. x_hat "
                         "only reads the running statistics (their update is a separate step, as in BN): "
                         "compute into new tensors instead.")
        if isinstance(out, (tuple, list)):
            return _fail(where + f"fn returned a {type(out).__name__} of {len(out)} items; it should return "
                         "only x_hat, one tensor of shape (N, C).")
        if isinstance(out, np.ndarray):
            return _fail(where + "fn returned a NumPy array." + RENORM_TORCH_HINT)
        if not isinstance(out, torch.Tensor):
            return _fail(where + f"fn returned {type(out).__name__}; it should return x_hat, a tensor of "
                         "shape (N, C).")
        expected_t = _renorm_reference(x_leaf.detach().double(), running_mean.double(), running_var.double(),
                                       r_max, d_max, eps)
        expected = expected_t.detach().cpu().numpy()
        value = out.detach().cpu().numpy()
        float32 = dtype == "float32"
        problem = _compare(value, expected, "x_hat", *((FLOAT32_RTOL, FLOAT32_ATOL) if float32 else ()))
        if problem:
            if _is_structural(problem):
                return _fail(where + problem)

            def variant(options):
                return _renorm(x.double(), running_mean.double(), running_var.double(), r_max, d_max, eps,
                               **options).detach().cpu().numpy()
            found = _matching_mistake(value, expected, RENORM_MISTAKES, variant)
            if found:
                return _fail(where + f"{found[0]}: {found[1]}")
            if float32:
                return _fail(where + problem + " Your function is right on float64 input: does it treat "
                             "float32 input differently?")
            return _fail(where + problem + " Check the steps: mu_B and the biased var_B over dim 0, "
                         "s_B = sqrt(var_B + eps), s_run = sqrt(running_var + eps), r and d clipped, "
                         "x_hat = (x - mu_B) / s_B * r + d.")
        if out.dtype != x.dtype:
            return _fail(where + f"a {x.dtype} input gave a {out.dtype} output. Keep the input's dtype "
                         "(no .double(), .float() or dtype=... in the computation).")
        if float32:
            continue
        # the gradient: dx_hat/dx = r * (batch norm's Jacobian), checked on a random projection of x_hat
        if not out.requires_grad:
            return _fail(where + "x_hat does not require grad: was it computed under torch.no_grad(), or "
                         "detached as a whole? Only r and d are constants; the gradient flows through "
                         "mu_B and s_B.")
        w = torch.randn(shape, generator=torch.Generator().manual_seed(50 + seed), dtype=torch.float64)
        try:
            grad = torch.autograd.grad((out * w).sum(), x_leaf, allow_unused=True)[0]
        except Exception as err:  # noqa: BLE001 - a broken graph in the learner's code
            return _fail(where + f"taking the gradient of your x_hat failed with {type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}")
        if grad is None:
            return _fail(where + "x_hat does not depend on x for autograd (computed from x.detach(), or "
                         "from a new tensor?): the gradient must flow back to x through x - mu_B, mu_B "
                         "and s_B.")
        grad = grad.detach().cpu().numpy()
        expected_grad = torch.autograd.grad((_renorm_reference(x_leaf, running_mean, running_var, r_max,
                                                               d_max, eps) * w).sum(), x_leaf)[0].numpy()
        problem = _compare(grad, expected_grad, "the gradient of x_hat with respect to x")
        if problem:
            def grad_variant(options):
                return torch.autograd.grad((_renorm(x_leaf, running_mean, running_var, r_max, d_max, eps,
                                                    **options) * w).sum(), x_leaf)[0].numpy()
            found = _matching_mistake(grad, expected_grad, RENORM_GRAD_MISTAKES, grad_variant)
            if found:
                return _fail(where + f"{found[0]}: {found[1]}")
            return _fail(where + problem + " r and d are constants in the backward pass (.detach() them) "
                         "while mu_B and s_B keep their gradient: dx_hat/dx is r times batch norm's "
                         "Jacobian.")
    return _passed("x_hat and its gradient match bn_course.norms.BatchRenorm (affine=False), with the clips "
                   "acting and not, on several shapes, in float64 and float32.")

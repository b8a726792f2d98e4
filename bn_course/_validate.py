"""Input checks shared by the NumPy and PyTorch implementations.

Every public function of the course validates its input here, so that a
learner's mistake (wrong rank, wrong channel count, integer data, ...) ends in
one clear sentence that names the problem instead of a deep traceback or,
worse, a silently wrong answer.
"""

import math
import numbers


def check_rank(shape, where="input"):
    """Batch norm needs (N, C) or (N, C, *spatial): at least two axes."""
    if len(shape) < 2:
        raise ValueError(
            f"{where}: batch norm expects an input of shape (N, C) or (N, C, *spatial) "
            f"with at least 2 dimensions, got shape {tuple(shape)} ({len(shape)}D). "
            "For a single feature vector, add a batch axis: x[None, :]."
        )


def values_per_channel(shape):
    """How many numbers each channel's statistics are computed from: N * prod(spatial)."""
    return int(shape[0]) * int(math.prod(int(s) for s in shape[2:]))


def check_enough_values(shape, where="input"):
    """Training-mode statistics need at least two values per channel."""
    m = values_per_channel(shape)
    if m == 0:
        raise ValueError(
            f"{where}: got an empty input, shape {tuple(shape)}: there are no values to compute "
            "each channel's mean and variance from. Pass a batch with at least 2 values per channel."
        )
    if m <= 1:
        raise ValueError(
            f"{where}: expected more than 1 value per channel when training, got input of "
            f"shape {tuple(shape)} ({m} value per channel). The variance of a single value "
            "is 0, so x_hat would be 0 for every input. Use a batch of 2 or more, or "
            "evaluation mode (running statistics)."
        )


def check_channels(shape, param_shape, name, where="input"):
    """A per-channel parameter or buffer must have one entry per channel: ``param_shape`` == (C,)
    for an input of ``shape`` (N, C, ...)."""
    C = int(shape[1])
    if tuple(param_shape) != (C,):
        raise ValueError(
            f"{where}: {name} must have shape ({C},), one value per channel of an input "
            f"with C={C} channels (axis 1 of shape {tuple(shape)}), got shape {tuple(param_shape)}."
        )


def check_eps(eps, where="eps"):
    """eps must be a positive number: it keeps sqrt(var + eps) away from 0 for a constant channel."""
    if real_number(eps) is None or not 0 < real_number(eps) < math.inf:
        raise ValueError(
            f"{where} must be a positive number (finite), got {eps!r}. It keeps sqrt(var + eps) above 0 when a "
            "channel's values are all equal (var = 0); PyTorch's default is 1e-5."
        )


def check_momentum(momentum):
    """PyTorch's momentum is the weight of the new batch: a number between 0 and 1."""
    is_number = isinstance(momentum, numbers.Real)
    if isinstance(momentum, bool) or not is_number or not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(
            f"momentum must be a number between 0 and 1 (the weight of the new batch, "
            f"PyTorch's convention), got {momentum!r}."
        )


def check_positive_int(value, name, meaning=None, where=None):
    """A count (steps, a width, a number of groups or processes, ...) must be a positive integer;
    ``meaning`` says what it counts, ``where`` who asks, in the message."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        prefix = f"{where}: " if where else ""
        about = f" ({meaning})" if meaning else ""
        raise ValueError(f"{prefix}{name} must be a positive integer{about}, got {value!r}.")


def check_num_features(num_features, name="num_features"):
    """A layer's channel count must be a positive integer."""
    check_positive_int(num_features, name, "the number of channels C")


def check_bool(value, name, where=None):
    """A switch such as ``affine`` must be True or False (not 0/1, None or a string)."""
    if not isinstance(value, bool):
        prefix = f"{where}: " if where else ""
        raise TypeError(f"{prefix}{name} must be True or False, got {value!r}.")


def real_number(value):
    """``value`` as a Python float if it is a real number, else None.

    Accepts what a learner may pass as a number: int, float, NumPy scalars (``np.float32(0.1)``)
    and 0-dim tensors (``torch.tensor(2.0)``). Rejects bools, strings, lists and larger tensors.
    """
    if isinstance(value, bool):
        return None
    if hasattr(value, "dim") and hasattr(value, "is_complex"):  # a torch.Tensor (without importing torch here)
        return float(value) if value.dim() == 0 and not value.is_complex() else None
    if isinstance(value, numbers.Real):
        return float(value)
    return None

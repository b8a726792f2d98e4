"""The classic batch-norm bugs of notebook 04, section 5, each shown by its symptom.

The notebook writes each buggy variant in the open (a running-statistics update, a
normalization) and passes it to these helpers; ``tests/test_classic_bugs.py`` passes its
own copies with other seeds, so the notebook's claims hold for every seed.

- ``make_batches`` and ``record_running_stats``: bugs 1 and 2 (biased running variance,
  momentum reversed), on a stream of ``(N, C)`` batches;
- ``eval_std_during_training``: bug 3 (running variance initialized to zero);
- ``shift_experiment``: bug 4 (statistics computed without gradient);
- ``spatial_pattern_images`` and ``pattern_left_after``: bug 5 (normalizing over the wrong axes).
"""

import torch


def make_batches(steps, batch_size, C, mean=0.0, var=1.0, seed=0, device=None, dtype=torch.float64):
    """``steps`` batches of shape (batch_size, C), every value drawn from N(mean, var).

    Returns a tensor of shape (steps, batch_size, C).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, batch_size, C, generator=g, dtype=dtype) * var ** 0.5 + mean
    return x.to(device)


def record_running_stats(update, batches, momentum=0.1):
    """Feed ``batches`` (steps, N, C) to ``update`` and record the running statistics.

    update(running_mean, running_var, x, momentum) -> (running_mean, running_var), all (C,)
    except x (N, C). Starts from PyTorch's initial values, mean 0 and variance 1.
    Returns two (steps, C) tensors: running_mean and running_var after each step.
    """
    C = batches.shape[2]
    running_mean = torch.zeros(C, dtype=batches.dtype, device=batches.device)
    running_var = torch.ones(C, dtype=batches.dtype, device=batches.device)
    means, variances = [], []
    for x in batches:
        running_mean, running_var = update(running_mean, running_var, x, momentum)
        means.append(running_mean.clone())
        variances.append(running_var.clone())
    return torch.stack(means), torch.stack(variances)


def eval_std_during_training(bn, batches, x_eval):
    """Train ``bn`` on each batch in turn; after each step (and before the first) measure
    the standard deviation of its evaluation-mode output on ``x_eval``.

    bn: a batch norm module for (N, C) input; batches: (steps, N, C); x_eval: (M, C).
    Returns a list of steps + 1 floats. The module is left in training mode.
    """
    stds = []
    for x in list(batches) + [None]:
        bn.eval()
        with torch.no_grad():
            stds.append(float(bn(x_eval).std()))
        if x is None:
            break
        bn.train()
        with torch.no_grad():
            bn(x)
    bn.train()
    return stds


def shift_experiment(normalize, steps=50, lr=0.5, N=32, C=4, seed=0, device=None):
    """Learn a per-channel shift ``b`` in ``out = normalize(x + b)`` by gradient descent.

    The loss is the mean squared error to a fixed target whose channels do not have mean 0,
    so it pulls on the mean of ``out``, which batch norm pins at 0. A correct
    ``normalize`` (gradient through mu and var) gives b exactly zero gradient;
    one that treats mu and var as constants keeps pushing b while the loss stands still.

    normalize(z) -> out, z and out of shape (N, C).
    Returns (b_norm, loss): two lists of steps + 1 floats, |b| and the loss at each step.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g, dtype=torch.float64).to(device)
    target = (torch.randn(N, C, generator=g, dtype=torch.float64) + 1.0).to(device)
    b = torch.zeros(C, dtype=torch.float64, device=device, requires_grad=True)
    b_norm, losses = [], []
    for i in range(steps + 1):
        loss = ((normalize(x + b) - target) ** 2).mean()
        b_norm.append(float(b.detach().norm()))
        losses.append(float(loss.detach()))
        if i == steps:
            break
        (grad_b,) = torch.autograd.grad(loss, b)
        with torch.no_grad():
            b -= lr * grad_b
    return b_norm, losses


def spatial_pattern_images(N=16, C=3, H=8, W=8, seed=0, device=None):
    """Images whose channels share a spatial pattern across the batch (a bright left-to-right
    ramp, different in each channel) plus noise: (N, C, H, W), float64."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-2, 2, W, dtype=torch.float64).expand(H, W)
    strength = torch.arange(1, C + 1, dtype=torch.float64).reshape(C, 1, 1)
    x = strength * ramp + torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    return x.to(device)


def pattern_left_after(normalize, x):
    """How much of the batch's common spatial pattern survives ``normalize``: per channel, the
    standard deviation over (H, W) of the batch-average image of normalize(x). Returns (C,)."""
    with torch.no_grad():
        return normalize(x).mean(dim=0).std(dim=(1, 2))

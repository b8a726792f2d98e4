"""Generalization experiments with batch norm: dropout's variance shift, label noise, early stopping.

Notebook 07 asks three questions; this module holds the tools:

- **Dropout with BN.** Dropout keeps each unit with probability ``1 - p`` and divides by
  ``1 - p`` in training; in evaluation it does nothing. The *mean* of a unit is the same in
  both modes, its *variance* is not: it is larger in training. A BN layer after it stores
  that training variance in ``running_var`` and then, in evaluation, divides by the wrong
  number -- the "variance shift" (Li et al., 2019, "Understanding the disharmony between
  dropout and batch normalization by variance shift"). :func:`with_dropout` places
  dropout before every BN or only after the last one; :func:`variance_shift` measures
  the mismatch per BN layer.
- **Label noise.** :func:`noisy_labels` replaces a fraction of the labels by a different,
  random class, so a network that fits them all must memorize.
- **Early stopping.** :func:`holdout` carves a validation set out of the training set;
  :class:`ValidationTracker` watches the validation accuracy during training and keeps
  the weights of the best step.
"""

import copy
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from bn_course import seed_everything
from bn_course._validate import check_positive_int, real_number
from bn_course.covariate_shift import _check_model_input
from bn_course.data import check_class_labels, load_digits_split
from bn_course.models import mlp
from bn_course.pitfalls import precise_bn_stats
from bn_course.torch_bn import is_batchnorm
from bn_course.train import evaluate, train

DROPOUT_PLACES = ("none", "before_bn", "after_bn")


def noisy_labels(y, fraction, n_classes=10, seed=0):
    """Replace a random ``fraction`` of the labels by a *different* class, drawn uniformly.

    y: (N,) int64 labels in 0..n_classes-1. Returns ``(y_noisy (N,), flipped (N,) bool)``;
    exactly ``round(fraction * N)`` labels are changed, chosen by a generator seeded with ``seed``.
    """
    if real_number(fraction) is None or not 0 <= real_number(fraction) <= 1:
        raise ValueError(f"fraction must be a number between 0 and 1, got {fraction!r}.")
    fraction = real_number(fraction)  # a Python float, also for np.float32(0.4)
    if not (isinstance(n_classes, int) and n_classes >= 2):
        raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}.")
    check_class_labels(y, n_classes)
    gen = torch.Generator().manual_seed(seed)
    n = y.numel()
    chosen = torch.randperm(n, generator=gen)[: round(fraction * n)]
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[chosen] = True
    # adding 1..n_classes-1 (mod n_classes) gives a uniformly drawn class that is never the true one
    offset = torch.randint(1, n_classes, (n,), generator=gen)
    y_cpu = y.cpu()
    y_noisy = torch.where(flipped, (y_cpu + offset) % n_classes, y_cpu)
    return y_noisy.to(y.device), flipped.to(y.device)


def with_dropout(model, p, where):
    """A copy of an ``nn.Sequential`` MLP (``bn_course.models.mlp``) with dropout inserted.

    where: "before_bn" -- a Dropout after every hidden activation: the dropped-out units of
                          each hidden layer but the last feed the next layer and its BN;
           "after_bn"  -- one Dropout after the last hidden activation only, just before the
                          output layer: no BN ever sees dropped-out units;
           "none"      -- an unchanged copy.
    p: the probability of zeroing a unit, 0 <= p < 1.
    """
    if where not in DROPOUT_PLACES:
        raise ValueError(f"where must be one of {DROPOUT_PLACES}, got {where!r}.")
    if real_number(p) is None or not 0 <= real_number(p) < 1:
        raise ValueError(f"p must be a number with 0 <= p < 1, got {p!r}.")
    p = real_number(p)  # a Python float, also for np.float32(0.5) or torch.tensor(0.5)
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"with_dropout rebuilds an nn.Sequential (as bn_course.models.mlp returns), "
                        f"got {type(model).__name__}.")
    children = list(copy.deepcopy(model).named_children())
    acts = [name for name, _ in children if name.startswith("act")]
    if where != "none" and not acts:
        raise ValueError("the model has no hidden activation (act1, act2, ...) to put dropout after.")
    after = set() if where == "none" else (set(acts) if where == "before_bn" else {acts[-1]})
    layers = OrderedDict()
    for name, module in children:
        layers[name] = module
        if name in after:
            layers["drop" + name[3:]] = nn.Dropout(p)
    return nn.Sequential(layers)


@torch.no_grad()
def variance_shift(model, x):
    """Per BN layer: the variance it stored in training against the variance it sees in evaluation.

    model: a trained model with BN layers; x: (N, ...) float inputs, N >= 2 (e.g. the training set).
    Runs ``model`` in evaluation mode (dropout off) on ``x`` and captures each BN layer's
    input. Returns one dict per BN layer (in order): ``layer`` (its name), ``running_var``
    (C,) what BN divides by in evaluation, ``eval_var`` (C,) the variance its input really
    has in evaluation, and ``ratio`` = mean over channels of running_var / eval_var
    (1 = no shift; > 1: BN shrinks the activations too much in evaluation).
    """
    _check_model_input(model, x)  # a float batch of >= 2 rows (one row has no variance) that fits the model
    named = [(n, m) for n, m in model.named_modules() if is_batchnorm(m)]
    if not named:
        raise ValueError("the model has no batch norm layer.")
    captured = {}
    hooks = [m.register_forward_hook(lambda mod, inputs, out, n=n: captured.__setitem__(n, inputs[0]))
             for n, m in named]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    rows = []
    for n, m in named:
        z = captured[n]
        dims = [0] + list(range(2, z.dim()))
        eval_var = z.var(dim=dims, correction=1)
        running_var = m.running_var.detach().clone()
        rows.append({"layer": n, "running_var": running_var, "eval_var": eval_var,
                     "ratio": (running_var / eval_var.clamp_min(1e-12)).mean().item()})
    return rows


def holdout_rows(n, n_val, seed=0):
    """Which of ``n`` training rows to hold out: ``(val_rows (n_val,), keep_rows (n - n_val,))``, int64."""
    if not (isinstance(n_val, int) and 0 < n_val < n):
        raise ValueError(f"n_val must be an integer between 1 and {n - 1} (the training set has {n} rows), "
                         f"got {n_val!r}.")
    # NumPy's generator, not torch's: a torch.randperm with the same seed would pick exactly
    # the rows that noisy_labels(..., seed=seed) flips, and the validation set would be all noise.
    order = torch.as_tensor(np.random.default_rng(seed).permutation(n))
    return order[:n_val], order[n_val:]


def holdout(data, n_val, seed=0):
    """Split ``n_val`` examples off the training set of ``data`` for validation.

    data: a ``bn_course.data.DigitsSplit``. Returns ``(train_part, x_val, y_val)`` where
    ``train_part`` is a copy of ``data`` whose training set lacks the held-out rows
    (:func:`holdout_rows` says which).
    """
    val, keep = holdout_rows(int(data.x_train.shape[0]), n_val, seed)
    val, keep = val.to(data.x_train.device), keep.to(data.x_train.device)
    part = copy.copy(data)
    part.x_train, part.y_train = data.x_train[keep], data.y_train[keep]
    return part, data.x_train[val], data.y_train[val]


class ValidationTracker:
    """A ``train(..., callback=...)`` callback for early stopping.

    Every ``every`` steps it evaluates the model on ``(x_val, y_val)`` (and on ``(x_test, y_test)``
    if given, only to show what early stopping achieves) and keeps a copy of the weights
    with the best validation accuracy so far (the earliest, on ties).
    After training: ``steps``, ``val_accuracy``, ``test_accuracy`` (lists), ``best_step``,
    ``best_val_accuracy``, ``best_state`` (a state_dict).
    """

    def __init__(self, model, x_val, y_val, every=50, x_test=None, y_test=None):
        check_positive_int(every, "every")
        self.model, self.x_val, self.y_val = model, x_val, y_val
        self.x_test, self.y_test, self.every = x_test, y_test, every
        self.steps, self.val_accuracy, self.test_accuracy = [], [], []
        self.best_step, self.best_val_accuracy, self.best_state = None, -1.0, None
        self.record(0)

    def record(self, step):
        _, acc = evaluate(self.model, self.x_val, self.y_val)
        self.steps.append(step)
        self.val_accuracy.append(acc)
        if self.x_test is not None:
            self.test_accuracy.append(evaluate(self.model, self.x_test, self.y_test)[1])
        if acc > self.best_val_accuracy:
            self.best_step, self.best_val_accuracy = step, acc
            self.best_state = copy.deepcopy(self.model.state_dict())

    def __call__(self, step, **_):
        if step % self.every == 0:
            self.record(step)
        return False


def gap_experiment(norm, seed=0, n_train=200, steps=400, lr=0.1, batch_size=60, hidden=(100, 100, 100),
                   device=None, progress=False):
    """Train ``mlp(norm=norm)`` on a small stratified subset of the digits; measure the train/test gap.

    The subset (``n_train`` examples) and the initial weights both depend on ``seed``.
    Returns a dict: ``train_accuracy``, ``test_accuracy`` (at the end, evaluation mode),
    ``gap`` = their difference, and ``history``.
    """
    data = load_digits_split(seed=seed, n_train=n_train, device=device)
    seed_everything(seed)
    model = mlp(hidden=hidden, norm=norm)
    history = train(model, data, steps, lr, batch_size=min(batch_size, n_train // 2), seed=seed,
                    device=device, progress=progress, eval_every=max(1, steps // 20))
    train_acc, test_acc = history.train_accuracy[-1], history.test_accuracy[-1]
    return {"train_accuracy": train_acc, "test_accuracy": test_acc, "gap": train_acc - test_acc,
            "history": history}


def dropout_experiment(where, seed=0, p=0.5, steps=500, lr=0.1, hidden=(100, 100, 100), device=None,
                       progress=False):
    """Train a BN MLP with dropout placed ``where`` ("none", "before_bn", "after_bn"); measure the shift.

    Returns a dict: ``accuracy`` (test, evaluation mode, the running statistics of training),
    ``accuracy_recalibrated`` (test, after every BN's statistics are recomputed with dropout off,
    ``bn_course.pitfalls.precise_bn_stats``: what the variance shift cost), ``ratios`` (one
    :func:`variance_shift` ratio per BN layer, on the training set), ``history`` and the trained ``model``.
    """
    data = load_digits_split(device=device)
    seed_everything(seed)
    model = with_dropout(mlp(hidden=hidden, norm="batch"), p, where)
    history = train(model, data, steps, lr, seed=seed, device=device, progress=progress,
                    eval_every=steps, eval_train=False)  # only the final test accuracy is used
    ratios = [row["ratio"] for row in variance_shift(model, data.x_train)]
    recalibrated = precise_bn_stats(copy.deepcopy(model), data.x_train)
    return {"accuracy": history.final_accuracy,
            "accuracy_recalibrated": evaluate(recalibrated, data.x_test, data.y_test)[1],
            "ratios": ratios, "history": history, "model": model}


def label_noise_experiment(seed=0, fraction=0.4, steps=1000, lr=0.1, hidden=(128, 128, 128), n_val=300,
                           every=10, device=None, progress=False):
    """Train a BN MLP on digits whose training labels are partly wrong; watch validation and test.

    A ``fraction`` of the training labels is replaced by a wrong class (:func:`noisy_labels`);
    ``n_val`` of those noisy examples are held out for validation (their labels are noisy too,
    as they would be in practice). The test labels are clean.
    Returns a dict: ``history`` and ``tracker`` (:class:`ValidationTracker`), both evaluated every ``every`` steps,
    ``train_accuracy`` (final, on the noisy training labels), ``memorized`` (fraction of the
    flipped training examples predicted as their *wrong* label at the end),
    ``final_test_accuracy``, ``best_test_accuracy``, ``early_stop_step``,
    ``early_stop_test_accuracy`` (test accuracy at the step with the best validation accuracy) and
    ``val_wrong`` (fraction of the held-out validation labels that are wrong).
    """
    data = load_digits_split(device=device)
    y_noisy, flipped = noisy_labels(data.y_train, fraction, seed=seed)
    data.y_train = y_noisy
    part, x_val, y_val = holdout(data, n_val, seed=seed)
    seed_everything(seed)
    model = mlp(hidden=hidden, norm="batch")
    tracker = ValidationTracker(model, x_val, y_val, every=every, x_test=data.x_test, y_test=data.y_test)
    history = train(model, part, steps, lr, seed=seed, device=device, progress=progress,
                    callback=tracker, eval_every=every)
    val, keep = holdout_rows(int(data.x_train.shape[0]), n_val, seed)
    val, keep = val.to(flipped.device), keep.to(flipped.device)
    wrong = keep[flipped[keep]]  # training rows (not held out) whose label was flipped
    with torch.no_grad():
        model.eval()
        pred = model(data.x_train[wrong]).argmax(dim=1)
        model.train()
    memorized = (pred == y_noisy[wrong]).float().mean().item()
    i = tracker.steps.index(tracker.best_step)
    return {"history": history, "tracker": tracker, "train_accuracy": history.train_accuracy[-1],
            "memorized": memorized, "final_test_accuracy": tracker.test_accuracy[-1],
            "best_test_accuracy": max(tracker.test_accuracy), "early_stop_step": tracker.best_step,
            "early_stop_test_accuracy": tracker.test_accuracy[i], "val_wrong": flipped[val].float().mean().item()}

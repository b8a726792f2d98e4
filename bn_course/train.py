"""A small, readable training loop with divergence detection and a recorded history.

API overview
------------
``train(model, data, steps, lr, batch_size=60, optimizer="sgd", momentum=0.0, weight_decay=0.0,
eval_every=None, seed=0, device=None, progress=True, callback=None, divergence_factor=10.0,
eval_train=True) -> History``
    Minimizes the cross-entropy of ``model`` on ``data.x_train, data.y_train`` (a
    ``bn_course.data.DigitsSplit`` or anything with those four attributes) for ``steps``
    minibatch steps with ``"sgd"`` (``momentum=0`` is plain SGD) or ``"adam"``.
    Every ``eval_every`` steps (and at step 0 and the last step) it evaluates on the whole
    training and test sets in evaluation mode (``eval_train=False`` skips the training set,
    whose entries are then NaN, to save time). The minibatch order is fixed by ``seed``;
    the initial weights are whatever ``model`` holds (build it after
    ``bn_course.seed_everything(seed)`` to fix them too).
    The run *diverges*, is stopped and marked, when a minibatch loss is NaN or infinite,
    or larger than ``divergence_factor`` times the loss of the first step.
``callback(step=..., model=..., x=..., y=..., loss=..., optimizer=..., history=...)``
    If given, called after every optimizer step (``step`` counts from 1; ``x, y`` the
    minibatch, ``loss`` its float loss before the step). Accept ``**kwargs`` so new
    keywords do not break it. It may keep what it records in ``history.extra``.
    Returning ``True`` stops training early.
``evaluate(model, x, y) -> (loss, accuracy)``
    Mean cross-entropy and fraction correct, in evaluation mode, without gradients;
    the model's train/eval mode is restored afterwards.
``History``
    ``steps``, ``train_loss``, ``train_accuracy``, ``test_loss``, ``test_accuracy`` (one
    entry per evaluation), ``batch_loss`` (one per step), ``diverged``, ``diverged_step``,
    ``seconds``, ``extra``; ``steps_to(accuracy)``, ``final_accuracy``, ``summary()``.
``make_optimizer(model, optimizer, lr, momentum=0.0, weight_decay=0.0)``
    The optimizer ``train`` uses: ``torch.optim.SGD`` or ``torch.optim.Adam``.
``is_divergent(loss, first_loss, divergence_factor) -> bool``
    ``train``'s divergence rule: a NaN or infinite loss, or one over ``divergence_factor``
    times the first.
``check_model(model, where=None, name="model")``, ``check_logits(logits, y, where)``
    Clear errors, used across the package, for a model that is not an ``nn.Module`` and
    for a model output that is not ``(N, n_classes)`` logits for the labels ``y``.
"""

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bn_course._validate import check_positive_int, real_number
from bn_course.data import batches, check_class_labels

OPTIMIZERS = ("sgd", "adam")


@dataclass
class History:
    """What a training run recorded.

    steps:          the steps at which the model was evaluated (0 = before training)
    train_loss, train_accuracy, test_loss, test_accuracy: the evaluation at those steps
    batch_loss:     the loss of every minibatch, in training mode, before its update
    diverged:       True if the run was stopped because the loss was NaN, inf or blew up
    diverged_step:  the step at which that happened (None otherwise)
    seconds:        wall time of the run
    extra:          whatever a callback chose to record
    """

    steps: list = field(default_factory=list)
    train_loss: list = field(default_factory=list)
    train_accuracy: list = field(default_factory=list)
    test_loss: list = field(default_factory=list)
    test_accuracy: list = field(default_factory=list)
    batch_loss: list = field(default_factory=list)
    diverged: bool = False
    diverged_step: int | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def final_accuracy(self):
        """Test accuracy at the last evaluation (for a diverged run: at the divergence)."""
        return self.test_accuracy[-1] if self.test_accuracy else float("nan")

    @property
    def best_accuracy(self):
        """The highest test accuracy reached at any evaluation."""
        return max(self.test_accuracy) if self.test_accuracy else float("nan")

    def steps_to(self, accuracy):
        """The first evaluated step with test accuracy >= ``accuracy``; None if never reached."""
        for step, acc in zip(self.steps, self.test_accuracy):
            if acc >= accuracy:
                return step
        return None

    def summary(self):
        """A flat dict of the run's headline numbers, one row of a sweep's table."""
        return {
            "final_accuracy": self.final_accuracy,
            "best_accuracy": self.best_accuracy,
            "final_train_loss": self.train_loss[-1] if self.train_loss else float("nan"),
            "diverged": self.diverged,
            "diverged_step": self.diverged_step,
            "steps_run": len(self.batch_loss),
            "seconds": self.seconds,
        }


def check_model(model, where=None, name="model"):
    """``model`` must be a torch.nn.Module (its train/eval mode and parameters are used).

    ``where``: the function that asks, ``name``: the argument's name (e.g. "model_a"), for the message.
    """
    if not isinstance(model, nn.Module):
        prefix = f"{where}: " if where else ""
        raise TypeError(f"{prefix}{name} must be a torch.nn.Module (e.g. bn_course.models.mlp(...)), "
                        f"got {type(model).__name__}.")


def check_logits(logits, y, where):
    """The model's output on a batch must be logits (N, n_classes) for the N labels ``y``, with a
    column for every label (n_classes > the largest label), what F.cross_entropy needs."""
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.is_floating_point():
        return  # not a vector of class labels: F.cross_entropy has its own message
    y_max = int(y.max()) if y.numel() else None
    shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
    ok = (isinstance(logits, torch.Tensor) and logits.dim() == 2
          and logits.shape[0] == y.shape[0] and (y_max is None or logits.shape[1] > y_max))
    if not ok:
        largest = "" if y_max is None else f" ({y_max})"
        raise ValueError(f"{where}: the model's output has shape {shape}; {where} expects logits of shape "
                         f"(N, n_classes) with N = {y.shape[0]} (one row per label) and "
                         f"n_classes > the largest label{largest}, e.g. a model ending in nn.Linear(..., n_classes).")


@torch.no_grad()
def evaluate(model, x, y, batch_size=2048):
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``, in evaluation mode.

    x: (N, ...) float, y: (N,) int64 -> (loss: float, accuracy: float in [0, 1]).
    """
    check_model(model, "evaluate")
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.dim() == 0 or x.shape[0] != len(y):
        raise ValueError(f"evaluate: x and y must be tensors with one label per example, got "
                         f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))} and {type(y).__name__} "
                         f"{tuple(getattr(y, 'shape', ()))}.")
    try:
        check_class_labels(y)
    except (TypeError, ValueError) as err:
        raise type(err)(f"evaluate: {err}") from None
    check_positive_int(batch_size, "batch_size", where="evaluate")
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    try:
        for start in range(0, int(x.shape[0]), batch_size):
            logits = model(x[start:start + batch_size])
            yb = y[start:start + batch_size]
            check_logits(logits, yb, "evaluate")
            total_loss += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(dim=1) == yb).sum())
    finally:
        model.train(was_training)
    n = int(x.shape[0])
    return total_loss / n, correct / n


def make_optimizer(model, optimizer, lr, momentum=0.0, weight_decay=0.0):
    """``torch.optim.SGD`` (plain when momentum is 0) or ``torch.optim.Adam``."""
    check_model(model, "make_optimizer")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
    if optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if momentum:
        raise ValueError("momentum applies to optimizer='sgd'; Adam has its own betas. Use momentum=0.0.")
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)


def _check_train_args(data, steps, lr, batch_size, eval_every, divergence_factor):
    for name in ("x_train", "y_train", "x_test", "y_test"):
        if not hasattr(data, name):
            raise TypeError(f"data must have x_train, y_train, x_test and y_test (e.g. "
                            f"bn_course.data.load_digits_split()); it has no {name!r}.")
    check_positive_int(steps, "steps")
    if real_number(lr) is None or not real_number(lr) > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}.")
    check_positive_int(eval_every, "eval_every")
    if not divergence_factor > 1:
        raise ValueError(f"divergence_factor must be > 1, got {divergence_factor!r}.")


def _record_evaluation(history, step, model, data, eval_train=True):
    train_loss, train_acc = evaluate(model, data.x_train, data.y_train) if eval_train else (math.nan, math.nan)
    test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
    history.steps.append(step)
    history.train_loss.append(train_loss)
    history.train_accuracy.append(train_acc)
    history.test_loss.append(test_loss)
    history.test_accuracy.append(test_acc)


def is_divergent(loss, first_loss, divergence_factor):
    """A loss that is NaN, infinite, or ``divergence_factor`` times the first loss."""
    return not math.isfinite(loss) or (first_loss is not None and loss > divergence_factor * first_loss)


def train(model, data, steps, lr, batch_size=60, optimizer="sgd", momentum=0.0, weight_decay=0.0,
          eval_every=None, seed=0, device=None, progress=True, callback=None, divergence_factor=10.0,
          eval_train=True):
    """Train ``model`` on ``data`` for ``steps`` minibatch steps; return its ``History``.

    See the module docstring for every argument. The model is moved to ``device``
    (default: the device of ``data.x_train``) and left in training mode.
    """
    check_model(model, "train")
    if next(iter(model.parameters()), None) is None:
        raise ValueError(f"train: model {type(model).__name__} has no parameters to train.")
    check_positive_int(steps, "steps")  # before eval_every's default is computed from it
    if eval_every is None:
        eval_every = max(1, steps // 50)
    _check_train_args(data, steps, lr, batch_size, eval_every, divergence_factor)
    lr = real_number(lr)  # a Python float, also for np.float32(0.1) or torch.tensor(0.1)
    device = torch.device(device) if device is not None else data.x_train.device
    if data.x_train.device != device:
        data = data.to(device) if hasattr(data, "to") else data
    model.to(device).train()
    opt = make_optimizer(model, optimizer, lr, momentum, weight_decay)
    history = History()
    start_time = time.perf_counter()
    _record_evaluation(history, 0, model, data, eval_train)
    stream = batches(data.x_train, data.y_train, batch_size, seed=seed)
    first_loss = None
    bar = tqdm(range(1, steps + 1), disable=not progress, leave=False, desc=f"{optimizer} lr={lr:g}")
    for step in bar:
        xb, yb = next(stream)
        loss = F.cross_entropy(model(xb), yb)
        loss_value = float(loss.detach())
        history.batch_loss.append(loss_value)
        if is_divergent(loss_value, first_loss, divergence_factor):
            history.diverged, history.diverged_step = True, step
            _record_evaluation(history, step, model, data, eval_train)
            break
        first_loss = loss_value if first_loss is None else first_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stop = callback is not None and callback(step=step, model=model, x=xb, y=yb, loss=loss_value,
                                                 optimizer=opt, history=history)
        if step % eval_every == 0 or step == steps or stop:
            _record_evaluation(history, step, model, data, eval_train)
            bar.set_postfix(test_acc=f"{history.test_accuracy[-1]:.3f}")
        if stop:
            break
    bar.close()
    history.seconds = time.perf_counter() - start_time
    return history

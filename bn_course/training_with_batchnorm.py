"""The experiments of notebook 05_training_with_batchnorm: training with and without BN.

Each experiment ``fn(..., seed)`` builds its model after ``seed_everything(seed)``, trains it
on the course's digits with plain SGD (batch 60) and returns a dict, so it goes straight into
``bn_course.sweep.run_grid``. The sizes of the runs are arguments: the notebook runs them at
full size, ``tests/test_training_with_batchnorm.py`` reruns them smaller, with other seeds,
and checks that the notebook's conclusions still hold.

API overview
------------
``digits(device=None) -> DigitsSplit``
    The course's digits split (``bn_course.data.load_digits_split()``), loaded once per device.
``figure1_run(norm, seed, steps=1000, lr=1.0, eval_every=25, track_every=50)``
    The 2015 paper's Figure 1 at laptop scale: 3 x 100 sigmoid MLP, with (``norm="batch"``)
    or without (``"none"``) BN before each sigmoid. Returns ``steps_to_90``,
    ``final_accuracy``, ``diverged``, ``spread_change``, ``median_shift``, ``saturation``,
    ``history`` and the ``tracker`` (a ``bn_course.recording.PercentileTracker``).
``spread_change(values)``, ``median_shift(values)``
    How much the width (p85 - p15) and the median of each unit's input changed over training,
    from a tracker's ``values`` (records, 3, units); medians over the units.
``relu_mlp_run(lr, depth, norm, seed, steps=200, momentum=0.0, init_scale=sqrt 2, eval_every=5)``
    A ReLU MLP of ``depth`` hidden layers of 100 units: the learning-rate, init-scale and
    momentum experiments. Returns the history's summary, ``steps_to_90`` and ``history``.
``good_range(rows, threshold=0.9, x="lr") -> sorted list``
    The values of ``x`` at which every seed's run reached ``threshold`` without diverging.
``split_lr_run(seed, depth=8, lr=10.0, lr_unprotected=1.0, steps=200)``
    The ReLU MLP with BN, where only the weights that BN normalizes get ``lr``; BN's own
    gamma and beta and the last layer get ``lr_unprotected``.
``depth_profile(depth, norm, seed, init_scale=None, n=500)``
    Per-layer RMS of the activations and of the loss gradient at initialization
    (``bn_course.recording.layer_norms``), with ``gradient_growth`` and ``activation_ratio``.
``cnn_run(norm, seed, steps=300, lr=0.1, eval_every=10)``
    The small CNN (Conv -> Norm -> ReLU -> MaxPool, 16 and 32 channels).
``mean_accuracy(history, until=100)``, ``best_run(rows, norm, seed, until=100)``
    Speed as the mean test accuracy over the first ``until`` steps (the area under the
    accuracy curve), and the run of a grid (e.g. of learning rates) that is best by it.
"""

import torch
import torch.nn.functional as F

import bn_course
from bn_course._validate import real_number
from bn_course.data import batches, load_digits_split
from bn_course.models import cnn, mlp
from bn_course.recording import PercentileTracker, layer_norms
from bn_course.sweep import select
from bn_course.train import evaluate, is_divergent, train

_DATA = {}


def digits(device=None):
    """The course's digits split (seed 0), loaded once per device and shared by the experiments."""
    device = torch.device(device if device is not None else bn_course.get_device())
    if device not in _DATA:
        _DATA[device] = load_digits_split(device=device)
    return _DATA[device]


def _train(model, steps, lr, seed, eval_every, momentum=0.0, callback=None, device=None):
    """Plain SGD (or SGD with ``momentum``), batch 60, test accuracy every ``eval_every`` steps."""
    return train(model, digits(device), steps, lr, batch_size=60, momentum=momentum, eval_every=eval_every,
                 seed=seed, progress=False, callback=callback, eval_train=False)


def spread_change(values):
    """How much the width of each unit's input distribution changed over training.

    values: (records, 3, units), the 15/50/85th percentiles over time (``PercentileTracker``).
    Per unit, the width is p85 - p15; the change is max(width_T / width_0, width_0 / width_T)
    between the first and last record (1 = unchanged). Returns the median over units.
    """
    width = values[:, 2] - values[:, 0]
    ratio = width[-1] / width[0]
    return float(torch.maximum(ratio, 1 / ratio).median())


def median_shift(values):
    """How far each unit's median input moved over training, in units of its final width.

    values: (records, 3, units). Per unit: max over records |p50_t - p50_0| / (p85_T - p15_T).
    Returns the median over units.
    """
    median, width = values[:, 1], values[-1, 2] - values[-1, 0]
    return float(((median - median[0]).abs().max(dim=0).values / width).median())


def figure1_run(norm, seed, steps=1000, lr=1.0, eval_every=25, track_every=50, device=None):
    """The 2015 paper's Figure 1 at laptop scale: 3 x 100 sigmoid MLP, plain SGD, batch 60.

    norm: "none" or "batch" (BN before each sigmoid). Tracks the 15/50/85th percentiles of
    every last-hidden-layer unit's sigmoid input on the test set. Returns a dict:
    ``steps_to_90`` (None if never reached), ``final_accuracy``, ``diverged``,
    ``spread_change``, ``median_shift``, ``saturation`` (final), ``history``, ``tracker``.
    """
    if not (isinstance(steps, int) and isinstance(track_every, int) and 1 <= track_every <= steps):
        raise ValueError(f"figure1_run needs integers steps >= track_every >= 1, so that the percentiles are "
                         f"recorded at least twice (at step 0 and at step track_every) and their change can be "
                         f"measured; got steps={steps!r}, track_every={track_every!r}. Use steps >= {track_every!r} "
                         f"or a smaller track_every.")
    bn_course.seed_everything(seed)
    model = mlp(activation="sigmoid", norm=norm).to(digits(device).x_train.device)
    tracker = PercentileTracker(model, digits(device).x_test, name="act3", every=track_every,
                                activation="sigmoid")
    history = _train(model, steps, lr, seed, eval_every, callback=tracker, device=device)
    return {"steps_to_90": history.steps_to(0.9), "final_accuracy": history.final_accuracy,
            "diverged": history.diverged, "spread_change": spread_change(tracker.values),
            "median_shift": median_shift(tracker.values), "saturation": tracker.saturation[-1],
            "history": history, "tracker": tracker}


def relu_mlp_run(lr, depth, norm, seed, steps=200, momentum=0.0, init_scale=2 ** 0.5, eval_every=5,
                 device=None):
    """A ReLU MLP of ``depth`` hidden layers of 100 units, trained with SGD for ``steps`` steps.

    The learning-rate, init-scale and momentum experiments. ``init_scale`` defaults to He
    initialization (sqrt 2), the best-known choice for ReLU networks without BN.
    Returns the history's summary plus ``steps_to_90`` and ``history``.
    """
    bn_course.seed_everything(seed)
    model = mlp(hidden=(100,) * depth, norm=norm, init_scale=init_scale)
    history = _train(model, steps, lr, seed, eval_every, momentum=momentum, device=device)
    return {**history.summary(), "steps_to_90": history.steps_to(0.9), "history": history}


def good_range(rows, threshold=0.9, x="lr"):
    """The values of ``x`` at which every seed's run reached ``threshold`` test accuracy without diverging.

    rows: the tidy rows of one configuration (filter them first with ``select``); each needs
    ``best_accuracy`` (the highest test accuracy of the run) and ``diverged``.
    Returns a sorted list (empty if none).
    """
    ok = {}
    for r in rows:
        good = (not r["diverged"]) and r["best_accuracy"] >= threshold
        ok[r[x]] = ok.get(r[x], True) and good
    return sorted(v for v, good in ok.items() if good)


def depth_profile(depth, norm, seed, init_scale=None, n=500, device=None):
    """Per-layer activation and gradient sizes at initialization, for a ReLU MLP of ``depth`` layers.

    Measured on the first ``n`` training examples with ``bn_course.recording.layer_norms``.
    ``activation_rms[i]`` is the input of weight layer i+1 (index 0: the data itself);
    ``gradient_rms[i]`` the loss gradient there. ``gradient_growth`` = gradient at the first
    hidden layer's output / at the last one's (>1: gradients grow towards the input);
    ``activation_ratio`` = activation at the last hidden layer / at the first.
    """
    bn_course.seed_everything(seed)
    data = digits(device)
    model = mlp(hidden=(100,) * depth, norm=norm, init_scale=init_scale).to(data.x_train.device)
    rows = layer_norms(model, data.x_train[:n], data.y_train[:n])
    act = [r["activation_rms"] for r in rows]
    grad = [r["gradient_rms"] for r in rows]
    return {"activation_rms": act, "gradient_rms": grad,
            "gradient_growth": grad[1] / grad[-1], "activation_ratio": act[-1] / act[1]}


def cnn_run(norm, seed, steps=300, lr=0.1, eval_every=10, device=None):
    """The small CNN (Conv -> Norm -> ReLU -> MaxPool, 16 and 32 channels), plain SGD."""
    bn_course.seed_everything(seed)
    history = _train(cnn(norm=norm), steps, lr, seed, eval_every, device=device)
    return {**history.summary(), "steps_to_90": history.steps_to(0.9), "history": history}


def mean_accuracy(history, until=100):
    """Mean test accuracy over the evaluations at steps 0..``until``: the area under the
    accuracy curve divided by its length. A measure of speed that uses every evaluation,
    so it is less noisy than the step at which one evaluation first crosses a threshold."""
    if real_number(until) is None or not real_number(until) >= 0:
        raise ValueError(f"until must be a number of steps >= 0 (the evaluations at steps 0..until are "
                         f"averaged), got {until!r}.")
    acc = [a for step, a in zip(history.steps, history.test_accuracy) if step <= until]
    if not acc:
        first = f"its first is at step {history.steps[0]}" if history.steps else "it has none"
        raise ValueError(f"the history has no test evaluation at a step <= until={until!r} ({first}).")
    return sum(acc) / len(acc)


def best_run(rows, norm, seed, until=100):
    """Among the rows of one ``norm`` and ``seed`` (e.g. a grid of learning rates), the run that
    did not diverge and has the highest ``mean_accuracy(history, until)``; None if all diverged."""
    runs = [r for r in select(rows, norm=norm, seed=seed) if not r["diverged"]]
    return max(runs, key=lambda r: mean_accuracy(r["history"], until), default=None)


def split_lr_run(seed, depth=8, lr=10.0, lr_unprotected=1.0, steps=200, device=None):
    """Section 2's ReLU MLP with BN (He init), plain SGD with two learning rates.

    The weights of the linear layers that feed a BN layer (``linear1``, ``linear2``, ...) get
    ``lr``; the parameters that BN does not make scale invariant (its own ``gamma`` and ``beta``,
    and the last layer ``out``) get ``lr_unprotected``. Returns ``final_accuracy`` (test set,
    after ``steps`` steps) and ``diverged`` (``train()``'s rule: a NaN or infinite loss, or one
    over 10 times the first).
    """
    bn_course.seed_everything(seed)
    data = digits(device)
    model = mlp(hidden=(100,) * depth, norm="batch", init_scale=2 ** 0.5).to(data.x_train.device)
    normalized = [p for name, p in model.named_parameters() if name.startswith("linear")]
    unprotected = [p for name, p in model.named_parameters() if not name.startswith("linear")]
    optimizer = torch.optim.SGD([{"params": normalized, "lr": lr}, {"params": unprotected, "lr": lr_unprotected}])
    stream = batches(data.x_train, data.y_train, batch_size=60, seed=seed)
    first_loss = None
    for _ in range(steps):
        x, y = next(stream)
        loss = F.cross_entropy(model(x), y)
        loss_value = loss.item()
        if is_divergent(loss_value, first_loss, 10.0):  # train()'s rule: NaN, inf or 10x the first loss
            return {"final_accuracy": evaluate(model, data.x_test, data.y_test)[1], "diverged": True}
        first_loss = loss_value if first_loss is None else first_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"final_accuracy": evaluate(model, data.x_test, data.y_test)[1], "diverged": False}

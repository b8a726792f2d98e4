"""Run an experiment over a grid of settings and seeds; get a tidy table back.

API overview
------------
``run_grid(fn, grid, seeds=(0,), progress=True) -> list of dict``
    Calls ``fn(**setting, seed=seed)`` for every combination of the values in ``grid``
    (a dict: parameter name -> list of values; the order of the keys sets the loop
    order) and every seed. Each call returns a dict of results, or a
    ``bn_course.train.History`` (then its ``summary()`` is used and the history kept
    under ``"history"``). Every row is ``{**setting, "seed": seed, **results}``: one
    row per run, "tidy", ready to filter and plot.
``select(rows, **where) -> list of dict``
    The rows whose columns equal the given values, e.g. ``select(rows, norm="batch")``.
``summarize(rows, by, value) -> list of dict``
    One row per distinct combination of the ``by`` columns with the ``mean``, ``min``,
    ``max``, ``median`` and ``n`` of ``value`` over the seeds (NaN values ignored,
    ``n`` counts the rest).
``column(rows, name) -> list``
    One column of the table.

The experiments of notebook 05 (each ``fn(..., seed)`` builds its model after
``seed_everything(seed)``, trains on ``digits()`` and returns a dict, so it can go straight
into ``run_grid``; the sizes are arguments, so the tests rerun them smaller with other seeds):
``figure1_run``, ``relu_mlp_run``, ``depth_profile``, ``cnn_run``; and the measurements
``spread_change``, ``median_shift`` (of a ``PercentileTracker``'s percentiles) and
``good_range`` (the settings at which every seed trains well).
"""

import itertools
import math
import statistics

import torch
from tqdm.auto import tqdm

import bn_course
from bn_course.data import load_digits_split
from bn_course.models import cnn, mlp
from bn_course.recording import PercentileTracker, layer_norms
from bn_course.train import train


def grid_settings(grid):
    """Every combination of the grid's values, as a list of dicts (the first key varies slowest)."""
    if not isinstance(grid, dict) or not grid:
        raise ValueError(f"grid must be a non-empty dict of parameter name -> list of values, got {grid!r}.")
    for name, values in grid.items():
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise ValueError(f"grid[{name!r}] must be a list of values, got {values!r}.")
    names = list(grid)
    return [dict(zip(names, combo)) for combo in itertools.product(*(list(grid[n]) for n in names))]


def _as_row(result):
    if hasattr(result, "summary") and callable(result.summary):
        return {**result.summary(), "history": result}
    if isinstance(result, dict):
        return result
    raise TypeError(f"the experiment function must return a dict or a History, got {type(result).__name__}.")


def run_grid(fn, grid, seeds=(0,), progress=True):
    """One row per (setting, seed): ``{**setting, "seed": seed, **fn(**setting, seed=seed)}``."""
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must hold at least one seed.")
    settings = grid_settings(grid)
    rows = []
    runs = [(s, seed) for s in settings for seed in seeds]
    for setting, seed in tqdm(runs, disable=not progress, desc="runs"):
        rows.append({**setting, "seed": seed, **_as_row(fn(**setting, seed=seed))})
    return rows


def select(rows, **where):
    """The rows whose columns equal every given value."""
    return [r for r in rows if all(r.get(k) == v for k, v in where.items())]


def column(rows, name):
    """[row[name] for row in rows], with a clear error if a row lacks that column."""
    try:
        return [r[name] for r in rows]
    except KeyError:
        raise KeyError(f"no column {name!r}; the rows have {sorted(rows[0]) if rows else []}.") from None


def summarize(rows, by, value):
    """Mean, min, max, median and count of ``value`` for each distinct combination of ``by``."""
    by = (by,) if isinstance(by, str) else tuple(by)
    groups = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), []).append(r[value])
    out = []
    for key, values in groups.items():
        finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
        stats = {"mean": statistics.fmean(finite), "min": min(finite), "max": max(finite),
                 "median": statistics.median(finite)} if finite else \
            {"mean": math.nan, "min": math.nan, "max": math.nan, "median": math.nan}
        out.append({**dict(zip(by, key)), **stats, "n": len(finite)})
    return out


# ---------------------------------------------------------------------------------------------
# The experiments of notebook 05_training_with_batchnorm. Each takes the size of the run as
# arguments, so the notebook runs them at full size and tests/test_training_claims.py reruns
# them, smaller, with other seeds, and checks that the notebook's conclusions still hold.
# ---------------------------------------------------------------------------------------------

_DATA = {}


def digits(device=None):
    """The course's digits split (seed 0), loaded once per device and shared by the experiments."""
    device = torch.device(device if device is not None else bn_course.get_device())
    if device not in _DATA:
        _DATA[device] = load_digits_split(device=device)
    return _DATA[device]


def _train(model, steps, lr, seed, eval_every, momentum=0.0, callback=None, device=None):
    data = digits(device)
    return train(model, data, steps, lr, batch_size=60, momentum=momentum, eval_every=eval_every,
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
    Returns the history's summary plus ``steps_to_90``.
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

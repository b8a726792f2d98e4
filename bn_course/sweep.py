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
``column(rows, name) -> list``
    One column of the table.

The experiments themselves live with the notebook that runs them (e.g.
``bn_course.training_with_batchnorm`` for notebook 05, ``bn_course.norms`` for notebook 09).
"""

import itertools

from tqdm.auto import tqdm


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



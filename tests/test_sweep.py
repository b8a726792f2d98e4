"""bn_course.sweep: one tidy row per (setting, seed), in a predictable order; summaries are right."""

import math

import pytest

from bn_course.sweep import column, grid_settings, run_grid, select
from bn_course.train import History


def fake_experiment(lr, norm, seed):
    return {"score": lr * (2 if norm == "batch" else 1) + seed}


def test_run_grid_shape_and_order():
    rows = run_grid(fake_experiment, {"lr": [0.1, 1.0, 10.0], "norm": ["none", "batch"]}, seeds=[0, 1], progress=False)
    assert len(rows) == 3 * 2 * 2
    assert rows[0] == {"lr": 0.1, "norm": "none", "seed": 0, "score": 0.1}
    assert [(r["lr"], r["norm"], r["seed"]) for r in rows[:4]] == [
        (0.1, "none", 0), (0.1, "none", 1), (0.1, "batch", 0), (0.1, "batch", 1)]
    assert select(rows, norm="batch", lr=10.0, seed=1)[0]["score"] == 21.0


def test_history_results_are_summarized():
    def fn(seed):
        return History(steps=[0, 5], test_accuracy=[0.1, 0.9], train_loss=[2.3, 0.4], batch_loss=[1.0] * 5)

    rows = run_grid(lambda x, seed: fn(seed), {"x": [1]}, seeds=[3], progress=False)
    assert rows[0]["final_accuracy"] == 0.9 and rows[0]["steps_run"] == 5 and not rows[0]["diverged"]
    assert isinstance(rows[0]["history"], History)


def test_column():
    rows = [{"g": "a", "v": 1.0}, {"g": "a", "v": 3.0}, {"g": "b", "v": math.nan}]
    assert column(rows, "g") == ["a", "a", "b"]


def test_clear_errors():
    with pytest.raises(ValueError, match="non-empty dict"):
        grid_settings({})
    with pytest.raises(ValueError, match="list of values"):
        grid_settings({"lr": 0.1})
    with pytest.raises(ValueError, match="seed"):
        run_grid(fake_experiment, {"lr": [1], "norm": ["none"]}, seeds=[], progress=False)
    with pytest.raises(TypeError, match="dict or a History"):
        run_grid(lambda x, seed: 3, {"x": [1]}, progress=False)
    with pytest.raises(KeyError, match="no column"):
        column([{"a": 1}], "b")

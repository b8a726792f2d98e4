"""bn_course.widgets: drive each explorer's sliders from code and check what it shows changes."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bn_course import widgets  # noqa: E402
from bn_course.data import load_digits_split  # noqa: E402


def control(widget, name):
    """The slider or menu of an ipywidgets.interactive that feeds the callback's argument `name`."""
    return next(w for w in widget.kwargs_widgets if w._kwarg == name)


def bars(ax):
    """Left edge, width and height of every histogram bar drawn in ax."""
    return np.array([(p.get_x(), p.get_width(), p.get_height()) for p in ax.patches])


@pytest.fixture(scope="module")
def batch():
    d = load_digits_split()
    return d.x_train[:128], d.y_train[:128]


def test_depth_init_explorer_redraws(batch):
    w = widgets.depth_init_explorer(*batch, width=32, max_depth=12)
    first = w.result
    assert first.stats.depth == 10 and first.stats.activation == "tanh"
    assert len(first.figure.axes) == 5

    control(w, "depth").value = 12
    assert w.result.stats.depth == 12
    assert "layer 12" in w.result.figure.axes[-1].get_title()

    before = w.result
    control(w, "init_scale").value = 4.0
    after = w.result
    assert after.stats.init_scale == 4.0
    assert after.stats.std[-1] > before.stats.std[-1]
    assert not np.array_equal(bars(after.figure.axes[-1]), bars(before.figure.axes[-1]))

    control(w, "activation").value = "relu"
    assert w.result.stats.activation == "relu" and w.result.stats.mean.min() >= 0
    assert "relu" in w.result.figure.texts[0].get_text()  # the suptitle


def test_depth_init_explorer_keeps_one_figure_open(batch):
    plt.close("all")
    w = widgets.depth_init_explorer(*batch, width=16, max_depth=5)
    for depth in (1, 2, 3, 4, 5):
        control(w, "depth").value = depth
    assert plt.get_fignums() == [w.result.figure.number]


def test_batchnorm_explorer_redraws():
    w = widgets.batchnorm_explorer(m=200)
    r = w.result
    assert r.out_mean == pytest.approx(0.0, abs=1e-6) and r.out_std == pytest.approx(1.0, abs=1e-3)

    control(w, "gamma").value = 2.0
    control(w, "beta").value = -1.0
    r = w.result
    assert r.out_mean == pytest.approx(-1.0, abs=1e-6) and r.out_std == pytest.approx(2.0, abs=1e-3)
    assert "-1.00" in r.figure.axes[1].get_title()

    # a batch whose spread is comparable to sqrt(eps) is no longer scaled to std gamma
    drawn = bars(r.figure.axes[1])
    control(w, "spread").value = 0.01
    control(w, "eps").value = 1e-3
    r = w.result
    assert np.std(r.x) == pytest.approx(0.01, rel=0.2)
    assert r.out_std < 1.0  # gamma * 0.01 / sqrt(0.01**2 + 1e-3) ~ 0.6
    assert not np.array_equal(bars(r.figure.axes[1]), drawn)


def test_batchnorm_explorer_matches_the_formula():
    w = widgets.batchnorm_explorer(m=100, center=-2.0, seed=3)
    control(w, "eps").value = 0.1
    r = w.result
    x = r.x
    expected = (x - x.mean()) / np.sqrt(x.var() + 0.1)
    np.testing.assert_allclose(r.out, expected, rtol=1e-10)

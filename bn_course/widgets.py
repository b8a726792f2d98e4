"""Interactive explorers (ipywidgets) for the notebooks.

Each explorer is an ``ipywidgets.interactive``: sliders plus an output area that is
redrawn when a slider is released. The callbacks are thin: they call a tested
function of the package (``activations.init_statistics``, ``numpy_bn.batchnorm_forward``)
and plot what it returns. After every redraw, ``widget.result`` holds a
``SimpleNamespace`` with the figure and the numbers shown, so tests (and curious
readers) can drive a slider from code and read what changed.
"""

from types import SimpleNamespace

import numpy as np
from ipywidgets import Dropdown, FloatLogSlider, FloatSlider, IntSlider, interactive

from bn_course.activations import ACTIVATIONS, init_statistics, plot_layer_histograms
from bn_course.numpy_bn import batchnorm_forward


def _replace_figure(state, fig):
    """Close the figure drawn last time (keeps memory flat while sliders move)."""
    import matplotlib.pyplot as plt

    if state.get("fig") is not None:
        plt.close(state["fig"])
    state["fig"] = fig


def depth_init_explorer(x, y, width=128, max_depth=30, seed=0):
    """Sliders for depth and init scale (and a menu for the activation) of a deep MLP at init;
    redraws the histograms of the activations of five layers from first to last.

    x: (N, in_features) float tensor, y: (N,) labels, as for ``activations.init_statistics``.
    """
    state = {}

    def show(depth, init_scale, activation):
        stats = init_statistics(x, y, depth=depth, width=width, init_scale=init_scale,
                                activation=activation, seed=seed)
        fig = plot_layer_histograms(stats)
        _replace_figure(state, fig)
        return SimpleNamespace(figure=fig, stats=stats)

    return interactive(
        show,
        depth=IntSlider(value=10, min=1, max=max_depth, description="depth", continuous_update=False),
        init_scale=FloatLogSlider(value=1.0, base=2, min=-2, max=2, step=0.25, description="init scale",
                                  continuous_update=False),
        activation=Dropdown(options=list(ACTIVATIONS), value="tanh", description="activation"),
    )


def batchnorm_before_after(x, out, gamma, beta, eps):
    """Two histograms: one channel's values x before batch norm and out after it. Returns the figure."""
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(8, 2.8))
    ax0.hist(x.ravel(), bins=30, color="tab:gray")
    ax0.set_title(f"before: mean {round(float(x.mean()), 2) + 0.0:.2f}, std {x.std():.3g}", fontsize=10)
    ax0.set_xlabel("x")
    ax0.set_ylabel("count")
    ax1.hist(out.ravel(), bins=30, color="tab:blue")
    ax1.set_xlim(-16, 16)  # fixed, so that moving a slider moves the histogram; wide enough for |gamma| = 3, beta = 3
    ax1.set_title(f"after: mean {round(float(out.mean()), 2) + 0.0:.2f}, std {out.std():.3g}", fontsize=10)  # + 0.0: no "-0.00"
    ax1.set_xlabel(r"$y = \gamma \hat{x} + \beta$")
    fig.suptitle(rf"$\gamma$ = {gamma:.2f}, $\beta$ = {beta:.2f}, $\epsilon$ = {eps:.1e}", fontsize=10)
    fig.tight_layout()
    return fig


def batchnorm_explorer(m=256, center=3.0, seed=0):
    """Sliders for gamma, beta, eps and the batch's spread; redraws one channel's histogram
    before and after training-mode batch norm.

    The batch is ``x = center + spread * z`` for a fixed standard-normal z of m values, so
    moving the spread slider rescales the same batch.
    """
    z = np.random.default_rng(seed).standard_normal((m, 1))
    state = {}

    def show(gamma, beta, eps, spread):
        x = center + spread * z
        out, _ = batchnorm_forward(x, np.array([gamma]), np.array([beta]), eps=eps)
        fig = batchnorm_before_after(x, out, gamma, beta, eps)
        _replace_figure(state, fig)
        return SimpleNamespace(figure=fig, x=x, out=out, out_mean=float(out.mean()), out_std=float(out.std()))

    return interactive(
        show,
        gamma=FloatSlider(value=1.0, min=-2.0, max=3.0, step=0.1, description="gamma", continuous_update=False),
        beta=FloatSlider(value=0.0, min=-3.0, max=3.0, step=0.1, description="beta", continuous_update=False),
        eps=FloatLogSlider(value=1e-5, base=10, min=-5, max=1, step=0.5, description="eps",
                           continuous_update=False),
        spread=FloatLogSlider(value=1.0, base=10, min=-3, max=2, step=0.25, description="spread",
                              continuous_update=False),
    )

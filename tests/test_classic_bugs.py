"""Notebook 04, section 5: the classic bugs, each shown by its symptom, for other seeds.

The buggy variants are written here again, as the notebook writes them, and run through
bn_course.classic_bugs with seeds the notebook does not use, so the notebook's claims
(and the margins of its asserts) hold for every seed, not just the one shown.
"""

import pytest
import torch
from torch import nn

from bn_course import classic_bugs
from bn_course.torch_bn import BatchNorm


def update_running(running_mean, running_var, x, momentum):
    mu, var = x.mean(dim=0), x.var(dim=0, correction=1)
    return (1 - momentum) * running_mean + momentum * mu, (1 - momentum) * running_var + momentum * var


def update_running_biased(running_mean, running_var, x, momentum):
    mu, var = x.mean(dim=0), x.var(dim=0, correction=0)
    return (1 - momentum) * running_mean + momentum * mu, (1 - momentum) * running_var + momentum * var


def update_running_reversed(running_mean, running_var, x, momentum):
    mu, var = x.mean(dim=0), x.var(dim=0, correction=1)
    return momentum * running_mean + (1 - momentum) * mu, momentum * running_var + (1 - momentum) * var


def normalize_over(x, dims, eps=1e-5):
    mu = x.mean(dim=dims, keepdim=True)
    return (x - mu) / torch.sqrt(x.var(dim=dims, correction=0, keepdim=True) + eps)


def batchnorm_detached(x, eps=1e-5):
    mu = x.mean(dim=0, keepdim=True).detach()
    var = x.var(dim=0, correction=0, keepdim=True).detach()
    return (x - mu) / torch.sqrt(var + eps)


SEEDS = [21, 22, 23, 24, 25]


def test_update_running_matches_pytorch_buffers():
    for seed in SEEDS:
        batches = classic_bugs.make_batches(steps=6, batch_size=5, C=3, mean=1.0, var=2.0, seed=seed)
        reference = nn.BatchNorm1d(3, momentum=0.3, dtype=torch.float64)
        for x in batches:
            reference(x)
        means, variances = classic_bugs.record_running_stats(update_running, batches, momentum=0.3)
        assert means.shape == variances.shape == (6, 3)
        torch.testing.assert_close(means[-1], reference.running_mean)
        torch.testing.assert_close(variances[-1], reference.running_var)


@pytest.mark.parametrize("seed", SEEDS)
def test_bug1_biased_running_variance_underestimates_and_inflates_eval_outputs(seed):
    batches = classic_bugs.make_batches(steps=300, batch_size=4, C=16, mean=3.0, var=4.0, seed=seed)
    _, var_right = classic_bugs.record_running_stats(update_running, batches, momentum=0.02)
    _, var_biased = classic_bugs.record_running_stats(update_running_biased, batches, momentum=0.02)
    assert 0.9 < float(var_right[-1].mean()) / 4 < 1.1
    assert 0.65 < float(var_biased[-1].mean()) / 4 < 0.85
    x_test = classic_bugs.make_batches(1, 4000, 16, mean=3.0, var=4.0, seed=seed + 1000)[0]
    std_right = float(((x_test - x_test.mean(0)) / torch.sqrt(var_right[-1] + 1e-5)).std())
    std_biased = float(((x_test - x_test.mean(0)) / torch.sqrt(var_biased[-1] + 1e-5)).std())
    assert 0.93 < std_right < 1.07
    assert abs(std_biased / std_right - (4 / 3) ** 0.5) < 0.01   # sqrt(m / (m - 1)) times larger


@pytest.mark.parametrize("seed", SEEDS)
def test_bug2_reversed_momentum_makes_the_running_mean_follow_the_last_batch(seed):
    batches = classic_bugs.make_batches(steps=200, batch_size=16, C=16, mean=3.0, var=4.0, seed=seed)
    mean_right, _ = classic_bugs.record_running_stats(update_running, batches, momentum=0.1)
    mean_reversed, _ = classic_bugs.record_running_stats(update_running_reversed, batches, momentum=0.1)
    wobble_right, wobble_reversed = (float(m[100:].std(dim=0).mean()) for m in (mean_right, mean_reversed))
    assert wobble_reversed > 2.5 * wobble_right
    theory_right, theory_reversed = (0.5 * (alpha / (2 - alpha)) ** 0.5 for alpha in (0.1, 0.9))
    assert 0.7 < wobble_right / theory_right < 1.2 and 0.85 < wobble_reversed / theory_reversed < 1.15


def test_bug2_the_short_window_reads_low_on_average():
    """Notebook 04: PyTorch's rule's measured spread *tends* to come out low (a single seed can read high:
    3% of seeds 0-199 do), so the claim is checked on the mean over the seeds."""
    ratios = []
    for seed in SEEDS:
        batches = classic_bugs.make_batches(steps=200, batch_size=16, C=16, mean=3.0, var=4.0, seed=seed)
        mean_right, _ = classic_bugs.record_running_stats(update_running, batches, momentum=0.1)
        ratios.append(float(mean_right[100:].std(dim=0).mean()) / (0.5 * (0.1 / 1.9) ** 0.5))
    assert sum(ratios) / len(ratios) < 1, ratios


@pytest.mark.parametrize("seed", SEEDS)
def test_bug3_zero_initial_running_variance_blows_up_early_evaluation(seed):
    bn_right, bn_zero = BatchNorm(8, dtype=torch.float64), BatchNorm(8, dtype=torch.float64)
    with torch.no_grad():
        bn_zero.running_var.zero_()
    batches = classic_bugs.make_batches(steps=50, batch_size=32, C=8, seed=seed)
    x_eval = classic_bugs.make_batches(steps=1, batch_size=1000, C=8, seed=seed + 1000)[0]
    std_right = classic_bugs.eval_std_during_training(bn_right, batches, x_eval)
    std_zero = classic_bugs.eval_std_during_training(bn_zero, batches, x_eval)
    assert len(std_right) == 51 and bn_right.training
    assert abs(std_right[0] - 1) < 0.1 and 300 < std_zero[0] / std_right[0] < 330   # about 1 / sqrt(eps)
    assert std_zero[5] > 1.3 * std_right[5] and std_zero[50] < 1.05 * std_right[50]
    assert float((bn_right.running_var - bn_zero.running_var - 0.9 ** 50).abs().max()) < 1e-12


@pytest.mark.parametrize("seed", SEEDS)
def test_bug4_detached_statistics_let_a_shift_drift_while_the_loss_stands_still(seed):
    b_right, loss_right = classic_bugs.shift_experiment(lambda z: normalize_over(z, (0,)), steps=50, seed=seed)
    b_detached, loss_detached = classic_bugs.shift_experiment(batchnorm_detached, steps=50, seed=seed)
    assert len(b_right) == len(loss_right) == 51
    assert b_right[-1] < 1e-10 and b_detached[-1] > 5
    assert all(later > earlier for earlier, later in zip(b_detached, b_detached[1:]))  # grows at every step
    assert max(loss_right) - min(loss_right) < 1e-9 and max(loss_detached) - min(loss_detached) < 1e-9


@pytest.mark.parametrize("seed", SEEDS)
def test_bug5_normalizing_over_the_batch_only_erases_the_common_pattern(seed):
    images = classic_bugs.spatial_pattern_images(seed=seed)
    assert images.shape == (16, 3, 8, 8)
    right = classic_bugs.pattern_left_after(lambda x: normalize_over(x, (0, 2, 3)), images)
    wrong = classic_bugs.pattern_left_after(lambda x: normalize_over(x, (0,)), images)
    assert float(right.min()) > 0.5 and float(wrong.max()) < 1e-10


@pytest.mark.parametrize("seed", SEEDS)
def test_detached_gradient_no_longer_sums_to_zero(seed):
    g = torch.Generator().manual_seed(seed)
    x, dout = torch.randn(16, 5, generator=g, dtype=torch.float64) * 3 + 2, torch.randn(16, 5, generator=g, dtype=torch.float64)
    sums = []
    for fn in (lambda z: normalize_over(z, (0,)), batchnorm_detached):
        x_in = x.clone().requires_grad_(True)
        fn(x_in).backward(dout)
        sums.append(float(x_in.grad.sum(dim=0).abs().max()))
    assert sums[0] < 1e-10 and sums[1] > 1e-2


@pytest.mark.parametrize("seed", SEEDS)
def test_normalizing_each_example_leaves_the_feature_means(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64) * 3 + 2 + 3 * torch.arange(5, dtype=torch.float64)
    assert float(normalize_over(x, (1,)).mean(dim=0).abs().max()) > 0.5

"""bn_course.pitfalls: the tools of notebook 08, and its experiments rerun with other seeds.

The experiment tests repeat the notebook's asserts for seeds the notebook does not show,
so a claim in the notebook cannot rest on a lucky seed.
"""

import pytest
import torch
from torch import nn

from bn_course.data import load_digits_split
from bn_course.pitfalls import (FrozenBatchNorm, batchnorm_layers, bn_placement, fine_tuning_shifted,
                                forgetting_eval, freeze_batchnorm, non_iid_training, precise_bn_stats,
                                predict_in_train_mode, running_stat_lag, single_class_batches, train_on_stream)
from bn_course.torch_bn import BatchNorm

SEEDS = [1, 2, 3]


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)
    return load_digits_split()


# --- tools ----------------------------------------------------------------------------------------

def test_precise_bn_stats_gives_population_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3), BatchNorm(3))
    x = torch.randn(300, 5) * 2 + 1
    precise_bn_stats(model, x, batch_size=64)  # batches of 64 do not divide 300: exactness must not depend on it
    z1 = model[0](x).detach().double()
    torch.testing.assert_close(model[1].running_mean.double(), z1.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[1].running_var.double(), z1.var(0, unbiased=True), rtol=1e-5, atol=1e-5)
    model.eval()
    with torch.no_grad():  # the second BN sees the first in eval mode, with its new statistics
        z2 = model[3](model[2](model[1](model[0](x)))).double()
    torch.testing.assert_close(model[4].running_mean.double(), z2.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[4].running_var.double(), z2.var(0, unbiased=True), rtol=1e-5, atol=1e-5)


def test_precise_bn_stats_on_images_and_keeps_training_mode():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3)).train()
    x = torch.randn(20, 1, 6, 6)
    precise_bn_stats(model, x)
    z = model[0](x).detach()
    torch.testing.assert_close(model[1].running_mean, z.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert model.training


def small_bn_mlp(**bn_options):
    return nn.Sequential(nn.Linear(4, 3, bias=False), nn.BatchNorm1d(3, **bn_options), nn.ReLU(), nn.Linear(3, 2))


def test_precise_bn_stats_rejects_bad_input_clearly():
    model = small_bn_mlp()
    with pytest.raises(ValueError, match="BatchNorm1d.*1 value per channel.*at least 2 values per channel in total"):
        precise_bn_stats(model, torch.randn(1, 4))  # the variance of one value: count - 1 = 0
    assert torch.equal(model[1].running_var, torch.ones(3)) and model.training
    with pytest.raises(ValueError, match=r"at least one sample.*shape \(0, 4\)"):
        precise_bn_stats(model, torch.randn(0, 4))
    with pytest.raises(TypeError, match="floating-point.*torch.int64"):
        precise_bn_stats(model, torch.ones(5, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        precise_bn_stats(model, torch.randn(5, 4), batch_size=0)
    # one image holds 16 values per channel after the conv: enough
    conv = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3))
    precise_bn_stats(conv, torch.randn(1, 1, 6, 6))
    assert torch.isfinite(conv[1].running_var).all()


def test_a_refused_precise_bn_stats_changes_no_layer():
    """One image: 16 values per channel for the conv's BN (enough), 1 for the BN after the linear layer (not):
    the error leaves the first BN as it was, not half recalibrated."""
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(48, 2), nn.BatchNorm1d(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="BatchNorm1d.*1 value per channel"):
        precise_bn_stats(model, torch.randn(1, 1, 6, 6))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_precise_bn_stats_without_running_stats_changes_nothing():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3),
                          nn.Linear(3, 2), nn.BatchNorm1d(2, track_running_stats=False))
    with pytest.raises(ValueError, match="no running statistics.*Re-create the batch norm with track_running_stats"):
        precise_bn_stats(model, torch.randn(10, 4))
    assert torch.equal(model[1].running_mean, torch.zeros(3))  # checked before any layer is changed


def test_predict_in_train_mode_leaves_the_model_alone():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pred = predict_in_train_mode(model, torch.randn(10, 4), 4)
    assert pred.shape == (10,) and pred.dtype == torch.int64
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_single_class_batches(data):
    stream = single_class_batches(data.x_train, data.y_train, 16, seed=1)
    seen = set()
    for _ in range(200):
        xb, yb = next(stream)
        assert xb.shape == (16, 64) and (yb == yb[0]).all()
        seen.add(int(yb[0]))
    assert seen == set(range(10))
    with pytest.raises(ValueError, match="larger than the smallest class"):
        next(single_class_batches(data.x_train, data.y_train, 1000))


def test_frozen_batchnorm_is_the_eval_map_in_any_mode():
    bn = nn.BatchNorm2d(3)
    bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2), bn.weight.data.normal_(), bn.bias.data.normal_()
    frozen = FrozenBatchNorm(bn).train()
    x = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(frozen(x), bn.eval()(x))
    assert list(frozen.parameters()) == []


def test_frozen_batchnorm_rejects_bad_input_clearly():
    frozen = FrozenBatchNorm(nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match=r"FrozenBatchNorm\(3\) got an input with 4 channels.*num_features=3"):
        frozen(torch.randn(5, 4))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        frozen(torch.randn(3))
    with pytest.raises(TypeError, match="floating-point.*torch.int64"):
        frozen(torch.ones(2, 3, dtype=torch.long))


def test_freezing_needs_running_statistics():
    for make in (lambda: FrozenBatchNorm(nn.BatchNorm1d(3, track_running_stats=False)),
                 lambda: freeze_batchnorm(small_bn_mlp(track_running_stats=False))):
        with pytest.raises(ValueError, match="no running statistics.*Re-create the batch norm with track_running"):
            make()


def test_freeze_batchnorm_copies_and_trains_with_batch_of_one():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2))
    frozen = freeze_batchnorm(model)
    assert len(batchnorm_layers(model)) == 1 and batchnorm_layers(frozen) == []
    stream = iter(lambda: (torch.randn(1, 4), torch.tensor([1])), None)
    losses = train_on_stream(frozen, stream, 5, 0.1)
    assert len(losses) == 5
    assert isinstance(model[1], nn.BatchNorm1d)


# --- the notebook's experiments, other seeds ------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_forgetting_eval(data, seed):
    r = forgetting_eval(data, seed)
    assert r["eval mode"] > 0.93
    assert r["train mode, batch 64"] > r["eval mode"] - 0.03
    assert r["train mode, batch 8"] < r["eval mode"] - 0.04
    assert r["train mode, batch 2"] < r["eval mode"] - 0.25
    assert r["train mode, one class per batch"] < 0.2
    assert r["train mode, one class per batch"] < min(r[f"train mode, batch {n}"] for n in (64, 8, 2))  # worst
    assert "more than 1 value per channel" in r["batch 1 error"]


@pytest.mark.parametrize("seed", SEEDS + [4])
def test_running_stat_lag(data, seed):
    r = running_stat_lag(data, seed)
    assert min(r["var_error"]) > 0.1
    assert r["precise_acc"] > r["ema_acc"] + 0.01
    assert r["precise_loss"] < r["ema_loss"]


@pytest.mark.parametrize("seed", SEEDS)
def test_running_stat_lag_is_harmless_with_defaults_or_longer_training(data, seed):
    default = running_stat_lag(data, seed, momentum=0.1, init_scale=None)
    assert max(default["var_error"]) < 0.1
    assert abs(default["precise_acc"] - default["ema_acc"]) < 0.01
    long = running_stat_lag(data, seed, momentum=0.01, init_scale=3.0, steps=400)
    assert abs(long["precise_acc"] - long["ema_acc"]) < 0.01


@pytest.mark.parametrize("seed", SEEDS)
def test_non_iid_training(data, seed):
    r = non_iid_training(data, seed)
    for norm in ("none", "layer"):
        assert r[(norm, "one class")] > r[(norm, "shuffled")] - 0.05
    assert r[("batch", "shuffled")] > 0.93
    assert r[("batch", "one class")] < 0.2


@pytest.mark.parametrize("seed", SEEDS + [4, 5])
def test_fine_tuning_shifted(data, seed):
    r = fine_tuning_shifted(data, seed)
    assert min(r["BN live, batch 10"], r["BN frozen, batch 10"]) > r["no fine-tuning"] + 0.015
    assert r["statistics only"] >= max(r.values()) - 0.01
    assert r["BN frozen, batch 2"] > r["BN live, batch 2"] + 0.15
    assert r["BN live, batch 2"] < 0.7
    # frozen BN avoids the breakdown, but batches of 2 still cost
    assert r["BN frozen, batch 2"] > 0.65
    assert r["BN frozen, batch 2"] < r["BN frozen, batch 10"] - 0.05
    assert r["BN frozen, batch 2"] < r["no fine-tuning"] + 0.05


@pytest.mark.parametrize("seed", SEEDS)
def test_bn_placement(data, seed):
    r = bn_placement(data, seed)
    assert min(r.values()) > 0.93 and abs(r["before"] - r["after"]) < 0.03


def test_frozen_batchnorm_rejects_what_is_not_a_batchnorm():
    for bad, name in ((None, "NoneType"), (nn.ReLU(), "ReLU")):
        with pytest.raises(TypeError, match=f"FrozenBatchNorm: expected a batch-norm layer .*got {name}"):
            FrozenBatchNorm(bad)


@pytest.mark.parametrize("bad", [None, [1.0, 2.0], "abc", torch.randn(4)], ids=["None", "list", "str", "tensor"])
def test_functions_taking_a_model_reject_a_non_module(bad):
    from bn_course.pitfalls import freeze_batchnorm, predict_in_train_mode, precise_bn_stats, train_on_stream
    name = type(bad).__name__
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    calls = {
        "batchnorm_layers": lambda: batchnorm_layers(bad),
        "freeze_batchnorm": lambda: freeze_batchnorm(bad),
        "predict_in_train_mode": lambda: predict_in_train_mode(bad, x, 4),
        "precise_bn_stats": lambda: precise_bn_stats(bad, x),
        "train_on_stream": lambda: train_on_stream(bad, iter([(x, y)]), 1, 0.1),
    }
    for where, call in calls.items():
        with pytest.raises(TypeError, match=rf"^{where}: model must be a torch.nn.Module .*got {name}\."):
            call()

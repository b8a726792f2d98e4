"""bn_course.norms against torch.nn: outputs, gradients, buffers, and clear errors."""

import math
import re

import pytest
import torch
from torch import nn

from bn_course.norms import (BatchRenorm, GhostBatchNorm, GroupNorm, InstanceNorm, LayerNorm, group_norm,
                             instance_norm, layer_norm, standardize)

DTYPES = [torch.float32, torch.float64]


def torch_bn(C, rank, **kwargs):
    """nn.BatchNorm1d/2d/3d, whichever accepts an input of this rank."""
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank]
    return cls(C, **kwargs)


def tol(dtype):
    return {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-11}


def randomize_affine(*modules, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vals = None
        for m in modules:
            if m.weight is None:
                continue
            if vals is None:
                vals = (torch.randn(m.weight.shape, generator=g), torch.randn(m.weight.shape, generator=g))
            m.weight.copy_(vals[0])
            if m.bias is not None:
                m.bias.copy_(vals[1])


def compare(ours, theirs, x, dtype, seed=0):
    """Same output and same gradients (input, weight, bias) for a random upstream gradient."""
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    randomize_affine(ours, theirs, seed=seed)
    x1 = x.to(dtype).clone().requires_grad_(True)
    x2 = x.to(dtype).clone().requires_grad_(True)
    out1, out2 = ours(x1), theirs(x2)
    assert out1.dtype == dtype and out1.shape == out2.shape
    torch.testing.assert_close(out1, out2, **tol(dtype))
    dout = torch.randn(out1.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    out1.backward(dout)
    out2.backward(dout)
    torch.testing.assert_close(x1.grad, x2.grad, **tol(dtype))
    for name in ("weight", "bias"):
        p1, p2 = getattr(ours, name, None), getattr(theirs, name, None)
        if p2 is not None:
            torch.testing.assert_close(p1.grad, p2.grad, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,normalized", [((8, 10), (10,)), ((4, 3, 5), (5,)), ((4, 3, 6, 6), (3, 6, 6)),
                                              ((2, 3, 4, 5), (4, 5))])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_layer_norm_matches_torch(dtype, shape, normalized, affine, seed):
    torch.manual_seed(seed)
    x = torch.randn(shape) * 3 + 1
    compare(LayerNorm(normalized, elementwise_affine=affine), nn.LayerNorm(normalized, elementwise_affine=affine),
            x, dtype, seed)


def test_layer_norm_without_bias_and_int_shape():
    x = torch.randn(4, 7)
    compare(LayerNorm(7, bias=False), nn.LayerNorm(7, bias=False), x, torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups", [((8, 12), 3), ((4, 6, 10), 2), ((3, 8, 5, 5), 4), ((2, 8, 3, 3, 3), 8),
                                          ((2, 8, 4, 4), 1)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_group_norm_matches_torch(dtype, shape, groups, affine, seed):
    torch.manual_seed(seed)
    x = torch.randn(shape) * 2 - 1
    compare(GroupNorm(groups, shape[1], affine=affine), nn.GroupNorm(groups, shape[1], affine=affine), x, dtype, seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,torch_cls", [((4, 3, 10), nn.InstanceNorm1d), ((3, 4, 5, 6), nn.InstanceNorm2d),
                                             ((2, 3, 3, 4, 5), nn.InstanceNorm3d)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_instance_norm_matches_torch(dtype, shape, torch_cls, affine, seed):
    torch.manual_seed(seed)
    x = torch.randn(shape) + 2
    ours, theirs = InstanceNorm(shape[1], affine=affine), torch_cls(shape[1], affine=affine)
    compare(ours, theirs, x, dtype, seed)
    compare(ours.eval(), theirs.eval(), x, dtype, seed)  # no running stats: eval is the same


def test_the_family_is_one_step_over_different_axes():
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(group_norm(x, 1), layer_norm(x, (6, 5, 5)))
    torch.testing.assert_close(group_norm(x, 6), instance_norm(x))
    x_hat, mu, var = standardize(x, [0, 2, 3])
    torch.testing.assert_close(x_hat, nn.functional.batch_norm(x, None, None, training=True))
    assert mu.shape == var.shape == (1, 6, 1, 1)


def test_layer_and_group_norm_do_not_depend_on_the_rest_of_the_batch():
    x = torch.randn(5, 8, 3, 3)
    for f in (lambda t: group_norm(t, 4), lambda t: layer_norm(t, (8, 3, 3)), instance_norm):
        torch.testing.assert_close(f(x)[:1], f(x[:1]))


# --- Batch Renormalization -------------------------------------------------------------------

def with_running_stats(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.running_mean.copy_(torch.randn(module.num_features, generator=g))
        module.running_var.copy_(torch.rand(module.num_features, generator=g) * 2 + 0.2)
    return module


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(16, 5), (4, 5, 7), (3, 5, 4, 4)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_renorm_without_correction_is_batch_norm(dtype, shape, seed):
    """r_max = 1, d_max = 0: r = 1 and d = 0, so outputs, gradients and buffers are batch norm's."""
    torch.manual_seed(seed)
    ours = with_running_stats(BatchRenorm(5, r_max=1.0, d_max=0.0), seed).to(dtype)
    theirs = with_running_stats(torch_bn(5, len(shape)), seed).to(dtype)
    x = torch.randn(shape) * 2 + 1
    compare(ours, theirs, x, dtype, seed)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert int(ours.num_batches_tracked) == 1
    ours.eval(), theirs.eval()
    compare(ours, theirs, x, dtype, seed)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_renorm_unclipped_trains_with_the_inference_transform(seed):
    """With r and d inside their limits, the forward value equals the eval-mode map."""
    torch.manual_seed(seed)
    m = with_running_stats(BatchRenorm(5, r_max=1e6, d_max=1e6), seed).double()
    randomize_affine(m, seed=seed)
    x = torch.randn(32, 5, dtype=torch.float64) * 1.5 + 0.3
    mu, var = m.running_mean.clone(), m.running_var.clone()
    expected = (x - mu) / torch.sqrt(var + m.eps) * m.weight + m.bias
    torch.testing.assert_close(m(x), expected)


@pytest.mark.parametrize("seed", [0, 1])
def test_batch_renorm_gradient_treats_r_and_d_as_constants(seed):
    torch.manual_seed(seed)
    m = with_running_stats(BatchRenorm(4, r_max=1.5, d_max=0.5), seed).double()
    x = (torch.randn(10, 4, 3, dtype=torch.float64) * 3).requires_grad_(True)
    mu0, var0 = m.running_mean.clone(), m.running_var.clone()
    out = m(x)
    # reference written out by hand, r and d detached and clipped
    var_B, mu_B = torch.var_mean(x, dim=[0, 2], keepdim=True, correction=0)
    sigma_B = torch.sqrt(var_B + m.eps)
    sigma = torch.sqrt(var0.reshape(1, -1, 1) + m.eps)
    r = (sigma_B / sigma).detach().clamp(1 / 1.5, 1.5)
    d = ((mu_B - mu0.reshape(1, -1, 1)) / sigma).detach().clamp(-0.5, 0.5)
    ref = ((x - mu_B) / sigma_B * r + d) * m.weight.reshape(1, -1, 1) + m.bias.reshape(1, -1, 1)
    torch.testing.assert_close(out, ref)
    dout = torch.randn(out.shape, dtype=torch.float64)
    gx, = torch.autograd.grad(out, x, dout, retain_graph=True)
    gx_ref, = torch.autograd.grad(ref, x, dout)
    torch.testing.assert_close(gx, gx_ref)
    assert ((r > 1 / 1.5) & (r < 1.5)).any() or (d.abs() == 0.5).any()  # the clip is exercised or r is free


def test_batch_renorm_bad_limits():
    for kwargs in ({"r_max": 0.5}, {"d_max": -1.0}, {"r_max": "3"}, {"d_max": None}, {"r_max": math.inf},
                   {"d_max": math.nan}, {"r_max": True}):
        with pytest.raises(ValueError, match=r"^BatchRenorm needs numbers r_max >= 1 and d_max >= 0 \(finite\)"):
            BatchRenorm(3, **kwargs)
    assert BatchRenorm(3, r_max=torch.tensor(2.0), d_max=1).r_max == 2.0  # any real number is fine


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
def test_batch_renorm_computes_low_precision_input_in_float32(low):
    """Like BatchNorm (and nn.BatchNorm1d): float16/bfloat16 in, float32 inside, input dtype out."""
    x = (torch.randn(16, 4, generator=torch.Generator().manual_seed(0)) * 2 + 1).to(low)
    ours, reference = with_running_stats(BatchRenorm(4), 0), with_running_stats(BatchRenorm(4), 0)
    out = ours(x)
    assert out.dtype == low
    torch.testing.assert_close(out, reference(x.float()).to(low))
    torch.testing.assert_close(ours.running_var, reference.running_var)
    with pytest.raises(TypeError, match=r"dtype torch.float64.*x.to\(torch.float32\)"):
        BatchRenorm(4)(x.double())


# --- Ghost Batch Normalization --------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,ghost", [((32, 6), 8), ((30, 6), 8), ((12, 6, 4, 4), 4), ((7, 6, 3), 7)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_bn_is_batch_norm_on_each_chunk_in_turn(dtype, shape, ghost, momentum):
    torch.manual_seed(0)
    ours = GhostBatchNorm(6, ghost_batch_size=ghost, momentum=momentum).to(dtype)
    theirs = torch_bn(6, len(shape), momentum=momentum).to(dtype)
    randomize_affine(ours, theirs)
    x = (torch.randn(shape) * 2 + 0.5).to(dtype)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out1 = ours(x1)
    out2 = torch.cat([theirs(c) for c in torch.split(x2, ghost)])
    torch.testing.assert_close(out1, out2, **tol(dtype))
    dout = torch.randn(shape, dtype=dtype)
    out1.backward(dout), out2.backward(dout)
    torch.testing.assert_close(x1.grad, x2.grad, **tol(dtype))
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **tol(dtype))
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, **tol(dtype))
    torch.testing.assert_close(ours.running_var, theirs.running_var, **tol(dtype))
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), **tol(dtype))


def test_ghost_bn_with_one_ghost_batch_is_batch_norm():
    x = torch.randn(16, 3)
    ours, theirs = GhostBatchNorm(3, ghost_batch_size=16), nn.BatchNorm1d(3)
    torch.testing.assert_close(ours(x), theirs(x))


def test_ghost_bn_checks_every_ghost_batch_up_front():
    """The error names the learner's input and the ghost batch, not an internal chunk."""
    with pytest.raises(ValueError, match=r"every ghost batch.*shape \(33, 4\).*33 % 32 = 1 sample"):
        GhostBatchNorm(4, ghost_batch_size=32)(torch.randn(33, 4))
    with pytest.raises(ValueError, match=r"every ghost batch.*shape \(8, 4\).*ghost_batch_size = 1 sample"):
        GhostBatchNorm(4, ghost_batch_size=1)(torch.randn(8, 4))
    layer = GhostBatchNorm(4, ghost_batch_size=1)  # one sample, but 3 values per channel: fine
    assert layer(torch.randn(8, 4, 3)).shape == (8, 4, 3) and int(layer.num_batches_tracked) == 8
    assert GhostBatchNorm(4, ghost_batch_size=32).eval()(torch.randn(33, 4)).shape == (33, 4)
    for bad in (-2, 0, 2.7, True, "4", None):
        with pytest.raises(ValueError, match=rf"^GhostBatchNorm: ghost_batch_size must be a positive integer "
                                             rf"\(samples per ghost batch\), got {re.escape(repr(bad))}\."):
            GhostBatchNorm(4, ghost_batch_size=bad)


# --- bad input ---------------------------------------------------------------------------------

def test_bad_input_is_rejected_clearly():
    with pytest.raises(ValueError, match="num_groups=3 must divide num_channels=8"):
        GroupNorm(3, 8)
    with pytest.raises(ValueError, match="num_groups=3 must divide num_channels=8"):
        group_norm(torch.randn(2, 8), 3)
    with pytest.raises(ValueError, match="built for 8 channels.*5 channels"):
        GroupNorm(4, 8)(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        GroupNorm(2, 4)(torch.randn(4))
    with pytest.raises(TypeError, match="floating-point.*torch.int64"):
        GroupNorm(2, 4)(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="more than 1 value per group"):
        GroupNorm(4, 4)(torch.randn(3, 4))

    with pytest.raises(ValueError, match=r"last 1 dimensions must equal normalized_shape=\(6,\)"):
        LayerNorm(6)(torch.randn(3, 5))
    with pytest.raises(TypeError, match="floating-point.*torch.int32"):
        LayerNorm(6)(torch.ones(3, 6, dtype=torch.int32))
    with pytest.raises(ValueError, match="normalized_shape"):
        LayerNorm((3, 6))(torch.randn(6))

    with pytest.raises(ValueError, match="at least 3 dimensions"):
        InstanceNorm(4)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="built for 4 channels"):
        InstanceNorm(4)(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="more than 1 value per sample and channel"):
        InstanceNorm(4)(torch.randn(2, 4, 1))
    with pytest.raises(TypeError, match="floating-point"):
        InstanceNorm(4)(torch.ones(2, 4, 5, dtype=torch.int64))

    for cls in (BatchRenorm, GhostBatchNorm):
        with pytest.raises(ValueError, match="channel"):
            cls(4)(torch.randn(8, 3))
        with pytest.raises(ValueError, match="at least 2 dimensions"):
            cls(4)(torch.randn(4))
        with pytest.raises(TypeError, match="floating-point"):
            cls(4)(torch.ones(8, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchRenorm(4)(torch.randn(1, 4))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        GhostBatchNorm(4, ghost_batch_size=4)(torch.randn(9, 4))  # the last ghost batch has 1 sample
    with pytest.raises(ValueError, match="ghost_batch_size must be a positive integer"):
        GhostBatchNorm(4, ghost_batch_size=0)


def test_layer_norm_checks_gamma_and_beta_shapes():
    x = torch.randn(4, 6, 5, 5)
    for bad in (torch.ones(5), torch.ones(6)):
        with pytest.raises(ValueError, match=r"gamma must have shape \(6, 5, 5\).*got shape \(%d,\)" % len(bad)):
            layer_norm(x, (6, 5, 5), bad, torch.zeros(6, 5, 5))
    with pytest.raises(ValueError, match=r"beta must have shape \(6, 5, 5\).*got shape \(5,\)"):
        layer_norm(x, (6, 5, 5), torch.ones(6, 5, 5), torch.zeros(5))
    with pytest.raises(TypeError, match="gamma must be a torch.Tensor"):
        layer_norm(x, (6, 5, 5), 1.0)
    # an int normalized_shape is the last dim, as in torch
    gamma, beta = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(layer_norm(x, 5, gamma, beta), nn.functional.layer_norm(x, (5,), gamma, beta))


@pytest.mark.parametrize("f", [lambda x, g, b: group_norm(x, 3, g, b), instance_norm])
def test_group_and_instance_norm_check_gamma_and_beta_shapes(f):
    x = torch.randn(4, 6, 5, 5)
    with pytest.raises(ValueError, match=r"beta must have shape \(6,\).*C=6 channels.*got shape \(5,\)"):
        f(x, torch.ones(6), torch.zeros(5))
    with pytest.raises(ValueError, match=r"gamma must have shape \(6,\).*got shape \(5,\)"):
        f(x, torch.ones(5), torch.zeros(6))
    with pytest.raises(ValueError, match=r"gamma must have shape \(6,\).*got shape \(1, 6, 1, 1\)"):
        f(x, torch.ones(1, 6, 1, 1), None)


@pytest.mark.parametrize("ours,theirs,shape", [
    (LayerNorm(6), nn.LayerNorm(6), (3, 6)),
    (GroupNorm(3, 6), nn.GroupNorm(3, 6), (3, 6, 4)),
    (InstanceNorm(6, affine=True), nn.InstanceNorm1d(6, affine=True), (3, 6, 4)),
])
def test_dtypes_as_in_torch(ours, theirs, shape):
    """bfloat16 input with float32 parameters: computed in float32, returned as bfloat16;
    float64 input with float32 parameters: an error (torch raises too)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    out = ours(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, theirs(x.bfloat16()))
    with pytest.raises(TypeError, match=r"gamma has dtype torch.float32 but the input has dtype torch.float64"):
        ours(x.double())


def test_layer_norm_of_one_value_is_rejected_like_group_norm():
    with pytest.raises(ValueError, match="more than 1 value per sample"):
        LayerNorm(1)(torch.randn(3, 1))


# --- the experiments of notebook 09, other seeds ------------------------------------------------

from bn_course.data import load_digits_split  # noqa: E402
from bn_course.norms import batch_size_sweep, cnn_small_batch, hard_batches, replace_batchnorm, train_mlp  # noqa: E402

SEEDS = [1, 2, 3]


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)
    return load_digits_split()


def test_replace_batchnorm():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    replace_batchnorm(model, lambda C: BatchRenorm(C))
    assert isinstance(model[1], BatchRenorm) and isinstance(model[2][1], BatchRenorm)


@pytest.mark.parametrize("seed", SEEDS)
def test_batch_size_sweep_bn_collapses_at_batch_2(data, seed):
    rows = batch_size_sweep(data, seeds=(seed,), batch_sizes=(2, 16, 32, 64, 128), progress=False)
    acc = {(r["norm"], r["batch_size"]): r["final_accuracy"] for r in rows}
    assert acc[("batch", 2)] < 0.7
    assert acc[("batch", 2)] < acc[("layer", 2)] - 0.25 and acc[("batch", 2)] < acc[("group", 2)] - 0.25
    assert min(acc[("layer", 2)], acc[("group", 2)]) > 0.8
    for b in (16, 32, 64, 128):  # from batch 16 up, the three within 3 points
        assert abs(acc[("batch", b)] - acc[("layer", b)]) < 0.03 and abs(acc[("group", b)] - acc[("layer", b)]) < 0.03
        at_b = [acc[(n, b)] for n in ("batch", "group", "layer")]
        assert max(at_b) - min(at_b) < 0.03  # all three within 3 points of each other, as notebook 09 checks
    best_large = max(acc[(n, 128)] for n in ("batch", "group", "layer"))
    assert min(acc[("batch", b)] for b in (16, 32, 64, 128)) > best_large - 0.03
    # from batch 128 to batch 2, LayerNorm and GroupNorm lose less than half of what BN loses
    loss = {n: acc[(n, 128)] - acc[(n, 2)] for n in ("batch", "group", "layer")}
    assert max(loss["layer"], loss["group"]) < 0.5 * loss["batch"], loss


@pytest.mark.parametrize("seed", SEEDS)
def test_cnn_hides_small_batches(data, seed):
    run = cnn_small_batch(data, seed)
    mlp_bn = batch_size_sweep(data, seeds=(seed,), batch_sizes=(2,), norms=("batch",), progress=False)[0]
    assert run["values_per_channel"] == [128, 32]
    assert run["accuracy"] > 0.75 and run["accuracy"] > mlp_bn["final_accuracy"] + 0.15
    # ... but does not remove it: batch 2 costs the CNN more than 5 points against batch 128
    large = cnn_small_batch(data, seed, batch_size=128)
    assert run["accuracy"] < large["accuracy"] - 0.05, (run["accuracy"], large["accuracy"])


@pytest.mark.parametrize("seed", SEEDS)
def test_hard_batches(data, seed):
    hard = hard_batches(data, seed, norms=("batch", "renorm", "group", "layer"))
    assert hard[("renorm", "batch 2")] > hard[("batch", "batch 2")] + 0.08
    assert hard[("renorm", "one class")] > hard[("batch", "one class")] + 0.15
    for c in ("batch 2", "one class"):
        assert hard[("group", c)] > hard[("renorm", c)] + 0.05
    assert hard[("group", "one class")] > 0.9
    assert hard[("layer", "one class")] > max(0.9, hard[("batch", "one class")] + 0.5, hard[("renorm", "one class")] + 0.05)
    assert min(hard[(n, "batch 4")] for n in ("batch", "renorm", "group", "layer")) > 0.85
    assert abs(hard[("renorm", "batch 4")] - hard[("group", "batch 4")]) < 0.05


def test_renorm_and_group_norm_trade_places_at_batch_4(data):
    """Notebook 09: at batch 4, which of Batch Renorm and GroupNorm is ahead changes with the seed."""
    ahead = {seed: train_mlp(data, "renorm", 4, seed).final_accuracy > train_mlp(data, "group", 4, seed).final_accuracy
             for seed in SEEDS}
    assert len(set(ahead.values())) == 2, ahead


def test_hard_batches_reuses_known_runs(data):
    """Runs already made by batch_size_sweep (same seed, steps, lr) give the same accuracy and are reused."""
    sweep = batch_size_sweep(data, seeds=(0,), batch_sizes=(4,), norms=("group",), steps=50, progress=False)
    known = {(r["norm"], r["batch_size"]): r["final_accuracy"] for r in sweep}
    fresh = hard_batches(data, seed=0, steps=50, small_batches=(4,), norms=("group",))
    reused = hard_batches(data, seed=0, steps=50, small_batches=(4,), norms=("group",), known={("group", 4): -1.0})
    assert fresh[("group", "batch 4")] == known[("group", 4)]
    assert reused[("group", "batch 4")] == -1.0 and reused[("group", "one class")] == fresh[("group", "one class")]


def test_sizes_and_inputs_get_clear_errors():
    from bn_course.norms import check_groups, layer_norm, standardize
    for bad in (None, 2.5, "4", 0, -4, True):
        with pytest.raises(ValueError, match=f"num_channels must be a positive integer .*got {bad!r}"):
            check_groups(2, bad)
        with pytest.raises(ValueError, match=f"num_channels must be a positive integer .*got {bad!r}"):
            GroupNorm(2, bad)
    for bad in (None, 2.5, "ab"):
        with pytest.raises(ValueError, match="num_groups must be a positive integer that divides num_channels=4"):
            check_groups(bad, 4)
    for bad in (None, 2.5, (4.0,), (), (-1,), [[1, 2]]):
        with pytest.raises(ValueError, match=r"normalized_shape must be a positive integer or a non-empty tuple"):
            LayerNorm(bad)
        with pytest.raises(ValueError, match=r"layer_norm: normalized_shape must be a positive integer"):
            layer_norm(torch.randn(2, 4), bad)
    with pytest.raises(ValueError, match=r"group_norm\(num_groups=2\): got an empty input, shape \(0, 4\)"):
        group_norm(torch.zeros(0, 4), 2)
    with pytest.raises(TypeError, match="standardize input must be a floating-point tensor, got dtype torch.int64"):
        standardize(torch.ones(3, 4, dtype=torch.int64), [0])
    # the int and tuple forms still agree, and a torch.Size is accepted
    x = torch.randn(3, 4)
    torch.testing.assert_close(layer_norm(x, 4), layer_norm(x, torch.Size([4])))
    assert LayerNorm([4]).normalized_shape == (4,)


def test_bad_constructor_arguments_and_models_raise_clear_errors():
    from bn_course.norms import instance_norm, layer_norm, replace_batchnorm
    for bad in (None, [4], "4", 0, -1, 2.5, True):
        with pytest.raises(ValueError, match=r"^num_features must be a positive integer"):
            InstanceNorm(bad)
    eps_users = [(r"^GroupNorm: ", lambda eps: GroupNorm(2, 4, eps=eps)),
                 (r"^InstanceNorm: ", lambda eps: InstanceNorm(4, eps=eps)),
                 (r"^LayerNorm: ", lambda eps: LayerNorm(4, eps=eps)),
                 ("", lambda eps: group_norm(torch.randn(8, 4), 2, eps=eps)),
                 ("", lambda eps: layer_norm(torch.randn(8, 4), 4, eps=eps)),
                 ("", lambda eps: instance_norm(torch.randn(8, 4, 3), eps=eps))]
    for bad in (None, [1e-5], "abc", -1, 0, float("nan"), float("inf")):
        for prefix, make in eps_users:
            with pytest.raises(ValueError, match=prefix + "eps must be a positive number"):
                make(bad)
    bool_options = {r"^GroupNorm: affine": lambda v: GroupNorm(2, 4, affine=v),
                    r"^InstanceNorm: affine": lambda v: InstanceNorm(4, affine=v),
                    r"^LayerNorm: elementwise_affine": lambda v: LayerNorm(4, elementwise_affine=v),
                    r"^LayerNorm: bias": lambda v: LayerNorm(4, bias=v)}
    for bad in (None, [True], "abc", 1, 0, 2):
        for option, make in bool_options.items():
            with pytest.raises(TypeError, match=option + " must be True or False"):
                make(bad)
    for bad in (None, [1.0, 2.0], "abc", torch.randn(4)):
        with pytest.raises(TypeError, match=rf"^replace_batchnorm: model must be a torch.nn.Module .*got {type(bad).__name__}\."):
            replace_batchnorm(bad, lambda C: BatchRenorm(C))
    with pytest.raises(TypeError, match=r"^replace_batchnorm: make must be a function num_features -> module"):
        replace_batchnorm(nn.Sequential(nn.BatchNorm1d(4)), None)


def test_standardize_rejects_a_bad_eps():
    from bn_course.norms import standardize
    for bad in (None, [1e-5], "abc", -1.0, 0, float("nan")):
        with pytest.raises(ValueError, match=r"^standardize: eps must be a positive number"):
            standardize(torch.randn(8, 4), [0], eps=bad)


# --- gaps: Batch Renorm's gradient with r and d free, Renorm and Ghost BN options against torch ---

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_renorm_gradient_with_r_and_d_inside_their_limits(seed):
    """With r and d unclipped, out = gamma * (x - running_mean) / s_run + beta in value, but the gradient
    is batch norm's times r (r, d constants), not gamma / s_run * dout. (In
    test_batch_renorm_gradient_treats_r_and_d_as_constants every r is clipped, where clamp has zero
    gradient, so a gradient flowing through r could not show there.)"""
    torch.manual_seed(seed)
    m = with_running_stats(BatchRenorm(5, r_max=1e6, d_max=1e6), seed).double()
    randomize_affine(m, seed=seed)
    theirs = torch_bn(5, 3).double()
    theirs.load_state_dict(m.state_dict())
    x = torch.randn(8, 5, 3, dtype=torch.float64) * 1.5 + 0.3
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    var_B = x.var(dim=(0, 2), correction=0)
    r = torch.sqrt(var_B + m.eps) / torch.sqrt(m.running_var + m.eps)
    assert float((r - 1).abs().min()) > 0.01  # r is not 1 in any channel: the checks below can fail
    dout = torch.randn(x.shape, dtype=torch.float64)
    m(x1).backward(dout)
    theirs(x2).backward(dout)  # batch norm, same gamma
    torch.testing.assert_close(x1.grad, x2.grad * r.reshape(1, -1, 1), rtol=1e-10, atol=1e-12)
    inference_grad = dout * (m.weight / torch.sqrt(m.running_var.detach() + m.eps)).reshape(1, -1, 1)
    assert not torch.allclose(x1.grad, inference_grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("options", [{"affine": False}, {"momentum": None}, {"momentum": 0.5}], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_renorm_and_ghost_bn_options_match_torch(dtype, options):
    """affine=False and the cumulative average (momentum=None), over several steps, then eval mode."""
    torch.manual_seed(0)
    renorm = BatchRenorm(5, r_max=1.0, d_max=0.0, **options).to(dtype)
    ghost = GhostBatchNorm(5, ghost_batch_size=4, **options).to(dtype)
    reference = {name: torch_bn(5, 3, **options).to(dtype) for name in ("renorm", "ghost")}
    for step in range(3):
        x = (torch.randn(10, 5, 3) * 2 + step).to(dtype)  # 10 = 4 + 4 + 2: a smaller last ghost batch
        torch.testing.assert_close(renorm(x), reference["renorm"](x), **tol(dtype))
        torch.testing.assert_close(ghost(x), torch.cat([reference["ghost"](c) for c in torch.split(x, 4)]),
                                   **tol(dtype))
    for ours, name in ((renorm, "renorm"), (ghost, "ghost")):
        theirs = reference[name]
        assert (ours.weight is None) == (theirs.weight is None)
        for buffer in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ours, buffer), getattr(theirs, buffer), **tol(dtype))
        x = (torch.randn(1, 5, 3) + 1).to(dtype)
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), **tol(dtype))


# --- gaps: float16/bfloat16 outputs and gradients against torch.nn, for LayerNorm, GroupNorm, InstanceNorm ---

LOW_PRECISION = [torch.float16, torch.bfloat16]
HALF_CASES = [  # (id, ours, torch's, input shape); eps=0.1 so that where eps goes shows above the rounding
    ("layer_norm_last_dim", lambda: LayerNorm(6, eps=0.1), lambda: nn.LayerNorm(6, eps=0.1), (8, 6)),
    ("layer_norm_chw", lambda: LayerNorm((6, 4, 5), eps=0.1), lambda: nn.LayerNorm((6, 4, 5), eps=0.1), (3, 6, 4, 5)),
    ("group_norm_3d", lambda: GroupNorm(3, 6, eps=0.1), lambda: nn.GroupNorm(3, 6, eps=0.1), (3, 6, 4)),
    ("group_norm_4d", lambda: GroupNorm(2, 6, eps=0.1), lambda: nn.GroupNorm(2, 6, eps=0.1), (3, 6, 4, 5)),
    ("instance_norm_1d", lambda: InstanceNorm(6, eps=0.1, affine=True),
     lambda: nn.InstanceNorm1d(6, eps=0.1, affine=True), (3, 6, 10)),
    ("instance_norm_2d", lambda: InstanceNorm(6, eps=0.1, affine=True),
     lambda: nn.InstanceNorm2d(6, eps=0.1, affine=True), (3, 6, 4, 5)),
    ("instance_norm_3d", lambda: InstanceNorm(6, eps=0.1, affine=True),
     lambda: nn.InstanceNorm3d(6, eps=0.1, affine=True), (2, 6, 3, 4, 5)),
]


def out_and_grads(layer, x, dout):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    return [out.detach(), *torch.autograd.grad(out, (x, layer.weight, layer.bias), dout)]


@pytest.mark.parametrize("params", ["float32", "input"], ids=["float32_params", "params_in_input_dtype"])
@pytest.mark.parametrize("low", LOW_PRECISION, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("make_ours,make_theirs,shape", [c[1:] for c in HALF_CASES], ids=[c[0] for c in HALF_CASES])
def test_half_precision_outputs_and_gradients_match_torch(make_ours, make_theirs, shape, low, params):
    """float16/bfloat16 input with float32 parameters (mixed precision) or with parameters in the input's dtype
    (module.to(low)); torch supports both on the CPU and computes in float32, rounding the result once.
    out and dx come back in the input's dtype, dweight and dbias in the parameters'.

    Tolerance: 2 units of the input dtype's rounding (eps = 2**-10 or 2**-7) times the largest |value| of the
    quantity, and the same against the exact (float64) answer. Not assert_close's float32 default even for
    float32 parameters: torch's CPU backward rounds intermediate values (x_hat, dout * x_hat) to the input's
    dtype, so its float32 dweight and dbias are up to one such unit off the exact values (ours are not)."""
    eps = torch.finfo(low).eps
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        ours, theirs, exact = make_ours(), make_theirs(), make_theirs().double()
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5, generator=g)
            ours.bias.normal_(generator=g)
        theirs.load_state_dict(ours.state_dict())
        exact.load_state_dict(ours.state_dict())
        if params == "input":
            ours, theirs = ours.to(low), theirs.to(low)
        x = (torch.randn(shape, generator=g) * 3 + 2).to(low)
        dout = torch.randn(shape, generator=g).to(low)
        got, expected = out_and_grads(ours, x, dout), out_and_grads(theirs, x, dout)
        reference = out_and_grads(exact, x.double(), dout.double())
        param_dtype = torch.float32 if params == "float32" else low
        for name, a, b, r, dtype in zip(("out", "dx", "dweight", "dbias"), got, expected, reference,
                                        (low, low, param_dtype, param_dtype)):
            assert a.dtype == b.dtype == dtype, (name, a.dtype, b.dtype)
            unit = eps * r.abs().max().item()
            for what, target in (("torch", b), ("float64", r)):
                err = (a.double() - target.double()).abs().max().item()
                assert err <= 2 * unit, f"seed {seed}, {name} vs {what}: {err:.3g} > 2 units = {2 * unit:.3g}"


@pytest.mark.parametrize("params", [None, torch.float16, torch.float32], ids=["no_params", "float16", "float32"])
def test_float16_with_a_std_above_256_matches_torch(params):
    """A float16 variance overflows past 65504 (a std of 256): computed in float16, x_hat was
    (x - mu) * rsqrt(inf) = 0 and the output silently beta. torch computes in float32, so must we,
    also without parameters or with float16 ones. The functional forms, against torch.nn.functional
    in float16 and in float64, to 2 units of float16 rounding (2**-10) of the largest |out| (torch's
    float16 instance_norm is itself one unit off the float64 answer here; layer_norm and group_norm agree
    with it exactly)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 6, 8, generator=g) * 400 + 100).half()
    gamma = beta = gamma_ln = beta_ln = None
    if params is not None:
        gamma, beta = torch.rand(6, generator=g).to(params) + 0.5, torch.randn(6, generator=g).to(params)
        gamma_ln, beta_ln = torch.rand(6, 8, generator=g).to(params) + 0.5, torch.randn(6, 8, generator=g).to(params)
    F = nn.functional

    def double(*ts):
        return [None if t is None else t.double() for t in ts]

    for name, ours, theirs, exact in (
            ("layer_norm", layer_norm(x, (6, 8), gamma_ln, beta_ln), F.layer_norm(x, (6, 8), gamma_ln, beta_ln),
             F.layer_norm(*double(x), (6, 8), *double(gamma_ln, beta_ln))),
            ("group_norm", group_norm(x, 2, gamma, beta), F.group_norm(x, 2, gamma, beta),
             F.group_norm(*double(x), 2, *double(gamma, beta))),
            ("instance_norm", instance_norm(x, gamma, beta), F.instance_norm(x, weight=gamma, bias=beta),
             F.instance_norm(*double(x), *double(None, None, gamma, beta)))):
        assert ours.dtype == torch.float16 and theirs.isfinite().all()
        unit = torch.finfo(torch.float16).eps * exact.abs().max().item()
        for what, target in (("torch", theirs), ("float64", exact)):
            err = (ours.double() - target.double()).abs().max().item()
            assert err <= 2 * unit, f"{name} vs {what}: {err:.3g} > 2 units = {2 * unit:.3g}"

"""bn_course.fold: folding eval-mode batch norm into the conv or linear layer before it."""

import copy

import pytest
import torch
from torch import nn

from bn_course.fold import (benchmark_folding, bn_scale_shift, count_batchnorms, fold_batchnorm, fold_sequential,
                            format_table, small_cnn)
from bn_course.torch_bn import BatchNorm


def trained_like_bn(bn_cls, C, seed, dtype=torch.float32, affine=True):
    """A batch norm with non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    bn = bn_cls(C, affine=affine).to(dtype)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(C, generator=g, dtype=dtype))
        bn.running_var.copy_(torch.rand(C, generator=g, dtype=dtype) * 3 + 0.05)
        if affine:
            bn.weight.copy_(torch.randn(C, generator=g, dtype=dtype))
            bn.bias.copy_(torch.randn(C, generator=g, dtype=dtype))
    return bn.eval()


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


LAYERS = [
    ("linear", lambda b: nn.Linear(12, 6, bias=b), (5, 12), nn.BatchNorm1d),
    ("conv1d", lambda b: nn.Conv1d(4, 6, 3, bias=b), (3, 4, 10), nn.BatchNorm1d),
    ("conv2d", lambda b: nn.Conv2d(4, 6, 3, padding=1, bias=b), (3, 4, 7, 7), nn.BatchNorm2d),
    ("conv2d_strided", lambda b: nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=b), (3, 4, 9, 9), nn.BatchNorm2d),
    ("conv2d_grouped", lambda b: nn.Conv2d(4, 6, 3, groups=2, bias=b), (3, 4, 6, 6), nn.BatchNorm2d),
    ("conv2d_depthwise", lambda b: nn.Conv2d(6, 6, 3, groups=6, dilation=2, padding=2, bias=b),
     (2, 6, 8, 8), nn.BatchNorm2d),
    ("conv2d_reflect", lambda b: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", bias=b),
     (2, 4, 5, 5), nn.BatchNorm2d),
    ("conv3d", lambda b: nn.Conv3d(4, 6, 3, stride=(1, 2, 1), bias=b), (2, 4, 5, 6, 5), nn.BatchNorm3d),
]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("name,make,shape,bn_cls", LAYERS, ids=[row[0] for row in LAYERS])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_folded_equals_layer_then_bn_in_eval(name, make, shape, bn_cls, bias, seed):
    torch.manual_seed(seed)
    layer = make(bias).eval()
    bn = trained_like_bn(bn_cls, 6, seed)
    before_layer, before_bn = state(layer), state(bn)
    folded = fold_batchnorm(layer, bn)
    x = torch.randn(shape)
    with torch.no_grad():
        expected = bn(layer(x))
        got = folded(x)
    assert type(folded) is type(layer)
    assert folded is not layer and not folded.training
    assert folded.bias is not None
    # float32 rounding: a few ulps of the output's magnitude
    tol = 8 * torch.finfo(torch.float32).eps * max(1.0, expected.abs().max().item())
    assert (got - expected).abs().max().item() <= tol
    # the originals are untouched (values and biasless-ness)
    for k, v in state(layer).items():
        assert torch.equal(v, before_layer[k])
    for k, v in state(bn).items():
        assert torch.equal(v, before_bn[k])
    assert (layer.bias is None) == (not bias)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float64_is_exact_to_float64_rounding_and_matches_torch_fusion(seed):
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 5, 3, groups=1, stride=2).double().eval()
    bn = trained_like_bn(nn.BatchNorm2d, 5, seed, dtype=torch.float64)
    x = torch.randn(4, 3, 9, 9, dtype=torch.float64)
    folded = fold_batchnorm(conv, bn)
    assert folded.weight.dtype == torch.float64
    with torch.no_grad():
        assert torch.allclose(folded(x), bn(conv(x)), rtol=0, atol=1e-12)
        reference = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
        assert torch.allclose(folded(x), reference(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_trained_cnn_first_conv_folds_to_a_few_float32_units(seed):
    """Notebook 08, folding a trained CNN's conv1 + norm1: within 4 units of float32 rounding."""
    import bn_course
    from bn_course.data import load_digits_split
    from bn_course.models import cnn
    from bn_course.train import train

    torch.set_num_threads(1)
    data = load_digits_split()
    bn_course.seed_everything(seed)
    model = cnn(channels=(16, 32), norm="batch")
    train(model, data, 150, 0.1, batch_size=60, seed=seed, progress=False, eval_every=150)
    model.eval()
    conv, bn = model.conv1, model.norm1
    images = data.x_test[:256].reshape(-1, 1, 8, 8)
    with torch.no_grad():
        a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        c = conv.bias if conv.bias is not None else torch.zeros_like(a)
        by_hand = nn.functional.conv2d(images, conv.weight * a.reshape(-1, 1, 1, 1),
                                       a * c + bn.bias - a * bn.running_mean, padding=conv.padding)
        expected = bn(conv(images))
        package = fold_batchnorm(conv, bn)(images)
    unit = torch.finfo(torch.float32).eps * expected.abs().max().item()
    assert (by_hand - expected).abs().max().item() < 4 * unit
    assert (package - expected).abs().max().item() < 4 * unit


def test_affine_false_and_course_batchnorm():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3).eval()
    for bn in (trained_like_bn(nn.BatchNorm2d, 4, 0, affine=False), trained_like_bn(BatchNorm, 4, 1)):
        x = torch.randn(2, 3, 6, 6)
        with torch.no_grad():
            assert torch.allclose(fold_batchnorm(conv, bn)(x), bn(conv(x)), atol=1e-5)


def test_course_batchnorm_without_bias():
    torch.manual_seed(0)
    layer = nn.Linear(3, 4).eval()
    bn = BatchNorm(4, bias=False)
    with torch.no_grad():
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2), bn.weight.normal_()
    bn.eval()
    x = torch.randn(5, 3)
    with torch.no_grad():
        assert torch.allclose(fold_batchnorm(layer, bn)(x), bn(layer(x)), atol=1e-5)


def test_folded_layer_is_a_trainable_independent_copy():
    conv, bn = nn.Linear(3, 4), trained_like_bn(nn.BatchNorm1d, 4, 0)
    folded = fold_batchnorm(conv, bn)
    assert folded.weight.requires_grad and folded.bias.requires_grad
    with torch.no_grad():
        folded.weight.zero_()
    assert conv.weight.abs().sum() > 0


def test_bn_in_training_mode_with_running_stats_still_folds_its_eval_transform():
    conv, bn = nn.Conv1d(2, 3, 1), trained_like_bn(nn.BatchNorm1d, 3, 0).train()
    folded = fold_batchnorm(conv, bn)
    bn.eval()
    x = torch.randn(4, 2, 5)
    with torch.no_grad():
        assert torch.allclose(folded(x), bn(conv(x)), atol=1e-5)


def test_errors_are_clear():
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match="no running statistics.*Re-create the batch norm with "
                                         r"track_running_stats=True.*then.*precise_bn_stats\(model, x_train\)"):
        fold_batchnorm(conv, nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="no running statistics"):
        fold_batchnorm(conv, BatchNorm(4, track_running_stats=False))
    with pytest.raises(ValueError, match="channel mismatch.*4 output channels.*num_features=5"):
        fold_batchnorm(conv, nn.BatchNorm2d(5))
    with pytest.raises(TypeError, match="ConvTranspose2d"):
        fold_batchnorm(nn.ConvTranspose2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(TypeError, match="LayerNorm"):
        fold_batchnorm(nn.Linear(3, 4), nn.LayerNorm(4))
    with pytest.raises(TypeError, match="lazy"):
        fold_batchnorm(nn.LazyConv2d(4, 3), nn.BatchNorm2d(4))


def test_fold_sequential_folds_every_pair_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = small_cnn()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    folded = fold_sequential(model)
    assert count_batchnorms(model) == 3 and count_batchnorms(folded) == 0
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_fold_sequential_skips_bn_without_running_stats():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False))
    assert count_batchnorms(fold_sequential(model)) == 1


def test_benchmark_runs_and_reports_tiny_error():
    rows = benchmark_folding(batch_sizes=(2, 16), repeats=5, seed=1)
    assert [r["batch_size"] for r in rows] == [2, 16]
    for r in rows:
        assert r["unfolded_ms"] > 0 and r["folded_ms"] > 0
        assert r["max_abs_error"] < 1e-4
    assert "speed-up" in format_table(rows)


# --- the exercise checker of notebook 08 -------------------------------------------------------

def _right_fold(W, c, gamma, beta, running_mean, running_var, eps):
    a = gamma / torch.sqrt(running_var + eps)
    return a[:, None] * W, a * (c - running_mean) + beta


def _run_checker(fn, capsys):
    from bn_course.checks import check_fold_linear
    ok = check_fold_linear(fn)
    return ok, capsys.readouterr().out


def test_fold_checker_passes_the_solution_and_the_package(capsys):
    ok, out = _run_checker(_right_fold, capsys)
    assert ok and out.startswith("Correct!")

    def with_package(W, c, gamma, beta, running_mean, running_var, eps):
        layer, bn = nn.Linear(W.shape[1], W.shape[0]).double(), nn.BatchNorm1d(W.shape[0], eps=eps).double()
        with torch.no_grad():
            layer.weight.copy_(W), layer.bias.copy_(c), bn.weight.copy_(gamma), bn.bias.copy_(beta)
            bn.running_mean.copy_(running_mean), bn.running_var.copy_(running_var)
        folded = fold_batchnorm(layer, bn.eval())
        return folded.weight.detach(), folded.bias.detach()

    assert _run_checker(with_package, capsys)[0]


def test_fold_checker_names_each_mistake_and_never_raises(capsys):
    from bn_course.checks import FOLD_B_MISTAKES, FOLD_W_MISTAKES, _fold

    def stub(*args):
        raise NotImplementedError

    ok, out = _run_checker(stub, capsys)
    assert not ok and "Not attempted yet" in out
    for index, mistakes in ((0, FOLD_W_MISTAKES), (1, FOLD_B_MISTAKES)):
        for label, _, options in mistakes:
            def wrong(W, c, g, b, m, v, eps, options=options, index=index):
                right = _fold(W, c, g, b, m, v, eps)
                return _fold(W, c, g, b, m, v, eps, **options) if index == 0 else (right[0],
                                                                                  _fold(W, c, g, b, m, v, eps, **options)[1])
            ok, out = _run_checker(wrong, capsys)
            assert not ok and label in out, (label, out)

    def in_place(W, c, gamma, beta, running_mean, running_var, eps):
        W_folded, b_folded = _right_fold(W, c, gamma, beta, running_mean, running_var, eps)
        W.copy_(W_folded)
        return W, b_folded

    def transposed(*args):
        W_folded, b_folded = _right_fold(*args)
        return W_folded.T, b_folded

    for fn, expected in ((in_place, "changed its inputs in place"), (transposed, "transposed"),
                         (lambda *args: _right_fold(*args)[0], "should return two tensors"),
                         (lambda *args: 1 / 0, "ZeroDivisionError"),
                         (lambda *args: ("a", "b"), "array of floats"), (3, "expected a function")):
        ok, out = _run_checker(fn, capsys)
        assert not ok and expected in out, (expected, out)


def test_batchnorm_helpers_reject_what_is_not_a_batchnorm():
    from bn_course.fold import bn_scale_shift, check_running_stats
    from bn_course.pitfalls import FrozenBatchNorm
    message = r"expected a batch-norm layer \(nn.BatchNorm1d/2d/3d or bn_course's BatchNorm\), got {}"
    for bad, name in ((None, "NoneType"), (nn.ReLU(), "ReLU"), (nn.LayerNorm(4), "LayerNorm")):
        with pytest.raises(TypeError, match="bn_scale_shift: " + message.format(name)):
            bn_scale_shift(bad)
        with pytest.raises(TypeError, match="fold_batchnorm: " + message.format(name)):
            check_running_stats(bad, "fold_batchnorm")
        with pytest.raises(TypeError, match="FrozenBatchNorm: " + message.format(name)):
            FrozenBatchNorm(bad)
    with pytest.raises(ValueError, match="has no running statistics"):
        bn_scale_shift(nn.BatchNorm1d(3, track_running_stats=False))


@pytest.mark.parametrize("bad", [None, [1.0, 2.0], "abc", torch.randn(4)], ids=["None", "list", "str", "tensor"])
def test_functions_taking_a_model_reject_a_non_module(bad):
    from bn_course.fold import small_cnn, time_pair
    name = type(bad).__name__
    with pytest.raises(TypeError, match=rf"^count_batchnorms: model must be a torch.nn.Module .*got {name}\."):
        count_batchnorms(bad)
    with pytest.raises(TypeError, match=rf"^fold_sequential: model must be a torch.nn.Module .*got {name}\."):
        fold_sequential(bad)
    model, x = small_cnn().eval(), torch.randn(2, 1, 8, 8)
    with pytest.raises(TypeError, match=rf"^time_pair: model_a must be a torch.nn.Module .*got {name}\."):
        time_pair(bad, model, x, repeats=1, warmup=0)
    with pytest.raises(TypeError, match=rf"^time_pair: model_b must be a torch.nn.Module .*got {name}\."):
        time_pair(model, bad, x, repeats=1, warmup=0)


def test_time_pair_rejects_a_non_tensor_input():
    from bn_course.fold import small_cnn, time_pair
    model = small_cnn().eval()
    with pytest.raises(TypeError, match=r"^time_pair: x must be a torch.Tensor .*got list\."):
        time_pair(model, model, [[1.0]], repeats=1, warmup=0)


# --- gaps: fold_sequential beyond small_cnn (nested containers, Linear and Conv1d, the course's
# BatchNorm, an nn.BatchNorm without bias), compared in float64 ---

def test_fold_sequential_folds_nested_linear_conv1d_and_course_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3), BatchNorm(4, dtype=torch.float32), nn.ReLU(),
        nn.Sequential(nn.Conv1d(4, 5, 1, bias=False), nn.BatchNorm1d(5, bias=False)),
        nn.Flatten(), nn.Linear(5 * 4, 6), nn.BatchNorm1d(6, eps=0.1),  # eps=0.1: using 1e-5 instead would show
        nn.BatchNorm1d(6),  # follows a batch norm, not a layer: kept
    ).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, BatchNorm)):
                m.running_mean.normal_(generator=g), m.running_var.uniform_(0.1, 2, generator=g)
                m.weight.normal_(generator=g)
                if m.bias is not None:
                    m.bias.normal_(generator=g)
    model.eval()
    folded = fold_sequential(model)
    assert count_batchnorms(model) == 4 and count_batchnorms(folded) == 1
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[3][1], nn.Identity)
    assert isinstance(folded[6], nn.Identity) and isinstance(folded[7], nn.BatchNorm1d)
    x = torch.randn(5, 2, 6, generator=g, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


def test_benchmark_folding_puts_the_thread_count_back():
    from bn_course.fold import benchmark_folding

    before = torch.get_num_threads()
    rows = benchmark_folding(batch_sizes=(2,), repeats=2, threads=1 if before != 1 else 2)
    assert torch.get_num_threads() == before
    assert rows[0]["batch_size"] == 2 and rows[0]["max_abs_error"] < 1e-5


# --- gaps: folding into float16/bfloat16 layers (batch norm in the same dtype or in float32) ---

def rounding_bound(layer, bn, x, carried=None):
    """Elementwise bound on |fold_batchnorm(layer, bn)(x) - bn(layer(x))| when layer is in float16/bfloat16.

    With a = gamma / sqrt(running_var + eps) and M = |a| * (|W| applied to |x|) + |a * c| + |beta - a * mu|
    (in float64): the folded layer rounds each folded weight (relative error <= eps/2, so <= eps/2 * M in
    the sum) and its output (<= eps/2 * M); the unfolded pair rounds z = layer(x) (<= eps/2 * |a z| <= eps/2 * M)
    and batch norm's output (<= eps/2 * M), a little more with the BN's own parameters in the low dtype.
    So 2 * eps * M, eps the dtype's machine epsilon (2**-10, 2**-7). ``carried``: an elementwise bound on
    the difference already in the input x, which the layer and batch norm multiply by |a| * |W|.
    """
    a, b = bn_scale_shift(bn)
    magnitudes = copy.deepcopy(layer).double()
    with torch.no_grad():
        magnitudes.weight.abs_()
        magnitudes.bias = None
        shape = (1, -1) + (1,) * (x.dim() - 2)
        c = layer.bias.double() if layer.bias is not None else torch.zeros_like(a)
        M = (magnitudes(x.double().abs()) * a.abs().reshape(shape) + (a * c).abs().reshape(shape)
             + b.abs().reshape(shape))
        bound = 2 * torch.finfo(layer.weight.dtype).eps * M
        if carried is not None:
            bound = bound + magnitudes(carried) * a.abs().reshape(shape)
    return bound


@pytest.mark.parametrize("bn_dtype", ["same", "float32"], ids=["bn_same_dtype", "bn_float32"])
@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_folding_half_precision_layers(low, bn_dtype):
    """Conv2d and Linear converted with .to(low), then batch norm (eps=0.1, so where eps goes shows above
    the rounding) in the same dtype or in float32 (mixed precision): fold_batchnorm and fold_sequential
    keep the layer's dtype and equal the unfolded model in eval mode to within ``rounding_bound``."""
    for seed in range(3):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        conv, bn2 = nn.Conv2d(4, 6, 3, padding=1).to(low), trained_like_bn(nn.BatchNorm2d, 6, seed)
        linear, bn1 = nn.Linear(6 * 5 * 5, 7).to(low), trained_like_bn(nn.BatchNorm1d, 7, seed + 10)
        for bn in (bn2, bn1):
            bn.eps = 0.1
            if bn_dtype == "same":
                bn.to(low)
        model = nn.Sequential(conv, bn2, nn.ReLU(), nn.Flatten(), linear, bn1).eval()
        x = torch.randn(3, 4, 5, 5, generator=g).to(low)
        folded_conv, folded_linear = fold_batchnorm(conv, bn2), fold_batchnorm(linear, bn1)
        folded = fold_sequential(model)
        assert count_batchnorms(folded) == 0
        for layer in (folded_conv, folded_linear, folded[0], folded[4]):
            assert layer.weight.dtype == layer.bias.dtype == low
        for mine, by_pair in ((folded[0], folded_conv), (folded[4], folded_linear)):
            assert torch.equal(mine.weight, by_pair.weight) and torch.equal(mine.bias, by_pair.bias)
        with torch.no_grad():
            z_expected, z_got = bn2(conv(x)), folded_conv(x)
            assert z_expected.dtype == z_got.dtype == low
            bound = rounding_bound(conv, bn2, x)
            assert ((z_got.double() - z_expected.double()).abs() <= bound).all(), \
                float(((z_got.double() - z_expected.double()).abs() / bound).max())
            h = nn.Flatten()(torch.relu(z_expected))  # ReLU does not increase a difference
            out_expected, out_got = model(x), folded(x)
            assert out_expected.dtype == out_got.dtype == low
            bound = rounding_bound(linear, bn1, h, carried=nn.Flatten()(bound))
            assert ((out_got.double() - out_expected.double()).abs() <= bound).all(), \
                float(((out_got.double() - out_expected.double()).abs() / bound).max())

"""bn_course.fused_bn: the fused (torch.compile'd) from-scratch BN matches nn.BatchNorm*d.

The same functions run eagerly (compile=False) across ranks and options, and compiled at
a few small shapes in float32 and float64 (compiling takes seconds per shape).
"""

import pytest
import torch

from bn_course import fused_bn
from bn_layers import SHAPES, assert_match
import bn_layers

COMPILED_SHAPE = (4, 8, 8, 8)  # the size `python -m bn_course.bench --quick` uses: compiled once


def run_both(shape, dtype, compile, **kwargs):
    """FusedBatchNorm (compiled or eager) next to nn.BatchNorm*d: ``bn_layers.run_both``."""
    return bn_layers.run_both(lambda C, **options: fused_bn.FusedBatchNorm(C, compile=compile, **options),
                              shape, dtype, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_eager_matches_native_across_ranks(rank, dtype):
    assert_match(*run_both(SHAPES[rank], dtype, compile=False), dtype)


@pytest.mark.parametrize("options", [{"momentum": None}, {"affine": False}, {"bias": False},
                                     {"track_running_stats": False}])
def test_eager_matches_native_with_options(options):
    assert_match(*run_both(SHAPES[4], torch.float64, compile=False, **options), torch.float64)


def test_eager_matches_native_in_channels_last():
    assert_match(*run_both(SHAPES[4], torch.float32, compile=False, channels_last=True), torch.float32)


@pytest.mark.parametrize("dtype, channels_last", [(torch.float32, False), (torch.float64, False),
                                                  (torch.float32, True)])
def test_compiled_matches_native(dtype, channels_last):
    ours, native = run_both(COMPILED_SHAPE, dtype, compile=True, channels_last=channels_last, seed=3)
    assert_match(ours, native, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype, channels_last", [(torch.float32, False), (torch.float64, False),
                                                  (torch.float32, True)])
@pytest.mark.parametrize("shape", [COMPILED_SHAPE, (32, 64, 56, 56)])
def test_compiled_matches_native_on_the_gpu(shape, dtype, channels_last):
    """On a GPU torch.compile writes Triton kernels, not C++: a different code path to check."""
    ours, native = run_both(shape, dtype, compile=True, channels_last=channels_last, seed=4, device="cuda")
    assert ours["out"].is_cuda
    assert_match(ours, native, dtype)


def test_compiled_equals_the_eager_functions():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(COMPILED_SHAPE, generator=g) * 2 - 1
    gamma, beta = torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
    eager = fused_bn.forward_math(x, gamma, beta, 1e-5)
    compiled = fused_bn.compiled(fused_bn.forward_math)(x, gamma, beta, 1e-5)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_eval_mode_uses_the_running_statistics():
    bn_layers.assert_eval_mode_uses_the_running_statistics(fused_bn.FusedBatchNorm(3, compile=False))


def test_half_precision_input_is_computed_in_float32():
    bn_layers.assert_half_precision_is_computed_in_float32(fused_bn.FusedBatchNorm(3, compile=False))


def test_bad_input_gets_clear_errors():
    layer = fused_bn.FusedBatchNorm(3, compile=False)
    bn_layers.assert_bad_input_gets_clear_errors(layer)


def test_the_function_checks_its_input_too():
    x = torch.randn(4, 3, 2)
    with pytest.raises(ValueError, match="gamma must have shape"):
        fused_bn.fused_batchnorm(x, torch.ones(5), torch.zeros(3), use_compile=False)
    with pytest.raises(TypeError, match="floating-point"):
        fused_bn.fused_batchnorm(x.long(), None, None, use_compile=False)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        fused_bn.fused_batchnorm(x, None, None, eps=0.0, use_compile=False)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        fused_bn.FusedBatchNorm(3, eps=-1e-5)


def test_the_math_functions_check_their_input():
    x, gamma, beta = torch.randn(4, 3, 2), torch.ones(3), torch.zeros(3)
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got dtype torch.int64"):
        fused_bn.forward_math(x.long(), None, None, 1e-5)
    with pytest.raises(ValueError, match=r"at least 2 dimensions, got shape \(8,\)"):
        fused_bn.forward_math(torch.randn(8), None, None, 1e-5)
    with pytest.raises(ValueError, match=r"gamma must have shape \(5,\)"):
        fused_bn.forward_math(torch.randn(4, 5), gamma, beta, 1e-5)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got NoneType"):
        fused_bn.forward_math(None, gamma, beta, 1e-5)
    for eps in (-1e-5, float("nan"), None):
        with pytest.raises(ValueError, match="eps must be a positive number"):
            fused_bn.forward_math(x, gamma, beta, eps)
    out, mu, var, inv_std = fused_bn.forward_math(x, gamma, beta, 1e-5)
    dout = torch.randn_like(x)
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got dtype torch.int64"):
        fused_bn.backward_math(dout, x.long(), mu, inv_std, gamma)
    with pytest.raises(ValueError, match=r"at least 2 dimensions, got shape \(8,\)"):
        fused_bn.backward_math(torch.randn(8), torch.randn(8), mu, inv_std, gamma)
    with pytest.raises(ValueError, match=r"dout must have the shape of x, \(4, 3, 2\), got shape \(4, 5, 2\)"):
        fused_bn.backward_math(torch.randn(4, 5, 2), x, mu, inv_std, gamma)
    with pytest.raises(ValueError, match=r"gamma must have shape \(5,\)"):
        fused_bn.backward_math(torch.randn(4, 5), torch.randn(4, 5), torch.zeros(5), torch.ones(5), gamma)
    with pytest.raises(ValueError, match=r"inv_std must have shape \(3,\)"):
        fused_bn.backward_math(dout, x, mu, torch.ones(5), gamma)
    with pytest.raises(TypeError, match="mu must be a torch.Tensor of shape"):
        fused_bn.backward_math(dout, x, None, inv_std, gamma)


# --- gaps: evaluation (before and after training) at every rank, float16, non-contiguous input ---

MODES = [("eval",), ("train", "eval")]  # ("eval",): evaluation before any training step


@pytest.mark.parametrize("modes", MODES, ids=["eval-first", "train-then-eval"])
@pytest.mark.parametrize("options", [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}],
                         ids=str)
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_eager_matches_native_in_eval_mode_with_options_at_every_rank(rank, options, modes):
    """track_running_stats=False normalizes with the batch in eval mode too: through the fused functions."""
    assert_match(*run_both(SHAPES[rank], torch.float32, compile=False, modes=modes, **options), torch.float32)


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("params", ["float32", "same"])  # mixed precision, or the layer in low
def test_half_precision_input_matches_native_in_outputs_gradients_and_buffers(low, params):
    bn_layers.assert_half_precision_matches_native(lambda C: fused_bn.FusedBatchNorm(C, compile=False), low,
                                                   low if params == "same" else torch.float32)


@pytest.mark.parametrize("layout", ["transposed", "channel-slice", "channels_last_3d"])
def test_eager_matches_native_for_non_contiguous_input(layout):
    g = torch.Generator().manual_seed(7)
    if layout == "channels_last_3d":
        x = torch.randn(SHAPES[5], generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last_3d)
    elif layout == "transposed":
        x = torch.randn(4, 3, 6, 5, generator=g, dtype=torch.float64).transpose(2, 3)
    else:
        x = torch.randn(4, 6, 5, generator=g, dtype=torch.float64)[:, ::2]
    assert not x.is_contiguous()
    ours, native = fused_bn.FusedBatchNorm(3, compile=False, dtype=torch.float64), \
        bn_layers.NATIVE[x.dim()](3, dtype=torch.float64)
    dout = torch.randn(x.shape, generator=g, dtype=torch.float64)
    results = []
    for layer in (ours, native):
        x_ = x.clone().requires_grad_(True)
        out = layer(x_)
        results.append([out.detach(), *torch.autograd.grad(out, (x_, layer.weight, layer.bias), dout)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.running_var, native.running_var, rtol=1e-10, atol=1e-10)


def test_a_second_derivative_is_refused_not_wrong():
    bn_layers.assert_refuses_a_second_derivative(fused_bn.FusedBatchNorm(3, compile=False))

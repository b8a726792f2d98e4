"""bn_course.triton_bn: the hand-written Triton kernels match nn.BatchNorm*d.

On a machine with no GPU the kernels run in Triton's interpreter (NumPy): the same
kernel code, so every test below checks the kernels themselves. The tests marked for
a GPU run the compiled kernels at a realistic size.
"""

import platform
import sys

import pytest
import torch

import bn_layers
from bn_layers import SHAPES, assert_match

if sys.platform.startswith("linux") and platform.machine() == "x86_64":
    from bn_course import triton_bn  # the test extra installs Triton here: a missing one is a failure
else:  # pragma: no cover - Triton has no wheels for this platform
    triton_bn = pytest.importorskip("bn_course.triton_bn", reason="Triton installs on Linux x86-64 only")

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def run_both(shape, dtype, **kwargs):
    """TritonBatchNorm next to nn.BatchNorm*d: ``bn_layers.run_both``."""
    return bn_layers.run_both(triton_bn.TritonBatchNorm, shape, dtype, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_matches_native_across_ranks(rank, dtype):
    assert_match(*run_both(SHAPES[rank], dtype), dtype)


@pytest.mark.parametrize("options", [{"momentum": None}, {"affine": False}, {"bias": False},
                                     {"track_running_stats": False}])
def test_matches_native_with_options(options):
    assert_match(*run_both(SHAPES[4], torch.float64, **options), torch.float64)


def test_every_loop_of_the_kernels_runs(monkeypatch):
    """Small BLOCK and PROGRAMS: rows longer than a block and several images per program (S < N),
    with ragged ends, so that the loops' masks and strides are exercised."""
    monkeypatch.setattr(triton_bn, "BLOCK", 16)
    monkeypatch.setattr(triton_bn, "PROGRAMS", 6)  # C = 3: S = 2 slices for N = 5 images
    assert triton_bn.slices_per_channel(5, 3) == 2
    assert_match(*run_both((5, 3, 7, 9), torch.float64, seed=2), torch.float64)


def test_statistics_of_data_far_from_zero_keep_their_precision():
    """The shifted sums: a channel at 1e4 with spread 1 loses nothing, where sum(x**2) - m*mean**2
    in float32 would lose every digit of the variance."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 2, 6, 6, generator=g) + 1e4
    out, stats = triton_bn.triton_forward(x, None, None, 1e-5)
    torch.testing.assert_close(stats[:, 1], x.double().var(dim=(0, 2, 3), correction=0).float(), rtol=1e-3, atol=0)


def test_gradients_pass_gradcheck_in_float64():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    gamma = (torch.rand(2, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    beta = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: triton_bn.triton_batchnorm(*t)[0], (x, gamma, beta))


def test_eval_mode_uses_the_running_statistics():
    bn_layers.assert_eval_mode_uses_the_running_statistics(triton_bn.TritonBatchNorm(3))


def test_half_precision_input_is_computed_in_float32():
    bn_layers.assert_half_precision_is_computed_in_float32(triton_bn.TritonBatchNorm(3))


def test_bad_input_gets_clear_errors():
    layer = triton_bn.TritonBatchNorm(3)
    bn_layers.assert_bad_input_gets_clear_errors(layer)
    with pytest.raises(ValueError, match="contiguous.*channels_last"):
        layer(torch.randn(4, 3, 2, 2).contiguous(memory_format=torch.channels_last))


def test_the_function_checks_its_input_too():
    x = torch.randn(4, 3, 2)
    with pytest.raises(ValueError, match="gamma must have shape"):
        triton_bn.triton_batchnorm(x, torch.ones(5), torch.zeros(3))
    with pytest.raises(TypeError, match="float32 or float64"):
        triton_bn.triton_batchnorm(x.half(), None, None)
    with pytest.raises(ValueError, match="gamma is on meta but x is on cpu"):
        triton_bn.triton_batchnorm(x, torch.ones(3, device="meta"), None)
    with pytest.raises(ValueError, match="read x as contiguous"):
        triton_bn.triton_batchnorm(x.transpose(0, 2), None, None)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        triton_bn.triton_batchnorm(x, None, None, eps=0.0)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        triton_bn.TritonBatchNorm(3, eps=-1e-5)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(32, 64, 56, 56), (7, 5, 13, 11), (64, 3), (2, 3, 2, 3, 4)])
def test_compiled_kernels_match_native_on_the_gpu(shape, dtype):
    ours, native = run_both(shape, dtype, seed=5, device="cuda")
    assert ours["out"].is_cuda
    assert_match(ours, native, dtype)


def test_an_interpreter_too_old_for_the_kernels_is_named(monkeypatch):
    assert triton_bn.runs_on("cpu")  # the pinned Triton
    monkeypatch.setattr(triton_bn.triton, "__version__", "3.6.0")
    assert not triton_bn.runs_on("cpu") and triton_bn.runs_on("cuda")
    with pytest.raises(RuntimeError, match="interpreter from version 3.7 on.*Triton 3.6.0"):
        triton_bn.triton_batchnorm(torch.randn(4, 3, 2), None, None)


# --- gaps: evaluation (before and after training), float32 with options, float16, a view with an offset ---

@pytest.mark.parametrize("modes", [("eval",), ("train", "eval")], ids=["eval-first", "train-then-eval"])
@pytest.mark.parametrize("options", [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}],
                         ids=str)
def test_matches_native_in_eval_mode_and_float32_with_options(options, modes):
    """track_running_stats=False normalizes with the batch in eval mode too: through the kernels."""
    assert_match(*run_both(SHAPES[3], torch.float32, modes=modes, **options), torch.float32)


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("params", ["float32", "same"])  # mixed precision, or the layer in low
def test_half_precision_input_matches_native_in_outputs_gradients_and_buffers(low, params):
    bn_layers.assert_half_precision_matches_native(triton_bn.TritonBatchNorm, low,
                                                   low if params == "same" else torch.float32)


def test_a_contiguous_view_that_starts_inside_its_storage():
    """The kernels get x's data pointer: a view with a storage offset (x[2:] of a batch) must be read from there."""
    g = torch.Generator().manual_seed(8)
    full = torch.randn(6, 3, 4, 5, generator=g, dtype=torch.float64) * 2 + 1
    x = full[2:]
    assert x.is_contiguous() and x.storage_offset() > 0
    ours, native = triton_bn.TritonBatchNorm(3, dtype=torch.float64), torch.nn.BatchNorm2d(3, dtype=torch.float64)
    dout = torch.randn(x.shape, generator=g, dtype=torch.float64)
    results = []
    for layer, x_ in ((ours, full.clone().requires_grad_(True)), (native, x.clone().requires_grad_(True))):
        out = layer(x_[2:] if layer is ours else x_)
        results.append([out.detach(), *torch.autograd.grad(out, (x_, layer.weight, layer.bias), dout)])
    results[0][1] = results[0][1][2:]  # the gradient of the whole batch: its rows 2: are x's
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.running_var, native.running_var, rtol=1e-10, atol=1e-10)


def test_a_second_derivative_is_refused_not_wrong():
    bn_layers.assert_refuses_a_second_derivative(triton_bn.TritonBatchNorm(3))

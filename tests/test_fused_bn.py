"""bn_course.fused_bn: the fused (torch.compile'd) from-scratch BN matches nn.BatchNorm*d.

The same functions run eagerly (compile=False) across ranks and options, and compiled at
a few small shapes in float32 and float64 (compiling takes seconds per shape).
"""

import pytest
import torch
from torch import nn

from bn_course import fused_bn

NATIVE = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
SHAPES = {2: (6, 3), 3: (4, 3, 5), 4: (4, 3, 5, 6), 5: (2, 3, 2, 3, 4)}
COMPILED_SHAPE = (4, 8, 8, 8)  # the size `python -m bn_course.bench --quick` uses: compiled once


def run_both(shape, dtype, compile, channels_last=False, steps=2, seed=0, **options):
    """Train-mode steps of FusedBatchNorm and of nn.BatchNorm*d on the same data; both results."""
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    ours = fused_bn.FusedBatchNorm(C, compile=compile, dtype=dtype, **options)
    if ours.weight is not None:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5, generator=g)
            if ours.bias is not None:
                ours.bias.normal_(generator=g)
    native = NATIVE[len(shape)](C, dtype=dtype, **options)
    native.load_state_dict(ours.state_dict())
    results = []
    for layer in (ours, native):
        g.manual_seed(seed + 1)
        for _ in range(steps):
            x = torch.randn(shape, generator=g, dtype=dtype) * 3 + 2
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_(True)
            dout = torch.randn(shape, generator=g, dtype=dtype)
            out = layer(x)
            params = [p for p in (layer.weight, layer.bias) if p is not None]
            grads = torch.autograd.grad(out, [x] + params, dout)
        results.append({"out": out.detach(), "grads": [t.detach() for t in grads],
                        "state": {k: v.clone() for k, v in layer.state_dict().items()}})
    return results


def assert_match(ours, native, dtype):
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(ours["out"], native["out"], **tol)
    for a, b in zip(ours["grads"], native["grads"]):
        torch.testing.assert_close(a, b, **tol)
    assert ours["state"].keys() == native["state"].keys()
    for key in ours["state"]:
        torch.testing.assert_close(ours["state"][key], native["state"][key], **tol)


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


def test_compiled_equals_the_eager_functions():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(COMPILED_SHAPE, generator=g) * 2 - 1
    gamma, beta = torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
    eager = fused_bn.forward_math(x, gamma, beta, 1e-5)
    compiled = fused_bn.compiled(fused_bn.forward_math)(x, gamma, beta, 1e-5)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_eval_mode_uses_the_running_statistics():
    ours, native = fused_bn.FusedBatchNorm(3, compile=False), nn.BatchNorm2d(3)
    x_train = torch.randn(4, 3, 2, 2) * 2 + 1
    for layer in (ours, native):
        layer.train()(x_train)
        layer.eval()
    x = torch.randn(1, 3, 2, 2)  # batch size 1 is fine in eval mode
    torch.testing.assert_close(ours(x), native(x))


def test_half_precision_input_is_computed_in_float32():
    ours, native = fused_bn.FusedBatchNorm(3, compile=False), nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2).to(torch.bfloat16)
    out = ours(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, native(x), rtol=2e-2, atol=2e-2)


def test_bad_input_gets_clear_errors():
    layer = fused_bn.FusedBatchNorm(3, compile=False)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3))
    with pytest.raises(ValueError, match="channel count must equal num_features=3"):
        layer(torch.randn(4, 5, 2))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(4, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        layer(torch.randn(3))


def test_the_function_checks_its_input_too():
    x = torch.randn(4, 3, 2)
    with pytest.raises(ValueError, match="gamma must have shape"):
        fused_bn.fused_batchnorm(x, torch.ones(5), torch.zeros(3), use_compile=False)
    with pytest.raises(TypeError, match="floating-point"):
        fused_bn.fused_batchnorm(x.long(), None, None, use_compile=False)

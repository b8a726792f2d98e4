"""Shared by the tests of the drop-in BN modules (fused_bn, triton_bn): run one next to nn.BatchNorm*d."""

import pytest
import torch
from torch import nn

NATIVE = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
SHAPES = {2: (6, 3), 3: (4, 3, 5), 4: (4, 3, 5, 6), 5: (2, 3, 2, 3, 4)}


def run_both(make_ours, shape, dtype, channels_last=False, steps=2, seed=0, device="cpu", modes=("train",),
             **options):
    """``steps`` steps in each of ``modes`` ("train" or "eval", in turn) of ``make_ours(C, dtype=..., **options)``
    and of nn.BatchNorm*d on the same data. ``modes=("eval",)`` is evaluation before any training step.

    Returns both results, of the last step: {"out", "grads" (x, then the parameters), "state" (the state dict)}.
    """
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    ours = make_ours(C, dtype=dtype, **options)
    if ours.weight is not None:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5, generator=g)
            if ours.bias is not None:
                ours.bias.normal_(generator=g)
    native = NATIVE[len(shape)](C, dtype=dtype, **options)
    native.load_state_dict(ours.state_dict())
    ours, native = ours.to(device), native.to(device)
    results = []
    for layer in (ours, native):
        g.manual_seed(seed + 1)
        for mode in modes:
            layer.train(mode == "train")
            for _ in range(steps):
                x = (torch.randn(shape, generator=g, dtype=dtype) * 3 + 2).to(device)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                x.requires_grad_(True)
                dout = torch.randn(shape, generator=g, dtype=dtype).to(device)
                out = layer(x)
                params = [p for p in (layer.weight, layer.bias) if p is not None]
                grads = torch.autograd.grad(out, [x] + params, dout)
        results.append({"out": out.detach(), "grads": [t.detach() for t in grads],
                        "state": {k: v.clone() for k, v in layer.state_dict().items()}})
    return results


def assert_match(ours, native, dtype):
    """Outputs, gradients and state dicts agree: to 1e-4 in float32, 1e-10 in float64."""
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(ours["out"], native["out"], **tol)
    assert len(ours["grads"]) == len(native["grads"])
    for a, b in zip(ours["grads"], native["grads"]):
        torch.testing.assert_close(a, b, **tol)
    assert ours["state"].keys() == native["state"].keys()
    for key in ours["state"]:
        torch.testing.assert_close(ours["state"][key], native["state"][key], **tol)


def assert_eval_mode_uses_the_running_statistics(ours):
    """``ours`` (3 channels) after one training step agrees with nn.BatchNorm2d in eval mode, at batch 1."""
    native = nn.BatchNorm2d(3)
    x_train = torch.randn(4, 3, 2, 2) * 2 + 1
    for layer in (ours, native):
        layer.train()(x_train)
        layer.eval()
    x = torch.randn(1, 3, 2, 2)  # batch size 1 is fine in eval mode
    torch.testing.assert_close(ours(x), native(x))


def assert_refuses_a_second_derivative(ours):
    """A gradient penalty through ``ours`` (3 channels, float64) is refused with once_differentiable's
    error, where an unmarked hand-written backward would return a silently wrong second derivative."""
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    (dx,) = torch.autograd.grad((ours.double().train()(x) ** 3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dx.pow(2).sum().backward()


def assert_half_precision_is_computed_in_float32(ours):
    """bfloat16 input to ``ours`` (3 channels): bfloat16 output, nn.BatchNorm2d's values."""
    x = torch.randn(4, 3, 2, 2).to(torch.bfloat16)
    out = ours(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, nn.BatchNorm2d(3)(x), rtol=2e-2, atol=2e-2)


def assert_half_precision_matches_native(make_ours, low, params=torch.float32):
    """float16/bfloat16 input to ``make_ours(3)`` (parameters and buffers in ``params``: float32, mixed
    precision, or ``low`` itself, a layer converted with .half()), two training steps and one evaluation
    next to nn.BatchNorm2d (which computes in float32 either way): out and dx in the input's dtype, and
    they, dgamma, dbeta and the running buffers equal torch's, to assert_close's default tolerance for
    each dtype (a few units of its rounding). With ``params=low`` the input's spread is 400: its float16
    variance, 1.6e5, would overflow past 65504 if it were computed in float16. Then both layers round
    gamma, beta and their gradients to ``low`` at different points, so they may differ by 2 units of its
    rounding at each tensor's scale (both are within one unit of the exact answer)."""
    g = torch.Generator().manual_seed(0)
    ours, native = make_ours(3).to(params), nn.BatchNorm2d(3).to(params)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5, generator=g)
        ours.bias.normal_(generator=g)
    native.load_state_dict(ours.state_dict())
    spread = 3 if params == torch.float32 else 400
    for _ in range(2):
        x = (torch.randn(4, 3, 2, 2, generator=g) * spread + 2).to(low)
        dout = torch.randn(4, 3, 2, 2, generator=g).to(low)
        results = []
        for layer in (ours, native):
            x_ = x.clone().requires_grad_(True)
            out = layer(x_)
            results.append([out.detach(), *torch.autograd.grad(out, (x_, layer.weight, layer.bias), dout)])
        assert results[0][0].dtype == results[0][1].dtype == low
        for name, a, b in zip(("out", "dx", "dgamma", "dbeta"), *results):
            _assert_close_in(a, b, params, name)
    assert ours.running_var.dtype == params
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        _assert_close_in(getattr(ours, name), getattr(native, name), params, name)
    x = (torch.randn(4, 3, 2, 2, generator=g) * spread + 2).to(low)
    _assert_close_in(ours.eval()(x), native.eval()(x), params, "eval out")


def _assert_close_in(a, b, params, name):
    """assert_close's default tolerance, or, for a layer whose parameters are float16/bfloat16, 2 units
    of that dtype's rounding at the scale of ``b``."""
    if params == torch.float32 or not a.is_floating_point():
        torch.testing.assert_close(a, b, msg=name)
    else:
        unit = torch.finfo(params).eps
        torch.testing.assert_close(a, b, rtol=2 * unit, atol=2 * unit * float(b.detach().abs().max()), msg=name)


def assert_bad_input_gets_clear_errors(layer):
    """The mistakes every BN module must name: one value per channel, channels, integer data, rank."""
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3))
    with pytest.raises(ValueError, match="channel count must equal num_features=3"):
        layer(torch.randn(4, 5, 2))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(4, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        layer(torch.randn(3))

"""bn_course.sync_bn: synchronized BN over gloo processes equals one process with the whole batch."""

import pytest
import torch
from torch import nn

from bn_course import launch, sync_bn
from bn_course.torch_bn import BatchNorm


def make_case(seed, N=8, C=3, spatial=(4, 4), steps=2, dtype=torch.float64, offset=1.0, **options):
    """The notebook's experiment for any seed: keyword arguments of sync_bn.sync_bn_demo."""
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn((N, C) + spatial, generator=g, dtype=dtype) * 2 + offset,
                torch.randn((N, C) + spatial, generator=g, dtype=dtype)) for _ in range(steps)]
    gamma = torch.rand(C, generator=g, dtype=dtype) + 0.5
    beta = torch.randn(C, generator=g, dtype=dtype)
    return dict(batches=batches, gamma=gamma, beta=beta, **options)


def several_cases(rank, world_size, cases):
    """Worker: sync_bn_demo for each case, all in one launch (starting processes is the slow part)."""
    return [sync_bn.sync_bn_demo(rank, world_size, **case) for case in cases]


def both_sets_of_cases(rank, world_size, cases, option_cases):
    """Worker: several_cases, then run_options for each of option_cases, in the same processes."""
    return (several_cases(rank, world_size, cases),
            [run_options(sync_bn.SyncBatchNorm, rank, world_size, **case) for case in option_cases])


def run_options(make, rank, world_size, options, batches, gamma, beta, x_eval):
    """``make(C, **options)`` (float32 or float64 parameters, as gamma), training steps on this rank's shards of
    ``batches``, then evaluation mode on its shard of ``x_eval``. rank=0, world_size=1: the whole batch.
    Returns the last step's out and gradients (x, then the parameters), the state dict and the eval output."""
    layer = make(gamma.numel(), dtype=gamma.dtype, **options)
    if layer.weight is not None:
        with torch.no_grad():
            layer.weight.copy_(gamma)
            layer.bias.copy_(beta)
    for x_full, dout_full in batches:
        x = sync_bn.shard(x_full, rank, world_size).clone().requires_grad_(True)
        out = layer(x)
        params = [p for p in (layer.weight, layer.bias) if p is not None]
        grads = torch.autograd.grad(out, [x] + params, sync_bn.shard(dout_full, rank, world_size))
    with torch.no_grad():
        out_eval = layer.eval()(sync_bn.shard(x_eval, rank, world_size))
    return {"out": out.detach(), "grads": [t.detach() for t in grads], "out_eval": out_eval,
            "state": {k: v.clone() for k, v in layer.state_dict().items()}}


def option_case(seed, options, low=None, N=8, C=3, spatial=(4, 4), steps=3):
    """Keyword arguments of run_options; ``low``: float16/bfloat16 input with float32 parameters
    (or none), else float64 throughout."""
    dtype = torch.float64 if low is None else torch.float32
    case = make_case(seed, N=N, C=C, spatial=spatial, steps=steps, dtype=dtype)
    if low is not None:
        case["batches"] = [(x.to(low), dout.to(low)) for x, dout in case["batches"]]
    g = torch.Generator().manual_seed(seed + 1000)
    x_eval = torch.randn((N, C) + spatial, generator=g, dtype=case["gamma"].dtype) * 2 + 1
    return dict(options=options, x_eval=x_eval if low is None else x_eval.to(low), **case)


def compare(per_rank_per_case, cases):
    """(max_differences of synchronized BN, of per-process BN or None, the raw results) per case."""
    out = []
    for k, case in enumerate(cases):
        per_rank = [r[k] for r in per_rank_per_case]
        reference = sync_bn.single_process_reference(case["batches"], case["gamma"], case["beta"],
                                                     case.get("momentum", 0.1))
        local = (sync_bn.max_differences([r["local"] for r in per_rank], reference)
                 if "local" in per_rank[0] else None)
        out.append((sync_bn.max_differences([r["sync"] for r in per_rank], reference), local, per_rank))
    return out


# The notebook's claim, with other seeds and options, in two gloo processes (one launch for all).
TWO_PROCESS_CASES = [make_case(seed) for seed in (1, 2, 3, 4)] + [
    make_case(5, momentum=None),                              # cumulative average
    make_case(6, N=2, spatial=(), per_process=False),         # (N, C) input, 1 sample per process
    make_case(7, spatial=(2, 3, 2)),                          # 5-D input
    make_case(8, offset=1e4),                                 # large offset: two-pass variance needed
]


@pytest.fixture(scope="module")
def two_process_launch():
    """One launch of two gloo processes for every two-process case of this file (a launch costs seconds):
    per rank, (the results of TWO_PROCESS_CASES, those of OPTION_CASES)."""
    return launch.launch(both_sets_of_cases, 2, args=(TWO_PROCESS_CASES, OPTION_CASES), timeout=180)


@pytest.fixture(scope="module")
def two_process_results(two_process_launch):
    return compare([r[0] for r in two_process_launch], TWO_PROCESS_CASES)


@pytest.mark.parametrize("k", range(len(TWO_PROCESS_CASES)))
def test_two_processes_of_4_equal_one_process_of_8(two_process_results, k):
    sync_diff, local_diff, per_rank = two_process_results[k]
    assert max(sync_diff.values()) < 1e-6, sync_diff  # outputs, dx, dgamma, dbeta, running stats
    assert all(r["sync"]["num_batches_tracked"] == 2 for r in per_rank)


@pytest.mark.parametrize("k", range(4))  # the notebook's set-up (N=8, 4x4), seeds 1-4
def test_per_process_bn_does_not(two_process_results, k):
    _, local_diff, _ = two_process_results[k]
    for key in ("out", "dx", "dgamma", "running_var"):
        assert local_diff[key] > 1e-3, (key, local_diff)  # the notebook's margins, for other seeds
    assert local_diff["running_mean"] > 1e-5, local_diff
    assert local_diff["dbeta"] < 1e-9  # sum(dL/dy) does not involve the statistics


def test_torch_sync_batchnorm_refuses_cpu_tensors(two_process_results):
    for r in two_process_results[0][2]:
        assert r["torch_sync"]["out"] is None
        assert "SyncBatchNorm expected input tensor to be on GPU" in r["torch_sync"]["error"]


def test_three_processes_with_unequal_shards_and_float32():
    cases = [make_case(11),  # 8 samples over 3 processes: shards of 3, 3, 2
             make_case(12, dtype=torch.float32)]
    results = compare(launch.launch(several_cases, 3, args=(cases,), timeout=180), cases)
    assert [len(r["sync"]["out"]) for r in results[0][2]] == [3, 3, 2]
    assert max(results[0][0].values()) < 1e-6, results[0][0]
    assert max(results[1][0].values()) < 1e-4, results[1][0]  # float32 round-off


# Without torch.distributed (or with one process) every all-reduce is a no-op.

def test_without_a_process_group_it_is_batchnorm():
    assert sync_bn.world_size() == 1
    batches = make_case(0)["batches"]
    for options in [{}, {"momentum": None}, {"affine": False}, {"bias": False}, {"track_running_stats": False}]:
        sync = sync_bn.SyncBatchNorm(3, dtype=torch.float64, **options)
        plain = BatchNorm(3, dtype=torch.float64, **options)
        plain.load_state_dict(sync.state_dict())
        for x, dout in batches:
            x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            out1, out2 = sync(x1), plain(x2)
            out1.backward(dout)
            out2.backward(dout)
            torch.testing.assert_close(out1, out2)
            torch.testing.assert_close(x1.grad, x2.grad)
        for (n1, t1), (n2, t2) in zip(sync.state_dict().items(), plain.state_dict().items()):
            assert n1 == n2
            torch.testing.assert_close(t1, t2)
        for p1, p2 in zip(sync.parameters(), plain.parameters()):
            torch.testing.assert_close(p1.grad, p2.grad)
        sync.eval()
        plain.eval()
        torch.testing.assert_close(sync(batches[0][0]), plain(batches[0][0]))


def test_sync_batchnorm_function_matches_the_module():
    case = make_case(3)
    x, gamma, beta = case["batches"][0][0], case["gamma"], case["beta"]
    module = sync_bn.SyncBatchNorm(3, dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(gamma)
        module.bias.copy_(beta)
    torch.testing.assert_close(sync_bn.sync_batchnorm(x, gamma, beta), module(x))


def test_gradcheck_in_float64():
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    gamma = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_(True)
    beta = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, g, b: sync_bn.sync_batchnorm(x, g, b), (x, gamma, beta))


def test_bad_input_gets_clear_errors():
    layer = sync_bn.SyncBatchNorm(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3))
    with pytest.raises(ValueError, match="channel count must equal num_features=3"):
        layer(torch.randn(4, 5))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        layer(torch.randn(3))


def test_the_notebooks_per_process_margins_hold_for_many_seeds():
    """Per-process BN needs no process group, so the notebook's margins can be checked for 50 seeds here."""
    for seed in range(50):
        case = make_case(100 + seed)
        per_rank = []
        for rank in range(2):
            layer = BatchNorm(3, dtype=torch.float64)
            with torch.no_grad():
                layer.weight.copy_(case["gamma"])
                layer.bias.copy_(case["beta"])
            per_rank.append(sync_bn._one_run(layer, case["batches"], rank, 2))
        reference = sync_bn.single_process_reference(case["batches"], case["gamma"], case["beta"])
        local_diff = sync_bn.max_differences(per_rank, reference)
        assert min(local_diff[k] for k in ("out", "dx", "dgamma", "running_var")) > 1e-3, (seed, local_diff)
        assert local_diff["running_mean"] > 1e-5, (seed, local_diff)


def test_the_function_checks_its_input_too():
    x = torch.randn(4, 3, 2)
    with pytest.raises(ValueError, match="beta must have shape"):
        sync_bn.sync_batchnorm(x, torch.ones(3), torch.zeros(2))


def test_shard_checks_rank_and_world_size():
    t = torch.arange(10.0)
    assert torch.equal(sync_bn.shard(t, 1, 2), torch.arange(5.0, 10.0))
    for bad in (0, -1, 2.5, None):
        with pytest.raises(ValueError, match=f"world_size must be a positive integer .*got {bad!r}"):
            sync_bn.shard(t, 0, bad)
    for bad in (2, -1, 0.5, None):
        with pytest.raises(ValueError, match=f"rank must be an integer from 0 to world_size - 1 = 1, got {bad!r}"):
            sync_bn.shard(t, bad, 2)
    with pytest.raises(TypeError, match="t must be a torch.Tensor with a batch axis"):
        sync_bn.shard([1, 2], 0, 2)


# --- one process against torch.nn itself (the oracle), not only against bn_course's BatchNorm ---

import bn_layers  # noqa: E402


@pytest.mark.parametrize("modes", [("train",), ("train", "eval")], ids=["train", "train-then-eval"])
@pytest.mark.parametrize("options", [{}, {"momentum": None}, {"affine": False}, {"bias": False},
                                     {"track_running_stats": False}], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_one_process_matches_native(rank, dtype, options, modes):
    """Outputs, gradients of x, weight and bias, and the state dict, after training (and eval) steps."""
    ours, native = bn_layers.run_both(sync_bn.SyncBatchNorm, bn_layers.SHAPES[rank], dtype, modes=modes, **options)
    bn_layers.assert_match(ours, native, dtype)


@pytest.mark.parametrize("options", [{}, {"affine": False, "track_running_stats": False}], ids=str)
@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_input_matches_native(low, options):
    """float16/bfloat16 input: the sums are taken in float32, as torch does. In float16 a sum over
    3 * 31 * 33 = 3069 values near 30 overflows (> 65504) and the count 3069 rounds to 3068: without
    parameters to take float32 from, that was a NaN output."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 2, 31, 33, generator=g) * 3 + 30).to(low)
    ours, native = sync_bn.SyncBatchNorm(2, **options), nn.BatchNorm2d(2, **options)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outs = [layer(t) for layer, t in zip((ours, native), xs)]
    dout = torch.randn(x.shape, generator=g).to(low)
    for out in outs:
        out.backward(dout)
    assert outs[0].dtype == low and xs[0].grad.dtype == low
    # with float32 parameters the math is float32, as torch's: assert_close's default for the dtype. Without
    # them it is done in the input's dtype, a few of its ulps (2**-10, 2**-7) off torch's float32 math.
    tol = {} if options == {} else {torch.float16: dict(rtol=4e-3, atol=4e-3),
                                    torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}[low]
    torch.testing.assert_close(outs[0], outs[1], **tol)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, **tol)
    for name in ("weight", "bias", "running_mean", "running_var"):
        a, b = getattr(ours, name), getattr(native, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a.grad if name in ("weight", "bias") else a,
                                       b.grad if name in ("weight", "bias") else b, msg=name)


@pytest.mark.parametrize("eps", [0, -1e-5, float("nan"), None, "1e-5"])
def test_the_function_rejects_a_bad_eps(eps):
    with pytest.raises(ValueError, match="eps must be a positive number"):
        sync_bn.sync_batchnorm(torch.randn(4, 3, 2), None, None, eps=eps)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        sync_bn.SyncBatchNorm(3, eps=eps)


def test_a_second_derivative_is_refused_not_wrong():
    bn_layers.assert_refuses_a_second_derivative(sync_bn.SyncBatchNorm(3))


# --- gaps: the options other than the default in two gloo processes, against torch.nn on the whole batch ---

NATIVE_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
OPTION_CASES = [  # (id, keyword arguments of run_options); 3 training steps, then evaluation mode
    ("affine_false", option_case(21, {"affine": False})),
    ("track_running_stats_false", option_case(22, {"track_running_stats": False})),  # eval: batch statistics
    ("momentum_none", option_case(23, {"momentum": None})),                           # cumulative average
    ("no_params_no_buffers_momentum_none", option_case(24, {"affine": False, "track_running_stats": False,
                                                            "momentum": None}, spatial=(5,))),
    ("float16", option_case(25, {}, low=torch.float16)),            # float32 parameters: float32 math and sums
    ("bfloat16", option_case(26, {"momentum": None}, low=torch.bfloat16, spatial=(2, 3, 2))),
    # no float32 parameters to compute in: the math is in float16, the forward's sums in float32,
    # and the backward's two sums all-reduced in float16 (gloo supports float16 on the CPU)
    ("float16_no_params", option_case(27, {"affine": False, "track_running_stats": False}, low=torch.float16)),
]
OPTION_CASES, OPTION_IDS = [c[1] for c in OPTION_CASES], [c[0] for c in OPTION_CASES]


@pytest.mark.parametrize("k", range(len(OPTION_CASES)), ids=OPTION_IDS)
def test_two_processes_with_options_equal_torch_on_the_whole_batch(two_process_launch, k):
    """Synchronized BN in two processes of 4 samples each against nn.BatchNorm*d with the same options in
    one process holding all 8: out and dx (the shards put back together), dgamma and dbeta (summed over
    the ranks, as data-parallel training does), the state dict on every rank, and evaluation mode.
    Tolerance: 1e-10 in float64. float16/bfloat16 with float32 parameters: both compute in float32, so
    assert_close's default for the dtype (about one unit of its rounding); the float32 parameter gradients
    and buffers, float32's default. Without parameters the math is in float16: a few of its units
    (2**-10), 4e-3 as in test_half_precision_input_matches_native."""
    case = OPTION_CASES[k]
    per_rank = [r[1][k] for r in two_process_launch]
    whole = run_options(NATIVE_BN[case["x_eval"].dim()], 0, 1, **case)
    low = case["batches"][0][0].dtype
    if low == torch.float64:
        tol = param_tol = {"rtol": 1e-10, "atol": 1e-10}
    elif case["options"].get("affine", True):
        tol, param_tol = {}, {}
    else:
        tol = param_tol = {"rtol": 4e-3, "atol": 4e-3}
    for key in ("out", "out_eval"):
        together = torch.cat([r[key] for r in per_rank])
        assert together.dtype == whole[key].dtype == low
        torch.testing.assert_close(together, whole[key], **tol, msg=key)
    dx = torch.cat([r["grads"][0] for r in per_rank])
    assert dx.dtype == low
    torch.testing.assert_close(dx, whole["grads"][0], **tol, msg="dx")
    assert len(per_rank[0]["grads"]) == len(whole["grads"]) == (3 if case["options"].get("affine", True) else 1)
    for name, i in (("dgamma", 1), ("dbeta", 2))[:len(whole["grads"]) - 1]:
        torch.testing.assert_close(sum(r["grads"][i] for r in per_rank), whole["grads"][i], **param_tol, msg=name)
    for r in per_rank:
        assert r["state"].keys() == whole["state"].keys()
        for key, value in whole["state"].items():
            torch.testing.assert_close(r["state"][key], value, **param_tol, msg=key)


@pytest.mark.parametrize("params", ["float32", "same"])
@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_one_process_half_precision_matches_native(low, params):
    """One process: float16/bfloat16 input, with float32 parameters or the layer itself in low precision."""
    bn_layers.assert_half_precision_matches_native(sync_bn.SyncBatchNorm, low, low if params == "same" else torch.float32)


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_the_function_computes_low_precision_in_float32(low):
    """Spread 400: a float16 variance (1.6e5) would be inf. The output equals torch's float32 batch norm,
    rounded once to the input's dtype."""
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(4, 3, 5, 5, generator=g) * 400 + 2).to(low)
    gamma, beta = torch.rand(3, generator=g).to(low) + 0.5, torch.randn(3, generator=g).to(low)
    mu, var, _ = sync_bn.sync_mean_var(x)
    assert mu.dtype == var.dtype == torch.float32 and bool(torch.isfinite(var).all())
    out = sync_bn.sync_batchnorm(x, gamma, beta)
    expected = torch.nn.functional.batch_norm(x.float(), None, None, gamma.float(), beta.float(), training=True)
    assert out.dtype == low
    torch.testing.assert_close(out, expected.to(low))

"""Issue 5's device check, run once on a GPU machine: correctness, the bench, a kernel breakdown, variants.

    OUT=some/dir python tools/gpu_check.py
    python tools/gpu_check.py --combine some/dir     # -> bn_course/reference/h100.json

Writes under $OUT: bench.json (``python -m bn_course.bench``'s record), kernels.json (each
kernel of one forward + backward: name, time, grid and block, from the PyTorch profiler),
variants.json (CUDA-event medians of the fused variants against native) and prints a
short table last. Each section runs even if an earlier one failed.
"""

import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bn_course import bench, fused_bn  # noqa: E402

REFERENCE = Path(__file__).resolve().parent.parent / "bn_course" / "reference" / "h100.json"


def combine(folder, reference_path=None):
    """Merge one run's files (the folder $OUT came back as) into the course's reference data."""
    reference_path = Path(reference_path or REFERENCE)
    folder = Path(folder)
    parts = {name: json.loads((folder / f"{name}.json").read_text())
             for name in ("environment", "bench", "variants", "kernels", "spread")}
    for rows in parts["kernels"]["steps"].values():
        for k in rows:
            k["name"] = k["name"][:120]
    meta = parts["bench"]["meta"]
    reference = {
        "what": "Training-mode batch norm, float32, on an NVIDIA H100: copy bandwidth, the bench table, "
                "CUDA-event timings, each kernel's time and grid, and the modules' spread",
        "measured_by": "this course's tools/gpu_check.py (which runs bn_course.bench) on a lent H100 machine",
        "command": "OUT=dir python tools/gpu_check.py; then python tools/gpu_check.py --combine dir",
        "date_utc": meta["date_utc"], "device": parts["environment"]["device"],
        "multiprocessors": parts["environment"]["sms"], "torch": parts["environment"]["torch"],
        "triton": parts["environment"]["triton"], "shape": parts["variants"]["shape"], "dtype": "float32",
        **{name: parts[name] for name in ("bench", "variants", "kernels", "spread")},
    }
    reference_path.write_text(json.dumps(reference, indent=1) + "\n")
    print(f"wrote {reference_path} ({reference_path.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__" and sys.argv[1:2] == ["--combine"]:  # needs no GPU and no Triton
    combine(sys.argv[2])
    sys.exit(0)

OUT = Path(os.environ.get("OUT", "gpu_out"))
# GPU_CHECK_DRY=1: a rehearsal on the CPU at tiny sizes (Triton kernels in its interpreter), to catch the script's own bugs.
DRY = os.environ.get("GPU_CHECK_DRY") == "1"
SHAPE = (4, 8, 6, 6) if DRY else bench.GPU_TARGET_SHAPE
SIZES = ((2, 8, 6, 6), SHAPE) if DRY else bench.GPU_SIZES
DEV = torch.device("cpu" if DRY else "cuda")
SUMMARY = []


SECTIONS = []


def section(fn):
    """Register fn as a section of the check; ``main`` runs them in order."""
    SECTIONS.append(fn)
    return fn


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for fn in SECTIONS:
        print(f"\n=== {fn.__name__} ===", flush=True)
        try:
            fn()
        except Exception:  # keep going: the later sections are independent
            traceback.print_exc()
            SUMMARY.append(f"{fn.__name__}: FAILED (see log)")
    print("\n=== SUMMARY ===")
    print("\n".join(SUMMARY))


def data(shape, dtype=torch.float32, layout="contiguous", seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(shape, generator=g, device=DEV, dtype=dtype) * 3 + 1
    dout = torch.randn(shape, generator=g, device=DEV, dtype=dtype)
    if layout == "channels_last":
        x, dout = x.contiguous(memory_format=torch.channels_last), dout.contiguous(memory_format=torch.channels_last)
    gamma = torch.rand(shape[1], generator=g, device=DEV, dtype=dtype) + 0.5
    beta = torch.randn(shape[1], generator=g, device=DEV, dtype=dtype)
    return x, dout, gamma, beta


def reference(x, dout, gamma, beta):
    """float64 eager autograd through F.batch_norm: out, dx, dgamma, dbeta."""
    x64, g64, b64 = (t.detach().double().requires_grad_(True) for t in (x, gamma, beta))
    out = torch.nn.functional.batch_norm(x64, None, None, g64, b64, training=True, eps=1e-5)
    return (out.detach(),) + torch.autograd.grad(out, (x64, g64, b64), dout.double())


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def fused_step(x, dout, gamma, beta, fn):
    xr, gr, br = (t.detach().clone().requires_grad_(True) for t in (x, gamma, beta))
    out = fn(xr, gr, br)
    return (out.detach(),) + torch.autograd.grad(out, (xr, gr, br), dout)


@section
def environment():
    import triton
    if DRY:
        print({"torch": torch.__version__, "triton": triton.__version__, "dry": True})
        return
    props = torch.cuda.get_device_properties(0)
    info = {"torch": torch.__version__, "triton": triton.__version__, "device": props.name,
            "sms": props.multi_processor_count, "memory_GiB": round(props.total_memory / 2**30, 1)}
    print(info)
    (OUT / "environment.json").write_text(json.dumps(info))


@section
def correctness():
    """Compiled and Triton against float64 on fresh inputs at several shapes and ranks."""
    from bn_course import triton_bn
    rows = []
    # compiling costs seconds per (shape, dtype, layout): the compiled version at the cases that matter
    compiled_cases = {(SHAPE, "contiguous", torch.float32), (SHAPE, "channels_last", torch.float32),
                      ((7, 5, 13, 11), "contiguous", torch.float64), ((7, 5, 13, 11), "channels_last", torch.float32)}
    for shape in (SHAPE, (7, 5, 13, 11), (2, 3, 1, 2), (64, 3), (2, 3, 5), (2, 3, 2, 3, 4)):
        for layout in ("contiguous", "channels_last") if len(shape) == 4 else ("contiguous",):
            for dtype in (torch.float32, torch.float64):
                x, dout, gamma, beta = data(shape, dtype, layout, seed=len(rows) + 1)
                ref = reference(x, dout, gamma, beta)
                if (shape, layout, dtype) in compiled_cases:
                    got = fused_step(x, dout, gamma, beta, lambda a, g, b: fused_bn.fused_batchnorm(a, g, b)[0])
                    rows.append(("compiled", shape, layout, str(dtype), max(rel(a, b) for a, b in zip(got, ref))))
                if layout == "contiguous":
                    got = fused_step(x, dout, gamma, beta, lambda a, g, b: triton_bn.triton_batchnorm(a, g, b)[0])
                    rows.append(("triton", shape, layout, str(dtype), max(rel(a, b) for a, b in zip(got, ref))))
    bad = []
    for impl, shape, layout, dtype, err in rows:
        limit = 1e-5 if "32" in dtype else 1e-12
        ok = err < limit
        bad += [] if ok else [(impl, shape, layout, dtype, err)]
        print(f"{impl:9} {str(shape):18} {layout:14} {dtype:14} max rel err {err:.1e} {'ok' if ok else 'FAIL'}")
    SUMMARY.append(f"correctness: {len(rows) - len(bad)}/{len(rows)} within limits" + (f"; FAIL {bad}" if bad else ""))


@section
def bench_module():
    result = bench.run(sizes=SIZES, repeats=50, device=DEV, impls=("from-scratch", "native", "compiled", "triton"))
    result["meta"]["command"] = "python -m bn_course.bench --device cuda --repeats 50 (via tools/gpu_check.py)"
    (OUT / "bench.json").write_text(json.dumps(result, indent=1))
    text = bench.format_table(result)
    print(text)
    SUMMARY.extend(line for line in text.splitlines() if "vs nn.BatchNorm2d" in line)


def variant_steps(tuning=True):
    """name -> (layout, fn(x, gamma, beta) -> out) for one training step's forward.

    tuning: also the Triton kernels at other BLOCK / NUM_WARPS / PROGRAMS (same kernels, other sizes).
    """
    from bn_course import triton_bn

    def native(a, g, b):
        return torch.nn.functional.batch_norm(a, None, None, g, b, training=True, eps=1e-5)

    def compiled(a, g, b):
        return fused_bn.fused_batchnorm(a, g, b)[0]

    steps = {"native NCHW": ("contiguous", native), "native channels_last": ("channels_last", native),
             "compiled NCHW": ("contiguous", compiled), "compiled channels_last": ("channels_last", compiled),
             "triton NCHW": ("contiguous", lambda a, g, b: triton_bn.triton_batchnorm(a, g, b)[0])}
    tunings = ((2048, 8, 2048), (1024, 4, 4096), (1024, 8, 1024)) if tuning else ()
    for block, warps, programs in tunings:
        def fn(a, g, b, block=block, warps=warps, programs=programs):
            saved = triton_bn.BLOCK, triton_bn.NUM_WARPS, triton_bn.PROGRAMS
            triton_bn.BLOCK, triton_bn.NUM_WARPS, triton_bn.PROGRAMS = block, warps, programs
            try:
                return triton_bn.triton_batchnorm(a, g, b)[0]
            finally:
                triton_bn.BLOCK, triton_bn.NUM_WARPS, triton_bn.PROGRAMS = saved
        steps[f"triton NCHW b{block} w{warps} p{programs}"] = ("contiguous", fn)
    return steps


def launch_ms(fn, repeats=30):
    """Median host time from an idle GPU until fn() returns (no sync after): the CPU's share of a step."""
    times = []
    for _ in range(repeats):
        DEV.type == "cuda" and torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    DEV.type == "cuda" and torch.cuda.synchronize()
    return statistics.median(times) * 1e3


@section
def variants():
    """CUDA-event medians (triton.testing.do_bench) of forward and forward + backward, two rounds each."""
    if DRY:  # a stand-in on the CPU, at tiny sizes
        def do_bench(fn, warmup, rep, return_mode):
            return bench.median_time(fn, 3) * 1e3
    else:
        from triton.testing import do_bench
    x0, dout0, gamma0, beta0 = data(SHAPE, seed=11)
    nbytes = x0.numel() * x0.element_size()
    y = torch.empty_like(x0)
    copy_ms = do_bench(lambda: y.copy_(x0), warmup=50, rep=300, return_mode="median")
    copy_bps = 2 * nbytes / (copy_ms * 1e-3)
    rows = [{"name": "copy", "ms": copy_ms, "GB_per_s": copy_bps / 1e9}]
    for name, (layout, fn) in variant_steps().items():
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x, dout = x0.contiguous(memory_format=fmt), dout0.contiguous(memory_format=fmt)
        xr = x.detach().clone().requires_grad_(True)
        gr, br = gamma0.clone().requires_grad_(True), beta0.clone().requires_grad_(True)

        def fwd():
            with torch.no_grad():
                return fn(x, gamma0, beta0)

        def fwd_bwd():
            return torch.autograd.grad(fn(xr, gr, br), (xr, gr, br), dout)

        for direction, f in {"forward": fwd, "forward+backward": fwd_bwd}.items():
            f()
            times = [do_bench(f, warmup=50, rep=300, return_mode="median") for _ in range(2)]
            ms = statistics.median(times)
            bps = bench.PASSES[direction] * nbytes / (ms * 1e-3)
            rows.append({"name": name, "direction": direction, "ms": ms, "ms_rounds": times,
                         "launch_ms": launch_ms(f), "GB_per_s": bps / 1e9, "fraction_of_copy": bps / copy_bps})
    (OUT / "variants.json").write_text(json.dumps({"shape": list(SHAPE), "dtype": "float32", "rows": rows,
                                                    "timer": "triton.testing.do_bench median, CUDA events"},
                                                   indent=1))
    print(f"{'variant':30} {'direction':17} {'ms (2 rounds)':>14} {'CPU ms':>7} {'GB/s':>7} {'of copy':>8}")
    for r in rows:
        rounds = "/".join(f"{t:.3f}" for t in r.get("ms_rounds", [r["ms"]]))
        print(f"{r['name']:30} {r.get('direction', ''):17} {rounds:>14} {r.get('launch_ms', 0):7.3f} "
              f"{r['GB_per_s']:7.0f} {r.get('fraction_of_copy', 1):8.0%}")
        if r["name"] in variant_steps(tuning=False):
            SUMMARY.append(f"{r['name']} {r['direction']}: {r['ms']:.3f} ms, {r['fraction_of_copy']:.0%} of copy")


@section
def kernels():
    """Each kernel of one forward + backward (profiler trace): name, mean time, grid, block."""
    from torch.profiler import ProfilerActivity, profile
    x0, dout0, gamma0, beta0 = data(SHAPE, seed=12)
    report = {}
    for name, (layout, fn) in variant_steps(tuning=False).items():
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        xr = x0.contiguous(memory_format=fmt).requires_grad_(True)
        dout = dout0.contiguous(memory_format=fmt)
        gr, br = gamma0.clone().requires_grad_(True), beta0.clone().requires_grad_(True)

        def step():
            return torch.autograd.grad(fn(xr, gr, br), (xr, gr, br), dout)

        for _ in range(3):
            step()
        DEV.type == "cuda" and torch.cuda.synchronize()
        steps = 5
        with profile(activities=[ProfilerActivity.CPU if DRY else ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            DEV.type == "cuda" and torch.cuda.synchronize()
        trace = OUT / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = [e for e in json.loads(trace.read_text())["traceEvents"]
                  if e.get("cat") == ("cpu_op" if DRY else "kernel")]
        trace.unlink()
        table = {}
        for e in events:
            k = table.setdefault(e["name"], {"name": e["name"], "calls": 0, "us": 0.0,
                                             "grid": e["args"].get("grid"), "block": e["args"].get("block")})
            k["calls"] += 1
            k["us"] += e["dur"]
        rows = sorted(table.values(), key=lambda k: -k["us"])
        for k in rows:
            k["calls_per_step"], k["us_per_step"] = k["calls"] / steps, k["us"] / steps
        report[name] = rows
        print(f"\n{name}: {sum(k['us_per_step'] for k in rows):.0f} us of kernels per step")
        for k in rows[:8]:
            print(f"  {k['us_per_step']:8.1f} us  x{k['calls_per_step']:.0f}  grid {k['grid']} block {k['block']}  "
                  f"{k['name'][:90]}")
    (OUT / "kernels.json").write_text(json.dumps({"shape": list(SHAPE), "dtype": "float32", "steps": report},
                                                 indent=1))


SPREAD_WHAT = ("strict: bench's measure, wall time of one step from an idle GPU to synchronized; "
               "pipelined: CUDA events around 20 back-to-back steps; times in seconds, 3 rounds each")


@section
def spread():
    """The modules (running statistics included) at the target shape, three ways, three rounds each.

    strict:    bench's own measure, wall time of one step with the GPU idle before and synchronized after
               (the CPU's launch work is fully exposed);
    pipelined: CUDA events around 20 back-to-back steps (launches queue ahead while the GPU works, as in a
               training loop).
    """
    from triton.testing import do_bench
    x = torch.randn(SHAPE, device=DEV)
    y = torch.empty_like(x)
    copy_s = (bench.median_time(lambda: y.copy_(x), 10) if DRY
              else do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median") * 1e-3)
    copy_bps = 2 * x.numel() * x.element_size() / copy_s  # CUDA events: the yardstick for every row
    nbytes = bench.bytes_moved(SHAPE, "forward+backward")
    rows = []
    for impl in ("native", "compiled", "triton"):
        for layout in ("contiguous", "channels_last"):
            if not bench.measurable(impl, layout, DEV):
                continue
            step = bench.make_step(impl, SHAPE, "forward+backward", layout, device=DEV)
            step()
            strict = [bench.median_time(step, 50, warmup=5, device=DEV) for _ in range(3)]
            pipelined = []
            for _ in range(3):
                if DRY:
                    pipelined.append(bench.median_time(step, 3))
                    continue
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                for _ in range(20):
                    step()
                end.record()
                torch.cuda.synchronize()
                pipelined.append(start.elapsed_time(end) / 20 / 1e3)
            rows.append({"impl": impl, "layout": layout, "strict_s": strict, "pipelined_s": pipelined})
            line = (f"{impl:9} {layout:14} strict " + "/".join(f"{t * 1e3:.3f}" for t in strict) + " ms ("
                    + "/".join(f"{nbytes / t / copy_bps:.0%}" for t in strict) + ")   pipelined "
                    + "/".join(f"{t * 1e3:.3f}" for t in pipelined) + " ms ("
                    + "/".join(f"{nbytes / t / copy_bps:.0%}" for t in pipelined) + ")")
            print(line)
            SUMMARY.append("module fwd+bwd " + line)
    (OUT / "spread.json").write_text(json.dumps({"shape": list(SHAPE), "copy_events_GB_per_s": copy_bps / 1e9,
                                                  "rows": rows, "what": SPREAD_WHAT}, indent=1))


if __name__ == "__main__":
    main()

"""How fast is batch norm, and how close to the memory's limit? ``python -m bn_course.bench``

    python -m bn_course.bench                      # the full table on this machine (a minute or two)
    python -m bn_course.bench --save results.json  # ... and keep it
    python -m bn_course.bench --quick              # tiny sizes, few repeats: checks that it runs (targets not judged)

Every time is the median of ``repeats`` runs after warm-up runs (on a GPU, with the
device synchronized around each run; on one CPU thread, by the thread's CPU time:
see ``clock_for``). On the CPU the default is one thread: the
numbers are steadier, and with two threads we saw the compiled code's OpenMP
threads and ATen's compete on a 2-core machine (tens of ms for a tiny tensor). BN is memory-bound, so each result is also
given as an *effective bandwidth*: the bytes the least possible number of passes
over memory must move (``PASSES``) divided by the time, and as a fraction of the
bandwidth of a plain copy of the same tensor (which reads and writes it once).

Implementations: ``numpy`` (bn_course.numpy_bn, CPU only), ``from-scratch``
(bn_course.torch_bn.BatchNorm), ``native`` (torch.nn.BatchNorm2d), ``compiled``
(bn_course.fused_bn.FusedBatchNorm, the from-scratch math through torch.compile),
``triton`` (bn_course.triton_bn.TritonBatchNorm, hand-written kernels: GPU and
contiguous layout only, since on a CPU they run in Triton's interpreter, which checks
them but is far too slow to time).
Also measured, against the course's speed targets: the staged vs the compact NumPy backward
(compact at least 2x faster), the from-scratch module vs nn.BatchNorm2d (within 3x), and the
compiled (within 1.2x on a CPU) and Triton modules vs nn.BatchNorm2d (on a GPU: faster than
native NCHW, and at least 70% of copy bandwidth).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from bn_course import fused_bn, numpy_bn, torch_bn

# Least number of passes over a tensor of x's size (each pass reads or writes it once).
PASSES = {"forward": 3, "forward+backward": 8}
IMPLEMENTATIONS = ("numpy", "from-scratch", "native", "compiled", "triton")
LAYOUTS = ("contiguous", "channels_last")
CPU_SIZES = ((16, 64, 32, 32), (64, 64, 32, 32), (64, 64, 64, 64))
GPU_SIZES = ((32, 64, 56, 56), (256, 64, 56, 56))
QUICK_SIZES = ((4, 8, 8, 8),)
TARGET_SHAPE = (64, 64, 32, 32)  # the CPU speed targets are stated at this size
GPU_TARGET_SHAPE = (256, 64, 56, 56)  # the GPU target's size (float32, contiguous NCHW)
# Paired ratio module / nn.BatchNorm2d, forward+backward, that each target allows.
CPU_TARGETS = {"from-scratch": 3.0, "compiled": 1.2}
GPU_TARGETS = {"compiled": 1.0, "triton": 1.0}  # and at least GPU_MIN_FRACTION_OF_COPY of copy bandwidth
GPU_MIN_FRACTION_OF_COPY = 0.7
REFERENCE_DIR = Path(__file__).resolve().parent / "reference"


# --- measuring -----------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock_for(device):
    """The clock to time with, and its name.

    One CPU thread: ``time.thread_time``, the CPU time this thread used, which leaves out the
    time the operating system gives to other programs (a shared machine stays measurable).
    Several threads or a GPU: wall time, ``time.perf_counter``.
    """
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time, "thread CPU time"
    return time.perf_counter, "wall time"


def median_time(fn, repeats=10, warmup=2, device=torch.device("cpu")):
    """Median time of ``fn()`` in seconds over ``repeats`` runs, after ``warmup`` runs."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}.")
    clock, _ = clock_for(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        _sync(device)
        times.append(clock() - start)
    return statistics.median(times)


def alternate_times(fn_a, fn_b, repeats=10, warmup=2, device=torch.device("cpu")):
    """Time ``fn_a()`` and ``fn_b()`` back to back, ``repeats`` times, the one that goes first
    alternating. Returns ``(times_a, times_b)``, two lists of ``repeats`` seconds.

    The two runs of a pair see the same load from other programs, so the ratio of a pair is
    steadier than the ratio of two medians measured at different moments.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}.")
    clock, _ = clock_for(device)
    for _ in range(warmup):
        fn_a()
        fn_b()
    times_a, times_b = [], []
    for i in range(repeats):
        order = ((fn_a, times_a), (fn_b, times_b)) if i % 2 == 0 else ((fn_b, times_b), (fn_a, times_a))
        for fn, into in order:
            _sync(device)
            start = clock()
            fn()
            _sync(device)
            into.append(clock() - start)
    return times_a, times_b


def paired_ratio(fn_a, fn_b, repeats=10, warmup=2, device=torch.device("cpu")):
    """Median over ``repeats`` pairs of time(fn_a) / time(fn_b), timed by :func:`alternate_times`."""
    times_a, times_b = alternate_times(fn_a, fn_b, repeats, warmup, device)
    return statistics.median(a / b for a, b in zip(times_a, times_b))


def tensor_bytes(shape, dtype=torch.float32):
    """Bytes of one tensor of this shape: one pass over memory."""
    return int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()


def bytes_moved(shape, direction, dtype=torch.float32):
    """Least bytes a training step must move: PASSES[direction] passes of a tensor of x's size."""
    return PASSES[direction] * tensor_bytes(shape, dtype)


def copy_bandwidth(shape, dtype=torch.float32, device=torch.device("cpu"), repeats=10):
    """Bytes per second of ``y.copy_(x)``: the memory system's practical speed (2 passes)."""
    x = torch.randn(shape, dtype=dtype, device=device)
    y = torch.empty_like(x)
    seconds = median_time(lambda: y.copy_(x), repeats, device=device)
    return 2 * tensor_bytes(shape, dtype) / seconds, seconds


# --- one step of each implementation -----------------------------------------------------------

def _make_module(impl, C, dtype, device):
    if impl == "from-scratch":
        return torch_bn.BatchNorm(C, dtype=dtype, device=device)
    if impl == "native":
        return torch.nn.BatchNorm2d(C, dtype=dtype, device=device)
    if impl == "compiled":
        return fused_bn.FusedBatchNorm(C, compile=True, dtype=dtype, device=device)
    if impl == "triton":
        from bn_course import triton_bn  # needs Triton: imported only when asked for
        return triton_bn.TritonBatchNorm(C, dtype=dtype, device=device)
    raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLEMENTATIONS}.")


def make_step(impl, shape, direction, layout="contiguous", dtype=torch.float32, device=torch.device("cpu")):
    """A zero-argument function running one training-mode BN step (``direction``) on fixed data."""
    if direction not in PASSES:
        raise ValueError(f"direction must be one of {tuple(PASSES)}, got {direction!r}.")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
    C = shape[1]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    dout = torch.randn(shape, generator=gen, dtype=dtype)

    if impl == "numpy":
        if device.type != "cpu" or layout != "contiguous":
            raise ValueError("the numpy implementation runs on the CPU on contiguous arrays only.")
        x_np, dout_np = x.numpy(), dout.numpy()
        gamma, beta = np.ones(C, x_np.dtype), np.zeros(C, x_np.dtype)
        if direction == "forward":
            return lambda: numpy_bn.batchnorm_forward(x_np, gamma, beta)
        return lambda: numpy_bn.batchnorm_backward(dout_np, numpy_bn.batchnorm_forward(x_np, gamma, beta)[1])

    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = x.to(device).contiguous(memory_format=memory_format)
    dout = dout.to(device).contiguous(memory_format=memory_format)
    module = _make_module(impl, C, dtype, device)
    if direction == "forward":
        def forward():
            with torch.no_grad():
                return module(x)
        return forward
    x.requires_grad_(True)
    params = (x, module.weight, module.bias)
    return lambda: torch.autograd.grad(module(x), params, dout)


def time_step(impl, shape, direction, layout="contiguous", repeats=10, dtype=torch.float32,
              device=torch.device("cpu")):
    """Median seconds of one step; the first call (which compiles, for ``compiled``) is not counted."""
    step = make_step(impl, shape, direction, layout, dtype, device)
    return median_time(step, repeats, warmup=2, device=device)


# --- the tables -----------------------------------------------------------------------------------

def triton_available():
    """Whether bn_course.triton_bn imports here (Triton installs on Linux x86-64 only)."""
    try:
        from bn_course import triton_bn  # noqa: F401
    except ImportError:
        return False
    return True


def measurable(impl, layout, device):
    """Whether ``impl`` is timed here: NumPy on the CPU, Triton's kernels on a GPU, both contiguous only."""
    if impl == "numpy":
        return device.type == "cpu" and layout == "contiguous"
    if impl == "triton":
        return device.type == "cuda" and layout == "contiguous" and triton_available()
    return True


def bandwidth_table(shapes, impls=IMPLEMENTATIONS, layouts=LAYOUTS, directions=tuple(PASSES),
                    repeats=10, dtype=torch.float32, device=torch.device("cpu"), progress=None):
    """Rows of {shape, impl, layout, direction, seconds, GB/s, fraction of copy} for every combination.

    numpy runs only on the CPU and only contiguous; triton only on a GPU and only contiguous
    (``measurable``). ``progress``: optional callable(str) told each step.
    """
    rows = []
    for shape in shapes:
        copy_bps, copy_s = copy_bandwidth(shape, dtype, device, repeats)
        rows.append({"shape": list(shape), "impl": "copy", "layout": "contiguous", "direction": "copy",
                     "seconds": copy_s, "GB_per_s": copy_bps / 1e9, "fraction_of_copy": 1.0})
        for impl in impls:
            for layout in layouts:
                if not measurable(impl, layout, device):
                    continue
                for direction in directions:
                    if progress:
                        progress(f"{impl} {layout} {direction} {tuple(shape)}")
                    seconds = time_step(impl, shape, direction, layout, repeats, dtype, device)
                    bps = bytes_moved(shape, direction, dtype) / seconds
                    rows.append({"shape": list(shape), "impl": impl, "layout": layout, "direction": direction,
                                 "seconds": seconds, "GB_per_s": bps / 1e9, "fraction_of_copy": bps / copy_bps})
    return rows


def numpy_backward_speed(shape=TARGET_SHAPE, repeats=10):
    """Seconds of the staged and the compact NumPy backward pass, and their paired ratio
    (``numpy_bn.time_backward``, which notebook 03 runs)."""
    times = numpy_bn.time_backward(shape=shape, repeats=repeats, seed=0)
    return {"shape": list(shape), "staged_s": times["staged"], "compact_s": times["compact"],
            "staged_over_compact": times["ratio"]}


def module_vs_native(impl, shape=TARGET_SHAPE, repeats=10, layout="contiguous", device=torch.device("cpu")):
    """Forward + backward of ``impl`` against nn.BatchNorm2d: both medians, and the paired ratio impl / native."""
    step = make_step(impl, shape, "forward+backward", layout, device=device)
    native = make_step("native", shape, "forward+backward", layout, device=device)
    step()  # the first call compiles, for ``compiled``
    return {"impl": impl, "shape": list(shape), "layout": layout,
            "impl_s": median_time(step, repeats, device=device),
            "native_s": median_time(native, repeats, device=device),
            "ratio": paired_ratio(step, native, repeats, device=device)}


def compile_seconds(shape, device=torch.device("cpu")):
    """Wall time of the first compiled forward + backward at ``shape``: generating and compiling code."""
    step = make_step("compiled", shape, "forward+backward", device=device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


# --- the run, its record and its printout ----------------------------------------------------------

def _device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(sizes=None, repeats=10, target_shape=None, device=None, threads=None,
        impls=IMPLEMENTATIONS, progress=None, judge_targets=True):
    """Every measurement of this module, as one JSON-ready dict (also what ``--save`` writes).

    target_shape: where the module-vs-native ratios are measured (default: where the targets
    are stated, ``TARGET_SHAPE`` on a CPU, ``GPU_TARGET_SHAPE`` on a GPU). ``judge_targets=False``
    (``--quick``) still measures the ratios but says "met" or "not met" to none of them.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if threads is not None:
        torch.set_num_threads(threads)
    if sizes is None:
        sizes = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    if target_shape is None:
        target_shape = GPU_TARGET_SHAPE if device.type == "cuda" else TARGET_SHAPE
    result = {"meta": {
        "device": str(device), "device_name": _device_name(device), "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "repeats": repeats, "statistic": "median", "clock": clock_for(device)[1], "passes": PASSES,
        "targets_judged": bool(judge_targets),
        "command": "python -m bn_course.bench " + " ".join(sys.argv[1:]) if __name__ == "__main__" else "bn_course.bench.run()",
    }}
    if "compiled" in impls:
        result["compile_seconds"] = compile_seconds(sizes[0], device)  # first use: code generation
    result["bandwidth"] = bandwidth_table(sizes, impls, repeats=repeats, device=device, progress=progress)
    if device.type == "cpu":
        result["numpy_backward"] = numpy_backward_speed(target_shape, repeats)
    result["vs_native"] = [module_vs_native(impl, target_shape, repeats, device=device)
                           for impl in ("from-scratch", "compiled", "triton")
                           if impl in impls and measurable(impl, "contiguous", device)]
    return result


def format_rows(rows):
    """Rows of ``bandwidth_table`` as aligned text, one line each."""
    lines = [f"{'shape':>18} {'implementation':>14} {'layout':>14} {'direction':>17} "
             f"{'ms':>9} {'MB/pass':>8} {'GB/s':>7} {'of copy':>8}"]
    for row in rows:
        mb = tensor_bytes(row["shape"]) / 1e6
        lines.append(f"{str(tuple(row['shape'])):>18} {row['impl']:>14} {row['layout']:>14} {row['direction']:>17} "
                     f"{row['seconds'] * 1e3:9.3f} {mb:8.1f} {row['GB_per_s']:7.1f} {row['fraction_of_copy']:8.0%}")
    return "\n".join(lines)


def _verdict(applies, met, target):
    """' (target: ...: met)' where the target is stated for this measurement, else a note that it is not judged."""
    if not applies:
        return " (target not judged here)"
    return f" (target: {target}: {'met' if met else 'NOT met'})"


def format_table(result):
    """The measurements as aligned text, one line per row, then the targets."""
    meta = result["meta"]
    lines = [f"batch norm, training mode, float32 on {meta['device']} ({meta['device_name']}), "
             f"{meta['torch_threads']} thread(s), torch {meta['torch']}; median of {meta['repeats']} runs "
             f"({meta['clock']})",
             f"least bytes moved: forward {PASSES['forward']} passes, forward+backward "
             f"{PASSES['forward+backward']} passes of x's size; GB/s = those bytes / median time; "
             "'of copy' = GB/s / the copy's GB/s at that shape",
             "", format_rows(result["bandwidth"])]
    if "compile_seconds" in result:
        lines.append(f"\nfirst call of the compiled module (code generation and compilation): "
                     f"{result['compile_seconds']:.1f} s")
    judged = meta.get("targets_judged", True)
    lines.append("\ntargets: each ratio is the median of the ratios of runs taken alternately (paired), not "
                 "the ratio of\nthe two medians shown with it, which were taken at different moments")
    if not judged:
        lines.append("(quick mode: targets NOT judged; at these tiny sizes Python overhead, not memory, "
                     "sets the time)")
    if "numpy_backward" in result:
        nb = result["numpy_backward"]
        lines.append(f"NumPy backward at {tuple(nb['shape'])}: staged {nb['staged_s'] * 1e3:.3g} ms, compact "
                     f"{nb['compact_s'] * 1e3:.3g} ms (medians); "
                     f"paired ratio staged/compact {nb['staged_over_compact']:.2f}x"
                     + _verdict(judged and tuple(nb["shape"]) == TARGET_SHAPE, nb["staged_over_compact"] >= 2,
                                "compact at least 2x faster"))
    on_gpu = meta["device"].startswith("cuda")
    for v in result.get("vs_native", []):
        shape = tuple(v["shape"])
        line = (f"{v['impl']} vs nn.BatchNorm2d, forward+backward at {shape} {v['layout']}: "
                f"{v['impl_s'] * 1e3:.3g} ms vs {v['native_s'] * 1e3:.3g} ms (medians); "
                f"paired ratio {v['impl']}/native {v['ratio']:.2f}x")
        if on_gpu:
            limit = GPU_TARGETS.get(v["impl"])
            fraction = next((r["fraction_of_copy"] for r in result["bandwidth"]
                             if (r["impl"], r["layout"], r["direction"]) == (v["impl"], v["layout"], "forward+backward")
                             and tuple(r["shape"]) == shape), None)
            applies = judged and limit is not None and shape == GPU_TARGET_SHAPE and fraction is not None
            line += _verdict(applies, applies and v["ratio"] < limit and fraction >= GPU_MIN_FRACTION_OF_COPY,
                             f"faster than native NCHW and >= {GPU_MIN_FRACTION_OF_COPY:.0%} of copy"
                             + (f"; it reaches {fraction:.0%}" if fraction is not None else ""))
        else:
            limit = CPU_TARGETS.get(v["impl"])
            applies = judged and limit is not None and shape == TARGET_SHAPE
            line += _verdict(applies, applies and v["ratio"] <= limit, f"within {limit or 0:g}x")
        lines.append(line)
    return "\n".join(lines)


def load_reference(name="h100"):
    """Measurements shipped with the course (made elsewhere, by the source they name)."""
    path = REFERENCE_DIR / f"{name}.json"
    if not path.exists():
        known = sorted(p.stem for p in REFERENCE_DIR.glob("*.json"))
        raise FileNotFoundError(f"no reference data named {name!r}; available: {known}.")
    return json.loads(path.read_text())


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bn_course.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 3 repeats: checks that it runs")
    parser.add_argument("--sizes", type=str, default=None,
                        help="shapes N,C,H,W separated by ';', e.g. '16,64,32,32;64,64,32,32'")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 10)")
    parser.add_argument("--device", type=str, default=None, help="cpu or cuda (default: bn_course.get_device())")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: steady numbers on a shared machine; see the module doc)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile'd module")
    parser.add_argument("--save", type=str, default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)

    from bn_course import get_device
    device = torch.device(args.device) if args.device else get_device()
    sizes = None
    if args.sizes:
        try:
            sizes = [tuple(int(n) for n in s.split(",")) for s in args.sizes.split(";") if s.strip()]
        except ValueError:
            parser.error(f"--sizes must look like '16,64,32,32;64,64,32,32', got {args.sizes!r}")
        if any(len(s) != 4 for s in sizes):
            parser.error(f"--sizes takes 4-D shapes N,C,H,W (as nn.BatchNorm2d), got {sizes}")
    repeats = args.repeats or 10
    target = None  # where the targets are stated, for this device
    if args.quick:
        sizes, target, repeats = sizes or QUICK_SIZES, QUICK_SIZES[0], args.repeats or 3
    impls = tuple(i for i in IMPLEMENTATIONS if not (args.no_compile and i == "compiled"))
    result = run(sizes, repeats, target, device, args.threads, impls,
                 progress=lambda s: print("  measuring", s, file=sys.stderr, flush=True),
                 judge_targets=not args.quick)
    print(format_table(result))
    if args.save:
        Path(args.save).write_text(json.dumps(result, indent=2))
        print(f"\nsaved to {args.save}")
    return result


if __name__ == "__main__":
    main()

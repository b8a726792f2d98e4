"""Start N processes on this machine that share one ``torch.distributed`` process group.

``launch(fn, world_size=2, args=(...))`` runs ``fn(rank, world_size, *args)`` in
``world_size`` fresh Python processes joined by the gloo backend (CPU, no GPU
needed), waits for all of them and returns their results as a list indexed by
rank. It is made to be called from a notebook cell or a test:

- the run has a deadline (``timeout`` seconds, start-up included): a hang
  becomes a ``LaunchTimeout``, never a frozen notebook;
- an exception in one process comes back as a ``WorkerError`` that names the
  rank and carries that process's traceback; the other processes, which may be
  waiting for it inside a collective, are stopped at once;
- the processes are always stopped, also when the caller is interrupted (a
  failing or interrupted cell), and their files are deleted; a process whose
  parent disappears stops by itself.

Each process is a new interpreter (``python -m bn_course.launch``), so ``fn``
must be importable by name: a function at the top level of a ``.py`` module,
not one defined in a notebook cell. Arguments and results travel as pickles
through a temporary folder; what a process prints goes to a log file there,
whose end is quoted when that process fails.
"""

import importlib
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from datetime import timedelta

_POLL_SECONDS = 0.02   # how often the parent looks at its processes
_LOG_TAIL_CHARS = 3000  # how much of a failed process's output an error quotes


_LIVE = set()  # processes started here and not yet reaped: see live_processes()


class WorkerError(RuntimeError):
    """A launched process raised an exception or died before returning its result."""


class LaunchTimeout(TimeoutError):
    """The launched processes did not all finish before the deadline."""


def _check_importable(fn):
    """A new interpreter imports ``fn`` by module and name: check that it can."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", "")
    if not callable(fn) or module is None:
        raise TypeError(f"launch() needs a function, got {fn!r}.")
    if module == "__main__" or "<" in qualname or "." in qualname:
        raise ValueError(
            f"launch() cannot run {qualname or fn!r} (module {module!r}): each process is a fresh "
            "Python interpreter that imports the function by name, so it must be defined at the top "
            "level of an importable .py module (for example bn_course.sync_bn.sync_bn_demo), not in "
            "a notebook cell, a lambda or a nested function."
        )
    return module, qualname


def _paths(workdir, rank):
    """The files one rank uses: its job, its result (or error) and its log."""
    base = os.path.join(workdir, f"rank{rank}")
    return {"job": base + ".job", "result": base + ".result", "error": base + ".error", "log": base + ".log"}


def _write_atomically(path, data):
    """Write then rename, so the parent never reads half a file."""
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def _log_tail(path):
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    return text[-_LOG_TAIL_CHARS:].strip()


def _exit_when_orphaned(parent_pid, workdir):
    """Stop this process if its parent (the notebook kernel or test) disappears.

    The parent, killed outright, could not delete the launch folder: the first rank to notice does.
    """
    while True:
        if os.getppid() != parent_pid:
            shutil.rmtree(workdir, ignore_errors=True)
            os._exit(3)
        time.sleep(0.5)


def _worker_main(job_path):
    """What each launched process runs: join the group, call the function, write the result."""
    with open(job_path, "rb") as f:
        job = pickle.load(f)
    threading.Thread(target=_exit_when_orphaned, args=(job["parent_pid"], job["workdir"]),
                     daemon=True).start()
    rank, files = job["rank"], _paths(job["workdir"], job["rank"])

    import torch
    import torch.distributed as dist

    exit_code = 0
    try:
        torch.set_num_threads(1)  # the processes share the machine's cores
        dist.init_process_group(job["backend"], init_method="file://" + job["rendezvous"],
                                rank=rank, world_size=job["world_size"],
                                timeout=timedelta(seconds=job["timeout"]))
        fn = getattr(importlib.import_module(job["module"]), job["qualname"])
        result = fn(rank, job["world_size"], *job["args"])
        _write_atomically(files["result"], pickle.dumps(result))
    except BaseException:
        _write_atomically(files["error"], traceback.format_exc().encode())
        exit_code = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Leave at once: the result is on disk, and tearing down a Python with torch loaded takes seconds.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def _start(rank, world_size, workdir, module, qualname, args, backend, timeout):
    """Write rank's job file and start its interpreter, output going to its log file."""
    files = _paths(workdir, rank)
    job = {"rank": rank, "world_size": world_size, "workdir": workdir, "module": module,
           "qualname": qualname, "args": tuple(args), "backend": backend, "timeout": float(timeout),
           "rendezvous": os.path.join(workdir, "rendezvous"), "parent_pid": os.getpid()}
    _write_atomically(files["job"], pickle.dumps(job))
    env = dict(os.environ)
    # the new interpreter finds the same modules as this one (bn_course, test files, ...)
    env["PYTHONPATH"] = os.pathsep.join([p or os.getcwd() for p in sys.path])
    env.setdefault("OMP_NUM_THREADS", "1")
    with open(files["log"], "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "bn_course.launch", files["job"]],
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    _LIVE.add(process)
    return process


def _failure_time(rank, workdir):
    """When a rank wrote its error (inf if it wrote none): the first to fail is the likely cause."""
    try:
        return os.path.getmtime(_paths(workdir, rank)["error"])
    except OSError:
        return float("inf")


def _raise_failure(failed, processes, workdir):
    """Raise a WorkerError for the rank that failed first, naming the others that stopped with it."""
    world_size = len(processes)
    rank = min(failed, key=lambda r: _failure_time(r, workdir))
    files = _paths(workdir, rank)
    others = sorted(set(failed) - {rank})
    also = (f" Rank(s) {others} failed too, most likely in consequence (a peer that stops "
            "breaks the collectives of the others)." if others else "")
    if os.path.exists(files["error"]):
        with open(files["error"], errors="replace") as f:
            raise WorkerError(f"rank {rank} of {world_size} raised an exception; all processes were "
                              f"stopped.{also} Its traceback:\n\n{f.read()}")
    raise WorkerError(
        f"rank {rank} of {world_size} exited with code {processes[rank].returncode} without a result "
        f"(it crashed or was killed); all processes were stopped.{also} Its last output:\n\n"
        f"{_log_tail(files['log'])}"
    )


def _collect(processes, workdir, timeout):
    """Wait for every rank; raise as soon as one fails or the deadline passes."""
    world_size = len(processes)
    results = [None] * world_size
    pending = set(range(world_size))
    deadline = time.monotonic() + timeout
    while pending:
        failed = []
        for rank in sorted(pending):
            process = processes[rank]
            if process.poll() is None:
                continue
            result_file = _paths(workdir, rank)["result"]
            if process.returncode == 0 and os.path.exists(result_file):
                with open(result_file, "rb") as f:
                    results[rank] = pickle.load(f)
                pending.discard(rank)
            else:
                failed.append(rank)
        if failed:
            time.sleep(0.2)  # let a rank that failed at the same moment write its error too
            # ... and count it; a rank that exited with code 0 but wrote no result stays in the list
            failed = sorted(set(failed) | {r for r in range(world_size) if processes[r].poll() not in (None, 0)})
            _raise_failure(failed, processes, workdir)
        if pending and time.monotonic() > deadline:
            tails = "\n".join(f"--- rank {r} ---\n{_log_tail(_paths(workdir, r)['log'])}" for r in sorted(pending))
            raise LaunchTimeout(
                f"rank(s) {sorted(pending)} of {world_size} did not finish within {timeout:g} s; all "
                "processes were stopped. A collective (all_reduce, ...) that not every rank reaches "
                "waits forever: check that every rank runs the same collectives, or raise `timeout` "
                f"if the work is simply slow. Their last output:\n{tails}"
            )
        time.sleep(_POLL_SECONDS)
    return results


def _stop(processes):
    """Terminate every process still running, then kill any that ignores it; reap them all."""
    for p in processes:
        if p.poll() is None:
            p.terminate()
    for p in processes:
        try:
            p.wait(2.0)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        _LIVE.discard(p)


def live_processes():
    """How many processes started by ``launch`` are still running (0 once every call has returned)."""
    return sum(p.poll() is None for p in _LIVE)


def launch(fn, world_size=2, args=(), timeout=60.0, backend="gloo"):
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes of one process group.

    fn: a top-level function of an importable module; it may use ``torch.distributed``
        collectives: the group is initialized before it runs and destroyed after.
    args: extra arguments, the same for every rank (tensors are fine; they are pickled).
    timeout: seconds for the whole run, start-up included (also each collective's timeout).
    Returns ``[result of rank 0, result of rank 1, ...]``; results must be picklable.
    Raises ``WorkerError`` (naming the rank, with its traceback) or ``LaunchTimeout``.
    """
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive int (the number of processes), got {world_size!r}.")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}.")
    module, qualname = _check_importable(fn)
    try:
        pickle.dumps(tuple(args))
    except Exception as err:
        raise TypeError(f"launch(): the args must be picklable to reach the new processes: {err}") from None

    workdir = tempfile.mkdtemp(prefix="bn_course_launch_")
    processes = []
    try:
        for rank in range(world_size):
            processes.append(_start(rank, world_size, workdir, module, qualname, args, backend, timeout))
        return _collect(processes, workdir, timeout)
    finally:  # success, error, timeout or an interrupted cell: nothing outlives the call
        _stop(processes)
        shutil.rmtree(workdir, ignore_errors=True)


def demo_rank_fails(rank, world_size, bad_rank=1):
    """A worker that goes wrong on purpose: ``bad_rank`` raises while the others wait in an all-reduce.

    Left alone, the waiting ranks would block until gloo's own timeout; the launcher
    notices the failed rank and stops them, so the caller gets a ``WorkerError`` at once.
    """
    import torch
    import torch.distributed as dist

    if rank == bad_rank:
        raise RuntimeError(f"rank {rank} failed on purpose (a stand-in for a real bug)")
    t = torch.ones(1)
    dist.all_reduce(t)  # waits for bad_rank, which never comes
    return float(t)


if __name__ == "__main__":
    _worker_main(sys.argv[1])

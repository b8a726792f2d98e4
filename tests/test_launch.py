"""bn_course.launch: N gloo processes from a test or a notebook, with deadlines and clean-up."""

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from bn_course import launch


# Workers must be importable by name in a fresh interpreter: top-level functions of this module.

def worker_rank_and_sum(rank, world_size, scale):
    """Each rank returns its rank and the all-reduced sum of (rank + 1) * scale."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(rank + 1) * scale])
    dist.all_reduce(t)
    return rank, float(t)


def worker_hangs(rank, world_size):
    time.sleep(600)


def worker_exits_quietly(rank, world_size):
    if rank == 0:
        os._exit(0)  # exit code 0, yet no result
    time.sleep(600)


def worker_writes_pid_and_hangs(rank, world_size, folder):
    # written under another name, then renamed: the test never sees a pid file that is still empty
    with open(os.path.join(folder, f"tmp{rank}"), "w") as f:
        f.write(str(os.getpid()))
    os.replace(os.path.join(folder, f"tmp{rank}"), os.path.join(folder, f"pid{rank}"))
    time.sleep(600)


def _running(pid):
    """True while process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read()
    except OSError:
        return False


def worker_crashes(rank, world_size):
    if rank == 0:
        print("about to crash", flush=True)
        os._exit(7)  # no exception, no result: like a segfault or an OOM kill
    time.sleep(600)


@pytest.fixture(autouse=True)
def private_tmp(tmp_path, monkeypatch):
    """Each test's rendezvous folders go to its own tmp dir, so we can check they are deleted."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    yield tmp_path
    assert launch.live_processes() == 0, "a launched process outlived its launch() call"
    assert not list(tmp_path.glob("bn_course_launch_*")), "the launch folder was not deleted"


def test_results_come_back_in_rank_order():
    world_size = 3  # (2 processes: tests/test_sync_bn.py and notebook 10)
    results = launch.launch(worker_rank_and_sum, world_size, args=(10.0,), timeout=120)
    total = 10.0 * world_size * (world_size + 1) / 2
    assert results == [(rank, total) for rank in range(world_size)]


def test_a_failing_rank_is_reported_with_its_traceback_and_no_hang():
    start = time.monotonic()
    with pytest.raises(launch.WorkerError) as info:
        launch.launch(launch.demo_rank_fails, 2, args=(1,), timeout=120)
    message = str(info.value)
    assert "rank 1 of 2 raised" in message
    assert "failed on purpose" in message  # the worker's own traceback
    assert time.monotonic() - start < 100  # long before the deadline


def test_a_crashed_rank_is_reported_with_its_exit_code_and_output():
    with pytest.raises(launch.WorkerError) as info:
        launch.launch(worker_crashes, 2, timeout=120)
    message = str(info.value)
    assert "rank 0 of 2 exited with code 7" in message
    assert "about to crash" in message


def test_a_rank_that_exits_without_a_result_is_reported():
    with pytest.raises(launch.WorkerError, match="rank 0 of 2 exited with code 0 without a result"):
        launch.launch(worker_exits_quietly, 2, timeout=120)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_processes_stop_by_themselves_when_the_caller_is_killed(private_tmp):
    """A kernel killed outright runs no clean-up: the processes notice and stop, and delete the folder."""
    pids_dir = private_tmp / "pids"
    pids_dir.mkdir()
    code = ("import sys, tempfile; sys.path[:0] = sys.argv[1:3]; tempfile.tempdir = sys.argv[3]\n"
            "import test_launch; from bn_course import launch\n"
            "launch.launch(test_launch.worker_writes_pid_and_hangs, 2, args=(sys.argv[4],), timeout=300)")
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    parent = subprocess.Popen([sys.executable, "-c", code, here, root, str(private_tmp), str(pids_dir)])
    try:
        deadline = time.monotonic() + 120
        while len(list(pids_dir.glob("pid*"))) < 2:
            assert time.monotonic() < deadline and parent.poll() is None, "the processes did not start"
            time.sleep(0.2)
        pids = [int(f.read_text()) for f in pids_dir.glob("pid*")]
    finally:
        parent.send_signal(signal.SIGKILL)  # no finally block runs in the parent
        parent.wait()
    deadline = time.monotonic() + 20
    while any(_running(pid) for pid in pids) or list(private_tmp.glob("bn_course_launch_*")):
        assert time.monotonic() < deadline, "orphaned processes or their folder outlived the caller"
        time.sleep(0.2)


def test_a_hang_ends_at_the_deadline():
    start = time.monotonic()
    with pytest.raises(launch.LaunchTimeout) as info:
        launch.launch(worker_hangs, 2, timeout=3)
    assert "did not finish within 3 s" in str(info.value)
    assert time.monotonic() - start < 30


def test_processes_are_stopped_when_the_caller_is_interrupted(monkeypatch):
    def interrupted(processes, workdir, timeout):
        assert all(p.poll() is None for p in processes)  # they are running ...
        raise KeyboardInterrupt  # ... when the cell is interrupted

    monkeypatch.setattr(launch, "_collect", interrupted)
    with pytest.raises(KeyboardInterrupt):
        launch.launch(worker_hangs, 2, timeout=120)
    # the fixture checks that nothing is left running and the folder is gone


def test_lambdas_and_nested_functions_are_refused():
    def nested(rank, world_size):
        return rank

    for fn in (lambda rank, world_size: rank, nested):
        with pytest.raises(ValueError, match="not in a notebook cell, a lambda or a nested function"):
            launch.launch(fn, 2)


def test_something_that_is_not_a_function_is_refused():
    with pytest.raises(TypeError, match="needs a function"):
        launch.launch(42, 2)


def test_a_function_from_a_notebook_cell_is_refused():
    def cell_function(rank, world_size):
        return rank

    cell_function.__module__ = "__main__"
    with pytest.raises(ValueError, match="importable .py module"):
        launch.launch(cell_function, 2)


@pytest.mark.parametrize("kwargs, match", [
    ({"world_size": 0}, "world_size must be a positive int"),
    ({"world_size": 2.0}, "world_size must be a positive int"),
    ({"timeout": 0}, "timeout must be a positive number"),
    ({"args": (lambda: 0,)}, "args must be picklable"),
])
def test_bad_arguments_get_clear_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        launch.launch(worker_rank_and_sum, **kwargs)

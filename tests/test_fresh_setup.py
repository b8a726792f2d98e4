"""The README's two commands, run as written on a fresh clone: what a new learner does first.

Slow (minutes: a fresh virtual environment with torch), so it runs only when BN_COURSE_SLOW=1,
which .ci/run sets. It clones the committed repository (untracked files are not in the clone, as
they are not in a learner's), runs each README command in its own clone and reports the time and
the disk it took. BN_COURSE_FRESH_SOURCE may name another git repository to clone.
"""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE = os.environ.get("BN_COURSE_FRESH_SOURCE", str(REPO))
INSTALL_TIMEOUT_S = 1800

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(2 * INSTALL_TIMEOUT_S),
    pytest.mark.skipif(os.environ.get("BN_COURSE_SLOW") != "1",
                       reason="slow (a fresh install from scratch): set BN_COURSE_SLOW=1 to run it, as .ci/run does"),
]


def _readme_commands(readme_text):
    blocks = re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", readme_text, re.S)
    commands = [ln.strip() for b in blocks for ln in b.splitlines() if ln.strip().startswith("python3.11")]
    assert len(commands) == 2, commands
    return commands  # open the course, run every test


@pytest.fixture
def clone(tmp_path):
    """A fresh clone of the committed course; removed afterwards (its .venv holds gigabytes)."""
    target = tmp_path / "course"
    subprocess.run(["git", "clone", "--quiet", SOURCE, str(target)], check=True)
    yield target
    shutil.rmtree(target, ignore_errors=True)


def _clean_env(tmp_path):
    """The environment of a new shell: no active virtualenv, no PYTHONPATH, Jupyter dirs in tmp."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if "/.venv/" not in p + "/")
    for var in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "MPLCONFIGDIR"):
        env[var] = str(tmp_path / "home" / var.lower())
        os.makedirs(env[var], exist_ok=True)
    env.pop("BN_COURSE_SLOW", None)  # the clone's own tests must not recurse into this one
    return env


def _disk_mb(folder):
    out = subprocess.run(["du", "-sm", str(folder)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def test_readme_test_command_sets_up_a_working_environment(tmp_path, clone):
    _, run_tests = _readme_commands((clone / "README.md").read_text())
    set_up, sep, _ = run_tests.partition(" && .venv/bin/python -m pytest")
    assert sep, f"the README's test command ends by running pytest: {run_tests}"
    env = _clean_env(tmp_path)

    start = time.monotonic()
    subprocess.run(["bash", "-c", set_up], cwd=clone, env=env, check=True, timeout=INSTALL_TIMEOUT_S)
    minutes = (time.monotonic() - start) / 60
    print(f"\nset-up part of the README's test command: {minutes:.1f} min, .venv {_disk_mb(clone / '.venv')} MB")

    python = str(clone / ".venv" / "bin" / "python")
    where = subprocess.run([python, "-c", "import bn_course, torch, ipywidgets, nbval, playwright; "
                            "print(bn_course.__file__)"], cwd=tmp_path, env=env, check=True,
                           capture_output=True, text=True).stdout.strip()
    assert Path(where).resolve().is_relative_to(clone.resolve()), f"bn_course is imported from {where}"
    # one quick test file, with the project's own pytest configuration (one process)
    subprocess.run([python, "-m", "pytest", "tests/test_setup_files.py", "-q", "-n", "0"],
                   cwd=clone, env=env, check=True, timeout=600)

    # Binder's postBuild, run in this fresh environment: installs the package and the lab settings
    env_binder = dict(env, PATH=f"{clone / '.venv' / 'bin'}{os.pathsep}{env['PATH']}")
    subprocess.run(["bash", "binder/postBuild"], cwd=clone, env=env_binder, check=True, timeout=600)
    installed = clone / ".venv" / "share" / "jupyter" / "lab" / "settings" / "overrides.json"
    assert json.loads(installed.read_text()) == json.loads((clone / "lab-settings" / "overrides.json").read_text())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_open_command_opens_jupyterlab_at_start_here(tmp_path, clone):
    open_course, _ = _readme_commands((clone / "README.md").read_text())
    env = _clean_env(tmp_path)
    # The command runs as written. Only the server's own config (in the temporary config dir) keeps
    # it on loopback with a known port and token, without a browser, and lets it run as root in CI.
    token, port = secrets.token_hex(16), _free_port()
    (Path(env["JUPYTER_CONFIG_DIR"]) / "jupyter_server_config.json").write_text(json.dumps({
        "ServerApp": {"ip": "127.0.0.1", "port": port, "port_retries": 0, "open_browser": False,
                      "allow_root": True},
        "IdentityProvider": {"token": token},
    }))
    log = open(tmp_path / "jupyterlab.log", "w")
    start = time.monotonic()
    proc = subprocess.Popen(["bash", "-c", open_course], cwd=clone, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)

    def get(path):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}?token={token}", timeout=10) as resp:
            return json.loads(resp.read())

    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the command exited with {proc.returncode}:\n"
                            f"{(tmp_path / 'jupyterlab.log').read_text()[-3000:]}")
            try:
                get("/api/status")
                break
            except OSError:
                assert time.monotonic() - start < INSTALL_TIMEOUT_S, "JupyterLab did not answer"
                time.sleep(1)
        minutes = (time.monotonic() - start) / 60
        print(f"\nREADME's open command, until JupyterLab answers: {minutes:.1f} min, "
              f".venv {_disk_mb(clone / '.venv')} MB")
        # JupyterLab serves the notebooks folder (the folder of the file it was asked to open) ...
        assert get("/api/contents/00_start_here.ipynb")["type"] == "notebook"
        # ... and the page a browser is sent to opens 00_start_here in JupyterLab
        opens = [f.read_text() for f in Path(env["JUPYTER_RUNTIME_DIR"]).glob("jpserver-*open*.html")]
        assert any("lab/tree/00_start_here.ipynb" in page for page in opens), opens
        # the course's lab settings are in force (the command names them relative to the clone)
        tracker = get("/lab/api/settings/@jupyterlab/notebook-extension:tracker")
        assert tracker["schema"]["properties"]["windowingMode"]["default"] == "none"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()

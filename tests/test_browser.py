"""The course in real JupyterLab, in a real browser: cells run without errors, widgets render and respond.

JupyterLab runs on loopback with temporary root, config and workspace folders, a random token and
the course's own settings (``lab-settings/``, as shipped to Binder). Playwright for Python drives the
system Chromium (Debian's ``chromium`` package; no browser is downloaded). Every notebook that uses
widgets is opened, all its cells are run, and then:

- no cell has an error output, and every code cell ran;
- every widget the notebook displays is rendered (not "Loading widget..." nor a text fallback);
- moving each slider (with the keyboard, as a reader can) changes the output it drives, without error.

A small notebook made here exercises the harness itself, and a broken one shows that it catches
errors, unexecuted cells and a slider that drives nothing. On failure a screenshot is saved under
``$BN_COURSE_ARTIFACTS`` (default: a temporary folder) and its path is in the failure message.
"""

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
LAB_SETTINGS = REPO / "lab-settings"
CHROMIUM = os.environ.get("BN_COURSE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
INSTALL_HINT = ("Chromium not found: install Debian's package with "
                "`apt-get update && apt-get install -y chromium` (as CI does in .ci/run), "
                "or point BN_COURSE_CHROMIUM at a Chromium binary")
USES_WIDGETS = re.compile(r"\bipywidgets\b|\bbn_course\.widgets\b|from\s+bn_course\s+import\s+[^\n]*\bwidgets\b")
RUN_ALL_TIMEOUT_S = 420  # a notebook's budget is 60-90 s on 2 cores; leave room for a loaded machine
SLIDER_TIMEOUT_S = 60

if not Path(CHROMIUM).exists():
    pytest.skip(INSTALL_HINT, allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the test extra: pip install -e '.[test]'")


def notebooks_with_widgets(folder=REPO / "notebooks"):
    """The course notebooks whose code uses ipywidgets (directly or through bn_course.widgets)."""
    found = []
    for path in sorted(Path(folder).glob("[0-9][0-9]_*.ipynb")):
        code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        if USES_WIDGETS.search(code):
            found.append(path)
    return found


# --------------------------------------------------------------------------- notebooks made here

KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


def _notebook(*sources):
    cells = [new_markdown_cell("# made by tests/test_browser.py")] + [new_code_cell(s) for s in sources]
    return new_notebook(cells=cells, metadata={"kernelspec": KERNELSPEC})


SMALL = _notebook(
    "import ipywidgets as widgets\nfrom IPython.display import display",
    # an interactive: the slider redraws the printed output below it
    "def show(n):\n    print(f'n squared is {n * n}')\n\n"
    "display(widgets.interactive(show, n=widgets.IntSlider(value=3, min=0, max=10, continuous_update=False)))",
    # a slider at its maximum driving an Output through observe: moving it means moving it down
    "out = widgets.Output()\nm = widgets.IntSlider(value=10, min=0, max=10, description='m')\n\n"
    "def on_change(change):\n    out.clear_output()\n    with out:\n        print('m is', change['new'])\n\n"
    "m.observe(on_change, names='value')\non_change({'new': m.value})\ndisplay(widgets.VBox([m, out]))",
    "print('done')",
)

BROKEN = _notebook(
    "import ipywidgets as widgets\nfrom IPython.display import display",
    "display(widgets.IntSlider(value=5, min=0, max=10, description='idle'))  # drives nothing",
    "raise ValueError('this cell fails on purpose')",
    "print('never reached: Run All stops at the error')",
)


# --------------------------------------------------------------------------- JupyterLab and Chromium


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Lab:
    url: str
    token: str
    root: Path

    log: Path = None

    def api(self, path, method="GET"):
        """One call of the server's REST API. A GET that fails with a server error (5xx) is asked again,
        up to 5 times: jupyter_server can answer 500 to a kernel listing while a kernel is still starting.
        Past that, the error is raised with the end of the server's log."""
        request = urllib.request.Request(f"{self.url}{path}?token={self.token}", method=method)
        for attempt in range(6 if method == "GET" else 1):
            try:
                with urllib.request.urlopen(request, timeout=30) as resp:
                    body = resp.read()
                return json.loads(body) if body else None
            except urllib.error.HTTPError as err:
                if err.code < 500 or attempt == (5 if method == "GET" else 0):
                    tail = self.log.read_text()[-3000:] if self.log and self.log.exists() else "(no log)"
                    raise AssertionError(f"{method} {path}: HTTP {err.code}; JupyterLab's log ends:\n{tail}") from err
                time.sleep(0.5)

    def shut_down_sessions(self):
        """Stop every kernel, so that the next notebook starts alone in a fresh one."""
        for session in self.api("/api/sessions"):
            self.api(f"/api/sessions/{session['id']}", method="DELETE")


@pytest.fixture(scope="module")
def lab():
    """JupyterLab on loopback: temporary root and config, a random token, the course's lab settings."""
    tmp = Path(tempfile.mkdtemp(prefix="bn_course_lab_"))
    root = tmp / "root"
    shutil.copytree(REPO / "notebooks", root / "notebooks")  # run on copies: the course stays clean
    env = dict(os.environ)
    for var in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "MPLCONFIGDIR"):
        env[var] = str(tmp / var.lower())
    # the kernel imports bn_course from this checkout even where it is not pip-installed
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("MPLBACKEND", None)  # the notebooks draw inline, as for a reader
    token, port = secrets.token_hex(16), _free_port()
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", f"--LabApp.app_settings_dir={LAB_SETTINGS}",
           f"--LabApp.workspaces_dir={tmp / 'workspaces'}", f"--LabApp.user_settings_dir={tmp / 'user-settings'}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(tmp / "jupyterlab.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Lab(url=f"http://127.0.0.1:{port}", token=token, root=root, log=tmp / "jupyterlab.log")
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{(tmp / 'jupyterlab.log').read_text()[-3000:]}")
            try:
                server.api("/api/status")
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("JupyterLab did not answer within 120 s")
                time.sleep(0.5)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def artifacts():
    folder = Path(os.environ.get("BN_COURSE_ARTIFACTS") or tempfile.mkdtemp(prefix="bn_course_artifacts_"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def page(browser, artifacts, request):
    """A fresh browser page; on failure a full-page screenshot is saved and its path reported."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.js_errors = []
    pg.on("pageerror", lambda exc: pg.js_errors.append(str(exc)))
    failed_before = request.session.testsfailed
    yield pg
    if request.session.testsfailed > failed_before:  # this test's call failed (already reported)
        shot = artifacts / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', request.node.name)}.png"
        try:
            pg.screenshot(path=str(shot), full_page=True)
            print(f"\nscreenshot of the failure: {shot}\nJavaScript errors in the page: {pg.js_errors}")
        except Exception as exc:  # a dead page must not hide the real failure
            print(f"\nno screenshot ({exc})")
    context.close()


# --------------------------------------------------------------------------- exercising a notebook


@dataclass
class Findings:
    """What a reader would have seen: errors, cells that did not run, widgets and what the sliders did."""

    errors: list = field(default_factory=list)         # "cell i: EName: message"
    not_run: list = field(default_factory=list)        # indices of code cells without an execution count
    widget_outputs: int = 0                            # widget views the notebook displayed
    rendered: int = 0                                  # of those, rendered as widgets in the page
    unrendered: list = field(default_factory=list)     # text of the ones that were not
    sliders: list = field(default_factory=list)        # (label, value before, value after, output changed)
    slider_errors: list = field(default_factory=list)  # tracebacks that appeared after moving a slider

    def problems(self):
        found = [f"error output in {e}" for e in self.errors]
        found += [f"code cell {i} did not run" for i in self.not_run]
        if self.rendered != self.widget_outputs or self.unrendered:
            found.append(f"{self.rendered} of {self.widget_outputs} widgets rendered; not rendered: "
                         f"{self.unrendered}")
        for label, before, after, changed in self.sliders:
            if before == after:
                found.append(f"slider {label!r} did not move (value stayed {before})")
            elif not changed:
                found.append(f"moving slider {label!r} from {before} to {after} changed no output")
        found += [f"error after moving a slider: {e}" for e in self.slider_errors]
        return found


# Text and images of a cell's output area, leaving out the sliders themselves (their readouts
# change whenever they move): what changes here is the output a slider drives.
_FINGERPRINT_JS = """(area) => {
    const copy = area.cloneNode(true);
    copy.querySelectorAll('.widget-slider, .widget-hslider, .widget-vslider').forEach(e => e.remove());
    const images = Array.from(copy.querySelectorAll('img')).map(i => i.getAttribute('src') || '');
    const svgs = Array.from(copy.querySelectorAll('svg')).map(s => s.outerHTML.length);
    return JSON.stringify([copy.innerText, images, svgs]);
}"""


_WIDGET_VIEWS_JS = """() => {
    const top = Array.from(document.querySelectorAll('.jp-Notebook .jp-OutputArea-output'))
        .filter(e => !e.parentElement.closest('.jupyter-widgets'));
    const rendered = top.filter(e => e.querySelector(':scope > .jupyter-widgets')
                                     && !/Error displaying widget/.test(e.innerText));
    const broken = top.filter(e => /Loading widget|Error displaying widget/.test(e.innerText))
        .map(e => e.innerText.slice(0, 200));
    return [rendered.length, broken];
}"""


def _wait_until_idle(page, lab, timeout_s):
    """Until the kernel is idle and no cell shows [*], twice in a row half a second apart."""
    deadline, calm = time.monotonic() + timeout_s, 0
    while calm < 2:
        if time.monotonic() > deadline:
            raise AssertionError(f"the notebook was still running after {timeout_s} s")
        kernels = lab.api("/api/kernels")
        busy = any(k["execution_state"] != "idle" for k in kernels)
        prompts = page.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()
        calm = calm + 1 if kernels and not busy and not any("*" in p for p in prompts) else 0
        time.sleep(0.5)


def _run_all_and_save(page, lab, relpath):
    page.goto(f"{lab.url}/lab/tree/{relpath}?reset&token={lab.token}")
    page.locator(".jp-NotebookPanel .jp-Notebook").first.wait_for(timeout=120_000)
    # the kernel is up when the server lists it as idle
    deadline = time.monotonic() + 120
    while not any(k["execution_state"] == "idle" for k in lab.api("/api/kernels")):
        assert time.monotonic() < deadline, "the kernel did not start within 120 s"
        time.sleep(0.5)
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-item:visible", has_text=re.compile(r"^Run All Cells")).first.click()
    time.sleep(1)
    _wait_until_idle(page, lab, RUN_ALL_TIMEOUT_S)
    # save, then read the outputs back from disk: exact output types, no guessing from the DOM
    path = lab.root / relpath
    before = path.stat().st_mtime_ns
    page.locator(".jp-NotebookPanel .jp-Notebook").first.click(position={"x": 5, "y": 5})
    page.keyboard.press("Control+s")
    deadline = time.monotonic() + 30
    while path.stat().st_mtime_ns == before:
        assert time.monotonic() < deadline, "the notebook was not saved within 30 s"
        time.sleep(0.2)
    time.sleep(0.5)
    return nbformat.read(path, as_version=4)


def exercise(page, lab, relpath, slider_timeout_s=SLIDER_TIMEOUT_S):
    """Open the notebook in JupyterLab, run all cells, check outputs and widgets, move every slider."""
    found = Findings()
    lab.shut_down_sessions()
    nb = _run_all_and_save(page, lab, relpath)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    for i, cell in enumerate(code_cells):
        if cell.execution_count is None:
            found.not_run.append(i)
        for out in cell.outputs:
            if out.output_type == "error":
                found.errors.append(f"code cell {i}: {out.ename}: {out.evalue}")
            elif "application/vnd.jupyter.widget-view+json" in out.get("data", {}):
                found.widget_outputs += 1

    # a rendered widget view is a top-level output whose content is a widget; a view the widget
    # manager could not render shows "Loading widget...", "Error displaying widget" or plain text
    found.rendered, found.unrendered = page.evaluate(_WIDGET_VIEWS_JS)
    sliders = page.locator(".jp-OutputArea .widget-slider .noUi-handle")
    for k in range(sliders.count()):
        handle = sliders.nth(k)
        handle.scroll_into_view_if_needed()
        area = handle.locator("xpath=ancestor::div[contains(@class, 'jp-OutputArea')][last()]")
        widget = handle.locator("xpath=ancestor::div[contains(@class, 'widget-slider')][1]")
        label = (widget.locator(".widget-label").first.inner_text() if widget.locator(".widget-label").count()
                 else f"slider {k}").strip() or f"slider {k}"
        value_before = handle.get_attribute("aria-valuenow")
        print_before = area.evaluate(_FINGERPRINT_JS)
        tracebacks_before = area.inner_text().count("Traceback")
        at_max = float(value_before) >= float(handle.get_attribute("aria-valuemax"))
        handle.focus()
        page.keyboard.press("ArrowLeft" if at_max else "ArrowRight")
        value_after, changed = handle.get_attribute("aria-valuenow"), False
        deadline = time.monotonic() + slider_timeout_s
        while value_after != value_before and time.monotonic() < deadline:
            if area.evaluate(_FINGERPRINT_JS) != print_before:
                _wait_until_idle(page, lab, slider_timeout_s)  # let the redraw finish
                changed = True
                break
            time.sleep(0.25)
        text = area.inner_text()
        if text.count("Traceback") > tracebacks_before:
            at = text.rindex("Traceback")
            found.slider_errors.append(f"{label}: {text[max(0, at - 200):at + 400]}")
        found.sliders.append((label, value_before, value_after, changed))
    return found


# --------------------------------------------------------------------------- the tests


def _place(lab, name, nb):
    path = lab.root / "made_here" / name
    path.parent.mkdir(exist_ok=True)
    nbformat.write(nb, path)
    return f"made_here/{name}"


def test_the_course_settings_are_in_force(lab):
    """The shipped lab-settings are what JupyterLab serves: no news pop-up, every cell rendered."""
    def default(plugin, key):  # overrides.json replaces the defaults of the plugin's schema
        answer = lab.api(f"/lab/api/settings/{plugin}")
        assert key not in answer["settings"], f"a user setting hides the course's {plugin} {key}"
        return answer["schema"]["properties"][key]["default"]

    assert default("@jupyterlab/notebook-extension:tracker", "windowingMode") == "none"
    # no "Select Kernel" dialog when another notebook's kernel is running
    assert default("@jupyterlab/notebook-extension:tracker", "autoStartDefaultKernel") is True
    assert default("@jupyterlab/apputils-extension:notification", "fetchNews") == "false"
    assert default("@jupyterlab/apputils-extension:notification", "checkForUpdates") is False


def test_harness_on_a_small_widget_notebook(lab, page):
    found = exercise(page, lab, _place(lab, "small.ipynb", SMALL))
    assert found.problems() == []
    assert found.widget_outputs == 2 and found.rendered == 2, found
    assert [s[:3] for s in found.sliders] == [("n", "3.0", "4.0"), ("m", "10.0", "9.0")], found.sliders
    assert "n squared is 16" in page.locator(".jp-Notebook").inner_text()
    assert "m is 9" in page.locator(".jp-Notebook").inner_text()


def test_harness_catches_errors_unrun_cells_and_idle_sliders(lab, page):
    found = exercise(page, lab, _place(lab, "broken.ipynb", BROKEN), slider_timeout_s=10)
    problems = found.problems()
    assert any("ValueError: this cell fails on purpose" in p for p in problems), problems
    assert "code cell 3 did not run" in problems, problems
    assert any(p.startswith("moving slider 'idle' from 5.0 to 6.0 changed no output") for p in problems), problems


WIDGET_NOTEBOOKS = notebooks_with_widgets()


@pytest.mark.parametrize("notebook", WIDGET_NOTEBOOKS, ids=[p.stem for p in WIDGET_NOTEBOOKS])
def test_course_notebook_in_the_browser(lab, page, notebook):
    found = exercise(page, lab, f"notebooks/{notebook.name}")
    print(found)  # shown with -s, and with the failure report
    assert found.problems() == []
    assert found.widget_outputs >= 1, "the notebook uses widgets but displayed none"
    assert found.sliders, "no slider found to move"


def test_widget_notebooks_are_found():
    """The scan finds notebooks that use widgets, and only those (checked on notebooks made here)."""
    with tempfile.TemporaryDirectory() as folder:
        nbformat.write(SMALL, Path(folder) / "01_small.ipynb")
        nbformat.write(_notebook("from bn_course import widgets, numpy_bn"), Path(folder) / "02_package.ipynb")
        nbformat.write(_notebook("import bn_course.widgets"), Path(folder) / "03_module.ipynb")
        nbformat.write(_notebook("print('no widgets here')"), Path(folder) / "04_plain.ipynb")
        names = [p.name for p in notebooks_with_widgets(folder)]
    assert names == ["01_small.ipynb", "02_package.ipynb", "03_module.ipynb"]

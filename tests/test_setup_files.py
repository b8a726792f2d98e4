"""The set-up files agree with each other: README, pyproject.toml, environment.yml, binder/, .ci/run.

A learner who follows the README, opens the Binder badge or builds the conda environment gets the
same package versions, the same JupyterLab settings and links that lead to real notebooks.
"""

import json
import re
import subprocess
import tomllib
import urllib.parse
from pathlib import Path

import jsonschema
import nbformat
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
BINDER_REPO = "bn-course/batchnorm-course"  # the GitHub slug Binder builds: the one place it is spelled
BINDER_BASE = f"https://mybinder.org/v2/gh/{BINDER_REPO}/HEAD?labpath="
START = "notebooks/00_start_here.ipynb"

# The course map of ../shared/COURSE.md: these names are stable once published; new ones append.
PLANNED = [
    "00_start_here", "01_why_normalize", "02_deriving_batchnorm", "03_numpy_batchnorm",
    "04_pytorch_batchnorm", "05_training_with_batchnorm", "06_why_does_it_work",
    "07_regularization_and_noise", "08_inference_and_pitfalls", "09_beyond_batchnorm",
    "10_batchnorm_at_scale",
]
EXISTING = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def binder_link(relpath):
    """The Binder URL that opens JupyterLab at ``relpath`` (a path inside the repository)."""
    return BINDER_BASE + urllib.parse.quote(relpath, safe="")


# --------------------------------------------------------------------------- pins


def _pins(lines, where):
    """{normalized name: Version} from requirement lines; pip options and local paths are skipped."""
    pins = {}
    for line in lines:
        line = line.split(" #")[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        req = Requirement(line)
        (spec,) = req.specifier  # exactly one specifier ...
        assert spec.operator == "==", f"{where}: {line!r} is not pinned with =="  # ... and it is a pin
        pins[req.name.lower().replace("_", "-")] = Version(spec.version)
    return pins


def _public(version):
    """2.13.0+cpu -> 2.13.0: a local build label is not a different release."""
    return Version(version.public)


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def runtime_pins(pyproject):
    return _pins(pyproject["project"]["dependencies"], "pyproject.toml")


@pytest.fixture(scope="module")
def environment():
    return yaml.safe_load((REPO / "environment.yml").read_text())


def _env_pip_lines(environment):
    (pip_section,) = [d["pip"] for d in environment["dependencies"] if isinstance(d, dict) and "pip" in d]
    return pip_section


def _binder_lines():
    return (REPO / "binder" / "requirements.txt").read_text().splitlines()


def test_every_dependency_is_pinned_exactly(pyproject):
    _pins(pyproject["project"]["dependencies"], "pyproject.toml")
    for extra, lines in pyproject["project"]["optional-dependencies"].items():
        _pins(lines, f"pyproject.toml [{extra}]")
    assert "torch" in _pins(pyproject["project"]["dependencies"], "pyproject.toml")


def test_environment_yml_pins_python_311_and_the_same_versions(environment, runtime_pins):
    assert environment["name"] == "bn-course"
    assert "python=3.11" in environment["dependencies"]
    pip_lines = _env_pip_lines(environment)
    assert _pins(pip_lines, "environment.yml") == runtime_pins
    assert "-e ." in pip_lines, "environment.yml installs bn_course from the checkout"
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in pip_lines, \
        "environment.yml offers the CPU-only torch build (PyPI's Linux wheel is a CUDA build)"


def test_binder_pins_the_same_versions_with_cpu_only_torch(runtime_pins):
    lines = _binder_lines()
    binder = _pins(lines, "binder/requirements.txt")
    assert {name: _public(v) for name, v in binder.items()} == runtime_pins
    assert binder["torch"].local == "cpu", "Binder has no GPU: torch must be the +cpu build"
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines


def test_binder_runtime_is_python_311():
    assert (REPO / "binder" / "runtime.txt").read_text().strip() == "python-3.11"


def test_binder_post_build_installs_the_package_and_the_lab_settings():
    path = REPO / "binder" / "postBuild"
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    assert lines[0].startswith("#!"), "postBuild is a script with a shebang"
    commands = [ln for ln in lines[1:] if ln and not ln.startswith("#")]
    assert commands[0] == "set -e", "postBuild must stop at the first failing command"
    assert path.stat().st_mode & 0o111, "postBuild must be executable"
    subprocess.run(["bash", "-n", str(path)], check=True)  # parses as bash
    text = "\n".join(commands)
    assert re.search(r"pip install .*-e \.", text), "postBuild installs bn_course"
    assert "lab-settings/overrides.json" in text, "postBuild installs the course's JupyterLab settings"
    # (tests/test_fresh_setup.py runs postBuild in a fresh environment)


def test_python_version_is_311_everywhere(pyproject):
    assert pyproject["project"]["requires-python"] == ">=3.11"
    assert "python3.11 -m venv" in README


# --------------------------------------------------------------------------- README and .ci/run


def _ci_test_command():
    lines = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines()]
    (command,) = [ln for ln in lines if ln.startswith("python3.11 -m venv")]
    return command


def _readme_commands():
    """Lines of the README's shell code blocks that start with python3.11."""
    blocks = re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", README, re.S)
    return [ln.strip() for b in blocks for ln in b.splitlines() if ln.strip().startswith("python3.11")]


def test_readme_has_exactly_two_set_up_commands():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    open_course, run_tests = commands
    assert open_course.startswith("python3.11 -m venv .venv && .venv/bin/pip install -e . && ")
    assert open_course.endswith(f"jupyter lab --LabApp.app_settings_dir=lab-settings {START}")
    assert run_tests == _ci_test_command(), "the README's test command is the one .ci/run runs"


def test_ci_runs_the_readme_test_command_verbatim_and_installs_chromium():
    ci = (REPO / ".ci" / "run").read_text()
    command = _ci_test_command()
    assert command.startswith('python3.11 -m venv .venv && .venv/bin/pip install -e ".[test]" && ')
    # notebooks run two at a time, each notebook whole in one worker (plain -n would split its cells)
    assert command.endswith(".venv/bin/python -m pytest -n 2 --dist loadfile")
    assert "set -euo pipefail" in ci
    assert "apt-get install -y" in ci and "chromium" in ci
    assert "BN_COURSE_SLOW=1" in ci


def test_readme_says_what_each_command_costs():
    for heading in ("Open the course", "Run every test"):
        section = README.split(heading, 1)[1].split("\n#", 1)[0]
        assert re.search(r"\d+(\.\d+)? min", section), f"'{heading}' says how many minutes it takes"
        assert re.search(r"\d+(\.\d+)? (GB|MB)", section), f"'{heading}' says how much disk it takes"


def test_binder_badge_opens_start_here():
    badge = re.search(r"\[!\[[^\]]*\]\([^)]*\)\]\((https://mybinder\.org/[^)]*)\)", README)
    assert badge, "the README has a Binder badge"
    assert badge.group(1) == binder_link(START)
    assert badge.group(1) == ("https://mybinder.org/v2/gh/bn-course/batchnorm-course/HEAD"
                              "?labpath=notebooks%2F00_start_here.ipynb")
    target = urllib.parse.unquote(badge.group(1).split("labpath=", 1)[1])
    assert target == START and (REPO / target).is_file()


def test_course_map_links_every_planned_notebook_once():
    linked = re.findall(r"\]\((notebooks/[^)]+)\)", README)
    stems = [Path(link).stem for link in linked if link.endswith(".ipynb")]
    assert sorted(set(stems)) == sorted(PLANNED), "every notebook of the course map, linked in the README"
    for link in linked:
        assert Path(link).stem in PLANNED, f"{link} is not a notebook of the course map"
        assert (REPO / link).is_file(), f"the README links to {link}, which does not exist"


def test_the_notebooks_are_the_course_map():
    assert [p.stem for p in EXISTING] == PLANNED, "notebooks/ holds exactly the notebooks of the course map"


def test_planned_names_match_the_course_design():
    course = REPO.parent / "shared" / "COURSE.md"
    if not course.exists():
        pytest.skip("../shared/COURSE.md is not beside this checkout")
    assert re.findall(r"^\| \d\d \| `(\d\d_\w+)` \|", course.read_text(), re.M) == PLANNED


@pytest.mark.parametrize("path", EXISTING, ids=[p.stem for p in EXISTING])
def test_each_notebook_opens_with_a_binder_link_to_itself(path):
    import nbformat

    first = nbformat.read(path, as_version=4).cells[0].source
    assert binder_link(f"notebooks/{path.name}") in first, \
        f"the first cell links to {binder_link(f'notebooks/{path.name}')}"


# --------------------------------------------------------------------------- JupyterLab settings


def test_lab_settings_are_valid_for_this_jupyterlab():
    """Every override names a real plugin setting of the pinned JupyterLab and has a valid value."""
    from jupyterlab.commands import get_app_dir

    overrides = json.loads((REPO / "lab-settings" / "overrides.json").read_text())
    schemas = Path(get_app_dir()) / "schemas"
    for plugin, settings in overrides.items():
        package, name = plugin.split(":")
        schema = json.loads((schemas / package / f"{name}.json").read_text())
        for key, value in settings.items():
            assert key in schema["properties"], f"{plugin} has no setting {key!r}"
            jsonschema.validate(value, schema["properties"][key])
    assert overrides["@jupyterlab/apputils-extension:notification"]["fetchNews"] == "false"
    assert overrides["@jupyterlab/notebook-extension:tracker"]["windowingMode"] == "none"


# --------------------------------------------------------------------------- generated README blocks


def _block(name):
    match = re.search(rf"<!-- {name}:start[^\n]*-->\n(.*?)<!-- {name}:end -->", README, re.S)
    assert match, f"the README has a {name} block between its markers"
    return match.group(1)


def test_readme_run_time_table_is_the_report_format():
    from bn_course import report

    assert report.README_START in README and report.README_END in README
    table = _block("report")
    assert table.startswith("| notebook | wall time (s) | peak memory (MiB) |"), \
        "regenerate with `python -m bn_course.report --update-readme`"


def test_readme_claims_ledger_is_the_rendered_one():
    claims = pytest.importorskip("bn_course.claims")
    assert _block("claims").strip() == claims.ledger_markdown(link_prefix="notebooks/").strip(), \
        "regenerate with `python -m bn_course.report --only-ledger --update-readme`"


def test_no_figure_or_render_is_committed():
    """Every figure the course shows is drawn by the reader's own run: none is stored in the repository.

    A stray render (a folder of cell PNGs) once landed in the repository's root by accident.
    """
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the tracked files cannot be listed")
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    files = tracked.stdout.split()
    assert files, "git ls-files listed nothing"
    images = [f for f in files if f.lower().endswith((".png", ".jpg", ".jpeg", ".gif", ".svg", ".pdf"))]
    assert not images, f"committed images (figures come from the reader's run): {images}"


def test_package_map_names_every_module_once_and_each_notebook_uses_its_modules():
    """bn_course's docstring says where each notebook's code lives; it must stay true."""
    import bn_course

    modules = sorted(p.stem for p in (REPO / "bn_course").glob("*.py") if p.stem != "__init__")
    rows = re.findall(r"^- (\d\d(?:-\d\d)?|shared)[^:]*: (.*(?:\n  .*)*)", bn_course.__doc__, re.M)
    named = {row: re.findall(r"``(\w+)``", text) for row, text in rows}
    listed = sorted(m for names in named.values() for m in names)
    assert listed == modules, "every module of bn_course is named exactly once in its docstring's map"
    for row, names in named.items():
        if row == "shared":
            continue
        first, last = (int(n) for n in (row.split("-") * 2)[:2])
        code = "\n".join(c.source for p in EXISTING if first <= int(p.name[:2]) <= last
                         for c in nbformat.read(p, as_version=4).cells if c.cell_type == "code")
        for module in names:
            assert re.search(rf"\bbn_course\.{module}\b|from bn_course import[^\n]*\b{module}\b", code), \
                f"notebook(s) {row} do not use bn_course.{module}, which the map places there"

"""`python -m bn_course.report` runs notebooks in fresh kernels and measures them honestly."""

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from bn_course import report

KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def _write(path, *sources):
    cells = [new_markdown_cell("# a tiny notebook")] + [new_code_cell(s) for s in sources]
    nbformat.write(new_notebook(cells=cells, metadata={"kernelspec": KERNELSPEC}), path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Run the report once on a notebook that sleeps and allocates, and on one that fails."""
    folder = tmp_path_factory.mktemp("notebooks")
    heavy = _write(folder / "01_heavy.ipynb",
                   "import time\ntime.sleep(1.5)",
                   "import numpy as np\nblock = np.ones(40_000_000)  # 320 MB, every page touched\n"
                   "print(block.sum())",
                   # the notebook runs in its own folder, as in JupyterLab
                   "import os\nassert os.path.exists('01_heavy.ipynb')")
    failing = _write(folder / "02_failing.ipynb", "x = 1", "raise ValueError('boom')")
    untouched = {p: p.read_bytes() for p in (heavy, failing)}
    return folder, untouched


@pytest.fixture(scope="module")
def results(run):
    folder, _ = run
    return [report.run_notebook(folder / name, timeout=120) for name in ("01_heavy.ipynb", "02_failing.ipynb")]


def test_wall_time_and_peak_memory_are_measured(results):
    heavy, failing = results
    assert heavy["error"] is None, heavy
    assert heavy["seconds"] >= 1.5, heavy  # the notebook slept 1.5 s
    assert heavy["peak_bytes"] >= 320e6, heavy  # it held 320 MB
    # each notebook has its own kernel: the failing one did not inherit the heavy one's peak
    assert 0 < failing["peak_bytes"] < heavy["peak_bytes"] - 250e6, (failing, heavy)


def test_a_failing_notebook_is_reported(results):
    failing = results[1]
    assert failing["error"] == "CellExecutionError: ValueError: boom", failing


def test_notebooks_on_disk_are_not_modified(run, results):
    _, untouched = run
    for path, content in untouched.items():
        assert path.read_bytes() == content, path


def test_markdown_table(results):
    table = report.markdown_table(results)
    lines = table.splitlines()
    assert lines[0] == "| notebook | wall time (s) | peak memory (MiB) |"
    assert lines[2].startswith("| `01_heavy.ipynb` | ")
    assert "**failed**" in lines[3] and "ValueError: boom" in lines[3]
    total = sum(r["seconds"] for r in results)
    assert lines[4].startswith(f"| **total** (2 notebooks) | **{total:.1f}** |")
    assert "CPU cores" in table


def test_command_line_exits_1_on_failure_and_updates_readme(run, tmp_path, capsys):
    folder, _ = run
    readme = tmp_path / "README.md"
    readme.write_text(f"# Course\n\nbefore\n\n{report.README_START}\nold table\n{report.README_END}\n\nafter\n")
    status = report.main([str(folder / "02_failing.ipynb"), "--timeout", "60", "--update-readme", str(readme)])
    assert status == 1
    out = capsys.readouterr().out
    assert "| `02_failing.ipynb` — **failed**" in out
    text = readme.read_text()
    assert "old table" not in text
    assert text.startswith("# Course\n\nbefore\n\n" + report.README_START + "\n| notebook |")
    assert text.endswith(report.README_END + "\n\nafter\n")
    # running again replaces the block rather than nesting or duplicating it
    report.update_readme("| new |\n", readme, ledger=False)
    assert readme.read_text().count(report.README_START) == 1 and "| new |" in readme.read_text()


def test_update_readme_refuses_a_readme_without_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers here\n")
    with pytest.raises(SystemExit, match="no block between"):
        report.update_readme("| t |\n", readme, ledger=False)
    assert readme.read_text() == "# no markers here\n"


def test_finds_the_course_notebooks_in_order(tmp_path):
    (tmp_path / "notebooks").mkdir()
    for name in ("10_b.ipynb", "02_a.ipynb", "scratch.ipynb", "01_c.ipynb"):
        (tmp_path / "notebooks" / name).write_text("{}")
    assert [p.name for p in report.find_notebooks(tmp_path)] == ["01_c.ipynb", "02_a.ipynb", "10_b.ipynb"]


def test_only_ledger_rewrites_the_claims_block_and_nothing_else(tmp_path, capsys):
    from bn_course.claims import ledger_markdown

    readme = tmp_path / "README.md"
    original = (f"# Course\n\n{report.README_START}\nkept table\n{report.README_END}\n\n"
                f"{report.LEDGER_START}\nstale ledger\n{report.LEDGER_END}\n")
    readme.write_text(original)
    assert report.main(["--only-ledger", "--update-readme", str(readme)]) == 0
    text = readme.read_text()
    assert "kept table" in text and "stale ledger" not in text
    assert f"{report.LEDGER_START}\n{ledger_markdown(link_prefix='notebooks/')}\n{report.LEDGER_END}" in text
    assert ledger_markdown(link_prefix="notebooks/") in capsys.readouterr().out

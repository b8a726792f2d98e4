"""Every notebook is stored clean and follows the course's conventions (COURSE.md)."""

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 5, NOTEBOOKS


@pytest.fixture(params=NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def nb(request):
    return nbformat.read(request.param, as_version=4)


def test_outputs_are_stripped(nb):
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {cell.get('id')} has stored outputs: run tools/notebook.py strip"
            assert cell.execution_count is None, f"cell {cell.get('id')} has an execution count"


def test_notebook_is_valid(nb):
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"


def test_opens_with_title_goals_prerequisites_and_run_time(nb):
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    text = first.source
    assert text.lstrip().startswith("# "), "the first cell starts with the notebook's title"
    for needle in ("**You will learn**", "**Prerequisites**: ", "**Run time**: "):
        assert needle in text, f"the first cell names '{needle}', written so (the same in every notebook)"


def test_closes_with_summary_and_next(nb):
    last_md = [c for c in nb.cells if c.cell_type == "markdown"][-1].source
    assert "## Summary" in last_md and "**Next**: " in last_md, \
        "the last markdown cell has a '## Summary' and what comes '**Next**: ' (the same in every notebook)"


def test_is_seeded(nb):
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "seed_everything(" in code


def test_solution_cells_are_collapsed(nb):
    for cell in nb.cells:
        if "solution" in cell.metadata.get("tags", []):
            assert cell.metadata.get("jupyter", {}).get("source_hidden") is True, (
                f"solution cell {cell.get('id')} must be collapsed (metadata.jupyter.source_hidden)")

"""The claims ledger is well formed, points at real notebooks, and renders."""

import re
from pathlib import Path

import nbformat
import pytest

from bn_course import claims
from bn_course.claims import CLAIMS, KINDS, VERDICTS, assert_verdict, get_claim, ledger_markdown

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"

# The course map of COURSE.md: notebooks that exist or are planned.
PLANNED = {
    "00_start_here", "01_why_normalize", "02_deriving_batchnorm", "03_numpy_batchnorm",
    "04_pytorch_batchnorm", "05_training_with_batchnorm", "06_why_does_it_work",
    "07_regularization_and_noise", "08_inference_and_pitfalls", "09_beyond_batchnorm",
    "10_batchnorm_at_scale",
}


def _notebook_source(stem):
    nb = nbformat.read(NOTEBOOK_DIR / f"{stem}.ipynb", as_version=4)
    return nb


def test_ids_are_unique_snake_case():
    ids = [c.id for c in CLAIMS]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]
    for i in ids:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", i), i


def test_fields_are_valid():
    for c in CLAIMS:
        assert c.kind in KINDS, (c.id, c.kind)
        assert c.verdict in VERDICTS + (None,), (c.id, c.verdict)
        assert c.statement.strip().endswith("."), c.id
        exists = (NOTEBOOK_DIR / f"{c.notebook}.ipynb").exists()
        assert exists or c.notebook in PLANNED, f"{c.id}: notebook {c.notebook} neither exists nor is planned"


def test_ledger_covers_the_claims_of_issue_3():
    kinds = {c.kind for c in CLAIMS}
    assert {"benefit", "explanation", "limitation"} <= kinds
    for needed in ("faster_training", "stable_gradients", "higher_learning_rates", "less_init_sensitivity",
                   "regularizes", "reduces_ics", "does_not_remove_overfitting", "noisy_labels_memorized",
                   "small_batch_failure", "train_eval_mismatch"):
        get_claim(needed)


def test_a_verdict_is_asserted_in_its_notebook():
    """A recorded verdict must come from a notebook that exists and calls assert_verdict on it."""
    for c in CLAIMS:
        if c.verdict is None:
            continue
        path = NOTEBOOK_DIR / f"{c.notebook}.ipynb"
        assert path.exists(), f"{c.id} has verdict {c.verdict!r} but {path.name} does not exist"
        nb = _notebook_source(c.notebook)
        code = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")
        # the id appears as a string in the code, and the notebook calls assert_verdict (directly
        # on the id, or in a loop over a dict of observed verdicts)
        assert "assert_verdict(" in code and re.search(rf"['\"]{c.id}['\"]", code), (
            f"{path.name} must call assert_verdict on {c.id!r} to back the verdict {c.verdict!r}")


def test_a_named_section_exists_in_its_notebook():
    for c in CLAIMS:
        path = NOTEBOOK_DIR / f"{c.notebook}.ipynb"
        if c.section is None or not path.exists():
            continue
        nb = _notebook_source(c.notebook)
        headings = [line for cell in nb.cells if cell.cell_type == "markdown"
                    for line in cell.source.splitlines() if line.startswith("#")]
        assert any(c.section in h for h in headings), f"{c.id}: no heading '{c.section}' in {path.name}"


def test_get_claim_and_unknown_id():
    assert get_claim("reduces_ics").notebook == "06_why_does_it_work"
    with pytest.raises(KeyError, match="no claim with id 'nope'.*reduces_ics"):
        get_claim("nope")


def test_assert_verdict_agrees_and_disagrees():
    ledger = (claims.Claim("a", "A.", "benefit", "05_training_with_batchnorm", verdict="confirmed"),
              claims.Claim("b", "B.", "benefit", "05_training_with_batchnorm"))
    assert assert_verdict("a", "confirmed", ledger).id == "a"
    with pytest.raises(AssertionError, match="'refuted'.*records 'confirmed'"):
        assert_verdict("a", "refuted", ledger)
    with pytest.raises(AssertionError, match="records None"):
        assert_verdict("b", "confirmed", ledger)
    with pytest.raises(ValueError, match="must be one of"):
        assert_verdict("a", "true", ledger)


def test_markdown_table_renders_every_claim():
    md = ledger_markdown()
    rows = md.splitlines()
    assert rows[0].startswith("| claim | kind") and set(rows[1]) <= set("|-")
    assert len(rows) == 2 + len(CLAIMS)
    for row in rows[2:]:
        # every row has exactly the header's 4 columns (escaped pipes do not count)
        assert len(re.findall(r"(?<!\\)\|", row)) == 5, row
    for c in CLAIMS:
        assert f"`{c.id}`" in md
        assert f"({c.notebook}.ipynb)" in md
    assert "not yet tested" in md or all(c.verdict for c in CLAIMS)


def test_markdown_links_for_the_readme():
    md = ledger_markdown(link_prefix="notebooks/")
    assert "(notebooks/05_training_with_batchnorm.ipynb)" in md
    one = (claims.Claim("x", "Uses |pipes|.", "benefit", "05_training_with_batchnorm", "Sweep", "refuted"),)
    row = ledger_markdown(one).splitlines()[2]
    assert "\\|pipes\\|" in row and "**refuted**" in row and "· Sweep" in row


def test_verdict_table_shows_each_claim_with_its_evidence_and_verdict():
    from bn_course.claims import CLAIMS, verdict_table

    tested = [c for c in CLAIMS if c.verdict][:2]
    table = verdict_table({c.id: f"evidence for {c.id}" for c in tested})
    lines = table.splitlines()
    assert lines[0] == "| claim | evidence (this run) | verdict |" and len(lines) == 2 + len(tested)
    for line, c in zip(lines[2:], tested):
        assert c.statement in line and f"evidence for {c.id}" in line and f"**{c.verdict}**" in line

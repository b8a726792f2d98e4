"""Author notebooks as percent-format scripts and store them as clean .ipynb files.

    python tools/notebook.py from-py src.py notebooks/NN_name.ipynb   # script -> clean notebook
    python tools/notebook.py to-py notebooks/NN_name.ipynb src.py     # notebook -> script, to edit
    python tools/notebook.py strip notebooks/*.ipynb                  # drop outputs in place

A cell written as ``# %% tags=["solution"] jupyter={"source_hidden": true}`` becomes a
collapsed solution cell. Needs the ``dev`` extra (jupytext).
"""

import sys

import nbformat

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
KEEP_CELL_KEYS = {"tags", "jupyter"}


def clean(nb):
    """Outputs stripped, execution counts cleared, only meaningful metadata kept."""
    nb.metadata = {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}
    for cell in nb.cells:
        cell.metadata = {k: v for k, v in cell.metadata.items() if k in KEEP_CELL_KEYS}
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nb.nbformat, nb.nbformat_minor = 4, 5
    # ids are required by nbformat 4.5; make them stable (the cell's index) so diffs stay small
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:03d}"
    return nb


def write(nb, path):
    nb = clean(nb)
    nbformat.validate(nb)
    nbformat.write(nb, path)


def main(argv):
    cmd = argv[0]
    if cmd == "from-py":
        import jupytext

        write(jupytext.read(argv[1], fmt="py:percent"), argv[2])
    elif cmd == "to-py":
        import jupytext

        jupytext.write(nbformat.read(argv[1], as_version=4), argv[2], fmt="py:percent")
    elif cmd == "strip":
        for path in argv[1:]:
            write(nbformat.read(path, as_version=4), path)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])

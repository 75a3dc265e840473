"""Run the course: execute every notebook top to bottom on the embedded model and keep the outputs.

    python -m mcteach.course            # all notebooks, in order
    python -m mcteach.course 01         # the notebooks whose name starts with 01

Outputs are saved in place (readers see them on GitHub) with noisy metadata stripped
(execution timestamps, widget state), so re-running with unchanged code gives a small diff.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def clean(nb) -> None:
    """Strip what changes on every run but teaches nothing: timestamps, widget state, ids' noise."""
    nb.metadata.pop("widgets", None)
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("collapsed", None)
        cell.metadata.pop("scrolled", None)


def run_notebook(path: Path, timeout: int = 1800) -> float:
    """Execute ``path`` in its own folder, save it with outputs; returns the wall time in seconds."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    start = time.time()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    clean(nb)
    nbformat.write(nb, path)
    return time.time() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mcteach.course", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prefixes", nargs="*", help="run only notebooks whose file name starts with one of these")
    a = p.parse_args(argv)
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if a.prefixes:
        paths = [q for q in paths if q.name.startswith(tuple(a.prefixes))]
    if not paths:
        print(f"no notebooks match {a.prefixes} in {NOTEBOOKS}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"{path.name}: running ...", flush=True)
        print(f"{path.name}: done in {run_notebook(path):.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

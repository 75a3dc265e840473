"""Run the course: execute every notebook top to bottom on the embedded model and keep the outputs.

    mcteach course            # all notebooks, in order
    mcteach course 01         # the notebooks whose name starts with 01
    mcteach course --sync     # only rewrite every notebook's Colab badge and install cell, and the learner's version

**Two builds from one source** (nbgrader's convention). A build-it cell holds its solution between
``### BEGIN SOLUTION`` and ``### END SOLUTION``; ``learner_version`` replaces each such block with a stub that
raises ``NotImplementedError``, and ``write_learner`` writes those notebooks under ``notebooks/learner/`` with the
solved run's outputs kept (a reader sees what they should get). The Colab badges open the learner's version; the
course runs (and CI executes) the solved one.

Outputs are saved in place (readers see them on GitHub) with noisy metadata stripped
(execution timestamps, widget state), so re-running with unchanged code gives a small diff.
Each run also writes its measured time into the notebook's header ("**Time:** 45 s on 2 CPU
cores") and into the README's syllabus table, so the two cannot disagree (``--no-stamp`` for a run
that shares the CPU with other work, whose times would mislead).

The repository's address is defined once, here (``REPO_URL``); every notebook's Colab badge and
install cell are generated from it (``sync``), and a test checks they match.
"""

from __future__ import annotations

import html
import re
import sys
import time
from pathlib import Path

from .paths import NOTEBOOKS

REPO_URL = "https://github.com/mcteach/mcteach"
BRANCH = "main"
BADGE = "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"
INSTALL_CELL = """\
REPO = "{repo}"  # written by `mcteach course --sync` from mcteach.course.REPO_URL
import sys, subprocess
if "google.colab" in sys.modules:  # only on Colab: fetch the course and install it (Colab's GPU torch is kept)
    subprocess.run(f"git clone -q --depth 1 {{REPO}} course && make -C course setup", shell=True, check=True)
    sys.path.insert(0, "course")
    import os; os.chdir("course/notebooks")

from mcteach.sd.pipeline import describe_environment
print(describe_environment())"""
TIME_RE = re.compile(r"\*\*Time:\*\* (\d+) s on 2 CPU cores")


LEARNER = NOTEBOOKS / "learner"
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
STUB = 'raise NotImplementedError("your code here: the docstring above says what to return")'
#: the learner's copy lives one folder down; its cells run where the solved one's do (runs/, outputs/)
LEARNER_CHDIR = 'import os\nif os.path.basename(os.getcwd()) == "learner":\n    os.chdir("..")  # run where the solved notebook runs'


def colab_url(name: str, learner: bool = True) -> str:
    """The Colab address of notebook ``name`` (e.g. "00_setup_and_tour.ipynb") in ``REPO_URL``: the learner's
    version (``notebooks/learner/``) by default, the solved one with ``learner=False``."""
    folder = "notebooks/learner" if learner else "notebooks"
    return f"https://colab.research.google.com/github/{REPO_URL.removeprefix('https://github.com/')}/blob/{BRANCH}/{folder}/{name}"


def strip_solutions(source: str) -> str:
    """``source`` with every ``### BEGIN SOLUTION`` ... ``### END SOLUTION`` block replaced by ``STUB`` at the
    block's indentation. Raises ValueError for an unclosed or nested block."""
    out, inside = [], False
    for line in source.splitlines():
        mark = line.strip()
        if mark == BEGIN:
            if inside:
                raise ValueError(f"a {BEGIN} inside another one: {source[:80]!r}")
            inside = True
            out.append(line[: len(line) - len(line.lstrip())] + STUB)
        elif mark == END:
            if not inside:
                raise ValueError(f"an {END} without its {BEGIN}: {source[:80]!r}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"a {BEGIN} without its {END}: {source[:80]!r}")
    return "\n".join(out)


def learner_version(nb):
    """A copy of notebook ``nb`` for the learner: solutions stubbed (``strip_solutions``), the solved outputs kept,
    the install cell also moving to ``notebooks/`` so that relative paths work from ``notebooks/learner/``."""
    import copy

    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        if cell.cell_type == "code" and BEGIN in cell.source:
            cell.source = strip_solutions(cell.source)
    i = install_cell_index(nb)
    nb.cells[i].source = nb.cells[i].source + "\n" + LEARNER_CHDIR
    return nb


def write_learner(paths) -> list[Path]:
    """Write ``learner_version`` of each notebook in ``paths`` under ``LEARNER``; returns the files written."""
    import nbformat

    LEARNER.mkdir(exist_ok=True)
    written = []
    for path in paths:
        nbformat.write(learner_version(nbformat.read(path, as_version=4)), LEARNER / path.name)
        written.append(LEARNER / path.name)
    return written


def install_cell_index(nb) -> int:
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and '"google.colab" in sys.modules' in cell.source:
            return i
    raise ValueError("the notebook has no install cell (a code cell testing `\"google.colab\" in sys.modules`)")


def sync(nb, name: str) -> None:
    """Write the Colab badge (first cell) and the install cell from ``REPO_URL``."""
    head = nb.cells[0]
    badge = BADGE.format(url=colab_url(name))
    head.source = re.sub(r"\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)", lambda m: badge, head.source)
    if badge not in head.source:
        raise ValueError(f"{name}: the first cell has no Colab badge to update")
    nb.cells[install_cell_index(nb)].source = INSTALL_CELL.format(repo=REPO_URL)


README = NOTEBOOKS.parent / "README.md"
README_ROW = re.compile(r"^(\| (\d\d) \| \[[^\]]+\]\(notebooks/[^)]+\) \|[^|]*\| )(\d+) s( \|)", re.M)


def stamp_readme(times: dict[str, float], readme: Path = README) -> None:
    """Write measured times (notebook number "00" -> seconds) into the README's syllabus table."""
    text = readme.read_text()
    new = README_ROW.sub(lambda m: f"{m.group(1)}{round(times[m.group(2)]) if m.group(2) in times else m.group(3)} s"
                                   f"{m.group(4)}", text)
    readme.write_text(new)


def header_time(nb) -> int | None:
    """The measured CPU time (s) in the notebook's header, or None."""
    m = TIME_RE.search(nb.cells[0].source)
    return int(m.group(1)) if m else None


def stamp_time(nb, seconds: float) -> None:
    """Write ``seconds`` into the header's "**Time:** N s on 2 CPU cores"."""
    if not TIME_RE.search(nb.cells[0].source):
        raise ValueError("the first cell has no '**Time:** N s on 2 CPU cores' to update")
    nb.cells[0].source = TIME_RE.sub(f"**Time:** {round(seconds)} s on 2 CPU cores", nb.cells[0].source)


def _progress_text(state: dict, model_id: str) -> str | None:
    """The final text of a tqdm notebook bar (an HBox of HTML, FloatProgress, HTML) from the saved widget state."""
    box = state.get(model_id, {}).get("state", {})
    kids = [state.get(c.removeprefix("IPY_MODEL_"), {}) for c in box.get("children", [])]
    names = [k.get("model_name") for k in kids]
    if names != ["HTMLModel", "FloatProgressModel", "HTMLModel"]:
        return None
    left, bar, right = (k.get("state", {}) for k in kids)
    frac = bar.get("value", 0) / bar.get("max", 1) if bar.get("max") else 0.0
    cells = round(10 * frac)
    return html.unescape(f"{left.get('value', '')}|{'█' * cells}{' ' * (10 - cells)}|{right.get('value', '')}")


def clean(nb) -> None:
    """Strip what changes on every run but teaches nothing: timestamps, widget state, ids' noise. Progress bars
    (tqdm widgets, whose state is dropped) keep their final text, so a reader sees "100%|██████████| 500/500"
    where the notebook would otherwise show the bar's first frame ("0%"); other widgets (the sliders beside a
    static figure) are dropped from the saved outputs, which would show ``VBox(children=...)`` on GitHub."""
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    for cell in nb.cells:
        kept = []
        for out in cell.get("outputs", []):
            view = out.get("data", {}).get("application/vnd.jupyter.widget-view+json")
            if not view:
                kept.append(out)
            elif (text := _progress_text(state, view.get("model_id", ""))) is not None:
                out["data"] = {"text/plain": text}
                kept.append(out)
            # any other widget (sliders, interact) is live only: without its state a reader would see its repr
        if "outputs" in cell:
            cell["outputs"] = kept
    nb.metadata.pop("widgets", None)
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("collapsed", None)
        cell.metadata.pop("scrolled", None)


def run_notebook(path: Path, timeout: int = 1800, stamp: bool = True) -> float:
    """Execute ``path`` in its own folder, save it with outputs (and its time in the header, unless
    ``stamp=False``); returns the wall time in seconds."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    sync(nb, path.name)
    start = time.time()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    seconds = time.time() - start
    clean(nb)
    if stamp:
        stamp_time(nb, seconds)
    nbformat.write(nb, path)
    write_learner([path])
    return seconds


def run(prefixes=(), *, sync_only: bool = False, stamp: bool = True) -> int:
    """Execute the notebooks whose names start with one of ``prefixes`` (all when empty), in order, outputs kept;
    ``stamp``: write each one's CPU time into its header and the README's syllabus. ``sync_only``: only rewrite
    every notebook's Colab badge and install cell."""
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if prefixes:
        paths = [q for q in paths if q.name.startswith(tuple(prefixes))]
    if not paths:
        print(f"no notebooks match {list(prefixes)} in {NOTEBOOKS}", file=sys.stderr)
        return 2
    if sync_only:
        import nbformat  # the notebooks' extra (pip install -e .[notebooks])

        for path in paths:
            nb = nbformat.read(path, as_version=4)
            sync(nb, path.name)
            nbformat.write(nb, path)
        write_learner(paths)
        return 0
    times = {}
    for path in paths:
        print(f"{path.name}: running ...", flush=True)
        times[path.name[:2]] = seconds = run_notebook(path, stamp=stamp)
        print(f"{path.name}: done in {seconds:.0f} s", flush=True)
    if stamp:
        stamp_readme(times)
    print(f"total {sum(times.values()) / 60:.1f} min" + ("; times written into the headers and the README's syllabus"
                                                         if stamp else ""), flush=True)
    return 0

"""The notebooks as a reader and a teacher meet them: clean files, figures that say what to look for,
Colab badges and install cells from one address, honest times.

(nbval executes every notebook separately; these tests read the saved files.)
"""

import re
from pathlib import Path

import nbformat
import pytest

from mcteach import course

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
NOISE = re.compile(r"warn|\[transformers\]|\[diffusers\]|deprecat|torchvision", re.IGNORECASE)


def load(path):
    return nbformat.read(path, as_version=4)


def figure_cells(nb):
    """Indices of code cells whose saved outputs include an image."""
    return [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
            and any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]


def test_there_are_ten_notebooks_in_course_order():
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(10)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_metadata_is_clean(path):
    nb = load(path)
    assert "widgets" not in nb.metadata, "widget state saved: run it through mcteach.course (clean)"
    assert nb.metadata.kernelspec == {"display_name": "Python 3", "language": "python", "name": "python3"}
    for cell in nb.cells:
        assert not {"execution", "collapsed", "scrolled"} & set(cell.metadata), cell.metadata


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_saved_outputs_have_no_loading_warnings_or_unfinished_progress_bars(path):
    for cell in load(path).cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                assert not NOISE.search(out["text"]), out["text"][:300]
            text = out.get("text", "") + str(out.get("data", {}).get("text/plain", ""))
            for bar in re.findall(r"\b(\d+)%\|", text):
                assert bar == "100", f"a progress bar saved at {bar}%: {text[:200]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_badge_and_install_cell_come_from_the_one_repository_address(path):
    nb = load(path)
    assert course.BADGE.format(url=course.colab_url(path.name)) in nb.cells[0].source
    install = nb.cells[course.install_cell_index(nb)].source
    assert install == course.INSTALL_CELL.format(repo=course.REPO_URL)
    assert course.REPO_URL.startswith("https://github.com/")


def test_sync_rewrites_a_stale_badge_and_install_cell():
    nb = load(NOTEBOOKS[0])
    url = course.colab_url(NOTEBOOKS[0].name)
    nb.cells[0].source = nb.cells[0].source.replace(url, url.replace("/github/mcteach/", "/github/someone-else/"))
    assert "someone-else" in nb.cells[0].source
    nb.cells[course.install_cell_index(nb)].source = "print('old')  # \"google.colab\" in sys.modules"
    course.sync(nb, NOTEBOOKS[0].name)
    assert course.colab_url(NOTEBOOKS[0].name) in nb.cells[0].source and "someone-else" not in nb.cells[0].source
    assert nb.cells[course.install_cell_index(nb)].source == course.INSTALL_CELL.format(repo=course.REPO_URL)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_every_figure_says_what_to_look_for(path):
    nb = load(path)
    for i in figure_cells(nb):
        after = next((c for c in nb.cells[i + 1:] if c.cell_type == "markdown"), None)
        assert after is not None and "look for" in after.source.lower(), (
            f"the figure of cell {i} ({nb.cells[i].source[:80]!r}) needs a 'Look for ...' sentence under it")


def readme_times():
    rows = re.findall(r"^\| (\d\d) \| \[[^\]]+\]\(notebooks/[^)]+\) \|[^|]*\| (\d+) s \|", (ROOT / "README.md").read_text(), re.M)
    return {nb: int(t) for nb, t in rows}


def test_header_times_equal_the_readme_and_fit_the_budget():
    times = readme_times()
    assert sorted(times) == [p.name[:2] for p in NOTEBOOKS], "one README syllabus row per notebook, with its CPU time"
    for path in NOTEBOOKS:
        assert course.header_time(load(path)) == times[path.name[:2]], path.name
    assert max(times.values()) <= 300 and sum(times.values()) <= 25 * 60, times


def test_stamp_time_writes_the_measured_seconds():
    nb = load(NOTEBOOKS[0])
    course.stamp_time(nb, 61.4)
    assert course.header_time(nb) == 61
    nb.cells[0].source = "# no time here"
    with pytest.raises(ValueError, match="Time"):
        course.stamp_time(nb, 1)

"""What a reader sees on GitHub: prose that cannot contradict its outputs, no history, no raw widget reprs or
tables printed as text, consecutive section numbers, every lesson ending open and with its papers."""

import re

import nbformat
import pytest

from mcteach.paths import NOTEBOOKS

SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
HISTORY = re.compile(r"(?i)\bold defaults?\b|\b60-class\b|\bfirst (embedded )?model\b|\b20\d\d-\d\d-\d\d\b|"
                     r"\bsuperseded\b|\bused to\b|\bno longer\b|\bwas changed\b|\buntil recently\b")
WIDGET_REPR = re.compile(r"\b(VBox|HBox|interactive)\(children=")
DECIMAL = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.])")
PIPE_TABLE = re.compile(r"^\|.*\|\s*$\n^\|[-:| ]+\|\s*$", re.M)
SECTION = re.compile(r"^## (\d+)\. ", re.M)


def text_of(outputs) -> str:
    keys = ("text/plain", "text/markdown", "text/html")
    return " ".join("".join(o.get("text", "")) + " ".join("".join(o.get("data", {}).get(k, "")) for k in keys)
                    for o in outputs)


def look_for_problems(cells) -> list[str]:
    """Decimal numbers in a markdown "Look for" that the outputs of the three cells above do not print."""
    problems = []
    for i, c in enumerate(cells):
        if c.cell_type != "markdown" or "look for" not in c.source.lower():
            continue
        prose = re.sub(r"(?i)(SD|Diffusion|v)\s?1\.5", "", c.source)
        shown = text_of(o for x in cells[max(0, i - 3):i] if x.cell_type == "code" for o in x.get("outputs", []))
        missing = [n for n in DECIMAL.findall(prose) if n not in shown]
        if missing:
            problems.append(f"c{i}: {missing}")
    return problems


def test_look_for_checks_numbers_against_the_outputs_above():
    code = nbformat.v4.new_code_cell("print(x)")
    code.outputs = [nbformat.v4.new_output("stream", text="fidelity 0.88\n")]
    good, bad = nbformat.v4.new_markdown_cell("**Look for** 0.88"), nbformat.v4.new_markdown_cell("**Look for** 0.75")
    assert look_for_problems([code, good]) == [] and look_for_problems([code, bad]) == ["c1: ['0.75']"]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name[:2])
def test_prose_numbers_come_from_the_outputs_and_there_is_no_history(path):
    cells = nbformat.read(path, as_version=4).cells
    assert look_for_problems(cells) == [], f"{path.name}: print these numbers under the figure instead"
    history = [f"c{i}: {HISTORY.search(c.source).group(0)!r}" for i, c in enumerate(cells)
               if c.cell_type == "markdown" and HISTORY.search(c.source)]
    assert history == [], f"{path.name}: the lesson teaches what is true now"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name[:2])
def test_saved_outputs_read_well_on_github(path):
    cells = nbformat.read(path, as_version=4).cells
    for i, c in enumerate(cells):
        text = text_of(c.get("outputs", []))
        assert not WIDGET_REPR.search(text), f"{path.name} c{i}: a raw widget repr in the saved output"
        printed = " ".join("".join(o.get("text", "")) for o in c.get("outputs", []) if o.get("output_type") == "stream")
        assert not PIPE_TABLE.search(printed), f"{path.name} c{i}: a markdown table printed as text (display it)"
    sections = [int(n) for c in cells if c.cell_type == "markdown" for n in SECTION.findall(c.source)]
    assert sections == list(range(1, len(sections) + 1)), f"{path.name}: section numbers {sections}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name[:2])
def test_every_lesson_ends_with_an_open_try_it_yourself_and_its_papers(path):
    cells = nbformat.read(path, as_version=4).cells
    markdown = [c.source for c in cells if c.cell_type == "markdown"]
    assert any(s.startswith("### Try it yourself") for s in markdown), path.name
    assert "arxiv.org" in markdown[-1] or path.name.startswith("00"), f"{path.name}: end with the paper list"


def test_a_pipe_table_printed_as_text_is_caught():
    assert PIPE_TABLE.search("| a | b |\n|---|---|\n| 1 | 2 |\n")
    assert not PIPE_TABLE.search("fidelity | 0.5\n")

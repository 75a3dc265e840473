"""The kinds benchmark (notebook 09): its rows, its page, and the shipped report it writes."""

import json

import pytest

from mcteach.bench import kinds as bench_kinds
from mcteach.paths import BENCH_KINDS

PLACE_FIELDS = {"place", "people", "both", "distance", "threshold"}
WEAR_FIELDS = {"people", "on_wearer", "on_other", "right", "two_heads", "threshold"}


def _rates_ok(row, fields):
    for k in fields & {"place", "people", "both", "on_wearer", "on_other", "right", "two_heads"}:
        mean, lo, hi = row[k]
        assert 0 <= lo <= mean <= hi <= 1, (row["case"], row["fix"], k, row[k])


def test_one_seed_of_every_row_runs_and_is_judged(tmp_path):
    bench = bench_kinds.KindsBench(seeds=1, save_images=tmp_path)
    rows = bench.place_rows(fixes=("none", "layers")) + bench.wearable_rows(fixes=("passes", "both"))
    assert [(r["case"], r["fix"]) for r in rows] == [("place", "none"), ("place", "layers"),
                                                     ("wearable", "passes"), ("wearable", "both")]
    for r in rows:
        _rates_ok(r, PLACE_FIELDS if r["case"] == "place" else WEAR_FIELDS)
    assert len(list(tmp_path.glob("*.png"))) == 4
    with pytest.raises(ValueError, match="unknown place fix"):
        bench.place_rows(fixes=("inference",))


def test_the_shipped_report_has_every_row_and_its_page_shows_them():
    report = json.loads(BENCH_KINDS.read_text())
    got = [(r["concept"], r["fix"]) for r in report["rows"]]
    assert got == ([(p, f) for p in bench_kinds.PLACES for f in bench_kinds.PLACE_FIXES]
                   + [(w, f) for w in bench_kinds.WEARABLES for f in bench_kinds.WEARABLE_FIXES])
    for r in report["rows"]:
        assert r["n"] == report["seeds"] == 16
        _rates_ok(r, PLACE_FIELDS if r["case"] == "place" else WEAR_FIELDS)
    page = bench_kinds.markdown(report)
    assert page.count("| cottage_garden |") == page.count("| mountain_lake |") == len(bench_kinds.PLACE_FIXES)
    assert page.count("| billed_cap |") == page.count("| hair_ribbon |") == len(bench_kinds.WEARABLE_FIXES)
    assert BENCH_KINDS.with_suffix(".md").read_text() == page


def test_the_bench_draws_two_people():
    with pytest.raises(ValueError, match="two people"):
        bench_kinds.KindsBench(seeds=1, couple=("woman_with_red_hair_and_medium_skin",))


def test_merging_keeps_places_before_wearables_and_refuses_other_seeds():
    report = json.loads(BENCH_KINDS.read_text())
    places = {**report, "rows": [r for r in report["rows"] if r["case"] == "place"]}
    worn = {**report, "rows": [r for r in report["rows"] if r["case"] == "wearable"]}
    assert bench_kinds.merge([worn, places])["rows"] == report["rows"]
    with pytest.raises(ValueError, match="same seeds"):
        bench_kinds.merge([report, {**report, "seeds": 8}])

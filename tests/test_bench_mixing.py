import json

import pytest

from mcteach.bench import mixing as bench_mixing
from mcteach.cli import main as cli_main

KEYS = {"method", "fix", "pair", "success", "swap", "neglect", "duplication", "blend", "fidelity", "train_s", "image_s", "n"}


def fake_row(method, fix, pair, slugs):
    v = [0.5, 0.25, 0.75]
    return {"method": method, "fix": fix, "pair": pair, "concepts": list(slugs), "prompt": "p", "success": v,
            "swap": v, "duplication": v, "neglect": v, "other": v, "blend": v, "fidelity": v, "train_s": 60.0,
            "image_s": 0.5, "n": 8}


@pytest.fixture
def stub(monkeypatch):
    class Stub:
        def __init__(self, *a, **k):
            self.calls = []

        def row(self, *args):
            return fake_row(*args)

        def base_row(self, pair, slugs):
            return fake_row("base model", "none", pair, slugs)

    monkeypatch.setattr(bench_mixing, "Bench", Stub)


def test_quick_json_has_the_documented_schema(stub, capsys):
    assert cli_main(["bench", "mixing", "--quick", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(r["method"], r["fix"], r["pair"]) for r in report["rows"]] == [("lora", "none", "couple"),
                                                                            ("lora", "inference", "couple")]
    for r in report["rows"]:
        assert set(r) == KEYS and r["fix"] in bench_mixing.FIXES
        assert all(len(r[k]) == 3 for k in ("success", "swap", "neglect", "duplication", "blend", "fidelity"))


def test_runs_resume_and_merge(stub, tmp_path):
    out = tmp_path / "a.json"
    bench_mixing.run(methods=["lora"], fixes=["none"], pairs=["couple"], out=out, triple=False, base=False)
    bench_mixing.run(methods=["lora"], fixes=["none", "both"], pairs=["couple"], out=out, triple=False, base=False)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["fix"]) for r in rows] == ["none", "both"]  # the first row was kept, not run again
    other = tmp_path / "b.json"
    bench_mixing.run(methods=["dreambooth"], fixes=["none"], pairs=["couple"], out=other, triple=False, base=True)
    merged = tmp_path / "m.json"
    assert cli_main(["bench", "mixing", "--merge", str(out), str(other), "--out", str(merged)]) == 0
    text = bench_mixing.main_table(json.loads(merged.read_text()))
    assert text.count("| couple |") == 4 and "| couple | base model | none |" in text.splitlines()[2]


def test_sampling_ratio_times_pipelines_in_turns():
    from mcteach.bench import mixing as bench_mixing

    r = bench_mixing.sampling_ratio([None, None], images=2, repeats=1)  # the embedded model against itself
    assert r["models"] == ["embedded", "embedded"] and len(r["seconds_per_image"]) == 2
    assert r["ratio_to_first"][0] == 1.0 and 0.3 < r["ratio_to_first"][1] < 3


def test_the_bench_judges_with_the_judge_it_is_given(tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr("mcteach.measure.judge.Judge.load", classmethod(lambda cls, *a: loaded.append(a) or "judge"))
    assert bench_mixing.Bench(tmp_path, judge_path=tmp_path / "j.safetensors").judge == "judge"
    bench_mixing.Bench(tmp_path)
    assert loaded == [(tmp_path / "j.safetensors",), ()]


def test_a_cached_adapter_trained_otherwise_than_the_defaults_is_refused(tmp_path):
    """The bench reuses adapters under --work; one left there by an experiment (another schedule) would be measured as
    if it were the defaults. It is refused, with what differs."""
    from mcteach.methods.catalog import make_method

    lora = make_method("lora")
    folder = tmp_path / "lora" / "fix" / "koala+hamster"
    folder.mkdir(parents=True)
    (folder / "bench_train.json").write_text(json.dumps({"seconds": 1.0, "threads": 1}))
    steps, batch_size = lora.schedule(2)
    (folder / "adapter.json").write_text(json.dumps({"training": {"steps": 400, "batch_size": 4, "lr": lora.lr}}))
    b = bench_mixing.Bench(tmp_path)
    with pytest.raises(ValueError, match=f"steps 400 \\(default {steps}\\), batch_size 4 \\(default {batch_size}\\)"):
        b.trained("lora", ("koala", "hamster"), regularized=True)
    (folder / "adapter.json").write_text(json.dumps({"training": {"steps": steps, "batch_size": batch_size, "lr": lora.lr}}))
    assert b.trained("lora", ("koala", "hamster"), regularized=True) == ([folder], 1.0)


def readme_headline(text: str) -> str:
    start = text.index("<!-- headline:")
    body = text[text.index("\n", start) + 1:text.index("<!-- end headline -->")]
    return body.strip()


def test_the_readme_headline_is_the_generated_table():
    from mcteach.paths import BENCH_MIXING, REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text()
    report = json.loads(BENCH_MIXING.read_text())
    assert readme_headline(readme) == bench_mixing.headline(report).strip(), \
        "README's headline table is stale: paste `mcteach bench mixing --markdown`'s first table"
    assert len(readme.encode()) <= 12000  # the front door stays short


def test_the_headline_check_fails_on_a_changed_report():
    from mcteach.paths import BENCH_MIXING, REPO_ROOT

    report = json.loads(BENCH_MIXING.read_text())
    row = next(r for r in report["rows"] if r["method"] == "lora" and r["fix"] == "none" and r["pair"] == "couple")
    row["success"] = [0.5, 0.25, 0.75]  # a different measurement
    assert readme_headline((REPO_ROOT / "README.md").read_text()) != bench_mixing.headline(report).strip()


def test_headline_pools_the_pairs_and_picks_the_best_fix():
    rows = [{"method": "lora", "fix": f, "pair": p, "success": [s, s, s], "n": 4}
            for p in ("couple", "animals") for f, s in (("none", 0.0), ("inference", 1.0), ("training", 0.5))]
    rows.append({"method": "lora", "fix": "inference", "pair": "three", "success": [0.0] * 3, "n": 4})  # not a pair
    table = bench_mixing.headline({"rows": rows, "seeds": 4})
    assert "| lora | 0.00 [0.00, 0.00] | inference | 1.00 [1.00, 1.00] | 0.00 → 1.00 |" in table


def test_ablation_fixes_are_the_shipped_reports_rows_each_a_named_fix():
    from mcteach.bench import mixing as bench_mixing
    from mcteach.mixing.masking import AttentionMasks
    from mcteach.mixing.passes import INFERENCE_FIX, RegionPasses
    from mcteach.paths import BENCH_MIXING

    fixes = bench_mixing.ablation_fixes()
    shipped = [r["fix"] for r in json.loads(BENCH_MIXING.read_text())["ablation"]]
    assert list(fixes) == shipped
    assert all(isinstance(f, AttentionMasks | RegionPasses) for f in fixes.values())
    passes = [name for name, f in fixes.items() if isinstance(f, RegionPasses)]
    assert passes == [name for name in shipped if "pass" in name and "single-pass" not in name]
    assert fixes[shipped[-1]] is INFERENCE_FIX and fixes["(e) passes, bootstrapped, recentred"].recentre


def test_main_table_names_the_rows_it_could_not_measure_instead_of_printing_nan():
    from mcteach.bench import mixing as bench_mixing
    from mcteach.paths import BENCH_MIXING

    report = json.loads(BENCH_MIXING.read_text())
    table = bench_mixing.main_table(report)
    failed = [r for r in report["rows"] if "error" in r]
    assert failed and "nan" not in table
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 1 + len(report["rows"]) - len(failed)
    assert table.splitlines()[-1].startswith("Not measurable: hypernetwork on same_class (none, training")
    assert "/root" not in table and "both answer to 'woman'" in table


def test_main_table_gives_each_unmeasurable_row_its_own_reason():
    from mcteach.bench import mixing as bench_mixing

    nan = [float("nan")] * 3
    failed = [{"method": m, "fix": "none", "pair": p, "error": why, "success": nan}
              for m, p, why in (("hypernetwork", "same_class", "/a/b/x and /a/b/y both answer to 'woman'"),
                                ("textual_inversion", "control", "no label for 'trumpet'"))]
    lines = bench_mixing.main_table({"rows": failed}).splitlines()[3:]
    assert lines == ["Not measurable: hypernetwork on same_class (none): x and y both answer to 'woman'.",
                     "Not measurable: textual_inversion on control (none): no label for 'trumpet'."]


def test_the_bench_prompt_names_each_place_in_words():
    assert bench_mixing._prompt(["cpd woman", "tkb man"], bench_mixing.LAYOUT) == \
        "a cpd woman on the left and a tkb man on the right"
    assert bench_mixing._prompt(["a", "b", "c"], bench_mixing.THIRDS) == "a a and a b and a c"


def test_every_bench_fix_has_a_sampler_and_the_single_pass_fix_is_one_unet_pass():
    from mcteach.mixing.masking import SINGLE_PASS_FIX, AttentionMasks

    assert set(bench_mixing.SAMPLER_OF) == set(bench_mixing.FIXES)
    assert bench_mixing.SAMPLER_OF["single"] is SINGLE_PASS_FIX and isinstance(SINGLE_PASS_FIX, AttentionMasks)
    assert not SINGLE_PASS_FIX.coarse and SINGLE_PASS_FIX.bind_adapters and SINGLE_PASS_FIX.self_attention


def test_fix_timing_times_every_fix_alternately_and_divides_by_the_first(monkeypatch):
    calls = []

    def fake(pipe, prompt, regions, *, fix, seed, **kw):
        calls.append(fix)
        import time

        time.sleep(0.002 if fix == "plain" else 0.004)
        return [None] * len(seed)

    monkeypatch.setattr(bench_mixing, "regional_generate", fake)
    t = bench_mixing.fix_timing(None, "p", [], {"plain": "plain", "slow": "slow"}, images=2, repeats=3)
    assert calls == ["plain", "slow"] * 3  # alternately, in one run
    assert t["ratio"]["plain"] == 1.0 and t["ratio"]["slow"] > 1.3
    calls.clear()
    t = bench_mixing.fix_timing(None, "p", [], {"plain": "plain", "own": lambda seeds: calls.append(seeds)}, images=2,
                                repeats=2)
    assert calls == ["plain", [0, 1]] * 2  # a function of the seeds is called, not handed to regional_generate


def test_the_costs_verb_times_every_inference_fix(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(bench_mixing.Bench, "__init__", lambda self, *a, **k: setattr(self, "model", None))
    monkeypatch.setattr(bench_mixing.Bench, "loaded", lambda self, *a: (None, {"w": "cpd woman", "m": "tkb man"},
                                                                        {"w": "a", "m": "b"}, None, None, 0))
    monkeypatch.setattr(bench_mixing, "CONCEPT_PAIRS", {"couple": ("w", "m")})
    monkeypatch.setattr(bench_mixing, "fix_timing",
                        lambda pipe, prompt, regions, fixes, *a: seen.append((prompt, list(fixes))) or {"ratio": {}})
    out = tmp_path / "costs.json"
    assert cli_main(["bench", "mixing", "--costs", str(out)]) == 0
    assert seen == [("a cpd woman on the left and a tkb man on the right", list(bench_mixing.COSTED))]
    assert json.loads(out.read_text()) == {"ratio": {}, "model": "embedded"}


def test_the_sweep_verb_writes_its_report(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_mixing, "sweep_report", lambda bench, log=None: {"base": {}, "couple": {}, "timing": {}})
    monkeypatch.setattr(bench_mixing.Bench, "__init__", lambda self, *a, **k: None)
    out = tmp_path / "sweep.json"
    assert cli_main(["bench", "mixing", "--sweep", str(out)]) == 0
    assert json.loads(out.read_text()) == {"base": {}, "couple": {}, "timing": {}}


def test_generate_with_the_single_pass_fix_needs_regions(capsys, tmp_path):
    assert cli_main(["generate", "--prompt", "a cat", "--fix", "single", "--out", str(tmp_path / "x.png")]) != 0
    assert "--fix single needs one --region per concept" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_rejudge_recomputes_the_position_free_figures_from_the_saved_images(tmp_path, capsys):
    from mcteach.measure import instances
    from mcteach.world import scenes

    woman, man = scenes.EMOJI["woman with red hair and medium skin"], scenes.EMOJI["man with curly hair and light skin"]
    scenes.render_scene([(woman, "left"), (man, "right")], seed=3).image.save(tmp_path / "lora-auto-couple-00.png")
    instances.split_face(woman, man, seed=3).save(tmp_path / "lora-auto-couple-01.png")
    slugs = list(bench_mixing.CONCEPT_PAIRS["couple"])
    row = {**fake_row("lora", "auto", "couple", slugs), "n": 2, "free_success": [0.0] * 3}
    kept = {**fake_row("lora", "none", "couple", slugs), "n": 2, "free_success": [0.25] * 3}
    report = bench_mixing.rejudge({"rows": [row, kept]}, tmp_path, log=print)
    assert report["rows"][0]["free_success"][0] == 0.5  # the pair found, the split face not
    assert report["rows"][0]["count_ok"][0] == 0.5
    assert report["rows"][1]["free_success"] == [0.25] * 3  # no images saved: left as it was, and said
    assert "lora / none / couple: images not saved" in capsys.readouterr().out


def test_the_jobs_give_each_method_its_fixes_and_the_many_concept_rows_a_wide_canvas(stub, tmp_path):
    """Pairs never get the wide canvas (halves fit the model's own); a fused LoRA gets no training fix; three and four
    concepts get their own fixes, the wide canvas among them."""
    out = tmp_path / "jobs.json"
    bench_mixing.run(methods=["lora", "fused_lora"], fixes=list(bench_mixing.FIXES), pairs=["couple"], out=out,
                     triple=True, base=False)
    jobs = [(r["method"], r["fix"], r["pair"]) for r in json.loads(out.read_text())["rows"]]
    assert [f for m, f, p in jobs if (m, p) == ("lora", "couple")] == list(bench_mixing.PAIR_FIXES)
    assert [f for m, f, p in jobs if m == "fused_lora"] == list(bench_mixing.FUSED_FIXES)
    assert [f for m, f, p in jobs if p == "three"] == list(bench_mixing.MANY_FIXES["three"])
    assert [f for m, f, p in jobs if p == "four"] == ["none", "inference", "wide"]
    assert "wide" not in bench_mixing.PAIR_FIXES and "training" not in bench_mixing.FUSED_FIXES


def test_textual_inversion_rows_are_drawn_at_full_guidance_inside_the_passes(monkeypatch):
    """The bench's row draws with the method's passes fix: TI's at full guidance, every other method's at half."""
    from types import SimpleNamespace

    from mcteach.measure import instances
    from mcteach.measure.metrics import PairResult
    from mcteach.mixing.passes import INFERENCE_FIX, PROMPT_CONCEPT_FIX

    seen = []
    concepts = [SimpleNamespace(name="w"), SimpleNamespace(name="m")]
    judge = SimpleNamespace(labels_of=lambda ims, pos: ["w"] * len(ims))
    monkeypatch.setattr(bench_mixing.Bench, "loaded", lambda self, method, slugs, reg: (
        None, {"w": "cpd woman", "m": "tkb man"}, {"w": None, "m": None}, concepts, judge, 0.0))
    monkeypatch.setattr(bench_mixing, "regional_generate",
                        lambda pipe, prompt, regions, fix, seed, **k: seen.append(fix) or [None] * len(seed))
    monkeypatch.setattr(bench_mixing, "judge_instances", lambda *a, **k: [
        PairResult("p", ("w", "m"), ("left", "right"), 0, ("w", "m"), (1.0, 1.0), (0.0, 0.0), "success")] * 2)
    monkeypatch.setattr(instances, "judge_images", lambda *a, **k: [])
    monkeypatch.setattr(instances, "summarize", lambda r: {"success": [1.0] * 3, "count_ok": [1.0] * 3,
                                                           "id_conf": [1.0] * 3})
    bench = bench_mixing.Bench.__new__(bench_mixing.Bench)
    bench.seeds, bench.fidelity_seeds, bench.save_images = 2, 1, None
    for method, want in (("textual_inversion", PROMPT_CONCEPT_FIX), ("lora", INFERENCE_FIX)):
        seen.clear()
        bench.row(method, "inference", "couple", ("w", "m"))
        assert seen and all(f is want for f in seen), (method, seen)

"""The benchmark's scoring and tables, the weight-change report, and the TI inspection helpers."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mcteach.bench import methods as bench_methods
from mcteach.cli import main as cli_main
from mcteach.measure import metrics
from mcteach.measure.judge import Judge
from mcteach.methods.catalog import train_concept
from mcteach.methods.changes import changes, format_changes, snapshot
from mcteach.methods.textual_inversion import embedding_norms, nearest_tokens
from mcteach.world import scenes
from mcteach.world.concepts import load_concept


def trained(random_pipe, method, tmp_path, **kw):
    pipe = copy.deepcopy(random_pipe)
    before = snapshot(pipe)
    if method == "dreambooth":
        kw |= dict(num_class_images=2, class_steps=2, world_prior=False)
    train_concept(pipe, "koala", method, out=tmp_path / method, steps=2, batch_size=1, lr=1e-2, progress=False, **kw)
    return pipe, changes(before, pipe)


def by_part(rows):
    return {r["part"]: r for r in rows}


def test_changes_of_textual_inversion_is_one_new_row(random_pipe, tmp_path):
    pipe, rows = trained(random_pipe, "textual_inversion", tmp_path)
    d = pipe.text_encoder.config.hidden_size
    assert [r["part"] for r in rows] == ["text_encoder", "unet", "vae"]
    assert [r["values_changed"] for r in rows] == [0, 0, 0]
    assert [r["new_values"] for r in rows] == [d, 0, 0]
    assert "text_encoder" in format_changes(rows)


def test_changes_of_lora_are_new_values_only(random_pipe, tmp_path):
    pipe, rows = trained(random_pipe, "lora", tmp_path, rank=2, alpha=2)
    r = by_part(rows)
    assert sum(x["values_changed"] for x in rows) == 0  # peft's base_layer names are matched to the originals
    lora_values = sum(p.numel() for n, p in pipe.unet.named_parameters() if "lora_" in n)
    assert r["unet"]["new_values"] == lora_values > 0 and r["text_encoder"]["new_values"] == 0


@pytest.mark.parametrize("text_encoder", [True, False])
def test_changes_of_dreambooth_move_the_unet_and_the_text_encoder_if_asked(random_pipe, tmp_path, text_encoder):
    _, rows = trained(random_pipe, "dreambooth", tmp_path, text_encoder=text_encoder)
    r = by_part(rows)
    assert r["unet"]["values_changed"] > 0.9 * r["unet"]["values_before"]
    assert (r["text_encoder"]["values_changed"] > 0) == text_encoder
    assert r["vae"]["values_changed"] == 0


def test_changes_report_an_attached_hypernetwork(random_pipe, tmp_path):
    pipe, rows = trained(random_pipe, "hypernetwork", tmp_path)
    d = pipe.text_encoder.config.hidden_size
    assert rows[-1]["part"] == "hypernetwork" and rows[-1]["new_values"] == 2 * (4 * d * d + 3 * d)
    assert sum(r["values_changed"] for r in rows) == 0


def test_nearest_tokens_of_a_word_is_itself_and_norms_are_positive(random_pipe):
    word = "bear</w>"
    (w, sim), *_ = nearest_tokens(random_pipe, word)
    assert w == "bear" and sim == pytest.approx(1.0, abs=1e-5)
    (n,), median, p99 = embedding_norms(random_pipe, [word])
    assert n > 0 and 0 < median <= p99
    with pytest.raises(ValueError, match="not in the tokenizer"):
        nearest_tokens(random_pipe, "<nope>")


def test_the_judge_downsamples_large_square_images_and_names_labels():
    judge = Judge.load()
    scene = scenes.render_scene([(scenes.EMOJI["fox"], "left"), (scenes.EMOJI["red apple"], "right")], seed=0)
    big = scene.image.resize((512, 512), Image.NEAREST)
    assert judge.labels_of([scene.image, big], ["left", "right"]) == ["fox", "red apple"]
    with pytest.raises(ValueError, match="resize it first"):
        judge.probs([scene.image.resize((64, 48))], "centre")


class StubJudge:
    """Labels images by their mean red value: enough to test the bookkeeping without a model."""

    labels = ["koala", "bear"]

    def labels_of(self, images, positions):
        return ["koala" if np.asarray(im)[..., 0].mean() > 100 else "bear" for im in images]


def test_concept_samples_counts_fidelity_and_position(monkeypatch):
    red, blue = Image.new("RGB", (64, 64), (200, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 200))
    calls = []

    def fake_generate(pipe, prompts, seed, batch_size=None, **kw):
        calls.append((list(prompts), list(seed)))
        return [red if "left" not in p else blue for p in prompts]

    monkeypatch.setattr(metrics, "generate", fake_generate)
    s = metrics.concept_samples(None, StubJudge(), "sks bear", "koala", seeds=4)
    assert s.fidelity == 1.0 and s.position == 0.5  # left images are "bear", right ones "koala"
    assert calls[0][0][:5] == ["a sks bear"] * 4 + ["a sks bear on the left"]
    assert calls[0][1] == [0, 1, 2, 3] * 3
    assert s.placed_positions == ["left"] * 4 + ["right"] * 4
    fig = s.show()
    assert len(fig.axes) == 12


def test_tables_summarise_rows():
    rows = [{"method": m, "concept": c, "fidelity": f, "position": 0.5, "train_seconds": 60.0, "settings": {}}
            for m, c, f in [("lora", "koala", 1.0), ("lora", "hamster", 0.5), ("dreambooth", "koala", 0.75)]]
    drift = [{"concept": "koala", "phrase": "sks bear", "settings": prior, "fidelity": 1.0,
              "drift": {"before": {"class_kept": 1.0, "class_draws_concept": 0.0, "base_classes_top1": 0.8},
                        "after": {"class_kept": k, "class_draws_concept": 1 - k, "base_classes_top1": 0.7}}}
             for prior, k in zip(bench_methods.PRIORS, (0.9, 0.5, 0.2))]
    text = bench_methods.markdown({"rows": rows, "drift": drift})
    assert "| lora | 0.75 [0.50, 1.00] | 0.50 (hamster) | 1/2 | 0.50 | 60 s (60 s) |" in text
    assert "| hamster | – | 0.50 |" in text  # columns in the course's order: DreamBooth, then LoRA
    assert "| koala (sks bear) | off | 1.00 | 1.00 → 0.20 | 0.00 → 0.80 | 0.80 → 0.70 |" in text
    assert "| koala (sks bear) | class images | 1.00 | 1.00 → 0.50 |" in text
    assert "| koala (sks bear) | class + world images | 1.00 | 1.00 → 0.90 |" in text
    shuffled = bench_methods.drift_table({"drift": drift[::-1]})  # rows come out per concept, in the order of PRIORS
    assert shuffled == bench_methods.drift_table({"drift": drift})


def test_run_skips_rows_already_in_the_report(tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    seen = []

    def fake_run_one(method, slug, judge, work, seeds, model, drift=False, world=None, **settings):
        seen.append((method, slug, settings))
        return {"method": method, "concept": slug, "settings": settings, "fidelity": 1.0, "position": 1.0,
                "train_seconds": 1.0, "phrase": "x", **({"drift": {}} if drift else {})}

    monkeypatch.setattr(bench_methods, "run_one", fake_run_one)
    monkeypatch.setattr("mcteach.measure.judge.Judge.load", classmethod(lambda cls, *a: None))
    bench_methods.run(["lora"], ["koala"], out=out, controls={}, log=lambda *a: None)
    bench_methods.run(["lora", "textual_inversion"], ["koala"], out=out, controls={}, ceiling=(), log=lambda *a: None)
    assert seen == [("lora", "koala", {}), ("textual_inversion", "koala", {})]


def test_run_scores_with_the_judge_it_is_given(tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(bench_methods, "run_one", lambda m, slug, judge, *a, drift=False, world=None, **kw: {
        "method": m, "concept": slug, "settings": kw, "fidelity": float(judge == "mine"), "position": 0.0,
        "train_seconds": 1.0})
    monkeypatch.setattr("mcteach.measure.judge.Judge.load", classmethod(lambda cls, *a: loaded.append(a) or ("mine" if a else "shipped")))
    report = bench_methods.run(["lora"], ["koala"], controls={}, ceiling=(), judge_path=tmp_path / "j.safetensors",
                           log=lambda *a: None)
    assert loaded == [(tmp_path / "j.safetensors",)] and report["rows"][0]["fidelity"] == 1.0
    assert report["judge"] == str(tmp_path / "j.safetensors")
    assert bench_methods.run(["lora"], ["koala"], controls={}, ceiling=(), log=lambda *a: None)["judge"] == "shipped"


def test_run_measures_a_model_of_another_world_with_that_worlds_classes(tmp_path, monkeypatch):
    worlds = []
    monkeypatch.setattr(bench_methods, "run_one", lambda m, slug, judge, *a, drift=False, world=None, **kw: worlds.append(
        world) or {"method": m, "concept": slug, "settings": kw, "fidelity": 1.0, "position": 0.0, "train_seconds": 1.0})
    monkeypatch.setattr("mcteach.measure.judge.Judge.load", classmethod(lambda cls, *a: None))
    report = bench_methods.run(["lora"], ["koala"], controls={}, ceiling=(), world="classic", log=lambda *a: None)
    assert worlds == ["classic"] and report["world"] == "classic"
    assert "world" not in bench_methods.run(["lora"], ["koala"], controls={}, ceiling=(), log=lambda *a: None)
    fox = bench_methods.control_set("fox", "dog", tmp_path, world="classic")  # a classic class: rendered
    assert fox.name == "fox"
    with pytest.raises(ValueError, match="'hedgehog' is not a base class"):  # a broad-world class only
        bench_methods.control_set("hedgehog", "dog", tmp_path, world="classic")


def test_controls_train_the_frozen_unet_methods_on_a_rendered_base_class(tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    seen = []

    def fake_run_one(method, slug, judge, work, seeds, model, drift=False, world=None, **settings):
        concept = load_concept(slug)
        seen.append((method, concept.name, concept.class_word, len(concept)))
        return {"method": method, "concept": concept.slug, "settings": settings, "fidelity": 0.5, "position": 0.0,
                "train_seconds": 1.0, "phrase": "<tiger>", "centre_labels": ["tiger", "cat"]}

    monkeypatch.setattr(bench_methods, "run_one", fake_run_one)
    monkeypatch.setattr("mcteach.measure.judge.Judge.load", classmethod(lambda cls, *a: None))
    for _ in range(2):  # the second run finds every row done
        report = bench_methods.run(["textual_inversion", "lora"], ["koala"], work=tmp_path, drift_concepts=(),
                               controls={"tiger": "cat"}, ceiling=(), out=out, log=lambda *a: None)
    assert seen[2:] == [("textual_inversion", "tiger", "cat", 6)]  # LoRA changes the UNet: no control
    assert len(seen) == 3
    assert "| textual_inversion | 0.50 | tiger from '<tiger>' | 0.50 | tiger 1, cat 1 |" in bench_methods.markdown(report)
    with pytest.raises(ValueError, match="not a base class"):
        bench_methods.control_set("koala", "bear", tmp_path)


def test_the_ceiling_runs_with_the_frozen_unet_methods_and_is_tabled(tmp_path, monkeypatch):
    seen = []

    def fake_run_one(method, slug, judge, work, seeds, model, drift=False, world=None, **settings):
        seen.append((method, slug, settings))
        return {"method": method, "concept": slug, "settings": settings, "position": 0.0, "train_seconds": 1.0,
                "phrase": "bear", "fidelity": {"free_context": 0.5, "hypernetwork": 0.25}.get(method, 0.0),
                "centre_labels": ["koala", "bear"]}

    monkeypatch.setattr(bench_methods, "run_one", fake_run_one)
    monkeypatch.setattr("mcteach.measure.judge.Judge.load", classmethod(lambda cls, *a: None))
    report = bench_methods.run(["hypernetwork", "lora"], ["koala"], work=tmp_path, controls={}, ceiling=("koala",),
                           settings={"steps": 9}, log=lambda *a: None)
    assert seen[-1] == ("free_context", "koala", {})  # --set is for the method rows only
    assert [r["method"] for r in report["ceiling"]] == ["free_context"]
    assert "| koala | 0.25 | 0.50 | koala 1, bear 1 |" in bench_methods.markdown(report)
    seen.clear()
    bench_methods.run(["lora"], ["koala"], work=tmp_path, controls={}, ceiling=("koala",), log=lambda *a: None)
    assert seen == [("lora", "koala", {})]  # no frozen-UNet method asked for: no ceiling


def test_set_overrides_are_parsed_and_passed_to_the_rows(tmp_path, monkeypatch):
    assert bench_methods.parse_settings(["num_vectors=4", "lr=3e-3", "class_word=cat"]) == {
        "num_vectors": 4, "lr": 0.003, "class_word": "cat"}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        bench_methods.parse_settings(["num_vectors"])
    seen = []
    monkeypatch.setattr(bench_methods, "run_one", lambda m, slug, *a, drift=False, world=None, **kw: seen.append(kw) or {
        "method": m, "concept": slug, "settings": kw, "fidelity": 0.0, "position": 0.0, "train_seconds": 1.0})
    monkeypatch.setattr("mcteach.measure.judge.Judge.load", classmethod(lambda cls, *a: None))
    bench_methods.run(["textual_inversion"], ["koala"], work=tmp_path, controls={}, settings={"num_vectors": 4},
                  ceiling=(), log=lambda *a: None)
    assert seen == [{"num_vectors": 4}]


def test_shards_split_the_jobs_and_merge_joins_them(tmp_path, monkeypatch):
    seen = []

    def fake_run_one(method, slug, judge, work, seeds, model, drift=False, world=None, **settings):
        seen.append((method, slug))
        scores = {"class_kept": 1.0, "class_draws_concept": 0.0, "base_classes_top1": 1.0}
        return {"method": method, "concept": slug, "settings": settings, "fidelity": 1.0, "position": 0.5,
                "train_seconds": 1.0, "phrase": "sks bear"} | ({"drift": {"before": scores, "after": scores}}
                                                                if drift else {})

    monkeypatch.setattr(bench_methods, "run_one", fake_run_one)
    monkeypatch.setattr("mcteach.measure.judge.Judge.load", classmethod(lambda cls, *a: None))
    kw = dict(methods=["lora", "dreambooth"], concepts=["koala", "hamster"], drift_concepts=("koala",), controls={},
              log=lambda *a: None)
    parts = [bench_methods.run(out=tmp_path / f"b{i}.json", shard=(i, 2), **kw) for i in range(2)]
    assert len(seen) == 7 and len(set(seen)) == 4  # 4 rows + 3 drift runs, each job in exactly one shard
    assert [len(p["rows"]) + len(p["drift"]) for p in parts] == [4, 3]
    merged = bench_methods.merge(parts + [parts[0]])  # a row in two files is kept once
    assert sorted((r["method"], r["concept"]) for r in merged["rows"]) == sorted(
        (m, c) for m in kw["methods"] for c in kw["concepts"])
    assert len(merged["drift"]) == 3 and merged["controls"] == []
    out = tmp_path / "all.json"
    cli_main(["bench", "methods", "--merge", str(tmp_path / "b0.json"), str(tmp_path / "b1.json"), "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == merged["rows"]
    with pytest.raises(SystemExit, match="I/N"):
        cli_main(["bench", "methods", "--shard", "2/2", "--out", str(out)])


def test_rescore_judges_the_saved_adapters_again_without_training(tmp_path, monkeypatch):
    from mcteach.methods.catalog import train_concept
    from mcteach.sd.pipeline import load_pipeline

    pipe = load_pipeline(dtype=torch.float32)
    train_concept(pipe, "koala", "textual_inversion", out=tmp_path / "textual_inversion" / "koala", steps=2,
                  progress=False)
    row = {"method": "textual_inversion", "concept": "koala", "settings": {}, "phrase": "<koala>", "fidelity": -1.0,
           "position": -1.0, "train_seconds": 12.5, "centre_labels": []}
    report = {"rows": [row], "seeds": 2}
    def no_training(*a, **k):
        raise AssertionError("rescore trained")

    monkeypatch.setattr("mcteach.bench.methods.train_concept", no_training)
    monkeypatch.setattr("mcteach.bench.methods.train", no_training)
    judge = Judge.load()
    again = bench_methods.rescore(report, judge, tmp_path, log=lambda *a: None)
    new = again["rows"][0]
    assert new["train_seconds"] == 12.5 and again["judge"] == "shipped" and report["rows"][0]["fidelity"] == -1.0
    # the scores are the ones run_one gives the same adapter: the same images, the same judge
    fresh = load_pipeline(dtype=torch.float32)
    from mcteach.methods.adapters import load_adapter
    load_adapter(fresh, tmp_path / "textual_inversion" / "koala")
    expected = bench_methods.concept_scores(fresh, judge, "<koala>", "koala", 2)
    assert (new["fidelity"], new["position"], new["centre_labels"]) == (
        expected["fidelity"], expected["position"], expected["centre_labels"])
    with pytest.raises(SystemExit, match="needs --out"):
        cli_main(["bench", "methods", "--rescore", "--out", str(tmp_path / "none.json")])


def test_a_concept_the_judge_has_no_label_for_is_imprinted_from_its_images(tmp_path):
    """A user's own folder is scored by a judge that learned it from its images, not by one that calls every image a
    miss; a shipped concept keeps the shipped judge as it is."""
    from mcteach.world.concepts import make_concept_set

    judge = Judge.load()
    assert bench_methods.judge_for(judge, "koala", "koala") is judge
    folder = make_concept_set(scenes.Emoji("🦘", "animal"), "deer", tmp_path / "kangaroo")
    taught = bench_methods.judge_for(judge, "kangaroo", folder)
    assert taught.labels == judge.labels + ["kangaroo"]
    renders = [scenes.render_scene([(scenes.Emoji("🦘", "animal"), "centre")], seed=200 + i).image for i in range(4)]
    assert taught.labels_of(renders, "centre").count("kangaroo") >= 3


def test_none_skips_the_controls_and_the_ceiling(monkeypatch):
    seen = {}
    monkeypatch.setattr(bench_methods, "run", lambda *a, **kw: seen.update(controls=a[6], ceiling=a[10]) or {})
    monkeypatch.setattr(bench_methods, "markdown", lambda report: "")
    cli_main(["bench", "methods", "--controls", "none", "--ceiling", "none"])
    assert seen == {"controls": {}, "ceiling": []}


def test_variants_are_new_to_the_world_and_render_as_few_shot_sets(tmp_path):
    """The fresh variants: none is a base class or a shipped concept, each starts from a base class word, and
    ``--concepts variants`` gets a loadable folder of six images for each."""
    known = {e.chars for e in scenes.BASE_CLASSES} | {e.chars for e, _ in scenes.HELDOUT_CONCEPTS.values()}
    base_names = {e.name for e in scenes.BASE_CLASSES}
    assert not known & set(bench_methods.VARIANTS)
    assert all(word in base_names for _, word in bench_methods.VARIANTS.values())
    folders = bench_methods.variant_sets(tmp_path)
    concepts = [load_concept(f) for f in folders]
    assert len({c.name for c in concepts}) == len(bench_methods.VARIANTS)
    assert not {c.name for c in concepts} & base_names  # the judge learns each from its images (judge_for)
    assert all(len(c) == 6 and c.class_word in base_names for c in concepts)


def test_run_records_a_set_rendered_under_work_relative_to_it(tmp_path, monkeypatch):
    """A row of a folder under ``work`` (``--concepts variants``) names it relative to ``work``, so the report holds
    no machine's paths and ``rescore --work`` finds it again; a folder elsewhere keeps its path."""
    elsewhere = tmp_path / "mine" / "rose"
    monkeypatch.setattr(bench_methods, "run_one", lambda m, slug, judge, *a, drift=False, world=None, **kw: {
        "method": m, "concept": Path(slug).name, "settings": kw, "folder": str(slug), "fidelity": 1.0,
        "position": 1.0, "train_seconds": 1.0})
    monkeypatch.setattr("mcteach.measure.judge.Judge.load", classmethod(lambda cls, *a: None))
    work = tmp_path / "work"
    report = bench_methods.run(["lora"], [str(work / "variants" / "taxi"), str(elsewhere)], work=work, controls={},
                           ceiling=(), log=lambda *a: None)
    assert [r["folder"] for r in report["rows"]] == [str(Path("variants") / "taxi"), str(elsewhere)]


def test_run_skips_a_folder_concept_already_in_the_report(tmp_path, monkeypatch):
    """Resuming ``--concepts <folders>`` (or ``variants``): a row is keyed by the folder's slug, so it is not trained
    again."""
    out, seen = tmp_path / "bench.json", []
    monkeypatch.setattr(bench_methods, "run_one", lambda m, slug, judge, *a, drift=False, world=None, **kw: seen.append(slug) or {
        "method": m, "concept": Path(slug).name, "settings": kw, "folder": str(slug), "fidelity": 1.0,
        "position": 1.0, "train_seconds": 1.0})
    monkeypatch.setattr("mcteach.measure.judge.Judge.load", classmethod(lambda cls, *a: None))
    folder = str(tmp_path / "work" / "variants" / "taxi")
    for _ in range(2):
        bench_methods.run(["lora"], [folder], work=tmp_path / "work", out=out, controls={}, ceiling=(), log=lambda *a: None)
    assert seen == [folder]

"""The judge against hand labels: the bookkeeping of a labelled set, and what a threshold does to blobs."""

import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from mcteach.measure import calibration as cal
from mcteach.measure.judge import Judge
from mcteach.world import scenes


def blob(seed: int) -> Image.Image:
    """A smooth colour blob on a plain background: what a failed generation looks like to the eye."""
    rng = np.random.default_rng(seed)
    a = np.full((64, 64, 3), rng.integers(150, 240, 3), dtype=np.uint8)
    a[16:48, 16:48] = rng.integers(0, 255, (32, 32, 3))
    return Image.fromarray(a).filter(ImageFilter.GaussianBlur(3))


@pytest.fixture(scope="module")
def labelled():
    names = ["fox", "cat", "panda", "woman", "red apple", "rocket"]
    images, items = [], []
    for i, n in enumerate(names):
        images.append(scenes.render_scene([(scenes.EMOJI[n], "left")], seed=i).image)
        items.append(cal.Item("", "left", n, "render", f"a {n} on the left"))
    for i in range(6):
        images.append(blob(i))
        items.append(cal.Item("", "centre", cal.UNRECOGNISABLE, "blob"))
    return images, items


def test_a_labelled_set_round_trips_and_bad_folders_are_clear_errors(labelled, tmp_path):
    images, items = labelled
    cal.save(tmp_path / "set", images, items)
    again, read = cal.load(tmp_path / "set")
    assert [vars(i) for i in read] == [vars(i) for i in items] and np.array_equal(np.asarray(again[3]), np.asarray(images[3]))
    with pytest.raises(FileNotFoundError, match="labels.json"):
        cal.load(tmp_path)
    (tmp_path / "set" / items[0].file).unlink()
    with pytest.raises(FileNotFoundError, match="names images/0000.png"):
        cal.load(tmp_path / "set")
    sheet = cal.contact_sheet(images, [i.region for i in items], cols=6)
    assert sheet.size == (6 * 128, 2 * (128 + 14))


def test_agreement_counts_blobs_called_a_concept_and_a_threshold_refuses_them(labelled):
    images, items = labelled
    judge = Judge.load()
    never_refuse = cal.agreement(judge, images, items, tau=0.0)
    assert never_refuse["agreement_recognisable"] >= 5 / 6  # clean renders: the judge sees what the label says
    assert never_refuse["n_unrecognisable"] == 6
    # with no threshold every answer is the judge's own top label (its "unrecognisable" included), never a refusal
    said = cal.answers(judge, images, items, tau=0.0)
    assert set(said) <= set(judge.labels)
    tau = cal.best_tau(judge, images, items)
    best = cal.agreement(judge, images, items, tau)
    assert best["agreement"] >= never_refuse["agreement"] and best["blob_called_concept"] <= never_refuse["blob_called_concept"]
    json.dumps(best)  # the report is plain data


def test_the_shipped_calibration_set_is_the_shipped_models_and_the_judge_agrees_with_it():
    """DEFAULT_SET (data/calibration_broad_full): images of the shipped model and of its shipped adapters, labelled by
    eye. The shipped judge (the colour and grey pair) agrees on 0.915 of them at tau 0.5 and 0.92 at tau 0 (measured)."""
    images, items = cal.load(cal.DEFAULT_SET)
    judge = Judge.load()
    assert len(items) >= 200 and {it.label for it in items} <= set(judge.labels)
    assert {it.source.split(" (")[0] for it in items} >= {"base", "lora", "textual_inversion", "hypernetwork"}
    assert cal.agreement(judge, images, items, tau=0.5)["agreement_recognisable"] >= 0.85


@pytest.mark.parametrize("folder, n", [("calibration_broad", 200), ("calibration_broad_train", 300),
                                       ("calibration_broad_mined", 192), ("calibration_broad_mined2", 200)])
def test_the_broad_models_labelled_sets_are_whole_and_speak_the_broad_judges_labels(folder, n):
    """The hand labels of the new model's images: every label one a broad-world judge can give, some of each kind."""
    from mcteach.measure.judge import labels_for

    images, items = cal.load(cal.DEFAULT_SET.parent / folder)
    assert len(images) == len(items) == n and all(im.size == (64, 64) for im in images)
    allowed = set(labels_for(scenes.BROAD_CLASSES))
    assert {it.label for it in items} <= allowed
    assert sum(it.label == cal.UNRECOGNISABLE for it in items) >= 10
    assert {it.region for it in items} == {"centre", "left", "right", "top", "bottom"}
    assert len({it.label for it in items}) >= 10


def test_the_judges_training_images_are_not_its_test_images():
    seen = {im.tobytes() for folder in ("calibration_broad", "calibration_broad_mined2", "calibration_broad_full",
                                        "calibration_broad_confident")
            for im in cal.load(cal.DEFAULT_SET.parent / folder)[0]}
    for folder in ("calibration_broad_train", "calibration_broad_mined"):
        train, _ = cal.load(cal.DEFAULT_SET.parent / folder)
        assert not any(im.tobytes() in seen for im in train)


def test_the_broad_judge_against_the_eye_on_the_new_models_images():
    """The shipped judge (trained on renders, then on labelled generated images of other seeds; a colour network and
    a grey one) on the held-out hand-labelled set. Measured: 0.957 of the recognisable images agreed, 7 of 16 blobs
    named a concept (15 of 16 before the labelled images; 7 of 16 for the colour network alone). The floors guard
    that."""
    images, items = cal.load(cal.DEFAULT_SET.parent / "calibration_broad")
    judge = Judge.load()
    a = cal.agreement(judge, images, items, tau=0.0)
    assert a["agreement_recognisable"] >= 0.95
    assert a["blob_called_concept"] <= 0.5  # not yet the aim (no blob named a concept)
    assert cal.UNRECOGNISABLE in cal.answers(judge, images, items, tau=0.0)  # it does say it, unlike the shipped judge


def test_mining_keeps_the_images_the_judge_doubts_most(tmp_path):
    classes = [scenes.EMOJI[n] for n in ("fox", "rocket", "red apple")]
    items = cal.mine_set(tmp_path, classes=classes, per_class=2, keep=3, seed=7)
    images, again = cal.load(tmp_path)
    assert [vars(i) for i in again] == [vars(i) for i in items] and len(images) == 3
    # labels are what each prompt asked, in class order; the seeds are distinct and start at --seed
    assert all(it.label in it.prompt for it in items)
    seeds = [int(it.source.split("seed ")[1].split(",")[0]) for it in items]
    assert seeds == sorted(seeds) and min(seeds) >= 7 and max(seeds) < 13
    kept = [float(it.source.rsplit(" ", 1)[1]) for it in items]
    judge = Judge.load()
    p = [float(judge.probs([im], it.region)[0, judge.labels.index(it.label)]) for im, it in zip(images, items)]
    assert np.allclose(p, kept, atol=0.01)  # the judge's doubt is recorded (PNG round trip aside)
    every = cal.mine_set(tmp_path / "all", classes=classes, per_class=2, keep=6, seed=7)
    doubt = sorted(float(it.source.rsplit(" ", 1)[1]) for it in every)
    assert sorted(kept) == doubt[:3] and doubt[3] >= max(kept)  # the three least sure of all six


def test_the_next_models_full_set_covers_base_and_adapters_and_the_broad_judge_agrees_on_them():
    """data/calibration_broad_full: the next model's base images and its retrained couple adapters (LoRA, TI, HN, and
    LoRA with the inference fix, each half), 200 labelled by eye. Measured with the shipped judge at tau 0: base
    118/120, LoRA 16/16, TI 16/16, HN 14/16, LoRA + inference fix 20/32 (it calls the fix's noisy women
    unrecognisable)."""
    from mcteach.measure.judge import labels_for

    images, items = cal.load(cal.DEFAULT_SET.parent / "calibration_broad_full")
    assert len(items) == 200 and {it.label for it in items} <= set(labels_for(scenes.BROAD_CLASSES))
    sources = {it.source.split(" (")[0] for it in items}
    assert sources == {"base", "lora", "textual_inversion", "hypernetwork", "lora+inference fix"}
    judge = Judge.load()
    said = cal.answers(judge, images, items, tau=0.0)
    base = [s == it.label for s, it in zip(said, items) if it.source.startswith("base")]
    methods = [s == it.label for s, it in zip(said, items) if it.source.split(" (")[0] in ("lora", "textual_inversion")]
    assert np.mean(base) >= 0.95 and np.mean(methods) >= 0.9


def test_a_sample_of_what_a_mine_left_out_and_the_stratified_by_eye_rate(tmp_path):
    classes = [scenes.EMOJI[n] for n in ("fox", "rocket", "red apple")]
    mined = cal.mine_set(tmp_path / "mined", classes=classes, per_class=2, keep=3, seed=7)
    sample = cal.sample_rest(tmp_path / "rest", tmp_path / "mined", n=2, classes=classes, per_class=2, seed=7)
    _, prompts, seeds = cal.mine_population(classes, per_class=2, seed=7)
    kept = {int(it.source.split("seed ")[1].split(",")[0]) for it in mined}
    drawn = [int(it.source.split("seed ")[1].split(",")[0]) for it in sample]
    assert len(drawn) == 2 and not kept & set(drawn) and all(prompts[seeds.index(s)] == it.prompt for s, it in zip(drawn, sample))
    with pytest.raises(ValueError, match="per_class"):  # not the population it was mined from
        cal.sample_rest(tmp_path / "bad", tmp_path / "mined", n=2, classes=classes, per_class=3, seed=7)
    # the rate: the census counts as it is, the sample stands for the rest of the population
    census = [cal.Item("", "centre", lab, "", "a fox") for lab in ("fox", "fox", cal.UNRECOGNISABLE)]
    right = [cal.Item("", "left", "rocket", "", "a rocket on the left")] * 2
    r = cal.stratified_rate(census, right, population=6)
    assert r["rate"] == pytest.approx((2 + 3 * 1.0) / 6) and r["interval"][1] == pytest.approx(r["rate"])
    assert r["interval"][0] < r["rate"]  # two of two right is not proof the rest are all right
    half = cal.stratified_rate(census, right[:1] + [cal.Item("", "left", "nothing", "", "a rocket on the left")], 6)
    assert half["rate"] == pytest.approx((2 + 3 * 0.5) / 6)
    with pytest.raises(ValueError, match="leaves"):
        cal.stratified_rate(census, right * 2, population=6)
    assert cal.wilson(0, 10)[0] == 0.0 and cal.wilson(10, 10)[1] == 1.0 and cal.wilson(150, 150)[0] == pytest.approx(0.975, abs=1e-3)


def test_the_base_model_draws_what_was_asked_by_eye_over_every_class():
    """The shipped model, 199 classes x 6 seeds (1,194 images, seeds 20000-21193): the 200 the judge doubted most
    (data/calibration_broad_mined2, 178 drawn as asked by eye) and 150 drawn at random from the other 994
    (data/calibration_broad_confident, `calibration sample`: 150 of 150 by eye). By eye 0.982 [0.961, 0.982] of
    all; the judge, on the same images, agrees with the eye on all 150 of the sample."""
    census = cal.load(cal.DEFAULT_SET.parent / "calibration_broad_mined2")[1]
    images, sample = cal.load(cal.DEFAULT_SET.parent / "calibration_broad_confident")
    rate = cal.stratified_rate(census, sample, population=1194)
    assert rate["rate"] >= 0.97 and rate["sample"] == [150, 150]
    assert cal.agreement(Judge.load(), images, sample, tau=0.0)["agreement"] >= 0.98

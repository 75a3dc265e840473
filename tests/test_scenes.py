import numpy as np
import pytest

from mcteach.world import regions, scenes
from mcteach.world.scenes import BASE_CLASSES, EMOJI, HELDOUT_CONCEPTS, render_scene


def test_enough_classes_in_every_category_and_heldout_disjoint():
    cats = {c: sum(e.category == c for e in BASE_CLASSES) for c in ("animal", "person", "food", "object")}
    assert len(BASE_CLASSES) >= 40 and min(cats.values()) >= 8, cats
    assert len({e.name for e in BASE_CLASSES}) == len(BASE_CLASSES)
    held = [e for e, _ in HELDOUT_CONCEPTS.values()]
    assert len(held) >= 8
    assert not {e.chars for e in held} & {e.chars for e in BASE_CLASSES}
    for e, class_word in HELDOUT_CONCEPTS.values():
        assert class_word in {b.name for b in BASE_CLASSES}


@pytest.mark.parametrize(
    "chars, name",
    [("\U0001F98A", "fox"), ("\U0001F34E", "red apple"), ("\U0001F469\u200d\U0001F9B1", "woman with curly hair"),
     ("\U0001F468\U0001F3FE", "man with medium dark skin"),
     ("\U0001F469\U0001F3FD\u200d\U0001F9B0", "woman with red hair and medium skin"), ("\u26bd", "soccer ball")],
)
def test_emoji_names_come_from_unicode(chars, name):
    assert scenes.emoji_name(chars) == name


def test_every_class_renders_and_is_visible():
    for e in EMOJI.values():
        g = scenes.glyph(e.chars)
        assert g.mode == "RGBA" and min(g.size) > 40, e


def test_scene_is_deterministic_and_captioned():
    objs = [(EMOJI["fox"], "left"), (EMOJI["red apple"], "right")]
    a, b = render_scene(objs, seed=3), render_scene(objs, seed=3)
    c = render_scene(objs, seed=4)
    assert a.caption == "a fox on the left and a red apple on the right"
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))
    assert a.image.size == (64, 64) and a.image.mode == "RGB"


@pytest.mark.parametrize("pos", ["left", "right", "top", "bottom"])
def test_masks_lie_in_their_region(pos):
    for seed in range(10):
        s = render_scene([(EMOJI["cat"], pos)], seed=seed)
        m = s.masks[0]
        inside = m[regions.region_mask(pos, 64) > 0.5].sum() / m.sum()
        assert inside > 0.97, (pos, seed, inside)
        assert 0.05 < m.mean() < 0.3


def test_mask_matches_pixels_that_differ_from_background():
    s = render_scene([(EMOJI["panda"], "centre")], seed=0, background=(200, 100, 50))
    img = np.asarray(s.image).astype(int)
    differs = np.abs(img - np.array([200, 100, 50])).sum(-1) > 30
    assert (differs == (s.masks[0] > 0.5)).mean() > 0.97


def test_captions_use_articles_and_all_templates():
    assert scenes.caption([("avocado", "centre")]) == "an avocado"
    assert scenes.caption([("cat", "top"), ("dog", "bottom")]) == "a cat at the top and a dog at the bottom"
    caps = {scenes.random_scene(i).caption.split(" and ")[0].split(" ", 2)[-1] for i in range(300)}
    assert any("on the left" in c for c in caps) and any("at the top" in c for c in caps)


@pytest.mark.parametrize(
    "objs, match",
    [([("fox", "middle")], "unknown position"), ([("fox", "left"), ("cat", "left")], "opposite halves"),
     ([("fox", "left"), ("cat", "top")], "opposite halves"), ([], "one or two"),
     ([("fox", "left"), ("cat", "right"), ("dog", "top")], "one or two")],
)
def test_bad_layouts_are_refused_clearly(objs, match):
    with pytest.raises(ValueError, match=match):
        render_scene([(EMOJI[n], p) for n, p in objs], seed=0)


def test_missing_font_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(scenes, "FONT_CANDIDATES", (str(tmp_path / "nope.ttf"),))
    monkeypatch.delenv("MCTEACH_EMOJI_FONT", raising=False)
    monkeypatch.delenv("CONDA_PREFIX", raising=False)
    with pytest.raises(scenes.EmojiFontMissing, match="apt-get install fonts-noto-color-emoji"):
        scenes.font_path()


def test_vocabulary_covers_base_captions_only_when_asked():
    base = set(scenes.vocabulary_words(BASE_CLASSES))
    assert {"fox", "left", "and", "an", "bottom"} <= base
    assert "koala" not in base and "koala" in scenes.vocabulary_words()


def test_font_is_found_in_a_conda_environment(monkeypatch, tmp_path):
    real = scenes.font_path()
    (tmp_path / "fonts").mkdir()
    (tmp_path / "fonts" / "NotoColorEmoji.ttf").symlink_to(real)
    monkeypatch.setattr(scenes, "FONT_CANDIDATES", ())
    monkeypatch.delenv("MCTEACH_EMOJI_FONT", raising=False)
    monkeypatch.setenv("CONDA_PREFIX", str(tmp_path))
    assert scenes.font_path() == tmp_path / "fonts" / "NotoColorEmoji.ttf"


def test_the_broad_world_is_varied_names_uniquely_and_leaves_the_held_out_concepts_out():
    broad = scenes.BROAD_CLASSES
    cats = {c: sum(e.category == c for e in broad) for c in ("animal", "person", "food", "object")}
    assert len(broad) >= 150 and min(cats.values()) >= 20, cats
    assert len({e.name for e in broad}) == len(broad) == len({e.chars for e in broad})
    assert {e.name for e in scenes.CLASSIC_CLASSES} <= {e.name for e in broad}  # a superset of the first world
    # people as gender x hair x skin tone: every combination but the held-out ones
    people = {e.name for e in broad if e.category == "person"}
    held = {e.name for e, _ in HELDOUT_CONCEPTS.values()}
    for g in ("woman", "man"):
        for h in scenes.HAIRS:
            for t in scenes.TONES:
                name = scenes.person(g, h, t).name
                assert (name in people) != (name in held), name
    # each held-out person is an unseen combination of seen parts
    assert {"woman with red hair", "woman with medium skin", "man with curly hair", "man with light skin"} <= people
    for e, class_word in HELDOUT_CONCEPTS.values():
        assert class_word in {b.name for b in broad} and e.chars not in {b.chars for b in broad}


def test_every_broad_class_renders_as_one_glyph_and_every_caption_word_is_one_token():
    from mcteach.sd import tiny

    for e in scenes.BROAD_CLASSES:
        g = scenes.glyph(e.chars)
        assert min(g.size) > 40 and g.size[0] < 140, e  # one glyph, not a ZWJ sequence falling apart
    tok = tiny.build_tokenizer(scenes.vocabulary_words(scenes.BROAD_CLASSES))
    longest = max(scenes.BROAD_CLASSES, key=lambda e: len(e.name.split()))
    caption = scenes.caption([(longest, "left"), (longest, "right")])
    ids = tok(caption).input_ids
    assert len(ids) == len(caption.split()) + 2 <= tiny.MAX_LENGTH


def test_held_out_concepts_never_appear_in_broad_training_captions():
    from mcteach.sd import pretrain

    held = [e.name for e, _ in HELDOUT_CONCEPTS.values()]
    for step in range(20):
        for c in pretrain.scene_batch(step, 16, seed=2, classes=scenes.BROAD_CLASSES)[2]:
            # no phrase names a held-out concept ("a woman with red hair and medium skin ...")
            phrases = [p.split(" on the ")[0].split(" at the ")[0] for p in f" and {c}".split(" and a")[1:]]
            names = [p.removeprefix("n ").strip() for p in phrases]
            assert all(n in EMOJI for n in names), (c, names)  # the parse recovers every object's name
            assert not set(names) & set(held), c


@pytest.mark.parametrize(
    "chars, name",
    [("\U0001F471\U0001F3FF\u200d\u2640\ufe0f", "woman with blond hair and dark skin"),
     ("\U0001F469\U0001F3FB\u200d\U0001F9B2", "bald woman with light skin"), ("\U0001F468\u200d\U0001F373", "man cook"),
     ("\U0001F408\u200d\u2b1b", "black cat"), ("\U0001F9D3", "older person"), ("\U0001F43B\u200d\u2744\ufe0f", "polar bear")],
)
def test_broad_world_names(chars, name):
    assert scenes.emoji_name(chars) == name


def test_a_pillow_without_text_shaping_is_caught_with_a_fix(monkeypatch):
    """Without libraqm (FriBiDi missing) Pillow draws a ZWJ/skin-tone sequence as separate glyphs: a person
    beside a tone swatch. A model trained on that learns swatches (it happened on a GPU machine); refuse it."""
    from PIL import ImageFont

    basic = ImageFont.truetype(str(scenes.font_path()), scenes.FONT_SIZE, layout_engine=ImageFont.Layout.BASIC)
    monkeypatch.setattr(scenes, "_font", lambda: basic)
    scenes.glyph.cache_clear()
    with pytest.raises(scenes.EmojiShapingMissing, match="libfribidi"):
        scenes.glyph("\U0001F468\U0001F3FE\u200d\U0001F9B0")  # man, medium-dark skin, red hair
    assert scenes.glyph("\U0001F98A").size[0] < scenes.FONT_SIZE * 1.5  # a single code point still renders
    scenes.glyph.cache_clear()


def test_world_classes_names_a_world_and_refuses_an_unknown_one():
    assert scenes.world_classes() is scenes.BASE_CLASSES is scenes.BROAD_CLASSES
    assert scenes.world_classes("classic") is scenes.CLASSIC_CLASSES and len(scenes.CLASSIC_CLASSES) == 60
    assert set(scenes.CLASSIC_CLASSES) < set(scenes.BROAD_CLASSES)
    with pytest.raises(ValueError, match=r"unknown world 'tiny'; choose one of \['broad', 'classic'\]"):
        scenes.world_classes("tiny")

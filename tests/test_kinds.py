"""Concept sets of other kinds (notebook 09): places that fill the frame, wearables inside their wearer."""

import json

import numpy as np
import pytest

from mcteach.world import kinds, scenes
from mcteach.world.concepts import load_concept

WORLD = "".join(e.chars for e in scenes.world_classes())


@pytest.mark.parametrize("chars", [c for p in kinds.PLACES.values() for c, *_ in p.elements]
                         + [w.chars for w in kinds.WEARABLES.values()])
def test_every_element_and_item_is_one_the_world_never_drew(chars):
    assert chars not in WORLD


def test_the_world_check_would_catch_a_drawn_element():
    assert "⛵" in WORLD and "🎩" in WORLD   # a sailing boat and a top hat are the world's: no place or item uses them


@pytest.mark.parametrize("slug", list(kinds.PLACES))
def test_a_place_set_is_views_of_one_scene_with_whole_frame_masks(tmp_path, slug):
    folder = kinds.make_place_set(tmp_path / slug, kinds.PLACES[slug], n=4)
    c = load_concept(folder)
    meta = json.loads((folder / "concept.json").read_text())
    assert (len(c), c.category, meta["extent"], c.class_word) == (4, "place", "global", "house")
    assert all(m.min() == 1 for m in c.masks)
    x = np.stack([np.asarray(im, float) for im in c.images])
    assert 0 < np.abs(x[0] - x[1]).mean() < 40   # another view of the same place: close, not the same
    place = kinds.PLACES[slug]
    top = x[:, :8].reshape(-1, 3).mean(0)   # the sky band
    assert np.abs(top - place.sky).max() < 40 and np.abs(x[:, -4:].reshape(-1, 3).mean(0) - place.ground).max() < 40


def test_sets_are_the_same_files_every_time(tmp_path):
    a = kinds.make_place_set(tmp_path / "a", slug="x", n=2)
    b = kinds.make_place_set(tmp_path / "b", slug="x", n=2)
    assert (a / "01.png").read_bytes() == (b / "01.png").read_bytes()


def test_a_wearable_sits_on_its_wearers_head_inside_the_wearers_mask(tmp_path):
    folder = kinds.make_wearable_set(tmp_path / "cap", n=5)
    c = load_concept(folder)
    meta = json.loads((folder / "concept.json").read_text())
    assert (len(c), c.category, meta["extent"], c.class_word) == (5, "wearable", "nested", "cap")
    for entry, hat in zip(meta["images"], c.masks):
        wearer = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(folder / entry["wearer"]), float) / 255
        hat_px, wearer_px = hat >= 0.5, wearer >= 0.5
        assert hat_px.sum() > 20 and (hat_px <= wearer_px).all()
        assert 0.05 < hat_px.sum() / wearer_px.sum() < 0.5   # a part of the wearer, not all of them
        assert np.nonzero(hat_px)[0].min() == np.nonzero(wearer_px)[0].min()   # the top of the wearer is the hat
        assert entry["caption"].split(" with a billed cap ")[0].split()[1] in kinds.BARE_HEADED


def test_the_command_line_renders_every_kind_and_keeps_them_out_of_the_shipped_sets(tmp_path, capsys):
    from mcteach.cli import main

    main(["concepts", "make", "--kinds", "--out", str(tmp_path), "-n", "3"])
    made = sorted(p.name for p in tmp_path.iterdir())
    assert made == sorted(list(kinds.PLACES) + list(kinds.WEARABLES))
    assert all(len(load_concept(tmp_path / slug)) == 3 for slug in made)
    with pytest.raises(SystemExit, match="--out folder of their own"):
        main(["concepts", "make", "--kinds"])


@pytest.mark.parametrize("card", ["rendered", "measured"])
def test_put_on_sets_the_item_on_the_persons_head_at_its_views_scale(card, tmp_path):
    import shutil

    woman, cap = load_concept("woman_with_red_hair_and_medium_skin"), load_concept("billed_cap")
    if card == "measured":   # a set whose card does not say how the item was worn: measured on the views
        shutil.copytree(cap.folder, tmp_path / "cap")
        meta = json.loads((tmp_path / "cap" / "concept.json").read_text())
        del meta["width"], meta["sink"]
        (tmp_path / "cap" / "concept.json").write_text(json.dumps(meta))
        cap = load_concept(tmp_path / "cap")
    for i, j in [(0, 0), (3, 2), (5, 4)]:
        image, item, wearer = kinds.put_on(woman, i, cap, j)
        body = woman.masks[i] >= 0.5
        ys, xs = np.nonzero(body)
        iy, ix = np.nonzero(item >= 0.5)
        assert len(iy) > 20
        assert iy.max() < ys.min() + 0.5 * (ys.max() - ys.min())      # on the head, not the body
        assert iy.max() > ys.min() + 1                                  # on it, not floating above it
        assert xs.min() - 2 <= ix.mean() <= xs.max() + 2                # above the person, not beside
        share = (ix.max() - ix.min()) / (xs.max() - xs.min())
        view_item, view_wearer = cap.masks[j] >= 0.5, kinds.wearer_masks(cap)[j] >= 0.5
        vx, px = np.nonzero(view_item)[1], np.nonzero(view_wearer & ~view_item)[1]
        assert share == pytest.approx((vx.max() - vx.min()) / (px.max() - px.min()), abs=0.15)
        assert (wearer >= item).all() and (wearer >= woman.masks[i] - 1e-6).all()
        changed = np.abs(np.asarray(image, float) - np.asarray(woman.images[i], float)).sum(-1) > 30
        assert changed[item == 0].sum() == 0                            # only the item's pixels change


def test_wearer_masks_need_a_wearable_set():
    with pytest.raises(ValueError, match="wearer mask"):
        kinds.wearer_masks(load_concept("koala"))


def test_bare_headed_people_have_nothing_on_their_heads():
    names = [e.name for e in kinds.bare_headed()]
    assert "woman with red hair" in names and "man" in names and len(names) > 40
    assert not [n for n in names if any(w in n for w in ("cook", "farmer", "astronaut", "police", "guard"))]

"""Regions that know their concept's extent (notebook 09): a global concept in the background, a wearable nested in
its wearer's region, and the errors that keep two people apart."""

import numpy as np
import pytest
import torch
from PIL import Image

from mcteach.world.regions import BACKGROUND, RegionError, exclusive_masks, region_masks

PEOPLE = ["0.05,0.3,0.45,1", "0.55,0.3,0.95,1"]   # two people standing in the lower part, the place above and between
HAT = "0.1,0.3,0.4,0.45"                           # on the left person's head


def test_the_background_is_every_pixel_no_local_region_covers():
    m = region_masks(PEOPLE + [BACKGROUND], 64)
    assert m.shape == (3, 64, 64)
    assert torch.equal(m[2], 1 - torch.maximum(m[0], m[1]))
    assert m[2][:19].all() and not m[2][40, 10] and m[2][40, 31]   # the sky, not a person, the gap between them
    assert torch.equal(region_masks([BACKGROUND, *PEOPLE], 64)[0], m[2])   # in any place of the list


def test_a_background_alone_is_the_whole_image():
    assert region_masks([BACKGROUND], 16).min() == 1


@pytest.mark.parametrize("specs, within, kinds, match", [
    (["left", "right", BACKGROUND], None, None, "cover the whole image"),
    ([*PEOPLE, BACKGROUND, BACKGROUND], None, None, "more than one 'background'"),
    ([*PEOPLE, HAT], None, None, r"lies entirely inside region 0 .* nest it \(within\[2\] = 0\)"),
    ([*PEOPLE, "0.3,0.3,0.7,0.45"], [None, None, 0], None, "lies outside"),
    ([*PEOPLE, HAT], [None, None, 2], None, "index of another region"),
    ([*PEOPLE, HAT], [None, None, 7], None, "index of another region"),
    ([*PEOPLE, HAT, BACKGROUND], [None, None, 3, None], None, "the background nests in nothing"),
    ([*PEOPLE, HAT, "0.15,0.32,0.25,0.4"], [None, None, 0, 2], None, "itself nested"),
    ([*PEOPLE, HAT], [None, None, 0], ["person", "person", "person"], "only a wearable"),
    ([*PEOPLE, HAT], [None, 0, None], None, "lies outside"),
    ([*PEOPLE, HAT], [None, None], None, "within has 2 entries"),
])
def test_bad_extents_are_refused_with_what_to_do(specs, within, kinds, match):
    with pytest.raises(RegionError, match=match):
        region_masks(specs, 64, within=within, kinds=kinds)


def test_a_wearable_nests_in_its_wearer_and_takes_its_pixels_from_them_only():
    within = [None, None, 0, None]
    m = region_masks([*PEOPLE, HAT, BACKGROUND], 64, within=within, kinds=["person", "person", "wearable", "place"])
    own = exclusive_masks(m, within)
    assert torch.equal(own[2], m[2]) and torch.equal(own[1], m[1]) and torch.equal(own[3], m[3])
    assert torch.equal(own[0], (m[0] - m[2]).clamp_min(0))
    assert own.sum(0).max() == 1 and own.sum(0).min() == 1   # every pixel has exactly one owner
    assert (m.sum(0) > 1).any()   # ... which the nested masks alone do not give: the hat's pixels are its wearer's too


def test_the_passes_give_each_pixel_to_one_pass_a_hat_its_own_and_the_place_the_rest(random_pipe):
    from mcteach.mixing.masking import Region
    from mcteach.mixing.passes import INFERENCE_FIX, region_passes, region_weights

    regions = [Region(PEOPLE[0], "a woman", kind="person"), Region(PEOPLE[1], "a man", kind="person"),
               Region(HAT, "a woman with a hat", within=0, kind="wearable"), Region(BACKGROUND, "a house", kind="place")]
    m, rest, masks = region_weights(random_pipe, regions)
    assert torch.allclose(m.sum(0), torch.ones_like(m[0])) and rest.max() == 0   # no pixel left to the global pass
    cell = (0, 5, 4)   # a latent cell of the hat (rows 0.30-0.45, columns 0.10-0.40 of a 16-cell grid)
    assert m[2][cell] == 1 and m[0][cell] == 0
    image = region_passes(random_pipe, "a woman and a man and a house", regions, fix=INFERENCE_FIX, seeds=[0], steps=2)
    assert len(image) == 1 and image[0].size == (64, 64)
    with pytest.raises(RegionError, match="only a wearable"):
        region_weights(random_pipe, [regions[0], regions[1], Region(HAT, "a man", within=0, kind="person")])


def test_a_silhouette_is_the_concepts_own_pixels_inside_its_region_grown_and_never_shared():
    import numpy as np
    from PIL import Image

    from mcteach.mixing.extent import silhouettes
    from mcteach.world import scenes

    image = scenes.render_scene([(scenes.BASE_CLASSES[0], "left"), (scenes.BASE_CLASSES[1], "right")], seed=2)
    left, right = silhouettes(image.image, ["left", "right"], grow=0)
    truth = image.masks >= 0.5
    assert (left.astype(bool) == truth[0]).mean() > 0.97 and (right.astype(bool) == truth[1]).mean() > 0.97
    grown = silhouettes(image.image, ["left", "right"], grow=3)
    assert grown[0].sum() > left.sum() and not (grown[0].astype(bool) & grown[1].astype(bool)).any()
    blank = Image.new("RGB", (64, 64), (200, 180, 220))
    missing = silhouettes(blank, ["left", "0.6,0.2,0.9,0.8"])   # nothing drawn: the region keeps its whole area
    assert missing[0][:, :32].all() and not missing[0][:, 32:].any()
    assert (missing[1] == region_masks(["0.6,0.2,0.9,0.8"], 64)[0].numpy()).all()


def test_place_generate_needs_one_background_and_one_local_region(random_pipe):
    from mcteach.mixing.extent import place_generate
    from mcteach.mixing.masking import Region

    with pytest.raises(RegionError, match="one region 'background'"):
        place_generate(random_pipe, "a woman", [Region("left", "a woman"), Region("right", "a man")], seeds=[0])
    with pytest.raises(RegionError, match="one region 'background'"):
        place_generate(random_pipe, "a house", [Region(BACKGROUND, "a house")], seeds=[0])
    r = place_generate(random_pipe, "a woman on the left",
                       [Region("left", "a woman on the left", kind="person"), Region(BACKGROUND, "a house", kind="place")],
                       seeds=[0, 1], steps=2)
    assert len(r.images) == len(r.first) == len(r.places) == len(r.silhouettes) == 2 and r.images[0].size == (64, 64)
    assert all(s[0][:, 32:].sum() == 0 for s in r.silhouettes)   # a silhouette stays inside its region
    for image, front, back, (sil,) in zip(r.images, r.first, r.places, r.silhouettes):
        inside = sil >= 0.5
        assert (np.asarray(image)[inside] == np.asarray(front)[inside]).all()
        assert (np.asarray(image)[~inside] == np.asarray(back)[~inside]).all()
    with pytest.raises(ValueError, match="harmonise"):
        place_generate(random_pipe, "a woman", [Region("left", "a woman"), Region(BACKGROUND, "a house")], seeds=[0],
                       harmonise=1.0)
    again = place_generate(random_pipe, "a woman on the left",
                           [Region("left", "a woman on the left", kind="person"), Region(BACKGROUND, "a house", kind="place")],
                           seeds=[0], steps=2, harmonise=0.5)
    assert np.abs(np.asarray(again.images[0], float) - np.asarray(r.images[0], float)).mean() > 0


def test_composite_takes_the_front_inside_the_silhouettes():
    from mcteach.mixing.extent import composite

    front, back = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    a, b = np.zeros((8, 8), np.float32), np.zeros((8, 8), np.float32)
    a[1:3, 1:3], b[5:7, 4:8] = 1, 1
    out = np.asarray(composite(front, back, [a, b]))
    assert (out[(a + b) > 0] == (255, 0, 0)).all() and (out[(a + b) == 0] == (0, 0, 255)).all()
    assert (out[0, 0] == (0, 0, 255)).all() and (out[6, 7] == (255, 0, 0)).all()


def test_region_passes_from_a_start_rerun_the_last_steps(random_pipe):
    from mcteach.mixing.masking import Region
    from mcteach.mixing.passes import INFERENCE_FIX, region_passes
    from mcteach.sd import parts

    regions = [Region("left", "a woman"), Region("right", "a man")]
    start = parts.encode_images(random_pipe, [Image.new("RGB", (64, 64), (200, 120, 40))])
    target = np.asarray(parts.decode_latents(random_pipe, start)[0], float)
    near = region_passes(random_pipe, "a couple", regions, fix=INFERENCE_FIX, seeds=[0], steps=10, start=start,
                         strength=0.1)[0]
    far = region_passes(random_pipe, "a couple", regions, fix=INFERENCE_FIX, seeds=[0], steps=10, start=start,
                        strength=1.0)[0]
    assert np.abs(np.asarray(near, float) - target).mean() < np.abs(np.asarray(far, float) - target).mean()
    with pytest.raises(ValueError, match="strength"):
        region_passes(random_pipe, "a couple", regions, fix=INFERENCE_FIX, seeds=[0], steps=2, start=start, strength=0)
    with pytest.raises(ValueError, match="do not match"):
        region_passes(random_pipe, "a couple", regions, fix=INFERENCE_FIX, seeds=[0, 1], steps=2, start=start)


def test_place_generate_on_a_wide_canvas_draws_the_place_as_a_panorama(random_pipe):
    from mcteach.mixing.extent import place_generate
    from mcteach.mixing.masking import Region
    from mcteach.mixing.passes import WINDOW_FIX

    regions = [Region(p, f"a {w}", kind="person") for p, w in (("left-third", "woman"), ("right-third", "man"))]
    r = place_generate(random_pipe, "a woman and a man", regions + [Region(BACKGROUND, "a house", kind="place")],
                       seeds=[0], fix=WINDOW_FIX, height=64, width=160, steps=2)
    assert r.images[0].size == r.places[0].size == r.first[0].size == (160, 64)
    with pytest.raises(ValueError, match="model's own canvas"):
        place_generate(random_pipe, "a woman and a man", regions + [Region(BACKGROUND, "a house")], seeds=[0],
                       fix=WINDOW_FIX, height=64, width=160, steps=2, harmonise=0.3)


def test_the_command_line_draws_a_place_behind_in_layers(tmp_path, capsys):
    from mcteach import cli
    from mcteach.paths import ADAPTERS_DIR

    woman, garden = ADAPTERS_DIR / "lora" / "woman_with_red_hair_and_medium_skin", ADAPTERS_DIR / "lora" / "cottage_garden"
    out = tmp_path / "garden.png"
    cli.main(["generate", "--adapter", str(woman), "--adapter", str(garden), "--prompt", "a cpd woman on the left",
              "--region", "left=a cpd woman on the left", "--region", "background=a rgs house", "--fix", "layers",
              "--steps", "2", "--out", str(out)])
    assert Image.open(out).size == (64, 64)
    capsys.readouterr()
    assert cli.main(["generate", "--adapter", str(woman), "--prompt", "a cpd woman on the left",
                     "--region", "left=a cpd woman on the left", "--fix", "layers", "--steps", "2", "--out", str(out)]) == 2
    assert "one region 'background'" in capsys.readouterr().err

"""Is the place in the background? The colour-layout check of measure/places.py on rendered places."""

import numpy as np
import pytest
from PIL import Image

from mcteach.measure import places
from mcteach.world import kinds, scenes


@pytest.fixture(scope="module")
def views(tmp_path_factory):
    folder = tmp_path_factory.mktemp("places")
    from mcteach.world.concepts import load_concept
    return {slug: load_concept(kinds.make_place_set(folder / slug, place, n=6)).images
            for slug, place in kinds.PLACES.items()}


def test_a_place_is_told_from_the_worlds_plain_backgrounds_and_from_another_place(views):
    world = [scenes.random_scene(s).image for s in range(32)]
    check = places.calibrate(views["cottage_garden"], world + views["mountain_lake"])
    assert check.margin > 20 and check.views_max < check.threshold < check.negatives_min
    fresh = kinds.render_place(kinds.PLACES["cottage_garden"], __import__("random").Random("another view"))
    assert places.distance(fresh, views["cottage_garden"]) < check.threshold
    assert places.distance(views["mountain_lake"][0], views["cottage_garden"]) > check.threshold


def test_only_the_free_cells_count_and_people_in_front_do_not_hide_the_place(views):
    garden = views["cottage_garden"]
    image = np.asarray(garden[0]).copy()
    person = np.zeros((64, 64), np.float32)
    person[24:64, 4:30] = 1
    image[person > 0] = (255, 0, 255)   # a magenta figure stands in front
    covered = Image.fromarray(image)
    free = places.free_cells([person], 64)
    assert free.sum() < 64 and free[0].all()
    assert places.distance(covered, garden[1:], free) < places.distance(covered, garden[1:])
    with pytest.raises(ValueError, match="no free cell"):
        places.distance(covered, garden, np.zeros((places.GRID, places.GRID), bool))


def test_a_place_that_cannot_be_told_from_a_negative_is_refused(views):
    with pytest.raises(ValueError, match="cannot be told"):
        places.calibrate(views["cottage_garden"], [views["cottage_garden"][0]])
    with pytest.raises(ValueError, match="two or more"):
        places.calibrate(views["cottage_garden"][:1], [])


def test_a_strip_of_sky_cannot_show_the_place_but_half_the_frame_can(views):
    garden, world = views["cottage_garden"], [scenes.random_scene(s).image for s in range(64)]
    negatives = world + views["mountain_lake"] + places.plain_fills(garden)
    strip = np.zeros((64, 64), np.float32)
    strip[24:, :] = 1                        # people cover all but the top three rows of cells: sky and a cloud
    free = places.free_cells([strip], 64)
    sky = Image.new("RGB", (64, 64), (150, 200, 240))
    assert not places.seen(garden[0], garden[1:], negatives, free)       # not even the place itself: too little
    assert not places.seen(sky, garden, negatives, free)
    half = np.zeros((64, 64), np.float32)
    half[24:, 4:30] = 1                      # one person in front: most of the garden is free
    free = places.free_cells([half], 64)
    assert places.seen(garden[0], garden[1:], negatives, free)
    assert not places.seen(sky, garden, negatives, free)

"""Is the wearable on its wearer (notebook 09)? The item's own colours on each person's head."""

import random
from types import SimpleNamespace

import numpy as np
import pytest

from mcteach.bench.kinds import bare_heads, wear_check
from mcteach.measure import wearables
from mcteach.world import kinds
from mcteach.world.concepts import compose, load_concept

COUPLE = ("woman_with_red_hair_and_medium_skin", "man_with_curly_hair_and_light_skin")


@pytest.fixture(scope="module")
def cap_check():
    return wear_check(load_concept("billed_cap"))


def test_the_cap_is_seen_on_its_views_and_on_no_bare_head(cap_check):
    cap = load_concept("billed_cap")
    assert cap_check.bare_max < cap_check.threshold < cap_check.worn_min
    for view, wearer in zip(cap.images, kinds.wearer_masks(cap)):
        assert cap_check.wears(view, wearer >= 0.5)
    for head in bare_heads(20, seed=1):          # other bare heads than the calibration's
        assert not cap_check.wears(head, wearables.person_mask(head))


def test_only_the_head_counts():
    image = np.full((64, 64, 3), 200, np.uint8)
    person = np.zeros((64, 64), bool)
    person[10:60, 20:44] = True
    image[40:60, 20:44] = (35, 150, 240)                               # the item's blue, on the body only
    colours = np.array([[35.0, 150.0, 240.0]])
    from PIL import Image
    assert wearables.share(Image.fromarray(image), person, colours) == 0
    image[10:20, 20:44] = (35, 150, 240)                               # and now on the head
    assert wearables.share(Image.fromarray(image), person, colours) == pytest.approx(10 / 23, abs=0.05)


def test_an_item_coloured_like_hair_is_refused():
    woman = load_concept("woman_with_red_hair_and_medium_skin")       # "wearing" her own hair and face
    with pytest.raises(ValueError, match="cannot be told"):
        wearables.calibrate(woman.images, woman.masks, woman.masks, bare_heads())


def test_the_cap_on_the_woman_is_on_the_wearer_not_the_other(cap_check):
    from mcteach.measure.judge import Judge

    couple = [load_concept(s) for s in COUPLE]
    judge = Judge.load().with_concepts(couple)
    names = [c.name for c in couple]
    cap = load_concept("billed_cap")
    rng, checked, seen = random.Random(3), 0, []
    while checked < 4:
        comp = compose(couple, rng, layouts=[("left", "right")])
        if min(np.nonzero(m >= 0.5)[0].min() for m in comp.masks) < 16:
            continue                                                    # no room above a head for the cap
        k, checked = checked, checked + 1
        pair = SimpleNamespace(images=[comp.image, comp.image], masks=comp.masks, folder="couple")
        for wearer in (0, 1):
            image, _, _ = kinds.put_on(pair, wearer, cap, k)
            got = wearables.judge_wearing(judge, image, names, cap_check)
            assert got.wears[1 - wearer] is False, (k, wearer, got.wears)    # never on the other
            seen.append(got.wears[wearer])
            assert got.heads == 1
        bare = wearables.judge_wearing(judge, comp.image, names, cap_check)
        assert bare.wears == (False, False) and bare.heads == 0
        both, _, _ = kinds.put_on(SimpleNamespace(images=[image], masks=comp.masks, folder="couple"), 0, cap, k)
        assert wearables.judge_wearing(judge, both, names, cap_check).heads == 2
    # on the wearer, unless the cap hides what the judge knows them by (the man's hair) and he is not found
    assert seen.count(True) >= 6 and False not in seen, seen

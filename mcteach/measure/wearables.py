"""Is the wearable on its wearer, and only there? (notebook 09). A hat is not an object of its own in the image: it
sits on a head, joined to the person under it. So each person is found (the position-free judge of notebook 07),
and the item is looked for on that person's head by its colours:

    share(person) = the fraction of the head's pixels (the top ``HEAD`` of the person's box) whose colour lies
                    within ``TOLERANCE`` of one of the item's colours (``palette``: the item's pixels in its own
                    views, clustered into a few colours, less those that bare heads have: a helmet's brown strap
                    is also brown hair)

and the person wears the item when the share reaches the item's ``threshold``: a quarter of the way (``RISE``) from
bare heads (the world's people with nothing on their heads, the greatest share among them) to the item's own views
(each wearer with the item, the least share among them). Not halfway: a generated item is smaller and blurrier than
a rendered one. The billed cap's LoRA alone, 8 seeds: by eye 7 wear a cap, one a faint blue sliver; their shares
0.28-0.62 and 0.07, against 0.00 for every bare head and 0.68 for the least of the cap's views, so that halfway
(0.34) would miss two clear caps. A threshold is only as good as its margin: ``calibrate`` refuses an item whose
colours the bare heads already have (a black mortarboard on black hair).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from ..world.pixels import components, foreground, main_colours
from . import instances

#: the top share of a person's box that is their head (and what sits on it)
HEAD = 0.45
#: colours per item, before those of bare heads are dropped
COLOURS = 6
#: a colour is the item's own when it covers at most this share of every bare head
BARE_SHARE = 0.02
#: how near (RGB distance, of 255) a pixel's colour must be to one of the item's
TOLERANCE = 60.0
#: where the threshold lies between bare heads (0) and the item's least-covered view (1)
RISE = 0.25


@dataclass
class WearCheck:
    """An item's colours and the share of a head they must cover, with both sides of the margin."""
    palette: np.ndarray
    threshold: float
    worn_min: float
    bare_max: float

    @property
    def margin(self) -> float:
        return self.worn_min - self.bare_max

    def wears(self, image: Image.Image, person: np.ndarray) -> bool:
        return share(image, person, self.palette) >= self.threshold


def palette(images, masks, k: int = COLOURS) -> np.ndarray:
    """The item's ``k`` colours: its pixels (``masks`` >= 0.5) in its views, clustered (``pixels.main_colours``)."""
    px = np.concatenate([np.asarray(im.convert("RGB"), np.float32)[np.asarray(m) >= 0.5]
                         for im, m in zip(images, masks)])
    if len(px) < k:
        raise ValueError(f"the item's masks cover {len(px)} pixels in all; a palette of {k} colours needs more")
    return main_colours(px, k)


def head(person: np.ndarray, part: float = HEAD) -> np.ndarray:
    """The person's pixels in the top ``part`` of their bounding box."""
    rows = np.flatnonzero(person.any(1))
    if len(rows) == 0:
        return person.astype(bool)
    top = rows[0] + max(1, int(round(part * (rows[-1] - rows[0] + 1))))
    out = person.astype(bool).copy()
    out[top:] = False
    return out


def share(image: Image.Image, person: np.ndarray, colours: np.ndarray, tolerance: float = TOLERANCE) -> float:
    """The fraction of the person's head pixels within ``tolerance`` of one of ``colours``."""
    top = head(person)
    if not top.any():
        return 0.0
    px = np.asarray(image.convert("RGB"), np.float32)[top]
    d = np.sqrt(((px[:, None] - colours[None]) ** 2).sum(-1)).min(1)
    return float((d <= tolerance).mean())


def person_mask(image: Image.Image) -> np.ndarray:
    """The pixels of a lone person: the largest piece of the foreground."""
    parts = components(foreground(image), min_area=1)
    return parts[0] if parts else np.zeros((image.height, image.width), bool)


def calibrate(views, item_masks, wearer_masks, bare) -> WearCheck:
    """The check of an item from its ``views`` (images of people wearing it, the item's and the wearer's masks)
    and ``bare`` (images of people with nothing on their heads)."""
    views, bare = list(views), list(bare)
    if not views or not bare:
        raise ValueError("calibrating a wearable needs its views and images of bare heads")
    bodies = [person_mask(b) for b in bare]
    colours = np.array([c for c in palette(views, item_masks)
                        if max(share(b, m, c[None]) for b, m in zip(bare, bodies)) <= BARE_SHARE])
    if len(colours) == 0:
        raise ValueError("every colour of the item is also on a bare head (hair, skin): this item cannot be told "
                         "from a head by its colours")
    worn = min(share(v, (np.asarray(i) >= 0.5) | (np.asarray(w) >= 0.5), colours)
               for v, i, w in zip(views, item_masks, wearer_masks))
    bare_max = max(share(b, m, colours) for b, m in zip(bare, bodies))
    if bare_max >= worn:
        raise ValueError(f"a bare head has as much of the item's colours ({bare_max:.2f}) as a view of it "
                         f"({worn:.2f}): this item cannot be told from hair by its colours")
    return WearCheck(colours, bare_max + RISE * (worn - bare_max), worn, bare_max)


@dataclass
class WearResult:
    """One judged image: the people (the position-free judge's result for the asked people), for each asked
    person whether they wear the item (None: that person was not found), and for every figure found, asked or not
    (a second woman where the man should be), whether it wears the item."""
    people: "instances.InstanceResult"
    wears: tuple[bool | None, ...]
    every: tuple[bool, ...] = ()

    @property
    def heads(self) -> int:
        """How many figures wear the item."""
        return sum(self.every)

    def on(self, k: int) -> bool:
        """Person ``k`` was found and wears the item."""
        return bool(self.wears[k])


def body(part: np.ndarray) -> np.ndarray:
    """The largest connected piece of a figure the judge found: a cap floating above a head, which the instance
    finder joins to the person as a fragment, is not worn."""
    labels, n = ndimage.label(part, structure=np.ones((3, 3)))
    if n <= 1:
        return part.astype(bool)
    return labels == 1 + int(np.argmax(ndimage.sum(part, labels, range(1, n + 1))))


def judge_wearing(judge, image: Image.Image, people, check: WearCheck) -> WearResult:
    """Find the asked ``people`` (judge labels) in ``image`` and look for the item on each one's head (its
    ``body``: the item must touch it)."""
    found = instances.judge_image(judge, image, people)
    every = tuple(check.wears(image, body(inst.part)) for inst in found.instances)
    wears = tuple(every[m] if ok else None for m, ok in zip(found.matched, found.found))
    return WearResult(found, wears, every)

"""Is the place in the background? (notebook 09). The judge knows objects on plain backgrounds, not scenes; a place
is a layout of colours (a sky over a ground, a house and a tree at their spots). So the place is recognised by its
layout: the image on a coarse grid of cells (``GRID`` x ``GRID`` mean colours), compared cell by cell with each of the
place's own views, on the cells the local concepts leave free:

    distance(image, place) = min over the place's views of the mean colour distance (RGB, of 255) over free cells

and the place counts as drawn when that distance is under the place's ``threshold``: halfway between how far the
place's views lie from each other (each view against the others) and how near the closest *negative* comes (the
world's plain backgrounds, another place, and the place's own colours as plain fills (``plain_fills``: its colours
without its layout are not the place), ``negatives``). A threshold is only as good as its margin, so
``calibrate`` returns it with both sides, and ``seen`` calibrates it on the very cells an image leaves free: where
people cover all but a strip of sky, a plain blue background is as near the place as its own views are, and the
place cannot be seen there (``seen`` says no).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..world.pixels import main_colours

#: cells per side of the coarse grid
GRID = 8


def cells(image: Image.Image) -> np.ndarray:
    """(GRID, GRID, 3) mean colours of ``image``."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
    return F.adaptive_avg_pool2d(x, GRID)[0].permute(1, 2, 0).numpy()


def free_cells(masks, size: int, occupied: float = 0.25) -> np.ndarray:
    """(GRID, GRID) bool: the cells less than ``occupied`` covered by the local concepts' ``masks`` ((H, W) each,
    at ``size``), all cells when there are none."""
    if not len(masks):
        return np.ones((GRID, GRID), bool)
    union = torch.from_numpy(np.maximum.reduce([np.asarray(m, np.float32) for m in masks]))[None, None]
    if union.shape[-1] != size:
        union = F.interpolate(union, size=(size, size), mode="area")
    return F.adaptive_avg_pool2d(union, GRID)[0, 0].numpy() < occupied


def distance(image: Image.Image, views, free: np.ndarray | None = None) -> float:
    """The smallest mean colour distance between ``image`` and one of the place's ``views`` over the ``free`` cells."""
    free = np.ones((GRID, GRID), bool) if free is None else free
    if not free.any():
        raise ValueError("no free cell: the local concepts cover the whole image, so no background is left to judge")
    c = cells(image)
    return min(float(np.linalg.norm(c - cells(v), axis=-1)[free].mean()) for v in views)


@dataclass
class PlaceCheck:
    """A place's threshold and what it rests on: the views' leave-one-out distances (the largest) and the
    negatives' distances (the smallest)."""
    threshold: float
    views_max: float
    negatives_min: float

    @property
    def margin(self) -> float:
        return self.negatives_min - self.views_max


def calibrate(views, negatives, free: np.ndarray | None = None) -> PlaceCheck:
    """The threshold of a place from its ``views`` (at least two) and ``negatives`` (images that are not it), on
    the ``free`` cells (default all)."""
    views = list(views)
    if len(views) < 2:
        raise ValueError("calibrating a place needs two or more of its views")
    own = max(distance(v, views[:k] + views[k + 1:], free) for k, v in enumerate(views))
    other = min(distance(n, views, free) for n in negatives)
    if other <= own:
        raise ValueError(f"a negative lies as near the place's views ({other:.1f}) as its own views do ({own:.1f}): "
                         "this place cannot be told from it by its colours")
    return PlaceCheck((own + other) / 2, own, other)


def seen(image: Image.Image, views, negatives, free: np.ndarray | None = None) -> bool:
    """Is the place drawn in ``image``? Its distance on the ``free`` cells under a threshold calibrated on those same
    cells; False where those cells cannot tell the place from a negative (too little of the background is free)."""
    try:
        check = calibrate(views, negatives, free)
    except ValueError:
        return False
    return distance(image, views, free) < check.threshold


def plain_fills(views, colours: int = 4) -> list[Image.Image]:
    """The place's colours without its layout: plain images of its ``colours`` main cell colours (the cells of all
    its views, clustered), negatives that a check of the layout must reject."""
    centres = main_colours(np.concatenate([cells(v).reshape(-1, 3) for v in views]), colours)
    size = views[0].size
    return [Image.new("RGB", size, tuple(int(round(v)) for v in centre)) for centre in centres]

"""A global concept behind local ones (notebook 09): the couple in their garden.

A place's adapter draws the whole frame; a person's adapter has only ever drawn a person on a plain background. One
pass per region with box regions (``passes``) leaves each person on a plain rectangle, and the place's adapter on
every pixel buries the people. So the place is composed in two stages, from the same initial noise:

1. **The local concepts as they know themselves**: the passes fix with the local regions only (each pass its own
   adapter, the place's off), on a plain background. Each concept's *silhouette* is the foreground inside its region
   (``world.pixels.foreground``: the pixels far from the background colour), its largest piece, holes filled, grown by
   ``grow`` pixels.
2. **The place around them**: the passes again, each local concept's pass inside its silhouette and the place's pass
   (its adapter and prompt) on every other pixel (``regions.BACKGROUND``). Bootstrapping lets each local pass see a
   plain background outside its silhouette early on, as in stage 1, so the same person forms in the same place.

    >>> regions = [Region("left", "a cpd woman on the left", adapter="woman"),                  # doctest: +SKIP
    ...            Region("right", "a tkb man on the right", adapter="man"),
    ...            Region("background", "a rgs house", adapter="garden", kind="place")]
    >>> result = place_generate(pipe, "a cpd woman on the left and a tkb man on the right", regions, seeds=[0])

Cost: two generations (stage 1 is one too).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image
from scipy import ndimage

from ..world.pixels import components, foreground
from ..world.regions import BACKGROUND, RegionError, region_mask
from .masking import Region
from .passes import INFERENCE_FIX, RegionPasses, region_passes


@dataclass
class PlaceResult:
    """The images with the place, the stage-1 images (the local concepts on a plain background) and, per image,
    each local concept's silhouette (float (H, W) masks, in the order of the local regions)."""
    images: list[Image.Image]
    first: list[Image.Image]
    silhouettes: list[list[np.ndarray]]


def silhouettes(image: Image.Image, wheres, grow: int = 2) -> list[np.ndarray]:
    """Each region's silhouette in ``image`` (a plain background): the foreground inside the region, its largest
    piece, holes filled, grown by ``grow`` pixels within the region; where two silhouettes meet, the pixel stays the
    first's. A region with no foreground keeps its whole area (the concept was not drawn: its pass then runs where
    it was asked)."""
    h, w = image.height, image.width
    fg = foreground(image)
    out, taken = [], np.zeros((h, w), bool)
    for where in wheres:
        inside = region_mask(where, (h, w)) >= 0.5
        parts = components(fg & inside)
        m = inside if not parts else ndimage.binary_fill_holes(parts[0])
        if parts and grow > 0:
            m = ndimage.binary_dilation(m, iterations=grow) & inside
        m &= ~taken
        taken |= m
        out.append(m.astype(np.float32))
    return out


def place_generate(pipe, prompt: str, regions: list[Region], *, seeds: list[int], fix: RegionPasses = INFERENCE_FIX,
                   grow: int = 2, **sampling) -> PlaceResult:
    """The local ``regions`` drawn on the place of the one region whose ``where`` is ``"background"`` (see the
    module docstring). ``prompt``: the local concepts' prompt (the place's pass reads its own region's prompt)."""
    places = [k for k, r in enumerate(regions) if isinstance(r.where, str) and r.where == BACKGROUND]
    if len(places) != 1 or len(regions) < 2:
        raise RegionError("place_generate needs one region 'background' (the place) and at least one local region "
                          f"(got {len(places)} background region(s) among {len(regions)})")
    if not isinstance(fix, RegionPasses) or fix.window:
        raise ValueError("place_generate composes with region passes on the model's own canvas (passes.INFERENCE_FIX)")
    place = regions[places[0]]
    local = [r for k, r in enumerate(regions) if k != places[0]]
    on = pipe.get_active_adapters() if hasattr(pipe, "get_active_adapters") and any(r.adapters for r in regions) else []
    keep = [a for a in on if a not in place.adapters]
    images, first, shapes = [], [], []
    try:
        for seed in seeds:
            if on:
                pipe.set_adapters(keep)  # stage 1: the place's adapter off, even in the background's pass
            (plain,) = region_passes(pipe, prompt, local, fix=fix, seeds=[seed], **sampling)
            if on:
                pipe.set_adapters(on)
            sil = silhouettes(plain, [r.where for r in local], grow)
            staged = [replace(r, where=m) for r, m in zip(local, sil)] + [place]
            (image,) = region_passes(pipe, prompt, staged, fix=fix, seeds=[seed], **sampling)
            images.append(image)
            first.append(plain)
            shapes.append(sil)
    finally:
        if on:
            pipe.set_adapters(on)
    return PlaceResult(images, first, shapes)

"""A global concept behind local ones (notebook 09): the couple in their garden.

A place's adapter draws the whole frame; a person's adapter has only ever drawn a person on a plain background. A
place is not a region beside the people but a *layer* behind them, so it is composed as one, from the same seed:

1. **The local concepts as they know themselves**: the passes fix with the local regions only (each pass its own
   adapter, the place's off), on a plain background. Each concept's *silhouette* is the foreground inside its region
   (``world.pixels.foreground``: the pixels far from the background colour), its largest piece, holes filled.
2. **The place as it knows itself**: the place's adapter alone (every other off) and the place's own prompt, on the
   whole frame.
3. **The people in front**: each silhouette's pixels from stage 1, every other pixel from stage 2.

``harmonise`` (a fraction of the steps) then runs the passes once more from the composite (SDEdit): each local pass
inside its silhouette, the place's pass on the background (``regions.BACKGROUND``). Notebook 09 measures what it
costs: the place's pass sees the people and draws its tree and house across them.

    >>> regions = [Region("left", "a cpd woman on the left", adapter="woman"),                  # doctest: +SKIP
    ...            Region("right", "a tkb man on the right", adapter="man"),
    ...            Region("background", "a rgs house", adapter="garden", kind="place")]
    >>> result = place_generate(pipe, "a cpd woman on the left and a tkb man on the right", regions, seeds=[0])

On a wider canvas (``height``, ``width`` and ``fix=passes.WINDOW_FIX``, notebook 08's three concepts) the people are
drawn in windows of the model's size and the place by its adapter on the whole canvas: a panorama of it.

Cost: the passes once (stage 1) and one plain generation (stage 2).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image
from scipy import ndimage

from ..sd import parts
from ..sd.pipeline import generate
from ..world.pixels import components, foreground
from ..world.regions import BACKGROUND, RegionError, region_mask
from .masking import Region
from .passes import INFERENCE_FIX, RegionPasses, region_passes


@dataclass
class PlaceResult:
    """The images with the place, the stage-1 images (the local concepts on a plain background), the stage-2 images
    (the place alone) and, per image, each local concept's silhouette (float (H, W) masks, in the order of the local
    regions)."""
    images: list[Image.Image]
    first: list[Image.Image]
    places: list[Image.Image]
    silhouettes: list[list[np.ndarray]]


def silhouettes(image: Image.Image, wheres, grow: int = 2, close: int = 3) -> list[np.ndarray]:
    """Each region's silhouette in ``image`` (a plain background): the foreground inside the region, gaps up to
    ``close`` pixels wide closed (a grey koala on a grey background is found as its dark eyes, nose and ears: closed,
    they are one piece), its largest piece, holes filled, grown by ``grow`` pixels within the region; where two silhouettes meet, the pixel stays the
    first's. A region with no foreground keeps its whole area (the concept was not drawn: its pass then runs where
    it was asked)."""
    h, w = image.height, image.width
    fg = foreground(image)
    out, taken = [], np.zeros((h, w), bool)
    for where in wheres:
        inside = region_mask(where, (h, w)) >= 0.5
        parts = components(ndimage.binary_closing(fg & inside, iterations=close) & inside)
        m = inside if not parts else ndimage.binary_fill_holes(parts[0])
        if parts and grow > 0:
            m = ndimage.binary_dilation(m, iterations=grow) & inside
        m &= ~taken
        taken |= m
        out.append(m.astype(np.float32))
    return out


def composite(front: Image.Image, back: Image.Image, shapes: list[np.ndarray]) -> Image.Image:
    """``front``'s pixels inside any of the silhouettes ``shapes`` (float (H, W) masks), ``back``'s elsewhere."""
    inside = np.max(np.stack(shapes), axis=0)[..., None] >= 0.5
    return Image.fromarray(np.where(inside, np.asarray(front.convert("RGB")), np.asarray(back.convert("RGB"))))


def place_generate(pipe, prompt: str, regions: list[Region], *, seeds: list[int], fix: RegionPasses = INFERENCE_FIX,
                   grow: int = 0, harmonise: float = 0.0, **sampling) -> PlaceResult:
    """The local ``regions`` drawn in front of the place of the one region whose ``where`` is ``"background"`` (see
    the module docstring). ``prompt``: the local concepts' prompt (the place is drawn from its own region's prompt).
    ``grow``: pixels added around each silhouette; ``harmonise``: the fraction of the steps run again on the
    composite (0: none)."""
    places = [k for k, r in enumerate(regions) if isinstance(r.where, str) and r.where == BACKGROUND]
    if len(places) != 1 or len(regions) < 2:
        raise RegionError("place_generate needs one region 'background' (the place) and at least one local region "
                          f"(got {len(places)} background region(s) among {len(regions)})")
    if not isinstance(fix, RegionPasses):
        raise ValueError("place_generate composes with region passes (passes.INFERENCE_FIX, or passes.WINDOW_FIX on a "
                         "wider canvas)")
    if not 0 <= harmonise < 1 or (harmonise and fix.window):
        raise ValueError(f"harmonise is a fraction of the steps in [0, 1), on the model's own canvas (got {harmonise}"
                         f"{' with window passes' if fix.window else ''})")
    place = regions[places[0]]
    local = [r for k, r in enumerate(regions) if k != places[0]]
    on = pipe.get_active_adapters() if hasattr(pipe, "get_active_adapters") and any(r.adapters for r in regions) else []
    keep = [a for a in on if a not in place.adapters]
    images, first, backs, shapes = [], [], [], []
    try:
        for seed in seeds:
            if on:
                pipe.set_adapters(keep)  # stage 1: the place's adapter off, even in the background's pass
            (plain,) = region_passes(pipe, prompt, local, fix=fix, seeds=[seed], **sampling)
            if on and place.adapters:  # stage 2: the place's adapter alone
                pipe.set_adapters(list(place.adapters))
            elif on:
                pipe.disable_lora()
            (back,) = generate(pipe, place.prompt, seed=seed, **sampling)
            if on:
                pipe.enable_lora()
                pipe.set_adapters(on)
            sil = silhouettes(plain, [r.where for r in local], grow)
            image = composite(plain, back, sil)
            if harmonise > 0:
                staged = [replace(r, where=m) for r, m in zip(local, sil)] + [place]
                (image,) = region_passes(pipe, prompt, staged, fix=fix, seeds=[seed], strength=harmonise,
                                         start=parts.encode_images(pipe, [image]), **sampling)
            images.append(image)
            first.append(plain)
            backs.append(back)
            shapes.append(sil)
    finally:
        if on:
            pipe.enable_lora()
            pipe.set_adapters(on)
    return PlaceResult(images, first, backs, shapes)

"""Regions: where a concept goes in an image (notebooks 00 and 07): one table of named places, one box and one
mask function, and the checks that a set of regions can be given to concepts.

A region spec is a name of :data:`REGIONS` ("left", "top-right", "middle-third", ...), a box ``(x0, y0, x1, y1)``
of fractions of the image (or the string ``"x0,y0,x1,y1"``), or a mask (h, w) of any size:

    >>> region_box("right", 64)
    (32, 0, 64, 64)
    >>> region_mask("top-left", 4)
    array([[1., 1., 0., 0.],
           [1., 1., 0., 0.],
           [0., 0., 0., 0.],
           [0., 0., 0., 0.]], dtype=float32)

The emoji world draws objects at five of these places, captioned with the words of :data:`POSITIONS`
("on the left"); two objects of one scene take one of :data:`OPPOSITE_POSITIONS`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

#: named regions as (x0, y0, x1, y1) fractions of the image width and height
REGIONS = {
    "left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0),
    "top": (0.0, 0.0, 1.0, 0.5), "bottom": (0.0, 0.5, 1.0, 1.0),
    "centre": (0.0, 0.0, 1.0, 1.0),
    "top-left": (0.0, 0.0, 0.5, 0.5), "top-right": (0.5, 0.0, 1.0, 0.5),
    "bottom-left": (0.0, 0.5, 0.5, 1.0), "bottom-right": (0.5, 0.5, 1.0, 1.0),
    "left-third": (0.0, 0.0, 1 / 3, 1.0), "middle-third": (1 / 3, 0.0, 2 / 3, 1.0), "right-third": (2 / 3, 0.0, 1.0, 1.0),
}
#: the places the emoji world draws objects at, and the words its captions use for them
POSITIONS = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
#: the two layouts of a two-object scene: opposite halves (in either order)
OPPOSITE_POSITIONS = (("left", "right"), ("top", "bottom"))
#: how much of the smaller of two regions may be shared with the other (a hand-drawn edge), as a fraction
MAX_OVERLAP = 0.05


class RegionError(ValueError):
    """A region spec that cannot be used; the message says what to fix."""


def parse_box(text: str) -> tuple[float, float, float, float]:
    """"x0,y0,x1,y1" (fractions in [0, 1]) -> a tuple; RegionError when malformed."""
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise RegionError(f"unknown region {text!r}: use a name ({', '.join(REGIONS)}) or a box "
                          "'x0,y0,x1,y1' of four fractions in [0, 1]")
    return box


def region_fractions(spec) -> tuple[float, float, float, float]:
    """The box (x0, y0, x1, y1) in fractions of a named region, a box or ``"x0,y0,x1,y1"``; RegionError when the
    name is unknown or the box empty or out of range."""
    if isinstance(spec, str):
        spec = REGIONS[spec] if spec in REGIONS else parse_box(spec)
    try:
        box = tuple(float(v) for v in spec)
    except (TypeError, ValueError):
        box = ()
    if len(box) != 4:
        raise RegionError(f"unknown region {spec!r}; use one of {', '.join(REGIONS)} "
                          "or a box (x0, y0, x1, y1) of fractions of the image")
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise RegionError(f"box {box} is out of range or empty: need 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 "
                          "(fractions of the image width and height)")
    return box


def region_box(spec, width: int, height: int | None = None) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) of a region spec in a ``width`` x ``height`` image (square when ``height`` is
    None), at least one pixel wide and high."""
    height = width if height is None else height
    x0, y0, x1, y1 = region_fractions(spec)
    px = (round(x0 * width), round(y0 * height), round(x1 * width), round(y1 * height))
    return px[0], px[1], max(px[2], px[0] + 1), max(px[3], px[1] + 1)


def is_box(spec) -> bool:
    """Whether ``spec`` is a name or a box (not a drawn mask)."""
    return isinstance(spec, str) or (isinstance(spec, (tuple, list)) and len(spec) == 4
                                     and all(np.isscalar(v) for v in spec))


def hw(size) -> tuple[int, int]:
    """(height, width) of a size given as one side (a square) or as (height, width)."""
    return (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))


def region_mask(spec, size) -> np.ndarray:
    """A float (height, width) mask in [0, 1] of a region spec: 1 inside a named region or a box, a drawn mask
    (array, tensor or PIL image; 0..1 or 0..255) resized to ``size`` (one side of a square, or (height, width)).
    RegionError when it is empty, all zero, or out of range."""
    h, w = hw(size)
    if is_box(spec):
        x0, y0, x1, y1 = region_box(spec, w, h)
        m = np.zeros((h, w), np.float32)
        m[y0:y1, x0:x1] = 1.0
        return m
    a = np.asarray(spec.convert("L") if hasattr(spec, "convert") else torch.as_tensor(spec).detach().cpu(),
                   dtype=np.float32)
    if a.ndim != 2 or min(a.shape) == 0:
        raise RegionError(f"a mask must be 2-D (height, width), got shape {a.shape}")
    if a.max() > 1.0:
        a = a / 255.0
    if not np.isfinite(a).all() or a.min() < 0:
        raise RegionError("a mask's values must be in [0, 1] (or 0..255)")
    if a.max() <= 0:
        raise RegionError("this mask is all zero: it would silently mask nothing; draw the region first")
    if a.shape != (h, w):
        a = F.interpolate(torch.from_numpy(a)[None, None], size=(h, w), mode="area")[0, 0].numpy()
    return a


#: the region spec of a global concept (a place): every pixel that no local concept's region covers
BACKGROUND = "background"


#: the kinds of concept that may nest inside another's region (a hat, a jacket); people and pets may not
NESTING_KINDS = ("wearable",)


def region_masks(specs, size=64, within=None, kinds=None) -> torch.Tensor:
    """Validated masks (R, height, width) of ``specs`` (``size``: one side of a square, or (height, width)): at
    least one region, none all zero, no region lying entirely inside another, and no two overlapping by more than
    ``MAX_OVERLAP`` of the smaller one (a pixel claimed by two concepts is where they mix). A thin shared edge, as
    hand-drawn masks have, is allowed: its pixels read both concepts, and the passes' noise predictions are averaged
    there.

    Extent (notebook 09): the spec ``"background"`` (``BACKGROUND``, at most one) is a global concept's region,
    every pixel outside the local regions; ``within[i] = j`` nests region i inside local region j (a hat inside its
    wearer's region): it must lie inside region j (all but ``MAX_OVERLAP`` of it), it is exempt from the overlap rule
    with its parent only, and the parent keeps the pixels the nested region leaves it (``exclusive_masks``).
    ``kinds``: each region's concept kind when known ("person", "animal", "wearable", "place"...): only a
    ``NESTING_KINDS`` concept may be nested (two people may not)."""
    specs = list(specs)
    if not specs:
        raise RegionError("no regions given: name at least one (e.g. 'left'), a box 'x0,y0,x1,y1' or a mask")
    within = list(within) if within is not None else [None] * len(specs)
    if len(within) != len(specs):
        raise RegionError(f"within has {len(within)} entries for {len(specs)} regions: give one per region (None: "
                          "not nested)")
    is_bg = [isinstance(s, str) and s == BACKGROUND for s in specs]
    if sum(is_bg) > 1:
        raise RegionError("more than one 'background' region: one global concept (a place) takes the background; "
                          "give the others regions of their own")
    for i, j in enumerate(within):
        if j is None:
            continue
        if not (isinstance(j, int) and 0 <= j < len(specs)) or j == i:
            raise RegionError(f"region {i} is nested in {j!r}: give the index of another region (0..{len(specs) - 1})")
        if is_bg[i] or is_bg[j]:
            raise RegionError(f"region {i} is nested in region {j}, but the background nests in nothing and holds no "
                              "nested region: nest a wearable in its wearer's region")
        if within[j] is not None:
            raise RegionError(f"region {i} is nested in region {j}, which is itself nested: nest it in the wearer")
        kind = (kinds or [None] * len(specs))[i]
        if kind is not None and kind not in NESTING_KINDS:
            raise RegionError(f"region {i} is a {kind} nested in region {j}: only a {' or '.join(NESTING_KINDS)} "
                              f"nests in its wearer's region; a {kind} needs a place of its own")
    h, w = hw(size)
    local = [region_mask(s, size) if not bg else np.zeros((h, w), np.float32) for s, bg in zip(specs, is_bg)]
    masks = torch.from_numpy(np.stack(local))
    if any(is_bg):
        covered = masks[[k for k in range(len(specs)) if not is_bg[k]]].amax(0) if len(specs) > 1 else torch.zeros(h, w)
        masks[is_bg.index(True)] = 1 - covered
    hard = masks >= 0.5
    for i, m in enumerate(hard):
        if not m.any():
            if is_bg[i]:
                raise RegionError("the local regions cover the whole image: the 'background' has no pixel left; "
                                  "shrink them")
            raise RegionError(f"region {i} ({_describe(specs[i])}) covers less than half a pixel at "
                              f"{hw(size)[1]}x{hw(size)[0]}: make it larger")
    for i, j in enumerate(within):
        if j is not None:
            outside = int((hard[i] & ~hard[j]).sum())
            if outside > MAX_OVERLAP * int(hard[i].sum()):
                raise RegionError(f"region {i} ({_describe(specs[i])}) is nested in region {j} "
                                  f"({_describe(specs[j])}) but {outside / int(hard[i].sum()):.0%} of it lies outside "
                                  f"(at most {MAX_OVERLAP:.0%}): draw it inside its wearer's region")
    nested = {(i, j) for i, j in enumerate(within) if j is not None}
    for i in range(len(specs)):
        for j in range(len(specs)):
            if i != j and not is_bg[i] and not is_bg[j] and (i, j) not in nested and (hard[i] <= hard[j]).all():
                raise RegionError(f"region {i} ({_describe(specs[i])}) lies entirely inside region {j} "
                                  f"({_describe(specs[j])}): give each concept a place of its own, or nest it "
                                  f"(within[{i}] = {j}) when it is worn by region {j}'s concept")
    for i in range(len(specs)):
        for j in range(i + 1, len(specs)):
            if is_bg[i] or is_bg[j] or (i, j) in nested or (j, i) in nested:
                continue
            shared = int((hard[i] & hard[j]).sum())
            smaller = int(min(hard[i].sum(), hard[j].sum()))
            if shared > MAX_OVERLAP * smaller:
                raise RegionError(f"regions {i} ({_describe(specs[i])}) and {j} ({_describe(specs[j])}) overlap on "
                                  f"{shared / smaller:.0%} of the smaller one (at most {MAX_OVERLAP:.0%} allowed): the "
                                  "two concepts would mix there; trim the boxes so that each concept has its own place")
    return masks


def exclusive_masks(masks: torch.Tensor, within=None) -> torch.Tensor:
    """Each pixel's owner: ``masks`` (R, H, W) from ``region_masks`` with every nested region's pixels taken out of
    its parent (the wearer keeps their region less the hat's), so that no two regions but at a drawn edge share a
    pixel."""
    out = masks.clone()
    for i, j in enumerate(within or []):
        if j is not None:
            out[j] = (out[j] - masks[i]).clamp_min(0)
    return out


def _describe(spec) -> str:
    return spec if isinstance(spec, str) else (str(tuple(spec)) if isinstance(spec, (tuple, list)) else "a mask")


def masks_at(masks: torch.Tensor, side: int) -> torch.Tensor:
    """Boolean (R, side * side) masks at a UNet resolution: area-averaged, a cell is in a region when at least
    half of it is; a region too small for this grid keeps its best-covered cell (it never vanishes)."""
    m = F.interpolate(masks[:, None].float(), size=(side, side), mode="area")[:, 0].flatten(1)
    hard = m >= 0.5
    empty = ~hard.any(1)
    hard[empty, m[empty].argmax(1)] = True
    return hard


def place_words(spec) -> str | None:
    """The words of the half a region spec mostly lies in ("on the left", "at the top"...): the half whose box
    overlaps it best (intersection over union at least 0.5), else None (a middle third, a small corner box)."""
    m = region_mask(spec, 24) > 0.5
    iou = {}
    for name in ("left", "right", "top", "bottom"):  # ties (a quarter) go to the first: left or right
        half = region_mask(name, 24) > 0.5
        iou[name] = (m & half).sum() / (m | half).sum()
    name = max(iou, key=iou.get)
    return POSITIONS[name] if iou[name] >= 0.5 else None

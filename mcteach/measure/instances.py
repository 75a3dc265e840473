"""Position-free per-instance judging (notebook 07): find the objects in an image, then match them to the asked
concepts, wherever they are.

Per-half judging (``metrics.judge_instances``) asks "is the woman in the left half?". It needs a layout, and it is
fooled by one face split down the middle (left half the woman, right half the man reads as a success). Here:

1. **Find the instances.** The world's images are objects on a plain background. The background colour is the
   median of the border pixels; a pixel is foreground when its colour lies more than ``threshold`` (RGB distance, of
   255, 30 by default) from it; the foreground's connected objects of at least ``min_area`` pixels are the
   instances (``components``: an opening removes specks and thin bridges, parts two pixels apart are one object).
   Two objects side by side that touch are one component with a neck, a column much narrower than the tallest on
   either side of it (``neck_split``; a row, for one above the other); it is cut there when the judge names an
   asked concept in both parts (step 2) with confidence ``tau``, and stays one instance, which counts against the
   image, when it does not. The other way round, one object the background's colour cuts into pieces (pale fur, an
   ear apart from the head) is several components: pieces the judge cannot name that lie within an eighth of the
   frame of each other are one instance when it names their union, and such a piece under half the size of a named
   neighbour joins it when the neighbour keeps its name (``_merge_fragments``).
2. **Judge each instance** on a square crop around its bounding box (``margin`` times its longer side, at least
   ``min_crop`` pixels) of the image with every other instance painted over in the background colour, resized to the
   judge's 64 pixels: the object then fills the crop as a lone object fills the frame in the judge's training
   renders (about 60%), whatever its size in the image, and no neighbour leaks into its verdict. A small generated
   object is blurred by that magnification (a 17-pixel koala becomes unrecognisable), so each instance is also judged
   at its own scale, centred in a 64-pixel window as the per-half judge sees it, and the view that names a concept
   with more confidence gives the verdict.
3. **Match** instances to the asked concepts with the Hungarian algorithm on the judge's probabilities
   (``scipy.optimize.linear_sum_assignment``): each concept gets at most one instance, each instance one concept.

Per image (``InstanceResult``): ``count`` (instances found) against the concepts asked; each concept ``found`` when its
matched instance's top label is that concept with confidence >= tau; the outcome, in this order:

- **success**: as many instances as concepts, each concept found (and, given ``positions``, each in its asked region:
  the instance's centre of mass lies inside it);
- **swap**: every concept found, but some in another concept's region (only with ``positions``);
- **duplication**: one asked concept is the confident top label of two or more instances;
- **neglect**: an asked concept is not found while another is;
- **other**: anything else (nothing confident, or the wrong number of instances with nothing found).

and the **identity confusion margin** of each concept (UMO's ID-Conf): with s1 >= s2 the two highest probabilities
of the concept over the image's instances, (s1 - s2) / s1: 1 when one instance alone is the concept, near 0 when two
look equally like it (a blend or a duplicate).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from ..world import scenes
from ..world.pixels import background, components, foreground  # noqa: F401 (part of this module's API)
from ..world.regions import region_mask
from .metrics import OUTCOMES, bootstrap_ci


@dataclass
class Instance:
    """One object found in an image: its crop box (x0, y0, x1, y1) in pixels, its area, centre of mass (x, y),
    the judge's probabilities over its labels on the crop, the top label with its confidence, and its pixels (a
    boolean (H, W) mask)."""
    box: tuple[int, int, int, int]
    area: int
    centre: tuple[float, float]
    probs: torch.Tensor
    label: str
    confidence: float
    part: np.ndarray | None = field(default=None, repr=False)


@dataclass
class InstanceResult:
    """One judged image: the instances, the asked concepts, the instance each concept was matched to (or None),
    whether it was found there, the outcome and each concept's identity confusion margin."""
    instances: list[Instance]
    intended: tuple[str, ...]
    matched: tuple[int | None, ...]
    found: tuple[bool, ...]
    outcome: str
    id_conf: tuple[float, ...]

    @property
    def count_ok(self) -> bool:
        return len(self.instances) == len(self.intended)


def crop_box(part: np.ndarray, margin: float = 1.6, min_crop: int = 16) -> tuple[int, int, int, int]:
    """A square box around the component ``part`` (H, W): ``margin`` times its longer side, at least ``min_crop``
    pixels, moved (not cut) to stay inside the image."""
    ys, xs = np.nonzero(part)
    h, w = part.shape
    side = int(min(max(min_crop, margin * max(np.ptp(ys) + 1, np.ptp(xs) + 1)), h, w))
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    x0 = int(np.clip(round(cx - side / 2), 0, w - side))
    y0 = int(np.clip(round(cy - side / 2), 0, h - side))
    return x0, y0, x0 + side, y0 + side


def neck_split(part: np.ndarray, neck: float = 0.5, margin: float = 0.2, axis: int = 1) -> list[np.ndarray] | None:
    """Two objects side by side that touch: the component ``part`` (H, W) cut at its narrowest column, or None;
    ``axis=0``: one above the other (a grid of four), cut at its narrowest row.

    In the middle ``1 - 2 margin`` of the component's width, the column with the fewest pixels is a neck when it
    has under ``neck`` times the tallest column on *each* side of it (two heads meeting at a cheek); a single
    object, even a face made of two halves, is widest near its middle and has none."""
    if axis == 0:
        cut = neck_split(part.T, neck, margin)
        return None if cut is None else [c.T for c in cut]
    ys, xs = np.nonzero(part)
    x0, x1 = int(xs.min()), int(xs.max()) + 1
    cols = part[:, x0:x1].sum(0)
    lo, hi = int(margin * (x1 - x0)), int(np.ceil((1 - margin) * (x1 - x0)))
    if hi - lo < 1:
        return None
    c = lo + int(np.argmin(cols[lo:hi]))
    if cols[c] >= neck * min(cols[:c].max(initial=0), cols[c + 1:].max(initial=0)):
        return None
    left = part.copy()
    left[:, x0 + c:] = False
    return [left, part & ~left]


#: labels that are no concept: a crop the judge cannot name, or an empty one
NO_CONCEPT = ("unrecognisable", "nothing")


def find_instances(judge, image: Image.Image, threshold: float = 30.0, min_area: int = 50, tau: float = 0.5,
                   concepts=None) -> list[Instance]:
    """The instances of ``image`` (see the module docstring), each judged on its crop. A component with a neck
    (``neck_split``) is two instances when the judge names both parts with confidence ``tau`` or more: each an
    asked concept when ``concepts`` (judge labels) are given, else any label but ``NO_CONCEPT``'s."""
    def named(inst: Instance) -> bool:
        return inst.confidence >= tau and (inst.label in concepts if concepts else inst.label not in NO_CONCEPT)

    parts = components(foreground(image, threshold), min_area)
    k = 0
    while k < len(parts):
        others = parts[:k] + parts[k + 1:]
        for halves in (neck_split(parts[k], axis=1), neck_split(parts[k], axis=0)):
            if halves and min(int(h.sum()) for h in halves) >= min_area and \
                    all(named(t) for t in _judged(judge, image, halves + others)[:2]):
                parts = others + halves  # the halves are tried again: three in a row make two necks
                k = -1
                break
        k += 1
    return _merge_fragments(judge, image, sorted(parts, key=lambda p: -int(p.sum())), named)


def _merge_fragments(judge, image: Image.Image, parts: list[np.ndarray], named, reach: float = 8.0,
                     share: float = 0.5) -> list[Instance]:
    """The instances of ``parts`` (largest first), fragments joined to the object they came off (an ear or a muzzle
    cut off a head by a line of background colour). Parts the judge does not name that lie within ``reach`` pixels
    (an eighth of the 64-pixel frame) of each other are one object when the judge names their union; a part it does not name, under ``share`` of a
    named part's area and within ``reach`` of it, joins that part when the merged object is still named as the same
    concept."""
    judged = _judged(judge, image, parts)
    near = [_within(p, reach) for p in parts]
    unnamed = [k for k in range(len(parts)) if not named(judged[k])]
    group = {k: k for k in unnamed}  # union-find over the unnamed parts, joined when within reach

    def root(k):
        while group[k] != k:
            k = group[k]
        return k
    for a in unnamed:
        for b in unnamed:
            if a < b and (near[a] & parts[b]).any():
                group[root(b)] = root(a)
    clusters = {}
    for k in unnamed:
        clusters.setdefault(root(k), []).append(k)
    for members in clusters.values():
        if len(members) > 1:
            merged = [p for k, p in enumerate(parts) if k not in members[1:]]
            at = members[0] - sum(m < members[0] for m in members[1:])
            merged[at] = np.logical_or.reduce([parts[k] for k in members])
            if named(_judged(judge, image, merged)[at]):
                drop = set(members[1:])
                parts = merged
                near = [n for k, n in enumerate(near) if k not in drop]
                near[at] = _within(parts[at], reach)
                judged = _judged(judge, image, parts)
                unnamed = [u for u in unnamed if u not in drop]  # indices shift: recomputed below
    for k in range(len(parts) - 1, -1, -1):
        if named(judged[k]):
            continue
        for j in range(len(parts)):
            if j == k or not named(judged[j]) or parts[k].sum() >= share * parts[j].sum() or not (near[k] & parts[j]).any():
                continue
            merged = parts[:k] + parts[k + 1:]
            at = j if j < k else j - 1
            merged[at] = parts[j] | parts[k]
            again = _judged(judge, image, merged)
            if named(again[at]) and again[at].label == judged[j].label:
                parts, judged = merged, again
                near = near[:k] + near[k + 1:]
                near[at] = _within(parts[at], reach)
                break
    return judged


def _within(part: np.ndarray, reach: float) -> np.ndarray:
    """The pixels at most ``reach`` (Euclidean) from ``part``."""
    return ndimage.distance_transform_edt(~part) <= reach


def _judged(judge, image: Image.Image, parts: list[np.ndarray]) -> list[Instance]:
    """Each component judged on its crop and at its own scale (``_centred``), every other one painted over in the
    background colour: the view whose top label is a concept (not ``NO_CONCEPT``) with the higher confidence."""
    if not parts:
        return []
    size = scenes.IMAGE_SIZE
    boxes = [crop_box(p) for p in parts]
    pixels, bg = np.asarray(image.convert("RGB")), background(image).round().astype(np.uint8)
    crops, native = [], []
    for k, box in enumerate(boxes):   # each object alone on the background, at a lone object's scale
        alone = pixels.copy()
        for other in parts[:k] + parts[k + 1:]:
            alone[ndimage.binary_dilation(other, iterations=2)] = bg
        crops.append(Image.fromarray(alone).crop(box).resize((size, size), Image.BICUBIC))
        native.append(_centred(alone, parts[k], size, bg))
    magnified, unscaled = judge.probs(crops, "centre"), judge.probs(native, "centre")
    none = [judge.labels.index(x) for x in NO_CONCEPT if x in judge.labels]

    def naming(p):  # the confidence of the top label where it is a concept, else 0
        conf, i = p.max(1)
        return torch.where(torch.isin(i, torch.tensor(none, dtype=i.dtype)), torch.zeros_like(conf), conf)
    probs = torch.where((naming(unscaled) > naming(magnified))[:, None], unscaled, magnified)
    out = []
    for part, box, p in zip(parts, boxes, probs):
        ys, xs = np.nonzero(part)
        conf, i = p.max(0)
        out.append(Instance(box, int(part.sum()), (float(xs.mean()), float(ys.mean())), p, judge.labels[int(i)],
                            float(conf), part))
    return out


def _centred(pixels: np.ndarray, part: np.ndarray, size: int, bg: np.ndarray) -> Image.Image:
    """A ``size`` x ``size`` window of ``pixels`` centred on the component ``part``, at the image's own scale (the
    background colour beyond the image's edge)."""
    ys, xs = np.nonzero(part)
    cy, cx = (ys.min() + ys.max() + 1) // 2, (xs.min() + xs.max() + 1) // 2
    h, w = part.shape
    padded = np.empty((h + 2 * size, w + 2 * size, 3), np.uint8)
    padded[:] = bg
    padded[size:size + h, size:size + w] = pixels
    y0, x0 = cy + size - size // 2, cx + size - size // 2
    return Image.fromarray(padded[y0:y0 + size, x0:x0 + size])


def judge_image(judge, image: Image.Image, intended, positions=None, tau: float = 0.5, **find) -> InstanceResult:
    """Find, judge and match the instances of one image against the ``intended`` concepts (judge labels);
    ``positions``: the region asked for each concept (names or boxes), or None for a layout-free prompt."""
    intended = tuple(intended)
    for name in intended:
        if name not in judge.labels:
            raise ValueError(f"the judge has no label {name!r}: give a judge that knows it (Judge.with_concepts)")
    instances = find_instances(judge, image, tau=tau, concepts=intended, **find)
    k = [judge.labels.index(c) for c in intended]
    p = torch.stack([inst.probs[k] for inst in instances]).numpy() if instances else np.zeros((0, len(k)))
    rows, cols = linear_sum_assignment(-p) if len(instances) else ([], [])
    matched = [None] * len(intended)
    for r, c in zip(rows, cols):
        matched[c] = int(r)
    found = [m is not None and instances[m].label == c and instances[m].confidence >= tau
             for m, c in zip(matched, intended)]
    inside = [True] * len(intended)
    if positions is not None:
        w, h = image.size
        for j, (m, where) in enumerate(zip(matched, positions)):
            if m is not None:
                x, y = instances[m].centre
                inside[j] = bool(region_mask(where, (h, w))[min(int(y), h - 1), min(int(x), w - 1)] > 0.5)
    confident = [inst.label for inst in instances if inst.confidence >= tau]
    if len(instances) == len(intended) and all(found) and all(inside):
        outcome = "success"
    elif all(found) and not all(inside):
        outcome = "swap"
    elif any(confident.count(c) >= 2 for c in intended):
        outcome = "duplication"
    elif any(found) and not all(found):
        outcome = "neglect"
    else:
        outcome = "other"
    id_conf = []
    for j in range(len(intended)):
        s = np.sort(p[:, j])[::-1] if len(p) else np.zeros(1)
        s1, s2 = float(s[0]), float(s[1]) if len(s) > 1 else 0.0
        id_conf.append((s1 - s2) / s1 if s1 > 0 else 0.0)
    return InstanceResult(instances, intended, tuple(matched), tuple(found), outcome, tuple(id_conf))


def judge_images(judge, images, intended, positions=None, tau: float = 0.5, **find) -> list[InstanceResult]:
    """``judge_image`` for every image of a prompt."""
    return [judge_image(judge, im, intended, positions, tau, **find) for im in images]


def summarize(results: list[InstanceResult]) -> dict:
    """Outcome rates, count accuracy and mean identity confusion margin, each with a 95% bootstrap interval."""
    out = {o: bootstrap_ci([r.outcome == o for r in results]) for o in OUTCOMES}
    out["count_ok"] = bootstrap_ci([r.count_ok for r in results])
    out["id_conf"] = bootstrap_ci([m for r in results for m in r.id_conf])
    out["n"] = len(results)
    return out


def split_face(left: scenes.Emoji, right: scenes.Emoji, seed: int = 0) -> Image.Image:
    """One face made of two: the left half of ``left`` drawn at the centre, the right half of ``right`` beside it,
    on one background: the image per-half judging calls a success and this judge must not."""
    a = np.asarray(scenes.render_scene([(left, "centre")], seed=seed).image).copy()
    b = scenes.render_scene([(right, "centre")], seed=seed, background=tuple(int(v) for v in a[0, 0])).image
    half = a.shape[1] // 2
    a[:, half:] = np.asarray(b)[:, half:]
    return Image.fromarray(a)

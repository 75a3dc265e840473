"""Few-shot concept sets: the handful of pictures a personalisation method learns a concept from.

Textual Inversion, DreamBooth, HyperNetworks and LoRA all start from the same input: 4-8
images of one new concept (a koala, a particular woman) that the base model has never seen.
The course ships one set per held-out emoji of :data:`mcteach.world.HELDOUT_CONCEPTS`,
rendered alone at varied positions, scales and backgrounds, each with the object's alpha mask
(the ground truth that masked losses and attention lessons need). Layout of a set::

    data/concepts/<slug>/
        00.png  00_mask.png     # RGB 64x64 image; mode "L" mask = the object's alpha * 255
        01.png  01_mask.png
        ...
        concept.json            # name, slug, chars, unicode_names, category, class_word,
                                # images: [{file, mask, position, caption}], source, license

``load_concept`` also reads a folder of your own photos (jpg/png/webp, any size or mode): no
concept.json or masks needed; ``<stem>_mask.png`` beside ``<stem>.jpg`` is used when present.

    >>> c = load_concept("koala")
    >>> len(c), c.class_word, c.images[0].size, c.masks[0].shape
    (6, 'bear', (64, 64), (64, 64))

Regenerate the shipped sets with ``mcteach concepts make [--out DIR] [--n 6] [--seed 0]``.
"""

from __future__ import annotations

import json
import random
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..paths import CONCEPTS_DIR, KINDS_DIR
from . import scenes
from .regions import OPPOSITE_POSITIONS, REGIONS

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
#: positions of a set's images, in turn (a set of 6 shows the concept twice in the centre)
POSITION_CYCLE = ("centre", "left", "right", "top", "bottom")


class ConceptError(ValueError):
    """A concept folder cannot be used; the message says what to fix."""


@dataclass
class Concept:
    """A few-shot set: images, one mask per image (all ones when none), optional captions."""
    name: str
    slug: str
    class_word: str | None  # base class used to initialise TI and for DreamBooth's prior
    category: str | None
    folder: Path
    images: list[Image.Image] = field(repr=False)  # RGB, size x size
    masks: list[np.ndarray] = field(repr=False)  # float32 (size, size) in [0, 1]
    captions: list[str] | None = field(default=None, repr=False)
    positions: list[str] | None = field(default=None, repr=False)  # where each image shows it ("left"...), if known
    parts: list | None = field(default=None, repr=False)  # a joint training target: the concepts it joins

    def __len__(self) -> int:
        return len(self.images)


def list_concepts(folder: Path = CONCEPTS_DIR) -> list[str]:
    """Slugs of the shipped concept sets, sorted (``folder=KINDS_DIR``: the places and wearables)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / "concept.json").is_file())


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im)  # phone photos: apply the EXIF rotation
    except (OSError, SyntaxError) as e:
        raise ConceptError(f"cannot read image {path}: {e}; replace or remove this file") from e


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any mode to RGB; transparent pixels become white."""
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im.convert("RGBA"))
    return im.convert("RGB")


def load_concept(path: str | Path, size: int = scenes.IMAGE_SIZE) -> Concept:
    """Load a shipped set by slug (``"koala"``) or any folder of images, as ``size`` x ``size``.

    Images that are not ``size`` x ``size`` are centre-cropped to a square and resized, with one
    warning naming the files. Raises :class:`ConceptError` for a missing or empty folder, an
    unreadable image, or a mask whose size differs from its image's.
    """
    shipped = {slug: d / slug for d in (KINDS_DIR, CONCEPTS_DIR) for slug in list_concepts(d)}
    folder = shipped.get(str(path), Path(path))
    if not folder.is_dir():
        raise ConceptError(
            f"concept folder {str(path)!r} not found; pass a folder of 4-8 images "
            f"or one of: {', '.join(sorted(shipped))}"
        )
    files = sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not p.stem.endswith("_mask")
        and not p.name.startswith(".")
    )
    if not files:
        raise ConceptError(
            f"no images in {folder}; put 4-8 pictures of the concept there "
            f"({'/'.join(IMAGE_EXTENSIONS)})"
        )
    meta_file = folder / "concept.json"
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}

    images, masks, resized = [], [], []
    for file in files:
        im = _to_rgb(_open(file))
        mask_file = file.with_name(file.stem + "_mask.png")
        mask = _open(mask_file).convert("L") if mask_file.is_file() else None
        if mask is not None and mask.size != im.size:
            raise ConceptError(
                f"mask {mask_file} is {mask.size[0]}x{mask.size[1]} but image {file} is "
                f"{im.size[0]}x{im.size[1]}; make the mask the same size as its image"
            )
        if im.size != (size, size):
            crop = "centre-cropped to a square and " if im.width != im.height else ""
            resized.append(f"{file.name} ({im.width}x{im.height}: {crop}resized)")
            im = ImageOps.fit(im, (size, size), Image.LANCZOS)
            if mask is not None:
                mask = ImageOps.fit(mask, (size, size), Image.LANCZOS)
        images.append(im)
        masks.append(
            np.asarray(mask, dtype=np.float32) / 255.0
            if mask is not None
            else np.ones((size, size), dtype=np.float32)
        )

    if resized:  # one warning per folder, naming the files
        warnings.warn(f"{folder}: images made {size}x{size}: {', '.join(resized)}", stacklevel=2)
    by_file = {entry["file"]: entry.get("caption") for entry in meta.get("images", [])}
    captions = [by_file.get(f.name) for f in files]
    where = {entry["file"]: entry.get("position") for entry in meta.get("images", [])}
    positions = [where.get(f.name) for f in files]
    return Concept(
        name=meta.get("name", folder.name),
        slug=meta.get("slug", folder.name),
        class_word=meta.get("class_word"),
        category=meta.get("category"),
        folder=folder,
        images=images,
        masks=masks,
        captions=captions if all(captions) else None,
        positions=positions if all(positions) else None,
    )


@dataclass
class Composite:
    """A training image with several concepts pasted in (MuDI's Seg-Mix): the image, one mask per concept
    (in the order of the concepts), and where each was put."""
    image: Image.Image
    masks: list[np.ndarray]
    positions: list[str]


def cut_out(concept: Concept, i: int) -> Image.Image:
    """Image ``i`` of a concept as an RGBA cut-out: its mask as alpha, cropped to the mask's box."""
    alpha = Image.fromarray(np.round(concept.masks[i] * 255).astype(np.uint8))
    box = alpha.point(lambda v: 255 if v >= 128 else 0).getbbox()
    if box is None:
        raise ConceptError(f"{concept.folder}: image {i}'s mask is empty; a cut-out needs the object's mask")
    rgba = concept.images[i].convert("RGBA")
    rgba.putalpha(alpha)
    return rgba.crop(box)


def compose(concepts: list[Concept], rng: random.Random, size: int = scenes.IMAGE_SIZE,
            layouts=None) -> Composite:
    """Seg-Mix: one cut-out of each concept (a random image of it, cut by its mask) pasted at random into its
    own region of a plain random background, each 37-50% of the image's size as in the world's two-object
    scenes. ``layouts``: the position tuples to choose from (default: left/right and top/bottom, either order;
    thirds for three concepts)."""
    layouts = layouts or (OPPOSITE_POSITIONS + tuple(p[::-1] for p in OPPOSITE_POSITIONS) if len(concepts) == 2
                          else [("left-third", "middle-third", "right-third")])
    positions = list(rng.choice(layouts))
    if len(positions) != len(concepts):
        raise ValueError(f"{len(concepts)} concepts but a layout of {len(positions)} positions")

    canvas = Image.new("RGBA", (size, size), scenes.background_colour(rng) + (255,))
    masks = []
    for concept, pos in zip(concepts, positions):
        g = cut_out(concept, rng.randrange(len(concept)))
        x0, y0, x1, y1 = (f * size for f in REGIONS[pos])
        target = rng.uniform(0.375, 0.5) * size
        scale = min(target / max(g.size), (x1 - x0) / g.size[0], (y1 - y0) / g.size[1])
        w, h = max(1, round(g.size[0] * scale)), max(1, round(g.size[1] * scale))
        small = g.convert("RGBa").resize((w, h), Image.LANCZOS).convert("RGBA")
        left = round(rng.uniform(x0, max(x0, x1 - w)))
        top = round(rng.uniform(y0, max(y0, y1 - h)))
        layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        layer.paste(small, (left, top))
        canvas = Image.alpha_composite(canvas, layer)
        masks.append(np.asarray(layer.getchannel("A"), dtype=np.float32) / 255.0)
    return Composite(canvas.convert("RGB"), masks, positions)


def own_concept(folder: str | Path, class_word: str, *, name: str | None = None,
                size: int = scenes.IMAGE_SIZE) -> Concept:
    """Your own photos as a concept: write (or update) ``folder/concept.json`` with its name (default: the
    folder's) and ``class_word`` (what it is, e.g. "dog": Textual Inversion starts there, DreamBooth keeps the
    class with it), then load it at ``size`` (512 for SD 1.5). 4-8 photos of one subject, from a few angles,
    work best; fewer than 3 is refused, more than 12 gets a warning (the methods' defaults assume a few)."""
    folder = Path(folder)
    if not class_word or not class_word.strip():
        raise ConceptError("give the class word of your concept (what it is: 'dog', 'woman', 'mug')")
    n = len([p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.stem.endswith("_mask")]) \
        if folder.is_dir() else 0
    if n < 3:
        raise ConceptError(f"{folder} has {n} image(s): put 4-8 photos of your concept there "
                           f"({'/'.join(IMAGE_EXTENSIONS)})")
    if n > 12:
        warnings.warn(f"{folder} has {n} images: the methods' defaults are tuned for 4-8", stacklevel=2)
    card = folder / "concept.json"
    meta = json.loads(card.read_text(encoding="utf-8")) if card.is_file() else {}
    meta.update(name=name or meta.get("name") or folder.name.replace("_", " "), slug=meta.get("slug", folder.name),
                class_word=class_word.strip())
    card.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return load_concept(folder, size)


def make_concept_set(emoji: scenes.Emoji, class_word: str, folder: str | Path, *, slug: str | None = None,
                     n: int = 6, seed: int = 0) -> Path:
    """Render ``n`` images of ``emoji`` (with masks and ``concept.json``) into ``folder``: a few-shot set.

    Image ``i`` is at ``POSITION_CYCLE[i % 5]``, with the scale, jitter and background drawn from a
    generator seeded by (slug, seed, i): the same files every time. Any emoji works, including a base
    class the model already draws (notebook 02 uses one as a control).
    """
    folder = set_folder(folder)
    slug = slug or folder.name
    entries = []
    for i in range(n):
        position = POSITION_CYCLE[i % len(POSITION_CYCLE)]
        scene = scenes.render_scene([(emoji, position)], rng=random.Random(f"{slug}/{seed}/{i}"))
        mask = Image.fromarray(np.round(scene.masks[0] * 255).astype(np.uint8))
        scene.image.save(folder / f"{i:02d}.png", optimize=True)
        mask.save(folder / f"{i:02d}_mask.png", optimize=True)
        entries.append({"file": f"{i:02d}.png", "mask": f"{i:02d}_mask.png", "position": position,
                        "caption": scene.caption})
    meta = {
        "name": emoji.name,
        "slug": slug,
        "chars": emoji.chars,
        "unicode_names": [unicodedata.name(ch) for ch in emoji.chars],
        "category": emoji.category,
        "class_word": class_word,
    }
    return write_card(folder, meta, entries)


def set_folder(folder: str | Path) -> Path:
    """``folder``, created, without the numbered images of an earlier set (a smaller ``n`` leaves none stale)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("[0-9][0-9]*.png"):
        old.unlink()
    return folder


def write_card(folder: Path, meta: dict, entries: list[dict]) -> Path:
    """Write a rendered set's ``concept.json``: ``meta``, its images' ``entries`` and the emoji's source and
    license; return the folder."""
    card = meta | {"images": entries, "source": "Noto Color Emoji", "license": "Apache-2.0 (images), OFL-1.1 (font)"}
    (folder / "concept.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return folder


def make_concept_sets(out: str | Path = CONCEPTS_DIR, *, n: int = 6, seed: int = 0) -> list[Path]:
    """Render the few-shot set of every held-out concept into ``out/<slug>/`` (``make_concept_set``);
    return the folders."""
    return [make_concept_set(emoji, class_word, Path(out) / slug, n=n, seed=seed)
            for slug, (emoji, class_word) in scenes.HELDOUT_CONCEPTS.items()]

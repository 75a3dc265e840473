"""Concepts of other kinds and extents (notebook 09): a **place** that fills the frame behind everyone, and a
**wearable** that sits inside its wearer's region. The world's people, animals, food and objects are local concepts:
one object on a plain background. Neither kind below is anything the world ever drew: a place is a background made
of elements the world does not have (a sky, a lawn, a house with a garden, a tree, a cloud), a wearable an item it
does not have (a billed cap), drawn on the world's people.

    >>> place_folder = make_place_set("/tmp/cottage", PLACES["cottage_garden"])        # doctest: +SKIP
    >>> cap_folder = make_wearable_set("/tmp/cap", WEARABLES["billed_cap"])             # doctest: +SKIP

Each set is an ordinary concept folder (``concepts.load_concept`` reads it) whose ``concept.json`` says its
``category`` ("place" or "wearable") and its ``extent`` ("global" or "nested"). A place's masks are the whole frame;
a wearable's mask is the item's own pixels, and ``NN_wearer_mask.png`` beside it the wearer's (the item inside).
"""

from __future__ import annotations

import json
import random
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import scenes
from .concepts import POSITION_CYCLE, set_folder, write_card
from .regions import POSITIONS


@dataclass(frozen=True)
class Place:
    """A scene: a sky over a ground, and emoji elements standing on the horizon or floating in the sky. Each
    element: (characters, x of its centre, y of its bottom, height), fractions of the image."""
    name: str
    sky: tuple[int, int, int]
    ground: tuple[int, int, int]
    horizon: float  # where the ground starts, a fraction of the height
    elements: tuple[tuple[str, float, float, float], ...]
    class_word: str = "house"


@dataclass(frozen=True)
class Wearable:
    """An item worn on the head: its characters, its width as a share of its wearer's, and how far it sinks onto
    the head (a share of its own height)."""
    name: str
    chars: str
    width: float = 0.8
    sink: float = 0.35
    class_word: str = "cap"


#: places none of the world's images has: every element is an emoji the world never drew
PLACES = {
    "cottage_garden": Place("cottage garden", sky=(150, 200, 240), ground=(110, 170, 90), horizon=0.62,
                            elements=(("🏡", 0.74, 0.70, 0.40), ("🌳", 0.22, 0.72, 0.46), ("☁", 0.45, 0.26, 0.16))),
    "mountain_lake": Place("mountain lake", sky=(250, 200, 150), ground=(70, 120, 190), horizon=0.66,
                           elements=(("⛰", 0.35, 0.68, 0.42), ("🏔", 0.75, 0.68, 0.36), ("🛶", 0.60, 0.90, 0.16))),
}
#: the world's people who wear nothing on their heads already: a woman, a man, a person, a boy, a girl, with any hair
#: and skin, not a cook, a farmer or an astronaut (``bare_headed``)
BARE_HEADED = ("woman", "man", "person", "boy", "girl")
#: wearables the world never drew
#: (colours no bare head has, so that measure.wearables can see them: not black like hair, not red like red hair;
#: class words the world never used, so that no drawn hat pulls the item towards it)
WEARABLES = {"billed_cap": Wearable("billed cap", "🧢"),
             "hair_ribbon": Wearable("hair ribbon", "🎀", 0.6, 0.3, class_word="ribbon")}


def bare_headed() -> list[scenes.Emoji]:
    """The world's people with nothing on their heads: "woman", "man with red hair and dark skin"..., not "man cook"."""
    return [e for e in scenes.BASE_CLASSES if e.category == "person" and e.name.split()[0] in BARE_HEADED
            and e.name.split()[1:2] in ([], ["with"])]


def render_place(place: Place, rng: random.Random, size: int = scenes.IMAGE_SIZE) -> Image.Image:
    """One view of ``place``: the camera pans a little (every element shifts together, up to 6% of the width),
    the horizon moves up to 3%, the elements' sizes vary by up to 8% and the colours by up to 8 levels."""
    pan, tilt = rng.uniform(-0.06, 0.06), rng.uniform(-0.03, 0.03)
    jitter = lambda c: tuple(int(np.clip(v + rng.randint(-8, 8), 0, 255)) for v in c)  # noqa: E731
    canvas = Image.new("RGBA", (size, size), jitter(place.sky) + (255,))
    horizon = round((place.horizon + tilt) * size)
    canvas.paste(Image.new("RGBA", (size, size - horizon), jitter(place.ground) + (255,)), (0, horizon))
    for chars, x, bottom, height in place.elements:
        g = scenes.glyph(chars)
        h = max(1, round(height * rng.uniform(0.92, 1.08) * size))
        w = max(1, round(g.size[0] * h / g.size[1]))
        small = g.convert("RGBa").resize((w, h), Image.LANCZOS).convert("RGBA")
        layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        layer.paste(small, (round((x + pan) * size - w / 2), round((bottom + tilt) * size) - h))
        canvas = Image.alpha_composite(canvas, layer)
    return canvas.convert("RGB")


def wear(person: scenes.Emoji, item: Wearable, position: str, rng: random.Random,
         size: int = scenes.IMAGE_SIZE) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """``person`` at ``position`` (as the world draws one object there) wearing ``item`` on the head: the image,
    the item's mask and the wearer's mask (the person and the item), float (size, size) in [0, 1]."""
    scene = scenes.render_scene([(person, position)], rng=rng, size=size)
    body = scene.masks[0] >= 0.5
    ys, xs = np.nonzero(body)
    x0, x1, top = xs.min(), xs.max() + 1, ys.min()
    g = scenes.glyph(item.chars)
    w = max(1, round(item.width * (x1 - x0)))
    h = max(1, round(g.size[1] * w / g.size[0]))
    small = g.convert("RGBa").resize((w, h), Image.LANCZOS).convert("RGBA")
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    layer.paste(small, (round((x0 + x1) / 2 - w / 2), max(0, round(top - (1 - item.sink) * h))))
    image = Image.alpha_composite(scene.image.convert("RGBA"), layer).convert("RGB")
    hat = np.asarray(layer.getchannel("A"), dtype=np.float32) / 255.0
    return image, hat, np.maximum(scene.masks[0], hat)


def _save_mask(mask: np.ndarray, path: Path) -> None:
    Image.fromarray(np.round(mask * 255).astype(np.uint8)).save(path, optimize=True)


def make_place_set(folder: str | Path, place: Place = PLACES["cottage_garden"], *, slug: str | None = None,
                   n: int = 6, seed: int = 0) -> Path:
    """Render ``n`` views of ``place`` into ``folder`` (a concept set of category "place", extent "global"): each
    mask the whole frame, each caption "a <its name>" (training puts the concept's phrase there)."""
    folder = set_folder(folder)
    slug = slug or folder.name
    entries = []
    for i in range(n):
        render_place(place, random.Random(f"{slug}/{seed}/{i}")).save(folder / f"{i:02d}.png", optimize=True)
        _save_mask(np.ones((scenes.IMAGE_SIZE, scenes.IMAGE_SIZE), np.float32), folder / f"{i:02d}_mask.png")
        entries.append({"file": f"{i:02d}.png", "mask": f"{i:02d}_mask.png", "position": "centre",
                        "caption": f"a {place.name}"})
    chars = "".join(c for c, *_ in place.elements)
    return write_card(folder, {"name": place.name, "slug": slug, "chars": chars, "category": "place",
                               "extent": "global", "class_word": place.class_word,
                               "unicode_names": [unicodedata.name(c, "?") for c in chars]}, entries)


def make_wearable_set(folder: str | Path, item: Wearable = WEARABLES["billed_cap"], *, wearers=None,
                      slug: str | None = None, n: int = 6, seed: int = 0) -> Path:
    """Render ``n`` images of the world's people wearing ``item`` into ``folder`` (category "wearable", extent
    "nested"): image ``i`` shows a different wearer (``wearers``, default the world's bare-headed people) at
    ``POSITION_CYCLE[i % 5]``; its mask is the item's, ``NN_wearer_mask.png`` the wearer's."""
    folder = set_folder(folder)
    slug = slug or folder.name
    people = list(wearers or bare_headed())
    entries = []
    for i in range(n):
        rng = random.Random(f"{slug}/{seed}/{i}")
        who, position = rng.choice(people), POSITION_CYCLE[i % len(POSITION_CYCLE)]
        image, hat, wearer = wear(who, item, position, rng)
        image.save(folder / f"{i:02d}.png", optimize=True)
        _save_mask(hat, folder / f"{i:02d}_mask.png")
        _save_mask(wearer, folder / f"{i:02d}_wearer_mask.png")
        entries.append({"file": f"{i:02d}.png", "mask": f"{i:02d}_mask.png", "wearer": f"{i:02d}_wearer_mask.png",
                        "position": position, "caption": f"a {who.name} with a {item.name} {POSITIONS[position]}"})
    return write_card(folder, {"name": item.name, "slug": slug, "chars": item.chars, "category": "wearable",
                               "extent": "nested", "class_word": item.class_word, "width": item.width, "sink": item.sink,
                               "unicode_names": [unicodedata.name(c, "?") for c in item.chars]}, entries)


def make_kind_sets(out: str | Path, *, n: int = 6, seed: int = 0) -> list[Path]:
    """Render every place of ``PLACES`` and wearable of ``WEARABLES`` into ``out/<slug>/``; return the folders."""
    return ([make_place_set(Path(out) / slug, place, n=n, seed=seed) for slug, place in PLACES.items()]
            + [make_wearable_set(Path(out) / slug, item, n=n, seed=seed) for slug, item in WEARABLES.items()])


def wearer_masks(item) -> list[np.ndarray]:
    """The wearer masks (person and item, float (H, W)) of a wearable's set, in the order of its images."""
    entries = json.loads((Path(item.folder) / "concept.json").read_text(encoding="utf-8"))["images"]
    if len(entries) != len(item.images) or any("wearer" not in e for e in entries):
        raise ValueError(f"{item.folder}: a wearable's concept.json names each image's wearer mask ('wearer'); "
                         "render the set with make_wearable_set")
    size = item.images[0].size
    return [np.asarray(Image.open(Path(item.folder) / e["wearer"]).convert("L").resize(size), np.float32) / 255
            for e in entries]


def _box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(mask >= 0.5)
    return None if len(ys) == 0 else (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def put_on(person, i: int, item, j: int) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """Image ``i`` of the concept ``person`` wearing the item as view ``j`` of the wearable ``item`` shows it: the
    item cut out by its mask, at the share of the wearer's width and the depth on the head that a rendered set's
    card gives (``width``, ``sink``), else as measured on view ``j`` against its wearer. Returns the image, the item's mask and the wearer's (person and
    item), float (H, W) in [0, 1]. The wearable's training fix pastes these (``engine.training_set``), as Seg-Mix
    pastes two concepts side by side."""
    item_mask, wearer = item.masks[j], wearer_masks(item)[j]
    ib, pb = _box(item_mask), _box(np.where(item_mask >= 0.5, 0, wearer))
    tb = _box(person.masks[i])
    if ib is None or pb is None or tb is None:
        raise ValueError(f"put_on needs the item's and both people's masks: {item.folder} view {j} or "
                         f"{person.folder} image {i} has an empty one")
    card = json.loads((Path(item.folder) / "concept.json").read_text(encoding="utf-8"))
    if "width" in card and "sink" in card:  # a rendered set says how it was worn (``wear``): worn the same way
        w = max(1, round(card["width"] * (tb[2] - tb[0])))
        h = max(1, round((ib[3] - ib[1]) * w / (ib[2] - ib[0])))
        left, top = round((tb[0] + tb[2]) / 2 - w / 2), round(tb[1] - (1 - card["sink"]) * h)
    else:  # measured on the view: the item hides the top of the head, so it may sit a little high
        scale = (tb[2] - tb[0]) / (pb[2] - pb[0])
        w, h = max(1, round((ib[2] - ib[0]) * scale)), max(1, round((ib[3] - ib[1]) * scale))
        centre = (ib[0] + ib[2]) / 2 - (pb[0] + pb[2]) / 2  # the item's offset from the wearer's centre
        left = round((tb[0] + tb[2]) / 2 + centre * scale - w / 2)
        top = round(tb[1] + (ib[1] - pb[1]) * scale)
    cut = item.images[j].convert("RGBA")
    cut.putalpha(Image.fromarray(np.round(item_mask * 255).astype(np.uint8)))
    small = cut.crop(ib).convert("RGBa").resize((w, h), Image.LANCZOS).convert("RGBA")
    size = person.images[i].size
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    layer.paste(small, (left, top))
    image = Image.alpha_composite(person.images[i].convert("RGBA"), layer).convert("RGB")
    hat = np.asarray(layer.getchannel("A"), np.float32) / 255
    return image, hat, np.maximum(person.masks[i], hat)

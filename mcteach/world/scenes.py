"""The emoji world: small, real images the course's tiny Stable Diffusion is trained on.

Each scene is a plain background with one or two emoji from the Noto Color Emoji font at
named positions. A scene comes with its caption ("a fox on the left and a red apple on the
right") and one alpha mask per object, so every later lesson (attention maps, masked losses,
per-region judging) has exact ground truth.

    >>> scene = render_scene([(EMOJI["fox"], "left"), (EMOJI["red apple"], "right")], seed=0)
    >>> scene.image.size, scene.caption, scene.masks.shape
    ((64, 64), 'a fox on the left and a red apple on the right', (2, 64, 64))

Names come from Unicode (``unicodedata.name``), lower-cased, with " face" dropped from
animal faces and ZWJ/skin-tone sequences spelt out ("woman with red hair").
The glyphs are © Google, Apache License 2.0; the font is under the SIL Open Font License
(see ``data/NOTICE.md``).
"""

from __future__ import annotations

import colorsys
import functools
import os
import random
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .regions import OPPOSITE_POSITIONS, POSITIONS, region_box

IMAGE_SIZE = 64
FONT_SIZE = 109  # the only bitmap strike in Noto Color Emoji
FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",  # Debian / Ubuntu (Colab)
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",  # Arch, Fedora
    "/usr/share/fonts/google-noto-emoji/NotoColorEmoji.ttf",
    "/System/Library/Fonts/NotoColorEmoji.ttf",
    "/opt/homebrew/share/fonts/NotoColorEmoji.ttf",
)
FONT_INSTALL_HINT = (
    "Noto Color Emoji font not found. Install it with "
    "`sudo apt-get install fonts-noto-color-emoji` (Debian/Ubuntu/Colab), "
    "`conda install -c conda-forge font-ttf-noto-emoji`, or download NotoColorEmoji.ttf "
    "and set MCTEACH_EMOJI_FONT=/path/to/NotoColorEmoji.ttf."
)

ZWJ = "\u200d"
SKIN_TONES = {
    "\U0001F3FB": "light",
    "\U0001F3FC": "medium light",
    "\U0001F3FD": "medium",
    "\U0001F3FE": "medium dark",
    "\U0001F3FF": "dark",
}


class EmojiFontMissing(FileNotFoundError):
    """Raised when the Noto Color Emoji font cannot be found; the message says how to install it."""


SHAPING_HINT = (
    "Pillow drew the emoji sequence {chars!r} as separate glyphs (a person beside a skin-tone swatch) instead of "
    "one: it lacks complex text layout (libraqm). Pillow's wheels bring libraqm but load FriBiDi from the "
    "system: `sudo apt-get install libfribidi0` (Debian/Ubuntu), `conda install -c conda-forge fribidi`, or put "
    "libfribidi.so.0 on LD_LIBRARY_PATH. Check with `python -c \"from PIL import features; "
    "print(features.check('raqm'))\"`."
)


class EmojiShapingMissing(RuntimeError):
    """Raised when Pillow cannot shape emoji sequences (ZWJ, skin tones); the message says what to install."""


def font_path() -> Path:
    """Path of NotoColorEmoji.ttf (``$MCTEACH_EMOJI_FONT`` first, then the usual system places)."""
    env = os.environ.get("MCTEACH_EMOJI_FONT")
    conda = os.environ.get("CONDA_PREFIX")  # conda-forge's font-ttf-noto-emoji installs here
    extra = [env] if env else []
    extra += [str(Path(conda) / "fonts" / "NotoColorEmoji.ttf")] if conda else []
    for p in extra + list(FONT_CANDIDATES):
        if p and Path(p).is_file():
            return Path(p)
    raise EmojiFontMissing(FONT_INSTALL_HINT)


@functools.lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_path()), FONT_SIZE)


GENDER_SIGNS = {"\u2640": "woman", "\u2642": "man"}
#: the second character of a ZWJ profession sequence ("woman" + ZWJ + cooking = "woman cook")
PROFESSIONS = {
    "\U0001F373": "cook", "\U0001F33E": "farmer", "\U0001F680": "astronaut", "\u2695": "health worker",
    "\U0001F3EB": "teacher", "\U0001F692": "firefighter", "\U0001F52C": "scientist", "\U0001F3A8": "artist",
}
#: ZWJ sequences whose name is not built from their parts
SEQUENCE_NAMES = {
    "\U0001F408\u200d\u2b1b": "black cat",
    "\U0001F415\u200d\U0001F9BA": "service dog",
    "\U0001F43B\u200d\u2744\ufe0f": "polar bear",
}
#: Unicode names shortened to the word a caption would use
BASE_RENAMES = {"adult": "person", "older adult": "older person", "guardsman": "guard"}


def emoji_name(chars: str) -> str:
    """Caption name of an emoji from its Unicode character names.

    Faces of animals drop " face"; ZWJ sequences are spelt out: hair ("woman with red hair"),
    skin tone ("... and dark skin"), gender ("woman with blond hair", "bearded man"),
    profession ("man cook"), "bald woman".

    >>> emoji_name("\U0001F98A"), emoji_name("\U0001F469\U0001F3FF\u200d\U0001F9B0")
    ('fox', 'woman with red hair and dark skin')
    >>> emoji_name("\U0001F471\U0001F3FD\u200d\u2640\ufe0f"), emoji_name("\U0001F468\u200d\U0001F9B2")
    ('woman with blond hair and medium skin', 'bald man')
    """
    if chars in SEQUENCE_NAMES:
        return SEQUENCE_NAMES[chars]
    base, hair, tone, gender, job = None, None, None, None, None
    for ch in chars:
        if ch in (ZWJ, "\ufe0f"):
            continue
        if ch in SKIN_TONES:
            tone = SKIN_TONES[ch]
            continue
        if base is not None and ch in GENDER_SIGNS:
            gender = GENDER_SIGNS[ch]
            continue
        if base is not None and ch in PROFESSIONS:
            job = PROFESSIONS[ch]
            continue
        name = unicodedata.name(ch).lower()
        if name.startswith("emoji component "):
            hair = name.removeprefix("emoji component ")
        elif base is None:
            base = name
        else:
            raise ValueError(f"cannot name emoji sequence {chars!r}: two base characters")
    if base is None:
        raise ValueError(f"{chars!r} has no base character")
    base = base.removesuffix(" face") if base.endswith(" face") and base != "face" else base
    base = BASE_RENAMES.get(base, base)
    if gender:
        base = base.replace("person", gender) if "person" in base else f"{gender} {base}"
    if job:
        base = f"{base} {job}"
    if hair == "bald":
        base, hair = f"bald {base}", None
    extras = [x for x in (hair, f"{tone} skin" if tone else None) if x]
    if not extras:
        return base
    return base + (" and " if " with " in base else " with ") + " and ".join(extras)


@dataclass(frozen=True)
class Emoji:
    """One class of the world: its characters, caption name and coarse category."""
    chars: str
    category: str  # animal | person | food | object

    @property
    def name(self) -> str:
        return emoji_name(self.chars)

    @property
    def slug(self) -> str:
        return self.name.replace(" ", "_")

    def __repr__(self) -> str:
        return f"Emoji({self.chars!r}, {self.name!r})"


def _emojis(category: str, chars: str) -> list[Emoji]:
    return [Emoji(c, category) for c in chars.split()]


W, M = "\U0001F469", "\U0001F468"  # woman, man
FEMALE, MALE = "\u2640\ufe0f", "\u2642\ufe0f"
#: a smaller world of 60 classes (``--world classic``); the shipped model's world (BROAD_CLASSES) holds them all
CLASSIC_CLASSES: list[Emoji] = (
    _emojis("animal", "🦊 🐱 🐶 🐯 🦁 🐸 🐵 🐮 🐷 🐰 🐭 🐻 🐼 🐺 🐴 🦄 🐔 🐧 🐙 🐢 🦉 🐝 🐟 🦋")
    + _emojis("person", f"{W} {M} 👦 👧 👴 👵 👶 {W}{ZWJ}🦱 {M}{ZWJ}🦰 {W}🏿 {M}🏾 {W}{ZWJ}🦳")
    + _emojis("food", "🍎 🍌 🍇 🍉 🍋 🍓 🍍 🥕 🍕 🍔 🍩 🥑")
    + _emojis("object", "⚽ 🎸 🚗 🚀 ⏰ 💡 🎈 🔑 🎁 🌵 🌻 🎩")
)
HAIRS = {"none": "", "red": "🦰", "curly": "🦱", "white": "🦳", "bald": "🦲", "blond": None}
TONES = ("",) + tuple(SKIN_TONES)


def person(gender: str, hair: str = "none", tone: str = "") -> Emoji:
    """The emoji for a woman or man with a hair style and a skin tone modifier ("" for none).

    >>> person("woman", "blond", "\U0001F3FD").name
    'woman with blond hair and medium skin'
    """
    if hair not in HAIRS:
        raise ValueError(f"unknown hair {hair!r}; use one of {sorted(HAIRS)}")
    if hair == "blond":  # "person with blond hair" + gender sign
        return Emoji(f"👱{tone}{ZWJ}{FEMALE if gender == 'woman' else MALE}", "person")
    base = {"woman": W, "man": M}[gender] + tone
    return Emoji(base + (ZWJ + HAIRS[hair] if HAIRS[hair] else ""), "person")


def _people(held_out: set[str]) -> list[Emoji]:
    variants = [person(g, h, t) for g in ("woman", "man") for h in HAIRS for t in TONES]
    ages = _emojis("person", "👶 👦 👧 👴 👵 🧓")
    jobs = [Emoji(g + ZWJ + job, "person") for g in (W, M) for job in ("🍳", "🌾", "🚀", "\u2695\ufe0f")]
    jobs += _emojis("person", "👮 👷")
    return [e for e in variants + ages + jobs if e.chars not in held_out]


#: held-out concepts, never seen in base training: few-shot sets in data/concepts/<slug>/.
#: Each has a base class word for initialisation (TI) and prior preservation (DreamBooth).
HELDOUT_CONCEPTS: dict[str, tuple[Emoji, str]] = {
    e.slug: (e, cls)
    for e, cls in [
        (Emoji(f"{W}🏽{ZWJ}🦰", "person"), "woman"),  # the couple: two similar people
        (Emoji(f"{M}🏻{ZWJ}🦱", "person"), "man"),
        (Emoji(f"{W}🏿{ZWJ}🦱", "person"), "woman"),  # with the first: a same-class pair (mixing's worst case)
        (Emoji("🧔", "person"), "man"),
        (Emoji("🐨", "animal"), "bear"),  # similar animals
        (Emoji("🐹", "animal"), "mouse"),
        (Emoji("🦝", "animal"), "fox"),
        (Emoji("🐲", "animal"), "frog"),
        (Emoji("🍑", "food"), "red apple"),
        (Emoji("🥐", "food"), "doughnut"),
        (Emoji("🎺", "object"), "guitar"),
    ]
}
#: the broad world (issue 11): every woman and man as hair x skin tone, ages, professions, and
#: many more animals (cat and dog kinds), foods and objects. Held-out concepts are left out, so
#: each is an unseen combination (the couple) or an unseen kind (the koala), as a user's own face
#: or pet is for Stable Diffusion 1.5.
BROAD_CLASSES: list[Emoji] = (
    CLASSIC_CLASSES[:24]
    + _emojis("animal", f"🐈{ZWJ}⬛ 🐩 🦮 🐕{ZWJ}🦺 🐻{ZWJ}❄️ 🦒 🦓 🐘 🦔 🦇 🦦 🦨 🐿️ 🦆 🦢 🦩 🦜 🐊 "
                        "🐍 🐬 🦈 🐠 🦀 🐌 🐞 🦍 🦏 🐑 🦙 🦌")
    + _people({e.chars for e, _ in HELDOUT_CONCEPTS.values()})
    + CLASSIC_CLASSES[36:48]
    + _emojis("food", "🍒 🍐 🍊 🥝 🥥 🍅 🍆 🌽 🥦 🍄 🧀 🍞 🍪 🎂 🍦 🍭")
    + CLASSIC_CLASSES[48:]
    + _emojis("object", "🎹 🥁 🎻 🚲 🚌 🚁 ⛵ 🏠 ⌚ 📷 🔨 🎒 👑 🌂 🌈 ⭐ 🌙 🌲 🌷 🧸")
)
#: the classes the shipped base model (data/tiny-sd) was trained on; a model trained on another world (``WORLDS``)
#: is measured with ``--world``
BASE_CLASSES: list[Emoji] = BROAD_CLASSES
WORLDS = {"classic": CLASSIC_CLASSES, "broad": BROAD_CLASSES}
EMOJI: dict[str, Emoji] = {e.name: e for e in CLASSIC_CLASSES + BROAD_CLASSES} | {
    e.name: e for e, _ in HELDOUT_CONCEPTS.values()
}


def world_classes(name: str | None = None) -> list[Emoji]:
    """World ``name``'s classes (``WORLDS``; None: the shipped base model's, ``BASE_CLASSES``), with a clear error
    for an unknown name: what a model trained on another world than the shipped one is measured against."""
    if name is None:
        return BASE_CLASSES
    if name not in WORLDS:
        raise ValueError(f"unknown world {name!r}; choose one of {sorted(WORLDS)}")
    return WORLDS[name]


@functools.lru_cache(maxsize=512)
def glyph(chars: str) -> Image.Image:
    """The emoji rendered at the font's native size, cropped to its opaque pixels (RGBA)."""
    canvas = Image.new("RGBA", (FONT_SIZE * 2, FONT_SIZE + 40), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), chars, font=_font(), embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        raise ValueError(f"the font has no glyph for {chars!r}")
    if len(chars) > 1 and box[2] - box[0] > 1.5 * FONT_SIZE:
        raise EmojiShapingMissing(SHAPING_HINT.format(chars=chars))
    return canvas.crop(box)


def caption(objects: list[tuple[Emoji | str, str]]) -> str:
    """Template caption for (emoji or name, position) pairs, in the given order.

    >>> caption([("fox", "left"), ("apple", "right")])
    'a fox on the left and an apple on the right'
    """
    parts = []
    for obj, pos in objects:
        name = obj.name if isinstance(obj, Emoji) else obj
        article = "an" if name[0] in "aeiou" else "a"
        phrase = f"{article} {name}"
        if len(objects) > 1 or pos != "centre":
            phrase += " " + POSITIONS[pos]
        parts.append(phrase)
    return " and ".join(parts)


@dataclass
class Scene:
    image: Image.Image  # RGB, IMAGE_SIZE x IMAGE_SIZE
    masks: np.ndarray  # (n_objects, H, W) float32 alpha in [0, 1]
    caption: str
    objects: list[tuple[Emoji, str]]


def background_colour(rng: random.Random) -> tuple[int, int, int]:
    h, s, v = rng.random(), rng.uniform(0.0, 0.45), rng.uniform(0.7, 1.0)
    return tuple(round(255 * c) for c in colorsys.hsv_to_rgb(h, s, v))


def render_scene(
    objects: list[tuple[Emoji, str]],
    *,
    seed: int | None = None,
    rng: random.Random | None = None,
    background: tuple[int, int, int] | None = None,
    size: int = IMAGE_SIZE,
) -> Scene:
    """Render emoji at named positions on a plain background.

    Objects in a half region ("left", ...) are 24-32 px tall at 64 px, jittered inside their
    half; a lone "centre" object is 30-50 px. Deterministic for a given ``seed`` (or ``rng``).
    """
    if not 1 <= len(objects) <= 2:
        raise ValueError(f"a scene has one or two objects, got {len(objects)}")
    positions = [p for _, p in objects]
    for p in positions:
        if p not in POSITIONS:
            raise ValueError(f"unknown position {p!r}; use one of {sorted(POSITIONS)}")
    if len(objects) == 2 and tuple(positions) not in OPPOSITE_POSITIONS and tuple(positions[::-1]) not in OPPOSITE_POSITIONS:
        raise ValueError(
            f"two objects need opposite halves, one of {OPPOSITE_POSITIONS} (in either order); got {positions}"
        )
    rng = rng or random.Random(seed)
    bg = tuple(background) if background is not None else background_colour(rng)
    canvas = Image.new("RGBA", (size, size), bg + (255,))
    masks = []
    for emoji, pos in objects:
        g = glyph(emoji.chars)
        lo, hi = (0.47, 0.78) if pos == "centre" else (0.375, 0.5)
        target = rng.uniform(lo, hi) * size
        scale = target / max(g.size)
        w, h = max(1, round(g.size[0] * scale)), max(1, round(g.size[1] * scale))
        # resize with premultiplied alpha so edges don't pick up dark fringes
        small = g.convert("RGBa").resize((w, h), Image.LANCZOS).convert("RGBA")
        x0, y0, x1, y1 = region_box(pos, size)
        reach = 0.1 * size if pos == "centre" else size  # a centre object stays near the centre
        cx = (x0 + x1) / 2 + rng.uniform(-1, 1) * min(reach, max(0.0, (x1 - x0 - w) / 2))
        cy = (y0 + y1) / 2 + rng.uniform(-1, 1) * min(reach, max(0.0, (y1 - y0 - h) / 2))
        left, top = round(cx - w / 2), round(cy - h / 2)
        layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        layer.paste(small, (left, top))
        canvas = Image.alpha_composite(canvas, layer)
        masks.append(np.asarray(layer.getchannel("A"), dtype=np.float32) / 255.0)
    return Scene(canvas.convert("RGB"), np.stack(masks), caption(objects), list(objects))


def random_objects(
    rng: random.Random, classes: list[Emoji], p_two: float = 0.5
) -> list[tuple[Emoji, str]]:
    """A random layout: one object (centre or a half) or two distinct objects in opposite halves."""
    if rng.random() < p_two:
        a, b = rng.sample(classes, 2)
        pa, pb = rng.choice(OPPOSITE_POSITIONS)
        objs = [(a, pa), (b, pb)]
        rng.shuffle(objs)  # "a on the left and b on the right" and "b on the right and a on the left"
        return objs
    return [(rng.choice(classes), rng.choice(list(POSITIONS)))]


def random_scene(seed: int, classes: list[Emoji] | None = None, p_two: float = 0.5) -> Scene:
    """Scene number ``seed`` of the world (deterministic)."""
    rng = random.Random(seed)
    return render_scene(random_objects(rng, classes or BASE_CLASSES, p_two), rng=rng)


def vocabulary_words(classes: list[Emoji] | None = None) -> list[str]:
    """Every word a caption about ``classes`` (default: all, held-out included) can contain."""
    words = set()
    for e in classes or EMOJI.values():
        words.update(caption([(e, "left"), (e, "right")]).split())
        words.update(caption([(e, "top"), (e, "bottom")]).split())
        words.update(caption([(e, "centre")]).split())
    return sorted(words)

"""Checking the judge against the eye: a hand-labelled set of generated images.

The judge is trained on clean renders; generated images are blurry, and a blob can look enough like a render
to score as a concept. So every metric of the course is only as honest as the judge's agreement with a person
looking at generated images. This module holds that check:

1. ``contact_sheet`` draws numbered images (and the region to judge) on one PNG, to be looked at and labelled;
2. a labelled set is a folder ``images/NNNN.png`` + ``labels.json``: one entry per image with the region to
   judge, the label a person gave (a judge label, or ``UNRECOGNISABLE`` for something no one would name),
   where the image came from (base model, a method) and its prompt;
3. ``agreement`` scores a judge on the set: its answer is its top label where its confidence is at least
   ``tau``, else ``UNRECOGNISABLE``; it reports the agreement, how often an unrecognisable image was still
   given a concept (a blob scored as a concept), and the confusion; ``best_tau`` picks the threshold.

    mcteach judge calibrate generate <folder>                     # 200 generated images, labels = prompts
    mcteach judge calibrate sheet <folder> --out sheet.png        # look at it, correct labels.json
    mcteach judge calibrate agreement data/calibration_broad_full  # the judge against the labels (the default)
    mcteach judge calibrate mine <folder> --model <export> --world broad --judge <weights>  # doubtful images
    mcteach judge calibrate sample <folder> --mined <mined> --seed <its seed>  # a random sample of the rest
    mcteach judge calibrate rate <sample> --mined <mined> --population N       # the by-eye rate over all

A mined set alone says how the judge does where it doubts; with a labelled random sample of the images it was sure of
(``sample_rest``), ``stratified_rate`` says how often the base model drew what was asked, by eye, over every class.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..methods.adapters import load_adapters, phrases
from ..mixing.generate import regional_generate
from ..mixing.masking import Region
from ..mixing.passes import INFERENCE_FIX, sub_prompt
from ..paths import ADAPTERS_DIR, CALIBRATION_SET
from ..sd.pipeline import generate, load_pipeline
from ..world import scenes
from ..world.regions import POSITIONS, region_box
from .judge import NOTHING, UNRECOGNISABLE, Judge
from .metrics import SAMPLING

#: the shipped set: 200 images of the shipped model and its adapters, labelled by eye
DEFAULT_SET = CALIBRATION_SET


@dataclass
class Item:
    file: str
    region: str  # a region name of the judge ("centre", "left", ...)
    label: str  # what a person saw: a judge label, "nothing" or UNRECOGNISABLE
    source: str = ""  # "base", "lora", ...
    prompt: str = ""


def load(folder: str | Path) -> tuple[list[Image.Image], list[Item]]:
    """The images and labels of a labelled set (``folder/labels.json`` + the files it names)."""
    folder = Path(folder)
    card = folder / "labels.json"
    if not card.is_file():
        raise FileNotFoundError(f"{card} not found: a labelled set is a folder with labels.json and its images")
    items = [Item(**entry) for entry in json.loads(card.read_text())["items"]]
    if not items:
        raise ValueError(f"{card} has no items")
    images = []
    for it in items:
        path = folder / it.file
        if not path.is_file():
            raise FileNotFoundError(f"{card} names {it.file}, which is not in {folder}")
        images.append(Image.open(path).convert("RGB"))
    return images, items


def save(folder: str | Path, images: list[Image.Image], items: list[Item]) -> None:
    """Write a labelled set: the images as ``images/NNNN.png`` (the items' ``file`` is set) and labels.json."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i, (im, it) in enumerate(zip(images, items)):
        it.file = f"images/{i:04d}.png"
        im.save(folder / it.file, optimize=True)
    (folder / "labels.json").write_text(json.dumps({"items": [vars(it) for it in items]}, indent=1) + "\n")


def contact_sheet(images: list[Image.Image], regions: list[str] | None = None, cols: int = 10,
                  scale: int = 2) -> Image.Image:
    """The images in a numbered grid, each ``scale`` times larger (cells as large as the largest image: a wider
    canvas keeps its shape), the region to judge outlined in red."""
    size = max([scenes.IMAGE_SIZE] + [im.width for im in images]) * scale
    height = max([scenes.IMAGE_SIZE] + [im.height for im in images]) * scale
    rows = -(-len(images) // cols)
    sheet = Image.new("RGB", (cols * size, rows * (height + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, im in enumerate(images):
        x, y = (i % cols) * size, (i // cols) * (height + 14)
        sheet.paste(im.resize((im.width * scale, im.height * scale), Image.NEAREST), (x, y + 14))
        draw.text((x + 2, y + 1), str(i), fill="black")
        region = regions[i] if regions else "centre"
        if region != "centre":
            x0, y0, x1, y1 = (v * scale for v in region_box(region, scenes.IMAGE_SIZE))
            draw.rectangle((x + x0, y + 14 + y0, x + x1 - 1, y + 14 + y1 - 1), outline="red")
    return sheet


def answers(judge, images, items: list[Item], tau: float) -> list[str]:
    """The judge's answer per item: its top label in the item's region, or UNRECOGNISABLE below ``tau``."""
    out = []
    for region in sorted({it.region for it in items}):
        idx = [i for i, it in enumerate(items) if it.region == region]
        probs = judge.probs([images[i] for i in idx], region)
        conf, top = probs.max(-1)
        for i, c, t in zip(idx, conf.tolist(), top.tolist()):
            out.append((i, judge.labels[t] if c >= tau else UNRECOGNISABLE))
    return [a for _, a in sorted(out)]


def agreement(judge, images, items: list[Item], tau: float = 0.5) -> dict:
    """How the judge agrees with the labels: overall, on recognisable images, and on unrecognisable ones (where
    ``blob_called_concept`` is the share the judge still names a concept: a blob scored as a concept)."""
    said = answers(judge, images, items, tau)
    truth = [it.label for it in items]
    ok = np.array([s == t for s, t in zip(said, truth)])
    blob = np.array([t == UNRECOGNISABLE for t in truth])
    concept = np.array([s not in (UNRECOGNISABLE, NOTHING) for s in said])
    return {
        "tau": tau, "n": len(items), "agreement": float(ok.mean()),
        "agreement_recognisable": float(ok[~blob].mean()) if (~blob).any() else float("nan"),
        "n_unrecognisable": int(blob.sum()),
        "blob_called_concept": float(concept[blob].mean()) if blob.any() else float("nan"),
        "confusion": Counter(f"{t} -> {s}" for s, t in zip(said, truth) if s != t).most_common(10),
    }


def best_tau(judge, images, items: list[Item], taus=np.linspace(0.3, 0.95, 14)) -> float:
    """The confidence threshold with the highest agreement (the lowest on ties: fewer images refused)."""
    scores = [(agreement(judge, images, items, float(t))["agreement"], -float(t)) for t in taus]
    return -max(scores)[1]


def generate_set(out: str | Path, seed: int = 0, model: str | Path | None = None, adapters: str | Path | None = None,
                 classes: list[scenes.Emoji] | None = None) -> list[Item]:
    """Generate the unlabelled calibration images (reproducible; 200 items) into ``out``, every item's ``label``
    set to what its prompt asked for, to be corrected by eye:
    - base model: "a <class>" for every base class (seed ``seed``), and "a <class> on the left" or "at the top"
      for every base class (the asked region is judged): 120; a world of more than 60 classes gives 60 drawn at
      random to each half (120 different classes);
    - each shipped adapter of the couple (LoRA, Textual Inversion, HyperNetwork): "a <phrase>", 8 seeds: 48;
    - both LoRAs with the inference fix: "a <woman> on the left and a <man> on the right", 16 seeds, each half: 32.
    ``model``, ``adapters``, ``classes``: another base model (default: the embedded one), the folder of its adapters
    laid out as ``data/adapters`` (written by ``methods.retrain_shipped``), its world (default: the base classes).
    Returns the items (also written, with the images, by ``save``)."""
    import random


    classes, adapters = classes or scenes.BASE_CLASSES, Path(adapters or ADAPTERS_DIR)
    images, items = [], []
    pipe = load_pipeline(model, device="cpu")
    rng = random.Random(seed)
    if len(classes) <= 60:  # the shipped set: every class twice
        centred, placed_classes = classes, classes
    else:
        drawn = rng.sample(classes, 120)
        centred, placed_classes = drawn[:60], drawn[60:]
    prompts = [scenes.caption([(e, "centre")]) for e in centred]
    images += generate(pipe, prompts, seed=[seed] * len(prompts), batch_size=32, **SAMPLING)
    items += [Item("", "centre", e.name, "base", p) for e, p in zip(centred, prompts)]
    placed = [(e, rng.choice(["left", "top"])) for e in placed_classes]
    prompts = [scenes.caption([(e, where)]) for e, where in placed]
    images += generate(pipe, prompts, seed=[seed + 1] * len(prompts), batch_size=32, **SAMPLING)
    items += [Item("", where, e.name, "base", p) for (e, where), p in zip(placed, prompts)]
    couple = ["woman_with_red_hair_and_medium_skin", "man_with_curly_hair_and_light_skin"]
    names = {s: scenes.HELDOUT_CONCEPTS[s][0].name for s in couple}
    for method in ("lora", "textual_inversion", "hypernetwork"):
        for slug in couple:
            p = load_pipeline(model, device="cpu")
            meta = load_adapters(p, [adapters / method / slug])[0]
            prompt = f"a {phrases(meta)[slug]}"
            images += generate(p, [prompt] * 8, seed=list(range(seed, seed + 8)), **SAMPLING)
            items += [Item("", "centre", names[slug], method, prompt) for _ in range(8)]
    p = load_pipeline(model, device="cpu")
    metas = load_adapters(p, [adapters / "lora" / s for s in couple])
    said = [phrases(m)[s] for m, s in zip(metas, couple)]
    regions = [Region(where, sub_prompt(ph, where), phrase=ph, adapter=m["adapter_name"])
               for where, ph, m in zip(("left", "right"), said, metas)]
    prompt = f"a {said[0]} on the left and a {said[1]} on the right"
    pairs = regional_generate(p, prompt, regions, fix=INFERENCE_FIX, seed=list(range(seed, seed + 16)), **SAMPLING)
    for im in pairs:
        for where, slug in zip(("left", "right"), couple):
            images.append(im)
            items.append(Item("", where, names[slug], "lora+inference fix", prompt))
    save(out, images, items)
    return items


def generate_base_set(out: str | Path, model: str | Path | None = None, classes: list[scenes.Emoji] | None = None,
                      n: int = 200, seed: int = 0) -> list[Item]:
    """``n`` unlabelled images of a base model (reproducible), labels = what each prompt asked, to be corrected by
    eye: half "a <class>" (the whole frame judged), half "a <class> on the left/right/top/bottom" (that region),
    over ``n`` classes drawn without replacement where there are enough (default: the base classes)."""
    import random


    classes, rng = classes or scenes.BASE_CLASSES, random.Random(seed)
    picked = (rng.sample(classes, n) if n <= len(classes) else [rng.choice(classes) for _ in range(n)])
    where = ["centre" if i % 2 == 0 else rng.choice(["left", "right", "top", "bottom"]) for i in range(n)]
    prompts = [scenes.caption([(e, w)]) for e, w in zip(picked, where)]
    pipe = load_pipeline(model, device="cpu")
    images = generate(pipe, prompts, seed=list(range(seed, seed + n)), batch_size=32, **SAMPLING)
    items = [Item("", w, e.name, "base", p) for e, w, p in zip(picked, where, prompts)]
    save(out, images, items)
    return items


def mine_set(out: str | Path, model: str | Path | None = None, classes: list[scenes.Emoji] | None = None,
             per_class: int = 6, keep: int = 200, seed: int = 5000, judge_path: str | Path | None = None) -> list[Item]:
    """The ``keep`` most doubtful of ``per_class`` images per class of a base model, unlabelled (labels = what each
    prompt asked, to be corrected by eye): where labelling pays. Failures are rare (a tenth of the images), so a random
    set finds a few per class at most; here every class gets ``per_class`` images (alternately the whole frame and a
    random half), the judge at ``judge_path`` scores each in its region, and the images it is least sure show the asked
    class (lowest probability) are kept, sorted by class. Seeds ``seed``, ``seed + 1``, ... (away from the test set's)."""
    asked, prompts, seeds = mine_population(classes, per_class, seed)
    images = generate(load_pipeline(model, device="cpu"), prompts, seed=seeds, batch_size=32, **SAMPLING)
    judge = Judge.load(judge_path) if judge_path else Judge.load()
    p_asked = np.zeros(len(images))
    for region in {w for _, w in asked}:
        idx = [i for i, (_, w) in enumerate(asked) if w == region]
        probs = judge.probs([images[i] for i in idx], region)
        for i, row in zip(idx, probs):
            p_asked[i] = float(row[judge.labels.index(asked[i][0].name)]) if asked[i][0].name in judge.labels else 0.0
    picked = sorted(np.argsort(p_asked, kind="stable")[:keep].tolist())  # class order, as generated
    items = [Item("", asked[i][1], asked[i][0].name, f"base, seed {seeds[i]}, judge p {p_asked[i]:.2f}", prompts[i])
             for i in picked]
    save(out, [images[i] for i in picked], items)
    return items


def mine_population(classes: list[scenes.Emoji] | None = None, per_class: int = 6, seed: int = 5000):
    """What ``mine_set`` generates before it keeps the doubtful: (class, region) pairs, their prompts and seeds."""
    import random

    classes, rng = classes or scenes.BASE_CLASSES, random.Random(seed)
    asked = [(e, "centre" if k % 2 == 0 else rng.choice(["left", "right", "top", "bottom"]))
             for e in classes for k in range(per_class)]
    return asked, [scenes.caption([(e, w)]) for e, w in asked], list(range(seed, seed + len(asked)))


def _seed_of(item: Item) -> int:
    return int(item.source.split("seed ")[1].split(",")[0])


def sample_rest(out: str | Path, mined: str | Path, n: int = 150, model: str | Path | None = None,
                classes: list[scenes.Emoji] | None = None, per_class: int = 6, seed: int = 5000,
                sample_seed: int = 0) -> list[Item]:
    """``n`` images drawn at random (``sample_seed``) from the part of a ``mine_set`` population that was *not*
    kept (the images the judge was sure of), unlabelled (labels = what each prompt asked, to be checked by eye).

    A mined set is a census of the doubtful stratum, and this sample estimates the confident one: together
    (``stratified_rate``) they give the by-eye rate over the whole population at the cost of labelling the two.
    The population is rebuilt from what the set was mined with (``classes``, ``per_class``, first ``seed``) and
    checked against the mined set's prompts and seeds."""
    import random


    _, kept = load(mined)
    asked, prompts, seeds = mine_population(classes, per_class, seed)
    index = {s: i for i, s in enumerate(seeds)}
    where = [index.get(_seed_of(it)) for it in kept]
    if any(i is None or prompts[i] != it.prompt for i, it in zip(where, kept)):
        raise ValueError(f"{mined} is not a mine_set of these classes with per_class={per_class}; pass the ones it was "
                         "mined with (--world, --per-class, --seed)")
    taken = set(where)
    rest = [i for i in range(len(asked)) if i not in taken]
    picked = sorted(random.Random(sample_seed).sample(rest, min(n, len(rest))))
    images = generate(load_pipeline(model, device="cpu"), [prompts[i] for i in picked],
                      seed=[seeds[i] for i in picked], batch_size=32, **SAMPLING)
    items = [Item("", asked[i][1], asked[i][0].name, f"base, seed {seeds[i]}, not among the mined {len(kept)} of "
                  f"{len(asked)}", prompts[i]) for i in picked]
    save(out, images, items)
    return items


@functools.cache
def _one_object_captions() -> dict[str, str]:
    """Every one-object caption of the world (each class and held-out concept at each position) -> its name."""
    return {scenes.caption([(e, position)]): e.name for position in ("centre", *POSITIONS)
            for e in scenes.BROAD_CLASSES + [c for c, _ in scenes.HELDOUT_CONCEPTS.values()]}


def asked_label(item: Item) -> str:
    """The class a one-object prompt asked for ("a fox on the left" -> "fox"), from the world's own captions."""
    name = _one_object_captions().get(item.prompt)
    if name is None:
        raise ValueError(f"{item.prompt!r} is not a one-object caption of the world")
    return name


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (95% for z = 1.96): sound at k = n, where the normal one is not."""
    if n == 0:
        return 0.0, 1.0
    p, d = k / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def stratified_rate(census: list[Item], sample: list[Item], population: int) -> dict:
    """The by-eye rate of "the asked object is drawn" over a population of ``population`` images, from a labelled
    census of one stratum (``mine_set``'s doubtful images) and a labelled random sample of the rest (``sample_rest``).

    rate = (right in the census + (population - census) x right share of the sample) / population; the interval
    carries the sample's Wilson interval (the census has no sampling error)."""
    rest = population - len(census)
    if rest < len(sample) or not sample:
        raise ValueError(f"a population of {population} with a census of {len(census)} leaves {rest} images; the "
                         f"sample has {len(sample)}")
    k_census = sum(it.label == asked_label(it) for it in census)
    k_sample = sum(it.label == asked_label(it) for it in sample)
    lo, hi = wilson(k_sample, len(sample))
    return {"rate": (k_census + rest * k_sample / len(sample)) / population,
            "interval": [(k_census + rest * lo) / population, (k_census + rest * hi) / population],
            "census": [k_census, len(census)], "sample": [k_sample, len(sample)], "population": population}

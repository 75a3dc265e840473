"""The kinds benchmark (notebook 09): the couple with a concept of another kind and extent, LoRA, 16 seeds.

- **place** (global: the whole frame, behind the people): "the couple in their cottage garden". The couple's LoRAs
  and the place's LoRA, each trained on its own with the CLI's defaults. Fixes:
  ``none`` (every adapter on, one prompt naming all three), ``passes`` (the couple's passes in boxes where people
  stand, ``STANDING``, and the place's pass on the ``"background"`` region around them, ``regions.BACKGROUND``),
  ``layers`` (``mixing.extent.place_generate``: the people by
  their passes on a plain background, the place by its adapter alone, the people's silhouettes in front).
  Measured per image: *place* (``measure.places.seen``: the colour layout on the cells the people leave free, against
  a threshold calibrated on those cells),
  *people* (the position-free judge: the woman and the man, each found once; inside the people's own regions where
  the fix has them, the boxes of ``passes`` or the silhouettes of ``layers``, every other pixel painted grey, so
  that a cloud of the place is not counted as a third figure; with no fix, on the whole image), and *both*.
- **wearable** (nested: inside its wearer): "the woman with her cap, the man beside her". Fixes: ``none`` (the
  three LoRAs trained one by one, every adapter on, one prompt), ``passes`` (the same LoRAs, the passes fix, the
  item's adapter on in the wearer's pass only, with the wearer's: a tuple of adapters), ``training`` (one LoRA
  trained on the three sets with the training fix, ``mcteach train --concept A --concept B --concept ITEM --fix
  training``: its composites include each person wearing the item, ``kinds.put_on``; one prompt) and ``both`` (that
  LoRA with the passes fix). Measured: *people* (as above), the item *on the wearer*, *on the other*
  (``measure.wearables``: the item's own colours on each person's head), *right* (both people, the item on the
  wearer and not on the other), and *on two heads* (on two figures, whoever they are: with no fix the man is often
  a second woman, capped too).

    mcteach bench mixing --kinds           # every shipped kind set, into data/bench_kinds.json and .md (~25 min)
    mcteach bench mixing --kinds FILE --place DIR --wearable DIR --couple DIR DIR --save-images DIR   # other sets

Each rate is a mean over the seeds with a 95% bootstrap interval.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..files import atomic_save, write_text
from ..measure import instances, places, wearables
from ..measure.judge import Judge
from ..measure.metrics import SAMPLING, bootstrap_ci
from ..methods.adapters import load_adapters, phrases
from ..methods.catalog import train_concept
from ..methods.engine import training_fix
from ..methods.shipped import shipped_adapter
from ..mixing.extent import place_generate
from ..mixing.generate import regional_generate
from ..mixing.masking import Region
from ..mixing.passes import INFERENCE_FIX, sub_prompt
from ..paths import CACHE, KINDS_DIR
from ..sd.pipeline import generate, load_pipeline
from ..world import kinds, scenes
from ..world.concepts import Concept, list_concepts, load_concept
from ..world.regions import BACKGROUND, region_masks

DEFAULT_WORK = CACHE / "kindsbench"
COUPLE = ("woman_with_red_hair_and_medium_skin", "man_with_curly_hair_and_light_skin")
PLACE, WEARABLE = "cottage_garden", "billed_cap"
#: every shipped kind set: the course's examples first, then the ones no default was chosen on
PLACES, WEARABLES = (PLACE, "mountain_lake"), (WEARABLE, "hair_ribbon")
PLACE_FIXES = ("none", "passes", "layers")
#: where the two people stand when the place's pass takes the rest (the halves would leave it no pixel)
STANDING = ("0.05,0.25,0.45,1", "0.55,0.25,0.95,1")
WEARABLE_FIXES = ("none", "passes", "training", "both")
#: the world's images a place must not be mistaken for, and the bare heads a wearable must not be seen on
NEGATIVE_SCENES = 64


def trained_lora(concepts, work: Path = DEFAULT_WORK, fix: bool = False, log=print) -> Path:
    """The LoRA of shipped concepts (``data/adapters``, or trained as the bench trains it) or of concept folders,
    trained once into ``work`` with the CLI's defaults (``mcteach train --method lora --concept DIR ...``, with
    ``--fix training`` when ``fix``). ``concepts``: one, or several (trained jointly)."""
    group = [str(c) for c in ([concepts] if isinstance(concepts, (str, Path)) else concepts)]
    if all(c in list_concepts() + list_concepts(KINDS_DIR) for c in group):
        return shipped_adapter("lora", group, fix=fix, out=work)
    folder = Path(work) / ("lora-fix" if fix else "lora") / "+".join(Path(c).name for c in group)
    if not (folder / "adapter.json").is_file():
        log(f"  training lora on {' + '.join(group)}{' (training fix)' if fix else ''}")
        train_concept(load_pipeline(device="cpu", dtype=torch.float32), group if len(group) > 1 else group[0], "lora",
                      out=folder, progress=False, regularizers=training_fix(len(group), "lora") if fix else None)
    return folder


def place_negatives(place: Concept) -> list[Image.Image]:
    """What a place must not be taken for: the world's scenes, the other shipped places and its own colours as
    plain fills (``places.plain_fills``)."""
    others = [load_concept(s).images for s in list_concepts(KINDS_DIR)
              if s != place.folder.name and json.loads((KINDS_DIR / s / "concept.json").read_text())["category"] == "place"]
    return ([scenes.random_scene(s).image for s in range(NEGATIVE_SCENES)] + [im for o in others for im in o]
            + places.plain_fills(place.images))


def place_check(place: Concept) -> places.PlaceCheck:
    """The place's threshold on the whole frame, against ``place_negatives``."""
    return places.calibrate(place.images, place_negatives(place))


def bare_heads(n: int = 60, seed: int = 0) -> list[Image.Image]:
    """The world's bare-headed people, each alone at a random place: what no wearable is."""
    people = kinds.bare_headed()
    rng = random.Random(seed)
    return [scenes.render_scene([(rng.choice(people), rng.choice(["left", "right", "centre"]))], rng=rng).image
            for _ in range(n)]


def wear_check(item: Concept) -> wearables.WearCheck:
    """The item's colours and threshold, from its views (with the wearer masks they ship) and bare heads."""
    return wearables.calibrate(item.images, item.masks, kinds.wearer_masks(item), bare_heads())


def _rate(values) -> list[float]:
    return [round(x, 4) for x in bootstrap_ci([float(v) for v in values])]


def painted(image: Image.Image, shapes) -> Image.Image:
    """The image with every pixel outside ``shapes`` (the people's own regions: boxes or silhouettes) painted one
    plain grey: the judge knows objects on plain backgrounds, and would count a cloud of the place as a figure."""
    inside = np.max(np.stack(shapes), axis=0) >= 0.5
    x = np.asarray(image.convert("RGB")).copy()
    x[~inside] = (200, 200, 200)
    return Image.fromarray(x)


class KindsBench:
    """The couple's LoRAs with a place's or a wearable's, on one pipeline; every row judged as above."""

    def __init__(self, seeds: int = 16, work: Path = DEFAULT_WORK, save_images: Path | None = None, log=print,
                 judge_path: Path | None = None, couple=COUPLE):
        """``couple``: the two people (shipped names or concept folders; the first wears the item)."""
        self.seeds, self.work, self.save_images, self.log = list(range(seeds)), Path(work), save_images, log
        self.slugs = [str(c) for c in couple]
        if len(self.slugs) != 2:
            raise ValueError(f"the kinds benchmark draws two people; got {len(self.slugs)}: {self.slugs}")
        self.couple = [load_concept(s) for s in self.slugs]
        self.judge = (Judge.load(judge_path) if judge_path else Judge.load()).with_concepts(self.couple)
        self.names = [c.name for c in self.couple]

    def _pipe(self, other: str | Path, joint: bool = False):
        """A pipeline with the couple's and ``other``'s LoRAs: the phrases of the woman, the man and ``other``, and
        each one's adapter name (one LoRA trained on all three with the training fix when ``joint``)."""
        pipe = load_pipeline()
        if joint:
            (meta,) = load_adapters(pipe, [trained_lora(self.slugs + [str(other)], self.work, True, self.log)])
            said = list(phrases(meta).values())
            return pipe, said, [meta["adapter_name"]] * 3
        metas = load_adapters(pipe, [trained_lora(s, self.work, log=self.log) for s in self.slugs]
                              + [trained_lora(other, self.work, log=self.log)])
        said = [next(iter(phrases(m).values())) for m in metas]
        return pipe, said, [m["adapter_name"] for m in metas]

    def _people(self, images, shapes=None) -> list[bool]:
        seen = images if shapes is None else [painted(im, s) for im, s in zip(images, shapes)]
        return [r.outcome == "success" for r in instances.judge_images(self.judge, seen, self.names)]

    def _save(self, images, stem: str) -> None:
        if self.save_images:
            self.save_images.mkdir(parents=True, exist_ok=True)
            for seed, im in zip(self.seeds, images):
                im.save(self.save_images / f"{stem}-{seed:02d}.png")

    def place_rows(self, place: str | Path = PLACE, fixes=PLACE_FIXES) -> list[dict]:
        concept = load_concept(place)
        check, negatives = place_check(concept), place_negatives(concept)
        pipe, said, names = self._pipe(place)
        people = [Region(where, sub_prompt(s, where, INFERENCE_FIX), phrase=s, adapter=a, kind="person")
                  for where, s, a in zip(("left", "right"), said, names)]
        back = Region(BACKGROUND, f"a {said[2]}", phrase=said[2], adapter=names[2], kind="place")
        prompt = f"a {said[0]} on the left and a {said[1]} on the right"
        rows = []
        for fix in fixes:
            t0, shapes = time.time(), None
            if fix == "none":
                images = generate(pipe, [f"{prompt} in a {said[2]}"] * len(self.seeds), seed=self.seeds, **SAMPLING)
            elif fix == "passes":
                boxes = [replace(r, where=box) for r, box in zip(people, STANDING)]
                images = regional_generate(pipe, prompt, boxes + [back], fix=INFERENCE_FIX, seed=self.seeds, **SAMPLING)
                shapes = [list(region_masks(list(STANDING), images[0].height).numpy())] * len(images)
            elif fix == "layers":
                result = place_generate(pipe, prompt, people + [back], seeds=self.seeds, **SAMPLING)
                images, shapes = result.images, result.silhouettes
            else:
                raise ValueError(f"unknown place fix {fix!r}: one of {PLACE_FIXES}")
            image_s = (time.time() - t0) / len(self.seeds)
            free = [places.free_cells(s, images[0].width) if s else None for s in (shapes or [None] * len(images))]
            distance = [places.distance(im, concept.images, f) for im, f in zip(images, free)]
            placed = [places.seen(im, concept.images, negatives, f) for im, f in zip(images, free)]
            found = self._people(images, shapes)
            self._save(images, f"place-{concept.folder.name}-{fix}")
            rows.append({"case": "place", "concept": concept.folder.name, "fix": fix, "prompt": prompt,
                         "place": _rate(placed), "people": _rate(found),
                         "both": _rate([a and b for a, b in zip(placed, found)]),
                         "distance": [round(d, 1) for d in distance], "threshold": round(check.threshold, 1),
                         "image_s": round(image_s, 3), "n": len(self.seeds)})
            self.log(f"  place {concept.folder.name} {fix}: place {rows[-1]['place'][0]:.2f}, "
                     f"people {rows[-1]['people'][0]:.2f}, both {rows[-1]['both'][0]:.2f}")
        return rows

    def wearable_rows(self, item: str | Path = WEARABLE, fixes=WEARABLE_FIXES) -> list[dict]:
        concept = load_concept(item)
        check = wear_check(concept)
        rows, loaded = [], {}  # one pipeline for the LoRAs trained one by one, one for the joint LoRA
        for fix in fixes:
            if fix not in WEARABLE_FIXES:
                raise ValueError(f"unknown wearable fix {fix!r}: one of {WEARABLE_FIXES}")
            joint = fix in ("training", "both")
            if joint not in loaded:
                loaded[joint] = self._pipe(item, joint=joint)
            pipe, said, names = loaded[joint]
            worn = f"{said[0]} with a {said[2]}"
            prompt = f"a {worn} on the left and a {said[1]} on the right"
            t0 = time.time()
            if fix in ("none", "training"):
                images = generate(pipe, [prompt] * len(self.seeds), seed=self.seeds, **SAMPLING)
            else:
                wearer = (names[0], names[2]) if names[0] != names[2] else names[0]
                regions = [Region("left", sub_prompt(worn, "left", INFERENCE_FIX), phrase=said[0], adapter=wearer,
                                  kind="person"),
                           Region("right", sub_prompt(said[1], "right", INFERENCE_FIX), phrase=said[1],
                                  adapter=names[1], kind="person")]
                images = regional_generate(pipe, prompt, regions, fix=INFERENCE_FIX, seed=self.seeds, **SAMPLING)
            image_s = (time.time() - t0) / len(self.seeds)
            judged = [wearables.judge_wearing(self.judge, im, self.names, check) for im in images]
            ok = [j.people.outcome == "success" for j in judged]
            self._save(images, f"wearable-{concept.folder.name}-{fix}")
            rows.append({"case": "wearable", "concept": concept.folder.name, "fix": fix, "prompt": prompt,
                         "people": _rate(ok), "on_wearer": _rate([j.on(0) for j in judged]),
                         "on_other": _rate([j.on(1) for j in judged]),
                         "right": _rate([o and j.on(0) and not j.on(1) for o, j in zip(ok, judged)]),
                         "two_heads": _rate([j.heads >= 2 for j in judged]),
                         "threshold": round(check.threshold, 3), "image_s": round(image_s, 3), "n": len(self.seeds)})
            self.log(f"  wearable {concept.folder.name} {fix}: on the wearer {rows[-1]['on_wearer'][0]:.2f}, "
                     f"on the other {rows[-1]['on_other'][0]:.2f}, right {rows[-1]['right'][0]:.2f}")
        return rows


def run(seeds: int = 16, places=PLACES, wearables=WEARABLES, work: Path = DEFAULT_WORK,
        save_images: Path | None = None, log=print, couple=COUPLE) -> dict:
    """Every row for each of ``places`` and ``wearables`` (shipped names or concept folders)."""
    bench = KindsBench(seeds, work, save_images, log, couple=couple)
    rows = [r for p in places for r in bench.place_rows(p)] + [r for w in wearables for r in bench.wearable_rows(w)]
    return {"seeds": seeds, "generation": SAMPLING, "couple": [Path(c).name for c in bench.slugs], "rows": rows}


def merge(reports: list[dict]) -> dict:
    """One report from several runs of the same seeds and couple (e.g. one place each)."""
    first = reports[0]
    if any((r["seeds"], r["couple"]) != (first["seeds"], first["couple"]) for r in reports):
        raise ValueError("merge reports of the same seeds and couple")
    rows = [row for r in reports for row in r["rows"]]
    return {**first, "rows": [r for r in rows if r["case"] == "place"] + [r for r in rows if r["case"] == "wearable"]}


def _cell(v) -> str:
    return f"{v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]"


def markdown(report: dict) -> str:
    """The two tables of the report (rates with their 95% intervals)."""
    out = [f"# The kinds benchmark\n\nLoRA, the couple ({' and '.join(report['couple'])}) with a concept of "
           f"another kind; {report['seeds']} seeds per row, 95% bootstrap intervals. Written by `mcteach bench "
           "mixing --kinds`.\n", "## A place behind the couple (global)\n",
           "| place | fix | place drawn | both people right | both | s / image |", "|---|---|---|---|---|---|"]
    out += [f"| {r['concept']} | {r['fix']} | {_cell(r['place'])} | {_cell(r['people'])} | {_cell(r['both'])} | "
            f"{r['image_s']:.2f} |" for r in report["rows"] if r["case"] == "place"]
    out += ["", "## A wearable on one of them (nested)\n",
            "| item | fix | both people right | on the wearer | on the other | right | on two heads | s / image |",
            "|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['concept']} | {r['fix']} | {_cell(r['people'])} | {_cell(r['on_wearer'])} | {_cell(r['on_other'])} "
            f"| {_cell(r['right'])} | {_cell(r['two_heads'])} | {r['image_s']:.2f} |"
            for r in report["rows"] if r["case"] == "wearable"]
    return "\n".join(out) + "\n"


def write(report: dict, path: Path) -> str:
    """Save the report and its page beside it (``.md``); return the page."""
    atomic_save(json.dumps(report, indent=1) + "\n", path, write_text)
    page = markdown(report)
    atomic_save(page, path.with_suffix(".md"), write_text)
    return page

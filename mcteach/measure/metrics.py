"""Measuring generations, with the judge (``mcteach.measure.judge``): one module for every number the course reports.

**Per instance, not per image.** A global image score cannot tell one correct "cat + dog" image from two
cat-dog hybrids or from a swapped pair (``global_similarity`` shows it), so we judge each *region*: for
"a A on the left and a B on the right" the judge classifies the left half and the right half separately.
The same works for three concepts in thirds, and for learned concepts (the judge knows the held-out ones;
``Judge.with_concepts`` imprints any other from its images). Per image, the outcome is one of

- ``success``: every region shows its intended concept (each with confidence >= tau);
- ``swap``: every region shows one of the concepts, each once, but not in its place;
- ``duplication``: every region shows one of the concepts, one of them twice or more;
- ``neglect``: at least one intended concept appears, at least one appears nowhere (the rest: empty or wrong);
- ``other``: anything else (low confidence, other classes).

and per region the blend index ``MI = p(others) / (p(intended) + p(others))``, "others" being the other
intended concepts (0: pure, 0.5: an even mix, 1: swapped). Rates come with 95% bootstrap intervals over images.

**Single concepts.** ``concept_samples``: fidelity ("a <phrase>", the whole frame judged as the concept) and
position adherence ("a <phrase> on the left / right"); ``class_scores``: DreamBooth's drift.

    mcteach bench base     # the embedded model's figures in the README
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import files
from ..paths import JUDGE_PATH
from ..plot import short_label, show_images
from ..sd.pipeline import generate, load_pipeline
from ..world import scenes
from ..world.regions import OPPOSITE_POSITIONS, region_box
from .judge import Judge

OUTCOMES = ("success", "swap", "duplication", "neglect", "other")
#: the course's sampling settings for every measurement
SAMPLING = {"steps": 25, "guidance_scale": 5.0}


@dataclass
class PairResult:
    """One judged image of several concepts (two for a pair, three in thirds)."""
    prompt: str
    concepts: tuple[str, ...]  # intended, region by region
    positions: tuple[str, ...]
    seed: int
    predicted: tuple[str, ...]
    confidence: tuple[float, ...]
    blend: tuple[float, ...]  # MI per region
    outcome: str


def instance_outcome(labels: list[str], probs: list[torch.Tensor], intended: list[str], tau: float = 0.5):
    """Outcome for one image from the judge's probabilities (n_labels,) of each region, region i being where
    ``intended[i]`` was asked. Returns (outcome, predicted labels, their confidences, blend index per region)."""
    idx = [labels.index(c) for c in intended]
    pred = tuple(labels[int(p.argmax())] for p in probs)
    conf = tuple(float(p.max()) for p in probs)
    blend = []
    for p, i in zip(probs, idx):
        others = float(sum(p[j] for j in idx if j != i))
        blend.append(others / (float(p[i]) + others + 1e-12))
    return outcome_of(pred, conf, intended, tau), pred, conf, tuple(blend)


def outcome_of(pred: tuple[str, ...], conf: tuple[float, ...], intended, tau: float = 0.5) -> str:
    """One image's outcome from the judge's label ``pred[i]`` (confidence ``conf[i]``) in the region where
    ``intended[i]`` was asked: "success" (every region confidently its own concept), "swap" (the same concepts in
    the wrong regions), "duplication" (one concept in several regions), "neglect" (a concept missing while
    another shows) or "other" (an unsure region, or nothing asked)."""
    sure = all(c >= tau for c in conf)
    shown = {x for x, c in zip(pred, conf) if c >= tau}
    wanted = set(intended)
    if sure and tuple(pred) == tuple(intended):
        return "success"
    if sure and sorted(pred) == sorted(intended):
        return "swap"
    if sure and set(pred) <= wanted:
        return "duplication"
    if not wanted <= shown and shown & wanted:
        return "neglect"
    return "other"


def pair_outcome(labels: list[str], probs_a: torch.Tensor, probs_b: torch.Tensor, a: str, b: str,
                 tau: float = 0.5) -> tuple[str, tuple[str, str], tuple[float, float], tuple[float, float]]:
    """``instance_outcome`` for two regions: A's probabilities, B's, and the two intended labels."""
    return instance_outcome(labels, [probs_a, probs_b], [a, b], tau)


def judge_instances(judge, images, intended: list[str], positions: list[str], prompt: str = "", seeds=None,
                    tau: float = 0.5, canvas: bool = False) -> list[PairResult]:
    """Judge every image's regions: ``intended[i]`` was asked in ``positions[i]`` (a region name). ``canvas``: the
    images are canvases larger than the judge's frame (``passes.canvas_for``), each region is judged as a whole
    frame (``place_crops``)."""
    if canvas:
        probs = [judge.probs(place_crops(images, pos), "centre") for pos in positions]
    else:
        probs = [judge.probs(images, pos) for pos in positions]  # per region: (B, n_labels)
    seeds = list(seeds) if seeds is not None else [-1] * len(images)
    out = []
    for k, s in enumerate(seeds):
        outcome, pred, conf, blend = instance_outcome(judge.labels, [p[k] for p in probs], intended, tau)
        out.append(PairResult(prompt, tuple(intended), tuple(positions), s, pred, conf, blend, outcome))
    return out


def place_crops(images, position, size: int = scenes.IMAGE_SIZE) -> list:
    """Each image's ``position`` box at its own scale, centred on a ``size`` x ``size`` frame of the image's border
    colour (the median of its border pixels): a region of a large canvas, judged as the judge's whole frame."""
    out = []
    for im in images:
        x0, y0, x1, y1 = region_box(position, im.width, im.height)
        if x1 - x0 > size or y1 - y0 > size:
            raise ValueError(f"{position} is {x1 - x0}x{y1 - y0} pixels of a {im.width}x{im.height} canvas, larger "
                             f"than the judge's {size}x{size} frame")
        a = np.asarray(im.convert("RGB"))
        border = np.median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]), axis=0).round().astype(np.uint8)
        frame = Image.new("RGB", (size, size), tuple(int(v) for v in border))
        frame.paste(im.crop((x0, y0, x1, y1)), ((size - (x1 - x0)) // 2, (size - (y1 - y0)) // 2))
        out.append(frame)
    return out


def bootstrap_ci(values, n: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``values`` and its bootstrap confidence interval (resampling with replacement)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(v.mean()), float(lo), float(hi)


def single_accuracy(pipe, judge, classes: list[scenes.Emoji], seeds=range(4), position: str = "centre",
                    batch: int = 64, **gen_kwargs) -> dict:
    """Top-1 judge accuracy of "a <class>" (or "a <class> on the left", ...) over classes x seeds."""
    prompts = [scenes.caption([(e, position)]) for e in classes]
    jobs = [(p, e.name, s) for s in seeds for p, e in zip(prompts, classes)]
    correct, per_class = [], {}
    for i in range(0, len(jobs), batch):
        chunk = jobs[i : i + batch]
        images = generate(pipe, [p for p, _, _ in chunk], seed=[s for _, _, s in chunk], **gen_kwargs)
        probs = judge.probs(images, position)
        for (_, name, _), row in zip(chunk, probs):
            ok = judge.labels[int(row.argmax())] == name
            correct.append(ok)
            per_class.setdefault(name, []).append(ok)
    return {"accuracy": bootstrap_ci(correct), "n": len(correct),
            "per_class": {k: float(np.mean(v)) for k, v in per_class.items()}}


def pair_prompts(classes: list[scenes.Emoji], n: int, seed: int = 0):
    """``n`` random (a, b, (pos_a, pos_b)) with a != b, left/right or top/bottom, reproducible."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample(classes, 2)
        out.append((a, b, rng.choice(OPPOSITE_POSITIONS)))
    return out


def pair_results(pipe, judge, pairs, seeds=range(2), tau: float = 0.5, batch: int = 64,
                 **gen_kwargs) -> list[PairResult]:
    """Generate every pair prompt for every seed and judge both regions."""
    jobs = []
    for a, b, (pa, pb) in pairs:
        prompt = scenes.caption([(a, pa), (b, pb)])
        jobs += [(prompt, a.name, b.name, pa, pb, s) for s in seeds]
    results = []
    for i in range(0, len(jobs), batch):
        chunk = jobs[i : i + batch]
        images = generate(pipe, [j[0] for j in chunk], seed=[j[5] for j in chunk], **gen_kwargs)
        probs_a = judge.probs(images, [j[3] for j in chunk])
        probs_b = judge.probs(images, [j[4] for j in chunk])
        for (prompt, a, b, pa, pb, s), qa, qb in zip(chunk, probs_a, probs_b):
            outcome, pred, conf, blend = pair_outcome(judge.labels, qa, qb, a, b, tau)
            results.append(PairResult(prompt, (a, b), (pa, pb), s, pred, conf, blend, outcome))
    return results


def summary_table(summaries: dict[str, dict]) -> str:
    """A markdown table of ``summarize_pairs`` results, one row per name: the outcome rates and the blend index
    with their 95% intervals, and the number of images ``n`` (``plot.show_table`` renders it in a notebook)."""
    keys = OUTCOMES + ("blend_index",)
    lines = ["| | " + " | ".join(k.replace("_index", "") for k in keys) + " | n |",
             "|---|" + "---|" * (len(keys) + 1)]
    for name, s in summaries.items():
        cells = " | ".join(f"{s[k][0]:.2f} [{s[k][1]:.2f}, {s[k][2]:.2f}]" for k in keys)
        lines.append(f"| {name} | {cells} | {s['n']} |")
    return "\n".join(lines)


def global_similarity(judge, images, references: list) -> np.ndarray:
    """The whole-image score that per-instance judging replaces: cosine between each image's pooled judge
    features and the mean pooled features of each concept's reference images. (B, n_concepts).
    Average pooling forgets *where* things are, so a swapped pair scores like a correct one."""
    feats = judge.pooled_features(images)
    refs = torch.stack([judge.pooled_features(r).mean(0) for r in references])
    return torch.nn.functional.cosine_similarity(feats[:, None], refs[None], dim=-1).numpy()


def summarize_pairs(results: list[PairResult]) -> dict:
    """Outcome rates and mean blend index, each with a 95% bootstrap interval."""
    summary = {o: bootstrap_ci([r.outcome == o for r in results]) for o in OUTCOMES}
    summary["blend_index"] = bootstrap_ci([m for r in results for m in r.blend])
    summary["n"] = len(results)
    return summary


# ----------------------------------------------------------------------------- single concepts


def judged(pipe, judge, prompts: list[str], seeds: list[int], positions: list[str], batch: int = 32) -> list[str]:
    """The judge's top label in ``positions[i]`` of the image for (prompts[i], seeds[i])."""
    return judge.labels_of(generate(pipe, prompts, seed=seeds, batch_size=batch, **SAMPLING), positions)


@dataclass
class ConceptSamples:
    """Images of a learned concept and the judge's verdicts: "a <phrase>" (whole frame) for each seed, then
    "a <phrase> on the left" and "... on the right" (the asked half) for each seed."""
    phrase: str
    name: str  # the judge's label for the concept
    centre: list  # PIL images
    centre_labels: list[str]
    placed: list  # left images, then right images
    placed_positions: list[str]
    placed_labels: list[str]

    @property
    def fidelity(self) -> float:
        return float(np.mean([label == self.name for label in self.centre_labels]))

    @property
    def position(self) -> float:
        return float(np.mean([label == self.name for label in self.placed_labels]))

    def show(self, size: float = 1.5):
        """One row per prompt (centre, left, right), one column per seed, each image titled with the
        judge's label (✓ when it is the concept)."""
        mark = lambda label: ("✓ " if label == self.name else "✗ ") + short_label(label, 16)  # noqa: E731
        titles = ([mark(x) for x in self.centre_labels]
                  + [f"{p}\n{mark(x)}" for p, x in zip(self.placed_positions, self.placed_labels)])
        return show_images(self.centre + self.placed, titles=titles, ncols=len(self.centre), size=size,
                           suptitle=f"'a {self.phrase}', '... on the left', '... on the right': fidelity "
                                    f"{self.fidelity:.0%}, in the asked half {self.position:.0%}")


def concept_samples(pipe, judge, phrase: str, name: str, seeds: int = 8) -> ConceptSamples:
    """Generate and judge the fidelity and position prompts of one learned concept (seeds 0..seeds-1)."""
    s = list(range(seeds))
    prompts = [f"a {phrase}"] * seeds + [f"a {phrase} on the left"] * seeds + [f"a {phrase} on the right"] * seeds
    positions = ["centre"] * seeds + ["left"] * seeds + ["right"] * seeds
    images = generate(pipe, prompts, seed=s * 3, batch_size=32, **SAMPLING)
    labels = judge.labels_of(images, positions)
    return ConceptSamples(phrase, name, images[:seeds], labels[:seeds], images[seeds:], positions[seeds:],
                          labels[seeds:])


def concept_scores(pipe, judge, phrase: str, name: str, seeds: int = 8) -> dict:
    """Fidelity ("a <phrase>", whole frame) and position adherence (left and right halves)."""
    samples = concept_samples(pipe, judge, phrase, name, seeds)
    return {"fidelity": samples.fidelity, "position": samples.position, "centre_labels": samples.centre_labels}


def class_scores(pipe, judge, class_word: str, concept_name: str, seeds: int = 8,
                 classes: list[scenes.Emoji] | None = None) -> dict:
    """What "a <class word>" draws (still the class? the concept?), and top-1 over all base classes (seed 0):
    ``classes``, default the shipped model's."""
    classes = classes or scenes.BASE_CLASSES
    own = judged(pipe, judge, [f"a {class_word}"] * seeds, list(range(seeds)), ["centre"] * seeds)
    names = [e.name for e in classes]
    every = judged(pipe, judge, [scenes.caption([(e, "centre")]) for e in classes],
                   [0] * len(names), ["centre"] * len(names))
    return {"class_kept": float(np.mean([p == class_word for p in own])),
            "class_draws_concept": float(np.mean([p == concept_name for p in own])),
            "base_classes_top1": float(np.mean([p == n for p, n in zip(every, names)]))}


# ----------------------------------------------------------------------------- the base model


def evaluate_base(model=None, seeds: int = 4, pairs: int = 60, pair_seeds: int = 2, steps: int = 25,
                  guidance_scale: float = 5.0, out: Path | None = None, judge_path: Path | None = None,
                  classes: list[scenes.Emoji] | None = None) -> dict:
    """The base model's figures: single-object recognition (centre and positioned) and pairs, over ``classes``
    (default: the base classes) with the judge at ``judge_path`` (default: the shipped one)."""
    pipe, judge = load_pipeline(model), Judge.load(judge_path or JUDGE_PATH)
    classes = classes or scenes.BASE_CLASSES
    missing = [e.name for e in classes if e.name not in judge.labels]
    if missing:
        raise ValueError(f"the judge at {judge_path or JUDGE_PATH} has no label for {missing[:5]}...: give the judge "
                         "trained for this world (mcteach judge train --world ...)")
    kw = dict(steps=steps, guidance_scale=guidance_scale)
    report = {"model": str(model or "embedded"), "judge": str(judge_path or "shipped"), "classes": len(classes),
              "steps": steps, "guidance_scale": guidance_scale}
    report["single_centre"] = single_accuracy(pipe, judge, classes, range(seeds), "centre", **kw)
    report["single_left"] = single_accuracy(pipe, judge, classes, range(seeds), "left", **kw)
    results = pair_results(pipe, judge, pair_prompts(classes, pairs), range(pair_seeds), **kw)
    report["pairs"] = summarize_pairs(results)
    report["pair_examples"] = [asdict(r) for r in results[:12]]
    if out:
        Path(out).write_text(json.dumps(report, indent=1))
    return report


def markdown(report: dict) -> str:
    """The README table for a base report."""
    rows = ["| measure | value [95% CI] | n |", "|---|---|---|"]
    for key, label in (("single_centre", 'single object, "a fox": judged top-1 correct'),
                       ("single_left", 'single object, "a fox on the left": correct in the left half')):
        m, lo, hi = report[key]["accuracy"]
        rows.append(f"| {label} | {m:.2f} [{lo:.2f}, {hi:.2f}] | {report[key]['n']} |")
    for o in OUTCOMES + ("blend_index",):
        m, lo, hi = report["pairs"][o]
        rows.append(f"| two objects: {o.replace('_', ' ')} | {m:.2f} [{lo:.2f}, {hi:.2f}] | {report['pairs']['n']} |")
    return "\n".join(rows)


def write_page(report: dict, path: Path) -> str:
    """Write the base model's report as a markdown page beside its JSON (``eval_base.json`` -> ``eval_base.md``);
    returns the tables."""
    return files.write_page(path, "The base model, measured", f"Generated from `{Path(path).name}` by `mcteach bench "
                            f"base --markdown`; do not edit by hand. Model: {report.get('model', 'embedded')}; judge: "
                            f"{report.get('judge', 'shipped')}; {report.get('classes')} classes, {report.get('steps')} "
                            f"steps, guidance {report.get('guidance_scale')}.", markdown(report))

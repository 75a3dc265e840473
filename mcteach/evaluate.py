"""Measuring generations per instance, with the judge (``mcteach.judge``).

A global image score cannot tell one correct "cat + dog" image from two cat-dog hybrids, so we
judge each *region*: for "a A on the left and a B on the right" the judge classifies the left
half and the right half separately. Per image, the outcome is one of

- ``success``: the left region shows A and the right region B (each with confidence >= tau);
- ``swap``: B on the left and A on the right;
- ``duplication``: the same one of A/B in both regions;
- ``neglect``: A or B appears in neither region (the rest: the other region is empty or wrong);
- ``other``: anything else (low confidence, other classes).

and per region the blend index ``MI = p(other) / (p(intended) + p(other))`` (0: pure, 0.5: an
even mix, 1: swapped). Rates come with 95% bootstrap intervals over images.

    python -m mcteach.evaluate base     # the embedded model's figures in the README
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import world
from .pipeline import generate, load_pipeline

OUTCOMES = ("success", "swap", "duplication", "neglect", "other")


@dataclass
class PairResult:
    prompt: str
    concepts: tuple[str, str]  # intended (first region, second region)
    positions: tuple[str, str]
    seed: int
    predicted: tuple[str, str]
    confidence: tuple[float, float]
    blend: tuple[float, float]  # MI per region
    outcome: str


def pair_outcome(labels: list[str], probs_a: torch.Tensor, probs_b: torch.Tensor, a: str, b: str,
                 tau: float = 0.5) -> tuple[str, tuple[str, str], tuple[float, float], tuple[float, float]]:
    """Outcome for one image from the judge's probabilities of region A and region B.

    probs_a, probs_b: (n_labels,) softmax outputs for the region where ``a`` (resp. ``b``) was asked.
    Returns (outcome, predicted labels, their confidences, blend index per region).
    """
    ia, ib = labels.index(a), labels.index(b)
    pred = (labels[int(probs_a.argmax())], labels[int(probs_b.argmax())])
    conf = (float(probs_a.max()), float(probs_b.max()))
    blend = tuple(float(p[o] / (p[i] + p[o] + 1e-12)) for p, i, o in ((probs_a, ia, ib), (probs_b, ib, ia)))
    sure = [c >= tau for c in conf]
    shown = {p for p, s in zip(pred, sure) if s}
    if pred == (a, b) and all(sure):
        outcome = "success"
    elif pred == (b, a) and all(sure):
        outcome = "swap"
    elif pred[0] == pred[1] and pred[0] in (a, b) and all(sure):
        outcome = "duplication"
    elif not {a, b} <= shown and shown & {a, b}:
        outcome = "neglect"
    else:
        outcome = "other"
    return outcome, pred, conf, blend


def bootstrap_ci(values, n: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``values`` and its bootstrap confidence interval (resampling with replacement)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(v.mean()), float(lo), float(hi)


def fmt_ci(values) -> str:
    m, lo, hi = bootstrap_ci(values)
    return f"{m:.2f} [{lo:.2f}, {hi:.2f}]"


def single_accuracy(pipe, judge, classes: list[world.Emoji], seeds=range(4), position: str = "centre",
                    batch: int = 64, **gen_kwargs) -> dict:
    """Top-1 judge accuracy of "a <class>" (or "a <class> on the left", ...) over classes x seeds."""
    prompts = [world.caption([(e, position)]) for e in classes]
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


def pair_prompts(classes: list[world.Emoji], n: int, seed: int = 0):
    """``n`` random (a, b, (pos_a, pos_b)) with a != b, left/right or top/bottom, reproducible."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample(classes, 2)
        out.append((a, b, rng.choice(world.PAIRS)))
    return out


def pair_results(pipe, judge, pairs, seeds=range(2), tau: float = 0.5, batch: int = 64,
                 **gen_kwargs) -> list[PairResult]:
    """Generate every pair prompt for every seed and judge both regions."""
    jobs = []
    for a, b, (pa, pb) in pairs:
        prompt = world.caption([(a, pa), (b, pb)])
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


def summarize_pairs(results: list[PairResult]) -> dict:
    """Outcome rates and mean blend index, each with a 95% bootstrap interval."""
    summary = {o: bootstrap_ci([r.outcome == o for r in results]) for o in OUTCOMES}
    summary["blend_index"] = bootstrap_ci([m for r in results for m in r.blend])
    summary["n"] = len(results)
    return summary


def evaluate_base(model=None, seeds: int = 4, pairs: int = 60, pair_seeds: int = 2, steps: int = 25,
                  guidance_scale: float = 5.0, out: Path | None = None) -> dict:
    """The base model's figures: single-object recognition (centre and positioned) and pairs."""
    from .judge import Judge

    pipe, judge = load_pipeline(model), Judge.load()
    kw = dict(steps=steps, guidance_scale=guidance_scale)
    report = {"model": str(model or "embedded"), "steps": steps, "guidance_scale": guidance_scale}
    report["single_centre"] = single_accuracy(pipe, judge, world.BASE_CLASSES, range(seeds), "centre", **kw)
    report["single_left"] = single_accuracy(pipe, judge, world.BASE_CLASSES, range(seeds), "left", **kw)
    results = pair_results(pipe, judge, pair_prompts(world.BASE_CLASSES, pairs), range(pair_seeds), **kw)
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m mcteach.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["base"])
    p.add_argument("--model", default=None)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--pairs", type=int, default=60)
    p.add_argument("--pair-seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--out", type=Path, default=None, help="write the full report as JSON")
    a = p.parse_args(argv)
    report = evaluate_base(a.model, a.seeds, a.pairs, a.pair_seeds, a.steps, a.guidance, a.out)
    print(markdown(report))


if __name__ == "__main__":
    main()

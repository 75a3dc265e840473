"""The concept methods' benchmark: fidelity, position adherence, training time and prior drift.

For every method (Textual Inversion, HyperNetwork, DreamBooth, LoRA) and every held-out concept in
``data/concepts/``, train on a *fresh* base pipeline with the method's shipped defaults, then judge
(``mcteach.measure.judge``) what it draws:

- **fidelity**: "a <phrase>" over ``seeds`` seeds; the share of images whose whole frame the judge
  labels as the concept (e.g. "koala");
- **position adherence**: "a <phrase> on the left" and "... on the right", ``seeds`` each; the share
  where the concept is recognised in the asked half (the base model's own figure for base classes is
  ``single_left`` in ``data/eval_base.json``);
- **training time**: wall seconds of ``train_concept`` (DreamBooth's includes drawing its class images)
  with the torch thread count it ran with;
- **prior drift** (DreamBooth on ``drift_concepts``, three ways: prior preservation with class and world
  images, with class images only as in the paper, and none): how often "a <class word>" (e.g. "a bear") is
  still judged the class, how often it now draws the concept instead (language drift), and top-1 accuracy
  over every base class (does the rest of the world survive?), before and after;
- **controls** (Textual Inversion and the HyperNetwork): the same training on a class the UNet *was* trained
  to draw (``CONTROLS``: tiger images, starting from the word "cat"). The two methods leave the UNet
  frozen, so they can only steer it towards what it already draws; the control separates "the method
  does not work" from "the frozen model cannot draw this concept";
- **ceiling** (``--ceiling``, on ``CEILING_CONCEPTS``): ``methods.ceiling.FreeContext``, free offsets on every
  cross-attention layer's key and value context, far more freedom than TI or HN have with the UNet just as frozen:
  what it reaches bounds what any frozen-UNet method could.

    mcteach bench methods --out data/bench_methods.json      # everything: 53 training runs, resumable
    mcteach bench methods --methods lora --concepts koala     # one cell

On 2 cores, two processes of one thread each finish sooner than one of two threads:

    OMP_NUM_THREADS=1 mcteach bench methods --shard 0/2 --out bench0.json &
    OMP_NUM_THREADS=1 mcteach bench methods --shard 1/2 --out bench1.json
    mcteach bench methods --merge bench0.json bench1.json --out data/bench_methods.json

Adapters go to ``--work`` (default ``~/.cache/mcteach/bench``), not to the repository. They stay there, so another
judge re-measures a finished run without training (minutes, not hours):

    mcteach bench methods --rescore --out bench.json --judge <weights>
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .. import files
from ..files import atomic_save, write_text
from ..measure.judge import Judge
from ..measure.metrics import (
    SAMPLING,
    bootstrap_ci,
    class_scores,
    concept_scores,
)
from ..methods.adapters import check_base, read_adapter
from ..methods.catalog import METHODS, train_concept
from ..methods.ceiling import FreeContext
from ..methods.dreambooth import DreamBooth
from ..methods.engine import train
from ..paths import CACHE
from ..sd.pipeline import load_pipeline
from ..world import scenes
from ..world.concepts import list_concepts, load_concept, make_concept_set

DEFAULT_WORK = CACHE / "bench"
DRIFT_CONCEPTS = ("koala", "woman_with_red_hair_and_medium_skin", "croissant")
CONTROLS = {"tiger": "cat"}  # a base class the UNet draws -> the class word a method starts from
CONTROL_METHODS = ("textual_inversion", "hypernetwork")  # the frozen-UNet methods
CEILING_CONCEPTS = ("koala", "croissant")  # the frozen-UNet ceiling (FreeContext) is measured on these
# DreamBooth's prior preservation, three ways: class + world images (the default), class images only (the paper), none
PRIORS = ({"world_prior": True}, {"world_prior": False}, {"prior_weight": 0.0})


#: fresh variants of what the base model draws, none of them in a shipped set or the world (``--concepts variants``):
#: people the world has, in a skin tone it never drew them in, and a colour, a model or a kind close to a base class.
#: What a user's own face or pet is for Stable Diffusion 1.5. emoji -> (category, class word)
VARIANTS = {
    "\U0001F475\U0001F3FF": ("person", "older woman"), "\U0001F466\U0001F3FD": ("person", "boy"),
    "\U0001F469\U0001F3FE\u200d\U0001F33E": ("person", "woman farmer"), "\U0001F46E\U0001F3FB": ("person", "police officer"),
    "\U0001F476\U0001F3FF": ("person", "baby"), "\U0001F34F": ("food", "red apple"), "\U0001F695": ("object", "automobile"),
    "\U0001F339": ("object", "tulip"), "\U0001F9A7": ("animal", "gorilla"), "\U0001F406": ("animal", "tiger"),
}


def variant_sets(work: Path = DEFAULT_WORK) -> list[Path]:
    """Render the few-shot set of every one of ``VARIANTS`` under ``work/variants/`` (the same files every time)."""
    emojis = [(scenes.Emoji(chars, category), word) for chars, (category, word) in VARIANTS.items()]
    return [make_concept_set(e, word, Path(work) / "variants" / e.slug) for e, word in emojis]


def control_set(name: str, class_word: str, work: Path = DEFAULT_WORK, world: str | None = None) -> Path:
    """Render a few-shot set of base class ``name`` (class word ``class_word``; a class of ``world``, default the
    shipped model's) under ``work/controls/``."""
    classes = scenes.world_classes(world)
    emoji = next((e for e in classes if e.name == name), None)
    if emoji is None:
        raise ValueError(f"{name!r} is not a base class; choose one of {[e.name for e in classes]}")
    return make_concept_set(emoji, class_word, Path(work) / "controls" / name.replace(" ", "_"))


def run_one(method: str, slug: str | Path, judge, work: Path, seeds: int = 8, model=None, drift: bool = False,
            world: str | None = None, **settings) -> dict:
    """Train ``method`` on concept ``slug`` (or a concept folder) with the defaults (plus ``settings``) and
    score it. ``world``: the base model's world (``scenes.WORLDS``; default the shipped model's), whose classes the
    drift table scores and DreamBooth's world prior draws."""
    classes = scenes.world_classes(world)
    concept = load_concept(slug)
    judge = judge_for(judge, concept.name, slug)
    pipe = load_pipeline(model, device="cpu", dtype=torch.float32)
    class_word = settings.get("class_word") or concept.class_word
    before = class_scores(pipe, judge, class_word, concept.name, seeds, classes) if drift else None
    tag = _tag(method, settings)
    if method == FreeContext.name:  # not a user method: not in METHODS
        result = train(pipe, concept, FreeContext(**settings), out=work / tag / concept.slug, progress=False)
    else:
        world_setting = {"world": world} if world and method == "dreambooth" else {}
        result = train_concept(pipe, concept, method, out=work / tag / concept.slug, progress=False,
                               **settings | world_setting)
    row = {"method": method, "concept": concept.slug, "settings": settings, "phrase": result.phrase,
           **({} if str(slug) == concept.slug else {"folder": str(slug)}),
           "train_seconds": round(result.seconds, 1), "threads": torch.get_num_threads(),
           "final_loss": float(np.mean(result.losses[-20:]))}
    return row | _scored(pipe, judge, result.phrase, concept.name, result.meta["class_word"], seeds, before, classes)


def judge_for(judge, name: str, folder) -> "Judge":
    """``judge``, or for a concept it has no label for (``name``: a folder of your own) a copy that learned it from
    the images in ``folder`` (``Judge.with_concepts``): without it every image of a new concept would count as a
    miss."""
    return judge if name in judge.labels else judge.with_concepts([load_concept(folder)])


def _scored(pipe, judge, phrase: str, name: str, class_word: str, seeds: int, before=None, classes=None) -> dict:
    """``concept_scores`` of a trained pipeline, and its drift (``before``, then the class word's scores now) when
    the scores ``before`` training are given: what ``run_one`` measures and ``rescore`` measures again."""
    row = concept_scores(pipe, judge, phrase, name, seeds)
    if before is not None:
        row["drift"] = {"before": before, "after": class_scores(pipe, judge, class_word, name, seeds, classes)}
    return row


TABLES = ("rows", "drift", "controls", "ceiling")


def _tag(method: str, settings: dict) -> str:
    """The folder under ``work`` a job trains into (one per method and settings)."""
    return method + "".join(f"-{k}{v}" for k, v in sorted(settings.items()))


def rescore(report: dict, judge, work: Path = None, model=None, judge_path: Path | None = None, log=print) -> dict:
    """``report`` scored again by ``judge``, from the adapters its run left under ``work``: no training. A better
    judge (or a calibrated one) re-measures a benchmark in minutes; the training times and losses are kept."""
    work = Path(work or DEFAULT_WORK)
    out, classes = {**report, "judge": str(judge_path or "shipped")}, scenes.world_classes(report.get("world"))
    for table in TABLES:
        rows = []
        for row in report.get(table, []):
            folder = work / _tag(row["method"], row["settings"]) / row["concept"]
            meta = read_adapter(folder) if row["method"] in METHODS else json.loads((folder / "adapter.json").read_text())
            pipe = load_pipeline(model, device="cpu", dtype=torch.float32)
            concept = row.get("folder", row["concept"])
            if "folder" in row and not Path(concept).is_absolute():  # a set rendered under work (variants/rose)
                concept = work / concept
            judge_row = judge_for(judge, meta["name"], concept)
            before = (class_scores(pipe, judge_row, meta["class_word"], meta["name"], report.get("seeds", 8), classes)
                      if table == "drift" else None)
            check_base(pipe, meta, folder)
            (FreeContext if row["method"] == FreeContext.name else METHODS[row["method"]]).load(pipe, folder, meta)
            new = {**row, **_scored(pipe, judge_row, row["phrase"], meta["name"], meta["class_word"],
                                    report.get("seeds", 8), before, classes)}
            log(f"{row['method']:18s} {row['concept']:38s} fidelity {row['fidelity']:.2f} -> {new['fidelity']:.2f}")
            rows.append(new)
        out[table] = rows
    return out


def _key(row: dict) -> tuple[str, str, str]:
    """What identifies a row (and the job that makes it): method, concept slug, settings."""
    return row["method"], row["concept"].replace(" ", "_"), json.dumps(row["settings"], sort_keys=True)


def merge(reports: list[dict]) -> dict:
    """One report from the files of several shards (a row that is in two of them is kept once)."""
    merged = {table: [] for table in TABLES}
    for report in reports:
        merged |= {k: v for k, v in report.items() if k not in TABLES}
        for table in TABLES:
            seen = {_key(r) for r in merged[table]}
            merged[table] += [r for r in report.get(table, []) if _key(r) not in seen]
    return merged


def run(methods=None, concepts=None, seeds: int = 8, work: Path = DEFAULT_WORK, model=None,
        drift_concepts=DRIFT_CONCEPTS, controls=CONTROLS, out: Path | None = None, settings: dict | None = None,
        shard: tuple[int, int] = (0, 1), ceiling=CEILING_CONCEPTS, log=print, judge_path: Path | None = None,
        world: str | None = None) -> dict:
    """The whole benchmark (see the module docstring); writes ``out`` after every row (resumable:
    rows already in ``out`` are kept and skipped). ``settings`` (e.g. ``{"num_vectors": 4}``) override the
    defaults in the method x concept rows, for a sweep; each row records them. ``shard=(i, n)`` runs only
    jobs i, i+n, i+2n...: n processes with their own ``out`` share the cores, and ``merge`` joins their files.
    ``judge_path``: the judge's weights (default: the shipped judge), e.g. one trained for a candidate model's world;
    ``world``: that model's world (``scenes.WORLDS``), recorded in the report."""
    methods = list(methods or METHODS)
    concepts = list(concepts or list_concepts())
    judge = Judge.load(judge_path) if judge_path else Judge.load()
    report = {table: [] for table in TABLES}
    if out and Path(out).is_file():
        report |= json.loads(Path(out).read_text())
    done = {_key(r) for table in TABLES for r in report[table]}
    jobs = [(m, c, dict(settings or {}), "rows") for c in concepts for m in methods]  # concept by concept: a partial run is comparable
    if "dreambooth" in methods:
        jobs += [("dreambooth", c, prior, "drift") for c in drift_concepts for prior in PRIORS]
    jobs += [(m, name, {}, "controls") for name in controls for m in methods if m in CONTROL_METHODS]
    if any(m in CONTROL_METHODS for m in methods):
        jobs += [("free_context", c, {}, "ceiling") for c in ceiling]
    jobs = jobs[shard[0]::shard[1]]
    report |= {"seeds": seeds, "model": str(model or "embedded"), "judge": str(judge_path or "shipped"), "generation": SAMPLING,
               "torch_threads": torch.get_num_threads(), **({"world": world} if world else {})}
    for method, slug, job_settings, table in jobs:
        if _key({"method": method, "concept": Path(str(slug)).name, "settings": job_settings}) in done:  # a folder: its slug
            continue
        t0 = time.time()
        concept = control_set(slug, controls[slug], work, world) if table == "controls" else slug
        row = run_one(method, concept, judge, Path(work), seeds, model, drift=table == "drift", world=world,
                      **job_settings)
        if "folder" in row:  # a set under work is named relative to it (variants/rose); symlinks kept as given
            folder, root = Path(os.path.abspath(row["folder"])), Path(os.path.abspath(work))
            if folder.is_relative_to(root):
                row["folder"] = str(folder.relative_to(root))
        report[table].append(row)
        log(f"{method:18s} {slug:38s} {job_settings or ''} fidelity {row['fidelity']:.2f} position {row['position']:.2f} "
            f"train {row['train_seconds']:.0f} s ({time.time() - t0:.0f} s with scoring)")
        if out:  # atomically: a killed run leaves the last complete report to resume from
            atomic_save(json.dumps(report, indent=1) + "\n", Path(out), write_text)
    return report


def _methods(rows: list[dict]) -> list[str]:
    """The methods present in ``rows``, in the course's order (TI, HN, DreamBooth, LoRA)."""
    return [m for m in METHODS if any(r["method"] == m for r in rows)]


def _fidelity(rows: list[dict], method: str, concept: str, missing: str) -> str:
    """The table cell of ``method`` on ``concept``: its fidelity, or ``missing`` if there is no such row."""
    return next((f"{r['fidelity']:.2f}" for r in rows if r["method"] == method and r["concept"] == concept), missing)


def _drawn(row: dict) -> str:
    """What a row's "a <phrase>" images were judged, the three commonest labels: "tiger 7, cat 1"."""
    return ", ".join(f"{k} {v}" for k, v in Counter(row["centre_labels"]).most_common(3))


def method_table(report: dict) -> str:
    """Per method: fidelity over concepts (mean, CI, worst), position adherence, training time."""
    rows = report["rows"]
    out = ["| method | fidelity, mean [95% CI] | worst concept | concepts ≥ 0.8 | in the asked half | "
           "train time, median (max) |", "|---|---|---|---|---|---|"]
    for m in _methods(rows):
        rs = [r for r in rows if r["method"] == m]
        f = [r["fidelity"] for r in rs]
        mean, lo, hi = bootstrap_ci(f)
        worst = min(rs, key=lambda r: r["fidelity"])
        t = [r["train_seconds"] for r in rs]
        out.append(f"| {m} | {mean:.2f} [{lo:.2f}, {hi:.2f}] | {worst['fidelity']:.2f} ({worst['concept']}) | "
                   f"{sum(x >= 0.8 for x in f)}/{len(f)} | {np.mean([r['position'] for r in rs]):.2f} | "
                   f"{np.median(t):.0f} s ({max(t):.0f} s) |")
    return "\n".join(out)


def concept_table(report: dict) -> str:
    """Fidelity per concept (rows) and method (columns)."""
    rows = report["rows"]
    methods = _methods(rows)
    out = ["| concept | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for c in sorted({r["concept"] for r in rows}):
        cells = [_fidelity(rows, m, c, "–") for m in methods]
        out.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def prior_name(settings: dict) -> str:
    """How a drift row's DreamBooth kept its prior: "off", "class images" or "class + world images"."""
    if settings.get("prior_weight", DreamBooth.prior_weight) == 0:
        return "off"
    return "class + world images" if settings.get("world_prior", DreamBooth.world_prior) else "class images"


def drift_table(report: dict) -> str:
    """DreamBooth with and without prior preservation: what "a <class word>" and the base classes become."""
    out = ["| DreamBooth on | prior preservation | fidelity | \"a <class>\" judged the class: before → after | "
           "\"a <class>\" judged the concept: before → after | all base classes top-1: before → after |",
           "|---|---|---|---|---|---|"]
    drift = report.get("drift", [])
    concepts = list(dict.fromkeys(r["concept"] for r in drift))
    order = [prior_name(p) for p in PRIORS]
    for r in sorted(drift, key=lambda r: (concepts.index(r["concept"]), order.index(prior_name(r["settings"])))):
        b, a = r["drift"]["before"], r["drift"]["after"]
        out.append(f"| {r['concept']} ({r['phrase']}) | {prior_name(r['settings'])} | "
                   f"{r['fidelity']:.2f} | {b['class_kept']:.2f} → {a['class_kept']:.2f} | "
                   f"{b['class_draws_concept']:.2f} → {a['class_draws_concept']:.2f} | "
                   f"{b['base_classes_top1']:.2f} → {a['base_classes_top1']:.2f} |")
    return "\n".join(out)


def control_table(report: dict) -> str:
    """The frozen-UNet methods on a held-out concept (mean over concepts) and on the control class."""
    out = ["| method | held-out concepts: mean fidelity | control: learns | control fidelity | control draws |",
           "|---|---|---|---|---|"]
    for r in report["controls"]:
        held = [x["fidelity"] for x in report["rows"] if x["method"] == r["method"]]
        out.append(f"| {r['method']} | {np.mean(held) if held else float('nan'):.2f} | {r['concept']} from "
                   f"'{r['phrase']}' | {r['fidelity']:.2f} | {_drawn(r)} |")
    return "\n".join(out)


def ceiling_table(report: dict) -> str:
    """Fidelity of the frozen-UNet methods next to the free-context ceiling, per concept."""
    methods = [m for m in _methods(report["rows"]) if m in CONTROL_METHODS]
    out = ["| concept | " + " | ".join(methods) + " | free context (the frozen-UNet ceiling) | ceiling draws |",
           "|---|" + "---|" * (len(methods) + 2)]
    for r in sorted(report["ceiling"], key=lambda r: r["concept"]):
        cells = [_fidelity(report["rows"], m, r["concept"], "") for m in methods]
        out.append(f"| {r['concept']} | " + " | ".join(cells) + f" | {r['fidelity']:.2f} | {_drawn(r)} |")
    return "\n".join(out)


def markdown(report: dict) -> str:
    """The README's tables."""
    parts = [method_table(report), concept_table(report)]
    if report.get("drift"):
        parts.append(drift_table(report))
    if report.get("controls"):
        parts.append(control_table(report))
    if report.get("ceiling"):
        parts.append(ceiling_table(report))
    return "\n\n".join(parts)


def write_page(report: dict, path: Path) -> str:
    """Write the report's markdown page beside its JSON (``bench_methods.json`` -> ``bench_methods.md``); returns
    the tables."""
    return files.write_page(path, "The methods' benchmark", f"Generated from `{Path(path).name}` by `mcteach bench "
                            f"methods --markdown --out {Path(path).name}`; do not edit by hand. "
                            f"{report.get('seeds', 8)} seeds per cell.", markdown(report))


def parse_settings(pairs: list[str]) -> dict:
    """``["num_vectors=4", "lr=3e-3"]`` -> ``{"num_vectors": 4, "lr": 0.003}`` (values read as JSON, else text)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set takes KEY=VALUE pairs, e.g. --set num_vectors=4; got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out

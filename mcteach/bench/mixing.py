"""The mixing benchmark: every method x every fix x each concept pair, judged per instance (notebook 08).

For each method (Textual Inversion, HyperNetwork, DreamBooth, LoRA), each fix and each pair of held-out
concepts (``CONCEPT_PAIRS``: the couple, two animals, two women, and a dissimilar control pair) it trains what it needs
with the shipped defaults (cached under ``--work``), generates "a <A> on the left and a <B> on the right"
for ``--seeds`` seeds and judges each half (``mcteach.measure.metrics``): success, swap, duplication, neglect, blend
index, each with a 95% bootstrap interval; beside them each concept's fidelity alone on the same pipeline
(the fix on), and the seconds spent training and per image.

The fixes:
- ``none``: the concepts trained one by one and loaded together (``load_adapters``); DreamBooth, which cannot
  combine two models, is trained jointly on both sets (the DreamBooth paper's way);
- ``inference``: the same weights, sampled with ``passes.INFERENCE_FIX`` (``regional_generate``): one UNet pass per
  region (Textual Inversion, whose concepts live in the prompt alone: ``passes.PROMPT_CONCEPT_FIX``, full guidance in
  each pass; ``passes.inference_fix``);
- ``single``: the same weights, sampled with ``masking.SINGLE_PASS_FIX``: attention masks in one UNet pass;
- ``auto``: the same weights, no regions from the user: the prompt names the concepts without places ("a <A> and a
  <B>"), ``layout.auto_generate`` lets the model's attention choose which half each concept gets, then draws with
  the passes fix; judged per half in the layout it chose, and position-free;
- ``wide`` (three and four concepts): the passes on a canvas wide enough that each concept has a window of the
  model's own size (``passes.WINDOW_FIX`` on ``passes.canvas_for``: thirds on 160 x 64 pixels, quadrants on 112 x
  112), each pass on its window with "a <phrase>"; each region judged as a whole frame (``metrics.place_crops``);
- the method ``fused_lora``: the LoRAs trained one by one, fused into one adapter that draws both
  (``methods.fusion.fuse_loras``), with the fixes that need no retraining (none, inference, single, auto);
- ``training``: LoRA and DreamBooth trained jointly with ``engine.TRAINING_FIX`` (Seg-Mix composites, masked
  loss, attention loss); Textual Inversion and the HyperNetwork, which learn one concept at a time, with the
  masked and attention losses;
- ``both``: the training fix's weights sampled with the inference fix.

    mcteach bench mixing --out data/bench_mixing.json                # everything (hours on 2 cores), resumable
    mcteach bench mixing --quick --json                              # LoRA on the couple, 8 seeds, ~10 min
    mcteach bench mixing --out data/bench_mixing.json --markdown     # its tables and data/bench_mixing.md

Each row is judged per half and by the position-free judge (``measure.instances``: ``free_success``, ``count_ok``,
``id_conf``). ``--sweep`` runs notebook 07's sweep of where single-pass masks act into ``data/bench_sweep.json``, ``--costs``
the seconds per image of every inference fix, measured in one run, into ``data/bench_costs.json``.

``--save-images DIR`` writes every judged image (``<method>-<fix>-<pair>-<seed>.png``) so anyone can re-judge.

On a CUDA GPU, ``mcteach bench mixing --gpu-report`` prints what training and masking cost at SD 1.5's size (random
weights, 512 px): each method's peak GPU memory and step time in fp16 with gradient checkpointing, and the masking
processors' time against diffusers' default (``gpu_report``; ``pytest -m gpu`` asserts the same numbers).
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from .. import files
from ..files import atomic_save, write_text
from ..measure import instances
from ..measure.judge import Judge
from ..measure.metrics import SAMPLING, bootstrap_ci, judge_instances, summarize_pairs
from ..methods.adapters import load_adapters, phrases
from ..methods.catalog import METHODS, make_method, train_concept
from ..methods.fusion import fuse_loras
from ..methods.engine import JOINT_METHODS, Regularizers, training_fix
from ..mixing.generate import regional_generate
from ..mixing.layout import TEMPLATES, auto_generate
from ..mixing.masking import NO_FIX, SINGLE_PASS_FIX, AttentionMasks, Region, RegionMasker
from ..mixing.passes import INFERENCE_FIX, WINDOW_FIX, RegionPasses, canvas_for, inference_fix, sub_prompt
from ..paths import CACHE
from ..sd import pretrain, tiny
from ..sd.attention import with_parts
from ..sd.pipeline import generate, load_pipeline
from ..world import scenes
from ..world.concepts import load_concept
from ..world.regions import POSITIONS, region_masks
from ..world.scenes import EMOJI

DEFAULT_WORK = CACHE / "mixbench"
CONCEPT_PAIRS = {
    "couple": ("woman_with_red_hair_and_medium_skin", "man_with_curly_hair_and_light_skin"),
    "animals": ("koala", "hamster"),
    "same_class": ("woman_with_red_hair_and_medium_skin", "woman_with_curly_hair_and_dark_skin"),
    "control": ("croissant", "trumpet"),
}
#: the methods the mixing bench runs: the four, and LoRAs fused into one adapter
BENCH_METHODS = tuple(METHODS) + ("fused_lora",)
#: the fixes a fused LoRA is measured with (it is made from the plain LoRAs: no training fix)
FUSED_FIXES = ("none", "inference", "single", "auto")
TRIPLE = ("woman_with_red_hair_and_medium_skin", "koala", "man_with_curly_hair_and_light_skin")
QUAD = TRIPLE + ("hamster",)
#: the fixes of the rows with more than two concepts ("three", "four")
MANY_FIXES = {"three": ("none", "inference", "single", "auto", "wide"), "four": ("none", "inference", "wide")}
FIXES = ("none", "inference", "single", "auto", "wide", "training", "both")
#: the fixes of the two-concept pairs (on the model's own canvas, halves need no wider one)
PAIR_FIXES = tuple(f for f in FIXES if f != "wide")
#: the sampler of each fix: "single" is attention masking in one UNet pass (``masking.SINGLE_PASS_FIX``) on the
#: untrained-fix weights; "training" samples the training fix's weights without masks, "both" with the passes
SAMPLER_OF = {"none": NO_FIX, "inference": INFERENCE_FIX, "single": SINGLE_PASS_FIX, "auto": INFERENCE_FIX,
              "wide": WINDOW_FIX, "training": NO_FIX, "both": INFERENCE_FIX}
TRAINED_WITH_FIX = ("training", "both")
LAYOUT, THIRDS = TEMPLATES[2], TEMPLATES[3]


def _key(row: dict) -> tuple:
    return row["method"], row["fix"], row["pair"]


def _stale(folder: Path, method: str, n_concepts: int) -> str:
    """How a cached adapter's training differs from ``method``'s defaults for ``n_concepts`` concepts (steps, batch
    size, learning rate), e.g. "steps 400 (default 800), batch_size 4 (default 2)"; "" when it does not."""
    m = make_method(method)
    steps, batch_size = m.schedule(n_concepts)
    done = json.loads((folder / "adapter.json").read_text())["training"]
    want = {"steps": steps, "batch_size": batch_size, "lr": m.lr}
    return ", ".join(f"{k} {done.get(k)} (default {v})" for k, v in want.items() if done.get(k) != v)


class Bench:
    """Runs the jobs; keeps trained adapters under ``work`` and finished rows in ``out`` (resumable)."""

    def __init__(self, work: Path = DEFAULT_WORK, seeds: int = 16, fidelity_seeds: int = 8, model=None,
                 save_images: Path | None = None, progress=print, judge_path: Path | None = None,
                 world: str | None = None):
        """``world``: the base model's world (``scenes.WORLDS``) when ``model`` was trained on another one than the
        shipped model's: DreamBooth's world prior draws its classes."""
        scenes.world_classes(world)  # a clear error for an unknown world before any training
        self.world_setting = {"world": world} if world else {}

        self.work, self.seeds, self.fidelity_seeds, self.model = Path(work), seeds, fidelity_seeds, model
        self.save_images, self.log = save_images, progress
        self.judge = Judge.load(judge_path) if judge_path else Judge.load()

    # --------------------------------------------------------------- training (cached)
    def trained(self, method: str, slugs: tuple[str, ...], regularized: bool) -> tuple[list[Path], float]:
        """Adapter folders for ``slugs`` and the seconds their training took (read back when cached). ``fused_lora``:
        one folder, the plain LoRAs fused (its seconds: theirs and the fusion's)."""
        if method == "fused_lora":
            loras, seconds = self.trained("lora", slugs, False)
            folder = self.work / method / "+".join(slugs)
            info = folder / "bench_train.json"
            if not info.is_file():
                self.log(f"  fusing the LoRAs of {' + '.join(slugs)}")
                t0 = time.time()
                fuse_loras(load_pipeline(self.model, device="cpu", dtype=torch.float32), loras, folder, progress=self.log)
                atomic_save(json.dumps({"seconds": time.time() - t0, "threads": torch.get_num_threads()}), info,
                            write_text)
            return [folder], seconds + json.loads(info.read_text())["seconds"]
        joint = method == "dreambooth" or (regularized and method in JOINT_METHODS)
        groups = [slugs] if joint else [(s,) for s in slugs]
        folders, seconds = [], 0.0
        for group in groups:
            reg = training_fix(len(group), method) if regularized else Regularizers()
            folder = self.work / method / ("fix" if regularized else "plain") / "+".join(group)
            info = folder / "bench_train.json"
            if not info.is_file():
                self.log(f"  training {method} on {' + '.join(group)}{' (training fix)' if regularized else ''}")
                pipe = load_pipeline(self.model, device="cpu", dtype=torch.float32)
                r = train_concept(pipe, list(group) if len(group) > 1 else group[0], method, out=folder,
                                  regularizers=reg, progress=False,
                                  **(self.world_setting if method == "dreambooth" else {}))
                atomic_save(json.dumps({"seconds": r.seconds, "threads": torch.get_num_threads()}), info, write_text)
            stale = _stale(folder, method, len(group))
            if stale:
                raise ValueError(f"the cached adapter {folder} was trained with {stale}, not the defaults this bench "
                                 "measures: delete the folder (it is trained again) or give another --work")
            folders.append(folder)
            seconds += json.loads(info.read_text())["seconds"]
        return folders, seconds

    def loaded(self, method: str, slugs: tuple[str, ...], regularized: bool):
        """A fresh pipeline with the concepts' adapters loaded: (pipe, {slug: phrase}, {slug: LoRA adapter name},
        the concepts, a judge that knows them, training seconds)."""
        folders, train_s = self.trained(method, slugs, regularized)
        pipe = load_pipeline(self.model)
        metas = load_adapters(pipe, folders)
        said = {k: v for m in metas for k, v in phrases(m).items()}
        adapter_of = {s: m.get("adapter_name") for m in metas for s in phrases(m)}
        concepts = [load_concept(s) for s in slugs]
        return pipe, said, adapter_of, concepts, self.judge.with_concepts(concepts), train_s

    # --------------------------------------------------------------- one row
    def row(self, method: str, fix: str, pair: str, slugs: tuple[str, ...]) -> dict:
        pipe, said, adapter_of, concepts, judge, train_s = self.loaded(method, slugs, fix in TRAINED_WITH_FIX)
        masks = inference_fix(method) if SAMPLER_OF[fix] is INFERENCE_FIX else SAMPLER_OF[fix]
        positions = TEMPLATES[len(slugs)]
        names = [c.name for c in concepts]
        seeds = list(range(self.seeds))
        extra = {}
        t0 = time.time()
        if fix == "auto":  # no regions: the model's attention chooses each concept's place, per seed
            prompt = _prompt([said[s] for s in slugs], [None] * len(slugs))
            auto = auto_generate(pipe, prompt, [said[s] for s in slugs], adapters=[adapter_of[s] for s in slugs],
                                 seed=seeds, fix=masks, **SAMPLING)
            images = auto.images
            image_s = (time.time() - t0) / len(seeds)
            results = [judge_instances(judge, [im], names, list(lay), prompt, [s])[0]
                       for im, lay, s in zip(images, auto.layouts, seeds)]
            extra = {"layouts": [list(lay) for lay in auto.layouts],
                     "prompt_order": list(bootstrap_ci([tuple(lay) == positions for lay in auto.layouts]))}
        else:
            canvas = canvas_for(positions, pipe.unet.config.sample_size * pipe.vae_scale_factor) if fix == "wide" else None
            prompt = _prompt([said[s] for s in slugs], positions)
            regions = _regions(slugs, positions, said, adapter_of, masks)
            size = dict(zip(("height", "width"), canvas)) if canvas else {}
            images = regional_generate(pipe, prompt, regions, fix=masks, seed=seeds, **size, **SAMPLING)
            image_s = (time.time() - t0) / len(seeds)
            results = judge_instances(judge, images, names, list(positions), prompt, seeds, canvas=bool(canvas))
            if canvas:
                extra = {"canvas": list(canvas)}
        free = instances.summarize(instances.judge_images(judge, images, names))
        if self.save_images:
            self._save(images, f"{method}-{fix}-{pair}")
        # each concept alone on the same pipeline, the fix on: "a <phrase>", its region the whole image
        fid = []
        for s, c in zip(slugs, concepts):
            alone = [Region((0.0, 0.0, 1.0, 1.0), f"a {said[s]}", phrase=said[s], adapter=adapter_of[s])]
            ims = regional_generate(pipe, f"a {said[s]}", alone, fix=masks, seed=list(range(self.fidelity_seeds)), **SAMPLING)
            fid += [x == c.name for x in judge.labels_of(ims, "centre")]
        s = summarize_pairs(results)
        return {"method": method, "fix": fix, "pair": pair, "concepts": list(slugs), "prompt": prompt,
                **{k: list(s[k]) for k in ("success", "swap", "duplication", "neglect", "other")},
                "blend": list(s["blend_index"]), "fidelity": list(bootstrap_ci(fid)), "train_s": round(train_s, 1),
                "image_s": round(image_s, 3), "n": len(results), "threads": torch.get_num_threads(),
                **_free_fields(free), **extra,
                "outcomes": [r.outcome for r in results], "predicted": [list(r.predicted) for r in results]}

    def base_row(self, pair: str, slugs: tuple[str, str]) -> dict:
        """The base model's reference: the two concepts' class words ("a woman ... and a man ..."), no fix."""
        words = [load_concept(s).class_word for s in slugs]
        prompt = _prompt(words, LAYOUT)
        seeds = list(range(self.seeds))
        images = generate(load_pipeline(self.model), [prompt] * len(seeds), seed=seeds, batch_size=32, **SAMPLING)
        names = [EMOJI[w].name if w in EMOJI else w for w in words]
        if len(set(names)) < 2:  # two of one class: success means the class in both halves
            hits = [list(r.predicted) == names for r in judge_instances(self.judge, images, names[:1] * 2, list(LAYOUT))]
            s = {"success": bootstrap_ci(hits)}
            rest = {k: [float("nan")] * 3 for k in ("swap", "duplication", "neglect", "other", "blend")}
        else:
            s = summarize_pairs(judge_instances(self.judge, images, names, list(LAYOUT), prompt, seeds))
            rest = {k: list(s[k]) for k in ("swap", "duplication", "neglect", "other")} | {"blend": list(s["blend_index"])}
        return {"method": "base model", "fix": "none", "pair": pair, "concepts": words, "prompt": prompt,
                "success": list(s["success"]), **rest, "fidelity": [float("nan")] * 3, "train_s": 0.0,
                "image_s": float("nan"), "n": len(seeds)}

    def _save(self, images, stem: str) -> None:
        self.save_images.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            im.save(self.save_images / f"{stem}-{i:02d}.png")


def _free_fields(free: dict) -> dict:
    """The position-free judge's figures of a row (``instances.summarize``): its success, count accuracy and identity
    confusion margin, each (mean, lo, hi)."""
    return {"free_success": list(free["success"]), "count_ok": list(free["count_ok"]), "id_conf": list(free["id_conf"])}


def rejudge(report: dict, images: Path, judge_path: Path | None = None, log=print) -> dict:
    """The position-free figures of every row again (``measure.instances``), from its saved images
    (``--save-images``: ``<method>-<fix>-<pair>-<seed>.png``); rows whose images are not all there are left as
    they are and named."""
    base = Judge.load(judge_path) if judge_path else Judge.load()
    for row in report["rows"]:
        if row.get("method") == "base model" or "error" in row:
            continue
        files = [Path(images) / f"{row['method']}-{row['fix']}-{row['pair']}-{i:02d}.png" for i in range(row["n"])]
        if not all(f.is_file() for f in files):
            log(f"  {row['method']} / {row['fix']} / {row['pair']}: images not saved, position-free figures kept")
            continue
        concepts = [load_concept(s) for s in row["concepts"]]
        results = instances.judge_images(base.with_concepts(concepts), [Image.open(f) for f in files],
                                         [c.name for c in concepts])
        row.update(_free_fields(instances.summarize(results)))
    return report


def ablation_fixes() -> dict:
    """The inference fixes notebook 07 compares, by letter: (a) token masks, (b) regional prompts, (c)
    self-attention masks, (d) LoRA bound to its region, (e) one UNet pass per region."""
    return {
        "none": NO_FIX,
        "(a) tokens, end-of-text kept": AttentionMasks("tokens", False, False),
        "(a) tokens, end-of-text for the background": AttentionMasks("tokens", False, False, eot="background"),
        "(b) regional prompts": AttentionMasks("regional", False, False),
        "(b) regional prompts, base 0.5": AttentionMasks("regional", False, False, base=0.5),
        "(b+c) regional + self-attention": AttentionMasks("regional", True, False),
        "(d) regional + region-bound LoRA": AttentionMasks("regional", False, True),
        "(b+c+d) every single-pass mask": AttentionMasks("regional", True, True),
        "(e) one pass per region": RegionPasses(),
        "(e) passes, bootstrapped": RegionPasses(bootstrap=0.5),
        "(e) passes, bootstrapped, recentred": RegionPasses(bootstrap=0.5, recentre=True),
        "(e) passes, bootstrapped, half the guidance inside (the fix)": INFERENCE_FIX,
    }


def ablation(bench: Bench, pair: str = "couple", method: str = "lora") -> list[dict]:
    """Every fix of ``ablation_fixes`` on one pair's separately trained adapters: rows as in ``Bench.row``."""
    slugs = CONCEPT_PAIRS[pair]
    pipe, said, adapter_of, concepts, judge, _ = bench.loaded(method, slugs, False)
    prompt = _prompt([said[s] for s in slugs], LAYOUT)
    seeds = list(range(bench.seeds))
    rows = []
    for name, fix in ablation_fixes().items():
        regions = _regions(slugs, LAYOUT, said, adapter_of, fix)
        t0 = time.time()
        images = regional_generate(pipe, prompt, regions, fix=fix, seed=seeds, **SAMPLING)
        image_s = (time.time() - t0) / len(seeds)
        s = summarize_pairs(judge_instances(judge, images, [c.name for c in concepts], list(LAYOUT), prompt, seeds))
        if bench.save_images:
            bench._save(images, f"ablation-{method}-{pair}-{len(rows):02d}")
        rows.append({"fix": name, "method": method, "pair": pair, "n": len(seeds), "image_s": round(image_s, 3),
                     **{k: list(s[k]) for k in ("success", "swap", "duplication", "neglect", "other")},
                     "blend": list(s["blend_index"])})
        bench.log(f"  {name}: success {s['success'][0]:.2f}")
    return rows


def sweep_report(bench: Bench, seeds: int = 8, log=print) -> dict:
    """Notebook 07's sweep of where masks act (``bench.sweep``): the base model on ``sweep.BASE_PAIRS`` with
    ``BASE_MODES``, then the couple's two LoRAs with ``LORA_MODES`` (what each fix costs: ``cost_report``)."""
    from . import sweep as sw

    out = {"seeds": seeds, "model": str(bench.model or "embedded")}
    log("sweep: the base model")
    out["base"] = sw.sweep(load_pipeline(bench.model), bench.judge, sw.BASE_PAIRS, modes=sw.BASE_MODES,
                           seeds=range(seeds), log=log)
    slugs = CONCEPT_PAIRS["couple"]
    pipe, said, adapter_of, concepts, judge, _ = bench.loaded("lora", slugs, False)
    names = {s: c.name for s, c in zip(slugs, concepts)}
    log("sweep: the couple's LoRAs")
    out["couple"] = sw.sweep(pipe, judge, [tuple(names[s] for s in slugs)], modes=sw.LORA_MODES, seeds=range(seeds),
                             phrases={names[s]: said[s] for s in slugs},
                             adapters={names[s]: adapter_of[s] for s in slugs}, log=log)
    return out


#: the fixes ``cost_report`` times, in its order: the plain pipeline first (every ratio is against it)
COSTED = ("none", "single", "inference", "inference, batched", "auto")


def cost_report(bench: Bench, images: int = 8, repeats: int = 3) -> dict:
    """Seconds per image of every inference fix on the couple's two LoRAs, measured in one run (``fix_timing``):
    the plain pipeline, the single pass, the passes one UNet call each and batched into one call per step, and the
    automatic layout (its probe, then the passes)."""
    slugs = CONCEPT_PAIRS["couple"]
    pipe, said, adapter_of, _, _, _ = bench.loaded("lora", slugs, False)
    prompt = _prompt([said[s] for s in slugs], LAYOUT)
    batched = replace(INFERENCE_FIX, batched=True)
    auto_prompt = _prompt([said[s] for s in slugs], [None, None])

    def auto(seeds):
        return auto_generate(pipe, auto_prompt, [said[s] for s in slugs], adapters=[adapter_of[s] for s in slugs],
                             seed=seeds, **SAMPLING).images

    fixes = dict(zip(COSTED, (NO_FIX, SINGLE_PASS_FIX, INFERENCE_FIX, batched, auto)))
    return fix_timing(pipe, prompt, _regions(slugs, LAYOUT, said, adapter_of), fixes, images, repeats) | {
        "model": str(bench.model or "embedded")}


def fix_timing(pipe, prompt: str, regions: list[Region], fixes: dict, images: int = 8, repeats: int = 3) -> dict:
    """Seconds per image of each fix on the same prompt and regions (the course's sampling), measured alternately
    in one run, best of ``repeats``; ``ratio``: each against the first fix (the plain pipeline). A fix may also be
    a function of the seeds that returns their images (e.g. the automatic layout, which takes no regions)."""
    best = {k: float("inf") for k in fixes}
    for _ in range(repeats):
        for name, fix in fixes.items():
            t0 = time.perf_counter()
            seeds = list(range(images))
            if callable(fix):
                fix(seeds)
            else:
                regional_generate(pipe, prompt, regions, fix=fix, seed=seeds, **SAMPLING)
            best[name] = min(best[name], (time.perf_counter() - t0) / images)
    first = next(iter(fixes))
    return {"seconds": best, "ratio": {k: best[k] / best[first] for k in best}, "images": images,
            "threads": torch.get_num_threads()}


@torch.no_grad()
def processor_timing(unet, tokens: int = 32, repeats: int = 5, seed: int = 0) -> dict:
    """Seconds per UNet call (batch 2, as with guidance) with the default processors, and with the single-pass
    masks (token masks + self-attention masks, and regional prompts: a context three times as long), on left/
    right halves; the ratios are what the masks cost. Measured alternately in one run, best of ``repeats``."""
    side, dim = unet.config.sample_size, unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, unet.config.in_channels, side, side, generator=g).to(unet.device, unet.dtype)
    ctx = torch.randn(2, tokens, dim, generator=g).to(unet.device, unet.dtype)
    ctx3 = torch.randn(2, 3 * tokens, dim, generator=g).to(unet.device, unet.dtype)
    masks = region_masks(["left", "right"], side * 4)
    setups = {
        "default": (None, ctx),
        "tokens + self-attention masks": (RegionMasker(masks, AttentionMasks("tokens", True, False), spans=[[2, 3], [8, 9]],
                                                       eot=list(range(12, tokens)), chunk=tokens), ctx),
        "regional prompts + self-attention masks": (RegionMasker(masks, AttentionMasks("regional", True, False), chunk=tokens),
                                                    ctx3),
    }
    best = {k: float("inf") for k in setups}
    sync = torch.cuda.synchronize if unet.device.type == "cuda" else (lambda: None)  # GPU calls return at once
    for _ in range(repeats):
        for name, (masker, c) in setups.items():
            previous = with_parts(unet, masker=masker) if masker else None
            sync()
            t0 = time.perf_counter()
            unet(z, 500, c)
            sync()
            best[name] = min(best[name], time.perf_counter() - t0)
            if previous:
                unet.set_attn_processor(previous)
    return {"seconds": best, "ratio": {k: best[k] / best["default"] for k in best}, "latent": side,
            "threads": torch.get_num_threads()}


def _regions(slugs, positions, said: dict, adapter_of: dict, fix=None) -> list[Region]:
    """One region per concept: its place, its sub-prompt for ``fix`` (``passes.sub_prompt``), its phrase and adapter."""
    return [Region(p, sub_prompt(said[s], p, fix), phrase=said[s], adapter=adapter_of[s]) for s, p in zip(slugs, positions)]


def _where(position) -> str:
    return " " + POSITIONS[position] if position in POSITIONS else ""


def _prompt(phrases: list[str], positions) -> str:
    """"a <A> on the left and a <B> on the right" (three concepts, or positions None: "a <A> and a <B> and a <C>")."""
    return " and ".join(f"a {p}{_where(pos)}" for p, pos in zip(phrases, positions))


def run(methods=BENCH_METHODS, fixes=FIXES, pairs=tuple(CONCEPT_PAIRS), seeds: int = 16, work: Path = DEFAULT_WORK,
        out: Path | None = None, triple: bool = True, base: bool = True, save_images=None, model=None,
        judge_path: Path | None = None, world: str | None = None) -> dict:
    """Every (method, fix, pair) row not yet in ``out``; the report is rewritten after each row. ``judge_path``: the
    judge's weights (default: the shipped judge), e.g. the one trained for a candidate model's world; ``world``:
    that model's world (see ``Bench``)."""
    report = json.loads(Path(out).read_text()) if out and Path(out).is_file() else {"rows": []}
    done = {_key(r) for r in report["rows"]}
    bench = Bench(work, seeds, model=model, save_images=save_images, progress=lambda m: print(m, file=sys.stderr),
                  judge_path=judge_path, world=world)
    report |= {"seeds": seeds, "generation": SAMPLING, "model": str(model or "embedded"), "judge": str(judge_path or "shipped")}
    jobs = [(m, f, p, CONCEPT_PAIRS[p]) for m in methods for p in pairs for f in fixes
            if f in (FUSED_FIXES if m == "fused_lora" else PAIR_FIXES)]
    if triple:
        jobs += [("lora", f, many, slugs) for many, slugs in (("three", TRIPLE), ("four", QUAD))
                 for f in MANY_FIXES[many] if f in fixes]
    if base:
        jobs = [("base model", "none", p, CONCEPT_PAIRS[p]) for p in pairs] + jobs
    for method, fix, pair, slugs in jobs:
        if (method, fix, pair) in done:
            continue
        print(f"{method} / {fix} / {pair}", file=sys.stderr, flush=True)
        try:
            row = bench.base_row(pair, slugs) if method == "base model" else bench.row(method, fix, pair, slugs)
        except ValueError as err:  # e.g. two HyperNetworks that both answer to "woman": the reason is the result
            nan = [float("nan")] * 3
            row = {"method": method, "fix": fix, "pair": pair, "concepts": list(slugs), "error": str(err),
                   **{k: nan for k in ("success", "swap", "duplication", "neglect", "other", "blend", "fidelity")},
                   "train_s": float("nan"), "image_s": float("nan"), "n": 0}
            print(f"  not measurable: {err}", file=sys.stderr)
        report["rows"].append(row)
        if out:
            atomic_save(json.dumps(report, indent=1) + "\n", Path(out), write_text)
    return report


def _cell(v) -> str:
    m, lo, hi = v
    return "–" if m != m else f"{m:.2f} [{lo:.2f}, {hi:.2f}]"


def merge(reports: list[dict]) -> dict:
    """Several reports (e.g. processes run with different ``--methods``) as one: a row in several reports is
    taken from the last one, and so is every other key."""
    rows = {_key(r): r for rep in reports for r in rep["rows"]}
    merged = reports[0] | {"rows": list(rows.values())}
    for rep in reports[1:]:
        merged |= {k: v for k, v in rep.items() if k != "rows"}
    return merged


TWO_CONCEPT_PAIRS = ("couple", "animals", "same_class", "control")


def headline(report: dict) -> str:
    """The README's table: per method, the success rate with no fix against its best fix, pooled over the
    two-concept pairs (every seed of every pair; 95% bootstrap interval), and the couple's alone."""
    out = ["| method | no fix | best fix | with the best fix | the couple: no fix → best fix |", "|---|---|---|---|---|"]
    for method in ("base model",) + BENCH_METHODS:
        by_fix = {}
        for fix in FIXES:
            rows = [r for r in report["rows"] if r["method"] == method and r["fix"] == fix
                    and r["pair"] in TWO_CONCEPT_PAIRS]
            if rows:
                wins = [k < round(r["success"][0] * r["n"]) for r in rows for k in range(r["n"])]  # per image
                by_fix[fix] = (bootstrap_ci(wins), len(wins),
                               next((r["success"] for r in rows if r["pair"] == "couple"), None))
        if "none" not in by_fix:
            continue
        best = max(by_fix, key=lambda f: by_fix[f][0][0])
        (none, _, couple_none), (fixed, _, couple_best) = by_fix["none"], by_fix[best]
        couple = "–" if couple_none is None else f"{couple_none[0]:.2f} → {couple_best[0]:.2f}"
        out.append(f"| {method} | {_cell(none)} | {best} | {_cell(fixed)} | {couple} |")
    return "\n".join(out) + f"\n\nSuccess: both concepts recognised, each in its own half (per-instance judge); pooled " \
        f"over the pairs {', '.join(TWO_CONCEPT_PAIRS)}, {report.get('seeds', 16)} seeds each."


def markdown(report: dict) -> str:
    """The report's tables: the headline, one row per (pair, method, fix) in the course's order, and the
    ablation and the timing when the report has them."""
    parts = [headline(report), main_table(report)] if report.get("rows") else []
    if report.get("ablation"):
        parts.append(ablation_table(report["ablation"]))
    if report.get("timing"):
        parts.append(timing_table(report["timing"]))
    return "\n\n".join(parts)


def write_page(report: dict, path: Path) -> str:
    """Write the report's markdown page beside its JSON (``bench_mixing.json`` -> ``bench_mixing.md``); returns
    the tables."""
    return files.write_page(path, "The mixing benchmark", f"Generated from `{Path(path).name}` by `mcteach bench mixing "
                            f"--markdown`; do not edit by hand. Model: {report.get('model', 'embedded')}; judge: "
                            f"{report.get('judge', 'shipped')}; {report.get('seeds', 16)} seeds per row; 95% bootstrap "
                            "intervals in brackets. Concepts of other kinds with the couple (a place behind them, an "
                            "item on one head): [bench_kinds.md](bench_kinds.md), `mcteach bench mixing --kinds`.",
                            markdown(report))


def main_table(report: dict) -> str:
    """Every measured row as a markdown table, by pair, method and fix; the rows that could not be measured (an
    ``error``, e.g. two hypernetworks that both answer to "woman") are named under it, not shown as empty rows."""
    order = {m: i for i, m in enumerate(("base model",) + BENCH_METHODS)}
    failed = [r for r in report["rows"] if "error" in r]
    rows = sorted((r for r in report["rows"] if "error" not in r), key=lambda r: (list(CONCEPT_PAIRS).index(r["pair"]) if r["pair"] in CONCEPT_PAIRS else 99,
                                                  order.get(r["method"], 99), FIXES.index(r["fix"])))
    out = ["| pair | method | fix | success | position-free | swap | neglect | duplication | blend | fidelity alone | "
           "train s | s / image |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        free = _cell(r["free_success"]) if "free_success" in r else "–"
        out.append(f"| {r['pair']} | {r['method']} | {r['fix']} | {_cell(r['success'])} | {free} | {_cell(r['swap'])} | "
                   f"{_cell(r['neglect'])} | {_cell(r['duplication'])} | {_cell(r['blend'])} | "
                   f"{_cell(r['fidelity'])} | {r['train_s']:.0f} | "
                   f"{'–' if r['image_s'] != r['image_s'] else format(r['image_s'], '.2f')} |")
    groups: dict[tuple[str, str, str], list[str]] = {}  # (method, pair, reason) -> its fixes
    for r in failed:
        groups.setdefault((r["method"], r["pair"], _reason(r["error"])), []).append(r["fix"])
    if groups:
        out += [""] + [f"Not measurable: {m} on {p} ({', '.join(fixes)}): {why}." for (m, p, why), fixes in groups.items()]
    return "\n".join(out)


def _reason(error: str) -> str:
    """An error message without the machine's paths (the report's rows keep them in full)."""
    return re.sub(r"(/[^\s:,'\"]+)+", lambda m: Path(m.group(0)).name, error).rstrip(".")


def timing_report(sd15: bool = True) -> dict:
    """``processor_timing`` on the embedded UNet (16x16 latents) and on SD 1.5's UNet built from config with
    random weights at 64x64 latents (512 px images)."""
    out = {"tiny": processor_timing(load_pipeline().unet)}
    if sd15:
        tok = tiny.build_tokenizer(scenes.vocabulary_words(scenes.BASE_CLASSES))
        unet = tiny.build_components(tok, architecture="sd15")[2].eval()
        unet.register_to_config(sample_size=64)
        out["sd15"] = processor_timing(unet, tokens=77, repeats=3)
    return out


def sd15_pipe(latent: int = 64):
    """A pipeline of SD 1.5's architecture with random weights (``tiny.build_components(architecture="sd15")``),
    float32 on the CPU, with ``latent`` x ``latent`` latents (64: 512 px images)."""
    tokenizer = tiny.build_tokenizer(scenes.vocabulary_words(scenes.BASE_CLASSES))
    vae, text_encoder, unet, _ = tiny.build_components(tokenizer, architecture="sd15")
    unet.register_to_config(sample_size=latent)
    pipe = pretrain.assemble(tokenizer, vae, text_encoder, unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


#: how each method is measured on a GPU (``training_cost``): its defaults (batch 2), fp16 autocast, gradient
#: checkpointing. DreamBooth (the UNet and text encoder, 983M parameters) with 8-bit Adam: AdamW's 32-bit moments
#: alone would take 7.9 GB; and a batch of 4 concept images standing for its 2 concept + 2 class images (the same
#: tensors, without drawing 70 class images at 512 px first).
GPU_RUNS = {
    "textual_inversion": {},
    "hypernetwork": {},
    "dreambooth": {"prior_weight": 0.0, "batch_size": 4, "use_8bit_adam": True},
    "lora": {},
}


def training_cost(base, method: str, *, steps: int = 4, concept: str = "koala", **options) -> dict:
    """``steps`` training steps of ``method`` on a copy of ``base`` (a float32 pipeline on the CPU), on the GPU
    in fp16 (``Accelerator(mixed_precision="fp16")``) with gradient checkpointing; ``options`` go to
    ``train_concept`` (``batch_size``, ``use_8bit_adam``, method settings).

    Returns peak_gb (``torch.cuda.max_memory_allocated`` during the run, above what was allocated before: the
    weights, examples, gradients, optimizer state and activations, and saving), step_s (the median step after the
    first), skipped (steps the fp16 loss scaler skipped for inf gradients: the optimizer's state exists only if
    skipped < steps) and the settings used."""
    import copy
    import gc
    import math
    import tempfile
    import warnings

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState


    gc.collect()
    torch.cuda.empty_cache()
    pipe = copy.deepcopy(base)
    AcceleratorState._reset_state()  # mixed precision is fixed once per process: start afresh, and again after
    try:
        accelerator = Accelerator(mixed_precision="fp16")
        scaler = accelerator.scaler  # the fp16 loss scaler (CUDA); halves its scale at each skipped step
        scale = scaler.get_scale() if scaler else 1.0
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the 64 px concept images resized to 512 px
            r = train_concept(pipe, concept, method, out=out, steps=steps, progress=False, accelerator=accelerator,
                              gradient_checkpointing=True, **options)
        peak = torch.cuda.max_memory_allocated() - before
        skipped = round(math.log2(scale / scaler.get_scale())) if scaler else 0
    finally:
        AcceleratorState._reset_state()
    del pipe
    gc.collect()
    torch.cuda.empty_cache()
    times = sorted(r.step_seconds[1:] or r.step_seconds)
    return {"method": method, "peak_gb": peak / 1e9, "step_s": times[len(times) // 2], "steps": steps,
            "skipped": skipped, "batch_size": r.meta["training"]["batch_size"],
            "optimizer": r.meta["training"].get("optimizer", "torch.optim.AdamW"), "loss": r.losses[-1]}


def gpu_processor_timing(base, repeats: int = 10) -> dict:
    """``processor_timing`` of ``base``'s UNet in fp16 on the GPU (77 tokens, as SD 1.5's prompts)."""
    import copy

    unet = copy.deepcopy(base.unet).to("cuda", torch.float16).eval()
    try:
        return processor_timing(unet, tokens=77, repeats=repeats)
    finally:
        del unet
        torch.cuda.empty_cache()


def gpu_report(methods=tuple(METHODS), steps: int = 4) -> dict:
    """What ``--gpu-report`` prints: ``training_cost`` of each method with ``GPU_RUNS``' settings (DreamBooth is
    left out, with the reason, when bitsandbytes is missing) and ``gpu_processor_timing``, on SD 1.5's architecture
    with random weights at 512 px."""
    import importlib.util

    base = sd15_pipe()
    rows = []
    for m in methods:
        if GPU_RUNS[m].get("use_8bit_adam") and importlib.util.find_spec("bitsandbytes") is None:
            rows.append({"method": m, "error": "needs bitsandbytes (8-bit Adam) to fit"})
            continue
        rows.append(training_cost(base, m, steps=steps, **GPU_RUNS[m]))
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "training": rows,
            "timing": {"sd15": gpu_processor_timing(base)}}


def gpu_table(report: dict) -> str:
    """The README's GPU tables (markdown) from ``gpu_report``."""
    out = [f"{report['device']}, torch {report['torch']}; SD 1.5's architecture with random weights, 512 px images, "
           "fp16 autocast, gradient checkpointing on:", "",
           "| method | batch | optimizer | peak GPU memory | s / step |", "|---|---|---|---|---|"]
    for r in report["training"]:
        if "error" in r:
            out.append(f"| {r['method']} | | | {r['error']} | |")
        else:
            out.append(f"| {r['method']} | {r['batch_size']} | {r['optimizer'].rpartition('.')[2]} | "
                       f"{r['peak_gb']:.1f} GB | {r['step_s']:.2f} |")
    if any(r["method"] == "dreambooth" and "error" not in r for r in report["training"]):
        out += ["", "DreamBooth trains the UNet and the text encoder; its batch of 4 stands for 2 concept + 2 class "
                "images."]
    out += ["", timing_table(report["timing"]).replace("SD 1.5 size (random weights)", "SD 1.5 size, fp16 on the GPU")]
    return "\n".join(out)


def ablation_table(rows: list[dict]) -> str:
    out = ["| inference fix (LoRA, the couple) | success | swap | neglect | duplication | blend | s / image |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['fix']} | {_cell(r['success'])} | {_cell(r['swap'])} | {_cell(r['neglect'])} | "
                   f"{_cell(r['duplication'])} | {_cell(r['blend'])} | {r['image_s']:.2f} |")
    return "\n".join(out)


def timing_table(timing: dict) -> str:
    out = ["| UNet | latents | default processor | tokens + self-attention masks | regional prompts + self-attention masks |",
           "|---|---|---|---|---|"]
    for name, t in timing.items():
        r = t["ratio"]
        out.append(f"| {'embedded tiny' if name == 'tiny' else 'SD 1.5 size (random weights)'} | {t['latent']}x{t['latent']} | "
                   f"{t['seconds']['default'] * 1000:.0f} ms (1.00x) | {r['tokens + self-attention masks']:.2f}x | "
                   f"{r['regional prompts + self-attention masks']:.2f}x |")
    return "\n".join(out)


def sampling_ratio(models: list, images: int = 16, repeats: int = 3, seed: int = 0) -> dict:
    """Seconds per image of each pipeline in ``models`` (paths or hub ids), the course's settings (25 DDIM steps,
    guidance 5, one batch of ``images``), timed in turns in one process so the machine's load falls on each alike;
    the median of ``repeats`` rounds, and each model's time over the first's."""
    import numpy as np


    pipes = [load_pipeline(m, device="cpu") for m in models]
    prompts = [scenes.caption([(e, "centre")]) for e in scenes.CLASSIC_CLASSES[:images]]
    for pipe in pipes:
        generate(pipe, prompts[:2], seed=seed, **SAMPLING)  # warm-up
    times = [[] for _ in pipes]
    for _ in range(repeats):
        for pipe, t in zip(pipes, times):
            t0 = time.perf_counter()
            generate(pipe, prompts, seed=seed, batch_size=images, **SAMPLING)
            t.append((time.perf_counter() - t0) / images)
    per_image = [float(np.median(t)) for t in times]
    return {"models": [str(m or "embedded") for m in models], "images": images, "repeats": repeats,
            "threads": torch.get_num_threads(), "seconds_per_image": per_image,
            "ratio_to_first": [p / per_image[0] for p in per_image]}

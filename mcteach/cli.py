"""The ``mcteach`` command line: one parser, a verb for everything the course runs.

    mcteach generate --prompt "a fox on the left" --seed 0 --out fox.png
    mcteach train --method lora --concept data/concepts/koala --out runs/koala-lora
    mcteach generate --adapter runs/koala-lora --prompt "a bbm bear on the left" --out koala.png

Two concepts in one image (notebooks 06-07): one adapter each, one region each, and the fix::

    mcteach generate --adapter runs/woman --adapter runs/man \\
        --prompt "a cpd woman on the left and a tkb man on the right" \\
        --region "left=a cpd woman on the left" --region "right=a tkb man on the right" --fix inference --out couple.png
    mcteach generate --adapter runs/woman --adapter runs/man --prompt "a cpd woman and a tkb man" --fix auto \\
        --out couple.png                                  # no regions: the model chooses each concept's half
    mcteach train --method lora --concept woman_with_red_hair_and_medium_skin \\
        --concept man_with_curly_hair_and_light_skin --fix training --out runs/couple   # joint, with the training fix
    mcteach fuse --adapter runs/woman --adapter runs/man --out runs/couple-fused     # two LoRAs made one

The benchmarks, the judge, the base model and the course:

    mcteach bench methods --out data/bench_methods.json     # the four methods on every held-out concept
    mcteach bench mixing --out data/bench_mixing.json       # every method x fix x pair (notebook 08)
    mcteach bench base --out data/eval_base.json            # the base model alone
    mcteach judge train | evaluate | finetune | pair | calibrate ...
    mcteach pretrain train | export | status                # the tiny Stable Diffusion, from scratch
    mcteach concepts make                                   # render the held-out concepts' few-shot sets
    mcteach course [01 02 ...]                              # execute the notebooks, outputs kept

On a GPU, float16 mixed precision is the default; on one with under 20 GB (a 15 GB T4) so are
``--gradient-checkpointing`` and, where bitsandbytes is installed, ``--use-8bit-adam``. On several GPUs
(``--batch-size`` is the global batch, split between the processes: the same weights as one GPU, up to float
rounding)::

    accelerate launch --multi_gpu --num_processes 2 --mixed_precision fp16 -m mcteach train --method lora \\
        --model stable-diffusion-v1-5/stable-diffusion-v1-5 --concept data/concepts/koala --lr 1e-4 --out runs/koala
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import course
from .bench import methods as bench_methods
from .bench import kinds as bench_kinds
from .bench import mixing as bench_mixing
from .files import atomic_save, write_text
from .measure import calibration, judge, metrics
from .methods import fusion
from .methods.adapters import load_adapters, phrases, read_adapter
from .methods.catalog import METHODS, train_concept
from .methods.engine import Regularizers, training_fix
from .mixing.extent import place_generate
from .mixing.generate import regional_generate
from .mixing.masking import NO_FIX, SINGLE_PASS_FIX, Region
from .mixing.layout import auto_generate
from .mixing.passes import INFERENCE_FIX, WINDOW_FIX, canvas_for, inference_fix
from .paths import BENCH_COSTS, BENCH_KINDS, BENCH_METHODS, BENCH_MIXING, BENCH_SWEEP, CONCEPTS_DIR, EVAL_BASE, JUDGE_PATH
from .sd import pretrain, tiny
from .sd.pipeline import ModelNotAvailable, generate, load_pipeline
from .world import kinds, scenes
from .world.concepts import make_concept_sets
from .world.regions import BACKGROUND, REGIONS, RegionError, parse_box

#: the inference fixes ``generate --fix`` knows
FIXES = {"none": NO_FIX, "inference": INFERENCE_FIX, "single": SINGLE_PASS_FIX, "auto": INFERENCE_FIX,
         "wide": WINDOW_FIX, "layers": INFERENCE_FIX}

RAW = argparse.RawDescriptionHelpFormatter


# ----------------------------------------------------------------------------- generate


def parse_region(text: str, metas: list[dict]) -> Region:
    """"left=a cpd woman" or "0,0,0.5,1=a cpd woman" -> a ``Region``; the adapter whose phrase the sub-prompt
    names is bound to it."""
    where, sep, prompt = text.partition("=")
    if not sep or not prompt.strip():
        raise RegionError(f"--region {text!r}: write PLACE=SUB-PROMPT, e.g. 'left=a cpd woman on the left' (places: "
                          f"{', '.join(REGIONS)}, or a box x0,y0,x1,y1 in [0, 1])")
    where = where.strip()
    place = where if where in REGIONS or where == BACKGROUND else parse_box(where)
    found = [(p, m.get("adapter_name")) for m in metas for p in phrases(m).values() if p in prompt]
    phrase, adapter = max(found, key=lambda x: len(x[0])) if found else (None, None)
    return Region(place, prompt.strip(), phrase=phrase, adapter=adapter)


def prompt_concepts(prompt: str, metas: list[dict]) -> list[tuple[str, str | None]]:
    """(phrase, adapter name) of every learned concept the prompt names, in the prompt's order: what ``--fix auto``
    places. A clear error when fewer than two are named."""
    found = [(prompt.find(p), p, m.get("adapter_name")) for m in metas for p in phrases(m).values() if p in prompt]
    if len(found) < 2:
        said = ", ".join(repr(p) for m in metas for p in phrases(m).values()) or "none (give --adapter folders)"
        raise ValueError(f"--fix auto places two or more learned concepts named in the prompt; {'only one is' if found else 'none is'} "
                         f"named in {prompt!r}. Name each adapter's concept in the prompt (they are written {said}), "
                         "e.g. --prompt 'a cpd woman and a tkb man'")
    return [(p, ad) for _, p, ad in sorted(found)]


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="generate images from a prompt (with learned concepts, regions and a fix)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--out", required=True, help="output image file (PNG); several images get _0, _1, ...")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--model", default=None, help="local pipeline folder or hub id (default: embedded tiny model)")
    g.add_argument("--steps", type=int, default=25)
    g.add_argument("--guidance", type=float, default=5.0)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--device", default=None)
    g.add_argument("--adapter", action="append", default=[],
                   help="folder written by `train`: applies the learned concept (repeat for several)")
    g.add_argument("--region", action="append", default=[],
                   help="PLACE=SUB-PROMPT, one per concept: a named region (left, right, top-left, middle-third, ...) "
                        "or a box x0,y0,x1,y1 in [0, 1]; e.g. --region 'left=a cpd woman on the left'")
    g.add_argument("--fix", choices=list(FIXES), action="append", default=None,
                   help="inference: each region drawn by its own pass, adapter and sub-prompt (passes.INFERENCE_FIX; "
                        "for Textual Inversion's tokens at full guidance, passes.inference_fix); "
                        "single: attention masks in one UNet pass (masking.SINGLE_PASS_FIX); "
                        "auto: no --region needed, the model's attention chooses each concept's half, then the passes "
                        "(layout.auto_generate; the prompt names each --adapter's concept, e.g. 'a cpd woman and a tkb "
                        "man'); "
                        "wide: three or more concepts on a canvas wide enough that each --region gets a window of the "
                        "model's size, each pass drawn on its window (passes.WINDOW_FIX, canvas_for; regions such as "
                        "left-third, or the quadrants); "
                        "layers: a place behind the others: one --region 'background=a rgs house' (its adapter "
                        "alone draws the whole frame), the people by their passes, their silhouettes in front "
                        "(extent.place_generate); "
                        "none: the plain prompt; repeat to compare (e.g. --fix none --fix inference --sheet)")
    g.add_argument("--sheet", action="store_true",
                   help="write every image into one numbered PNG: a row per --fix, a column per seed, at 2x size")
    g.set_defaults(run=_generate)


def _generate(a) -> None:
    pipe = load_pipeline(a.model, device=a.device)
    metas = []
    if a.adapter:
        metas = load_adapters(pipe, a.adapter)
        for meta in metas:
            for phrase in phrases(meta).values():
                if phrase not in a.prompt:
                    print(f"note: {meta['concept']} is written {phrase!r} in prompts", file=sys.stderr)
    fixes = a.fix or ["none"]
    for fix in ("inference", "single", "wide", "layers"):
        if fix in fixes and not a.region:
            raise ValueError(f"--fix {fix} needs one --region per concept, e.g. --region 'left=a cpd woman on the left'")
    regions = [parse_region(r, metas) for r in a.region]
    rows = []
    for fix in fixes:
        if fix == "auto":
            named = prompt_concepts(a.prompt, metas)
            rows.append(auto_generate(pipe, a.prompt, [p for p, _ in named], adapters=[ad for _, ad in named],
                                      seed=[a.seed + i for i in range(a.num_images)], steps=a.steps,
                                      fix=inference_fix(metas[0]["method"]), guidance_scale=a.guidance).images)
        elif fix == "layers":
            rows.append(place_generate(pipe, a.prompt, regions, seeds=[a.seed + i for i in range(a.num_images)],
                                       steps=a.steps, guidance_scale=a.guidance).images)
        elif regions:
            native = pipe.unet.config.sample_size * pipe.vae_scale_factor
            canvas = dict(zip(("height", "width"), canvas_for([r.where for r in regions], native))) if fix == "wide" else {}
            method = metas[0]["method"] if metas else None
            chosen = inference_fix(method) if FIXES[fix] is INFERENCE_FIX else FIXES[fix]
            rows.append(regional_generate(pipe, a.prompt, regions, fix=chosen, steps=a.steps, **canvas,
                                          seed=[a.seed + i for i in range(a.num_images)], guidance_scale=a.guidance))
        else:
            rows.append(generate(pipe, a.prompt, seed=a.seed, steps=a.steps, guidance_scale=a.guidance,
                                 negative_prompt=a.negative_prompt, num_images=a.num_images))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if a.sheet:
        calibration.contact_sheet([im for row in rows for im in row], cols=a.num_images).save(out)
        print(out)
        return
    images = [im for row in rows for im in row]
    names = [f"{out.stem}{f'_{fix}' if len(fixes) > 1 else ''}{f'_{i}' if a.num_images > 1 else ''}{out.suffix}"
             for fix in fixes for i in range(a.num_images)]
    for im, name in zip(images, names):
        im.save(out.with_name(name))
        print(out.with_name(name))


# ----------------------------------------------------------------------------- train


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="teach the model a concept (Textual Inversion, HyperNetwork, DreamBooth, LoRA)")
    t.add_argument("--method", required=True, choices=list(METHODS))
    t.add_argument("--concept", required=True, action="append",
                   help="folder of 4-8 images (or a shipped concept's name, e.g. koala); repeat to train several "
                        "concepts jointly (dreambooth, lora)")
    t.add_argument("--identifier", default=None, help="the rare word before the class word (default: made from "
                                                      "the concept's name, so concepts differ)")
    t.add_argument("--fix", choices=["none", "training"], default="none",
                   help="training: masked loss + attention loss (+ Seg-Mix composites for several concepts)")
    t.add_argument("--out", required=True, help="folder for checkpoints, the saved adapter and adapter.json")
    t.add_argument("--steps", type=int, default=None, help="default: the method's")
    t.add_argument("--lr", type=float, default=None, help="default: the method's")
    t.add_argument("--batch-size", type=int, default=None, help="default: the method's")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--model", default=None, help="base pipeline folder or hub id (default: embedded tiny model)")
    t.add_argument("--checkpoint-every", type=int, default=50)
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    t.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                   help="fp16 on a GPU (autocast; weights stay float32); default: accelerate's setting, else no")
    t.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute activations in the backward pass: less GPU memory, the same result, slower "
                        "(one more forward pass); default: on for a CUDA GPU with under 20 GB")
    t.add_argument("--use-8bit-adam", action="store_true", default=None,
                   help="AdamW with 8-bit moments (needs bitsandbytes and a CUDA GPU): DreamBooth on SD 1.5 in 16 GB; "
                        "default: on for a CUDA GPU with under 20 GB when bitsandbytes is installed")
    t.set_defaults(run=_train)


def _train(a) -> None:
    pipe = load_pipeline(a.model, device="cpu", dtype=torch.float32)  # accelerate moves it to the GPU if any
    settings = {"identifier": a.identifier} if a.identifier else {}
    concept = a.concept[0] if len(a.concept) == 1 else a.concept
    reg = training_fix(len(a.concept), a.method) if a.fix == "training" else Regularizers()
    accelerator = None
    if a.mixed_precision:  # otherwise accelerate's own setting (`accelerate launch --mixed_precision fp16`), or none
        from accelerate import Accelerator

        accelerator = Accelerator(mixed_precision=a.mixed_precision)
    r = train_concept(pipe, concept, a.method, out=a.out, steps=a.steps, lr=a.lr, batch_size=a.batch_size,
                      seed=a.seed, checkpoint_every=a.checkpoint_every, resume=a.resume, regularizers=reg,
                      accelerator=accelerator, gradient_checkpointing=a.gradient_checkpointing,
                      use_8bit_adam=a.use_8bit_adam, **settings)
    if not r.meta:  # not the main process of several (accelerate launch): it prints nothing
        return
    print(f"{r.method}: {len(r.losses)} steps, final loss {r.losses[-1]:.4f}, {r.seconds:.0f} s; files in {r.out}")
    model = f" --model {a.model}" if a.model else ""
    print(f'use it: mcteach generate{model} --adapter {r.out} --prompt "a {r.phrase} on the left" --out image.png')


def _add_fuse(sub) -> None:
    f = sub.add_parser("fuse", help="fuse several LoRAs into one adapter that draws every concept (methods.fusion)",
                       description=fusion.__doc__, formatter_class=RAW)
    f.add_argument("--adapter", required=True, action="append", help="a LoRA folder (mcteach train); two or more")
    f.add_argument("--out", required=True, help="folder for the fused LoRA and its adapter.json")
    f.add_argument("--rank", type=int, default=None, help="default: the sum of the LoRAs' ranks")
    f.add_argument("--model", default=None, help="the base pipeline they were trained on (default: embedded)")
    f.set_defaults(run=_fuse)


def _fuse(a) -> None:
    out = fusion.fuse_loras(load_pipeline(a.model, device="cpu", dtype=torch.float32), a.adapter, a.out, rank=a.rank)
    said = " and ".join(f"a {p}" for m in [read_adapter(out)] for p in phrases(m).values())
    print(f"fused {len(a.adapter)} LoRAs into {out}")
    print(f'use it: mcteach generate --adapter {out} --prompt "{said}" --fix auto --out image.png')


# ----------------------------------------------------------------------------- bench


def _add_world(p, help_text: str) -> None:
    p.add_argument("--world", choices=sorted(scenes.WORLDS), default=None, help=help_text)


def _add_bench(sub) -> None:
    b = sub.add_parser("bench", help="the benchmarks: the methods, the mixing fixes, the base model")
    verbs = b.add_subparsers(dest="bench", required=True)

    m = verbs.add_parser("methods", help="fidelity, position, training time and prior drift of the four methods",
                         description=bench_methods.__doc__, formatter_class=RAW)
    m.add_argument("--methods", nargs="*", default=None, help="default: all four")
    m.add_argument("--concepts", nargs="*", default=None,
                   help="default: every folder in data/concepts; 'variants': the fresh VARIANTS, rendered under --work")
    m.add_argument("--drift-concepts", nargs="*", default=list(bench_methods.DRIFT_CONCEPTS))
    m.add_argument("--controls", nargs="*", default=list(bench_methods.CONTROLS),
                   help=f"base classes for the frozen-UNet control (default {list(bench_methods.CONTROLS)}; none: skip)")
    m.add_argument("--ceiling", nargs="*", default=list(bench_methods.CEILING_CONCEPTS),
                   help=f"concepts for the frozen-UNet ceiling (default {list(bench_methods.CEILING_CONCEPTS)}; "
                        "none: skip)")
    m.add_argument("--seeds", type=int, default=8)
    m.add_argument("--model", default=None, help="base pipeline (default: the embedded tiny model)")
    m.add_argument("--work", type=Path, default=bench_methods.DEFAULT_WORK, help="trained adapters (a cache)")
    m.add_argument("--judge", type=Path, default=None, help="judge weights (default: the shipped judge)")
    _add_world(m, "the base model's world, for a --model trained on another one")
    m.add_argument("--out", type=Path, default=None, help="JSON report (rows already there are skipped)")
    m.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override a default in the method x concept rows, e.g. --set num_vectors=4 steps=800")
    m.add_argument("--shard", default="0/1", metavar="I/N",
                   help="run only every N-th job, from the I-th (N processes, each with its own --out)")
    m.add_argument("--merge", nargs="+", type=Path, default=None, metavar="FILE",
                   help="join the reports of several shards into --out, then print its tables")
    m.add_argument("--markdown", action="store_true", help="only print the tables of --out (and write its page)")
    m.add_argument("--rescore", action="store_true",
                   help="score the rows of --out again with --judge, from the adapters under --work (no training)")
    m.set_defaults(run=_bench_methods)

    x = verbs.add_parser("mixing", help="every method x every fix x each concept pair, judged per instance",
                         description=bench_mixing.__doc__, formatter_class=RAW)
    x.add_argument("--methods", nargs="+", default=list(bench_mixing.BENCH_METHODS), choices=list(bench_mixing.BENCH_METHODS),
                   help="fused_lora: the LoRAs trained one by one, fused into one adapter (methods.fusion)")
    x.add_argument("--fixes", nargs="+", default=list(bench_mixing.FIXES), choices=bench_mixing.FIXES)
    x.add_argument("--pairs", nargs="+", default=list(bench_mixing.CONCEPT_PAIRS),
                   choices=list(bench_mixing.CONCEPT_PAIRS))
    x.add_argument("--seeds", type=int, default=16)
    x.add_argument("--quick", action="store_true", help="LoRA on the couple, fixes none and inference, 8 seeds")
    x.add_argument("--no-triple", action="store_true", help="skip three concepts in one image")
    x.add_argument("--out", type=Path, default=None, help="the JSON report (rows already there are kept)")
    x.add_argument("--work", type=Path, default=bench_mixing.DEFAULT_WORK, help="trained adapters (a cache)")
    x.add_argument("--save-images", type=Path, default=None, help="write every judged image here")
    x.add_argument("--model", default=None, help="base pipeline (default: the embedded tiny model)")
    x.add_argument("--judge", type=Path, default=None, help="judge weights (default: the shipped judge)")
    _add_world(x, "the base model's world, for a --model trained on another one")
    x.add_argument("--json", action="store_true", help="print the report as one JSON object")
    x.add_argument("--ablation", action="store_true", help="also compare every inference fix on LoRA and the couple")
    x.add_argument("--timing", action="store_true", help="also time the single-pass masks (tiny and SD 1.5-size UNet)")
    x.add_argument("--sweep", type=Path, nargs="?", const=BENCH_SWEEP, default=None, metavar="FILE",
                   help="only the sweep of where single-pass masks act (notebook 07), into FILE "
                        "(default data/bench_sweep.json; 8 seeds per prompt)")
    x.add_argument("--costs", type=Path, nargs="?", const=BENCH_COSTS, default=None, metavar="FILE",
                   help="only the seconds per image of every inference fix on the couple, measured in one run, into "
                        "FILE (default data/bench_costs.json)")
    x.add_argument("--kinds", type=Path, nargs="?", const=BENCH_KINDS, default=None, metavar="FILE",
                   help="only the couple with a place (global) and with a wearable (nested), LoRA (notebook 09), into "
                        "FILE (default data/bench_kinds.json)")
    x.add_argument("--place", nargs="+", default=list(bench_kinds.PLACES),
                   help=f"with --kinds: places, shipped sets' names or folders (default {' '.join(bench_kinds.PLACES)})")
    x.add_argument("--wearable", nargs="+", default=list(bench_kinds.WEARABLES),
                   help=f"with --kinds: wearables, shipped sets' names or folders (default "
                        f"{' '.join(bench_kinds.WEARABLES)})")
    x.add_argument("--couple", nargs=2, default=list(bench_kinds.COUPLE), metavar="PERSON",
                   help="with --kinds: the two people, shipped names or concept folders (the first wears the item)")
    x.add_argument("--rejudge", type=Path, default=None, metavar="DIR",
                   help="judge the rows of --out again, position-free, from the images --save-images wrote into DIR")
    x.add_argument("--only-extras", action="store_true", help="run only --ablation / --timing, not the table")
    x.add_argument("--merge", nargs="+", type=Path, default=None,
                   help="merge these reports (e.g. two processes run with different --methods) into --out")
    x.add_argument("--markdown", action="store_true", help="print the tables (of --out if it exists; and write its page)")
    x.add_argument("--gpu-report", action="store_true",
                   help="on a CUDA GPU: each method's peak memory and step time, and the masks' cost, at SD 1.5 size")
    x.add_argument("--sampling-ratio", nargs="+", default=None, metavar="MODEL",
                   help="time sampling per image of these pipelines in turns ('embedded' = the shipped one)")
    x.set_defaults(run=_bench_mixing)

    e = verbs.add_parser("base", help="the base model alone: single objects (centre, positioned) and pairs",
                         description=metrics.__doc__, formatter_class=RAW)
    e.add_argument("--model", default=None, help="base pipeline (default: the embedded tiny model)")
    e.add_argument("--seeds", type=int, default=4)
    e.add_argument("--pairs", type=int, default=60)
    e.add_argument("--pair-seeds", type=int, default=2)
    e.add_argument("--steps", type=int, default=25)
    e.add_argument("--guidance", type=float, default=5.0)
    e.add_argument("--out", type=Path, default=None,
                   help="write the full report as JSON (a folder: <folder>/eval_base.json)")
    e.add_argument("--judge", type=Path, default=None, help="judge weights (default: the shipped judge)")
    _add_world(e, "the classes to measure (default: the base model's)")
    e.add_argument("--markdown", action="store_true", help="only print the tables of --out (and write its page)")
    e.set_defaults(run=_bench_base)


def _bench_methods(a) -> None:
    for name in ("drift_concepts", "controls", "ceiling"):  # "--controls none" skips, as an empty "--controls" does
        if getattr(a, name) == ["none"]:
            setattr(a, name, [])
    out = a.out or BENCH_METHODS
    if a.merge:
        atomic_save(json.dumps(bench_methods.merge([json.loads(f.read_text()) for f in a.merge]), indent=1) + "\n",
                    out, write_text)
        a.markdown = True
    if a.markdown:
        print(bench_methods.write_page(json.loads(out.read_text()), out))
        return
    if a.rescore:
        if not out.is_file():
            raise SystemExit("--rescore needs --out: the report whose rows to score again")
        report = bench_methods.rescore(json.loads(out.read_text()), judge.Judge.load(a.judge or JUDGE_PATH), a.work,
                                       a.model, a.judge)
        atomic_save(json.dumps(report, indent=1) + "\n", out, write_text)
        print(bench_methods.write_page(report, out))
        return
    if a.concepts == ["variants"]:
        a.concepts = [str(folder) for folder in bench_methods.variant_sets(a.work)]
    controls = {name: bench_methods.CONTROLS.get(name, "cat") for name in a.controls}
    i, _, n = a.shard.partition("/")
    if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
        raise SystemExit(f"--shard takes I/N with 0 <= I < N, e.g. --shard 0/2; got {a.shard!r}")
    report = bench_methods.run(a.methods, a.concepts, a.seeds, a.work, a.model, a.drift_concepts, controls, a.out,
                               bench_methods.parse_settings(a.set), (int(i), int(n)), a.ceiling, judge_path=a.judge,
                               world=a.world)
    print(bench_methods.markdown(report))


def _bench_mixing(a) -> int:
    if a.sampling_ratio:
        models = [None if m == "embedded" else m for m in a.sampling_ratio]
        print(json.dumps(bench_mixing.sampling_ratio(models), indent=1))
        return 0
    if a.gpu_report:
        if not torch.cuda.is_available():
            print("error: --gpu-report needs a CUDA GPU", file=sys.stderr)
            return 2
        report = bench_mixing.gpu_report()
        print(json.dumps(report, indent=1) if a.json else bench_mixing.gpu_table(report))
        return 0
    if a.kinds and a.merge:
        print(bench_kinds.write(bench_kinds.merge([json.loads(f.read_text()) for f in a.merge]), a.kinds))
        return 0
    if a.merge:
        reports = [json.loads(f.read_text()) for f in a.merge]
        atomic_save(json.dumps(bench_mixing.merge(reports), indent=1) + "\n", a.out or BENCH_MIXING, write_text)
        return 0
    if a.markdown and not a.quick and (a.out or BENCH_MIXING).is_file() and not (a.ablation or a.timing):
        out = a.out or BENCH_MIXING
        print(bench_mixing.write_page(json.loads(out.read_text()), out))
        return 0
    if a.sweep:
        bench = bench_mixing.Bench(a.work, model=a.model, progress=lambda m: print(m, file=sys.stderr),
                                   judge_path=a.judge, world=a.world)
        report = bench_mixing.sweep_report(bench, log=lambda m: print(m, file=sys.stderr))
        atomic_save(json.dumps(report, indent=1) + "\n", a.sweep, write_text)
        print(f"wrote {a.sweep}")
        return 0
    if a.kinds:
        report = bench_kinds.run(a.seeds, a.place, a.wearable, save_images=a.save_images,
                                 log=lambda m: print(m, file=sys.stderr), couple=a.couple)
        print(bench_kinds.write(report, a.kinds))
        return 0
    if a.rejudge:
        out = a.out or BENCH_MIXING
        report = bench_mixing.rejudge(json.loads(out.read_text()), a.rejudge, a.judge,
                                      log=lambda m: print(m, file=sys.stderr))
        atomic_save(json.dumps(report, indent=1) + "\n", out, write_text)
        print(bench_mixing.write_page(report, out))
        return 0
    if a.costs:
        bench = bench_mixing.Bench(a.work, model=a.model, progress=lambda m: print(m, file=sys.stderr),
                                   judge_path=a.judge, world=a.world)
        atomic_save(json.dumps(bench_mixing.cost_report(bench), indent=1) + "\n", a.costs, write_text)
        print(f"wrote {a.costs}")
        return 0
    if a.quick:
        a.methods, a.fixes, a.pairs, a.seeds, a.no_triple = ["lora"], ["none", "inference"], ["couple"], 8, True
    if a.only_extras:
        report = json.loads(a.out.read_text()) if a.out and a.out.is_file() else {"rows": []}
    else:
        report = bench_mixing.run(a.methods, a.fixes, a.pairs, a.seeds, a.work, a.out, triple=not a.no_triple,
                                  base=not a.quick, save_images=a.save_images, model=a.model, judge_path=a.judge,
                                  world=a.world)
    if a.ablation:
        bench = bench_mixing.Bench(a.work, a.seeds, model=a.model, save_images=a.save_images,
                                   progress=lambda m: print(m, file=sys.stderr), judge_path=a.judge, world=a.world)
        report["ablation"] = bench_mixing.ablation(bench)
    if a.timing:
        report["timing"] = bench_mixing.timing_report()
    if a.out and (a.ablation or a.timing):
        atomic_save(json.dumps(report, indent=1) + "\n", a.out, write_text)
    if a.json:
        keys = ("method", "fix", "pair", "success", "swap", "neglect", "duplication", "blend", "fidelity", "train_s",
                "image_s", "n")
        print(json.dumps({"rows": [{k: r[k] for k in keys} for r in report["rows"]]}))
    if a.markdown:
        print(bench_mixing.markdown(report))
    return 0


def _bench_base(a) -> None:
    if a.markdown:
        out = a.out or EVAL_BASE
        print(metrics.write_page(json.loads(out.read_text()), out))
        return
    if a.out is not None and a.out.is_dir():  # checked before the long run, so its result is never lost
        a.out = a.out / "eval_base.json"
    report = metrics.evaluate_base(a.model, a.seeds, a.pairs, a.pair_seeds, a.steps, a.guidance, a.out, a.judge,
                                   scenes.WORLDS[a.world] if a.world else None)
    print(metrics.markdown(report))


# ----------------------------------------------------------------------------- judge


def _add_judge(sub) -> None:
    j = sub.add_parser("judge", help="the judge: train, evaluate, finetune on labelled images, pair, calibrate",
                       description=judge.__doc__, formatter_class=RAW)
    verbs = j.add_subparsers(dest="judge_command", required=True)
    for name, help_text in (("train", "train a judge on renders of the world (and blobs)"),
                            ("evaluate", "a judge's accuracy on held-out renders, written beside its weights"),
                            ("finetune", "finetune a judge on labelled sets of generated images"),
                            ("pair", "a colour judge times a grey judge (the shipped judge's design)")):
        v = verbs.add_parser(name, help=help_text)
        v.add_argument("--out", type=Path, default=JUDGE_PATH, help="weights; accuracy goes beside it (.json)")
        v.add_argument("--seed", type=int, default=0)
        if name in ("train", "finetune"):
            v.add_argument("--steps", type=int, default=800)
        if name == "train":
            _add_world(v, "the classes to judge (default: the base model's)")
            v.add_argument("--failures-from", default=None, metavar="MODEL",
                           help="also train 'unrecognisable' on this generator's 2-step images (cached beside --out)")
            v.add_argument("--grey", action="store_true", help="a judge of the luminance only (shapes, not colours)")
        if name in ("finetune", "pair"):
            v.add_argument("--base", type=Path, default=None,
                           help="finetune: the judge to start from; pair: the colour judge")
        if name == "finetune":
            v.add_argument("--labelled", type=Path, nargs="+", required=True,
                           help="labelled sets of generated images (judge calibrate folders)")
        if name == "pair":
            v.add_argument("--shape", type=Path, default=None, help="the grey judge (train --grey, then finetune)")
            v.add_argument("--weight", type=float, default=1.0, help="the grey judge's weight in the product")
        v.set_defaults(run=_judge)
    _add_calibrate(verbs)


def _judge(a) -> None:
    info_path = a.out.with_suffix(".json")
    if a.judge_command == "pair":
        if a.base is None or a.shape is None:
            raise SystemExit("pair needs --base (the colour judge) and --shape (the grey judge)")
        j = judge.Judge.load(a.base).with_shape(judge.Judge.load(a.shape), a.weight)
        j.save(a.out)

        def recipe(path: Path):
            return json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").is_file() else str(path)

        info = {"colour": recipe(a.base), "shape": recipe(a.shape), "weight": a.weight, **judge.report(j)}
    elif a.judge_command == "finetune":
        images, items = [], []
        for folder in a.labelled:
            more_images, more_items = calibration.load(folder)
            images, items = images + more_images, items + more_items
        t0 = time.time()
        j = judge.finetune(judge.Judge.load(a.base or JUDGE_PATH), images, [it.region for it in items],
                           [it.label for it in items], steps=a.steps, seed=a.seed)
        j.save(a.out)
        info = {"finetuned_from": str(a.base or JUDGE_PATH), "labelled": [str(f) for f in a.labelled],
                "steps": a.steps, "seed": a.seed, "train_minutes": round((time.time() - t0) / 60, 1), **judge.report(j)}
    elif a.judge_command == "train":
        t0 = time.time()
        classes = scenes.world_classes(a.world)
        failures = None
        if a.failures_from:
            bank = a.out.with_name(a.out.stem + "_failures.pt")
            if not bank.exists():
                atomic_save(judge.failure_bank(a.failures_from, classes=classes), bank)
            failures = torch.load(bank, weights_only=True)
        j = judge.train(a.steps, a.seed, labels=judge.labels_for(classes), failures=failures, grey=a.grey)
        minutes = round((time.time() - t0) / 60, 1)
        j.save(a.out)
        info = {"steps": a.steps, "seed": a.seed, "train_minutes": minutes, "world": a.world or "base",
                "failures_from": a.failures_from, "grey": a.grey,
                "parameters": sum(q.numel() for q in j.parameters()), **judge.report(j)}
    else:
        j = judge.Judge.load(a.out)
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        info.update(judge.report(j))
    atomic_save(json.dumps(info, indent=1) + "\n", info_path, write_text)
    print(json.dumps(info, indent=1))


def _add_calibrate(verbs) -> None:
    c = verbs.add_parser("calibrate", help="the judge against the eye: hand-labelled sets of generated images",
                         description=calibration.__doc__, formatter_class=RAW)
    c.add_argument("step", choices=["generate", "mine", "sample", "sheet", "agreement", "rate"])
    c.add_argument("folder", type=Path)
    c.add_argument("--out", type=Path, default=Path("sheet.png"), help="sheet: the contact sheet to write")
    c.add_argument("--tau", type=float, default=None, help="default: the best threshold on this set")
    c.add_argument("--judge", type=Path, default=None, help="judge weights (default: the shipped judge)")
    c.add_argument("--model", default=None, help="generate: a base model's images only (e.g. a new export)")
    _add_world(c, "generate --model, mine, sample: its classes")
    c.add_argument("-n", type=int, default=200, help="generate --model, mine, sample: how many images")
    c.add_argument("--per-class", type=int, default=6, help="mine: images generated per class")
    c.add_argument("--adapters", type=Path, default=None,
                   help="generate: the full set (base model + the couple's adapters) with the adapters in this folder "
                        "(laid out as data/adapters, e.g. written by methods.shipped.retrain_shipped) on --model")
    c.add_argument("--seed", type=int, default=5000, help="mine, sample: the mine's first seed")
    c.add_argument("--mined", type=Path, default=None,
                   help="sample: the mined set (its population's other images are sampled); rate: the census")
    c.add_argument("--population", type=int, default=None, help="rate: the mined population's size (classes x per class)")
    c.set_defaults(run=_calibrate)


def _calibrate(a) -> None:
    classes = scenes.WORLDS[a.world] if a.world else None
    if a.step == "generate":
        if a.adapters:
            items = calibration.generate_set(a.folder, model=a.model, adapters=a.adapters, classes=classes)
        elif a.model:
            items = calibration.generate_base_set(a.folder, a.model, classes, a.n)
        else:
            items = calibration.generate_set(a.folder)
        print(f"{len(items)} items -> {a.folder} (labels: what each prompt asked; correct them by eye)")
        return
    if a.step == "mine":
        items = calibration.mine_set(a.folder, a.model, classes, a.per_class, a.n, a.seed, a.judge)
        print(f"the {len(items)} most doubtful images -> {a.folder} (labels: what each prompt asked; correct them by eye)")
        return
    if a.step == "sample":
        if a.mined is None:
            raise SystemExit("sample needs --mined: the mine_set folder whose population to sample")
        items = calibration.sample_rest(a.folder, a.mined, a.n, a.model, classes, a.per_class, a.seed)
        print(f"{len(items)} images the judge was sure of -> {a.folder} (labels: what each prompt asked; check by eye)")
        return
    images, items = calibration.load(a.folder)
    if a.step == "rate":
        if a.mined is None or a.population is None:
            raise SystemExit("rate needs --mined (the labelled census) and --population; the folder is the sample")
        print(json.dumps(calibration.stratified_rate(calibration.load(a.mined)[1], items, a.population), indent=1))
    elif a.step == "sheet":
        calibration.contact_sheet(images, [it.region for it in items]).save(a.out)
        print(f"{len(images)} images -> {a.out}")
    else:
        j = judge.Judge.load(a.judge or JUDGE_PATH)
        tau = a.tau if a.tau is not None else calibration.best_tau(j, images, items)
        print(json.dumps(calibration.agreement(j, images, items, tau), indent=1))


# ----------------------------------------------------------------------------- pretrain, concepts, course


def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="train the tiny Stable Diffusion from scratch on the emoji world",
                       description=pretrain.__doc__, formatter_class=RAW)
    p.add_argument("step", choices=["train", "export", "status"])
    p.add_argument("--work", type=Path, default=pretrain.DEFAULT_WORK, help="checkpoints and samples")
    p.add_argument("--out", type=Path, default=pretrain.DEFAULT_OUT, help="where export writes the pipeline")
    p.add_argument("--world", choices=sorted(scenes.WORLDS), default="broad", help="the classes to train on")
    p.add_argument("--vae-architecture", choices=sorted(tiny.ARCHITECTURES), default="tiny-sharp")
    p.add_argument("--init", type=Path, default=None,
                   help="start the UNet and text encoder from this exported pipeline (e.g. data/tiny-sd)")
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--unet-steps", type=int, default=20000)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--sample-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=None,
                   help="processes rendering batches ahead (default: 0 on a CPU, all cores but two on a GPU)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds: checkpoint and stop after this long (the same command resumes)")
    p.set_defaults(run=_pretrain)


def _pretrain(a) -> None:
    deadline = time.time() + a.time_limit if a.time_limit else None
    if a.workers is None:
        a.workers = max(0, (os.cpu_count() or 1) - 2) if a.device.startswith("cuda") else 0
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.step == "status":
        print(json.dumps(pretrain.status(a.work), indent=1))
        return
    if a.step == "export":
        print(f"exported to {pretrain.export(a.work, a.out, a.seed)}")
        return
    a.work.mkdir(parents=True, exist_ok=True)
    recipe = pretrain.check_recipe(a.work, {"world": a.world, "vae_architecture": a.vae_architecture,
                                            "init": str(a.init.resolve()) if a.init else None, "seed": a.seed})
    try:
        pretrain.train_all(a.work, recipe, vae_steps=a.vae_steps, vae_batch=a.vae_batch, vae_lr=a.vae_lr,
                           kl_weight=a.kl_weight, unet_steps=a.unet_steps, batch=a.batch, lr=a.lr,
                           ckpt_every=a.ckpt_every, sample_every=a.sample_every, seed=a.seed, device=a.device,
                           workers=a.workers, deadline=deadline)
    except pretrain.TimeLimit as stop:
        print(f"stopped at the time limit after {stop} (checkpointed); run the same command to go on", flush=True)


def _add_concepts(sub) -> None:
    c = sub.add_parser("concepts", help="render the held-out concepts' few-shot sets")
    c.add_argument("step", choices=["make"])
    c.add_argument("--out", type=Path, default=CONCEPTS_DIR)
    c.add_argument("-n", type=int, default=6, help="images per concept")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--kinds", action="store_true",
                   help="the places and wearables of mcteach.world.kinds instead (give --out: not data/concepts)")

    def run(a):
        if a.kinds and a.out == CONCEPTS_DIR:
            raise SystemExit("--kinds renders places and wearables: give an --out folder of their own")
        for folder in (kinds.make_kind_sets if a.kinds else make_concept_sets)(a.out, n=a.n, seed=a.seed):
            print(folder)
    c.set_defaults(run=run)


def _add_course(sub) -> None:
    c = sub.add_parser("course", help="execute every notebook top to bottom on the embedded model, outputs kept",
                       description=course.__doc__, formatter_class=RAW)
    c.add_argument("prefixes", nargs="*", help="run only notebooks whose file name starts with one of these")
    c.add_argument("--sync", action="store_true", help="only rewrite the Colab badges and install cells")
    c.add_argument("--no-stamp", action="store_true",
                   help="keep the headers' times (for a run that shares the CPU with other work)")
    c.set_defaults(run=lambda a: course.run(a.prefixes, sync_only=a.sync, stamp=not a.no_stamp))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mcteach", description=__doc__, formatter_class=RAW)
    sub = p.add_subparsers(dest="command", required=True, metavar="VERB")
    for add in (_add_generate, _add_train, _add_fuse, _add_bench, _add_judge, _add_pretrain, _add_concepts, _add_course):
        add(sub)
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    try:
        return a.run(a) or 0
    except (ModelNotAvailable, ValueError, ImportError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

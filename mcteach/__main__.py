"""Command line::

    python -m mcteach generate --prompt "a fox on the left" --seed 0 --out fox.png
    python -m mcteach train --method lora --concept data/concepts/koala --out runs/koala-lora
    python -m mcteach generate --adapter runs/koala-lora --prompt "a bbm bear on the left" --out koala.png

Two concepts in one image (notebooks 06-07): one adapter each, one region each, and the fix::

    python -m mcteach generate --adapter runs/woman --adapter runs/man \
        --prompt "a cpd woman on the left and a tkb man on the right" \
        --region "left=a cpd woman on the left" --region "right=a tkb man on the right" --fix inference --out couple.png
    python -m mcteach train --method lora --concept woman_with_red_hair_and_medium_skin \
        --concept man_with_curly_hair_and_light_skin --fix training --out runs/couple   # joint, with the training fix

On a GPU, float16 mixed precision is the default; on one with under 20 GB (a 15 GB T4) so are
``--gradient-checkpointing`` and, where bitsandbytes is installed, ``--use-8bit-adam``. On several GPUs (``--batch-size`` is the global batch,
split between the processes: the same weights as one GPU, up to float rounding)::

    accelerate launch --multi_gpu --num_processes 2 --mixed_precision fp16 -m mcteach train --method lora \
        --model stable-diffusion-v1-5/stable-diffusion-v1-5 --concept data/concepts/koala --lr 1e-4 --out runs/koala
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _generate(a) -> None:
    from .pipeline import generate, load_pipeline

    pipe = load_pipeline(a.model, device=a.device)
    metas = []
    if a.adapter:
        from .methods import load_adapters, phrases

        metas = load_adapters(pipe, a.adapter)
        for meta in metas:
            for phrase in phrases(meta).values():
                if phrase not in a.prompt:
                    print(f"note: {meta['concept']} is written {phrase!r} in prompts", file=sys.stderr)
    if a.region or a.fix != "none":
        images = _regional(pipe, a, metas)
    else:
        images = generate(pipe, a.prompt, seed=a.seed, steps=a.steps, guidance_scale=a.guidance,
                          negative_prompt=a.negative_prompt, num_images=a.num_images)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    for im, p in zip(images, paths):
        im.save(p)
        print(p)


def parse_region(text: str, metas: list[dict]):
    """"left=a cpd woman" or "0,0,0.5,1=a cpd woman" -> a masking.Region; the adapter whose phrase the sub-prompt
    names is bound to it."""
    from .masking import Region, parse_box, NAMED_REGIONS
    from .methods import phrases

    where, sep, prompt = text.partition("=")
    if not sep or not prompt.strip():
        raise ValueError(f"--region {text!r}: write PLACE=SUB-PROMPT, e.g. 'left=a cpd woman on the left' (places: "
                         f"{', '.join(NAMED_REGIONS)}, or a box x0,y0,x1,y1 in [0, 1])")
    where = where.strip()
    place = where if where in NAMED_REGIONS else parse_box(where)
    found = [(p, m.get("adapter_name")) for m in metas for p in phrases(m).values() if p in prompt]
    phrase, adapter = max(found, key=lambda x: len(x[0])) if found else (None, None)
    return Region(place, prompt.strip(), phrase=phrase, adapter=adapter)


def _regional(pipe, a, metas):
    from .masking import INFERENCE_FIX, NO_FIX, regional_generate

    if not a.region:
        raise ValueError("--fix inference needs one --region per concept, e.g. --region 'left=a cpd woman on the left'")
    regions = [parse_region(r, metas) for r in a.region]
    fix = INFERENCE_FIX if a.fix == "inference" else NO_FIX
    seeds = [a.seed + i for i in range(a.num_images)]
    return regional_generate(pipe, a.prompt, regions, fix=fix, seed=seeds, steps=a.steps, guidance_scale=a.guidance)


def _train(a) -> None:
    import torch

    from .methods import train_concept
    from .pipeline import load_pipeline

    from .methods import TRAINING_FIX, Regularizers

    pipe = load_pipeline(a.model, device="cpu", dtype=torch.float32)  # accelerate moves it to the GPU if any
    settings = {"identifier": a.identifier} if a.identifier else {}
    concept = a.concept[0] if len(a.concept) == 1 else a.concept
    reg = TRAINING_FIX if a.fix == "training" else Regularizers()
    if a.fix == "training" and len(a.concept) == 1:  # one concept: no composites to paste
        reg = Regularizers(masked_loss=True, attention_weight=TRAINING_FIX.attention_weight)
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
    print(f'use it: python -m mcteach generate{model} --adapter {r.out} --prompt "a {r.phrase} on the left" '
          "--out image.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mcteach", description="mcteach: multi-concept text-to-image course")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate an image from a prompt")
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
    g.add_argument("--fix", choices=["none", "inference"], default="none",
                   help="inference: each region drawn by its own pass, adapter and sub-prompt (masking.INFERENCE_FIX)")
    t = sub.add_parser("train", help="teach the model a concept (Textual Inversion, HyperNetwork, DreamBooth, LoRA)")
    t.add_argument("--method", required=True, choices=["textual_inversion", "hypernetwork", "dreambooth", "lora"])
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
    a = p.parse_args(argv)
    from .pipeline import ModelNotAvailable

    try:
        if a.command == "generate":
            _generate(a)
        elif a.command == "train":
            _train(a)
    except (ModelNotAvailable, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line::

    python -m mcteach generate --prompt "a fox on the left" --seed 0 --out fox.png
    python -m mcteach train --method lora --concept data/concepts/koala --out runs/koala-lora
    python -m mcteach generate --adapter runs/koala-lora --prompt "a sks bear on the left" --out koala.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _generate(a) -> None:
    from .pipeline import generate, load_pipeline

    pipe = load_pipeline(a.model, device=a.device)
    if a.adapter:
        from .methods import load_adapter

        meta = load_adapter(pipe, a.adapter)
        if meta["phrase"] not in a.prompt:
            print(f"note: this adapter's concept is written {meta['phrase']!r} in prompts", file=sys.stderr)
    images = generate(pipe, a.prompt, seed=a.seed, steps=a.steps, guidance_scale=a.guidance,
                      negative_prompt=a.negative_prompt, num_images=a.num_images)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    for im, p in zip(images, paths):
        im.save(p)
        print(p)


def _train(a) -> None:
    import torch

    from .methods import train_concept
    from .pipeline import load_pipeline

    pipe = load_pipeline(a.model, device="cpu", dtype=torch.float32)  # accelerate moves it to the GPU if any
    r = train_concept(pipe, a.concept, a.method, out=a.out, steps=a.steps, lr=a.lr, batch_size=a.batch_size,
                      seed=a.seed, checkpoint_every=a.checkpoint_every, resume=a.resume)
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
    g.add_argument("--adapter", default=None, help="folder written by `train`: applies the learned concept")
    t = sub.add_parser("train", help="teach the model a concept (Textual Inversion, HyperNetwork, DreamBooth, LoRA)")
    t.add_argument("--method", required=True, choices=["textual_inversion", "hypernetwork", "dreambooth", "lora"])
    t.add_argument("--concept", required=True, help="folder of 4-8 images (or a shipped concept's name, e.g. koala)")
    t.add_argument("--out", required=True, help="folder for checkpoints, the saved adapter and adapter.json")
    t.add_argument("--steps", type=int, default=None, help="default: the method's")
    t.add_argument("--lr", type=float, default=None, help="default: the method's")
    t.add_argument("--batch-size", type=int, default=None, help="default: the method's")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--model", default=None, help="base pipeline folder or hub id (default: embedded tiny model)")
    t.add_argument("--checkpoint-every", type=int, default=50)
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    a = p.parse_args(argv)
    from .pipeline import ModelNotAvailable

    try:
        if a.command == "generate":
            _generate(a)
        elif a.command == "train":
            _train(a)
    except (ModelNotAvailable, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

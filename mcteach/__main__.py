"""Command line: ``python -m mcteach generate --prompt "a fox on the left" --seed 0 --out fox.png``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _generate(a) -> None:
    from .pipeline import generate, load_pipeline

    pipe = load_pipeline(a.model, device=a.device)
    images = generate(pipe, a.prompt, seed=a.seed, steps=a.steps, guidance_scale=a.guidance,
                      negative_prompt=a.negative_prompt, num_images=a.num_images)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    for im, p in zip(images, paths):
        im.save(p)
        print(p)


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
    a = p.parse_args(argv)
    from .pipeline import ModelNotAvailable

    try:
        if a.command == "generate":
            _generate(a)
    except (ModelNotAvailable, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

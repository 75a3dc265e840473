"""DreamBooth (Ruiz et al. 2022): fine-tune the whole UNet on "a [V] bear", with prior preservation.

A rare identifier [V] before the class word names the concept (the paper's "sks"; here one per concept, made from
its name: "bbm" for the koala), so the concept's captions become "a bbm bear on the left". Every UNet weight trains (``text_encoder=True``: the text encoder's too;
the VAE never does). Fine-tuning the whole model on 6 images makes it forget what a plain "bear" looks
like (language drift); prior preservation counters it with class images the *base* model drew for
"a bear", "a bear on the left", ..., kept in the loss with weight lambda:

    L = E || eps - eps_theta(z_t, t, "a [V] bear ...") ||^2 + lambda E || eps' - eps_theta(z'_t, t', "a bear ...") ||^2
        (concept images)                                       (class images x'_0: the base model's samples)

The class alone is not enough here: it keeps "a bear", but the rest of the world is forgotten. After DreamBooth
on the koala with class images only, "a fox", "a rocket" and the other base classes draw koalas or bears: top-1 over
all base classes (seed 0) falls from 0.97 to 0.17 (``data/bench_methods.md``, drift table). ``world_prior=True`` (the
default) adds one prior image per base class of the emoji world ("a fox", "an owl", ...: at most
``world_prior_classes`` = 60 more images, a seeded sample of the world's classes, drawn once) to the class images, in
the manner of the "regularisation images" of community DreamBooth trainers: the koala keeps fidelity 1.00 and the
base classes 0.93. ``world`` names the world whose classes these are (``scenes.WORLDS``; the base model's).
``world_prior=False`` is the paper's prior; ``prior_weight=0`` none. The benchmark's drift table has all three.

The prior images are generated once (seeds ``class_seed*1000 + i``) and cached in
``out/class_images/`` with a ``class_images.json`` saying how; a resumed run reads them back.

Saved files (``out/``): ``unet/`` (and ``text_encoder/``) written by ``save_pretrained`` as fp16
safetensors: the other parts come from the base model, so with plain diffusers

    unet = UNet2DConditionModel.from_pretrained("out/unet", dtype=torch.float32)
    pipe = StableDiffusionPipeline.from_pretrained("data/tiny-sd", unet=unet)   # or load_pipeline(unet=unet)

(``load_adapter(pipe, "out")`` swaps them into a loaded pipeline). The saved weights are the trained
ones rounded to fp16.

Defaults: 800 steps of 2 concept + 2 prior images at lr 3e-4, decayed to 0 on a cosine (``lr_schedule``), the text
encoder trained too, 10 class images and the world's 60, prior weight 1. How they were chosen (fidelity over seeds
0-7, the class prior only, a base model of the 60-class world, ``mcteach pretrain --world classic``):

| UNet only | + text encoder |
|---|---|
| 1e-3 x 600: koala 0.88, hamster 0.12, bearded person 0.62 (over-saturated samples) | 5e-4 x 400: 0.88, 0.75, 0.50 |
| 7e-4 x 400: koala 0.75, hamster 0.00 | 5e-4 x 300: 0.75, 0.38, 0.38 |
| 5e-4 x 800: koala 0.25 ("a bbm bear" still draws bears) | **3e-4 x 600: 1.00, 0.50, 1.00** |

Training the text encoder lets "bbm bear" move away from "bear" without pushing the UNet hard; a high rate instead
burns the samples' colours. At a constant rate the result depends on where training stops (with the world prior the
bearded person scores 0.88 at 600 steps and 0.62 at 800, the hamster 0.62 and 1.00); decayed to 0 on a cosine both
reach 1.00. The shipped model's figures at these defaults: data/bench_methods.md. For SD 1.5, use the usual 5e-6
(``lr=5e-6``).
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from diffusers import UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel

from ..sd.pipeline import generate
from ..world import scenes
from ..world.concepts import POSITION_CYCLE
from .engine import Method, Run


def class_prompts(class_word: str, n: int) -> list[str]:
    """n prompts for the class, cycling through the positions: "a bear", "a bear on the left", ..."""
    return [scenes.caption([(class_word, POSITION_CYCLE[i % len(POSITION_CYCLE)])]) for i in range(n)]


def class_images(pipe, prompts: list[str], folder: Path, *, seed: int = 0, steps: int = 25,
                 guidance_scale: float = 5.0, batch: int = 8) -> list[Image.Image]:
    """The base model's images for ``prompts``, generated once and cached in ``folder`` (NN.png).

    Image i has its own seed (``seed*1000 + i``), so ``batch`` (images per pipeline call) changes the speed, not
    what is drawn: the images agree with those drawn one by one to within one grey level (float rounding)."""
    recipe = {"prompts": prompts, "seed": seed, "steps": steps, "guidance_scale": guidance_scale}
    index = folder / "class_images.json"
    if not (index.is_file() and json.loads(index.read_text(encoding="utf-8")) == recipe):
        folder.mkdir(parents=True, exist_ok=True)
        for start in range(0, len(prompts), batch):
            chunk = range(start, min(start + batch, len(prompts)))
            images = generate(pipe, [prompts[i] for i in chunk], seed=[seed * 1000 + i for i in chunk], steps=steps,
                              guidance_scale=guidance_scale)
            for i, image in zip(chunk, images):
                image.save(folder / f"{i:02d}.png")
        index.write_text(json.dumps(recipe, indent=2) + "\n", encoding="utf-8")
    return [Image.open(folder / f"{i:02d}.png").convert("RGB") for i in range(len(prompts))]  # same pixels either way


def world_prior_sample(classes: list[scenes.Emoji], n: int, seed: int = 0) -> list[scenes.Emoji]:
    """The base classes of the world prior: all of ``classes`` when there are at most ``n``, else a seeded sample of
    ``n`` in the world's order (the same for every concept): 60 images to draw and train on instead of one per class
    (the benchmark's drift table measures what the sample keeps of all of them)."""
    if len(classes) <= n:
        return list(classes)
    keep = set(random.Random(seed).sample(range(len(classes)), n))
    return [e for i, e in enumerate(classes) if i in keep]


@dataclass
class DreamBooth(Method):
    name: ClassVar[str] = "dreambooth"
    steps: int = 800
    lr: float = 3e-4
    batch_size: int = 2
    lr_schedule: str = "cosine"
    identifier: str | None = None  # default: three consonants made from the concept's slug
    text_encoder: bool = True
    prior_weight: float = 1.0  # lambda; 0 turns prior preservation off
    num_class_images: int = 10
    world_prior: bool = True  # also keep the rest of the world: one prior image per base class ("a fox", ...)
    world_prior_classes: int = 60  # at most this many base classes (a seeded sample, the same for every concept)
    world: str = "broad"  # the world (scenes.WORLDS) whose classes make the world prior: the base model's
    class_steps: int = 25  # sampling steps for the class images
    class_seed: int = 0  # the class images use seeds class_seed*1000 + i
    class_batch: int = 8  # class images per UNet call (speed only)

    def phrase(self, concept) -> str:
        return f"{self.identifier_for(concept)} {self.class_word_for(concept)}"

    def prior(self, pipe, concept, out):
        if self.prior_weight == 0 or self.num_class_images == 0:
            return [], [], 0.0
        words = dict.fromkeys(self.class_word_for(c) for c in (concept.parts or [concept]))  # joint: each class
        prompts = [p for w in words for p in class_prompts(w, self.num_class_images)]
        if self.world_prior:
            world = world_prior_sample(scenes.world_classes(self.world), self.world_prior_classes)
            prompts += [scenes.caption([(e, "centre")]) for e in world]
        images = class_images(pipe, prompts, Path(out) / "class_images", seed=self.class_seed, steps=self.class_steps,
                              batch=self.class_batch)
        return images, prompts, self.prior_weight

    def setup(self, pipe, concept):
        pipe.unet.requires_grad_(True)
        if self.text_encoder:
            pipe.text_encoder.requires_grad_(True)
        return Run()

    def save(self, pipe, folder, concept, step, run: Run):
        files = {"unet": "unet"}
        if self.text_encoder:
            files["text_encoder"] = "text_encoder"
        for part in files:  # a half-precision copy: the pipeline keeps its float32 weights
            copy.deepcopy(getattr(pipe, part)).half().save_pretrained(folder / part, safe_serialization=True)
        return {"files": files}

    @staticmethod
    def load(pipe, folder, meta):
        classes = {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel}
        for part, sub in meta["files"].items():
            model = classes[part].from_pretrained(Path(folder) / sub, dtype=pipe.unet.dtype)
            setattr(pipe, part, model.to(pipe.device))

"""Train the tiny Stable Diffusion from scratch on the emoji world.

    mcteach pretrain train            # tokenizer -> VAE -> UNet + text encoder (resumable)
    mcteach pretrain export           # EMA weights -> data/tiny-sd (fp16 safetensors)
    mcteach pretrain status           # where a run stands: steps, losses, the VAE's error

The recipe (the world, the VAE architecture, where the UNet starts from) is fixed on the first
``train`` of a work folder and checked on every resume, so a resumed run cannot silently change it.

Stages, as in Stable Diffusion:
1. tokenizer: byte-level BPE with one token per caption word (``tiny.build_tokenizer``);
2. VAE: AutoencoderKL, loss = alpha-weighted L1 reconstruction + beta * KL; afterwards the
   latent ``scaling_factor`` is set to 1/std so the UNet sees ~unit-variance latents;
3. UNet + CLIP text encoder, jointly: epsilon prediction on
   ``z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps`` with min-SNR-5 weighting, 10% empty
   captions (so classifier-free guidance works), and an EMA of the weights that is exported.

Everything lives under ``--work`` (default ``~/.cache/mcteach/pretrain``): checkpoints are written
atomically every ``--ckpt-every`` steps and training resumes from the last one; the data stream is
a pure function of the step, so a resumed run sees the same batches. Sample grids go to
``WORK/samples``. Interrupt at any time; ``export`` takes the latest checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..files import atomic_save, write_text
from ..paths import CACHE, CONCEPTS_DIR, DATA
from ..world import scenes
from . import parts, tiny

DEFAULT_WORK = CACHE / "pretrain"
DEFAULT_OUT = DATA / "tiny-sd"
SAMPLE_PROMPTS = [
    "a fox",
    "a red apple on the left",
    "a cat on the left and a dog on the right",
    "a woman at the top and a man at the bottom",
    "a rocket on the right",
    "a panda",
    "a frog on the left and a lion on the right",
    "a banana at the top and a guitar at the bottom",
]


def scene_batch(step: int, batch_size: int, seed: int, classes=None):
    """Batch number ``step`` of the world (``classes``, default the base classes): images in [-1, 1]
    (B,3,64,64), masks (B,64,64), captions."""
    drawn = [scenes.random_scene(seed * 10**9 + step * batch_size + i, classes) for i in range(batch_size)]
    images = np.stack([np.asarray(s.image, dtype=np.float32) / 127.5 - 1.0 for s in drawn])
    masks = np.stack([s.masks.max(axis=0) for s in drawn])
    return (
        torch.from_numpy(images).permute(0, 3, 1, 2),
        torch.from_numpy(masks),
        [s.caption for s in drawn],
    )


class _SceneBatches(torch.utils.data.Dataset):
    """Batches ``start .. steps-1`` of the world, for a DataLoader's worker processes."""

    def __init__(self, start, steps, batch_size, seed, classes):
        self.start, self.steps, self.batch_size, self.seed, self.classes = start, steps, batch_size, seed, classes

    def __len__(self):
        return max(0, self.steps - self.start)

    def __getitem__(self, i):
        return scene_batch(self.start + i, self.batch_size, self.seed, self.classes)


def scene_batches(start: int, steps: int, batch_size: int, seed: int, classes=None, workers: int = 0):
    """``scene_batch(step)`` for step in ``start .. steps-1``, rendered ahead by ``workers`` processes (a GPU
    eats batches faster than one core renders them; the stream is the same for any number of workers)."""
    if workers <= 0:
        for step in range(start, steps):
            yield scene_batch(step, batch_size, seed, classes)
        return
    yield from torch.utils.data.DataLoader(_SceneBatches(start, steps, batch_size, seed, classes), batch_size=None,
                                           num_workers=workers, prefetch_factor=4)


class TimeLimit(Exception):
    """Raised after a stage checkpointed because ``--time-limit`` ran out; the same command resumes."""


def _out_of_time(deadline: float | None) -> bool:
    return deadline is not None and time.time() > deadline


def _lr(step: int, base: float, warmup: int, total: int | None = None) -> float:
    """Linear warm-up, then constant (``total=None``) or cosine decay to 10% at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    if total is None:
        return base
    return base * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))))


def train_tokenizer(work: Path, classes=None):
    path = work / "tokenizer"
    if not (path / "tokenizer.json").exists():
        tiny.build_tokenizer(scenes.vocabulary_words(classes or scenes.BASE_CLASSES)).save_pretrained(path)
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(path)


def autocast(device: str, enabled: bool = True):
    """bfloat16 autocast: ~3x faster VAE steps on CPUs with AMX/AVX512-BF16 (measured), and on GPUs."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


def concept_images(root: Path | None = None) -> torch.Tensor:
    """The shipped concept images (held-out renders, never in training) as (N, 3, 64, 64) in [-1, 1]."""
    from PIL import Image

    root = root or CONCEPTS_DIR
    files = sorted(f for f in root.glob("*/*.png") if not f.stem.endswith("_mask"))
    arrays = [np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


@torch.no_grad()
def reconstruction_error(vae, images: torch.Tensor) -> float:
    """Mean absolute error, in 0-255 units, of decode(encode(images).mean) (images in [-1, 1])."""
    p = next(vae.parameters())
    x = images.to(p.device, p.dtype)
    rec = torch.cat([vae.decode(vae.encode(b).latent_dist.mean).sample for b in x.split(32)]).clamp(-1, 1)
    return float((rec - x).abs().mean() * 127.5)


def train_vae(work: Path, tokenizer, steps: int, batch_size: int, lr: float, kl_weight: float,
              ckpt_every: int, seed: int, classes=None, architecture: str = "tiny", device: str = "cpu",
              bf16: bool = False, eval_every: int = 250, workers: int = 0, deadline: float | None = None):
    vae, *_ = tiny.build_components(tokenizer, seed=seed, architecture=architecture)
    vae.to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    ckpt, start, log = work / "vae.pt", 0, []
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True, map_location=device)
        vae.load_state_dict(state["model"])
        if "opt" in state:  # a slim checkpoint (weights only) restarts the optimiser's moments
            opt.load_state_dict(state["opt"])
        start, log = state["step"], state.get("log", [])
    if start >= steps:
        return vae
    latent_dims = 4 * 16 * 16
    held_out = concept_images()
    bar = tqdm(range(start, steps), desc="VAE", initial=start, total=steps, mininterval=10)
    t0, running = time.time(), []
    for step, (x, alpha, _) in zip(bar, scene_batches(start, steps, batch_size, seed + 1, classes, workers)):
        g = torch.Generator().manual_seed(seed * 7919 + step)
        x, alpha = x.to(device), alpha.to(device)
        with autocast(device, bf16):
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(device)
            rec = vae.decode(z).sample.float()
        weight = 1.0 + 3.0 * alpha[:, None]  # objects matter more than the plain background
        rec_loss = (weight * (rec - x).abs()).mean() + F.mse_loss(rec, x)
        kl = post.kl().float().mean() / latent_dims
        loss = rec_loss + kl_weight * kl
        for group in opt.param_groups:
            group["lr"] = _lr(step, lr, 50, steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        running.append(rec_loss.item())
        bar.set_postfix(rec=f"{rec_loss.item():.4f}", kl=f"{kl.item():.3f}", refresh=False)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            vae.eval()
            log.append({"step": step + 1, "rec": float(np.mean(running[-eval_every:])),
                        "held_out_mae": reconstruction_error(vae, held_out), "time": time.time() - t0})
            vae.train()
            print(f"VAE {log[-1]}", flush=True)
        late = _out_of_time(deadline)
        if (step + 1) % ckpt_every == 0 or step + 1 == steps or late:
            atomic_save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1, "log": log}, ckpt)
        if late:
            raise TimeLimit(f"VAE step {step + 1}")
    return vae


@torch.no_grad()
def set_scaling_factor(vae, seed: int, classes=None) -> float:
    """Set ``vae.config.scaling_factor`` = 1 / std of latents over 512 world images (SD's recipe)."""
    p = next(vae.parameters())
    zs = torch.cat([vae.encode(scene_batch(10_000 + i, 64, seed, classes)[0].to(p.device)).latent_dist.mean
                    for i in range(8)])
    factor = float(1.0 / zs.std())
    vae.register_to_config(scaling_factor=factor)
    return factor


def _step(ckpt: Path) -> int:
    return torch.load(ckpt, weights_only=True, map_location="cpu")["step"] if ckpt.exists() else 0


def _ema_update(ema, model, decay: float):
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def encode_prompts(tokenizer, text_encoder, captions):
    return text_encoder(parts.tokenize(tokenizer, captions).to(text_encoder.device))[0]


def init_from_pipeline(path, tokenizer, text_encoder, unet) -> int:
    """Start the UNet and text encoder from an exported pipeline (e.g. the shipped ``data/tiny-sd``).

    The UNet is copied whole; the text encoder too, except its token embeddings, which are matched
    by token string (the vocabularies differ between worlds): rows of tokens the old model knew
    keep their embedding, new words keep their fresh initialisation. Returns how many rows were kept.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(path)
    unet.load_state_dict(UNet2DConditionModel.from_pretrained(path, subfolder="unet").float().state_dict())
    old_te = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").float()
    old_vocab = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer").get_vocab()
    state = old_te.state_dict()
    key = next(k for k in state if k.endswith("embeddings.token_embedding.weight"))
    old_rows = state.pop(key)
    missing, unexpected = text_encoder.load_state_dict(state, strict=False)
    if unexpected or missing != [key]:
        raise ValueError(f"{path} has another text encoder architecture: missing {missing}, unexpected {unexpected}")
    rows, kept = text_encoder.get_input_embeddings().weight, 0
    with torch.no_grad():
        for token, i in tokenizer.get_vocab().items():
            if token in old_vocab:
                rows[i] = old_rows[old_vocab[token]]
                kept += 1
    return kept


def train_unet(work: Path, tokenizer, vae, steps: int, batch_size: int, lr: float, ckpt_every: int,
               sample_every: int, seed: int, p_uncond: float = 0.1, snr_gamma: float = 5.0,
               classes=None, init: Path | None = None, warmup: int = 200, device: str = "cpu",
               bf16: bool = False, vae_bf16: bool = False, workers: int = 0, deadline: float | None = None):
    _, text_encoder, unet, scheduler = tiny.build_components(tokenizer, seed=seed)
    ckpt = work / "unet.pt"
    if init is not None and not ckpt.exists():
        init_from_pipeline(init, tokenizer, text_encoder, unet)
    unet.to(device), text_encoder.to(device)
    vae.requires_grad_(False).eval().to(device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    ema_unet, ema_te = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    start, log, warm_from = 0, [], 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True, map_location=device)
        unet.load_state_dict(state["unet"]), text_encoder.load_state_dict(state["text_encoder"])
        ema_unet.load_state_dict(state["ema_unet"]), ema_te.load_state_dict(state["ema_text_encoder"])
        start, log = state["step"], state.get("log", [])
        if "opt" in state:
            opt.load_state_dict(state["opt"])
        else:  # a slim checkpoint (weights only): fresh moments, so warm the rate up again
            warm_from = start
    abar = scheduler.alphas_cumprod
    snr = abar / (1 - abar)
    loss_weight = (torch.clamp(snr, max=snr_gamma) / snr).to(device)  # min-SNR weighting for epsilon targets
    bar = tqdm(range(start, steps), desc="UNet", initial=start, total=steps, mininterval=10)
    t0, running = time.time(), []
    for step, (x, _, captions) in zip(bar, scene_batches(start, steps, batch_size, seed + 2, classes, workers)):
        g = torch.Generator().manual_seed(seed * 104729 + step)
        drop = torch.rand(batch_size, generator=g) < p_uncond
        captions = ["" if d else c for c, d in zip(captions, drop)]
        with torch.no_grad(), autocast(device, vae_bf16):
            post = vae.encode(x.to(device)).latent_dist
            eps = torch.randn(post.mean.shape, generator=g).to(device)
            z0 = ((post.mean + post.std * eps) * vae.config.scaling_factor).float()
        noise = torch.randn(z0.shape, generator=g).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=g)
        zt = scheduler.add_noise(z0, noise, t.to(device))
        t = t.to(device)
        with autocast(device, bf16):
            pred = unet(zt, t, encode_prompts(tokenizer, text_encoder, captions)).sample.float()
        loss = (loss_weight[t] * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        for group in opt.param_groups:
            group["lr"] = _lr(step - warm_from, lr, warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.998, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay), _ema_update(ema_te, text_encoder, decay)
        running.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(running[-50:]):.4f}", refresh=False)
        if (step + 1) % 50 == 0:
            log.append({"step": step + 1, "loss": float(np.mean(running[-50:])), "time": time.time() - t0,
                        "batch": batch_size, "device": str(device)})
        late = _out_of_time(deadline)
        if (step + 1) % ckpt_every == 0 or step + 1 == steps or late:
            atomic_save({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                         "ema_unet": ema_unet.state_dict(), "ema_text_encoder": ema_te.state_dict(),
                         "opt": opt.state_dict(), "step": step + 1, "log": log}, ckpt)
        if (step + 1) % sample_every == 0:
            pipe = assemble(tokenizer, vae, ema_te, ema_unet)
            pipe.set_progress_bar_config(disable=True)
            save_sample_grid(pipe, work / "samples" / f"step{step + 1:06d}.png", sample_prompts(classes))
        if late:
            raise TimeLimit(f"UNet step {step + 1}")
    return ema_unet, ema_te


def sample_prompts(classes=None) -> list[str]:
    """The sample grid's prompts; for another world, 8 of its own prompts of the same shapes."""
    if classes is None or classes is scenes.CLASSIC_CLASSES:
        return SAMPLE_PROMPTS
    import random

    rng, prompts = random.Random(0), []
    for layout in ("centre", "left", ("left", "right"), ("top", "bottom")) * 2:
        if isinstance(layout, str):
            prompts.append(scenes.caption([(rng.choice(classes), layout)]))
        else:
            a, b = rng.sample(classes, 2)
            prompts.append(scenes.caption([(a, layout[0]), (b, layout[1])]))
    return prompts


def assemble(tokenizer, vae, text_encoder, unet):
    """A StableDiffusionPipeline from the parts (no safety checker: the world is emoji)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**tiny.SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


@torch.no_grad()
def save_sample_grid(pipe, path: Path, prompts=SAMPLE_PROMPTS, seed: int = 0):
    from PIL import Image

    images = pipe(prompts, num_inference_steps=25, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(seed)).images
    grid = Image.new("RGB", (64 * len(images), 64))
    for i, im in enumerate(images):
        grid.paste(im, (64 * i, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.resize((grid.width * 2, 128), Image.NEAREST).save(path)


def load_stages(work: Path, seed: int = 0):
    """Tokenizer, VAE (with scaling factor) and EMA UNet/text encoder from the latest checkpoints."""
    tokenizer = train_tokenizer(work)
    recipe = json.loads((work / "recipe.json").read_text()) if (work / "recipe.json").exists() else {}
    vae, text_encoder, unet, _ = tiny.build_components(tokenizer, seed=seed)
    if recipe.get("vae_architecture", "tiny") != "tiny":
        vae = tiny.build_components(tokenizer, seed=seed, architecture=recipe["vae_architecture"])[0]
    vae.load_state_dict(torch.load(work / "vae.pt", weights_only=True)["model"])
    vae.register_to_config(scaling_factor=json.loads((work / "vae_scaling.json").read_text())["scaling_factor"])
    state = torch.load(work / "unet.pt", weights_only=True)
    unet.load_state_dict(state["ema_unet"])
    text_encoder.load_state_dict(state["ema_text_encoder"])
    return assemble(tokenizer, vae, text_encoder, unet), state


def export(work: Path, out: Path, seed: int = 0) -> Path:
    """Write the EMA pipeline to ``out`` as fp16 safetensors, with the training log."""
    pipe, state = load_stages(work, seed)
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    (out / "training_log.json").write_text(json.dumps({"unet_steps": state["step"], "log": state["log"]}))
    recipe = json.loads((work / "recipe.json").read_text()) if (work / "recipe.json").exists() else {}
    classes = scenes.WORLDS[recipe.get("world", "classic")]
    counts = {c: sum(e.category == c for e in classes) for c in ("person", "animal", "food", "object")}
    params = {k: sum(p.numel() for p in getattr(pipe, k).parameters()) / 1e6 for k in ("vae", "text_encoder", "unet")}
    (out / "README.md").write_text(MODEL_CARD.format(
        steps=state["step"], scaling=pipe.vae.config.scaling_factor, n=len(classes), world=recipe.get("world", "classic"),
        batches=_batches(state["log"], state["step"]), **counts, **{f"{k}_m": v for k, v in params.items()}))
    return out


def _batches(log: list[dict], total: int) -> str:
    """" (3567 steps of batch 256 on cuda)" from a UNet log (entries every 50 steps; older logs lack the batch)."""
    runs, last = [], 0
    for entry in log:
        key = (entry.get("batch"), entry.get("device"))
        if runs and runs[-1][0] == key:
            runs[-1][1] += entry["step"] - last
        else:
            runs.append([key, entry["step"] - last])
        last = entry["step"]
    if runs:
        runs[-1][1] += total - last  # the steps after the last log entry
    if not any(b for (b, _), _ in runs):
        return ""
    return " (" + ", then ".join(f"{n} steps" + (f" of batch {b} on {d}" if b else "") for (b, d), n in runs) + ")"


MODEL_CARD = """# tiny-sd: the mcteach course's embedded Stable Diffusion

A Stable Diffusion pipeline (diffusers `StableDiffusionPipeline`: CLIPTokenizer, CLIPTextModel,
UNet2DConditionModel with cross-attention, AutoencoderKL, DDIMScheduler) at laptop size: 64x64 RGB
images, 16x16x4 latents (VAE {vae_m:.1f}M parameters, scaling factor {scaling:.4f}), a 3-layer CLIP text encoder
({text_encoder_m:.1f}M), a {unet_m:.1f}M-parameter UNet. Trained by `mcteach pretrain train` on rendered
scenes of the "{world}" world: {n} Noto Color Emoji classes ({person} people, {animal} animals, {food} foods,
{object} objects), one or two per image ("a fox on the left and a red apple on the right"). The weights are the
EMA of the UNet and text encoder after {steps} steps{batches}, stored in fp16.

    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained("data/tiny-sd")
    image = pipe("a cat on the left and a dog on the right", num_inference_steps=25, guidance_scale=5.0).images[0]

It knows only its world: captions built from the class names and the positions left/right/top/bottom. Its
images are derived from Noto Color Emoji (images Apache-2.0, font OFL-1.1); see ../NOTICE.md. Measured quality:
the repository README (`mcteach bench base`).
"""


RECIPE_KEYS = ("world", "vae_architecture", "init", "seed")


def bf16_is_fast(device: str) -> bool:
    """bfloat16 pays on GPUs and on CPUs with AMX (the VAE's convolutions: 3x per step, measured);
    the tiny UNet gains nothing from it on a CPU, so it stays float32 there."""
    if device.startswith("cuda"):
        return True
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "amx_bf16" in flags


def check_recipe(work: Path, recipe: dict) -> dict:
    """Write ``recipe`` on a work folder's first run; on later runs, refuse a different one. Where the
    UNet starts from (``init``) may still change until the UNet stage has begun."""
    path = work / "recipe.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if not (work / "unet.pt").exists() and saved.get("init") != recipe["init"]:
            saved["init"] = recipe["init"]
            atomic_save(json.dumps(saved, indent=1) + "\n", path, write_text)
        diff = {k: (saved.get(k), recipe[k]) for k in RECIPE_KEYS if saved.get(k) != recipe[k]}
        if diff:
            raise SystemExit(
                f"{work} holds a run with another recipe {diff} (saved, asked). Resume it with the saved "
                f"options, or start a new run with --work <another folder>."
            )
        return saved
    atomic_save(json.dumps(recipe, indent=1) + "\n", path, write_text)
    return recipe


def status(work: Path) -> dict:
    """Where the run in ``work`` stands: its recipe, the VAE and UNet steps, the last losses."""
    out = {"work": str(work)}
    if (work / "recipe.json").exists():
        out["recipe"] = json.loads((work / "recipe.json").read_text())
    for stage in ("vae", "unet"):
        if (work / f"{stage}.pt").exists():
            state = torch.load(work / f"{stage}.pt", weights_only=True, map_location="cpu")
            out[f"{stage}_step"] = state["step"]
            if state.get("log"):
                out[f"{stage}_last_log"] = state["log"][-1]  # VAE: rec, held_out_mae; UNet: loss
    return out


def train_all(work: Path, recipe: dict, *, vae_steps: int, vae_batch: int, vae_lr: float, kl_weight: float,
              unet_steps: int, batch: int, lr: float, ckpt_every: int, sample_every: int, seed: int, device: str,
              workers: int = 0, deadline: float | None = None) -> None:
    """The three stages in order, each resuming from its checkpoint in ``work``: tokenizer, VAE (then its latent
    scaling factor), UNet + text encoder. ``recipe`` is ``check_recipe``'s; TimeLimit at ``deadline``."""
    classes = scenes.WORLDS[recipe["world"]]
    tokenizer = train_tokenizer(work, classes)
    vae_bf16 = bf16_is_fast(device)
    vae = train_vae(work, tokenizer, vae_steps, vae_batch, vae_lr, kl_weight, ckpt_every, seed,
                    classes, recipe["vae_architecture"], device, vae_bf16, workers=workers, deadline=deadline)
    scaling, vae_step = work / "vae_scaling.json", _step(work / "vae.pt")  # the weights' step, not --vae-steps
    saved = json.loads(scaling.read_text()) if scaling.exists() else {}
    if saved.get("vae_step", vae_step) != vae_step or not saved:
        if (work / "unet.pt").exists():
            raise SystemExit(f"the VAE in {work} changed (step {saved.get('vae_step')} -> {vae_step}) after the UNet "
                             "stage began on its latents: train the UNet in a new --work folder")
        saved = {"scaling_factor": set_scaling_factor(vae, seed, classes), "vae_step": vae_step}
        atomic_save(json.dumps(saved) + "\n", scaling, write_text)
    vae.register_to_config(scaling_factor=json.loads(scaling.read_text())["scaling_factor"])
    print(f"VAE scaling factor {vae.config.scaling_factor:.4f}", flush=True)
    train_unet(work, tokenizer, vae, unet_steps, batch, lr, ckpt_every, sample_every, seed,
               classes=classes, init=recipe["init"], device=device,
               bf16=device.startswith("cuda"), vae_bf16=vae_bf16, workers=workers, deadline=deadline)

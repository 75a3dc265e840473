"""The training engine the four methods share: one loop, one loss, resumable, on ``accelerate``.

Every method fine-tunes *some* parameters theta of the same noise predictor
``eps_theta(z_t, t, c) = UNet(z_t, t, TextEncoder(prompt))`` with the same objective
(Stable Diffusion's, as in ``mcteach.sd.pretrain.train_unet`` but without min-SNR weighting)::

    z_0 = s (mu + sigma n),  n ~ N(0, I)     VAE posterior sample of a concept image (B, 4, 16, 16); s = scaling_factor
    z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps,   eps ~ N(0, I),  t ~ U{0, ..., 999}
    L   = mean_b mean_chw  w (eps_theta(z_t, t, c_b) - eps)^2,   w = 1 + mask_weight * m
        + prior_weight * (the same on class images)               DreamBooth's prior preservation only

``m`` is the concept's mask averaged down to the latent grid (B, 1, 16, 16): ``mask_weight=0`` (the
default) is the plain loss, ``mask_weight > 0`` weights the object's pixels more (the masked-loss
lesson). The prompt ``c_b`` is the concept's caption with its name replaced by the method's phrase:
"a koala on the left" becomes "a <koala> on the left" (Textual Inversion) or "a bbm bear on the left"
(DreamBooth, LoRA), so the position words keep their meaning.

The optimizer is AdamW (no weight decay) with gradients clipped to norm 1; the rate is constant, or decays to 0 on a
cosine (``lr_schedule="cosine"``, DreamBooth's default), a pure function of the step.

What differs between methods is *which* parameters train (``Method.setup``) and how they are saved
(``Method.save``); ``train`` freezes the VAE, text encoder and UNet first, so everything a method does
not switch on stays bit-identical.

Determinism and resuming: every random draw of step k (which images, the VAE sample, eps, t) comes from a
generator seeded by (seed, k), so the data stream is a pure function of the step. A
checkpoint (``out/checkpoints/last.pt``, written atomically every ``checkpoint_every`` steps) holds the
trainable parameters, the optimizer state, the step, the seed and torch's global RNG states (used only
by dropout, off by default); ``resume=True`` continues from it and reaches the same final weights as a
run that was never interrupted (bit for bit on CPU).

The same code runs on CPU, one GPU, or several with ``accelerate launch``: the trainable parts are one
module (``Denoiser``) that ``Accelerator.prepare`` places and, with several processes, wraps in DDP.
``batch_size`` is the *global* batch: with n processes every one makes step k's draws for all ``batch_size``
examples and keeps its own slice (process i: examples i*b ... (i+1)*b - 1, b = batch_size / n, and the same slice
of the class images), and DDP averages the n gradients of the slice means, which is the gradient of the global
mean. So n processes train to the weights of one, up to the order of float sums (measured in
``tests/test_accelerate.py``); only the attention loss is normalised per slice, not over the whole batch.
Train in float32 (``load_pipeline(..., dtype=torch.float32)``); for half precision on a GPU pass
``accelerator=Accelerator(mixed_precision="fp16")`` (autocast), as diffusers' training scripts do.

Memory on a small GPU (SD 1.5 on a 15 GB Colab T4), two switches as in diffusers' scripts:
``gradient_checkpointing=True`` keeps only the inputs of the UNet's blocks (and of a training text encoder's layers)
and recomputes the rest in the backward pass (the same gradients, one more forward pass of time);
``use_8bit_adam=True`` keeps AdamW's two moments in 8 bits (``bitsandbytes.optim.AdamW8bit``): 2 bytes per trained
parameter instead of 8, what DreamBooth (983M parameters with the text encoder) needs to fit.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from PIL import Image
from tqdm.auto import tqdm

from ..files import atomic_save, write_text
from ..sd import parts
from ..sd.attention import record_attention, token_indices
from ..world import kinds, scenes
from ..world.concepts import Concept, compose, load_concept

IDENTIFIER_LETTERS = "bcdfghjklmnpqrstvwxz"  # consonants only: no English word, several tokens in any tokenizer


def default_identifier(slug: str) -> str:
    """Three consonants derived from ``slug`` ("koala" -> the same word on every machine): a rare identifier
    of one's own per concept (DreamBooth's "sks" for everyone cannot tell two concepts apart)."""
    digest = hashlib.sha256(slug.encode("utf-8")).digest()
    return "".join(IDENTIFIER_LETTERS[b % len(IDENTIFIER_LETTERS)] for b in digest[:3])


@dataclass(kw_only=True)
class Run:
    """One training run's state, returned by ``Method.setup`` and handed back to ``after_step`` and ``save``; kept
    apart from the method's settings, which are data (``adapter.json``), as peft keeps ``LoraConfig`` apart from
    the layers. ``module``: trained weights the pipeline does not own (the hypernetwork), else None. Methods
    with more state subclass it."""

    module: torch.nn.Module | None = None


@dataclass
class Method:
    """What a method tells the engine. Subclasses are dataclasses: their fields are the method's settings and
    nothing else (written to ``adapter.json``), including the default ``steps``, ``lr`` and ``batch_size``; what
    one run creates lives in the ``Run`` that ``setup`` returns."""
    name: ClassVar[str]
    #: fields that set how training runs, not what is learned: adapter.json records the values used under "training"
    schedule_fields: ClassVar[tuple[str, ...]] = ("steps", "lr", "batch_size")
    steps: int = 500
    lr: float = 1e-3
    batch_size: int = 2
    lr_schedule: str = "constant"  # or "cosine": lr * (1 + cos(pi * step / steps)) / 2, to 0 at the end
    class_word: str | None = None  # default: the concept's (concept.json)

    def settings(self) -> dict:
        """The method's own settings (adapter.json's "training" has the steps, lr and batch size used)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init and f.name not in self.schedule_fields}

    def schedule(self, concepts: int = 1) -> tuple[int, int]:
        """The default (steps, batch size) for training ``concepts`` concepts at once (one, unless joint)."""
        return self.steps, self.batch_size

    def class_word_for(self, concept: Concept) -> str:
        word = self.class_word or concept.class_word
        if not word:
            raise ValueError(f"{self.name} needs the concept's class word (e.g. 'bear' for a koala): "
                             f"{concept.folder} has no concept.json with one; pass class_word=...")
        return word

    def phrase(self, concept: Concept) -> str:
        """What stands for the concept in prompts ("<koala>", "kqz bear")."""
        raise NotImplementedError

    def identifier_for(self, concept: Concept) -> str:
        """The rare word before the class word (DreamBooth, LoRA): the ``identifier`` setting, else one made
        from the concept's slug, so two concepts trained with the defaults answer to different words."""
        return getattr(self, "identifier", None) or default_identifier(concept.slug)

    def setup(self, pipe, concept: Concept) -> Run:
        """Switch on ``requires_grad`` for what trains (adding it to the pipeline first if it is new); return the
        run's state (``Run.module``: a module the pipeline does not own, e.g. the hypernetwork)."""
        raise NotImplementedError

    def after_step(self, run: Run) -> None:
        """Called after each optimizer step (Textual Inversion restores the frozen embedding rows)."""

    def prior(self, pipe, concept: Concept, out: Path) -> tuple[list, list[str], float]:
        """Class images, their prompts and the prior-preservation weight; none by default."""
        return [], [], 0.0

    def save(self, pipe, folder: Path, concept: Concept, step: int, run: Run) -> dict:
        """Write the method's files to ``folder``; return what ``adapter.json`` should add (file names...)."""
        raise NotImplementedError

    @staticmethod
    def load(pipe, folder: Path, meta: dict) -> None:
        """Apply what ``save`` wrote to ``pipe`` (``meta``: the folder's adapter.json)."""
        raise NotImplementedError


class Denoiser(torch.nn.Module):
    """eps_theta(z_t, t, ids) = unet(z_t, t, text_encoder(ids)): every trainable part in one module,
    so that ``accelerate`` can place it (and wrap it in DDP). ``extra``: a module the pipeline's
    processors use (the hypernetwork)."""

    def __init__(self, unet, text_encoder, extra: torch.nn.Module | None = None):
        super().__init__()
        self.unet, self.text_encoder, self.extra = unet, text_encoder, extra

    def forward(self, z_t, t, input_ids):
        return self.unet(z_t, t, self.text_encoder(input_ids)[0]).sample


@dataclass
class Examples:
    """Training examples encoded once: VAE posteriors, masks on the latent grid, token ids; for the attention
    loss, each concept's mask and the positions of its tokens (K concept slots; an example without concept k
    has an all-zero slot k)."""
    mean: torch.Tensor  # (N, 4, h, w)
    std: torch.Tensor  # (N, 4, h, w)
    masks: torch.Tensor  # (N, 1, h, w) in [0, 1]: the union of the concepts' masks (ones: no mask)
    input_ids: torch.Tensor  # (N, T)
    scaling_factor: float
    regions: torch.Tensor | None = None  # (N, K, h, w): concept k's mask
    tokens: torch.Tensor | None = None  # (N, K, T) bool: concept k's token positions

    def sample(self, n: int, generator: torch.Generator):
        """n examples drawn with replacement: z_0 (n, 4, h, w), masks, ids, regions, tokens."""
        idx = torch.randint(len(self.mean), (n,), generator=generator)
        noise = torch.randn(self.mean[idx].shape, generator=generator)
        z0 = (self.mean[idx] + self.std[idx] * noise) * self.scaling_factor
        pick = lambda x: None if x is None else x[idx]  # noqa: E731
        return z0, self.masks[idx], self.input_ids[idx], pick(self.regions), pick(self.tokens)


@dataclass
class TrainResult:
    method: str
    phrase: str  # write this in prompts: "a <koala> on the left"
    losses: list[float]  # one per step, from step 0 (a resumed run includes the earlier ones)
    out: Path
    meta: dict = field(default_factory=dict)  # what was written to out/adapter.json (meta["files"]: the saved files)
    seconds: float = 0.0  # this call's wall time
    step_seconds: list[float] = field(default_factory=list)  # each of this call's steps (synchronised by loss.item())


def base_fingerprint(pipe) -> dict:
    """What identifies the base model an adapter was trained on: its architecture and a checksum of the
    UNet's first convolution (no method changes it; another checkpoint of the same architecture does)."""
    unet, te = pipe.unet, pipe.text_encoder
    return {"sample_size": unet.config.sample_size, "cross_attention_dim": unet.config.cross_attention_dim,
            "block_out_channels": list(unet.config.block_out_channels), "text_hidden_size": te.config.hidden_size,
            "conv_in_sum": round(float(unet.conv_in.weight.detach().double().sum()), 4)}


def tokenize(pipe, prompts: list[str]) -> torch.Tensor:
    """(N, T) ids, padded to the tokenizer's length; multi-vector TI tokens expanded as the pipeline does."""
    return parts.tokenize(pipe.tokenizer, pipe.maybe_convert_prompt(prompts, pipe.tokenizer))


#: pixels the VAE encodes in one call (4 images of 512 px; every set of 64 px images at once): one 128-channel
#: float32 activation of its encoder is 134 MB per 512 px image, so DreamBooth's 70 prior images in one call would
#: not fit a 15 GB GPU
ENCODE_PIXELS = 4 * 512 * 512


@torch.no_grad()
def encode_examples(pipe, images, prompts: list[str], masks=None, regions=None, phrases=None) -> Examples:
    """Encode images once (the VAE is frozen). ``masks``: one (size, size) array per image, the pixels that
    belong to the concept(s); None means the whole image (all ones: the masked loss is then the plain loss).
    ``regions``: per image, one (size, size) mask per concept slot (None where a concept is absent), and
    ``phrases`` the slots' phrases, whose tokens the attention loss pulls onto those masks."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    chunk = max(1, ENCODE_PIXELS // (size * size))  # 256 images at 64 px (never split), 4 at 512 px
    means, stds = [], []
    for start in range(0, len(images), chunk):
        x = parts.images_to_tensor(images[start:start + chunk], size, Image.LANCZOS)
        post = pipe.vae.encode(x.to(pipe.vae.device, pipe.vae.dtype)).latent_dist
        means.append(post.mean.float().cpu())
        stds.append(post.std.float().cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    latent = mean.shape[-2:]
    down = lambda a: F.interpolate(torch.from_numpy(np.stack(a)).float()[:, None], size=latent, mode="area")  # noqa: E731
    m = torch.ones(len(images), 1, *latent) if masks is None else down(masks)
    ids = tokenize(pipe, prompts)
    regs = toks = None
    if regions is not None:
        blank = np.zeros((size, size), np.float32)
        regs = torch.stack([down([blank if r is None else r for r in per])[:, 0] for per in regions])
        toks = torch.zeros(len(images), len(phrases), ids.shape[1], dtype=torch.bool)
        for i, (prompt, per) in enumerate(zip(prompts, regions)):
            for k, (phrase, r) in enumerate(zip(phrases, per)):
                if r is not None:
                    toks[i, k, token_indices(pipe.tokenizer, pipe.maybe_convert_prompt(prompt, pipe.tokenizer),
                                             pipe.maybe_convert_prompt(phrase, pipe.tokenizer))] = True
    return Examples(mean, std, m, ids, float(pipe.vae.config.scaling_factor), regs, toks)


def training_captions(concept: Concept, phrase: str) -> list[str]:
    """The concept's captions with its name replaced by ``phrase`` ("a koala on the left" -> "a <koala> on
    the left"); "a <phrase>" for a folder without captions."""
    return [c.replace(concept.name, phrase) for c in concept.captions or [f"a {concept.name}"] * len(concept)]


@torch.no_grad()
def denoising_loss(pipe, concept: Concept | str | Path, phrase: str, timesteps: int = 48, seed: int = 0,
                   parts: int = 4) -> tuple[float, list[float]]:
    """How well ``phrase`` explains a concept's images to ``pipe`` (with whatever adapter it carries): the training
    loss, made repeatable. Each image (its caption with the concept's name replaced by ``phrase``) is noised at
    ``timesteps`` evenly spaced t with noise fixed by ``seed``, the same for every phrase; returns the mean squared
    error of the predicted noise and its mean over ``parts`` equal ranges of t, nearly clean first. For example
    ``denoising_loss(pipe, "koala", "bear")`` is what the class word already explains, and the same call with
    "<koala>" on a pipeline carrying the learned word is what training reached."""
    concept = concept if isinstance(concept, Concept) else load_concept(concept)
    if timesteps % parts:
        raise ValueError(f"timesteps ({timesteps}) must split into {parts} equal parts")
    ex = encode_examples(pipe, concept.images, training_captions(concept, phrase))
    n, device = len(ex.mean), pipe.unet.device
    z0 = (ex.mean * ex.scaling_factor).repeat_interleave(timesteps, 0)
    t = torch.linspace(0, pipe.scheduler.config.num_train_timesteps - 1, timesteps).long().repeat(n)
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed))
    z_t = pipe.scheduler.add_noise(z0, eps, t)
    ids = ex.input_ids.repeat_interleave(timesteps, 0)
    model, errors = Denoiser(pipe.unet, pipe.text_encoder), []
    for i in range(0, len(z0), 64):
        pred = model(z_t[i:i + 64].to(device, pipe.unet.dtype), t[i:i + 64].to(device), ids[i:i + 64].to(device))
        errors.append((pred.float().cpu() - eps[i:i + 64]).pow(2).mean(dim=(1, 2, 3)))
    per_t = torch.cat(errors).view(n, timesteps).mean(0)
    return float(per_t.mean()), [float(x) for x in per_t.view(parts, -1).mean(1)]


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The CPU generator of one step: a pure function of (seed, step, rank). The engine uses rank 0 on every
    process: all draw the same global batch (``step_loss``'s ``shard`` picks each one's slice)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))


def step_loss(model, scheduler, data: Examples, prior: Examples | None, prior_weight: float,
              generator: torch.Generator, batch_size: int, mask_weight: float, device, *, masked_loss: bool = False,
              attention_weight: float = 0.0, unet=None, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """The loss of one step (see the module docstring); instances first, then class images (whose loss is
    never masked or weighted). ``batch_size`` is the global batch: the draws are made for all of it, then
    ``shard=(i, n)`` keeps slice i of n (``batch_size / n`` instances, and as many class images), the part of
    process i of n; ``(0, 1)`` is the whole batch."""
    i, n = shard
    b = batch_size // n
    parts = [data.sample(batch_size, generator)]
    if prior is not None:
        parts.append(prior.sample(batch_size, generator))
    z0, masks, ids = (torch.cat([p[k] for p in parts]) for k in range(3))
    eps = torch.randn(z0.shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z0),), generator=generator)
    mine = torch.cat([torch.arange(i * b, (i + 1) * b) + k * batch_size for k in range(len(parts))])
    z0, masks, ids, eps, t = (x[mine] for x in (z0, masks, ids, eps, t))
    batch_size = b
    z_t = scheduler.add_noise(z0, eps, t)
    store = None
    if attention_weight > 0:

        with record_attention(unet, guidance=False, keep_grad=True) as store:
            pred = model(z_t.to(device), t.to(device), ids.to(device)).float()
    else:
        pred = model(z_t.to(device), t.to(device), ids.to(device)).float()
    w = loss_weights(masks, mask_weight, masked_loss)
    w[batch_size:] = 1.0
    loss = prior_preservation_loss(pred, eps.to(device), batch_size, prior_weight if prior is not None else 0.0,
                                   w.to(device))
    if store is not None:
        regions, tokens = (x[i * b:(i + 1) * b] for x in parts[0][3:])
        loss = loss + attention_weight * attention_loss(store, regions.to(device), tokens.to(device))
    return loss


def loss_weights(masks: torch.Tensor, mask_weight: float = 0.0, masked_loss: bool = False) -> torch.Tensor:
    """Per-pixel weights of the denoising loss from the concept masks (B, 1, h, w) at the latent grid:
    ``1 + mask_weight * m`` (the concept's pixels count more), or with ``masked_loss`` the mask alone, normalised
    to mean 1 per example (the background does not count at all: the training fix's masked loss)."""
    if masked_loss:
        return masks / masks.mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    return 1 + mask_weight * masks


def prior_preservation_loss(pred: torch.Tensor, eps: torch.Tensor, n_instances: int, prior_weight: float,
                            weights: torch.Tensor | None = None) -> torch.Tensor:
    """DreamBooth's loss on a batch of ``n_instances`` concept examples followed by class (prior) examples::

        L = mean_i w (eps_i - pred_i)^2 + prior_weight * mean_j (eps_j - pred_j)^2
            (i < n_instances: concept)     (j >= n_instances: class images)

    pred, eps: (B, C, h, w); weights: per-pixel loss weights (``loss_weights``), 1 by default. Each half is
    averaged on its own, so the prior counts as much as the concept whatever the split."""
    per_example = ((pred - eps).pow(2) * (1.0 if weights is None else weights)).mean(dim=(1, 2, 3))
    loss = per_example[:n_instances].mean()
    if prior_weight and len(per_example) > n_instances:
        loss = loss + prior_weight * per_example[n_instances:].mean()
    return loss


def attention_loss(store, regions: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Break-A-Scene's cross-attention loss: for each concept slot k present in an example, the mean map of
    its tokens, normalised by its maximum, should be its mask: MSE at the masks' grid (16x16 here, as in
    the paper), averaged over every cross-attention layer (lower resolutions are upsampled).

    regions: (B, K, h, w) masks; tokens: (B, K, T) bool. Instance examples only (the first B of the batch)."""
    b, k, h, w = regions.shape
    present = tokens.any(-1)  # (B, K)
    if not present.any():
        return regions.new_zeros(())
    total = 0.0
    layers = store.cross
    for probs in layers.values():  # (B_all, N, T) of the one call of this step
        probs = probs[:b]
        side = math.isqrt(probs.shape[1])
        sel = tokens.float() / tokens.sum(-1, keepdim=True).clamp_min(1)  # (B, K, T) averaging weights
        maps = torch.einsum("bnt,bkt->bkn", probs.float(), sel).reshape(b, k, side, side)
        if side != h:
            maps = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)
        maps = maps / maps.flatten(2).amax(-1).clamp_min(1e-8)[..., None, None]
        total = total + ((maps - regions).pow(2).mean(dim=(2, 3)) * present).sum() / present.sum()
    return total / len(layers)


LR_SCHEDULES = ("constant", "cosine")


def lr_at(step: int, steps: int, lr: float, schedule: str) -> float:
    """The learning rate of ``step`` (0-based) of ``steps``: a pure function of the step, so a resumed run needs
    no scheduler state."""
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        return float(lr * 0.5 * (1 + np.cos(np.pi * step / steps)))
    raise ValueError(f"unknown lr_schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise ImportError("use_8bit_adam needs bitsandbytes (`pip install bitsandbytes`, with a CUDA GPU); "
                          "or train without it (AdamW with 32-bit moments)") from None
    return bitsandbytes


def small_gpu_defaults(device) -> dict:
    """T4-safe training switches for ``device``: gradient checkpointing on a CUDA GPU with under 20 GB, and 8-bit
    Adam there too when bitsandbytes is installed; both off elsewhere (a CPU, a large GPU)."""
    device = torch.device(device)
    small = device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory < 20 * 2**30
    return {"gradient_checkpointing": small,
            "use_8bit_adam": small and importlib.util.find_spec("bitsandbytes") is not None}


def make_optimizer(params, lr: float, use_8bit_adam: bool = False) -> torch.optim.Optimizer:
    """AdamW without weight decay; ``use_8bit_adam``: bitsandbytes' AdamW8bit (the moments in 8 bits, CUDA)."""
    if use_8bit_adam:
        return _bitsandbytes().optim.AdamW8bit(params, lr=lr, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def _checkpointing_switches(model):
    """(enable, disable) of a diffusers or transformers model's gradient checkpointing."""
    if hasattr(model, "enable_gradient_checkpointing"):  # diffusers
        return model.enable_gradient_checkpointing, model.disable_gradient_checkpointing
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's newer name
        return (lambda: model.activation_checkpointing_enable({"use_reentrant": False}),
                model.activation_checkpointing_disable)
    return (lambda: model.gradient_checkpointing_enable({"use_reentrant": False}), model.gradient_checkpointing_disable)


@contextmanager
def gradient_checkpointing_on(unet, text_encoder, enabled: bool = True):
    """Inside the block the UNet, and the text encoder if any of its weights trains, keep only their blocks'
    inputs in the forward pass and recompute the rest in the backward pass (non-reentrant checkpoints, so the
    gradients reach adapters inside frozen layers). The models' previous setting is restored afterwards."""
    parts = [unet] + ([text_encoder] if any(p.requires_grad for p in text_encoder.parameters()) else [])
    switched = [m for m in parts if enabled and not any(getattr(x, "gradient_checkpointing", False)
                                                        for x in m.modules())]
    for m in switched:
        _checkpointing_switches(m)[0]()
    try:
        yield
    finally:
        for m in switched:
            _checkpointing_switches(m)[1]()
            if getattr(m, "_require_grads_hook", None) is not None:  # transformers' hook for checkpointed adapters
                m.disable_input_require_grads()


def save_checkpoint(path: Path, method: Method, model, optimizer, step: int, seed: int, losses,
                    base: dict | None = None) -> None:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    atomic_save({"method": method.name, "step": step, "seed": seed, "losses": list(losses), "rng": rng,
                 "base": json.dumps(base or {}, sort_keys=True),
                 "params": {n: p.detach().cpu() for n, p in _trainable(model).items()},
                 "optimizer": optimizer.state_dict()}, path)


def load_checkpoint(path: Path, method: Method, model, optimizer, seed: int,
                    base: dict | None = None) -> tuple[int, list[float]]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if (state["method"], state["seed"]) != (method.name, seed):
        raise ValueError(f"{path} is a {state['method']} checkpoint with seed {state['seed']}, not {method.name} "
                         f"with seed {seed}: resume with the same settings, or use another --out")
    if base is not None and "base" in state and json.loads(state["base"]) not in ({}, base):
        raise ValueError(f"{path} was trained on another base model (its fingerprint differs from this pipeline's, "
                         "e.g. the embedded model was retrained): delete the folder, or use another --out")
    params = _trainable(model)
    if {n: v.shape for n, v in state["params"].items()} != {n: p.shape for n, p in params.items()}:
        raise ValueError(f"{path} does not match this method's trainable parameters (other settings?); "
                         "resume with the same settings, or use another --out")
    with torch.no_grad():
        for name, value in state["params"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"], state["losses"]


JOINT_METHODS = ("dreambooth", "lora")


def joint_concept(concepts: list[Concept]) -> Concept:
    """Several concepts as one training target (joint DreamBooth / LoRA): all their images; ``parts`` keeps them."""
    c = Concept(name=" and ".join(x.name for x in concepts), slug="_and_".join(x.slug for x in concepts),
                class_word=None, category=None, folder=concepts[0].folder,
                images=[im for x in concepts for im in x.images], masks=[m for x in concepts for m in x.masks],
                parts=list(concepts))
    return c


@dataclass
class Regularizers:
    """The training fix (notebook 07), each part optional:

    masked_loss: only the concepts' pixels count in the diffusion loss (``w = m / mean(m)``; Break-A-Scene,
        Mix-of-Show); images without a mask count whole;
    attention_weight: Break-A-Scene's cross-attention loss (``attention_loss``), weight ~1e-2;
    composites: with several concepts, this many Seg-Mix images (MuDI: the concepts cut out by their masks
        and pasted into random regions of one image, captioned "a <A> on the left and a <B> on the right")
        are added to the training set, drawn once from the seed; with a wearable among people, as many images of
        a person wearing it (``kinds.put_on``: the item cut out of one of its views and set on the person's head,
        captioned "a <person> with a <item> ..."): the nested kind's own composite (notebook 09).
    """
    masked_loss: bool = False
    attention_weight: float = 0.0
    composites: int = 0

    @property
    def any(self) -> bool:
        return self.masked_loss or self.attention_weight > 0 or self.composites > 0


TRAINING_FIX = Regularizers(masked_loss=True, attention_weight=1e-2, composites=24)


def training_fix(n_concepts: int, method: str) -> Regularizers:
    """The course's training fix for ``n_concepts`` trained together by ``method``: ``TRAINING_FIX`` (masked loss,
    attention loss and Seg-Mix composites) for several concepts of a joint method; the masked and attention losses
    alone for one concept (there is nothing to paste)."""
    if n_concepts > 1 and method in JOINT_METHODS:
        return TRAINING_FIX
    return Regularizers(masked_loss=True, attention_weight=TRAINING_FIX.attention_weight)


def training_set(pipe, concepts: list[Concept], phrases: list[str], reg: Regularizers, seed: int) -> Examples:
    """The examples of ``concepts`` (their images, captions with each name replaced by its phrase), plus
    ``reg.composites`` Seg-Mix images when there are several concepts."""

    images, captions, masks, regions = [], [], [], []
    for k, (c, phrase) in enumerate(zip(concepts, phrases)):
        images += c.images
        captions += training_captions(c, phrase)
        masks += c.masks
        regions += [[m if j == k else None for j in range(len(concepts))] for m in c.masks]
    worn = [k for k, c in enumerate(concepts) if c.category == "wearable"]
    people = [k for k, c in enumerate(concepts) if c.category == "person"]
    side = [k for k in range(len(concepts)) if k not in worn]  # Seg-Mix pastes side by side what is not worn
    if reg.composites and len(side) > 1:
        rng = random.Random(f"seg-mix/{seed}")
        for _ in range(reg.composites):
            comp = compose([concepts[k] for k in side], rng, size=pipe.unet.config.sample_size * pipe.vae_scale_factor)
            images.append(comp.image)
            captions.append(scenes.caption(list(zip([phrases[k] for k in side], comp.positions))))
            masks.append(np.maximum.reduce(comp.masks))
            regions.append([comp.masks[side.index(k)] if k in side else None for k in range(len(concepts))])
    if reg.composites and worn and people:
        rng = random.Random(f"wearing/{seed}")
        for _ in range(reg.composites):
            w, p = rng.choice(worn), rng.choice(people)
            i, j = rng.randrange(len(concepts[p])), rng.randrange(len(concepts[w]))
            image, item, wearer = kinds.put_on(concepts[p], i, concepts[w], j)
            images.append(image)
            said = training_captions(concepts[p], phrases[p])[i]
            captions.append(said.replace(phrases[p], f"{phrases[p]} with a {phrases[w]}", 1))
            masks.append(wearer)
            regions.append([wearer if k == p else item if k == w else None for k in range(len(concepts))])
    return encode_examples(pipe, images, captions, masks, regions, phrases)


@dataclass
class Schedule:
    """How one training run goes: the method's defaults where the call gave None, checked."""

    steps: int
    lr: float
    batch_size: int
    seed: int
    checkpoint_every: int
    mask_weight: float
    reg: Regularizers


def resolve_concepts(pipe, concept, method: Method) -> tuple[list[Concept], list[str]]:
    """The concepts to train (one, or several for joint training), loaded at the pipeline's size, and the phrase
    each answers to; ValueError when they cannot be trained together."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    parts = [concept] if not isinstance(concept, (list, tuple)) else list(concept)
    if not parts:
        raise ValueError("no concept given: pass a concept folder (or several, for joint training)")
    parts = [c if isinstance(c, Concept) else load_concept(c, size) for c in parts]
    if len(parts) > 1 and method.name not in JOINT_METHODS:
        raise ValueError(f"{method.name} trains one concept at a time (train each, then load_adapters); joint "
                         f"training is for {' and '.join(JOINT_METHODS)}")
    phrases = [method.phrase(c) for c in parts]
    if len(set(phrases)) < len(phrases):
        raise ValueError(f"two concepts would answer to the same phrase {phrases}: give them different class words "
                         "or identifiers")
    return parts, phrases


def resolve_schedule(method: Method, concepts: int, processes: int, *, steps=None, lr=None, batch_size=None,
                     seed: int = 0, checkpoint_every: int = 50, mask_weight: float = 0.0,
                     regularizers: Regularizers | None = None) -> Schedule:
    """``Schedule`` of a run of ``method`` on ``concepts`` concepts over ``processes`` processes (the batch is
    global: each process takes ``batch_size / processes`` of it); ValueError before any work when it cannot run."""
    default_steps, default_batch = method.schedule(concepts)
    s = Schedule(default_steps if steps is None else steps, method.lr if lr is None else lr,
                 default_batch if batch_size is None else batch_size, seed, checkpoint_every, mask_weight,
                 regularizers or Regularizers())
    if s.steps < 1 or s.batch_size < 1 or s.lr <= 0 or s.checkpoint_every < 1:
        raise ValueError(f"need steps >= 1, batch_size >= 1, lr > 0, checkpoint_every >= 1; got "
                         f"{s.steps}, {s.batch_size}, {s.lr}, {s.checkpoint_every}")
    lr_at(0, s.steps, s.lr, method.lr_schedule)  # an unknown schedule fails here, before any work
    if s.batch_size % processes:
        raise ValueError(f"batch_size {s.batch_size} does not split over {processes} processes: the batch is global, "
                         f"each process takes batch_size / {processes} of it; use a multiple of {processes} "
                         "(--batch-size)")
    return s


def train(pipe, concept: Concept | str | Path | list, method: Method, *, out: str | Path, steps: int | None = None,
          lr: float | None = None, batch_size: int | None = None, seed: int = 0, checkpoint_every: int = 50,
          resume: bool = False, progress: bool = True, mask_weight: float = 0.0, accelerator=None,
          regularizers: Regularizers | None = None, gradient_checkpointing: bool | None = None,
          use_8bit_adam: bool | None = None) -> TrainResult:
    """Teach ``pipe`` a concept with ``method``, in place; write checkpoints, the method's files and
    ``adapter.json`` under ``out``. ``steps``/``lr``/``batch_size`` default to the method's.

    concept: a ``Concept`` or a folder/slug for ``load_concept`` (images are used at the pipeline's size), or a
        list of them: joint training (DreamBooth and LoRA), each concept with its own phrase.
    regularizers: the training fix (``Regularizers``: masked loss, attention loss, Seg-Mix composites).
    resume: continue from ``out/checkpoints/last.pt`` if there is one (same method, settings and seed).
    accelerator: an ``accelerate.Accelerator`` (default: a new one, with float16 mixed precision on a CUDA GPU, as
        diffusers' training scripts use); with n processes ``batch_size`` is split n ways and must be a multiple of n.
    gradient_checkpointing, use_8bit_adam: less GPU memory (see the module docstring). None (the default) is
        ``small_gpu_defaults``: on for a CUDA GPU with under 20 GB (Colab's T4), 8-bit Adam only where bitsandbytes
        is installed; off on a CPU.
    The pipeline must be a fresh base model: Textual Inversion refuses a token it already has.

    The steps: resolve the concepts and the schedule (every check before any work), prepare (class images, the
    method's new weights, the encoded examples, the optimizer; a checkpoint to resume from), loop, write the adapter.
    """
    accelerator = accelerator or Accelerator(mixed_precision="fp16" if torch.cuda.is_available() else "no")
    auto = small_gpu_defaults(accelerator.device)
    gradient_checkpointing = auto["gradient_checkpointing"] if gradient_checkpointing is None else gradient_checkpointing
    use_8bit_adam = auto["use_8bit_adam"] if use_8bit_adam is None else use_8bit_adam
    parts, phrases = resolve_concepts(pipe, concept, method)
    schedule = resolve_schedule(method, len(parts), accelerator.num_processes, steps=steps, lr=lr,
                                batch_size=batch_size, seed=seed, checkpoint_every=checkpoint_every,
                                mask_weight=mask_weight, regularizers=regularizers)
    if use_8bit_adam:
        _bitsandbytes()  # missing: a clear error before any work
    if pipe.unet.dtype != torch.float32:
        raise ValueError(f"the pipeline is {pipe.unet.dtype}: load it in float32 to train "
                         "(load_pipeline(..., dtype=torch.float32)); mixed precision comes from accelerate")
    out, started = Path(out), time.time()
    base = base_fingerprint(pipe)  # before training: DreamBooth changes the UNet
    job = _prepare(pipe, parts, phrases, method, schedule, accelerator, out, use_8bit_adam)
    checkpoint = out / "checkpoints" / "last.pt"
    start, losses = 0, []
    if resume and checkpoint.exists():
        start, losses = load_checkpoint(checkpoint, method, accelerator.unwrap_model(job.model), job.optimizer, seed,
                                        base)
    with gradient_checkpointing_on(pipe.unet, pipe.text_encoder, enabled=gradient_checkpointing):
        step_seconds = _loop(pipe, job, method, schedule, accelerator, start, losses, checkpoint, base, progress)
    meta = {}
    if accelerator.is_main_process:
        meta = _write_adapter(pipe, job, method, parts, phrases, schedule, out, base, use_8bit_adam)
    return TrainResult(method.name, phrases[0], losses, out, meta, time.time() - started, step_seconds)


@dataclass
class _Job:
    """What ``_prepare`` builds for the loop: the (prepared) model and optimizer, the parameters that train, the
    method's run, the concept trained (one, or the joint one) and its examples and class images."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    params: list
    run: Run
    concept: Concept
    data: Examples
    prior: Examples | None
    prior_weight: float


def _prepare(pipe, parts, phrases, method: Method, s: Schedule, accelerator, out: Path, use_8bit_adam: bool) -> _Job:
    concept = parts[0] if len(parts) == 1 else joint_concept(parts)
    pipe.to(accelerator.device)
    for part in (pipe.vae, pipe.text_encoder, pipe.unet):
        part.requires_grad_(False).eval()
    with accelerator.main_process_first():  # DreamBooth: the main process generates, the others read the cache
        class_images, class_prompts, prior_weight = method.prior(pipe, concept, out)
    with torch.random.fork_rng(devices=[]):  # new weights (LoRA's A, the hypernetwork) depend on seed only
        torch.manual_seed(s.seed)
        run = method.setup(pipe, concept)
    data = training_set(pipe, parts, phrases, s.reg, s.seed)
    prior = encode_examples(pipe, class_images, class_prompts) if class_images else None
    model = Denoiser(pipe.unet, pipe.text_encoder, run.module)
    params = list(_trainable(model).values())
    optimizer = make_optimizer(params, s.lr, use_8bit_adam)
    model, optimizer = accelerator.prepare(model, optimizer)
    return _Job(model, optimizer, params, run, concept, data, prior, prior_weight)


def _loop(pipe, job: _Job, method: Method, s: Schedule, accelerator, start: int, losses: list, checkpoint: Path,
          base: dict, progress: bool) -> list[float]:
    """Steps ``start .. s.steps - 1``: each draws its batch from the step alone (so a resumed run sees the same
    batches), appends the global batch's loss to ``losses`` and checkpoints every ``s.checkpoint_every``; returns
    each step's seconds."""
    model, optimizer, n = job.model, job.optimizer, accelerator.num_processes
    model.train()
    bar = tqdm(range(start, s.steps), desc=method.name, initial=start, total=s.steps,
               disable=not (progress and accelerator.is_main_process))
    step_seconds = []
    for step in bar:
        began = time.perf_counter()
        g = step_generator(s.seed, step)  # the same draws on every process; each keeps its slice
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, s.steps, s.lr, method.lr_schedule)
        optimizer.zero_grad(set_to_none=True)  # before the forward: the last step's gradients are freed first
        with accelerator.autocast():
            loss = step_loss(model, pipe.scheduler, job.data, job.prior, job.prior_weight, g, s.batch_size,
                             s.mask_weight, accelerator.device, masked_loss=s.reg.masked_loss,
                             attention_weight=s.reg.attention_weight, unet=pipe.unet,
                             shard=(accelerator.process_index, n))
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(job.params, 1.0)
        optimizer.step()
        method.after_step(job.run)
        losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())  # the global batch's loss
        step_seconds.append(time.perf_counter() - began)
        # drawn at tqdm's own pace: in Jupyter every refresh is a widget message, and a refresh per step is more
        # messages than nbval waits for
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", refresh=False)
        if (step + 1) % s.checkpoint_every == 0 or step + 1 == s.steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(checkpoint, method, accelerator.unwrap_model(model), optimizer, step + 1, s.seed,
                                losses, base)
    optimizer.zero_grad(set_to_none=True)  # free the gradients before saving (DreamBooth copies the UNet to save it)
    model.eval().requires_grad_(False)
    accelerator.wait_for_everyone()
    return step_seconds


def _write_adapter(pipe, job: _Job, method: Method, parts, phrases, s: Schedule, out: Path, base: dict,
                   use_8bit_adam: bool) -> dict:
    """The method's files and ``adapter.json`` (written last and atomically: a folder with one is complete)."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {"method": method.name, "concept": job.concept.slug, "name": job.concept.name,
            "class_word": method.class_word_for(parts[0]), "phrase": phrases[0], "settings": method.settings(),
            "training": {"steps": s.steps, "lr": s.lr, "batch_size": s.batch_size, "seed": s.seed,
                         "mask_weight": s.mask_weight, "regularizers": asdict(s.reg)}, "base": base}
    if use_8bit_adam:  # changes the weights (gradient checkpointing does not)
        meta["training"]["optimizer"] = "bitsandbytes.optim.AdamW8bit"
    if len(parts) > 1:
        meta |= {"phrases": {c.slug: p for c, p in zip(parts, phrases)}, "names": {c.slug: c.name for c in parts}}
    meta |= method.save(pipe, out, job.concept, s.steps, job.run)
    atomic_save(json.dumps(meta, indent=2) + "\n", out / "adapter.json", write_text)
    return meta

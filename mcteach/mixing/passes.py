"""One UNet pass per region (notebook 07): the inference fix the course ships.

Each region is drawn by its own pass at every denoising step, with its own sub-prompt and only its own LoRA
adapter; the noise predictions are pasted by region (Regional Prompter's latent mode, OMG, MultiDiffusion's
region-based generation). A pass cannot mix with another concept because the other concept is not in it.
Its settings are ``RegionPasses``; ``INFERENCE_FIX`` is the course's choice.

    regions = [Region("left", "a sks woman on the left", adapter="woman_..."),
               Region("right", "a zqv man on the right", adapter="man_...")]
    images = regional_generate(pipe, "a sks woman on the left and a zqv man on the right", regions,
                               fix=INFERENCE_FIX, seed=[0, 1])          # mcteach.mixing.generate
"""

from __future__ import annotations

import random
from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from ..sd import parts
from ..world import scenes
from ..world.regions import place_words, region_masks
from .masking import AttentionMasks, Region, RegionMasker, masked, prompt_embeds


@dataclass
class RegionPasses:
    """The passes fix's settings (``region_passes``).

    bootstrap: for this first part of the denoising process, each pass sees plain background outside its region;
    recentre: each pass sees its region moved to the centre of the canvas (for a model that cannot place);
    pass_guidance: each pass's classifier-free guidance scale, as a fraction of the call's;
    self_attention: self-attention masks (``AttentionMasks(self_attention=True)``) inside every pass.
    """

    bootstrap: float = 0.0
    recentre: bool = False
    pass_guidance: float = 1.0
    self_attention: bool = False

    def __post_init__(self):
        if not 0 <= self.bootstrap <= 1 or self.pass_guidance <= 0:
            raise ValueError(f"need 0 <= bootstrap <= 1 and pass_guidance > 0, got {self.bootstrap}, {self.pass_guidance}")


#: the course's inference fix, chosen by the ablation in notebook 07 (``mcteach bench mixing --ablation``): one pass
#: per region with its own adapter and sub-prompt (which names the region's place: "a cpd woman on the left"),
#: bootstrapped for the first half, each pass at half the call's guidance (2.5 for the course's 5). At the full
#: scale the pasted predictions push skin tones and speckle the background (a cpd woman of medium skin comes out
#: medium-light)
INFERENCE_FIX = RegionPasses(bootstrap=0.5, pass_guidance=0.5)


def sub_prompt(phrase: str, where, fix: RegionPasses | AttentionMasks | None = None) -> str:
    """A region's sub-prompt for ``fix`` (default ``INFERENCE_FIX``): "a cpd woman on the left" where the region
    is mostly in a half (its pass is drawn on the whole canvas, so the sub-prompt says where), "a cpd woman"
    elsewhere and for recentred passes (each sees its region at the centre)."""
    fix = INFERENCE_FIX if fix is None else fix
    words = None if getattr(fix, "recentre", False) else place_words(where)
    return f"a {phrase} {words}" if words else f"a {phrase}"


@torch.no_grad()
def region_passes(pipe, prompt: str, regions: list[Region], *, fix: RegionPasses, seeds: list[int], steps: int = 25,
                  guidance_scale: float = 5.0):
    """One UNet pass per region at every step, each with its own sub-prompt and only its own LoRA adapter, the
    noise predictions pasted by region (Regional Prompter's latent mode, OMG, MultiDiffusion's region-based
    generation); pixels outside every region take a pass of the global prompt with every adapter on::

        eps = sum_r m_r eps(z_t^r, t, c_r; adapter r) + (1 - sum_r m_r) eps(z_t, t, c; all adapters)

    MultiDiffusion's bootstrapping (``fix.bootstrap``, a fraction of the steps): early on, pass r sees
    ``z_t^r = m_r z_t + (1 - m_r) noised(plain background)``, so its concept can only form inside its region
    (without it a pass may draw its concept across the seam, or where a model that ignores "on the left" likes).
    Afterwards ``z_t^r = z_t``.

    ``fix.recentre``: pass r sees its region rolled to the canvas centre (for a model that cannot place "on the
    left"). ``fix.pass_guidance``: each pass's guidance scale, as a fraction of ``guidance_scale``.
    ``fix.self_attention``: self-attention masks act inside every pass. Cost: one UNet call per region per step."""

    unet, sched = pipe.unet, pipe.scheduler
    m, rest, masks = region_weights(pipe, regions)
    names = [r.adapter for r in regions]
    has_lora = any(names) and hasattr(pipe, "set_adapters")
    all_adapters = pipe.get_active_adapters() if has_lora else []
    conds = [prompt_embeds(pipe, [r.prompt]) for r in regions]
    glob, uncond = prompt_embeds(pipe, [prompt]), prompt_embeds(pipe, [""])
    latents = torch.cat([parts.initial_latents(pipe, 1, s) for s in seeds])
    noise = latents / sched.init_noise_sigma
    bg = plain_backgrounds(pipe, seeds)
    sched.set_timesteps(steps, device=unet.device)
    n = len(seeds)
    masker = RegionMasker(masks, AttentionMasks(cross="none", self_attention=True, bind_adapters=False),
                          chunk=pipe.tokenizer.model_max_length) if fix.self_attention else None
    scale = guidance_scale * fix.pass_guidance
    shifts = [centring_shift(m[r, 0]) if fix.recentre else (0, 0) for r in range(len(regions))]

    def eps_of(z, t, cond, adapter):
        if has_lora:
            if adapter == "*":
                pipe.set_adapters(all_adapters)
            elif adapter:
                pipe.set_adapters([adapter])
            else:
                pipe.disable_lora()
        x = sched.scale_model_input(torch.cat([z, z]), t)
        ctx = torch.cat([uncond.expand(n, -1, -1), cond.expand(n, -1, -1)])
        e_u, e_c = unet(x, t, ctx).sample.chunk(2)
        if has_lora and not adapter:
            pipe.enable_lora()
        return parts.guided_noise(e_u, e_c, scale)

    try:
        with ExitStack() as stack:
            if masker is not None:
                stack.enter_context(masked(pipe, masker))
            for i, t in enumerate(sched.timesteps):
                progress = i / len(sched.timesteps)
                per_region = []
                for r, cond in enumerate(conds):
                    z = latents
                    if progress < fix.bootstrap:  # outside the region (mostly): noised plain background
                        z_bg = sched.add_noise(bg, noise, t.reshape(1))
                        z = m[r] * latents + (1 - m[r]) * torch.where(1 - m[r] > 0.5, z_bg, latents)
                    dy, dx = shifts[r]
                    e = eps_of(torch.roll(z, (dy, dx), dims=(2, 3)), t, cond, names[r])
                    per_region.append(torch.roll(e, (-dy, -dx), dims=(2, 3)))
                e_rest = eps_of(latents, t, glob, "*" if has_lora else None) if rest.max() > 0 else None
                eps = paste_predictions(per_region, m, e_rest, rest)
                latents = sched.step(eps, t, latents).prev_sample
    finally:
        if has_lora:
            pipe.set_adapters(all_adapters)
    return parts.decode_latents(pipe, latents)


def paste_predictions(eps_regions: list[torch.Tensor], weights: torch.Tensor, eps_rest: torch.Tensor | None,
                      rest: torch.Tensor) -> torch.Tensor:
    """The region passes' noise predictions pasted by region::

        eps = sum_r w_r eps_r + rest * eps_rest

    eps_regions: R predictions (B, C, h, w); weights: (R, 1, h, w), each region's share of every latent cell
    (``region_weights``: overlapping regions share, so sum_r w_r <= 1); rest = 1 - sum_r w_r, the background's
    share, (1, h, w); eps_rest: the global prompt's prediction, or None when no cell is background."""
    eps = sum(w * e for w, e in zip(weights, eps_regions))
    if eps_rest is not None:
        eps = eps + rest * eps_rest
    return eps


def region_weights(pipe, regions: list[Region]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each region's weight in the pasted noise prediction at the latent grid, (R, 1, s, s) (where regions overlap
    they share), the background's (1, s, s), and the region masks at the image's size (R, H, W)."""
    unet = pipe.unet
    masks = region_masks([r.where for r in regions], unet.config.sample_size * pipe.vae_scale_factor)
    side = unet.config.sample_size
    m = F.interpolate(masks[:, None].float(), size=(side, side), mode="area")  # (R, 1, s, s)
    m = m / m.sum(0, keepdim=True).clamp_min(1.0)  # overlaps share
    rest = (1 - m.sum(0)).clamp_min(0)  # (1, s, s): the background
    return m.to(unet.device, unet.dtype), rest.to(unet.device, unet.dtype), masks


def centring_shift(w: torch.Tensor) -> tuple[int, int]:
    """The (dy, dx) latent cells that move the centre of mass of a weight map (s, s) to the canvas centre."""
    side = w.shape[-1]
    ys, xs = torch.arange(side, dtype=w.dtype, device=w.device), torch.arange(side, dtype=w.dtype, device=w.device)
    cy, cx = float((w.sum(1) * ys).sum() / w.sum()), float((w.sum(0) * xs).sum() / w.sum())
    return round((side - 1) / 2 - cy), round((side - 1) / 2 - cx)


def plain_backgrounds(pipe, seeds: list[int]) -> torch.Tensor:
    """Latents (B, 4, s, s) of one plain background colour per seed (the world's colours, drawn from the seed):
    what bootstrapped passes see outside their region."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    colours = [scenes.background_colour(random.Random(f"bootstrap/{s}")) for s in seeds]
    return parts.encode_images(pipe, [Image.new("RGB", (size, size), c) for c in colours])

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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from ..sd import parts
from ..world import scenes
from ..world.regions import RegionError, exclusive_masks, place_words, region_fractions, region_masks
from .masking import AttentionMasks, Region, RegionMasker, extents, masked, prompt_embeds


@dataclass
class RegionPasses:
    """The passes fix's settings (``region_passes``).

    bootstrap: for this first part of the denoising process, each pass sees plain background outside its region;
    recentre: each pass sees its region moved to the centre of the canvas (for a model that cannot place);
    pass_guidance: each pass's classifier-free guidance scale, as a fraction of the call's;
    self_attention: self-attention masks (``AttentionMasks(self_attention=True)``) inside every pass;
    batched: a step's passes go through the UNet as one batch (each LoRA gated per image of the batch), not one
    call each: the same images to float rounding;
    window: on a canvas larger than the model's own (``height``/``width``), each region's pass sees only a window
    of the model's size around its region (MultiDiffusion's windows), where its concept sits at the centre and at
    the size the model draws it; the sub-prompt then names no place ("a cpd woman").
    """

    bootstrap: float = 0.0
    recentre: bool = False
    pass_guidance: float = 1.0
    self_attention: bool = False
    batched: bool = False
    window: bool = False

    def __post_init__(self):
        if not 0 <= self.bootstrap <= 1 or self.pass_guidance <= 0:
            raise ValueError(f"need 0 <= bootstrap <= 1 and pass_guidance > 0, got {self.bootstrap}, {self.pass_guidance}")
        if self.window and self.recentre:
            raise ValueError("window already centres each region in its own pass: leave recentre off")


#: the course's inference fix, chosen by the ablation in notebook 07 (``mcteach bench mixing --ablation``): one pass
#: per region with its own adapter and sub-prompt (which names the region's place: "a cpd woman on the left"),
#: bootstrapped for the first half, each pass at half the call's guidance (2.5 for the course's 5). At the full
#: scale the pasted predictions push skin tones and speckle the background (a cpd woman of medium skin comes out
#: medium-light)
INFERENCE_FIX = RegionPasses(bootstrap=0.5, pass_guidance=0.5)
#: the passes for a concept that lives in the prompt alone (Textual Inversion: one learned token, a frozen UNet):
#: each pass at the call's full guidance. Guidance is what carries such a concept (the unconditional branch never
#: sees it), and at half of it TI's woman of the couple comes out malformed in 3 of 16 seeds (0.81 with the passes
#: fix; alone "on the left" the judge finds her in 0.94 of 16 at guidance 2.5, 1.00 at 5); at 0.75 or full guidance
#: the couple is 16 of 16. A LoRA or DreamBooth concept lives in the UNet, which both branches run, and needs half.
PROMPT_CONCEPT_FIX = RegionPasses(bootstrap=0.5, pass_guidance=1.0)


def inference_fix(method: str | None = None) -> RegionPasses:
    """The passes fix for concepts learned by ``method`` (a name of ``methods.catalog.METHODS``, or None):
    ``PROMPT_CONCEPT_FIX`` for Textual Inversion, ``INFERENCE_FIX`` for every other."""
    return PROMPT_CONCEPT_FIX if method == "textual_inversion" else INFERENCE_FIX


#: the same fix on a canvas wider or taller than the model's (three or four concepts in a row or a grid, each at the
#: size the model draws one): each pass on a window of the model's size centred on its region
WINDOW_FIX = RegionPasses(bootstrap=0.5, pass_guidance=0.5, window=True)


def sub_prompt(phrase: str, where, fix: RegionPasses | AttentionMasks | None = None) -> str:
    """A region's sub-prompt for ``fix`` (default ``INFERENCE_FIX``): "a cpd woman on the left" where the region
    is mostly in a half (its pass is drawn on the whole canvas, so the sub-prompt says where), "a cpd woman"
    elsewhere and for recentred passes (each sees its region at the centre)."""
    fix = INFERENCE_FIX if fix is None else fix
    words = None if getattr(fix, "recentre", False) or getattr(fix, "window", False) else place_words(where)
    return f"a {phrase} {words}" if words else f"a {phrase}"


@torch.no_grad()
def region_passes(pipe, prompt: str, regions: list[Region], *, fix: RegionPasses, seeds: list[int], steps: int = 25,
                  guidance_scale: float = 5.0, height: int | None = None, width: int | None = None,
                  start: torch.Tensor | None = None, strength: float = 1.0):
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
    ``fix.self_attention``: self-attention masks act inside every pass. Cost: one UNet call per region per step,
    or with ``fix.batched`` one call per step on a batch (R + 1) times as large (``gate_lora`` switches each LoRA
    on for its own passes' images only).

    ``height``, ``width``: the canvas in pixels (default the model's own size; multiples of the VAE's factor).
    With ``fix.window`` pass r runs on the window of the model's size centred on region r (``pass_windows``) and
    its prediction is pasted inside the region; the background's pass, if any, runs on the whole canvas.

    ``start``, ``strength`` (SDEdit): begin from the clean latents ``start`` (one per seed) noised to the step a
    fraction ``strength`` of the way from the end, and run only the remaining steps; ``strength=1`` with no
    ``start`` is generation from pure noise."""

    unet, sched = pipe.unet, pipe.scheduler
    native = unet.config.sample_size * pipe.vae_scale_factor
    height, width = height or native, width or native
    if height % pipe.vae_scale_factor or width % pipe.vae_scale_factor:
        raise ValueError(f"the canvas {width}x{height} must be a multiple of {pipe.vae_scale_factor} pixels each way")
    if (height, width) != (native, native) and (fix.self_attention or fix.recentre):
        raise ValueError(f"self-attention masks and recentring work on the model's own {native}x{native} canvas; "
                         f"for a {width}x{height} canvas use window passes (passes.WINDOW_FIX)")
    m, rest, masks = region_weights(pipe, regions, height, width)
    windows = pass_windows(m, unet.config.sample_size) if fix.window else [None] * len(regions)
    names = [r.adapters or None for r in regions]
    has_lora = any(names) and hasattr(pipe, "set_adapters")
    all_adapters = pipe.get_active_adapters() if has_lora else []
    conds = [prompt_embeds(pipe, [r.prompt]) for r in regions]
    glob, uncond = prompt_embeds(pipe, [prompt]), prompt_embeds(pipe, [""])
    latents = torch.cat([parts.initial_latents(pipe, 1, s, height=height, width=width) for s in seeds])
    noise = latents / sched.init_noise_sigma
    bg = plain_backgrounds(pipe, seeds, height, width)
    sched.set_timesteps(steps, device=unet.device)
    timesteps = sched.timesteps
    if start is not None:
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1] (got {strength}): the fraction of the steps to run again")
        if start.shape != latents.shape:
            raise ValueError(f"start latents {tuple(start.shape)} do not match the seeds' {tuple(latents.shape)}")
        timesteps = timesteps[steps - max(1, round(strength * steps)):]
        latents = sched.add_noise(start.to(latents), noise, timesteps[:1])
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
                pipe.set_adapters([adapter] if isinstance(adapter, str) else list(adapter))
            else:
                pipe.disable_lora()
        x = sched.scale_model_input(torch.cat([z, z]), t)
        ctx = torch.cat([uncond.expand(n, -1, -1), cond.expand(n, -1, -1)])
        e_u, e_c = unet(x, t, ctx).sample.chunk(2)
        if has_lora and not adapter:
            pipe.enable_lora()
        return parts.guided_noise(e_u, e_c, scale)

    with_rest = bool(rest.max() > 0)
    pass_conds = conds + ([glob] if with_rest else [])
    pass_adapters = names + (["*" if has_lora else None] if with_rest else [])
    if fix.batched and fix.window and with_rest:
        raise ValueError("batched passes on windows need regions that cover the canvas (the background's pass runs "
                         "on the whole canvas, the regions' on windows): leave batched off")
    if fix.batched:
        batch_ctx = torch.cat([uncond.expand(n * len(pass_conds), -1, -1)] + [c.expand(n, -1, -1) for c in pass_conds])
        gates = _pass_gates(all_adapters, pass_adapters, n) if has_lora else {}

    def all_passes(z_passes, t):
        """Every pass's guided prediction: one UNet call each, or one call for the batch of them."""
        if not fix.batched:
            return [eps_of(z, t, c, a) for z, c, a in zip(z_passes, pass_conds, pass_adapters)]
        x = torch.cat(z_passes)
        e_u, e_c = unet(sched.scale_model_input(torch.cat([x, x]), t), t, batch_ctx).sample.chunk(2)
        return list(parts.guided_noise(e_u, e_c, scale).split(n))

    try:
        with ExitStack() as stack:
            if masker is not None:
                stack.enter_context(masked(pipe, masker))
            if fix.batched and has_lora:
                pipe.set_adapters(all_adapters)
                stack.enter_context(gate_lora(unet, gates))
            for i, t in enumerate(timesteps, start=len(sched.timesteps) - len(timesteps)):
                progress = i / len(sched.timesteps)
                z_passes = []
                for r in range(len(conds)):
                    z = latents
                    if progress < fix.bootstrap:  # outside the region (mostly): noised plain background
                        z_bg = sched.add_noise(bg, noise, t.reshape(1))
                        z = m[r] * latents + (1 - m[r]) * torch.where(1 - m[r] > 0.5, z_bg, latents)
                    z_passes.append(crop(torch.roll(z, shifts[r], dims=(2, 3)), windows[r]))
                eps_passes = all_passes(z_passes + ([latents] if with_rest else []), t)
                per_region = [torch.roll(uncrop(e, w, latents), (-dy, -dx), dims=(2, 3))
                              for e, w, (dy, dx) in zip(eps_passes, windows, shifts)]
                eps = paste_predictions(per_region, m, eps_passes[-1] if with_rest else None, rest)
                latents = sched.step(eps, t, latents).prev_sample
    finally:
        if has_lora:
            pipe.set_adapters(all_adapters)
    return parts.decode_latents(pipe, latents)


def canvas_for(places, native: int, overlap: float = 0.25, multiple: int = 8) -> tuple[int, int]:
    """(height, width) in pixels of the canvas on which windows of the model's ``native`` size, overlapping by
    ``overlap`` of a window, hold one place each: k places across (the narrowest is 1/k of the width) need
    ``native * (1 + (k - 1) * (1 - overlap))`` pixels, rounded to ``multiple``. Thirds at 64 px: 64 x 160;
    quadrants: 112 x 112."""
    boxes = [region_fractions(p) for p in places]
    across = round(1 / min(x1 - x0 for x0, _, x1, _ in boxes))
    down = round(1 / min(y1 - y0 for _, y0, _, y1 in boxes))

    def side(k: int) -> int:
        return int(round(native * (1 + (k - 1) * (1 - overlap)) / multiple) * multiple)
    return side(down), side(across)


def pass_windows(m: torch.Tensor, side: int) -> list[tuple[int, int, int, int]]:
    """Each region's window (y0, x0, y1, x1) in latent cells: ``side`` x ``side`` (the model's own size), centred on
    the region's weights ``m[r]`` (of ``m``: (R, 1, h, w)) and moved to lie inside the canvas; RegionError where a
    region does not fit in its window."""
    h, w = m.shape[-2:]
    if h < side or w < side:
        raise RegionError(f"a canvas of {w}x{h} latent cells is smaller than the model's {side}x{side} window")
    out = []
    for r, weight in enumerate(m[:, 0]):
        ys, xs = torch.nonzero(weight > 0, as_tuple=True)
        cy, cx = (int(ys.min()) + int(ys.max()) + 1) / 2, (int(xs.min()) + int(xs.max()) + 1) / 2
        y0 = min(max(round(cy - side / 2), 0), h - side)
        x0 = min(max(round(cx - side / 2), 0), w - side)
        if ys.min() < y0 or xs.min() < x0 or ys.max() >= y0 + side or xs.max() >= x0 + side:
            raise RegionError(f"region {r} spans {int(xs.max() - xs.min()) + 1}x{int(ys.max() - ys.min()) + 1} latent "
                              f"cells, more than the model's {side}x{side} window: with window passes give each concept "
                              "a region no larger than the model's image (or a smaller canvas)")
        out.append((y0, x0, y0 + side, x0 + side))
    return out


def crop(z: torch.Tensor, window) -> torch.Tensor:
    """Latents (B, C, h, w) cut to a window (y0, x0, y1, x1); the whole canvas for None."""
    return z if window is None else z[:, :, window[0]:window[2], window[1]:window[3]]


def uncrop(e: torch.Tensor, window, like: torch.Tensor) -> torch.Tensor:
    """A window's prediction placed back on a canvas shaped ``like``, zero outside the window."""
    if window is None:
        return e
    out = torch.zeros_like(like)
    out[:, :, window[0]:window[2], window[1]:window[3]] = e
    return out


def _pass_gates(adapters: list[str], pass_adapters: list, n: int) -> dict[str, torch.Tensor]:
    """{LoRA adapter: (2 P n,) 1 for the images of the passes it acts in, else 0}, for a batch of P passes of n
    images each, unconditional halves first: pass adapter "*" is every adapter, None none."""
    on = {a: torch.tensor([float(p == "*" or p == a or (isinstance(p, tuple) and a in p)) for p in pass_adapters])
          .repeat_interleave(n) for a in adapters}
    return {a: torch.cat([g, g]) for a, g in on.items()}


@contextmanager
def gate_lora(unet, gates: dict[str, torch.Tensor]):
    """Inside the block, LoRA adapter ``name``'s update (peft's ``lora_B[name]`` output) is multiplied per image of
    the batch by ``gates[name]`` (B,): on for some images of a UNet call, off for the others."""
    handles = []

    def hook_for(gate):
        def hook(module, args, out):
            g = gate.to(out.device, out.dtype)
            if out.shape[0] != g.shape[0]:
                raise ValueError(f"gate_lora: a batch of {out.shape[0]} images for gates of {g.shape[0]}")
            return out * g.view(-1, *[1] * (out.ndim - 1))
        return hook

    for module in unet.modules():
        if hasattr(module, "lora_B"):
            for name, gate in gates.items():
                if name in module.lora_B:
                    handles.append(module.lora_B[name].register_forward_hook(hook_for(gate)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


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


def region_weights(pipe, regions: list[Region], height: int | None = None,
                   width: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each region's weight in the pasted noise prediction at the latent grid, (R, 1, h, w) (where regions overlap
    they share), the background's (1, h, w), and the region masks at the image's size (R, H, W) (default the
    model's own size)."""
    unet, f = pipe.unet, pipe.vae_scale_factor
    native = unet.config.sample_size * f
    height, width = height or native, width or native
    ext = extents(regions)
    masks = region_masks([r.where for r in regions], (height, width), **ext)
    own = exclusive_masks(masks, ext.get("within"))  # a wearer's pass leaves the hat's pixels to the hat's
    m = F.interpolate(own[:, None].float(), size=(height // f, width // f), mode="area")  # (R, 1, h, w)
    m = m / m.sum(0, keepdim=True).clamp_min(1.0)  # overlaps share
    rest = (1 - m.sum(0)).clamp_min(0)  # (1, s, s): the background
    return m.to(unet.device, unet.dtype), rest.to(unet.device, unet.dtype), masks


def centring_shift(w: torch.Tensor) -> tuple[int, int]:
    """The (dy, dx) latent cells that move the centre of mass of a weight map (s, s) to the canvas centre."""
    side = w.shape[-1]
    ys, xs = torch.arange(side, dtype=w.dtype, device=w.device), torch.arange(side, dtype=w.dtype, device=w.device)
    cy, cx = float((w.sum(1) * ys).sum() / w.sum()), float((w.sum(0) * xs).sum() / w.sum())
    return round((side - 1) / 2 - cy), round((side - 1) / 2 - cx)


def plain_backgrounds(pipe, seeds: list[int], height: int | None = None, width: int | None = None) -> torch.Tensor:
    """Latents (B, 4, h, w) of one plain background colour per seed (the world's colours, drawn from the seed):
    what bootstrapped passes see outside their region (a canvas of another size than the model's: its latents
    resized, a plain colour encodes to nearly constant latents)."""
    f = pipe.vae_scale_factor
    size = pipe.unet.config.sample_size * f
    colours = [scenes.background_colour(random.Random(f"bootstrap/{s}")) for s in seeds]
    z = parts.encode_images(pipe, [Image.new("RGB", (size, size), c) for c in colours])
    if (height or size, width or size) != (size, size):
        z = F.interpolate(z, size=((height or size) // f, (width or size) // f), mode="bilinear", align_corners=False)
    return z

"""Attention masking: each concept's tokens, and its pixels, confined to its region (notebook 07).

Two concepts in one prompt mix because nothing in the UNet says which pixels belong to which concept:
every pixel reads every token (cross-attention), every pixel reads every other pixel (self-attention), and
every LoRA changes every layer for every pixel. Given one region per concept, this module removes each
of those paths with an additive bias on the attention logits, ``softmax(QK^T / sqrt(d) + B)``, where
``B = -inf`` wherever a pixel may not look:

- **cross = "tokens"** (one prompt): pixels outside region r get ``-inf`` on concept r's tokens (its phrase,
  e.g. "sks woman"). The causal text encoder also writes every concept into the end-of-text and padding
  tokens (notebook 06 measures how much): ``eot="keep"`` lets every pixel read them, ``eot="background"``
  only the pixels outside every region (Bounded Attention's choice);
- **cross = "regional"** (Regional Prompter's attention mode, Mix-of-Show's regional sampling): each region
  has its own sub-prompt, encoded separately (its own start, end and padding); the UNet's context is the
  concatenation ``[global | sub_1 | ... | sub_R]`` (B, (R+1) T, d) and pixels of region r read only
  ``sub_r``, the background only the global prompt. Inside one softmax this equals computing attention
  per region and pasting it in;
- **self_attention = True** (Bounded Attention): a pixel of region r cannot read the pixels of another
  concept's region (the background is read by all and reads all);
- **bind_adapters = True** (region-bound LoRA, the single-pass form of OMG / Regional Prompter's latent
  mode): a LoRA named in region r changes the UNet only at region r's pixels, and in cross-attention's
  K and V only the tokens of ``sub_r``. The update ``(alpha/r) B A x`` is multiplied by the region's mask
  (a forward hook on peft's ``lora_B``), so the background is drawn by the base model.

Masks act on every UNet resolution (a region spec becomes a mask at 16x16, 8x8, 4x4 here; 64..8 in
SD 1.5), optionally only at some resolutions (``resolutions``) and some part of the denoising process
(``steps``: fractions, 0 = pure noise, 1 = the end), or everywhere but the coarsest grid (``coarse=False``: the middle
block, which lays out the whole image; masks there break the layout, as the sweep of notebook 07 measures). Where
regional masks are off, every pixel reads the global prompt alone. ``SINGLE_PASS_FIX`` is the course's choice.

    regions = [Region("left", "a sks woman on the left", adapter="woman_..."),
               Region("right", "a zqv man on the right", adapter="man_...")]
    images = regional_generate(pipe, "a sks woman on the left and a zqv man on the right", regions,
                               fix=AttentionMasks(), seed=[0, 1])       # mcteach.mixing.generate

The other inference fix, one UNet pass per region, is ``mcteach.mixing.passes``.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from ..sd import parts
from ..sd.attention import record_attention, token_indices, with_parts
from ..sd.pipeline import generator_for, initial_noise
from ..world.regions import masks_at, region_masks

CROSS_MODES = ("none", "tokens", "regional")
EOT_POLICIES = ("keep", "background")


@dataclass
class AttentionMasks:
    """The single-pass inference fix: which attention paths are confined to regions (see the module docstring)."""
    cross: str = "regional"  # "none" | "tokens" | "regional"
    self_attention: bool = True
    bind_adapters: bool = True
    eot: str = "keep"  # cross="tokens": who reads end-of-text and padding: "keep" (everyone) | "background"
    base: float = 0.0  # cross="regional": share of the global prompt inside regions (Regional Prompter's base ratio)
    guidance: float = 0.0  # layout guidance step size (0: off); acts during ``guidance_steps``
    guidance_steps: tuple[float, float] = (0.0, 0.4)
    resolutions: tuple[int, ...] | None = None  # UNet grid sides where masks act (None: all)
    steps: tuple[float, float] = (0.0, 1.0)  # part of the denoising process where masks act
    coarse: bool = True  # False: no attention masks at the UNet's coarsest grid (its middle block), where the layout is set

    def __post_init__(self):
        if self.cross not in CROSS_MODES:
            raise ValueError(f"unknown cross mode {self.cross!r}; choose one of {', '.join(CROSS_MODES)}")
        if self.eot not in EOT_POLICIES:
            raise ValueError(f"unknown eot policy {self.eot!r}; choose one of {', '.join(EOT_POLICIES)}")
        lo, hi = self.steps
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"steps must be fractions 0 <= start < end <= 1, got {self.steps}")


#: no masks at all: ``regional_generate`` with it is ``generate``, bit for bit
NO_FIX = AttentionMasks(cross="none", self_attention=False, bind_adapters=False)

#: the course's single-pass fix, chosen by the sweep in notebook 07 (``mcteach bench mixing --sweep``): regional
#: prompts, self-attention masks and each LoRA bound to its region, at every step and every attention grid but the
#: coarsest. Masks at the coarsest grid (4x4 here, the middle block) score 0.00 in every mode the sweep tries; without
#: them, 1.00 on the couple and on two pairs of concepts rendered for the choice (8 seeds each)
SINGLE_PASS_FIX = AttentionMasks(cross="regional", self_attention=True, bind_adapters=True, coarse=False)


class RegionMasker:
    """The ``masker`` part of ``attention.Processor``: the logit bias of every attention call.

    masks: (R, H, W) region masks; spans: for cross="tokens", each region's token positions in the prompt;
    chunk: for cross="regional", the token length T of each encoded prompt; guidance: the batch is
    [unconditional, conditional] (token masks act on the conditional half only). ``progress`` (0..1) is
    set before each UNet call (``masked``). Where the masks are off (a resolution or step outside ``fix``'s),
    regional prompts give every pixel the global prompt alone."""

    def __init__(self, masks: torch.Tensor, fix: AttentionMasks, *, spans=None, eot=None, chunk: int | None = None,
                 guidance: bool = True, coarsest: int | None = None):
        self.masks, self.fix, self.spans, self.eot, self.chunk, self.guidance = masks, fix, spans, eot, chunk, guidance
        self.coarsest = coarsest  # the side of the UNet's coarsest grid (``coarsest_side``), for ``fix.coarse``
        self.progress = 0.0
        self.suspended = False  # True: no bias at all (the layout-guidance pass reads plain attention)
        self._cache: dict = {}
        self._hard: dict[int, torch.Tensor] = {}

    def hard(self, side: int) -> torch.Tensor:
        """``masks_at(masks, side)``, computed once per resolution (LoRA hooks ask at every layer call)."""
        if side not in self._hard:
            self._hard[side] = masks_at(self.masks, side)
        return self._hard[side]

    def active(self, side: int) -> bool:
        lo, hi = self.fix.steps
        if not self.fix.coarse and self.coarsest is not None and side <= self.coarsest:
            return False
        return lo <= self.progress <= hi and (self.fix.resolutions is None or side in self.fix.resolutions)

    def bias(self, layer: str, n_queries: int, n_keys: int, batch: int, is_cross: bool, like: torch.Tensor):
        side = math.isqrt(n_queries)
        if side * side != n_queries:
            return None
        on = not self.suspended and self.active(side)
        if is_cross and self.fix.cross == "regional" and not on:  # masks off here: every pixel reads the global prompt
            return self._global_only(n_keys, like)
        if not on or (is_cross and self.fix.cross == "none") or (not is_cross and not self.fix.self_attention):
            return None
        key = (is_cross, side, n_keys, batch, like.dtype, like.device)
        if key not in self._cache:
            allowed = self._cross(side, n_keys) if is_cross else self._self(side)
            b = torch.zeros(allowed.shape, dtype=like.dtype).masked_fill(~allowed, float("-inf"))
            if is_cross and self.fix.cross == "regional" and 0 < self.fix.base < 1:  # region pixels: base : own prompt
                inside = self.hard(side).any(0)
                b[inside, : self.chunk] += math.log(self.fix.base)
                b[inside, self.chunk :] += math.log(1 - self.fix.base)
            b = b[None, None]
            if is_cross and self.fix.cross == "tokens" and self.guidance:  # the unconditional half is untouched
                b = torch.cat([torch.zeros_like(b).expand(batch // 2, -1, -1, -1), b.expand(batch - batch // 2, -1, -1, -1)])
            self._cache[key] = b.to(like.device)
        return self._cache[key]

    def _global_only(self, n_keys: int, like: torch.Tensor) -> torch.Tensor:
        """(1, 1, 1, T'): the regional context's chunk 0 (the global prompt) open, every sub-prompt closed."""
        key = ("global", n_keys, like.dtype, like.device)
        if key not in self._cache:
            b = torch.full((n_keys,), float("-inf"), dtype=like.dtype)
            b[: self.chunk] = 0
            self._cache[key] = b.view(1, 1, 1, -1).to(like.device)
        return self._cache[key]

    def _cross(self, side: int, n_keys: int) -> torch.Tensor:
        m = self.hard(side)  # (R, N)
        inside = m.any(0)
        allowed = torch.ones(side * side, n_keys, dtype=torch.bool)
        if self.fix.cross == "tokens":
            for r, span in enumerate(self.spans):
                allowed[~m[r]] &= ~_onehot(span, n_keys)
            if self.fix.eot == "background":
                allowed[inside] &= ~_onehot(self.eot, n_keys)
        else:  # regional: chunk 0 is the global prompt, chunk r + 1 region r's
            if n_keys != self.chunk * (len(m) + 1):
                raise ValueError(f"regional masking expects {len(m) + 1} prompts of {self.chunk} tokens, "
                                 f"got {n_keys} keys")
            allowed[:] = False
            allowed[~inside if self.fix.base == 0 else slice(None), : self.chunk] = True
            if self.spans and self.fix.base > 0:  # in the global prompt, each region reads only its own concept
                for r, span in enumerate(self.spans):
                    allowed[~m[r]] &= ~_onehot(span, n_keys)
            for r in range(len(m)):
                allowed[m[r], (r + 1) * self.chunk : (r + 2) * self.chunk] = True
        return allowed

    def _self(self, side: int) -> torch.Tensor:
        m = self.hard(side).float()  # (R, N)
        shared = (m.T @ m) > 0  # (N, N): i and j share a region
        inside = m.sum(0) > 0
        return shared | ~inside[:, None] | ~inside[None, :]


def _onehot(positions, n: int) -> torch.Tensor:
    v = torch.zeros(n, dtype=torch.bool)
    v[[p for p in positions if p < n]] = True
    return v


@contextmanager
def masked(pipe, masker: RegionMasker, bindings: dict[str, list[int]] | None = None):
    """Inside the block every attention layer of ``pipe.unet`` uses ``masker`` (composing with recording and
    HyperNetworks), a UNet pre-hook tells it the denoising progress, and with ``bindings`` ({LoRA adapter name:
    its regions' indices}) each LoRA's update is confined to its regions. Everything is restored afterwards."""
    unet = pipe.unet
    total = pipe.scheduler.config.num_train_timesteps

    def on_call(module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        masker.progress = 1.0 - float(torch.as_tensor(t).flatten()[0]) / total

    with ExitStack() as stack:
        previous = with_parts(unet, masker=masker)
        stack.callback(unet.set_attn_processor, previous)
        handle = unet.register_forward_pre_hook(on_call, with_kwargs=True)
        stack.callback(handle.remove)
        for h in bind_lora(unet, masker, bindings or {}):
            stack.callback(h.remove)
        yield masker


def bind_lora(unet, masker: RegionMasker, bindings: dict[str, list[int]]) -> list:
    """Forward hooks on peft's ``lora_B[name]`` that multiply adapter ``name``'s update by the union of its regions'
    masks (pixels), or, in cross-attention's ``to_k``/``to_v`` with regional prompts, by its sub-prompts' tokens.
    One adapter may carry several regions' concepts (a jointly trained or fused LoRA)."""
    if not bindings:
        return []
    names = {n for m in unet.modules() if hasattr(m, "lora_B") for n in m.lora_B}
    missing = sorted(set(bindings) - names)
    if missing:
        raise ValueError(f"no LoRA adapter named {missing[0]!r} on this UNet (loaded: {sorted(names) or 'none'}); "
                         "load it with load_adapters first")
    handles = []
    for path, module in unet.named_modules():
        if not hasattr(module, "lora_B"):
            continue
        text_side = ".attn2." in f".{path}." and path.endswith(("to_k", "to_v"))
        for name, r in bindings.items():
            if name in module.lora_B:
                handles.append(module.lora_B[name].register_forward_hook(_binder(masker, r, text_side)))
    return handles


def _binder(masker: RegionMasker, regions: list[int], text_side: bool):
    cache: dict = {}  # the multiplier of each output shape, made once (the hook runs at every LoRA layer call)

    def multiplier(out: torch.Tensor) -> torch.Tensor:
        key = (out.ndim, out.shape[1], out.shape[-1], out.dtype, out.device)
        if key not in cache:
            if text_side:  # (B, T', C): the tokens of region r's sub-prompt
                keep = torch.zeros(out.shape[1], dtype=out.dtype, device=out.device)
                for region in regions:
                    keep[(region + 1) * masker.chunk : (region + 2) * masker.chunk] = 1
                cache[key] = keep[None, :, None]
            elif out.ndim == 4:  # conv 1x1 (proj_in/out): (B, C, H, W)
                side = out.shape[-1]
                cache[key] = masker.hard(side)[regions].any(0).view(1, 1, side, side).to(out)
            else:  # (B, N, C) pixels
                side = math.isqrt(out.shape[1])
                cache[key] = masker.hard(side)[regions].any(0).view(1, -1, 1).to(out)
        return cache[key]

    def hook(module, args, out):
        if not masker.fix.bind_adapters or (text_side and masker.fix.cross != "regional"):
            return out
        return out * multiplier(out)

    return hook


@dataclass
class Region:
    """One concept's place: ``where`` (a name, a box, a mask, or ``"background"`` for a global concept), its
    sub-prompt (cross="regional"), the phrase naming it in the global prompt (cross="tokens"; default: the
    sub-prompt without its article) and the LoRA adapter bound to it (bind_adapters; a tuple: several, as a
    wearable's pass runs its own and its wearer's). ``within``: the index of the region it is nested in (a hat in
    its wearer's); ``kind``: its concept's kind ("person", "wearable", "place"...), checked by
    ``regions.region_masks``."""
    where: object
    prompt: str
    phrase: str | None = None
    adapter: str | tuple[str, ...] | None = None
    within: int | None = None
    kind: str | None = None

    @property
    def adapters(self) -> tuple[str, ...]:
        """The LoRA adapters of this region's concept (none, one, or several)."""
        return () if not self.adapter else (self.adapter,) if isinstance(self.adapter, str) else tuple(self.adapter)

    @property
    def words(self) -> str:
        if self.phrase:
            return self.phrase
        first, _, rest = self.prompt.partition(" ")
        return rest if first in ("a", "an", "the") and rest else self.prompt


def prompt_embeds(pipe, prompts: list[str]) -> torch.Tensor:
    """Text-encoder outputs of ``prompts`` concatenated along the tokens: (1, len(prompts) * T, d)."""
    ids = parts.tokenize(pipe.tokenizer, pipe.maybe_convert_prompt(prompts, pipe.tokenizer)).to(pipe.device)
    with torch.no_grad():
        c = pipe.text_encoder(ids)[0]
    return c.reshape(1, -1, c.shape[-1])


def eot_positions(tokenizer, prompt: str) -> list[int]:
    """Positions of end-of-text and padding in the tokenized ``prompt``."""
    n = len(tokenizer(prompt).input_ids)
    return list(range(n - 1, tokenizer.model_max_length))


def make_masker(pipe, prompt: str, regions: list[Region], fix: AttentionMasks, guidance: bool = True) -> RegionMasker:
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    masks = region_masks([r.where for r in regions], size, **extents(regions))
    spans = eot = None
    if fix.cross == "tokens" or (fix.cross == "regional" and fix.base > 0) or fix.guidance > 0:
        expanded = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
        spans = [token_indices(pipe.tokenizer, expanded, pipe.maybe_convert_prompt(r.words, pipe.tokenizer))
                 for r in regions]
        eot = eot_positions(pipe.tokenizer, expanded)
    return RegionMasker(masks, fix, spans=spans, eot=eot, chunk=pipe.tokenizer.model_max_length, guidance=guidance,
                        coarsest=coarsest_side(pipe.unet))


def adapter_regions(regions: list[Region]) -> dict[str, list[int]]:
    """{LoRA adapter name: the indices of the regions it draws}: one per region for adapters trained one by one,
    several for one adapter that knows several concepts (joint or fused)."""
    out: dict[str, list[int]] = {}
    for i, r in enumerate(regions):
        for a in r.adapters:
            out.setdefault(a, []).append(i)
    return out


def extents(regions: list[Region]) -> dict:
    """``region_masks``' keyword arguments for the regions' nesting and kinds (empty when none is given)."""
    out = {}
    if any(r.within is not None for r in regions):
        out["within"] = [r.within for r in regions]
    if any(r.kind is not None for r in regions):
        out["kinds"] = [r.kind for r in regions]
    return out


def attention_sides(unet) -> list[int]:
    """The grid sides the UNet's attention layers work at, finest first: [16, 8, 4] for the embedded model (64 px),
    [64, 32, 16, 8] for SD 1.5 (512 px)."""
    side, levels = unet.config.sample_size, len(unet.config.block_out_channels)
    return [side // 2 ** k for k in range(levels)]


def coarsest_side(unet) -> int:
    """The side of the UNet's coarsest grid (its middle block's): 4 for the embedded model, 8 for SD 1.5."""
    return attention_sides(unet)[-1]


def masked_generate(pipe, prompt: str, regions: list[Region], *, fix: AttentionMasks, seeds: list[int], steps: int = 25,
                    guidance_scale: float = 5.0, store=None, **kwargs):
    """One image per seed of ``prompt``, one UNet call per step, with the attention masks of ``fix`` on
    ``regions``. With ``NO_FIX`` this is ``generate(pipe, prompt, seed=seeds)``, bit for bit.
    ``store``: an ``AttentionStore`` to record into (``record_attention``'s), composed with the masks."""
    masker = make_masker(pipe, prompt, regions, fix)
    bindings = adapter_regions(regions) if fix.bind_adapters else {}
    if fix.cross == "regional":
        cond = prompt_embeds(pipe, [prompt] + [r.prompt for r in regions])
        uncond = prompt_embeds(pipe, [""] * (len(regions) + 1))
        call = dict(prompt_embeds=cond.expand(len(seeds), -1, -1), negative_prompt_embeds=uncond.expand(len(seeds), -1, -1))
    else:
        call = dict(prompt=[prompt] * len(seeds))
    if fix.guidance > 0:
        context = prompt_embeds(pipe, [prompt]).expand(len(seeds), -1, -1)
        call["callback_on_step_end"] = lambda p, i, t, kw: _guide(p, i, kw, masker, context, fix)
        call["callback_on_step_end_tensor_inputs"] = ["latents"]
    with ExitStack() as stack:
        stack.enter_context(masked(pipe, masker, bindings))
        if store is not None:
            previous = with_parts(pipe.unet, store=store)
            stack.callback(pipe.unet.set_attn_processor, previous)
        kwargs.setdefault("latents", initial_noise(pipe, list(seeds), height=kwargs.get("height"), width=kwargs.get("width")))
        out = pipe(num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator_for(seeds),
                   **call, **kwargs)
    return out.images


def layout_loss(store, masker: RegionMasker) -> torch.Tensor:
    """Layout guidance's energy (Chen et al. 2023; Bounded Attention's is alike): for each concept, the share
    of its tokens' cross-attention that falls *outside* its region, squared, averaged over layers."""
    total, n = 0.0, 0
    for probs in store.cross.values():  # (B, N, T)
        side = math.isqrt(probs.shape[1])
        m = masker.hard(side).to(probs.device)
        for r, span in enumerate(masker.spans):
            a = probs[..., span].sum(-1)  # (B, N)
            inside = (a * m[r]).sum(-1) / a.sum(-1).clamp_min(1e-8)
            total, n = total + (1 - inside).pow(2).mean(), n + 1
    return total / max(n, 1)


def _guide(pipe, i: int, kw: dict, masker: RegionMasker, context: torch.Tensor, fix: AttentionMasks) -> dict:
    """After step i: move the latents down the layout loss's gradient at the next timestep (one UNet pass with
    the masks suspended, the conditional prompt only)."""
    timesteps = pipe.scheduler.timesteps
    if i + 1 >= len(timesteps):
        return kw
    progress = (i + 1) / len(timesteps)
    lo, hi = fix.guidance_steps
    if not lo <= progress <= hi:
        return kw
    latents = kw["latents"]
    with torch.enable_grad():
        z = latents.detach().clone().requires_grad_(True)
        masker.suspended = True
        try:
            with record_attention(pipe.unet, guidance=False, keep_grad=True) as store:
                pipe.unet(pipe.scheduler.scale_model_input(z, timesteps[i + 1]), timesteps[i + 1], context)
            loss = layout_loss(store, masker)
            grad, = torch.autograd.grad(loss, z)
        finally:
            masker.suspended = False
    kw["latents"] = (latents - fix.guidance * grad).detach()
    return kw



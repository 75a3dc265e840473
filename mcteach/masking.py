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
(``steps``: fractions, 0 = pure noise, 1 = the end).

    regions = [Region("left", "a sks woman on the left", adapter="woman_..."),
               Region("right", "a zqv man on the right", adapter="man_...")]
    images = regional_generate(pipe, "a sks woman on the left and a zqv man on the right", regions,
                               fix=Fix(), seed=[0, 1])
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .attention import token_indices, with_parts
from .pipeline import generator_for, initial_noise

#: named regions as (x0, y0, x1, y1) fractions of the image
NAMED_REGIONS = {
    "left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0),
    "top": (0.0, 0.0, 1.0, 0.5), "bottom": (0.0, 0.5, 1.0, 1.0),
    "top-left": (0.0, 0.0, 0.5, 0.5), "top-right": (0.5, 0.0, 1.0, 0.5),
    "bottom-left": (0.0, 0.5, 0.5, 1.0), "bottom-right": (0.5, 0.5, 1.0, 1.0),
    "left-third": (0.0, 0.0, 1 / 3, 1.0), "middle-third": (1 / 3, 0.0, 2 / 3, 1.0), "right-third": (2 / 3, 0.0, 1.0, 1.0),
}
CROSS_MODES = ("none", "tokens", "regional")
EOT_POLICIES = ("keep", "background")


class RegionError(ValueError):
    """A region spec that cannot be used; the message says what to fix."""


def parse_box(text: str) -> tuple[float, float, float, float]:
    """"x0,y0,x1,y1" (fractions in [0, 1]) -> a tuple; RegionError when malformed."""
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise RegionError(f"region {text!r} is neither a name ({', '.join(NAMED_REGIONS)}) nor a box "
                          "'x0,y0,x1,y1' of four fractions in [0, 1]")
    return box


def region_mask(spec, size: int) -> np.ndarray:
    """A float (size, size) mask in [0, 1] from a region spec: a name (``"left"``, ``"top-right"``,
    ``"middle-third"``...), a box ``(x0, y0, x1, y1)`` or ``"x0,y0,x1,y1"`` in fractions of the image, or a
    mask (h, w) of any size (array, tensor or PIL image; resized to ``size``). RegionError when it is empty,
    all zero, or out of range."""
    if isinstance(spec, str):
        spec = NAMED_REGIONS[spec] if spec in NAMED_REGIONS else parse_box(spec)
    if isinstance(spec, (tuple, list)) and len(spec) == 4 and all(np.isscalar(v) for v in spec):
        x0, y0, x1, y1 = (float(v) for v in spec)
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise RegionError(f"box {spec} is out of range or empty: need 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 "
                              "(fractions of the image width and height)")
        m = np.zeros((size, size), np.float32)
        m[round(y0 * size) : max(round(y1 * size), round(y0 * size) + 1),
          round(x0 * size) : max(round(x1 * size), round(x0 * size) + 1)] = 1.0
        return m
    a = np.asarray(spec.convert("L") if hasattr(spec, "convert") else torch.as_tensor(spec).detach().cpu(),
                   dtype=np.float32)
    if a.ndim != 2 or min(a.shape) == 0:
        raise RegionError(f"a mask must be 2-D (height, width), got shape {a.shape}")
    if a.max() > 1.0:
        a = a / 255.0
    if not np.isfinite(a).all() or a.min() < 0:
        raise RegionError("a mask's values must be in [0, 1] (or 0..255)")
    if a.max() <= 0:
        raise RegionError("this mask is all zero: it would silently mask nothing; draw the region first")
    if a.shape != (size, size):
        a = F.interpolate(torch.from_numpy(a)[None, None], size=(size, size), mode="area")[0, 0].numpy()
    return a


#: how much of the smaller of two regions may be shared with the other (a hand-drawn edge), as a fraction
MAX_OVERLAP = 0.05


def region_masks(specs, size: int = 64) -> torch.Tensor:
    """Validated masks (R, size, size) of ``specs``: at least one region, none all zero, no region lying
    entirely inside another, and no two overlapping by more than ``MAX_OVERLAP`` of the smaller one (a pixel
    claimed by two concepts is where they mix). A thin shared edge, as hand-drawn masks have, is allowed: its
    pixels read both concepts, and the passes' noise predictions are averaged there."""
    specs = list(specs)
    if not specs:
        raise RegionError("no regions given: name at least one (e.g. 'left'), a box 'x0,y0,x1,y1' or a mask")
    masks = torch.from_numpy(np.stack([region_mask(s, size) for s in specs]))
    hard = masks >= 0.5
    for i, m in enumerate(hard):
        if not m.any():
            raise RegionError(f"region {i} ({_describe(specs[i])}) covers less than half a pixel at {size}x{size}: "
                              "make it larger")
    for i in range(len(specs)):
        for j in range(len(specs)):
            if i != j and (hard[i] <= hard[j]).all():
                raise RegionError(f"region {i} ({_describe(specs[i])}) lies entirely inside region {j} "
                                  f"({_describe(specs[j])}): give each concept a place of its own")
    for i in range(len(specs)):
        for j in range(i + 1, len(specs)):
            shared = int((hard[i] & hard[j]).sum())
            smaller = int(min(hard[i].sum(), hard[j].sum()))
            if shared > MAX_OVERLAP * smaller:
                raise RegionError(f"regions {i} ({_describe(specs[i])}) and {j} ({_describe(specs[j])}) overlap on "
                                  f"{shared / smaller:.0%} of the smaller one (at most {MAX_OVERLAP:.0%} allowed): the "
                                  "two concepts would mix there; trim the boxes so that each concept has its own place")
    return masks


def _describe(spec) -> str:
    return spec if isinstance(spec, str) else (str(tuple(spec)) if isinstance(spec, (tuple, list)) else "a mask")


def masks_at(masks: torch.Tensor, side: int) -> torch.Tensor:
    """Boolean (R, side * side) masks at a UNet resolution: area-averaged, a cell is in a region when at least
    half of it is; a region too small for this grid keeps its best-covered cell (it never vanishes)."""
    m = F.interpolate(masks[:, None].float(), size=(side, side), mode="area")[:, 0].flatten(1)
    hard = m >= 0.5
    empty = ~hard.any(1)
    hard[empty, m[empty].argmax(1)] = True
    return hard


@dataclass
class Fix:
    """An inference fix: which attention paths are confined to regions (see the module docstring)."""

    cross: str = "regional"  # "none" | "tokens" | "regional"
    self_attention: bool = True
    bind_adapters: bool = True
    eot: str = "keep"  # cross="tokens": who reads end-of-text and padding: "keep" (everyone) | "background"
    base: float = 0.0  # cross="regional": share of the global prompt inside regions (Regional Prompter's base ratio)
    guidance: float = 0.0  # layout guidance step size (0: off); acts during ``guidance_steps``
    guidance_steps: tuple[float, float] = (0.0, 0.4)
    passes: bool = False  # one UNet pass per region, noise predictions pasted by region (``region_passes``)
    bootstrap: float = 0.0  # passes: for this first part of the process, each pass sees plain background outside
    recentre: bool = False  # passes: each pass sees its region moved to the centre of the canvas
    pass_guidance: float = 1.0  # passes: each pass's classifier-free guidance scale, as a fraction of the call's
    resolutions: tuple[int, ...] | None = None  # UNet grid sides where masks act (None: all)
    steps: tuple[float, float] = (0.0, 1.0)  # part of the denoising process where masks act

    def __post_init__(self):
        if self.cross not in CROSS_MODES:
            raise ValueError(f"unknown cross mode {self.cross!r}; choose one of {', '.join(CROSS_MODES)}")
        if self.eot not in EOT_POLICIES:
            raise ValueError(f"unknown eot policy {self.eot!r}; choose one of {', '.join(EOT_POLICIES)}")
        lo, hi = self.steps
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"steps must be fractions 0 <= start < end <= 1, got {self.steps}")

    @property
    def is_empty(self) -> bool:
        return self.cross == "none" and not self.self_attention and not self.bind_adapters and not self.passes


NO_FIX = Fix(cross="none", self_attention=False, bind_adapters=False)
#: the course's inference fix, chosen by the ablation in notebook 07 / ``python -m mcteach.bench --ablation``:
#: one pass per region with its own adapter and sub-prompt (which names the region's place: "a cpd woman on the
#: left"), bootstrapped for the first half, each pass at half the call's guidance (2.5 for the course's 5). At the
#: full scale the pasted predictions push skin tones and speckle the background (a cpd woman of medium skin comes
#: out medium-light)
INFERENCE_FIX = Fix(cross="none", self_attention=False, bind_adapters=False, passes=True, bootstrap=0.5,
                    pass_guidance=0.5)
#: every single-pass attention mask at once (regional prompts, self-attention masks, region-bound LoRA)
SINGLE_PASS_FIX = Fix(cross="regional", self_attention=True, bind_adapters=True)


class RegionMasker:
    """The ``masker`` part of ``attention.Processor``: the logit bias of every attention call.

    masks: (R, H, W) region masks; spans: for cross="tokens", each region's token positions in the prompt;
    chunk: for cross="regional", the token length T of each encoded prompt; guidance: the batch is
    [unconditional, conditional] (token masks act on the conditional half only). ``progress`` (0..1) is
    set before each UNet call (``masked``)."""

    def __init__(self, masks: torch.Tensor, fix: Fix, *, spans=None, eot=None, chunk: int | None = None,
                 guidance: bool = True):
        self.masks, self.fix, self.spans, self.eot, self.chunk, self.guidance = masks, fix, spans, eot, chunk, guidance
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
        return lo <= self.progress <= hi and (self.fix.resolutions is None or side in self.fix.resolutions)

    def bias(self, layer: str, n_queries: int, n_keys: int, batch: int, is_cross: bool, like: torch.Tensor):
        side = math.isqrt(n_queries)
        if self.suspended or side * side != n_queries or not self.active(side):
            return None
        if (is_cross and self.fix.cross == "none") or (not is_cross and not self.fix.self_attention):
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
def masked(pipe, masker: RegionMasker, bindings: dict[str, int] | None = None):
    """Inside the block every attention layer of ``pipe.unet`` uses ``masker`` (composing with recording and
    HyperNetworks), a UNet pre-hook tells it the denoising progress, and with ``bindings`` ({LoRA adapter name:
    region index}) each LoRA's update is confined to its region. Everything is restored afterwards."""
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


def bind_lora(unet, masker: RegionMasker, bindings: dict[str, int]) -> list:
    """Forward hooks on peft's ``lora_B[name]`` that multiply adapter ``name``'s update by its region's mask
    (pixels), or, in cross-attention's ``to_k``/``to_v`` with regional prompts, by its sub-prompt's tokens."""
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


def _binder(masker: RegionMasker, region: int, text_side: bool):
    def hook(module, args, out):
        if not masker.fix.bind_adapters:
            return out
        if text_side:  # (B, T', C): the tokens of region r's sub-prompt (regional prompts only)
            if masker.fix.cross != "regional":
                return out
            keep = torch.zeros(out.shape[1], dtype=out.dtype, device=out.device)
            keep[(region + 1) * masker.chunk : (region + 2) * masker.chunk] = 1
            return out * keep[None, :, None]
        if out.ndim == 4:  # conv 1x1 (proj_in/out): (B, C, H, W)
            side = out.shape[-1]
            return out * masker.hard(side)[region].view(1, 1, side, side).to(out)
        side = math.isqrt(out.shape[1])  # (B, N, C) pixels
        return out * masker.hard(side)[region].view(1, -1, 1).to(out)

    return hook


@dataclass
class Region:
    """One concept's place: ``where`` (a name, a box or a mask), its sub-prompt (cross="regional"), the
    phrase naming it in the global prompt (cross="tokens"; default: the sub-prompt without its article)
    and the LoRA adapter bound to it (bind_adapters)."""

    where: object
    prompt: str
    phrase: str | None = None
    adapter: str | None = None

    @property
    def words(self) -> str:
        if self.phrase:
            return self.phrase
        first, _, rest = self.prompt.partition(" ")
        return rest if first in ("a", "an", "the") and rest else self.prompt


def prompt_embeds(pipe, prompts: list[str]) -> torch.Tensor:
    """Text-encoder outputs of ``prompts`` concatenated along the tokens: (1, len(prompts) * T, d)."""
    from . import sd

    ids = sd.tokenize(pipe.tokenizer, pipe.maybe_convert_prompt(prompts, pipe.tokenizer)).to(pipe.device)
    with torch.no_grad():
        c = pipe.text_encoder(ids)[0]
    return c.reshape(1, -1, c.shape[-1])


def eot_positions(tokenizer, prompt: str) -> list[int]:
    """Positions of end-of-text and padding in the tokenized ``prompt``."""
    n = len(tokenizer(prompt).input_ids)
    return list(range(n - 1, tokenizer.model_max_length))


def make_masker(pipe, prompt: str, regions: list[Region], fix: Fix, guidance: bool = True) -> RegionMasker:
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    masks = region_masks([r.where for r in regions], size)
    spans = eot = None
    if fix.cross == "tokens" or (fix.cross == "regional" and fix.base > 0) or fix.guidance > 0:
        expanded = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
        spans = [token_indices(pipe.tokenizer, expanded, pipe.maybe_convert_prompt(r.words, pipe.tokenizer))
                 for r in regions]
        eot = eot_positions(pipe.tokenizer, expanded)
    return RegionMasker(masks, fix, spans=spans, eot=eot, chunk=pipe.tokenizer.model_max_length, guidance=guidance)


def place_words(where) -> str | None:
    """The words of the place a region spec is mostly in ("on the left", "at the top"...): the named half whose
    box overlaps it best (intersection over union at least 0.5), else None (a middle third, a small corner box)."""
    from .world import POSITIONS

    m = region_mask(where, 24) > 0.5
    iou = {}
    for name in ("left", "right", "top", "bottom"):  # ties (a quarter) go to the first: left or right
        half = region_mask(POSITIONS[name][1], 24) > 0.5
        iou[name] = (m & half).sum() / (m | half).sum()
    name = max(iou, key=iou.get)
    return POSITIONS[name][0] if iou[name] >= 0.5 else None


def sub_prompt(phrase: str, where, fix: Fix | None = None) -> str:
    """A region's sub-prompt for ``fix`` (default ``INFERENCE_FIX``): "a cpd woman on the left" where the region
    is mostly in a half (its pass is drawn on the whole canvas, so the sub-prompt says where), "a cpd woman"
    elsewhere and for recentred passes (each sees its region at the centre)."""
    fix = INFERENCE_FIX if fix is None else fix
    words = None if fix.recentre else place_words(where)
    return f"a {phrase} {words}" if words else f"a {phrase}"


def regional_generate(pipe, prompt: str, regions: list[Region], *, fix: Fix = Fix(), seed=0, steps: int = 25,
                      guidance_scale: float = 5.0, store=None, **kwargs):
    """Images of ``prompt`` with ``fix`` applied to ``regions`` (one per concept); ``seed``: an int or a
    list (one image each). With ``NO_FIX`` this is ``generate(pipe, prompt, seed=...)``, bit for bit.
    ``store``: an ``AttentionStore`` to record into (``record_attention``'s), composed with the masks."""
    seeds = [seed] if isinstance(seed, int) else list(seed)
    if guidance_scale <= 1:
        raise ValueError("regional_generate needs classifier-free guidance (guidance_scale > 1)")
    if fix.passes:
        return region_passes(pipe, prompt, regions, fix=fix, seeds=seeds, steps=steps, guidance_scale=guidance_scale)
    masker = make_masker(pipe, prompt, regions, fix)
    bindings = {r.adapter: i for i, r in enumerate(regions) if r.adapter} if fix.bind_adapters else {}
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


def _guide(pipe, i: int, kw: dict, masker: RegionMasker, context: torch.Tensor, fix: Fix) -> dict:
    """After step i: move the latents down the layout loss's gradient at the next timestep (one UNet pass with
    the masks suspended, the conditional prompt only)."""
    from .attention import record_attention

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


@torch.no_grad()
def region_passes(pipe, prompt: str, regions: list[Region], *, fix: Fix, seeds: list[int], steps: int = 25,
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
    left"). ``fix.pass_guidance``: each pass's guidance scale, as a fraction of ``guidance_scale``. Attention masks
    of ``fix`` (cross, self) act inside every pass. Cost: one UNet call per region per step."""
    import random

    from PIL import Image

    from . import sd, world

    unet, sched = pipe.unet, pipe.scheduler
    size = unet.config.sample_size * pipe.vae_scale_factor
    masks = region_masks([r.where for r in regions], size)
    side = unet.config.sample_size
    m = F.interpolate(masks[:, None].float(), size=(side, side), mode="area")  # (R, 1, s, s)
    m = m / m.sum(0, keepdim=True).clamp_min(1.0)  # overlaps share
    rest = (1 - m.sum(0)).clamp_min(0)  # (1, s, s): the background
    names = [r.adapter for r in regions]
    has_lora = any(names) and hasattr(pipe, "set_adapters")
    all_adapters = pipe.get_active_adapters() if has_lora else []
    conds = [prompt_embeds(pipe, [r.prompt]) for r in regions]
    glob, uncond = prompt_embeds(pipe, [prompt]), prompt_embeds(pipe, [""])
    device, dtype = unet.device, unet.dtype
    latents = torch.cat([sd.initial_latents(pipe, 1, s) for s in seeds])
    noise = latents / sched.init_noise_sigma
    colours = [world._background(random.Random(f"bootstrap/{s}")) for s in seeds]
    bg = sd.encode_images(pipe, [Image.new("RGB", (size, size), c) for c in colours])
    m, rest = m.to(device, dtype), rest.to(device, dtype)
    sched.set_timesteps(steps, device=device)
    n = len(seeds)
    masker = RegionMasker(masks, fix, chunk=pipe.tokenizer.model_max_length) if (fix.self_attention) else None
    scale = guidance_scale * fix.pass_guidance

    shifts = []
    for r in range(len(regions)):  # latent cells that move region r's centre of mass to the canvas centre
        w = m[r, 0]
        ys, xs = torch.arange(side, dtype=w.dtype, device=w.device), torch.arange(side, dtype=w.dtype, device=w.device)
        cy, cx = float((w.sum(1) * ys).sum() / w.sum()), float((w.sum(0) * xs).sum() / w.sum())
        shifts.append((round((side - 1) / 2 - cy), round((side - 1) / 2 - cx)) if fix.recentre else (0, 0))

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
        return e_u + scale * (e_c - e_u)

    try:
        with ExitStack() as stack:
            if masker is not None:
                stack.enter_context(masked(pipe, masker))
            for i, t in enumerate(sched.timesteps):
                progress = i / len(sched.timesteps)
                eps = 0
                for r, cond in enumerate(conds):
                    z = latents
                    if progress < fix.bootstrap:  # outside the region (mostly): noised plain background
                        z_bg = sched.add_noise(bg, noise, t.reshape(1))
                        z = m[r] * latents + (1 - m[r]) * torch.where(1 - m[r] > 0.5, z_bg, latents)
                    dy, dx = shifts[r]
                    e = eps_of(torch.roll(z, (dy, dx), dims=(2, 3)), t, cond, names[r])
                    eps = eps + m[r] * torch.roll(e, (-dy, -dx), dims=(2, 3))
                if rest.max() > 0:
                    eps = eps + rest * eps_of(latents, t, glob, "*" if has_lora else None)
                latents = sched.step(eps, t, latents).prev_sample
    finally:
        if has_lora:
            pipe.set_adapters(all_adapters)
    return sd.decode_latents(pipe, latents)

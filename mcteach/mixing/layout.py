"""Automatic layout (notebook 07): the model chooses where each concept goes; the user gives no regions.

A short probe draws the prompt ("a cpd woman and a tkb man", no place words) with every adapter on and no masks
for the first ``probe`` of the steps, and records each concept's cross-attention: its words' maps, on every grid
but the coarsest. Two ways to turn the maps into regions (``AutoLayout.choose``):

- ``"template"`` (the default): every assignment of the concepts to the places of a template (the two halves, the
  three thirds, the four quadrants) is scored by the share of each concept's attention that falls inside its
  place, and the best assignment of each seed is drawn;
- ``"argmax"`` (FreeFuse's): each latent cell goes to the concept whose normalised map is largest there, balanced
  so that every concept keeps ``min_share`` of the canvas.

Then the regions are drawn with a fix (default the passes fix) from the probe's initial noise::

    result = auto_generate(pipe, "a cpd woman and a tkb man", ["cpd woman", "tkb man"], adapters=[...], seed=[0, 1])
    result.images, result.layouts          # the images and, per seed, the places the concepts were given

The probe's cost is ``probe`` of a plain generation (0.2 with the defaults) on top of the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import permutations

import torch
import torch.nn.functional as F

from ..sd.attention import record_attention, token_indices
from ..sd.pipeline import generator_for, initial_noise
from ..world.regions import REGIONS, region_masks
from .generate import regional_generate
from .masking import AttentionMasks, Region, coarsest_side
from .passes import INFERENCE_FIX, RegionPasses, sub_prompt

#: the places a template layout gives n concepts
TEMPLATES = {
    2: ("left", "right"),
    3: ("left-third", "middle-third", "right-third"),
    4: ("top-left", "top-right", "bottom-left", "bottom-right"),
}
CHOICES = ("template", "argmax")


@dataclass
class AutoLayout:
    """The automatic layout's settings: ``choose`` (``CHOICES``), the probe's share of the steps, and for
    ``"argmax"`` the background's threshold (a fraction of each map's peak) and the least share of the canvas a
    concept keeps. ``templates``: the place tuples to choose among (default ``TEMPLATES`` for the number of
    concepts), e.g. ``[("left", "right"), ("top", "bottom")]``."""
    choose: str = "template"
    probe: float = 0.2
    threshold: float = 0.3
    min_share: float = 0.1
    templates: list = field(default_factory=list)

    def __post_init__(self):
        if self.choose not in CHOICES:
            raise ValueError(f"choose must be one of {', '.join(CHOICES)}, got {self.choose!r}")
        if not 0 < self.probe <= 1 or not 0 <= self.threshold < 1 or not 0 <= self.min_share < 0.5:
            raise ValueError(f"need 0 < probe <= 1, 0 <= threshold < 1, 0 <= min_share < 0.5; got {self}")
        for t in self.templates:
            unknown = [p for p in t if p not in REGIONS]
            if unknown:
                raise ValueError(f"unknown places {unknown} in template {t}: use {', '.join(REGIONS)}")


@dataclass
class AutoResult:
    """``auto_generate``'s images, and per seed the layout they were drawn with: a tuple of places (one per
    concept, in the order of the phrases) or an (R, H, W) mask tensor (``choose="argmax"``); ``scores``: per seed,
    each candidate layout's attention share (template choice only)."""
    images: list
    layouts: list
    scores: list


def concept_maps(pipe, prompt: str, phrases: list[str], seeds: list[int], *, probe: float = 0.2, steps: int = 25,
                 guidance_scale: float = 5.0) -> torch.Tensor:
    """(B, R, s, s) each concept's cross-attention in the first ``probe`` of the steps of a plain generation of
    ``prompt`` (every adapter on, no masks): its words' tokens summed, layers averaged on every grid but the
    coarsest, at the latent grid s."""
    expanded = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    spans = []
    for p in phrases:
        try:
            spans.append(token_indices(pipe.tokenizer, expanded, pipe.maybe_convert_prompt(p, pipe.tokenizer)))
        except ValueError as err:
            raise ValueError(f"the prompt {prompt!r} does not name {p!r}: automatic layout finds each concept by "
                             "its words in the prompt, so write each concept's phrase in it") from err
    n_probe = max(1, round(probe * steps))

    def stop(p, i, t, kw):
        if i + 1 >= n_probe:
            p._interrupt = True
        return kw

    side, coarsest = pipe.unet.config.sample_size, coarsest_side(pipe.unet)
    with record_attention(pipe) as store:
        pipe([prompt] * len(seeds), num_inference_steps=steps, guidance_scale=guidance_scale,
             generator=generator_for(seeds), latents=initial_noise(pipe, list(seeds)), output_type="latent",
             callback_on_step_end=stop)
    layers = [n for n, m in store.layer_maps().items() if round(m.shape[1] ** 0.5) > coarsest]
    maps = store.token_maps(res=side, layers=layers)  # (B, T, s, s)
    return torch.stack([maps[:, span].sum(1) for span in spans], 1)


def candidates(n: int, templates=None) -> list[tuple[str, ...]]:
    """Every assignment of ``n`` concepts to the places of each template (default ``TEMPLATES[n]``): concept k
    goes to place ``c[k]`` of candidate c. Two concepts: [("left", "right"), ("right", "left")]."""
    if not templates:
        if n not in TEMPLATES:
            raise ValueError(f"automatic layout has templates for {', '.join(map(str, TEMPLATES))} concepts, not {n}: "
                             "give regions by hand (--region) or templates of your own")
        templates = [TEMPLATES[n]]
    for t in templates:
        if len(t) != n:
            raise ValueError(f"template {t} has {len(t)} places for {n} concepts")
    return [c for t in templates for c in permutations(t)]


def layout_score(maps: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
    """One layout's score: for concept maps (..., R, s, s) and the place given to each concept, (R, s, s) bool, the
    mean over concepts of the share of the concept's attention inside its place (1: each concept attends only
    inside its own place). Each map is divided by its own sum first, so a concept whose words draw less attention
    counts as much as the others."""
    share = maps.clamp_min(0).flatten(-2)
    share = share / share.sum(-1, keepdim=True).clamp_min(1e-12)
    return (share * places.flatten(-2).to(share.dtype)).sum(-1).mean(-1)


def layout_scores(maps: torch.Tensor, cands: list[tuple[str, ...]]) -> torch.Tensor:
    """(B, C): ``layout_score`` of each image's concept maps (B, R, s, s) for each candidate layout."""
    side = maps.shape[-1]
    places = sorted({p for c in cands for p in c})
    place_masks = dict(zip(places, region_masks(places, side) >= 0.5))
    return torch.stack([layout_score(maps, torch.stack([place_masks[p] for p in c])) for c in cands], 1)


def assign_regions(maps: torch.Tensor, threshold: float = 0.3, min_share: float = 0.1) -> torch.Tensor:
    """Balanced argmax of concept maps (R, s, s) -> disjoint boolean regions (R, s, s), none empty.

    Each map is divided by its own peak; a cell goes to the largest, or to nobody (the background) where even the
    largest is under ``threshold``. A concept holding under ``min_share`` of the cells then takes its strongest
    cells, by its map's margin over the current owner's, until it has that share (or at least one cell)."""
    r, s, _ = maps.shape
    norm = maps / maps.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    best, owner = norm.max(0)
    regions = torch.stack([(owner == k) & (best >= threshold) for k in range(r)])
    need = max(1, round(min_share * s * s))
    for k in range(r):
        short = need - int(regions[k].sum())
        if short <= 0:
            continue
        held = regions.any(0)
        others = torch.where(held, (norm * regions).sum(0), torch.zeros_like(best))
        margin = (norm[k] - others).masked_fill(regions[k], float("-inf"))
        for idx in margin.flatten().topk(short).indices:
            y, x = divmod(int(idx), s)
            regions[:, y, x] = False
            regions[k, y, x] = True
    return regions


def auto_generate(pipe, prompt: str, phrases: list[str], *, adapters=None, seed=0,
                  fix: RegionPasses | AttentionMasks = INFERENCE_FIX, layout: AutoLayout = AutoLayout(),
                  steps: int = 25, guidance_scale: float = 5.0) -> AutoResult:
    """Images of ``prompt`` with a region per concept of ``phrases`` that the model's attention chose (no regions
    given), each drawn with ``fix`` from the probe's initial noise. ``adapters``: the LoRA adapter name of each
    phrase (bound to its region), or None. Region k's sub-prompt is ``passes.sub_prompt(phrase k, its place)``."""
    seeds = [seed] if isinstance(seed, int) else list(seed)
    adapters = list(adapters) if adapters is not None else [None] * len(phrases)
    if len(phrases) < 2:
        raise ValueError(f"automatic layout places two or more concepts, got {len(phrases)}: {phrases}")
    if len(adapters) != len(phrases):
        raise ValueError(f"{len(adapters)} adapters for {len(phrases)} concepts: give one per phrase (or None)")
    cands = candidates(len(phrases), layout.templates) if layout.choose == "template" else []
    maps = concept_maps(pipe, prompt, phrases, seeds, probe=layout.probe, steps=steps, guidance_scale=guidance_scale)

    def regions_of(where) -> list[Region]:
        return [Region(w, sub_prompt(p, w, fix), phrase=p, adapter=a) for w, p, a in zip(where, phrases, adapters)]

    def draw(where, group):
        return regional_generate(pipe, prompt, regions_of(where), fix=fix, seed=group, steps=steps,
                                 guidance_scale=guidance_scale)

    images = [None] * len(seeds)
    if layout.choose == "template":
        scores = layout_scores(maps, cands)
        layouts = [cands[int(i)] for i in scores.argmax(1)]
        for c in dict.fromkeys(layouts):  # one call per chosen layout, in a stable order
            idx = [i for i, x in enumerate(layouts) if x == c]
            for i, im in zip(idx, draw(c, [seeds[i] for i in idx])):
                images[i] = im
        return AutoResult(images, layouts, scores.tolist())
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    layouts = []
    for i, (s, m) in enumerate(zip(seeds, maps)):
        masks = F.interpolate(assign_regions(m, layout.threshold, layout.min_share).float()[:, None],
                              size=(size, size), mode="nearest")[:, 0]
        layouts.append(masks)
        images[i] = draw([mk.numpy() for mk in masks], [s])[0]
    return AutoResult(images, layouts, [])

"""Generating with regions (notebook 07): ``regional_generate`` draws a prompt with one region per concept and an
inference fix, either attention masks in one UNet pass (``masking.AttentionMasks``) or one pass per region
(``passes.RegionPasses``)."""

from __future__ import annotations

from .masking import AttentionMasks, Region, masked_generate
from .passes import RegionPasses, region_passes

#: each fix's sampler
SAMPLERS = {AttentionMasks: masked_generate, RegionPasses: region_passes}


def regional_generate(pipe, prompt: str, regions: list[Region], *, fix: AttentionMasks | RegionPasses = AttentionMasks(),
                      seed=0, steps: int = 25, guidance_scale: float = 5.0, **kwargs):
    """Images of ``prompt`` with ``fix`` applied to ``regions`` (one per concept); ``seed``: an int or a list (one
    image each). With ``masking.NO_FIX`` this is ``generate(pipe, prompt, seed=...)``, bit for bit. Keywords go to
    the sampler (``store=``: an ``AttentionStore`` to record into, for attention masks)."""
    if type(fix) not in SAMPLERS:
        raise TypeError(f"fix must be one of {', '.join(k.__name__ for k in SAMPLERS)}, got {type(fix).__name__}")
    if guidance_scale <= 1:
        raise ValueError("regional_generate needs classifier-free guidance (guidance_scale > 1)")
    seeds = [seed] if isinstance(seed, int) else list(seed)
    return SAMPLERS[type(fix)](pipe, prompt, regions, fix=fix, seeds=seeds, steps=steps, guidance_scale=guidance_scale,
                               **kwargs)

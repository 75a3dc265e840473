"""Why two concepts mix: where each concept's identity lives in the prompt, and where it flows in the image
(notebook 06). Each function answers one question with numbers.

- ``identity_share``: the text encoder is causal, so every token after a concept's phrase (the words after it,
  end-of-text and all the padding) is computed *from* it. How much of each later token is concept A, how much
  B? Replace A's identifier by other rare words of the same length and measure how far each token's
  embedding moves (relative to its norm), then the same for B. Masking only a concept's own words leaves
  everything it wrote into the later tokens readable everywhere.
- ``self_attention_leakage``: self-attention lets every pixel read every other. The share of the attention
  that the pixels of A's region pay to the pixels of B's region, per layer and per part of the denoising
  process: where and when the two regions exchange features.
- ``token_shares``: the share of the cross-attention mass each token gets over the image (the sink).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch

from ..methods.engine import IDENTIFIER_LETTERS
from ..methods.hypernetwork import attached
from ..sd.attention import AttentionStore, prompt_tokens, token_indices, with_parts
from ..sd.parts import encode_prompt
from ..sd.pipeline import generate
from ..world.regions import masks_at, region_masks


@torch.no_grad()
def identity_share(pipe, prompt: str, phrases: list[str], *, samples: int = 6, seed: int = 0) -> dict:
    """How much each token of ``prompt`` depends on each concept's identifier (the first word of its phrase).

    For concept k, its identifier is replaced by ``samples`` other rare words of the same token length (seeded);
    ``influence[k, j]`` is the mean relative change ``|c_j - c_j'| / |c_j|`` of token j's text-encoder output.
    Returns {"tokens": readable tokens incl. <end> and "<pad>", "influence": (K, T) array, "share": (K, T) array
    = influence normalised over the concepts (0 where no concept reaches the token)}."""
    import random

    tok = pipe.tokenizer
    expand = lambda p: pipe.maybe_convert_prompt(p, tok)  # noqa: E731
    ids = tok(expand(prompt), padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    base = pipe.text_encoder(ids.to(pipe.device))[0][0].float()
    rng = random.Random(seed)
    influence = []
    for phrase in phrases:
        word = phrase.split()[0]
        if word not in prompt:
            raise ValueError(f"{word!r} (of {phrase!r}) is not in the prompt {prompt!r}")
        n_tokens = len(tok(expand(word), add_special_tokens=False).input_ids)
        changes = []
        while len(changes) < samples:
            other = "".join(rng.choice(IDENTIFIER_LETTERS) for _ in range(len(word)))
            if other == word or len(tok(other, add_special_tokens=False).input_ids) != n_tokens:
                continue
            alt = tok(expand(prompt.replace(word, other)), padding="max_length", max_length=tok.model_max_length,
                      return_tensors="pt").input_ids
            c = pipe.text_encoder(alt.to(pipe.device))[0][0].float()
            changes.append(((c - base).norm(dim=-1) / base.norm(dim=-1)).cpu())
        influence.append(torch.stack(changes).mean(0))
    influence = torch.stack(influence).numpy()
    words = prompt_tokens(tok, expand(prompt))
    tokens = words + ["<pad>"] * (tok.model_max_length - len(words))
    total = influence.sum(0, keepdims=True)
    share = np.where(total > 1e-6, influence / np.maximum(total, 1e-12), 0.0)
    return {"tokens": tokens, "influence": influence, "share": share}


def token_shares(store: AttentionStore) -> np.ndarray:
    """Mean share of cross-attention mass per token (T,), over pixels, layers and steps (conditional half)."""
    maps = store.layer_maps(cross=True)
    return np.mean([m.mean(dim=(0, 1)).numpy() for m in maps.values()], axis=0)


class _RangeStore(AttentionStore):
    """An AttentionStore that files self-attention (or, with ``cross=True``, cross-attention) per part of the
    denoising process (``ranges``)."""

    def __init__(self, ranges, cross: bool = False):
        super().__init__(guidance=True, self_attention=not cross, max_self_pixels=4096)
        self.ranges, self.progress, self.by_range, self.cross_only = ranges, 0.0, {}, cross

    def wants(self, is_cross: bool, pixels: int) -> bool:
        return is_cross if self.cross_only else (not is_cross and pixels <= self.max_self_pixels)

    def add(self, name, probs, is_cross):
        probs = probs.mean(dim=1).float().cpu()
        probs = probs[probs.shape[0] // 2 :]
        for r, (lo, hi) in enumerate(self.ranges):
            if lo <= self.progress < hi or (hi == 1.0 and self.progress == 1.0):
                key = (name, r)
                total, n = self.by_range.get(key, (0, 0))
                self.by_range[key] = (total + probs, n + 1)


@contextmanager
def _progress_hook(pipe, store):
    total = pipe.scheduler.config.num_train_timesteps

    def on_call(module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        store.progress = 1.0 - float(torch.as_tensor(t).flatten()[0]) / total

    handle = pipe.unet.register_forward_pre_hook(on_call, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def self_attention_leakage(pipe, prompt: str, regions=("left", "right"), *, seeds=(0, 1, 2, 3),
                           ranges=((0.0, 0.3), (0.3, 0.7), (0.7, 1.0)), steps: int = 25,
                           guidance_scale: float = 5.0) -> dict:
    """Share of self-attention that region A's pixels pay to region B's pixels (and B's to A's), per
    self-attention layer and per part of the denoising process (0 = pure noise, 1 = the end).
    Returns {"layers": names, "ranges": ranges, "a_to_b": (L, R) array, "b_to_a": (L, R), "uniform": the share
    a pixel would pay B's region if it attended to every pixel alike}."""
    store = _RangeStore(list(ranges))
    previous = with_parts(pipe.unet, store=store)
    try:
        with _progress_hook(pipe, store):
            generate(pipe, [prompt] * len(seeds), seed=list(seeds), steps=steps, guidance_scale=guidance_scale)
    finally:
        pipe.unet.set_attn_processor(previous)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    masks = region_masks(list(regions), size)
    layers = sorted({name for name, _ in store.by_range})
    a_to_b = np.full((len(layers), len(ranges)), np.nan)
    b_to_a = np.full_like(a_to_b, np.nan)
    for (name, r), (total, n) in store.by_range.items():
        m = (total / n).mean(0)  # (N, N)
        side = math.isqrt(m.shape[0])
        a, b = masks_at(masks, side)
        i = layers.index(name)
        a_to_b[i, r] = float(m[a][:, b].sum(-1).mean())
        b_to_a[i, r] = float(m[b][:, a].sum(-1).mean())
    uniform = float(masks_at(masks, 16)[1].float().mean())
    return {"layers": layers, "ranges": list(ranges), "a_to_b": a_to_b, "b_to_a": b_to_a, "uniform": uniform}


def cross_attention_by_time(pipe, prompt: str, *, seed: int = 0,
                            ranges=((0.0, 0.3), (0.3, 0.7), (0.7, 1.0)), steps: int = 25,
                            guidance_scale: float = 5.0) -> dict:
    """Cross-attention maps of one image, kept per layer and per part of the denoising process (0 = pure noise,
    1 = the end), for looking at any token x layer x time. Returns {"image", "tokens" (the prompt's, then
    "<pad>"s), "layers", "ranges", "maps": {(layer, r): (T, side, side) tensor}}."""
    store = _RangeStore(list(ranges), cross=True)
    previous = with_parts(pipe.unet, store=store)
    try:
        with _progress_hook(pipe, store):
            image = generate(pipe, prompt, seed=seed, steps=steps, guidance_scale=guidance_scale)[0]
    finally:
        pipe.unet.set_attn_processor(previous)
    maps = {}
    for (name, r), (total, n) in store.by_range.items():
        m = (total / n)[0]  # (N, T)
        side = math.isqrt(m.shape[0])
        maps[(name, r)] = m.T.reshape(m.shape[1], side, side)
    words = prompt_tokens(pipe.tokenizer, pipe.maybe_convert_prompt(prompt, pipe.tokenizer))
    tokens = words + ["<pad>"] * (pipe.tokenizer.model_max_length - len(words))
    return {"image": image, "tokens": tokens, "layers": sorted({n for n, _ in maps}), "ranges": list(ranges),
            "maps": maps}


def short_layer(name: str) -> str:
    """"down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor" -> "down 1.0"."""
    parts = name.split(".")
    if parts[0] == "mid_block":
        return "mid"
    return f"{parts[0].split('_')[0]} {parts[1]}.{parts[3]}"


@torch.no_grad()
def hypernetwork_reach(pipe, prompt: str, phrases: list[str]) -> dict:
    """How much the attached hypernetworks rewrite each part of the prompt's context: the mean relative change
    ``|HN(c) - c| / |c|`` (keys and values) over each concept's tokens, the other words, and end-of-text +
    padding. A hypernetwork is one MLP applied to every token: it cannot tell "its" concept's tokens from the
    others'. Returns {part: change}."""
    hns = attached(pipe)
    if not hns:
        raise ValueError("no hypernetwork is attached: load one with load_adapters first")
    c = encode_prompt(pipe, [prompt])[0].float()
    ck, cv = c, c
    for hn in hns:
        ck, cv = hn(ck.to(pipe.unet.dtype), cv.to(pipe.unet.dtype))
    change = (((ck.float() - c).norm(dim=-1) + (cv.float() - c).norm(dim=-1)) / (2 * c.norm(dim=-1))).cpu()
    n = len(pipe.tokenizer(prompt).input_ids)
    parts, used = {}, set()
    for phrase in phrases:
        idx = token_indices(pipe.tokenizer, prompt, phrase)
        parts[phrase] = float(change[idx].mean())
        used |= set(idx)
    rest = [i for i in range(1, n - 1) if i not in used]
    parts["other words"] = float(change[rest].mean()) if rest else float("nan")
    parts["<end> + padding"] = float(change[n - 1 :].mean())
    return parts

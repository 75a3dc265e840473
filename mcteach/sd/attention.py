"""Looking inside the UNet's attention: recording cross-attention (and self-attention) maps.

In every transformer block of SD's UNet, ``attn1`` is self-attention (pixels attend to pixels)
and ``attn2`` is cross-attention (pixels attend to the prompt's tokens):

    Q = W_q x            (pixels,  d)      x: image features, N = h*w pixels
    K = W_k c, V = W_v c (tokens,  d)      c: text encoder output, T tokens
    A = softmax(Q K^T / sqrt(d_head))      (heads, N, T): row n says which tokens pixel n reads
    out = W_out (A V)

Column t of A, reshaped to h x w, is token t's *cross-attention map*: where in the image that
word acts. ``record_attention`` swaps in a processor (diffusers' ``set_attn_processor`` API) that
computes exactly what diffusers' default ``AttnProcessor2_0`` computes (the same SDPA call, so
images are bit-identical) and, on the side, adds A averaged over heads to an ``AttentionStore``.

    with record_attention(pipe) as store:
        image = generate(pipe, "a cat on the left and a dog on the right", seed=0)[0]
    maps = store.token_maps()          # (batch, T, 16, 16), averaged over steps and layers
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from ..world.regions import region_mask


class AttentionStore:
    """Sums of head-averaged attention probabilities per layer, over denoising steps.

    guidance: the UNet batch is [unconditional, conditional] (classifier-free guidance, as in
        diffusers' pipelines): keep only the conditional half.
    self_attention: also record self-attention maps (N x N) of layers with at most
        ``max_self_pixels`` pixels (full-resolution SD layers would need gigabytes).
    """

    def __init__(self, guidance: bool = True, self_attention: bool = False, max_self_pixels: int = 1024,
                 keep_grad: bool = False):
        self.guidance, self.keep_grad = guidance, keep_grad
        self.self_attention = self_attention
        self.max_self_pixels = max_self_pixels
        self.cross: dict[str, torch.Tensor] = {}  # layer -> (B, N, T) summed over calls
        self.self: dict[str, torch.Tensor] = {}  # layer -> (B, N, N)
        self.calls: dict[str, int] = {}

    def wants(self, is_cross: bool, pixels: int) -> bool:
        return is_cross or (self.self_attention and pixels <= self.max_self_pixels)

    def add(self, name: str, probs: torch.Tensor, is_cross: bool) -> None:
        """probs: (B, heads, N, T) attention probabilities of one call of layer ``name``."""
        probs = probs.mean(dim=1) if self.keep_grad else probs.mean(dim=1).float().cpu()
        if self.guidance:
            if probs.shape[0] % 2:
                raise ValueError("record_attention(guidance=True) expects an [uncond, cond] batch of even size; "
                                 "use guidance=False when generating with guidance_scale <= 1")
            probs = probs[probs.shape[0] // 2 :]
        maps = self.cross if is_cross else self.self
        maps[name] = maps[name] + probs if name in maps else probs
        key = name + (":cross" if is_cross else ":self")
        self.calls[key] = self.calls.get(key, 0) + 1

    def reset(self) -> None:
        self.cross.clear(), self.self.clear(), self.calls.clear()

    def layer_maps(self, cross: bool = True) -> dict[str, torch.Tensor]:
        """Per-layer maps averaged over recorded steps: name -> (B, N, T) or (B, N, N)."""
        maps = self.cross if cross else self.self
        return {n: m / self.calls[n + (":cross" if cross else ":self")] for n, m in maps.items()}

    def token_maps(self, res: int | None = None, layers: list[str] | None = None) -> torch.Tensor:
        """Cross-attention maps (B, T, res, res): each layer's average, resized to ``res``
        (default: the largest recorded resolution) and averaged over ``layers`` (default: all)."""
        per_layer = self.layer_maps(cross=True)
        if not per_layer:
            raise RuntimeError("nothing recorded: run the pipeline inside `with record_attention(pipe) as store:`")
        names = layers or list(per_layer)
        sides = {n: int(round(per_layer[n].shape[1] ** 0.5)) for n in names}
        res = res or max(sides.values())
        out = 0
        for n in names:
            m = per_layer[n]  # (B, N, T)
            b, _, t = m.shape
            m = m.transpose(1, 2).reshape(b, t, sides[n], sides[n])
            out = out + F.interpolate(m, size=(res, res), mode="bilinear", align_corners=False)
        return out / len(names)


def _sdpa(attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
          *, observe=None, kv_context=None, bias=None):
    """diffusers' AttnProcessor2_0, step by step, with three hooks:
    ``kv_context(c) -> (c_k, c_v)`` rewrites the text context that cross-attention reads K and V from
    (HyperNetworks); ``bias(n_queries, n_keys, batch, is_cross, like) -> (B|1, 1, N, T) | None`` adds to the
    attention logits (masking: -inf where a pixel may not look); ``observe(q, k, mask, is_cross)`` sees the
    attention inputs, bias included (recording). With no hooks the result is AttnProcessor2_0's, bit for bit."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    is_cross = encoder_hidden_states is not None
    batch_size, sequence_length, _ = (encoder_hidden_states if is_cross else hidden_states).shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if not is_cross:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    context_k = context_v = encoder_hidden_states
    if is_cross and kv_context is not None:
        context_k, context_v = kv_context(encoder_hidden_states)
    key, value = attn.to_k(context_k), attn.to_v(context_v)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, N, d)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, T, d)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if bias is not None:
        extra = bias(query.shape[2], key.shape[2], batch_size, is_cross, query)
        if extra is not None:
            attention_mask = extra if attention_mask is None else attention_mask + extra
    if observe is not None:
        observe(query, key, attention_mask, is_cross)
    hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                   dropout_p=0.0, is_causal=False)
    hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.to(query.dtype)))
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def attention_probs(query: torch.Tensor, key: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + mask): (B, heads, N, d) x (B, heads, T, d) -> (B, heads, N, T)."""
    scores = query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5
    if attention_mask is not None:
        scores = scores + attention_mask
    return scores.softmax(dim=-1)


class Processor:
    """diffusers' ``AttnProcessor2_0`` with optional parts, so that they compose on one layer:

    - ``rewrite(c) -> (c_k, c_v)``: cross-attention reads K and V from a rewritten context (the HyperNetwork,
      the free-context ceiling; subclasses may define it as a method);
    - ``masker``: an object with ``bias(layer, n_queries, n_keys, batch, is_cross, like)`` returning an
      additive logit bias or None (``mcteach.mixing.masking``);
    - ``store``: an ``AttentionStore`` that records the probabilities (``record_attention``).

    With no parts it computes exactly what ``AttnProcessor2_0`` computes (the same SDPA call), bit for bit.
    ``name`` is the layer's processor name (``down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor``).
    """
    name, rewrite, masker, store = "", None, None, None  # subclasses need not call __init__

    def __init__(self, name: str = "", *, rewrite=None, masker=None, store=None):
        self.name, self.masker, self.store = name, masker, store
        if rewrite is not None:
            self.rewrite = rewrite

    def with_parts(self, name: str, **parts) -> "Processor":
        """A copy for layer ``name`` with ``parts`` (``masker=``, ``store=``, ``rewrite=``) set."""
        other = copy.copy(self)
        other.name = name
        for key, value in parts.items():
            if key not in ("masker", "store", "rewrite"):
                raise TypeError(f"unknown processor part {key!r}")
            setattr(other, key, value)
        return other

    def _observe(self, query, key, attention_mask, is_cross):
        if self.store.wants(is_cross, query.shape[2]):
            if self.store.keep_grad:
                self.store.add(self.name, attention_probs(query, key, attention_mask), is_cross)
            else:
                with torch.no_grad():
                    self.store.add(self.name, attention_probs(query, key, attention_mask), is_cross)

    def _bias(self, n_queries, n_keys, batch, is_cross, like):
        return self.masker.bias(self.name, n_queries, n_keys, batch, is_cross, like)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        return _sdpa(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                     observe=self._observe if self.store is not None else None,
                     kv_context=self.rewrite if encoder_hidden_states is not None else None,
                     bias=self._bias if self.masker is not None else None)


class ContextProcessor(Processor):
    """A ``Processor`` for a cross-attention layer whose K and V are read from a rewritten text context:
    subclasses define ``rewrite(c) -> (c_k, c_v)`` (the HyperNetwork, the free-context ceiling)."""

    def rewrite(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        if encoder_hidden_states is None:
            raise ValueError(f"{type(self).__name__} is for the UNet's cross-attention layers (attn2) only")
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def with_parts(unet, **parts) -> dict:
    """Every layer's processor with ``parts`` added (``masker=``, ``store=``): default processors become a
    ``Processor``, ours keep what they have (a HyperNetwork keeps rewriting). Returns the previous processors,
    to restore with ``unet.set_attn_processor(previous)``. Foreign processors (xformers, IP-Adapter, ...) are
    refused: replacing them would silently change the model."""
    previous = unet.attn_processors
    foreign = {type(p).__name__ for p in previous.values()
               if not isinstance(p, Processor) and type(p) not in (AttnProcessor2_0, AttnProcessor)}
    if foreign:
        raise ValueError(f"mcteach's attention tools replace the default attention processors, but this UNet uses "
                         f"{sorted(foreign)}; record or mask before installing them (or remove them first)")
    unet.set_attn_processor({name: p.with_parts(name, **parts) if isinstance(p, Processor)
                             else Processor(name, **parts) for name, p in previous.items()})
    return previous


def cross_attention_layers(unet) -> list[str]:
    """The processor names of the UNet's cross-attention layers (7 in the tiny UNet, 16 in SD 1.5)."""
    return [n for n in unet.attn_processors if n.endswith("attn2.processor")]


def set_cross_attention_processors(unet, processor_for) -> None:
    """``processor_for(name)`` on every cross-attention layer; the other layers keep theirs."""
    layers = set(cross_attention_layers(unet))
    unet.set_attn_processor({n: processor_for(n) if n in layers else p for n, p in unet.attn_processors.items()})


@contextmanager
def record_attention(pipe_or_unet, *, guidance: bool = True, self_attention: bool = False,
                     max_self_pixels: int = 1024, keep_grad: bool = False):
    """Record attention maps of every attention layer while the block runs; restores the
    previous processors afterwards. Yields the ``AttentionStore``. Composes with masking, LoRA and the
    HyperNetwork (their processors keep their parts and gain a store). ``keep_grad=True`` keeps the maps on
    the device with their gradients (the attention loss of training, ``mcteach.methods.engine``)."""
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    store = AttentionStore(guidance, self_attention, max_self_pixels, keep_grad=keep_grad)
    previous = with_parts(unet, store=store)
    try:
        yield store
    finally:
        unet.set_attn_processor(previous)


def region_share(attn_map: torch.Tensor, position: str) -> float:
    """Share of a map's mass (h x w, non-negative) inside a named region of the image."""
    m = torch.as_tensor(attn_map, dtype=torch.float32)
    inside = torch.from_numpy(region_mask(position, m.shape[-1]) > 0.5)
    return float(m[inside].sum() / m.sum().clamp_min(1e-12))


def token_indices(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions of ``word``'s tokens in the tokenized ``prompt`` (start-of-text is position 0).

    >>> token_indices(tok, "a cat on the left", "cat")   # doctest: +SKIP
    [2]
    """
    ids = tokenizer(prompt).input_ids
    target = tokenizer(word, add_special_tokens=False).input_ids
    if not target:
        raise ValueError(f"{word!r} has no tokens")
    hits = [i for i in range(len(ids) - len(target) + 1) if ids[i : i + len(target)] == target]
    if not hits:
        words = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"{word!r} is not in the prompt {prompt!r} (tokens: {words})")
    return [i + j for i in hits for j in range(len(target))]


def prompt_tokens(tokenizer, prompt: str) -> list[str]:
    """Readable tokens of ``prompt`` including <start> and <end> (no padding)."""
    ids = tokenizer(prompt).input_ids
    names = {tokenizer.bos_token_id: "<start>", tokenizer.eos_token_id: "<end>"}
    return [names.get(i) or tokenizer.decode([i]).strip() for i in ids]

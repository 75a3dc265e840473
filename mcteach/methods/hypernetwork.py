"""HyperNetwork (the AUTOMATIC1111 / NovelAI design): small MLPs that rewrite the text context
every cross-attention layer reads its keys and values from.

For each context width d of the UNet's cross-attention layers (one, 128, for the tiny model; 768 for
SD 1.5) there is a pair of residual MLPs, one for K and one for V. With layer structure [1, 2, 1]:

    mlp(c) = W_2 act(W_1 c + b_1) + b_2       W_1 (2d, d), W_2 (d, 2d)
    c_k = c + s mlp_k(c),  c_v = c + s mlp_v(c)          c: (B, T, d) text encoder output, s: strength
    K = W_k c_k,  V = W_v c_v                            Q = W_q x unchanged; self-attention untouched

Only the MLPs train (W_1 ~ N(0, 0.01), W_2 = 0, biases 0: at initialisation the model is exactly the base
model); the strength s is 1 while training and adjustable afterwards (``hn.strength = 0.5``; 0 gives the
base model back exactly). The MLPs see every prompt token of every cross-attention layer, so the change
is global: it is not tied to a word, which is why two hypernetworks fight over the whole image.

It plugs in through diffusers' attention-processor API: ``attach`` sets ``HypernetworkProcessor`` on the
``...attn2`` layers (cross-attention) only; attaching a second hypernetwork chains it (c -> h1 -> h2, as
the webui does). The prompt keeps the class word ("a bear on the left"); there is no trigger word.

Saved file (``out/<slug>.pt``): the webui's layout, plain tensors, ints and strings only, so it loads with
``torch.load(path, weights_only=True)``::

    {128: [state_dict_k, state_dict_v],         # keys "linear.0.weight", "linear.0.bias", "linear.2.weight", ...
     "layer_structure": [1, 2, 1], "activation_func": "relu", "name": "koala", "step": 500, ...}

Defaults: 500 steps of 2 images, lr 1e-3, relu (about 70 s on 2 CPU cores). How they were chosen (the shipped model,
the 11 held-out concepts, fidelity over seeds 0-7; ``mcteach bench methods --methods hypernetwork --set lr=5e-3``):
at lr 5e-3 the mean fidelity is 0.42 against 0.49 at 1e-3 (the couple's woman falls from 1.00 to 0.25), three
concepts reach >= 0.8 at either rate. Three times the steps (1500) give the bearded person 0.62 against 0.25, the
hamster 0.38 against 0.25, the koala 0.00 against 0.12 and the croissant 0.12 at both: no gain on the new kinds for
three times the time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from ..sd.attention import ContextProcessor, cross_attention_layers, set_cross_attention_processors
from .engine import Method, Run

#: the webui's names (its "swish" is Hardswish)
ACTIVATIONS = {"linear": None, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.Hardswish,
               "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


class HypernetworkModule(nn.Module):
    """One residual MLP: c -> c + strength * mlp(c). Widths d * layer_structure[i]; the activation
    between linear layers, none after the last (the webui's ``linear`` Sequential, same keys)."""

    def __init__(self, dim: int, layer_structure=(1, 2, 1), activation: str = "relu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)}")
        if len(layer_structure) < 2 or layer_structure[0] != 1 or layer_structure[-1] != 1:
            raise ValueError(f"layer_structure must start and end with 1, e.g. [1, 2, 1]; got {list(layer_structure)}")
        layers = []
        for i, (a, b) in enumerate(zip(layer_structure, layer_structure[1:])):
            layers.append(nn.Linear(int(dim * a), int(dim * b)))
            if ACTIVATIONS[activation] and i < len(layer_structure) - 2:
                layers.append(ACTIVATIONS[activation]())
        self.linear = nn.Sequential(*layers)
        linears = [m for m in layers if isinstance(m, nn.Linear)]
        for m in linears:
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
        nn.init.zeros_(linears[-1].weight)  # near-identity: exactly the identity at initialisation

    def forward(self, context: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        return context + strength * self.linear(context)


class HypernetworkLayers(nn.Module):
    """One (K, V) pair of ``HypernetworkModule`` per context width; ``strength`` scales both."""

    def __init__(self, dims, layer_structure=(1, 2, 1), activation: str = "relu", strength: float = 1.0):
        super().__init__()
        self.layer_structure, self.activation, self.strength = list(layer_structure), activation, strength
        pair = lambda d: [HypernetworkModule(d, layer_structure, activation) for _ in ("k", "v")]  # noqa: E731
        self.layers = nn.ModuleDict({str(d): nn.ModuleList(pair(d)) for d in dims})

    def forward(self, context_k: torch.Tensor, context_v: torch.Tensor):
        """(c_k, c_v) -> (c_k + s mlp_k(c_k), c_v + s mlp_v(c_v)); contexts of another width pass unchanged."""
        width = str(context_k.shape[-1])
        if width not in self.layers:
            return context_k, context_v
        mlp_k, mlp_v = self.layers[width]
        return mlp_k(context_k, self.strength), mlp_v(context_v, self.strength)


class HypernetworkProcessor(ContextProcessor):
    """diffusers' ``AttnProcessor2_0`` for a cross-attention layer, with K and V read from the contexts
    the hypernetworks rewrote (in turn). With no hypernetwork, or strength 0, it computes exactly what
    ``AttnProcessor2_0`` computes. The weights live in the hypernetworks, not here."""

    def __init__(self, hypernetworks: list[HypernetworkLayers]):
        self.hypernetworks = list(hypernetworks)

    def rewrite(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_k, c_v) after every attached hypernetwork, in turn."""
        context_k = context_v = context
        for hn in self.hypernetworks:
            context_k, context_v = hn(context_k, context_v)
        return context_k, context_v


def _unet(pipe_or_unet):
    return getattr(pipe_or_unet, "unet", pipe_or_unet)


def context_dims(pipe_or_unet) -> list[int]:
    """The distinct context widths of the UNet's cross-attention layers ([128] tiny, [768] SD 1.5)."""
    unet = _unet(pipe_or_unet)
    return sorted({unet.get_submodule(n.removesuffix(".processor")).cross_attention_dim
                   for n in cross_attention_layers(unet)})


def attached(pipe_or_unet) -> list[HypernetworkLayers]:
    """The hypernetworks attached to the UNet, in the order they apply."""
    procs = [p for p in _unet(pipe_or_unet).attn_processors.values() if isinstance(p, HypernetworkProcessor)]
    return procs[0].hypernetworks if procs else []


def attach(pipe_or_unet, hypernetwork: HypernetworkLayers) -> None:
    """Apply ``hypernetwork`` to every cross-attention layer (after those already attached)."""
    unet = _unet(pipe_or_unet)
    processor = HypernetworkProcessor(attached(unet) + [hypernetwork])
    set_cross_attention_processors(unet, lambda name: processor)


def detach(pipe_or_unet) -> None:
    """Remove every hypernetwork: diffusers' default processor on the cross-attention layers again."""
    unet = _unet(pipe_or_unet)
    unet.set_attn_processor({n: AttnProcessor2_0() if isinstance(p, HypernetworkProcessor) else p
                             for n, p in unet.attn_processors.items()})


def save_a1111(hn: HypernetworkLayers, path: Path, name: str, step: int) -> None:
    """The webui's ``.pt`` layout (see the module docstring)."""
    state = {int(d): [{k: v.detach().float().cpu() for k, v in m.state_dict().items()} for m in pair]
             for d, pair in hn.layers.items()}
    state |= {"layer_structure": hn.layer_structure, "activation_func": hn.activation, "is_layer_norm": False,
              "use_dropout": False, "activate_output": False, "last_layer_dropout": False,
              "weight_initialization": "Normal", "name": name, "step": step}
    torch.save(state, path)


def load_a1111(path: Path, strength: float = 1.0) -> HypernetworkLayers:
    """A ``HypernetworkLayers`` from a webui ``.pt`` file (``torch.load(weights_only=True)``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    dims = [k for k in state if isinstance(k, int)]
    if state.get("is_layer_norm") or state.get("use_dropout") or state.get("activate_output"):
        raise ValueError(f"{path}: layer norm, dropout and an activated output are not supported here")
    hn = HypernetworkLayers(dims, state.get("layer_structure", [1, 2, 1]), state.get("activation_func") or "linear",
                      strength)
    for d in dims:
        for module, sd in zip(hn.layers[str(d)], state[d]):
            module.load_state_dict(sd)
    return hn


@dataclass
class HyperNetwork(Method):
    name: ClassVar[str] = "hypernetwork"
    steps: int = 500
    lr: float = 1e-3
    batch_size: int = 2
    layer_structure: list[int] = field(default_factory=lambda: [1, 2, 1])
    activation: str = "relu"
    prompt_phrase: str | None = None  # what replaces the concept's name in captions; default the class word

    def phrase(self, concept) -> str:
        return self.prompt_phrase or self.class_word_for(concept)

    def setup(self, pipe, concept):
        hn = HypernetworkLayers(context_dims(pipe), self.layer_structure, self.activation).to(pipe.device)
        attach(pipe, hn)
        return Run(module=hn)

    def save(self, pipe, folder, concept, step, run: Run):
        save_a1111(run.module, folder / f"{concept.slug}.pt", concept.slug, step)
        return {"files": {"a1111": f"{concept.slug}.pt"}}

    @staticmethod
    def load(pipe, folder, meta):
        attach(pipe, load_a1111(Path(folder) / meta["files"]["a1111"]).to(pipe.device, pipe.unet.dtype))

"""How far can a method that leaves the UNet frozen go? Free context offsets, a measuring stick.

Textual Inversion and the HyperNetwork change only what the UNet's cross-attention layers read their keys and
values from: TI through one new word fed through the text encoder, the HyperNetwork through one MLP shared by
every layer. ``FreeContext`` drops those constraints: each cross-attention layer l gets its own free offsets,
one per token position, for the key and the value context:

    c_k = c + D_k[l],  c_v = c + D_v[l]        c: (B, T, d) text encoder output;  D_k[l], D_v[l]: (T, d), zero at the start
    K = W_k c_k,  V = W_v c_v                  Q, self-attention and every UNet weight unchanged

That is 2 x 7 x 32 x 128 = 57,344 free numbers for the tiny model, trained by the same engine and loss. Like the
HyperNetwork, the offsets also apply to the unconditional branch of classifier-free guidance. It is not a method
for users (it has no prompt word and ignores position words), so it is not in ``METHODS``: the benchmark uses it
to tell "TI and HN cannot express it" from "the frozen UNet cannot draw it" (``--ceiling``; data/bench_methods.md's table).

Defaults: 1500 steps of 2 images at lr 1e-2 (seeds 0-7, 4900-step base model: croissant 0.88, koala 0.50; after
500 steps 0.62 and 0.12).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..sd.attention import ContextProcessor, cross_attention_layers, set_cross_attention_processors
from .engine import Method, Run

FILE = "free_context.safetensors"


def _key(processor_name: str) -> str:
    """'down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor' -> 'down_blocks_0_..._attn2'."""
    return processor_name.removesuffix(".processor").replace(".", "_")


class ContextOffsets(nn.Module):
    """Zero-initialised (T, d) offsets for K and for V, one pair per cross-attention layer."""

    def __init__(self, layers: list[str], length: int, dim: int):
        super().__init__()
        self.k = nn.ParameterDict({_key(n): nn.Parameter(torch.zeros(length, dim)) for n in layers})
        self.v = nn.ParameterDict({_key(n): nn.Parameter(torch.zeros(length, dim)) for n in layers})


class OffsetProcessor(ContextProcessor):
    """``AttnProcessor2_0`` for one cross-attention layer, with K and V read from the offset contexts."""

    def __init__(self, offsets: ContextOffsets, layer: str):
        self.offsets, self.key = offsets, _key(layer)

    def rewrite(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = context.shape[1]
        return context + self.offsets.k[self.key][:n], context + self.offsets.v[self.key][:n]


def new_offsets(pipe) -> ContextOffsets:
    """Zero offsets for every cross-attention layer of ``pipe``, at its prompt length and context width."""
    return ContextOffsets(cross_attention_layers(pipe.unet), pipe.tokenizer.model_max_length,
                          pipe.unet.config.cross_attention_dim)


def attach(pipe, offsets: ContextOffsets) -> None:
    """Put ``offsets`` on every cross-attention layer of ``pipe.unet``."""
    set_cross_attention_processors(pipe.unet, lambda name: OffsetProcessor(offsets, name))


@dataclass
class FreeContext(Method):
    name: ClassVar[str] = "free_context"
    steps: int = 1500
    lr: float = 1e-2
    batch_size: int = 2

    def phrase(self, concept) -> str:
        return self.class_word_for(concept)

    def setup(self, pipe, concept):
        offsets = new_offsets(pipe).to(pipe.device)
        attach(pipe, offsets)
        return Run(module=offsets)

    def save(self, pipe, folder, concept, step, run: Run):
        save_file({k: v.detach().cpu().contiguous() for k, v in run.module.state_dict().items()}, Path(folder) / FILE)
        return {"files": {"offsets": FILE}}

    @staticmethod
    def load(pipe, folder, meta):
        state = load_file(Path(folder) / meta["files"]["offsets"])
        offsets = new_offsets(pipe)
        offsets.load_state_dict(state)
        attach(pipe, offsets.to(pipe.device, pipe.unet.dtype))

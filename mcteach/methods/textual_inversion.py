"""Textual Inversion (Gal et al. 2022): a new word for the concept; only its embedding trains.

The tokenizer gets a placeholder token ``<koala>`` (``num_vectors`` > 1: ``<koala> <koala>_1 ...``,
which the pipeline expands from ``<koala>`` alone) and the text encoder's token-embedding matrix
E (vocab, d) grows by that many rows, initialised from the class word's embedding(s):

    E[<koala>] = E["bear"]          (d,)     d = 128 tiny, 768 SD 1.5

Training minimises the engine's loss over those rows v only; the UNet, the VAE, the text encoder's
layers and every other row of E are frozen (the other rows are put back after each optimizer step,
so they stay bit-identical):

    v* = argmin_v  E_{z, t, eps} || eps - eps_theta(z_t, t, TextEncoder("a <koala> on the left"; E[<koala>] = v)) ||^2

Saved files (``out/``):
- ``learned_embeds.safetensors``: ``{"<koala>": (num_vectors, d)}``, diffusers' format:
  ``pipe.load_textual_inversion("out/learned_embeds.safetensors")``;
- ``<slug>.pt``: AUTOMATIC1111's layout ``{"string_to_param": {"*": (num_vectors, d)}, "name", "step"}``
  (``pipe.load_textual_inversion("out/koala.pt")`` reads it too; in the webui the file name is the word).

Defaults: 500 steps of 2 images at lr 5e-3, one vector. How the rate was chosen (the shipped model, fidelity over
seeds 0-7; ``mcteach bench methods --methods textual_inversion --set lr=1e-3`` measures it again):

| concepts | lr 1e-3 | lr 5e-3 | lr 1e-3, 4 vectors | lr 5e-3, 4 vectors |
|---|---|---|---|---|
| held-out (11): fidelity >= 0.8 | 2 | 3 | 2 | 2 |
| held-out: mean fidelity | 0.22 | 0.28 | 0.30 | 0.27 |
| five base-class people from "woman"/"man" | 0.00 0.00 0.00 1.00 0.12 | 1.00 0.88 1.00 1.00 0.62 | | |

At 1e-3 the vector stops at a poor optimum: the woman with curly hair and dark skin keeps a denoising loss of 0.027
on her six images (her full caption gives 0.016) and her samples are random people; at 5e-3 it reaches 0.0164 and
the eight samples are her. The price is length: the vector ends 5x longer than the median word embedding (1.15
against 0.22), yet the asked half is kept (position 1.00). New kinds stay blobs at every rate and vector count above:
one vector through the frozen text encoder asks the UNet only for what it can already draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import save_file

from ..sd.pipeline import quiet_loading
from .engine import Method, Run

EMBEDS_FILE = "learned_embeds.safetensors"


@torch.no_grad()
def restore_rows(weight: torch.Tensor, frozen: torch.Tensor, keep: torch.Tensor) -> None:
    """Put the rows ``keep`` (a (vocab,) bool mask: every row but the new tokens') of the embedding matrix
    ``weight`` (vocab, d) back to ``frozen``, in place, after each optimizer step: Adam's moments and weight decay
    would move them even with zero gradients, and only the new rows may learn."""
    weight[keep] = frozen[keep]


def placeholder_tokens(token: str, num_vectors: int = 1) -> list[str]:
    """``<koala>``, ``<koala>_1``, ...: the names diffusers gives a multi-vector embedding's tokens."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def add_placeholder(tokenizer, text_encoder, tokens: list[str], init_word: str) -> list[int]:
    """Add ``tokens`` to the tokenizer, grow the embedding matrix, initialise the new rows from
    ``init_word`` (its token embeddings one per vector if the counts match, else their mean).
    Returns the new rows' ids. Raises ValueError for a token already in the vocabulary or an
    ``init_word`` that does not tokenize to known tokens."""
    # taken: a token added before, or a word the tokenizer already has as one token ("bear" is "bear</w>")
    vocab = tokenizer.get_vocab()
    taken = [t for t in tokens if t in vocab or len(tokenizer(t, add_special_tokens=False).input_ids) == 1]
    if taken:
        raise ValueError(f"token {taken[0]!r} is already in the tokenizer's vocabulary: choose another "
                         "(token=...) or start from a fresh pipeline")
    init_ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if not init_ids or tokenizer.unk_token_id in init_ids:
        raise ValueError(f"class word {init_word!r} does not tokenize to known tokens "
                         f"({tokenizer.convert_ids_to_tokens(init_ids)}); pass another class_word=...")
    tokenizer.add_tokens(tokens)
    if len(tokenizer) > text_encoder.get_input_embeddings().num_embeddings:  # the new rows are set just below
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        init = weight[init_ids]  # (m, d)
        weight[ids] = init if len(init_ids) == len(ids) else init.mean(dim=0).expand(len(ids), -1)
    return ids


def save_a1111(embeds: torch.Tensor, path: Path, name: str, step: int) -> None:
    """AUTOMATIC1111's embedding file: plain tensors, strings and ints (``torch.load(weights_only=True)``)."""
    torch.save({"string_to_param": {"*": embeds}, "name": name, "step": step}, path)


@dataclass(kw_only=True)
class EmbeddingRun(Run):
    """Textual Inversion's run: the new tokens' ids, the embedding matrix E (vocab, d) that trains, and the rows
    that stay frozen (``keep``, (vocab,)) with their values (``frozen``, (vocab, d)), put back after each step."""

    ids: list[int]
    weight: torch.nn.Parameter
    keep: torch.Tensor
    frozen: torch.Tensor


@dataclass
class TextualInversion(Method):
    name: ClassVar[str] = "textual_inversion"
    steps: int = 500
    lr: float = 5e-3
    batch_size: int = 2
    token: str | None = None  # default "<slug>"
    num_vectors: int = 1

    def tokens(self, concept) -> list[str]:
        return placeholder_tokens(self.token or f"<{concept.slug}>", self.num_vectors)

    def phrase(self, concept) -> str:
        return self.tokens(concept)[0]

    def setup(self, pipe, concept):
        if self.num_vectors < 1:
            raise ValueError(f"num_vectors must be >= 1, got {self.num_vectors}")
        ids = add_placeholder(pipe.tokenizer, pipe.text_encoder, self.tokens(concept), self.class_word_for(concept))
        weight = pipe.text_encoder.get_input_embeddings().weight
        keep = torch.ones(len(weight), dtype=torch.bool, device=weight.device)
        keep[ids] = False
        weight.requires_grad_(True)
        return EmbeddingRun(ids=ids, weight=weight, keep=keep, frozen=weight.detach().clone())

    def after_step(self, run: EmbeddingRun) -> None:
        restore_rows(run.weight, run.frozen, run.keep)

    def save(self, pipe, folder, concept, step, run: EmbeddingRun):
        embeds = run.weight[run.ids].detach().float().cpu()  # (n, d)
        token = self.phrase(concept)
        save_file({token: embeds.contiguous()}, folder / EMBEDS_FILE)
        save_a1111(embeds, folder / f"{concept.slug}.pt", token, step)
        return {"token": token, "tokens": self.tokens(concept),
                "files": {"diffusers": EMBEDS_FILE, "a1111": f"{concept.slug}.pt"}}

    @staticmethod
    def load(pipe, folder, meta):
        with quiet_loading():
            pipe.load_textual_inversion(str(Path(folder) / EMBEDS_FILE))


def _word_ids(tokenizer, n: int) -> torch.Tensor:
    """(n,) bool: True for the original vocabulary's rows (not special, not added tokens)."""
    keep = torch.ones(n, dtype=torch.bool)
    keep[list(set(tokenizer.get_added_vocab().values()) | set(tokenizer.all_special_ids))] = False
    return keep


def nearest_tokens(pipe, token: str, k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` vocabulary words whose embeddings are closest (cosine) to ``token``'s: what the learned
    vector "means" to the text encoder's input layer. Special and added tokens are left out."""
    tokenizer = pipe.tokenizer
    weight = pipe.text_encoder.get_input_embeddings().weight.detach().float()
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"{token!r} is not in the tokenizer's vocabulary")
    words = _word_ids(tokenizer, len(weight))
    sims = torch.nn.functional.cosine_similarity(weight, weight[token_id][None], dim=-1)
    order = [i for i in sims.argsort(descending=True).tolist() if words[i]][:k]
    return [(tokenizer.convert_ids_to_tokens(i).removesuffix("</w>"), float(sims[i])) for i in order]


def embedding_norms(pipe, tokens: list[str]) -> tuple[list[float], float, float]:
    """L2 norms of ``tokens``' embeddings, and the vocabulary's median and 99th-percentile norm: a learned
    vector many times longer than any word's is a sign of a too-high learning rate (it dominates attention)."""
    weight = pipe.text_encoder.get_input_embeddings().weight.detach().float()
    norms = weight[_word_ids(pipe.tokenizer, len(weight))].norm(dim=-1)
    ids = pipe.tokenizer.convert_tokens_to_ids(tokens)
    return [float(weight[i].norm()) for i in ids], float(norms.median()), float(norms.quantile(0.99))

"""The four methods by name (notebooks 02-05): ``METHODS``, ``make_method`` and ``train_concept``, the one call
that trains any of them, and ``trainable_groups``, what each would train."""

from __future__ import annotations

import copy

import torch

from ..world.concepts import Concept, load_concept
from .dreambooth import DreamBooth
from .engine import Denoiser, Method, TrainResult, train
from .hypernetwork import HyperNetwork
from .lora import LoRA
from .textual_inversion import TextualInversion

METHODS: dict[str, type[Method]] = {
    "textual_inversion": TextualInversion,
    "hypernetwork": HyperNetwork,
    "dreambooth": DreamBooth,
    "lora": LoRA,
}


def make_method(method: str, **settings) -> Method:
    """``METHODS[method](**settings)``, with a clear error for an unknown name or setting."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    try:
        return METHODS[method](**settings)
    except TypeError as err:  # an unexpected keyword
        raise ValueError(f"{method}: {err}") from None


def train_concept(pipe, concept, method: str, *, out, steps=None, lr=None, batch_size=None, seed: int = 0,
                  checkpoint_every: int = 50, resume: bool = False, progress: bool = True, mask_weight: float = 0.0,
                  accelerator=None, regularizers=None, gradient_checkpointing: bool | None = None,
                  use_8bit_adam: bool | None = None, **settings) -> TrainResult:
    """Train ``method`` (a key of ``METHODS``) on ``concept`` (or a list of concepts: joint DreamBooth / LoRA);
    other keywords are the method's settings (``rank=8``, ``num_vectors=2``, ``prior_weight=0``...).
    ``regularizers``: the training fix (``engine.Regularizers``; ``TRAINING_FIX`` is the course's).
    ``gradient_checkpointing``, ``use_8bit_adam``: less GPU memory (SD 1.5 on a 15 GB T4); None picks them for a
    small GPU (``engine.small_gpu_defaults``), off on a CPU.
    See ``engine.train`` for the rest."""
    return train(pipe, concept, make_method(method, **settings), out=out, steps=steps, lr=lr,
                 batch_size=batch_size, seed=seed, checkpoint_every=checkpoint_every, resume=resume,
                 progress=progress, mask_weight=mask_weight, accelerator=accelerator, regularizers=regularizers,
                 gradient_checkpointing=gradient_checkpointing, use_8bit_adam=use_8bit_adam)


def trainable_groups(pipe, method: str, concept, **settings) -> list[dict]:
    """What ``method`` would train on ``pipe``, group by group, without training: the method's ``setup`` runs on a
    deep copy of the pipeline with everything frozen first, exactly as ``train`` does. One row per part
    (text_encoder, unet, extra = the hypernetwork) and kind of parameter, wherever in the network it sits
    (``attn2.to_k.lora_A``: every cross-attention key's LoRA A, in every block): ``{"part", "pattern",
    "tensors", "values"}``. Textual Inversion trains the whole embedding matrix's
    gradient but puts every old row back after each step: only one row's values really move."""
    p = copy.deepcopy(pipe)
    for part in (p.vae, p.text_encoder, p.unet):
        part.requires_grad_(False)
    m = make_method(method, **settings)
    size = p.unet.config.sample_size * p.vae_scale_factor
    concept = concept if isinstance(concept, Concept) else load_concept(concept, size)
    with torch.random.fork_rng(devices=[]):
        run = m.setup(p, concept)
    rows: dict[tuple[str, str], dict] = {}
    adapter_names = {n for n in getattr(p.unet, "peft_config", {})} | {"default"}
    for name, prm in Denoiser(p.unet, p.text_encoder, run.module).named_parameters():
        if prm.requires_grad:
            part, rest = name.split(".", 1)
            words = [w for w in rest.split(".") if not w.isdigit() and w not in adapter_names]
            words = [w for w in words if w not in ("weight", "bias", "text_model", "encoder", "layers")] or words
            for where in ("transformer_blocks", "resnets", "attentions", "down_blocks", "up_blocks", "mid_block"):
                if where in words:  # keep what the parameter is, not where it sits
                    words = words[len(words) - words[::-1].index(where):] or words
            pattern = ".".join(words)
            row = rows.setdefault((part, pattern), {"part": part, "pattern": pattern, "tensors": 0, "values": 0})
            row["tensors"] += 1
            row["values"] += prm.numel()
    return sorted(rows.values(), key=lambda r: (r["part"], -r["values"], r["pattern"]))

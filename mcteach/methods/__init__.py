"""Teaching a pipeline a new concept: Textual Inversion, HyperNetwork, DreamBooth, LoRA (notebooks 02-05).

One training loop (``engine.train``) serves all four; each method's module says what trains and how it
is saved. Every run writes ``adapter.json`` (method, phrase, class word, settings) beside its files, so
``load_adapter`` can put any of them on a fresh pipeline:

    pipe = load_pipeline(dtype=torch.float32)                                 # train in float32, also on a GPU
    result = train_concept(pipe, "koala", "lora", out="runs/koala-lora")      # trains pipe in place
    images = generate(pipe, f"a {result.phrase} on the left", seed=0)         # "a sks bear on the left"

    base = load_pipeline()
    meta = load_adapter(base, "runs/koala-lora")                              # same images as above

| method | what trains | prompt phrase | files |
|---|---|---|---|
| ``textual_inversion`` | new token embedding(s) | ``<koala>`` | learned_embeds.safetensors, koala.pt (webui) |
| ``hypernetwork`` | K/V context MLPs | the class word | koala.pt (webui) |
| ``dreambooth`` | the UNet (± text encoder) | ``sks bear`` | unet/ (± text_encoder/), fp16 |
| ``lora`` | low-rank A, B in attention | ``sks bear`` | pytorch_lora_weights.safetensors, koala_kohya.safetensors |

Command line: ``python -m mcteach train --method lora --concept data/concepts/koala --out runs/koala-lora``
and ``python -m mcteach generate --adapter runs/koala-lora --prompt "a sks bear on the left" --out k.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .changes import changes, format_changes, snapshot
from .dreambooth import DreamBooth
from .engine import Method, TrainResult, train
from .hypernetwork import HypernetworkMethod
from .lora import LoRA
from .textual_inversion import TextualInversion

METHODS: dict[str, type[Method]] = {
    "textual_inversion": TextualInversion,
    "hypernetwork": HypernetworkMethod,
    "dreambooth": DreamBooth,
    "lora": LoRA,
}
ADAPTER_FILE = "adapter.json"


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
                  accelerator=None, **settings) -> TrainResult:
    """Train ``method`` (a key of ``METHODS``) on ``concept``; other keywords are the method's settings
    (``rank=8``, ``num_vectors=2``, ``prior_weight=0``...). See ``engine.train`` for the rest."""
    return train(pipe, concept, make_method(method, **settings), out=out, steps=steps, lr=lr,
                 batch_size=batch_size, seed=seed, checkpoint_every=checkpoint_every, resume=resume,
                 progress=progress, mask_weight=mask_weight, accelerator=accelerator)


def read_adapter(path: str | Path) -> dict:
    """The ``adapter.json`` of a folder written by ``train``; ValueError if there is none."""
    file = Path(path) / ADAPTER_FILE
    if not file.is_file():
        raise ValueError(f"no {ADAPTER_FILE} in {path}: pass a folder written by "
                         "`python -m mcteach train` (or train_concept)")
    meta = json.loads(file.read_text(encoding="utf-8"))
    if meta.get("method") not in METHODS:
        raise ValueError(f"{file}: unknown method {meta.get('method')!r}; choose one of {', '.join(METHODS)}")
    return meta


def load_adapter(pipe, path: str | Path) -> dict:
    """Apply the concept saved in folder ``path`` to ``pipe`` (in place); return its adapter.json
    (``meta["phrase"]`` is what to write in prompts)."""
    meta = read_adapter(path)
    METHODS[meta["method"]].load(pipe, Path(path), meta)
    return meta


__all__ = ["METHODS", "Method", "TrainResult", "train", "train_concept", "make_method", "load_adapter",
           "read_adapter", "TextualInversion", "HypernetworkMethod", "DreamBooth", "LoRA", "snapshot", "changes",
           "format_changes"]

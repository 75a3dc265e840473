"""Teaching a pipeline a new concept: Textual Inversion, HyperNetwork, DreamBooth, LoRA (notebooks 02-05).

One training loop (``engine.train``) serves all four; each method's module says what trains and how it
is saved. Every run writes ``adapter.json`` (method, phrase, class word, settings) beside its files, so
``load_adapter`` can put any of them on a fresh pipeline:

    pipe = load_pipeline(dtype=torch.float32)                                 # train in float32, also on a GPU
    result = train_concept(pipe, "koala", "lora", out="runs/koala-lora")      # trains pipe in place
    images = generate(pipe, f"a {result.phrase} on the left", seed=0)         # "a bbm bear on the left"

    base = load_pipeline()
    meta = load_adapter(base, "runs/koala-lora")                              # same images as above

| method | what trains | prompt phrase | files |
|---|---|---|---|
| ``textual_inversion`` | new token embedding(s) | ``<koala>`` | learned_embeds.safetensors, koala.pt (webui) |
| ``hypernetwork`` | K/V context MLPs | the class word | koala.pt (webui) |
| ``dreambooth`` | the UNet (± text encoder) | ``bbm bear`` | unet/ (± text_encoder/), fp16 |
| ``lora`` | low-rank A, B in attention | ``bbm bear`` | pytorch_lora_weights.safetensors, koala_kohya.safetensors |

Command line: ``python -m mcteach train --method lora --concept data/concepts/koala --out runs/koala-lora``
and ``python -m mcteach generate --adapter runs/koala-lora --prompt "a bbm bear on the left" --out k.png``
(each concept gets its own identifier, "bbm" for the koala: ``engine.default_identifier``).
"""

from __future__ import annotations

import json
from pathlib import Path

from .changes import changes, format_changes, snapshot
from .dreambooth import DreamBooth
from .engine import TRAINING_FIX, Method, Regularizers, TrainResult, base_fingerprint, denoising_loss, train
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
#: small trained adapters shipped for the notebooks (training them all would exceed a notebook's 5 minutes)
ADAPTERS_DIR = Path(__file__).resolve().parent.parent.parent / "data" / "adapters"


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


def shipped_adapter(method: str, concepts, *, retrain: bool = False, fix: bool = False, model=None,
                    out: str | Path = "runs") -> Path:
    """The folder of ``method`` trained on ``concepts`` (a slug, or several: joint) with the shipped defaults
    (``fix=True``: with the training fix): ``data/adapters/<method>[-fix]/<slug>[+<slug>]`` when it is shipped
    and ``retrain`` is False, else trained now into ``out`` (the same command the bench runs)."""
    import torch

    from ..pipeline import load_pipeline
    from .engine import JOINT_METHODS

    slugs = [concepts] if isinstance(concepts, str) else list(concepts)
    name = "+".join(slugs)
    kind = f"{method}-fix" if fix else method
    shipped = ADAPTERS_DIR / kind / name
    if shipped.is_dir() and not retrain and model is None:
        return shipped
    folder = Path(out) / kind / name
    if not (folder / ADAPTER_FILE).is_file() or retrain:
        reg = None
        if fix:
            reg = TRAINING_FIX if len(slugs) > 1 and method in JOINT_METHODS else Regularizers(
                masked_loss=True, attention_weight=TRAINING_FIX.attention_weight)
        pipe = load_pipeline(model, dtype=torch.float32)
        train_concept(pipe, slugs[0] if len(slugs) == 1 else slugs, method, out=folder, regularizers=reg)
    return folder


#: what ``data/adapters`` holds: (method, concepts, with the training fix); notebooks 06-08 and the calibration set load them
SHIPPED = [(m, [c], False) for m in ("textual_inversion", "hypernetwork", "lora")
           for c in ("woman_with_red_hair_and_medium_skin", "man_with_curly_hair_and_light_skin")]
SHIPPED.append(("lora", ["woman_with_red_hair_and_medium_skin", "man_with_curly_hair_and_light_skin"], True))


def retrain_shipped(work: str | Path = Path.home() / ".cache" / "mcteach" / "shipped", model=None,
                    dest: str | Path = ADAPTERS_DIR, log=print) -> list[Path]:
    """Train every adapter of ``SHIPPED`` again with the shipped defaults (on ``model``, default the embedded one) and
    export it into ``dest`` (default ``data/adapters``; fp16): after the base model changes, its adapters must be
    retrained."""
    import shutil

    out = []
    for method, concepts, fix in SHIPPED:
        folder = shipped_adapter(method, concepts, retrain=True, fix=fix, model=model, out=work)
        dest_folder = Path(dest) / folder.parent.name / folder.name
        shutil.rmtree(dest_folder, ignore_errors=True)
        out.append(export_adapter(folder, dest_folder))
        log(f"{method}{' (training fix)' if fix else ''} {'+'.join(concepts)} -> {dest_folder}")
    return out


#: the files ``Method.load`` reads, per method (the others are copies in other tools' formats)
LOADED_FILES = {"lora": ["diffusers"], "textual_inversion": ["diffusers"], "hypernetwork": ["a1111"],
                "dreambooth": ["unet", "text_encoder"]}


def export_adapter(folder: str | Path, dest: str | Path) -> Path:
    """Copy what ``load_adapter`` needs from a training folder to ``dest``, weights in float16 (how the course
    ships adapters in ``data/adapters``): adapter.json and the loaded files, no checkpoints or other formats."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    folder, dest = Path(folder), Path(dest)
    meta = read_adapter(folder)
    dest.mkdir(parents=True, exist_ok=True)
    for key in LOADED_FILES[meta["method"]]:
        if key not in meta["files"]:
            continue
        src, out = folder / meta["files"][key], dest / meta["files"][key]
        if src.is_dir():
            shutil.copytree(src, out, dirs_exist_ok=True)
        elif src.suffix == ".safetensors":
            with safe_open(str(src), "pt") as f:
                info = f.metadata()
            half = {k: v.half() if v.is_floating_point() else v for k, v in load_file(src).items()}
            save_file(half, out, metadata=info)
        else:
            state = torch.load(src, weights_only=True)
            torch.save(_half(state), out)
    meta["files"] = {k: v for k, v in meta["files"].items() if k in LOADED_FILES[meta["method"]]}
    (dest / ADAPTER_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return dest


def _half(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.half() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _half(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_half(v) for v in obj)
    return obj


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


def check_base(pipe, meta: dict, path) -> None:
    """ValueError when the adapter in ``path`` was trained on another base model than ``pipe``'s."""
    theirs = meta.get("base")
    if not theirs:  # adapters written before the fingerprint was recorded
        return
    ours = base_fingerprint(pipe)
    differs = [k for k in theirs if k != "conv_in_sum" and theirs[k] != ours.get(k)]
    if not differs and abs(theirs["conv_in_sum"] - ours["conv_in_sum"]) > 1e-3 * max(1.0, abs(ours["conv_in_sum"])):
        differs = ["weights"]
    if differs:
        raise ValueError(f"{path} was trained on another base model ({', '.join(differs)} differ): load it on the "
                         f"pipeline it was trained on ({meta.get('base_model', 'see its adapter.json')})")


def load_adapter(pipe, path: str | Path) -> dict:
    """Apply the concept saved in folder ``path`` to ``pipe`` (in place); return its adapter.json
    (``meta["phrase"]`` is what to write in prompts)."""
    meta = read_adapter(path)
    check_base(pipe, meta, path)
    METHODS[meta["method"]].load(pipe, Path(path), meta)
    return meta


def phrases(meta: dict) -> dict[str, str]:
    """{concept slug: phrase} of an adapter folder's adapter.json (several for a jointly trained one)."""
    return meta.get("phrases") or {meta["concept"]: meta["phrase"]}


def load_adapters(pipe, folders, weights=None, *, merge: bool = False) -> list[dict]:
    """Put several learned concepts on one pipeline; returns their adapter.json, in order.

    Every folder must come from the same method and the same base model (a clear error otherwise), and
    each concept must answer to its own phrase (two "sks woman" could never be told apart). Per method:

    - ``textual_inversion``: every token is added (``<koala>``, ``<hamster>``); ``weights`` must be None;
    - ``lora``: every adapter is loaded under its name and activated together with
      ``set_adapters(names, weights)`` (default weight 1 each); ``merge=True`` then fuses them into the
      weights (diffusers' ``fuse_lora``: faster, no longer switchable);
    - ``hypernetwork``: the networks are chained (each rewrites the context the previous one wrote);
      ``weights`` sets each one's strength. Each acts on every token, so none can be bound to one concept;
    - ``dreambooth``: one folder only: it *replaces* the UNet (and text encoder). Two concepts in one
      DreamBooth model are trained jointly: ``train_concept(pipe, [a, b], "dreambooth", ...)``.
    """
    folders = [Path(f) for f in ([folders] if isinstance(folders, (str, Path)) else folders)]
    if not folders:
        raise ValueError("load_adapters needs at least one adapter folder")
    metas = [read_adapter(f) for f in folders]
    kinds = {m["method"] for m in metas}
    if len(kinds) > 1:
        raise ValueError(f"these adapters come from different methods ({', '.join(sorted(kinds))}): combine "
                         "concepts learned with one method (compare methods in separate pipelines)")
    method = kinds.pop()
    if weights is not None and (len(weights) != len(folders) or method in ("textual_inversion", "dreambooth")):
        raise ValueError(f"weights: one number per folder, and only for LoRA and HyperNetwork adapters; got "
                         f"{len(weights)} for {len(folders)} {method} folders")
    if method == "dreambooth" and len(folders) > 1:
        raise ValueError("DreamBooth replaces the whole UNet, so two DreamBooth folders cannot both apply: train "
                         "the concepts jointly instead (python -m mcteach train --method dreambooth --concept A "
                         "--concept B)")
    seen = {}
    for f, m in zip(folders, metas):
        for slug, phrase in phrases(m).items():
            if phrase in seen:
                raise ValueError(f"{f} and {seen[phrase]} both answer to {phrase!r}: no prompt or mask can tell them "
                                 "apart; retrain one with its own identifier (--identifier; a HyperNetwork answers to "
                                 "its class word, so give it another method)")
            seen[phrase] = f
    names = [m.get("adapter_name") for m in metas]
    if method == "lora" and len(set(names)) < len(names):
        raise ValueError(f"two LoRA folders share the adapter name {names}: retrain one with another adapter_name")
    for f, m in zip(folders, metas):
        check_base(pipe, m, f)
        METHODS[method].load(pipe, f, m)
    if method == "lora":
        pipe.set_adapters(names, adapter_weights=list(weights) if weights is not None else [1.0] * len(names))
        if merge:
            pipe.fuse_lora(adapter_names=names)
    if method == "hypernetwork" and weights is not None:
        from .hypernetwork import attached

        for hn, w in zip(attached(pipe)[-len(folders):], weights):
            hn.strength = float(w)
    return metas


__all__ = ["TRAINING_FIX", "Regularizers", "METHODS", "Method", "TrainResult", "train", "train_concept", "make_method", "load_adapter",
           "read_adapter", "shipped_adapter", "export_adapter", "retrain_shipped", "SHIPPED", "load_adapters", "phrases", "base_fingerprint", "denoising_loss", "TextualInversion", "HypernetworkMethod", "DreamBooth", "LoRA", "snapshot", "changes",
           "format_changes"]


def trainable_groups(pipe, method: str, concept, **settings) -> list[dict]:
    """What ``method`` would train on ``pipe``, group by group, without training: the method's ``setup`` runs on a
    deep copy of the pipeline with everything frozen first, exactly as ``train`` does. One row per part
    (text_encoder, unet, extra = the hypernetwork) and kind of parameter, wherever in the network it sits
    (``attn2.to_k.lora_A``: every cross-attention key's LoRA A, in every block): ``{"part", "pattern",
    "tensors", "values"}``. Textual Inversion trains the whole embedding matrix's
    gradient but puts every old row back after each step: only one row's values really move."""
    import copy
    import re

    import torch

    from ..concepts import Concept, load_concept
    from .engine import Denoiser

    p = copy.deepcopy(pipe)
    for part in (p.vae, p.text_encoder, p.unet):
        part.requires_grad_(False)
    m = make_method(method, **settings)
    size = p.unet.config.sample_size * p.vae_scale_factor
    concept = concept if isinstance(concept, Concept) else load_concept(concept, size)
    with torch.random.fork_rng(devices=[]):
        extra = m.setup(p, concept)
    rows: dict[tuple[str, str], dict] = {}
    adapter_names = {n for n in getattr(p.unet, "peft_config", {})} | {"default"}
    for name, prm in Denoiser(p.unet, p.text_encoder, extra).named_parameters():
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

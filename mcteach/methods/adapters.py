"""Adapter files (notebooks 02-05): every training run writes ``adapter.json`` (method, phrase, class word,
settings, base-model fingerprint) beside its weights; these functions read, check, load and export such a folder.

    meta = load_adapter(pipe, "runs/koala-lora")      # meta["phrase"] is what to write in prompts
    metas = load_adapters(pipe, ["runs/woman", "runs/man"])   # several concepts on one pipeline
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..paths import ADAPTERS_DIR  # noqa: F401  (the shipped adapters: where export_adapter's copies live)
from .catalog import METHODS
from .engine import base_fingerprint
from .hypernetwork import attached

ADAPTER_FILE = "adapter.json"
#: the files ``Method.load`` reads, per method (the others are copies in other tools' formats)
LOADED_FILES = {"lora": ["diffusers"], "textual_inversion": ["diffusers"], "hypernetwork": ["a1111"],
                "dreambooth": ["unet", "text_encoder"]}


def export_adapter(folder: str | Path, dest: str | Path) -> Path:
    """Copy what ``load_adapter`` needs from a training folder to ``dest``, weights in float16 (how the course
    ships adapters in ``data/adapters``): adapter.json and the loaded files, no checkpoints or other formats."""
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
                         "`mcteach train` (or train_concept)")
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
                         "the concepts jointly instead (mcteach train --method dreambooth --concept A "
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
        for hn, w in zip(attached(pipe)[-len(folders):], weights):
            hn.strength = float(w)
    return metas



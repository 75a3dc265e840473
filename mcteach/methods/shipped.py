"""The adapters shipped in ``data/adapters`` (notebooks 06-08 load them): which they are, where to find one, and how
to train them all again after the base model changes."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..paths import ADAPTERS_DIR, CACHE
from ..sd.pipeline import load_pipeline
from .adapters import ADAPTER_FILE, export_adapter
from .catalog import train_concept
from .engine import training_fix


def shipped_adapter(method: str, concepts, *, retrain: bool = False, fix: bool = False, model=None,
                    out: str | Path = "runs") -> Path:
    """The folder of ``method`` trained on ``concepts`` (a slug, or several: joint) with the shipped defaults
    (``fix=True``: with the training fix): ``data/adapters/<method>[-fix]/<slug>[+<slug>]`` when it is shipped
    and ``retrain`` is False, else trained now into ``out`` (the same command the bench runs)."""
    slugs = [concepts] if isinstance(concepts, str) else list(concepts)
    name = "+".join(slugs)
    kind = f"{method}-fix" if fix else method
    shipped = ADAPTERS_DIR / kind / name
    if shipped.is_dir() and not retrain and model is None:
        return shipped
    folder = Path(out) / kind / name
    if not (folder / ADAPTER_FILE).is_file() or retrain:
        reg = training_fix(len(slugs), method) if fix else None
        pipe = load_pipeline(model, dtype=torch.float32)
        train_concept(pipe, slugs[0] if len(slugs) == 1 else slugs, method, out=folder, regularizers=reg)
    return folder


#: what ``data/adapters`` holds: (method, concepts, with the training fix); notebooks 06-08 and the calibration set load them
SHIPPED = [(m, [c], False) for m in ("textual_inversion", "hypernetwork", "lora")
           for c in ("woman_with_red_hair_and_medium_skin", "man_with_curly_hair_and_light_skin")]
SHIPPED.append(("lora", ["woman_with_red_hair_and_medium_skin", "man_with_curly_hair_and_light_skin"], True))
SHIPPED.append(("lora", ["koala"], False))  # the third of notebook 08's three concepts
# notebook 09: a place, a wearable, and the couple trained with the wearable (the training fix puts it on them)
SHIPPED += [("lora", ["cottage_garden"], False), ("lora", ["billed_cap"], False),
            ("lora", ["woman_with_red_hair_and_medium_skin", "man_with_curly_hair_and_light_skin", "billed_cap"], True)]


def retrain_shipped(work: str | Path = CACHE / "shipped", model=None,
                    dest: str | Path = ADAPTERS_DIR, log=print) -> list[Path]:
    """Train every adapter of ``SHIPPED`` again with the shipped defaults (on ``model``, default the embedded one) and
    export it into ``dest`` (default ``data/adapters``; fp16): after the base model changes, its adapters must be
    retrained."""
    out = []
    for method, concepts, fix in SHIPPED:
        folder = shipped_adapter(method, concepts, retrain=True, fix=fix, model=model, out=work)
        dest_folder = Path(dest) / folder.parent.name / folder.name
        shutil.rmtree(dest_folder, ignore_errors=True)
        out.append(export_adapter(folder, dest_folder))
        log(f"{method}{' (training fix)' if fix else ''} {'+'.join(concepts)} -> {dest_folder}")
    return out



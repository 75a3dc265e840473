"""File helpers shared by every long job: checkpoints, reports and weights are written atomically, so a killed
run never leaves a half-written file behind (training resumes from the last complete checkpoint)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def atomic_save(obj, path: Path, save=None) -> None:
    """``save(obj, tmp)`` (default ``torch.save``) to a temporary file, then rename: a crash never leaves a
    half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    (save or torch.save)(obj, tmp)
    os.replace(tmp, path)


def write_text(text: str, path: Path) -> None:
    """``atomic_save``'s ``save`` for text files (JSON reports)."""
    Path(path).write_text(text, encoding="utf-8")


def write_page(json_path: Path, title: str, about: str, tables: str) -> str:
    """A report's markdown page beside its JSON (``x.json`` -> ``x.md``), written atomically: ``# title``, the line
    ``about`` (what made it, from which file), then ``tables``; returns ``tables``."""
    atomic_save(f"# {title}\n\n{about}\n\n{tables}\n", Path(json_path).with_suffix(".md"), write_text)
    return tables

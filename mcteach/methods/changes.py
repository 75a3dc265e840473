"""What did training change? Compare a pipeline's weights before and after, part by part.

Every method claims to train a particular set of parameters; this checks it on the weights themselves:

    before = snapshot(pipe)
    train_concept(pipe, "koala", "lora", out="runs/koala-lora")
    print(format_changes(changes(before, pipe)))

    part            tensors changed  values changed  new values  values before
    text_encoder             0 / 52               0           0        699,520
    unet                    0 / 324               0      97,280      5,925,124   (LoRA's A and B are new)
    vae                     0 / 152               0           0        954,567

peft wraps a LoRA layer's original weight as ``...to_q.base_layer.weight``: that name is matched to the
original ``...to_q.weight``. A hypernetwork is not part of the pipeline's models; it is reported as the
row ``hypernetwork`` (all new values).
"""

from __future__ import annotations

import torch

from .hypernetwork import attached

PARTS = ("text_encoder", "unet", "vae")


def snapshot(pipe) -> dict[str, dict[str, torch.Tensor]]:
    """A CPU copy of every parameter of the text encoder, UNet and VAE."""
    return {part: {n: p.detach().to("cpu", copy=True) for n, p in getattr(pipe, part).named_parameters()}
            for part in PARTS}


def _original_name(name: str) -> str:
    return name.replace(".base_layer.", ".")


def changes(before: dict[str, dict[str, torch.Tensor]], pipe) -> list[dict]:
    """One row per part: tensors whose values changed, how many values changed (in tensors that existed
    before; a grown tensor, e.g. Textual Inversion's embedding matrix, is compared on its old rows), how
    many values are new (new tensors, new rows), and the part's size before."""
    rows = []
    for part in PARTS:
        old = before[part]
        changed_tensors = changed_values = new_values = 0
        for name, p in getattr(pipe, part).named_parameters():
            ref = old.get(_original_name(name))
            value = p.detach().cpu()
            if ref is None:
                new_values += value.numel()
                continue
            if value.shape != ref.shape:  # grown along dim 0 (new token rows)
                if value.shape[1:] != ref.shape[1:] or value.shape[0] < ref.shape[0]:
                    raise ValueError(f"{part}.{name} changed shape {tuple(ref.shape)} -> {tuple(value.shape)}")
                new_values += value[ref.shape[0]:].numel()
                value = value[: ref.shape[0]]
            diff = int((value.to(ref.dtype) != ref).sum())
            changed_tensors += diff > 0
            changed_values += diff
        rows.append({"part": part, "tensors_changed": changed_tensors, "tensors": len(old),
                     "values_changed": changed_values, "new_values": new_values,
                     "values_before": sum(t.numel() for t in old.values())})
    for hn in attached(pipe):
        n = sum(p.numel() for p in hn.parameters())
        rows.append({"part": "hypernetwork", "tensors_changed": 0, "tensors": 0, "values_changed": 0,
                     "new_values": n, "values_before": 0})
    return rows


def format_changes(rows: list[dict]) -> str:
    """``changes`` as a small text table."""
    lines = [f"{'part':<14}{'tensors changed':>17}{'values changed':>16}{'new values':>12}{'values before':>15}"]
    for r in rows:
        tensors = f"{r['tensors_changed']} / {r['tensors']}" if r["tensors"] else "-"
        lines.append(f"{r['part']:<14}{tensors:>17}{r['values_changed']:>16,}{r['new_values']:>12,}"
                     f"{r['values_before']:>15,}")
    return "\n".join(lines)

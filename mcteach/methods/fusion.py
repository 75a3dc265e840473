"""Several LoRAs fused into one (notebook 07): one adapter that draws every concept, fitted to match each concept's
own LoRA on that concept's prompts (Mix-of-Show's gradient fusion, solved in closed form per layer).

Loading two LoRAs together adds both updates everywhere: each concept's layers also see the other's update, and the
two blend (notebook 06). Fusion instead asks, layer by layer, for one update ``D`` that does what LoRA i does *on the
inputs that concept i's prompts produce*. For a layer ``W`` (d_out, d_in) with LoRA updates ``D_i = (alpha_i/r_i)
B_i A_i`` and the inputs ``X_i`` (n_i, d_in) it receives while concept i is drawn with its own LoRA::

    D* = argmin_D  sum_i ||X_i D_i^T - X_i D^T||^2 / n_i  =  (sum_i D_i G_i) (sum_i G_i + ridge I)^-1,
    G_i = X_i^T X_i / n_i

then ``D*`` is cut to rank ``rank`` by its SVD (``D* ~ U S V^T``: B = U sqrt(S), A = sqrt(S) V^T, alpha = rank so
the scale is 1) and saved as an ordinary diffusers/peft LoRA file, with an ``adapter.json`` that lists every
concept's phrase, like a jointly trained LoRA's::

    folder = fuse_loras(pipe, ["runs/woman", "runs/man"], "runs/couple-fused")
    load_adapters(pipe, [folder])       # one adapter; "a cpd woman on the left and a tkb man on the right"

The inputs are recorded while sampling each concept's prompts (``prompts_for``: "a <phrase>", on the left, on the
right) for ``seeds`` with ``steps`` DDIM steps; the unconditional half of classifier-free guidance is recorded too,
so the fused adapter also learns what both LoRAs do to the empty prompt, on average. Rank: by default the sum of
the LoRAs' ranks (two rank-4 adapters: 8), enough to hold both updates where they act on different inputs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from peft import get_peft_model_state_dict

from ..sd.pipeline import generate
from .adapters import ADAPTER_FILE, load_adapters, phrases, read_adapter
from .lora import DIFFUSERS_FILE, lora_config


def prompts_for(phrase: str) -> list[str]:
    """The prompts a concept's layer inputs are recorded on: alone, and in each half."""
    return [f"a {phrase}", f"a {phrase} on the left", f"a {phrase} on the right"]


def lora_layers(unet, adapter: str) -> dict[str, torch.nn.Module]:
    """{module name: peft LoRA layer} of the UNet's layers that carry ``adapter``."""
    return {n: m for n, m in unet.named_modules() if hasattr(m, "lora_A") and adapter in m.lora_A}


def lora_delta(layer, adapter: str) -> torch.Tensor:
    """The update (d_out, d_in) of one peft LoRA layer (Linear or 1x1 Conv2d): scaling * B @ A."""
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    return layer.scaling[adapter] * (b.flatten(1).double() @ a.flatten(1).double())


def _rows(x: torch.Tensor, conv: bool) -> torch.Tensor:
    """A layer's input as rows of features: (..., d_in) or, for a convolution, (B, d_in, H, W)."""
    return (x.movedim(1, -1) if conv else x).reshape(-1, x.shape[1] if conv else x.shape[-1]).double()


@torch.no_grad()
def record_grams(pipe, adapter: str, prompts: list[str], seeds, steps: int) -> dict[str, torch.Tensor]:
    """{layer name: G = X^T X / n (d_in, d_in)} of the inputs each of ``adapter``'s layers receives while
    ``prompts`` are sampled (every seed, every step, both halves of guidance) with ``adapter`` alone on."""
    layers = lora_layers(pipe.unet, adapter)
    grams = {n: 0.0 for n in layers}
    count = {n: 0 for n in layers}
    handles = []
    for name, layer in layers.items():
        conv = isinstance(layer.base_layer, torch.nn.Conv2d)

        def hook(module, args, name=name, conv=conv):
            x = _rows(args[0], conv)
            grams[name] = grams[name] + x.T @ x
            count[name] += x.shape[0]
        handles.append(layer.register_forward_pre_hook(hook))
    pipe.set_adapters([adapter])
    try:
        generate(pipe, [p for p in prompts for _ in seeds], seed=[s for _ in prompts for s in seeds], steps=steps)
    finally:
        for h in handles:
            h.remove()
    return {n: grams[n] / max(count[n], 1) for n in layers}


def fit_update(deltas: list[torch.Tensor], grams: list[torch.Tensor], ridge: float = 1e-4) -> torch.Tensor:
    """``D* = (sum_i D_i G_i)(sum_i G_i + ridge * mean(diag) I)^-1``: the one update (d_out, d_in) closest to each
    ``D_i`` on the inputs whose second moments are ``G_i``; with one LoRA, that LoRA's update (where G is full
    rank)."""
    total = sum(grams)
    eye = torch.eye(total.shape[0], dtype=total.dtype)
    lhs = total + ridge * total.diagonal().mean().clamp_min(1e-12) * eye
    rhs = sum(d @ g for d, g in zip(deltas, grams))
    return torch.linalg.solve(lhs, rhs.T).T  # lhs is symmetric: (rhs lhs^-1)^T = lhs^-1 rhs^T


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (d_out, r), A (r, d_in)) with B @ A the best rank-``rank`` approximation of ``delta`` (its SVD)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


def fuse_loras(pipe, folders, out, *, rank: int | None = None, seeds=range(4), steps: int = 10,
               ridge: float = 1e-4, progress=print) -> Path:
    """Fit one LoRA to the LoRAs in ``folders`` (see the module docstring) and write it to ``out`` (diffusers'
    LoRA file and an ``adapter.json`` with every concept's phrase). ``pipe``: the base model they were trained on
    (their adapters are loaded into it and removed again)."""
    folders = [Path(f) for f in folders]
    metas = [read_adapter(f) for f in folders]
    if len(folders) < 2 or any(m["method"] != "lora" for m in metas):
        raise ValueError(f"fuse_loras fuses two or more LoRA folders, got {[m['method'] for m in metas]}")
    if any(m.get("settings", {}).get("text_encoder") for m in metas):
        raise ValueError("fuse_loras fuses UNet LoRAs; these adapters also change the text encoder")
    load_adapters(pipe, folders)
    names = [m["adapter_name"] for m in metas]
    deltas, grams = [], []
    try:
        for m, name in zip(metas, names):
            said = [p for p in phrases(m).values()]
            progress(f"  recording {name}'s layer inputs on {said}")
            grams.append(record_grams(pipe, name, [p for x in said for p in prompts_for(x)], list(seeds), steps))
            deltas.append({n: lora_delta(layer, name) for n, layer in lora_layers(pipe.unet, name).items()})
        shapes = {n: tuple(layer.base_layer.weight.shape) for n, layer in lora_layers(pipe.unet, names[0]).items()}
    finally:
        pipe.delete_adapters(names)
    rank = rank or sum(m["settings"]["rank"] for m in metas)
    targets = sorted({t for m in metas for t in m["settings"]["targets"]})
    fused = "+".join(m["concept"] for m in metas)
    pipe.unet.add_adapter(lora_config(rank, float(rank), targets), adapter_name=fused)
    try:
        layers = lora_layers(pipe.unet, fused)
        for n, layer in layers.items():
            have = [i for i, d in enumerate(deltas) if n in d]
            if not have:
                layer.lora_B[fused].weight.data.zero_()
                continue
            d = fit_update([deltas[i][n] for i in have], [grams[i][n] for i in have], ridge)
            b, a = low_rank(d, rank)
            wa, wb = layer.lora_A[fused].weight, layer.lora_B[fused].weight
            wa.data.zero_()
            wb.data.zero_()
            wa.data.flatten(1)[: a.shape[0]] = a.to(wa.dtype)
            wb.data.flatten(1)[:, : b.shape[1]] = b.to(wb.dtype)
            assert tuple(layer.base_layer.weight.shape) == shapes[n]
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(pipe.unet, adapter_name=fused).items()}
        type(pipe).save_lora_weights(out, unet_lora_layers=sd, weight_name=DIFFUSERS_FILE,
                                     unet_lora_adapter_metadata=pipe.unet.peft_config[fused].to_dict())
    finally:
        pipe.delete_adapters([fused])
    meta = copy.deepcopy(metas[0])
    meta.update(concept=fused, name=" and ".join(m["name"] for m in metas), adapter_name=fused,
                phrases={k: v for m in metas for k, v in phrases(m).items()},
                names={m["concept"]: m["name"] for m in metas}, files={"diffusers": DIFFUSERS_FILE},
                fused={"from": [str(f) for f in folders], "rank": rank, "ridge": ridge, "seeds": list(seeds),
                       "steps": steps})
    meta["settings"] = {**meta["settings"], "rank": rank, "alpha": float(rank), "targets": targets}
    (out / ADAPTER_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out

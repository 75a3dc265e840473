"""Where attention masks act (notebook 07): success by UNet resolution set x part of the denoising process.

A single-pass mask (``masking.AttentionMasks``) can act at every attention layer from the first step to the last,
or only at some of the UNet's grids (``resolutions``) and some of its steps (``steps``). ``sweep`` generates the
same prompts with every combination and judges each half, so a heat map shows where masks place two concepts and
where they break the picture::

    result = sweep(pipe, judge, [("cat", "red apple"), ("red apple", "cat")], modes=BASE_MODES, seeds=range(8))
    show_sweep(result)                                              # one heat map per mode

``mcteach bench mixing --sweep`` runs the course's sweep (the base model's two-object prompts, then the couple's
LoRAs) into ``data/bench_sweep.json``; notebook 07 reads it.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import numpy as np

from ..measure.metrics import bootstrap_ci, judge_instances
from ..mixing.generate import regional_generate
from ..mixing.masking import AttentionMasks, Region, attention_sides
from ..mixing.passes import sub_prompt

#: the parts of the denoising process a mask may act in (fractions: 0 = pure noise, 1 = the end)
WINDOWS = {"every step": (0.0, 1.0), "first 30%": (0.0, 0.3), "after 30%": (0.3, 1.0)}

#: the single-pass masks the sweep compares on the base model (no adapters to bind)
BASE_MODES = {
    "token masks": AttentionMasks("tokens", False, False),
    "regional prompts": AttentionMasks("regional", False, False),
    "regional prompts + self-attention masks": AttentionMasks("regional", True, False),
}


#: the base model's two-object prompts the sweep draws: each concept on each side
BASE_PAIRS = [("cat", "red apple"), ("red apple", "cat")]

#: the single-pass masks the sweep compares with two LoRA adapters, each bound to its region
LORA_MODES = {
    "regional prompts + bound LoRA": AttentionMasks("regional", False, True),
    "regional prompts + bound LoRA + self-attention masks": AttentionMasks("regional", True, True),
}


def resolution_sets(unet) -> dict[str, tuple[int, ...]]:
    """Named sets of the UNet's attention grids, finest first: every grid, each alone, and every grid but the
    coarsest; e.g. for the embedded model {"16+8+4": (16, 8, 4), "16": (16,), ..., "16+8": (16, 8)}."""
    sides = attention_sides(unet)
    sets = [tuple(sides)] + [(s,) for s in sides] + [tuple(sides[:-1]), tuple(sides[1:])]
    out = {}
    for s in sets:
        out.setdefault("+".join(map(str, s)), s)
    return out


def sweep(pipe, judge, pairs, *, modes: dict[str, AttentionMasks], seeds=range(8), windows: dict | None = None,
          resolutions: dict | None = None, place_words: bool = True, phrases: dict | None = None,
          adapters: dict | None = None, log=None) -> dict:
    """Success of every mode x resolution set x window on ``pairs`` ((left concept, right concept) judge labels).

    The prompt is "a <A> on the left and a <B> on the right"; region r's sub-prompt "a <A> on the left" (or "a <A>"
    when ``place_words`` is False). ``phrases``: the words for a label (default the label itself, e.g. "sks woman"
    for an adapter's concept); ``adapters``: the LoRA adapter name of a label, bound to its region when the mode
    binds adapters. Returns {"modes", "resolutions", "windows", "success": {mode: [[(mean, lo, hi) per window] per
    resolution set]}, "left"/"right": each half's hit rate alike, "seconds"}."""
    windows = WINDOWS if windows is None else windows
    resolutions = resolution_sets(pipe.unet) if resolutions is None else resolutions
    phrases, adapters = phrases or {}, adapters or {}
    seeds = list(seeds)
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"each pair is (left concept, right concept), two judge labels; got {tuple(pair)!r}")
    out = {"modes": list(modes), "resolutions": list(resolutions), "windows": list(windows), "pairs": [list(p) for p in pairs],
           "seeds": len(seeds), "place_words": place_words, "success": {}, "left": {}, "right": {}}
    t0 = time.time()
    for name, mode in modes.items():
        grids = {k: [] for k in ("success", "left", "right")}
        for res in resolutions.values():
            cells = {k: [] for k in grids}
            for lo_hi in windows.values():
                fix = dataclasses.replace(mode, resolutions=res, steps=lo_hi)
                hits = {k: [] for k in grids}
                for a, b in pairs:
                    words = [phrases.get(a, a), phrases.get(b, b)]
                    prompt = f"a {words[0]} on the left and a {words[1]} on the right"
                    regions = [Region(side, sub_prompt(w, side, fix) if place_words else f"a {w}", phrase=w,
                                      adapter=adapters.get(c)) for side, w, c in zip(("left", "right"), words, (a, b))]
                    images = regional_generate(pipe, prompt, regions, fix=fix, seed=seeds)
                    for r in judge_instances(judge, images, [a, b], ["left", "right"]):
                        hits["success"].append(r.outcome == "success")
                        hits["left"].append(r.predicted[0] == a)
                        hits["right"].append(r.predicted[1] == b)
                for k in grids:
                    cells[k].append(list(bootstrap_ci(hits[k])))
            for k in grids:
                grids[k].append(cells[k])
            if log:
                log(f"  {name} at {'+'.join(map(str, res))}: " + ", ".join(f"{c[0]:.2f}" for c in cells["success"]))
        for k in grids:
            out[k][name] = grids[k]
    out["seconds"] = round(time.time() - t0, 1)
    return out


def best_cells(result: dict, mode: str, key: str = "success") -> list[tuple[str, str, float]]:
    """The (resolution set, window, rate) cells of ``mode`` with the highest rate, every tie."""
    grid = np.array([[c[0] for c in row] for row in result[key][mode]])
    top = grid.max()
    return [(result["resolutions"][i], result["windows"][j], float(grid[i, j]))
            for i, j in itertools.product(*map(range, grid.shape)) if grid[i, j] == top]


def show_sweep(result: dict, key: str = "success", size: float = 3.0, suptitle: str | None = None):
    """One heat map per mode: resolution sets down, windows across, the rate (and its interval) in every cell."""
    import textwrap

    import matplotlib.pyplot as plt

    modes = result["modes"]
    fig, axes = plt.subplots(1, len(modes), figsize=(size * 1.45 * len(modes) + 1.0, size * 1.15), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        grid = np.array([[c[0] for c in row] for row in result[key][mode]])
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            lo, hi = result[key][mode][i][j][1:]
            ax.text(j, i, f"{v:.2f}\n[{lo:.2f}, {hi:.2f}]", ha="center", va="center", fontsize=6,
                    color="black" if v > 0.6 else "white")
        ax.set_xticks(range(len(result["windows"])), result["windows"], fontsize=7)
        ax.set_yticks(range(len(result["resolutions"])), result["resolutions"], fontsize=7)
        ax.set_title("\n".join(textwrap.wrap(mode, 30)), fontsize=8)
        if ax is axes[0][0]:
            ax.set_ylabel("masks at the grids", fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label=key)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9, y=1.04)
    plt.show()
    return fig

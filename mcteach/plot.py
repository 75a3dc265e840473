"""Plotting helpers in the fast.ai style: each takes an optional matplotlib axis and returns it,
and accepts PIL images, numpy arrays and tensors alike."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_array(im, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """H x W x C (or H x W) float array in [0, 1] from a PIL image, an array or a tensor.

    Tensors may be (C, H, W) or (1, C, H, W); ``value_range`` says what black and white are
    (use (-1, 1) for VAE outputs).
    """
    if isinstance(im, Image.Image):
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    if isinstance(im, torch.Tensor):
        t = im.detach().float().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim == 3 and t.shape[0] in (1, 3, 4):
            t = t.permute(1, 2, 0)
        im = t.numpy()
    a = np.asarray(im, dtype=np.float32)
    if a.dtype == np.uint8 or a.max() > 1.5 and value_range == (0.0, 1.0):
        a = a / 255.0
    lo, hi = value_range
    a = (a - lo) / (hi - lo)
    return np.clip(a.squeeze(-1) if a.ndim == 3 and a.shape[-1] == 1 else a, 0.0, 1.0)


def show_image(im, ax=None, title: str | None = None, value_range=(0.0, 1.0), **kwargs):
    """Show one image without axes ticks; returns the axis."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=kwargs.pop("figsize", (2.5, 2.5)))[1]
    a = to_array(im, value_range)
    ax.imshow(a, cmap=kwargs.pop("cmap", "gray" if a.ndim == 2 else None),
              interpolation=kwargs.pop("interpolation", "nearest"), **kwargs)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    return ax


def show_images(images, titles=None, ncols: int | None = None, size: float = 1.8, suptitle: str | None = None,
                **kwargs):
    """A grid of images; returns the figure."""
    import matplotlib.pyplot as plt

    images = list(images)
    ncols = ncols or min(len(images), 8)
    nrows = -(-len(images) // ncols)
    first = images[0] if images else None
    aspect = first.height / first.width if hasattr(first, "height") else 1.0  # a wide canvas: rows as high as it
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * aspect * nrows + (0.3 if suptitle else 0)
                                                    + (0.3 * nrows if titles and aspect < 1 else 0)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < len(images):
            show_image(images[i], ax=ax, title=titles[i] if titles else None, **kwargs)
        else:
            ax.set_axis_off()
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def show_attention(image, attn_map, ax=None, title: str | None = None, alpha: float = 0.55, cmap: str = "jet"):
    """Overlay one attention map (h x w, any resolution) on ``image``, upsampled to its size."""
    ax = show_image(image, ax=ax, title=title)
    a = to_array(image)
    m = torch.as_tensor(np.asarray(attn_map, dtype=np.float32))[None, None]
    m = torch.nn.functional.interpolate(m, size=a.shape[:2], mode="bilinear", align_corners=False)[0, 0].numpy()
    m = (m - m.min()) / (m.max() - m.min() + 1e-8)
    ax.imshow(m, cmap=cmap, alpha=alpha, extent=(-0.5, a.shape[1] - 0.5, a.shape[0] - 0.5, -0.5))
    return ax


def show_token_maps(image, maps, tokens: list[str], size: float = 1.6, suptitle: str | None = None):
    """The image, then one overlay per token: maps (T, h, w) with T >= len(tokens); returns the figure."""
    import matplotlib.pyplot as plt

    n = len(tokens) + 1
    fig, axes = plt.subplots(1, n, figsize=(size * n, size + (0.35 if suptitle else 0.1)), squeeze=False)
    show_image(image, ax=axes[0, 0], title="image")
    for i, tok in enumerate(tokens):
        show_attention(image, maps[i], ax=axes[0, i + 1], title=tok)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def show_losses(losses, ax=None, smooth: int = 25, title: str | None = None, label: str | None = None):
    """A training curve: each step's loss (faint) and its running mean over ``smooth`` steps; returns the axis.
    Diffusion losses are noisy (each step draws its own t and noise), so read the running mean."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(5, 2.6))[1]
    y = np.asarray(losses, dtype=np.float64)
    steps = np.arange(1, len(y) + 1)
    line = ax.plot(steps, y, alpha=0.25, lw=0.8)[0]
    if len(y) >= smooth > 1:
        mean = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
        ax.plot(steps[smooth - 1 :], mean, color=line.get_color(), lw=1.8,
                label=label or f"running mean ({smooth} steps)")
        ax.legend(fontsize=8)
    ax.set(xlabel="step", ylabel="loss", yscale="log")
    if title:
        ax.set_title(title, fontsize=9)
    return ax


#: the mark a figure title gives each per-instance outcome
OUTCOME_MARKS = {"success": "✓", "swap": "⇄", "duplication": "×2", "neglect": "∅", "other": "?"}


def show_outcomes(images, results, ncols: int = 8, size: float = 1.6, suptitle: str | None = None):
    """Generated images titled with the judge's per-region verdict (``metrics.PairResult``s, same order): the
    outcome (✓ success, ⇄ swap, ×2 duplication, ∅ neglect, ? other), then one line per region with what it was
    judged (``short_label``: "woman with red h…" stays distinct from the base class "woman")."""
    titles = [f"{OUTCOME_MARKS[r.outcome]} {r.outcome}\n" + "\n".join(short_label(p) for p in r.predicted) for r in results]
    return show_images(images, titles=titles, ncols=ncols, size=size, suptitle=suptitle)


def short_label(label: str, width: int = 18) -> str:
    """``label`` cut to ``width`` characters with an ellipsis, so a title fits under a small image."""
    return label if len(label) <= width else label[: width - 1].rstrip() + "…"


def show_token_grid(image, maps, tokens: list[str], ncols: int = 8, size: float = 1.4, suptitle: str | None = None):
    """One overlay per token, all on ONE colour scale (0 .. the largest value of any map), with a colour bar:
    a token whose map is faint really gets little attention. maps: (T, h, w) with T >= len(tokens)."""
    import matplotlib.pyplot as plt

    maps = torch.as_tensor(np.asarray(maps[: len(tokens)], dtype=np.float32))
    a = to_array(image)
    up = torch.nn.functional.interpolate(maps[:, None], size=a.shape[:2], mode="bilinear", align_corners=False)[:, 0]
    vmax = float(up.max())
    nrows = -(-len(tokens) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols + 0.6, size * nrows + (0.35 if suptitle else 0.1)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < len(tokens):
            ax.imshow(a)
            im = ax.imshow(up[i].numpy(), cmap="jet", alpha=0.55, vmin=0.0, vmax=vmax)
            ax.set_title(tokens[i], fontsize=8)
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01, label="attention (one scale)")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return fig


def explore(draw, **controls):
    """A figure to play with: ``draw(**values)`` once with each control's current value (the static figure that
    GitHub, nbval and a kernel without ipywidgets see), then the controls, redrawing below them on every change.

    ``controls``: ipywidgets widgets (``FloatSlider``, ``Dropdown``, ...) named as ``draw``'s arguments, or plain
    values (kept fixed). Returns the widget box, or None where ipywidgets is not installed.

        explore(lambda w: show_image(generate(pipe, "a fox", guidance_scale=w)[0]),
                w=ipywidgets.FloatSlider(value=5, min=1, max=12))
    """
    import matplotlib.pyplot as plt

    values = {k: getattr(v, "value", v) for k, v in controls.items()}
    draw(**values)
    plt.show()
    try:
        import ipywidgets
        from IPython.display import display
    except ImportError:
        print("(install ipywidgets for sliders: pip install ipywidgets)")
        return None
    widgets = {k: v for k, v in controls.items() if isinstance(v, ipywidgets.Widget)}
    out = ipywidgets.Output()

    def redraw(_change=None):
        with out:
            out.clear_output(wait=True)
            draw(**{k: getattr(v, "value", v) for k, v in controls.items()})
            plt.show()

    for w in widgets.values():
        w.observe(redraw, names="value")
    box = ipywidgets.VBox([*widgets.values(), out])
    display(box)
    return box


def show_table(*tables: str):
    """Display markdown tables as tables (Jupyter, nbconvert and GitHub render them), not as printed text; outside
    a notebook, print them."""
    text = "\n\n".join(tables)
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
    except ImportError:
        get_ipython = None
    if get_ipython is None or get_ipython() is None:
        print(text)
    else:
        display(Markdown(text))

"""The course's explanatory diagrams, drawn with matplotlib (notebooks 01, 02-05, 06 and 07 show them).

Each function returns a ``matplotlib.figure.Figure`` (about 12 x 4 inches, white): a notebook cell that ends
with ``diagrams.sd_pipeline()`` shows it once. Nothing is loaded: boxes, arrows and text only.

- ``sd_pipeline()`` (01): prompt -> tokenizer -> text encoder -> denoising loop (UNet, guidance, DDIM) -> VAE;
- ``cross_attention()`` (01): Q from pixels, K and V from tokens, the softmax over tokens, a word's map;
- ``what_trains()`` (02-05): what Textual Inversion, HyperNetwork, DreamBooth and LoRA each train;
- ``why_mixing()`` (06): the three paths by which two concepts mix;
- ``fixes()`` (07): token masks, regional prompts, self-attention masks, one UNet pass per region.

One colour per kind of thing, in every diagram: blue for text (prompts, tokens, the text context), green for
the image (pixels, latents), red for what trains, grey for frozen parts and operations; in 06 and 07 purple
and orange are the two concepts (the woman on the left, the man on the right). The shapes are the embedded
tiny model's (``mcteach.sd.tiny``): 64x64x3 images, 16x16x4 latents, T = 32 tokens of width d = 128.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch, Rectangle

# (edge, fill) of each kind of thing
TEXT = ("#2b6cb0", "#dbeafe")      # prompts, tokens, text context
IMAGE = ("#2f855a", "#d8f3e1")     # image, pixels, latents
TRAIN = ("#c53030", "#fed7d7")     # what trains
FROZEN = ("#4a5568", "#edf2f7")    # frozen parts, operations
UNUSED = ("#a0aec0", "#ffffff")    # a part this method does not have (dashed)
CONCEPT1 = ("#6b46c1", "#e9d8fd")  # the first concept: "a cpd woman on the left"
CONCEPT2 = ("#c05621", "#feebc8")  # the second concept: "a tkb man on the right"
INK = "#1a202c"
GREY = "#4a5568"
FONT = "DejaVu Sans"

# the embedded tiny model (mcteach.sd.tiny; data/tiny-sd)
TOKENS, WIDTH, IMAGE_SIDE, LATENT_SIDE, LATENT_CHANNELS = 32, 128, 64, 16, 4


# --------------------------------------------------------------------------- drawing helpers

@dataclass
class _Box:
    """A drawn box: centre (x, y), width and height in inches."""

    x: float
    y: float
    w: float
    h: float

    @property
    def left(self):
        return (self.x - self.w / 2, self.y)

    @property
    def right(self):
        return (self.x + self.w / 2, self.y)

    @property
    def top(self):
        return (self.x, self.y + self.h / 2)

    @property
    def bottom(self):
        return (self.x, self.y - self.h / 2)


def _text(ax, x, y, s, size=8.5, color=INK, **kw):
    kw = {"ha": "center", "va": "center", "fontfamily": FONT, **kw}
    return ax.text(x, y, s, fontsize=size, color=color, **kw)


def _box(ax, x, y, w, h, title="", detail="", colors=FROZEN, size=9.0, dashed=False, lw=1.3, title_y=None):
    """A rounded box centred at (x, y) with a bold title over smaller detail lines; returns its ``_Box``.

    ``title_y``: put the title at that height (e.g. the top of a box that holds other boxes) instead of
    centring title and detail together."""
    edge, fill = colors
    patch = FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0,rounding_size=0.06",
                           facecolor=fill, edgecolor=edge, linewidth=lw, linestyle="--" if dashed else "-")
    patch.set_gid("box")
    ax.add_patch(patch)
    dsize = size - 1.3
    t_h = (title.count("\n") + 1) * size * 1.25 / 72 if title else 0.0
    d_h = (detail.count("\n") + 1) * dsize * 1.25 / 72 if detail else 0.0
    top = y + (t_h + d_h) / 2
    ink = GREY if dashed else INK
    if title:
        _text(ax, x, title_y if title_y is not None else top - t_h / 2, title, size, ink, weight="bold",
              linespacing=1.25)
    if detail:
        _text(ax, x, top - t_h - d_h / 2, detail, dsize, ink, linespacing=1.25)
    return _Box(x, y, w, h)


def _arrow(ax, p, q, label="", color=GREY, at=0.5, offset=(0.0, 0.12), rad=0.0, lw=1.3, size=7.5, ls="-",
           **label_kw):
    """An arrow from p to q (inches), optionally bent (``rad``) and labelled near the point ``at`` of the way."""
    ax.add_patch(FancyArrowPatch(p, q, arrowstyle="-|>", mutation_scale=11, color=color, linewidth=lw,
                                 linestyle=ls, shrinkA=2, shrinkB=2, connectionstyle=f"arc3,rad={rad}"))
    if label:
        x = p[0] + at * (q[0] - p[0]) + offset[0]
        y = p[1] + at * (q[1] - p[1]) + offset[1]
        _text(ax, x, y, label, size, color, **label_kw)


def _grid(ax, x0, y0, values, cell, colors=TEXT, col_labels=(), row_labels=(), size=7.0, blocked="\u2212\u221e",
          rotate=True, row_colors=None):
    """An R x C matrix of cells, top-left corner at (x0, y0): ``values`` in [0, 1] shade the cells (white to
    the edge colour of ``colors``), NaN cells are blocked (dark, marked ``blocked``). ``cell``: a side or
    (width, height). Column labels go above (rotated unless ``rotate=False``), row labels to the left (in
    ``row_colors`` if given). Returns the grid's (left, bottom, right, top)."""
    values = np.asarray(values, dtype=float)
    rows, cols = values.shape
    cw, ch = (cell, cell) if np.isscalar(cell) else cell
    edge = np.array([int(colors[0][i:i + 2], 16) / 255 for i in (1, 3, 5)])
    for r in range(rows):
        for c in range(cols):
            v = values[r, c]
            x, y = x0 + c * cw, y0 - (r + 1) * ch
            face = "#2d3748" if np.isnan(v) else tuple(1 - (1 - edge) * (0.08 + 0.92 * v))
            ax.add_patch(Rectangle((x, y), cw, ch, facecolor=face, edgecolor="white", linewidth=0.6))
            if np.isnan(v) and blocked:
                _text(ax, x + cw / 2, y + ch / 2, blocked, size - 0.5, "white")
    for c, label in enumerate(col_labels):
        _text(ax, x0 + (c + 0.5) * cw, y0 + 0.05, label, size, colors[0], rotation=90 if rotate else 0,
              va="bottom", linespacing=1.15)
    for r, label in enumerate(row_labels):
        _text(ax, x0 - 0.06, y0 - (r + 0.5) * ch, label, size, row_colors[r] if row_colors else GREY, ha="right")
    return x0, y0 - rows * ch, x0 + cols * cw, y0


def _caption(ax, y, *lines, color=INK, size=7.5):
    """A panel's explanation, one string per line, centred under the panel's drawing at height y."""
    return _text(ax, sum(ax.get_xlim()) / 2, y, "\n".join(lines), size, color, linespacing=1.3)


def _regions(ax, x, y, w, h, labels=("woman", "man"), background="background", size=7.5):
    """The two-region layout: a canvas (image green) with the first concept's region on the left and the
    second's on the right, background around them. Returns the two regions' ``_Box``es."""
    _box(ax, x, y, w, h, colors=IMAGE)
    inset = 0.12 * w if background else 0.02 * w
    rw, rh = (w - 3 * inset) / 2, h - 2 * inset
    out = []
    for i, (colors, label) in enumerate(zip((CONCEPT1, CONCEPT2), labels)):
        cx = x - w / 2 + inset + rw / 2 + i * (rw + inset)
        out.append(_box(ax, cx, y, rw, rh, colors=colors, lw=1.0))
        _text(ax, cx, y + rh / 2 - 0.15, label, size, colors[0], weight="bold",
              bbox=dict(facecolor=colors[1], edgecolor="none", pad=0.8))
    if background:
        _text(ax, x, y - h / 2 + inset / 2, background, size - 1, IMAGE[0])
    return out


def _figure(titles, width=12.0, height=4.0, legend=(), widths=None):
    """A white figure of ``len(titles)`` panels side by side, each an axes whose data units are inches
    (x from 0 to the panel's width, y from 0 to its height); a legend row of (label, colors, dashed) at the
    bottom. Returns (figure, axes).

    Made by pyplot (which, in Jupyter, turns on the inline display of figures) and at once closed there, so a
    cell that returns it shows it once and nothing is left open; it keeps an Agg canvas to draw on."""
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(width, height), facecolor="white")
    plt.close(fig)
    FigureCanvasAgg(fig)
    widths = widths or [width / len(titles)] * len(titles)
    bottom = 0.32 if legend else 0.05
    axes, x = [], 0.0
    for title, pw in zip(titles, widths):
        ax = fig.add_axes((x / width, bottom / height, pw / width, (height - bottom) / height))
        ax.set_xlim(0, pw)
        ax.set_ylim(0, height - bottom)
        ax.set_axis_off()
        if title:
            _text(ax, pw / 2, height - bottom - 0.16, title, 10.5, INK, weight="bold")
        if x > 0:
            ax.plot([0.02, 0.02], [0.1, height - bottom - 0.1], color="#cbd5e0", linewidth=0.8)
        axes.append(ax)
        x += pw
    if legend:
        handles = [Patch(facecolor=c[1], edgecolor=c[0], linestyle="--" if d else "-", label=lab)
                   for lab, c, d in legend]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False,
                   bbox_to_anchor=(0.5, 0.0), handlelength=1.6, columnspacing=1.6, prop={"family": FONT, "size": 8})
    return fig, axes


# --------------------------------------------------------------------------- 01: the pipeline

def sd_pipeline() -> Figure:
    """Notebook 01: Stable Diffusion from prompt to image, with the embedded model's shapes."""
    legend = [("text: prompt, tokens, context", TEXT, False), ("image: noise, latents, pixels", IMAGE, False),
              ("model part / operation (frozen when sampling)", FROZEN, False)]
    fig, (ax,) = _figure([""], legend=legend)
    top, low, x = 3.05, 1.25, "\u00d7"
    latents = f"{LATENT_SIDE}{x}{LATENT_SIDE}{x}{LATENT_CHANNELS}"
    prompt = _box(ax, 0.975, top, 1.65, 0.85, "prompt", '"a cat on the left"\nand "" (for guidance)', TEXT)
    tok = _box(ax, 3.05, top, 1.85, 0.85, "tokenizer", f"words \u2192 token ids\npadded to T = {TOKENS}", FROZEN)
    enc = _box(ax, 5.55, top, 2.4, 0.85, "CLIP text encoder",
               f"context c: (T, d) = ({TOKENS}, {WIDTH})\none vector per token\n"
               '"" gives $c_\\varnothing$', FROZEN)
    _arrow(ax, prompt.right, tok.left)
    _arrow(ax, tok.right, enc.left, "ids", offset=(0, 0.13))
    # the denoising loop
    ax.add_patch(FancyBboxPatch((2.2, 0.05), 6.85, 2.1, boxstyle="round,pad=0,rounding_size=0.1",
                                facecolor="#f7fafc", edgecolor=GREY, linewidth=1.0, linestyle="--"))
    _text(ax, 2.32, 2.0, "denoising loop", 8.5, GREY, ha="left", style="italic", weight="bold")
    _text(ax, 5.6, 0.2, "repeat for t = T, ..., 1 (e.g. 50 DDIM steps): $z_{t-1}$ becomes the next $z_t$",
          8, GREY, style="italic")
    noise = _box(ax, 0.975, low, 1.65, 0.9, "initial noise $z_T$", f"{latents} latents\nrandom Gaussian", IMAGE)
    unet = _box(ax, 3.4, low, 2.1, 1.2, "UNet", "predicts the noise in $z_t$;\ncross-attention reads c\n"
                "two passes per step:\nc \u2192 $\\epsilon_c$ and $c_\\varnothing$ \u2192 $\\epsilon_u$", FROZEN)
    cfg = _box(ax, 6.025, low, 1.85, 1.2, "classifier-free\nguidance",
               "$\\epsilon = \\epsilon_u + w\\,(\\epsilon_c - \\epsilon_u)$\nw: guidance scale", FROZEN)
    sched = _box(ax, 8.2, low, 1.3, 1.2, "scheduler", "DDIM step\n$z_t \\rightarrow z_{t-1}$", FROZEN)
    _arrow(ax, noise.right, unet.left, "$z_T$", offset=(0, 0.17), size=9)
    _arrow(ax, enc.bottom, (unet.x + 0.5, unet.y + unet.h / 2), "context c, $c_\\varnothing$", TEXT[0],
           offset=(0.75, 0.08), size=8.5)
    _arrow(ax, unet.right, cfg.left, "$\\epsilon_c, \\epsilon_u$", offset=(0, 0.17), size=9)
    _arrow(ax, cfg.right, sched.left, "$\\epsilon$", offset=(0, 0.15), size=9)
    _arrow(ax, sched.bottom, unet.bottom, rad=-0.08)
    # after the loop
    z0 = _box(ax, 9.8, low, 0.95, 0.9, "$z_0$", f"{latents}\nlatents", IMAGE)
    vae = _box(ax, 11.2, low, 1.4, 0.9, "VAE decoder", "latents \u2192 pixels\n4\u00d7 upsampling", FROZEN)
    image = _box(ax, 11.2, top, 1.4, 0.85, "image", f"{IMAGE_SIDE}{x}{IMAGE_SIDE}{x}3 pixels", IMAGE)
    _arrow(ax, sched.right, z0.left)
    _arrow(ax, z0.right, vae.left)
    _arrow(ax, vae.top, image.bottom)
    _text(ax, 8.6, top, f"shapes above: the course's tiny model\nSD 1.5: 512{x}512{x}3 image, 64{x}64{x}4 latents,\n"
          "77 tokens, d = 768", 7.5, GREY, style="italic", linespacing=1.3)
    return fig


def _attention_probs(tokens, side=4):
    """A made-up but typical P (side*side pixels x tokens): a cat in the left half of the image."""
    base = {"<start>": 0.6, "a": 0.1, "cat": 0.2, "on": 0.0, "the": 0.0, "left": 0.4, "<end>": 0.9, "<pad>": 1.6}
    logits = np.array([[base[t] + (2.6 if t == "cat" and p % side < side // 2 else 0.0) for t in tokens]
                       for p in range(side * side)])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs


def cross_attention() -> Figure:
    """Notebook 01: cross-attention, pixels reading tokens; one token's column of P is that word's map."""
    legend = [("text: tokens, K, V", TEXT, False), ("image: pixels, Q, attention maps", IMAGE, False),
              ("operation", FROZEN, False)]
    fig, (ax,) = _figure([""], legend=legend)
    tokens, side = ["<start>", "a", "cat", "on", "the", "left", "<end>", "<pad>"], 4
    probs = _attention_probs(tokens, side)
    # pixels -> Q, tokens -> K, V
    cell, x0, y0 = 0.24, 0.3, 3.3
    _grid(ax, x0, y0, np.full((side, side), 0.25), cell, IMAGE)
    for p in range(side * side):
        _text(ax, x0 + (p % side + 0.5) * cell, y0 - (p // side + 0.5) * cell, str(p + 1), 6.5, IMAGE[0])
    _text(ax, x0 + side * cell / 2, 2.1, f"pixels x: h \u00d7 w = {side} \u00d7 {side} here,\nN = {side * side} rows "
          "(the tiny UNet:\n16\u00d716, 8\u00d78 and 4\u00d74)", 7.5, IMAGE[0], linespacing=1.25)
    ctx = _box(ax, 0.8, 0.85, 1.45, 0.95, "text context c", "(T, d): one vector\nper token, from the\ntext encoder",
               TEXT)
    q = _box(ax, 2.55, 2.85, 1.3, 0.75, "Q = x $W_q$", "(N, d)\none row per pixel", IMAGE)
    kv = _box(ax, 2.55, 0.85, 1.3, 0.95, "K = c $W_k$\nV = c $W_v$", "(T, d)\none row per token", TEXT)
    _arrow(ax, (x0 + side * cell + 0.03, q.y), q.left)
    _arrow(ax, ctx.right, kv.left)
    # scores and softmax
    scores = _box(ax, 4.55, 2.6, 1.85, 0.85, "scores", "$S = QK^\\top / \\sqrt{d}$\n(N, T): pixel \u00d7 token")
    soft = _box(ax, 4.55, 1.2, 1.85, 1.05, "softmax over\nthe token axis", "P = softmax(S)\neach row sums to 1")
    _arrow(ax, q.right, (scores.x - scores.w / 2, scores.y + 0.15))
    _arrow(ax, kv.right, (scores.x - scores.w / 2, scores.y - 0.25), "K", offset=(0.08, -0.22))
    _arrow(ax, scores.bottom, soft.top)
    # P, the N x T matrix
    pc, gx, gy = 0.165, 6.45, 3.02
    left, bottom, right, _ = _grid(ax, gx, gy, probs / probs.max(), pc, TEXT, col_labels=tokens,
                                   row_labels=[str(i + 1) for i in range(side * side)], size=7)
    _text(ax, right + 0.08, gy + 0.05, f"... <pad>\n(T = {TOKENS})", 7, TEXT[0], ha="left", va="bottom")
    _text(ax, left - 0.06, gy + 0.05, "pixel", 7, GREY, ha="right", va="bottom")
    _arrow(ax, soft.right, (left - 0.22, soft.y))
    c = tokens.index("cat")
    ax.add_patch(Rectangle((gx + c * pc, bottom), pc, gy - bottom, fill=False, edgecolor=INK, linewidth=1.6))
    _text(ax, gx + c * pc - 0.06, bottom - 0.14, "P: N \u00d7 T", 8, INK, ha="right", weight="bold")
    # the column "cat" reshaped: its attention map
    mc, mx, my = 0.27, 9.1, 1.5
    _grid(ax, mx, my, probs[:, c].reshape(side, side) / probs[:, c].max(), mc, IMAGE)
    _arrow(ax, (gx + (c + 0.5) * pc, bottom - 0.02), (mx - 0.05, my - side * mc / 2), rad=0.35)
    _text(ax, 8.45, 1.55, 'column "cat",\nreshaped\nto h \u00d7 w', 7.5, GREY, linespacing=1.25)
    _text(ax, mx + side * mc + 0.12, my - side * mc / 2, 'the attention\nmap of "cat":\nwhere the word\nis read '
          '(the\ncat is on the left)', 7.5, IMAGE[0], ha="left", linespacing=1.25)
    out = _box(ax, 10.0, 2.75, 2.6, 0.95, "output O = P V", "(N, d): each pixel gets the tokens'\n"
               "values, weighted by its row of P")
    _arrow(ax, (right + 0.05, out.y), out.left, "\u00d7 V", offset=(0, 0.13), size=8)
    return fig


# --------------------------------------------------------------------------- 02-05: what each method trains

#: what each method trains, by part: "row" (one new embedding row), "embed" (the embedding table), "layers"
#: (text encoder layers), "hyper" (hypernetwork MLPs), "kv" (cross-attention W_k, W_v), "unet" (every UNet
#: weight), "lora" (A and B); "optional" parts train only when asked (DreamBooth's text_encoder=True).
_METHODS = [
    dict(name="Textual Inversion", prompt='"a <koala> on the left"', trains={"row"}, has=set(),
         caption='trains one new row of E: the word\n"<koala>" (d = 128 numbers);\neverything else is frozen'),
    dict(name="HyperNetwork", prompt='"a bear on the left"', trains={"hyper"}, has={"hyper"},
         caption="trains two small residual MLPs that\nrewrite the context c every cross-\n"
                 "attention layer's K and V read"),
    dict(name="DreamBooth", prompt='"a bbm bear on the left"', trains={"unet", "kv"},
         optional={"embed", "layers"}, has=set(),
         caption='trains the whole UNet (the text\nencoder too if asked); prior images\nof "a bear" keep the class'),
    dict(name="LoRA", prompt='"a bbm bear on the left"', trains={"lora"}, has={"lora"},
         caption="trains low-rank B A beside every\nattention and feed-forward layer;\n"
                 "W frozen: h = W x + (\u03b1/r) B A x"),
]


def _part(spec, part):
    """The colours and dash of one part in one method's panel."""
    if part in spec["trains"]:
        return TRAIN, False
    if part in spec.get("optional", ()):
        return TRAIN, True
    if part in ("hyper", "lora") and part not in spec["has"]:
        return UNUSED, True
    return FROZEN, False


def _method_panel(ax, spec):
    """One method's panel: prompt, text encoder (embedding table, layers), hypernetwork, UNet (K/V, the rest,
    LoRA's B A), with what trains in red, and a caption."""
    _text(ax, 1.5, 3.22, "prompt: " + spec["prompt"], 7.5, TEXT[0])
    colors, dashed = _part(spec, "layers")
    enc = _box(ax, 1.5, 2.5, 2.75, 1.05, "text encoder", colors=colors, dashed=dashed, title_y=2.9, lw=1.0)
    colors, dashed = _part(spec, "embed")
    _box(ax, 0.87, 2.36, 1.3, 0.7, "embeddings E", colors=colors, dashed=dashed, size=7.5, title_y=2.61)
    rows = ["a", "bear", "...", "<koala>"] if "row" in spec["trains"] else ["a", "bear", "man", "..."]
    for i, word in enumerate(rows):
        y = 2.47 - i * 0.12
        row_colors = TRAIN if word == "<koala>" else TEXT
        _text(ax, 0.8, y, word, 6.5, row_colors[0], ha="right", weight="bold" if word == "<koala>" else "normal")
        ax.add_patch(Rectangle((0.84, y - 0.045), 0.6, 0.09, facecolor=row_colors[1], edgecolor=row_colors[0],
                               linewidth=0.6))
    colors, dashed = _part(spec, "layers")
    _box(ax, 2.18, 2.36, 1.15, 0.7, "layers", "3 \u00d7 (attention,\nMLP)", colors, dashed=dashed, size=7.5)
    colors, dashed = _part(spec, "hyper")
    hyper = _box(ax, 1.5, 1.68, 2.75, 0.3, "hypernetwork" if not dashed else "",
                 "c \u2192 c + mlp(c), for K and for V" if not dashed else "(no hypernetwork)", colors,
                 dashed=dashed, size=7.5)
    _arrow(ax, enc.bottom, hyper.top, "c", offset=(0.12, 0.0), size=7.5)
    colors = _part(spec, "unet")[0]
    unet = _box(ax, 1.5, 0.98, 2.75, 0.86, "UNet", colors=colors, title_y=1.29, lw=1.0)
    _arrow(ax, hyper.bottom, unet.top)
    for x, title, detail, part in ((0.725, "cross-attn", "$W_k$, $W_v$ read c", "kv"),
                                   (2.075, "other layers", "conv, self-attn, FF", "unet")):
        _box(ax, x, 0.88, 1.05, 0.5, title, detail, _part(spec, part)[0], size=7.5)
        colors, dashed = _part(spec, "lora")
        _box(ax, x + 0.665, 0.88, 0.2, 0.5, "", "B\nA", colors, dashed=dashed, size=7.5, lw=1.0)
    _caption(ax, 0.27, spec["caption"], color=TRAIN[0])


def what_trains() -> Figure:
    """Notebooks 02-05: the same pipeline parts in four panels, what each method trains in red."""
    legend = [("trains", TRAIN, False), ("trains if asked", TRAIN, True), ("frozen", FROZEN, False),
              ("not in this method", UNUSED, True), ("text: prompt, tokens", TEXT, False)]
    fig, axes = _figure([m["name"] for m in _METHODS], legend=legend)
    for ax, spec in zip(axes, _METHODS):
        _method_panel(ax, spec)
    return fig


# --------------------------------------------------------------------------- 06: why two concepts mix

#: the two-concept prompt, one chip per token (a few words grouped), and whom each chip carries
_CHIPS = [("<start>", ()), ("a", ()), ("cpd", (1,)), ("woman", (1,)), ("on the left and a", (1,)),
          ("tkb", (1, 2)), ("man", (1, 2)), ("on the right", (1, 2)), ("<end>", (1, 2)), ("<pad> ...", (1, 2))]


def _chip(ax, x, y, w, h, word, carries, size=7.0):
    """A token chip: blue, with a stripe per concept the causal text encoder has written into it."""
    edge = CONCEPT1[0] if word in ("cpd", "woman") else CONCEPT2[0] if word in ("tkb", "man") else TEXT[0]
    _box(ax, x, y, w, h, colors=(edge, TEXT[1]), lw=1.4 if edge != TEXT[0] else 0.8)
    for i, concept in enumerate(carries):
        colors = CONCEPT1 if concept == 1 else CONCEPT2
        ax.add_patch(Rectangle((x + w / 2 - 0.09 * (i + 1), y - h / 2 + 0.03), 0.07, h - 0.06,
                               facecolor=colors[0], edgecolor="none"))
    _text(ax, x - 0.05, y, word, size, edge, weight="bold" if edge != TEXT[0] else "normal")


def _mix_cross(ax):
    """(a) every pixel reads every token, and the causal encoder writes the woman into later tokens."""
    ys = {word: 3.08 - i * 0.235 for i, (word, _) in enumerate(_CHIPS)}
    for word, carries in _CHIPS:
        _chip(ax, 0.75, ys[word], 1.15, 0.19, word, carries)
    _text(ax, 0.18, 3.32, "prompt tokens (a stripe: the token carries that concept)", 7.5, TEXT[0], ha="left")
    man = _regions(ax, 3.35, 2.05, 1.75, 1.5)[1]
    px = (man.x, man.y - 0.3)
    ax.plot(*px, "o", color=CONCEPT2[0], markersize=6, markeredgecolor="white")
    for word in ("cpd", "woman", "<end>"):
        _arrow(ax, px, (1.34, ys[word]), color=CONCEPT1[0], lw=1.1)
    _text(ax, 3.35, 0.98, "a pixel of the man reads\n\"cpd\", \"woman\" and <end>", 7.5, CONCEPT1[0])
    _caption(ax, 0.37, "every pixel reads every token (softmax over all T);",
             "the causal text encoder writes the woman into every",
             'later token: "tkb man", <end> and <pad> carry both')


def _mix_self(ax):
    """(b) self-attention is global: the woman's pixels read the man's."""
    woman, man = _regions(ax, 1.9, 2.1, 2.9, 1.9)
    px = (woman.x, woman.y + 0.2)
    ax.plot(*px, "o", color=CONCEPT1[0], markersize=6, markeredgecolor="white")
    for dx, dy in ((-0.25, -0.35), (0.0, -0.45), (0.3, 0.35), (0.25, -0.2)):
        _arrow(ax, px, (man.x + dx, man.y + dy), color=CONCEPT2[0], lw=1.1, rad=0.15)
    _caption(ax, 0.55, "self-attention is global: each pixel reads all N",
             "pixels, so the woman's pixels read the man's", "(and his hers): hair, skin and clothes leak")


def _mix_lora(ax):
    """(c) two LoRAs both act on every layer, at every pixel."""
    canvas = _box(ax, 0.95, 2.1, 1.45, 1.45, colors=IMAGE)
    _regions(ax, canvas.x, canvas.y, canvas.w, canvas.h, background="")
    for colors, hatch in ((CONCEPT1, "///"), (CONCEPT2, "\\\\\\")):
        ax.add_patch(Rectangle((canvas.x - canvas.w / 2 + 0.05, canvas.y - canvas.h / 2 + 0.05), canvas.w - 0.1,
                               canvas.h - 0.1, fill=False, hatch=hatch, edgecolor=colors[0], linewidth=0))
    _text(ax, canvas.x, canvas.y - 0.25, "both LoRAs\non every pixel", 7.5, INK, weight="bold",
          bbox=dict(facecolor="white", edgecolor="none", pad=1.5))
    for i, name in enumerate(("down block", "mid block", "up block")):
        y = 2.6 - i * 0.5
        _box(ax, 2.5, y, 0.95, 0.36, name, size=7.5)
        _box(ax, 3.27, y + 0.09, 0.5, 0.17, "", "woman", CONCEPT1, size=7.5, lw=1.0)
        _box(ax, 3.27, y - 0.09, 0.5, 0.17, "", "man", CONCEPT2, size=7.5, lw=1.0)
    _text(ax, 3.27, 2.95, "LoRAs", 7.5, GREY, weight="bold")
    _arrow(ax, (2.0, 2.1), (canvas.x + canvas.w / 2 + 0.02, 2.1))
    _caption(ax, 0.55, "both LoRAs change every layer for every pixel:",
             "h = W x + $\\Delta W_1$ x + $\\Delta W_2$ x, so the woman's", "LoRA draws on the man, and his on her")


def why_mixing() -> Figure:
    """Notebook 06: the three paths by which "a cpd woman on the left and a tkb man on the right" mixes."""
    legend = [('concept 1: "cpd woman" (left)', CONCEPT1, False), ('concept 2: "tkb man" (right)', CONCEPT2, False),
              ("text: tokens", TEXT, False), ("image: the canvas", IMAGE, False)]
    fig, axes = _figure(["(a) cross-attention", "(b) self-attention", "(c) two LoRAs"], legend=legend,
                        widths=[4.4, 3.8, 3.8])
    for ax, draw in zip(axes, (_mix_cross, _mix_self, _mix_lora)):
        draw(ax)
    return fig


# --------------------------------------------------------------------------- 07: the fixes

_WHO = ["woman px", "man px", "background"]
_WHO_COLORS = [CONCEPT1[0], CONCEPT2[0], IMAGE[0]]


def _fix_tokens(ax):
    """(a) token masks: a concept's tokens are read only by its region's pixels."""
    _regions(ax, 1.5, 2.85, 1.7, 0.85)
    blocked = np.nan
    values = [[0.3, 0.9, blocked, 0.3, 0.5], [0.3, blocked, 0.9, 0.3, 0.5], [0.3, blocked, blocked, 0.4, 0.6]]
    _grid(ax, 0.95, 1.95, values, (0.4, 0.3), TEXT, ["<start>", "cpd\nwoman", "tkb\nman", "other\nwords",
          "<end>\n<pad>"], _WHO, size=6.5, rotate=False, row_colors=_WHO_COLORS)
    _caption(ax, 0.45, "softmax($QK^\\top/\\sqrt{d}$ + B), B = \u2212\u221e where a",
             "pixel may not read: a region's tokens", "are read only by that region's pixels")


def _fix_regional(ax):
    """(b) regional prompts: each region reads its own prompt's encoding."""
    woman, man = _regions(ax, 1.5, 2.85, 1.7, 0.85)
    segments = [("global", '"... woman and\n... man ..."', TEXT), ("woman", '"a cpd woman\non the left"', CONCEPT1),
                ("man", '"a tkb man\non the right"', CONCEPT2)]
    for i, (name, prompt, colors) in enumerate(segments):
        seg = _box(ax, 0.62 + i * 0.88, 1.82, 0.84, 0.34, f"$c_{{{name}}}$", colors=colors, size=8)
        _text(ax, seg.x, 1.4, prompt, 6.5, colors[0], linespacing=1.2)
        source = {"woman": (woman.x - 0.1, woman.y - woman.h / 2), "man": man.bottom}.get(name, (0.75, 2.45))
        _arrow(ax, (seg.x, seg.y + seg.h / 2), source, color=colors[0], lw=1.1)
    _text(ax, 1.5, 1.02, "context [global | woman | man]: (3T, d)", 7.5, GREY)
    _caption(ax, 0.45, "each sub-prompt is encoded alone (its own", "<start>, <end>, <pad>); a region's pixels read",
             "only its part, the background the global one")


def _fix_self(ax):
    """(c) self-attention masks: a region's pixels read only their region and the background."""
    _regions(ax, 1.5, 2.85, 1.7, 0.85)
    values = [[0.8, np.nan, 0.4], [np.nan, 0.8, 0.4], [0.4, 0.4, 0.6]]
    _grid(ax, 1.05, 1.95, values, (0.55, 0.3), IMAGE, ["woman\npx", "man\npx", "back-\nground"],
          _WHO, size=6.5, rotate=False, row_colors=_WHO_COLORS)
    _caption(ax, 0.45, "self-attention (N \u00d7 N): a pixel reads only",
             "pixels of its own region or the background", "(the background reads all, is read by all)")


def _fix_passes(ax):
    """(e) one UNet pass per region, the predictions pasted by region masks: the course's fix."""
    _text(ax, 1.5, 3.22, "the course's working fix", 8, INK, weight="bold", style="italic")
    passes = [("pass 1", "woman's prompt + LoRA", "$\\epsilon_1$", CONCEPT1),
              ("pass 2", "man's prompt + LoRA", "$\\epsilon_2$", CONCEPT2),
              ("global pass", "whole prompt", "$\\epsilon_{global}$", TEXT)]
    canvas = _Box(2.32, 2.18, 1.2, 1.42)
    _regions(ax, canvas.x, canvas.y, canvas.w, canvas.h, labels=("$m_1 \\epsilon_1$", "$m_2 \\epsilon_2$"),
             background="rest: $\\epsilon_{global}$")
    for i, (title, detail, eps, colors) in enumerate(passes):
        box = _box(ax, 0.68, 2.7 - i * 0.52, 1.22, 0.42, f"UNet {title}", detail, colors, size=7.5)
        _arrow(ax, box.right, (canvas.x - canvas.w / 2, box.y), eps, color=colors[0], offset=(0.0, 0.12), size=8.5,
               lw=1.1)
    paste = "$\\epsilon = \\Sigma_r\\, m_r \\epsilon_r + (1 - \\Sigma_r\\, m_r)\\, \\epsilon_{global}$"
    _caption(ax, 0.93, paste, size=9)
    _caption(ax, 0.4, "one UNet pass per region, each with its", "own prompt and only its own LoRA; the noise",
             "predictions pasted by the region masks $m_r$")


def fixes() -> Figure:
    """Notebook 07: the four fixes, each on the left/right layout of the couple."""
    legend = [('concept 1: "cpd woman" (left)', CONCEPT1, False), ('concept 2: "tkb man" (right)', CONCEPT2, False),
              ("text: tokens, prompts", TEXT, False), ("image: canvas, pixels", IMAGE, False)]
    fig, axes = _figure(["(a) token masks", "(b) regional prompts", "(c) self-attention masks",
                         "(e) one UNet pass per region"], legend=legend)
    for ax, draw in zip(axes, (_fix_tokens, _fix_regional, _fix_self, _fix_passes)):
        draw(ax)
    return fig

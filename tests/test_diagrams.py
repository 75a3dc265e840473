"""mcteach.diagrams: every diagram draws, says what it should, and has no cramped, overlapping or cut-off text."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
from matplotlib.figure import Figure
from matplotlib.text import Text

from mcteach import diagrams

DATA = Path(__file__).resolve().parents[1] / "data" / "tiny-sd"

KEY_LABELS = {
    "sd_pipeline": ["prompt", "tokenizer", "text encoder", "UNet", "cross-attention", "scheduler", "DDIM",
                    "classifier-free", "VAE", "initial noise", "image", "64×64×3", "16×16×4", "T = 32",
                    "(32, 128)", "SD 1.5", "77 tokens", "d = 768"],
    "cross_attention": ["Q = x", "K = c", "V = c", "scores", "softmax", "token axis", "sums to 1", "<start>", "cat",
                        "<end>", "<pad>", "reshaped", "to h × w", "attention map", "O = P V"],
    "what_trains": ["Textual Inversion", "HyperNetwork", "DreamBooth", "LoRA", "embeddings E", "<koala>",
                    "layers", "hypernetwork", "UNet", "cross-attn", "B\nA", "a bear", "h = W x + (α/r) B A x",
                    "trains"],
    "why_mixing": ["cross-attention", "self-attention", "two LoRAs", "cpd", "woman", "tkb", "man", "<end>",
                   "<pad>", "causal", "every pixel"],
    "fixes": ["token masks", "regional prompts", "self-attention masks", "one UNet pass per region", "−∞",
              "background", "course's working fix", "epsilon_{global}", "m_r"],
}
DIAGRAMS = sorted(KEY_LABELS)


# --------------------------------------------------------------------------- layout checks

def texts(fig):
    """The figure's visible, non-empty texts (its axes' texts, titles, legends; no tick labels)."""
    ticks = {id(t) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis) for t in axis.findobj(Text)}
    return [t for t in fig.findobj(Text) if id(t) not in ticks and t.get_visible() and t.get_text().strip()]


def extents(fig):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [(t, t.get_window_extent(renderer)) for t in texts(fig)]


def overlapping_texts(fig, tolerance=0.04):
    """Pairs of texts whose boxes overlap by more than ``tolerance`` of the smaller one's area (and 4 px²)."""
    boxes, pairs = extents(fig), []
    for i, (ta, a) in enumerate(boxes):
        for tb, b in boxes[i + 1:]:
            w = min(a.x1, b.x1) - max(a.x0, b.x0)
            h = min(a.y1, b.y1) - max(a.y0, b.y0)
            if w > 0 and h > 0 and w * h > max(4.0, tolerance * min(a.width * a.height, b.width * b.height)):
                pairs.append((ta.get_text(), tb.get_text()))
    return pairs


def texts_outside(fig, margin=1.0):
    """Texts cut off by the figure's edge."""
    box = fig.bbox
    return [t.get_text() for t, e in extents(fig)
            if e.x0 < box.x0 - margin or e.y0 < box.y0 - margin or e.x1 > box.x1 + margin or e.y1 > box.y1 + margin]


def texts_overflowing_boxes(fig, margin=1.5):
    """Texts whose centre lies in a drawn box (gid "box") but that stick out of it: a box too small for its text."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [p.get_window_extent(renderer) for ax in fig.axes for p in ax.patches if p.get_gid() == "box"]
    out = []
    for t, e in extents(fig):
        cx, cy = (e.x0 + e.x1) / 2, (e.y0 + e.y1) / 2
        for b in boxes:
            if b.x0 < cx < b.x1 and b.y0 < cy < b.y1 and (
                    e.x0 < b.x0 - margin or e.x1 > b.x1 + margin or e.y0 < b.y0 - margin or e.y1 > b.y1 + margin):
                out.append(t.get_text())
    return out


def all_text(fig):
    return "\n".join(t.get_text() for t in texts(fig))


@pytest.fixture(params=DIAGRAMS)
def drawn(request):
    fig = getattr(diagrams, request.param)()
    yield request.param, fig
    plt.close(fig)


# --------------------------------------------------------------------------- the diagrams

def test_returns_a_readable_figure(drawn):
    name, fig = drawn
    assert isinstance(fig, Figure)
    w, h = fig.get_size_inches()
    assert 10 <= w <= 12.5 and 2.5 <= h <= 4.2, (name, w, h)
    assert fig.get_facecolor()[:3] == (1.0, 1.0, 1.0)
    assert len(texts(fig)) >= 15


def test_key_labels(drawn):
    name, fig = drawn
    text = all_text(fig)
    missing = [label for label in KEY_LABELS[name] if label not in text]
    assert not missing, f"{name} lacks {missing}"


def test_no_overlapping_text(drawn):
    name, fig = drawn
    assert overlapping_texts(fig) == [], name


def test_no_text_cut_off(drawn):
    name, fig = drawn
    assert texts_outside(fig) == [], name


def test_text_fits_its_box(drawn):
    name, fig = drawn
    assert texts_overflowing_boxes(fig) == [], name


def test_text_is_large_enough(drawn):
    name, fig = drawn
    small = [t.get_text() for t in texts(fig) if t.get_fontsize() < 6]
    assert small == [], name


def test_one_colour_per_kind(drawn):
    """Every legend entry of a kind uses that kind's colours: text blue, image green, trains red."""
    name, fig = drawn
    kinds = {"text": diagrams.TEXT, "image": diagrams.IMAGE, "trains": diagrams.TRAIN}
    entries = [(t.get_text(), h) for legend in fig.legends for t, h in zip(legend.get_texts(), legend.legend_handles)]
    assert entries, name
    for label, handle in entries:
        for kind, (edge, fill) in kinds.items():
            if label.startswith(kind):
                assert handle.get_facecolor() == matplotlib.colors.to_rgba(fill), (name, label)
                assert handle.get_edgecolor() == matplotlib.colors.to_rgba(edge), (name, label)


def test_shapes_are_the_embedded_models():
    text_encoder = json.loads((DATA / "text_encoder" / "config.json").read_text())
    unet = json.loads((DATA / "unet" / "config.json").read_text())
    vae = json.loads((DATA / "vae" / "config.json").read_text())
    assert diagrams.TOKENS == text_encoder["max_position_embeddings"]
    assert diagrams.WIDTH == text_encoder["hidden_size"] == unet["cross_attention_dim"]
    assert diagrams.LATENT_SIDE == unet["sample_size"] and diagrams.LATENT_CHANNELS == unet["in_channels"]
    assert diagrams.IMAGE_SIDE == vae["sample_size"]


def test_what_trains_marks_each_methods_part():
    """The part each method trains is red (TRAIN's fill), the others not: Textual Inversion's <koala> row only."""
    fig = diagrams.what_trains()
    red = matplotlib.colors.to_rgba(diagrams.TRAIN[1])
    counts = [sum(1 for p in ax.patches if p.get_facecolor() == red) for ax in fig.axes]
    # TI: one row; HN: the MLP box; DreamBooth: UNet, its two inner boxes, text encoder and its two inner
    # boxes (optional, dashed); LoRA: the two B A chips
    assert counts == [1, 1, 6, 2]
    plt.close(fig)


# --------------------------------------------------------------------------- the checks can fail

def test_overlap_check_reports_a_cramped_figure():
    fig = plt.figure(figsize=(4, 2))
    fig.text(0.5, 0.5, "tokenizer", ha="center")
    fig.text(0.52, 0.5, "text encoder", ha="center")
    fig.text(0.5, 0.1, "apart", ha="center")
    assert overlapping_texts(fig) == [("tokenizer", "text encoder")]
    plt.close(fig)


def test_cut_off_and_overflow_checks_report_bad_figures():
    fig, ax = plt.subplots(figsize=(4, 2))
    ax.set_axis_off()
    ax.set_xlim(0, 4)
    ax.set_ylim(0, 2)
    fig.text(0.99, 0.5, "cut off at the edge")
    diagrams._box(ax, 1.0, 1.0, 0.4, 0.3, "a title far too long for its box")
    assert texts_outside(fig) == ["cut off at the edge"]
    assert texts_overflowing_boxes(fig) == ["a title far too long for its box"]
    plt.close(fig)

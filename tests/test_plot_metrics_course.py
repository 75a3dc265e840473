"""Plot helpers, the evaluation's outcome logic and bootstrap, and the notebook runner's cleaning."""

import matplotlib.pyplot as plt
import nbformat
import numpy as np
import pytest
import torch
from PIL import Image

from mcteach import plot
from mcteach.course import clean
from mcteach.measure import metrics

LABELS = ["cat", "dog", "fox", "nothing"]


def one_hot(label, p=0.9):
    v = torch.full((len(LABELS),), (1 - p) / (len(LABELS) - 1))
    v[LABELS.index(label)] = p
    return v


@pytest.mark.parametrize("left, right, outcome", [
    ("cat", "dog", "success"), ("dog", "cat", "swap"), ("cat", "cat", "duplication"), ("dog", "dog", "duplication"),
    ("cat", "nothing", "neglect"), ("fox", "dog", "neglect"), ("fox", "fox", "other"), ("nothing", "nothing", "other"),
])
def test_pair_outcomes(left, right, outcome):
    got, pred, conf, blend = metrics.pair_outcome(LABELS, one_hot(left), one_hot(right), "cat", "dog")
    assert got == outcome and pred == (left, right)
    assert conf == pytest.approx((0.9, 0.9))


def test_low_confidence_is_not_success_and_blend_index():
    mixed = torch.tensor([0.45, 0.45, 0.05, 0.05])
    got, _, _, blend = metrics.pair_outcome(LABELS, mixed, one_hot("dog"), "cat", "dog")
    assert got != "success"
    assert blend[0] == pytest.approx(0.5) and blend[1] == pytest.approx(0.0333 / (0.9 + 0.0333), abs=1e-3)


def test_bootstrap_interval_contains_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.random(20) < 0.7, rng.random(2000) < 0.7
    m, lo, hi = metrics.bootstrap_ci(small)
    M, LO, HI = metrics.bootstrap_ci(large)
    assert lo <= m <= hi and LO <= M <= HI and (HI - LO) < (hi - lo)
    assert abs(M - 0.7) < 0.03


def test_pair_prompts_are_reproducible_and_distinct():
    from mcteach.world import regions, scenes

    a = metrics.pair_prompts(scenes.BASE_CLASSES, 10, seed=1)
    assert a == metrics.pair_prompts(scenes.BASE_CLASSES, 10, seed=1)
    assert all(x is not y and pos in regions.OPPOSITE_POSITIONS for x, y, pos in a)


@pytest.mark.parametrize("im", [
    Image.new("RGB", (8, 8), (255, 0, 0)), np.full((8, 8, 3), 255, np.uint8), torch.ones(3, 8, 8), torch.ones(1, 3, 8, 8),
])
def test_to_array_accepts_everything(im):
    a = plot.to_array(im)
    assert a.shape == (8, 8, 3) and a.min() >= 0 and a.max() == pytest.approx(1.0)


def test_to_array_value_range_for_vae_outputs():
    assert plot.to_array(torch.zeros(3, 4, 4), value_range=(-1, 1)).max() == pytest.approx(0.5)


def test_plot_helpers_return_their_axes_and_figures():
    fig, ax = plt.subplots()
    assert plot.show_image(Image.new("RGB", (8, 8)), ax=ax, title="t") is ax and ax.get_title() == "t"
    assert plot.show_attention(Image.new("RGB", (64, 64)), torch.rand(16, 16), ax=ax) is ax
    f = plot.show_token_maps(Image.new("RGB", (64, 64)), torch.rand(3, 16, 16), ["a", "cat", "<end>"])
    assert len(f.axes) == 4 and [a.get_title() for a in f.axes[1:]] == ["a", "cat", "<end>"]
    g = plot.show_images([np.zeros((4, 4))] * 5, titles=list("abcde"), ncols=3)
    assert len(g.axes) == 6
    plt.close("all")


def test_clean_strips_noisy_metadata():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1")])
    nb.cells[0].metadata["execution"] = {"iopub.execute_input": "2026-01-01"}
    nb.metadata["widgets"] = {"state": {}}
    clean(nb)
    assert "execution" not in nb.cells[0].metadata and "widgets" not in nb.metadata
    assert nb.metadata["kernelspec"]["name"] == "python3"


def test_show_losses_draws_the_steps_and_their_running_mean():
    losses = list(np.linspace(1.0, 0.1, 100))
    ax = plot.show_losses(losses, smooth=10, title="loss")
    raw, mean = ax.get_lines()
    assert len(raw.get_xdata()) == 100 and len(mean.get_xdata()) == 91
    assert mean.get_ydata()[0] == pytest.approx(np.mean(losses[:10]))
    assert len(plot.show_losses(losses[:5], smooth=10).get_lines()) == 1  # too short to smooth
    plt.close("all")


def test_explore_draws_the_static_figure_then_redraws_on_every_change():
    widgets = pytest.importorskip("ipywidgets")
    calls = []

    def draw(w, label):
        calls.append((w, label))
        plt.figure()

    slider = widgets.FloatSlider(value=5.0, min=1.0, max=9.0)
    box = plot.explore(draw, w=slider, label="fixed")
    assert calls == [(5.0, "fixed")]  # the static figure, drawn once with the defaults
    slider.value = 7.0
    assert calls[-1] == (7.0, "fixed") and len(calls) == 2
    assert slider in box.children
    plt.close("all")


def test_clean_keeps_a_finished_progress_bar_not_its_first_frame():
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("train()")
    view = {"model_id": "box", "version_major": 2, "version_minor": 0}
    cell.outputs = [nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": view, "text/plain": "lora:   0%|          | 0/500 [00:00<?, ?it/s]"})]
    nb.cells = [cell]
    state = {
        "box": {"model_name": "HBoxModel", "state": {"children": ["IPY_MODEL_l", "IPY_MODEL_b", "IPY_MODEL_r"]}},
        "l": {"model_name": "HTMLModel", "state": {"value": "lora: 100%"}},
        "b": {"model_name": "FloatProgressModel", "state": {"value": 500, "max": 500}},
        "r": {"model_name": "HTMLModel", "state": {"value": " 500/500 [00:27&lt;00:00, 18.3it/s]"}},
    }
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": state}}
    clean(nb)
    assert nb.cells[0].outputs[0]["data"]["text/plain"] == "lora: 100%|██████████| 500/500 [00:27<00:00, 18.3it/s]"
    assert "widgets" not in nb.metadata


def test_clean_drops_a_live_widget_but_keeps_the_static_figure_beside_it():
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("explore(draw, w=slider)")
    figure = nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"})
    widget = nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": {"model_id": "vbox", "version_major": 2, "version_minor": 0},
        "text/plain": "VBox(children=(FloatSlider(value=5.0),))"})
    cell.outputs = [figure, widget]
    nb.cells = [cell]
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {
        "vbox": {"model_name": "VBoxModel", "state": {"children": ["IPY_MODEL_s"]}},
        "s": {"model_name": "FloatSliderModel", "state": {"value": 5.0}}}}}
    clean(nb)
    assert nb.cells[0].outputs == [figure]


def test_outcome_titles_keep_a_concept_apart_from_its_base_class(monkeypatch):
    from mcteach.measure.metrics import PairResult

    seen = {}
    monkeypatch.setattr(plot, "show_images", lambda images, titles, **kw: seen.setdefault("titles", titles))
    r = PairResult("", ("a", "b"), ("left", "right"), 0, ("woman with red hair and medium skin", "woman"),
                   (0.9, 0.9), (0.0, 0.0), "other")
    plot.show_outcomes([None], [r])
    assert seen["titles"] == ["? other\nwoman with red ha…\nwoman"]
    assert plot.short_label("man") == "man" and len(plot.short_label("x" * 40)) == 18

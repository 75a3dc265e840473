"""Automatic layout (mixing.layout): candidates, their attention scores, the balanced argmax, auto_generate."""

import numpy as np
import pytest
import torch

from mcteach.cli import main as cli_main
from mcteach.cli import prompt_concepts
from mcteach.mixing import layout
from mcteach.mixing.generate import regional_generate
from mcteach.mixing.layout import AutoLayout, assign_regions, auto_generate, candidates, layout_scores
from mcteach.mixing.masking import Region
from mcteach.mixing.passes import INFERENCE_FIX, sub_prompt


def blob(s: int, x: int, y: int, r: float = 2.0) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    return torch.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * r * r))


def test_candidates_are_every_assignment_of_the_concepts_to_a_templates_places():
    assert candidates(2) == [("left", "right"), ("right", "left")]
    assert len(candidates(3)) == 6 and all(sorted(c) == sorted(layout.TEMPLATES[3]) for c in candidates(3))
    assert len(candidates(2, [("left", "right"), ("top", "bottom")])) == 4
    with pytest.raises(ValueError, match="templates for 2, 3, 4 concepts"):
        candidates(5)
    with pytest.raises(ValueError, match="has 2 places for 3 concepts"):
        candidates(3, [("left", "right")])
    with pytest.raises(ValueError, match="unknown places"):
        AutoLayout(templates=[("left", "middle")])
    with pytest.raises(ValueError, match="choose must be one of"):
        AutoLayout(choose="kmeans")


def test_the_layout_where_each_concept_attends_inside_its_place_scores_highest():
    s = 16
    maps = torch.stack([torch.stack([blob(s, 12, 8), blob(s, 3, 8)]),   # concept 0 right, concept 1 left
                        torch.stack([blob(s, 3, 8), blob(s, 12, 8)])])  # and the other way round
    cands = candidates(2)
    scores = layout_scores(maps, cands)
    assert scores.shape == (2, 2)
    assert [cands[int(i)] for i in scores.argmax(1)] == [("right", "left"), ("left", "right")]
    assert scores.max() > 0.95 and scores.min() < 0.05  # shares of each concept's attention, in [0, 1]
    flat = torch.ones(1, 2, s, s)  # attention spread evenly: every layout scores one half
    assert torch.allclose(layout_scores(flat, cands), torch.full((1, 2), 0.5))


def test_three_concepts_get_the_thirds_their_attention_falls_in():
    s = 18
    maps = torch.stack([blob(s, 9, 9), blob(s, 15, 9), blob(s, 2, 9)])[None]
    cands = candidates(3)
    assert cands[int(layout_scores(maps, cands).argmax())] == ("middle-third", "right-third", "left-third")


def test_the_balanced_argmax_gives_every_concept_a_region_of_its_own():
    s = 16
    strong, weak = blob(s, 8, 8, 5.0), 0.2 * blob(s, 8, 8, 5.0) + 0.01  # one map everywhere above the other
    regions = assign_regions(torch.stack([strong, weak]), threshold=0.3, min_share=0.1)
    assert regions.shape == (2, s, s) and regions.dtype == torch.bool
    assert not (regions[0] & regions[1]).any()
    assert regions[1].sum() >= round(0.1 * s * s)  # the weak concept still gets its share
    plain = torch.stack([strong, weak]).argmax(0)
    assert (plain == 1).sum() == 0  # a plain argmax would leave it empty


def test_auto_generate_draws_the_chosen_layout_from_the_same_noise(random_pipe, monkeypatch):
    seeds = [0, 1, 2]
    chosen = [("right", "left"), ("left", "right"), ("right", "left")]

    def fake_scores(maps, cands):
        assert maps.shape[:2] == (3, 2)
        return torch.tensor([[0.0 if c != chosen[b] else 1.0 for c in cands] for b in range(3)])

    monkeypatch.setattr(layout, "layout_scores", fake_scores)
    phrases = ["cat", "red apple"]
    result = auto_generate(random_pipe, "a cat and a red apple", phrases, seed=seeds, steps=2)
    assert result.layouts == chosen and len(result.images) == 3
    for b, s in enumerate(seeds):  # each image is the fix drawn with its layout, seed for seed
        regions = [Region(w, sub_prompt(p, w, INFERENCE_FIX), phrase=p) for w, p in zip(chosen[b], phrases)]
        want = regional_generate(random_pipe, "a cat and a red apple", regions, fix=INFERENCE_FIX, seed=[s], steps=2)[0]
        diff = np.abs(np.asarray(result.images[b], dtype=int) - np.asarray(want, dtype=int)).max()
        assert diff <= 2, (b, diff)  # seeds that share a layout are drawn in one batch: float rounding only
        other = [Region(w, sub_prompt(p, w, INFERENCE_FIX), phrase=p) for w, p in zip(chosen[b][::-1], phrases)]
        swapped = regional_generate(random_pipe, "a cat and a red apple", other, fix=INFERENCE_FIX, seed=[s], steps=2)[0]
        assert np.abs(np.asarray(result.images[b], dtype=int) - np.asarray(swapped, dtype=int)).max() > 2


def test_auto_generate_with_the_argmax_returns_disjoint_masks(random_pipe):
    result = auto_generate(random_pipe, "a cat and a red apple", ["cat", "red apple"], seed=[0], steps=2,
                           layout=AutoLayout(choose="argmax"))
    (masks,) = result.layouts
    assert masks.shape == (2, 64, 64) and (masks.sum(0) <= 1).all() and (masks.flatten(1).sum(1) > 0).all()


def test_auto_layout_needs_each_concept_named_in_the_prompt(random_pipe):
    with pytest.raises(ValueError, match="does not name 'dog'"):
        auto_generate(random_pipe, "a cat and a red apple", ["cat", "dog"], seed=0, steps=2)
    with pytest.raises(ValueError, match="two or more concepts"):
        auto_generate(random_pipe, "a cat", ["cat"], seed=0, steps=2)


def test_the_command_line_finds_the_concepts_the_prompt_names_in_its_order(capsys, tmp_path):
    metas = [{"concept": "w", "phrase": "cpd woman", "adapter_name": "w"},
             {"concept": "m", "phrase": "tkb man", "adapter_name": "m"}]
    assert prompt_concepts("a tkb man and a cpd woman", metas) == [("tkb man", "m"), ("cpd woman", "w")]
    with pytest.raises(ValueError, match="only one is named"):
        prompt_concepts("a cpd woman and a man", metas)
    assert cli_main(["generate", "--prompt", "a cat and a dog", "--fix", "auto", "--out", str(tmp_path / "x.png")]) == 2
    assert "none is named" in capsys.readouterr().err

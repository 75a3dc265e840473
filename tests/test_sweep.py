import matplotlib
import numpy as np
import pytest

from mcteach.bench import sweep as sw
from mcteach.mixing.masking import AttentionMasks

matplotlib.use("Agg")


def test_resolution_sets_name_the_unets_grids(random_pipe):
    sets = sw.resolution_sets(random_pipe.unet)
    assert sets == {"16+8+4": (16, 8, 4), "16": (16,), "8": (8,), "4": (4,), "16+8": (16, 8), "8+4": (8, 4)}


class FakeJudge:
    labels = ["cat", "dog", "nothing"]

    def probs(self, images, position):  # "cat" on the left, "dog" on the right, whatever the image
        import torch

        row = [0.9, 0.05, 0.05] if position == "left" else [0.05, 0.9, 0.05]
        return torch.tensor([row] * len(images))


def test_the_sweep_draws_every_mode_grid_set_and_window_once(random_pipe, monkeypatch):
    drawn = []

    def fake_generate(pipe, prompt, regions, *, fix, seed, **kw):
        drawn.append((fix.cross, fix.resolutions, fix.steps, prompt, tuple(r.prompt for r in regions)))
        return [None] * len(seed)

    monkeypatch.setattr(sw, "regional_generate", fake_generate)
    modes = {"tokens": AttentionMasks("tokens", False, False), "regional": AttentionMasks("regional", False, False)}
    windows = {"all": (0.0, 1.0), "early": (0.0, 0.3)}
    res = sw.sweep(random_pipe, FakeJudge(), [("cat", "dog")], modes=modes, seeds=range(2), windows=windows)
    sets = sw.resolution_sets(random_pipe.unet)
    assert len(drawn) == len(modes) * len(sets) * len(windows)
    assert {(c, r, s) for c, r, s, _, _ in drawn} == {(m.cross, r, w) for m in modes.values() for r in sets.values()
                                                     for w in windows.values()}
    assert drawn[0][3] == "a cat on the left and a dog on the right"
    assert drawn[0][4] == ("a cat on the left", "a dog on the right")
    grid = np.array(res["success"]["tokens"])  # (sets, windows, 3): the fake judge always sees success
    assert grid.shape == (len(sets), len(windows), 3) and (grid[..., 0] == 1).all()
    assert np.array(res["left"]["regional"])[..., 0].min() == 1


def test_best_cells_returns_every_tie_and_the_heat_map_writes_every_cell():
    res = {"modes": ["m"], "resolutions": ["16", "8"], "windows": ["a", "b"],
           "success": {"m": [[[0.5, 0.2, 0.8], [1.0, 1.0, 1.0]], [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]]}}
    assert sw.best_cells(res, "m") == [("16", "b", 1.0), ("8", "a", 1.0)]
    import matplotlib.pyplot as plt

    plt.show = lambda: None
    fig = sw.show_sweep(res)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert len(texts) == 4 and "0.50\n[0.20, 0.80]" in texts


@pytest.mark.parametrize("bad", [{"m": AttentionMasks("tokens")}])
def test_a_pair_needs_two_labels(random_pipe, bad, monkeypatch):
    monkeypatch.setattr(sw, "regional_generate", lambda *a, **k: [])
    with pytest.raises(ValueError, match="two judge labels"):
        sw.sweep(random_pipe, FakeJudge(), [("cat",)], modes=bad, seeds=range(1))

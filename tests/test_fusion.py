"""Fusing LoRAs into one (methods.fusion): the per-layer least squares, its low-rank cut, and a fused adapter that
does what each concept's own LoRA does on that concept's prompts."""

import copy

import pytest
import torch

from mcteach.methods.adapters import load_adapters, phrases
from mcteach.methods.fusion import fit_update, fuse_loras, low_rank
from mcteach.paths import ADAPTERS_DIR
from mcteach.sd import parts
from mcteach.world.concepts import load_concept

COUPLE = [ADAPTERS_DIR / "lora" / s for s in ("woman_with_red_hair_and_medium_skin", "man_with_curly_hair_and_light_skin")]


def test_one_lora_is_its_own_fusion_and_two_on_separate_inputs_are_both_kept():
    g = torch.Generator().manual_seed(0)
    d1, d2 = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    x = torch.randn(100, 8, generator=g, dtype=torch.float64)
    full = x.T @ x / 100
    torch.testing.assert_close(fit_update([d1], [full], ridge=0.0), d1)
    x1, x2 = torch.zeros(50, 8, dtype=torch.float64), torch.zeros(50, 8, dtype=torch.float64)
    x1[:, :4], x2[:, 4:] = torch.randn(50, 4, generator=g), torch.randn(50, 4, generator=g)  # inputs in two subspaces
    fused = fit_update([d1, d2], [x1.T @ x1 / 50, x2.T @ x2 / 50], ridge=1e-9)
    torch.testing.assert_close(x1 @ fused.T, x1 @ d1.T)  # each concept's inputs get its own LoRA's output
    torch.testing.assert_close(x2 @ fused.T, x2 @ d2.T)
    assert not torch.allclose(x1 @ (d1 + d2).T, x1 @ d1.T)  # what loading both together does instead


def test_low_rank_is_exact_at_the_true_rank_and_the_best_cut_below_it():
    g = torch.Generator().manual_seed(1)
    d = torch.randn(10, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 12, generator=g, dtype=torch.float64)
    b, a = low_rank(d, 3)
    assert b.shape == (10, 3) and a.shape == (3, 12)
    torch.testing.assert_close(b @ a, d)
    b1, a1 = low_rank(d, 1)
    s = torch.linalg.svdvals(d)
    assert torch.isclose(torch.linalg.matrix_norm(d - b1 @ a1), s[1:].square().sum().sqrt())


def test_a_fused_couple_draws_each_person_as_their_own_lora_does(pipe, tmp_path):
    """On the woman's prompt the fused adapter's noise prediction is close to her LoRA's, much closer than with
    both LoRAs loaded together; the folder loads as one adapter that answers to both phrases."""
    folder = fuse_loras(copy.deepcopy(pipe), COUPLE, tmp_path / "fused", seeds=[0], steps=4, progress=lambda m: None)
    fused = copy.deepcopy(pipe)
    (meta,) = load_adapters(fused, [folder])
    assert sorted(phrases(meta).values()) == ["cpd woman", "tkb man"] and meta["settings"]["rank"] == 8
    both, own = copy.deepcopy(pipe), copy.deepcopy(pipe)
    load_adapters(both, COUPLE)
    load_adapters(own, COUPLE[:1])
    ids = own.tokenizer(["a cpd woman"] * 4, padding="max_length", max_length=own.tokenizer.model_max_length,
                        return_tensors="pt").input_ids
    ctx = own.text_encoder(ids)[0]
    z0 = parts.encode_images(pipe, load_concept("woman_with_red_hair_and_medium_skin").images[:4])
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    z = pipe.scheduler.add_noise(z0, noise, torch.tensor([500]))  # her own images, half noised: inputs she is drawn on
    with torch.no_grad():
        eps = {k: p.unet(z, 500, ctx).sample for k, p in (("own", own), ("fused", fused), ("both", both), ("base", pipe))}
    err = {k: (eps[k] - eps["own"]).norm() / (eps["base"] - eps["own"]).norm() for k in ("fused", "both")}
    assert err["fused"] < 0.5 * err["both"], err


def test_fusion_refuses_what_it_cannot_fuse(pipe, tmp_path):
    with pytest.raises(ValueError, match="two or more LoRA folders"):
        fuse_loras(pipe, COUPLE[:1], tmp_path / "x")
    with pytest.raises(ValueError, match="two or more LoRA folders"):
        fuse_loras(pipe, [COUPLE[0], ADAPTERS_DIR / "textual_inversion" / "man_with_curly_hair_and_light_skin"],
                   tmp_path / "x")


def test_the_command_line_fuses_and_says_how_to_use_the_result(tmp_path, capsys):
    from mcteach.cli import main
    from mcteach.methods.adapters import read_adapter

    out = tmp_path / "fused"
    assert main(["fuse", "--adapter", str(COUPLE[0]), "--adapter", str(COUPLE[1]), "--rank", "6", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"use it: mcteach generate --adapter {out}" in said and "a cpd woman and a tkb man" in said
    assert read_adapter(out)["settings"]["rank"] == 6
    assert main(["fuse", "--adapter", str(COUPLE[0]), "--out", str(out)]) == 2
    assert "two or more LoRA folders" in capsys.readouterr().err

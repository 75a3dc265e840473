import numpy as np
import pytest
import torch

from mcteach.mixing.generate import regional_generate
from mcteach.mixing.masking import (
    NO_FIX,
    SINGLE_PASS_FIX,
    AttentionMasks,
    Region,
    RegionMasker,
    attention_sides,
    coarsest_side,
    make_masker,
)
from mcteach.mixing.passes import INFERENCE_FIX, RegionPasses, sub_prompt
from mcteach.sd.attention import record_attention
from mcteach.sd.pipeline import generate
from mcteach.world.regions import RegionError, masks_at, region_masks

PROMPT = "a cat on the left and a dog on the right"
REGIONS = [Region("left", "a cat"), Region("right", "a dog")]


def test_named_regions_boxes_and_masks_at_every_unet_resolution():
    strip = region_masks([(0.0, 0.0, 1.0, 0.25)], 64)  # alone: it would overlap both halves
    m = torch.cat([region_masks(["left", "0.5,0,1,1"], 64), strip])
    assert m.shape == (3, 64, 64)
    for side in (16, 8, 4, 2):  # the tiny UNet's 16, 8, 4; SD 1.5 at 64 px latents: 64, 32, 16, 8
        hard = masks_at(m, side).view(3, side, side)
        assert hard[0, :, : side // 2].all() and not hard[0, :, side // 2 :].any()
        assert torch.equal(hard[1], ~hard[0])
        assert hard[2].any()  # a thin strip never vanishes, even at 2x2
    thirds = masks_at(region_masks(["left-third", "middle-third", "right-third"], 64), 16)
    assert thirds.sum(0).max() == 1 and thirds.sum() == 256


@pytest.mark.parametrize("specs, match", [
    ([], "no regions"),
    (["middle"], "unknown region"),
    (["0.5,0,1.5,1"], "out of range"),
    (["0.6,0,0.4,1"], "out of range"),
    ([np.zeros((8, 8))], "all zero"),
    (["left", "left"], "entirely inside"),
    (["left", "top-left"], "entirely inside"),
])
def test_bad_regions_are_clear_errors(specs, match):
    with pytest.raises(RegionError, match=match):
        region_masks(specs, 64)


def test_fix_settings_are_checked():
    with pytest.raises(ValueError, match="cross mode"):
        AttentionMasks(cross="everything")
    with pytest.raises(ValueError, match="steps"):
        AttentionMasks(steps=(0.5, 0.2))


def test_no_fix_is_bit_identical_to_the_default_processor(random_pipe):
    plain = generate(random_pipe, [PROMPT] * 2, seed=[0, 1], steps=3)
    fixed = regional_generate(random_pipe, PROMPT, REGIONS, fix=NO_FIX, seed=[0, 1], steps=3)
    for a, b in zip(plain, fixed):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_masked_token_gets_zero_attention_outside_its_region(random_pipe):
    fix = AttentionMasks(cross="tokens", self_attention=False, bind_adapters=False)
    with record_attention(random_pipe) as store:
        regional_generate(random_pipe, PROMPT, REGIONS, fix=fix, seed=0, steps=2)
    cat, dog = 2, 8  # token positions ("<start> a cat on ...")
    for name, m in store.layer_maps().items():  # (1, N, T), the conditional half, at each resolution
        side = int(m.shape[1] ** 0.5)
        maps = m[0].T.reshape(-1, side, side)
        assert maps[cat, :, side // 2 :].abs().max() == 0 and maps[cat, :, : side // 2].sum() > 0, name
        assert maps[dog, :, : side // 2].abs().max() == 0 and maps[dog, :, side // 2 :].sum() > 0, name
        assert maps[1].min() > 0  # "a" is nobody's: read everywhere


def test_regional_prompts_read_only_their_own_sub_prompt(random_pipe):
    fix = AttentionMasks(cross="regional", self_attention=False, bind_adapters=False)
    with record_attention(random_pipe) as store:
        regional_generate(random_pipe, PROMPT, REGIONS, fix=fix, seed=0, steps=2)
    for name, m in store.layer_maps().items():  # (1, N, 3T): global | left's | right's
        side, t = int(m.shape[1] ** 0.5), m.shape[2] // 3
        m = m[0].view(side, side, 3, t).sum(-1)  # mass per chunk
        assert torch.allclose(m[:, : side // 2, 1], torch.ones(side, side // 2), atol=1e-5), name
        assert torch.allclose(m[:, side // 2 :, 2], torch.ones(side, side - side // 2), atol=1e-5), name


def test_self_attention_masking_removes_the_cross_region_mass(random_pipe):
    fix = AttentionMasks(cross="none", self_attention=True, bind_adapters=False)
    with record_attention(random_pipe, self_attention=True) as store:
        regional_generate(random_pipe, PROMPT, REGIONS, fix=fix, seed=0, steps=2)
    for m in store.layer_maps(cross=False).values():  # (1, N, N)
        side = int(m.shape[1] ** 0.5)
        left = torch.zeros(side, side, dtype=torch.bool)
        left[:, : side // 2] = True
        left = left.flatten()
        assert m[0][left][:, ~left].abs().max() == 0 and m[0][~left][:, left].abs().max() == 0


def test_masks_act_only_in_their_timestep_range(random_pipe):
    masker = make_masker(random_pipe, PROMPT, REGIONS, AttentionMasks("tokens", steps=(0.0, 0.3)))
    like = torch.zeros(1)
    masker.progress = 0.1
    assert masker.bias("x", 256, 32, 2, True, like) is not None
    masker.progress = 0.5
    assert masker.bias("x", 256, 32, 2, True, like) is None


def test_regional_prompts_outside_their_window_read_the_global_prompt_alone(random_pipe):
    """Where regional masks are off (a step or grid outside the fix's), the context still holds every sub-prompt:
    the bias must close them, or each pixel reads all R + 1 prompts at once."""
    masker = make_masker(random_pipe, PROMPT, REGIONS, AttentionMasks(steps=(0.0, 0.3), resolutions=(16,)))
    like, t = torch.zeros(1), random_pipe.tokenizer.model_max_length
    for progress, n_queries in ((0.5, 256), (0.1, 64)):  # a step outside the window; a grid outside the set
        masker.progress = progress
        b = masker.bias("x", n_queries, 3 * t, 2, True, like).flatten()
        assert (b[:t] == 0).all() and torch.isinf(b[t:]).all()
    # the generation with masks nowhere is the plain one (up to the attention kernel's rounding)
    nowhere = AttentionMasks("regional", False, False, resolutions=(999,))
    plain = generate(random_pipe, [PROMPT], seed=[0], steps=3, output_type="np")
    off = regional_generate(random_pipe, PROMPT, REGIONS, fix=nowhere, seed=[0], steps=3, output_type="np")
    assert np.abs(np.asarray(plain) - np.asarray(off)).max() < 1e-4


def test_the_coarsest_grid_can_be_left_unmasked(random_pipe):
    sides = attention_sides(random_pipe.unet)
    assert sides == [16, 8, 4] and coarsest_side(random_pipe.unet) == 4
    like = torch.zeros(1)
    masker = make_masker(random_pipe, PROMPT, REGIONS, SINGLE_PASS_FIX)
    assert [masker.active(s) for s in sides] == [True, True, False]
    assert make_masker(random_pipe, PROMPT, REGIONS, AttentionMasks("tokens", True)).active(4)
    assert masker.bias("x", 16, 16, 2, False, like) is None  # no self-attention mask at 4x4
    assert masker.bias("x", 64, 64, 2, False, like) is not None


def test_a_phrase_missing_from_the_prompt_is_a_clear_error(random_pipe):
    with pytest.raises(ValueError, match="not in the prompt"):
        regional_generate(random_pipe, PROMPT, [Region("left", "a fox"), Region("right", "a dog")],
                          fix=AttentionMasks(cross="tokens"), steps=1)


def test_lora_binding_confines_the_update_to_its_region(random_pipe):
    """A LoRA bound to the left half: each LoRA layer's output is the LoRA model's on the left, the base
    model's on the right (what reaches the right half afterwards comes only through convolutions and
    attention, which the other parts of the fix address)."""
    import copy

    from mcteach.methods.lora import lora_config
    from mcteach.mixing.masking import adapter_regions, bind_lora

    pipe = copy.deepcopy(random_pipe)
    pipe.unet.add_adapter(lora_config(4, 4, ["to_q", "to_out.0", "proj_in"]), adapter_name="a")
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    masker = make_masker(pipe, PROMPT, [Region("left", "a cat", adapter="a")], AttentionMasks(cross="none", self_attention=False))
    block = pipe.unet.down_blocks[0].attentions[0]
    x = torch.randn(2, block.proj_in.base_layer.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    tokens = torch.randn(2, 256, block.transformer_blocks[0].attn1.to_q.base_layer.in_features)
    with torch.no_grad():
        full = block.proj_in(x), block.transformer_blocks[0].attn1.to_q(tokens)
        handles = bind_lora(pipe.unet, masker, {"a": [0]})
        bound = block.proj_in(x), block.transformer_blocks[0].attn1.to_q(tokens)
        for h in handles:
            h.remove()
        pipe.disable_lora()
        base = block.proj_in(x), block.transformer_blocks[0].attn1.to_q(tokens)
    assert not torch.allclose(full[0], base[0])
    torch.testing.assert_close(bound[0][..., :8], full[0][..., :8])
    torch.testing.assert_close(bound[0][..., 8:], base[0][..., 8:])
    left = torch.zeros(16, 16, dtype=torch.bool)
    left[:, :8] = True
    torch.testing.assert_close(bound[1][:, left.flatten()], full[1][:, left.flatten()])
    torch.testing.assert_close(bound[1][:, ~left.flatten()], base[1][:, ~left.flatten()])
    with pytest.raises(ValueError, match="no LoRA adapter named 'b'"):
        bind_lora(pipe.unet, masker, {"b": [0]})

    # one adapter that knows two concepts (joint or fused), in the left and the right third: bound to both
    regions = [Region("left-third", "a cat", adapter="a"), Region("middle-third", "a dog"),
               Region("right-third", "a fox", adapter="a")]
    assert adapter_regions(regions) == {"a": [0, 2]}
    masker = make_masker(pipe, PROMPT, regions, AttentionMasks(cross="none", self_attention=False))
    pipe.enable_lora()
    with torch.no_grad():
        handles = bind_lora(pipe.unet, masker, adapter_regions(regions))
        bound = block.proj_in(x)
        for h in handles:
            h.remove()
    outer = masks_at(region_masks(["left-third", "right-third"]), 16).any(0).view(16, 16)
    torch.testing.assert_close(bound[..., outer], full[0][..., outer])
    torch.testing.assert_close(bound[..., ~outer], base[0][..., ~outer])


@pytest.mark.slow
def test_masks_on_an_sd15_size_unet():
    """SD 1.5's UNet from config (random weights), 32x32 latents: an inactive masker changes nothing, bit for bit;
    the masks act at every resolution (32, 16, 8, 4) and cost little."""
    from mcteach.bench.mixing import processor_timing
    from mcteach.sd import tiny
    from mcteach.sd.attention import with_parts
    from mcteach.world import scenes

    tok = tiny.build_tokenizer(scenes.vocabulary_words())
    unet = tiny.build_components(tok, architecture="sd15")[2].eval()
    unet.register_to_config(sample_size=32)
    g = torch.Generator().manual_seed(0)
    z, ctx = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, 768, generator=g)
    masks = region_masks(["left", "right"], 128)
    with torch.no_grad():
        ref = unet(z, 500, ctx).sample
        masker = RegionMasker(masks, AttentionMasks("tokens", True, False), spans=[[2], [8]], eot=list(range(12, 77)), chunk=77)
        masker.progress = 2.0  # outside its steps: inactive
        previous = with_parts(unet, masker=masker)
        same = unet(z, 500, ctx).sample
        masker.progress = 0.5
        seen = set()
        original = masker.bias
        masker.bias = lambda *a: seen.add(int(a[1] ** 0.5)) or original(*a)
        masked = unet(z, 500, ctx).sample
        unet.set_attn_processor(previous)
    assert torch.equal(ref, same) and not torch.allclose(ref, masked)
    assert seen == {32, 16, 8, 4}  # SD 1.5's attention resolutions at 32x32 latents, the mid block's included
    t = processor_timing(unet, tokens=77, repeats=2)
    assert t["ratio"]["tokens + self-attention masks"] < 1.5


def test_masks_compose_with_a_hypernetwork_and_textual_inversion(random_pipe):
    import copy

    from mcteach.methods.hypernetwork import HypernetworkLayers, HypernetworkProcessor, attach, context_dims
    from mcteach.methods.textual_inversion import add_placeholder

    pipe = copy.deepcopy(random_pipe)
    hn = HypernetworkLayers(context_dims(pipe))
    for p in hn.parameters():
        p.data.normal_(0, 0.1)
    attach(pipe, hn)
    add_placeholder(pipe.tokenizer, pipe.text_encoder, ["<cat>"], "cat")
    prompt = "a <cat> on the left and a dog on the right"
    regions = [Region("left", "a <cat>"), Region("right", "a dog")]
    plain = generate(pipe, prompt, seed=0, steps=2)[0]
    same = regional_generate(pipe, prompt, regions, fix=NO_FIX, seed=0, steps=2)[0]
    assert np.array_equal(np.asarray(plain), np.asarray(same))  # the hypernetwork still rewrites, nothing else
    for fix in (AttentionMasks("tokens", True, False), AttentionMasks("regional", True, False), RegionPasses(
                                                                              bootstrap=0.5, recentre=True)):
        out = regional_generate(pipe, prompt, regions, fix=fix, seed=0, steps=2)[0]
        assert not np.array_equal(np.asarray(plain), np.asarray(out)), fix
    assert all(isinstance(p, HypernetworkProcessor) for n, p in pipe.unet.attn_processors.items() if "attn2" in n)


def test_region_passes_with_one_full_region_are_a_plain_generation(random_pipe):
    """One region covering the image: the passes reduce to the pipeline's own loop (up to float rounding)."""
    plain = generate(random_pipe, "a cat", seed=3, steps=3)[0]
    fix = RegionPasses(bootstrap=0.5, recentre=True)
    one = regional_generate(random_pipe, "a cat", [Region((0, 0, 1, 1), "a cat")], fix=fix, seed=3, steps=3)[0]
    assert np.abs(np.asarray(plain, dtype=int) - np.asarray(one, dtype=int)).max() <= 2


def test_region_passes_scale_the_guidance_by_the_fix(random_pipe):
    """``AttentionMasks.pass_guidance`` scales each pass's guidance: one full region at 0.6 of 5 is the pipeline at 3, not 5."""
    at3 = generate(random_pipe, "a cat", seed=3, steps=3, guidance_scale=3.0)[0]
    at5 = generate(random_pipe, "a cat", seed=3, steps=3, guidance_scale=5.0)[0]
    fix = RegionPasses(pass_guidance=0.6)
    one = regional_generate(random_pipe, "a cat", [Region((0, 0, 1, 1), "a cat")], fix=fix, seed=3, steps=3,
                            guidance_scale=5.0)[0]
    assert np.abs(np.asarray(at3, dtype=int) - np.asarray(one, dtype=int)).max() <= 2
    assert np.abs(np.asarray(at5, dtype=int) - np.asarray(one, dtype=int)).max() > 2


def test_sub_prompts_name_the_place_unless_the_passes_are_recentred():
    assert sub_prompt("cpd woman", "left") == "a cpd woman on the left"  # INFERENCE_FIX draws on the whole canvas
    assert sub_prompt("tkb man", "right", INFERENCE_FIX) == "a tkb man on the right"
    assert sub_prompt("cpd woman", (0.0, 0.0, 0.6, 1.0)) == "a cpd woman on the left"  # mostly the left half
    assert sub_prompt("cpd woman", "0.3,0,1,1") == "a cpd woman on the right"
    assert sub_prompt("tkb man", "bottom") == "a tkb man at the bottom"
    assert sub_prompt("cpd woman", "middle-third") == "a cpd woman"  # in no half: no words
    assert sub_prompt("cpd woman", "0.4,0.4,0.6,0.6") == "a cpd woman"
    assert sub_prompt("cpd woman", "left", RegionPasses(recentre=True)) == "a cpd woman"


def test_command_line_regions():
    from mcteach.cli import parse_region

    metas = [{"concept": "w", "phrase": "cpd woman", "adapter_name": "w"}, {"concept": "m", "phrase": "tkb man",
                                                                             "adapter_name": "m"}]
    r = parse_region("left=a cpd woman", metas)
    assert (r.where, r.prompt, r.phrase, r.adapter) == ("left", "a cpd woman", "cpd woman", "w")
    r = parse_region("0.5,0,1,1=a tkb man", metas)
    assert r.where == (0.5, 0.0, 1.0, 1.0) and r.adapter == "m"
    with pytest.raises(ValueError, match="PLACE=SUB-PROMPT"):
        parse_region("left", metas)
    with pytest.raises(RegionError, match="unknown region"):
        parse_region("middle=a cat", metas)


def test_command_line_two_adapters_with_the_fix(tmp_path, capsys):
    from PIL import Image

    from mcteach.cli import main
    from mcteach.paths import ADAPTERS_DIR

    a, b = (str(ADAPTERS_DIR / "lora" / s) for s in ("woman_with_red_hair_and_medium_skin",
                                                      "man_with_curly_hair_and_light_skin"))
    out = tmp_path / "couple.png"
    args = ["generate", "--adapter", a, "--adapter", b, "--prompt", "a cpd woman on the left and a tkb man on the right",
            "--steps", "2", "--out", str(out)]
    assert main(args + ["--region", "left=a cpd woman", "--region", "right=a tkb man", "--fix", "inference"]) == 0
    assert Image.open(out).size == (64, 64)
    assert main(args + ["--fix", "inference"]) == 2
    assert "needs one --region per concept" in capsys.readouterr().err
    assert main(args + ["--region", "left=a cpd woman", "--region", "left=a tkb man", "--fix", "inference"]) == 2
    assert "entirely inside" in capsys.readouterr().err
    koala = str(ADAPTERS_DIR / "lora" / "koala")  # three in a row: a canvas of three overlapping windows
    three = ["generate", "--adapter", a, "--adapter", koala, "--adapter", b, "--prompt", "a cpd woman and a bbm bear "
             "and a tkb man", "--steps", "2", "--out", str(out), "--region", "left-third=a cpd woman", "--region",
             "middle-third=a bbm bear", "--region", "right-third=a tkb man"]
    assert main(three + ["--fix", "wide"]) == 0 and Image.open(out).size == (160, 64)
    assert main(three + ["--fix", "none", "--fix", "wide", "--sheet"]) == 0
    assert Image.open(out).size == (160 * 2, 2 * (64 * 2 + 14))  # the 64 px row and the wide row, 2x
    assert main(args + ["--region", "left=a cpd woman", "--region", "right=a tkb man", "--fix", "wide"]) == 0
    assert Image.open(out).size == (112, 64)


def test_overlapping_regions_are_refused_but_a_thin_shared_edge_is_not():
    from mcteach.world.regions import RegionError, region_masks

    with pytest.raises(RegionError, match="overlap on .* trim the boxes"):
        region_masks(["left", "0.4,0,1,1"])  # shares a fifth of the right box with the left half
    assert region_masks(["left", "0.49,0,1,1"]).shape == (2, 64, 64)  # one shared column of 64: allowed


def test_batched_region_passes_are_the_passes_one_call_at_a_time():
    """``RegionPasses(batched=True)``: one UNet call per step for every pass, each LoRA gated to its own passes'
    images; the same images as one call per pass (the boxes leave a background, so the global pass is in it too)."""
    from dataclasses import replace

    from mcteach.methods.adapters import load_adapters
    from mcteach.mixing import passes
    from mcteach.paths import ADAPTERS_DIR
    from mcteach.sd.pipeline import load_pipeline

    pipe = load_pipeline(device="cpu")
    load_adapters(pipe, [ADAPTERS_DIR / "lora" / s for s in ("woman_with_red_hair_and_medium_skin",
                                                             "man_with_curly_hair_and_light_skin")])
    names = pipe.get_active_adapters()
    regions = [Region((0.0, 0.1, 0.45, 0.9), "a cpd woman on the left", adapter=names[0]),
               Region((0.55, 0.1, 1.0, 0.9), "a tkb man on the right", adapter=names[1])]
    prompt = "a cpd woman on the left and a tkb man on the right"

    def draw(fix):
        return np.stack([np.asarray(im, dtype=int) for im in
                         regional_generate(pipe, prompt, regions, fix=fix, seed=[0, 1], steps=3)])

    one_by_one = draw(INFERENCE_FIX)
    assert np.abs(draw(replace(INFERENCE_FIX, batched=True)) - one_by_one).max() <= 2
    assert pipe.get_active_adapters() == names  # every adapter on again afterwards
    real = passes._pass_gates
    passes._pass_gates = lambda adapters, pass_adapters, n: real(adapters, ["*"] * len(pass_adapters), n)
    try:  # every LoRA in every pass: not the fix
        assert np.abs(draw(replace(INFERENCE_FIX, batched=True)) - one_by_one).max() > 2
    finally:
        passes._pass_gates = real


def test_lora_gates_check_the_batch():
    import torch

    from mcteach.mixing.passes import _pass_gates

    g = _pass_gates(["a", "b"], ["a", "b", "*"], 2)
    assert g["a"].tolist() == [1, 1, 0, 0, 1, 1] * 2 and g["b"].tolist() == [0, 0, 1, 1, 1, 1] * 2
    assert _pass_gates(["a"], [None, "a"], 1)["a"].tolist() == [0, 1, 0, 1]
    assert torch.is_tensor(g["a"])


def test_a_canvas_for_places_gives_each_a_window_of_the_models_size():
    from mcteach.mixing.passes import canvas_for

    assert canvas_for(("left-third", "middle-third", "right-third"), 64) == (64, 160)
    assert canvas_for(("top-left", "top-right", "bottom-left", "bottom-right"), 64) == (112, 112)
    assert canvas_for(("left", "right"), 64) == (64, 112)
    assert canvas_for(("centre",), 64) == (64, 64)
    assert region_masks(["left-third", "right-third"], (64, 160)).shape == (2, 64, 160)
    assert region_masks(["right"], (8, 20))[0].sum() == 8 * 10


def test_pass_windows_hold_their_regions_or_say_what_to_do():
    import torch.nn.functional as F

    from mcteach.mixing.passes import pass_windows

    masks = region_masks(["left-third", "middle-third", "right-third"], (64, 160))
    m = F.interpolate(masks[:, None], size=(16, 40), mode="area")
    windows = pass_windows(m, 16)
    assert windows == [(0, 0, 16, 16), (0, 12, 16, 28), (0, 24, 16, 40)]  # overlapping, inside the canvas
    for (y0, x0, y1, x1), w in zip(windows, m[:, 0]):
        assert w[:, :x0].sum() == 0 and w[:, x1:].sum() == 0  # the region lies in its window
    halves = F.interpolate(region_masks(["left", "right"], (64, 160))[:, None], size=(16, 40), mode="area")
    with pytest.raises(RegionError, match="more than the model's 16x16 window"):
        pass_windows(halves, 16)
    with pytest.raises(ValueError, match="leave recentre off"):
        RegionPasses(window=True, recentre=True)


def test_window_passes_see_only_their_window(random_pipe):
    """On a canvas two windows wide, the left region's pass sees the left window only: what the right region asks
    for does not change a pixel of the left half, and every UNet call gets a window of the model's size (passes on
    the whole canvas get all of it)."""
    from dataclasses import replace

    from mcteach.mixing.passes import WINDOW_FIX

    def draw(right: str, fix=WINDOW_FIX):
        regions = [Region("left", "a cat"), Region("right", right)]
        (im,) = regional_generate(random_pipe, "a cat and a dog", regions, fix=fix, seed=[0], steps=8, width=128)
        assert im.size == (128, 64)
        return np.asarray(im, dtype=int)

    # the VAE's decoder reaches a few pixels across the seam: compare the left half up to 16 pixels from it
    a, b = draw("a red apple"), draw("a dog")
    assert np.abs(a[:, :48] - b[:, :48]).max() <= 1 and np.abs(a[:, 64:] - b[:, 64:]).max() > 2
    seen, forward = [], random_pipe.unet.forward
    random_pipe.unet.forward = lambda x, *a, **k: seen.append(tuple(x.shape[-2:])) or forward(x, *a, **k)
    try:
        draw("a dog")
        assert set(seen) == {(16, 16)}
        seen.clear()
        draw("a dog", replace(WINDOW_FIX, window=False))
        assert set(seen) == {(16, 32)}
    finally:
        random_pipe.unet.forward = forward
    with pytest.raises(ValueError, match="use window passes"):
        draw("a dog", replace(INFERENCE_FIX, self_attention=True))


def test_textual_inversion_passes_run_at_full_guidance_and_the_command_line_uses_them(tmp_path, monkeypatch):
    """A concept that lives in the prompt alone is carried by guidance: TI's passes keep the call's scale, every
    other method's run at half (INFERENCE_FIX)."""
    from mcteach import cli
    from mcteach.mixing.passes import PROMPT_CONCEPT_FIX, inference_fix
    from mcteach.paths import ADAPTERS_DIR

    assert inference_fix("textual_inversion") is PROMPT_CONCEPT_FIX and PROMPT_CONCEPT_FIX.pass_guidance == 1.0
    assert inference_fix("lora") is INFERENCE_FIX and inference_fix(None) is INFERENCE_FIX
    assert INFERENCE_FIX.pass_guidance == 0.5
    seen = []
    monkeypatch.setattr(cli, "regional_generate", lambda pipe, prompt, regions, fix, **k: seen.append(fix) or [])
    for method in ("textual_inversion", "lora"):
        a, b = (str(ADAPTERS_DIR / method / s) for s in ("woman_with_red_hair_and_medium_skin",
                                                         "man_with_curly_hair_and_light_skin"))
        cli.main(["generate", "--adapter", a, "--adapter", b, "--prompt", "a woman on the left and a man on the right",
                  "--region", "left=a woman", "--region", "right=a man", "--fix", "inference", "--steps", "1",
                  "--out", str(tmp_path / "x.png")])
    assert seen == [PROMPT_CONCEPT_FIX, INFERENCE_FIX]

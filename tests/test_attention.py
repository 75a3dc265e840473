import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from mcteach.sd import tiny
from mcteach.sd.attention import AttentionStore, prompt_tokens, record_attention, token_indices
from mcteach.sd.pipeline import generate
from mcteach.world import scenes

PROMPT = "a cat on the left and a dog on the right"


def test_recording_gives_bit_identical_images(random_pipe):
    before = generate(random_pipe, PROMPT, seed=1, steps=4)[0]
    with record_attention(random_pipe) as store:
        during = generate(random_pipe, PROMPT, seed=1, steps=4)[0]
    assert np.array_equal(np.asarray(before), np.asarray(during))
    assert store.cross, "nothing recorded"


def test_processors_are_restored_even_after_an_error(random_pipe):
    with pytest.raises(RuntimeError, match="boom"):
        with record_attention(random_pipe):
            raise RuntimeError("boom")
    assert all(isinstance(p, AttnProcessor2_0) for p in random_pipe.unet.attn_processors.values())


def test_maps_are_probability_distributions_over_tokens(random_pipe):
    with record_attention(random_pipe) as store:
        generate(random_pipe, [PROMPT, "a fox"], seed=[0, 1], steps=3)
    n_cross = sum(name.endswith("attn2.processor") for name in random_pipe.unet.attn_processors)
    assert len(store.cross) == n_cross
    assert all(count == 3 for count in store.calls.values())  # one call per step per layer
    maps = store.token_maps()
    assert maps.shape == (2, tiny.MAX_LENGTH, 16, 16)  # conditional half only: 2 prompts
    for m in store.layer_maps().values():
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:2]), atol=1e-4, rtol=0)


def test_self_attention_recording_and_guidance_check(random_pipe):
    with record_attention(random_pipe, self_attention=True) as store:
        generate(random_pipe, PROMPT, seed=0, steps=2)
    assert store.self and all(m.shape[1] == m.shape[2] for m in store.self.values())
    with pytest.raises(ValueError, match="guidance=False"):
        with record_attention(random_pipe):
            generate(random_pipe, PROMPT, seed=0, steps=1, guidance_scale=1.0)
    with record_attention(random_pipe, guidance=False) as store:
        generate(random_pipe, PROMPT, seed=0, steps=1, guidance_scale=1.0)
    assert store.token_maps().shape[0] == 1


def test_empty_store_explains_itself():
    with pytest.raises(RuntimeError, match="record_attention"):
        AttentionStore().token_maps()


def test_token_indices_and_names(random_pipe):
    tok = random_pipe.tokenizer
    assert token_indices(tok, PROMPT, "dog") == [8]
    assert token_indices(tok, PROMPT, "a") == [1, 7]
    assert prompt_tokens(tok, PROMPT) == ["<start>"] + PROMPT.split() + ["<end>"]
    with pytest.raises(ValueError, match="not in the prompt"):
        token_indices(tok, PROMPT, "fox")


def test_foreign_processors_are_not_silently_replaced(random_pipe):
    class Custom(AttnProcessor2_0):
        pass

    previous = random_pipe.unet.attn_processors
    random_pipe.unet.set_attn_processor(Custom())
    try:
        with pytest.raises(ValueError, match="Custom"):
            with record_attention(random_pipe):
                pass
    finally:
        random_pipe.unet.set_attn_processor(previous)


@pytest.mark.slow
def test_recording_on_sd15_architecture():
    """Full-size SD 1.5 UNet (random weights): same maps API, same outputs as the default processor."""
    tok = tiny.build_tokenizer(scenes.vocabulary_words())
    _, text_encoder, unet, _ = tiny.build_components(tok, architecture="sd15")
    assert sum(p.numel() for p in unet.parameters()) > 8e8
    ids = tok(["", PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ctx = text_encoder(ids)[0]
        z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        ref = unet(z, 500, ctx).sample
        with record_attention(unet) as store:
            out = unet(z, 500, ctx).sample
    assert torch.equal(ref, out)
    assert len(store.cross) == 16  # SD 1.5 has 16 cross-attention layers
    assert store.token_maps().shape == (1, 77, 16, 16)

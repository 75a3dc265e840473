import pytest
import torch
from transformers import CLIPTokenizer

from mcteach.sd import tiny
from mcteach.world import scenes


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer(scenes.vocabulary_words())


def test_every_world_word_is_one_token(tok):
    for w in scenes.vocabulary_words():
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w


def test_caption_tokens_are_words(tok):
    cap = "a woman with red hair on the left and a koala on the right"
    toks = tok.convert_ids_to_tokens(tok(cap).input_ids)
    assert [t.removesuffix("</w>") for t in toks[1:-1]] == cap.split()
    assert toks[0] == "<|startoftext|>" and toks[-1] == "<|endoftext|>"


def test_unknown_words_still_tokenize_into_pieces(tok):
    ids = tok("a xylophone").input_ids
    assert len(ids) > 4 and tok.unk_token_id not in ids[1:-1]


def test_save_load_and_add_tokens(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    cap = "a fox at the top and a cat at the bottom"
    assert loaded(cap).input_ids == tok(cap).input_ids
    assert loaded.model_max_length == tiny.MAX_LENGTH
    assert loaded.add_tokens(["<my-cat>"]) == 1
    assert loaded.convert_ids_to_tokens(loaded("a <my-cat> on the left").input_ids)[2] == "<my-cat>"


def test_merges_are_minimal_and_safe():
    merges = tiny.whole_word_merges(["wolf", "woman", "wom", "a"])
    ranks = {m: i for i, m in enumerate(merges)}
    for w in ["wolf", "woman", "wom", "a"]:
        assert tiny._bpe(w, ranks) == [w + "</w>"]
    assert len(merges) == len(set(merges))


def test_components_have_sd_architecture(tok):
    vae, te, unet, sched = tiny.build_components(tok, seed=0)
    assert unet.config.cross_attention_dim == te.config.hidden_size
    assert any(n.endswith("attn2") for n, _ in unet.named_modules())
    z = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert z.shape == (1, 4, 16, 16)
    out = unet(torch.zeros(1, 4, 16, 16), 10, te(torch.tensor([[tok.bos_token_id, tok.eos_token_id]]))[0]).sample
    assert out.shape == (1, 4, 16, 16)
    assert sched.config.beta_schedule == "scaled_linear"

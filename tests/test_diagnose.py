import copy

import numpy as np
import pytest
import torch

from mcteach.mixing.diagnose import hypernetwork_reach, identity_share, self_attention_leakage, short_layer

PROMPT = "a sks cat on the left and a zqv dog on the right"


def test_identity_reaches_only_later_tokens(random_pipe):
    r = identity_share(random_pipe, PROMPT, ["sks cat", "zqv dog"], samples=3)
    tokens, infl = r["tokens"], r["influence"]
    first, second = 2, tokens.index("z")  # "<start> a sks ...": the identifiers' first tokens
    assert infl[0, :first].max() == 0 and infl[0, first:].min() > 0  # the causal encoder: only later tokens
    assert infl[1, :second].max() == 0 and infl[1, second:].min() > 0
    pad = tokens.index("<end>")
    assert (r["share"][:, pad:] > 0).all()  # both identities live in <end> and the padding
    np.testing.assert_allclose(r["share"][:, pad:].sum(0), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="not in the prompt"):
        identity_share(random_pipe, PROMPT, ["xyz fox"])


def test_self_attention_leakage_is_a_share_per_layer_and_time(random_pipe):
    leak = self_attention_leakage(random_pipe, PROMPT, seeds=(0,), steps=3)
    assert leak["a_to_b"].shape == (len(leak["layers"]), 3)
    assert np.nanmin(leak["a_to_b"]) >= 0 and np.nanmax(leak["a_to_b"]) <= 1
    assert leak["uniform"] == 0.5
    assert short_layer(leak["layers"][0]).split()[0] in ("down", "mid", "up")


def test_a_hypernetwork_reaches_every_token(random_pipe):
    from mcteach.methods.hypernetwork import HypernetworkLayers, attach, context_dims

    pipe = copy.deepcopy(random_pipe)
    with pytest.raises(ValueError, match="no hypernetwork"):
        hypernetwork_reach(pipe, PROMPT, ["sks cat"])
    hn = HypernetworkLayers(context_dims(pipe))
    for p in hn.parameters():
        p.data.normal_(0, 0.2)
    attach(pipe, hn)
    reach = hypernetwork_reach(pipe, PROMPT, ["sks cat", "zqv dog"])
    assert set(reach) == {"sks cat", "zqv dog", "other words", "<end> + padding"}
    assert min(reach.values()) > 0.3 * max(reach.values())


def test_cross_attention_by_time_keeps_every_layer_and_part_of_the_process(random_pipe):
    from mcteach.mixing.diagnose import cross_attention_by_time

    out = cross_attention_by_time(random_pipe, "a fox on the left", seed=0, steps=4)
    assert out["image"].size == (64, 64) and out["tokens"][:3] == ["<start>", "a", "fox"]
    assert len(out["tokens"]) == random_pipe.tokenizer.model_max_length
    assert {r for _, r in out["maps"]} == {0, 1, 2} and len(out["layers"]) >= 2
    for m in out["maps"].values():
        assert m.shape[0] == len(out["tokens"]) and torch.allclose(m.sum(0), torch.ones_like(m[0]), atol=1e-4)

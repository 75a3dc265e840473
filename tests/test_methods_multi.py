"""Several concepts: joint training with the training fix, and load_adapters' rules (tiny random pipeline)."""

import copy
import json
import random

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import DDIMScheduler
from safetensors import safe_open

from mcteach.methods import engine
from mcteach.methods.adapters import load_adapters, phrases
from mcteach.methods.catalog import train_concept
from mcteach.methods.engine import TRAINING_FIX, Regularizers, attention_loss, default_identifier
from mcteach.sd.attention import AttentionStore
from mcteach.world.concepts import compose, load_concept

COUPLE = ["woman_with_red_hair_and_medium_skin", "man_with_curly_hair_and_light_skin"]
FAST_DB = dict(num_class_images=1, class_steps=2, world_prior=False)


def quick(pipe, concept, method, out, steps=3, **kw):
    return train_concept(copy.deepcopy(pipe), concept, method, out=out, steps=steps, batch_size=1, lr=1e-2,
                         progress=False, **kw)


def test_default_identifiers_differ_between_concepts():
    ids = {default_identifier(s) for s in COUPLE + ["koala", "hamster", "woman_with_curly_hair_and_dark_skin"]}
    assert len(ids) == 5 and all(len(i) == 3 and i.isalpha() for i in ids)


def test_seg_mix_pastes_each_concept_into_its_own_region():
    a, b = (load_concept(s) for s in COUPLE)
    comp = compose([a, b], random.Random(0))
    assert comp.image.size == (64, 64) and len(comp.masks) == 2
    for mask, pos in zip(comp.masks, comp.positions):
        ys, xs = np.nonzero(mask > 0.5)
        half = {"left": xs.max() < 32, "right": xs.min() >= 32, "top": ys.max() < 32, "bottom": ys.min() >= 32}
        assert half[pos] and mask.sum() > 100


def test_joint_lora_with_the_training_fix_resumes_to_the_same_weights(random_pipe, tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same reduction order in both runs, so "the same weights" is exact
    try:
        _resume_check(random_pipe, tmp_path, monkeypatch)
    finally:
        torch.set_num_threads(threads)


def _resume_check(random_pipe, tmp_path, monkeypatch):
    full = quick(random_pipe, COUPLE, "lora", tmp_path / "full", steps=4, checkpoint_every=2, regularizers=TRAINING_FIX)
    meta = json.loads((tmp_path / "full" / "adapter.json").read_text())
    assert set(meta["phrases"]) == set(COUPLE) and len(set(meta["phrases"].values())) == 2
    assert meta["training"]["regularizers"]["composites"] == TRAINING_FIX.composites
    monkeypatch.setattr(engine, "lr_at", lambda step, *a: (_ for _ in ()).throw(KeyboardInterrupt) if step == 3 else a[1])
    with pytest.raises(KeyboardInterrupt):
        quick(random_pipe, COUPLE, "lora", tmp_path / "run", steps=4, checkpoint_every=2, regularizers=TRAINING_FIX)
    monkeypatch.undo()
    resumed = quick(random_pipe, COUPLE, "lora", tmp_path / "run", steps=4, checkpoint_every=2,
                    regularizers=TRAINING_FIX, resume=True)
    assert resumed.losses == full.losses
    files = [tmp_path / run / "pytorch_lora_weights.safetensors" for run in ("full", "run")]
    a, b = (safetensors.torch.load_file(f) for f in files)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta_a, meta_b = (safe_open(f, "pt").metadata() for f in files)
    assert meta_a == meta_b  # compared as dicts, not bytes: the header may list the same keys in another order


def test_joint_dreambooth_has_a_class_prior_for_each_concept(random_pipe, tmp_path):
    r = quick(random_pipe, ["woman_with_red_hair_and_medium_skin", "koala"], "dreambooth", tmp_path, steps=1, **FAST_DB)
    prompts = sorted(p.name for p in (tmp_path / "class_images").glob("*.png"))
    assert len(prompts) == 2  # one class image of "a woman", one of "a bear"
    assert set(phrases(r.meta).values()) == {f"{default_identifier('woman_with_red_hair_and_medium_skin')} woman",
                                              f"{default_identifier('koala')} bear"}


def test_joint_training_is_refused_for_one_concept_methods(random_pipe, tmp_path):
    with pytest.raises(ValueError, match="one concept at a time"):
        quick(random_pipe, COUPLE, "textual_inversion", tmp_path)


def test_masked_loss_counts_only_the_concepts_pixels():
    zero = lambda z_t, t, ids: torch.zeros_like(z_t)  # noqa: E731  predicts no noise: the loss is eps^2
    n = 2
    masks = torch.zeros(n, 1, 16, 16)
    masks[..., :8] = 1  # the concept is in the left half
    ex = engine.Examples(torch.zeros(n, 4, 16, 16), torch.zeros(n, 4, 16, 16), masks, torch.zeros(n, 8, dtype=torch.long), 1.0)

    def loss(masked):
        return engine.step_loss(zero, DDIMScheduler(), ex, None, 0.0, engine.step_generator(0, 0), n, 0.0, "cpu",
                                masked_loss=masked)

    g = engine.step_generator(0, 0)  # replay step_loss's draws: which examples, the VAE sample, then eps
    torch.randint(n, (n,), generator=g)
    torch.randn(n, 4, 16, 16, generator=g)  # the VAE sample
    eps = torch.randn(n, 4, 16, 16, generator=g)
    torch.testing.assert_close(loss(True), eps[..., :8].pow(2).mean() * 1.0)  # left half only, mean over it
    torch.testing.assert_close(loss(False), eps.pow(2).mean())


def test_attention_loss_is_zero_when_each_token_map_is_its_mask():
    masks = torch.zeros(1, 2, 16, 16)
    masks[0, 0, :, :8], masks[0, 1, :, 8:] = 1, 1
    tokens = torch.zeros(1, 2, 4, dtype=torch.bool)
    tokens[0, 0, 1], tokens[0, 1, 2] = True, True
    probs = torch.zeros(1, 256, 4)
    probs[0, :, 0] = 1.0
    probs[0, masks[0, 0].flatten() > 0, 1] = 0.5  # token 1 where concept 0 is, token 2 where concept 1 is
    probs[0, masks[0, 1].flatten() > 0, 2] = 0.5
    store = AttentionStore(guidance=False, keep_grad=True)
    store.add("layer", probs[:, None], is_cross=True)
    assert attention_loss(store, masks, tokens) == 0
    wrong = AttentionStore(guidance=False, keep_grad=True)
    wrong.add("layer", probs[:, None][..., [0, 2, 1, 3]], is_cross=True)  # the two maps swapped
    assert attention_loss(wrong, masks, tokens) > 0.4


def test_the_attention_loss_reaches_the_weights(random_pipe, tmp_path):
    reg = Regularizers(attention_weight=1.0)
    r = quick(random_pipe, "koala", "lora", tmp_path / "a", steps=2, regularizers=reg)
    plain = quick(random_pipe, "koala", "lora", tmp_path / "b", steps=2)
    assert r.losses[0] > plain.losses[0]  # the same draws, plus the attention term


def test_load_adapters_rules(random_pipe, tmp_path):
    a = quick(random_pipe, COUPLE[0], "lora", tmp_path / "a", steps=1)
    b = quick(random_pipe, COUPLE[1], "lora", tmp_path / "b", steps=1)
    pipe = copy.deepcopy(random_pipe)
    metas = load_adapters(pipe, [a.out, b.out], weights=[1.0, 0.5])
    assert [m["concept"] for m in metas] == COUPLE
    assert set(pipe.get_active_adapters()) == {m["adapter_name"] for m in metas}
    same = quick(random_pipe, COUPLE[0], "lora", tmp_path / "same", steps=1, identifier=a.phrase.split()[0],
                 adapter_name="other")
    with pytest.raises(ValueError, match="both answer to"):
        load_adapters(copy.deepcopy(random_pipe), [a.out, same.out])
    ti = quick(random_pipe, "koala", "textual_inversion", tmp_path / "ti", steps=1)
    with pytest.raises(ValueError, match="different methods"):
        load_adapters(copy.deepcopy(random_pipe), [a.out, ti.out])
    db1 = quick(random_pipe, "koala", "dreambooth", tmp_path / "db1", steps=1, **FAST_DB)
    db2 = quick(random_pipe, "hamster", "dreambooth", tmp_path / "db2", steps=1, **FAST_DB)
    with pytest.raises(ValueError, match="train the concepts jointly"):
        load_adapters(copy.deepcopy(random_pipe), [db1.out, db2.out])
    other = copy.deepcopy(random_pipe)
    with torch.no_grad():
        other.unet.conv_in.weight.add_(0.1)  # another base model of the same architecture
    with pytest.raises(ValueError, match="another base model"):
        load_adapters(other, [a.out])


def test_lora_trains_one_concept_and_several_on_their_own_schedules(random_pipe, tmp_path):
    """One concept: 400 steps of 4 images by default; several jointly: 800 steps of 2 (``LoRA.schedule``). An explicit
    ``steps`` or ``batch_size`` wins over both."""
    from mcteach.methods.engine import train
    from mcteach.methods.lora import LoRA

    assert LoRA().schedule(1) == (400, 4) and LoRA().schedule(2) == (800, 2)
    small = lambda: LoRA(steps=3, batch_size=1, joint_steps=2, joint_batch_size=2)  # noqa: E731
    one = train(copy.deepcopy(random_pipe), COUPLE[0], small(), out=tmp_path / "one", progress=False)
    two = train(copy.deepcopy(random_pipe), COUPLE, small(), out=tmp_path / "two", progress=False)
    assert (one.meta["training"]["steps"], one.meta["training"]["batch_size"]) == (3, 1) and len(one.losses) == 3
    assert (two.meta["training"]["steps"], two.meta["training"]["batch_size"]) == (2, 2) and len(two.losses) == 2
    assert "joint_steps" not in two.meta["settings"]  # the steps used are in "training"
    three = train(copy.deepcopy(random_pipe), COUPLE, small(), out=tmp_path / "three", steps=1, progress=False)
    assert len(three.losses) == 1


# ------------------------------------------------------- the wearable's training fix (notebook 09)


class _Pipe:  # what training_set reads of a pipeline: the image size
    class unet:
        class config:
            sample_size = 16
    vae_scale_factor = 4


def test_the_training_fix_adds_people_wearing_the_item_and_seg_mix_only_side_by_side(monkeypatch):
    concepts = [load_concept(s) for s in ("woman_with_red_hair_and_medium_skin", "man_with_curly_hair_and_light_skin",
                                          "billed_cap")]
    phrases = ["cpd woman", "tkb man", "hzp cap"]
    seen = {}

    def record(pipe, images, captions, masks=None, regions=None, phrases=None):
        seen.update(images=images, captions=captions, masks=masks, regions=regions)
    monkeypatch.setattr("mcteach.methods.engine.encode_examples", record)
    engine.training_set(_Pipe, concepts, phrases, Regularizers(composites=6), seed=0)
    own = sum(len(c) for c in concepts)
    extra = seen["captions"][own:]
    assert len(extra) == 12
    side, worn = extra[:6], extra[6:]
    assert all("cpd woman" in c and "tkb man" in c and "hzp cap" not in c for c in side)
    assert all("with a hzp cap" in c and ("cpd woman" in c) != ("tkb man" in c) for c in worn)
    for k in range(own + 6, own + 12):
        regions = seen["regions"][k]
        assert regions[2] is not None and (regions[0] is None) != (regions[1] is None)
        person = regions[0] if regions[0] is not None else regions[1]
        assert (person >= regions[2] - 1e-6).all()                   # the wearer's region holds the item's
    plain = {}
    monkeypatch.setattr("mcteach.methods.engine.encode_examples", lambda pipe, images, captions, *a, **k: plain.update(n=len(captions)))
    engine.training_set(_Pipe, concepts, phrases, Regularizers(), seed=0)
    assert plain["n"] == own

"""The four concept methods and their shared engine, on the tiny architecture with random weights.

Each training here is 2-5 steps at batch 1: enough to move the weights, so that "identical" below is
never trivially true (the tests also check that training changed what it should)."""

import copy
import json
import sys
import types
from importlib.metadata import version

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import AttnProcessor2_0
from packaging.version import Version
from PIL import Image

from mcteach.methods import ceiling, dreambooth, engine, hypernetwork, lora
from mcteach.methods.adapters import load_adapter
from mcteach.methods.catalog import METHODS, train_concept
from mcteach.methods.dreambooth import DreamBooth, class_prompts
from mcteach.methods.textual_inversion import add_placeholder
from mcteach.sd import parts
from mcteach.world import scenes
from mcteach.world.concepts import Concept, ConceptError, load_concept

FAST = {"dreambooth": dict(num_class_images=2, class_steps=2, lr=1e-3, world_prior=False)}  # 2 class images, 2 steps


def fresh(random_pipe):
    """A private copy of the session's random pipeline (training changes a pipeline in place)."""
    return copy.deepcopy(random_pipe)


def quick(pipe, method, out, steps=2, concept="koala", **kw):
    kw = FAST.get(method, {}) | kw
    kw.setdefault("lr", 1e-2)  # large: a couple of steps must change the weights visibly
    return train_concept(pipe, concept, method, out=out, steps=steps, batch_size=1, progress=False, **kw)


@torch.no_grad()
def eps(pipe, prompt="a sks bear on the left"):
    """The UNet's noise prediction for a fixed latent and timestep: sensitive to every weight."""
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    return pipe.unet(z, torch.tensor([500]), pipe.text_encoder(engine.tokenize(pipe, [prompt]))[0]).sample


def images(pipe, prompt):
    return pipe(prompt, num_inference_steps=2, guidance_scale=5.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- engine


def test_step_generator_is_a_pure_function_of_seed_step_and_process():
    draw = lambda *key: torch.rand(3, generator=engine.step_generator(*key))  # noqa: E731
    assert torch.equal(draw(0, 5), draw(0, 5))
    assert not torch.equal(draw(0, 5), draw(0, 6))
    assert not torch.equal(draw(0, 5), draw(1, 5))
    assert not torch.equal(draw(0, 5, 0), draw(0, 5, 1))


def test_images_to_tensor_takes_any_mode_and_size():
    x = parts.images_to_tensor([Image.new("RGBA", (32, 32), (255, 0, 0, 128)), Image.new("L", (80, 80), 0)], 64,
                            Image.LANCZOS)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    assert x[0, 0].eq(1).all() and x[1].eq(-1).all()


def test_training_captions_keep_the_position_words():
    c = load_concept("koala")
    caps = engine.training_captions(c, "<koala>")
    assert caps[:2] == ["a <koala>", "a <koala> on the left"] and len(caps) == len(c)
    bare = Concept("my dog", "my_dog", None, None, c.folder, c.images[:2], c.masks[:2], None)
    assert engine.training_captions(bare, "sks dog") == ["a sks dog", "a sks dog"]


def zero_model(z_t, t, ids):
    """Predicts eps = 0, so the loss is the (weighted) mean of eps^2."""
    return torch.zeros_like(z_t)


def examples(n, masks=None):
    return engine.Examples(torch.randn(n, 4, 16, 16), torch.ones(n, 4, 16, 16),
                           torch.zeros(n, 1, 16, 16) if masks is None else masks, torch.zeros(n, 8, dtype=torch.long),
                           1.0)


def test_mask_weight_weights_the_object_pixels():
    def loss(masks, mask_weight):  # the same draws on every call
        return engine.step_loss(zero_model, DDIMScheduler(), examples(2, masks), None, 0.0,
                                engine.step_generator(0, 0), 2, mask_weight, "cpu")

    ones, zeros = torch.ones(2, 1, 16, 16), torch.zeros(2, 1, 16, 16)
    plain = loss(ones, 0.0)
    assert torch.equal(loss(zeros, 3.0), plain)  # no mask: the plain loss whatever the weight
    torch.testing.assert_close(loss(ones, 3.0), 4 * plain)  # w = 1 + 3 * 1


def test_prior_examples_add_a_weighted_term():
    ex = examples(3)
    losses = [engine.step_loss(zero_model, DDIMScheduler(), ex, ex, w, engine.step_generator(0, 0), 2, 0.0, "cpu")
              for w in (0.0, 1.0, 2.0)]  # the same draws each time: L = L_instance + w L_prior
    assert losses[1] > losses[0]
    torch.testing.assert_close(losses[2] - losses[1], losses[1] - losses[0])


def count_steps(monkeypatch, die_at=None):
    """Count the engine's loss computations; raise KeyboardInterrupt (a kill) in call number ``die_at``."""
    real, calls = engine.step_loss, []

    def counted(*args, **kw):
        calls.append(1)
        if len(calls) == die_at:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(engine, "step_loss", counted)
    return calls


@pytest.mark.parametrize("method", list(METHODS))
def test_resume_after_a_kill_reaches_the_same_weights(random_pipe, tmp_path, monkeypatch, method):
    full = quick(fresh(random_pipe), method, tmp_path / "full", steps=5, checkpoint_every=2)
    count_steps(monkeypatch, die_at=4)  # killed in step 4, after the checkpoint of step 2
    with pytest.raises(KeyboardInterrupt):
        quick(fresh(random_pipe), method, tmp_path / "run", steps=5, checkpoint_every=2)
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    assert torch.load(ckpt, weights_only=True)["step"] == 2 and not list(ckpt.parent.glob("*.tmp"))
    monkeypatch.undo()
    calls = count_steps(monkeypatch)
    resumed = quick(fresh(random_pipe), method, tmp_path / "run", steps=5, checkpoint_every=2, resume=True)
    assert len(calls) == 3  # steps 3-5 only
    assert resumed.losses == full.losses and len(full.losses) == 5
    a, b = (torch.load(p / "checkpoints" / "last.pt", weights_only=True) for p in (tmp_path / "full", tmp_path / "run"))
    assert a["step"] == b["step"] == 5
    assert_same(a["params"], b["params"])


def test_cosine_schedule_decays_to_zero_and_resumes_exactly(random_pipe, tmp_path, monkeypatch):
    assert [round(engine.lr_at(s, 4, 1e-3, "cosine") / 1e-3, 4) for s in range(4)] == [1.0, 0.8536, 0.5, 0.1464]
    assert engine.lr_at(3, 4, 1e-3, "constant") == 1e-3
    full = quick(fresh(random_pipe), "lora", tmp_path / "full", steps=5, checkpoint_every=2, lr_schedule="cosine")
    constant = quick(fresh(random_pipe), "lora", tmp_path / "constant", steps=5, checkpoint_every=2)
    assert full.losses[:1] == constant.losses[:1] and full.losses[1:] != constant.losses[1:]
    count_steps(monkeypatch, die_at=4)
    with pytest.raises(KeyboardInterrupt):
        quick(fresh(random_pipe), "lora", tmp_path / "run", steps=5, checkpoint_every=2, lr_schedule="cosine")
    monkeypatch.undo()
    resumed = quick(fresh(random_pipe), "lora", tmp_path / "run", steps=5, checkpoint_every=2, lr_schedule="cosine",
                    resume=True)
    assert resumed.losses == full.losses and resumed.meta["settings"]["lr_schedule"] == "cosine"


def test_resume_refuses_another_run(random_pipe, tmp_path):
    quick(fresh(random_pipe), "lora", tmp_path, steps=1)
    with pytest.raises(ValueError, match="lora checkpoint with seed 0"):
        quick(fresh(random_pipe), "hypernetwork", tmp_path, steps=2, resume=True)
    with pytest.raises(ValueError, match="does not match"):
        quick(fresh(random_pipe), "lora", tmp_path, steps=2, resume=True, rank=2)
    other_base = fresh(random_pipe)
    with torch.no_grad():
        other_base.unet.conv_in.weight.add_(0.01)  # another base model of the same architecture (a retrained one)
    with pytest.raises(ValueError, match="another base model"):
        quick(other_base, "lora", tmp_path, steps=2, resume=True)


def test_a_run_writes_adapter_json_and_freezes_everything(random_pipe, tmp_path):
    pipe = fresh(random_pipe)
    r = quick(pipe, "lora", tmp_path, steps=3, rank=2)
    meta = json.loads((tmp_path / "adapter.json").read_text())
    assert meta["method"] == "lora" and meta["phrase"] == r.phrase == "bbm bear" and meta["class_word"] == "bear"
    assert meta["settings"]["rank"] == 2 and meta["training"]["steps"] == 3 and meta["concept"] == "koala"
    assert meta == r.meta and set(meta["files"]) == {"diffusers", "kohya"} and len(r.losses) == 3 and r.seconds > 0
    assert not any(p.requires_grad for m in (pipe.unet, pipe.text_encoder, pipe.vae) for p in m.parameters())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(method="dreamboth"), ValueError, "unknown method 'dreamboth'; choose one of textual_inversion, hyper"),
    (dict(method="lora", rnk=4), ValueError, "unexpected keyword argument 'rnk'"),
    (dict(method="lora", concept="no/such/folder"), ConceptError, "not found"),
    (dict(method="lora", steps=0), ValueError, "steps >= 1"),
    (dict(method="lora", rank=0), ValueError, "rank must be >= 1"),
    (dict(method="lora", lr_schedule="linear"), ValueError, "unknown lr_schedule 'linear'; choose one of constant, cos"),
    (dict(method="textual_inversion", num_vectors=0), ValueError, "num_vectors"),
    (dict(method="hypernetwork", activation="gelu2"), ValueError, "unknown activation"),
    (dict(method="hypernetwork", layer_structure=[2, 1]), ValueError, "start and end with 1"),
])
def test_bad_input_is_refused_clearly(random_pipe, tmp_path, kwargs, error, match):
    kwargs = {"concept": "koala", "steps": 1, **kwargs}
    with pytest.raises(error, match=match):
        train_concept(fresh(random_pipe), out=tmp_path, progress=False, **kwargs)


def test_folders_without_images_or_class_word_are_refused(random_pipe, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConceptError, match="no images"):
        quick(fresh(random_pipe), "lora", tmp_path / "out", concept=tmp_path / "empty")
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ConceptError, match="cannot read image"):
        quick(fresh(random_pipe), "lora", tmp_path / "out", concept=photos)
    (photos / "broken.png").unlink()
    load_concept("koala").images[0].save(photos / "a.jpg")
    load_concept("koala").images[1].convert("RGBA").resize((100, 80)).save(photos / "b.png")
    resized = r"b.png \(100x80: centre-cropped to a square and resized\)"  # any size and mode is accepted
    with pytest.warns(UserWarning, match=resized), pytest.raises(ValueError, match="class word"):
        quick(fresh(random_pipe), "dreambooth", tmp_path / "out", concept=photos)
    with pytest.warns(UserWarning, match=resized):
        r = quick(fresh(random_pipe), "lora", tmp_path / "out", concept=photos, class_word="bear", steps=1)
    assert r.phrase == "qjx bear" and r.meta["name"] == "photos"


def test_half_precision_pipelines_are_refused(random_pipe, tmp_path):
    with pytest.raises(ValueError, match="float32"):
        quick(fresh(random_pipe).to(dtype=torch.float16), "lora", tmp_path)


def test_load_adapter_needs_adapter_json(random_pipe, tmp_path):
    with pytest.raises(ValueError, match="no adapter.json"):
        load_adapter(fresh(random_pipe), tmp_path)
    (tmp_path / "adapter.json").write_text(json.dumps({"method": "magic"}))
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        load_adapter(fresh(random_pipe), tmp_path)


def test_a_split_batch_is_the_whole_batch_in_slices():
    """Process i of n computes slice i of the same draws: the slices' inputs are the whole batch's, and the mean
    of their losses is its loss (instances and class images alike)."""
    seen = []

    def recording(z_t, t, ids):
        seen.append((z_t, t, ids))
        return torch.zeros_like(z_t)

    ex, prior = examples(5), examples(3)
    ex.input_ids = torch.arange(5 * 8).reshape(5, 8)  # each example its own ids
    loss = lambda shard: engine.step_loss(recording, DDIMScheduler(), ex, prior, 0.5,  # noqa: E731
                                          engine.step_generator(0, 0), 4, 0.0, "cpu", shard=shard)
    whole = loss((0, 1))
    halves = [loss((i, 2)) for i in range(2)]
    torch.testing.assert_close(sum(halves) / 2, whole)
    (z, t, ids), (z0, t0, ids0), (z1, t1, ids1) = seen
    order = [0, 1, 4, 5, 2, 3, 6, 7]  # instances 0-3, then class images 4-7; each half takes two of each
    for full, a, b in ((z, z0, z1), (t, t0, t1), (ids, ids0, ids1)):
        assert torch.equal(torch.cat([a, b]), full[order])


def test_images_are_encoded_in_chunks_alike(random_pipe, monkeypatch):
    c = load_concept("koala")
    whole = engine.encode_examples(random_pipe, c.images[:3], ["a bear"] * 3)
    monkeypatch.setattr(engine, "ENCODE_PIXELS", 64 * 64)  # one image per VAE call
    chunked = engine.encode_examples(random_pipe, c.images[:3], ["a bear"] * 3)
    # equal up to float rounding: with several threads a convolution's sums are ordered by the batch size
    # (measured: at most 1.7e-4 apart on 2 threads); a chunking mistake (order, scaling) would be O(1) apart
    torch.testing.assert_close(chunked.mean, whole.mean, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(chunked.std, whole.std, atol=1e-3, rtol=1e-3)


def one_step_gradients(random_pipe, method, settings, checkpointing):
    """The trainable parameters' gradients after one ``step_loss`` (batch 2), and how often the first layer of a
    UNet ResNet and of a text-encoder layer ran (a checkpointed block runs again in the backward pass)."""
    pipe, concept = fresh(random_pipe), load_concept("koala")
    for part in (pipe.vae, pipe.text_encoder, pipe.unet):
        part.requires_grad_(False)
    m = METHODS[method](**settings)
    torch.manual_seed(0)
    model = engine.Denoiser(pipe.unet, pipe.text_encoder, m.setup(pipe, concept).module).train()
    data = engine.encode_examples(pipe, concept.images, engine.training_captions(concept, m.phrase(concept)))
    calls = {"unet": 0, "text": 0}
    count = lambda key: lambda *_: calls.__setitem__(key, calls[key] + 1)  # noqa: E731
    # the first layer of checkpointed blocks whose input needs a gradient (after the first attention block), as a
    # recomputation stops once it has what the backward pass needs
    pipe.unet.down_blocks[1].resnets[0].norm1.register_forward_hook(count("unet"))
    text_norm = next(m for n, m in pipe.text_encoder.named_modules() if n.endswith("layers.0.layer_norm1"))
    text_norm.register_forward_hook(count("text"))
    with engine.gradient_checkpointing_on(pipe.unet, pipe.text_encoder, enabled=checkpointing):
        loss = engine.step_loss(model, pipe.scheduler, data, None, 0.0, engine.step_generator(0, 0), 2, 0.0, "cpu")
        loss.backward()
    assert not pipe.unet.is_gradient_checkpointing  # switched off again afterwards
    assert not any(getattr(x, "gradient_checkpointing", False) for x in pipe.text_encoder.modules())
    assert getattr(pipe.text_encoder, "_require_grads_hook", None) is None
    return loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, calls


@pytest.mark.parametrize("method, settings, text_recomputed", [
    ("lora", {}, False),  # a frozen text encoder is not checkpointed
    ("lora", {"text_encoder": True}, True),
    ("textual_inversion", {}, True),
    ("hypernetwork", {}, False),
    ("dreambooth", {"prior_weight": 0.0}, True),
])
def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(random_pipe, method, settings,
                                                                        text_recomputed):
    loss, grads, calls = one_step_gradients(random_pipe, method, settings, checkpointing=False)
    loss_c, grads_c, calls_c = one_step_gradients(random_pipe, method, settings, checkpointing=True)
    assert calls == {"unet": 1, "text": 1}
    assert calls_c == {"unet": 2, "text": 2 if text_recomputed else 1}
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=0)
    assert grads_c.keys() == grads.keys() and all(g is not None for g in [*grads.values(), *grads_c.values()])
    assert any(g.abs().sum() > 0 for g in grads.values())  # (zero-initialised layers get none at first)
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-5, atol=1e-8, msg=name)


def test_training_with_gradient_checkpointing_reaches_the_same_weights(random_pipe, tmp_path):
    runs = [quick(fresh(random_pipe), "lora", tmp_path / str(on), steps=3, text_encoder=True,
                  gradient_checkpointing=on) for on in (False, True)]
    params = [torch.load(tmp_path / str(on) / "checkpoints" / "last.pt", weights_only=True)["params"]
              for on in (False, True)]
    torch.testing.assert_close(runs[1].losses, runs[0].losses, rtol=1e-6, atol=0)
    assert params[0].keys() == params[1].keys()
    for name in params[0]:  # Adam turns float noise in a near-zero gradient into a step of up to lr (1e-2)
        torch.testing.assert_close(params[1][name], params[0][name], rtol=0, atol=1e-3, msg=name)
    assert len(runs[1].step_seconds) == 3 and "optimizer" not in runs[1].meta["training"]


def test_8bit_adam_without_bitsandbytes_is_a_clear_error(random_pipe, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes raises ImportError
    pipe = fresh(random_pipe)
    with pytest.raises(ImportError, match=r"use_8bit_adam needs bitsandbytes \(`pip install bitsandbytes`"):
        quick(pipe, "lora", tmp_path / "out", use_8bit_adam=True)
    assert not (tmp_path / "out").exists() and not any("lora_" in n for n, _ in pipe.unet.named_parameters())
    from mcteach.cli import main

    assert main(["train", "--method", "lora", "--concept", "koala", "--out", str(tmp_path / "cli"), "--steps", "1",
                 "--use-8bit-adam"]) == 2
    assert "error: use_8bit_adam needs bitsandbytes" in capsys.readouterr().err


def test_8bit_adam_is_bitsandbytes_adamw8bit(random_pipe, tmp_path, monkeypatch):
    made = []

    class AdamW8bit(torch.optim.AdamW):  # stands in for bitsandbytes' (which needs CUDA)
        def __init__(self, params, **kw):
            made.append(kw)
            super().__init__(params, **kw)

    monkeypatch.setattr(engine, "_bitsandbytes", lambda: types.SimpleNamespace(optim=types.SimpleNamespace(
        AdamW8bit=AdamW8bit)))
    r = quick(fresh(random_pipe), "lora", tmp_path, steps=1, use_8bit_adam=True)
    assert made == [{"lr": 1e-2, "weight_decay": 0.0}]
    assert r.meta["training"]["optimizer"] == "bitsandbytes.optim.AdamW8bit"


def test_the_command_line_passes_the_memory_options(monkeypatch, tmp_path):
    import mcteach.cli
    from mcteach.cli import main

    seen = {}

    def fake_train(pipe, concept, method, **kw):
        seen.update(kw)
        return engine.TrainResult(method, "bbm bear", [0.5], tmp_path, {})

    monkeypatch.setattr(mcteach.cli, "train_concept", fake_train)
    assert main(["train", "--method", "lora", "--concept", "koala", "--out", str(tmp_path),
                 "--gradient-checkpointing", "--use-8bit-adam"]) == 0
    assert seen["gradient_checkpointing"] and seen["use_8bit_adam"] and seen["accelerator"] is None
    assert main(["train", "--method", "lora", "--concept", "koala", "--out", str(tmp_path)]) == 0
    assert seen["gradient_checkpointing"] is None and seen["use_8bit_adam"] is None  # the engine decides


def test_small_gpu_defaults_switch_memory_savers_on_only_for_a_small_cuda_gpu(monkeypatch):
    import importlib.util
    from types import SimpleNamespace

    assert engine.small_gpu_defaults("cpu") == {"gradient_checkpointing": False, "use_8bit_adam": False}
    for gib, small in ((15, True), (80, False)):  # a Colab T4; an H100
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d, g=gib: SimpleNamespace(total_memory=g * 2**30))
        for bnb in (True, False):
            monkeypatch.setattr(importlib.util, "find_spec", lambda name, b=bnb: object() if b else None)
            assert engine.small_gpu_defaults("cuda:0") == {"gradient_checkpointing": small, "use_8bit_adam": small and bnb}


# ---------------------------------------------------------------- Textual Inversion


def test_ti_initialises_new_rows_from_the_class_word(random_pipe):
    pipe = fresh(random_pipe)
    emb = lambda: pipe.text_encoder.get_input_embeddings().weight  # noqa: E731
    word = lambda w: emb()[pipe.tokenizer(w, add_special_tokens=False).input_ids]  # noqa: E731
    ids = add_placeholder(pipe.tokenizer, pipe.text_encoder, ["<p>", "<p>_1"], "red apple")  # 2 tokens, 2 vectors
    assert torch.equal(emb()[ids], word("red apple"))
    ids = add_placeholder(pipe.tokenizer, pipe.text_encoder, ["<q>", "<q>_1", "<q>_2"], "red apple")
    assert torch.equal(emb()[ids], word("red apple").mean(0).expand(3, -1))
    assert pipe.tokenizer.tokenize("a <q> on the left") == ["a</w>", "<q>", "on</w>", "the</w>", "left</w>"]


def test_ti_trains_only_the_new_rows(random_pipe, tmp_path):
    pipe = fresh(random_pipe)
    before = {m: state(getattr(pipe, m)) for m in ("unet", "vae", "text_encoder")}
    r = quick(pipe, "textual_inversion", tmp_path, steps=3, num_vectors=2)
    assert_same(state(pipe.unet), before["unet"])
    assert_same(state(pipe.vae), before["vae"])
    after = state(pipe.text_encoder)
    key = next(k for k in after if k.endswith("token_embedding.weight"))
    old, new = before["text_encoder"].pop(key), after.pop(key)
    assert_same(after, before["text_encoder"])
    assert new.shape[0] == old.shape[0] + 2 and torch.equal(new[: len(old)], old)
    bear = old[pipe.tokenizer("bear", add_special_tokens=False).input_ids[0]]
    assert not torch.equal(new[-1], bear) and not torch.equal(new[-2], bear)  # moved from the initialisation
    assert r.phrase == "<koala>" and r.meta["tokens"] == ["<koala>", "<koala>_1"]


@pytest.mark.parametrize("num_vectors", [1, 2])
def test_ti_files_load_in_diffusers_and_give_the_same_images(random_pipe, tmp_path, num_vectors):
    pipe = fresh(random_pipe)
    quick(pipe, "textual_inversion", tmp_path, num_vectors=num_vectors)
    prompt = "a <koala> on the left"
    want = images(pipe, prompt)
    assert not np.array_equal(want, images(random_pipe, "a bear on the left"))
    embeds = safetensors.torch.load_file(tmp_path / "learned_embeds.safetensors")
    assert list(embeds) == ["<koala>"] and embeds["<koala>"].shape == (num_vectors, 128)
    a1111 = torch.load(tmp_path / "koala.pt", weights_only=True)
    assert torch.equal(a1111["string_to_param"]["*"], embeds["<koala>"])
    assert a1111["name"] == "<koala>" and a1111["step"] == 2
    for file in ("learned_embeds.safetensors", "koala.pt"):
        other = fresh(random_pipe)
        other.load_textual_inversion(str(tmp_path / file))
        assert np.array_equal(images(other, prompt), want), file
    other = fresh(random_pipe)
    assert load_adapter(other, tmp_path)["phrase"] == "<koala>"
    assert np.array_equal(images(other, prompt), want)


def test_ti_refuses_a_token_the_tokenizer_has(random_pipe, tmp_path):
    pipe = fresh(random_pipe)
    quick(pipe, "textual_inversion", tmp_path, steps=1)
    with pytest.raises(ValueError, match="'<koala>' is already in the tokenizer's vocabulary"):
        quick(pipe, "textual_inversion", tmp_path, steps=1)  # the same pipeline twice
    with pytest.raises(ValueError, match="'bear' is already"):
        quick(fresh(random_pipe), "textual_inversion", tmp_path, token="bear")
    with pytest.raises(ValueError, match="does not tokenize to known tokens"):
        quick(fresh(random_pipe), "textual_inversion", tmp_path, class_word=" ")


# ---------------------------------------------------------------- LoRA


def test_lora_at_initialisation_is_the_base_model(random_pipe):
    pipe = fresh(random_pipe)
    METHODS["lora"](text_encoder=True).setup(pipe, load_concept("koala"))
    assert any("lora_B" in n for n, _ in pipe.unet.named_parameters())
    assert torch.equal(eps(pipe), eps(random_pipe))


def test_lora_targets_choose_the_layers(random_pipe):
    for targets, count in ((lora.UNET_TARGETS, 56), (lora.UNET_TRANSFORMER_TARGETS, 84), (["to_k", "to_v"], 28)):
        pipe = fresh(random_pipe)
        METHODS["lora"](targets=targets).setup(pipe, load_concept("koala"))
        names = [n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A")]
        assert len(names) == count and all(n.endswith(tuple(targets)) for n in names)
    with pytest.raises(ValueError, match="no UNet layer is named 'to_z'"):
        METHODS["lora"](targets=["to_q", "to_z"]).setup(fresh(random_pipe), load_concept("koala"))


@pytest.mark.parametrize("text_encoder", [False, True])
def test_lora_trains_only_lora_weights(random_pipe, tmp_path, text_encoder):
    pipe = fresh(random_pipe)
    before = {m: state(getattr(pipe, m)) for m in ("unet", "vae", "text_encoder")}
    quick(pipe, "lora", tmp_path, text_encoder=text_encoder)
    with lora.disabled(pipe):  # every adapter off: the base model
        assert torch.equal(eps(pipe), eps(random_pipe))
    assert_same(state(pipe.vae), before["vae"])
    for m in ("unet", "text_encoder"):
        after = state(getattr(pipe, m))
        lora_keys = [k for k in after if "lora_" in k]
        assert bool(lora_keys) == (m == "unet" or text_encoder)
        assert_same({k.replace("base_layer.", ""): v for k, v in after.items() if "lora_" not in k}, before[m])
        assert all(after[k].abs().sum() > 0 for k in lora_keys if "lora_B" in k)  # B left zero


def test_lora_files_load_in_diffusers_and_kohya_form(random_pipe, tmp_path):
    pipe = fresh(random_pipe)
    quick(pipe, "lora", tmp_path, rank=2, alpha=3.0)
    want = eps(pipe)
    assert not torch.equal(want, eps(random_pipe))
    for weight_name in ("pytorch_lora_weights.safetensors", "koala_kohya.safetensors"):
        other = fresh(random_pipe)
        other.load_lora_weights(str(tmp_path), weight_name=weight_name, adapter_name="k")
        assert torch.equal(eps(other), want), weight_name
    other = fresh(random_pipe)
    load_adapter(other, tmp_path)
    assert np.array_equal(images(other, "a sks bear"), images(pipe, "a sks bear"))


@pytest.mark.skipif(Version(version("peft")) < Version("0.22"),
                    reason="transformers 5 loads text-encoder LoRAs through its peft integration, peft >= 0.22")
def test_text_encoder_lora_loads_in_diffusers(random_pipe, tmp_path):
    pipe = fresh(random_pipe)
    quick(pipe, "lora", tmp_path, text_encoder=True)
    for weight_name in ("pytorch_lora_weights.safetensors", "koala_kohya.safetensors"):
        other = fresh(random_pipe)
        other.load_lora_weights(str(tmp_path), weight_name=weight_name, adapter_name="k")
        assert torch.equal(eps(other), eps(pipe)), weight_name


def test_kohya_keys_are_complete_and_well_formed(random_pipe, tmp_path):
    pipe = fresh(random_pipe)
    quick(pipe, "lora", tmp_path, steps=1, rank=2, alpha=3.0, text_encoder=True)
    kohya = safetensors.torch.load_file(tmp_path / "koala_kohya.safetensors")
    modules = {n: m for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A")}
    te = {n: m for n, m in pipe.text_encoder.named_modules() if hasattr(m, "lora_A")}
    assert all(n.endswith(lora.UNET_TRANSFORMER_TARGETS) for n in modules)
    assert all(n.endswith(lora.TEXT_ENCODER_TARGETS) for n in te)
    assert len(modules) == 84 and len(te) == 12  # 7 transformer blocks x 12 layers; 3 encoder layers x 4
    expected = {f"lora_unet_{n.replace('.', '_')}": m for n, m in modules.items()}
    expected |= {f"lora_te_text_model_{n.removeprefix('text_model.').replace('.', '_')}": m for n, m in te.items()}
    assert set(kohya) == {f"{k}.{s}" for k in expected for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    for name, m in expected.items():
        assert torch.equal(kohya[f"{name}.lora_down.weight"], m.lora_A["koala"].weight)  # (r, in)
        assert torch.equal(kohya[f"{name}.lora_up.weight"], m.lora_B["koala"].weight)  # (out, r)
        assert kohya[f"{name}.alpha"].item() == 3.0
    one = lora.to_kohya({"mid_block.attn.to_out.0.lora_B.weight": torch.ones(2, 3)}, 4.0, prefix="lora_te")
    assert list(one) == ["lora_te_mid_block_attn_to_out_0.lora_up.weight", "lora_te_mid_block_attn_to_out_0.alpha"]
    with pytest.raises(ValueError, match="not a LoRA weight"):
        lora.to_kohya({"to_q.weight": torch.zeros(1)}, 4.0)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # peft's note on a second adapter
def test_several_loras_switch_and_weight(random_pipe, tmp_path):
    koala, hamster = fresh(random_pipe), fresh(random_pipe)
    quick(koala, "lora", tmp_path / "koala")
    quick(hamster, "lora", tmp_path / "hamster", concept="hamster")
    both = fresh(random_pipe)
    assert load_adapter(both, tmp_path / "koala")["adapter_name"] == "koala"
    load_adapter(both, tmp_path / "hamster")
    both.set_adapters(["koala"])
    assert torch.equal(eps(both), eps(koala))
    both.set_adapters(["koala", "hamster"], adapter_weights=[0.0, 1.0])
    assert torch.equal(eps(both), eps(hamster))
    both.set_adapters(["koala", "hamster"], adapter_weights=[1.0, 1.0])
    assert not torch.equal(eps(both), eps(koala)) and not torch.equal(eps(both), eps(hamster))
    with lora.disabled(both):
        assert torch.equal(eps(both), eps(random_pipe))
    assert not torch.equal(eps(both), eps(random_pipe))


# ---------------------------------------------------------------- HyperNetwork


def test_hypernetwork_at_initialisation_or_zero_strength_is_the_base_model(random_pipe, tmp_path):
    pipe = fresh(random_pipe)
    base = images(random_pipe, "a bear")
    hypernetwork.attach(pipe, hypernetwork.HypernetworkLayers([]))  # no MLP at all: our processor == diffusers'
    assert np.array_equal(images(pipe, "a bear"), base)
    hypernetwork.detach(pipe)
    quick(pipe, "hypernetwork", tmp_path)
    (hn,) = hypernetwork.attached(pipe)
    assert not np.array_equal(images(pipe, "a bear"), base)
    hn.strength = 0.0
    assert np.array_equal(images(pipe, "a bear"), base)
    fresh_hn = hypernetwork.HypernetworkLayers([128])
    c = torch.randn(2, 128)
    assert all(torch.equal(m(c), c) for pair in fresh_hn.layers.values() for m in pair)


def test_hypernetwork_trains_only_its_mlps_on_cross_attention(random_pipe, tmp_path):
    pipe = fresh(random_pipe)
    before = {m: state(getattr(pipe, m)) for m in ("unet", "vae", "text_encoder")}
    init = hypernetwork.HypernetworkLayers([128])  # what setup builds under the same seed
    r = quick(pipe, "hypernetwork", tmp_path)
    for m in before:
        assert_same(state(getattr(pipe, m)), before[m])
    (hn,) = hypernetwork.attached(pipe)
    assert r.phrase == "bear" and list(hn.layers) == ["128"]
    assert not torch.equal(hn.layers["128"][0].linear[2].weight, init.layers["128"][0].linear[2].weight)
    procs = pipe.unet.attn_processors
    is_hn = {n: isinstance(p, hypernetwork.HypernetworkProcessor) for n, p in procs.items()}
    assert all(hn == n.endswith("attn2.processor") for n, hn in is_hn.items())
    assert all(isinstance(p, AttnProcessor2_0) for n, p in procs.items() if n.endswith("attn1.processor"))


def test_hypernetwork_file_is_the_webui_layout_and_round_trips(random_pipe, tmp_path):
    pipe = fresh(random_pipe)
    quick(pipe, "hypernetwork", tmp_path)
    saved = torch.load(tmp_path / "koala.pt", weights_only=True)  # plain types only
    assert set(saved) >= {128, "layer_structure", "activation_func", "name", "step"}
    assert saved["layer_structure"] == [1, 2, 1] and saved["activation_func"] == "relu" and saved["step"] == 2
    k, v = saved[128]
    assert set(k) == set(v) == {"linear.0.weight", "linear.0.bias", "linear.2.weight", "linear.2.bias"}
    assert k["linear.0.weight"].shape == (256, 128) and k["linear.2.weight"].shape == (128, 256)
    other = fresh(random_pipe)
    load_adapter(other, tmp_path)
    assert np.array_equal(images(other, "a bear"), images(pipe, "a bear"))


def test_free_context_starts_as_the_base_model_trains_only_offsets_and_round_trips(random_pipe, tmp_path):
    pipe = fresh(random_pipe)
    base = images(random_pipe, "a bear")
    before = {m: state(getattr(pipe, m)) for m in ("unet", "vae", "text_encoder")}
    method = ceiling.FreeContext()
    offsets = method.setup(pipe, load_concept("koala")).module
    assert np.array_equal(images(pipe, "a bear"), base)  # zero offsets: exactly the base model
    assert sum(p.numel() for p in offsets.parameters()) == 2 * 7 * 32 * 128  # K and V, 7 cross-attention layers
    pipe = fresh(random_pipe)
    r = engine.train(pipe, "koala", ceiling.FreeContext(), out=tmp_path, steps=2, batch_size=1, lr=1e-2,
                     progress=False)
    assert r.phrase == "bear" and "free_context" not in METHODS  # a measuring stick, not a user method
    for m in before:
        assert_same(state(getattr(pipe, m)), before[m])
    assert not np.array_equal(images(pipe, "a bear"), base)
    other = fresh(random_pipe)
    ceiling.FreeContext.load(other, tmp_path, r.meta)
    assert np.array_equal(images(other, "a bear"), images(pipe, "a bear"))


def test_hypernetworks_chain_and_detach(random_pipe):
    pipe = fresh(random_pipe)
    a, b = hypernetwork.HypernetworkLayers([128]), hypernetwork.HypernetworkLayers([128], activation="linear")
    for hn in (a, b):
        hn.layers["128"][0].linear[-1].weight.data.normal_(std=0.1)
        hypernetwork.attach(pipe, hn)
    assert hypernetwork.attached(pipe) == [a, b]
    c = torch.randn(1, 4, 128)
    assert torch.equal(b(*a(c, c))[0], a.layers["128"][0](c) + b.layers["128"][0].linear(a.layers["128"][0](c)))
    assert not torch.equal(eps(pipe), eps(random_pipe))
    hypernetwork.detach(pipe)
    assert hypernetwork.attached(pipe) == [] and torch.equal(eps(pipe), eps(random_pipe))


# ---------------------------------------------------------------- DreamBooth


@pytest.mark.parametrize("text_encoder", [False, True])
def test_dreambooth_trains_the_unet_and_optionally_the_text_encoder(random_pipe, tmp_path, text_encoder):
    pipe = fresh(random_pipe)
    before = {m: state(getattr(pipe, m)) for m in ("unet", "vae", "text_encoder")}
    r = quick(pipe, "dreambooth", tmp_path, text_encoder=text_encoder)
    assert r.phrase == "bbm bear"
    assert_same(state(pipe.vae), before["vae"])
    changed = {k for k, v in state(pipe.unet).items() if not torch.equal(v, before["unet"][k])}
    assert len(changed) > len(before["unet"]) // 2
    te_same = all(torch.equal(v, before["text_encoder"][k]) for k, v in state(pipe.text_encoder).items())
    assert te_same != text_encoder


def test_dreambooth_saves_fp16_parts_that_load_with_the_base(random_pipe, tmp_path):
    from diffusers import UNet2DConditionModel

    pipe = fresh(random_pipe)
    quick(pipe, "dreambooth", tmp_path, text_encoder=True)
    saved = safetensors.torch.load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.float16}
    rounded = fresh(pipe)  # the trained pipeline with its weights rounded to fp16, as saved
    rounded.unet.half().float()
    rounded.text_encoder.half().float()
    other = fresh(random_pipe)
    load_adapter(other, tmp_path)
    assert torch.equal(eps(other), eps(rounded)) and not torch.equal(eps(other), eps(random_pipe))
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet", dtype=torch.float32)  # plain diffusers
    assert_same(state(unet), state(rounded.unet))


def test_dreambooth_class_images_are_generated_once(random_pipe, tmp_path, monkeypatch):
    assert class_prompts("bear", 3) == ["a bear", "a bear on the left", "a bear on the right"]
    quick(fresh(random_pipe), "dreambooth", tmp_path, steps=1)
    pngs = sorted((tmp_path / "class_images").glob("*.png"))
    assert [p.name for p in pngs] == ["00.png", "01.png"]
    import mcteach.methods.dreambooth

    monkeypatch.setattr(mcteach.methods.dreambooth, "generate", lambda *a, **k: pytest.fail("regenerated class images"))
    quick(fresh(random_pipe), "dreambooth", tmp_path, steps=1)  # the cache is used
    quick(fresh(random_pipe), "dreambooth", tmp_path / "noprior", steps=1, prior_weight=0.0)  # none needed
    assert not (tmp_path / "noprior" / "class_images").exists()


def test_dreambooth_world_prior_adds_one_prompt_per_base_class(random_pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(dreambooth, "class_images", lambda pipe, prompts, folder, **kw: [None] * len(prompts))
    koala = load_concept("koala")
    _, prompts, weight = DreamBooth(num_class_images=3).prior(random_pipe, koala, tmp_path)  # world_prior: default
    assert weight == 1.0 and prompts[:3] == class_prompts("bear", 3) == ["a bear", "a bear on the left",
                                                                         "a bear on the right"]
    sample = dreambooth.world_prior_sample(scenes.BASE_CLASSES, 60)
    assert prompts[3:] == [scenes.caption([(e, "centre")]) for e in sample] and len(prompts) == 63
    assert len({e.name for e in sample}) == 60 and set(sample) <= set(scenes.BASE_CLASSES)
    assert sample == dreambooth.world_prior_sample(scenes.BASE_CLASSES, 60)  # the same sample for every concept
    assert [e.category for e in sample].count("person") >= 10  # a spread of the world, not its first 60
    _, prompts, _ = DreamBooth(num_class_images=3, world_prior_classes=500).prior(random_pipe, koala, tmp_path)
    assert prompts[3:] == [scenes.caption([(e, "centre")]) for e in scenes.BASE_CLASSES]  # a smaller world: all of it
    _, prompts, _ = DreamBooth(num_class_images=3, world_prior=False).prior(random_pipe, koala, tmp_path)
    assert prompts == class_prompts("bear", 3)  # the paper's prior: the class only
    _, prompts, _ = DreamBooth(num_class_images=3, world="classic").prior(random_pipe, koala, tmp_path)
    assert prompts[3:] == [scenes.caption([(e, "centre")]) for e in scenes.CLASSIC_CLASSES]  # another world's classes
    with pytest.raises(ValueError, match="unknown world 'tiny'"):
        DreamBooth(num_class_images=3, world="tiny").prior(random_pipe, koala, tmp_path)


# ---------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def model_dir(random_pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    random_pipe.save_pretrained(path)
    return path


def test_cli_trains_and_generates_with_the_adapter(model_dir, tmp_path, capsys):
    from mcteach.cli import main
    from mcteach.sd.pipeline import generate, load_pipeline

    out = tmp_path / "koala-lora"
    args = ["train", "--method", "lora", "--concept", "koala", "--out", str(out), "--steps", "2",
            "--model", str(model_dir)]
    assert main(args) == 0
    assert "bbm bear" in capsys.readouterr().out and (out / "adapter.json").is_file()
    image = tmp_path / "k.png"
    assert main(["generate", "--model", str(model_dir), "--adapter", str(out), "--prompt", "a bbm bear",
                 "--steps", "2", "--out", str(image), "--device", "cpu"]) == 0
    pipe = load_pipeline(model_dir, device="cpu")
    load_adapter(pipe, out)
    assert np.array_equal(np.asarray(Image.open(image)), np.asarray(generate(pipe, "a bbm bear", steps=2)[0]))


def test_cli_errors_are_one_line(model_dir, tmp_path, capsys):
    from mcteach.cli import main

    assert main(["train", "--method", "lora", "--concept", str(tmp_path / "nope"), "--out", str(tmp_path),
                 "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: concept folder") and "Traceback" not in err
    assert main(["generate", "--model", str(model_dir), "--adapter", str(tmp_path), "--prompt", "a fox",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "no adapter.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--method", "magic", "--concept", "koala", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'magic'" in err and all(f"'{m}'" in err for m in METHODS)  # the CLI lists every method


def test_the_shipped_adapters_are_the_listed_ones_and_fit_the_shipped_model(pipe):
    """data/adapters holds exactly methods.SHIPPED, each trained on the embedded model as it is now (a retrained
    base model needs `methods.retrain_shipped()`: an adapter of another base fails check_base)."""
    from mcteach.methods.adapters import check_base, read_adapter
    from mcteach.methods.shipped import SHIPPED
    from mcteach.paths import ADAPTERS_DIR

    expected = {(f"{m}-fix" if fix else m, "+".join(c)) for m, c, fix in SHIPPED}
    assert {(d.parent.name, d.name) for d in ADAPTERS_DIR.glob("*/*") if d.is_dir()} == expected
    for kind, name in expected:
        folder = ADAPTERS_DIR / kind / name
        check_base(pipe, read_adapter(folder), folder)


def test_denoising_loss_is_repeatable_and_splits_by_timestep(random_pipe):
    """The same phrase and seed give the same loss; the parts (nearly clean first) average to it; another phrase
    conditions the UNet differently; a schedule that does not split evenly is refused."""
    from mcteach.methods.engine import denoising_loss

    total, parts = denoising_loss(random_pipe, "koala", "bear", timesteps=8)
    assert denoising_loss(random_pipe, "koala", "bear", timesteps=8) == (total, parts)
    assert len(parts) == 4 and np.isclose(np.mean(parts), total)
    assert denoising_loss(random_pipe, "koala", "cat", timesteps=8)[0] != total
    with pytest.raises(ValueError, match="equal parts"):
        denoising_loss(random_pipe, "koala", "bear", timesteps=10)


@pytest.mark.parametrize("method", ["textual_inversion", "hypernetwork", "dreambooth", "lora"])
def test_setup_leaves_the_settings_as_they_were(random_pipe, method):
    """Settings are data: setup returns the run's state and writes nothing onto the settings object."""
    m = METHODS[method]()
    before = dict(vars(m))
    run = m.setup(fresh(random_pipe), load_concept("koala"))
    assert vars(m) == before and isinstance(run, engine.Run)
    assert m.settings() == METHODS[method]().settings() and "lr_schedule" in m.settings()

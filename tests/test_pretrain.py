"""Pretraining: deterministic data stream, atomic checkpoints, and resume == uninterrupted run."""

import json

import pytest
import torch

from mcteach.cli import main as cli_main
from mcteach.sd import pretrain


def test_scene_batches_are_a_function_of_the_step():
    a, ma, ca = pretrain.scene_batch(5, 4, seed=1)
    b, mb, cb = pretrain.scene_batch(5, 4, seed=1)
    c, _, _ = pretrain.scene_batch(6, 4, seed=1)
    assert a.shape == (4, 3, 64, 64) and ma.shape == (4, 64, 64) and len(ca) == 4
    assert torch.equal(a, b) and ca == cb and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    pretrain.atomic_save({"x": torch.ones(2)}, path)

    def crash(obj, f):
        open(f, "wb").write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        pretrain.atomic_save({"x": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(2))  # the old checkpoint survives


def test_atomic_save_writes_text_and_keeps_the_old_file_on_a_crash(tmp_path):
    path = tmp_path / "report.json"
    pretrain.atomic_save('{"rows": []}\n', path, pretrain.write_text)

    def crash(text, tmp):
        pretrain.write_text(text[:3], tmp)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain.atomic_save('{"rows": [1]}\n', path, crash)
    assert path.read_text() == '{"rows": []}\n'  # the last complete report survives


def test_lr_schedule():
    assert pretrain._lr(0, 1.0, 10) == pytest.approx(0.1)
    assert pretrain._lr(50, 1.0, 10) == 1.0
    assert pretrain._lr(100, 1.0, 10, total=100) == pytest.approx(0.1)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    work = tmp_path_factory.mktemp("vae")
    tok = pretrain.train_tokenizer(work)
    vae = pretrain.train_vae(work, tok, steps=2, batch_size=2, lr=1e-3, kl_weight=1e-3, ckpt_every=1, seed=0)
    vae.register_to_config(scaling_factor=pretrain.set_scaling_factor(vae, 0))
    return tok, vae


def _unet_state(work):
    return torch.load(work / "unet.pt", weights_only=True)


def test_resumed_training_equals_uninterrupted(tiny_vae, tmp_path):
    tok, vae = tiny_vae
    kw = dict(batch_size=2, lr=1e-3, ckpt_every=1, sample_every=10_000, seed=0)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    pretrain.train_unet(straight, tok, vae, steps=3, **kw)
    pretrain.train_unet(resumed, tok, vae, steps=2, **kw)  # "killed" after step 2
    pretrain.train_unet(resumed, tok, vae, steps=3, **kw)  # run again: continues from the checkpoint
    a, b = _unet_state(straight), _unet_state(resumed)
    assert a["step"] == b["step"] == 3
    for key in ("unet", "text_encoder", "ema_unet"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


def test_export_writes_a_loadable_fp16_pipeline(tiny_vae, tmp_path):
    tok, vae = tiny_vae
    work = tmp_path / "w"
    tok.save_pretrained(work / "tokenizer")
    torch.save({"model": vae.state_dict(), "step": 2}, work / "vae.pt")
    (work / "vae_scaling.json").write_text(json.dumps({"scaling_factor": vae.config.scaling_factor}))
    pretrain.train_unet(work, tok, vae, steps=1, batch_size=2, lr=1e-3, ckpt_every=1, sample_every=10_000, seed=0)
    out = pretrain.export(work, tmp_path / "out")
    from mcteach.sd.pipeline import generate, load_pipeline

    pipe = load_pipeline(out, device="cpu")
    assert pipe.vae.config.scaling_factor == pytest.approx(vae.config.scaling_factor)
    assert generate(pipe, "a fox", seed=0, steps=2)[0].size == (64, 64)
    assert json.loads((out / "training_log.json").read_text())["unet_steps"] == 1


def test_a_resumed_run_refuses_another_recipe(tmp_path):
    recipe = {"world": "broad", "vae_architecture": "tiny-sharp", "init": None, "seed": 0}
    assert pretrain.check_recipe(tmp_path, recipe) == recipe
    assert pretrain.check_recipe(tmp_path, dict(recipe)) == recipe  # the same recipe resumes
    with pytest.raises(SystemExit, match="another recipe.*world"):
        pretrain.check_recipe(tmp_path, {**recipe, "world": "classic"})
    # where the UNet starts may change until its stage has begun, then no more
    assert pretrain.check_recipe(tmp_path, {**recipe, "init": "data/tiny-sd"})["init"] == "data/tiny-sd"
    (tmp_path / "unet.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match="init"):
        pretrain.check_recipe(tmp_path, recipe)


def test_the_unet_starts_from_an_exported_pipeline_with_a_resized_vocabulary(tmp_path):
    """Continuing from the shipped model: same UNet, text encoder rows matched by token string."""
    from mcteach.sd import tiny
    from mcteach.world import scenes

    old_tok = tiny.build_tokenizer(scenes.vocabulary_words(scenes.CLASSIC_CLASSES))
    _, old_te, old_unet, _ = tiny.build_components(old_tok, seed=1)
    old_tok.save_pretrained(tmp_path / "tokenizer")
    old_te.save_pretrained(tmp_path / "text_encoder")
    old_unet.save_pretrained(tmp_path / "unet")

    new_tok = tiny.build_tokenizer(scenes.vocabulary_words(scenes.BROAD_CLASSES))
    _, te, unet, _ = tiny.build_components(new_tok, seed=2)
    fresh = te.get_input_embeddings().weight.detach().clone()
    kept = pretrain.init_from_pipeline(tmp_path, new_tok, te, unet)
    assert len(new_tok) > len(old_tok) and kept > 0.95 * len(old_tok)  # nearly every old token survives
    for a, b in zip(unet.parameters(), old_unet.parameters()):
        assert torch.equal(a, b)
    rows, old_rows = te.get_input_embeddings().weight, old_te.get_input_embeddings().weight
    vocab, old_vocab = new_tok.get_vocab(), old_tok.get_vocab()
    for word in ("fox", "woman", "skin"):
        token = word + "</w>"
        assert torch.equal(rows[vocab[token]], old_rows[old_vocab[token]])
    new_word = "giraffe</w>"
    assert new_word not in old_vocab and torch.equal(rows[vocab[new_word]], fresh[vocab[new_word]])
    old_state = old_te.state_dict()
    for key, value in te.state_dict().items():
        if not key.endswith("token_embedding.weight"):
            assert torch.equal(value, old_state[key]), key
    # the new tokens still encode: a broad caption runs through the text encoder
    te(new_tok(["a giraffe on the left and a bald man on the right"], return_tensors="pt").input_ids)


def test_status_reports_the_stages_steps_and_last_logs(tiny_vae, tmp_path):
    tok, vae = tiny_vae
    assert pretrain.status(tmp_path) == {"work": str(tmp_path)}
    torch.save({"model": {}, "step": 250, "log": [{"step": 250, "rec": 0.3, "held_out_mae": 19.9}]}, tmp_path / "vae.pt")
    pretrain.train_unet(tmp_path, tok, vae, steps=1, batch_size=2, lr=1e-3, ckpt_every=1, sample_every=10_000, seed=0)
    out = pretrain.status(tmp_path)
    assert out["vae_step"] == 250 and out["vae_last_log"]["held_out_mae"] == 19.9 and out["unet_step"] == 1


def test_batches_rendered_by_worker_processes_are_the_same_stream():
    alone = list(pretrain.scene_batches(3, 6, 2, seed=1))
    workers = list(pretrain.scene_batches(3, 6, 2, seed=1, workers=2))
    assert len(alone) == len(workers) == 3
    for (a, ma, ca), (b, mb, cb) in zip(alone, workers):
        assert torch.equal(a, b) and torch.equal(ma, mb) and ca == cb


def test_a_time_limit_checkpoints_and_the_same_call_resumes(tiny_vae, tmp_path):
    tok, vae = tiny_vae
    kw = dict(batch_size=2, lr=1e-3, ckpt_every=100, sample_every=10_000, seed=0)
    with pytest.raises(pretrain.TimeLimit, match="UNet step 1"):
        pretrain.train_unet(tmp_path, tok, vae, steps=3, deadline=0.0, **kw)  # out of time after the first step
    assert _unet_state(tmp_path)["step"] == 1  # checkpointed although ckpt_every is 100
    pretrain.train_unet(tmp_path, tok, vae, steps=3, **kw)
    assert _unet_state(tmp_path)["step"] == 3


def test_a_slim_checkpoint_resumes_with_fresh_moments_and_a_new_warmup(tiny_vae, tmp_path):
    """A checkpoint without the optimiser (weights only, e.g. brought back from another machine) resumes."""
    tok, vae = tiny_vae
    kw = dict(batch_size=2, lr=1e-3, ckpt_every=1, sample_every=10_000, seed=0)
    pretrain.train_unet(tmp_path, tok, vae, steps=2, **kw)
    state = _unet_state(tmp_path)
    del state["opt"]
    torch.save(state, tmp_path / "unet.pt")
    pretrain.train_unet(tmp_path, tok, vae, steps=3, **kw)
    after = _unet_state(tmp_path)
    assert after["step"] == 3 and "opt" in after
    changed = [n for n in state["unet"] if not torch.equal(state["unet"][n], after["unet"][n])]
    assert changed  # it trained on


def test_the_scaling_factor_follows_the_vae_and_a_changed_vae_under_a_started_unet_is_refused(tmp_path):
    common = ["--work", str(tmp_path), "--world", "classic", "--vae-architecture", "tiny", "--vae-steps", "1",
              "--vae-batch", "2", "--batch", "2", "--unet-steps", "1", "--sample-every", "1000", "--threads", "1"]
    cli_main(["pretrain", "train", *common])
    first = json.loads((tmp_path / "vae_scaling.json").read_text())
    assert first["vae_step"] == 1
    cli_main(["pretrain", "train", *common])  # resuming as it was: the same VAE, no refusal
    with pytest.raises(SystemExit, match="VAE .* changed"):
        cli_main(["pretrain", "train", *[("2" if a == "1" and common[i - 1] == "--vae-steps" else a)
                                  for i, a in enumerate(common)]])


def test_the_model_card_names_each_runs_batch_and_device():
    log = [{"step": 50, "batch": 256, "device": "cuda"}, {"step": 100, "batch": 256, "device": "cuda"},
           {"step": 150, "batch": 32, "device": "cpu"}]
    assert pretrain._batches(log, 160) == " (100 steps of batch 256 on cuda, then 60 steps of batch 32 on cpu)"
    assert pretrain._batches([{"step": 50, "loss": 0.1}], 60) == ""  # logs from before the batch was recorded

"""Loading (embedded, local, hub id offline), deterministic generation, the CLI, and parts.py's parts."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from mcteach.paths import EMBEDDED_MODEL
from mcteach.sd import parts
from mcteach.sd.pipeline import SD15, ModelNotAvailable, generate, load_pipeline
from mcteach.world import scenes


def test_embedded_model_is_a_plain_diffusers_pipeline(pipe):
    assert isinstance(pipe, StableDiffusionPipeline)
    direct = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL, local_files_only=True)
    assert direct.unet.config.cross_attention_dim == pipe.unet.config.cross_attention_dim
    for name, p in direct.unet.state_dict().items():
        assert torch.equal(p.float(), pipe.unet.state_dict()[name]), name
    assert pipe.unet.dtype == torch.float32  # fp16 on disk, fp32 on the CPU


def test_shipped_weights_are_fp16_safetensors_and_small():
    files = list(EMBEDDED_MODEL.rglob("*"))
    weights = [f for f in files if f.suffix == ".safetensors"]
    assert weights and not [f for f in files if f.suffix in (".bin", ".pt", ".ckpt")]
    from safetensors import safe_open

    for w in weights:
        with safe_open(str(w), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} <= {"F16", "I64"}, w
    assert sum(f.stat().st_size for f in files if f.is_file()) < 40e6


def test_same_seed_same_image_other_seed_other_image(pipe):
    a = generate(pipe, "a fox on the left", seed=3, steps=5)[0]
    b = generate(pipe, "a fox on the left", seed=3, steps=5)[0]
    c = generate(pipe, "a fox on the left", seed=4, steps=5)[0]
    assert a.size == (64, 64)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_per_image_seeds_match_single_generation(pipe):
    both = generate(pipe, ["a cat", "a dog"], seed=[7, 8], steps=4)
    alone = generate(pipe, "a dog", seed=8, steps=4)[0]
    assert np.abs(np.asarray(both[1], dtype=int) - np.asarray(alone, dtype=int)).max() <= 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt=[]), "at least one prompt"),
    (dict(prompt=["a cat", "a dog"], seed=[1]), "one per image"),
    (dict(prompt="a cat", steps=0), "steps must be"),
])
def test_generate_refuses_bad_arguments(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(pipe, **kwargs)


def test_hub_id_offline_fails_clearly():
    with pytest.raises(ModelNotAvailable, match="embedded tiny model"):
        load_pipeline(SD15, local_files_only=True)


def test_missing_local_folder_fails_clearly(tmp_path):
    with pytest.raises(ModelNotAvailable, match="model_index.json"):
        load_pipeline(tmp_path / "nothing-here")


def test_local_folder_round_trip(random_pipe, tmp_path):
    random_pipe.save_pretrained(tmp_path / "p")
    loaded = load_pipeline(tmp_path / "p", device="cpu")
    a = generate(random_pipe, "a cat", seed=0, steps=3)[0]
    b = generate(loaded, "a cat", seed=0, steps=3)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_hand_written_loop_equals_pipeline(pipe):
    """Notebook 01's loop: encode_prompt, initial_latents, CFG, scheduler.step, decode_latents."""
    prompt, steps, w = "a cat on the left and a dog on the right", 6, 5.0
    sched = pipe.scheduler
    sched.set_timesteps(steps)
    context = torch.cat([parts.encode_prompt(pipe, ""), parts.encode_prompt(pipe, prompt)])
    z = parts.initial_latents(pipe, seed=2)
    with torch.no_grad():
        for t in sched.timesteps:
            eps_u, eps_c = pipe.unet(torch.cat([z, z]), t, context).sample.chunk(2)
            z = sched.step(eps_u + w * (eps_c - eps_u), t, z).prev_sample
    ours = np.asarray(parts.decode_latents(pipe, z)[0], dtype=int)
    theirs = np.asarray(generate(pipe, prompt, seed=2, steps=steps, guidance_scale=w)[0], dtype=int)
    assert np.abs(ours - theirs).max() <= 2


def test_vae_round_trip_keeps_the_scene(pipe):
    scene = scenes.render_scene([(scenes.EMOJI["panda"], "centre")], seed=0)
    z = parts.encode_images(pipe, scene.image)
    assert z.shape == (1, 4, 16, 16) and 0.5 < float(z.std()) < 2.0  # scaling factor gives ~unit variance
    back = np.asarray(parts.decode_latents(pipe, z)[0], dtype=np.float32)
    assert np.abs(back - np.asarray(scene.image, dtype=np.float32)).mean() < 20  # mean abs error, of 255


def test_images_tensor_round_trip():
    scene = scenes.render_scene([(scenes.EMOJI["fox"], "left")], seed=1)
    x = parts.images_to_tensor(scene.image)
    assert x.shape == (1, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(np.asarray(parts.tensor_to_images(x)[0]), np.asarray(scene.image))


def test_describe_lists_every_part(pipe):
    text = parts.describe(pipe)
    for part in ("tokenizer", "text encoder", "UNet", "VAE", "scheduler", "CLIPTextModel", "DDIMScheduler"):
        assert part in text


def test_cli_generate_writes_the_same_image_as_the_api(pipe, tmp_path):
    out = tmp_path / "fox.png"
    r = subprocess.run([sys.executable, "-m", "mcteach", "generate", "--prompt", "a fox", "--seed", "5",
                        "--steps", "5", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from PIL import Image

    api = generate(pipe, "a fox", seed=5, steps=5)[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(api))


def test_cli_reports_bad_model_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mcteach", "generate", "--prompt", "a fox", "--model",
                        str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr


def test_training_log_ships_with_the_model():
    log = json.loads((EMBEDDED_MODEL / "training_log.json").read_text())
    assert log["unet_steps"] > 0 and log["log"][-1]["loss"] < log["log"][0]["loss"]


def test_initial_noise_is_drawn_in_float32_whatever_the_pipeline_dtype(pipe, monkeypatch):
    from mcteach.sd.pipeline import generator_for, initial_noise

    z = initial_noise(pipe, [3, 4])
    c, s = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    assert z.shape == (2, c, s, s) and z.dtype == torch.float32
    assert torch.equal(z[1:], torch.randn((1, c, s, s), generator=generator_for(4)))
    assert torch.equal(initial_noise(pipe, 5, 3), torch.randn((3, c, s, s), generator=generator_for(5)))
    assert initial_noise(pipe, 0, height=128, width=64).shape == (1, c, 128 // pipe.vae_scale_factor, 64 // pipe.vae_scale_factor)
    # torch 2.11's float16 CPU sampler draws other numbers than its float32 one: a float16 pipeline must still get
    # the float32 draw, cast (a sampler that ignores the request's dtype stands in for it here)
    real_randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, dtype=None, **k: real_randn(*a, **k).mul(-1.0 if dtype == torch.float16 else 1.0).to(dtype or torch.float32))
    half = type("Half", (), {"vae_scale_factor": pipe.vae_scale_factor, "device": torch.device("cpu"),
                             "unet": type("U", (), {"config": pipe.unet.config, "dtype": torch.float16})()})()
    assert torch.equal(initial_noise(half, [3, 4]), z.half())


@pytest.mark.gpu
def test_fp16_generation_on_cuda_matches_cpu_layout():
    gpu = load_pipeline(device="cuda")
    assert gpu.unet.dtype == torch.float16
    im = generate(gpu, "a fox", seed=0, steps=10)[0]
    cpu = generate(load_pipeline(device="cpu"), "a fox", seed=0, steps=10)[0]
    assert im.size == cpu.size
    assert np.abs(np.asarray(im, dtype=int) - np.asarray(cpu, dtype=int)).mean() < 10


def test_choose_model_picks_sd15_only_on_a_cuda_gpu_that_can_get_it(monkeypatch):
    from mcteach.sd import pipeline

    assert pipeline.choose_model("embedded") is None and pipeline.choose_model(None) is None
    assert pipeline.choose_model("sd15") == pipeline.SD15 and pipeline.choose_model("some/folder") == "some/folder"
    monkeypatch.setattr(pipeline.torch.cuda, "is_available", lambda: False)
    assert pipeline.choose_model("auto") is None  # a laptop CPU, CI: the embedded model
    monkeypatch.setattr(pipeline.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pipeline, "_sd15_reachable", lambda *a, **k: True)
    assert pipeline.choose_model("auto", verbose=False) == pipeline.SD15  # Colab with a GPU
    monkeypatch.setattr(pipeline, "_sd15_reachable", lambda *a, **k: False)
    assert pipeline.choose_model("auto", verbose=False) is None  # a GPU with no internet

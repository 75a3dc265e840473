"""The training code on Stable Diffusion 1.5's architecture (random weights, built from config): one
step of each method, so real-SD users meet no shape or naming surprise. The weights are SD 1.5's; the
images are 256 px instead of 512 to keep the activations small. Slow: minutes on CPU and ~10 GB of
memory (DreamBooth ~20 GB: its optimizer state alone is 14 GB): ``pytest tests/test_methods_sd15.py``."""

import copy
import os

import pytest
import safetensors.torch
import torch

from mcteach.methods.catalog import train_concept
from mcteach.sd import pretrain, tiny
from mcteach.world import scenes


def memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): try anyway
        return float("inf")


pytestmark = [pytest.mark.slow, pytest.mark.skipif(memory_gb() < 16, reason="needs ~10 GB of memory")]


@pytest.fixture(scope="module")
def sd15_pipe():
    tokenizer = tiny.build_tokenizer(scenes.vocabulary_words(scenes.BASE_CLASSES))
    vae, text_encoder, unet, _ = tiny.build_components(tokenizer, architecture="sd15")
    unet.register_to_config(sample_size=32)  # 32x32 latents: 256 px images
    pipe = pretrain.assemble(tokenizer, vae, text_encoder, unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("method, settings, files", [
    ("textual_inversion", {}, ["learned_embeds.safetensors", "koala.pt"]),
    ("lora", {"text_encoder": True}, ["pytorch_lora_weights.safetensors", "koala_kohya.safetensors"]),
    ("hypernetwork", {}, ["koala.pt"]),
    pytest.param("dreambooth", {"prior_weight": 0.0}, ["unet/diffusion_pytorch_model.safetensors"],
                 marks=pytest.mark.skipif(memory_gb() < 32, reason="full fine-tuning needs ~20 GB of memory")),
])
def test_one_step_at_sd15_size(sd15_pipe, tmp_path, method, settings, files):
    pipe = copy.deepcopy(sd15_pipe)
    with pytest.warns(UserWarning, match="256x256"):  # the 64 px concept images are resized
        r = train_concept(pipe, "koala", method, out=tmp_path, steps=1, batch_size=1, progress=False, **settings)
    assert torch.isfinite(torch.tensor(r.losses)).all()
    assert all((tmp_path / f).is_file() for f in files)
    if method == "hypernetwork":
        saved = torch.load(tmp_path / "koala.pt", weights_only=True)
        assert saved[768][0]["linear.0.weight"].shape == (1536, 768)  # the webui's SD 1.5 width
    if method == "lora":  # 16 transformer blocks x (2 attentions x 4 projections, 2 feed-forward, proj_in/out)
        kohya = safetensors.torch.load_file(tmp_path / "koala_kohya.safetensors")  # + 12 text layers x 4
        assert len({k.split(".")[0] for k in kohya}) == 16 * (2 * 4 + 2 + 2) + 12 * 4
    if method == "textual_inversion":
        assert torch.load(tmp_path / "koala.pt", weights_only=True)["string_to_param"]["*"].shape == (1, 768)

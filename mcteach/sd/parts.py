"""Stable Diffusion's parts, one function each (notebook 01 writes the denoising loop with them).

    tokens  = tokenizer(prompt)                          # words -> ids, padded to max_length
    context = text_encoder(ids)                          # (B, T, d): one vector per token
    z_0     = vae.encode(x).mean * scaling_factor        # image (B,3,H,W) -> latents (B,4,H/f,W/f)
    z_t     = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps    # forward process (scheduler.add_noise)
    eps_hat = unet(z_t, t, context)                      # the UNet predicts the noise
    eps_cfg = eps_uncond + w (eps_cond - eps_uncond)     # classifier-free guidance, scale w
    z_{t-1} = scheduler.step(eps_cfg, t, z_t)            # one DDIM step
    x       = vae.decode(z_0 / scaling_factor)           # latents -> image
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .pipeline import initial_noise


def guided_noise(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``eps_uncond + scale * (eps_cond - eps_uncond)``; scale 1 is the conditional
    prediction alone, scale 0 the unconditional one."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def device_of(pipe) -> torch.device:
    return pipe.unet.device


def tokenize(tokenizer, prompts: str | list[str]) -> torch.Tensor:
    """Token ids (B, T), padded (and truncated) to the tokenizer's max length, as the pipeline does."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def encode_prompt(pipe, prompts: str | list[str]) -> torch.Tensor:
    """Text-encoder output for ``prompts``, padded to the tokenizer's max length: (B, T, d)."""
    return pipe.text_encoder(tokenize(pipe.tokenizer, prompts).to(device_of(pipe)))[0]


def images_to_tensor(images, size: int | None = None, resample=Image.BICUBIC) -> torch.Tensor:
    """PIL images of any mode -> (B, 3, H, W) float32 in [-1, 1] (resized to ``size`` x ``size`` if given)."""
    images = [images] if isinstance(images, Image.Image) else list(images)
    if size:
        images = [im.convert("RGB").resize((size, size), resample) for im in images]
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


@torch.no_grad()
def encode_images(pipe, images) -> torch.Tensor:
    """Scaled latents z_0 = E(x).mean * scaling_factor of PIL images: (B, 4, H/f, W/f)."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    x = images_to_tensor(images, size).to(device_of(pipe), pipe.vae.dtype)
    return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """PIL images from scaled latents."""
    return tensor_to_images(pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample)


def initial_latents(pipe, batch_size: int = 1, seed: int = 0, *, height: int | None = None,
                    width: int | None = None) -> torch.Tensor:
    """z_T ~ N(0, I) scaled by the scheduler's init_noise_sigma, drawn on the CPU so it is the same
    on every device, exactly as ``generate(pipe, ..., seed=seed)`` draws it (``height``, ``width``: the image's
    pixels, default the model's own size)."""
    return initial_noise(pipe, seed, batch_size, height=height, width=width) * pipe.scheduler.init_noise_sigma


def describe(pipe) -> str:
    """A table of the pipeline's parts: class, parameter count and the numbers that matter."""
    tok, te, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    n = lambda m: f"{sum(p.numel() for p in m.parameters()) / 1e6:.1f} M"
    size = unet.config.sample_size * pipe.vae_scale_factor
    rows = [
        ("tokenizer", type(tok).__name__, "-", f"{len(tok)} tokens, max length {tok.model_max_length}"),
        ("text encoder", type(te).__name__, n(te), f"{te.config.num_hidden_layers} layers x {te.config.hidden_size}"),
        ("UNet", type(unet).__name__, n(unet), f"channels {tuple(unet.config.block_out_channels)}, "
                                                f"cross-attention dim {unet.config.cross_attention_dim}"),
        ("VAE", type(vae).__name__, n(vae), f"{size}x{size}x3 <-> {unet.config.sample_size}x{unet.config.sample_size}"
                                            f"x{unet.config.in_channels}, scaling factor {vae.config.scaling_factor:.4f}"),
        ("scheduler", type(pipe.scheduler).__name__, "-", f"{pipe.scheduler.config.num_train_timesteps} training steps, "
                                                          f"{pipe.scheduler.config.beta_schedule} betas"),
    ]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{a:<{w[0]}}  {b:<{w[1]}}  {c:>{w[2]}}  {d}" for a, b, c, d in rows)

"""The tiny Stable Diffusion: the same classes as SD 1.5, sized for a laptop CPU.

| part | SD 1.5 | tiny (this module) |
|---|---|---|
| image | 512x512x3 | 64x64x3 |
| VAE (AutoencoderKL) | 8x down, 4 latent channels | 4x down -> 16x16x4 latents |
| text encoder (CLIPTextModel) | 12 layers x 768, 77 tokens | 3 layers x 128, 32 tokens |
| UNet2DConditionModel | (320, 640, 1280, 1280), cross-attn dim 768 | (64, 128, 128), cross-attn dim 128 |
| tokenizer (CLIPTokenizer) | 49,408 BPE tokens | byte alphabet + one token per world word |

``build_tokenizer`` makes a real byte-level BPE tokenizer whose merges turn every word of the
world's captions into exactly one token, so per-token attention maps are per-word maps; any
other text still tokenizes (into characters), and ``add_tokens`` works for Textual Inversion.
"""

from __future__ import annotations

import functools

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

MAX_LENGTH = 32

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=64,
)
UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(64, 128, 128),
    layers_per_block=1,
    cross_attention_dim=128,
    attention_head_dim=4,  # diffusers' (historical) name for the number of heads, as in SD 1.5's config
    norm_num_groups=32,
)
TEXT_CONFIG = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH,
    projection_dim=128,
    hidden_act="quick_gelu",
)
#: SD 1.5's noise schedule ("scaled_linear", 1000 steps)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table: 256 printable characters, one per byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one (byte-level, lower-case) word."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        a, b = parts[i], parts[i + 1]
        out, j = [], 0
        while j < len(parts):
            if j < len(parts) - 1 and parts[j] == a and parts[j + 1] == b:
                out.append(a + b)
                j += 2
            else:
                out.append(parts[j])
                j += 1
        parts = out
    return parts


def whole_word_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges under which each of ``words`` is a single token.

    Greedy and safe: a merge is only ever appended after the existing ones, so a word that is
    already one token cannot be split again; each round joins the first two pieces of every
    word that is still split, until none is.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    todo = sorted(set(words))
    while todo:
        still = []
        for w in todo:
            parts = _bpe(w, ranks)
            if len(parts) > 1:
                pair = (parts[0], parts[1])
                if pair not in ranks:
                    ranks[pair] = len(merges)
                    merges.append(pair)
                still.append(w)
        todo = still
    return merges


def build_tokenizer(words: list[str]) -> CLIPTokenizer:
    """A CLIPTokenizer (byte-level BPE, as SD's) with one token per word of ``words``."""
    words = [w.lower() for w in words]
    if any(not w.isalpha() or not w.isascii() for w in words):
        raise ValueError("tokenizer words must be ASCII letters only")
    alphabet = _byte_alphabet()
    merges = whole_word_merges(words)
    vocab_list = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(vocab_list))}
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = MAX_LENGTH
    return tok


#: Stable Diffusion 1.5's architecture (its published configs), for testing the course's code
#: at full size with random weights: no download needed.
SD15_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, latent_channels=4, sample_size=512, scaling_factor=0.18215,
)
SD15_UNET_CONFIG = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # the rest: diffusers' defaults
SD15_TEXT_CONFIG = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu", vocab_size=49408,
)
#: the sharper VAE of the broad world (issue 11): wider, two ResNet layers per block
SHARP_VAE_CONFIG = {**VAE_CONFIG, "block_out_channels": (64, 128, 128), "layers_per_block": 2, "norm_num_groups": 32}
ARCHITECTURES = {
    "tiny": (VAE_CONFIG, TEXT_CONFIG, UNET_CONFIG),
    "tiny-sharp": (SHARP_VAE_CONFIG, TEXT_CONFIG, UNET_CONFIG),
    "sd15": (SD15_VAE_CONFIG, SD15_TEXT_CONFIG, SD15_UNET_CONFIG),
}


def build_components(tokenizer: CLIPTokenizer, *, seed: int = 0, architecture: str = "tiny"):
    """Freshly initialised (vae, text_encoder, unet, scheduler): "tiny", "tiny-sharp" (a 5M-parameter
    VAE) or "sd15" (860M-param UNet)."""
    import torch

    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; use one of {sorted(ARCHITECTURES)}")
    vae_config, text_config, unet_config = ARCHITECTURES[architecture]
    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_config)
    text_config = CLIPTextConfig(
        **{"vocab_size": len(tokenizer), **text_config},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(text_config)
    unet = UNet2DConditionModel(**unet_config)
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    return vae, text_encoder, unet, scheduler

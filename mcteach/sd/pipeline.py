"""Loading a Stable Diffusion pipeline (the embedded tiny one, a local folder, or a hub id) and
generating images reproducibly.

    pipe = load_pipeline()                                              # embedded tiny model, CPU
    pipe = load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")  # real SD 1.5 (GPU, internet)
    images = generate(pipe, "a fox on the left and a red apple on the right", seed=0)

The same functions serve both: everything downstream in the course takes a pipeline.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch

from ..paths import EMBEDDED_MODEL

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class ModelNotAvailable(OSError):
    """The requested model cannot be loaded here (no such folder, or a hub id with no network)."""


@contextmanager
def quiet_loading():
    """Hide diffusers'/transformers' per-file loading progress bars and their loading notices (an optional
    torchvision backend, a LoRA file without text-encoder keys); errors still show. Restored afterwards."""
    import warnings

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    was = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    levels = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.disable_progress_bar(), tlog.disable_progress_bar()
    dlog.set_verbosity_error(), tlog.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            yield
    finally:
        dlog.set_verbosity(levels[0]), tlog.set_verbosity(levels[1])
        if was[0]:
            dlog.enable_progress_bar()
        if was[1]:
            tlog.enable_progress_bar()


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA, then Apple MPS, then CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def describe_environment(device: torch.device | None = None) -> str:
    """One line of versions and the device the course will use."""
    import diffusers
    import transformers

    device = device or pick_device()
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    return (f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}"
            f"; device: {device}{gpu}, {torch.get_num_threads()} CPU threads")


def is_embedded(model: str | os.PathLike | None) -> bool:
    return model is None or Path(model).resolve() == EMBEDDED_MODEL.resolve()


def _sd15_reachable(model: str = SD15, timeout: float = 5.0) -> bool:
    """Whether ``model`` is in the local hub cache or the hub answers within ``timeout`` seconds."""
    try:
        from huggingface_hub import model_info, try_to_load_from_cache

        if isinstance(try_to_load_from_cache(model, "model_index.json"), str):
            return True
        model_info(model, timeout=timeout)
        return True
    except Exception:  # offline, blocked, or no access: all mean "not here"
        return False


def choose_model(choice: str | None = "auto", *, verbose: bool = True) -> str | None:
    """The notebooks' MODEL parameter: ``"auto"`` (the default), ``"embedded"``, ``"sd15"``, a hub id or a folder.

    ``"auto"`` is Stable Diffusion 1.5 on a CUDA GPU that has it cached or can download it, and the embedded
    tiny model everywhere else (a laptop CPU, CI, a GPU with no internet). Returns what ``load_pipeline``
    takes: None for the embedded model, else the id or path.
    """
    if choice in (None, "embedded", "tiny"):
        return None
    if choice == "sd15":
        return SD15
    if choice != "auto":
        return choice
    if not torch.cuda.is_available():
        return None
    if _sd15_reachable():
        if verbose:
            print(f"CUDA GPU found: using {SD15} (set MODEL = 'embedded' for the tiny model)")
        return SD15
    if verbose:
        print(f"CUDA GPU found, but {SD15} is neither cached nor downloadable here: using the embedded model")
    return None


def load_pipeline(
    model: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    local_files_only: bool | None = None,
    low_memory: bool | None = None,
    **kwargs,
):
    """A ``StableDiffusionPipeline`` on ``device``.

    model: None for the embedded tiny model (``data/tiny-sd``), a local folder written by
        ``save_pretrained``, or a Hugging Face hub id such as ``"stable-diffusion-v1-5/stable-diffusion-v1-5"``.
    dtype: default float16 on CUDA, float32 elsewhere (CPU half precision is slow and inexact).
    local_files_only: only use the local hub cache (default: the ``HF_HUB_OFFLINE`` setting).
    low_memory: attention and VAE slicing (default: on a CUDA GPU with under 20 GB, e.g. Colab's T4).
    Raises ``ModelNotAvailable`` with what to do when the model cannot be found or downloaded.
    """
    with quiet_loading():  # importing the pipeline imports transformers' image processors, which talk
        from diffusers import StableDiffusionPipeline

    device = pick_device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    source = EMBEDDED_MODEL if model is None else model
    looks_local = Path(source).exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") > 1
    if looks_local and not (Path(source).expanduser() / "model_index.json").is_file():
        hint = ("the embedded model is missing from this checkout: restore it with `git checkout data/` "
                "or retrain it with `mcteach pretrain train && mcteach pretrain export`"
                if model is None else "pass a folder written by `pipe.save_pretrained(...)`, a hub id, or None "
                "for the embedded tiny model")
        raise ModelNotAvailable(f"no Stable Diffusion pipeline at {source} (no model_index.json): {hint}")
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        with quiet_loading():
            pipe = StableDiffusionPipeline.from_pretrained(
                Path(source).expanduser() if looks_local else str(source),
                dtype=dtype, local_files_only=local_files_only, **kwargs
            )
    except (OSError, ValueError, ConnectionError) as err:
        if looks_local:
            raise
        raise ModelNotAvailable(
            f"could not load {source!r} from the Hugging Face Hub: {type(err).__name__}. "
            "Without internet, use load_pipeline() for the embedded tiny model; with internet, check the "
            f"id and your access (e.g. `huggingface-cli download {source}`), then retry."
        ) from None
    pipe.set_progress_bar_config(disable=True)
    if low_memory is None:
        low_memory = device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory < 20 * 2**30
    if low_memory:
        pipe.enable_attention_slicing()
        pipe.vae.enable_slicing()
    return pipe.to(device)


def generator_for(seed: int | list[int]) -> torch.Generator | list[torch.Generator]:
    """CPU generators: the same seed gives the same initial noise on any device."""
    if isinstance(seed, int):
        return torch.Generator("cpu").manual_seed(seed)
    return [torch.Generator("cpu").manual_seed(s) for s in seed]


def initial_noise(pipe, seed: int | list[int], num_images: int | None = None, *, height: int | None = None,
                  width: int | None = None) -> torch.Tensor:
    """The starting latents for ``seed`` (an int, or one seed per image), as the pipeline would draw them with
    ``generator_for(seed)``, but always drawn in float32 on the CPU and only then moved to the pipeline's device and
    dtype. So a seed gives the same image on a laptop CPU and a GPU in float16: torch's float16 CPU sampler is not
    its float32 one in every version (torch 2.11's draws other numbers), which made every fp16 image a different one.
    """
    seeds = list(seed) if isinstance(seed, (list, tuple)) else None
    n = len(seeds) if seeds is not None else (num_images or 1)
    f = pipe.vae_scale_factor
    size = (pipe.unet.config.in_channels, (height or pipe.unet.config.sample_size * f) // f,
            (width or pipe.unet.config.sample_size * f) // f)
    if seeds is None:  # one generator for the batch, as diffusers' randn_tensor draws it
        z = torch.randn((n, *size), generator=generator_for(seed))
    else:
        z = torch.cat([torch.randn((1, *size), generator=g) for g in generator_for(seeds)])
    return z.to(pipe.device, pipe.unet.dtype)


def generate(
    pipe,
    prompt: str | list[str],
    *,
    seed: int | list[int] = 0,
    steps: int = 25,
    guidance_scale: float = 5.0,
    negative_prompt: str | list[str] | None = None,
    num_images: int = 1,
    batch_size: int | None = None,
    **kwargs,
):
    """Images (a list of PIL images) for ``prompt``; deterministic on CPU for a given ``seed``.

    With a list of prompts, ``seed`` may be a list of the same length (one seed per image).
    ``batch_size``: at most this many prompts per pipeline call (memory), with one seed per prompt; the images do
    not depend on it.
    Extra keyword arguments go to the pipeline call (height, width, cross_attention_kwargs, ...).
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    if isinstance(seed, (list, tuple)) and len(seed) != len(prompts) * num_images:
        raise ValueError(f"{len(seed)} seeds for {len(prompts) * num_images} images: give one per image or a single int")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if batch_size and len(prompts) > batch_size:
        if num_images != 1 or not isinstance(seed, (list, tuple)) or not isinstance(negative_prompt, (str, type(None))):
            raise ValueError("batch_size splits a list of prompts with one seed each (a list), one image per prompt "
                             "and one negative prompt for all")
        seeds = list(seed)
        return [im for i in range(0, len(prompts), batch_size)
                for im in generate(pipe, prompts[i : i + batch_size], seed=seeds[i : i + batch_size], steps=steps,
                                   guidance_scale=guidance_scale, negative_prompt=negative_prompt, **kwargs)]
    seed = list(seed) if isinstance(seed, (list, tuple)) else seed
    kwargs.setdefault("latents", initial_noise(pipe, seed, len(prompts) * num_images,
                                               height=kwargs.get("height"), width=kwargs.get("width")))
    out = pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        negative_prompt=negative_prompt,
        num_images_per_prompt=num_images,
        generator=generator_for(seed),
        **kwargs,
    )
    return out.images

"""mcteach: a hands-on course on multi-concept text-to-image generation.

Modules, in the order the course teaches them:
- ``world``: the emoji world (scenes, captions, masks) the tiny model is trained on;
- ``tiny`` and ``pretrain``: the tiny Stable Diffusion and how it is trained;
- ``pipeline``: load a pipeline (embedded, local or hub id) and generate reproducibly;
- ``sd``: Stable Diffusion's parts one function each (the denoising loop by hand, notebook 01);
- ``attention``: record cross-/self-attention maps; ``plot``: show images and maps;
- ``concepts``: few-shot concept sets; ``methods``: Textual Inversion, HyperNetwork, DreamBooth, LoRA
  (one training engine);
- ``mixing`` and ``masking``: why concepts mix, and the inference fixes (notebooks 06-07);
- ``judge``: the per-region classifier used for metrics; ``photo_judge``: the same metrics on photos (CLIP,
  DINOv2, MuDI's Detect-and-Compare) for SD 1.5;
- ``evaluate``: every measurement; ``benchmark`` and ``bench``: the methods' and the mixing benchmarks;
- ``course``: runs the notebooks and keeps their headers, badges and times in step.
"""

from .pipeline import (EMBEDDED_MODEL, SD15, ModelNotAvailable, choose_model, describe_environment, generate,
                       is_embedded, load_pipeline, pick_device)

__version__ = "0.1.0"
__all__ = ["EMBEDDED_MODEL", "SD15", "ModelNotAvailable", "choose_model", "describe_environment", "generate",
           "is_embedded", "load_pipeline", "pick_device"]

"""mcteach: a hands-on course on multi-concept text-to-image generation.

The package in the order the course teaches it (each module's first line names its notebook):

- ``world``: the emoji world the tiny model knows (``scenes``), where concepts go (``regions``), few-shot
  concept sets (``concepts``);
- ``sd``: Stable Diffusion: loading and sampling (``pipeline``), its parts one function each (``parts``), the
  attention processor (``attention``), the tiny model (``tiny``) and its pretraining (``pretrain``);
- ``methods``: Textual Inversion, HyperNetwork, DreamBooth, LoRA on one training loop (``engine``), by name
  (``catalog``), their files (``adapters``) and the shipped ones (``shipped``);
- ``mixing``: why concepts mix (``diagnose``) and the inference fixes: attention masks (``masking``), one pass
  per region (``passes``), both behind ``generate.regional_generate``;
- ``measure``: the judge (``judge``), every metric (``metrics``), the judge checked by eye (``calibration``),
  the same metrics on photos (``photo_judge``);
- ``bench``: the methods' benchmark (``methods``) and the mixing benchmark (``mixing``);
- ``cli``: the ``mcteach`` command line; ``course``: runs the notebooks; ``plot``, ``files``, ``paths``: helpers.

Importing ``mcteach`` loads nothing heavy: import what you use, e.g.
``from mcteach.sd.pipeline import load_pipeline, generate``.
"""

__version__ = "0.1.0"

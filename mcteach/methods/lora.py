"""LoRA (Hu et al. 2021) with peft: low-rank updates of the linear layers in the UNet's transformer blocks.

Each targeted layer W (d_out, d_in) gets a trainable low-rank update; W itself stays frozen:

    h = W x + (alpha / r) B A x        A (r, d_in), B (d_out, r),  r = rank
    A ~ kaiming-uniform, B = 0         at initialisation B A = 0: the model is exactly the base model

Which layers (``targets``, module-name endings): by default kohya-ss's set, ``UNET_TRANSFORMER_TARGETS``: in
every transformer block the attention projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` (self and cross),
the feed-forward ``ff.net.0.proj`` and ``ff.net.2``, and the block's ``proj_in`` / ``proj_out`` (1x1
convolutions in SD 1.5 and here). ``targets=UNET_TARGETS`` is the attention-only set of diffusers' training
script. The tiny UNet has 84 such layers: rank 4 is 97,280 parameters (1.6% of its 5.9M; attention only: 56
layers, 46,592). Only A and B train (``text_encoder=True`` also adds them to the text encoder's ``q_proj``,
``k_proj``, ``v_proj``, ``out_proj``).
Prompts use "a bbm bear" (``identifier`` + class word); by default each concept gets its own identifier, made
from its name, so several LoRAs can be told apart when used together.

Saved files (``out/``):
- ``pytorch_lora_weights.safetensors``: diffusers' format (``StableDiffusionPipeline.save_lora_weights``,
  keys ``unet.<module>.lora_A.weight``, rank and alpha in the metadata):
  ``pipe.load_lora_weights("out", adapter_name="koala")``, then several adapters are switched and weighted
  with ``pipe.set_adapters(["koala", "hamster"], adapter_weights=[1.0, 0.8])``, and all switched off in
  ``with disabled(pipe): ...`` (the base model, for before/after comparisons);
- ``<slug>_kohya.safetensors``: kohya-ss's keys (``lora_unet_<module_path_with_underscores>.lora_down.weight``,
  ``.lora_up.weight``, ``.alpha``; the text encoder's as ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``),
  read by the AUTOMATIC1111 webui, ComfyUI and ``pipe.load_lora_weights``.

Loading a text-encoder LoRA with diffusers goes through transformers' peft integration, which (transformers 5)
needs peft >= 0.22; UNet-only LoRAs (the default) load with any supported peft.

Defaults: rank 4, alpha 4, 400 steps of 4 images at lr 2e-3 (several concepts trained jointly: 800 steps of 2,
``LoRA.schedule``), kohya's layer set: the attention, proj and feed-forward layers of every transformer block, as
kohya-ss's sd-scripts train them. Why 400 of 4: the same images seen as 800 of 2, and on 2 CPU threads one step of 4
costs far less than two of 2 (the hamster: 59.3 s against 103.5 s); on the shipped model it gives 1.00 on all 11
held-out concepts (seeds 0-7) and on three concepts none of the course's sets has (kangaroo, cupcake, prince). Why
the feed-forward layers (measured on a base model of the 60-class world, ``mcteach pretrain --world classic``): with
attention-only targets the trumpet stays at 0.38 (the right colours and outline, but mushy) whatever the steps, rank
or rate; with them every held-out concept reaches >= 0.88. The shipped model's
figures: data/bench_methods.md. For SD 1.5 the usual rate is 1e-4.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file

from ..sd.pipeline import quiet_loading
from .engine import Method, Run

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: kohya-ss's default: every linear (and 1x1 conv) layer of the UNet's transformer blocks, feed-forward included
UNET_TRANSFORMER_TARGETS = UNET_TARGETS + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


def lora_config(rank: int, alpha: float, targets) -> "LoraConfig":

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)


def to_kohya(state_dict: dict[str, torch.Tensor], alpha: float, prefix: str = "lora_unet") -> dict[str, torch.Tensor]:
    """peft/diffusers keys -> kohya-ss keys::

        down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight
        -> lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight
        (lora_B -> lora_up; one ``.alpha`` scalar per module). ``prefix="lora_te"`` for the text encoder.
    """
    out = {}
    for key, value in state_dict.items():
        module, _, kind = key.rpartition(".lora_")  # "...attn1.to_q", "A.weight"
        if not module or kind not in ("A.weight", "B.weight"):
            raise ValueError(f"not a LoRA weight: {key!r}")
        name = f"{prefix}_{module.replace('.', '_')}"
        out[f"{name}.lora_{'down' if kind == 'A.weight' else 'up'}.weight"] = value.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


@contextmanager
def disabled(pipe):
    """Inside the block the pipeline is its base model (every LoRA adapter off); on again afterwards."""
    pipe.disable_lora()
    try:
        yield pipe
    finally:
        pipe.enable_lora()


@dataclass(kw_only=True)
class AdapterRun(Run):
    """LoRA's run: the name of the peft adapter it added to the UNet (and text encoder)."""

    adapter: str


@dataclass
class LoRA(Method):
    name: ClassVar[str] = "lora"
    schedule_fields: ClassVar[tuple[str, ...]] = Method.schedule_fields + ("joint_steps", "joint_batch_size")
    steps: int = 400
    lr: float = 2e-3
    batch_size: int = 4  # 400 steps of 4: the images of 800 of 2 in 59 s against 104 s (2 threads, the hamster)
    joint_steps: int = 800  # several concepts at once: at 400 of 4 the joint LoRAs learned the pairs worse
    joint_batch_size: int = 2
    rank: int = 4
    alpha: float = 4.0
    identifier: str | None = None  # default: three consonants made from the concept's slug
    text_encoder: bool = False
    # module-name endings in the UNet (UNET_TARGETS: attention only)
    targets: list[str] = field(default_factory=lambda: list(UNET_TRANSFORMER_TARGETS))
    adapter_name: str | None = None  # default: the concept's slug

    def phrase(self, concept) -> str:
        return f"{self.identifier_for(concept)} {self.class_word_for(concept)}"

    def schedule(self, concepts: int = 1) -> tuple[int, int]:
        """400 steps of 4 images for one concept; several trained jointly keep 800 steps of 2: with the training fix
        alone, 400 of 4 scored 0.19 / 0.44 / 0.00 / 0.25 on the four pairs against 0.62 / 0.50 / 0.50 / 0.44."""
        return (self.steps, self.batch_size) if concepts == 1 else (self.joint_steps, self.joint_batch_size)

    def setup(self, pipe, concept):
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        names = [n for n, _ in pipe.unet.named_modules()]
        unknown = [t for t in self.targets if not any(n == t or n.endswith("." + t) for n in names)]
        if unknown:
            raise ValueError(f"no UNet layer is named {unknown[0]!r}: targets are module-name endings such as "
                             f"{', '.join(UNET_TRANSFORMER_TARGETS)}")
        run = AdapterRun(adapter=self.adapter_name or concept.slug)
        pipe.unet.add_adapter(lora_config(self.rank, self.alpha, self.targets), adapter_name=run.adapter)
        if self.text_encoder:  # peft directly: transformers 5's add_adapter wants peft >= 0.22
            inject_adapter_in_model(lora_config(self.rank, self.alpha, TEXT_ENCODER_TARGETS), pipe.text_encoder,
                                    adapter_name=run.adapter)
        return run

    def state_dicts(self, pipe, adapter: str) -> dict[str, dict[str, torch.Tensor]]:
        """{"unet": peft state dict, "text_encoder": ...} of ``adapter`` (keys without the adapter name)."""
        parts = {"unet": pipe.unet} | ({"text_encoder": pipe.text_encoder} if self.text_encoder else {})
        return {k: {n: v.detach().cpu() for n, v in get_peft_model_state_dict(m, adapter_name=adapter).items()}
                for k, m in parts.items()}

    def save(self, pipe, folder, concept, step, run: AdapterRun):
        sds = self.state_dicts(pipe, run.adapter)
        meta = {f"{k}_lora_adapter_metadata": getattr(pipe, k).peft_config[run.adapter].to_dict() for k in sds}
        type(pipe).save_lora_weights(  # a classmethod of StableDiffusionPipeline (its LoRA loader mixin)
            folder, unet_lora_layers=sds["unet"], text_encoder_lora_layers=sds.get("text_encoder"),
            weight_name=DIFFUSERS_FILE, **meta)
        kohya = to_kohya(sds["unet"], self.alpha)
        if self.text_encoder:  # kohya names the text encoder's modules as transformers 4 did: text_model.encoder...
            te = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sds["text_encoder"].items()}
            kohya |= to_kohya(te, self.alpha, prefix="lora_te")
        kohya_file = f"{concept.slug}_kohya.safetensors"
        save_file(kohya, folder / kohya_file, metadata={"ss_network_module": "networks.lora",
                                                        "ss_network_dim": str(self.rank),
                                                        "ss_network_alpha": str(self.alpha)})
        return {"adapter_name": run.adapter, "files": {"diffusers": DIFFUSERS_FILE, "kohya": kohya_file}}

    @staticmethod
    def load(pipe, folder, meta):
        with quiet_loading():
            pipe.load_lora_weights(str(Path(folder)), weight_name=DIFFUSERS_FILE, adapter_name=meta["adapter_name"])

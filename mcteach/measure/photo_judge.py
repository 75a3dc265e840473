"""The photo judge: per-instance metrics for real photos, on pretrained image encoders (CLIP, DINOv2, OWLv2).

The emoji judge (``mcteach.measure.judge``) knows the emoji world and nothing else. On Stable Diffusion 1.5 with your
own concepts (4-8 photos each) this module plays its part: it crops each region of a generated image and
compares the crop with every concept's reference photos in the embedding space of a pretrained encoder.

    >>> from mcteach.measure import metrics
    >>> from mcteach.measure.photo_judge import PhotoJudge
    >>> judge = PhotoJudge.load(device="cuda")                  # CLIP ViT-B/32, DINOv2-small, OWLv2 (downloads)
    >>> refs = judge.references({"my dog": dog_photos, "my cat": cat_photos})      # lists of PIL images
    >>> layout = {"left": "my dog", "right": "my cat"}          # region -> the concept asked there
    >>> results = judge.judge(images, layout, refs)             # images: SD 1.5 outputs for that prompt
    >>> print(metrics.summary_table({"LoRA + masking": metrics.summarize_pairs(results)}))
    >>> judge.dc_score(images[0], refs, queries={"my dog": "dog", "my cat": "cat"}).score   # MuDI's D&C (OWLv2)

**Region similarity.** Region r of the image (a name of ``mcteach.world.regions.REGIONS`` or the world's
``"centre"``, or a box of fractions ``(x0, y0, x1, y1)``) is cropped, padded to a square with white (so the
encoder's centre crop keeps all of it, as MuDI's ``crop_and_pad_image``) and embedded: ``e_r``, unit norm.
Concept k has reference embeddings ``f_k1 .. f_kn``. The similarity matrix (R regions x K concepts) is

    S[r, k] = mean_i cos(e_r, f_ki)        (reduce="mean", the default)   or   max_i cos(e_r, f_ki)  ("max")

The mean is the default: with 4-8 references it is steadier, and it is what MuDI's D&C uses; the max ("nearest
reference") rewards an image that copies one reference photo, pose and all. Embeddings: CLIP's projected image
embedding (``CLIPVisionModelWithProjection.image_embeds``) or DINOv2's CLS token after the last layer norm
(``Dinov2Model.pooler_output``; ``ImageEncoder(pool="mean")`` averages all tokens as MuDI's DINOv2 evaluator
does). DINOv2 is the default: trained without text, it keeps instance detail (this dog, not a dog) that CLIP
summarises away, the reason DreamBooth reports DINO over CLIP-I for subject fidelity.

**Per-instance outcome.** The similarities become label probabilities ``p = softmax(S[r] / temperature)`` over
the concepts (temperature 0.01 is CLIP's logit scale of 100); with ``empty_below=s0`` a ``"nothing"`` label with
the constant similarity ``s0`` joins them, so a region unlike every concept can be empty. These probabilities go
through ``mcteach.measure.metrics.instance_outcome``, the emoji judge's own rule: success / swap / duplication /
neglect / other, and the blend index ``p(others) / (p(intended) + p(others))`` per region (0: pure, 0.5: an
even mix, 1: swapped). The results are ``evaluate.PairResult`` objects, so ``evaluate.summarize_pairs`` and
``metrics.summary_table`` print the same tables as on the emoji world.

**Detect-and-Compare (D&C, MuDI: Jang et al. 2024, "Identity Decoupling for Multi-Subject Personalization of
Text-to-Image Models").** Find the subjects (OWLv2 with a text query per concept, boxes scored above
``threshold``), crop each box (padded to a square), and compare it with every concept's references:
``S[n, k] = mean_i cos(e_n, f_ki)`` (N detections x K concepts). The ideal image would give, for the subject
of concept j, the similarities the references themselves have:

    S_GT[j, k] = mean_{a, b} cos(f_ja, f_kb)        (all pairs, the diagonal's self-pairs included)
    D&C = 1 - || S_matched - S_GT ||_2               (spectral norm: the largest singular value)
    D&C = 0 when the number of detections is not K  (a subject missing, or one too many)

``S_matched`` orders the rows so that row k is concept k's detection, greedily: for each concept in turn, the
unused detection most similar to it. All of this is MuDI's ``detect_and_compare/demo.ipynb``
(``get_gt_matrix``, ``sort_by_max``, ``gt_distance`` with ``np.linalg.norm(..., ord=2)``, which for a matrix is
the spectral norm; ``ord="fro"`` here gives the Frobenius norm instead) and ``owl_dreamsim_utils.py``
(OWLv2 ``google/owlv2-base-patch16-ensemble``, threshold 0.4 in the demo). Differences, on purpose:
MuDI compares crops with DreamSim, which is not in this course's stack: we use DINOv2 (MuDI's own alternative
evaluator) or CLIP, so scores are not comparable with the paper's numbers; we drop overlapping OWLv2 boxes
(non-maximum suppression, ``nms_iou``; MuDI keeps them all); and boxes can be given directly, e.g. the course's
regions: ``dc_score(image, refs, layout={"left": "koala", "right": "hamster"})`` keeps row r for region r
(no matching), so a *swap* lowers the score too. With a detector the greedy matching makes D&C blind to where
the subjects are: it measures identity mixing and missing or extra subjects, not placement.

Reading the scores: 1 is an image whose subjects resemble their references exactly as much as the references
resemble each other; a blended subject moves its row towards the other concept's row of S_GT; a missing or
duplicated subject breaks a row (or the count, 0). It is not bounded below: a swap scored by layout, whose
rows are S_GT's exchanged, can go under 0.

**Limits.** A similarity is only as good as the encoder: CLIP and DINOv2 see breed, colour and pose more than
the identity of one face (a face-recognition embedding would judge people better). A region crop contains
background and whatever else falls in it; an object across the midline is half in each region, as with the
emoji judge. The temperature, ``tau`` and ``empty_below`` are not calibrated: check them on a few images you
have labelled by eye. OWLv2 finds what the text query names ("dog"), so two dogs of different breeds are found,
but a subject it misses (or finds twice) zeroes D&C. The unit tests build every model from a small config with
random weights (no download): they check the bookkeeping, not what pretrained encoders see.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image

from ..sd import tiny
from ..sd.pipeline import pick_device
from ..world import scenes
from ..world.regions import region_box
from .judge import NOTHING
from .metrics import PairResult, instance_outcome

CLIP_ID, DINO_ID, OWL_ID = "openai/clip-vit-base-patch32", "facebook/dinov2-small", "google/owlv2-base-patch16-ensemble"


# ----------------------------------------------------------------------------- regions and crops


def _check_image(image) -> Image.Image:
    if not isinstance(image, Image.Image):
        hint = (" (a tensor (3, H, W) in [0, 1]: Image.fromarray((t.permute(1, 2, 0) * 255).byte().numpy()))"
                if isinstance(image, torch.Tensor) else "")
        raise TypeError(f"expected a PIL image, got {type(image).__name__}; convert it first{hint}")
    return image.convert("RGB")


def pad_square(image: Image.Image, fill=(255, 255, 255)) -> Image.Image:
    """``image`` centred on a ``fill`` square of its longer side (MuDI's ``crop_and_pad_image``): encoders resize
    the shorter side and centre-crop, which would cut the ends off a tall or wide crop."""
    w, h = image.size
    out = Image.new("RGB", (max(w, h),) * 2, fill)
    out.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return out


def crop(image: Image.Image, box) -> Image.Image:
    """The pixel ``box`` (x0, y0, x1, y1) of ``image`` (at least one pixel), padded to a square."""
    x0, y0, x1, y1 = (round(float(v)) for v in box)
    return pad_square(image.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))))


# ----------------------------------------------------------------------------- encoders and references


@dataclass
class ImageEncoder:
    """A pretrained image encoder and its processor: PIL images -> unit embeddings (N, D).

    ``kind="clip"``: ``CLIPVisionModelWithProjection``, the projected ``image_embeds`` (the space CLIP compares
    with text). ``kind="dino"``: ``Dinov2Model``, the CLS token after the final layer norm (``pool="cls"``) or the
    mean of all tokens (``pool="mean"``, MuDI's DINOv2 evaluator)."""
    kind: str
    model: torch.nn.Module
    processor: object
    pool: str = "cls"

    def __post_init__(self):
        if self.kind not in ("clip", "dino") or self.pool not in ("cls", "mean"):
            raise ValueError(f"kind must be 'clip' or 'dino' and pool 'cls' or 'mean', "
                             f"got {self.kind!r}, {self.pool!r}")

    @torch.no_grad()
    def embed(self, images: list[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """Unit-norm embeddings (N, D), float32 on the CPU, of PIL images (each padded to a square first)."""
        images = [pad_square(_check_image(im)) for im in images]
        param = next(self.model.parameters())
        self.model.eval()
        out = []
        for i in range(0, len(images), batch_size):
            pixels = self.processor(images=images[i : i + batch_size], return_tensors="pt")["pixel_values"]
            o = self.model(pixel_values=pixels.to(param.device, param.dtype))
            if self.kind == "clip":
                e = o.image_embeds
            else:
                e = o.pooler_output if self.pool == "cls" else o.last_hidden_state.mean(1)
            out.append(F.normalize(e.float(), dim=-1).cpu())
        return torch.cat(out)


@dataclass
class References:
    """Each concept's reference embeddings under one encoder: ``embeddings[k]`` is (n_k, D), unit norm."""
    encoder: str
    concepts: list[str]
    embeddings: list[torch.Tensor] = field(repr=False)

    def similarity(self, crops: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
        """S (N, K): cosine of each crop embedding (N, D) with concept k's references, mean (or max) over them."""
        if reduce not in ("mean", "max"):
            raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
        cols = [crops @ f.T for f in self.embeddings]  # (N, n_k) each
        return torch.stack([c.mean(1) if reduce == "mean" else c.amax(1) for c in cols], dim=1)

    def subset(self, concepts: list[str]) -> "References":
        """The same references restricted to (and ordered as) ``concepts``."""
        idx = [self.concepts.index(c) for c in concepts]
        return References(self.encoder, list(concepts), [self.embeddings[i] for i in idx])


def ground_truth_matrix(refs: References) -> torch.Tensor:
    """MuDI's S_GT (K, K): ``S_GT[j, k]`` = mean cosine over all pairs (reference of j, reference of k), the
    diagonal's self-pairs (cosine 1) included, as in MuDI's ``get_gt_matrix``."""
    e = refs.embeddings
    return torch.tensor([[float((a @ b.T).mean()) for b in e] for a in e])


def greedy_match(similarity: torch.Tensor) -> list[int]:
    """MuDI's ``sort_by_max``: for each column (concept) in turn, the unused row (detection) with the largest
    similarity to it. Returns the chosen row per column; needs at least as many rows as columns."""
    used: list[int] = []
    for k in range(similarity.shape[1]):
        free = [n for n in range(similarity.shape[0]) if n not in used]
        used.append(max(free, key=lambda n: float(similarity[n, k])))
    return used


def dc_from_matrices(similarity: torch.Tensor, ground_truth: torch.Tensor, match: str = "greedy",
                     ord=2) -> tuple[float, list[int] | None]:
    """D&C = 1 - ||S_matched - S_GT|| from S (N, K) and S_GT (K, K); 0 when N != K (MuDI: a wrong count).
    ``match="greedy"``: rows ordered by :func:`greedy_match` (detections come in no order); ``"layout"``: row k
    already is concept k's region. ``ord``: 2 (spectral, MuDI's), ``"fro"`` or ``"nuc"``. Returns (score, order)."""
    if match not in ("greedy", "layout"):
        raise ValueError(f"match must be 'greedy' or 'layout', got {match!r}")
    n, k = similarity.shape
    if n != k:
        return 0.0, None
    order = greedy_match(similarity) if match == "greedy" else list(range(k))
    diff = similarity[order].double() - ground_truth.double()
    return 1.0 - float(torch.linalg.matrix_norm(diff, ord=ord)), order


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> list[int]:
    """Greedy non-maximum suppression over all classes: indices of the boxes (M, 4) kept, best score first; a box
    overlapping a kept one with IoU > ``iou`` is dropped."""
    keep: list[int] = []
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    for i in scores.argsort(descending=True).tolist():
        ok = True
        for j in keep:
            w = (torch.minimum(boxes[i, 2], boxes[j, 2]) - torch.maximum(boxes[i, 0], boxes[j, 0])).clamp(min=0)
            h = (torch.minimum(boxes[i, 3], boxes[j, 3]) - torch.maximum(boxes[i, 1], boxes[j, 1])).clamp(min=0)
            inter = w * h
            if inter / (area[i] + area[j] - inter + 1e-9) > iou:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


# ----------------------------------------------------------------------------- results


def region_probs(similarity: torch.Tensor, temperature: float = 0.01, empty_below: float | None = None) -> torch.Tensor:
    """Label probabilities (R, K) = softmax(S / temperature) per region; (R, K + 1) with a last "nothing" column
    whose similarity is the constant ``empty_below``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if empty_below is not None:
        similarity = torch.cat([similarity, similarity.new_full((len(similarity), 1), float(empty_below))], 1)
    return (similarity / temperature).softmax(-1)


@dataclass
class RegionSimilarity:
    """One image's region x concept similarities: ``matrix[r, k]`` for region ``regions[r]`` (where
    ``intended[r]`` was asked) and concept ``concepts[k]``."""
    regions: list[str]
    intended: list[str]
    concepts: list[str]
    matrix: torch.Tensor  # (R, K)

    def outcome(self, temperature: float = 0.01, tau: float = 0.5, empty_below: float | None = None,
                prompt: str = "", seed: int = -1) -> PairResult:
        """The image's outcome, predictions, confidences and blend indices (``evaluate.instance_outcome``)."""
        labels = self.concepts + ([NOTHING] if empty_below is not None else [])
        probs = region_probs(self.matrix, temperature, empty_below)
        outcome, pred, conf, blend = instance_outcome(labels, list(probs), self.intended, tau)
        return PairResult(prompt, tuple(self.intended), tuple(self.regions), seed, pred, conf, blend, outcome)

    def table(self) -> str:
        """The matrix as text, one row per region (its intended concept marked *)."""
        width = max(len(c) for c in self.concepts) + 2
        head = " " * 16 + "".join(f"{c:>{width}}" for c in self.concepts)
        rows = [f"{r[:8]:<8}{w[:8]:>8}" + "".join(f"{'*' if c == w else ''}{v:.3f}".rjust(width)
                                                   for c, v in zip(self.concepts, row.tolist()))
                for r, w, row in zip(self.regions, self.intended, self.matrix)]
        return "\n".join([head] + rows)


@dataclass
class Detection:
    """One OWLv2 box: pixels (x0, y0, x1, y1), its score, and the query it answered."""
    box: tuple[float, float, float, float]
    score: float
    label: str


@dataclass
class DCResult:
    """D&C of one image: the score, S (N, K) before matching, S_GT (K, K), the crops' pixel boxes, the concepts
    (columns) and the row matched to each concept (None when N != K)."""
    score: float
    similarity: torch.Tensor
    ground_truth: torch.Tensor
    boxes: list
    concepts: list[str]
    order: list[int] | None


# ----------------------------------------------------------------------------- the judge


class PhotoJudge:
    """Image encoders (``{"clip": ImageEncoder, "dino": ImageEncoder}``, either may be absent) and an optional
    OWLv2 detector with its processor. See the module docstring for the scores."""

    def __init__(self, encoders: dict[str, ImageEncoder], detector=None, detector_processor=None):
        if not encoders:
            raise ValueError("give at least one encoder: {'clip': ImageEncoder(...)} or {'dino': ...}")
        self.encoders, self.detector, self.detector_processor = dict(encoders), detector, detector_processor

    @classmethod
    def load(cls, clip: str | None = CLIP_ID, dino: str | None = DINO_ID, detector: str | None = OWL_ID,
             device=None) -> "PhotoJudge":
        """Pretrained models from the Hugging Face hub (or local folders), in eval mode on ``device`` (default:
        CUDA, then MPS, then CPU). Pass None to skip one. The three defaults: about 1.3 GB to download (the CLIP
        checkpoint holds its text tower too), 1 GB of memory in float32."""
        from transformers import (
            AutoImageProcessor,
            CLIPImageProcessor,
            CLIPVisionModelWithProjection,
            Dinov2Model,
            Owlv2ForObjectDetection,
            Owlv2Processor,
        )


        device = pick_device(device)
        encoders = {}
        if clip:
            model = CLIPVisionModelWithProjection.from_pretrained(clip).to(device).eval()
            encoders["clip"] = ImageEncoder("clip", model, CLIPImageProcessor.from_pretrained(clip))
        if dino:
            model = Dinov2Model.from_pretrained(dino).to(device).eval()
            encoders["dino"] = ImageEncoder("dino", model, AutoImageProcessor.from_pretrained(dino))
        owl = proc = None
        if detector:
            owl = Owlv2ForObjectDetection.from_pretrained(detector).to(device).eval()
            proc = Owlv2Processor.from_pretrained(detector)
        return cls(encoders, owl, proc)

    @classmethod
    def from_config(cls, seed: int = 0, image_size: int = 32, patch_size: int = 8, hidden_size: int = 64,
                    layers: int = 2, detector: bool = True) -> "PhotoJudge":
        """The same classes built from small configs with random weights (seeded) and processors made in place:
        no download. For tests: random encoders see colours and layout, not identities."""
        from transformers import (
            BitImageProcessor,
            CLIPImageProcessor,
            CLIPVisionConfig,
            CLIPVisionModelWithProjection,
            Dinov2Config,
            Dinov2Model,
            Owlv2Config,
            Owlv2ForObjectDetection,
            Owlv2ImageProcessor,
            Owlv2Processor,
        )


        square = {"height": image_size, "width": image_size}
        vit = dict(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=4, image_size=image_size,
                   patch_size=patch_size)
        torch.manual_seed(seed)
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**vit, intermediate_size=2 * hidden_size,
                                                              projection_dim=hidden_size)).eval()
        torch.manual_seed(seed + 1)
        dino = Dinov2Model(Dinov2Config(**vit, mlp_ratio=2)).eval()
        encoders = {
            "clip": ImageEncoder("clip", clip, CLIPImageProcessor(size={"shortest_edge": image_size},
                                                                  crop_size=square)),
            "dino": ImageEncoder("dino", dino, BitImageProcessor(
                size={"shortest_edge": image_size}, crop_size=square, do_center_crop=True,
                image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])),  # DINOv2's (ImageNet's)
        }
        if not detector:
            return cls(encoders)
        words = sorted({w for emoji, _ in scenes.HELDOUT_CONCEPTS.values() for w in emoji.name.split() if w.isalpha()})
        tokenizer = tiny.build_tokenizer(words)
        small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
        torch.manual_seed(seed + 2)
        owl = Owlv2ForObjectDetection(Owlv2Config(
            text_config=dict(small, vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id),
            vision_config=dict(small, image_size=64, patch_size=16), projection_dim=32)).eval()
        proc = Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}),
                              tokenizer=tokenizer)
        return cls(encoders, owl, proc)

    def encoder(self, name: str) -> ImageEncoder:
        if name not in self.encoders:
            raise ValueError(f"no encoder {name!r} in this judge; it has {sorted(self.encoders)}")
        return self.encoders[name]

    def references(self, references, encoder: str = "dino") -> References:
        """Embed each concept's reference images once: ``{name: [PIL images]}`` or ``{name: Concept}``
        (``mcteach.world.concepts.load_concept`` of a folder of your photos). A ``References`` passes through."""
        if isinstance(references, References):
            if references.encoder != encoder:
                raise ValueError(f"references were embedded with {references.encoder!r}, not {encoder!r}")
            return references
        if not isinstance(references, dict) or not references:
            raise ValueError("references must be a non-empty dict {concept name: [reference images]}")
        enc = self.encoder(encoder)
        embeddings = []
        for name, images in references.items():
            images = list(getattr(images, "images", images))
            if not images:
                raise ValueError(f"concept {name!r} has no reference images; give it 4-8 photos")
            embeddings.append(enc.embed(images))
        return References(encoder, [str(k) for k in references], embeddings)

    def _check_layout(self, layout: dict, refs: References) -> tuple[list[str], list[str]]:
        if not isinstance(layout, dict) or not layout:
            raise ValueError("layout must be a non-empty dict {region: concept}, "
                             "e.g. {'left': 'koala', 'right': 'hamster'}")
        for region, concept in layout.items():
            region_box(region, 64, 64)  # RegionError naming the valid regions
            if concept not in refs.concepts:
                raise ValueError(f"region {region!r} asks for {concept!r}, which has no references; "
                                 f"the references have {refs.concepts}")
        regions = [r if isinstance(r, str) else ",".join(f"{float(v):g}" for v in r) for r in layout]
        return regions, list(layout.values())

    def similarities(self, images, layout: dict, references, encoder: str = "dino",
                     reduce: str = "mean") -> list[RegionSimilarity]:
        """Per image, the region x concept similarity matrix (see the module docstring). ``images``: one PIL
        image or a list; ``layout``: {region: intended concept}; ``references``: see :meth:`references`."""
        refs = self.references(references, encoder)
        names, intended = self._check_layout(layout, refs)
        images = [_check_image(im) for im in ([images] if isinstance(images, Image.Image) else list(images))]
        if not images:
            raise ValueError("no images to judge")
        crops = [crop(im, region_box(r, *im.size)) for im in images for r in layout]
        emb = self.encoder(encoder).embed(crops)
        matrix = refs.similarity(emb, reduce).reshape(len(images), len(layout), len(refs.concepts))
        return [RegionSimilarity(names, intended, list(refs.concepts), m) for m in matrix]

    def judge(self, images, layout: dict, references, encoder: str = "dino", reduce: str = "mean",
              temperature: float = 0.01, tau: float = 0.5, empty_below: float | None = None, prompt: str = "",
              seeds=None) -> list[PairResult]:
        """Each image's per-instance outcome (``evaluate.PairResult``, for ``evaluate.summarize_pairs``)."""
        sims = self.similarities(images, layout, references, encoder, reduce)
        seeds = list(seeds) if seeds is not None else [-1] * len(sims)
        return [s.outcome(temperature, tau, empty_below, prompt, seed) for s, seed in zip(sims, seeds)]

    @torch.no_grad()
    def detect(self, image: Image.Image, queries: list[str], threshold: float = 0.4,
               nms_iou: float | None = 0.5) -> list[Detection]:
        """OWLv2's boxes for the text ``queries`` scored above ``threshold``, overlapping ones merged by
        :func:`nms` (``nms_iou=None`` keeps all, as MuDI), best first. Boxes are pixels of ``image``."""
        if self.detector is None:
            raise ValueError("this judge has no detector; load one (PhotoJudge.load(detector=...)) or pass boxes")
        image = _check_image(image)
        queries = list(queries)
        param = next(self.detector.parameters())
        inputs = self.detector_processor(text=[queries], images=image, return_tensors="pt")
        inputs = {k: v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device)
                  for k, v in inputs.items()}
        outputs = self.detector(**inputs)
        found = self.detector_processor.post_process_grounded_object_detection(
            outputs, threshold=threshold, target_sizes=[(image.height, image.width)])[0]
        boxes, scores, labels = found["boxes"].float().cpu(), found["scores"].float().cpu(), found["labels"].cpu()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image.width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image.height)
        keep = nms(boxes, scores, nms_iou) if nms_iou is not None else scores.argsort(descending=True).tolist()
        return [Detection(tuple(boxes[i].tolist()), float(scores[i]), queries[int(labels[i])]) for i in keep]

    def dc_score(self, image: Image.Image, references, layout: dict | None = None, boxes=None,
                 queries: dict | None = None, encoder: str = "dino", threshold: float = 0.4,
                 nms_iou: float | None = 0.5, ord=2) -> DCResult:
        """MuDI's Detect-and-Compare score of one image (module docstring). The crops come from, in order of
        precedence: ``layout`` ({region: concept}, each concept once; row r is region r's crop, no matching, only
        the layout's concepts are columns), ``boxes`` (pixel boxes, greedy matching), or OWLv2 with one text query
        per concept (``queries`` {concept: text}, default the concept's name; greedy matching)."""
        image = _check_image(image)
        refs = self.references(references, encoder)
        if layout is not None:
            regions, concepts = self._check_layout(layout, refs)
            if len(set(concepts)) != len(concepts):
                raise ValueError(f"D&C compares each subject once, but the layout names {concepts}")
            refs = refs.subset(concepts)
            boxes, match = [region_box(r, *image.size) for r in layout], "layout"
        elif boxes is not None:
            boxes, match = [tuple(float(v) for v in b) for b in boxes], "greedy"
        else:
            text = [(queries or {}).get(c, c) for c in refs.concepts]
            boxes, match = [d.box for d in self.detect(image, text, threshold, nms_iou)], "greedy"
        gt = ground_truth_matrix(refs)
        if not boxes:
            return DCResult(0.0, torch.zeros(0, len(refs.concepts)), gt, [], refs.concepts, None)
        similarity = refs.similarity(self.encoder(encoder).embed([crop(image, b) for b in boxes]))
        score, order = dc_from_matrices(similarity, gt, match, ord)
        return DCResult(score, similarity, gt, list(boxes), refs.concepts, order)

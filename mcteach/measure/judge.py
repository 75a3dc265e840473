"""The judge: a small CNN that says which emoji (or "nothing") is in one region of an image.

It is the course's measuring instrument. To check that an image generated for "a fox on the
left and a red apple on the right" shows what it should, crop the left half and the right
half and classify each crop:

    >>> fox, apple = scenes.EMOJI["fox"], scenes.EMOJI["red apple"]
    >>> image = scenes.render_scene([(fox, "left"), (apple, "right")], seed=0).image
    >>> judge = Judge.load()
    >>> judge.classify(image, "left")[0], judge.classify(image, "right")[0]
    ('fox', 'red apple')

Labels are the base classes, the held-out concepts, "unrecognisable" and "nothing" (plain background).
A region is judged at native resolution: "left"/"right" give a (3, 64, 32) crop, "top"/"bottom"
(3, 32, 64), "centre" the whole (3, 64, 64) image; convolutions + global average pooling take
any of these shapes.

The shipped judge is two networks of this design whose log-probabilities add (``Judge.with_shape``, a product of
experts): one sees colours, the other only the luminance (``grey``). A label wins where both see it: an orange
tangle has a croissant's colours but no croissant's shape, and the pair stops calling it a croissant.

Limits: the judge is trained on renders of the emoji world (with blur, noise, brightness and
contrast jitter and small shifts to stand in for a generator's defects) and fine-tuned on generated images labelled
by eye (``finetune``, ``mcteach.measure.calibration``), so it measures "looks like that render", not image quality. It says
"unrecognisable" for many failures, but not all: a near miss with the class's outline (a snail's shell without
its eyes) is still named. It judges a region, not an image: a fox drawn across the middle is half a fox in
each half, and an object in the wrong half is simply not seen by the right crop.

    mcteach judge train [--steps N] [--seed S] [--out PATH] [--grey]   # 12 min on 2 cores (3000 steps)
    mcteach judge finetune --base PATH --labelled FOLDER ... --out PATH  # 2 min
    mcteach judge pair --base COLOUR --shape GREY --out PATH             # the two as one judge
    mcteach judge evaluate                                             # held-out accuracy
(data/judge.json holds the shipped judge's full recipe.)
"""

from __future__ import annotations

import copy
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, safe_open, save_file
from torch import nn
from tqdm.auto import tqdm

from ..files import atomic_save
from ..paths import JUDGE_PATH
from ..sd.pipeline import generate, load_pipeline
from ..world import scenes
from ..world.regions import POSITIONS, region_box

NOTHING = "nothing"


UNRECOGNISABLE = "unrecognisable"


def labels_for(classes, unrecognisable: bool = True) -> list[str]:
    """A judge's labels for a world: its classes, every held-out concept, "unrecognisable" (a blob, a ghost of
    two emoji, a scrambled one: see ``blob``) and "nothing"."""
    return ([e.name for e in classes] + [e.name for e, _ in scenes.HELDOUT_CONCEPTS.values()]
            + [UNRECOGNISABLE] * unrecognisable + [NOTHING])


#: the shipped judge's labels: the base model's world, the held-out concepts, "unrecognisable" and "nothing"
LABELS = labels_for(scenes.BASE_CLASSES)
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
CATEGORIES = ("animal", "person", "food", "object", UNRECOGNISABLE, NOTHING)
EVAL_SEED, EVAL_SAMPLES = 0, 3000
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601: a grey judge sees the luminance only


def category(label: str) -> str:
    """Category of a label: animal | person | food | object | unrecognisable | nothing."""
    return label if label in (NOTHING, UNRECOGNISABLE) else scenes.EMOJI[label].category


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Judge(nn.Module):
    """Region classifier: crops (B, 3, h, w) in [0, 1] -> logits (B, n_labels).

    Each stage halves the resolution (stride-2 conv) then refines (conv), so a (64, 32) crop
    ends as (4, 2) features of ``widths[-1]`` channels, averaged and mapped to the labels.
    """

    def __init__(self, labels: list[str] = LABELS, widths: tuple[int, ...] = (32, 64, 128, 192), grey: bool = False):
        super().__init__()
        self.labels, self.widths, self.grey = list(labels), tuple(widths), grey
        layers, c = [], 3
        for w in self.widths:
            layers += [_conv(c, w, stride=2), _conv(w, w)]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, len(self.labels))
        self.shape: Judge | None = None  # a second opinion on the shape alone (``with_shape``)
        self.shape_weight = 1.0

    def pool(self, crops: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled features (B, widths[-1]) of crops (B, 3, h, w) in [0, 1] (of their luminance,
        for a ``grey`` judge)."""
        if self.grey:
            crops = torch.einsum("bchw,c->bhw", crops, crops.new_tensor(LUMA))[:, None].expand(-1, 3, -1, -1)
        return self.features((crops - 0.5) / 0.25).mean(dim=(2, 3))

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.pool(crops))
        if self.shape is None:
            return logits
        return F.log_softmax(logits, -1) + self.shape_weight * F.log_softmax(self.shape(crops), -1)

    def with_shape(self, shape: "Judge", weight: float = 1.0) -> "Judge":
        """This judge with a second opinion: a ``grey`` judge of the same labels (luminance only). Their
        log-probabilities add (a product of experts, the grey one's raised to ``weight``): a label wins where both
        see it. Returns a new judge; ``save`` keeps both."""
        if not shape.grey or shape.labels != self.labels or shape.shape is not None:
            raise ValueError("the second opinion must be a grey judge (train --grey) with the same labels, in the "
                             "same order, and no second opinion of its own")
        judge = copy.deepcopy(self).eval()
        judge.shape, judge.shape_weight = copy.deepcopy(shape).eval(), float(weight)
        return judge

    def region_logits(self, images: torch.Tensor, positions: list[str]) -> torch.Tensor:
        """Crop each (3, 64, 64) image of ``images`` (B, 3, 64, 64) to its position's region and
        classify it; one forward pass per position. Returns logits (B, n_labels)."""
        return self._by_region(self, images, positions, len(self.labels))

    @torch.no_grad()
    def pooled_features(self, images, position: str = "centre") -> torch.Tensor:
        """Pooled features (B, widths[-1]) of each image's ``position`` region (see ``probs`` for inputs)."""
        self.eval()
        x0, y0, x1, y1 = region_box(position, scenes.IMAGE_SIZE)
        return self.pool(to_tensor(images).to(next(self.parameters()))[:, :, y0:y1, x0:x1])

    def with_concepts(self, concepts, copies: int = 16, negatives: int = 768, steps: int = 300,
                      seed: int = 0) -> "Judge":
        """A copy that also knows ``concepts`` (``Concept`` objects) it has no label for. The features stay
        frozen; one new head row per concept is fitted by logistic regression (cross-entropy, the old rows
        fixed) on the pooled features of the concept's images (``copies`` augmented copies of each, cropped to
        the position it was rendered at, else the whole frame) against ``negatives`` renders of the world.
        The row starts from the features' mean direction (weight imprinting, Qi et al. 2018). Labels it
        already has are left as they are; deterministic for a ``seed``. About a second on a CPU."""
        new = [c for c in concepts if c.name not in self.labels]
        judge = copy.deepcopy(self).eval()
        if not new:
            return judge
        if self.shape is not None:  # the second opinion learns the new labels the same way, from its own features
            judge.shape = self.shape.with_concepts(concepts, copies, negatives, steps, seed)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            feats, ys = [], []
            for k, c in enumerate(new):
                positions = [p if p in POSITIONS else "centre" for p in (c.positions or ["centre"] * len(c))]
                x = augment(to_tensor(c.images).repeat(copies, 1, 1, 1), gen)
                feats.append(self.region_pool(x, positions * copies))
                ys.append(torch.full((len(x),), len(self.labels) + k))
            images, positions, labels = batch("imprint", seed, 0, negatives)
            feats.append(self.region_pool(augment(images, gen), positions))
            ys.append(labels)
            feats, ys = torch.cat(feats), torch.cat(ys)
            rows = torch.stack([torch.nn.functional.normalize(feats[ys == len(self.labels) + k].mean(0), dim=0)
                                for k in range(len(new))]) * self.head.weight.norm(dim=1).mean()
        w = rows.clone().requires_grad_(True)
        b = self.head.bias.detach().mean().repeat(len(new)).requires_grad_(True)
        opt = torch.optim.Adam([w, b], lr=1e-2)
        old_w, old_b = self.head.weight.detach(), self.head.bias.detach()
        for _ in range(steps):
            logits = feats @ torch.cat([old_w, w]).T + torch.cat([old_b, b])
            loss = F.cross_entropy(logits, ys)
            opt.zero_grad()
            loss.backward()
            opt.step()
        head = nn.Linear(self.head.in_features, len(self.labels) + len(new))
        with torch.no_grad():
            head.weight.copy_(torch.cat([old_w, w.detach()]))
            head.bias.copy_(torch.cat([old_b, b.detach()]))
        judge.head, judge.labels = head, self.labels + [c.name for c in new]
        return judge.eval()

    def without(self, labels) -> "Judge":
        """A copy that no longer knows ``labels`` (their head rows dropped, from both halves of a pair): a judge
        blind to a concept, to check that ``with_concepts`` teaches it back."""
        drop = set(labels)
        unknown = drop - set(self.labels)
        if unknown:
            raise ValueError(f"the judge has no label {sorted(unknown)[0]!r} to drop")
        keep = [i for i, label in enumerate(self.labels) if label not in drop]
        judge = copy.deepcopy(self).eval()
        judge.head = nn.Linear(self.head.in_features, len(keep))
        with torch.no_grad():
            judge.head.weight.copy_(self.head.weight[keep])
            judge.head.bias.copy_(self.head.bias[keep])
        judge.labels = [self.labels[i] for i in keep]
        if self.shape is not None:
            judge.shape = self.shape.without(labels)
        return judge

    def region_pool(self, images: torch.Tensor, positions: list[str]) -> torch.Tensor:
        """``pool`` of each image's position region: (B, widths[-1])."""
        return self._by_region(self.pool, images, positions, self.head.in_features)

    @staticmethod
    def _by_region(fn, images: torch.Tensor, positions: list[str], width: int) -> torch.Tensor:
        """``fn`` (B', 3, h, w) -> (B', width) on each image's region crop, one call per position."""
        out = images.new_empty(len(positions), width)
        for pos in sorted(set(positions)):
            idx = torch.tensor([i for i, p in enumerate(positions) if p == pos])
            x0, y0, x1, y1 = region_box(pos, scenes.IMAGE_SIZE)
            out[idx] = fn(images[idx, :, y0:y1, x0:x1])
        return out


    @torch.no_grad()
    def probs(self, images, positions: str | list[str]) -> torch.Tensor:
        """Softmax probabilities (B, n_labels) of the label in each image's region.

        ``images``: a list of 64x64 PIL images or a float tensor (B, 3, 64, 64) in [0, 1];
        ``positions``: one position name per image, or one for all.
        """
        images = to_tensor(images)
        positions = [positions] * len(images) if isinstance(positions, str) else list(positions)
        if len(positions) != len(images):
            raise ValueError(
                f"got {len(images)} images but {len(positions)} positions; give one each, or one str for all"
            )
        for p in set(positions):
            region_box(p, scenes.IMAGE_SIZE)  # RegionError naming the valid regions
        self.eval()
        param = next(self.parameters())
        return self.region_logits(images.to(param), positions).softmax(-1)

    def labels_of(self, images, positions: str | list[str] = "centre") -> list[str]:
        """The top label in each image's region (see ``probs``)."""
        return [self.labels[int(i)] for i in self.probs(images, positions).argmax(-1)]

    def classify(self, image: Image.Image, position: str) -> tuple[str, float]:
        """Top label in ``position`` of one PIL image, and its probability."""
        p, i = self.probs([image], position)[0].max(0)
        return self.labels[i], p.item()

    def save(self, path: Path = JUDGE_PATH) -> None:
        """fp16 safetensors with labels and widths in the metadata (and, for a pair, the grey half's weights under
        ``shape.`` with its widths and weight), written atomically."""
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in self.state_dict().items()}
        meta = {"labels": json.dumps(self.labels), "widths": json.dumps(self.widths), "grey": json.dumps(self.grey)}
        if self.shape is not None:
            meta.update(shape_widths=json.dumps(self.shape.widths), shape_weight=json.dumps(self.shape_weight))
        atomic_save(tensors, path, lambda t, tmp: save_file(t, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | Path = JUDGE_PATH) -> "Judge":
        """The judge saved at ``path``, in float32, in eval mode."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"no judge weights at {path}; train them with `mcteach judge train`"
            )
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        judge = cls(json.loads(meta["labels"]), tuple(json.loads(meta["widths"])), json.loads(meta.get("grey", "false")))
        if "shape_widths" in meta:
            judge.shape = cls(judge.labels, tuple(json.loads(meta["shape_widths"])), grey=True)
            judge.shape_weight = json.loads(meta["shape_weight"])
        state = load_file(path)
        judge.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        return judge.eval()


def to_tensor(images) -> torch.Tensor:
    """64x64 PIL images (a list) or a (B, 3, 64, 64) tensor -> float tensor (B, 3, 64, 64) in [0, 1].
    Larger square images (SD 1.5's 512x512) are first downsampled to 64x64 with a box filter."""
    size = scenes.IMAGE_SIZE
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"expected a (B, 3, {size}, {size}) tensor, got shape {tuple(images.shape)}")
        return images.float()
    if isinstance(images, Image.Image):
        images = [images]
    images = [im.resize((size, size), Image.BOX) if im.width == im.height > size else im for im in images]
    for im in images:
        if im.size != (size, size):
            w, h = im.size
            raise ValueError(f"expected {size}x{size} images, got one of {w}x{h}; resize it first")
    arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- data


def big_pair(emoji: scenes.Emoji, other: scenes.Emoji, position: str, rng: random.Random) -> Image.Image:
    """``emoji`` drawn large (a centre-sized render, 47-78% of the image) centred in the half ``position``, and
    ``other`` likewise in the opposite half (or background), both clipped at the midline: what a generator
    that draws each region as its own centred picture makes (``masking.region_passes`` with ``recentre=True``)."""
    size, half = scenes.IMAGE_SIZE, scenes.IMAGE_SIZE // 2
    bg = scenes.background_colour(rng)
    out = Image.new("RGB", (size, size), bg)
    for e, pos in ((emoji, position), (other if rng.random() < 0.8 else None, OPPOSITE[position])):
        if e is None:
            continue
        im = scenes.render_scene([(e, "centre")], rng=rng, background=bg).image
        dx = {"left": -half // 2, "right": half // 2}.get(pos, 0) + rng.randint(-3, 3)
        dy = {"top": -half // 2, "bottom": half // 2}.get(pos, 0) + rng.randint(-3, 3)
        shifted = Image.new("RGB", (size, size), bg)
        shifted.paste(im, (dx, dy))
        x0, y0, x1, y1 = region_box(pos, scenes.IMAGE_SIZE)
        out.paste(shifted.crop((x0, y0, x1, y1)), (x0, y0))
    return out


BLOB_KINDS = ("scramble", "ghost", "chimera", "warp", "smear")


def blob(classes: list[scenes.Emoji], position: str, rng: random.Random, kind: str | None = None) -> Image.Image:
    """An "unrecognisable" region: what a half-trained generator draws instead of an object, made from renders.

    - scramble: the object's box cut into 3x3 or 4x4 tiles, shuffled and flipped (its colours and texture, no shape);
    - ghost: two emoji of different categories at the same place, blended 40-60% (two concepts mixed into one);
    - chimera: the top (or left) of one emoji on the bottom (right) of another;
    - warp: a smooth random displacement of up to 12-18 px (the shape bent out of form);
    - smear: blurred with sigma 4.5-7 px (a cloud of the object's colours).
    """
    kind = kind or rng.choice(BLOB_KINDS)
    a = rng.choice(classes)
    others = [c for c in classes if c.category != a.category] or [c for c in classes if c != a]
    b = rng.choice(others)  # another category: a ghost of two faces may still read as a face
    bg, place = scenes.background_colour(rng), rng.random()
    scene = scenes.render_scene([(a, position)], rng=random.Random(place), background=bg)
    x = np.asarray(scene.image, dtype=np.float32)
    ys, xs = np.nonzero(scene.masks[0] > 0.1)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    if kind in ("ghost", "chimera"):
        y = np.asarray(scenes.render_scene([(b, position)], rng=random.Random(place), background=bg).image, np.float32)
        if kind == "ghost":
            t = rng.uniform(0.4, 0.6)
            x = t * x + (1 - t) * y
        elif rng.random() < 0.5:
            cut = rng.randint(y0 + 2 * (y1 - y0) // 5, y1 - 2 * (y1 - y0) // 5)
            x[cut:] = y[cut:]
        else:
            cut = rng.randint(x0 + 2 * (x1 - x0) // 5, x1 - 2 * (x1 - x0) // 5)
            x[:, cut:] = y[:, cut:]
    elif kind == "scramble":
        n = rng.choice((3, 4))
        h, w = max(1, (y1 - y0) // n), max(1, (x1 - x0) // n)
        tiles = [x[y0 + i * h: y0 + (i + 1) * h, x0 + j * w: x0 + (j + 1) * w].copy() for i in range(n) for j in range(n)]
        rng.shuffle(tiles)
        for k, tile in enumerate(tiles):
            tile = tile[::-1] if rng.random() < 0.5 else tile
            tile = tile[:, ::-1] if rng.random() < 0.5 else tile
            i, j = divmod(k, n)
            x[y0 + i * h: y0 + (i + 1) * h, x0 + j * w: x0 + (j + 1) * w] = tile
    elif kind == "warp":
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        size = x.shape[0]
        base = torch.stack(torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="xy"), -1)
        t = torch.from_numpy(x).permute(2, 0, 1)[None]
        t = F.grid_sample(t, base[None] + _flow(7, rng.uniform(12, 18), size, g), mode="bilinear",
                          padding_mode="border", align_corners=True)
        x = t[0].permute(1, 2, 0).numpy()
    elif kind == "smear":
        t = torch.from_numpy(x).permute(2, 0, 1)[None] / 255.0
        x = gaussian_blur(t, torch.tensor([rng.uniform(4.5, 7.0)]), radius=14)[0].permute(1, 2, 0).numpy() * 255.0
    else:
        raise ValueError(f"unknown blob kind {kind!r}; one of {BLOB_KINDS}")
    return Image.fromarray(np.clip(x, 0, 255).round().astype(np.uint8))


def failure_bank(model, n: int = 2000, seed: int = 0, classes=None, steps: int = 2) -> torch.Tensor:
    """``n`` images (n, 3, 64, 64) uint8 that a generator draws when its sampler stops after ``steps`` DDIM steps
    (default 2 of the course's 25): "a <class>" for random classes, so each is the class's colours and bits of its
    texture in no shape at all: the failure a person calls unrecognisable and a texture-reading judge names as the
    class. A judge trained with them (``train(..., failures=...)``) learns that colours and texture are not enough.
    About 2 minutes for 2000 on 2 CPU cores."""
    pipe, rng = load_pipeline(model, device="cpu"), random.Random(f"failures-{seed}")
    prompts = [scenes.caption([(rng.choice(classes or scenes.BASE_CLASSES), "centre")]) for _ in range(n)]
    images = generate(pipe, prompts, seed=list(range(seed, seed + n)), steps=steps, guidance_scale=5.0, batch_size=64)
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()


def failure_example(bank: torch.Tensor, position: str, rng: random.Random) -> Image.Image:
    """One bank image, smoothed (sigma 0.5-1 px: the few-step sampler leaves speckle that finished images lack) and,
    for a half position, shrunk into that half of a plain background of its border's colour."""
    x = bank[rng.randrange(len(bank))].float()[None] / 255.0
    x = gaussian_blur(x, torch.tensor([rng.uniform(0.5, 1.0)]))[0]
    im = Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8))
    if position == "centre":
        return im
    size, border = scenes.IMAGE_SIZE, np.concatenate([np.asarray(im)[[0, -1]].reshape(-1, 3), np.asarray(im)[:, [0, -1]].reshape(-1, 3)])
    out = Image.new("RGB", (size, size), tuple(int(v) for v in np.median(border, axis=0)))
    x0, y0, x1, y1 = region_box(position, scenes.IMAGE_SIZE)
    side = min(x1 - x0, y1 - y0)
    out.paste(im.resize((side, side), Image.LANCZOS), (x0 + (x1 - x0 - side) // 2, y0 + (y1 - y0 - side) // 2))
    return out


def _flow(n: int, pixels: float, size: int, generator: torch.Generator) -> torch.Tensor:
    """A smooth random displacement field (1, size, size, 2) in grid_sample units, ``n`` x ``n`` control points,
    at most ``pixels`` px."""
    flow = F.interpolate(torch.randn(1, 2, n, n, generator=generator), size=(size, size), mode="bicubic",
                         align_corners=True)
    return (flow / flow.abs().amax().clamp_min(1e-6) * pixels * 2 / size).permute(0, 2, 3, 1)


def sample_example(rng: random.Random, p_nothing: float = 0.1, p_big: float = 0.15,
                   labels: list[str] = LABELS, p_blob: float = 0.1,
                   failures: torch.Tensor | None = None) -> tuple[Image.Image, str, str]:
    """One (image, position, label) of the world: an object at ``position`` (alone, or with
    another object in the opposite half; with probability ``p_big`` drawn large and clipped at the
    midline, ``big_pair``), or an empty region: the opposite half of a one-object scene, or a blank
    background; for a judge with the label, with probability ``p_blob`` an "unrecognisable" ``blob`` (half of them
    a generator's unfinished image from ``failures``, ``failure_bank``, where given)."""
    position = rng.choice(list(POSITIONS))
    classes = [scenes.EMOJI[label] for label in labels if label not in (NOTHING, UNRECOGNISABLE)]  # in label order
    if UNRECOGNISABLE in labels and rng.random() < p_blob:
        if failures is not None and rng.random() < 0.5:
            return failure_example(failures, position, rng), position, UNRECOGNISABLE
        return blob(classes, position, rng), position, UNRECOGNISABLE
    if rng.random() < p_nothing:
        if position == "centre" or rng.random() < 0.2:
            return Image.new("RGB", (scenes.IMAGE_SIZE,) * 2, scenes.background_colour(rng)), position, NOTHING
        scene = scenes.render_scene([(rng.choice(classes), OPPOSITE[position])], rng=rng)
        return scene.image, position, NOTHING
    emoji = rng.choice(classes)
    if position in OPPOSITE and rng.random() < p_big:
        return big_pair(emoji, rng.choice([c for c in classes if c != emoji]), position, rng), position, emoji.name
    objects = [(emoji, position)]
    if position != "centre" and rng.random() < 0.5:
        objects.append((rng.choice([c for c in classes if c != emoji]), OPPOSITE[position]))
    rng.shuffle(objects)
    return scenes.render_scene(objects, rng=rng).image, position, emoji.name


def batch(namespace: str, seed: int, index: int, size: int, labels: list[str] = LABELS,
          failures: torch.Tensor | None = None) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Batch ``index`` of a stream: images (B, 3, 64, 64), positions, label indices (B,) into ``labels``.

    Streams are disjoint by ``namespace`` ("train", "eval", "test"), so held-out images never
    appear in training."""
    examples = [sample_example(random.Random(f"{namespace}-{seed}-{index * size + i}"), labels=labels,
                               failures=failures) for i in range(size)]
    images, positions, names = zip(*examples)
    return to_tensor(list(images)), list(positions), torch.tensor([labels.index(name) for name in names])


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """Separable gaussian blur of (B, C, H, W) with one sigma (B,) per image (sigma ~ 0: identity)."""
    b, c, h, w = x.shape
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, 2r+1)
    y = F.pad(x.reshape(1, b * c, h, w), (radius,) * 4, mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 3) -> torch.Tensor:
    """Make renders (B, 3, 64, 64) look generated: a shift of up to ``max_shift`` px (30% of
    images, edges replicated), blur sigma ~ U(0, 1.2), contrast x U(0.8, 1.2), brightness
    + U(-0.08, 0.08), gaussian noise std ~ U(0, 0.08)."""
    b, _, h, w = x.shape

    def u(lo: float, hi: float) -> torch.Tensor:  # (B, 1, 1, 1) uniform
        return lo + (hi - lo) * torch.rand(b, 1, 1, 1, generator=generator)

    s = max_shift
    padded = F.pad(x, (s, s, s, s), mode="replicate")
    shifts = torch.randint(-s, s + 1, (b, 2), generator=generator)
    shifts[torch.rand(b, generator=generator) > 0.3] = 0
    x = torch.stack([im[:, s + dy : s + dy + h, s + dx : s + dx + w]
                     for im, (dy, dx) in zip(padded, shifts.tolist())])
    x = gaussian_blur(x, u(0.0, 1.2).flatten())
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * u(0.8, 1.2) + mean + u(-0.08, 0.08)
    x = x + u(0.0, 0.08) * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1)


# ----------------------------------------------------------------------------- train / evaluate


@torch.no_grad()
def accuracy(judge: Judge, seed: int = EVAL_SEED, n: int = EVAL_SAMPLES, augmented: bool = False) -> dict:
    """Accuracy on ``n`` held-out renders of the "eval" stream, overall and per category."""
    judge.eval()
    correct, total = Counter(), Counter()
    for i in range(0, n, 250):
        images, positions, labels = batch("eval", seed, i // 250, min(250, n - i), judge.labels)
        if augmented:
            images = augment(images, torch.Generator().manual_seed(seed * 1000 + i))
        pred = judge.region_logits(images, positions).argmax(-1)
        for y, ok in zip(labels.tolist(), (pred == labels).tolist()):
            for key in ("overall", category(judge.labels[y])):
                correct[key] += ok
                total[key] += 1
    return {k: round(correct[k] / total[k], 4) for k in ("overall", *CATEGORIES) if total[k]}


def train(steps: int = 800, seed: int = 0, batch_size: int = 64, lr: float = 3e-3,
          labels: list[str] = LABELS, failures: torch.Tensor | None = None, grey: bool = False) -> Judge:
    """Train a judge for ``labels`` (default: the base model's world) on the augmented "train" stream: AdamW,
    cross-entropy with 0.05 label smoothing, one-cycle learning rate (5% warm-up, cosine decay). Deterministic
    for a seed."""
    torch.manual_seed(seed)
    judge = Judge(labels, grey=grey)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=0.02)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    judge.train()
    bar = tqdm(range(steps), desc="judge", mininterval=10)
    for step in bar:
        images, positions, targets = batch("train", seed, step, batch_size, judge.labels, failures)
        logits = judge.region_logits(augment(images, gen), positions)
        loss = F.cross_entropy(logits, targets, label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return judge.eval()


def finetune(judge: Judge, images, regions: list[str], labels: list[str], steps: int = 400, seed: int = 0,
             lr: float = 3e-4, batch_size: int = 64, share: float = 0.25, blob_share: float = 0.5) -> Judge:
    """Go on training ``judge`` with generated images labelled by eye (``calibration`` sets: images, the region
    judged, the label): each batch is ``share`` labelled images, ``blob_share`` of them "unrecognisable" ones
    (there are few), and the rest the judge's own stream of renders, all augmented alike; AdamW, cosine decay.
    Labels the judge does not have are skipped. Deterministic for a seed. Returns a new judge."""
    if judge.shape is not None:
        raise ValueError("this judge is a pair (with_shape): fine-tune the colour judge and the grey judge each on its "
                         "own, then pair them again (mcteach judge pair)")
    keep = [i for i, label in enumerate(labels) if label in judge.labels]
    if not keep:
        raise ValueError(f"none of the labels {sorted(set(labels))[:5]}... is one of the judge's")
    x_all = to_tensor([images[i] for i in keep])
    where = [regions[i] for i in keep]
    y_all = torch.tensor([judge.labels.index(labels[i]) for i in keep])
    blob = y_all == judge.labels.index(UNRECOGNISABLE) if UNRECOGNISABLE in judge.labels else None
    if blob is not None and blob.any() and not blob.all():
        weights = torch.where(blob, blob_share / int(blob.sum()), (1 - blob_share) / int((~blob).sum()))
    else:
        weights = torch.ones(len(y_all))
    judge = copy.deepcopy(judge).train()
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=0.02)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    n_labelled = max(1, round(batch_size * share))
    for step in tqdm(range(steps), desc="finetune", mininterval=10):
        images_s, positions, targets = batch("finetune", seed, step, batch_size - n_labelled, judge.labels)
        pick = torch.multinomial(weights, n_labelled, replacement=True, generator=gen)
        x = torch.cat([images_s, x_all[pick]])
        logits = judge.region_logits(augment(x, gen), positions + [where[i] for i in pick.tolist()])
        loss = F.cross_entropy(logits, torch.cat([targets, y_all[pick]]), label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return judge.eval()


def report(judge: Judge, seed: int = EVAL_SEED, n: int = EVAL_SAMPLES) -> dict:
    """Held-out accuracy on clean and on augmented renders, with how it was measured."""
    return {
        "eval_seed": seed,
        "eval_samples": n,
        "accuracy": accuracy(judge, seed, n),
        "accuracy_augmented": accuracy(judge, seed, n, augmented=True),
    }

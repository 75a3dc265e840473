"""The objects of a world image and its background (the position-free judge of notebook 07, the silhouettes of
notebook 09): the world draws objects on a plain background, so an object is what differs from the background's
colour.

    >>> image = scenes.render_scene([(scenes.BASE_CLASSES[0], "left")], seed=0).image
    >>> [int(p.sum()) > 50 for p in components(foreground(image))]
    [True]
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from . import scenes  # noqa: F401 (the doctest's)


def background(image: Image.Image) -> np.ndarray:
    """The background colour (3,): the median of the border pixels."""
    x = np.asarray(image.convert("RGB"), dtype=np.float32)
    return np.median(np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]]), axis=0)


def foreground(image: Image.Image, threshold: float = 30.0) -> np.ndarray:
    """(H, W) bool: the pixels whose colour is more than ``threshold`` from the ``background`` colour."""
    x = np.asarray(image.convert("RGB"), dtype=np.float32)
    return np.linalg.norm(x - background(image), axis=-1) > threshold


def components(mask: np.ndarray, min_area: int = 50, gap: int = 1) -> list[np.ndarray]:
    """The objects of a foreground ``mask``, largest first: after a 3x3 opening (specks and thin bridges go),
    parts at most ``2 * gap`` pixels apart are one object (an emoji's face and shirt, split by a colour close to the
    background's), and objects under ``min_area`` pixels are dropped (a texture in a generated background)."""
    eight = np.ones((3, 3), bool)
    opened = ndimage.binary_opening(mask, structure=eight)
    joined = ndimage.binary_dilation(opened, structure=eight, iterations=gap) if gap > 0 else opened  # 0: until stable
    grouped, n = ndimage.label(joined, structure=eight)
    parts = [opened & (grouped == i) for i in range(1, n + 1)]
    return sorted((p for p in parts if p.sum() >= min_area), key=lambda p: -int(p.sum()))


def main_colours(px: np.ndarray, k: int, iterations: int = 20) -> np.ndarray:
    """The ``k`` main colours of the pixels ``px`` (N, 3): k-means started from the colours at evenly spaced ranks of
    brightness, so the same colours every run."""
    px = np.asarray(px, np.float32)
    if len(px) < k:
        raise ValueError(f"{len(px)} pixels cannot give {k} colours")
    centres = px[np.argsort(px.sum(1))[np.linspace(0, len(px) - 1, k).astype(int)]]
    for _ in range(iterations):
        near = ((px[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        centres = np.stack([px[near == j].mean(0) if (near == j).any() else centres[j] for j in range(k)])
    return centres

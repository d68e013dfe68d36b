"""A deterministic pixel-based checker for images of the synthetic shapes world.

Given an RGB image (uint8 ``[H, W, 3]``), find the main shape and report its colour, position and
shape class:

1. background = per-channel median of the image border (shapes never touch the border);
2. foreground = pixels farther than ``fg_threshold`` from the background colour;
3. each foreground pixel is assigned the nearest palette colour; the largest colour group is the shape;
4. position = the nearest of the five layout centres to that group's centroid;
5. shape = from the fill ratio of the group's bounding box (square ~1, circle ~0.79, triangle ~0.5,
   star ~0.41).

It knows nothing about how an image was made, only the palette and layout of
:mod:`bagel_jax.demo.synthetic`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from . import synthetic as syn



@dataclasses.dataclass(frozen=True)
class Detection:
    colour: Optional[str]
    position: Optional[str]
    shape: Optional[str]
    area: float            # fraction of the image covered by the detected shape


def detect(image: np.ndarray, fg_threshold: float = 60.0, min_area: float = 0.005) -> Detection:
    img = np.asarray(image, np.float32)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected an [H, W, 3] image, got shape {img.shape}")
    H, W, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    fg = np.linalg.norm(img - bg, axis=-1) > fg_threshold
    if fg.mean() < min_area:
        return Detection(None, None, None, float(fg.mean()))
    palette = np.array([syn.RGB[c] for c in syn.COLOURS], np.float32)
    pix = img[fg]
    nearest = np.argmin(((pix[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
    counts = np.bincount(nearest, minlength=len(palette))
    best = int(np.argmax(counts))
    ys, xs = np.nonzero(fg)
    ys, xs = ys[nearest == best], xs[nearest == best]
    area = len(ys) / (H * W)
    if area < min_area:
        return Detection(None, None, None, float(area))
    cy, cx = (ys.mean() + 0.5) / H, (xs.mean() + 0.5) / W
    position = min(syn.CENTRES, key=lambda p: (syn.CENTRES[p][0] - cx) ** 2 + (syn.CENTRES[p][1] - cy) ** 2)
    bh, bw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = len(ys) / float(bh * bw)
    # reference fill ratios measured on 64 px renders (rasterisation makes them differ from the ideal shapes)
    shape = min({"square": 1.0, "circle": 0.79, "triangle": 0.52, "star": 0.41}.items(),
                key=lambda kv: abs(kv[1] - fill))[0]
    return Detection(syn.COLOURS[best], position, shape, float(area))

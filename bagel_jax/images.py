"""Image preprocessing with the official resize rule (docs/architecture.md#image-preprocessing), and the
split of an image into ViT tokens (:func:`patchify`): shared by training packing (:mod:`bagel_jax.data`) and
inference (:mod:`bagel_jax.inference`).

``MaxLongEdgeMinShortEdgeResize``: scale the long side down to ``max_size`` (never up), then up so
the short side reaches ``min_size``; round each side (Python half-to-even) and snap to a multiple of
``stride``; re-check ``max_pixels`` (by the *area* ratio, as the official code does) and ``max_size``.
PIL bicubic (antialiased). Then ``x/255`` normalised with mean 0.5, std 0.5 to [-1, 1].
"""

from __future__ import annotations

import dataclasses
import os
from typing import Union

import numpy as np
from PIL import Image

from .config import ConfigError, check_field, check_keys

DEFAULT_MAX_PIXELS = 14 * 14 * 9 * 1024


class ImageError(ValueError):
    """An input image cannot be read or used (unreadable file, unsupported size)."""


@dataclasses.dataclass(frozen=True)
class ImageTransform:
    """The official image transform's sizes: the longer side at most ``max_image_size``, the shorter at least
    ``min_image_size``, both multiples of ``image_stride``, at most ``max_pixels`` pixels (:meth:`target_size`)."""

    max_image_size: int
    min_image_size: int
    image_stride: int
    max_pixels: int = DEFAULT_MAX_PIXELS

    @staticmethod
    def from_dict(d, source: str = "image transform") -> "ImageTransform":
        """From a dict of the fields (``max_pixels`` optional): integers >= 1, ``min_image_size <=
        max_image_size``; :class:`~bagel_jax.config.ConfigError` naming ``source`` and the field otherwise."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected an object with max_image_size, min_image_size, image_stride, "
                              f"got {d!r}")
        check_keys(ImageTransform, d, source)
        missing = [k for k in ("max_image_size", "min_image_size", "image_stride") if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing required field '{missing[0]}'")
        t = ImageTransform(**{k: check_field(source, k, v, "int") for k, v in d.items()})
        if t.min_image_size > t.max_image_size:
            raise ConfigError(f"{source}: min_image_size {t.min_image_size} > max_image_size {t.max_image_size}")
        return t

    def _snap(self, v: float) -> int:
        return max(self.image_stride, int(round(v / self.image_stride) * self.image_stride))

    def _apply_scale(self, w: int, h: int, s: float) -> tuple[int, int]:
        return self._snap(round(w * s)), self._snap(round(h * s))

    def target_size(self, width: int, height: int, img_num: int = 1) -> tuple[int, int]:
        """``(W', H')`` the official rule resizes a ``width x height`` image to."""
        if width < 1 or height < 1:
            raise ImageError(f"image has an empty side ({width}x{height})")
        s = min(self.max_image_size / max(width, height), 1.0)
        s = max(s, self.min_image_size / min(width, height))
        w, h = self._apply_scale(width, height, s)
        if w * h > self.max_pixels / img_num:
            s = self.max_pixels / img_num / (w * h)
            w, h = self._apply_scale(w, h, s)
        if max(w, h) > self.max_image_size:
            s = self.max_image_size / max(w, h)
            w, h = self._apply_scale(w, h, s)
        return w, h

    def resize(self, img: Image.Image, img_num: int = 1) -> Image.Image:
        w, h = self.target_size(*img.size, img_num=img_num)
        if (w, h) == img.size:
            return img
        return img.resize((w, h), Image.BICUBIC)

    def __call__(self, img: Image.Image, img_num: int = 1) -> np.ndarray:
        """PIL image -> ``[3, H', W']`` float32 in [-1, 1]."""
        return to_tensor(self.resize(img, img_num))


# Official transforms.
INFERENCE_VAE = ImageTransform(1024, 512, 16)
INFERENCE_VIT = ImageTransform(980, 224, 14)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Images with alpha (RGBA, LA, PA, premultiplied, transparent palette) are
    composited onto white. 16-bit grayscale ("I;16*", and "I", which is how 16-bit PNGs may arrive) is scaled
    from 0..65535 to 0..255 (PIL's own conversion clips it: every pixel above 255 became white); float
    ("F") images are taken as 0..255, as PIL does; LAB goes through a colour transform. Everything else: PIL's conversion (L, 1, P, CMYK, YCbCr...)."""
    if img.mode.startswith("I"):
        x = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.round(x * (255.0 / 65535.0)), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.round(np.asarray(img, np.float64)), 0, 255).astype(np.uint8), "L")
    elif img.mode == "La":
        img = img.convert("LA")
    elif img.mode == "LAB":   # PIL's convert would copy L, a, b into R, G, B
        from PIL import ImageCms   # littlecms, needed for LAB images only

        lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
        return ImageCms.applyTransform(img, ImageCms.buildTransform(lab, srgb, "LAB", "RGB"))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, img).convert("RGB")
    return img.convert("RGB")


def load_image(src: Union[str, os.PathLike, Image.Image, np.ndarray]) -> Image.Image:
    """A path, a PIL image or an ``[H, W, 3]`` uint8 array -> RGB PIL image (clear error if unreadable)."""
    if isinstance(src, Image.Image):
        return to_rgb(src)
    if isinstance(src, np.ndarray):
        if src.ndim != 3 or src.shape[-1] not in (3, 4) or src.dtype != np.uint8:
            raise ImageError(f"expected an [H, W, 3] uint8 array, got shape {src.shape} dtype {src.dtype}")
        return to_rgb(Image.fromarray(src))
    path = os.fspath(src)
    if not os.path.isfile(path):
        raise ImageError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except Exception as e:  # PIL raises several types
        raise ImageError(f"cannot read image {path}: {e}") from None


def to_tensor(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> ``[3, H, W]`` float32 in [-1, 1]."""
    x = np.asarray(img, dtype=np.uint8).astype(np.float32) / 255.0
    return np.transpose((x - 0.5) / 0.5, (2, 0, 1)).astype(np.float32)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Decoded ``[..., H, W, 3]`` in [-1, 1] -> uint8 by the official truncation ``(clamp(x/2+0.5,0,1)*255).to(uint8)``."""
    return (np.clip(np.asarray(x, np.float32) * 0.5 + 0.5, 0.0, 1.0) * 255.0).astype(np.uint8)


def patchify(image_chw: np.ndarray, patch_size: int, max_patches_per_side: int) -> tuple[np.ndarray, np.ndarray]:
    """Split a normalised ``(C, H, W)`` image into ViT tokens (docs/architecture.md#sequence-layout).

    Returns:
      tokens ``[n, p*p*C]`` float32, row-major over the patch grid, each patch ordered
      (row-in-patch, col-in-patch, channel) with channel fastest;
      position_ids ``[n]`` int64, ``r * max_patches_per_side + c``.
    """
    x = np.asarray(image_chw)
    if x.ndim != 3:
        raise ValueError(f"patchify: expected a (C, H, W) image, got shape {x.shape}")
    C, H, W = x.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"patchify: image size {H}x{W} is not a multiple of patch_size {p}")
    h, w = H // p, W // p
    if h > max_patches_per_side or w > max_patches_per_side:
        raise ValueError(f"patchify: patch grid {h}x{w} exceeds max_patches_per_side {max_patches_per_side}")
    tokens = x.reshape(C, h, p, w, p).transpose(1, 3, 2, 4, 0).reshape(h * w, p * p * C)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    position_ids = (rows * max_patches_per_side + cols).reshape(-1).astype(np.int64)
    return tokens.astype(np.float32), position_ids

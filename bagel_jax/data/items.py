"""The items of a training sample (text, ViT image, VAE image, position gap) as the packer takes them, and its
error. Below both :mod:`bagel_jax.data.packing` and :mod:`bagel_jax.data.patch_ar` (whose ``PatchArItem`` is a
``VaeItem``)."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import numpy as np


class PackingError(ValueError):
    pass


@dataclasses.dataclass
class TextItem:
    ids: Sequence[int]
    loss: bool = False
    special_token_loss: bool = False         # CE on the closing <|im_end|> position ...
    special_token_label: Optional[int] = None  # ... with this label (official plan fields)


@dataclasses.dataclass
class VitItem:
    image: np.ndarray            # [3, H, W] float in [-1, 1], H and W multiples of the ViT patch


@dataclasses.dataclass
class VaeItem:
    image: np.ndarray            # [3, H, W] float in [-1, 1], H and W multiples of 16
    loss: bool = False           # noised target (MSE) vs clean conditioning
    t_raw: float = 0.0           # raw timestep logit for noised targets (t = sigmoid(t_raw), then shift)


@dataclasses.dataclass
class PositionGap:
    """No tokens; advances the sample's RoPE counter by ``n`` (an image dropped by conditional dropout
    still consumes one position in the official trainer, docs/architecture.md#sequence-layout)."""
    n: int = 1


Item = Union[TextItem, VitItem, VaeItem, PositionGap]

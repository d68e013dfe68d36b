"""Readers for the official BAGEL training formats and their sequence plans (docs/architecture.md#training-packing).

Each dataset maps a *row index* to one sample: a list of plan entries (text / vit_image / vae_image
with the official ``enable_cfg`` / ``loss`` flags). :func:`plan_to_items` turns a plan into packing
items, applying the conditional dropout (text 0.1, ViT 0.3, VAE 0.3 by default) and drawing one raw
timestep ``N(0, 1)`` per noised image; ``sigmoid`` and the timestep shift happen in ``train_forward``.

Supported groups (names as in the official dataset YAML):

* ``t2i_pretrain``: parquet files in ``data_dir`` with columns ``image`` (encoded bytes) and
  ``captions`` (JSON dict of alternative captions; one chosen uniformly);
  plan ``[text(cfg=1, loss=0), vae_image(cfg=0, loss=1)]``.
* ``unified_edit``: parquet files (listed by ``parquet_info_path``, a JSON ``{path: {num_row_groups}}``,
  or all ``*.parquet`` in ``data_dir``) with ``image_list`` and ``instruction_list``; official plan with a
  random start/end and the 50 % concatenated-instruction branch.
* ``interleaved``: a JSONL file of explicit sequences (see :class:`InterleavedDataset`).
* ``vlm_sft``: a JSONL file (``jsonl_path``) of ``{"image": str | [str], "conversations": [{from, value}]}``
  with image paths relative to ``data_dir``; ``<image>`` splits the human turns. Videos are not supported
  (a ``video`` row is a bad sample).

Every random choice of a sample comes from ``numpy.random.default_rng((seed, group, index))``, so a
sample is a pure function of its index and the iterator state is a handful of integers.
Unreadable rows raise :class:`SampleError`; the loader skips and counts them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

from .. import layout
from ..images import ImageTransform, to_rgb, to_tensor
from . import packing, patch_ar
from .errors import DataConfigError, SampleError
from .parquet import ParquetRows, parquet_files


@dataclasses.dataclass
class PlanEntry:
    type: str                       # "text" | "vit_image" | "vae_image"
    enable_cfg: bool = False
    loss: bool = False
    text: Optional[list[int]] = None
    image: Optional[np.ndarray] = None   # [3, H, W] in [-1, 1]
    special_token_loss: bool = False     # text: CE on its closing <|im_end|> position ...
    special_token_label: Optional[int] = None   # ... with this label id (official ``pack_sequence``)


@dataclasses.dataclass(frozen=True)
class Dropout:
    text: float = 0.1
    vit: float = 0.3
    vae: float = 0.3


def decode_image(data: bytes) -> Image.Image:
    """An RGB image from encoded bytes (parquet rows); SampleError if unreadable."""
    return _read_rgb(io.BytesIO(data), "")


def _read_rgb(source, name: Optional[str] = None) -> Image.Image:
    """Open ``source`` (a path, or a file object) as RGB; SampleError naming it if unreadable."""
    name = source if name is None else name
    try:
        with Image.open(source) as im:
            im.load()
            return to_rgb(im)
    except Exception as e:
        raise SampleError(f"unreadable image{' ' + name if name else ''} ({e})") from None


def plan_to_items(plan: Sequence[PlanEntry], rng: np.random.Generator, dropout: Dropout) -> list:
    """Official ``to_tensor`` semantics: conditional dropout and raw timesteps
    (docs/architecture.md#training-packing)."""
    items = []
    for e in plan:
        if e.type == "text":
            if e.enable_cfg and rng.random() < dropout.text:
                continue  # dropped text does not advance the RoPE counter
            items.append(packing.TextItem(list(e.text), loss=bool(e.loss),
                                          special_token_loss=bool(e.special_token_loss),
                                          special_token_label=e.special_token_label))
        elif e.type == "vit_image":
            if e.enable_cfg and rng.random() < dropout.vit:
                items.append(packing.PositionGap(1))
                continue
            items.append(packing.VitItem(e.image))
        elif e.type == "vae_image":
            if e.enable_cfg and rng.random() < dropout.vae:
                items.append(packing.PositionGap(1))
                continue
            t_raw = float(rng.standard_normal()) if e.loss else 0.0
            items.append(packing.VaeItem(e.image, loss=bool(e.loss), t_raw=t_raw))
        else:
            raise SampleError(f"unknown plan entry type {e.type!r}")
    return items


def item_tokens(item, vit_patch: int, latent_ds: int) -> int:
    """Sequence tokens an item occupies after packing."""
    if isinstance(item, packing.TextItem):
        return layout.text_block(len(item.ids)).length
    if isinstance(item, packing.VitItem):
        return layout.vit_block(item.image.shape[1], item.image.shape[2], vit_patch).length
    if isinstance(item, packing.VaeItem):
        if isinstance(item, patch_ar.PatchArItem):   # image_mode "patch_ar": two copies of the latents
            return layout.patch_ar_block_len(layout.latent_tokens(item.image.shape[1], item.image.shape[2], latent_ds))
        return layout.vae_block(item.image.shape[1], item.image.shape[2], latent_ds, item.loss).length
    return 0


@dataclasses.dataclass
class SampleStats:
    tokens: int
    vae_images: int
    vae_hw: tuple[int, int]
    has_loss: bool


def sample_stats(items, vit_patch: int, latent_ds: int) -> SampleStats:
    vae = [it.image.shape[1:] for it in items if isinstance(it, packing.VaeItem)]
    hw = (max([h for h, _ in vae], default=0), max([w for _, w in vae], default=0))
    loss = any((isinstance(it, packing.TextItem) and (it.loss or it.special_token_loss))
               or (isinstance(it, packing.VaeItem) and it.loss) for it in items)
    return SampleStats(sum(item_tokens(it, vit_patch, latent_ds) for it in items), len(vae), hw, loss)


# -------------------------------------------------------------------------------------------------
# Sequence plans of the official datasets (also used by the parity verifier's train_forward case)
# -------------------------------------------------------------------------------------------------

def t2i_plan(caption: list[int], image: np.ndarray) -> list[PlanEntry]:
    """Text-to-image: the caption (cfg, no loss), then the image ``[3, H, W]`` as a noised target."""
    return [PlanEntry("text", enable_cfg=True, loss=False, text=list(caption)),
            PlanEntry("vae_image", enable_cfg=False, loss=True, image=image)]


def edit_plan(vae: Callable[[int], np.ndarray], vit: Callable[[int], np.ndarray],
              instructions: Sequence[list[int]]) -> list[PlanEntry]:
    """An edit chain over pictures ``0 .. len(instructions)`` (``vae(k)`` / ``vit(k)``: picture ``k`` for
    each encoder): the source as clean VAE + ViT blocks, then per step its instruction (cfg, no loss) and
    picture ``k`` as a noised target; an intermediate target is repeated as clean VAE + ViT blocks."""
    plan = [PlanEntry("vae_image", enable_cfg=True, loss=False, image=vae(0)),
            PlanEntry("vit_image", enable_cfg=True, image=vit(0))]
    for k, ids in enumerate(instructions, start=1):
        plan.append(PlanEntry("text", enable_cfg=True, loss=False, text=list(ids)))
        plan.append(PlanEntry("vae_image", enable_cfg=False, loss=True, image=vae(k)))
        if k < len(instructions):
            plan += [PlanEntry("vae_image", enable_cfg=True, loss=False, image=vae(k)),
                     PlanEntry("vit_image", enable_cfg=True, image=vit(k))]
    return plan


def vlm_plan(conversations: Sequence[dict], images: Sequence[np.ndarray],
             encode: Callable[[str], list[int]]) -> list[PlanEntry]:
    """A VLM SFT conversation (``[{from: human|gpt, value}]``): human turns split on ``<image>`` (each tag a
    ViT image, each non-empty stripped piece a text without loss), gpt turns texts with loss. Without
    images this is a text-only sample."""
    plan, k = [], 0
    for turn in conversations:
        if turn.get("from") == "human":
            pieces = str(turn.get("value", "")).split("<image>")
            for j, piece in enumerate(pieces):
                if j > 0:
                    if k >= len(images):
                        raise SampleError("more <image> tags than images")
                    plan.append(PlanEntry("vit_image", enable_cfg=False, image=images[k]))
                    k += 1
                if piece.strip():
                    plan.append(PlanEntry("text", enable_cfg=False, loss=False, text=encode(piece.strip())))
        else:
            plan.append(PlanEntry("text", enable_cfg=False, loss=True, text=encode(str(turn.get("value", "")))))
    return plan


# -------------------------------------------------------------------------------------------------
# Datasets
# -------------------------------------------------------------------------------------------------

def _vae_vit_transforms(spec: dict) -> tuple[ImageTransform, ImageTransform]:
    """VAE and ViT transforms of a group with both: ``vit_image_transform_args`` defaults to ``image_transform_args``."""
    vae = spec["image_transform_args"]
    return ImageTransform.from_dict(vae), ImageTransform.from_dict(spec.get("vit_image_transform_args", vae))


class T2IDataset:
    group = "t2i_pretrain"

    def __init__(self, root: str, spec: dict, tokenizer, cfg):
        self.rows = ParquetRows(parquet_files(os.path.join(root, spec["data_dir"])), ["image", "captions"])
        self.tf = ImageTransform.from_dict(spec["image_transform_args"])
        self.tok = tokenizer

    def __len__(self):
        return len(self.rows)

    def plan(self, i: int, rng: np.random.Generator) -> list[PlanEntry]:
        row = self.rows.row(i)
        img = decode_image(row["image"])
        try:
            caps = json.loads(row["captions"]) if isinstance(row["captions"], str) else row["captions"]
            caps = list(caps.values()) if isinstance(caps, dict) else list(caps)
        except Exception as e:
            raise SampleError(f"bad captions field ({e})") from None
        if not caps:
            raise SampleError("empty captions")
        cap = caps[int(rng.integers(0, len(caps)))]
        return t2i_plan(self.tok.encode(cap), to_tensor(self.tf.resize(img)))


class EditDataset:
    group = "unified_edit"

    def __init__(self, root: str, spec: dict, tokenizer, cfg):
        data_dir = os.path.join(root, spec["data_dir"])
        info = spec.get("parquet_info_path")
        if info:
            info_path = os.path.join(root, info)
            if not os.path.isfile(info_path):
                raise DataConfigError(f"parquet_info_path not found: {info_path}")
            try:
                with open(info_path) as f:
                    listed = json.load(f)
            except (ValueError, UnicodeDecodeError) as e:
                raise DataConfigError(f"{info_path}: not valid JSON ({e})") from None
            if not isinstance(listed, (dict, list)) or not listed or \
                    not all(isinstance(p, str) for p in listed):
                raise DataConfigError(f"{info_path}: expected a non-empty JSON object {{parquet path: info}}")
            files = [p if os.path.isabs(p) else os.path.join(os.path.dirname(info_path), p) for p in sorted(listed)]
        else:
            files = parquet_files(data_dir)
        self.rows = ParquetRows(files, ["image_list", "instruction_list"])
        self.vae_tf, self.vit_tf = _vae_vit_transforms(spec)
        self.tok = tokenizer

    def __len__(self):
        return len(self.rows)

    def plan(self, i: int, rng: np.random.Generator) -> list[PlanEntry]:
        row = self.rows.row(i)
        imgs, instr = row["image_list"], row["instruction_list"]
        n = len(imgs)
        if n < 2 or len(instr) < n - 1:
            raise SampleError(f"edit row needs >= 2 images and one instruction list per transition "
                              f"(got {n} images, {len(instr)} instruction lists)")
        s = int(rng.integers(0, n - 1))
        e = int(rng.integers(s + 1, min(s + 3, n)))
        pics = {}

        def pic(k):
            if k not in pics:
                pics[k] = decode_image(imgs[k])
            return pics[k]

        vae = lambda k: to_tensor(self.vae_tf.resize(pic(k)))
        vit = lambda k: to_tensor(self.vit_tf.resize(pic(k)))
        choose = lambda k: instr[k][int(rng.integers(0, len(instr[k])))]
        if e - s > 1 and rng.random() < 0.5:
            if e == n - 1:
                e -= 1
            text = "".join(choose(k) + ". " for k in range(s, e)).rstrip()
            return edit_plan(lambda j: vae((s, e)[j]), lambda j: vit((s, e)[j]), [self.tok.encode(text)])
        return edit_plan(lambda j: vae(s + j), lambda j: vit(s + j), [self.tok.encode(choose(k)) for k in range(s, e)])


def _jsonl_lines(root: str, spec: dict) -> list[str]:
    """The non-empty lines of a group's ``jsonl_path`` (relative to the data root)."""
    path = os.path.join(root, spec["jsonl_path"])
    if not os.path.isfile(path):
        raise DataConfigError(f"jsonl_path not found: {path}")
    with open(path, encoding="utf-8") as f:
        return [line for line in f if line.strip()]


class VLMDataset:
    group = "vlm_sft"

    def __init__(self, root: str, spec: dict, tokenizer, cfg):
        self.dir = os.path.join(root, spec["data_dir"])
        self.lines = _jsonl_lines(root, spec)
        self.tf = ImageTransform.from_dict(spec["image_transform_args"])
        self.tok = tokenizer

    def __len__(self):
        return len(self.lines)

    def plan(self, i: int, rng: np.random.Generator) -> list[PlanEntry]:
        try:
            row = json.loads(self.lines[i])
            conv = row["conversations"]
        except Exception as e:
            raise SampleError(f"bad JSONL row ({e})") from None
        if "video" in row:
            raise SampleError("video rows are not supported")
        paths = row.get("image", [])
        paths = [paths] if isinstance(paths, str) else list(paths)
        images = []
        for p in paths:
            img = _read_rgb(os.path.join(self.dir, p))
            images.append(to_tensor(self.tf.resize(img, img_num=max(1, len(paths)))))
        return vlm_plan(conv, images, self.tok.encode)


class InterleavedDataset:
    """Generic interleaved sequences (our JSONL form of an official sequence plan,
    docs/architecture.md#training-packing)::

        {"sequence": [{"type": "text", "text": "...", "loss": 0, "enable_cfg": 1},
                      {"type": "vae_image", "image": "a.png", "loss": 1},
                      {"type": "vit_image", "image": "a.png", "enable_cfg": 1}, ...]}

    Image paths are relative to ``data_dir``; VAE images use ``image_transform_args``, ViT images
    ``vit_image_transform_args``. Items are processed exactly like the official plan entries. A text item
    may carry the official ``"special_token_loss": 1`` with ``"special_token_label"``: one of the four
    special tokens by name (``"<|vision_start|>"``) or an id; its closing ``<|im_end|>`` position then
    learns that label (e.g. ``<|vision_start|>`` before a generated image, ``<|im_end|>`` at the end).
    """

    group = "interleaved"

    def __init__(self, root: str, spec: dict, tokenizer, cfg):
        self.dir = os.path.join(root, spec["data_dir"])
        self.lines = _jsonl_lines(root, spec)
        self.vae_tf, self.vit_tf = _vae_vit_transforms(spec)
        self.tok = tokenizer

    def __len__(self):
        return len(self.lines)

    def plan(self, i: int, rng: np.random.Generator) -> list[PlanEntry]:
        try:
            seq = json.loads(self.lines[i])["sequence"]
        except Exception as e:
            raise SampleError(f"bad JSONL row ({e})") from None
        plan = []
        for e in seq:
            t = e.get("type")
            cfg_, loss = bool(e.get("enable_cfg", False)), bool(e.get("loss", False))
            if t == "text":
                special = bool(e.get("special_token_loss", False))
                plan.append(PlanEntry("text", enable_cfg=cfg_, loss=loss, text=self.tok.encode(str(e.get("text", ""))),
                                      special_token_loss=special,
                                      special_token_label=self._label(e.get("special_token_label")) if special else None))
            elif t in ("vit_image", "vae_image"):
                img = _read_rgb(os.path.join(self.dir, str(e.get("image", ""))))
                tf = self.vae_tf if t == "vae_image" else self.vit_tf
                plan.append(PlanEntry(t, enable_cfg=cfg_, loss=loss and t == "vae_image", image=to_tensor(tf.resize(img))))
            else:
                raise SampleError(f"unknown sequence item type {t!r}")
        return plan


    def _label(self, label) -> int:
        """A ``special_token_label``: one of the four special tokens by name, or a token id."""
        names = {"<|im_start|>": "bos", "<|im_end|>": "eos", "<|vision_start|>": "start_of_image",
                 "<|vision_end|>": "end_of_image"}
        if isinstance(label, str) and label in names:
            return int(getattr(self.tok.special, names[label]))
        if isinstance(label, int) and not isinstance(label, bool) and label >= 0:
            return label
        raise SampleError(f"special_token_label must be one of {sorted(names)} or a token id, got {label!r}")


DATASET_CLASSES = {c.group: c for c in (T2IDataset, EditDataset, VLMDataset, InterleavedDataset)}

"""What every case runner shares: the loaded fixture model, image conversions and the layout arrays of
context blocks and flow queries (names as in the fixture manifests)."""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from .. import layout
from ..images import INFERENCE_VAE, INFERENCE_VIT, ImageTransform, load_image, to_tensor
from ..inference.context import Branch
from ..inference.engine import Engine, InferenceOptions
from ..loading import BagelModel, load_model


class CaseError(RuntimeError):
    """A case cannot be run as the manifest describes it (unsupported kind, inconsistent arrays...)."""


def nchw(x) -> np.ndarray:
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


def nhwc(x) -> np.ndarray:
    return np.transpose(np.asarray(x, np.float32), (0, 2, 3, 1))


def official_order(h) -> np.ndarray:
    """A latent chunk in the engine's order ``[start, end, latents]`` (``inference.blocks``) -> the official
    order ``[start, latents, end]`` (axis -2)."""
    h = np.asarray(h)
    return np.concatenate([h[..., :1, :], h[..., 2:, :], h[..., 1:2, :]], axis=-2)


def param(P: dict, name: str, default=None):
    """A case parameter whose manifest key may carry a note: ``name``, ``name (...)`` or ``name(...)``."""
    for k, v in P.items():
        if k == name or k.startswith(name + " ") or k.startswith(name + "("):
            return v
    return default


class Fixture:
    """A fixture folder: its manifest and the model loaded from its checkpoint (plus inference engines)."""

    def __init__(self, folder: str, manifest: dict, dtype=jnp.float32, attention_impl: str = "auto"):
        self.folder = folder
        self.manifest = manifest
        self.bm: BagelModel = load_model(folder, dtype=dtype, param_dtype=jnp.float32, attention_impl=attention_impl)
        self.cfg = self.bm.cfg
        self.tok = self.bm.tokenizer
        self.sp = self.tok.special
        self._engines: dict = {}

    def transform(self, params: dict, key: str) -> Optional[ImageTransform]:
        """The image transform ``key`` of the case params (a note may follow the key); None if absent."""
        d = param(params, key)
        return None if d is None else ImageTransform.from_dict(d)

    def engine(self, params: dict) -> Engine:
        """The inference engine with the case's transforms (official inference defaults where absent)."""
        tv = self.transform(params, "vae_transform") or INFERENCE_VAE
        tt = self.transform(params, "vit_transform") or INFERENCE_VIT
        if (tv, tt) not in self._engines:
            self._engines[(tv, tt)] = Engine(self.bm, InferenceOptions(tv, tt))
        return self._engines[(tv, tt)]

    def preprocess(self, image_uint8: np.ndarray, params: dict) -> dict:
        """``Engine.preprocess``'s result for a case that gives the model input sizes directly: the VAE-rule
        resize and the ViT transform of the params where present, else the image as given."""
        img = load_image(image_uint8)
        tv, tt = self.transform(params, "vae_transform"), self.transform(params, "vit_transform")
        if tv is not None:
            img = tv.resize(img)
        vae = to_tensor(img)
        return {"hw": vae.shape[1:], "pil": img, "vae": vae, "vit": tt(img) if tt is not None else vae}


# -------------------------------------------------------------------------------------------------
# Layout arrays of one context block / flow query (batch of one row). ``kv``: cache slots before it.
# -------------------------------------------------------------------------------------------------

def text_layout(prefix: str, ids, kv: int, rope: int) -> dict:
    n = len(ids)
    return {f"{prefix}.text_token_lens": np.array([n]), f"{prefix}.packed_text_ids": np.asarray(ids),
            f"{prefix}.packed_text_position_ids": np.arange(rope, rope + n),
            f"{prefix}.packed_text_indexes": np.arange(kv, kv + n),
            f"{prefix}.packed_key_value_indexes": np.arange(kv),
            f"{prefix}.key_values_lens": np.array([kv]), f"{prefix}.newlens": np.array([kv + n]),
            f"{prefix}.new_rope": np.array([rope + n])}


def _marked_block(prefix: str, n: int, kv: int, rope: int, sp) -> dict:
    """``[<|vision_start|>] + n tokens + [<|vision_end|>]`` at one position (indexes of the markers and
    tokens relative to the block)."""
    return {f"{prefix}.packed_text_ids": np.array([sp.start_of_image, sp.end_of_image]),
            f"{prefix}.packed_text_indexes": np.array([0, layout.end_marker_at(n)]),
            f"{prefix}.packed_position_ids": np.full(layout.block_len(n), rope),
            f"{prefix}.packed_seqlens": np.array([layout.block_len(n)]),
            f"{prefix}.packed_indexes": np.arange(kv, kv + layout.block_len(n)),
            f"{prefix}.packed_key_value_indexes": np.arange(kv), f"{prefix}.key_values_lens": np.array([kv])}


def image_layout(prefix: str, kind: str, n: int, kv: int, rope: int, pos, sp) -> dict:
    """A context image block, ``kind`` "vit" or "vae" (clean latents, t = 0)."""
    out = _marked_block(prefix, n, kv, rope, sp)
    out.update({f"{prefix}.newlens": np.array([kv + layout.block_len(n)]),
                f"{prefix}.new_rope": np.array([rope + layout.rope_advance(kind, n)]),
                f"{prefix}.packed_{kind}_position_ids": np.asarray(pos),
                f"{prefix}.packed_{kind}_token_indexes": np.arange(1, n + 1)})
    if kind == "vit":
        out[f"{prefix}.vit_token_seqlens"] = np.array([n])
    else:
        out[f"{prefix}.packed_timesteps"] = np.zeros(1, np.float32)
    return out


def query_layout(cond: str, prefix: str, n_lat: int, pos, branches: dict, sp) -> dict:
    """The flow query of every CFG branch: ``cond`` names the conditional branch's arrays, the others are
    ``{prefix}{name}.cfg_*``. ``branches``: ``{"cond" | "text_uncond" | "img_uncond": Branch}``."""
    g = branches["cond"]
    out = _marked_block(cond, n_lat, int(g.length[0]), int(g.rope[0]), sp)
    out.update({f"{cond}.packed_vae_position_ids": np.asarray(pos),
                f"{cond}.packed_vae_token_indexes": np.arange(1, n_lat + 1)})
    for name in ("text_uncond", "img_uncond"):
        br: Optional[Branch] = branches.get(name)
        if br is None:
            continue
        kv, p = f"{prefix}{name}.cfg", int(br.length[0])
        out.update({f"{kv}_packed_position_ids": np.full(layout.block_len(n_lat), int(br.rope[0])),
                    f"{kv}_key_values_lens": np.array([p]),
                    f"{kv}_packed_query_indexes": np.arange(p, p + layout.block_len(n_lat)),
                    f"{kv}_packed_key_value_indexes": np.arange(p)})
    return out

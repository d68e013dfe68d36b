"""The inference engine: a loaded model plus what every context needs (special tokens, image transforms, limits,
the mesh), given as :class:`InferenceOptions`. Contexts (:mod:`bagel_jax.inference.context`) are built on it."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from .. import sharding as shd
from ..images import INFERENCE_VAE, INFERENCE_VIT, ImageError, ImageTransform, load_image
from ..loading import BagelModel
from .kv_cache import KVCache

CACHE_MIN = 256
MAX_INPUT_PIXELS = 1 << 28   # refuse absurdly large inputs before decoding them fully


class ContextError(ValueError):
    """Bad input for a context (too long, batch mismatch, ...)."""


def on_mesh(fn):
    """Run ``fn(obj, ...)`` under the mesh of ``obj``'s engine (``obj`` an :class:`Engine` or has ``.engine``),
    so the functions it traces pin activations and caches to the mesh layout (:mod:`bagel_jax.sharding`)."""
    @functools.wraps(fn)
    def wrapper(obj, *a, **kw):
        eng = obj if isinstance(obj, Engine) else obj.engine
        with shd.mesh_scope(eng.mesh):
            return fn(obj, *a, **kw)
    return wrapper


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
    """What inference adds to a loaded model (how the model itself runs is its
    :class:`~bagel_jax.nn.options.ModelOptions`, fixed when it was built).

    Attributes:
      vae_transform / vit_transform: image resize rules (None: the official inference defaults,
        docs/architecture.md#image-preprocessing; ``bagel_jax.load`` first takes a model folder's
        ``inference.json``).
      max_context: most KV slots a row may hold (None: the model's ``max_position_embeddings``).
      cache_dtype: dtype of KV caches (None: the model's compute dtype).
    """

    vae_transform: Optional[ImageTransform] = None
    vit_transform: Optional[ImageTransform] = None
    max_context: Optional[int] = None
    cache_dtype: Any = None

    def __post_init__(self):
        for name in ("vae_transform", "vit_transform"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, ImageTransform):
                raise ValueError(f"{name} must be an ImageTransform or None, got {v!r}")
        n = self.max_context
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"max_context must be None or an integer >= 1, got {n!r}")


class Engine:
    """A loaded model plus everything contexts need (special tokens, transforms, limits).

    Args:
      bm: the loaded model (:func:`bagel_jax.loading.load_model`); its modules run as built (``bm.model.opts``:
        dtypes, attention, layer loop; ``bagel_jax.load`` builds them for inference,
        :meth:`~bagel_jax.nn.options.ModelOptions.for_inference`).
      options: :class:`InferenceOptions` (image transforms, context limit, cache dtype).
      mesh: the ``jax.sharding.Mesh`` to run on (default: the mesh of the params' ``NamedSharding`` if
        they are spread over several devices, else None = one device). KV caches are created on it and
        every device call runs under it; params not already on it are split over it by the rules of
        :mod:`bagel_jax.sharding` (the VAE replicated).
    """

    def __init__(self, bm: BagelModel, options: Optional[InferenceOptions] = None, *, mesh=None):
        if bm.tokenizer is None:
            raise ContextError("the engine needs a tokenizer (load the model with with_tokenizer=True)")
        if options is not None and not isinstance(options, InferenceOptions):
            raise TypeError(f"Engine: options must be an InferenceOptions, got {options!r}")
        options = options or InferenceOptions()
        self.options = options
        self.bm = bm
        self.cfg = bm.cfg
        self.model = bm.model
        self.params = bm.params
        self.vae = bm.vae
        self.vae_params = bm.vae_params
        self.tok = bm.tokenizer
        self.sp = bm.tokenizer.special
        self.markers = jnp.asarray([self.sp.start_of_image, self.sp.end_of_image], jnp.int32)
        self.vae_transform = options.vae_transform or INFERENCE_VAE
        self.vit_transform = options.vit_transform or INFERENCE_VIT
        self.max_context = int(options.max_context or self.cfg.llm.max_position_embeddings)
        self.cache_dtype = options.cache_dtype or bm.model.opts.dtype
        on = shd.mesh_of(jax.tree_util.tree_map(lambda x: getattr(x, "sharding", None), bm.params))
        if mesh is not None and mesh.size > 1 and on != mesh:
            # a mesh given for params placed elsewhere (e.g. loaded on one device): move them onto it
            self.params = shd.shard_params(bm.params, mesh)
            self.vae_params = jax.device_put(bm.vae_params, shd.replicated(mesh))
            self.bm = dataclasses.replace(bm, params=self.params, vae_params=self.vae_params)
        mesh = on if mesh is None else mesh
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None

    def empty_cache(self, batch: int, capacity: int = CACHE_MIN) -> KVCache:
        return KVCache.empty(self.cfg.llm, batch, capacity, self.cache_dtype, self.mesh)

    # -- image preprocessing (host side, raises before any compute) ---------------------------------
    def preprocess(self, image, vae: bool = True, vit: bool = True) -> dict:
        """Official inferencer preprocessing: VAE-rule resize, then the ViT transform of the VAE-resized image.

        Returns ``{"hw": (H, W) of the VAE-resized image, "vae": [3, H, W] (if vae), "vit": [3, H', W'] (if vit)}``.
        """
        img = load_image(image)
        w0, h0 = img.size
        if w0 * h0 > MAX_INPUT_PIXELS:
            raise ImageError(f"image of {w0}x{h0} pixels is too large (limit {MAX_INPUT_PIXELS} pixels)")
        W, H = self.vae_transform.target_size(w0, h0)
        ds = self.cfg.latent_downsample
        if vae and (H % ds or W % ds or max(H, W) // ds > self.cfg.max_latent_size):   # ViT-only: no latents
            raise ImageError(f"image of {w0}x{h0} resizes to {W}x{H}, outside the model's latent grid "
                             f"(multiples of {ds}, at most {self.cfg.max_image_side} per side)")
        img = self.vae_transform.resize(img)
        out = {"hw": (H, W), "pil": img}
        if vae:
            out["vae"] = self.vae_transform(img)
        if vit:
            px = self.vit_transform(img)
            p, G = self.cfg.vit.patch_size, self.cfg.vit_max_num_patch_per_side
            if px.shape[1] % p or px.shape[2] % p or max(px.shape[1:]) // p > G:
                raise ImageError(f"image of {w0}x{h0} gives a ViT input of {px.shape[2]}x{px.shape[1]}, outside "
                                 f"the ViT grid (multiples of {p}, at most {p * G} per side)")
            out["vit"] = px
        return out

    def check_output_size(self, hw) -> tuple[int, int]:
        H, W = int(hw[0]), int(hw[1])
        ds = self.cfg.latent_downsample
        if H <= 0 or W <= 0 or H % ds or W % ds or max(H, W) // ds > self.cfg.max_latent_size:
            raise ImageError(f"output image size {H}x{W} (H x W) is not supported: each side must be a positive "
                             f"multiple of {ds} and at most {self.cfg.max_image_side}")
        return H, W

"""Load an unmodified official BAGEL model folder (or build a random model from a config)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Optional

import jax
import jax.numpy as jnp

from . import quantize as quant
from . import sharding as shd
from .config import BAGEL_FIELDS, BagelConfig, ConfigError, check_field, load_config, read_json
from .convert import official
from .images import ImageTransform
from .models import flux_vae
from .models.bagel import Bagel, init_params, key_map, param_shapes
from .nn import layer_loop
from .nn.options import ModelOptions, options_with
from .tokenizer import Tokenizer, load_tokenizer

REQUIRED_FILES = ("llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors")

INFERENCE_DEFAULTS_FILE = "inference.json"


def folder_defaults(folder: str) -> dict:
    """Optional ``inference.json`` of a model folder (not part of the official format; our small models
    use it): ``image_size`` [H, W] (or one side) in pixels, ``vae_transform`` / ``vit_transform`` dicts of
    :class:`~bagel_jax.images.ImageTransform` fields. Missing file -> {} (official defaults). A bad
    field is a :class:`~bagel_jax.config.ConfigError` naming the file and the field."""
    path = os.path.join(folder, INFERENCE_DEFAULTS_FILE)
    if not os.path.isfile(path):
        return {}
    d = read_json(path)
    unknown = sorted(set(d) - {"image_size", "vae_transform", "vit_transform"})
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {unknown} (known: image_size, vae_transform, vit_transform)")
    out = {}
    if "image_size" in d:
        v = d["image_size"]
        hw = [v, v] if not isinstance(v, (list, tuple)) else list(v)
        if len(hw) != 2:
            raise ConfigError(f"{path}: field 'image_size' must be [H, W] or one side, got {v!r}")
        out["image_size"] = tuple(check_field(path, "image_size", x, "int") for x in hw)
    for k in ("vae_transform", "vit_transform"):
        if k in d:
            out[k] = ImageTransform.from_dict(d[k], f"{path}: {k}")
    return out



@dataclasses.dataclass
class BagelModel:
    """Everything needed to run BAGEL: config, the two Flax modules, their params and the tokenizer."""

    cfg: BagelConfig
    model: Bagel
    vae: flux_vae.AutoEncoder
    params: Any
    vae_params: Any
    tokenizer: Optional[Tokenizer] = None
    folder: Optional[str] = None


def build_modules(cfg: BagelConfig, options: Optional[ModelOptions] = None, mesh=None, **fields):
    """The Bagel and AutoEncoder modules for ``cfg``, run as ``options`` say
    (:class:`~bagel_jax.nn.options.ModelOptions`, checked where it is made; keyword ``fields`` replace some of
    its fields, :func:`~bagel_jax.nn.options.options_with`). The Bagel module passes the options to every
    submodule; ``layer_loop="auto"`` is resolved here for ``mesh`` (None: one device). The VAE runs in
    float32, as the official app does."""
    opts = options_with(options, **fields).resolve(mesh)
    return Bagel(cfg, opts), flux_vae.AutoEncoder(cfg.vae, dtype=jnp.float32)


def vae_param_shapes(vae: flux_vae.AutoEncoder, param_dtype=jnp.float32):
    ds = vae.cfg.downsample
    x = jax.ShapeDtypeStruct((1, ds * 2, ds * 2, vae.cfg.in_channels), jnp.float32)
    shapes = jax.eval_shape(lambda x: vae.init(jax.random.PRNGKey(0), x), x)["params"]
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, param_dtype), shapes)


def follow_shardings(shapes: Any, shardings: Any) -> Any:
    """Shardings for a small companion tree (the VAE) that follow a model placed by ``shardings``:
    replicated over the model's mesh, or on the same single device. None when ``shardings`` is None."""
    if shardings is None:
        return None
    leaves = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    if not leaves:
        return None
    mesh = shd.mesh_of(leaves)
    target = shd.replicated(mesh) if mesh is not None else leaves[0]
    return jax.tree_util.tree_map(lambda _: target, shapes)


def load_model(folder: str, options: Optional[ModelOptions] = None, *, mesh=None, shardings=None,
               vae_shardings=None, with_tokenizer: bool = True, **fields) -> BagelModel:
    """Load an official BAGEL folder.

    Args:
      folder: contains ``llm_config.json``, ``vit_config.json``, ``ema.safetensors``, ``ae.safetensors``
        and the tokenizer files (``bagel_config.json`` optional, for non-7B shapes).
      options: how the model runs (:class:`~bagel_jax.nn.options.ModelOptions`; default float32): compute and
        parameter dtype, attention, layer loop, quantization. Keyword ``fields`` (``dtype=``, ``quantize=``, ...)
        replace some of its fields (:func:`~bagel_jax.nn.options.options_with`). The VAE stays float32.
        ``quantize="int8"``: per-output-channel int8 weight-only quantization of the decoder layers' q/k/v/o
        and MLP kernels (both experts; :mod:`bagel_jax.quantize`) while loading: each kernel stack is read in
        ``param_dtype``, quantized and freed before the next tensor is read, so the load's peak is the
        quantized tree plus one float kernel stack (not the float tree); ``quantize_vit`` also quantizes the
        ViT layers' linears. The embeddings, LM head, norms and biases keep ``param_dtype``.
        ``layer_loop="unrolled"`` (or ``"auto"`` resolving to it): the stacked layer tensors of the files are
        split per layer as they are read (:func:`bagel_jax.nn.layer_loop.unstack`, each stack freed once split).
      mesh: a ``jax.sharding.Mesh``: with no ``shardings``, the params are split over it by the rules of
        :mod:`bagel_jax.sharding` (``tree_shardings``).
      shardings / vae_shardings: optional trees of ``jax.sharding.Sharding`` matching the (stacked) params;
        each tensor is placed directly on its sharding. Without ``vae_shardings`` the VAE follows the model
        (:func:`follow_shardings`: replicated over its mesh, or on its device).
    """
    opts = options_with(options, **fields)
    if not os.path.isdir(folder):
        raise ConfigError(f"model folder not found: {folder}")
    for name in REQUIRED_FILES:
        if not os.path.isfile(os.path.join(folder, name)):
            raise ConfigError(f"{folder}: missing file {name}")
    cfg = load_config(folder)
    model, vae = build_modules(cfg, opts, mesh if mesh is not None else shd.mesh_of(shardings))
    # the files hold every layer stack stacked: read them in the scan layout (split below when unrolled)
    stacked = model if model.opts.layer_loop == "scan" else Bagel(cfg, dataclasses.replace(model.opts,
                                                                                            layer_loop="scan"))
    shapes = param_shapes(stacked)
    if shardings is None and mesh is not None:
        shardings = shd.tree_shardings(shapes, mesh)
    vshapes = vae_param_shapes(vae)
    if vae_shardings is None:
        vae_shardings = follow_shardings(vshapes, shardings)
    params = official.load_params(os.path.join(folder, "ema.safetensors"), key_map(cfg), shapes,
                                    dtype=opts.param_dtype, shardings=shardings,
                                    leaf_fn=quant.leaf_quantizer(opts.quantize, vit=opts.quantize_vit))
    if model.opts.layer_loop == "unrolled":
        params = layer_loop.unstack(params, consume=True)
    vae_params = official.load_params(os.path.join(folder, "ae.safetensors"), flux_vae.key_map(cfg.vae),
                                        vshapes, dtype=jnp.float32, shardings=vae_shardings)
    tok = load_tokenizer(folder) if with_tokenizer else None
    return BagelModel(cfg, model, vae, params, vae_params, tok, folder)


def random_model(cfg: BagelConfig, key: jax.Array, options: Optional[ModelOptions] = None,
                 **fields) -> BagelModel:
    """A randomly initialised model (for tests and training from scratch); ``options`` / ``fields`` as
    :func:`build_modules`."""
    model, vae = build_modules(cfg, options, **fields)
    k1, k2 = jax.random.split(key)
    params = init_params(model, k1)
    ds = cfg.vae.downsample
    vae_params = vae.init(k2, jnp.zeros((1, ds * 2, ds * 2, cfg.vae.in_channels)))["params"]
    return BagelModel(cfg, model, vae, params, vae_params)


def save_model(m: BagelModel, folder: str, dtype=None) -> None:
    """Write ``m`` as an official folder: ``ema.safetensors``, ``ae.safetensors`` and the config files
    (the tokenizer files are copied from ``m.tokenizer`` when it has them)."""
    os.makedirs(folder, exist_ok=True)
    write_official_configs(m.cfg, folder)
    official.export_params(m.params, key_map(m.cfg), os.path.join(folder, "ema.safetensors"), dtype=dtype)
    official.export_params(m.vae_params, flux_vae.key_map(m.cfg.vae), os.path.join(folder, "ae.safetensors"))
    if m.tokenizer is not None:
        m.tokenizer.hf.save_pretrained(folder)
        # the official loader reads the slow-tokenizer files: carry them over when the source has them
        for name in ("vocab.json", "merges.txt"):
            src = os.path.join(str(m.tokenizer.source), name)
            if os.path.isfile(src) and not os.path.isfile(os.path.join(folder, name)):
                shutil.copy(src, os.path.join(folder, name))


def write_official_configs(cfg: BagelConfig, folder: str) -> None:
    """Write ``llm_config.json``, ``vit_config.json`` and ``bagel_config.json`` so that
    :func:`bagel_jax.config.config_from_folder` (and the official loader) rebuilds ``cfg``."""
    os.makedirs(folder, exist_ok=True)
    llm = dataclasses.asdict(cfg.llm)
    llm.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False,
               attention_dropout=0.0, rope_scaling=None, torch_dtype="float32")
    vit = dataclasses.asdict(cfg.vit)
    vit["num_hidden_layers"] = cfg.vit.num_hidden_layers + 1  # the official loader drops one
    vit.update(model_type="siglip_vision_model", attention_dropout=0.0)
    vit.pop("rope")
    bagel = {k: getattr(cfg, k) for k in BAGEL_FIELDS}
    if cfg.image_mode != "whole":
        bagel.update(image_mode=cfg.image_mode, patch_ar_groups=list(cfg.patch_ar_groups))
    vae = dataclasses.asdict(cfg.vae)
    vae["ch_mult"] = list(cfg.vae.ch_mult)
    bagel["vae_config"] = vae
    for name, obj in (("llm_config.json", llm), ("vit_config.json", vit), ("bagel_config.json", bagel)):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)

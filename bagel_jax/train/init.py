"""Pre-training initialisation from separate checkpoints, as the official trainer does (docs/architecture.md#training-optimisation-and-freezing).

``train.init: {qwen2: PATH, siglip: PATH, ae: PATH}`` (each optional; missing parts stay randomly
initialised) where PATH is a ``.safetensors`` file or a folder of them (sharded HF checkpoints):

* ``qwen2``: a Hugging Face Qwen2 / Qwen2.5 causal LM (``model.embed_tokens.weight``,
  ``model.layers.N.self_attn.q_proj.weight`` ... ``model.norm.weight``, ``lm_head.weight``; a missing
  ``lm_head.weight`` means tied embeddings and the embedding is copied). Loaded into the und expert;
  q/k norms start at ones; then ``copy_init_moe``: every und weight is copied into its ``_moe_gen``
  twin (projections, q/k norms, layer norms, MLP, final norm).
* ``siglip``: a Hugging Face SigLIP vision tower (``vision_model.*``; a full SigLIP checkpoint with a
  text tower is fine, non-vision keys are ignored). The Conv2d patch embedding is converted to BAGEL's
  Linear with ``(py, px, c)`` input order; only the first ``vit.num_hidden_layers`` layers are used
  (BAGEL drops the last one); the pooling head is ignored.
* ``ae``: the FLUX autoencoder ``ae.safetensors``.

Connector, time embedder and ``vae2llm`` keep their default init; ``llm2vae`` starts at zero; the
position tables are the fixed sin-cos tables.
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from ..convert import official as conv
from ..convert import keymap
from ..convert.safetensors_io import SafeTensorsFile
from ..models import flux_vae, qwen2_mot, siglip_navit


class InitError(ValueError):
    pass


class _View:
    """Several safetensors files seen as one, with renaming, filtering and per-key transforms."""

    def __init__(self, path: str, rename=None, keep=None, transform=None):
        if os.path.isdir(path):
            files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        elif os.path.isfile(path):
            files = [path]
        else:
            raise InitError(f"checkpoint not found: {path}")
        if not files:
            raise InitError(f"{path}: no .safetensors files")
        self.files = [SafeTensorsFile(f) for f in files]
        self.where = {}
        for f in self.files:
            for k in f.keys():
                name = rename(k) if rename else k
                if name is not None and (keep is None or keep(name)):
                    self.where[name] = (f, k)
        self.transform = transform or {}
        self.path = path

    def keys(self):
        return list(self.where)

    def __contains__(self, name):
        return name in self.where

    def get(self, name):
        f, k = self.where[name]
        x = f.get(k)
        return self.transform[name](x) if name in self.transform else x

    def shape(self, name):
        return tuple(self.get(name).shape) if name in self.transform else tuple(self.where[name][0].shape(self.where[name][1]))


def _load(view: _View, entries, expected, shardings) -> dict:
    """Checked load of ``entries`` from ``view`` (same checks as ``convert.official.load_params``)."""
    flat_exp = conv._flatten(expected)
    wanted = set(keymap.group_by_leaf(entries))
    expected = conv._unflatten({p: v for p, v in flat_exp.items() if p in wanted})
    conv.check_file(view, entries, expected, view.path)
    for e in entries:   # weights are floats: an integer tensor would be cast into garbage
        if e.official in view.where:
            f, k = view.where[e.official]
            f.require_float(k)
    flat_sh = conv._flatten(shardings) if shardings is not None else {}
    out = {}
    for p, es in keymap.group_by_leaf(entries).items():
        leaf = flat_exp[p]
        sh = flat_sh.get(p, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        out[p] = jax.make_array_from_callback(tuple(leaf.shape), sh, conv._leaf_reader(view, es, np.dtype(leaf.dtype)))
    return out


def _set(tree: dict, path: tuple, value) -> dict:
    if len(path) == 1:
        return {**tree, path[0]: value}
    return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def init_from_components(init: dict, cfg, model, vae, param_sh, vae_sh, seed: int, base=None):
    """Returns ``(params, vae_params, None)``. ``base``: optional ``(params, vae_params)`` random init."""
    from ..models.bagel import init_params as bagel_init, param_shapes

    unknown = sorted(set(init) - {"qwen2", "siglip", "ae"})
    if unknown:
        raise InitError(f"train.init: unknown component(s) {unknown} (expected qwen2, siglip, ae)")
    if base is None:
        k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
        params = jax.jit(lambda k: bagel_init(model, k), out_shardings=param_sh)(k1)
        ds = cfg.vae.downsample
        x = jnp.zeros((1, ds * 2, ds * 2, cfg.vae.in_channels))
        vae_params = jax.jit(lambda k: vae.init(k, x)["params"], out_shardings=vae_sh)(k2)
    else:
        params, vae_params = base
    shapes = param_shapes(model)
    flat_sh = conv._flatten(param_sh) if param_sh is not None else {}

    if init.get("qwen2"):
        dense = dataclasses.replace(cfg.llm, qk_norm=False, layer_module="Qwen2DecoderLayer")
        keep = lambda n: n.startswith(("model.", "lm_head."))
        view = _View(init["qwen2"], keep=keep)
        entries = qwen2_mot.key_map(dense)
        tied = "lm_head.weight" not in view
        if tied:
            entries = [e for e in entries if not e.official.startswith("lm_head")]
        entries = keymap.prefixed(entries, "", ("language_model",))
        loaded = _load(view, entries, shapes, param_sh)
        for p, v in loaded.items():
            params = _set(params, p, v)
        if tied and not cfg.llm.tie_word_embeddings:
            emb = params["language_model"]["embed_tokens"]["embedding"]
            params = _set(params, ("language_model", "lm_head", "kernel"),
                          jax.device_put(emb.T, flat_sh.get(("language_model", "lm_head", "kernel"))))
        # copy_init_moe: und -> gen twin
        if cfg.llm.use_moe:
            flat = conv._flatten(params)
            for p in list(flat):
                if "_moe_gen" in "/".join(p):
                    src = tuple(re.sub("_moe_gen", "", k) for k in p)
                    if src in flat:
                        v = flat[src]
                        flat[p] = jax.device_put(v + 0, flat_sh.get(p)) if flat_sh.get(p) is not None else v + 0
            params = conv._unflatten(flat)

    if init.get("siglip"):
        n = cfg.vit.num_hidden_layers

        def rename(k):
            if not k.startswith("vision_model."):
                return None
            k = k[len("vision_model."):]
            m = re.match(r"encoder\.layers\.(\d+)\.", k)
            if m and int(m.group(1)) >= n:
                return None
            if k.startswith("head."):
                return None
            return k

        def conv_to_linear(w):
            # HF Conv2d patch embedding -> our Linear over flattened (py, px, c) patches (siglip_navit.patchify)
            w = np.asarray(w)
            return rearrange(w, "d c py px -> d (py px c)") if w.ndim == 4 else w

        view = _View(init["siglip"], rename=rename,
                     transform={"embeddings.patch_embedding.weight": conv_to_linear})
        entries = keymap.prefixed(siglip_navit.key_map(cfg.vit), "", ("vit_model",))
        for p, v in _load(view, entries, shapes, param_sh).items():
            params = _set(params, p, v)

    if cfg.visual_gen:
        for leaf in ("kernel", "bias"):
            p = ("llm2vae", leaf)
            z = jnp.zeros(conv._flatten(shapes)[p].shape, jnp.float32)
            params = _set(params, p, jax.device_put(z, flat_sh[p]) if p in flat_sh else z)

    if init.get("ae"):
        from ..loading import vae_param_shapes

        vae_params = conv.load_params(init["ae"], flux_vae.key_map(cfg.vae), vae_param_shapes(vae),
                                      dtype=jnp.float32, shardings=vae_sh)
    return params, vae_params, None

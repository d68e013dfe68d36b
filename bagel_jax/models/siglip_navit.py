"""SigLIP NaViT vision encoder (docs/architecture.md#model): the understanding-path ViT.

Several images of different sizes are packed along the token axis of one row; each token carries
a segment id (its image, >= 1; 0 = padding) and a position id into the learned position table
(``row * vit_max_num_patch_per_side + col``, docs/architecture.md#rope). Attention is bidirectional inside
an image and never crosses images, so a packed row gives the same per-image outputs as running
each image alone.

Differences from a stock SigLIP vision tower, all from BAGEL's loader (official ``app.py``,
``modeling/bagel/siglip_navit.py``):
  * ``ViTConfig.num_hidden_layers`` is the number of layers *used* (official json value minus one),
    and ``post_layernorm`` is still applied to the last used layer;
  * the patch embedding is a ``Linear`` over patches flattened in (row, col, channel) order;
  * positions index the learned table directly (no interpolation, no RoPE).

Parameter tree (relative to this module's params root), mirroring the official names:
  ``embeddings/patch_embedding/{kernel,bias}``, ``embeddings/position_embedding/embedding``,
  ``encoder/layers/{layer_norm1,layer_norm2}/{scale,bias}``,
  ``encoder/layers/self_attn/{q_proj,k_proj,v_proj,out_proj}/{kernel,bias}``,
  ``encoder/layers/mlp/{fc1,fc2}/{kernel,bias}``, ``post_layernorm/{scale,bias}``.
Leaves under ``encoder/layers`` are stacked on a leading layer axis (``nn.scan``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bagel_jax import sharding as shd
from bagel_jax.config import ViTConfig
from bagel_jax.convert import keymap
from bagel_jax.nn.attention import MaskVectors, attention, full_vectors
from bagel_jax.nn.intermediates import COLLECTION
from bagel_jax.nn.options import ModelOptions

Dtype = Any


def _layer_norm(cfg: ViTConfig, param_dtype: Dtype, name: str) -> nn.LayerNorm:
    # Statistics in float32 even for a bf16 model; callers cast the result back.
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32, param_dtype=param_dtype, name=name)


class SiglipEmbeddings(nn.Module):
    cfg: ViTConfig
    opts: ModelOptions = ModelOptions()

    @nn.compact
    def __call__(self, patches: jax.Array, position_ids: jax.Array) -> jax.Array:
        """patches ``[B, N, p*p*C]``, position_ids ``[B, N]`` -> ``[B, N, D]``."""
        cfg, o = self.cfg, self.opts
        x = o.dense(cfg.hidden_size, name="patch_embedding")(patches.astype(o.dtype))
        table_rows = (cfg.image_size // cfg.patch_size) ** 2
        pos = nn.Embed(table_rows, cfg.hidden_size, dtype=o.dtype, param_dtype=o.param_dtype,
                       name="position_embedding")(position_ids)
        return x + pos


class SiglipAttention(nn.Module):
    cfg: ViTConfig
    opts: ModelOptions = ModelOptions()

    @nn.compact
    def __call__(self, x: jax.Array, vec: MaskVectors) -> jax.Array:
        """x ``[B, N, D]``, vec: mask vectors ``[B, N]`` (full attention within each image) -> ``[B, N, D]``."""
        cfg = self.cfg
        B, N, _ = x.shape

        def heads(t):
            t = t.reshape(B, N, cfg.num_attention_heads, cfg.head_dim)
            return shd.constrain(t, ("batch", "length", "heads", "head_dim"), self.opts.activation_rules)

        proj = lambda name: self.opts.dense(cfg.hidden_size, name=name)
        q = heads(proj("q_proj")(x))  # [batch, seq, heads, head_dim]
        k = heads(proj("k_proj")(x))
        v = heads(proj("v_proj")(x))
        o = attention(q, k, v, vec, vec, self.opts.attention_impl,   # scale 1/sqrt(head_dim)
                      auto_min_len=self.opts.auto_blocked_min_len)
        o = shd.constrain(o, ("batch", "length", "heads", "head_dim"), self.opts.activation_rules)
        return proj("out_proj")(o.reshape(B, N, cfg.hidden_size))


class SiglipMLP(nn.Module):
    cfg: ViTConfig
    opts: ModelOptions = ModelOptions()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        h = self.opts.dense(cfg.intermediate_size, name="fc1")(x)
        h = jax.nn.gelu(h, approximate=True)  # gelu_pytorch_tanh
        h = shd.constrain(h, ("batch", "length", "mlp"), self.opts.activation_rules)
        return self.opts.dense(cfg.hidden_size, name="fc2")(h)


class SiglipEncoderLayer(nn.Module):
    """One pre-LN block, written as a scan body: ``(h, vec) -> (h, None)``; sows its output as
    ``vit_layers`` (stacked over layers by the scan)."""

    cfg: ViTConfig
    opts: ModelOptions = ModelOptions()

    @nn.compact
    def __call__(self, h: jax.Array, vec: MaskVectors):
        cfg, o = self.cfg, self.opts
        h = shd.constrain(h, ("batch", "res_length", "embed"), self.opts.activation_rules)
        a = _layer_norm(cfg, o.param_dtype, "layer_norm1")(h).astype(o.dtype)
        h = h + SiglipAttention(cfg, o, name="self_attn")(a, vec)
        h = shd.constrain(h, ("batch", "res_length", "embed"), self.opts.activation_rules)
        m = _layer_norm(cfg, o.param_dtype, "layer_norm2")(h).astype(o.dtype)
        h = h + SiglipMLP(cfg, o, name="mlp")(m)
        h = shd.constrain(h, ("batch", "res_length", "embed"), self.opts.activation_rules)
        if o.layer_loop == "scan":                 # unrolled: the encoder sows all layers' outputs at once
            self.sow(COLLECTION, "vit_layers", h)
        return h, None


# SiglipEncoderLayer / SiglipEncoder have the shape of qwen2_mot's _ScanBody / LayerStack (a layer body that
# sows its output, then the module that scans it); the layers and their inputs differ, so they stay two.
class SiglipEncoder(nn.Module):
    cfg: ViTConfig
    opts: ModelOptions = ModelOptions()

    @nn.compact
    def __call__(self, h: jax.Array, vec: MaskVectors) -> jax.Array:
        """h ``[B, N, D]``, vec mask vectors ``[B, N]`` -> h ``[B, N, D]``."""
        layer = self.opts.remat(SiglipEncoderLayer)
        if self.opts.layer_loop == "unrolled":     # per-layer parameter arrays (nn/layer_loop.py)
            outs = []
            for i in range(self.cfg.num_hidden_layers):
                h = layer(self.cfg, self.opts, name=f"layers_{i}")(h, vec)[0]
                outs.append(h)
            self.sow(COLLECTION, "vit_layers", jnp.stack(outs))
            return h
        scanned = nn.scan(layer, variable_axes={"params": 0, COLLECTION: 0},
                          split_rngs={"params": True}, in_axes=nn.broadcast, length=self.cfg.num_hidden_layers)
        return scanned(self.cfg, self.opts, name="layers")(h, vec)[0]


class SiglipNavit(nn.Module):
    """The ViT: patches of packed images -> post-LayerNormed features.

    Attributes:
      cfg: the ViT config (``num_hidden_layers`` = layers used).
      opts: :class:`~bagel_jax.nn.options.ModelOptions` (compute / parameter dtypes, remat policy,
        attention implementation); LayerNorm statistics are always float32.
    """

    cfg: ViTConfig
    opts: ModelOptions = ModelOptions()

    @nn.compact
    def __call__(self, patches: jax.Array, position_ids: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """Encode packed image patches.

        Args:
          patches: ``[B, N, p*p*C]`` float; each patch flattened (row-in-patch, col-in-patch,
            channel), channel fastest (see :func:`bagel_jax.images.patchify`).
          position_ids: ``[B, N]`` int, ``row * vit_max_num_patch_per_side + col``.
          segment_ids: ``[B, N]`` int, image id >= 1 per token, 0 for padding.
        Returns:
          ``[B, N, D]`` in the compute dtype (padding rows are finite garbage). Sows ``vit_embeddings``
          and ``vit_layers`` (:mod:`bagel_jax.nn.intermediates`).
        """
        cfg = self.cfg
        h = SiglipEmbeddings(cfg, self.opts, name="embeddings")(patches, position_ids)
        self.sow(COLLECTION, "vit_embeddings", h)
        vec = full_vectors(segment_ids)  # full attention within each image: seg = image id, vis = nblk = 0
        out = SiglipEncoder(cfg, self.opts, name="encoder")(h, vec)
        return _layer_norm(cfg, self.opts.param_dtype, "post_layernorm")(out).astype(self.opts.dtype)


def key_map(cfg: ViTConfig) -> list[keymap.Entry]:
    """Official names relative to ``vit_model.vision_model.`` -> paths relative to SiglipNavit's params."""
    emb = ("embeddings",)
    entries = keymap.linear("embeddings.patch_embedding", emb + ("patch_embedding",))
    entries.append(keymap.Entry("embeddings.position_embedding.weight",
                                emb + ("position_embedding", "embedding"), "copy"))
    root = ("encoder", "layers")
    for j in range(cfg.num_hidden_layers):
        o = f"encoder.layers.{j}."
        for n in ("layer_norm1", "layer_norm2"):
            entries += keymap.norm(o + n, root + (n,), bias=True, layer=j)
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            entries += keymap.linear(o + "self_attn." + n, root + ("self_attn", n), layer=j)
        for n in ("fc1", "fc2"):
            entries += keymap.linear(o + "mlp." + n, root + ("mlp", n), layer=j)
    entries += keymap.norm("post_layernorm", ("post_layernorm",), bias=True)
    return entries

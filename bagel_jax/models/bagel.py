"""The BAGEL model: MoT decoder + SigLIP NaViT understanding path + latent generation path.

Parameters (one pytree, names mirror the official checkpoint, see :func:`key_map`):

* ``language_model``: :class:`~bagel_jax.models.qwen2_mot.Qwen2MoT`
* ``vit_model``: :class:`~bagel_jax.models.siglip_navit.SiglipNavit`; ``connector`` (fc1, fc2);
  ``vit_pos_embed`` (fixed 2D sin-cos table, stored in the checkpoint)
* ``time_embedder`` (mlp_0, mlp_2), ``vae2llm``, ``llm2vae``, ``latent_pos_embed`` (fixed table)

The FLUX autoencoder is a separate module with its own params (``ae.safetensors``).
Methods are called with ``model.apply({"params": p}, ..., method=Bagel.<name>)``.
"""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp

from .. import sharding as shd
from ..config import BagelConfig
from ..convert import keymap
from ..nn.attention import MaskVectors
from ..nn.layers import gelu_tanh, sincos_2d_table, timestep_features
from ..nn.intermediates import COLLECTION
from ..nn.options import ModelOptions
from . import qwen2_mot, siglip_navit
from .qwen2_mot import Qwen2MoT, Routing


class PositionTable(nn.Module):
    """Fixed 2D sin-cos table ``[grid*grid, dim]`` kept as a (frozen) parameter, looked up by id."""

    grid: int
    dim: int
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.pos_embed = self.param(
            "pos_embed", lambda key: jnp.asarray(sincos_2d_table(self.dim, self.grid), self.param_dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.pos_embed, ids, axis=0)


class TimestepEmbedder(nn.Module):
    """``Linear(256 -> D) -> SiLU -> Linear(D -> D)`` on ``[cos, sin]`` features of t in [0, 1]."""

    hidden: int
    opts: ModelOptions = ModelOptions()
    freq_dim: int = 256

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        f = timestep_features(t, self.freq_dim).astype(self.opts.dtype)
        h = self.opts.dense(self.hidden, name="mlp_0")(f)
        return self.opts.dense(self.hidden, name="mlp_2")(nn.silu(h))


class Connector(nn.Module):
    """ViT width -> LLM width: ``fc2(gelu_tanh(fc1(x)))``."""

    hidden: int
    opts: ModelOptions = ModelOptions()

    @nn.compact
    def __call__(self, x):
        h = self.opts.dense(self.hidden, name="fc1")(x)
        return self.opts.dense(self.hidden, name="fc2")(gelu_tanh(h))


class Bagel(nn.Module):
    """``cfg``: the architecture; ``opts``: how to run it (dtypes, remat policy, attention
    implementation; :class:`~bagel_jax.nn.options.ModelOptions`), passed unchanged to every submodule."""

    cfg: BagelConfig
    opts: ModelOptions = ModelOptions()

    def setup(self):
        cfg, o = self.cfg, self.opts
        D = cfg.llm.hidden_size
        self.language_model = Qwen2MoT(cfg.llm, o)
        if cfg.visual_und:
            self.vit_model = siglip_navit.SiglipNavit(cfg.vit, o)
            self.connector = Connector(D, o)
            self.vit_pos_embed = PositionTable(cfg.vit_max_num_patch_per_side, D, o.param_dtype)
        if cfg.visual_gen:
            self.time_embedder = TimestepEmbedder(D, o)
            self.vae2llm = o.dense(D)
            self.llm2vae = o.dense(cfg.patch_latent_dim)
            self.latent_pos_embed = PositionTable(cfg.max_latent_size, D, o.param_dtype)

    # -- input embeddings --------------------------------------------------------------------------
    def embed_text(self, ids: jax.Array) -> jax.Array:
        """``[...] int -> [..., D]``."""
        return self.language_model.embed(ids)

    def embed_vit(self, patches, position_ids, segment_ids):
        """ViT + connector + ``vit_pos_embed``.

        Args: patches ``[B, N, p*p*3]``, position_ids ``[B, N]`` (``r*Gv + c``), segment_ids ``[B, N]``
        (image id >= 1, 0 = padding). Returns ``[B, N, D]``; sows ``vit_output`` and ``connector_output``
        (and the ViT's own intermediates, :mod:`bagel_jax.nn.intermediates`).
        """
        vit_out = self.vit_model(patches, position_ids, segment_ids)
        conn = self.connector(vit_out)
        self.sow(COLLECTION, "vit_output", vit_out)
        self.sow(COLLECTION, "connector_output", conn)
        return conn + self.vit_pos_embed(position_ids).astype(conn.dtype)

    def embed_latents(self, x_t, t, position_ids):
        """``vae2llm(x_t) + time_embedder(t) + latent_pos_embed[ids]`` (each term sown under its name).

        Args: x_t ``[..., p*p*C]`` latent tokens, t ``[...]`` flow time in [0, 1] (0 for clean
        conditioning latents), position_ids ``[...]`` (``r*Gl + c``). Returns ``[..., D]``.
        """
        a = self.vae2llm(x_t.astype(self.opts.dtype))
        b = self.time_embedder(t)
        c = self.latent_pos_embed(position_ids).astype(a.dtype)
        for name, value in (("vae2llm_out", a), ("time_embedding", b), ("latent_pos_embed_out", c)):
            self.sow(COLLECTION, name, value)
        return a + b + c

    # -- decoder and heads --------------------------------------------------------------------------
    def decode(self, x, positions, mask, routing: Routing, is_gen=None, cache=None, final_norm: bool = True):
        """MoT layers + per-expert final norm; see :meth:`Qwen2MoT.__call__` (``mask``: the chunk's
        :class:`~bagel_jax.nn.attention.MaskVectors`). Returns ``(h, (k, v))``; sows ``hidden``."""
        return self.language_model(x, positions, mask, routing, is_gen, cache, final_norm)

    def final_norm(self, x, routing: Routing, is_gen=None):
        """The decoder's final norms alone (:meth:`Qwen2MoT.final_norm`), e.g. on a predicted last-layer output."""
        return self.language_model.final_norm(x, routing, is_gen)

    def lm_logits(self, h: jax.Array) -> jax.Array:
        logits = self.language_model.logits(h)                 # [..., vocab]
        return shd.constrain(logits, (None,) * (logits.ndim - 1) + ("vocab",))

    def velocity(self, h: jax.Array) -> jax.Array:
        """``llm2vae``: ``[..., D] -> [..., p*p*C]`` predicted flow velocity (noise - x0)."""
        return self.llm2vae(h)

    def init_all(self, ids, positions, mask, patches=None, vit_pos=None, vit_seg=None, latents=None, lat_pos=None):
        """Touch every parameter (for ``init`` and ``jax.eval_shape``)."""
        x = self.embed_text(ids)
        if self.cfg.visual_und:
            x = x + self.embed_vit(patches, vit_pos, vit_seg)[:, :1].sum() * 0
        if self.cfg.visual_gen:
            x = x + self.embed_latents(latents, jnp.zeros(latents.shape[:-1]), lat_pos)[:, :1].sum() * 0
        h, _ = self.decode(x, positions, mask, Routing.select(), jnp.zeros(ids.shape, bool))
        out = self.lm_logits(h).sum()
        if self.cfg.visual_gen:
            out = out + self.velocity(h).sum()
        return out


def init_inputs(cfg: BagelConfig, L: int = 4):
    """Small dummy inputs for :meth:`Bagel.init_all`."""
    n = 4
    return dict(
        ids=jnp.zeros((1, L), jnp.int32), positions=jnp.zeros((1, L), jnp.int32),
        mask=MaskVectors(jnp.ones((1, L), jnp.int32), jnp.zeros((1, L), jnp.int32), jnp.zeros((1, L), jnp.int32)),
        patches=jnp.zeros((1, n, cfg.vit.patch_dim)), vit_pos=jnp.zeros((1, n), jnp.int32),
        vit_seg=jnp.ones((1, n), jnp.int32),
        latents=jnp.zeros((1, n, cfg.patch_latent_dim)), lat_pos=jnp.zeros((1, n), jnp.int32))


def param_shapes(model: Bagel):
    """Shapes/dtypes of every parameter, without allocating (``jax.eval_shape`` of init)."""
    inputs = init_inputs(model.cfg)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **inputs, method=Bagel.init_all))["params"]


def init_params(model: Bagel, key: jax.Array):
    """Random initial parameters (PyTorch-like defaults; position tables are the fixed sin-cos tables)."""
    return model.init(key, **init_inputs(model.cfg), method=Bagel.init_all)["params"]


def key_map(cfg: BagelConfig) -> list[keymap.Entry]:
    """Every tensor of the official ``ema.safetensors`` -> its path in the Bagel params tree."""
    E = keymap.prefixed(qwen2_mot.key_map(cfg.llm), "language_model.", ("language_model",))
    if cfg.visual_gen:
        E += keymap.linear("time_embedder.mlp.0", ("time_embedder", "mlp_0"))
        E += keymap.linear("time_embedder.mlp.2", ("time_embedder", "mlp_2"))
        E += keymap.linear("vae2llm", ("vae2llm",))
        E += keymap.linear("llm2vae", ("llm2vae",))
        E.append(keymap.Entry("latent_pos_embed.pos_embed", ("latent_pos_embed", "pos_embed")))
    if cfg.visual_und:
        E += keymap.prefixed(siglip_navit.key_map(cfg.vit), "vit_model.vision_model.", ("vit_model",))
        E += keymap.linear("connector.fc1", ("connector", "fc1"))
        E += keymap.linear("connector.fc2", ("connector", "fc2"))
        E.append(keymap.Entry("vit_pos_embed.pos_embed", ("vit_pos_embed", "pos_embed")))
    return E


def patchify_latents(z: jax.Array, p: int) -> jax.Array:
    """Latents ``[N, h*p, w*p, C]`` -> tokens ``[N, h, w, p*p*C]`` flattened (py, px, c), channel fastest."""
    N, H, W, C = z.shape
    z = z.reshape(N, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)
    return z.reshape(N, H // p, W // p, p * p * C)


def unpatchify_latents(tokens: jax.Array, h: int, w: int, p: int, C: int) -> jax.Array:
    """Tokens ``[..., h*w, p*p*C]`` -> latents ``[..., h*p, w*p, C]`` (inverse of :func:`patchify_latents`)."""
    lead = tokens.shape[:-2]
    z = tokens.reshape(lead + (h, w, p, p, C))
    n = len(lead)
    z = jnp.moveaxis(z, n + 2, n + 1)  # [..., h, p, w, p, C]
    return z.reshape(lead + (h * p, w * p, C))

"""Building blocks of inference: one jitted function per kind of chunk (docs/architecture.md: sequence layout, KV
cache, contexts, flow sampling).

Each function runs one block (text, ViT image, clean VAE image, or a flow query) against a
:class:`~bagel_jax.inference.kv_cache.KVCache`. The blocks, their markers, positions and attention
follow :mod:`bagel_jax.layout`; text and ViT chunks keep the logical order ``[start, body..., end]``,
latent chunks (VAE image, flow query) put the markers first, ``[start, end, latents...]``
(``layout.LATENT_CHUNK_BODY``), so the two experts run on static slices.

All functions take a batch of rows; ``q_len`` gives each row's number of real tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .. import layout
from ..models import flux_vae
from ..models.bagel import Bagel, patchify_latents
from ..models.qwen2_mot import Routing
from ..nn import intermediates
from .kv_cache import KVCache, forward_chunk


# Every block returns ``(..., intermediates)``: ``{name: value}`` of what the models sow
# (bagel_jax.nn.intermediates), empty unless ``collect`` (a static argument).

@functools.partial(jax.jit, static_argnames=("model", "update", "collect"))
def text_chunk(model: Bagel, params, cache: KVCache, ids, positions, q_len, update: bool = True,
               collect: bool = False):
    """Causal und-expert forward of token ids ``[B, Lq]`` at ``positions``. Returns ``(h, cache, intermediates)``."""
    x = model.apply({"params": params}, ids, method=Bagel.embed_text)
    return forward_chunk(model, params, cache, x, positions, q_len, True, Routing.und(), update, collect=collect)


@functools.partial(jax.jit, static_argnames=("model", "collect", "hidden"))
def vit_chunk(model: Bagel, params, cache: KVCache, patches, vit_pos, n_tokens, rope, markers,
              collect: bool = False, hidden: bool = True):
    """Prefill one ViT image per row.

    Args: patches ``[B, N, p*p*3]`` (padded), vit_pos ``[B, N]``, n_tokens ``[B]`` real patches per row,
    rope ``[B]`` position of the block, markers ``[2]`` ids of <|vision_start|>, <|vision_end|>.
    Returns ``(h, cache, intermediates)`` with the chunk in official order ``[start, tokens..., end]``;
    ``h`` is None unless ``hidden`` (static): the cache needs only each layer's keys and values, so without
    ``h`` XLA drops the last layer's attention, output projection and MLP (about 1/num_layers of the
    prefill; with the unrolled layer loop, :mod:`bagel_jax.nn.layer_loop`).
    """
    B, N, _ = patches.shape
    seg = (jnp.arange(N)[None] < n_tokens[:, None]).astype(jnp.int32)
    emb, vit_inter = intermediates.apply(model, {"params": params}, patches, vit_pos, seg, method=Bagel.embed_vit,
                                         collect=collect)                                      # [B, N, D]
    mk = model.apply({"params": params}, markers, method=Bagel.embed_text)                   # [2, D]
    # [start, tokens (padded), end]; the end marker is moved right after the last real token.
    x = jnp.concatenate([jnp.broadcast_to(mk[0], (B, 1, mk.shape[-1])), emb.astype(mk.dtype),
                         jnp.zeros((B, 1, mk.shape[-1]), mk.dtype)], axis=1)
    end_at = layout.end_marker_at(n_tokens)
    x = jax.vmap(lambda xr, e: xr.at[e].set(mk[1]))(x, end_at)
    positions = jnp.broadcast_to(rope[:, None], (B, layout.block_len(N)))
    h, cache, inter = forward_chunk(model, params, cache, x, positions, layout.block_len(n_tokens), False,
                                    Routing.und(), True, collect=collect)
    return (h if hidden else None), cache, {**vit_inter, **inter}


def _latent_chunk(model: Bagel, params, x_t, t, lat_pos, rope, markers, collect: bool = False):
    """Embeddings ``[B, 2 + N, D]`` of ``[start, end, latents...]``, their positions and what
    ``embed_latents`` sows (when ``collect``)."""
    B, N, _ = x_t.shape
    emb, inter = intermediates.apply(model, {"params": params}, x_t, jnp.broadcast_to(t[:, None], (B, N)), lat_pos,
                                     method=Bagel.embed_latents, collect=collect)
    mk = model.apply({"params": params}, markers, method=Bagel.embed_text)
    x = jnp.concatenate([jnp.broadcast_to(mk[None], (B, 2, mk.shape[-1])), emb.astype(mk.dtype)], axis=1)
    positions = jnp.broadcast_to(rope[:, None], (B, layout.block_len(N)))
    return x, positions, inter


def flow_features(model: Bagel, params, cache: KVCache, x_t, t, lat_pos, rope, markers, collect: bool = False):
    """The decoder part of a velocity prediction: the query ``[start, end, latents]`` against ``cache``
    (never written). Returns ``(f [R, N+2, D], intermediates)`` with ``f`` the last layer's output before
    the final norms (the feature TaylorSeer caches, docs/architecture.md#taylorseer)."""
    R, N, _ = x_t.shape
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (R,))
    x, positions, emb_inter = _latent_chunk(model, params, x_t, t, lat_pos, rope, markers, collect)
    f, _, inter = forward_chunk(model, params, cache, x, positions, jnp.full((R,), layout.block_len(N), jnp.int32),
                                False, Routing.split(layout.LATENT_CHUNK_BODY), False, collect=collect,
                                final_norm=False)
    return f, {**emb_inter, **inter}


def flow_head(model: Bagel, params, f):
    """Final norms (und on the two markers, gen on the latents) and ``llm2vae`` of query features
    ``f [R, N+2, D]``. Returns ``(v [R, N, p*p*C] float32, h [R, N+2, D])``."""
    h = model.apply({"params": params}, f, Routing.split(layout.LATENT_CHUNK_BODY), method=Bagel.final_norm)
    v = model.apply({"params": params}, h[:, layout.LATENT_CHUNK_BODY:], method=Bagel.velocity).astype(jnp.float32)
    return v, h


@functools.partial(jax.jit, static_argnames=("model", "collect"))
def velocity(model: Bagel, params, cache: KVCache, x_t, t, lat_pos, rope, markers, collect: bool = False):
    """One velocity prediction per row (:func:`flow_features` then :func:`flow_head`). The sampler's
    step and the parity verifier both call this.

    Args: x_t ``[R, N, p*p*C]``, t scalar or ``[R]`` (shifted sigma), lat_pos ``[R, N]``, rope ``[R]``.
    Returns ``(v [R, N, p*p*C] float32, h [R, N+2, D] in chunk order, intermediates)`` (the latent
    embedding's terms and the decoder's ``hidden`` when ``collect``).
    """
    f, inter = flow_features(model, params, cache, x_t, t, lat_pos, rope, markers, collect)
    v, h = flow_head(model, params, f)
    return v, h, inter


def latent_grid(h: int, w: int, max_latent_size: int):
    """Position ids ``r*Gl + c`` (row-major) of an ``h x w`` latent token grid."""
    r, c = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
    return (r * max_latent_size + c).reshape(-1)


# -------------------------------------------------------------------------------------------------
# Pieces used by the engine (context.py): VAE encoding separate from the latent prefill, so that
# rows with images of different sizes are encoded one by one (no padding inside the VAE, whose
# GroupNorm / mid attention would see it) and then prefilled together with padded token arrays.
# -------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("vae", "p"))
def vae_encode_tokens(vae: flux_vae.AutoEncoder, vae_params, image, eps, p: int):
    """``image [1, H, W, 3]`` in [-1, 1], ``eps [1, H/8, W/8, C]`` -> clean latent tokens ``[1, h*w, p*p*C]``."""
    moments = vae.apply({"params": vae_params}, image, method=flux_vae.AutoEncoder.encode_moments)
    z = flux_vae.latent_from_moments(moments, vae.cfg, eps)
    tok = patchify_latents(z, p)
    return tok.reshape(tok.shape[0], -1, tok.shape[-1])


@functools.partial(jax.jit, static_argnames=("model", "hidden"))
def latent_prefill(model: Bagel, params, cache: KVCache, x0, lat_pos, n_tokens, rope, markers, hidden: bool = True):
    """Prefill clean latent tokens ``x0 [B, N, p*p*C]`` (t = 0, padded per row to N) as a full-attention
    image block ``[start, end, latents...]``. Returns ``(h, cache)``; ``h`` None unless ``hidden`` (as
    :func:`vit_chunk`)."""
    x, positions, _ = _latent_chunk(model, params, x0, jnp.zeros(x0.shape[:1]), lat_pos, rope, markers)
    h, cache, _ = forward_chunk(model, params, cache, x, positions, layout.block_len(n_tokens), False,
                                Routing.split(layout.LATENT_CHUNK_BODY), True)
    return (h if hidden else None), cache

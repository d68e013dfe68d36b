"""The training forward: packed batch -> CE and MSE losses (docs/architecture.md#training-losses).

The same function is used by ``train.py`` (inside the jitted train step) and by the parity verifier
(case ``train_forward``), which injects the recorded noise instead of drawing it.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

from .. import layout
from ..models import flux_vae
from ..models.bagel import Bagel, patchify_latents
from ..models.qwen2_mot import Routing
from ..nn import intermediates
from ..nn.attention import MaskVectors


class TrainNoise(NamedTuple):
    posterior_eps: jax.Array   # [Ni, H/8, W/8, C] VAE posterior noise
    flow_noise: jax.Array      # [Nl, p*p*C] flow-matching noise


def draw_noise(key: jax.Array, batch: Mapping[str, Any], cfg) -> TrainNoise:
    """All random draws of one training forward, from one explicit key."""
    k1, k2 = jax.random.split(key)
    Ni, H, W, _ = batch["vae_images"].shape
    ds = cfg.vae.downsample
    eps = jax.random.normal(k1, (Ni, H // ds, W // ds, cfg.vae.z_channels), jnp.float32)
    noise = jax.random.normal(k2, (batch["vae_src"].shape[0], cfg.patch_latent_dim), jnp.float32)
    return TrainNoise(eps, noise)


def shift_timesteps(t: jax.Array, shift: float) -> jax.Array:
    return shift * t / (1.0 + (shift - 1.0) * t)


def train_forward(model: Bagel, params, vae: flux_vae.AutoEncoder, vae_params, batch: Mapping[str, Any],
                  noise: TrainNoise, ce_weight: float = 1.0, mse_weight: float = 1.0,
                  ce_loss_reweighting: bool = False, token_loss_weights: Optional[jax.Array] = None,
                  collect: bool = False, expert_split: Optional[tuple[int, int]] = None,
                  ce_chunk_tokens: Optional[int] = None, rngs: Optional[dict] = None):
    """Losses of one packed batch (arrays of :class:`bagel_jax.data.packing.PackedBatch`).

    Returns ``(loss, aux)``; ``aux`` holds ``ce``, ``mse`` (the normalised losses), the token counts and
    ``intermediates``: empty, or with ``collect`` (static) everything the models sow
    (:mod:`bagel_jax.nn.intermediates`) plus this function's per-token values, for the verifier (in the
    batch's physical order).
    ``token_loss_weights`` optionally scales the CE of each CE token (e.g. an extra weight on
    ``<|vision_start|>`` labels).

    ``expert_split`` (static ``(und_tokens, gen_tokens)``): the batch is in the expert-stream layout
    (:func:`bagel_jax.data.packing.to_expert_streams`) with these und / gen windows per row, and each
    decoder layer runs each expert once on its own window (``Routing.split``). ``None`` means a
    logical-order batch: both experts run on every token and one is selected (``Routing.select``,
    twice the expert FLOPs; the test oracle of the stream layout, not a training path).
    ``ce_chunk_tokens`` (static): CE tokens per chunk of the LM head + log-softmax (:func:`chunked_ce`;
    ``None`` = all at once). ``rngs``: Flax rng streams of the model (LoRA dropout, :mod:`bagel_jax.nn.lora`).
    """
    cfg = model.cfg
    apply = lambda method, *a, **kw: model.apply({"params": params}, *a, method=method, rngs=rngs, **kw)
    inter = {}

    def sown(method, *a):       # apply, keeping what the model sows when collecting
        out, got = intermediates.apply(model, {"params": params}, *a, method=method, collect=collect, rngs=rngs)
        inter.update(got)
        return out

    B, L = batch["token_ids"].shape
    D = cfg.llm.hidden_size
    x = apply(Bagel.embed_text, batch["token_ids"]).reshape(B * L, D)

    if cfg.visual_und and batch["vit_patches"].shape[0] > 0:
        vit = sown(Bagel.embed_vit, batch["vit_patches"][None], batch["vit_pos"][None], batch["vit_seg"][None])
        x = x.at[batch["vit_dest"]].set(vit[0].astype(x.dtype), mode="drop")

    has_vae = cfg.visual_gen and batch["vae_src"].shape[0] > 0
    if has_vae:
        moments = vae.apply({"params": vae_params}, batch["vae_images"], method=flux_vae.AutoEncoder.encode_moments)
        latents = flux_vae.latent_from_moments(moments, cfg.vae, noise.posterior_eps)   # [Ni, H/8, W/8, C]
        latents = jax.lax.stop_gradient(latents)                                       # the VAE is frozen
        tokens = patchify_latents(latents, cfg.latent_patch_size)
        x0 = tokens.reshape(-1, tokens.shape[-1])[batch["vae_src"]]                    # [Nl, p*p*C]
        t = shift_timesteps(jax.nn.sigmoid(batch["vae_t_raw"]), cfg.timestep_shift)    # clean: sigmoid(-inf) = 0
        x_t = (1.0 - t[:, None]) * x0 + t[:, None] * noise.flow_noise
        emb = sown(Bagel.embed_latents, x_t, t, batch["vae_pos"])
        if collect:
            inter.update(latents=latents, packed_latent_clean=x0, timesteps_used=t)
        x = x.at[batch["vae_dest"]].set(emb.astype(x.dtype), mode="drop")

    vec = MaskVectors(batch["seg"], batch["vis"], batch["nblk"])
    is_gen = batch["kind"] == layout.KIND_VAE
    routing = Routing.select() if expert_split is None else Routing.split(*expert_split)
    h, _ = sown(Bagel.decode, x.reshape(B, L, D), batch["positions"], vec, routing, is_gen)
    h = h.reshape(B * L, D)

    # CE on text tokens (fp32 log-softmax), chunked over CE tokens.
    valid = batch["ce_valid"]
    ce_tok = chunked_ce(lambda hc: apply(Bagel.lm_logits, hc), h, batch["ce_index"], batch["ce_label"],
                        ce_chunk_tokens)
    w = valid * (batch["ce_reweight"] if ce_loss_reweighting else 1.0)
    if token_loss_weights is not None:
        w = w * token_loss_weights
    n_ce = valid.sum()
    ce = (ce_tok * w).sum() / jnp.maximum(w.sum() if ce_loss_reweighting else n_ce, 1.0)

    loss = ce_weight * ce
    aux = dict(ce=ce, n_ce=n_ce)
    if has_vae:
        pred = apply(Bagel.velocity, h[jnp.minimum(batch["vae_dest"], B * L - 1)]).astype(jnp.float32)
        target = noise.flow_noise - x0
        m = batch["vae_mse"].astype(jnp.float32)
        n_mse = m.sum()
        mse_tok = jnp.mean((pred - target) ** 2, axis=-1)
        mse = (mse_tok * m).sum() / jnp.maximum(n_mse, 1.0)
        loss = loss + mse_weight * mse
        aux.update(mse=mse, n_mse=n_mse)
        if collect:
            inter.update(mse_preds=pred, mse_target=target, mse_per_element=(pred - target) ** 2)
    else:
        aux.update(mse=jnp.zeros((), jnp.float32), n_mse=jnp.zeros((), jnp.float32))
    if collect:
        logits = apply(Bagel.lm_logits, h[batch["ce_index"]]).astype(jnp.float32)
        inter.update(final_hidden=h, ce_logits=logits, ce_per_token=ce_tok)
    aux["intermediates"] = inter
    return loss, aux


def chunked_ce(logits_fn, h: jax.Array, index: jax.Array, label: jax.Array, chunk: Optional[int]) -> jax.Array:
    """Per-token cross entropy ``[Nce]`` float32: ``logsumexp(logits) - logits[label]`` of the hidden
    states ``h[index]`` (``h`` ``[N, hidden]``, ``index``/``label`` ``[Nce]``).

    The CE tokens run in chunks of ``chunk`` (the last chunk padded with token 0 / label 0, dropped from
    the result) under ``lax.map`` with ``jax.checkpoint``: the forward keeps one chunk's
    ``[chunk, vocab]`` logits at a time and the backward recomputes them chunk by chunk, so neither holds
    the whole ``[Nce, vocab]``. ``chunk`` None or >= Nce: one chunk.
    """
    n = index.shape[0]
    c = n if chunk is None else max(1, min(int(chunk), n))
    if n == 0:
        return jnp.zeros((0,), jnp.float32)
    k = -(-n // c)
    idx = jnp.pad(index, (0, k * c - n)).reshape(k, c)
    lab = jnp.pad(label.astype(jnp.int32), (0, k * c - n)).reshape(k, c)

    @jax.checkpoint
    def one(args):
        i, y = args
        logits = logits_fn(h[i]).astype(jnp.float32)                 # [chunk, vocab]
        picked = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
        return jax.nn.logsumexp(logits, axis=-1) - picked

    if k == 1:
        return one((idx[0], lab[0]))[:n]
    return jax.lax.map(one, (idx, lab)).reshape(-1)[:n]

"""Classifier-free guidance combination of flow velocities (BAGEL.md 8.5, step 6)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

RENORM_TYPES = ("global", "channel", "text_channel")


def combine_cfg(v: jax.Array, v_text: jax.Array, v_img: Optional[jax.Array], text_scale, img_scale,
                renorm_type: str = "global", renorm_min: float = 0.0,
                token_mask: Optional[jax.Array] = None) -> jax.Array:
    """Combine conditional / text-unconditional / image-unconditional velocities.

    Args:
      v, v_text, v_img: ``[batch, tokens, C]`` (``v_img`` may be None when image CFG is off).
      text_scale, img_scale: scalars or ``[batch]`` arrays; the *active* scales for this step (pass
        1.0 outside ``cfg_interval``). Text CFG acts iff ``text_scale > 1``; image CFG only acts when
        text CFG does (official behaviour).
      renorm_type: "global" (norm over all tokens and channels of a row), "channel" (per token) or
        "text_channel" (renormalise only the text-guided part, per token; no renorm after image CFG).
      token_mask: ``[batch, tokens]`` bool of real latent tokens (padding excluded from global norms).
    Returns ``[batch, tokens, C]``.
    """
    if renorm_type not in RENORM_TYPES:
        raise ValueError(f"cfg_renorm_type {renorm_type!r} is not one of {RENORM_TYPES}")
    f32 = jnp.float32
    v, v_text = v.astype(f32), v_text.astype(f32)
    st = jnp.asarray(text_scale, f32).reshape(-1, 1, 1)
    si = jnp.asarray(img_scale, f32).reshape(-1, 1, 1)
    use_img = (si > 1.0) if v_img is not None else jnp.zeros_like(si, bool)
    v_img = v_text if v_img is None else v_img.astype(f32)
    tok = jnp.ones(v.shape[:2], bool) if token_mask is None else token_mask

    def norm(x, per_token):
        if per_token:
            return jnp.linalg.norm(x, axis=-1, keepdims=True)
        sq = jnp.where(tok[..., None], x * x, 0.0).sum(axis=(1, 2), keepdims=True)
        return jnp.sqrt(sq)

    u = v_text + st * (v - v_text)
    if renorm_type == "text_channel":
        r = jnp.clip(norm(v, True) / (norm(u, True) + 1e-8), renorm_min, 1.0)
        u = u * r
        out = jnp.where(use_img, v_img + si * (u - v_img), u)
    else:
        w = jnp.where(use_img, v_img + si * (u - v_img), u)
        per_token = renorm_type == "channel"
        r = jnp.clip(norm(v, per_token) / (norm(w, per_token) + 1e-8), renorm_min, 1.0)
        out = w * r
    return jnp.where(st > 1.0, out, v)


def shifted_schedule(num_timesteps: int, shift: float) -> jax.Array:
    """``sigma_k = s*t_k / (1 + (s-1)*t_k)``, ``t_k = linspace(1, 0, N)``; N-1 Euler steps use ``sigma[:-1]``."""
    t = jnp.linspace(1.0, 0.0, num_timesteps, dtype=jnp.float32)
    return shift * t / (1.0 + (shift - 1.0) * t)


def cfg_active(sigma, interval) -> jax.Array:
    """Official interval test on the shifted sigma: ``lo < sigma <= hi``."""
    lo, hi = interval
    return (sigma > lo) & (sigma <= hi)

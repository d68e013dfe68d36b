"""Flow-matching image sampler: one ``lax.scan`` over timesteps, then unpatchify, VAE decode and the
official uint8 conversion, all in one jit (BAGEL.md 8.5, 8.6).

CFG branches are stacked on the batch axis (rows ``[gen | cfg_text | cfg_img]``, each ``B`` rows), so a
step is one velocity call. Branches that are the same object in the context are computed once:

* ``cfg_text_scale <= 1``: only ``gen`` (1 branch);
* ``cfg_img_scale <= 1``, or ``cfg_img is gen`` (plain text-to-image): ``gen`` + ``cfg_text`` (2 branches;
  with ``cfg_img is gen`` and ``cfg_img_scale > 1`` the image velocity *is* the conditional one);
* otherwise 3 branches.

Steps outside ``cfg_interval`` (``lo < sigma <= hi`` on the shifted sigma) use only the conditional
velocity. With ``cfg_off="cond"`` (default) the step chooses, with ``lax.cond``, between the stacked
call and a call on the ``gen`` rows only, so CFG-off steps cost one branch; ``cfg_off="where"``
always runs all branches and selects with ``jnp.where`` (kept for measurements).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..models import flux_vae
from ..models.bagel import Bagel, unpatchify_latents
from . import blocks
from .cfg import RENORM_TYPES, cfg_active, combine_cfg, shifted_schedule
from .context import Branch, Context, on_mesh
from .kv_cache import KVCache


@dataclasses.dataclass(frozen=True)
class ImageParams:
    """Image sampling hyperparameters. Defaults: the official notebook's text-to-image settings
    (BAGEL.md 8.8); :meth:`edit` gives the notebook's editing settings."""

    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 1.0
    cfg_interval: tuple = (0.4, 1.0)
    timestep_shift: float = 3.0
    num_timesteps: int = 50
    cfg_renorm_min: float = 0.0
    cfg_renorm_type: str = "global"

    @staticmethod
    def t2i(**kw) -> "ImageParams":
        return ImageParams(**kw)

    @staticmethod
    def edit(**kw) -> "ImageParams":
        d = dict(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel")
        d.update(kw)
        return ImageParams(**d)

    def validate(self) -> "ImageParams":
        if self.cfg_renorm_type not in RENORM_TYPES:
            raise ValueError(f"cfg_renorm_type must be one of {RENORM_TYPES}, got {self.cfg_renorm_type!r}")
        if int(self.num_timesteps) < 2:
            raise ValueError(f"num_timesteps must be >= 2 (N gives N-1 model evaluations), got {self.num_timesteps}")
        lo, hi = self.cfg_interval
        if not lo <= hi:
            raise ValueError(f"cfg_interval must be [lo, hi] with lo <= hi, got {self.cfg_interval}")
        if not self.timestep_shift > 0:
            raise ValueError(f"timestep_shift must be > 0, got {self.timestep_shift}")
        if not 0.0 <= self.cfg_renorm_min <= 1.0:
            raise ValueError(f"cfg_renorm_min must be in [0, 1], got {self.cfg_renorm_min}")
        return self


def _progress_cb(step, total):
    from . import progress
    progress.tick("steps", int(step), int(total))


def _velocity(model: Bagel, params, cache: KVCache, x, t, lat_pos, rope, markers):
    """``x [R, N, C]`` against ``cache`` (R rows) -> ``v [R, N, C]`` float32 (cache never written)."""
    return blocks.flow_velocity(model, params, cache, x, t, lat_pos, rope, markers)[0]


@functools.partial(jax.jit, static_argnames=("model", "vae", "hw", "n_branches", "img_is_gen", "renorm_type",
                                             "cfg_off", "record", "progress", "decode"))
def flow_loop(model: Bagel, params, vae, vae_params, cache: KVCache, rope, x0, sigmas, markers,
              text_scale, img_scale, interval, renorm_min, *, hw: tuple, n_branches: int, img_is_gen: bool,
              renorm_type: str, cfg_off: str = "cond", record: bool = False, progress: bool = False,
              decode: bool = True):
    """The compiled sampler.

    Args:
      cache: the branches stacked on the batch axis, ``[layers, n_branches*B, cap, K, dh]``;
        rope ``[n_branches*B]`` query positions; x0 ``[B, N, p*p*C]`` initial noise (float32);
      sigmas ``[num_timesteps]`` shifted schedule; text_scale / img_scale / renorm_min scalars;
      interval ``[2]`` (lo, hi).
    Returns dict: ``latent_tokens [B, N, p*p*C]``, ``image [B, H, W, 3]`` uint8 and ``decoded`` float
    ``[B, H, W, 3]`` (if ``decode``), and with ``record`` the per-step ``x_t``, ``v`` ``[steps, B, N, C]``.
    """
    cfg = model.cfg
    B, N, _ = x0.shape
    H, W = hw
    ds = cfg.latent_downsample
    h, w = H // ds, W // ds
    lat_pos = jnp.broadcast_to(blocks.latent_grid(h, w, cfg.max_latent_size)[None], (B, N))
    steps = sigmas.shape[0] - 1
    gen_cache = KVCache(cache.k[:, :B], cache.v[:, :B], cache.length[:B])

    def cond_only(x, t):
        return _velocity(model, params, gen_cache, x, t, lat_pos, rope[:B], markers)

    def with_cfg(x, t, st, si):
        R = n_branches * B
        vs = _velocity(model, params, cache, jnp.tile(x, (n_branches, 1, 1)), t,
                       jnp.tile(lat_pos, (n_branches, 1)), rope, markers).reshape(n_branches, B, N, -1)
        v, vt = vs[0], vs[1]
        vi = vs[2] if n_branches == 3 else (v if img_is_gen else None)
        del R
        return combine_cfg(v, vt, vi, st, si, renorm_type, renorm_min)

    def body(x, k):
        t = sigmas[k]
        dt = sigmas[k] - sigmas[k + 1]
        if n_branches == 1:
            v = cond_only(x, t)
        else:
            active = cfg_active(t, (interval[0], interval[1])) & (text_scale > 1.0)
            st = jnp.where(active, text_scale, 1.0)
            si = jnp.where(active, img_scale, 1.0)
            if cfg_off == "cond":
                v = jax.lax.cond(active, lambda: with_cfg(x, t, st, si), lambda: cond_only(x, t))
            else:
                v = with_cfg(x, t, st, si)
        x_new = x - v * dt
        if progress:
            jax.debug.callback(_progress_cb, k + 1, steps)
        return x_new, ((x, v) if record else None)

    x, ys = jax.lax.scan(body, x0.astype(jnp.float32), jnp.arange(steps))
    out = dict(latent_tokens=x)
    if record:
        out["x_t"], out["v"] = ys
    if decode:
        p, C = cfg.latent_patch_size, cfg.vae.z_channels
        z = unpatchify_latents(x, h, w, p, C)                                        # [B, 2h, 2w, C]
        img = vae.apply({"params": vae_params}, z, method=flux_vae.AutoEncoder.decode)  # [B, H, W, 3]
        out["latent"] = z
        out["decoded"] = img
        out["image"] = (jnp.clip(img.astype(jnp.float32) * 0.5 + 0.5, 0.0, 1.0) * 255.0).astype(jnp.uint8)
    return out


def branch_plan(ctx: Context, params: ImageParams) -> tuple[list[Branch], bool]:
    """The branches to stack and whether the image-unconditional velocity equals the conditional one."""
    if not ctx.track_cfg or params.cfg_text_scale <= 1.0:
        return [ctx.gen], False
    if params.cfg_img_scale <= 1.0:
        return [ctx.gen, ctx.cfg_text], False
    if ctx.cfg_img is ctx.gen:
        return [ctx.gen, ctx.cfg_text], True
    return [ctx.gen, ctx.cfg_text, ctx.cfg_img], False


def stack_branches(branches: Sequence[Branch]) -> tuple[KVCache, np.ndarray]:
    cap = max(b.capacity for b in branches)
    bs = [b.with_capacity(cap) for b in branches]
    if len(bs) == 1:
        return bs[0].cache, bs[0].rope
    cache = KVCache(jnp.concatenate([b.cache.k for b in bs], axis=1), jnp.concatenate([b.cache.v for b in bs], axis=1),
                    jnp.concatenate([b.cache.length for b in bs], axis=0))
    return cache, np.concatenate([b.rope for b in bs])


def initial_noise(keys: Sequence[jax.Array], n_tokens: int, dim: int) -> jax.Array:
    """One ``[n_tokens, dim]`` standard normal draw per row key (row i depends only on key i)."""
    return jnp.stack([jax.random.normal(k, (n_tokens, dim), jnp.float32) for k in keys])


@on_mesh
def generate_images(ctx: Context, hw, params: ImageParams = ImageParams(), keys: Optional[Sequence] = None,
                    noise: Optional[np.ndarray] = None, record: bool = False, progress: bool = False,
                    cfg_off: str = "cond", decode: bool = True) -> dict:
    """Sample one image per row of ``ctx`` (all rows the same size ``hw = (H, W)``).

    Args:
      keys: one PRNG key per row for the initial noise (default ``PRNGKey(i)`` for row i);
        noise: ``[B, N, p*p*C]`` injected initial noise (overrides keys; for parity tests).
    Returns the dict of :func:`flow_loop` as numpy arrays plus ``sigmas``.
    """
    params.validate()
    eng = ctx.engine
    H, W = eng.check_output_size(hw)
    cfg = eng.cfg
    N = (H // cfg.latent_downsample) * (W // cfg.latent_downsample)
    B = ctx.batch
    ctx.check_room(N + 2, "image generation")
    if noise is not None:
        x0 = jnp.asarray(noise, jnp.float32)
        if x0.shape != (B, N, cfg.patch_latent_dim):
            raise ValueError(f"noise must have shape {(B, N, cfg.patch_latent_dim)}, got {x0.shape}")
    else:
        keys = [jax.random.PRNGKey(i) for i in range(B)] if keys is None else list(keys)
        if len(keys) != B:
            raise ValueError(f"got {len(keys)} keys for a batch of {B}")
        x0 = initial_noise(keys, N, cfg.patch_latent_dim)
    branches, img_is_gen = branch_plan(ctx, params)
    # the query chunk is never written, but forward_chunk concatenates [cache ; chunk]: no room needed
    cache, rope = stack_branches(branches)
    sig = shifted_schedule(int(params.num_timesteps), float(params.timestep_shift))
    out = flow_loop(eng.model, eng.params, eng.vae, eng.vae_params, cache, jnp.asarray(rope, jnp.int32), x0, sig,
                    eng.markers, jnp.float32(params.cfg_text_scale), jnp.float32(params.cfg_img_scale),
                    jnp.asarray(params.cfg_interval, jnp.float32), jnp.float32(params.cfg_renorm_min),
                    hw=(H, W), n_branches=len(branches), img_is_gen=img_is_gen,
                    renorm_type=params.cfg_renorm_type, cfg_off=cfg_off, record=record, progress=progress,
                    decode=decode)
    out = jax.device_get(out)
    out["sigmas"] = np.asarray(sig)
    out["n_branches"] = len(branches)
    return out

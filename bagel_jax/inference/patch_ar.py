"""Patch-autoregressive image sampling (``image_mode: "patch_ar"``; the layout: :mod:`bagel_jax.data.patch_ar`).

One jitted program per image size and group size ``k``: ``<|vision_start|>`` is appended to the KV cache
as a causal token, then a ``lax.scan`` over the ``G = N / k`` groups of latent tokens (raster order) runs,
for each group, a ``lax.scan`` over the timesteps of the shifted schedule (the flow queries of the group's
``k`` noisy tokens attend to the cache and to each other and are never written), then appends the denoised
group to the cache as clean (t = 0) tokens, a full-attention chunk; after the last group
``<|vision_end|>`` is appended, so text decoding can continue on the returned cache (its hidden state
gives the logits of the next text token). Every cache row (the CFG branches stacked on the batch axis, as
the whole-image sampler's :class:`~bagel_jax.inference.cfg.CfgPlan`) receives the same clean tokens.

CFG as the whole-image mode (docs/architecture.md#flow-sampling): the plan's branches, ``cfg_interval`` on the
shifted sigma (``lax.cond`` between the stacked call and the ``gen`` rows alone) and the renorm, whose
norms are taken over the current group's tokens (the velocity of a step is the group's). RoPE: every token
of the image at the context's next position (as a whole image); the counter then advances by 1.
TaylorSeer step caching is not offered in this mode.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import layout
from ..models.bagel import Bagel
from ..models.qwen2_mot import Routing
from . import progress
from .blocks import latent_grid
from .cfg import CfgPlan, Guidance, ImageParams, make_plan, shifted_schedule
from .context import Context
from .engine import ContextError, on_mesh
from .kv_cache import KVCache, forward_chunk
from .sampler import decode_latents, stack_branches, start_noise

__all__ = ["check_mode", "generate_images_patch_ar", "patch_ar_loop"]


def _progress_cb(done, total):
    progress.tick("patches", int(done), int(total))


def check_mode(cfg, group: Optional[int], n_tokens: int) -> int:
    """The group size to sample with (``group`` or the model's default) after checking that the model
    was trained in patch-AR mode and that the group divides the image's ``n_tokens`` latent tokens; a
    :class:`ValueError` naming the problem otherwise."""
    if cfg.image_mode != "patch_ar":
        raise ValueError(f"this model was trained in image mode {cfg.image_mode!r}, not 'patch_ar' "
                         "(its bagel_config.json has no image_mode: patch_ar)")
    k = int(cfg.patch_ar_groups[0] if group is None else group)
    if k < 1 or n_tokens % k:
        raise ValueError(f"patch-AR group size {k} must be >= 1 and divide the image's {n_tokens} latent tokens")
    return k


def _marker(model: Bagel, params, cache: KVCache, token, rope):
    """Append one causal und token (a marker id ``token``) at ``rope [R]`` to every row of ``cache``."""
    R = rope.shape[0]
    x = model.apply({"params": params}, jnp.full((R, 1), token, jnp.int32), method=Bagel.embed_text)
    h, cache, _ = forward_chunk(model, params, cache, x, rope[:, None], jnp.ones((R,), jnp.int32), True,
                                Routing.und(), True)
    return h, cache


def _latents(model: Bagel, params, cache: KVCache, x, t, pos, rope, update: bool):
    """Latent tokens ``x [R, k, C]`` at flow time ``t`` (scalar) with latent positions ``pos [k]`` as one
    full-attention gen-expert chunk at ``rope [R]``: ``(h [R, k, D], cache)`` (written when ``update``)."""
    R, k, _ = x.shape
    emb = model.apply({"params": params}, x, jnp.full((R, k), t, jnp.float32), jnp.broadcast_to(pos, (R, k)),
                      method=Bagel.embed_latents)
    h, cache, _ = forward_chunk(model, params, cache, emb, jnp.broadcast_to(rope[:, None], (R, k)),
                                jnp.full((R,), k, jnp.int32), False, Routing.gen(), update)
    return h, cache


@functools.partial(jax.jit, static_argnames=("model", "vae", "hw", "group", "plan", "progress", "decode"))
def patch_ar_loop(model: Bagel, params, vae, vae_params, cache: KVCache, rope, x0, sigmas, markers, text_scale,
                  img_scale, interval, renorm_min, *, hw: tuple, group: int, plan: CfgPlan, progress: bool = False,
                  decode: bool = True):
    """The compiled patch-AR sampler.

    Args (as :func:`bagel_jax.inference.sampler.flow_loop`): cache ``[layers, plan.n_rows*B, cap, K, dh]``
    the plan's branches stacked (room for ``2 + N`` more slots per row), rope ``[plan.n_rows*B]``, x0
    ``[B, N, p*p*C]`` initial noise (group ``g`` starts from its tokens ``g*k .. g*k+k-1``), sigmas
    ``[num_timesteps]``, markers ``[2]`` (``<|vision_start|>``, ``<|vision_end|>``).
    Returns dict: ``latent_tokens [B, N, p*p*C]``, ``cache`` (the gen rows after ``<|vision_end|>``),
    ``next_logits [B, vocab]`` (the prediction after ``<|vision_end|>``), and with ``decode`` ``image``
    ``[B, H, W, 3]`` uint8, ``decoded``, ``latent``.
    """
    cfg = model.cfg
    B, N, _ = x0.shape
    H, W = hw
    h, w = H // cfg.latent_downsample, W // cfg.latent_downsample
    G, n = N // group, plan.n_rows
    pos_all = latent_grid(h, w, cfg.max_latent_size)                        # [N]
    steps = sigmas.shape[0] - 1
    _, cache = _marker(model, params, cache, markers[0], rope)

    guidance = Guidance(text_scale, img_scale, interval, renorm_min)

    def group_body(cache, g):
        xg = jax.lax.dynamic_slice_in_dim(x0, g * group, group, axis=1).astype(jnp.float32)   # [B, k, C]
        pos = jax.lax.dynamic_slice_in_dim(pos_all, g * group, group)

        def step(x, s):
            t = sigmas[s]

            def velocity(rows: int):      # the first ``rows`` row blocks (gen first) -> [rows, B, k, C]
                c = cache if rows == n else KVCache(cache.k[:, :rows * B], cache.v[:, :rows * B],
                                                    cache.length[:rows * B])
                hid, _ = _latents(model, params, c, jnp.tile(x, (rows, 1, 1)), t, pos, rope[:rows * B], False)
                v = model.apply({"params": params}, hid, method=Bagel.velocity).astype(jnp.float32)
                return v.reshape(rows, B, group, -1)

            return x - plan.step(velocity, t, guidance) * (sigmas[s] - sigmas[s + 1]), None

        x, _ = jax.lax.scan(step, xg, jnp.arange(steps))
        _, cache = _latents(model, params, cache, jnp.tile(x, (n, 1, 1)), 0.0, pos, rope, True)
        if progress:
            jax.debug.callback(_progress_cb, (g + 1) * group, N)
        return cache, x

    cache, xs = jax.lax.scan(group_body, cache, jnp.arange(G))             # xs [G, B, k, C]
    x = jnp.moveaxis(xs, 0, 1).reshape(B, N, -1)
    hid, cache = _marker(model, params, cache, markers[1], rope)
    out = dict(latent_tokens=x, cache=KVCache(cache.k[:, :B], cache.v[:, :B], cache.length[:B]),
               next_logits=model.apply({"params": params}, hid[:B, 0], method=Bagel.lm_logits).astype(jnp.float32))
    if decode:
        out.update(decode_latents(cfg, vae, vae_params, x, h, w))
    return out


@on_mesh
def generate_images_patch_ar(ctx: Context, hw, params: Optional[ImageParams] = None, group: Optional[int] = None,
                             keys: Optional[Sequence] = None, noise: Optional[np.ndarray] = None,
                             progress: bool = False, decode: bool = True) -> dict:
    """Sample one image per row of ``ctx`` patch by patch (group ``k`` = ``group``, default the model's
    first ``patch_ar_groups``). Arguments and the noise draw as
    :func:`bagel_jax.inference.sampler.generate_images` (the same keys give the same initial noise);
    ``params.step_cache`` must be "none". Returns the dict of :func:`patch_ar_loop` (numpy arrays; ``cache``
    stays on the device) plus ``sigmas``, ``plan``, ``group`` and ``n_branches``."""
    params = (ImageParams() if params is None else params).validate()
    if params.step_cache != "none":
        raise ValueError(f"step_cache {params.step_cache!r} is not available in patch-AR mode")
    eng = ctx.engine
    H, W = eng.check_output_size(hw)
    cfg = eng.cfg
    N = layout.latent_tokens(H, W, cfg.latent_downsample)
    k = check_mode(cfg, group, N)
    B = ctx.batch
    ctx.check_room(layout.patch_ar_block_len(N), "patch-AR image generation")
    x0 = start_noise(B, N, cfg.patch_latent_dim, keys, noise)
    sig = shifted_schedule(int(params.num_timesteps), float(params.timestep_shift))
    plan, branches = make_plan(params, ctx.branches)
    extra = 2 + N                      # the markers and the clean groups are written; the noisy copies never
    cache, rope = stack_branches([b.reserve(eng, extra) for b in branches])
    if int(np.max(np.concatenate([b.length for b in branches]))) + extra > cache.capacity:
        raise ContextError("patch-AR image generation: no room in the KV cache")
    out = patch_ar_loop(eng.model, eng.params, eng.vae, eng.vae_params, cache, jnp.asarray(rope, jnp.int32), x0, sig,
                        eng.markers, jnp.float32(params.cfg_text_scale), jnp.float32(params.cfg_img_scale),
                        jnp.asarray(params.cfg_interval, jnp.float32), jnp.float32(params.cfg_renorm_min),
                        hw=(H, W), group=k, plan=plan, progress=progress, decode=decode)
    cache_out = out.pop("cache")
    out = jax.device_get(out)
    out.update(cache=cache_out, sigmas=np.asarray(sig), plan=plan, group=k, n_branches=plan.n_rows)
    return out

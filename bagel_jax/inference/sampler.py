"""Flow-matching image sampler: one ``lax.scan`` over timesteps, then unpatchify, VAE decode and the
official uint8 conversion, all in one jit (docs/architecture.md#flow-sampling).

Which branches run and how they combine is the :class:`~bagel_jax.inference.cfg.CfgPlan` of the call
(:func:`~bagel_jax.inference.cfg.make_plan`): its distinct branches are stacked on the batch axis (one
block of ``B`` rows each), so a step is one velocity call; branches that are the same object in the
context are computed once (plain text-to-image: ``cfg_img is gen``, 2 blocks instead of 3).

Steps outside ``cfg_interval`` (``lo < sigma <= hi`` on the shifted sigma) use only the conditional
velocity. With ``cfg_off="cond"`` (default) the step chooses, with ``lax.cond``, between the stacked
call and a call on the ``gen`` rows only, so CFG-off steps cost one branch; ``cfg_off="where"``
always runs all branches and selects with ``jnp.where`` (kept for measurements).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from .. import layout
from ..models import flux_vae
from ..models.bagel import Bagel, unpatchify_latents
from . import blocks, progress, streaming, taylorseer
from .cfg import CfgPlan, Guidance, ImageParams, make_plan, shifted_schedule
from .context import Branch, Context
from .engine import on_mesh
from .kv_cache import KVCache

__all__ = ["ImageParams", "flow_loop", "generate_images", "initial_noise", "stack_branches"]


def _progress_cb(step, total):
    progress.tick("steps", int(step), int(total))


def _stop_cb(token, _after):
    return streaming.stop_requested(token)     # looked up per call: one compiled loop serves every stream


def _stop_requested(token, after: jax.Array) -> jax.Array:
    """Whether the streamed call of sink ``token`` was cancelled, asked from inside the compiled loop once
    ``after`` is computed (one element of it is passed along: without a data dependency XLA may run the
    unordered callback early, e.g. the check before the decode ahead of the whole loop)."""
    return io_callback(_stop_cb, jax.ShapeDtypeStruct((), jnp.bool_), token, after.reshape(-1)[:1], ordered=False)


def _stoppable(body, token):
    """A scan body that first asks :func:`_stop_requested` and, once cancelled, leaves the carry as it is
    (the remaining steps cost a host check each). Needs a body that emits nothing per step (no ``record``)."""
    def wrapped(carry, k):
        x = carry[0] if isinstance(carry, tuple) else carry
        return jax.lax.cond(_stop_requested(token, x), lambda: (carry, None), lambda: body(carry, k))
    return wrapped


def _first_rows(cache: KVCache, r: int) -> KVCache:
    """The first ``r`` rows of a stacked cache (the leading row blocks, e.g. ``gen``'s)."""
    return KVCache(cache.k[:, :r], cache.v[:, :r], cache.length[:r])


@functools.partial(jax.jit, static_argnames=("model", "vae", "hw", "plan", "cfg_off", "record", "progress",
                                             "decode", "step_cache"))
def flow_loop(model: Bagel, params, vae, vae_params, cache: KVCache, rope, x0, sigmas, markers,
             text_scale, img_scale, interval, renorm_min, stop_token=None, *, hw: tuple, plan: CfgPlan,
             cfg_off: str = "cond", record: bool = False, progress: bool = False, decode: bool = True,
             step_cache: Optional[taylorseer.TaylorSeer] = None):
    """The compiled sampler. With ``step_cache`` (a :class:`~bagel_jax.inference.taylorseer.TaylorSeer`)
    each branch keeps its TaylorSeer state in the scan carry (``cfg_off`` does not apply: every step
    runs the decoder on exactly the branches that need a full step).

    ``stop_token`` (an int32 scalar, or None): the :class:`~bagel_jax.inference.streaming.Sink` number of a
    streamed call; before every step the loop asks the host whether that call was cancelled and, once it
    was, skips the remaining steps and the VAE decode (the outputs are then meaningless; the caller raises
    :class:`~bagel_jax.inference.streaming.Cancelled`). Not with ``record``.

    Args:
      cache: the plan's distinct branches stacked on the batch axis, ``[layers, plan.n_rows*B, cap, K, dh]``;
        rope ``[plan.n_rows*B]`` query positions; x0 ``[B, N, p*p*C]`` initial noise (float32);
      sigmas ``[num_timesteps]`` shifted schedule; text_scale / img_scale / renorm_min scalars;
      interval ``[2]`` (lo, hi).
    Returns dict: ``latent_tokens [B, N, p*p*C]``, ``image [B, H, W, 3]`` uint8 and ``decoded`` float
    ``[B, H, W, 3]`` (if ``decode``), and with ``record`` the per-step ``x_t``, ``v`` ``[steps, B, N, C]``
    (with ``step_cache`` also ``branch``: per step, whether CFG was ``active``, and per row block ``full``
    (1 full, 0 Taylor, -1 not run),
    ``step``, ``n_valid``, ``final_hidden``, ``v`` and, with ``all_layers``, ``layer_out``).
    """
    cfg = model.cfg
    B, N, _ = x0.shape
    H, W = hw
    ds = cfg.latent_downsample
    h, w = H // ds, W // ds
    lat_pos = jnp.broadcast_to(blocks.latent_grid(h, w, cfg.max_latent_size)[None], (B, N))
    steps = sigmas.shape[0] - 1
    g = Guidance(text_scale, img_scale, interval, renorm_min)

    def body(x, k):
        t = sigmas[k]
        dt = sigmas[k] - sigmas[k + 1]

        def velocity(rows: int):      # the first ``rows`` row blocks (gen first) -> [rows, B, N, C]
            c = cache if rows == plan.n_rows else _first_rows(cache, rows * B)
            v = blocks.velocity(model, params, c, jnp.tile(x, (rows, 1, 1)), t, jnp.tile(lat_pos, (rows, 1)),
                                     rope[:rows * B], markers)[0]
            return v.reshape(rows, B, N, -1)

        v = plan.step(velocity, t, g, cfg_off)
        x_new = x - v * dt
        if progress:
            jax.debug.callback(_progress_cb, k + 1, steps)
        return x_new, ((x, v) if record else None)

    if stop_token is not None and record:
        raise ValueError("a stoppable sampling call (stop_token) cannot record its steps")
    guard = (lambda b: b) if stop_token is None else (lambda b: _stoppable(b, stop_token))
    if step_cache is None:
        x, ys = jax.lax.scan(guard(body), x0.astype(jnp.float32), jnp.arange(steps))
    else:
        cached = _taylor_body(model, params, cache, rope, sigmas, markers, lat_pos, g, plan, step_cache, record,
                              progress)
        n, Lq, D = plan.n_rows, layout.block_len(N), model.cfg.llm.hidden_size
        feat = ((model.cfg.llm.num_hidden_layers,) if step_cache.all_layers else ()) + (B, Lq, D)
        st0 = taylorseer.init(step_cache, n, feat, model.opts.dtype)
        (x, _), ys = jax.lax.scan(guard(cached), (x0.astype(jnp.float32), st0), jnp.arange(steps))
    out = dict(latent_tokens=x)
    if record:
        out["x_t"], out["v"] = ys[:2]
        if step_cache is not None:
            out["branch"] = ys[2]
    if decode:
        dec = lambda: decode_latents(cfg, vae, vae_params, x, h, w)
        if stop_token is None:
            out.update(dec())
        else:                          # a cancelled call skips the decode too (zeros, never handed on)
            zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(dec))
            out.update(jax.lax.cond(_stop_requested(stop_token, x), lambda: zeros, dec))
    return out


def decode_latents(cfg, vae, vae_params, x, h: int, w: int) -> dict:
    """Latent tokens ``x [B, h*w, p*p*C]`` -> ``latent`` ``[B, p*h, p*w, C]``, ``decoded`` ``[B, H, W, 3]`` and the
    official uint8 ``image`` (inside the caller's jit)."""
    p, C = cfg.latent_patch_size, cfg.vae.z_channels
    z = unpatchify_latents(x, h, w, p, C)                                        # [B, 2h, 2w, C]
    img = vae.apply({"params": vae_params}, z, method=flux_vae.AutoEncoder.decode)  # [B, H, W, 3]
    return dict(latent=z, decoded=img,
                image=(jnp.clip(img.astype(jnp.float32) * 0.5 + 0.5, 0.0, 1.0) * 255.0).astype(jnp.uint8))


def _taylor_body(model: Bagel, params, cache: KVCache, rope, sigmas, markers, lat_pos, g: Guidance, plan: CfgPlan,
                 ts: taylorseer.TaylorSeer, record: bool, progress: bool):
    """The scan body of TaylorSeer sampling: carry ``(x, State)``. Branch 0 (``gen``) runs every step, the
    guidance branches on the steps inside ``cfg_interval``; the decoder runs on the gen rows alone or on
    every row block, whichever covers the branches due a full step, or not at all."""
    n = plan.n_rows
    B, N = lat_pos.shape
    steps = sigmas.shape[0] - 1

    def features(rows: int, x, t, pred):
        """Decoder outputs of the first ``rows`` row blocks, the predictions for the others: ``[n, *feature]``."""
        c = cache if rows == n else _first_rows(cache, rows * B)
        f, inter = blocks.flow_features(model, params, c, jnp.tile(x, (rows, 1, 1)), t, jnp.tile(lat_pos, (rows, 1)),
                                        rope[:rows * B], markers, collect=ts.all_layers)
        if ts.all_layers:    # hidden [L, rows*B, Lq, D] -> [rows, L, B, Lq, D]
            hid = inter["hidden"]
            f = jnp.moveaxis(hid.reshape((hid.shape[0], rows, B) + hid.shape[2:]), 1, 0)
        else:
            f = f.reshape((rows, B) + f.shape[1:])
        return f if rows == n else jnp.concatenate([f, pred[rows:]], axis=0)

    def body(carry, k):
        x, st = carry
        t = sigmas[k]
        active = plan.active(t, g)
        runs = (jnp.arange(n) == 0) | active
        full = taylorseer.is_full(ts, st) & runs
        pred = taylorseer.predict(ts, st)
        if n == 1:
            f = jax.lax.cond(full[0], lambda: features(1, x, t, pred), lambda: pred)
        else:
            which = jnp.where(full[1:].any(), 2, jnp.where(full[0], 1, 0))
            f = jax.lax.switch(which, [lambda: pred, lambda: features(1, x, t, pred), lambda: features(n, x, t, pred)])
        f = jnp.where(full.reshape((n,) + (1,) * (f.ndim - 1)), f, pred)
        last = f[:, -1] if ts.all_layers else f                                   # [n, B, Lq, D]
        vs, h = blocks.flow_head(model, params, last.reshape((n * B,) + last.shape[2:]))
        vs = vs.reshape(n, B, N, -1)
        v = plan.guide(vs, t, g)
        new = taylorseer.advance(ts, st, runs, full, f)
        if progress:
            jax.debug.callback(_progress_cb, k + 1, steps)
        rec = None
        if record:
            rec = dict(active=active, full=jnp.where(runs, full.astype(jnp.int32), -1),
                       step=jnp.where(runs, st.step, -1), n_valid=jnp.where(runs, new.n_valid, -1),
                       final_hidden=h.reshape((n, B) + h.shape[1:]), v=vs)
            if ts.all_layers:
                rec["layer_out"] = f
        return (x - v * (sigmas[k] - sigmas[k + 1]), new), ((x, v, rec) if record else None)

    return body


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


def start_noise(B: int, N: int, dim: int, keys: Optional[Sequence] = None, noise=None) -> jax.Array:
    """The initial noise ``[B, N, dim]`` of a sampling call: ``noise`` (checked) or one draw per row key
    (default ``PRNGKey(i)`` for row i)."""
    if noise is not None:
        x0 = jnp.asarray(noise, jnp.float32)
        if x0.shape != (B, N, dim):
            raise ValueError(f"noise must have shape {(B, N, dim)}, got {x0.shape}")
        return x0
    keys = [jax.random.PRNGKey(i) for i in range(B)] if keys is None else list(keys)
    if len(keys) != B:
        raise ValueError(f"got {len(keys)} keys for a batch of {B}")
    return initial_noise(keys, N, dim)


@on_mesh
def generate_images(ctx: Context, hw, params: Optional[ImageParams] = None, keys: Optional[Sequence] = None,
                    noise: Optional[np.ndarray] = None, record: bool = False, progress: bool = False,
                    cfg_off: str = "cond", decode: bool = True,
                    taylorseer_rule: Optional[taylorseer.TaylorSeer] = None) -> dict:
    """Sample one image per row of ``ctx`` (all rows the same size ``hw = (H, W)``).

    Args:
      params: sampling hyperparameters and CFG mode (default ``ImageParams()``);
        keys: one PRNG key per row for the initial noise (default ``PRNGKey(i)`` for row i);
        noise: ``[B, N, p*p*C]`` injected initial noise (overrides keys; for parity tests);
        taylorseer_rule: the TaylorSeer parameters when ``params.step_cache == "taylorseer"`` (default
        :class:`~bagel_jax.inference.taylorseer.TaylorSeer`, the official values).
    Returns the dict of :func:`flow_loop` as numpy arrays plus ``sigmas``, ``plan`` (the
    :class:`~bagel_jax.inference.cfg.CfgPlan` followed) and ``n_branches`` (its distinct branches).
    """
    params = (ImageParams() if params is None else params).validate()
    eng = ctx.engine
    H, W = eng.check_output_size(hw)
    cfg = eng.cfg
    N = layout.latent_tokens(H, W, cfg.latent_downsample)
    B = ctx.batch
    ctx.check_room(layout.vae_block(H, W, cfg.latent_downsample, noised=True).length, "image generation")
    x0 = start_noise(B, N, cfg.patch_latent_dim, keys, noise)
    sig = shifted_schedule(int(params.num_timesteps), float(params.timestep_shift))
    ts = None
    if params.step_cache == "taylorseer":
        ts = taylorseer_rule or taylorseer.TaylorSeer()
    # with TaylorSeer a guidance branch equal to gen is computed once only if it runs from step 0 on (then
    # both keep the same state on every step it runs: the CFG steps are one run of steps from the start)
    lo, hi = params.cfg_interval
    plan, branches = make_plan(params, ctx.branches, dedup=ts is None or bool(lo < float(sig[0]) <= hi))
    # the query chunk is never written, but forward_chunk concatenates [cache ; chunk]: no room needed
    cache, rope = stack_branches(branches)
    sink = None if record else streaming.active()     # a streamed call: stoppable between flow steps
    token = None if sink is None else jnp.int32(sink.token)
    out = flow_loop(eng.model, eng.params, eng.vae, eng.vae_params, cache, jnp.asarray(rope, jnp.int32), x0, sig,
                    eng.markers, jnp.float32(params.cfg_text_scale), jnp.float32(params.cfg_img_scale),
                    jnp.asarray(params.cfg_interval, jnp.float32), jnp.float32(params.cfg_renorm_min), token,
                    hw=(H, W), plan=plan, cfg_off=cfg_off, record=record, progress=progress, decode=decode,
                    step_cache=ts)
    out = jax.device_get(out)
    if sink is not None:
        sink.check()     # cancelled during sampling: the outputs are incomplete, never handed on
    out["sigmas"] = np.asarray(sig)
    out["n_branches"] = plan.n_rows
    out["plan"] = plan
    return out

"""Train state and the jitted, sharded train step.

State (a plain dict pytree, so orbax saves it as is)::

    step       int32 []            optimiser steps done
    params     fp32 master weights (the whole Bagel params tree; frozen leaves never change)
    opt_state  optax state (moments only for trainable leaves)
    ema        fp32 EMA of the params (only trainable leaves move)
    rng        uint32 [2]          base key; step ``s`` uses ``fold_in(rng, s)``

A step consumes a batch with arrays ``[accum, packs, ...]`` (one packed row per pack). Each pack goes
through :func:`bagel_jax.train.forward.train_forward` (the code path the parity verifier checks) under
``jax.vmap``; losses are re-normalised by the *global* token counts of the micro-batch (official
normalisation, docs/architecture.md#training-losses), micro-batches are accumulated with ``lax.scan`` (loss / accum; a single micro-batch runs without the loop).
The noise of pack ``g`` of micro-batch ``a`` comes from ``fold_in(fold_in(fold_in(rng, step), a), g)``,
so results do not depend on the device layout.

Batches come in the expert-stream layout (:func:`bagel_jax.data.packing.to_expert_streams`): the split
``(und_tokens, gen_tokens)`` shared by every pack of the step is a static argument of the step (one
compiled program per batch shapes and split; the loader draws splits from a small grid, see
``bagel_jax/data/loader.py``). The loader ships it as the array ``expert_split`` ``[accum, packs, 2]``;
:func:`batch_expert_split` reads it on the host.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import runtime, sharding as shd
from ..data import packing
from ..nn import layer_loop as layer_loop_lib
from ..nn.lora import DROPOUT_RNG
from .forward import draw_noise, train_forward
from .optimizer import TrainConfig, ema_update, freeze


def make_state(params, optimizer: optax.GradientTransformation, seed: int):
    """The initial train state (call under ``jax.jit`` with ``out_shardings``)."""
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)
    return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                ema=jax.tree_util.tree_map(lambda x: x * 1.0, params),
                rng=jax.random.PRNGKey(seed))


def abstract_state(param_shapes, optimizer, seed: int):
    return jax.eval_shape(lambda p: make_state(p, optimizer, seed), param_shapes)


def state_shardings(abstract, mesh):
    sh = shd.tree_shardings(abstract, mesh)
    sh["step"] = shd.replicated(mesh)
    sh["rng"] = shd.replicated(mesh)
    return sh


def init_state(params, optimizer, seed: int, mesh, layer_loop: str = "auto"):
    """Build the sharded initial state from (possibly sharded) params; returns ``(state, shardings)``.

    ``layer_loop``: the layout of the layer stacks in the state. ``"scan"``: stacked (``.../layers/...``,
    leaves ``[n_layers, ...]``; the trainer's checkpoints use it on every mesh). ``"unrolled"``: one array per
    layer (``.../layers_0/...``), which the step's unrolled layer loop reads where it lies: on the 2-core CPU
    the perf harness's step ran 1.04-1.17x faster than one that slices a stacked state every step, and its
    XLA temporaries shrink from 773 to 581 MB (docs/train_performance.md, fifth round). ``"auto"``:
    ``"unrolled"`` on one CPU device (as :func:`bagel_jax.nn.layer_loop.resolve`, the layout ``bagel_jax.load``
    gives there), else ``"scan"``. ``params`` may come in either layout. The optimiser of
    :func:`bagel_jax.train.optimizer.make_optimizer` and :func:`make_train_step` follow the layout of the state
    they are given; an optimiser of your own must accept it (masks or labels as callables through
    :func:`bagel_jax.nn.layer_loop.like`), else a ValueError says so."""
    want = layer_loop_lib.resolve(layer_loop, mesh)
    have = layer_loop_lib.layout_of(params)
    given = params
    if have == "scan" and want == "unrolled":
        params = layer_loop_lib.unstack(params)
    elif have == "unrolled" and want == "scan":
        params = layer_loop_lib.stack(params)
    f32 = lambda tree: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), tree)
    try:
        abstract = abstract_state(f32(params), optimizer, seed)
    except (ValueError, TypeError) as e:
        if want != "unrolled" or have != "scan":
            raise
        try:   # the layout's fault only if the optimiser accepts the stacked params it was given
            abstract_state(f32(given), optimizer, seed)
        except (ValueError, TypeError):
            raise e from None
        raise ValueError(f"the optimiser does not accept the per-layer layout of the train state (layer_loop="
                         f"{layer_loop!r} on one CPU device splits the stacked 'layers' params into 'layers_0' ..): "
                         "give a mask or labels tree as a callable through bagel_jax.nn.layer_loop.like (as "
                         "make_optimizer does), or pass layer_loop='scan' to keep the stacked layout") from e
    sh = state_shardings(abstract, mesh)
    params = jax.device_put(params, sh["params"])
    return jax.jit(lambda p: make_state(p, optimizer, seed), out_shardings=sh)(params), sh


def special_weights_by_id(tc: TrainConfig, tokenizer) -> dict[int, float]:
    out = {}
    for tok, w in (tc.special_token_weights or {}).items():
        ids = tokenizer.hf.convert_tokens_to_ids(tok) if tokenizer is not None else None
        if ids is None or (tokenizer is not None and ids == tokenizer.hf.unk_token_id and tokenizer.hf.unk_token_id is not None):
            raise ValueError(f"train.special_token_weights: unknown token {tok!r}")
        out[int(ids)] = float(w)
    return out


@jax.custom_vjp
def unstack_layers(params):
    """:func:`bagel_jax.nn.layer_loop.unstack` (stacked ``layers`` subtrees -> ``layers_0 ..``) whose
    gradient is one ``stack`` of the per-layer cotangents (differentiating the slices instead would add
    one zero-padded full-size array per layer)."""
    return layer_loop_lib.unstack(params)


def _unstack_fwd(params):
    return layer_loop_lib.unstack(params), None


def _unstack_bwd(_, ct):
    return (layer_loop_lib.stack(ct),)


unstack_layers.defvjp(_unstack_fwd, _unstack_bwd)


def resolve_layer_loop(tc: TrainConfig, param_shardings=None) -> str:
    """The layer loop the step runs: ``tc.layer_loop``, with "auto" resolved by
    :func:`bagel_jax.nn.layer_loop.resolve` on the mesh of ``param_shardings`` (None: one device)."""
    mesh = None
    if param_shardings is not None:
        leaves = jax.tree_util.tree_leaves(param_shardings)
        mesh = getattr(leaves[0], "mesh", None) if leaves else None
    return layer_loop_lib.resolve(tc.layer_loop, mesh)


def make_loss_fn(model, vae, tc: TrainConfig, mask, special_weights: Mapping[int, float], loop: str = "scan"):
    """The loss of one micro-batch. ``loop``: "unrolled" runs ``model``'s layer stacks as a Python loop over
    per-layer arrays: those of a per-layer state as they are, or sliced from a stacked state inside the step
    (:func:`unstack_layers`; the params and their gradients then stay stacked)."""
    cfg = model.cfg
    if loop == "unrolled" and model.opts.layer_loop == "scan":
        model = model.clone(opts=dataclasses.replace(model.opts, layer_loop="unrolled"))
    runs = model.opts.layer_loop            # how the model that runs reads its layer params

    def loss_fn(params, vae_params, micro, key, expert_split=None):
        p = freeze(params, mask)
        layout = layer_loop_lib.layout_of(p)
        if layout == "unrolled" and runs == "scan":
            raise ValueError(f"the train state holds its layer stacks per layer (init_state(layer_loop='auto') on "
                             f"one CPU device) but the step runs them as {loop!r}: build the state with "
                             f"init_state(..., layer_loop={loop!r}) or set train.layer_loop to 'unrolled'")
        if layout == "scan" and runs == "unrolled":
            p = unstack_layers(p)
        G = micro["token_ids"].shape[0]
        keys = jax.vmap(lambda g: jax.random.fold_in(key, g))(jnp.arange(G))

        def one(b, k):
            noise = draw_noise(k, b, cfg)
            tw = None
            if special_weights:   # only the special-token labels (packing's ce_special; docs/architecture.md#training-losses
                tw = jnp.ones(b["ce_label"].shape, jnp.float32)
                special = b["ce_special"] > 0 if "ce_special" in b else jnp.zeros(b["ce_label"].shape, bool)
                for tid, w in special_weights.items():
                    tw = jnp.where(special & (b["ce_label"] == tid), w, tw)
            _, aux = train_forward(model, p, vae, vae_params, b, noise, ce_weight=tc.ce_weight,
                                   mse_weight=tc.mse_weight, ce_loss_reweighting=tc.ce_loss_reweighting,
                                   token_loss_weights=tw, expert_split=expert_split,
                                   ce_chunk_tokens=tc.ce_chunk_tokens,
                                   rngs={DROPOUT_RNG: jax.random.fold_in(k, 1)} if model.opts.lora_dropout else None)
            den_ce = (b["ce_valid"] * b["ce_reweight"]).sum() if tc.ce_loss_reweighting else b["ce_valid"].sum()
            return (aux["ce"] * jnp.maximum(den_ce, 1.0), den_ce, aux["mse"] * jnp.maximum(aux["n_mse"], 1.0),
                    aux["n_mse"], b["ce_valid"].sum())

        if G == 1:   # one pack: no vmap, whose size-1 axis makes XLA:CPU transpose weight gradients' operands
            num_ce, den_ce, num_mse, den_mse, n_ce = (x[None] for x in one(
                jax.tree_util.tree_map(lambda x: x[0], micro), keys[0]))
        else:
            num_ce, den_ce, num_mse, den_mse, n_ce = jax.vmap(one)(micro, keys)
        ce = num_ce.sum() / jnp.maximum(den_ce.sum(), 1.0)
        mse = num_mse.sum() / jnp.maximum(den_mse.sum(), 1.0)
        loss = tc.ce_weight * ce + tc.mse_weight * mse
        return loss, dict(loss=loss, ce=ce, mse=mse, n_ce=n_ce.sum(), n_mse=den_mse.sum())

    return loss_fn


def make_train_step(model, vae, tc: TrainConfig, mask, optimizer, schedule, special_weights=None,
                    param_shardings=None, loss_fn=None):
    """``step(state, batch, vae_params, expert_split=None) -> (state, metrics)`` (pure; jit it with
    :func:`jit_train_step`). ``expert_split`` (static ``(und_tokens, gen_tokens)``): the batch's
    expert-stream layout; None = a logical-order batch run with ``Routing.select`` (test oracle only).
    The layer stacks run as ``tc.layer_loop`` says (:func:`resolve_layer_loop`; "auto" on the mesh of
    ``param_shardings``). ``loss_fn``: instead of :func:`make_loss_fn`'s (LoRA: ``bagel_jax/train/lora.py``)."""
    loss_fn = loss_fn or make_loss_fn(model, vae, tc, mask, special_weights or {}, resolve_layer_loop(tc, param_shardings))
    optimizer = optax.with_extra_args_support(optimizer)     # its update is given ``grad_norm=`` (a plain one ignores it)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, batch, vae_params, expert_split=None):
        A = batch["token_ids"].shape[0]
        key = jax.random.fold_in(state["rng"], state["step"])
        params = state["params"]

        def micro(acc, xs):
            mb, i = xs
            (_, aux), g = grad_fn(params, vae_params, mb, jax.random.fold_in(key, i), expert_split)
            acc = jax.tree_util.tree_map(lambda a, b: a + b / A, acc, g)
            if param_shardings is not None:
                acc = jax.lax.with_sharding_constraint(acc, param_shardings)
            return acc, aux

        if A == 1:
            # one micro-batch: no loop. Under a while loop XLA copies every (donated) parameter array
            # before the loop, a full pass over the params each step (65 copies on the perf model)
            (_, aux), grads = grad_fn(params, vae_params, jax.tree_util.tree_map(lambda x: x[0], batch),
                                      jax.random.fold_in(key, 0), expert_split)
            if param_shardings is not None:
                grads = jax.lax.with_sharding_constraint(grads, param_shardings)
            auxs = jax.tree_util.tree_map(lambda x: x[None], aux)
        else:
            zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
            grads, auxs = jax.lax.scan(micro, zeros, (batch, jnp.arange(A)))
        gnorm = optax.global_norm(grads)
        loss = auxs["loss"].mean()
        old = (params, state["opt_state"], state["ema"])

        def update(p, o, e):
            updates, o = optimizer.update(grads, o, p, grad_norm=gnorm)
            # the new params exist once, before the EMA reads them: otherwise XLA recomputes ``params +
            # updates`` inside the EMA's fusion, the old params are read after their (donated) buffer is
            # overwritten, and XLA copies every parameter array first (a full extra pass over the params)
            p = jax.lax.optimization_barrier(optax.apply_updates(p, updates))
            return p, o, ema_update(e, p, mask, tc.ema_decay), updates

        # a non-finite step never reaches the weights: params, optimiser state and EMA stay as they were
        # (the loop then stops or skips, train.on_nonfinite); only the step counter moves on
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        if tc.eps > 0:
            # with eps > 0, finite gradients and a finite state give finite AdamW updates, so the decision is
            # known before the update and the update runs (or not) as one pass over the state: checking the
            # updates' norm as well, or selecting per array, splits it into several passes over params,
            # moments and EMA (a tenth of the step on the 2-core CPU, docs/train_performance.md)
            new_params, opt_state, ema = jax.lax.cond(finite, lambda *s: update(*s)[:3], lambda *s: s, *old)
        else:   # eps = 0: a zero second moment gives 0 / 0, so the updates are checked too
            *new, updates = update(*old)
            finite = finite & jnp.isfinite(optax.global_norm(updates))
            new_params, opt_state, ema = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), tuple(new), old)
        metrics = dict(loss=loss, loss_ce=auxs["ce"].mean(), loss_mse=auxs["mse"].mean(),
                       grad_norm=gnorm, lr=schedule(state["step"]), n_ce=auxs["n_ce"].sum(),
                       n_mse=auxs["n_mse"].sum(), finite=finite)
        new = dict(step=state["step"] + 1, params=new_params, opt_state=opt_state, ema=ema, rng=state["rng"])
        return new, metrics

    return train_step


def batch_expert_split(batch: Mapping[str, Any]) -> Optional[tuple[int, int]]:
    """The static ``(und_tokens, gen_tokens)`` of a host (numpy) batch from the loader (its
    ``expert_split`` array, equal for every pack), or None for a batch without one (logical layout)."""
    if "expert_split" not in batch:
        return None
    s = np.unique(np.asarray(batch["expert_split"]).reshape(-1, 2), axis=0)
    if s.shape[0] != 1:
        raise ValueError(f"the packs of one step have different expert splits {s.tolist()}")
    return int(s[0, 0]), int(s[0, 1])


def streams_from_logical(batch: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], tuple[int, int]]:
    """Lay a logical-order batch (arrays ``[accum, packs, ...]`` of :func:`bagel_jax.data.packing.pack`
    output, no ``expert_split``) out as expert streams on the host: one split for every pack, ``und`` =
    the most und tokens of any pack, ``gen`` = the rest of the row, or the most gen tokens of any pack
    when that is more (then the two windows overlap, :func:`bagel_jax.data.packing.to_expert_streams`).
    Returns ``(batch, (und, gen))`` with an ``expert_split`` array added."""
    host = {k: np.asarray(jax.device_get(v)) for k, v in batch.items()}
    A, G = host["token_ids"].shape[:2]
    L = host["token_ids"].shape[-1]
    fields = [f.name for f in dataclasses.fields(packing.PackedBatch)]
    missing = [f for f in fields if f not in host]
    if missing:
        raise ValueError(f"train step: a batch without expert_split must hold every PackedBatch field; "
                         f"missing {missing}")
    packs = [packing.PackedBatch(**{f: host[f][a, g] for f in fields}) for a in range(A) for g in range(G)]
    counts = [packing.expert_counts(p) for p in packs]
    und = max(int(u.max()) for u, _ in counts)
    gen = max(max(int(g.max()) for _, g in counts), L - und)
    out = [packing.to_expert_streams(p, und, gen)[0].arrays() for p in packs]
    res = {k: np.stack([o[k] for o in out]).reshape((A, G) + out[0][k].shape) for k in fields}
    for k in host:   # extra arrays travel unchanged
        res.setdefault(k, host[k])
    res["expert_split"] = np.tile(np.array([und, gen], np.int32), (A, G, 1))
    return res, (und, gen)


def jit_train_step(step_fn, state_sh, mesh, vae_sh):
    """``jax.jit`` with explicit in/out shardings and the state donated. The returned
    ``call(state, batch, vae_params, expert_split=None)`` compiles one program per (batch shapes,
    ``expert_split``), kept in ``call.cache``.

    The step always runs expert streams. A batch in the logical order of ``packing.pack`` (no
    ``expert_split`` array, no ``expert_split`` argument) is laid out as streams on the host first
    (:func:`streams_from_logical`: a device-to-host copy of the batch per call; the training loader
    delivers stream batches and pays nothing). Activations follow the model's rules on ``mesh``
    (``ModelOptions.activation_rules``; ``seq_parallel`` there splits the residual stream's sequence over
    ``tensor``, which is what fits 36,864-token packs of BAGEL-7B on 8 devices, see docs/performance.md).
    On a CPU mesh the program is compiled with :func:`bagel_jax.runtime.program_compiler_options` (the VAE
    encode's convolutions by XLA's own emitter, no global flag).
    """
    rep = shd.replicated(mesh)

    def batch_sh(b):
        return {k: shd.batch_sharding(mesh, len(v.shape)) for k, v in b.items()}

    cache = {}
    copts = runtime.program_compiler_options(mesh.devices.flat[0].platform)

    def call(state, batch, vae_params, expert_split=None):
        if expert_split is None:
            if "expert_split" in batch:
                expert_split = batch_expert_split({"expert_split": jax.device_get(batch["expert_split"])})
            else:
                host, expert_split = streams_from_logical(batch)
                batch = shd.put_batch(host, mesh)
        # the split is static (part of the program); its array is not an input of the step
        batch = {k: v for k, v in batch.items() if k != "expert_split"}
        key = (tuple(sorted((k, tuple(v.shape)) for k, v in batch.items())), expert_split)
        if key not in cache:
            cache[key] = jax.jit(functools.partial(step_fn, expert_split=expert_split),
                                 in_shardings=(state_sh, batch_sh(batch), vae_sh),
                                 out_shardings=(state_sh, rep), donate_argnums=(0,),
                                 compiler_options=copts)
        with shd.mesh_scope(mesh):  # activations follow the model's activation rules on the mesh
            return cache[key](state, batch, vae_params)

    call.cache = cache
    return call

"""The training driver behind ``train.py`` (command line: :mod:`.cli`; config: :mod:`.run_config`; step
accounting: :mod:`.metrics`): mesh and modules, init or resume, the step loop, checkpoints, export.

Resume rule: if ``WORKDIR/checkpoints`` holds a complete checkpoint, the latest one is restored (params,
EMA, optimiser state, step, rng, data-iterator state) and training continues until ``--steps``; lines of
``metrics.jsonl`` after the restored step are dropped, so the file always describes one run. A checkpoint
that cannot be read is an error, never a silent fresh start. On an exception, SIGTERM or Ctrl-C the
current state is checkpointed before exiting (when the state is still intact).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import signal
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import yaml
from tqdm import tqdm

from .. import sharding as shd
from ..config import BagelConfig
from ..convert import official as conv
from ..data.loader import PackedIterator, Prefetcher, describe_state
from ..inference.api import INFERENCE_DEFAULTS_FILE
from ..loading import build_modules, load_model, vae_param_shapes
from ..models import flux_vae
from ..models.bagel import init_params as bagel_init
from ..models.bagel import param_shapes
from ..tokenizer import load_tokenizer
from . import optimizer as O
from . import step as S
from .init import init_from_components
from .metrics import MetricsWriter, is_main, peak_flops_per_device, step_flops, step_record
from .run_checkpoint import Checkpointer, TrainCheckpointError, export_ema
from .run_config import TrainSetupError, load_train_config

log = logging.getLogger("bagel_jax.train")


# -------------------------------------------------------------------------------------------------
# Init and export
# -------------------------------------------------------------------------------------------------

def _export(ema, cfg, vae_params, out: str, tokenizer, init) -> None:
    """EMA weights as an official folder; a model folder given as ``train.init`` passes on its optional
    ``inference.json`` (image-size defaults of small models, :func:`bagel_jax.inference.api.folder_defaults`)."""
    export_ema(ema, cfg, vae_params, out, tokenizer)
    if isinstance(init, str) and os.path.isfile(os.path.join(init, INFERENCE_DEFAULTS_FILE)):
        shutil.copy(os.path.join(init, INFERENCE_DEFAULTS_FILE), os.path.join(out, INFERENCE_DEFAULTS_FILE))
    print(f"[train] exported EMA weights to {out}", flush=True)


def init_params(tc, cfg, model, vae, param_sh, vae_sh):
    """Initial (params, vae_params, tokenizer_or_None) per ``train.init``."""
    init = tc.init
    if init in (None, "random"):
        # Same keys as loading.random_model, but jitted: each leaf is created directly on its sharding
        # (no host copy of a large model) and the init program lands in the compilation cache.
        k1, k2 = jax.random.split(jax.random.PRNGKey(tc.seed))
        params = jax.jit(lambda k: bagel_init(model, k), out_shardings=param_sh)(k1)
        ds = cfg.vae.downsample
        x = jnp.zeros((1, ds * 2, ds * 2, cfg.vae.in_channels))
        vae_params = jax.jit(lambda k: vae.init(k, x)["params"], out_shardings=vae_sh)(k2)
        return params, vae_params, None
    if isinstance(init, str):
        if not os.path.isdir(init):
            raise TrainSetupError(f"train.init: model folder not found: {init}")
        bm = load_model(init, dtype=jnp.float32, param_dtype=jnp.float32, shardings=param_sh, vae_shardings=vae_sh)
        # timestep_shift only shapes the training-time t distribution: a fine-tune may change it
        if dataclasses.replace(bm.cfg, timestep_shift=cfg.timestep_shift) != cfg:
            raise TrainSetupError(f"train.init: the folder {init} has a different model config than the YAML "
                                  "model: section (use the folder's shapes)")
        return bm.params, bm.vae_params, bm.tokenizer
    if isinstance(init, dict):
        return init_from_components(init, cfg, model, vae, param_sh, vae_sh, tc.seed)
    raise TrainSetupError(f"train.init: expected 'random', a model folder, or {{qwen2:, siglip:, ae:}}, got {init!r}")



# -------------------------------------------------------------------------------------------------
# Setup: config, mesh, modules, optimiser; then a fresh start or the latest checkpoint
# -------------------------------------------------------------------------------------------------

def configure_jax(args: argparse.Namespace) -> None:
    """Persistent compilation cache and multi-host init; must run before the first JAX computation."""
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if args.multihost:
        jax.distributed.initialize()


@dataclasses.dataclass
class RunSetup:
    """Everything a run builds from its config before touching weights or data."""

    raw: dict                 # the YAML after overrides (written to WORKDIR/config.yaml on a fresh start)
    cfg: BagelConfig
    tc: Any                   # TrainConfig
    dc: Any                   # DataConfig
    mesh: Any
    model: Any                # Bagel module (compute dtype, float32 params)
    vae: Any                  # FLUX autoencoder module (frozen)
    shapes: Any               # param ShapeDtypeStructs of ``model``
    mask: Any                 # trainable-leaf mask of ``shapes``
    schedule: Any             # lr schedule
    opt: Any                  # optax optimiser
    abstract: Any             # abstract train state
    ssh: Any                  # train-state shardings
    vshapes: Any              # VAE param shapes
    vsh: Any                  # VAE param shardings


def build_setup(args: argparse.Namespace) -> RunSetup:
    overrides = list(args.overrides)
    if args.save_every is not None:
        overrides.append(f"train.save_every={args.save_every}")
    raw, cfg, tc, dc = load_train_config(args.config, overrides)
    if args.steps is None or args.steps < 0:
        raise TrainSetupError("--steps N (total number of optimiser steps, >= 0) is required")
    mesh = shd.make_mesh(**shd.parse_mesh(args.mesh))
    nshard = shd.num_batch_shards(mesh)
    if dc.packs_per_step % nshard:
        raise TrainSetupError(f"data.packs_per_step={dc.packs_per_step} must be divisible by data*fsdp={nshard}")
    os.makedirs(args.workdir, exist_ok=True)
    model, vae = build_modules(cfg, dtype=O.DTYPES[tc.compute_dtype], param_dtype=jnp.float32,
                               remat_policy=tc.remat_policy, attention_impl=tc.attention_impl)
    shapes = param_shapes(model)
    mask = O.trainable_mask(shapes, tc)
    opt = O.make_optimizer(tc, mask, args.steps)
    abstract = S.abstract_state(shapes, opt, tc.seed)
    vshapes = vae_param_shapes(vae)
    return RunSetup(raw=raw, cfg=cfg, tc=tc, dc=dc, mesh=mesh, model=model, vae=vae, shapes=shapes, mask=mask,
                    schedule=O.lr_schedule(tc, args.steps), opt=opt, abstract=abstract,
                    ssh=S.state_shardings(abstract, mesh), vshapes=vshapes,
                    vsh=shd.tree_shardings(vshapes, mesh))


@dataclasses.dataclass
class RunStart:
    """Where the step loop begins."""

    state: dict               # train state (params, ema, opt_state, step, rng)
    vae_params: Any
    tokenizer: Any
    data_state: Optional[dict]  # data-iterator state of the checkpoint; None on a fresh start
    step: int
    resumed: bool


def start_or_resume(args: argparse.Namespace, su: RunSetup, ckpt: Checkpointer) -> RunStart:
    """A fresh start (``train.init``, frozen VAE written to ``WORKDIR/ae.safetensors``) or the latest
    complete checkpoint; then the tokenizer, checked against the model's vocabulary."""
    cfg, tc = su.cfg, su.tc
    ae_path = os.path.join(args.workdir, "ae.safetensors")
    latest = ckpt.latest()
    tokenizer = None
    if latest is None:
        mpath = os.path.join(args.workdir, "metrics.jsonl")
        if os.path.isfile(mpath) and os.path.getsize(mpath):
            log.warning("%s has metrics but no complete checkpoint: starting from step 0", args.workdir)
        params, vae_params, tokenizer = init_params(tc, cfg, su.model, su.vae, su.ssh["params"], su.vsh)
        if is_main():
            conv.export_params(vae_params, flux_vae.key_map(cfg.vae), ae_path)
        state, _ = S.init_state(params, su.opt, tc.seed, su.mesh)
        del params
        data_state = None
        with open(os.path.join(args.workdir, "config.yaml"), "w") as f:
            yaml.safe_dump(su.raw, f, sort_keys=False)
        start = 0
        print(f"[train] fresh start in {args.workdir} (init: {tc.init})", flush=True)
    else:
        target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                        su.abstract, su.ssh)
        state, data_state = ckpt.restore(latest, target)
        if not os.path.isfile(ae_path):
            raise TrainCheckpointError(f"{ae_path} is missing (the frozen VAE weights of this run)")
        vae_params = conv.load_params(ae_path, flux_vae.key_map(cfg.vae), su.vshapes, dtype=jnp.float32,
                                      shardings=su.vsh)
        start = int(jax.device_get(state["step"]))
        if start != latest:
            raise TrainCheckpointError(f"checkpoint {latest} holds step {start}")
        print(f"[train] resumed from step {start} ({ckpt.directory}/{latest})", flush=True)

    if tokenizer is None:
        tok_dir = tc.init if isinstance(tc.init, str) and os.path.isdir(str(tc.init)) else os.path.join(args.data, "tokenizer")
        tokenizer = load_tokenizer(tok_dir)
    top = max(tokenizer.special.__dict__.values())
    if top >= cfg.llm.vocab_size:
        raise TrainSetupError(f"tokenizer id {top} does not fit the model vocab_size {cfg.llm.vocab_size}")
    return RunStart(state=state, vae_params=vae_params, tokenizer=tokenizer, data_state=data_state, step=start,
                    resumed=latest is not None)


# -------------------------------------------------------------------------------------------------
# Main loop
# -------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    """One invocation of ``train.py``: train from the start (or the latest checkpoint) to ``--steps``."""
    configure_jax(args)
    su = build_setup(args)
    ckpt = Checkpointer(os.path.join(args.workdir, "checkpoints"), keep=su.tc.keep_checkpoints,
                        async_save=not args.sync_save)
    st = start_or_resume(args, su, ckpt)
    metrics = MetricsWriter(args.workdir, st.step)
    if args.steps <= st.step:
        print(f"[train] nothing to do: already at step {st.step} >= --steps {args.steps}", flush=True)
        if args.export:
            _export(st.state["ema"], su.cfg, st.vae_params, args.export, st.tokenizer, su.tc.init)
        ckpt.close()
        metrics.close()
        return dict(step=st.step)
    return train_steps(args, su, st, ckpt, metrics)


def _log_step(args, bar, step: int, m: dict, rec: dict, dstate: dict) -> None:
    bar.update(1)
    bar.set_postfix(ce=f"{m['loss_ce']:.3f}", mse=f"{m['loss_mse']:.3f}", gn=f"{m['grad_norm']:.2f}",
                    lr=f"{m['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}", mfu=f"{rec['mfu']:.1%}")
    if args.log_every and step % args.log_every == 0 and (args.no_progress or not sys.stderr.isatty()):
        print(f"[train] step {step} ce {m['loss_ce']:.4f} mse {m['loss_mse']:.4f} gnorm {m['grad_norm']:.3f} "
              f"lr {m['lr']:.3e} tok/s {rec['tokens_per_s']:.0f} mfu {rec['mfu']:.2%} data[{describe_state(dstate)}]",
              flush=True)


def train_steps(args: argparse.Namespace, su: RunSetup, st: RunStart, ckpt: Checkpointer,
                metrics: MetricsWriter) -> dict:
    """The step loop from ``st.step`` to ``--steps``: checkpoints every ``train.save_every`` and at the end,
    on SIGTERM / Ctrl-C (then stops) and on an exception (then re-raises); exports at the end."""
    cfg, tc, dc, mesh = su.cfg, su.tc, su.dc, su.mesh
    it = PackedIterator(args.data, dc, cfg, st.tokenizer, accum=tc.accum_steps, shard=jax.process_index(),
                        num_shards=jax.process_count())
    if st.data_state is not None:
        it.set_state(st.data_state)
    pre = Prefetcher(it, dc.prefetch)
    special = S.special_weights_by_id(tc, st.tokenizer)
    step_fn = S.jit_train_step(S.make_train_step(su.model, su.vae, tc, su.mask, su.opt, su.schedule, special,
                                                 su.ssh["params"]),
                               su.ssh, mesh, su.vsh, seq_parallel=tc.seq_parallel)
    peak = peak_flops_per_device(tc) * jax.device_count()
    n_train = O.count_params(su.shapes, su.mask)
    print(f"[train] mesh {dict(mesh.shape)}, {O.count_params(su.shapes) / 1e6:.2f}M params "
          f"({n_train / 1e6:.2f}M trainable), packs/step {dc.packs_per_step} x accum {tc.accum_steps}", flush=True)

    stop = {"sig": None}

    def on_signal(signum, frame):
        stop["sig"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    bar = tqdm(total=args.steps, initial=st.step, desc="train", disable=not is_main() or args.no_progress,
               dynamic_ncols=True)
    state, vae_params, step, dstate = st.state, st.vae_params, st.step, st.data_state
    st.state = None  # the loop's `state` replaces it each step; keep no second reference to the start state
    saved = st.step if st.resumed else -1
    last = {}
    fail_at = args.debug_fail_at
    try:
        while step < args.steps:
            (batch, ntok), dstate_next = pre.next()
            flops = step_flops(cfg, batch)
            t0 = time.perf_counter()
            gbatch = shd.put_batch(batch, mesh)
            n_compiled = len(step_fn.cache)
            state, m = step_fn(state, gbatch, vae_params, S.batch_expert_split(batch))
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            dt = time.perf_counter() - t0
            step += 1
            dstate = dstate_next
            last = step_record(step, m, ntok, dt, flops, peak, len(step_fn.cache) > n_compiled, dstate)
            metrics.write(last)
            _log_step(args, bar, step, m, last, dstate)
            if fail_at is not None and step == fail_at:
                raise RuntimeError(f"--debug-fail-at {fail_at}: simulated failure")
            if step % tc.save_every == 0 or step == args.steps:
                ckpt.save(step, state, dstate)
                saved = step
            if stop["sig"] is not None:
                if saved != step:
                    ckpt.save(step, state, dstate)
                    saved = step
                print(f"[train] signal {stop['sig']}: checkpointed and stopping at step {step}", flush=True)
                break
    except BaseException as e:
        if step > saved and dstate is not None and _state_alive(state):
            print(f"[train] {type(e).__name__} at step {step}: saving a checkpoint before exiting", flush=True)
            try:
                ckpt.wait()
                ckpt.save(step, state, dstate)
                saved = step
            except Exception as e2:  # pragma: no cover - best effort
                print(f"[train] could not save: {e2}", flush=True)
        raise
    finally:
        bar.close()
        pre.close()
        ckpt.close()
        metrics.close()
        for s, h in old.items():
            signal.signal(s, h)
    if stop["sig"] is None and step == args.steps and args.export:
        _export(state["ema"], cfg, vae_params, args.export, st.tokenizer, tc.init)
    return dict(step=step, last=last, saved=saved)


def _state_alive(state) -> bool:
    try:
        return not any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree_util.tree_leaves(state))
    except Exception:  # pragma: no cover
        return False

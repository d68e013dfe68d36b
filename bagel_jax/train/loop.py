"""The training driver behind ``train.py`` (command line: :mod:`.cli`; config: :mod:`.run_config`; step
accounting: :mod:`.metrics`): mesh and modules, init or resume, the step loop, checkpoints, export.

Everything that can be checked without compute is checked first (config, ``--data`` folder and its
groups, tokenizer, writability of ``--workdir`` and ``--export``), so bad input fails in seconds.

Resume rule: if ``WORKDIR/checkpoints`` holds a complete checkpoint, the latest one is restored (params,
EMA, optimiser state, step, rng, data-iterator state) and training continues until ``--steps``;
``metrics.jsonl`` is only ever appended to (:mod:`.metrics`). A checkpoint that cannot be read is an
error, never a silent fresh start.

Faults: on an exception the current state is checkpointed before exiting (when it is intact). SIGTERM or
SIGINT checkpoints and stops: :func:`run` returns the signal and ``train.py`` exits with 128 + signal
(143, 130) unless ``--steps`` was reached; a signal that arrives while no batch comes (a stuck data
source) stops without waiting for one, and a second signal exits at once. A non-finite step never
changes the weights (:mod:`.step`); ``train.on_nonfinite`` stops the run (:class:`~bagel_jax.train.nonfinite.NonFiniteError`; the
last good state is checkpointed) or skips the batch. A failed checkpoint save stops the run at once
(:class:`.run_checkpoint.CheckpointSaveError`), keeping the previous complete checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .. import sharding as shd
from ..config import BagelConfig
from ..convert import official as conv
from ..data.loader import PackedIterator
from ..data.row_state import describe_state
from ..loading import build_modules, load_model, vae_param_shapes
from ..models import flux_vae
from ..models.bagel import init_params as bagel_init
from ..models.bagel import param_shapes
from ..nn import layer_loop
from ..tokenizer import Tokenizer, load_tokenizer
from . import distributed as D
from . import optimizer as O
from . import lora as TL
from . import step as S
from .init import init_from_components
from .metrics import MetricsWriter, is_main, peak_flops_per_device, step_record
from .nonfinite import NonFiniteError, handle_nonfinite
from .run_checkpoint import CheckpointSaveError, Checkpointer, TrainCheckpointError, export_ema, inference_defaults
from .run_config import TrainSetupError, check_init_config, check_writable_dir, load_train_config

log = logging.getLogger("bagel_jax.train")


# -------------------------------------------------------------------------------------------------
# Init and export
# -------------------------------------------------------------------------------------------------

def _export(ema, su, vae_params, args, tokenizer) -> None:
    """EMA weights as an official folder plus ``inference.json`` with the image sizes the run trained on
    (:func:`.run_checkpoint.inference_defaults`), so sampling from the export uses them by default."""
    if su.lora is not None:   # a LoRA run exports its EMA adapter (train/lora.py)
        return su.lora.export(ema, su, args.export) if is_main() else None
    export_ema(layer_loop.stack(ema), su.cfg, vae_params, args.export, tokenizer)
    if is_main():
        inference_defaults(args.export, args.data, su.dc, su.tc.init)
    print(f"[train] exported EMA weights to {args.export}", flush=True)


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
        check_init_config(bm.cfg, cfg, init)
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
        D.initialize(args)


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
    lora: Any = None          # train/lora.py LoraRun when train.lora.rank > 0 (then model/shapes/mask/opt/state are the adapter's)
    run_abstract: Any = None  # the abstract state the step runs on when its layout differs from the checkpoints'
    run_ssh: Any = None       # its shardings (None: ``abstract`` / ``ssh``)

    @property
    def step_ssh(self):
        """Shardings of the state the step runs on."""
        return self.ssh if self.run_ssh is None else self.run_ssh

    def to_run(self, state):
        """A state in the checkpoints' layout -> the layout the step runs on (no copy when they agree)."""
        if self.run_abstract is None:
            return state
        return jax.device_put(layer_loop.relayout(state, self.run_abstract), self.run_ssh)

    def to_disk(self, state):
        """A state in the step's layout -> the checkpoints' layout (stacked layer params)."""
        return state if self.run_abstract is None else layer_loop.relayout(state, self.abstract)


def build_setup(args: argparse.Namespace) -> RunSetup:
    overrides = list(args.overrides)
    if args.save_every is not None:
        overrides.append(f"train.save_every={args.save_every}")
    raw, cfg, tc, dc = load_train_config(args.config, overrides)
    if args.steps is None or args.steps < 0:
        raise TrainSetupError("--steps N (total number of optimiser steps, >= 0) is required")
    if not os.path.isdir(args.data):
        raise TrainSetupError(f"--data folder not found: {args.data}")
    mesh = shd.make_mesh(**shd.parse_mesh(args.mesh))
    nshard = shd.num_batch_shards(mesh)
    if dc.packs_per_step % nshard:
        raise TrainSetupError(f"data.packs_per_step={dc.packs_per_step} must be divisible by data*fsdp={nshard}")
    check_writable_dir(args.workdir, "--workdir")
    if args.export:
        check_writable_dir(args.export, "--export", keep=False)
    model, vae = build_modules(cfg, tc.model_options)
    shapes = param_shapes(model)
    mask = O.trainable_mask(shapes, tc)
    opt = O.make_optimizer(tc, mask, args.steps)
    abstract = S.abstract_state(shapes, opt, tc.seed)
    vshapes = vae_param_shapes(vae)
    su = RunSetup(raw=raw, cfg=cfg, tc=tc, dc=dc, mesh=mesh, model=model, vae=vae, shapes=shapes, mask=mask,
                  schedule=O.lr_schedule(tc, args.steps), opt=opt, abstract=abstract,
                  ssh=S.state_shardings(abstract, mesh), vshapes=vshapes,
                  vsh=shd.tree_shardings(vshapes, mesh))
    if tc.lora.rank:
        return TL.setup(su, args.steps)
    if layer_loop.layout_of(shapes) == "scan" and layer_loop.resolve(tc.layer_loop, mesh) == "unrolled":
        # one CPU device: the step runs on one array per layer (no per-step slices of stacked weights, no
        # stacked gradient buffers); checkpoints and exports keep the stacked layout of every other mesh
        su.run_abstract = S.abstract_state(jax.eval_shape(layer_loop.unstack, shapes), opt, tc.seed)
        su.run_ssh = S.state_shardings(su.run_abstract, mesh)
    return su


@dataclasses.dataclass
class RunStart:
    """Where the step loop begins."""

    state: dict               # train state (params, ema, opt_state, step, rng)
    vae_params: Any
    tokenizer: Any
    data_state: Optional[dict]  # data-iterator state of the checkpoint; None on a fresh start
    step: int
    resumed: bool
    base: Any = None          # LoRA: the frozen base params (train/lora.py)


def load_run_tokenizer(args: argparse.Namespace, su: RunSetup) -> Tokenizer:
    """The tokenizer of the init folder (``train.init`` a folder) or of ``DATA/tokenizer``, checked
    against the model's vocabulary."""
    init = su.tc.init
    if isinstance(init, str) and init != "random" and not os.path.isdir(init):
        raise TrainSetupError(f"train.init: model folder not found: {init}")
    tokenizer = load_tokenizer(init if isinstance(init, str) and init != "random"
                               else os.path.join(args.data, "tokenizer"))
    top = max(tokenizer.special.__dict__.values())
    if top >= su.cfg.llm.vocab_size:
        raise TrainSetupError(f"tokenizer id {top} does not fit the model vocab_size {su.cfg.llm.vocab_size}")
    return tokenizer


def start_or_resume(args: argparse.Namespace, su: RunSetup, ckpt: Checkpointer, tokenizer) -> RunStart:
    """A fresh start (``train.init``, frozen VAE written to ``WORKDIR/ae.safetensors``) or the latest
    complete checkpoint."""
    cfg, tc = su.cfg, su.tc
    ae_path = os.path.join(args.workdir, "ae.safetensors")
    latest = ckpt.latest()
    base = None
    if su.lora is not None:    # LoRA: the frozen base comes from train.init at every start, never from a checkpoint
        base, vae_init = su.lora.load_base(su, init_params)
    if latest is None:
        mpath = os.path.join(args.workdir, "metrics.jsonl")
        if os.path.isfile(mpath) and os.path.getsize(mpath):
            log.warning("%s has metrics but no complete checkpoint: starting from step 0 (metrics.jsonl is "
                        "appended to)", args.workdir)
        params, vae_params, _ = init_params(tc, cfg, su.model, su.vae, su.ssh["params"], su.vsh) if base is None \
            else (su.lora.init_adapter(tc.seed, su.ssh["params"]), vae_init, None)
        if is_main():
            conv.export_params(vae_params, flux_vae.key_map(cfg.vae), ae_path)
        # the layout the step runs on (RunSetup.to_run; the adapter's for LoRA)
        run_layout = layer_loop.layout_of(su.shapes if su.run_abstract is None else su.run_abstract) or "scan"
        state, _ = S.init_state(params, su.opt, tc.seed, su.mesh, layer_loop=run_layout)
        del params
        data_state = None
        if is_main():
            with open(os.path.join(args.workdir, "config.yaml"), "w") as f:
                yaml.safe_dump(su.raw, f, sort_keys=False)
        start = 0
        print(f"[train] fresh start in {args.workdir} (init: {tc.init})", flush=True)
    else:
        target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                        su.abstract, su.ssh)
        state, data_state = ckpt.restore(latest, target)
        state = su.to_run(state)
        if not os.path.isfile(ae_path):
            raise TrainCheckpointError(f"{ae_path} is missing (the frozen VAE weights of this run)")
        vae_params = conv.load_params(ae_path, flux_vae.key_map(cfg.vae), su.vshapes, dtype=jnp.float32,
                                      shardings=su.vsh)
        start = int(jax.device_get(state["step"]))
        if start != latest:
            raise TrainCheckpointError(f"checkpoint {latest} holds step {start}")
        print(f"[train] resumed from step {start} ({ckpt.directory}/{latest})", flush=True)
    return RunStart(state=state, vae_params=vae_params, tokenizer=tokenizer, data_state=data_state, step=start,
                    resumed=latest is not None, base=base)


# -------------------------------------------------------------------------------------------------
# Main loop
# -------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    """One invocation of ``train.py``: train from the start (or the latest checkpoint) to ``--steps``.
    Returns ``step`` (reached), ``signal`` (the signal that stopped the run, or None) and more."""
    configure_jax(args)
    su = build_setup(args)
    tokenizer = load_run_tokenizer(args, su)
    it = PackedIterator(args.data, su.dc, su.cfg, tokenizer, accum=su.tc.accum_steps,
                        rows=D.local_rows(su.mesh, su.dc.packs_per_step))
    ckpt = Checkpointer(os.path.join(args.workdir, "checkpoints"), keep=su.tc.keep_checkpoints,
                        async_save=not args.sync_save, to_disk=su.to_disk)
    try:
        st = start_or_resume(args, su, ckpt, tokenizer)
        if st.data_state is not None:
            it.set_state(st.data_state)
        metrics = MetricsWriter(args.workdir, st.step, st.resumed)
        if args.steps <= st.step:
            print(f"[train] nothing to do: already at step {st.step} >= --steps {args.steps}", flush=True)
            metrics.close()
            if args.export:
                _export(st.state["ema"], su, st.vae_params, args, st.tokenizer)
            return dict(step=st.step, signal=None)
        return train_steps(args, su, st, ckpt, metrics, it)
    finally:
        ckpt.close()


def _say(msg: str) -> None:
    """A ``[train]`` line that does not print over the progress bar."""
    tqdm.write(msg, file=sys.stdout)
    sys.stdout.flush()


def _log_step(args, bar, step: int, m: dict, rec: dict, dstate: dict) -> None:
    bar.update(1)
    bar.set_postfix(ce=f"{m['loss_ce']:.3f}", mse=f"{m['loss_mse']:.3f}", gn=f"{m['grad_norm']:.2f}",
                    lr=f"{m['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}", mfu=f"{rec['mfu']:.1%}")
    if args.log_every and step % args.log_every == 0 and (args.no_progress or not sys.stderr.isatty()):
        _say(f"[train] step {step} ce {m['loss_ce']:.4f} mse {m['loss_mse']:.4f} gnorm {m['grad_norm']:.3f} "
             f"lr {m['lr']:.3e} tok/s {rec['tokens_per_s']:.0f} mfu {rec['mfu']:.2%} data[{describe_state(dstate)}]")


class _Signals:
    """SIGTERM / SIGINT while training: the first sets :attr:`sig` (the loop checkpoints and stops at the
    next step boundary, or at once while it waits for data); a second exits immediately (128 + signal)."""

    def __init__(self):
        self.sig = None
        self.old = {s: signal.signal(s, self._on) for s in (signal.SIGTERM, signal.SIGINT)}

    def _on(self, signum, frame):
        if self.sig is not None:
            os.write(2, f"[train] second signal {signal.Signals(signum).name}: exiting without a checkpoint\n".encode())
            os._exit(128 + signum)
        self.sig = signum
        os.write(2, f"[train] {signal.Signals(signum).name}: checkpointing and stopping (send it again to exit "
                    "at once)\n".encode())

    def restore(self):
        for s, h in self.old.items():
            signal.signal(s, h)


def _poison(batch: dict) -> dict:
    """``--debug-nan-at``: NaN pixels in every image of a batch (a non-finite step)."""
    return {k: np.full_like(v, np.nan) if k in ("vae_images", "vit_patches") else v for k, v in batch.items()}


def train_steps(args: argparse.Namespace, su: RunSetup, st: RunStart, ckpt: Checkpointer,
                metrics: MetricsWriter, it: PackedIterator) -> dict:
    """The step loop from ``st.step`` to ``--steps``: checkpoints every ``train.save_every`` and at the end,
    on SIGTERM / Ctrl-C (then stops), on a non-finite step in ``stop`` mode (the last good state) and on an
    exception (then re-raises); a failed save stops at once; exports at the end."""
    cfg, tc, dc, mesh = su.cfg, su.tc, su.dc, su.mesh
    special = S.special_weights_by_id(tc, st.tokenizer)
    step_fn = S.jit_train_step(S.make_train_step(su.model, su.vae, tc, su.mask, su.opt, su.schedule, special,
                                                 su.step_ssh["params"]),
                               su.step_ssh, mesh, su.vsh) if su.lora is None else \
        TL.jit_step(su, special, st.base)
    peak = peak_flops_per_device(tc) * jax.device_count()
    n_train = O.count_params(su.shapes, su.mask)
    print(f"[train] mesh {dict(mesh.shape)}, {O.count_params(su.shapes) / 1e6:.2f}M params "
          f"({n_train / 1e6:.2f}M trainable), packs/step {dc.packs_per_step} x accum {tc.accum_steps}", flush=True)

    sig = _Signals()  # before the loader thread starts: a signal from now on stops the run cleanly
    src = D.BatchSource(it, cfg, mesh, dc.prefetch)
    bar = tqdm(total=args.steps, initial=st.step, desc="train", disable=not is_main() or args.no_progress,
               dynamic_ncols=True)
    state, vae_params, step, dstate = st.state, st.vae_params, st.step, st.data_state
    st.state = None  # the loop's `state` replaces it each step; keep no second reference to the start state
    saved = st.step if st.resumed else -1
    last, nonfinite = {}, 0
    try:
        with logging_redirect_tqdm():
            while step < args.steps:
                got = src.next(lambda: sig.sig or 0)   # None: a signal (multi-host: on any process)
                if got is None:
                    sig.sig = sig.sig or src.stop_signal or None
                    break
                batch, ntok, flops, dstate_next, totals = got
                if args.debug_nan_at == step + 1:
                    batch = _poison(batch)
                t0 = time.perf_counter()
                gbatch = shd.put_batch(batch, mesh)
                n_compiled = len(step_fn.cache)
                state, m = step_fn(state, gbatch, vae_params, S.batch_expert_split(batch))
                m = {k: float(v) for k, v in jax.device_get(m).items()}
                dt = time.perf_counter() - t0
                step += 1
                dstate_prev, dstate = dstate, dstate_next
                last = step_record(step, m, ntok, dt, flops, peak, len(step_fn.cache) > n_compiled, totals)
                metrics.write(last)
                _log_step(args, bar, step, m, last, totals)
                ckpt.check()
                nonfinite = 0 if last["finite"] else nonfinite + 1
                if nonfinite:
                    saved = handle_nonfinite(tc, step, m, nonfinite, state, (dstate_prev, dstate), ckpt, saved, _say)
                if args.debug_fail_at is not None and step == args.debug_fail_at:
                    raise RuntimeError(f"--debug-fail-at {args.debug_fail_at}: simulated failure")
                if step % tc.save_every == 0 or step == args.steps:
                    ckpt.save(step, state, dstate)
                    saved = step
        if sig.sig is not None:
            name = signal.Signals(sig.sig).name
            if step > saved and dstate is not None:
                ckpt.save(step, state, dstate)
                saved = step
            _say(f"[train] {name}: checkpointed and stopping at step {step}" if saved == step else
                 f"[train] {name}: stopping at step {step} (nothing trained since the start)")
    except BaseException as e:
        # a failed save, or a non-finite state, must not be saved (again); multi-host: a save is a collective
        # that processes without this error would never join
        if (step > saved and dstate is not None and not isinstance(e, (CheckpointSaveError, NonFiniteError))
                and _state_alive(state) and not D.multi()):
            _say(f"[train] {type(e).__name__} at step {step}: saving a checkpoint before exiting")
            try:
                ckpt.wait()
                ckpt.save(step, state, dstate)
                ckpt.wait()
                saved = step
            except Exception as e2:  # pragma: no cover - best effort
                _say(f"[train] could not save: {e2}")
        raise
    finally:
        bar.close()
        src.close(timeout=1.0)
        ckpt.close()
        metrics.close()
        sig.restore()
    if step == args.steps and args.export:
        _export(state["ema"], su, vae_params, args, st.tokenizer)
    return dict(step=step, last=last, saved=saved, signal=sig.sig)


def _state_alive(state) -> bool:
    try:
        return not any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree_util.tree_leaves(state))
    except Exception:  # pragma: no cover
        return False

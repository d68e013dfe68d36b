"""The training driver behind ``train.py``: config, mesh, init or resume, the step loop, logging, export.

Resume rule: if ``WORKDIR/checkpoints`` holds a complete checkpoint, the latest one is restored (params,
EMA, optimiser state, step, rng, data-iterator state) and training continues until ``--steps``; lines of
``metrics.jsonl`` after the restored step are dropped, so the file always describes one run. A checkpoint
that cannot be read is an error, never a silent fresh start. On an exception, SIGTERM or Ctrl-C the
current state is checkpointed before exiting (when the state is still intact).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from typing import Any, Optional

import numpy as np
import yaml
from ..config import load_yaml

log = logging.getLogger("bagel_jax.train")


class TrainSetupError(ValueError):
    """Bad command line / config / workdir."""


# -------------------------------------------------------------------------------------------------
# Config
# -------------------------------------------------------------------------------------------------

def parse_value(v: str):
    try:
        return load_yaml(v)
    except yaml.YAMLError:
        return v


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``section.key=value`` (value parsed as YAML) into the raw config dict."""
    raw = json.loads(json.dumps(raw))
    for ov in overrides:
        if "=" not in ov:
            raise TrainSetupError(f"override {ov!r}: expected key=value, e.g. train.lr=2e-5")
        key, val = ov.split("=", 1)
        parts = key.strip().split(".")
        if parts[0] not in ("model", "train", "data"):
            raise TrainSetupError(f"override {ov!r}: key must start with model., train. or data.")
        d = raw
        for p in parts[:-1]:
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise TrainSetupError(f"override {ov!r}: {p} is not a section")
        d[parts[-1]] = parse_value(val)
    return raw


def load_train_config(path: str, overrides: list[str]):
    from ..config import config_from_dict
    from ..data.loader import DataConfig
    from .optimizer import TrainConfig

    if not os.path.isfile(path):
        raise TrainSetupError(f"config file not found: {path}")
    with open(path) as f:
        raw = load_yaml(f) or {}
    if not isinstance(raw, dict) or "model" not in raw:
        raise TrainSetupError(f"{path}: expected a mapping with a 'model:' section (and optional train:, data:)")
    raw = apply_overrides(raw, overrides)
    cfg = config_from_dict(raw["model"], path)
    tc = TrainConfig.from_dict(raw.get("train") or {})
    dc = DataConfig.from_dict(raw.get("data") or {})
    return raw, cfg, tc, dc


# -------------------------------------------------------------------------------------------------
# FLOPs / MFU
# -------------------------------------------------------------------------------------------------

PEAK_TFLOPS = {"v5p": 459.0, "v5e": 197.0, "v5 lite": 197.0, "v6e": 918.0, "v4": 275.0, "h100": 989.0,
               "h200": 989.0, "a100": 312.0, "cpu": 0.1}


def peak_flops_per_device(tc) -> float:
    if tc.peak_tflops_per_device:
        return tc.peak_tflops_per_device * 1e12
    import jax

    kind = jax.devices()[0].device_kind.lower()
    for k, v in PEAK_TFLOPS.items():
        if k in kind:
            return v * 1e12
    return PEAK_TFLOPS["cpu"] * 1e12 if jax.devices()[0].platform == "cpu" else 100e12


def step_flops(cfg, batch: dict) -> float:
    """Model FLOPs of one step (forward + backward = 3x forward), counting the work a step needs, once:

    * every real (non-padding) token through one expert's projections and MLP per layer (training runs
      expert streams, so each token's expert runs once; the ``select`` test path would run twice this);
    * decoder attention over the *allowed* (query, key) pairs of the BAGEL mask
      (:func:`bagel_jax.data.packing.allowed_pairs`; QK^T and PV), not over a padded ``L x L`` square:
      dense attention computes more, a block-skipping kernel slightly more, so this is the honest MFU
      numerator (padding slots and masked pairs are waste, not work);
    * the LM head on real CE tokens, the ViT (projections, MLP, full attention within each image) and
      connector on real ViT tokens, ``vae2llm`` / ``llm2vae`` on real latent tokens.

    Not counted: the frozen VAE encoder, norms, RoPE, softmax and the timestep embedder (all small
    next to the matmuls at BAGEL sizes).
    """
    from ..data.packing import allowed_pairs

    llm, vit = cfg.llm, cfg.vit
    D, F, nl = llm.hidden_size, llm.intermediate_size, llm.num_hidden_layers
    H, K, dh = llm.num_attention_heads, llm.num_key_value_heads, llm.head_dim
    per_tok_layer = 2 * (D * (H + 2 * K) * dh + H * dh * D + 3 * D * F)
    seg = np.asarray(batch["seg"])
    tokens = float((seg > 0).sum())
    pairs = float(allowed_pairs(seg, batch["vis"], batch["nblk"]).sum())
    attn = 4.0 * nl * H * dh * pairs
    n_ce = float(np.asarray(batch["ce_valid"]).sum())
    vit_seg = np.asarray(batch["vit_seg"])
    vit_seg = vit_seg.reshape(-1, vit_seg.shape[-1]) if vit_seg.size else np.zeros((1, 0), np.int32)
    n_vit = float((vit_seg > 0).sum())
    vit_pairs = float(sum((np.bincount(r[r > 0]) ** 2).sum() for r in vit_seg))
    Dv = vit.hidden_size
    vit_fwd = n_vit * (vit.num_hidden_layers * 2 * (4 * Dv * Dv + 2 * Dv * vit.intermediate_size)
                       + 2 * (Dv * D + D * D)) + 4.0 * vit.num_hidden_layers * Dv * vit_pairs
    vae_dest = np.asarray(batch["vae_dest"])
    flat = int(np.prod(seg.shape[-2:]))
    n_lat = float((vae_dest < flat).sum())
    lat_fwd = n_lat * 2 * 2 * cfg.patch_latent_dim * D
    fwd = tokens * nl * per_tok_layer + attn + n_ce * 2 * D * llm.vocab_size + vit_fwd + lat_fwd
    return 3.0 * fwd


# -------------------------------------------------------------------------------------------------
# Init
# -------------------------------------------------------------------------------------------------

def _export(ema, cfg, vae_params, out: str, tokenizer, init) -> None:
    """EMA weights as an official folder; a model folder given as ``train.init`` passes on its optional
    ``inference.json`` (image-size defaults of small models, :func:`bagel_jax.inference.api.folder_defaults`)."""
    import shutil

    from ..inference.api import INFERENCE_DEFAULTS_FILE
    from .run_checkpoint import export_ema

    export_ema(ema, cfg, vae_params, out, tokenizer)
    if isinstance(init, str) and os.path.isfile(os.path.join(init, INFERENCE_DEFAULTS_FILE)):
        shutil.copy(os.path.join(init, INFERENCE_DEFAULTS_FILE), os.path.join(out, INFERENCE_DEFAULTS_FILE))
    print(f"[train] exported EMA weights to {out}", flush=True)


def init_params(tc, cfg, model, vae, param_sh, vae_sh):
    """Initial (params, vae_params, tokenizer_or_None) per ``train.init``."""
    import jax
    import jax.numpy as jnp

    from ..loading import load_model

    init = tc.init
    if init in (None, "random"):
        # Same keys as loading.random_model, but jitted: each leaf is created directly on its sharding
        # (no host copy of a large model) and the init program lands in the compilation cache.
        from ..models.bagel import init_params as bagel_init

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
        from .init import init_from_components

        return init_from_components(init, cfg, model, vae, param_sh, vae_sh, tc.seed)
    raise TrainSetupError(f"train.init: expected 'random', a model folder, or {{qwen2:, siglip:, ae:}}, got {init!r}")


# -------------------------------------------------------------------------------------------------
# Metrics
# -------------------------------------------------------------------------------------------------

class MetricsWriter:
    def __init__(self, workdir: str, resume_step: int):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = _is_main()
        if self.enabled and os.path.isfile(self.path):
            keep = []
            with open(self.path) as f:
                for line in f:
                    try:
                        if json.loads(line).get("step", 0) <= resume_step:
                            keep.append(line)
                    except json.JSONDecodeError:
                        pass
            with open(self.path, "w") as f:
                f.writelines(keep)
        self.f = open(self.path, "a") if self.enabled else None
        self.tb = None
        if self.enabled:
            try:
                from tensorboardX import SummaryWriter  # optional

                self.tb = SummaryWriter(os.path.join(workdir, "tb"))
            except Exception:
                self.tb = None

    def write(self, rec: dict) -> None:
        if not self.enabled:
            return
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, rec["step"])

    def close(self):
        if self.f:
            self.f.close()
        if self.tb is not None:
            self.tb.close()


def _is_main() -> bool:
    import jax

    return jax.process_index() == 0


# -------------------------------------------------------------------------------------------------
# Main loop
# -------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp

    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if args.multihost:
        jax.distributed.initialize()

    from .. import sharding as shd
    from ..convert import official as conv
    from ..data.loader import PackedIterator, Prefetcher, describe_state
    from ..loading import build_modules, vae_param_shapes
    from ..models import flux_vae
    from ..models.bagel import param_shapes
    from ..tokenizer import load_tokenizer
    from . import optimizer as O
    from . import step as S
    from .run_checkpoint import Checkpointer, TrainCheckpointError

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
    compute = O.DTYPES[tc.compute_dtype]
    model, vae = build_modules(cfg, dtype=compute, param_dtype=jnp.float32, remat_policy=tc.remat_policy,
                               attention_impl=tc.attention_impl)
    shapes = param_shapes(model)
    mask = O.trainable_mask(shapes, tc)
    schedule = O.lr_schedule(tc, args.steps)
    opt = O.make_optimizer(tc, mask, args.steps)
    abstract = S.abstract_state(shapes, opt, tc.seed)
    ssh = S.state_shardings(abstract, mesh)
    vshapes = vae_param_shapes(vae)
    vsh = shd.tree_shardings(vshapes, mesh)
    ae_path = os.path.join(args.workdir, "ae.safetensors")

    ckpt = Checkpointer(os.path.join(args.workdir, "checkpoints"), keep=tc.keep_checkpoints,
                        async_save=not args.sync_save)
    latest = ckpt.latest()
    tokenizer = None
    if latest is None:
        if os.path.isfile(os.path.join(args.workdir, "metrics.jsonl")) and os.path.getsize(
                os.path.join(args.workdir, "metrics.jsonl")):
            log.warning("%s has metrics but no complete checkpoint: starting from step 0", args.workdir)
        params, vae_params, tokenizer = init_params(tc, cfg, model, vae, ssh["params"], vsh)
        if _is_main():
            conv.export_params(vae_params, flux_vae.key_map(cfg.vae), ae_path)
        state, _ = S.init_state(params, opt, tc.seed, mesh)
        del params
        data_state = None
        with open(os.path.join(args.workdir, "config.yaml"), "w") as f:
            yaml.safe_dump(raw, f, sort_keys=False)
        start = 0
        print(f"[train] fresh start in {args.workdir} (init: {tc.init})", flush=True)
    else:
        target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, ssh)
        state, data_state = ckpt.restore(latest, target)
        if not os.path.isfile(ae_path):
            raise TrainCheckpointError(f"{ae_path} is missing (the frozen VAE weights of this run)")
        vae_params = conv.load_params(ae_path, flux_vae.key_map(cfg.vae), vshapes, dtype=jnp.float32, shardings=vsh)
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

    metrics = MetricsWriter(args.workdir, start)
    if args.steps <= start:
        print(f"[train] nothing to do: already at step {start} >= --steps {args.steps}", flush=True)
        result = dict(step=start)
        if args.export:
            _export(state["ema"], cfg, vae_params, args.export, tokenizer, tc.init)
        ckpt.close()
        metrics.close()
        return result

    it = PackedIterator(args.data, dc, cfg, tokenizer, accum=tc.accum_steps, shard=jax.process_index(),
                        num_shards=jax.process_count())
    if data_state is not None:
        it.set_state(data_state)
    pre = Prefetcher(it, dc.prefetch)
    special = S.special_weights_by_id(tc, tokenizer)
    step_fn = S.jit_train_step(S.make_train_step(model, vae, tc, mask, opt, schedule, special, ssh["params"]),
                               ssh, mesh, vsh, seq_parallel=tc.seq_parallel)
    peak = peak_flops_per_device(tc) * jax.device_count()
    n_train = O.count_params(shapes, mask)
    print(f"[train] mesh {dict(mesh.shape)}, {O.count_params(shapes) / 1e6:.2f}M params "
          f"({n_train / 1e6:.2f}M trainable), packs/step {dc.packs_per_step} x accum {tc.accum_steps}", flush=True)

    stop = {"sig": None}

    def on_signal(signum, frame):
        stop["sig"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    from tqdm import tqdm

    bar = tqdm(total=args.steps, initial=start, desc="train", disable=not _is_main() or args.no_progress,
               dynamic_ncols=True)
    step = start
    saved = start if latest is not None else -1
    dstate = data_state
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
            compiled = len(step_fn.cache) > n_compiled
            tok_s = ntok * jax.process_count() / dt
            rec = dict(step=step, loss=m["loss"], loss_ce=m["loss_ce"], loss_mse=m["loss_mse"],
                       grad_norm=m["grad_norm"], lr=m["lr"], tokens=int(ntok * jax.process_count()),
                       ce_tokens=int(m["n_ce"]), mse_tokens=int(m["n_mse"]), step_time=dt,
                       tokens_per_s=tok_s, mfu=flops * jax.process_count() / dt / peak, compiled=compiled,
                       data_skipped=int(sum(dstate["skipped"].values())), data_too_long=int(dstate["too_long"]),
                       data_dropped=int(dstate["dropped"]))
            metrics.write(rec)
            last = rec
            bar.update(1)
            bar.set_postfix(ce=f"{m['loss_ce']:.3f}", mse=f"{m['loss_mse']:.3f}", gn=f"{m['grad_norm']:.2f}",
                            lr=f"{m['lr']:.2e}", tok_s=f"{tok_s:.0f}", mfu=f"{rec['mfu']:.1%}")
            if args.log_every and step % args.log_every == 0 and (args.no_progress or not sys.stderr.isatty()):
                print(f"[train] step {step} ce {m['loss_ce']:.4f} mse {m['loss_mse']:.4f} gnorm {m['grad_norm']:.3f} "
                      f"lr {m['lr']:.3e} tok/s {tok_s:.0f} mfu {rec['mfu']:.2%} data[{describe_state(dstate)}]",
                      flush=True)
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
        _export(state["ema"], cfg, vae_params, args.export, tokenizer, tc.init)
    return dict(step=step, last=last, saved=saved)


def _state_alive(state) -> bool:
    import jax

    try:
        return not any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree_util.tree_leaves(state))
    except Exception:  # pragma: no cover
        return False


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="train.py",
        description="Train BAGEL (pre-training or fine-tuning) on packed multimodal data in the official formats. "
                    "Rerunning with the same --workdir resumes from its latest checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--config", required=True,
                    help="YAML with a model: section (shapes, as configs/tiny.yaml) and optional train: / data: "
                         "sections (see bagel_jax/train/optimizer.py TrainConfig and bagel_jax/data/loader.py DataConfig)")
    ap.add_argument("--data", required=True,
                    help="data folder with dataset.yaml (groups t2i_pretrain / unified_edit / vlm_sft) and, unless "
                         "train.init is a model folder, tokenizer/ (python -m bagel_jax.demo.synthetic writes one)")
    ap.add_argument("--workdir", required=True,
                    help="run folder: checkpoints/, metrics.jsonl, config.yaml, ae.safetensors (frozen VAE)")
    ap.add_argument("--steps", type=int, required=True,
                    help="total optimiser steps of the run (not additional steps); rerun with a larger value to continue")
    ap.add_argument("--save-every", type=int, default=None,
                    help="checkpoint every N steps (default: train.save_every); the last step is always saved")
    ap.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1",
                    help="device mesh sizes data=D,fsdp=F,tensor=T (product = device count; one may be -1 = the rest)")
    ap.add_argument("--export", default=None,
                    help="after the last step write the EMA weights as an official model folder here "
                         "(ema.safetensors, ae.safetensors, config + tokenizer files)")
    ap.add_argument("--compile-cache", default=os.environ.get("JAX_COMPILATION_CACHE_DIR"),
                    help="persistent XLA compilation cache folder (reused across restarts)")
    ap.add_argument("--multihost", action="store_true",
                    help="call jax.distributed.initialize() first (multi-host TPU/GPU); each process reads its own "
                         "shard of the data")
    ap.add_argument("--sync-save", action="store_true", help="save checkpoints synchronously (default: asynchronous)")
    ap.add_argument("--log-every", type=int, default=1,
                    help="print a metrics line every N steps when there is no progress bar (always written to metrics.jsonl)")
    ap.add_argument("--no-progress", action="store_true", help="disable the tqdm progress bar (print lines instead)")
    ap.add_argument("--debug-fail-at", type=int, default=None,
                    help="testing hook: raise an error after step N (the state is checkpointed before exiting)")
    ap.add_argument("overrides", nargs="*",
                    help="config overrides section.key=value (value parsed as YAML), e.g. train.lr=2e-5 data.seed=1")
    return ap


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_intermixed_args(argv)
    from ..config import ConfigError
    from ..data.datasets import DataConfigError
    from ..sharding import MeshError
    from .run_checkpoint import TrainCheckpointError

    try:
        run(args)
    except (TrainSetupError, ConfigError, DataConfigError, MeshError, TrainCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0

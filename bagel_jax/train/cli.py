"""The command line of ``train.py``: arguments, then :func:`bagel_jax.train.loop.run`.

Exit status: 0 when ``--steps`` was reached; 2 with one ``error:`` line for a bad command line, config,
data folder, tokenizer, mesh, output folder or checkpoint (all checked before any compute; a data folder
that stops yielding samples mid-run also exits 2); 1 with one ``error:`` line for a failed checkpoint
save or a non-finite step; 128 + signal (143 SIGTERM, 130 SIGINT) when a signal stopped the run early
(after checkpointing)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

import jax

from ..config import ConfigError
from ..data.datasets import DataConfigError
from ..sharding import MeshError
from ..tokenizer import TokenizerError
from .distributed import Watchdog
from .loop import run
from .nonfinite import NonFiniteError
from .run_checkpoint import CheckpointSaveError, TrainCheckpointError, short_error
from .run_config import TrainSetupError


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
                    help="one of several processes (hosts) under jax.distributed (docs/multihost.md); without the "
                         "three flags below JAX detects the cluster (TPU pod, SLURM, ...)")
    ap.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                    help="--multihost: process 0's address, the same for all (default: $JAX_COORDINATOR_ADDRESS)")
    ap.add_argument("--num-processes", type=int, default=None,
                    help="--multihost: number of processes (default: $JAX_NUM_PROCESSES)")
    ap.add_argument("--process-id", type=int, default=None,
                    help="--multihost: this process's id, 0..N-1 (default: $JAX_PROCESS_ID)")
    ap.add_argument("--peer-timeout", type=float, default=60.0,
                    help="--multihost: seconds without a heartbeat from another process before this one stops "
                         "with an error")
    ap.add_argument("--init-timeout", type=int, default=300,
                    help="--multihost: seconds to wait for all processes to join")
    ap.add_argument("--sync-save", action="store_true", help="save checkpoints synchronously (default: asynchronous)")
    ap.add_argument("--log-every", type=int, default=1,
                    help="print a metrics line every N steps when there is no progress bar (always written to metrics.jsonl)")
    ap.add_argument("--no-progress", action="store_true", help="disable the tqdm progress bar (print lines instead)")
    ap.add_argument("--debug-fail-at", type=int, default=None,
                    help="testing hook: raise an error after step N (the state is checkpointed before exiting)")
    ap.add_argument("--debug-nan-at", type=int, default=None,
                    help="testing hook: NaN pixels in every image of step N's batch (a non-finite step, "
                         "see train.on_nonfinite)")
    ap.add_argument("overrides", nargs="*",
                    help="config overrides section.key=value (value parsed as YAML), e.g. train.lr=2e-5 data.seed=1")
    return ap


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # orbax reports a failed background save from each of its worker threads, with tracebacks; the run
    # reports it once (CheckpointSaveError)
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    args = build_parser().parse_intermixed_args(argv)
    code = 1
    try:
        code = _main(args)
        return code
    finally:
        Watchdog.finish(code)   # multi-host: the other processes learn how this one ended
        if code in (1, 2) and Watchdog.active is not None:
            # an error (not a stop all processes agreed on): JAX's exit barrier would wait minutes for peers
            # that may be gone; exit now
            if sys.exc_info()[0] is not None:
                traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def _error(e) -> None:
    """One ``error:`` line; multi-host: naming the process (64 hosts' logs side by side)."""
    who = f"process {jax.process_index()} of {jax.process_count()}: " if jax.process_count() > 1 else ""
    print(f"error: {who}{e}", file=sys.stderr, flush=True)


def _main(args) -> int:
    try:
        res = run(args)
    except (CheckpointSaveError, NonFiniteError) as e:
        _error(e)
        return 1
    except (TrainSetupError, ConfigError, DataConfigError, MeshError, TrainCheckpointError, TokenizerError) as e:
        _error(e)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the step loop (setup, export): no traceback
        _error("interrupted")
        return 130
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        # a collective failed: gloo reports a peer's closed connection at once (the watchdog after
        # --peer-timeout); elsewhere it may be the other side of a peer's error
        _error(f"{short_error(e)} (another process probably died: see its log)")
        return 1
    if res.get("signal") is not None and res["step"] < args.steps:
        return 128 + int(res["signal"])
    return 0

"""Train-state checkpoints (orbax) and the export of EMA weights to an official model folder.

Layout of ``WORKDIR/checkpoints/<step>/``: ``state`` (params, EMA, optimiser state, step, rng, saved
with ``StandardSave``: sharded, restorable onto any mesh) and ``data`` (the data-iterator state, JSON).
Saves are asynchronous; the last ``keep`` are kept; :meth:`Checkpointer.restore` of the latest step is
what ``train.py`` does when a workdir already has checkpoints. Orbax writes each step to a temporary
directory and renames it when complete, so a run killed mid-save leaves the previous step as latest.

Anything unreadable (missing item, truncated or corrupted files, a state tree that does not match the
model) raises :class:`TrainCheckpointError` naming the step directory; we never fall back to a fresh start.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ..loading import BagelModel, build_modules, save_model

ITEMS = ("state", "data")


class TrainCheckpointError(RuntimeError):
    pass


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.mngr = ocp.CheckpointManager(self.directory, options=opts, item_names=ITEMS)

    def steps(self) -> list[int]:
        return sorted(self.mngr.all_steps())

    def latest(self) -> Optional[int]:
        return self.mngr.latest_step()

    def save(self, step: int, state: Any, data_state: dict, force: bool = True) -> bool:
        return self.mngr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                 data=ocp.args.JsonSave(data_state)), force=force)

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()

    def _check(self, step: int) -> str:
        d = os.path.join(self.directory, str(step))
        if not os.path.isdir(d):
            raise TrainCheckpointError(f"checkpoint step {step} not found in {self.directory} "
                                       f"(available: {self.steps() or 'none'})")
        for item in ITEMS:
            sub = os.path.join(d, item)
            if not os.path.isdir(sub) or not os.listdir(sub):
                raise TrainCheckpointError(f"checkpoint {d} is incomplete: item '{item}' is missing or empty. "
                                           "Delete the step directory to resume from an earlier step, or start "
                                           "in a new workdir.")
        return d

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restore ``step`` onto the shardings of ``abstract_state`` (a tree of ``jax.ShapeDtypeStruct``
        with ``sharding``). Raises :class:`TrainCheckpointError` on anything unreadable."""
        d = self._check(step)
        try:
            out = self.mngr.restore(int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                       data=ocp.args.JsonRestore()))
        except Exception as e:
            raise TrainCheckpointError(f"cannot restore checkpoint {d}: {type(e).__name__}: {e}. The checkpoint is "
                                       "corrupt or was written for a different model/optimizer config; delete the "
                                       "step directory to resume from an earlier step, or start in a new "
                                       "workdir.") from None
        state, data = out["state"], out["data"]
        if data is None or not isinstance(data, dict):
            raise TrainCheckpointError(f"checkpoint {d}: data-iterator state is unreadable")
        got = jax.tree_util.tree_structure(state)
        want = jax.tree_util.tree_structure(abstract_state)
        if got != want:
            raise TrainCheckpointError(f"checkpoint {d}: state tree does not match the current model/optimizer")
        for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(abstract_state)):
            if a.shape != b.shape:
                raise TrainCheckpointError(f"checkpoint {d}: a tensor has shape {a.shape}, the model expects {b.shape}")
        return state, data


def to_host(tree: Any) -> Any:
    """Gather a (possibly sharded, possibly multi-host) tree to host numpy arrays."""
    if jax.process_count() > 1:
        return jax.tree_util.tree_map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


def export_ema(ema_params: Any, cfg, vae_params: Any, out: str, tokenizer=None, dtype=None) -> str:
    """Write ``ema_params`` as an official folder (``ema.safetensors``, ``ae.safetensors``, config files,
    tokenizer) that :func:`bagel_jax.loading.load_model` and the official code load."""
    model, vae = build_modules(cfg)
    host = to_host(ema_params)
    vae_host = to_host(vae_params)
    if jax.process_index() == 0:
        save_model(BagelModel(cfg, model, vae, host, vae_host, tokenizer), out, dtype=dtype)
        # The official loader reads the slow Qwen2 files (vocab.json + merges.txt); copy them from the source.
        src = getattr(getattr(tokenizer, "hf", None), "name_or_path", None)
        if src and os.path.isdir(src):
            for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
                if os.path.isfile(os.path.join(src, name)):
                    shutil.copyfile(os.path.join(src, name), os.path.join(out, name))
    return out


def load_train_state(directory: str, step: Optional[int] = None) -> Any:
    """Restore a saved train state as host arrays, without a target (for inspection and tests)."""
    ck = Checkpointer(directory, async_save=False)
    step = ck.latest() if step is None else step
    if step is None:
        raise TrainCheckpointError(f"no checkpoint in {directory}")
    ck._check(step)
    try:
        out = ck.mngr.restore(int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    except Exception as e:
        raise TrainCheckpointError(f"cannot restore checkpoint {directory}/{step}: {e}") from None
    finally:
        ck.close()
    return out["state"]

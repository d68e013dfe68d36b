"""Train-state checkpoints (orbax) and the export of EMA weights to an official model folder.

Layout of ``WORKDIR/checkpoints/<step>/``: ``state`` (params, EMA, optimiser state, step, rng, saved
with ``StandardSave``: sharded, restorable onto any mesh) and ``data`` (the data-iterator state, JSON).
Saves are asynchronous; the last ``keep`` are kept; :meth:`Checkpointer.restore` of the latest step is
what ``train.py`` does when a workdir already has checkpoints. Orbax writes each step to a temporary
directory and renames it when complete, so a run killed mid-save leaves the previous step as latest.

Anything unreadable (missing item, truncated or corrupted files, a state tree that does not match the
model) raises :class:`TrainCheckpointError` naming the step directory; we never fall back to a fresh start.
A save that fails (full disk, unwritable folder), also in the background, raises
:class:`CheckpointSaveError` at the next :meth:`Checkpointer.check`, ``save``, ``wait`` or ``close``;
the partial step directory is removed and the previous complete checkpoint stays the latest.
Error messages carry the first line of the cause only (TensorStore errors append their whole spec).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ..data.loader import load_groups
from ..loading import INFERENCE_DEFAULTS_FILE, BagelModel, build_modules, save_model
from .distributed import gather_data_state

ITEMS = ("state", "data")


class TrainCheckpointError(RuntimeError):
    pass


class CheckpointSaveError(TrainCheckpointError):
    """Writing a checkpoint failed (the run stops; the previous complete checkpoint is kept)."""


def short_error(e: BaseException, limit: int = 300) -> str:
    """``Type: first line`` of an exception, without TensorStore's appended spec dump."""
    text = re.split(r"\.? ?See full TensorStore details", str(e))[0].strip().splitlines()
    text = text[0] if text else ""
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True, to_disk=None):
        """``to_disk``: applied to every state before it is saved (the trainer's per-layer state -> the stacked
        layout of its checkpoints)."""
        self.directory = os.path.abspath(directory)
        self.to_disk = to_disk
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        try:
            self.mngr = ocp.CheckpointManager(self.directory, options=opts, item_names=ITEMS)
        except OSError as e:
            raise TrainCheckpointError(f"cannot open the checkpoint folder {self.directory}: "
                                       f"{short_error(e)}") from None
        self.pending: Optional[int] = None   # step of the save that may still be running
        self.failed = False
        self.closed = False

    def steps(self) -> list[int]:
        return sorted(self.mngr.all_steps())

    def latest(self) -> Optional[int]:
        return self.mngr.latest_step()

    def _guard(self, fn, *a, **kw):
        """Run a manager call; a failure of it, or of the background save it reports, becomes one
        :class:`CheckpointSaveError` (after which nothing more is saved)."""
        if self.failed:
            raise CheckpointSaveError(f"an earlier checkpoint save in {self.directory} failed")
        try:
            return fn(*a, **kw)
        except Exception as e:
            self.failed = True
            step = self.pending
            self._remove_partial()
            latest = self.latest()
            raise CheckpointSaveError(
                f"saving checkpoint {'step ' + str(step) if step is not None else ''} in {self.directory} "
                f"failed: {short_error(e)}; the latest complete checkpoint is "
                f"{'step ' + str(latest) if latest is not None else 'none'} (free space or fix the folder, "
                "then rerun to resume from it)") from None

    def _remove_partial(self) -> None:
        """Delete half-written step directories (orbax's ``*.orbax-checkpoint-tmp*``) to give back the space."""
        if jax.process_index() != 0 or not os.path.isdir(self.directory):
            return
        for name in os.listdir(self.directory):
            if ".orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def save(self, step: int, state: Any, data_state: dict, force: bool = True) -> bool:
        # orbax waits for the previous save inside save(); waiting here first reports its failure
        # under its own step
        self.wait()
        self.pending = int(step)
        data_state = gather_data_state(data_state)   # multi-host: every process's rows
        if self.to_disk is not None:
            state = self.to_disk(state)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
        return self._guard(self.mngr.save, int(step), args=args, force=force)

    def check(self) -> None:
        """Raise :class:`CheckpointSaveError` now if a background save has failed (cheap; call each step)."""
        self._guard(self.mngr.check_for_errors)

    def wait(self) -> None:
        self._guard(self.mngr.wait_until_finished)

    def close(self) -> None:
        """Wait for the last save and release the manager; after a failed save only release it. Idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            if not self.failed:
                self.wait()
        finally:
            try:
                self.mngr.close()
            except Exception:  # the failure was reported already
                pass

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
            raise TrainCheckpointError(f"cannot restore checkpoint {d}: {short_error(e)}. The checkpoint is "
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


def inference_defaults(out: str, data_dir: str, dcfg, init=None) -> dict:
    """Write ``OUT/inference.json`` (:func:`bagel_jax.loading.folder_defaults`) with the image sizes
    the run trained on: the VAE transform of the generation group (``t2i_pretrain``, else
    ``unified_edit``), the ViT transform of ``vlm_sft`` (else ``unified_edit``), and ``image_size`` = the
    VAE transform's ``max_image_size`` within the largest ``data.vae_hw_buckets`` entry. Keys the data
    does not determine come from the init folder's ``inference.json`` when it has one."""
    src = os.path.join(init, INFERENCE_DEFAULTS_FILE) if isinstance(init, str) else ""
    out_d = {}
    if os.path.isfile(src):
        with open(src) as f:
            out_d = json.load(f)
    groups = load_groups(data_dir, dcfg)
    edit = groups.get("unified_edit") or {}
    vae = (groups.get("t2i_pretrain") or edit).get("image_transform_args")
    vit = (groups.get("vlm_sft") or {}).get("image_transform_args") or \
        edit.get("vit_image_transform_args", edit.get("image_transform_args"))
    keys = ("max_image_size", "min_image_size", "image_stride", "max_pixels")
    if vae:
        out_d["vae_transform"] = {k: int(vae[k]) for k in keys if k in vae}
        bh, bw = max(dcfg.vae_hw_buckets, key=lambda b: b[0] * b[1])
        side = int(vae["max_image_size"])
        out_d["image_size"] = [min(side, int(bh)), min(side, int(bw))]
    if vit:
        out_d["vit_transform"] = {k: int(vit[k]) for k in keys if k in vit}
    with open(os.path.join(out, INFERENCE_DEFAULTS_FILE), "w") as f:
        json.dump(out_d, f)
    return out_d


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
        raise TrainCheckpointError(f"cannot restore checkpoint {directory}/{step}: {short_error(e)}") from None
    finally:
        ck.close()
    return out["state"]

"""Checked conversion between official safetensors files and our Flax params.

Loading (:func:`load_params`):
  1. read the file's header (memory-mapped, nothing loaded yet);
  2. compare its tensor names with the key map: any missing or unexpected tensor is an error naming it;
  3. compare every tensor's shape with ``jax.eval_shape`` of the model (after the layout transform);
  4. build each leaf directly on its target sharding with ``jax.make_array_from_callback``: each device
     shard reads only its slice of the memory map (transposed / stacked / cast on the fly), so a large
     model is never materialised twice in host memory.

Exporting (:func:`export_params`) writes the official names and layouts.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from . import keymap
from .safetensors_io import SafeTensorsFile, save_file


class CheckpointError(ValueError):
    """A checkpoint file is missing, or has a missing, unexpected or mis-shaped tensor."""


def _flatten(tree, prefix=()) -> dict[tuple[str, ...], Any]:
    out = {}
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            out.update(_flatten(v, prefix + (k,)))
    else:
        out[prefix] = tree
    return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        keymap._set(tree, path, v)
    return tree


def _leaf_reader(f: SafeTensorsFile, entries: list[keymap.Entry], dtype) -> Callable:
    """Callback ``index -> np.ndarray`` producing a slice of the Flax leaf from the file."""
    stacked = entries[0].layer is not None

    def read(index):
        if stacked:
            sel = range(len(entries))[index[0]]
            rest = tuple(index[1:])
            parts = [keymap.to_flax_layout(f.get(entries[i].official), entries[i].transform)[rest] for i in sel]
            arr = np.stack(parts) if parts else np.zeros((0,), np.float32)
        else:
            e = entries[0]
            arr = keymap.to_flax_layout(f.get(e.official), e.transform)[tuple(index)]
        return np.asarray(arr, dtype=dtype)

    return read


def check_file(f: SafeTensorsFile, entries: list[keymap.Entry], expected: Mapping, name: str) -> None:
    """Raise :class:`CheckpointError` on any missing, unexpected or mis-shaped tensor."""
    want = {e.official for e in entries}
    have = set(f.keys())
    missing = sorted(want - have)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{name}: missing tensor '{missing[0]}'{more}")
    unexpected = sorted(have - want)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{name}: unexpected tensor '{unexpected[0]}'{more}")
    flat = _flatten(expected)
    for path, es in keymap.group_by_leaf(entries).items():
        if path not in flat:
            raise CheckpointError(f"{name}: key map points '{es[0].official}' at unknown parameter {'/'.join(path)}")
        shape = tuple(flat[path].shape)
        per = shape[1:] if es[0].layer is not None else shape
        if es[0].layer is not None and shape[0] != len(es):
            raise CheckpointError(f"{name}: parameter {'/'.join(path)} has {shape[0]} layers, file has {len(es)}")
        want_shape = keymap.official_shape(per, es[0].transform)
        for e in es:
            if f.shape(e.official) != want_shape:
                raise CheckpointError(f"{name}: tensor '{e.official}' has shape {list(f.shape(e.official))}, "
                                      f"expected {list(want_shape)}")
    leaves = set(flat)
    mapped = set(keymap.group_by_leaf(entries))
    unmapped = sorted(leaves - mapped)
    if unmapped:
        raise CheckpointError(f"{name}: parameter {'/'.join(unmapped[0])} has no tensor in the key map")


def load_params(path: str, entries: list[keymap.Entry], expected: Mapping, dtype=None,
                shardings: Optional[Mapping] = None,
                leaf_fn: Optional[Callable[[tuple, jax.Array], Mapping[tuple, Any]]] = None) -> dict:
    """Load and check one safetensors file into a params tree.

    Args:
      path: the ``.safetensors`` file.
      entries: the module's key map.
      expected: params tree of ``jax.ShapeDtypeStruct`` (``jax.eval_shape`` of init).
      dtype: storage dtype of the result (default: the expected dtype of each leaf).
      shardings: optional tree (same structure) of ``jax.sharding.Sharding``; default: the first device.
      leaf_fn: optional ``(path, array) -> {path: leaf}`` applied to each leaf as soon as it is built, before
        the next one is read (e.g. :func:`bagel_jax.quantize.leaf_quantizer`: the float kernel is replaced by
        its int8 form and freed, so the load's peak stays near the final tree plus one float leaf).
    """
    f = SafeTensorsFile(path)
    check_file(f, entries, expected, path)
    for e in entries:   # weights are floats: an integer tensor would be cast into garbage
        f.require_float(e.official)
    flat_exp = _flatten(expected)
    flat_shard = _flatten(shardings) if shardings is not None else {}
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    out = {}
    for p, es in keymap.group_by_leaf(entries).items():
        leaf = flat_exp[p]
        dt = np.dtype(dtype if dtype is not None else leaf.dtype)
        sharding = flat_shard.get(p, default)
        arr = jax.make_array_from_callback(tuple(leaf.shape), sharding, _leaf_reader(f, es, dt))
        out.update(leaf_fn(p, arr) if leaf_fn is not None else {p: arr})
    return _unflatten(out)


def export_params(params: Mapping, entries: list[keymap.Entry], path: str, dtype=None,
                  metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write params under the official names and layouts (optionally cast, e.g. to float32 / bfloat16)."""
    host = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), dict(params))
    tensors = keymap.params_to_tensors(entries, host)
    if dtype is not None:
        tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    save_file(tensors, path, metadata=dict(metadata or {"format": "pt"}))

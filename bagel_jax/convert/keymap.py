"""Key maps between official (PyTorch) tensor names and our Flax parameter paths.

Every model module exposes ``key_map(cfg) -> list[Entry]``: one entry per official tensor, saying
where it lives in our parameter tree and how its layout changes. The loader and the exporter
(``bagel_jax.convert.official``) are driven only by these lists, so a reader can check a mapping
by reading one function per module.

Layouts:
  * ``linear``: PyTorch ``Linear.weight`` ``(out, in)`` <-> Flax ``Dense`` kernel ``(in, out)``.
  * ``conv``:   PyTorch conv weight ``(O, I, kh, kw)`` <-> Flax ``Conv`` kernel ``(kh, kw, I, O)``.
  * ``copy``:   same layout (biases, norm scales, embeddings, position tables).

Layers run under ``nn.scan`` store their parameters stacked on a leading axis; such entries carry
``layer=i``: the official tensor is slice ``i`` of the Flax leaf.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

TRANSFORMS = ("linear", "conv", "copy")


@dataclasses.dataclass(frozen=True)
class Entry:
    official: str               # official tensor name, e.g. "language_model.model.norm.weight"
    path: tuple[str, ...]       # Flax parameter path, e.g. ("language_model", "norm", "scale")
    transform: str = "copy"     # one of TRANSFORMS
    layer: int | None = None    # slice of the (scanned) leading axis of the Flax leaf, or None

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r} for {self.official}")


def to_flax_layout(x: np.ndarray, transform: str) -> np.ndarray:
    if transform == "linear":
        return np.swapaxes(x, 0, 1) if x.ndim == 2 else x
    if transform == "conv":
        return np.transpose(x, (2, 3, 1, 0))
    return x


def to_official_layout(x: np.ndarray, transform: str) -> np.ndarray:
    if transform == "linear":
        return np.swapaxes(x, 0, 1) if x.ndim == 2 else x
    if transform == "conv":
        return np.transpose(x, (3, 2, 0, 1))
    return x


def official_shape(flax_shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
    """Official tensor shape for a (per-layer) Flax shape."""
    if transform == "linear" and len(flax_shape) == 2:
        return (flax_shape[1], flax_shape[0])
    if transform == "conv":
        kh, kw, i, o = flax_shape
        return (o, i, kh, kw)
    return tuple(flax_shape)


def prefixed(entries: Iterable[Entry], official_prefix: str, path_prefix: tuple[str, ...]) -> list[Entry]:
    """Mount a sub-module's entries under a prefix (e.g. the LLM under "language_model.")."""
    return [dataclasses.replace(e, official=official_prefix + e.official, path=path_prefix + e.path)
            for e in entries]


def linear(official: str, path: tuple[str, ...], bias: bool = True, layer: int | None = None) -> list[Entry]:
    """Entries for one PyTorch ``Linear`` (``official`` without the ``.weight`` suffix)."""
    out = [Entry(official + ".weight", path + ("kernel",), "linear", layer)]
    if bias:
        out.append(Entry(official + ".bias", path + ("bias",), "copy", layer))
    return out


def conv(official: str, path: tuple[str, ...], bias: bool = True, layer: int | None = None) -> list[Entry]:
    out = [Entry(official + ".weight", path + ("kernel",), "conv", layer)]
    if bias:
        out.append(Entry(official + ".bias", path + ("bias",), "copy", layer))
    return out


def norm(official: str, path: tuple[str, ...], bias: bool, layer: int | None = None) -> list[Entry]:
    """RMSNorm (``scale`` only) or LayerNorm/GroupNorm (``scale`` and ``bias``)."""
    out = [Entry(official + ".weight", path + ("scale",), "copy", layer)]
    if bias:
        out.append(Entry(official + ".bias", path + ("bias",), "copy", layer))
    return out


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def group_by_leaf(entries: Iterable[Entry]) -> dict[tuple[str, ...], list[Entry]]:
    """Entries per Flax leaf; stacked leaves list their entries in layer order."""
    groups: dict[tuple[str, ...], list[Entry]] = {}
    for e in entries:
        groups.setdefault(e.path, []).append(e)
    for path, es in groups.items():
        layers = [e.layer for e in es]
        if len(es) > 1 or layers[0] is not None:
            if any(l is None for l in layers) or sorted(layers) != list(range(len(layers))):
                raise ValueError(f"key map: leaf {'/'.join(path)} has inconsistent layer entries {layers}")
            es.sort(key=lambda e: e.layer)
    return groups


def tensors_to_params(entries: Iterable[Entry], tensors) -> dict:
    """Convert a mapping ``official name -> numpy array`` into a nested Flax params dict.

    No checks beyond presence: use ``bagel_jax.convert.official`` for checked loading.
    """
    params: dict = {}
    for path, es in group_by_leaf(entries).items():
        arrs = [to_flax_layout(np.asarray(tensors[e.official]), e.transform) for e in es]
        _set(params, path, np.stack(arrs) if es[0].layer is not None else arrs[0])
    return params


def params_to_tensors(entries: Iterable[Entry], params) -> dict[str, np.ndarray]:
    """The reverse of :func:`tensors_to_params`: official names and layouts."""
    out: dict[str, np.ndarray] = {}
    for path, es in group_by_leaf(entries).items():
        leaf = np.asarray(_get(params, path))
        for e in es:
            x = leaf[e.layer] if e.layer is not None else leaf
            out[e.official] = np.ascontiguousarray(to_official_layout(x, e.transform))
    return out

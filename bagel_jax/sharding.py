"""Device mesh over ``(data, fsdp, tensor)`` and the logical-axis rules for BAGEL's parameters.

* ``data``: pure data parallelism (params replicated along it);
* ``fsdp``: data parallelism with parameters, gradients, optimiser state and EMA sharded along it
  (ZeRO-3 style: XLA all-gathers a weight where it is used);
* ``tensor``: Megatron-style model parallelism over attention heads, MLP width and vocabulary.

Packed training batches carry a leading ``packs`` axis that is split over ``("data", "fsdp")``.
The same code runs on one device (every axis size 1) and on many.

Parameter rules (:data:`RULES`) map a regular expression over the ``/``-joined parameter path to
the *logical* axes of the trailing dimensions; stacked layer axes (``nn.scan``) are left unsharded.
:data:`LOGICAL_TO_MESH` maps logical axes to mesh axes. A dimension that is not divisible by its
mesh axis size is replicated instead, so tiny test models shard on any mesh.
The same rules apply to any tree whose dict keys end in a parameter path (optimiser moments, EMA).

Activations carry logical names too (:data:`ACTIVATION_RULES`, a separate table because ``embed``
means the fsdp-sharded weight dimension for a parameter but a replicated feature dimension for an
activation). :func:`constrain` pins an activation to its layout under the mesh of the current
``jax.set_mesh`` scope (:func:`mesh_scope`) and does nothing without one, so the single-device path
is unchanged. The models pass their table explicitly (``ModelOptions.activation_rules``: this table, or with
``seq_parallel=True`` the same with ``res_length`` over ``tensor``, :func:`with_rules`). Layout of the decoder
and ViT activations:

* ``batch`` over ``(data, fsdp)``: rows / packs are the data-parallel axis. Inside the train step
  the per-pack forward runs under ``jax.vmap`` (batch 1 per pack); ``vmap`` leaves the packs axis
  unconstrained, so it keeps the ``(data, fsdp)`` split of the input batch.
* ``heads`` / ``kv_heads`` / ``mlp`` / ``vocab`` over ``tensor`` (Megatron): q, k, v and the attention
  output per head, the MLP hidden, the logits.
* ``res_length``: the sequence axis of the residual stream between sublayers. Default whole
  (replicated over ``tensor``). ``ModelOptions(seq_parallel=True)`` turns on Megatron sequence
  parallelism: the per-layer activations remat keeps are then split over the tensor axis
  (the all-reduce after ``o_proj`` / ``down_proj`` becomes a reduce-scatter, the projections gather
  the sequence first: same traffic). Not the default because the two-expert routing slices the
  residual along the sequence (markers / und / gen tokens), which XLA then reshards through a full
  copy ("involuntary full rematerialization" on the demo model at tensor 2); ``bench/aot_7b.py
  --seq-parallel`` measures it. ``length`` (the sequence inside attention and the MLP) stays whole.
* Why not the sequence over ``fsdp``: a pack is never split across devices (``packs_per_step`` must be
  a multiple of ``data * fsdp``), so at one pack per device ``fsdp`` is already taken by ``batch``;
  splitting one pack's sequence over fsdp would need every attention to gather all keys (ring or
  all-gather attention) and buys nothing at that batch size.
* the KV cache ``[layers, batch, capacity, kv_heads, head_dim]`` over ``batch`` and ``kv_heads``.
"""

from __future__ import annotations

import re
import contextlib
import types
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_TO_MESH = {
    "embed": "fsdp",     # model width
    "vocab": "tensor",
    "heads": "tensor",   # q/k/v output features (= heads x head_dim)
    "mlp": "tensor",     # MLP hidden width
    None: None,
}

# (pattern on the "/"-joined path, logical axes of the trailing dims). First match wins.
RULES: list[tuple[str, tuple]] = [
    (r"pos_embed|position_embedding", (None, None)),                      # fixed / small lookup tables
    (r"embed_tokens/embedding$", ("vocab", "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
    (r"(q|k|v)_proj[^/]*/kernel$", ("embed", "heads")),
    (r"(q|k|v)_proj[^/]*/bias$", ("heads",)),
    (r"(o_proj[^/]*|out_proj)/kernel$", ("heads", "embed")),
    (r"(gate_proj|up_proj|fc1)/kernel$", ("embed", "mlp")),
    (r"(down_proj|fc2)/kernel$", ("mlp", "embed")),
    (r"fc1/bias$", ("mlp",)),
    (r"/kernel$", ("embed", None)),                                       # other dense layers
    (r".*", ()),                                                          # norms, biases, scalars
]


# Logical activation axes -> mesh axes (a tuple = split over several mesh axes, major first). Read-only: a
# different table is passed (with_rules, ModelOptions.activation_rules), never patched in.
ACTIVATION_RULES: Mapping = types.MappingProxyType({
    "batch": BATCH_AXES,
    "length": None,           # the sequence inside attention / the MLP
    "res_length": None,       # the residual stream between sublayers ("tensor": sequence parallelism)
    "cache_length": None,     # KV-cache slots
    "embed": None,            # model width of an activation
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
    None: None,
})


class MeshError(ValueError):
    pass


def parse_mesh(spec: Optional[str]) -> dict[str, int]:
    """``"data=2,fsdp=2,tensor=2"`` -> dict (missing axes = 1; ``fsdp=-1`` = all remaining devices)."""
    out = {a: 1 for a in AXES}
    if not spec:
        return out
    for part in spec.split(","):
        if "=" not in part:
            raise MeshError(f"--mesh: expected axis=size pairs like data=2,fsdp=4,tensor=1, got {part!r}")
        k, v = part.split("=", 1)
        k = k.strip()
        if k not in AXES:
            raise MeshError(f"--mesh: unknown axis {k!r} (axes: {', '.join(AXES)})")
        try:
            out[k] = int(v)
        except ValueError:
            raise MeshError(f"--mesh: size of {k} must be an integer, got {v!r}") from None
    return out


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Optional[Sequence] = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh; one size may be -1 (= the remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise MeshError("--mesh: at most one axis may be -1")
    if -1 in sizes:
        rest = int(np.prod([s for s in sizes if s != -1]))
        if len(devices) % rest:
            raise MeshError(f"--mesh: {len(devices)} devices are not divisible by {rest}")
        sizes[sizes.index(-1)] = len(devices) // rest
    if any(s < 1 for s in sizes):
        raise MeshError(f"--mesh: axis sizes must be >= 1, got {dict(zip(AXES, sizes))}")
    n = int(np.prod(sizes))
    if n != len(devices):
        raise MeshError(f"--mesh {dict(zip(AXES, sizes))} needs {n} devices but {len(devices)} are available")
    arr = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(arr, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _path_str(path) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(str(k.name))
    return "/".join(parts)


def logical_axes(path: str, ndim: int) -> tuple:
    for pat, axes in RULES:
        if re.search(pat, path):
            if len(axes) > ndim:
                return (None,) * ndim
            return (None,) * (ndim - len(axes)) + tuple(axes)
    return (None,) * ndim  # pragma: no cover


def spec_for(path: str, shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec of a parameter (or a same-shaped optimiser / EMA leaf) at ``path``."""
    spec = []
    used = set()
    for dim, lax_name in zip(shape, logical_axes(path, len(shape))):
        ax = LOGICAL_TO_MESH[lax_name]
        if ax is None or ax in used or mesh.shape[ax] == 1 or dim % mesh.shape[ax]:
            spec.append(None)
        else:
            spec.append(ax)
            used.add(ax)
    return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for every array leaf of ``tree`` (params, optimiser state, EMA, ...) by name rules."""
    def one(path, leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, spec_for(_path_str(path), shape, mesh))
    return jax.tree_util.tree_map_with_path(one, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int, packs_axis: int = 1) -> NamedSharding:
    """Arrays ``[accum, packs, ...]``: ``packs`` split over ``(data, fsdp)``."""
    spec = [None] * ndim
    spec[packs_axis] = BATCH_AXES
    return NamedSharding(mesh, P(*spec))


def batch_shardings(batch: dict, mesh: Mesh) -> dict:
    return {k: batch_sharding(mesh, np.ndim(v) if not hasattr(v, "ndim") else v.ndim) for k, v in batch.items()}


def num_batch_shards(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble the global batch from this process's local packs (multi-host safe)."""
    out = {}
    for k, v in batch.items():
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
    return out


def shard_params(params: Any, mesh: Mesh) -> Any:
    return jax.device_put(params, tree_shardings(params, mesh))


def describe(tree: Any, mesh: Mesh) -> list[str]:
    """One line per leaf: path, shape, spec (for logs and tests)."""
    lines = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        p = _path_str(path)
        lines.append(f"{p} {tuple(leaf.shape)} {spec_for(p, leaf.shape, mesh)}")
    return lines


def _mesh_axes(rule) -> tuple:
    if rule is None:
        return ()
    return (rule,) if isinstance(rule, str) else tuple(rule)


def with_rules(**overrides) -> dict:
    """:data:`ACTIVATION_RULES` with some logical axes mapped elsewhere (e.g. ``res_length="tensor"``): a new
    table, to pass to :func:`constrain`; the module table is unchanged."""
    unknown = set(overrides) - set(ACTIVATION_RULES)
    if unknown:
        raise ValueError(f"activation rules: unknown logical axes {sorted(unknown)}")
    return {**ACTIVATION_RULES, **overrides}


def activation_spec(names: Sequence[Optional[str]], shape: Sequence[int], mesh_shape: dict,
                    rules: Mapping = ACTIVATION_RULES) -> P:
    """PartitionSpec of an activation with logical axis ``names`` (one per dimension) under ``rules``
    (logical axis -> mesh axes; default :data:`ACTIVATION_RULES`).

    A mesh axis of size 1, one already used by an earlier dimension, or one whose size does not
    divide the dimension (times the axes kept before it) is dropped, as for parameters."""
    if len(names) != len(shape):
        raise ValueError(f"constrain: {len(names)} axis names {tuple(names)} for an array of shape {tuple(shape)}")
    spec, used = [], set()
    for dim, name in zip(shape, names):
        if name not in rules:
            raise ValueError(f"constrain: unknown logical axis {name!r} (known: "
                             f"{', '.join(sorted(str(k) for k in rules if k))})")
        kept, size = [], 1
        for ax in _mesh_axes(rules[name]):
            n = mesh_shape.get(ax, 1)
            if n == 1 or ax in used or dim % (size * n):
                continue
            kept.append(ax)
            size *= n
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*spec)


def constrain(x: jax.Array, names: Sequence[Optional[str]], rules: Mapping = ACTIVATION_RULES) -> jax.Array:
    """``with_sharding_constraint`` of ``x`` to the layout of its logical axis ``names`` (under ``rules``) on
    the current mesh (``jax.set_mesh`` / :func:`mesh_scope`); ``x`` unchanged without a mesh or on one device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    spec = activation_spec(names, x.shape, dict(mesh.shape), rules)
    return jax.lax.with_sharding_constraint(x, spec)


def mesh_scope(mesh: Optional[Mesh]):
    """``jax.set_mesh(mesh)`` (activations of functions traced inside follow the rules they are given,
    :func:`constrain`), or a no-op context for ``None``."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def mesh_of(shardings: Any) -> Optional[Mesh]:
    """The mesh of the first ``NamedSharding`` in a tree of shardings (None if there is none)."""
    for s in jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)):
        if isinstance(s, NamedSharding):
            return s.mesh
    return None

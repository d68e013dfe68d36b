"""How a layer stack runs: one ``nn.scan`` over stacked parameters, or an unrolled Python loop over
per-layer parameter arrays.

``"scan"`` (training, sharded inference, accelerators): the parameters of all layers are stacked on a
leading axis under ``.../layers/...`` and one compiled layer body runs them in turn. On XLA:CPU each trip
copies its layer's weights out of the stacked arrays (a ``dynamic-slice`` fusion the matmul cannot read
through): measured on the 2-core CPU with the perf harness's small model, 58% of the op time of greedy
decoding and 19% of a flow step were those copies.

``"unrolled"`` (single-device CPU inference): every layer has its own parameter arrays, under
``.../layers_0/...``, ``.../layers_1/...``, and the stack is a Python loop, so a matmul reads its weights
where they lie. The compiled program is larger (compile time grows with the layer count); the results are
the same computation. :func:`unstack` / :func:`stack` convert a params tree between the two layouts (only
the subtrees named ``layers``; everything else is shared, not copied).

``"auto"`` (:func:`resolve`): ``"unrolled"`` on a single CPU device, else ``"scan"``.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import jax
import jax.numpy as jnp

LAYER_LOOPS = ("scan", "unrolled")
SCANNED = "layers"                      # the name of every scanned layer stack's parameter subtree
_UNROLLED = re.compile(r"^layers_(\d+)$")


def validate(name: str, auto: bool = True) -> str:
    """``name`` if it is a layer loop (or ``"auto"`` when ``auto``), else a ValueError naming the choices."""
    choices = (("auto",) if auto else ()) + LAYER_LOOPS
    if name not in choices:
        raise ValueError(f"unknown layer loop {name!r}; choose one of {', '.join(choices)}")
    return name


def resolve(name: str, mesh: Optional[Any] = None) -> str:
    """``"auto"`` -> ``"unrolled"`` on one CPU device (``mesh`` None or of size 1), else ``"scan"``."""
    validate(name)
    if name != "auto":
        return name
    one_device = mesh is None or getattr(mesh, "size", 1) == 1
    return "unrolled" if one_device and jax.default_backend() == "cpu" else "scan"


def unstack(params: Any, consume: bool = False) -> Any:
    """Scan layout -> unrolled layout: every ``layers`` subtree (leaves ``[n, ...]``) becomes
    ``layers_0 .. layers_{n-1}`` (leaves ``[...]``). Other subtrees are returned as they are.
    ``consume``: delete each stacked array once it is split (the peak is then the tree plus one array;
    the input tree is unusable afterwards)."""
    if not hasattr(params, "items"):
        return params
    out = {}
    for k, v in params.items():
        if k == SCANNED and hasattr(v, "items"):
            flat, treedef = jax.tree_util.tree_flatten(v)
            n = flat[0].shape[0]
            per_layer = [[] for _ in range(n)]
            for a in flat:
                if a.shape[:1] != (n,):
                    raise ValueError(f"a scanned layer stack's arrays must share the leading axis {n}: {a.shape}")
                for i in range(n):
                    per_layer[i].append(a[i])
                if consume and isinstance(a, jax.Array):
                    a.delete()
            for i in range(n):
                out[f"{SCANNED}_{i}"] = jax.tree_util.tree_unflatten(treedef, per_layer[i])
        else:
            out[k] = unstack(v, consume)
    return out


def stack(params: Any) -> Any:
    """Unrolled layout -> scan layout (the inverse of :func:`unstack`)."""
    if not hasattr(params, "items"):
        return params
    out, layers = {}, {}
    for k, v in params.items():
        m = _UNROLLED.match(k)
        if m and hasattr(v, "items"):
            layers[int(m.group(1))] = v
        else:
            out[k] = stack(v)
    if layers:
        if sorted(layers) != list(range(len(layers))):
            raise ValueError(f"unrolled layers are not numbered 0..{len(layers) - 1}: {sorted(layers)}")
        out[SCANNED] = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[layers[i] for i in range(len(layers))])
    return out


def like(tree: Any, params: Any) -> Any:
    """``tree`` (per-leaf values of the scan layout: a trainable mask, optimiser labels) laid out like
    ``params``: where ``params`` holds ``layers_0 .. layers_{n-1}`` and ``tree`` one ``layers`` subtree, every
    layer gets that subtree (the values are per stack, not per layer). A ``tree`` already laid out like
    ``params`` is returned as it is."""
    if not (hasattr(tree, "items") and hasattr(params, "items")):
        return tree
    out = {}
    for k, v in params.items():
        if k not in tree and _UNROLLED.match(k) and SCANNED in tree:
            out[k] = like(tree[SCANNED], v)
        else:
            out[k] = like(tree[k], v)
    return out


def relayout(tree: Any, target: Any) -> Any:
    """The values of ``tree`` laid out like ``target`` (a pytree of the same values in either layout, e.g.
    ``jax.ShapeDtypeStruct`` s): a whole train state with its optimiser state, whose containers
    (optax's named tuples) :func:`unstack` / :func:`stack` do not enter. Leaves are matched by path:
    ``.../layers_i/...`` of ``target`` is slice ``i`` of ``.../layers/...`` of ``tree``, ``.../layers/...`` stacks
    ``.../layers_0/...`` .. in order, any other path is taken as it is. A leaf ``target`` names but ``tree``
    lacks is a KeyError."""
    src = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    def pick(path, t):
        k = jax.tree_util.keystr(path)
        if k in src:
            return src[k]
        for i, entry in enumerate(path):
            name = getattr(entry, "key", None)
            if not isinstance(name, str):
                continue
            swap = lambda new: jax.tree_util.keystr(path[:i] + (jax.tree_util.DictKey(new),) + path[i + 1:])
            m = _UNROLLED.match(name)
            if m and swap(SCANNED) in src:
                return src[swap(SCANNED)][int(m.group(1))]
            if name == SCANNED and swap(f"{SCANNED}_0") in src:
                return jnp.stack([src[swap(f"{SCANNED}_{j}")] for j in range(t.shape[0])])
        raise KeyError(f"{k}: not in the tree to lay out (in neither layout)")

    return jax.tree_util.tree_map_with_path(pick, target)


def layout_of(params: Any) -> Optional[str]:
    """"scan" or "unrolled" by the names in ``params`` (None when it has no layer stack)."""
    if not hasattr(params, "items"):
        return None
    for k, v in params.items():
        if k == SCANNED and hasattr(v, "items"):
            return "scan"
        if _UNROLLED.match(k):
            return "unrolled"
        found = layout_of(v)
        if found:
            return found
    return None

"""int8 weight-only quantization of the decoder's (and optionally the ViT's) linear layers.

Per-output-channel symmetric int8: a kernel ``w [..., in, out]`` becomes ``q = round(w / s)`` in int8
(``[-127, 127]``) with ``s = max|w[..., :, j]| / 127`` per output channel, a float32 ``scale [..., out]``.
The params tree then holds ``{"kernel": int8, "scale": float32, "bias": ...}`` for those layers, and
:class:`bagel_jax.nn.layers.QuantDense` (what ``ModelOptions(quantize="int8").dense`` builds) computes
``(x @ q.astype(dtype)) * scale`` inside its matmul: int8 is what sits in memory, the conversion is part of
the matmul's program (XLA may fuse it into the dot). Which layers are quantized is decided here, by
:data:`DECODER_TARGETS` / :data:`VIT_TARGETS` over the ``/``-joined parameter path (the same way as the
sharding rules); a dense layer without a ``scale`` in the tree runs in float as before.

Kept in the original dtype: the token embedding, the LM head, norms, biases, the connector, the latent
and timestep projections and the ViT patch embedding (small, or at the model's input/output where an
error is not averaged over a reduction).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("none", "int8")
QMAX = 127

# q/k/v/o projections and the SwiGLU MLP of both experts (``_moe_gen``) of every decoder layer.
DECODER_TARGETS = r"(^|/)language_model/model/layers/layer/([qkvo]_proj(_moe_gen)?|mlp(_moe_gen)?/(gate|up|down)_proj)/kernel$"
# attention projections and the MLP of every ViT layer (not the patch embedding).
VIT_TARGETS = r"(^|/)vit_model/encoder/layers/(self_attn/(q|k|v|out)_proj|mlp/fc[12])/kernel$"


def validate_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MODES`, else a ValueError naming the choices."""
    if mode not in MODES:
        raise ValueError(f"unknown quantize mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


def quantize_int8(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``w [..., in, out]`` -> ``(q int8 [..., in, out], scale float32 [..., out])`` with
    ``|w - q * scale| <= scale / 2`` (round to nearest; ``|w| <= 127 * scale`` so nothing is clipped).
    An all-zero channel gets scale 0 and q 0."""
    wf = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(wf), axis=-2) / QMAX                          # [..., out]
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(wf / safe[..., None, :]), -QMAX, QMAX).astype(jnp.int8)
    return q, scale


def dequantize_int8(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    """The float kernel ``q * scale`` (for tests and inspection; the model never builds it whole)."""
    return (q.astype(jnp.float32) * scale[..., None, :]).astype(dtype)


_quantize_jit = jax.jit(quantize_int8)


def _targets(vit: bool) -> list:
    return [re.compile(DECODER_TARGETS)] + ([re.compile(VIT_TARGETS)] if vit else [])


def _is_target(path: str, v, rules) -> bool:
    """Whether the leaf at ``/``-joined ``path`` is a float kernel the rules quantize."""
    return path.rsplit("/", 1)[-1] == "kernel" and v.dtype != jnp.int8 and any(r.search(path) for r in rules)


def _quantize_kernel(v, consume: bool):
    """``(int8 kernel, scale)`` of a float kernel; with ``consume`` the float array is deleted once the int8
    copy exists (arrays only: under ``jax.eval_shape`` nothing is deleted)."""
    q, scale = _quantize_jit(v)
    if consume and isinstance(v, jax.Array):
        jax.block_until_ready((q, scale))
        v.delete()
    return q, scale


def leaf_quantizer(mode: str = "int8", vit: bool = False) -> Optional[Callable[[tuple, Any], dict]]:
    """The per-leaf form of :func:`quantize_params` for loaders (``official.load_params(..., leaf_fn=)``):
    ``(path, array) -> {path: leaf}``; a target float kernel (by the ``/``-joined path, as
    :func:`quantize_params`) becomes ``{path: int8 kernel, path[:-1] + ("scale",): scale}`` and the float
    array is deleted once the int8 copy is computed, so a load holds at most one float kernel stack
    beyond the tree built so far. None for mode "none"."""
    if validate_mode(mode) == "none":
        return None
    rules = _targets(vit)

    def fn(path: tuple, v) -> dict:
        if not _is_target("/".join(str(k) for k in path), v, rules):
            return {path: v}
        q, scale = _quantize_kernel(v, consume=True)
        return {path: q, path[:-1] + ("scale",): scale}

    return fn


def quantize_params(params: Mapping, mode: str = "int8", vit: bool = False, consume: bool = False) -> dict:
    """A copy of the params tree with the target kernels (:data:`DECODER_TARGETS`, plus :data:`VIT_TARGETS`
    when ``vit``) replaced by int8 kernels and float32 per-output-channel ``scale`` leaves beside them; every
    other leaf is the same object. ``mode`` "none" returns ``params`` unchanged. Kernels already int8 are
    left as they are. ``consume``: delete each float kernel once quantized (a tree nobody else holds), so
    the peak memory is the float tree plus one layer stack's int8 copy (:func:`bagel_jax.loading.load_model`
    quantizes while it loads instead, :func:`leaf_quantizer`). Works on ``jax.ShapeDtypeStruct`` trees
    under ``jax.eval_shape``. Each kernel is quantized where it lives (a sharded kernel stays sharded)."""
    if validate_mode(mode) == "none":
        return params
    rules = _targets(vit)

    def walk(tree: Mapping, path: str) -> dict:
        out = {}
        for k, v in tree.items():
            p = f"{path}/{k}" if path else str(k)
            if isinstance(v, Mapping):
                out[k] = walk(v, p)
            elif _is_target(p, v, rules):
                out["kernel"], out["scale"] = _quantize_kernel(v, consume)
            else:
                out[k] = v
        return out

    return walk(params, "")


def param_bytes(tree: Any) -> int:
    """Bytes of every array leaf of ``tree`` (arrays or ``jax.ShapeDtypeStruct``)."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def cast_floats(tree: Any, dtype) -> Any:
    """``tree`` with every floating leaf cast to ``dtype`` (int8 kernels unchanged): the reference a
    quantized tree is measured against (e.g. the same tree in bfloat16)."""
    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return jax.tree_util.tree_map(cast, tree)

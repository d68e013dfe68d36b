"""Static-shape KV cache and the cached forward of one query chunk (docs/architecture.md#kv-cache).

The cache holds, per layer, post-norm post-RoPE keys and values of everything already in a
context, ``[layers, batch, capacity, kv_heads, head_dim]``, with a per-row ``length``. A chunk
attends to the valid cache slots plus itself:

* ``causal=True`` (text prefill / decoding): query ``i`` sees the cache and chunk tokens ``<= i``;
* ``causal=False`` (ViT / VAE-image prefill, flow steps): query sees the cache and the whole chunk.

``update=True`` appends the chunk's keys/values at ``length`` (prefill, decoding); flow steps pass
``update=False`` and never write the cache. Rolling back is moving ``length`` back.
The caller guarantees ``length + chunk_len <= capacity`` (checked on the host by the engine).

On a mesh the cache is split over rows (``batch`` -> data, fsdp) and kv heads (``kv_heads`` -> tensor),
the layout of the keys/values the attention produces (:data:`CACHE_AXES`, :mod:`bagel_jax.sharding`);
a dimension its mesh axes do not divide stays whole.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from .. import sharding as shd
from ..config import LLMConfig
from ..models.bagel import Bagel
from ..models.qwen2_mot import Routing
from ..nn import intermediates
from ..nn.attention import chunk_vectors


CACHE_AXES = ("layers", "batch", "cache_length", "kv_heads", "head_dim")


@flax.struct.dataclass
class KVCache:
    k: jax.Array        # [layers, batch, capacity, kv_heads, head_dim]
    v: jax.Array        # [layers, batch, capacity, kv_heads, head_dim]
    length: jax.Array   # [batch] int32 valid slots per row

    @staticmethod
    def empty(cfg: LLMConfig, batch: int, capacity: int, dtype=jnp.float32, mesh=None) -> "KVCache":
        """A zero cache; with ``mesh`` (a ``jax.sharding.Mesh``) placed on it by :data:`CACHE_AXES`."""
        shape = (cfg.num_hidden_layers, batch, capacity, cfg.num_key_value_heads, cfg.head_dim)
        if mesh is None:
            return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))
        kv = NamedSharding(mesh, shd.activation_spec(CACHE_AXES, shape, dict(mesh.shape)))
        rep = NamedSharding(mesh, PartitionSpec())
        return KVCache(jnp.zeros(shape, dtype, device=kv), jnp.zeros(shape, dtype, device=kv),
                       jnp.zeros((batch,), jnp.int32, device=rep))

    def constrained(self) -> "KVCache":
        """The same cache pinned to the :data:`CACHE_AXES` layout of the current mesh (no-op without one)."""
        return KVCache(shd.constrain(self.k, CACHE_AXES), shd.constrain(self.v, CACHE_AXES), self.length)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]


def append(cache: KVCache, k: jax.Array, v: jax.Array, q_len: jax.Array) -> KVCache:
    """Write chunk keys/values ``[layers, batch, Lq, kv_heads, head_dim]`` at each row's length."""
    def write(buf, new, start):  # buf [layers, capacity, K, dh], new [layers, Lq, K, dh]
        return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, start, 0, 0))
    wk = jax.vmap(write, in_axes=(1, 1, 0), out_axes=1)
    return KVCache(wk(cache.k, k, cache.length), wk(cache.v, v, cache.length), cache.length + q_len).constrained()


def forward_chunk(model: Bagel, params, cache: KVCache, x: jax.Array, positions: jax.Array, q_len: jax.Array,
                  causal: bool, routing: Routing, update: bool, is_gen: Optional[jax.Array] = None,
                  collect: bool = False, final_norm: bool = True):
    """Run a query chunk against a cache.

    Args:
      x: ``[batch, Lq, D]`` input embeddings; positions: ``[batch, Lq]`` RoPE positions;
      q_len: ``[batch]`` number of valid query tokens per row (the rest is padding).
      collect: also return what the decoder sows (``hidden``: every layer's output).
      final_norm: False returns the last layer's output before the decoder's final norms.
    Returns:
      ``(h, new_cache, intermediates)``: final-norm hidden states ``[batch, Lq, D]``; the cache with this
      chunk appended if ``update`` else the same cache; ``{name: value}`` (:mod:`bagel_jax.nn.intermediates`,
      empty unless ``collect``).
    """
    Lq = x.shape[1]
    # mask vectors of the chunk (causal or full; padding hidden); the valid cache slots are visible to every
    # query on top of them (bagel_jax.nn.attention.attention with a cache)
    vec = chunk_vectors(q_len, Lq, causal)
    (h, (k, v)), inter = intermediates.apply(model, {"params": params}, x, positions, vec, routing, is_gen,
                                             (cache.k, cache.v, cache.length), final_norm, method=Bagel.decode,
                                             collect=collect)
    if update:
        cache = append(cache, k, v, q_len)
    return h, cache, inter

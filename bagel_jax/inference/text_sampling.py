"""How a next token is chosen and how fed ids become text, shared by plain decoding
(:mod:`bagel_jax.inference.decode`) and speculative decoding (:mod:`bagel_jax.inference.speculative`,
:mod:`bagel_jax.inference.draft_lm`): :class:`SamplingParams`, the filtered distribution, the draws, and the
official text post-processing (docs/architecture.md#text-decoding)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Text sampling settings. ``do_sample=False`` is greedy (official default; temperature unused).

    temperature: softmax temperature when sampling (official app default 0.3).
    top_k: keep the k most likely tokens (0 = off). top_p: nucleus mass (1.0 = off).
    """

    do_sample: bool = False
    temperature: float = 0.3
    top_k: int = 0
    top_p: float = 1.0

    def validate(self) -> "SamplingParams":
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        return self


def filtered_logits(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """``logits [..., V]`` divided by ``temperature`` with everything outside top-k (0 = off) and top-p (the
    smallest prefix whose mass reaches ``top_p``, on the top-k filtered distribution) set to -inf: the
    distribution sampled by :func:`pick_next` (and by speculative decoding's rejection rule)."""
    x = logits.astype(jnp.float32) / temperature
    V = x.shape[-1]
    srt = -jnp.sort(-x, axis=-1)                                                   # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth = jnp.take_along_axis(srt, jnp.broadcast_to(k - 1, x.shape[:-1] + (1,)).astype(jnp.int32), axis=-1)
    srt = jnp.where(jnp.arange(V) < k, srt, -jnp.inf)
    probs = jax.nn.softmax(srt, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p                              # mass before each token
    thresh = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    return jnp.where((x < kth) | (x < thresh), -jnp.inf, x)


def pick_next(logits: jax.Array, keys: jax.Array, do_sample: bool, temperature, top_k, top_p) -> jax.Array:
    """``logits [B, V]`` -> next ids ``[B]`` (greedy, or temperature / top-k / top-p sampling with one
    PRNG key per row, ``keys [B, 2]``, so that a row's draws do not depend on the rest of the batch)."""
    if not do_sample:
        return jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
    x = filtered_logits(logits, temperature, top_k, top_p)
    return jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys, x).astype(jnp.int32)


def draw(key, logits):
    """One categorical draw per row of ``logits [B, V]`` with per-row keys ``[B, 2]``."""
    return jax.vmap(jax.random.categorical)(key, logits).astype(jnp.int32)


@dataclasses.dataclass
class TextResult:
    texts: list            # per row decoded text (official post-processing)
    token_ids: list        # per row np.ndarray of fed ids (starts with <|im_start|>)
    stop: list             # per row: the stop token id that ended it, or None (length limit)
    raw: dict              # arrays of the loop (tokens, n, stop, and logits / hidden if recorded)


def official_text(tokenizer, ids: Sequence[int]) -> str:
    """Official post-processing: decode all fed ids (special tokens kept), keep the part after the
    first ``<|im_start|>`` and before any ``<|im_end|>``."""
    s = tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
    s = s.split("<|im_end|>")[0]
    parts = s.split("<|im_start|>")
    return parts[1] if len(parts) > 1 else parts[0]

"""Text generation as one ``lax.while_loop`` (docs/architecture.md#text-decoding).

Official semantics, per row: the fed sequence starts with ``<|im_start|>`` at the context's RoPE
counter; each step feeds the current token (und expert, causal, written to a copy of the cache),
computes the next-token logits and picks the next token; it stops when the picked token is a stop
token (not appended) or after ``max_length`` fed tokens. The returned ids are the fed tokens
(starting with ``<|im_start|>``), exactly the official ``generate_text`` output.

Sampling: greedy argmax (official default) or ``softmax(logits / temperature)`` draws, optionally
restricted by top-k and top-p (extensions; the official code has neither). Batches stop per row
(``done`` flags); the loop ends when every row is done or after ``max_length`` steps.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..models.bagel import Bagel
from ..models.qwen2_mot import Routing
from . import progress as _progress
from . import streaming
from .context import Context
from .engine import on_mesh
from .kv_cache import KVCache, forward_chunk
from .speculative import as_gamma, make_draft, speculative_generate
from .text_sampling import SamplingParams, TextResult, official_text, pick_next


class DecodeState(NamedTuple):
    """The ``lax.while_loop`` state of :func:`decode_loop` (a pytree; B rows, L = ``max_length``).

    i: ``[]`` int32, steps taken (= index of the token fed next step minus one).
    cache: the KV cache the fed tokens are written to (a copy of the context's; grows by one per step).
    cur: ``[B]`` int32, the token fed at step ``i``.
    tokens: ``[B, L]`` int32, fed ids so far (start token first; zeros after ``n``).
    n: ``[B]`` int32, number of fed tokens per row.
    done: ``[B]`` bool, the row has stopped (stop token picked or length limit).
    stop: ``[B]`` int32, the stop token that ended the row (-1: not stopped / length limit).
    key: ``[B, 2]`` uint32, each row's PRNG key (step ``i`` draws with ``fold_in(key, i)``).
    logits / hidden: ``[B, L, V]`` / ``[B, L, D]`` float32 per-step logits and last hidden states with
      ``record``, else None (no leaves, so the loop carries nothing).
    """

    i: jax.Array
    cache: KVCache
    cur: jax.Array
    tokens: jax.Array
    n: jax.Array
    done: jax.Array
    stop: jax.Array
    key: jax.Array
    logits: Optional[jax.Array]
    hidden: Optional[jax.Array]


def _progress_cb(step, total):
    _progress.tick("tokens", int(step), int(total))


def _init_state(model: Bagel, cache: KVCache, B: int, start_id, keys, max_length: int, record: bool) -> DecodeState:
    V = model.cfg.llm.vocab_size
    D = model.cfg.llm.hidden_size
    return DecodeState(
        i=jnp.int32(0), cache=cache, cur=jnp.full((B,), start_id, jnp.int32),
        tokens=jnp.zeros((B, max_length), jnp.int32).at[:, 0].set(start_id),
        n=jnp.ones((B,), jnp.int32), done=jnp.zeros((B,), bool), stop=jnp.full((B,), -1, jnp.int32), key=keys,
        logits=jnp.zeros((B, max_length, V), jnp.float32) if record else None,
        hidden=jnp.zeros((B, max_length, D), jnp.float32) if record else None)


def _run_steps(model: Bagel, params, state: DecodeState, rope, stop_ids, temperature, top_k, top_p, until,
               max_length: int, do_sample: bool, record: bool, progress: bool) -> DecodeState:
    """Advance ``state`` until step ``until`` (<= ``max_length``) or until every row is done: the one
    ``lax.while_loop`` of plain and streamed decoding (step ``i`` always draws with ``fold_in(key, i)``)."""
    B = rope.shape[0]

    def cond(s: DecodeState):
        return (s.i < until) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        i = s.i
        x = model.apply({"params": params}, s.cur[:, None], method=Bagel.embed_text)          # [B, 1, D]
        pos = (rope + i)[:, None]
        h, c, _ = forward_chunk(model, params, s.cache, x, pos, jnp.ones((B,), jnp.int32), True,
                                Routing.und(), True)
        logits = model.apply({"params": params}, h[:, 0], method=Bagel.lm_logits)             # [B, V]
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(s.key)
        nxt = pick_next(logits, step_keys, do_sample, temperature, top_k, top_p)
        is_stop = jnp.any(nxt[:, None] == stop_ids[None, :], axis=-1)
        live = ~s.done
        newly = live & is_stop
        # a picked token is fed (appended) next step only if it is not a stop and there is room left
        append = live & ~is_stop & (i + 1 < max_length)
        toks = jnp.where(append[:, None] & (jnp.arange(max_length)[None] == i + 1), nxt[:, None], s.tokens)
        if progress:
            # host callbacks are not free on CPU (~ms each): tick about 50 times per loop at most
            every = max(1, max_length // 50)
            jax.lax.cond((i + 1) % every == 0, lambda: jax.debug.callback(_progress_cb, i + 1, max_length),
                         lambda: None)
        return s._replace(
            i=i + 1, cache=c, cur=nxt, tokens=toks, n=s.n + append.astype(jnp.int32),
            done=s.done | is_stop | (i + 1 >= max_length), stop=jnp.where(newly, nxt, s.stop),
            logits=s.logits.at[:, i].set(logits.astype(jnp.float32)) if record else None,
            hidden=s.hidden.at[:, i].set(h[:, 0].astype(jnp.float32)) if record else None)

    return jax.lax.while_loop(cond, body, state)


def _result(s: DecodeState, record: bool) -> dict:
    res = dict(tokens=s.tokens, n=s.n, stop=s.stop, steps=s.i)
    if record:
        res["logits"], res["hidden"] = s.logits, s.hidden
    return res


@functools.partial(jax.jit, static_argnames=("model", "max_length", "do_sample", "record", "progress"))
def decode_loop(model: Bagel, params, cache: KVCache, rope, start_id, stop_ids, keys, temperature, top_k, top_p,
                max_length: int, do_sample: bool = False, record: bool = False, progress: bool = False):
    """The compiled decoding loop in one call.

    Args:
      cache: the context's cache (capacity >= length + max_length; it is not modified: JAX arrays are
        values); rope ``[B]`` int32 next position; start_id scalar; stop_ids ``[S]`` int32;
      keys: ``[B, 2]`` uint32 one PRNG key per row (step i of row b uses ``fold_in(keys[b], i)``).
    Returns dict: ``tokens [B, max_length]`` fed ids (start first), ``n [B]`` number of fed tokens,
    ``stop [B]`` the stop token that ended the row (-1: length limit), and with ``record`` the
    per-step ``logits [B, max_length, V]`` and ``hidden [B, max_length, D]``.
    """
    s = _init_state(model, cache, rope.shape[0], start_id, keys, max_length, record)
    s = _run_steps(model, params, s, rope, stop_ids, temperature, top_k, top_p, max_length, max_length, do_sample,
                   record, progress)
    return _result(s, record)


@functools.partial(jax.jit, static_argnames=("model", "max_length", "record"))
def decode_start(model: Bagel, cache: KVCache, rope, start_id, keys, max_length: int, record: bool = False):
    """The initial :class:`DecodeState` of a decode over ``cache`` (copied: :func:`decode_chunk` donates its
    state, and the context keeps its own cache)."""
    cache = jax.tree_util.tree_map(jnp.copy, cache)
    return _init_state(model, cache, rope.shape[0], start_id, keys, max_length, record)


@functools.partial(jax.jit, static_argnames=("model", "max_length", "do_sample", "record", "progress"),
                   donate_argnames=("state",))
def decode_chunk(model: Bagel, params, state: DecodeState, rope, stop_ids, temperature, top_k, top_p, chunk,
                 max_length: int, do_sample: bool = False, record: bool = False, progress: bool = False):
    """Run at most ``chunk`` (a traced int32: one compiled program for every chunk size) more steps of the
    decoding loop from ``state`` -> the new state. Calling it until every row is done gives exactly
    :func:`decode_loop`'s tokens (same loop body, same per-step keys); with ``chunk >= max_length`` it is one call.
    Arguments as :func:`decode_loop`."""
    until = jnp.minimum(state.i + chunk, max_length)
    return _run_steps(model, params, state, rope, stop_ids, temperature, top_k, top_p, until, max_length, do_sample,
                      record, progress)


class TextPieces:
    """Host-side text streaming: after each chunk, the new part of every row's text (official
    post-processing of the ids fed so far). A decoded prefix can end inside a multi-byte character
    (shown as U+FFFD); that tail is held back until the next chunk completes it, so the pieces of a row
    concatenate to exactly its final text."""

    def __init__(self, tokenizer, batch: int):
        self.tok = tokenizer
        self.sent = [""] * batch

    def update(self, tokens: np.ndarray, n: np.ndarray, final: bool = False) -> list:
        """``tokens [B, L]`` / ``n [B]`` of the state -> the new piece of each row ('' when none)."""
        out = []
        for b, prev in enumerate(self.sent):
            text = official_text(self.tok, tokens[b, :n[b]])
            if not final:
                text = text.rstrip("\ufffd")
            piece = text[len(prev):] if text.startswith(prev) else ""
            self.sent[b] = prev + piece
            out.append(piece)
        return out


@on_mesh
def generate_text(ctx: Context, max_length: int = 1000, sampling: SamplingParams = SamplingParams(),
                  keys: Optional[Sequence] = None, stop_tokens: Optional[Sequence[int]] = None,
                  record: bool = False, progress: bool = False, chunk: Optional[int] = None,
                  on_text: Optional[Callable[[int, str], None]] = None) -> TextResult:
    """Generate text from the ``gen`` branch of ``ctx`` (``ctx`` itself is unchanged;
    docs/architecture.md#text-decoding).

    Args:
      max_length: most fed tokens per row (official ``max_think_token_n``; the start token counts).
      sampling: see :class:`SamplingParams`. keys: one PRNG key per row for sampling (default
        ``PRNGKey(i)`` for row i; a row's draws depend only on its key).
      stop_tokens: ids that end a row (default ``[<|im_end|>]``; add ``<|vision_start|>`` to interleave).
      chunk: streaming: run the compiled loop for at most ``chunk`` tokens per call (one host round-trip per
        chunk) and call ``on_text(row, piece)`` with each row's new text after each call (:class:`TextPieces`).
        Default: the active :mod:`~bagel_jax.inference.streaming` sink's chunk and its text callback, else one
        call. The tokens do not depend on ``chunk`` (same loop, same per-step keys).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    sampling.validate()
    sink = streaming.active()
    if sink is not None:
        chunk = chunk or sink.chunk
        on_text = on_text or sink.text
    eng = ctx.engine
    ctx.check_room(max_length, "text generation")
    gen = ctx.gen.reserve(eng, max_length)
    stops = list(stop_tokens) if stop_tokens is not None else [eng.sp.eos]
    keys = [jax.random.PRNGKey(i) for i in range(gen.batch)] if keys is None else list(keys)
    if len(keys) != gen.batch:
        raise ValueError(f"got {len(keys)} keys for a batch of {gen.batch}")
    keys = jnp.stack([jnp.asarray(k, jnp.uint32).reshape(2) for k in keys])
    rope = jnp.asarray(gen.rope, jnp.int32)
    state = decode_start(eng.model, gen.cache, rope, eng.sp.bos, keys, max_length=int(max_length), record=record)
    args = (jnp.asarray(stops, jnp.int32), jnp.float32(sampling.temperature), jnp.int32(sampling.top_k),
            jnp.float32(sampling.top_p), jnp.int32(min(chunk or max_length, max_length)))
    pieces = TextPieces(eng.tok, gen.batch) if on_text is not None else None
    while True:
        state = decode_chunk(eng.model, eng.params, state, rope, *args, max_length=int(max_length),
                             do_sample=bool(sampling.do_sample), record=record, progress=progress)
        i, done, tokens, n = jax.device_get((state.i, state.done, state.tokens, state.n))   # one round-trip
        finished = bool(done.all()) or int(i) >= max_length
        if pieces is not None:
            for b, piece in enumerate(pieces.update(tokens, n, final=finished)):
                if piece:
                    on_text(b, piece)
        if finished:
            break
    res = jax.device_get(_result(state, record))
    ids = [res["tokens"][b, :res["n"][b]] for b in range(gen.batch)]
    texts = [official_text(eng.tok, x) for x in ids]
    stop = [int(s) if s >= 0 else None for s in res["stop"]]
    return TextResult(texts, ids, stop, res)


def decode_text(ctx: Context, max_length: int, sampling: SamplingParams, keys, stop_tokens=None,
                progress: bool = False, draft=None, speculate=4, desc: str = "decoding") -> TextResult:
    """Text decoding as every API call does it: plain :func:`~bagel_jax.inference.decode.generate_text` without
    ``draft``, else :func:`~bagel_jax.inference.speculative.speculative_generate` with
    :func:`~bagel_jax.inference.speculative.make_draft` ``(draft)`` and :func:`~bagel_jax.inference.speculative.as_gamma`
    ``(speculate)``; with ``progress`` a "tokens" bar (speculative: with the acceptance rate)."""
    if draft is not None:
        d, g = make_draft(draft, ctx), as_gamma(speculate)
    with _progress.bar("tokens", max_length, desc, progress):
        if draft is None:
            r = generate_text(ctx, max_length, sampling, keys, stop_tokens=stop_tokens, progress=progress)
        else:
            r = speculative_generate(ctx, d, g, max_length, sampling, keys, stop_tokens, progress=progress)
        jax.effects_barrier()
    sink = streaming.active()
    if draft is not None and sink is not None:   # streamed call: the speculative loop is one compiled call,
        for row, text in enumerate(r.texts):     # so its text arrives as one piece per row
            if text:
                sink.text(row, text)
    return r

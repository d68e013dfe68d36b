"""Speculative text decoding: a draft proposes ``gamma`` tokens, BAGEL verifies them in one causal chunk.

Same output contract as :func:`bagel_jax.inference.decode.generate_text` (docs/architecture.md#text-decoding: the fed
ids start with ``<|im_start|>``; a picked stop token ends the row and is not appended; at most
``max_length`` fed tokens). The whole decode is one ``lax.while_loop`` over rounds on static-shape caches.

Invariant per row (``n`` fed tokens so far, ``cur = tokens[n-1]`` not yet in any cache): the target cache
and the draft cache hold the context plus ``tokens[:n-1]``. A round

1. asks the draft for ``gamma`` proposals ``d1..dg`` (a model draft feeds ``cur, d1..dg`` to its own cache);
2. feeds ``[cur, d1..dg]`` to BAGEL (und expert, causal) in one chunk and reads ``gamma + 1`` logits;
3. accepts the longest prefix of proposals the target agrees with and picks one more token from the target
   (greedy: accept while ``d_j == argmax``; sampling: accept with ``min(1, p/q)``, on rejection draw from the
   normalised ``max(0, p - q)``, after a full accept draw from ``p``), so the picks are those of plain
   decoding (greedy: token for token; sampling: in distribution);
4. rolls both caches back by setting ``length = base + n - 1`` (no copies; slots past it are garbage and
   get overwritten by the next round).

Rows advance independently (per-row ``n``, ``done``); finished rows keep running with their lengths pinned.
``gamma`` is fixed, or an :class:`AdaptiveGamma`: one round body per gamma bucket, chosen between rounds by
``lax.switch`` from the acceptance rate. Drafts: :class:`NgramDraft` (prompt lookup, no model),
:class:`ModelDraft` (a second BAGEL context with the same tokenizer, built from the same inputs) and
:class:`~bagel_jax.inference.draft_lm.LMDraft` (a Hugging Face Qwen2 folder). A draft is a frozen dataclass of
static settings plus a state pytree made on the host by ``init`` (after optional ``bind(target)`` checks and
``reserve(slots)``); ``propose`` / ``rollback`` are traced inside the loop. The API calls decode through
:func:`bagel_jax.inference.decode.decode_text` (plain or speculative).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..models.bagel import Bagel
from ..models.qwen2_mot import Routing
from . import progress
from .context import Context
from .draft_lm import LMDraft, lm_propose
from .engine import Engine, on_mesh
from .kv_cache import forward_chunk
from .text_sampling import SamplingParams, TextResult, draw, filtered_logits, official_text


# -- drafts -------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NgramDraft:
    """Prompt lookup: find the latest earlier occurrence of the last ``n`` tokens in context + generated ids
    and propose what followed it (no match: repeat the last token). Proposals are deterministic (q one-hot)."""

    n: int = 3

    def init(self, ctx: Context, prompt_ids: Sequence[Sequence[int]], gamma: int) -> dict:
        if self.n < 1:
            raise ValueError(f"ngram size must be >= 1, got {self.n}")
        P = max(1, max(len(p) for p in prompt_ids))
        hist = np.full((len(prompt_ids), P), -1, np.int32)          # left-padded: the prompt ends at P - 1
        for b, p in enumerate(prompt_ids):
            if len(p):
                hist[b, P - len(p):] = p
        return dict(prompt=jnp.asarray(hist))

    def propose(self, state, cur, tokens, n, key, gamma, sampling):
        prompt = state["prompt"]
        P, N = prompt.shape[1], self.n
        seq = jnp.concatenate([prompt, tokens], axis=1)             # [B, P + m]; valid: != -1 and < P + n
        L = seq.shape[1]
        end = P + n                                                 # [B] one past the last known token
        idx = jnp.arange(L)
        seq = jnp.where(idx[None] < end[:, None], seq, -1)
        key_ids = jax.vmap(lambda s, e: jax.lax.dynamic_slice(s, (e - N,), (N,)))(seq, end)   # [B, N]
        W = L - N + 1
        hit = jnp.ones((seq.shape[0], W), bool)
        for j in range(N):
            hit &= (seq[:, j:j + W] == key_ids[:, j:j + 1]) & (key_ids[:, j:j + 1] >= 0)
        starts = jnp.arange(W)
        hit &= (starts[None] + N < end[:, None])                    # an earlier match with a continuation
        best = jnp.max(jnp.where(hit, starts[None], -1), axis=1)    # [B] latest match start, -1 none
        at = jnp.clip(best[:, None] + N + jnp.arange(gamma)[None], 0, L - 1)
        prop = jnp.take_along_axis(seq, at, axis=1)
        prop = jnp.where((best[:, None] >= 0) & (prop >= 0), prop, cur[:, None]).astype(jnp.int32)
        return prop, None, state

    def rollback(self, state, n):
        return state


@dataclasses.dataclass(frozen=True)
class ModelDraft:
    """A second BAGEL (same tokenizer, any size) decoding on its own context ``ctx`` (built from the same
    inputs as the target's). Refused when its vocabulary or special tokens do not fit the target's."""

    ctx: Context = dataclasses.field(compare=False, hash=False)
    model: Bagel = dataclasses.field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "model", self.ctx.engine.model)

    def bind(self, target: Context) -> "ModelDraft":
        """Refuse a draft whose vocabulary, tokenizer or batch does not fit ``target``; else itself."""
        de, te = self.ctx.engine, target.engine
        if de.cfg.llm.vocab_size != te.cfg.llm.vocab_size:
            raise ValueError(f"draft vocabulary size {de.cfg.llm.vocab_size} does not fit the target's "
                             f"{te.cfg.llm.vocab_size} (the draft must share the target's tokenizer)")
        if (de.sp.bos, de.sp.eos) != (te.sp.bos, te.sp.eos) or len(de.tok.hf) != len(te.tok.hf):
            raise ValueError("draft tokenizer does not match the target's (special ids or size differ)")
        if self.ctx.batch != target.batch:
            raise ValueError(f"draft context batch {self.ctx.batch} != target batch {target.batch}")
        return self

    def init(self, ctx: Context, prompt_ids, gamma: int) -> dict:
        de = self.ctx.engine
        g = self.ctx.gen.reserve(de, 0)
        return dict(params=de.params, cache=g.cache, rope=jnp.asarray(g.rope, jnp.int32),
                    base=jnp.asarray(g.length, jnp.int32))

    def reserve(self, extra: int) -> "ModelDraft":
        self.ctx.check_room(extra, "speculative draft")
        return dataclasses.replace(self, ctx=dataclasses.replace(self.ctx, gen=self.ctx.gen.reserve(self.ctx.engine,
                                                                                                  extra)))

    def step(self, state, cache, tok, pos):
        """One cached draft token ``tok [B]`` at RoPE ``pos [B]`` -> (next-token logits ``[B, V]``, cache)."""
        model, params = self.model, state["params"]
        x = model.apply({"params": params}, tok[:, None], method=Bagel.embed_text)
        h, cache, _ = forward_chunk(model, params, cache, x, pos[:, None], jnp.ones_like(tok), True, Routing.und(),
                                    True)
        return model.apply({"params": params}, h[:, 0], method=Bagel.lm_logits), cache

    def propose(self, state, cur, tokens, n, key, gamma, sampling):
        return lm_propose(self.step, state, cur, n, key, gamma, sampling)

    def rollback(self, state, n):
        c = state["cache"]
        return dict(state, cache=c.replace(length=state["base"] + n - 1))


# -- the loop -----------------------------------------------------------------------------------------------
def _accept(logits, prop, q, key, sampling):
    """Number of accepted proposals ``a [B]`` and the emitted picks ``[B, gamma + 1]`` (proposals, then the
    target's own pick at index ``a``; entries after ``a`` unused)."""
    B, G = prop.shape
    if sampling is None:
        tgt = jnp.argmax(logits, -1).astype(jnp.int32)                                   # [B, G + 1]
        a = jnp.sum(jnp.cumprod(prop == tgt[:, :G], axis=1), axis=1).astype(jnp.int32)
        last = jnp.take_along_axis(tgt, a[:, None], axis=1)[:, 0]
    else:
        p = jax.nn.softmax(filtered_logits(logits, *sampling), axis=-1)                   # [B, G + 1, V]
        if q is None:                                                                     # one-hot draft
            q = jax.nn.one_hot(prop, p.shape[-1], dtype=p.dtype)
        pd = jnp.take_along_axis(p[:, :G], prop[..., None], axis=-1)[..., 0]
        qd = jnp.take_along_axis(q, prop[..., None], axis=-1)[..., 0]
        ku, kr = jax.vmap(lambda k: jax.random.split(k))(key).transpose(1, 0, 2)
        u = jax.vmap(lambda k: jax.random.uniform(k, (G,)))(ku)
        ok = u * qd < pd                                                                  # u < p / q
        a = jnp.sum(jnp.cumprod(ok, axis=1), axis=1).astype(jnp.int32)
        pa = jnp.take_along_axis(p, a[:, None, None], axis=1)[:, 0]
        qa = jnp.take_along_axis(jnp.pad(q, ((0, 0), (0, 1), (0, 0))), a[:, None, None], axis=1)[:, 0]
        res = jnp.maximum(pa - qa, 0.0)
        res = jnp.where(jnp.sum(res, -1, keepdims=True) > 0, res, pa)
        last = draw(kr, jnp.log(res))
    j = jnp.arange(G + 1)[None]
    emit = jnp.where(j < a[:, None], jnp.pad(prop, ((0, 0), (0, 1))), last[:, None])
    return a, emit


@dataclasses.dataclass(frozen=True)
class AdaptiveGamma:
    """Gamma chosen between rounds from the acceptance rate (one compiled round per bucket, picked by
    ``lax.switch`` inside the one ``while_loop``).

    The acceptance rate ``alpha`` is estimated from decayed counts over the live rows (accepted proposals /
    proposals checked: a round with ``a < gamma`` accepted checked ``a + 1``); the next round uses the bucket
    with the most expected tokens per cost, ``(1 - alpha^(g+1)) / (1 - alpha) / (1 + cost * g)``, where
    ``cost`` is one proposal's cost relative to a target pass (a draft model's relative size; small for
    prompt lookup). The first round uses ``start``."""

    buckets: tuple = (2, 4, 8)
    start: int = 4
    cost: float = 0.1
    decay: float = 0.5

    def __post_init__(self):
        b = tuple(int(g) for g in self.buckets)
        if not b or any(g < 1 for g in b) or list(b) != sorted(set(b)):
            raise ValueError(f"gamma buckets must be increasing integers >= 1, got {self.buckets!r}")
        if self.start not in b:
            raise ValueError(f"start gamma {self.start} is not one of the buckets {b}")
        if not (self.cost >= 0 and 0 <= self.decay < 1):
            raise ValueError(f"cost must be >= 0 and decay in [0, 1), got {self.cost}, {self.decay}")
        object.__setattr__(self, "buckets", b)

    def pick(self, acc, trials):
        """Bucket index for decayed counts ``acc`` / ``trials`` (scalars, traced)."""
        alpha = jnp.clip(acc / jnp.maximum(trials, 1e-6), 0.0, 0.999)
        g = jnp.asarray(self.buckets, jnp.float32)
        return jnp.argmax((1 - alpha ** (g + 1)) / (1 - alpha) / (1 + self.cost * g)).astype(jnp.int32)


def _buckets(gamma) -> tuple:
    return gamma.buckets if isinstance(gamma, AdaptiveGamma) else (gamma,)


def _progress_cb(n, total, accepted, drafted):
    progress.tick("tokens", int(n), int(total), f"accept {accepted / max(drafted, 1):.2f}")


@functools.partial(jax.jit, static_argnames=("model", "draft", "gamma", "max_length", "do_sample", "progress"))
def spec_loop(model: Bagel, params, cache, rope, draft, dstate, start_id, stop_ids, keys, sampling_args,
              gamma, max_length: int, do_sample: bool = False, progress: bool = False):
    """The compiled speculative loop. ``gamma``: an int (fixed) or an :class:`AdaptiveGamma`. ``cache``: the
    target context's cache with room for ``max_length + max gamma + 1`` more slots; ``rope [B]``; ``keys
    [B, 2]``; ``sampling_args`` = (temperature, top_k, top_p). Returns tokens / n / stop like ``decode_loop``
    plus ``rounds`` (loop iterations = target passes), ``accepted`` and ``drafted`` per row, ``bucket_rounds``
    (rounds per gamma bucket) and the final target ``cache``."""
    B, m, Gs = rope.shape[0], max_length, _buckets(gamma)
    sampling = sampling_args if do_sample else None
    base = cache.length
    st = dict(i=jnp.int32(0), cache=cache, dstate=dstate, cur=jnp.full((B,), start_id, jnp.int32),
              tokens=jnp.zeros((B, m), jnp.int32).at[:, 0].set(start_id), n=jnp.ones((B,), jnp.int32),
              done=jnp.zeros((B,), bool), stop=jnp.full((B,), -1, jnp.int32),
              accepted=jnp.zeros((B,), jnp.int32), drafted=jnp.zeros((B,), jnp.int32),
              gi=jnp.int32(Gs.index(gamma.start) if isinstance(gamma, AdaptiveGamma) else 0),
              ema=jnp.zeros((2,), jnp.float32), bucket_rounds=jnp.zeros((len(Gs),), jnp.int32))

    def one_round(s, G):
        ks = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, s["i"])))(keys)    # [B, 2, 2]
        prop, q, ds = draft.propose(s["dstate"], s["cur"], s["tokens"], s["n"], ks[:, 0], G, sampling)
        chunk = jnp.concatenate([s["cur"][:, None], prop], axis=1)                        # [B, G + 1]
        x = model.apply({"params": params}, chunk, method=Bagel.embed_text)
        pos = (rope + s["n"] - 1)[:, None] + jnp.arange(G + 1)[None]
        h, c, _ = forward_chunk(model, params, s["cache"], x, pos, jnp.full((B,), G + 1, jnp.int32), True,
                                Routing.und(), True)
        logits = model.apply({"params": params}, h, method=Bagel.lm_logits)              # [B, G + 1, V]
        a, emit = _accept(logits, prop, q, ks[:, 1], sampling)
        live, n, j = ~s["done"], s["n"], jnp.arange(G + 1)[None]
        c0 = n - 1                                                                       # picks so far
        valid = (j <= a[:, None]) & (c0[:, None] + j + 1 <= m) & live[:, None]
        is_stop = valid & jnp.any(emit[..., None] == stop_ids, axis=-1)
        has_stop = jnp.any(is_stop, axis=1)
        first = jnp.where(has_stop, jnp.argmax(is_stop, axis=1), G + 1)
        k = jnp.sum(valid & (j < first[:, None]) & (c0[:, None] + j + 1 <= m - 1), axis=1)  # appended
        at = n[:, None] + j                                                              # [B, G + 1]
        hitm = (jnp.arange(m)[None, None] == at[..., None]) & (j < k[:, None])[..., None]   # [B, G + 1, m]
        tokens = jnp.where(jnp.any(hitm, 1), jnp.sum(jnp.where(hitm, emit[..., None], 0), 1), s["tokens"])
        n_new = n + k
        done = s["done"] | (live & (has_stop | (c0 + a + 1 >= m)))
        cur = jnp.take_along_axis(emit, jnp.clip(a, 0, G)[:, None], axis=1)[:, 0]
        stop_tok = jnp.take_along_axis(emit, jnp.clip(first, 0, G)[:, None], axis=1)[:, 0]
        checked = jnp.where(live, a + (a < G), 0)                    # proposals checked (to the first miss)
        ema = s["ema"] * (gamma.decay if isinstance(gamma, AdaptiveGamma) else 0.0) + jnp.stack(
            [jnp.sum(jnp.where(live, a, 0)), jnp.sum(checked)]).astype(jnp.float32)
        gi = gamma.pick(ema[0], ema[1]) if isinstance(gamma, AdaptiveGamma) else s["gi"]
        out = dict(i=s["i"] + 1, cache=c.replace(length=base + n_new - 1), dstate=draft.rollback(ds, n_new),
                   cur=jnp.where(live, cur, s["cur"]), tokens=tokens, n=n_new, done=done,
                   stop=jnp.where(live & has_stop, stop_tok, s["stop"]),
                   accepted=s["accepted"] + jnp.where(live, jnp.minimum(a, k), 0),
                   drafted=s["drafted"] + jnp.where(live, G, 0), gi=gi, ema=ema,
                   bucket_rounds=s["bucket_rounds"].at[Gs.index(G)].add(1))
        if progress:
            every = max(1, m // 200)
            jax.lax.cond(out["i"] % every == 0, lambda: jax.debug.callback(
                _progress_cb, jnp.max(n_new), m, jnp.sum(out["accepted"]), jnp.sum(out["drafted"])), lambda: None)
        return out

    rounds = [functools.partial(one_round, G=g) for g in Gs]
    body = rounds[0] if len(Gs) == 1 else (lambda s: jax.lax.switch(s["gi"], rounds, s))
    s = jax.lax.while_loop(lambda s: (s["i"] < m) & ~jnp.all(s["done"]), body, st)
    return dict(tokens=s["tokens"], n=s["n"], stop=s["stop"], rounds=s["i"], accepted=s["accepted"],
                drafted=s["drafted"], bucket_rounds=s["bucket_rounds"], cache=s["cache"])


def _prompt_ids(ctx: Context) -> list:
    """Token ids of the text in ``ctx``'s history, per row (what prompt lookup searches)."""
    out = [[] for _ in range(ctx.batch)]
    for kind, _role, values in ctx.history:
        if kind == "text":
            for b, ids in enumerate(ctx.text_ids(list(values))):
                out[b].extend(ids)
    return out


@on_mesh
def speculative_generate(ctx: Context, draft, gamma=4, max_length: int = 1000,
                         sampling: SamplingParams = SamplingParams(), keys: Optional[Sequence] = None,
                         stop_tokens: Optional[Sequence[int]] = None,
                         prompt_ids: Optional[Sequence[Sequence[int]]] = None, progress: bool = False) -> TextResult:
    """:func:`bagel_jax.inference.decode.generate_text` with a draft (:class:`NgramDraft`, :class:`ModelDraft`
    or :class:`~bagel_jax.inference.draft_lm.LMDraft`) proposing ``gamma`` tokens per target pass (an int, or
    an :class:`AdaptiveGamma`). Greedy output equals plain greedy decoding token for token; sampled output has
    plain sampling's distribution (not its exact draws). ``raw`` adds ``rounds`` (target passes),
    ``accepted`` / ``drafted`` per row, ``bucket_rounds`` and the final ``cache``. ``prompt_ids``: what prompt
    lookup and a text-only draft read (default: the context's text, re-tokenised). ``progress``: ticks the
    open "tokens" bar (:mod:`bagel_jax.inference.progress`) with the acceptance rate."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if not isinstance(gamma, AdaptiveGamma) and (isinstance(gamma, bool) or not isinstance(gamma, int)
                                                 or gamma < 1):
        raise ValueError(f"gamma must be an integer >= 1 or an AdaptiveGamma, got {gamma!r}")
    sampling.validate()
    eng = ctx.engine
    extra = max_length + max(_buckets(gamma)) + 1
    ctx.check_room(extra, "speculative text generation")
    gen = ctx.gen.reserve(eng, extra)
    if hasattr(draft, "bind"):
        draft = draft.bind(ctx)
    if hasattr(draft, "reserve"):
        draft = draft.reserve(extra)
    stops = list(stop_tokens) if stop_tokens is not None else [eng.sp.eos]
    keys = [jax.random.PRNGKey(i) for i in range(gen.batch)] if keys is None else list(keys)
    if len(keys) != gen.batch:
        raise ValueError(f"got {len(keys)} keys for a batch of {gen.batch}")
    keys = jnp.stack([jnp.asarray(k, jnp.uint32).reshape(2) for k in keys])
    dstate = draft.init(ctx, _prompt_ids(ctx) if prompt_ids is None else prompt_ids, max(_buckets(gamma)))
    args = (jnp.float32(sampling.temperature), jnp.int32(sampling.top_k), jnp.float32(sampling.top_p))
    res = spec_loop(eng.model, eng.params, gen.cache, jnp.asarray(gen.rope, jnp.int32), draft, dstate,
                    eng.sp.bos, jnp.asarray(stops, jnp.int32), keys, args, gamma=gamma,
                    max_length=int(max_length), do_sample=bool(sampling.do_sample), progress=bool(progress))
    cache = res.pop("cache")
    res = jax.device_get(res)
    res["cache"] = cache
    ids = [res["tokens"][b, :res["n"][b]] for b in range(gen.batch)]
    stop = [int(s) if s >= 0 else None for s in res["stop"]]
    return TextResult([official_text(eng.tok, x) for x in ids], ids, stop, res)


def replay(ctx: Context, engine) -> Context:
    """A draft BAGEL's context built from ``ctx``'s history on ``engine`` (understanding branch only):
    every text segment, and every image as a ViT block when the draft can see images (else left out)."""
    out = Context.new(engine, ctx.batch, track_cfg=False)
    for kind, role, values in ctx.history:
        if kind == "text":
            out = out.add_text(list(values), role=role)
        elif engine.cfg.visual_und:
            out = out.add_image(list(values), vae=False, vit=True, role=role)
    return out


def make_draft(draft, ctx: Context):
    """The draft for one call on ``ctx``: ``"ngram"`` -> :class:`NgramDraft`; a draft :class:`Pipeline` or
    :class:`~bagel_jax.inference.engine.Engine` (a small BAGEL) -> :class:`ModelDraft` on :func:`replay`;
    an :class:`NgramDraft`, :class:`ModelDraft` or :class:`~bagel_jax.inference.draft_lm.LMDraft` as given."""
    if isinstance(draft, str) and draft == "ngram":
        return NgramDraft()
    if isinstance(draft, (NgramDraft, ModelDraft, LMDraft)):
        return draft
    engine = draft if isinstance(draft, Engine) else getattr(draft, "engine", None)
    if isinstance(engine, Engine):
        return ModelDraft(replay(ctx, engine))
    raise ValueError(f"draft must be 'ngram', a draft Pipeline / Engine or a loaded draft, got {draft!r}")


def as_gamma(speculate):
    """``speculate``: an integer >= 1 (fixed gamma), ``"auto"`` (:class:`AdaptiveGamma` defaults) or an
    :class:`AdaptiveGamma`."""
    if isinstance(speculate, AdaptiveGamma):
        return speculate
    if speculate == "auto":
        return AdaptiveGamma()
    if isinstance(speculate, bool) or not isinstance(speculate, (int, np.integer)) or speculate < 1:
        raise ValueError(f"speculate must be an integer >= 1 or 'auto', got {speculate!r}")
    return int(speculate)

"""Speculative decoding (bagel_jax.inference.speculative) on tiny random models with the tiny-a tokenizer.

Covers: greedy speculative output equals plain greedy token for token with drafts that are always right
(the target itself), always wrong, a random small model and prompt lookup; stop tokens inside an accepted
run; batched rows (different acceptance) equal one at a time; the target cache after rollback equals a
cache built without speculation; the rejection rule reproduces the target distribution (statistical);
sampling with top_k=1 equals greedy end to end; a draft whose vocabulary does not fit is refused; adaptive gamma
moves to the largest / smallest bucket for always-right / always-wrong drafts with plain greedy's output.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax.config import BagelConfig, LLMConfig, VAEConfig, ViTConfig
from bagel_jax.inference import api
from bagel_jax.inference.context import Context, Engine
from bagel_jax.inference.decode import SamplingParams, generate_text
from bagel_jax.inference.kv_cache import forward_chunk
from bagel_jax.inference.speculative import (AdaptiveGamma, ModelDraft, NgramDraft, _accept, filtered_logits,
                                             speculative_generate)
from bagel_jax.loading import BagelModel, build_modules, param_shapes
from bagel_jax.models.bagel import Bagel
from bagel_jax.models.qwen2_mot import Routing
from bagel_jax.tokenizer import load_tokenizer

PROMPTS = ["A red cat sits on the mat. A red cat sits on the", "Blue sky over a green hill and a small house."]
L = 14
STOPS = [-1, -1]     # every call passes a stop set of this shape, so the tests share compiled programs


def _engine(tiny_a, hidden, layers, vocab=576, seed=0):
    llm = LLMConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=2 * hidden, vocab_size=vocab)
    vit = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    vae = VAEConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1, downsample=2, z_channels=4)
    cfg = BagelConfig(llm=llm, vit=vit, vae=vae)
    # random params without tracing init (fast): weights N(0, 1/fan_in), norm scales 1 + 0.1 N, biases 0.1 N
    model, vae = build_modules(cfg)
    leaves, tree = jax.tree_util.tree_flatten_with_path(param_shapes(model))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        x = rng.normal(size=s.shape)
        if len(s.shape) >= 2:
            return x / np.sqrt(s.shape[0]) if "embed" not in jax.tree_util.keystr(path) else x
        return 1 + 0.1 * x if "norm" in jax.tree_util.keystr(path) else 0.1 * x

    params = jax.tree_util.tree_unflatten(tree, [jnp.asarray(fill(p, s), jnp.float32) for p, s in leaves])
    return Engine(BagelModel(cfg, model, vae, params, None, load_tokenizer(tiny_a)))


@pytest.fixture(scope="module")
def engines(tiny_a):
    return _engine(tiny_a, 64, 1), _engine(tiny_a, 32, 1, seed=1)


def _ctx(eng, prompts):
    return Context.new(eng, len(prompts), track_cfg=False).add_text(prompts)


@dataclasses.dataclass(frozen=True)
class WrongDraft(ModelDraft):
    """The target as its own draft with every proposal shifted by one id: never accepted."""

    def propose(self, state, cur, tokens, n, key, gamma, sampling):
        prop, q, st = super().propose(state, cur, tokens, n, key, gamma, sampling)
        return (prop + 1) % self.ctx.engine.cfg.llm.vocab_size, q, st


@dataclasses.dataclass(frozen=True)
class HotDraft(ModelDraft):
    """The target as its own draft, sampling at twice the temperature from its top-(k + 2): q != p, overlapping."""

    def propose(self, state, cur, tokens, n, key, gamma, sampling):
        t, k, p = sampling
        return super().propose(state, cur, tokens, n, key, gamma, (2 * t, k + 2, p))


def _draft(kind, ctx, small):
    return dict(self=lambda: ModelDraft(ctx), wrong=lambda: WrongDraft(ctx),
                small=lambda: ModelDraft(_ctx(small, PROMPTS)), ngram=lambda: NgramDraft(2))[kind]()


def _same(a, b):
    assert [list(x) for x in a.token_ids] == [list(x) for x in b.token_ids]
    assert a.stop == b.stop and a.texts == b.texts


@pytest.mark.parametrize("kind", ["self", "wrong", "small", "ngram"])
def test_greedy_equals_plain(engines, kind):
    eng, small = engines
    ctx = _ctx(eng, PROMPTS)
    plain = generate_text(ctx, L, stop_tokens=[eng.sp.eos, -1])
    _same(speculative_generate(ctx, _draft(kind, ctx, small), 3, L, stop_tokens=[eng.sp.eos, -1]), plain)
    # a stop id that row 0 picks mid-way: row 0 stops inside an accepted run, row 1 runs to the length limit
    stops = [eng.sp.eos, int(plain.token_ids[0][6])]
    plain = generate_text(ctx, L, stop_tokens=stops)
    assert plain.stop[0] == stops[1]
    spec = speculative_generate(ctx, _draft(kind, ctx, small), 3, L, stop_tokens=stops)
    _same(spec, plain)
    acc, drafted, rounds = spec.raw["accepted"], spec.raw["drafted"], int(spec.raw["rounds"])
    if kind == "self":     # every proposal is right: 4 tokens per target pass
        assert rounds == -(-L // 4) and acc[1] >= 3 * (rounds - 1)
    if kind == "wrong":    # nothing accepted: one token per target pass
        assert np.all(acc == 0) and rounds == L and drafted[1] == 3 * L     # as many passes as plain


def test_adaptive_gamma(engines):
    """Gamma picked between rounds from the acceptance rate: an always-right draft moves to the largest bucket
    after the first round, an always-wrong one to the smallest; the output stays plain greedy's."""
    eng, _ = engines
    ctx = _ctx(eng, PROMPTS)
    plain = generate_text(ctx, L, stop_tokens=STOPS)
    ad = AdaptiveGamma((1, 2, 4), start=2, cost=0.0)
    right = speculative_generate(ctx, ModelDraft(ctx), ad, L, stop_tokens=STOPS)
    _same(right, plain)
    rounds = int(right.raw["rounds"])
    assert list(right.raw["bucket_rounds"]) == [0, 1, rounds - 1] and rounds == 1 + -(-(L - 3) // 5)
    wrong = speculative_generate(ctx, WrongDraft(ctx), ad, L, stop_tokens=STOPS)
    _same(wrong, plain)
    assert list(wrong.raw["bucket_rounds"]) == [L - 1, 1, 0]
    for bad in (dict(buckets=(4, 2)), dict(buckets=(2, 4), start=3), dict(buckets=(0, 2), start=2)):
        with pytest.raises(ValueError, match="bucket"):
            AdaptiveGamma(**bad)


def test_batched_equals_one_at_a_time(engines):
    eng, small = engines
    both = speculative_generate(_ctx(eng, PROMPTS), ModelDraft(_ctx(small, PROMPTS)), 3, L, stop_tokens=STOPS)
    for b, p in enumerate(PROMPTS):
        one = speculative_generate(_ctx(eng, [p]), ModelDraft(_ctx(small, [p])), 3, L, stop_tokens=STOPS)
        assert list(one.token_ids[0]) == list(both.token_ids[b]) and one.stop[0] == both.stop[b]
        assert one.raw["accepted"][0] == both.raw["accepted"][b]
    ng = speculative_generate(_ctx(eng, PROMPTS), NgramDraft(2), 3, L, stop_tokens=STOPS)
    assert ng.raw["accepted"][0] != ng.raw["accepted"][1]        # rows advanced by different amounts


def test_rollback_cache_equals_plain_prefill(engines):
    eng, small = engines
    ctx = _ctx(eng, PROMPTS)
    spec = speculative_generate(ctx, ModelDraft(_ctx(small, PROMPTS)), 3, L, stop_tokens=STOPS)
    cache = spec.raw["cache"]
    gen = ctx.gen
    for b, ids in enumerate(spec.token_ids):
        n = len(ids) - 1                                  # the last fed token is not cached yet
        assert int(cache.length[b]) == int(gen.length[b]) + n
        one = ctx.select_rows([b]).gen.reserve(eng, 64)
        x = eng.model.apply({"params": eng.params}, jnp.asarray(ids[:n])[None], method=Bagel.embed_text)
        pos = jnp.asarray(gen.rope[b] + np.arange(n), jnp.int32)[None]
        ref = jax.jit(lambda c, x, pos: forward_chunk(eng.model, eng.params, c, x, pos, jnp.asarray([n], jnp.int32),
                                                      True, Routing.und(), True)[1])(one.cache, x, pos)
        m = int(ref.length[0])
        np.testing.assert_allclose(np.asarray(cache.k[:, b, :m]), np.asarray(ref.k[:, 0, :m]), atol=2e-5)
        np.testing.assert_allclose(np.asarray(cache.v[:, b, :m]), np.asarray(ref.v[:, 0, :m]), atol=2e-5)


def test_rejection_rule_keeps_target_distribution():
    """``_accept`` with a model-like draft q != p: the first emitted token follows p[0], and after an
    accepted first proposal the second follows p[1] (40k independent rows, 5-sigma bound)."""
    N, G, V = 40000, 2, 5
    rng = np.random.default_rng(0)
    p_log = jnp.asarray(rng.normal(size=(G + 1, V)) * 1.5, jnp.float32)
    q = jax.nn.softmax(jnp.asarray(rng.normal(size=(G, V)) * 1.5, jnp.float32), -1)
    kd, ka = jax.random.split(jax.random.PRNGKey(0))
    prop = jax.vmap(lambda k: jax.random.categorical(k, jnp.log(q)))(jax.random.split(kd, N)).astype(jnp.int32)
    logits = jnp.broadcast_to(p_log, (N, G + 1, V))
    accept = jax.jit(_accept)
    a, emit = accept(logits, prop, jnp.broadcast_to(q, (N, G, V)), jax.random.split(ka, N),
                      (jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0)))
    p = np.asarray(jax.nn.softmax(p_log, -1))
    a, emit = np.asarray(a), np.asarray(emit)
    for tok, probs in ((emit[:, 0], p[0]), (emit[a >= 1, 1], p[1])):
        freq = np.bincount(tok, minlength=V) / len(tok)
        assert np.all(np.abs(freq - probs) < 5 * np.sqrt(probs * (1 - probs) / len(tok)) + 1e-3), (freq, probs)
    # and a deterministic (one-hot) draft: the same law
    a1, e1 = accept(logits, prop, None, jax.random.split(ka, N), (jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0)))
    freq = np.bincount(np.asarray(e1)[:, 0], minlength=V) / N
    assert np.all(np.abs(freq - p[0]) < 5 * np.sqrt(p[0] * (1 - p[0]) / N) + 1e-3)


def test_sampling_top1_equals_greedy(engines):
    eng, small = engines
    ctx = _ctx(eng, PROMPTS)
    sp = SamplingParams(do_sample=True, temperature=0.7, top_k=1)
    for draft in (ModelDraft(_ctx(small, PROMPTS)), NgramDraft(2)):
        _same(speculative_generate(ctx, draft, 3, L, sampling=sp, stop_tokens=STOPS),
              generate_text(ctx, L, stop_tokens=STOPS))
    r = speculative_generate(ctx, ModelDraft(_ctx(small, PROMPTS)), 3, L, stop_tokens=STOPS,
                             sampling=SamplingParams(do_sample=True, temperature=1.0))
    assert all(1 <= len(t) <= L for t in r.token_ids)


def test_bad_draft_refused(engines, tiny_a):
    eng, _ = engines
    ctx = _ctx(eng, PROMPTS)
    other = _engine(tiny_a, 32, 1, vocab=640)
    with pytest.raises(ValueError, match="vocabulary size 640 does not fit"):
        speculative_generate(ctx, ModelDraft(_ctx(other, PROMPTS)), 2, L)
    with pytest.raises(ValueError, match="batch"):
        speculative_generate(ctx, ModelDraft(_ctx(eng, PROMPTS[:1])), 2, L)
    with pytest.raises(ValueError, match="gamma"):
        speculative_generate(ctx, NgramDraft(2), 0, L)


def test_understand_with_draft(engines):
    eng, small = engines
    pipe = api.Pipeline(eng)
    plain = pipe.understand(None, PROMPTS, max_new_tokens=L)
    assert pipe.understand(None, PROMPTS, max_new_tokens=L, draft="ngram", speculate=3) == plain
    assert pipe.understand(None, PROMPTS, max_new_tokens=L, draft=api.Pipeline(small), speculate=3) == plain
    with pytest.raises(ValueError, match="draft must be"):
        pipe.understand(None, PROMPTS, max_new_tokens=L, draft="nope")


@pytest.mark.slow     # ~45 s on a busy CPU; the rule alone is tested fast (test_rejection_rule_keeps_target_distribution)
def test_sampled_speculative_matches_plain_distribution(engines):
    """End to end: 1000 rows of one prompt, temperature 1 and top-k 4 (a 4-token vocabulary per step), a
    draft with q != p (:class:`HotDraft`). The first two picked tokens follow the target's law: p1, and the mixture
    sum_t p1(t) p2(. | t), with p2 read from a plain recorded run of the same rows (5-sigma bounds)."""
    eng, _ = engines
    B, sp = 1000, SamplingParams(do_sample=True, temperature=1.0, top_k=4)
    ctx = _ctx(eng, PROMPTS[:1] * B)
    keys = list(jax.random.split(jax.random.PRNGKey(5), B))
    spec = speculative_generate(ctx, HotDraft(ctx), 2, 3, sampling=sp, keys=keys, stop_tokens=STOPS)
    toks = np.stack([t[1:3] for t in spec.token_ids])                              # [B, 2] first two picks
    ref = generate_text(ctx, 3, sp, stop_tokens=STOPS, record=True).raw          # exact p2 for each row's t1
    law = lambda lg: np.asarray(jax.nn.softmax(filtered_logits(jnp.asarray(lg), 1.0, 4, 1.0), -1), np.float64)
    p1 = law(ref["logits"][0, 0])
    p2 = {int(t): law(ref["logits"][b, 1]) for b, t in enumerate(ref["tokens"][:, 1])}
    assert np.sum(p1[list(p2)]) > 0.995                                              # first tokens seen
    mix = sum(p1[t] * p2[t] for t in p2)
    for tok, probs in ((toks[:, 0], p1), (toks[:, 1], mix)):
        freq = np.bincount(tok, minlength=probs.shape[0]) / B
        assert np.all(np.abs(freq - probs) < 5 * np.sqrt(probs * (1 - probs) / B) + 1e-3), (freq, probs)
    acc = spec.raw["accepted"]
    assert np.any(acc == 0) and np.any(acc == 2)                                     # rejections and full accepts

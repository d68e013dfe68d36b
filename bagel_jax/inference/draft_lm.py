"""A Hugging Face Qwen2 causal LM (``config.json`` + ``model.safetensors``) as a speculative-decoding draft.

For BAGEL-7B the natural draft is Qwen2.5-0.5B-Instruct: same tokenizer, 1/7 of the width. The folder is loaded
into our decoder in dense mode (:class:`~bagel_jax.models.qwen2_mot.Qwen2MoT` with ``Qwen2DecoderLayer``, no q/k
norm), through the same key map as the official checkpoints (the HF Qwen2 names are the official
``language_model.`` names without the prefix; tied embeddings: no ``lm_head.weight``).

The draft reads text only: its prompt is the target context's text history re-tokenised as text blocks
(``<|im_start|> ... <|im_end|>`` per segment, images left out), prefilled into its own static cache; it then
follows the generated ids like any model draft (:func:`lm_propose`).

Vocabulary rule (:func:`check_vocab`): every id of the target's tokenizer must be a row of the draft's
embedding table, and where the draft folder has a tokenizer, a token both know must have the same id in
both. BAGEL's extra special tokens that the draft's tokenizer does not know map to themselves (the draft
uses its embedding row of that id); one outside the table is refused, naming the token. Draft logits are cut or
padded (-inf) to the target's vocabulary size, so a draft never proposes an id the target cannot score.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ConfigError, LLMConfig, _build, read_json
from ..convert import keymap
from ..convert.safetensors_io import SafeTensorsFile
from ..models.qwen2_mot import Qwen2MoT, Routing, key_map
from ..nn.attention import chunk_vectors
from ..nn.options import ModelOptions
from .context import Context, bucket
from .engine import CACHE_MIN
from .kv_cache import KVCache, append
from .text_sampling import draw, filtered_logits


class DraftError(ValueError):
    """A draft folder that cannot be used (bad config, missing / unknown tensors, vocabulary mismatch)."""


def check_vocab(table_rows: int, draft_vocab: Optional[dict], target_vocab: dict, source: str) -> None:
    """Refuse a draft that cannot score every target token (see the module docstring). ``draft_vocab`` /
    ``target_vocab``: token -> id (``draft_vocab`` None: the draft folder has no tokenizer)."""
    for tok, i in sorted(target_vocab.items(), key=lambda kv: kv[1]):
        if i >= table_rows:
            raise DraftError(f"{source}: the target's token {tok!r} (id {i}) is outside the draft's embedding "
                             f"table of {table_rows} rows (the draft must share the target's tokenizer)")
        if draft_vocab is not None and draft_vocab.get(tok, i) != i:
            raise DraftError(f"{source}: the draft's tokenizer maps {tok!r} to id {draft_vocab[tok]}, the "
                             f"target's to {i} (the draft must share the target's tokenizer)")


def hf_qwen2_config(path: str) -> LLMConfig:
    """Our dense :class:`LLMConfig` from a Hugging Face Qwen2 ``config.json``."""
    raw = read_json(path)
    arch = raw.get("architectures") or []
    if raw.get("model_type") != "qwen2" and "Qwen2ForCausalLM" not in arch:
        raise DraftError(f"{path}: not a Qwen2 causal LM (model_type {raw.get('model_type')!r}, architectures "
                         f"{arch}); a draft must be a Hugging Face Qwen2 folder")
    if raw.get("use_sliding_window"):
        raise DraftError(f"{path}: sliding-window attention is not supported for a draft")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}   # transformers >= 5 / older files
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default":
        raise DraftError(f"{path}: only default RoPE is supported for a draft, got {rope!r}")
    raw = dict(raw, qk_norm=False, layer_module="Qwen2DecoderLayer")
    if "rope_theta" not in raw and "rope_theta" in rope:
        raw["rope_theta"] = rope["rope_theta"]
    raw.setdefault("tie_word_embeddings", False)
    try:
        cfg = _build(LLMConfig, raw, path)
        cfg.validate()
    except ConfigError as e:
        raise DraftError(str(e)) from None
    return cfg


def _weight_files(folder: str) -> list[str]:
    one = os.path.join(folder, "model.safetensors")
    index = one + ".index.json"
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f).get("weight_map", {}).values()))
        return [os.path.join(folder, x) for x in files]
    if os.path.isfile(one):
        return [one]
    raise DraftError(f"{folder}: no model.safetensors (or model.safetensors.index.json)")


def _draft_vocab(folder: str) -> Optional[dict]:
    if not any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer   # heavy import, only for a folder with tokenizer files

    try:
        return dict(AutoTokenizer.from_pretrained(folder, local_files_only=True).get_vocab())
    except Exception as e:
        raise DraftError(f"{folder}: cannot load the draft's tokenizer ({e})") from None


def load_qwen2_draft(folder: str, dtype="float32") -> "LMDraft":
    """Load a Hugging Face Qwen2 folder (``config.json``, ``model.safetensors`` or its sharded index, optional
    tokenizer files) as an :class:`LMDraft`. Every tensor is checked: a missing, unknown or misshaped one is a
    :class:`DraftError` naming it."""
    if not os.path.isdir(folder):
        raise DraftError(f"draft folder not found: {folder}")
    cfg = hf_qwen2_config(os.path.join(folder, "config.json"))
    entries = key_map(cfg)
    files = {}
    for path in _weight_files(folder):
        f = SafeTensorsFile(path)
        files.update({k: f for k in f.keys()})
    ignored = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unknown = sorted(k for k in set(files) - {e.official for e in entries} - ignored if "rotary_emb" not in k)
    missing = sorted({e.official for e in entries} - set(files))
    if missing or unknown:
        raise DraftError(f"{folder}: tensors do not match a Qwen2 of this config.json: missing {missing[:3]}, "
                         f"unknown {unknown[:3]}")
    module = Qwen2MoT(cfg, ModelOptions(dtype=dtype, param_dtype=dtype))
    tensors = {}
    for e in entries:
        files[e.official].require_float(e.official)
        tensors[e.official] = np.asarray(files[e.official].get(e.official), np.float32)
    params = keymap.tensors_to_params(entries, tensors)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32),
                                                jnp.zeros((1, 1), jnp.int32), chunk_vectors(jnp.ones((1,), jnp.int32),
                                                                                             1, True),
                                                method=Qwen2MoT.init_all))["params"]
    for path, s in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        got = functools.reduce(lambda t, k: t[k.key], path, params)
        if tuple(got.shape) != tuple(s.shape):
            raise DraftError(f"{folder}: tensor for {jax.tree_util.keystr(path)} has shape {got.shape}, "
                             f"expected {s.shape} from config.json")
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)
    return LMDraft(cfg, module, params, _draft_vocab(folder), folder)


def lm_propose(step, state, cur, n, key, gamma: int, sampling):
    """Proposals of a model draft with its own cache ``state["cache"]`` (rolled back to hold the context and
    ``tokens[:n-1]``) and RoPE start ``state["rope"] [B]``: ``gamma + 1`` cached feeds ``cur, d1..dg`` (the last
    only writes ``dg``, so a full accept keeps the invariant). ``step(state, cache, tok, pos)`` -> (logits
    ``[B, V]``, cache). Returns ``(proposals [B, gamma], q [B, gamma, V] or None (greedy), state)``."""
    B = cur.shape[0]

    def one(carry, j):
        cache, tok = carry
        logits, cache = step(state, cache, tok, state["rope"] + n - 1 + j)
        if sampling is None:
            return (cache, jnp.argmax(logits, -1).astype(jnp.int32)), (tok, jnp.zeros((B, 0)))
        f = filtered_logits(logits, *sampling)
        nxt = draw(jax.vmap(lambda k: jax.random.fold_in(k, j))(key), f)
        return (cache, nxt), (nxt, jax.nn.softmax(f, axis=-1))

    (cache, _), (outs, q) = jax.lax.scan(one, (state["cache"], cur), jnp.arange(gamma + 1))
    if sampling is None:
        prop, q = outs[1:].T, None                                 # greedy: feed j's input is d_j
    else:
        prop, q = outs[:gamma].T, jnp.swapaxes(q[:gamma], 0, 1)
    return prop, q, dict(state, cache=cache)


@functools.partial(jax.jit, static_argnames=("module",))
def _prefill(module: Qwen2MoT, params, cache: KVCache, ids, q_len):
    x = module.apply({"params": params}, ids, method=Qwen2MoT.embed)
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32)[None], ids.shape)
    _, (k, v) = module.apply({"params": params}, x, pos, chunk_vectors(q_len, ids.shape[1], True), Routing.und(),
                             cache=(cache.k, cache.v, cache.length))
    return append(cache, k, v, q_len)


@dataclasses.dataclass(frozen=True)
class LMDraft:
    """A dense Qwen2 LM draft (:func:`load_qwen2_draft`). Static settings only (hashable: part of the compiled
    loop's key); the params travel in the loop state. ``room``: generation slots of its cache (set by the loop);
    ``out_vocab``: the target's vocabulary size (set by :meth:`bind`)."""

    cfg: LLMConfig
    module: Qwen2MoT
    params: dict = dataclasses.field(compare=False, hash=False, repr=False)
    vocab: Optional[dict] = dataclasses.field(compare=False, hash=False, repr=False)
    source: str = "<draft>"
    room: int = 0
    out_vocab: int = 0

    def bind(self, target: Context) -> "LMDraft":
        """Checked against ``target`` (a Context or Pipeline; :func:`check_vocab`); proposes ids of the target's
        vocabulary."""
        check_vocab(self.cfg.vocab_size, self.vocab, target.engine.tok.hf.get_vocab(), self.source)
        return dataclasses.replace(self, out_vocab=target.engine.cfg.llm.vocab_size)

    def reserve(self, extra: int) -> "LMDraft":
        return dataclasses.replace(self, room=int(extra))

    def init(self, ctx: Context, prompt_ids, gamma: int) -> dict:
        if not self.out_vocab:
            raise ValueError("LMDraft: bind(target_context) first (speculative_generate does)")
        B = len(prompt_ids)
        n = np.array([len(p) for p in prompt_ids], np.int32)
        P = bucket(max(1, int(n.max())), 16)
        ids = np.zeros((B, P), np.int32)
        for b, p in enumerate(prompt_ids):
            ids[b, :len(p)] = p
        cache = KVCache.empty(self.cfg, B, bucket(P + self.room, CACHE_MIN), self.module.opts.dtype)
        cache = _prefill(self.module, self.params, cache, jnp.asarray(ids), jnp.asarray(n))
        return dict(params=self.params, cache=cache, rope=jnp.asarray(n), base=jnp.asarray(n))

    def step(self, state, cache, tok, pos):
        """One cached token ``tok [B]`` at position ``pos [B]`` -> (logits ``[B, out_vocab]``, cache)."""
        m, params = self.module, state["params"]
        x = m.apply({"params": params}, tok[:, None], method=Qwen2MoT.embed)
        q_len = jnp.ones_like(tok)
        h, (k, v) = m.apply({"params": params}, x, pos[:, None], chunk_vectors(q_len, 1, True), Routing.und(),
                            cache=(cache.k, cache.v, cache.length))
        logits = m.apply({"params": params}, h[:, 0], method=Qwen2MoT.logits).astype(jnp.float32)
        V, W = self.out_vocab, logits.shape[-1]
        logits = logits[:, :V] if W >= V else jnp.pad(logits, ((0, 0), (0, V - W)), constant_values=-jnp.inf)
        return logits, append(cache, k, v, q_len)

    def propose(self, state, cur, tokens, n, key, gamma, sampling):
        return lm_propose(self.step, state, cur, n, key, gamma, sampling)

    def rollback(self, state, n):
        return dict(state, cache=state["cache"].replace(length=state["base"] + n - 1))

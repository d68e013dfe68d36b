"""Qwen2 Mixture-of-Transformer-experts decoder (docs/architecture.md#mot-decoder).

Every layer holds two full parameter sets: the understanding ("und") expert with the original Qwen2
names and the generation ("gen") expert with the ``_moe_gen`` suffix. Attention is computed jointly
over the whole sequence; only projections, q/k norms, layer norms and MLPs are expert-specific.
With ``layer_module="Qwen2DecoderLayer"`` (``cfg.use_moe`` False) this is a plain dense Qwen2
(optionally with q/k norm).

Routing (which expert a token uses) is given by a :class:`Routing` value:

* ``Routing.und()``: every token uses the und expert (text prefill/decode, ViT prefill);
* ``Routing.split(n)``: the first ``n`` tokens of each row use und, the rest gen — no wasted
  FLOPs; packing places tokens accordingly (attention does not depend on physical order, because
  the mask comes from per-token vectors and RoPE positions are explicit);
  ``Routing.split(n, g)`` with ``n + g > seq``: und runs on the first ``n`` tokens, gen on the last
  ``g``, and only the overlap of the two windows is computed by both and selected by ``is_gen``
  (the training layout of :func:`bagel_jax.data.packing.to_expert_streams`);
* ``Routing.select()`` with a per-token ``is_gen`` array: both experts are computed on every token
  and selected per token (simple, 2x the expert FLOPs; used where the layout is arbitrary).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from .. import sharding as shd
from ..config import LLMConfig
from ..convert import keymap
from ..nn.attention import CacheView, attention
from ..nn.layers import RMSNorm, apply_rope, rope_cos_sin
from ..nn.intermediates import COLLECTION
from ..nn.lora import DROPOUT_RNG
from ..nn.options import ModelOptions


@dataclasses.dataclass(frozen=True)
class Routing:
    kind: str                   # "und" | "gen" | "split" | "select"
    n_und: int = 0              # for "split": und window = the first n_und tokens
    n_gen: Optional[int] = None  # for "split": gen window = the last n_gen tokens (None = the rest)

    @staticmethod
    def und() -> "Routing":
        return Routing("und")

    @staticmethod
    def gen() -> "Routing":
        return Routing("gen")

    @staticmethod
    def split(n_und: int, n_gen: Optional[int] = None) -> "Routing":
        return Routing("split", int(n_und), None if n_gen is None else int(n_gen))

    @staticmethod
    def select() -> "Routing":
        return Routing("select")


def _detach_und(x: jax.Array, routing: Routing, is_gen: Optional[jax.Array]) -> jax.Array:
    """``x`` (``[batch, seq, ...]``) with the und tokens' rows under ``stop_gradient`` (``freeze_und``)."""
    return _route(jax.lax.stop_gradient, lambda t: t, x, routing, is_gen)


def _route(und_fn, gen_fn, x: jax.Array, routing: Routing, is_gen: Optional[jax.Array]) -> jax.Array:
    """Apply the und or gen version of an op per token. ``x`` is ``[batch, seq, ...]``."""
    if gen_fn is None or routing.kind == "und":
        return und_fn(x)
    if routing.kind == "gen":
        return gen_fn(x)
    if routing.kind == "split":
        L = x.shape[1]
        n = min(max(routing.n_und, 0), L)
        lo = n if routing.n_gen is None else L - min(max(routing.n_gen, 0), L)   # gen window start
        if lo > n:
            raise ValueError(f"Routing.split({routing.n_und}, {routing.n_gen}) leaves tokens {n}..{lo} "
                             f"of {L} without an expert")
        if n == 0:
            return gen_fn(x)
        if lo == L:
            return und_fn(x)
        if lo == n:
            return jnp.concatenate([und_fn(x[:, :n]), gen_fn(x[:, n:])], axis=1)
        if is_gen is None:
            raise ValueError("Routing.split with overlapping windows needs a per-token is_gen array")
        u, g = und_fn(x[:, :n]), gen_fn(x[:, lo:])     # each expert once, over its own window
        sel = is_gen[:, lo:n].reshape(is_gen[:, lo:n].shape + (1,) * (u.ndim - 2))
        return jnp.concatenate([u[:, :lo], jnp.where(sel, g[:, :n - lo], u[:, lo:]), g[:, n - lo:]], axis=1)
    if routing.kind == "select":
        if is_gen is None:
            raise ValueError("Routing.select() needs a per-token is_gen array")
        sel = is_gen.reshape(is_gen.shape + (1,) * (x.ndim - is_gen.ndim))
        return jnp.where(sel, gen_fn(x), und_fn(x))
    raise ValueError(f"unknown routing {routing.kind!r}")


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, no biases."""

    hidden: int
    width: int
    opts: ModelOptions = ModelOptions()

    @nn.compact
    def __call__(self, x):
        dense = lambda n, name: self.opts.dense(n, False, name)
        h = nn.silu(dense(self.width, "gate_proj")(x)) * dense(self.width, "up_proj")(x)
        h = shd.constrain(h, ("batch", "length", "mlp"), self.opts.activation_rules)      # [batch, seq, mlp]
        return dense(self.hidden, "down_proj")(h)


class MoTLayer(nn.Module):
    """One decoder layer. Called inside ``nn.scan``: ``(x, broadcast inputs, per-layer cache) -> (x, (k, v))``."""

    cfg: LLMConfig
    routing: Routing
    opts: ModelOptions = ModelOptions()

    def setup(self):
        cfg = self.cfg
        D, H, K, dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        dense = self.opts.dense
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, self.opts.param_dtype, name=name)
        suffixes = ("", "_moe_gen") if cfg.use_moe else ("",)
        self.attn = {s: dict(q=dense(H * dh, True, f"q_proj{s}"), k=dense(K * dh, True, f"k_proj{s}"),
                             v=dense(K * dh, True, f"v_proj{s}"), o=dense(D, False, f"o_proj{s}"),
                             **(dict(q_norm=norm(f"q_norm{s}"), k_norm=norm(f"k_norm{s}")) if cfg.qk_norm else {}))
                     for s in suffixes}
        self.mlps = {s: MLP(D, cfg.intermediate_size, self.opts, name=f"mlp{s}") for s in suffixes}
        self.in_norms = {s: norm(f"input_layernorm{s}") for s in suffixes}
        self.post_norms = {s: norm(f"post_attention_layernorm{s}") for s in suffixes}

    def _apply(self, table, x, is_gen, key=None):
        und = table[""] if key is None else table[""][key]
        gen = None
        if "_moe_gen" in table:
            gen = table["_moe_gen"] if key is None else table["_moe_gen"][key]
        return _route(und, gen, x, self.routing, is_gen)

    def _frozen_und(self, x, is_gen):
        """``x`` with the und rows detached when ``opts.freeze_und`` (and there is a gen expert), else ``x``."""
        if self.opts.freeze_und and self.cfg.use_moe:
            return _detach_und(x, self.routing, is_gen)
        return x

    def __call__(self, x, cos, sin, mask, is_gen, cache=None, layer=None):
        """
        Args:
          x: ``[batch, seq, hidden]`` residual stream.
          cos, sin: ``[batch, seq, head_dim]`` RoPE tables for the tokens' positions.
          mask: :class:`~bagel_jax.nn.attention.MaskVectors` of this chunk's tokens, each ``[batch, seq]`` (with a
            cache, every valid cache slot is visible to every query on top of it).
          is_gen: ``[batch, seq]`` bool for ``Routing.select`` and an overlapping ``Routing.split``, else unused.
          cache: None or ``(k, v, length)``: all layers' cached keys/values
            ``[layers, batch, capacity, kv_heads, head_dim]`` and valid slots per row ``[batch]``;
            ``layer`` is this layer's index into them.
        Returns:
          ``(x, (k, v))`` with this chunk's post-norm, post-RoPE keys and values ``[batch, seq, kv_heads, head_dim]``.
        """
        cfg = self.cfg
        B, L, _ = x.shape
        H, K, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        x = x.astype(self.opts.dtype)
        x = shd.constrain(x, ("batch", "res_length", "embed"), self.opts.activation_rules)
        h = self._apply(self.in_norms, x, is_gen)
        q = self._apply(self.attn, h, is_gen, "q").reshape(B, L, H, dh)
        k = self._apply(self.attn, h, is_gen, "k").reshape(B, L, K, dh)
        v = self._apply(self.attn, h, is_gen, "v").reshape(B, L, K, dh)
        if cfg.qk_norm:
            q = self._apply(self.attn, q, is_gen, "q_norm")
            k = self._apply(self.attn, k, is_gen, "k_norm")
        q, k, v = (self._frozen_und(t, is_gen) for t in (q, k, v))     # freeze_und: after the norms, as official
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        q = shd.constrain(q, ("batch", "length", "heads", "head_dim"), self.opts.activation_rules)
        k = shd.constrain(k, ("batch", "length", "kv_heads", "head_dim"), self.opts.activation_rules)
        v = shd.constrain(v, ("batch", "length", "kv_heads", "head_dim"), self.opts.activation_rules)
        view = None if cache is None else CacheView(cache[0], cache[1], cache[2], layer)
        o = attention(q, k, v, mask, mask, self.opts.attention_impl, cache=view,   # [batch, seq, heads, head_dim]
                      auto_min_len=self.opts.auto_blocked_min_len)
        o = shd.constrain(o, ("batch", "length", "heads", "head_dim"), self.opts.activation_rules)
        x = x + self._frozen_und(self._apply(self.attn, o.reshape(B, L, H * dh), is_gen, "o"), is_gen)
        x = shd.constrain(x, ("batch", "res_length", "embed"), self.opts.activation_rules)
        x = x + self._frozen_und(self._apply(self.mlps, self._apply(self.post_norms, x, is_gen), is_gen), is_gen)
        x = shd.constrain(x, ("batch", "res_length", "embed"), self.opts.activation_rules)
        return x, (k, v)


class _ScanBody(nn.Module):
    """Adapter giving ``MoTLayer`` the ``(carry, xs) -> (carry, ys)`` signature ``nn.scan`` wants; sows
    each layer's output as ``hidden`` (stacked over layers by the scan)."""

    cfg: LLMConfig
    routing: Routing
    opts: ModelOptions

    @nn.compact
    def __call__(self, x, bcast, index):
        cos, sin, mask, is_gen, cache = bcast
        layer = self.opts.remat(MoTLayer)(self.cfg, self.routing, self.opts, name="layer")
        x, kv = layer(x, cos, sin, mask, is_gen, cache, index)
        if self.opts.layer_loop == "scan":        # unrolled: the stack sows all layers' outputs at once
            self.sow(COLLECTION, "hidden", x)
        return x, kv


class LayerStack(nn.Module):
    """All decoder layers under one ``nn.scan`` (parameters stacked on a leading layer axis)."""

    cfg: LLMConfig
    opts: ModelOptions = ModelOptions()

    @nn.compact
    def __call__(self, x, positions, mask, routing: Routing, is_gen=None, cache=None):
        """
        Args:
          x: ``[batch, seq, hidden]``; positions: ``[batch, seq]`` RoPE positions.
          mask: :class:`~bagel_jax.nn.attention.MaskVectors` of this chunk's tokens (``seg``, ``vis``, ``nblk``,
            each ``[batch, seq]``).
          cache: None or ``(k, v, length)``: keys/values ``[layers, batch, capacity, kv_heads, head_dim]``
            and valid slots per row ``[batch]``, all visible to every query of the chunk. The cache is
            read, never written (the caller appends the returned keys/values).
        Returns:
          ``(x, (k, v))``: new keys/values of this chunk ``[layers, batch, seq, kv_heads, head_dim]``. Every
          layer's output is sown as ``hidden`` ``[layers, batch, seq, hidden]`` (:mod:`bagel_jax.nn.intermediates`).
        """
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, self.opts.dtype)
        if is_gen is None:
            is_gen = jnp.zeros(x.shape[:2], bool)
        if self.opts.layer_loop == "unrolled":     # per-layer parameter arrays (nn/layer_loop.py)
            hidden, ks, vs = [], [], []
            for i in range(self.cfg.num_hidden_layers):
                x, (k, v) = _ScanBody(self.cfg, routing, self.opts, name=f"layers_{i}")(
                    x, (cos, sin, mask, is_gen, cache), i)
                hidden.append(x), ks.append(k), vs.append(v)
            self.sow(COLLECTION, "hidden", jnp.stack(hidden))
            return x, (jnp.stack(ks), jnp.stack(vs))
        scan = nn.scan(
            _ScanBody,
            variable_axes={"params": 0, "intermediates": 0},
            split_rngs={"params": True, DROPOUT_RNG: True},
            in_axes=(nn.broadcast, 0),
            length=self.cfg.num_hidden_layers,
        )
        body = scan(self.cfg, routing, self.opts, name="layers")
        # the cache is a loop constant (each layer reads its own valid blocks); the scanned input is
        # the layer index, so no per-layer slice of the whole buffer is ever materialised.
        x, kv = body(x, (cos, sin, mask, is_gen, cache), jnp.arange(self.cfg.num_hidden_layers))
        return x, kv


class Qwen2MoT(nn.Module):
    """Embedding, MoT layer stack, per-expert final norms and the LM head."""

    cfg: LLMConfig
    opts: ModelOptions = ModelOptions()

    def setup(self):
        cfg, o = self.cfg, self.opts
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=o.dtype, param_dtype=o.param_dtype,
                                     embedding_init=nn.initializers.normal(0.02))
        self.stack = LayerStack(cfg, o, name="model")
        self.norm = RMSNorm(cfg.rms_norm_eps, o.param_dtype)
        if cfg.use_moe:
            self.norm_moe_gen = RMSNorm(cfg.rms_norm_eps, o.param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = o.dense(cfg.vocab_size, False)

    def embed(self, ids: jax.Array) -> jax.Array:
        """``[...] int -> [..., hidden]``."""
        return self.embed_tokens(ids)

    def __call__(self, x, positions, mask, routing: Routing, is_gen=None, cache=None, final_norm: bool = True):
        """Layers + final norms. Same arguments as :class:`LayerStack`; returns ``(h, (k, v))`` (``h``: the
        last layer's output before the final norms when ``final_norm`` is False)."""
        if is_gen is None:
            is_gen = jnp.zeros(x.shape[:2], bool)
        frozen = self.opts.freeze_und and self.cfg.use_moe
        if frozen:                       # freeze_und: und input embeddings and final-norm outputs detached
            x = _detach_und(x, routing, is_gen)
        x, kv = self.stack(x, positions, mask, routing, is_gen, cache)
        if not final_norm:
            return x, kv
        h = self.final_norm(x, routing, is_gen)
        return (_detach_und(h, routing, is_gen) if frozen else h), kv

    def final_norm(self, x, routing: Routing, is_gen=None):
        """The per-expert final RMSNorm (``norm`` / ``norm_moe_gen``) routed like the layers."""
        gen_norm = self.norm_moe_gen if self.cfg.use_moe else None
        return _route(self.norm, gen_norm, x, routing, is_gen)

    def init_all(self, ids, positions, mask):
        """Touch every parameter (for ``init`` / ``eval_shape``)."""
        h, _ = self(self.embed(ids), positions, mask, Routing.select(), jnp.zeros(ids.shape, bool))
        return self.logits(h)

    def logits(self, h: jax.Array) -> jax.Array:
        """LM head ``[..., hidden] -> [..., vocab]`` (no bias, no softcap)."""
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens.attend(h)
        return self.lm_head(h)


def key_map(cfg: LLMConfig) -> list[keymap.Entry]:
    """Official names relative to ``language_model.`` -> paths relative to the Qwen2MoT params root."""
    E = []
    E.append(keymap.Entry("model.embed_tokens.weight", ("embed_tokens", "embedding")))
    E += keymap.norm("model.norm", ("norm",), bias=False)
    if cfg.use_moe:
        E += keymap.norm("model.norm_moe_gen", ("norm_moe_gen",), bias=False)
    if not cfg.tie_word_embeddings:
        E += keymap.linear("lm_head", ("lm_head",), bias=False)
    suffixes = ("", "_moe_gen") if cfg.use_moe else ("",)
    root = ("model", "layers", "layer")
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for s in suffixes:
            for proj in ("q_proj", "k_proj", "v_proj"):
                E += keymap.linear(p + f"self_attn.{proj}{s}", root + (f"{proj}{s}",), bias=True, layer=i)
            E += keymap.linear(p + f"self_attn.o_proj{s}", root + (f"o_proj{s}",), bias=False, layer=i)
            if cfg.qk_norm:
                E += keymap.norm(p + f"self_attn.q_norm{s}", root + (f"q_norm{s}",), bias=False, layer=i)
                E += keymap.norm(p + f"self_attn.k_norm{s}", root + (f"k_norm{s}",), bias=False, layer=i)
            for proj in ("gate_proj", "up_proj", "down_proj"):
                E += keymap.linear(p + f"mlp{s}.{proj}", root + (f"mlp{s}", proj), bias=False, layer=i)
            E += keymap.norm(p + f"input_layernorm{s}", root + (f"input_layernorm{s}",), bias=False, layer=i)
            E += keymap.norm(p + f"post_attention_layernorm{s}", root + (f"post_attention_layernorm{s}",), bias=False, layer=i)
    return E

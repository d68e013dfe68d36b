"""Immutable inference contexts (docs/architecture.md#inference-contexts-and-cfg-branches).

A :class:`Context` holds a batch of conversations. Its conditional branch ``gen`` holds everything; for
image generation it also keeps the named guidance branches of :data:`bagel_jax.inference.cfg.BRANCH_RULES`
(official: ``cfg_text``, a snapshot of ``gen`` taken just before each text input and refreshed after each
image; ``cfg_img``, the system prompt and every text input but no image and no thinking text). Each
branch is a :class:`Branch` (KV cache + per-row length and RoPE counter); the rules, not this module,
say how a branch follows each ``add_*``.

Every ``add_*`` returns a new Context and costs only the new tokens: history is never re-encoded.
Branches that are equal share the same object (plain text-to-image: ``cfg_img is gen``), which the
sampler uses to compute one velocity instead of two. Snapshots are free (arrays are immutable).

Static shapes (the only bucketed shapes of the engine, see :func:`bucket`):

* cache capacity: ``bucket(needed, CACHE_MIN)``; a cache grows by copying into the next bucket;
* text chunk length: ``bucket(n, TEXT_MIN)`` (padding is masked and never counted in ``length``);
* ViT patch count: ``fine_bucket(n, VIT_MIN, VIT_STEPS)`` (at most 1/16 padding: 324 patches -> 336).

Latent (VAE) token counts are not bucketed: they follow the image size, which the resize rule already
snaps to a few values. All input checks (unreadable image, size out of range, context too long) run on
the host before any device work.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from .. import layout
from ..images import patchify
from . import blocks
from .cfg import BRANCH_RULES
from .engine import CACHE_MIN, ContextError, Engine, on_mesh
from .kv_cache import KVCache

TEXT_MIN = 16
VIT_MIN = 64
VIT_STEPS = 16   # ViT buckets per doubling of the patch count

GEN_THINK_SYSTEM_PROMPT = (
    "You should first think about the planning process in the mind and then generate the image. \n"
    "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process here </think> "
    "image here")
VLM_THINK_SYSTEM_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user with the answer. \n"
    "The reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning process here </think> "
    "answer here")


MAX_SEED = 2 ** 32 - 1   # jax.random.PRNGKey keeps 32 bits without x64: larger seeds would alias smaller ones


def seed_key(seed) -> jax.Array:
    """``PRNGKey(seed)`` for an integer seed in ``[0, MAX_SEED]``; anything else is refused with a
    :class:`ContextError` (no OverflowError, no silent reduction: ``PRNGKey(2**32)`` equals ``PRNGKey(0)``).
    Derived seeds (``seed + i`` for row ``i``) are checked the same way."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= MAX_SEED:
        raise ContextError(f"seed must be an integer in [0, {MAX_SEED}] (row i of a batch uses seed + i), got {seed!r}")
    return jax.random.PRNGKey(int(seed))


def bucket(n: int, minimum: int) -> int:
    """Smallest value of ``{minimum * 2^k, 1.5 * minimum * 2^k}`` that is ``>= n``."""
    b = minimum
    while True:
        if b >= n:
            return b
        if b * 3 // 2 >= n:
            return b * 3 // 2
        b *= 2


def fine_bucket(n: int, minimum: int, steps: int) -> int:
    """``n`` rounded up to a multiple of ``2^floor(log2 n) / steps`` (``steps`` buckets per doubling,
    padding < ``1 / steps`` of ``n``), at least ``minimum``; ``steps`` a power of two."""
    if n <= minimum:
        return minimum
    grain = max(1, (1 << (int(n).bit_length() - 1)) // steps)
    return -(-n // grain) * grain


@functools.partial(jax.jit, static_argnames=("capacity",))
def _grow(cache: KVCache, capacity: int) -> KVCache:
    pad = [(0, 0), (0, 0), (0, capacity - cache.k.shape[2]), (0, 0), (0, 0)]
    return KVCache(jnp.pad(cache.k, pad), jnp.pad(cache.v, pad), cache.length).constrained()


@dataclasses.dataclass(frozen=True)
class Branch:
    """One KV cache with host copies of its per-row lengths and RoPE counters."""

    cache: KVCache
    length: np.ndarray    # [batch] int64, valid slots (mirror of cache.length)
    rope: np.ndarray      # [batch] int64, next RoPE position

    @staticmethod
    def empty(engine: Engine, batch: int) -> "Branch":
        z = np.zeros((batch,), np.int64)
        return Branch(engine.empty_cache(batch), z, z.copy())

    @property
    def batch(self) -> int:
        return int(self.length.shape[0])

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def reserve(self, engine: Engine, extra: int) -> "Branch":
        """A branch whose cache can take ``extra`` more slots per row (copy into a larger bucket if needed)."""
        need = int(self.length.max(initial=0)) + int(extra)
        if need <= self.capacity:
            return self
        return dataclasses.replace(self, cache=_grow(self.cache, bucket(need, CACHE_MIN)))

    def after(self, cache: KVCache, kind: str, n) -> "Branch":
        """The branch once a block of ``kind`` (:mod:`bagel_jax.layout`) with ``n`` ``[batch]`` body tokens
        per row is in ``cache``: length and RoPE counter advanced by the layout rules."""
        return Branch(cache, self.length + layout.block_len(n), self.rope + layout.rope_advance(kind, n))

    def with_capacity(self, capacity: int) -> "Branch":
        if capacity == self.capacity:
            return self
        return dataclasses.replace(self, cache=_grow(self.cache, capacity))


HistoryItem = tuple  # (kind, role, per-row values); kind in {"text", "image"}


@dataclasses.dataclass(frozen=True)
class Context:
    """A batch of ``batch`` conversations (see the module docstring). Build with :meth:`Context.new`.

    ``guides`` maps each guidance branch name to its branch; it is empty when ``track_cfg`` is False
    (understanding-only contexts, which never generate images and so skip the guidance prefills).
    """

    engine: Engine
    gen: Branch
    guides: Mapping[str, Branch] = dataclasses.field(default_factory=dict)
    history: tuple = ()
    image_hw: Optional[tuple] = None         # per row (H, W) of the last VAE-resized image
    key: Optional[np.ndarray] = None          # [batch, 2] per-row PRNG key data for VAE posterior draws
    last_hidden: object = None                # final hidden states of the last gen-branch chunk (debugging)

    @staticmethod
    def new(engine: Engine, batch: int = 1, track_cfg: bool = True, seed: int = 0) -> "Context":
        if batch < 1:
            raise ContextError(f"batch must be >= 1, got {batch}")
        e = Branch.empty(engine, batch)
        return Context(engine, e, {name: e for name in BRANCH_RULES} if track_cfg else {}, (), None,
                       np.stack([np.asarray(seed_key(seed + i)) for i in range(batch)]))

    @property
    def batch(self) -> int:
        return self.gen.batch

    @property
    def track_cfg(self) -> bool:
        return bool(self.guides)

    @property
    def branches(self) -> dict:
        """Every branch by name: ``"gen"`` and the guidance branches."""
        return {"gen": self.gen, **self.guides}

    @property
    def cfg_text(self) -> Optional[Branch]:
        return self.guides.get("cfg_text")

    @property
    def cfg_img(self) -> Optional[Branch]:
        return self.guides.get("cfg_img")

    def _follow(self, event: str, gen: Branch, extend=None) -> dict:
        """The guidance branches after ``event`` took ``gen`` from ``self.gen`` to ``gen`` (cfg.BRANCH_RULES).
        ``extend(branch)`` adds the event's tokens to a branch; a branch equal to ``self.gen`` becomes ``gen``."""
        out = {}
        for name, br in self.guides.items():
            act = BRANCH_RULES[name][event]
            if act == "extend":
                if extend is None:
                    raise ContextError(f"branch {name!r}: 'extend' is not supported for {event!r} events")
                br = gen if br is self.gen else extend(br)
            out[name] = {"keep": br, "extend": br, "gen_before": self.gen, "gen_after": gen}[act]
        return out

    def _rows(self, values, what: str) -> list:
        if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
            values = [values]
        values = list(values)
        if len(values) == 1 and self.batch > 1:
            values = values * self.batch
        if len(values) != self.batch:
            raise ContextError(f"{what}: got {len(values)} values for a context of batch {self.batch}")
        return values

    def check_room(self, extra, what: str) -> None:
        """Raise :class:`ContextError` if adding ``extra`` (per row) slots would exceed the engine's limit."""
        need = int((self.gen.length + np.asarray(extra)).max())
        if need > self.engine.max_context:
            raise ContextError(f"context too long for {what}: {need} tokens needed, limit "
                               f"{self.engine.max_context} (start a new conversation or raise max_context)")

    # -- text ---------------------------------------------------------------------------------------------
    def _text_branch(self, br: Branch, seqs: list[list[int]]) -> tuple[Branch, jax.Array]:
        eng = self.engine
        n = np.array([len(s) for s in seqs], np.int64)
        Lq = bucket(int(n.max()), TEXT_MIN)
        if int((br.length + n).max()) > eng.max_context:
            raise ContextError(f"context too long: {int((br.length + n).max())} tokens needed, limit "
                               f"{eng.max_context} (start a new conversation or raise max_context)")
        br = br.reserve(eng, Lq)
        ids = np.zeros((br.batch, Lq), np.int32)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = s
        pos = (br.rope[:, None] + np.arange(Lq)[None]).astype(np.int32)
        h, cache, _ = blocks.text_chunk(eng.model, eng.params, br.cache, jnp.asarray(ids), jnp.asarray(pos),
                                        jnp.asarray(n, jnp.int32), True, False)
        return br.after(cache, layout.TEXT, n - layout.MARKERS), h

    def text_ids(self, texts) -> list[list[int]]:
        sp = self.engine.sp
        return [layout.text_block(len(ids)).token_ids(sp, ids)
                for ids in map(self.engine.tok.encode, self._rows(texts, "text"))]

    @on_mesh
    def add_text(self, texts: Union[str, Sequence[str]], role: str = "user") -> "Context":
        """Add a text segment (one string, or one per row): gen += text, the guidance branches follow the
        "text" rules (official: cfg_text <- gen before the text, cfg_img += text;
        docs/architecture.md#inference-contexts-and-cfg-branches). ``role`` is kept in the history only (no chat
        template)."""
        return self._add_text(texts, role, "text", "add_text")

    @on_mesh
    def add_generated_text(self, texts: Union[str, Sequence[str]], role: str = "think") -> "Context":
        """Add model-generated thinking text: re-tokenised and prefilled into ``gen``; the guidance branches
        follow the "think" rules (official: unchanged)."""
        return self._add_text(texts, role, "think", "add_generated_text")

    def _add_text(self, texts, role: str, rule: str, what: str) -> "Context":
        """Prefill text into ``gen``; the guidance branches follow the CFG branch rule ``rule``."""
        texts = self._rows(texts, what)
        seqs = self.text_ids(texts)
        gen, h = self._text_branch(self.gen, seqs)
        guides = self._follow(rule, gen, lambda br: self._text_branch(br, seqs)[0])
        return dataclasses.replace(self, gen=gen, guides=guides, last_hidden=h,
                                   history=self.history + (("text", role, tuple(texts)),))

    # -- images -------------------------------------------------------------------------------------------
    @on_mesh
    def add_image(self, images, vae: bool = True, vit: bool = True, role: str = "user",
                  vae_eps: Optional[Sequence[np.ndarray]] = None, preprocessed: Optional[list] = None,
                  keep_hidden: bool = False) -> "Context":
        """Add an image (one, or one per row): gen += VAE block (if ``vae``) then ViT block (if ``vit``);
        the guidance branches follow the "image" rules (official: cfg_text <- gen after; cfg_img unchanged).

        ``vae_eps``: per row posterior noise ``[H/8, W/8, C]`` (NHWC) for the VAE encoding (the official
        encode samples the posterior); drawn from the row's key when None (row i of a context made with
        ``seed=s`` starts from ``PRNGKey(s + i)``, so a batched context equals single ones with seeds s + i).
        ``keep_hidden``: also keep each block's final hidden states in ``last_hidden[kind]["h"]`` (the parity
        checks read them); off by default, which lets XLA skip the last layer's work that only they need.
        """
        if not (vae or vit):
            raise ContextError("add_image: at least one of vae / vit must be True")
        eng = self.engine
        pre = preprocessed if preprocessed is not None else [
            eng.preprocess(im, vae=vae, vit=vit) for im in self._rows(images, "add_image")]
        if len(pre) != self.batch:
            raise ContextError(f"add_image: got {len(pre)} images for a context of batch {self.batch}")
        need = [sum(b.length for b in layout.image_blocks(eng.cfg, q["hw"] if vae else None,
                                                           q["vit"].shape[1:] if vit else None)) for q in pre]
        self.check_room(need, "add_image")
        gen = self.gen
        key = self.key
        infos = {}
        if vae:
            gen, key, infos["vae"] = self._vae_block(gen, pre, vae_eps, keep_hidden)
        if vit:
            gen, infos["vit"] = self._vit_block(gen, pre, keep_hidden)
        return dataclasses.replace(self, gen=gen, guides=self._follow("image", gen), key=key, last_hidden=infos,
                                   image_hw=tuple(p["hw"] for p in pre),
                                   history=self.history + (("image", role, tuple(p["pil"] for p in pre)),))

    def _vae_block(self, br: Branch, pre: list, vae_eps, keep_hidden: bool = False):
        eng, cfg = self.engine, self.engine.cfg
        ds, p, C, Gl = cfg.latent_downsample, cfg.latent_patch_size, cfg.vae.z_channels, cfg.max_latent_size
        ns = [layout.latent_tokens(*q["hw"], ds) for q in pre]
        N = max(ns)
        br = br.reserve(eng, layout.block_len(N))
        key = np.array(self.key)
        lat_pos = np.zeros((br.batch, N), np.int32)
        toks = []
        for i, q in enumerate(pre):
            H, W = q["hw"]
            if vae_eps is not None:
                eps = jnp.asarray(vae_eps[i], jnp.float32)[None]
            else:
                key[i], sub = self._replace_key(key[i])
                eps = jax.random.normal(sub, (1, H // cfg.vae.downsample, W // cfg.vae.downsample, C), jnp.float32)
            img = jnp.asarray(np.transpose(q["vae"], (1, 2, 0)))[None]
            t = blocks.vae_encode_tokens(eng.vae, eng.vae_params, img, eps, p)
            toks.append(t[0])
            lat_pos[i, :ns[i]] = np.asarray(blocks.latent_grid(H // ds, W // ds, Gl))
        x0j = jnp.stack([jnp.pad(t, ((0, N - t.shape[0]), (0, 0))) for t in toks]).astype(jnp.float32)
        n = np.asarray(ns, np.int64)
        h, cache = blocks.latent_prefill(eng.model, eng.params, br.cache, x0j, jnp.asarray(lat_pos),
                                         jnp.asarray(n, jnp.int32), jnp.asarray(br.rope, jnp.int32), eng.markers,
                                         hidden=keep_hidden)
        info = dict(latent_tokens=toks, lat_pos=lat_pos, n=n, **(dict(h=h) if keep_hidden else {}))
        return br.after(cache, layout.VAE, n), key, info

    @staticmethod
    def _replace_key(key):
        k1, k2 = jax.random.split(jnp.asarray(key, jnp.uint32))
        return np.asarray(k1), k2

    def _vit_block(self, br: Branch, pre: list, keep_hidden: bool = False):
        eng, cfg = self.engine, self.engine.cfg
        pt = [patchify(q["vit"], cfg.vit.patch_size, cfg.vit_max_num_patch_per_side) for q in pre]
        ns = np.array([t.shape[0] for t, _ in pt], np.int64)
        N = fine_bucket(int(ns.max()), VIT_MIN, VIT_STEPS)
        br = br.reserve(eng, layout.block_len(N))
        patches = np.zeros((br.batch, N, cfg.vit.patch_dim), np.float32)
        pos = np.zeros((br.batch, N), np.int32)
        for i, (t, ps) in enumerate(pt):
            patches[i, :len(t)] = t
            pos[i, :len(t)] = ps
        h, cache, _ = blocks.vit_chunk(eng.model, eng.params, br.cache, jnp.asarray(patches), jnp.asarray(pos),
                                       jnp.asarray(ns, jnp.int32), jnp.asarray(br.rope, jnp.int32), eng.markers,
                                       hidden=keep_hidden)
        info = dict(n=ns, pos=[ps for _, ps in pt], **(dict(h=h) if keep_hidden else {}))
        return br.after(cache, layout.VIT, ns), info

    # -- helpers ------------------------------------------------------------------------------------------
    def select_rows(self, rows: Sequence[int]) -> "Context":
        """A context with only the given rows (e.g. to continue one conversation of a batch)."""
        idx = np.asarray(rows, np.int64)

        taken = {}   # by id: branches that are one object stay one object

        def take(br: Branch) -> Branch:
            if id(br) not in taken:
                c = br.cache
                taken[id(br)] = Branch(KVCache(c.k[:, idx], c.v[:, idx], c.length[idx]), br.length[idx], br.rope[idx])
            return taken[id(br)]

        hist = tuple((k, r, tuple(v[i] for i in idx)) for k, r, v in self.history)
        hw = None if self.image_hw is None else tuple(self.image_hw[i] for i in idx)
        key = None if self.key is None else np.asarray(self.key)[idx]
        return dataclasses.replace(self, gen=take(self.gen), guides={n: take(b) for n, b in self.guides.items()},
                                   history=hist, image_hw=hw, key=key)

    def num_tokens(self) -> np.ndarray:
        return self.gen.length.copy()

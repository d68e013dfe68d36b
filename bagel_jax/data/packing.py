"""Host-side packing of multimodal samples into one static-shape batch (docs/architecture.md: sequence layout,
attention mask, training packing).

A *sample* is a list of items (text, ViT image, VAE image, RoPE gap). Samples are concatenated into
packed rows; each sample gets its own segment id so samples never attend to each other. Each item
becomes one block of :mod:`bagel_jax.layout` (text; ViT image; VAE image, clean for conditioning or
noised with ``loss=True`` as an MSE target), which gives its tokens, markers, RoPE positions, RoPE
advance and the mask vectors of :mod:`bagel_jax.nn.attention`. CE (if ``loss``) sits at
``<|im_start|>`` + ids of a text block with labels ``ids + [<|im_end|>]``; with ``special_token_loss``
the ``<|im_end|>`` position gets one more CE entry with label ``special_token_label`` (the official plan
fields of the official ``pack_sequence``: e.g. ``<|vision_start|>`` when a generated image follows), flagged in
``ce_special`` so that ``train.special_token_weights`` scales exactly these entries.

Static shapes: the row length ``L`` and the capacities (ViT tokens, latent tokens, VAE images and
their padded size, CE tokens) are arguments; padding entries point at the dump index ``B*L`` (scatter
with ``mode="drop"``) or carry weight 0.

Expert streams (the training layout): with ``Capacities(und_tokens=U, gen_tokens=G)`` every row is
permuted into ``[und tokens | padding | gen tokens]`` with the und tokens inside the first ``U`` slots and
the gen tokens inside the last ``G`` (:func:`to_expert_streams`), so the decoder runs each expert once
on its own window (``Routing.split(U, G)``). Tokens keep their relative order inside each region and
every per-token value (``vis`` included: it stays the *logical* order index), so the mask and RoPE are
unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from .. import layout
from ..config import BagelConfig
from ..images import patchify
from ..layout import SpecialTokens
from . import patch_ar
from .items import Item, PackingError, PositionGap, TextItem, VaeItem, VitItem


KIND_PAD, KIND_TEXT, KIND_VIT, KIND_VAE = layout.KIND_PAD, layout.KIND_TEXT, layout.KIND_VIT, layout.KIND_VAE


@dataclasses.dataclass
class PackedBatch:
    """Numpy arrays of one packed training batch. ``B`` rows of ``L`` tokens."""

    token_ids: np.ndarray     # [B, L] int32 text/marker ids (0 elsewhere)
    kind: np.ndarray          # [B, L] int8 KIND_*
    positions: np.ndarray     # [B, L] int32 RoPE positions
    seg: np.ndarray           # [B, L] int32 sample id (0 = padding)
    vis: np.ndarray           # [B, L] int32
    nblk: np.ndarray          # [B, L] int32
    vit_patches: np.ndarray   # [Nv, p*p*3] float32
    vit_pos: np.ndarray       # [Nv] int32 r*Gv + c
    vit_seg: np.ndarray       # [Nv] int32 ViT image id (1..), 0 = padding
    vit_dest: np.ndarray      # [Nv] int32 flat index into B*L (B*L = padding)
    vae_images: np.ndarray    # [Ni, H, W, 3] float32, zero padded bottom/right
    vae_src: np.ndarray       # [Nl] int32 flat index into the patchified latents [Ni * H/16 * W/16]
    vae_pos: np.ndarray       # [Nl] int32 r*Gl + c
    vae_dest: np.ndarray      # [Nl] int32 flat index into B*L
    vae_t_raw: np.ndarray     # [Nl] float32 raw timestep logit (-inf = clean)
    vae_mse: np.ndarray       # [Nl] bool noised target tokens
    ce_index: np.ndarray      # [Nce] int32 flat index into B*L whose hidden state predicts the label
    ce_label: np.ndarray      # [Nce] int32
    ce_valid: np.ndarray      # [Nce] float32 1 = real CE token, 0 = padding
    ce_reweight: np.ndarray   # [Nce] float32 1/sqrt(text segment length) (official ce_loss_reweighting)
    ce_special: np.ndarray    # [Nce] float32 1 = a special-token label (special_token_loss), 0 otherwise

    @property
    def shape(self) -> tuple[int, int]:
        return self.token_ids.shape

    def arrays(self) -> dict[str, np.ndarray]:
        return dataclasses.asdict(self)

    @property
    def is_gen(self) -> np.ndarray:
        return self.kind == KIND_VAE


@dataclasses.dataclass(frozen=True)
class Capacities:
    """Static sizes of a packed batch (pad up to these). ``None`` = exactly what the data needs."""

    rows: Optional[int] = None
    row_len: Optional[int] = None
    vit_tokens: Optional[int] = None
    latent_tokens: Optional[int] = None
    vae_images: Optional[int] = None
    vae_hw: Optional[tuple[int, int]] = None
    ce_tokens: Optional[int] = None
    und_tokens: Optional[int] = None     # expert-stream layout with this many und slots per row (None = logical)
    gen_tokens: Optional[int] = None     # ... and this many gen slots (None = row_len - und_tokens)


def _cap(name: str, need: int, cap: Optional[int]) -> int:
    if cap is None:
        return need
    if need > cap:
        raise PackingError(f"packed batch needs {need} {name} but the capacity is {cap}")
    return cap


def pack(rows: Sequence[Sequence[Sequence[Item]]], special: SpecialTokens, cfg: BagelConfig,
         caps: Capacities = Capacities()) -> PackedBatch:
    """Pack ``rows[b] = [sample, sample, ...]`` (each sample a list of items) into a :class:`PackedBatch`."""
    p_vit, Gv, Gl = cfg.vit.patch_size, cfg.vit_max_num_patch_per_side, cfg.max_latent_size
    ds = cfg.latent_downsample

    toks, vit, vae_imgs, vae_tok, ce = [], [], [], [], []
    row_lens = []
    vit_img_id = 0
    for b, row in enumerate(rows):
        ids, kind, pos, seg, vis, nblk = [], [], [], [], [], []
        n_noise = 0
        for s_idx, sample in enumerate(row, start=1):
            r = 0
            for item in sample:
                start = len(ids)
                if isinstance(item, PositionGap):
                    r += int(item.n)
                    continue
                body = None
                if isinstance(item, TextItem):
                    blk, body = layout.text_block(len(item.ids)), list(item.ids)
                    if item.loss:
                        labels = list(item.ids) + [special.eos]
                        w = 1.0 / np.sqrt(len(labels))
                        for j, lab in enumerate(labels):
                            ce.append((b, start + j, lab, w, 0.0))
                    if item.special_token_loss:
                        if item.special_token_label is None:
                            raise PackingError("a text item with special_token_loss needs a special_token_label")
                        # the <|im_end|> position, a one-token segment for the reweighting
                        ce.append((b, start + blk.length - 1, int(item.special_token_label), 1.0, 1.0))
                elif isinstance(item, VitItem):
                    tokens, pids = patchify(np.asarray(item.image, np.float32), p_vit, Gv)
                    blk = layout.vit_block(item.image.shape[1], item.image.shape[2], p_vit)
                    vit_img_id += 1
                    for j in range(blk.n):
                        vit.append((tokens[j], pids[j], vit_img_id, b, start + layout.BODY + j))
                elif isinstance(item, VaeItem):
                    _, H, W = item.image.shape
                    if H % ds or W % ds:
                        raise PackingError(f"VAE image size {H}x{W} is not a multiple of {ds}")
                    h, w = H // ds, W // ds
                    if h > Gl or w > Gl:
                        raise PackingError(f"VAE image {H}x{W} exceeds the latent position table "
                                           f"({Gl}x{Gl} tokens = {Gl * ds}px per side)")
                    blk = layout.vae_block(H, W, ds, noised=item.loss)
                    img_idx = len(vae_imgs)
                    vae_imgs.append(np.asarray(item.image, np.float32))
                    if isinstance(item, patch_ar.PatchArItem):    # image_mode "patch_ar" (data/patch_ar.py)
                        block, lat = patch_ar.pack_block(item, special, h, w, start, s_idx, n_noise + 1, r)
                        for acc, add in zip((ids, kind, pos, seg, vis, nblk), block):
                            acc += add
                        vae_tok += [(img_idx, rr, cc, rr * Gl + cc, b, start + j, tr, noisy)
                                    for rr, cc, j, tr, noisy in lat]
                        n_noise += patch_ar.group_count(h * w, item.group)
                        r += 1
                        continue
                    t_raw = float(item.t_raw) if item.loss else -np.inf
                    for rr in range(h):
                        for cc in range(w):
                            vae_tok.append((img_idx, rr, cc, rr * Gl + cc, b, start + layout.BODY + rr * w + cc,
                                            t_raw, item.loss))
                    n_noise += bool(item.loss)
                else:
                    raise PackingError(f"unknown item type {type(item).__name__}")
                s_vec, v_vec, nb_vec = blk.masks(start, s_idx, n_noise if blk.kind == layout.NOISED_VAE else 0)
                ids += blk.token_ids(special, body)
                kind += blk.token_kinds()
                pos += blk.positions(r)
                seg += s_vec
                vis += v_vec
                nblk += nb_vec
                r += blk.rope_advance
        toks.append((ids, kind, pos, seg, vis, nblk))
        row_lens.append(len(ids))

    B = _cap("rows", len(rows), caps.rows)
    L = _cap("tokens per row", max(row_lens, default=1), caps.row_len)
    flat_dump = B * L

    def row_arr(i, dtype):
        out = np.zeros((B, L), dtype)
        for b, t in enumerate(toks):
            out[b, :len(t[i])] = t[i]
        return out

    # ViT tokens
    Nv = _cap("ViT tokens", len(vit), caps.vit_tokens)
    P = p_vit * p_vit * cfg.vit.num_channels
    vit_patches = np.zeros((Nv, P), np.float32)
    vit_pos = np.zeros((Nv,), np.int32)
    vit_seg = np.zeros((Nv,), np.int32)
    vit_dest = np.full((Nv,), flat_dump, np.int32)
    for j, (tk, pid, img, b, l) in enumerate(vit):
        vit_patches[j], vit_pos[j], vit_seg[j], vit_dest[j] = tk, pid, img, b * L + l

    # VAE images: zero-pad bottom/right to the largest size (or the given bucket), as the official trainer does.
    Ni = _cap("VAE images", len(vae_imgs), caps.vae_images)
    Hm = max([im.shape[1] for im in vae_imgs], default=ds)
    Wm = max([im.shape[2] for im in vae_imgs], default=ds)
    if caps.vae_hw is not None:
        if Hm > caps.vae_hw[0] or Wm > caps.vae_hw[1]:
            raise PackingError(f"VAE image {Hm}x{Wm} exceeds the padded size {caps.vae_hw}")
        Hm, Wm = caps.vae_hw
    vae_images = np.zeros((Ni, Hm, Wm, 3), np.float32)
    for i, im in enumerate(vae_imgs):
        vae_images[i, :im.shape[1], :im.shape[2]] = np.transpose(im, (1, 2, 0))
    hm, wm = Hm // ds, Wm // ds
    Nl = _cap("latent tokens", len(vae_tok), caps.latent_tokens)
    vae_src = np.zeros((Nl,), np.int32)
    vae_pos = np.zeros((Nl,), np.int32)
    vae_dest = np.full((Nl,), flat_dump, np.int32)
    vae_t_raw = np.full((Nl,), -np.inf, np.float32)
    vae_mse = np.zeros((Nl,), bool)
    for j, (img, rr, cc, pid, b, l, t_raw, loss) in enumerate(vae_tok):
        vae_src[j] = img * hm * wm + rr * wm + cc
        vae_pos[j], vae_dest[j], vae_t_raw[j], vae_mse[j] = pid, b * L + l, t_raw, loss

    Nce = _cap("CE tokens", len(ce), caps.ce_tokens)
    ce_index = np.zeros((Nce,), np.int32)
    ce_label = np.zeros((Nce,), np.int32)
    ce_valid = np.zeros((Nce,), np.float32)
    ce_reweight = np.zeros((Nce,), np.float32)
    ce_special = np.zeros((Nce,), np.float32)
    for j, (b, l, lab, w, sp) in enumerate(ce):
        ce_index[j], ce_label[j], ce_valid[j], ce_reweight[j], ce_special[j] = b * L + l, lab, 1.0, w, sp

    out = PackedBatch(
        token_ids=row_arr(0, np.int32), kind=row_arr(1, np.int8), positions=row_arr(2, np.int32),
        seg=row_arr(3, np.int32), vis=row_arr(4, np.int32), nblk=row_arr(5, np.int32),
        vit_patches=vit_patches, vit_pos=vit_pos, vit_seg=vit_seg, vit_dest=vit_dest,
        vae_images=vae_images, vae_src=vae_src, vae_pos=vae_pos, vae_dest=vae_dest,
        vae_t_raw=vae_t_raw, vae_mse=vae_mse,
        ce_index=ce_index, ce_label=ce_label, ce_valid=ce_valid, ce_reweight=ce_reweight,
        ce_special=ce_special)
    if caps.und_tokens is not None:
        out, _ = to_expert_streams(out, caps.und_tokens, caps.gen_tokens)
    return out


# -------------------------------------------------------------------------------------------------
# Expert streams: [und region | gen region] per row
# -------------------------------------------------------------------------------------------------

_ROW_FIELDS = ("token_ids", "kind", "positions", "seg", "vis", "nblk")
_INDEX_FIELDS = ("vit_dest", "vae_dest", "ce_index")   # flat indices into B*L (B*L = dump)


def expert_counts(batch: PackedBatch) -> tuple[np.ndarray, np.ndarray]:
    """Real tokens per row that use the und expert (text, markers, ViT) and the gen expert (VAE latents):
    two ``[B]`` int arrays. Padding counts for neither."""
    und = ((batch.kind == KIND_TEXT) | (batch.kind == KIND_VIT)).sum(axis=1)
    gen = (batch.kind == KIND_VAE).sum(axis=1)
    return und.astype(np.int64), gen.astype(np.int64)


def _remap(batch: PackedBatch, perm: np.ndarray) -> PackedBatch:
    """Move token ``perm[b, p]`` of row ``b`` to position ``p``; remap every flat token index."""
    B, L = batch.shape
    inv = np.empty_like(perm)
    rows = np.arange(B)[:, None]
    inv[rows, perm] = np.arange(L)[None, :]
    new_flat = np.concatenate([(rows * L + inv).reshape(-1), [B * L]])   # the dump index stays the dump
    d = batch.arrays()
    for k in _ROW_FIELDS:
        d[k] = d[k][rows, perm]
    for k in _INDEX_FIELDS:
        d[k] = new_flat[d[k]].astype(np.int32)
    return PackedBatch(**d)


def to_expert_streams(batch: PackedBatch, und_tokens: int,
                      gen_tokens: Optional[int] = None) -> tuple[PackedBatch, np.ndarray]:
    """Permute a logical-order batch into the expert-stream layout.

    Row ``b`` becomes ``[und tokens (logical order) | padding | gen tokens (logical order)]``: the und
    tokens in the first ``und_tokens`` slots, the gen tokens in the last ``gen_tokens`` slots (default
    ``L - und_tokens``; ``und_tokens + gen_tokens >= L``, the overlap is computed by both experts and
    selected per token, ``Routing.split(und_tokens, gen_tokens)``). Returns ``(batch, perm)``:
    ``perm[b, p]`` ``[B, L]`` is the logical position of the token now at physical position ``p``
    (:func:`from_expert_streams` undoes it). Raises :class:`PackingError` when a row does not fit.
    """
    B, L = batch.shape
    U = int(und_tokens)
    G = L - U if gen_tokens is None else int(gen_tokens)
    und, gen = expert_counts(batch)
    if not (0 <= U <= L and 0 <= G <= L and U + G >= L) or (und > U).any() or (gen > G).any():
        raise PackingError(f"expert streams: rows need up to {int(und.max(initial=0))} und and "
                           f"{int(gen.max(initial=0))} gen slots; the layout has {U} und and {G} gen slots "
                           f"of {L}")
    perm = np.empty((B, L), np.int64)
    for b in range(B):
        is_gen = batch.kind[b] == KIND_VAE
        is_pad = batch.kind[b] == KIND_PAD
        perm[b] = np.concatenate([np.nonzero(~is_gen & ~is_pad)[0], np.nonzero(is_pad)[0], np.nonzero(is_gen)[0]])
    return _remap(batch, perm), perm


def from_expert_streams(batch: PackedBatch, perm: np.ndarray) -> PackedBatch:
    """Inverse of :func:`to_expert_streams`: the batch back in logical order."""
    inv = np.empty_like(perm)
    inv[np.arange(perm.shape[0])[:, None], perm] = np.arange(perm.shape[1])[None, :]
    return _remap(batch, inv)


def unpermute_tokens(x, perm: np.ndarray, axis: int = 0) -> np.ndarray:
    """Per-token values of a stream-layout batch back in logical order: ``x`` has the ``[B, L]`` token
    axes at ``axis, axis + 1`` (e.g. ``axis=1`` for per-layer hidden states ``[layers, B, L, D]``)."""
    x = np.moveaxis(np.asarray(x), (axis, axis + 1), (0, 1))
    out = np.empty_like(x)
    out[np.arange(perm.shape[0])[:, None], perm] = x
    return np.moveaxis(out, (0, 1), (axis, axis + 1))


def _grid_ceil(n: int, row_len: int, steps: int) -> int:
    """The smallest ``ceil(k * row_len / steps)`` (k = 0..steps) that is >= ``n``."""
    return next(c for c in (-(-k * row_len // steps) for k in range(steps + 1)) if c >= n)


def choose_stream_layout(und: Sequence[int], gen: Sequence[int], row_buckets: Sequence[int],
                         steps: int) -> tuple[int, int, int]:
    """``(row_len, und_tokens, gen_tokens)`` shared by rows with these und / gen token counts.

    ``row_len``: the smallest bucket that holds the longest row. ``und_tokens``: the smallest grid value
    ``ceil(k * row_len / steps)`` (k = 0..steps) holding every row's und tokens. ``gen_tokens``: the rest
    of the row when every row's gen tokens fit there (no token runs twice), else the smallest grid value
    holding them; then the windows overlap and the overlap runs both experts (rows of a batch differ in
    their und/gen mix; a shared split cannot fit them all without either this overlap or a longer row,
    and a longer row would break the memory budget of the largest bucket).
    Distinct layouts per row bucket: at most ``(steps + 1) * (steps + 2)``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    rows = [int(u) + int(g) for u, g in zip(und, gen)]
    need = max(rows, default=0)
    fits = [b for b in sorted(row_buckets) if b >= need]
    if not fits:
        raise PackingError(f"a row of {need} tokens exceeds the largest row bucket {max(row_buckets)}")
    L = fits[0]
    u, g = int(max(und, default=0)), int(max(gen, default=0))
    U = _grid_ceil(u, L, steps)
    G = L - U if g <= L - U else _grid_ceil(g, L, steps)
    return L, U, G


def dense_mask_np(batch: PackedBatch) -> np.ndarray:
    """The allowed-attention matrix ``[B, L, L]`` (numpy, for tests and the verifier)."""
    q = lambda a: a[:, :, None]
    k = lambda a: a[:, None, :]
    return ((q(batch.seg) == k(batch.seg)) & (k(batch.seg) > 0) & (k(batch.vis) <= q(batch.vis))
            & ((k(batch.nblk) == 0) | (k(batch.nblk) == q(batch.nblk))))


def allowed_pairs(seg: np.ndarray, vis: np.ndarray, nblk: np.ndarray) -> np.ndarray:
    """Number of allowed (query, key) pairs of each row (the sum of :func:`dense_mask_np`) from the mask
    vectors ``[..., L]`` in O(L log L) per row (no ``[L, L]`` matrix): ``[...]`` int64."""
    seg, vis, nblk = (np.asarray(a, np.int64) for a in (seg, vis, nblk))
    lead = seg.shape[:-1]
    seg, vis, nblk = (a.reshape(-1, a.shape[-1]) for a in (seg, vis, nblk))
    out = np.zeros(seg.shape[0], np.int64)
    for r in range(seg.shape[0]):
        real = seg[r] > 0
        s, v, n = seg[r][real], vis[r][real], nblk[r][real]
        if s.size == 0:
            continue
        span, nb = int(v.max()) + 1, int(n.max()) + 1
        shared = n == 0                         # keys every query of the sample may see (if vis allows)
        keys = np.sort(s[shared] * span + v[shared])
        cnt = np.searchsorted(keys, s * span + v, "right") - np.searchsorted(keys, s * span, "left")
        own = (s[~shared] * nb + n[~shared]) * span + v[~shared]   # noised-block keys: own block only
        if own.size:
            keys = np.sort(own)
            base = (s * nb + n) * span
            cnt = cnt + np.where(n > 0, np.searchsorted(keys, base + v, "right") - np.searchsorted(keys, base, "left"), 0)
        out[r] = cnt.sum()
    return out.reshape(lead)

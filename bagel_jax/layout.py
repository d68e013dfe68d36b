"""The sequence layout of BAGEL: one description, used by training packing and inference alike.

Sources: docs/architecture.md, sections "Sequence layout", "RoPE", "Attention mask", "Inference contexts and CFG
branches" and "Training packing". The users of these rules are
:mod:`bagel_jax.data.packing` and :mod:`bagel_jax.data.datasets` (training),
:mod:`bagel_jax.inference.context`, :mod:`bagel_jax.inference.blocks` and the API prechecks of
:mod:`bagel_jax.inference.api` (inference).

A *sample* (a training sample, or one row of an inference context) is a sequence of *blocks*. Each
block is a body of ``n`` tokens between two markers (``MARKERS = 2``), so it occupies ``n + 2``
sequence slots (KV slots at inference). A running RoPE counter ``r`` starts at 0 for each sample.

The four block kinds::

    kind            tokens (logical order)              RoPE positions  r advance  attention
    text            bos, ids..., eos                    r .. r+n+1      n + 2      causal
    vit             soi, ViT patches..., eoi            all r           1          full
    vae             soi, latents (clean, t=0)..., eoi   all r           1          full
    noised_vae      soi, latents (noised)..., eoi       all r           0          noise

(bos/eos = ``<|im_start|>`` / ``<|im_end|>``, soi/eoi = ``<|vision_start|>`` / ``<|vision_end|>``.)

* Body sizes: text ``n = len(ids)``; ViT ``n = (H // patch) * (W // patch)`` for a ``[3, H, W]`` ViT
  input (``patch`` = 14); VAE ``n = (H // ds) * (W // ds)`` with ``ds = latent_downsample`` (16) for a
  ``[3, H, W]`` VAE-resized image. So an image costs ``(H // ds) * (W // ds) + 2`` slots.
* Experts: markers are text tokens (und expert); ViT patches use the und expert, latents the gen expert.
* A ``noised_vae`` block is a training target (MSE): it does not advance ``r`` and nothing outside it
  may see it. At inference the image being generated plays that role: it shares the next position
  and is never written to the cache. A ``vae`` block is a clean (t = 0) conditioning image.
* An image dropped by conditional dropout still advances ``r`` by 1; a dropped text advances nothing.
* Markers in physical order: the training row and the text / ViT chunks keep the logical order above.
  The inference latent chunk (clean VAE prefill, flow query) puts both markers first,
  ``[start, end, latents...]`` (``LATENT_CHUNK_BODY = 2``), so the two experts run on static slices;
  attention reads only the mask vectors and positions, never the physical order.

Mask vectors of a block starting at sequence index ``start`` in sample ``seg`` (see
:mod:`bagel_jax.nn.attention`): ``seg`` = the sample id on every token; ``vis`` = own index
(``start .. start+n+1``) for text, ``start`` on every token of an image block; ``nblk`` = 0, or for
a ``noised_vae`` block its 1-based index among the sample's noised blocks. At inference these are
implicit: text chunks run causal, image chunks full, and flow queries never enter the cache.
"""

from __future__ import annotations

import dataclasses

TEXT, VIT, VAE, NOISED_VAE = "text", "vit", "vae", "noised_vae"
KINDS = (TEXT, VIT, VAE, NOISED_VAE)

KIND_PAD, KIND_TEXT, KIND_VIT, KIND_VAE = 0, 1, 2, 3   # per-token modality (markers are KIND_TEXT)

MARKERS = 2            # start + end marker around every block body
BODY = 1               # logical index of the first body token inside a block (after the start marker)
LATENT_CHUNK_BODY = 2  # ... inside an inference latent chunk ``[start, end, latents...]``

_BODY_KIND = {TEXT: KIND_TEXT, VIT: KIND_VIT, VAE: KIND_VAE, NOISED_VAE: KIND_VAE}


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """The marker ids of a tokenizer (docs/architecture.md#special-tokens)."""

    bos: int            # <|im_start|>
    eos: int            # <|im_end|>
    start_of_image: int  # <|vision_start|>
    end_of_image: int    # <|vision_end|>


def block_len(n):
    """Slots of a block with ``n`` body tokens (int or array)."""
    return n + MARKERS


def patch_ar_block_len(n):
    """Slots of a patch-AR image of ``n`` latent tokens: a noisy and a clean copy of every latent plus the two
    markers (``bagel_jax/data/patch_ar.py``)."""
    return 2 * n + MARKERS


def end_marker_at(n):
    """Logical index of the end marker inside a block of ``n`` body tokens (int or array)."""
    return n + BODY


def rope_advance(kind: str, n):
    """How far a block of ``kind`` with ``n`` body tokens (int or array) moves the RoPE counter."""
    if kind == TEXT:
        return block_len(n)
    return {VIT: 1, VAE: 1, NOISED_VAE: 0}[kind]


@dataclasses.dataclass(frozen=True)
class Block:
    """One block of a sample: its ``kind`` (one of :data:`KINDS`) and ``n`` body tokens."""

    kind: str
    n: int

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown block kind {self.kind!r}; expected one of {KINDS}")
        if self.n < 0:
            raise ValueError(f"a block needs n >= 0 body tokens, got {self.n}")

    @property
    def length(self) -> int:
        return block_len(self.n)

    @property
    def rope_advance(self) -> int:
        """How far the block moves the sample's RoPE counter."""
        return rope_advance(self.kind, self.n)

    @property
    def causal(self) -> bool:
        return self.kind == TEXT

    def marker_ids(self, special) -> tuple[int, int]:
        """``(start, end)`` marker ids; ``special`` has ``bos, eos, start_of_image, end_of_image``."""
        if self.kind == TEXT:
            return special.bos, special.eos
        return special.start_of_image, special.end_of_image

    def token_ids(self, special, body=None) -> list[int]:
        """Ids in logical order: markers around ``body`` (the text ids; 0 for image bodies when None)."""
        body = [0] * self.n if body is None else list(body)
        if len(body) != self.n:
            raise ValueError(f"{self.kind} block of {self.n} body tokens got {len(body)} ids")
        start, end = self.marker_ids(special)
        return [start] + body + [end]

    def token_kinds(self) -> list[int]:
        """Per-token modality (``KIND_*``) in logical order."""
        return [KIND_TEXT] + [_BODY_KIND[self.kind]] * self.n + [KIND_TEXT]

    def positions(self, r: int) -> list[int]:
        """RoPE positions of the block's tokens when the counter stands at ``r``."""
        return list(range(r, r + self.length)) if self.causal else [r] * self.length

    def masks(self, start: int, seg: int, noise_id: int = 0) -> tuple[list[int], list[int], list[int]]:
        """``(seg, vis, nblk)`` of the block's tokens, the block starting at sequence index ``start``;
        ``noise_id``: the block's 1-based index among its sample's noised blocks (``noised_vae`` only)."""
        if (self.kind == NOISED_VAE) != (noise_id > 0):
            raise ValueError(f"a {self.kind} block got noise_id {noise_id} (noised_vae blocks need one >= 1, "
                             "other blocks 0)")
        vis = list(range(start, start + self.length)) if self.causal else [start] * self.length
        return [seg] * self.length, vis, [noise_id] * self.length


def text_block(n_ids: int) -> Block:
    return Block(TEXT, int(n_ids))


def vit_tokens(H: int, W: int, patch: int) -> int:
    """ViT patches of an ``H x W`` ViT input."""
    return (int(H) // patch) * (int(W) // patch)


def latent_tokens(H: int, W: int, ds: int) -> int:
    """Latent tokens of an ``H x W`` VAE image (``ds`` = the config's ``latent_downsample``)."""
    return (int(H) // ds) * (int(W) // ds)


def vit_block(H: int, W: int, patch: int) -> Block:
    return Block(VIT, vit_tokens(H, W, patch))


def vae_block(H: int, W: int, ds: int, noised: bool = False) -> Block:
    return Block(NOISED_VAE if noised else VAE, latent_tokens(H, W, ds))


def image_blocks(cfg, vae_hw=None, vit_hw=None) -> list[Block]:
    """The blocks an inference image adds (VAE first, then ViT,
    docs/architecture.md#inference-contexts-and-cfg-branches): ``vae_hw`` the VAE-resized ``(H, W)``, ``vit_hw`` the
    ViT input ``(H', W')``; None skips that block."""
    out = []
    if vae_hw is not None:
        out.append(vae_block(vae_hw[0], vae_hw[1], cfg.latent_downsample))
    if vit_hw is not None:
        out.append(vit_block(vit_hw[0], vit_hw[1], cfg.vit.patch_size))
    return out


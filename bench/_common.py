"""Shared helpers for the bench scripts: a random BAGEL model of a given size with the tiny-a tokenizer."""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from bagel_jax.config import BagelConfig, LLMConfig, VAEConfig, ViTConfig
from bagel_jax.data import packing
from bagel_jax.data.packing import Capacities, TextItem, VaeItem, VitItem
from bagel_jax.loading import random_model
from bagel_jax.tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_A = os.path.join(REPO, "tests", "fixtures", "tiny-a")


def small_config(hidden=512, layers=8, heads=8, kv_heads=2, mlp=1408, vocab=32000, vae_ch=64) -> BagelConfig:
    llm = LLMConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                    num_key_value_heads=kv_heads, intermediate_size=mlp, vocab_size=vocab)
    vit = ViTConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)
    vae = VAEConfig(ch=vae_ch, ch_mult=(1, 2, 2, 2))
    cfg = BagelConfig(llm=llm, vit=vit, vae=vae)
    cfg.validate()
    return cfg


def small_model(cfg: BagelConfig, dtype=jnp.float32, seed=0):
    if not os.path.isdir(TINY_A):
        raise SystemExit(f"bench needs the tiny-a tokenizer at {TINY_A}")
    bm = random_model(cfg, jax.random.PRNGKey(seed), dtype=dtype, param_dtype=jnp.float32)   # float32 master weights
    bm.tokenizer = load_tokenizer(TINY_A)
    return bm


def timeit(fn, repeat=3):
    """Best wall time of ``fn()`` (which must block until done) over ``repeat`` runs."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def mixed_pack(cfg: BagelConfig, special, tokens: int, seed: int = 0, vae_px: int = 128,
               vit_px: int = 112) -> packing.PackedBatch:
    """One logical-order pack of at most ``tokens`` tokens (row length exactly ``tokens``): text-to-image,
    VQA and edit-like samples in turn (VAE images of ``vae_px`` / ``vae_px // 2`` pixels, ViT images of
    ``vit_px`` / ``vit_px // 2``), random ids and pixels from ``seed``."""
    rng = np.random.default_rng(seed)
    ids = lambda n: [int(v) for v in rng.integers(10, 500, n)]
    im = lambda h, w: rng.uniform(-1, 1, (3, h, w)).astype(np.float32)
    makers = [
        lambda: [TextItem(ids(24), loss=True), VaeItem(im(vae_px, vae_px), loss=True, t_raw=float(rng.normal()))],
        lambda: [VitItem(im(vit_px, vit_px)), TextItem(ids(12)), TextItem(ids(40), loss=True)],
        lambda: [VaeItem(im(vae_px // 2, vae_px // 2)), VitItem(im(vit_px // 2, vit_px // 2)), TextItem(ids(16)),
                 VaeItem(im(vae_px, vae_px), loss=True, t_raw=float(rng.normal()))],
    ]
    samples, used, i = [], 0, 0
    while True:
        s = makers[i % len(makers)]()
        n = packing.pack([[s]], special, cfg).shape[1]
        if used + n > tokens:
            break
        samples.append(s)
        used += n
        i += 1
    b = packing.pack([samples], special, cfg)
    return packing.pack([samples], special, cfg,
                        Capacities(rows=1, row_len=tokens, vit_tokens=b.vit_seg.shape[0],
                                   latent_tokens=b.vae_src.shape[0], vae_images=b.vae_images.shape[0],
                                   ce_tokens=b.ce_index.shape[0]))

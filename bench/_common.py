"""Shared helpers for the bench scripts: a random BAGEL model of a given size with the tiny-a tokenizer."""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp

from bagel_jax.config import BagelConfig, LLMConfig, VAEConfig, ViTConfig
from bagel_jax.loading import random_model
from bagel_jax.tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_A = os.path.normpath(os.path.join(REPO, "..", "shared", "reference", "fixtures", "tiny-a"))


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
    bm = random_model(cfg, jax.random.PRNGKey(seed), dtype=dtype)
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

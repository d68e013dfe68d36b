"""Cost of adding one turn (a short text segment) to a short vs a long context.

Adding a turn runs only the new tokens against the cached history (never re-encoding it). Attention
reads only the cache blocks that hold history (not the whole static capacity bucket), and the history
is never copied per layer; what grows with the history is the attention of the new tokens to it.
For comparison: re-encoding the whole history as one prefill (what a cache-less implementation pays).

The history's cache is grown once to the capacity the turn needs before timing (a conversation pays
that copy once per capacity bucket, not per turn); the one-off growth is printed too.

    PYTHONPATH=. python bench/bench_context.py [--contexts 64,1024,4096]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench._common import small_config, small_model, timeit  # noqa: E402
from bagel_jax.inference.context import TEXT_MIN, Context, Engine, bucket  # noqa: E402

TURN = "And then what happened to the little red cat on the mat?"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="64,1024,4096", help="comma-separated history lengths in tokens")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    cfg = small_config(args.hidden, args.layers)
    eng = Engine(small_model(cfg))
    rng = np.random.RandomState(0)
    print(f"config: hidden {args.hidden}, layers {args.layers}, float32, backend {jax.default_backend()}; "
          f"one turn = {len(eng.tok.encode(TURN)) + 2} tokens")

    def history(n):
        c = Context.new(eng, 1, track_cfg=False)
        ids = [eng.sp.bos] + rng.randint(0, 500, size=n - 2).tolist() + [eng.sp.eos]
        br, _ = c._text_branch(c.gen, [ids])
        return Context(eng, br), ids

    turn_len = len(eng.tok.encode(TURN)) + 2
    Lq = bucket(turn_len, TEXT_MIN)
    base = base_flops = None
    for n in (int(v) for v in args.contexts.split(",")):
        c0, ids = history(n)
        grown = c0.gen.reserve(eng, Lq)                                    # what add_text reserves
        jax.block_until_ready(grown.cache.k)                                # compile
        t_grow = timeit(lambda: jax.block_until_ready(c0.gen.reserve(eng, Lq).cache.k), repeat=3) \
            if grown.capacity != c0.gen.capacity else 0.0
        c = Context(eng, grown)
        jax.block_until_ready(c.add_text(TURN).gen.cache.k)          # compile
        t_turn = timeit(lambda: jax.block_until_ready(c.add_text(TURN).gen.cache.k), repeat=7)
        base = base or t_turn
        full = ids + [eng.sp.bos] + eng.tok.encode(TURN) + [eng.sp.eos]
        e = Context.new(eng, 1, track_cfg=False)
        jax.block_until_ready(e._text_branch(e.gen, [full])[0].cache.k)   # compile
        t_full = timeit(lambda: jax.block_until_ready(e._text_branch(e.gen, [full])[0].cache.k),
                        repeat=3 if n <= 1024 else 1)
        flops = turn_flops(cfg.llm, Lq, n)
        base_flops = base_flops or flops
        print(f"context {n:6d} tokens (cache capacity {c.gen.capacity:6d}): add one turn {1000 * t_turn:8.2f} ms "
              f"({t_turn / base:4.2f}x the first; FLOPs {flops / base_flops:4.2f}x) | re-encoding the whole history "
              f"instead {1000 * t_full:9.2f} ms | one-off cache growth {1000 * t_grow:6.2f} ms")
    from bagel_jax.config import LLMConfig
    big = LLMConfig(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                    intermediate_size=18944, vocab_size=152064)
    ratio = turn_flops(big, Lq, 4096) / turn_flops(big, Lq, 64)
    print(f"FLOPs of one turn, 4096 vs 64 tokens of history, at the size of BAGEL-7B's LLM: {ratio:.2f}x")


def turn_flops(llm, Lq: int, history: int) -> float:
    """Matmul FLOPs of one turn of ``Lq`` tokens over ``history`` cached tokens (projections, MLP, attention)."""
    D, H, K, dh, I = (llm.hidden_size, llm.num_attention_heads, llm.num_key_value_heads, llm.head_dim,
                      llm.intermediate_size)
    per_token = 2 * (D * H * dh + 2 * D * K * dh + H * dh * D + 3 * D * I) + 4 * H * dh * (history + Lq)
    return float(Lq * llm.num_hidden_layers * per_token)


if __name__ == "__main__":
    main()

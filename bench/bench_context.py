"""Cost of adding one turn (a short text segment) to a short vs a long context.

Adding a turn runs only the new tokens against the cached history (never re-encoding it); its cost
depends on the cache *capacity* bucket (attention reads the whole static buffer, masked), not on
how the history was built. For comparison: re-encoding the whole history as one prefill.

    PYTHONPATH=. python bench/bench_context.py [--short 64 --long 4096]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench._common import small_config, small_model, timeit  # noqa: E402
from bagel_jax.inference.context import Context, Engine  # noqa: E402

TURN = "And then what happened to the little red cat on the mat?"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", type=int, default=64, help="tokens in the short context")
    ap.add_argument("--long", type=int, default=4096, help="tokens in the long context")
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
        return Context(eng, br, None, None), ids

    for label, n in (("short", args.short), ("long", args.long)):
        c, ids = history(n)
        jax.block_until_ready(c.add_text(TURN).gen.cache.k)          # compile
        t_turn = timeit(lambda: jax.block_until_ready(c.add_text(TURN).gen.cache.k), repeat=5)
        full = ids + [eng.sp.bos] + eng.tok.encode(TURN) + [eng.sp.eos]
        e = Context.new(eng, 1, track_cfg=False)
        jax.block_until_ready(e._text_branch(e.gen, [full])[0].cache.k)   # compile
        t_full = timeit(lambda: jax.block_until_ready(e._text_branch(e.gen, [full])[0].cache.k), repeat=3)
        print(f"{label:>5} context {n:6d} tokens (cache capacity {c.gen.capacity:6d}): add one turn "
              f"{1000 * t_turn:8.2f} ms | re-encoding the whole history instead {1000 * t_full:9.2f} ms")


if __name__ == "__main__":
    main()

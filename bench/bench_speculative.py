"""Speculative decoding against plain decoding in the same run (greedy; outputs checked identical).

Target: the demo model (``bagel_jax/assets/demo``, trained) in understanding think mode, with no stop token
(its answers are a few tokens long; forcing ``--new-tokens`` tokens gives a long text of its own
continuations, not real thinking). Drafts: prompt lookup (``NgramDraft``) and the target as its own draft
(the upper bound: every proposal accepted, gamma + 1 tokens per target pass; not a speed-up anyone gets).
Reports target passes per token, acceptance rate and tokens/s for each gamma. A small trained draft model
(issue 16, bench (a)) is not part of this script yet.

    PYTHONPATH=. python bench/bench_speculative.py [--new-tokens 200 --gammas 2,4,8]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from bagel_jax.inference import api  # noqa: E402
from bagel_jax.inference.context import VLM_THINK_SYSTEM_PROMPT  # noqa: E402
from bagel_jax.inference.decode import generate_text  # noqa: E402
from bagel_jax.inference.speculative import ModelDraft, NgramDraft, speculative_generate  # noqa: E402

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bagel_jax", "assets", "demo")


def timed(fn):
    fn()                                         # compile
    t = time.perf_counter()
    r = fn()
    jax.block_until_ready(r.raw["n"])
    return r, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--gammas", default="2,4,8")
    args = ap.parse_args()
    pipe = api.load(DEMO, dtype="float32")
    ctx = pipe.context(1, track_cfg=False).add_text(VLM_THINK_SYSTEM_PROMPT, role="system")
    ctx = ctx.add_text("Describe a red circle on the left and a blue square on the right.")
    L = args.new_tokens
    plain, t0 = timed(lambda: generate_text(ctx, L, stop_tokens=[-1]))
    n = len(plain.token_ids[0])
    print(f"plain: {n} tokens, {n} target passes, {n / t0:.1f} tok/s | {plain.texts[0][:80]!r}")
    for name, make in (("ngram(3)", lambda: NgramDraft(3)), ("self (upper bound)", lambda: ModelDraft(ctx))):
        for g in (int(x) for x in args.gammas.split(",")):
            r, t = timed(lambda: speculative_generate(ctx, make(), g, L, stop_tokens=[-1]))
            assert [list(x) for x in r.token_ids] == [list(x) for x in plain.token_ids], "output differs"
            rounds, acc, dr = int(r.raw["rounds"]), int(r.raw["accepted"][0]), int(r.raw["drafted"][0])
            print(f"{name:>18} gamma={g}: {rounds} target passes ({rounds / n:.2f} per token), acceptance "
                  f"{acc / max(dr, 1):.2f}, {n / t:.1f} tok/s, speed-up x{t0 / t:.2f}")


if __name__ == "__main__":
    main()

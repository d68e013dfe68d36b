"""Understanding decode speed: our compiled while_loop vs transformers' Qwen2 ``generate`` (same
dimensions, random weights, greedy, fixed number of new tokens), measured in one run on one machine.

    PYTHONPATH=. python bench/bench_decode.py [--hidden 512 --layers 8 --new-tokens 128 --prompt-tokens 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench._common import small_config, small_model, timeit  # noqa: E402
from bagel_jax.inference.context import Context, Engine  # noqa: E402
from bagel_jax.inference.decode import decode_loop  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--mlp", type=int, default=1408)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()

    cfg = small_config(args.hidden, args.layers, args.heads, args.kv_heads, args.mlp, args.vocab)
    bm = small_model(cfg)
    eng = Engine(bm)
    rng = np.random.RandomState(0)
    prompt = rng.randint(0, 500, size=args.prompt_tokens - 2).tolist()
    ctx = Context.new(eng, 1, track_cfg=False)
    ids = [[eng.sp.bos] + prompt + [eng.sp.eos]]
    ctx, _ = ctx._text_branch(ctx.gen, ids), None
    gen = ctx[0].reserve(eng, args.new_tokens)
    n = args.new_tokens

    def run(progress=False):
        out = decode_loop(eng.model, eng.params, gen.cache, jnp.asarray(gen.rope, jnp.int32), eng.sp.bos,
                          jnp.asarray([-1], jnp.int32), jnp.stack([jax.random.PRNGKey(0)]), jnp.float32(1.0),
                          jnp.int32(0), jnp.float32(1.0), max_length=n, progress=progress)
        jax.block_until_ready(out)
        return out

    t = time.perf_counter()
    run()
    first = time.perf_counter() - t
    ours = timeit(run)
    print(f"config: hidden {args.hidden}, layers {args.layers}, heads {args.heads}/{args.kv_heads}, mlp {args.mlp}, "
          f"vocab {args.vocab}; prompt {args.prompt_tokens} tokens, {n} new tokens, batch 1, float32, "
          f"backend {jax.default_backend()}")
    print(f"bagel_jax while_loop : {n / ours:8.1f} tokens/s  ({ours:.3f} s; first call incl. compile {first:.1f} s)")

    from bagel_jax.inference import progress as prog
    run(True)   # compile the variant with the progress callback
    with prog.bar("tokens", n, "decoding", enabled=False):
        withcb = timeit(lambda: run(True))
    print(f"  with progress callback: {n / withcb:8.1f} tokens/s ({100 * (withcb / ours - 1):+.1f}% time)")

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    hf_cfg = Qwen2Config(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, intermediate_size=args.mlp, vocab_size=args.vocab,
                         max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False)
    hf = Qwen2ForCausalLM(hf_cfg).eval()
    inp = torch.tensor([ids[0]])

    def run_hf():
        with torch.no_grad():
            hf.generate(inp, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                        pad_token_id=0)

    run_hf()
    theirs = timeit(run_hf)
    print(f"transformers generate: {n / theirs:8.1f} tokens/s  ({theirs:.3f} s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; includes its prefill of {args.prompt_tokens} tokens)")
    print(f"speed-up: {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()

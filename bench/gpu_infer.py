"""Inference on one accelerator at BAGEL-7B-MoT shapes: text-to-image and decoding, with and without TaylorSeer
and int8 weights.

A random BAGEL-7B-MoT (``configs/bagel-7b-mot.yaml``: Qwen2.5-7B shapes per expert, SigLIP so400m, FLUX VAE;
random weights, bfloat16; the demo model's tokenizer, ids only) prints, for each ``--quantize`` mode:

* text-to-image ``--size`` x ``--size`` with ``--steps`` timesteps and the official CFG (text 4.0, interval
  (0.4, 1], 2 branches): seconds per image (median of ``--rounds`` after a compile run) without and with
  TaylorSeer, and the compile time;
* decoding: ``--decode-tokens`` greedy tokens after the prompt (no early stop): tokens/s;
* decoder parameter bytes and the peak device memory (``memory_stats``, where the backend reports it);
* with ``--profile``: the top ops (by traced time) of one more image, per flow step, and of one more decode,
  per token (``bench/gpu_check.py`` runs this script as its infer part).

The KV cache holds what one row needs (:func:`context_slots`: the prompt, then a ``--size`` image or the
decoded tokens), so any ``--size`` fits.

    python bench/gpu_infer.py                                  # 1024x1024, 50 steps, none + int8
    python bench/gpu_infer.py --quantize none --size 512 --steps 30
    python bench/gpu_infer.py --tiny                           # a seconds-long CPU smoke run of this script

One JSON line per measurement on stdout (``--out FILE`` appends them too), a table on stderr at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bagel_jax import layout  # noqa: E402
from bagel_jax.config import BagelConfig, LLMConfig, VAEConfig, ViTConfig, config_from_yaml  # noqa: E402
from bagel_jax.inference.cfg import ImageParams  # noqa: E402
from bagel_jax.inference.context import Context  # noqa: E402
from bagel_jax.inference.engine import Engine, InferenceOptions  # noqa: E402
from bagel_jax.inference.decode import generate_text  # noqa: E402
from bagel_jax.inference.sampler import generate_images  # noqa: E402
from bagel_jax.loading import build_modules, random_model  # noqa: E402
from bagel_jax.quantize import param_bytes, quantize_params  # noqa: E402
from bagel_jax.tokenizer import load_tokenizer  # noqa: E402
from bench.gpu_check import format_top_ops, trace_top_ops  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "A red cat sits on the blue mat under the old tree, photographed in warm evening light."


def model_config(tiny: bool) -> BagelConfig:
    if not tiny:
        return config_from_yaml(os.path.join(REPO, "configs", "bagel-7b-mot.yaml"))
    llm = LLMConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=256, vocab_size=1024)
    vit = ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
    cfg = BagelConfig(llm=llm, vit=vit, vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 2)))
    cfg.validate()
    return cfg


def context_slots(cfg: BagelConfig, tokenizer, size: int, decode_tokens: int, prompt: str = PROMPT) -> int:
    """KV slots one row needs: the prompt's text block, then the larger of the noised VAE block of a ``size`` x
    ``size`` image (1024 px: 4,096 latents + 2 markers) and ``decode_tokens`` greedy tokens, rounded up to 256."""
    text = layout.text_block(len(tokenizer.encode(prompt))).length
    image = layout.vae_block(size, size, cfg.latent_downsample, noised=True).length
    need = text + max(image, decode_tokens)
    return -(-need // 256) * 256


def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def timed(fn, rounds: int) -> tuple[float, float]:
    """``(first call s, median of later calls s)``; ``fn`` blocks until done."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def emit(rows: list[dict], row: dict, args) -> None:
    """Keep ``row``, print it as a JSON line and append it to ``--out`` at once (a run cut short keeps it)."""
    rows.append(row)
    print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


def run_mode(cfg: BagelConfig, quantize: str, args, rows: list[dict]) -> None:
    bm = random_model(cfg, jax.random.PRNGKey(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    if args.attention != "auto":
        bm = dataclasses.replace(bm, model=bm.model.clone(
            opts=dataclasses.replace(bm.model.opts, attention_impl=args.attention)))
    if quantize != "none":     # the loader's path: int8 kernels + scales in the tree, QuantDense layers
        model, _ = build_modules(cfg, dtype=jnp.bfloat16, quantize=quantize, attention_impl=args.attention)
        bm = dataclasses.replace(bm, model=model, params=quantize_params(bm.params, quantize, consume=True))
    bm.tokenizer = load_tokenizer(os.path.join(REPO, "bagel_jax", "assets", "demo"))
    eng = Engine(bm, InferenceOptions(max_context=context_slots(cfg, bm.tokenizer, args.size, args.decode_tokens)))
    lm_bytes = param_bytes(bm.params["language_model"])
    ctx = Context.new(eng, 1).add_text(PROMPT)
    caches = [c.strip() for c in args.step_cache.split(",") if c.strip()]
    for cache in caches:
        ip = ImageParams(num_timesteps=args.steps, step_cache=cache)
        image = lambda: generate_images(ctx, (args.size, args.size), ip)
        first, med = timed(image, args.rounds)
        emit(rows, dict(what="t2i", quantize=quantize, attention=args.attention, step_cache=cache, size=args.size,
                        steps=args.steps, s_per_image=med, compile_s=first - med, peak_bytes=peak_bytes(),
                        max_context=eng.max_context), args)
        if args.profile and cache == caches[0]:    # where one image's time goes, per flow step (reruns the program)
            emit(rows, trace_top_ops(image, f"flow step {args.size}px quantize={quantize} step_cache={cache}",
                                     per=args.steps), args)
            print(format_top_ops(rows[-1]), file=sys.stderr, flush=True)
    n = args.decode_tokens
    decode = lambda: generate_text(ctx, max_length=n, stop_tokens=[]).texts
    first, med = timed(decode, args.rounds)
    emit(rows, dict(what="decode", quantize=quantize, attention=args.attention, tokens=n, tokens_per_s=n / med,
                    compile_s=first - med, decoder_param_bytes=lm_bytes, peak_bytes=peak_bytes()), args)
    if args.profile:
        emit(rows, trace_top_ops(decode, f"decode step quantize={quantize}", per=n), args)
        print(format_top_ops(rows[-1]), file=sys.stderr, flush=True)
    ctx = eng = bm = image = decode = None   # free the model before the next mode
    gc.collect()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels (multiple of 16; default 1024)")
    ap.add_argument("--steps", type=int, default=50, help="num_timesteps (default 50, the official default)")
    ap.add_argument("--decode-tokens", type=int, default=256, help="greedy tokens to decode (default 256)")
    ap.add_argument("--quantize", default="none,int8", help="comma-separated modes to run (default none,int8)")
    ap.add_argument("--rounds", type=int, default=2, help="timed calls after the compile call (default 2)")
    ap.add_argument("--attention", default="auto",
                    help="attention implementation of the model (default auto; with a KV cache, 'xla' is the dense "
                         "path over the whole cache buffer, every other name the 'blocked' cached path)")
    ap.add_argument("--step-cache", default="none,taylorseer", help="comma-separated ImageParams.step_cache values")
    ap.add_argument("--profile", action="store_true",
                    help="also trace one more image (the first --step-cache) and one more decode and print their "
                         "top ops per step")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model, 64 px, 8 steps: CPU smoke run")
    ap.add_argument("--out", default=None, metavar="FILE.jsonl", help="also append the JSON lines to this file")
    args = ap.parse_args(argv)
    if args.tiny:
        args.size, args.steps, args.decode_tokens, args.rounds = 64, 8, 16, 1
    cfg = model_config(args.tiny)
    print(f"backend {jax.default_backend()}, devices {jax.devices()}", file=sys.stderr)
    rows = []
    for q in [m.strip() for m in args.quantize.split(",") if m.strip()]:
        try:
            run_mode(cfg, q, args, rows)
        except Exception as e:                      # e.g. out of memory: report and go on
            emit(rows, dict(what="error", quantize=q, error=f"{type(e).__name__}: {str(e)[:400]}"), args)
    gib = lambda b: f"{b / 2**30:.1f} GiB" if b else "n/a"
    for r in rows:
        if r["what"] == "t2i":
            print(f"t2i {r['size']}px {r['steps']} steps quantize={r['quantize']} step_cache={r['step_cache']}: "
                  f"{r['s_per_image']:.2f} s/image (compile {r['compile_s']:.0f} s), peak {gib(r['peak_bytes'])}",
                  file=sys.stderr)
        elif r["what"] == "decode":
            print(f"decode quantize={r['quantize']}: {r['tokens_per_s']:.1f} tok/s, decoder params "
                  f"{gib(r['decoder_param_bytes'])}, peak {gib(r['peak_bytes'])}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""int8 weight-only decoder (``quantize="int8"``) against the float model: bytes, error, speed.

    PYTHONPATH=. python bench/bench_int8.py error [--fixtures tests/fixtures/tiny-a] [--vit]
    PYTHONPATH=. python bench/bench_int8.py bytes
    PYTHONPATH=. python bench/bench_int8.py speed [--hidden 512 --layers 8 --rounds 7]

``error``: every parity case of the fixture folder run by the verifier's own case runners twice, with the
float32 model and with its decoder layers quantized (float32 compute, same loaded weights); for each
float array the max and mean abs error of the int8 run against the fixture's reference (the official
float32 code) and against our float32 run, relative to the reference's scale ``max|ref|`` (the verifier's
tolerances are not used: int8 is not expected to meet them). ``bytes``: the decoder layers' parameter
bytes, int8 vs the same tree in bfloat16, for tiny-a and for the BAGEL-7B shapes (``jax.eval_shape``,
nothing allocated). ``speed``: a random model (``bench._common.small_config``): greedy decode tokens/s and
one flow step (velocity of one row, no CFG), float32 vs int8 weights; A and B alternate in each round and
the medians over rounds are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench._common import REPO, TINY_A, small_config, small_model  # noqa: E402
from bagel_jax import quantize as quant  # noqa: E402
from bagel_jax.convert.safetensors_io import load_file  # noqa: E402
from bagel_jax.loading import build_modules  # noqa: E402


def decoder_layers(params: dict) -> dict:
    """The decoder's layer stack (every quantized kernel of the decoder lives here)."""
    return params["language_model"]["model"]


def quantized_fixture(fx, vit: bool = False):
    """``fx`` (a parity Fixture, float32) with its decoder layers (and the ViT's when ``vit``) in int8."""
    bm = fx.bm
    model, _ = build_modules(bm.cfg, bm.model.opts, quantize="int8")
    fx.bm = dataclasses.replace(bm, model=model, params=quant.quantize_params(bm.params, "int8", vit=vit))
    fx._engines = {}
    return fx


def cmd_error(args):
    from bagel_jax.parity.cli import RUNNERS
    from bagel_jax.parity.common import Fixture

    with open(os.path.join(args.fixtures, "manifest.json")) as f:
        manifest = json.load(f)
    f32 = Fixture(args.fixtures, manifest)
    q8 = quantized_fixture(Fixture(args.fixtures, manifest), vit=args.vit)
    print(f"{'case':<16} {'array':<44} {'ref_scale':>10} {'max/scale':>10} {'mean/scale':>10} "
          f"{'max vs f32':>10} {'f32 max':>10}")
    for case, meta in manifest["cases"].items():
        if case not in RUNNERS or (args.cases and case not in args.cases.split(",")):
            continue
        arr = load_file(os.path.join(args.fixtures, meta.get("file", f"{case}.safetensors")))
        a, b = RUNNERS[case](f32, meta, arr), RUNNERS[case](q8, meta, arr)
        for name in sorted(a):
            fa, fb = a[name], b[name]
            ref = fa[1] if isinstance(fa, tuple) else arr.get(name)
            fa, fb = (x[0] if isinstance(x, tuple) else x for x in (fa, fb))
            fa, fb = np.asarray(fa, np.float64), np.asarray(fb, np.float64)
            if ref is None or np.asarray(ref).size == 0:
                continue
            if not np.issubdtype(np.asarray(ref).dtype, np.floating):     # token ids, layout: equal or not
                if name.endswith("token_ids"):
                    print(f"{case:<16} {name:<44} int8 {'equal to' if np.array_equal(fb, ref) else 'DIFFERS from'} "
                          f"the reference ({ref.size} values)")
                continue
            ref = np.asarray(ref, np.float64)
            s = max(float(np.max(np.abs(ref))), 1e-30)
            e = np.abs(fb - ref)
            print(f"{case:<16} {name:<44} {s:>10.3e} {e.max() / s:>10.2e} {e.mean() / s:>10.2e} "
                  f"{np.abs(fb - fa).max() / s:>10.2e} {np.abs(fa - ref).max() / s:>10.2e}")


def cmd_bytes(args):
    from bagel_jax.config import load_config
    from bagel_jax.models.bagel import param_shapes

    def report(label, cfg):
        model, _ = build_modules(cfg)
        shapes = param_shapes(model)
        bf16 = jax.eval_shape(lambda p: quant.cast_floats(p, jnp.bfloat16), shapes)
        q8 = jax.eval_shape(lambda p: quant.quantize_params(p, "int8"), bf16)
        a, b = quant.param_bytes(decoder_layers(bf16)), quant.param_bytes(decoder_layers(q8))
        c, d = quant.param_bytes(bf16["language_model"]), quant.param_bytes(q8["language_model"])
        print(f"{label}: decoder layers bf16 {a / 2**20:10.2f} MiB, int8 {b / 2**20:10.2f} MiB ({b / a:.4f}); "
              f"whole language model (+ embeddings, LM head) bf16 {c / 2**20:.2f} MiB, int8 {d / 2**20:.2f} MiB "
              f"({d / c:.4f})")

    report("tiny-a", load_config(args.fixtures))
    report("BAGEL-7B shapes", load_config(os.path.join(REPO, "configs", "bagel-7b-mot.yaml")))


def cmd_speed(args):
    from bagel_jax.inference import blocks
    from bagel_jax.inference.context import Context, Engine
    from bagel_jax.inference.decode import decode_loop
    from bagel_jax.inference.sampler import initial_noise, make_plan
    from bagel_jax.inference.cfg import ImageParams

    cfg = small_config(args.hidden, args.layers)
    bm = small_model(cfg)
    qmodel, _ = build_modules(cfg, quantize="int8")
    bq = dataclasses.replace(bm, model=qmodel, params=quant.quantize_params(bm.params, "int8"))
    n, N = args.new_tokens, (args.size // 16) ** 2
    x0 = initial_noise([jax.random.PRNGKey(0)], N, cfg.patch_latent_dim)
    t = jnp.float32(0.5)

    def runners(b):
        eng = Engine(b)
        ctx = Context.new(eng, 1, track_cfg=False).add_text("A red cat sits on the blue mat under the old tree.")
        gen = ctx.gen.reserve(eng, n)
        br = make_plan(ImageParams(cfg_text_scale=1.0, cfg_img_scale=1.0), ctx.branches)[1][0]
        lat_pos = jnp.arange(N, dtype=jnp.int32)[None]

        def decode():
            return jax.block_until_ready(decode_loop(
                eng.model, eng.params, gen.cache, jnp.asarray(gen.rope, jnp.int32), eng.sp.bos,
                jnp.asarray([-1], jnp.int32), jnp.stack([jax.random.PRNGKey(0)]), jnp.float32(1.0), jnp.int32(0),
                jnp.float32(1.0), max_length=n))

        def step():
            return jax.block_until_ready(blocks.velocity(eng.model, eng.params, br.cache, x0, t, lat_pos,
                                                              jnp.asarray(br.rope, jnp.int32), eng.markers)[0])
        decode(), step()                     # compile
        mem = blocks.velocity.lower(eng.model, eng.params, br.cache, x0, t, lat_pos,
                                         jnp.asarray(br.rope, jnp.int32), eng.markers).compile().memory_analysis()
        if mem is not None:                  # what the compiled step holds: params in, temporaries
            print(f"{'int8' if b is bq else 'float32'} flow step program: arguments "
                  f"{mem.argument_size_in_bytes / 2**20:.1f} MiB, temporaries {mem.temp_size_in_bytes / 2**20:.1f} MiB "
                  f"(decoder layer params {quant.param_bytes(decoder_layers(b.params)) / 2**20:.1f} MiB)")
        return {"decode": decode, "flow step": step}

    ab = {"float32": runners(bm), "int8": runners(bq)}
    times = {(k, m): [] for k in ab for m in ab[k]}
    for _ in range(args.rounds):
        for m in ("decode", "flow step"):
            for k in ab:                     # A then B, every round
                t0 = time.perf_counter()
                ab[k][m]()
                times[(k, m)].append(time.perf_counter() - t0)
    print(f"config: hidden {args.hidden}, layers {args.layers}, {n} greedy tokens, flow step {N} latent tokens, "
          f"float32 compute, backend {jax.default_backend()}, medians of {args.rounds} interleaved rounds")
    for m in ("decode", "flow step"):
        a, b = (statistics.median(times[(k, m)]) for k in ab)
        if m == "decode":
            print(f"decode    float32 {n / a:8.1f} tok/s | int8 {n / b:8.1f} tok/s | int8/float32 speed {a / b:.2f}")
        else:
            print(f"flow step float32 {a * 1e3:8.2f} ms    | int8 {b * 1e3:8.2f} ms    | int8/float32 speed {a / b:.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("error", "bytes", "speed"))
    ap.add_argument("--fixtures", default=TINY_A)
    ap.add_argument("--cases", default=None, help="comma-separated parity cases (default: all)")
    ap.add_argument("--vit", action="store_true", help="error: also quantize the ViT layers")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--size", type=int, default=256, help="flow step image size (latent tokens = (size/16)^2)")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    {"error": cmd_error, "bytes": cmd_bytes, "speed": cmd_speed}[args.what](args)


if __name__ == "__main__":
    main()

"""Text-to-image speed at a small config (hidden 512, 8 layers, 256x256 image): seconds per sample and per
denoising step, compile vs run, and the cost of the CFG-off strategy and of the progress callback.

    PYTHONPATH=. python bench/bench_t2i.py [--steps 10 --size 256]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench._common import small_config, small_model, timeit  # noqa: E402
from bagel_jax.inference.cfg import make_plan, shifted_schedule  # noqa: E402
from bagel_jax.inference.context import Context, Engine  # noqa: E402
from bagel_jax.inference.sampler import ImageParams, flow_loop, initial_noise, stack_branches  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="num_timesteps (N-1 model evaluations)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    cfg = small_config(args.hidden, args.layers)
    eng = Engine(small_model(cfg))
    ctx = Context.new(eng, 1).add_text("A red cat sits on the blue mat under the old tree.")
    H = W = args.size
    N = (H // 16) * (W // 16)
    x0 = initial_noise([jax.random.PRNGKey(0)], N, cfg.patch_latent_dim)
    print(f"config: hidden {args.hidden}, layers {args.layers}, {H}x{W} image ({N} latent tokens), "
          f"{args.steps} timesteps ({args.steps - 1} evaluations), VAE ch {cfg.vae.ch}, float32, "
          f"backend {jax.default_backend()}")

    def setup(ip):
        plan, branches = make_plan(ip, ctx.branches)
        cache, rope = stack_branches(branches)
        sig = shifted_schedule(ip.num_timesteps, ip.timestep_shift)
        a = (eng.model, eng.params, eng.vae, eng.vae_params, cache, jnp.asarray(rope, jnp.int32), x0, sig, eng.markers,
             jnp.float32(ip.cfg_text_scale), jnp.float32(ip.cfg_img_scale), jnp.asarray(ip.cfg_interval, jnp.float32),
             jnp.float32(ip.cfg_renorm_min))
        return a, dict(hw=(H, W), plan=plan)

    def measure(label, ip, **kw):
        a, static = setup(ip)
        static.update(kw)
        t = time.perf_counter()
        compiled = flow_loop.lower(*a, **static).compile()
        comp = time.perf_counter() - t
        dyn = (a[1],) + a[3:]   # model and vae are static
        run = timeit(lambda: jax.block_until_ready(compiled(*dyn)), repeat=3)
        print(f"{label:<44} compile {comp:6.1f} s | run {run:6.2f} s/sample, {run / (ip.num_timesteps - 1):.3f} s/step")
        return run

    ip = ImageParams(num_timesteps=args.steps)                       # notebook T2I: CFG in (0.4, 1]
    full = measure("T2I sample, CFG text 4 (flow + VAE decode)", ip)
    base = measure("  flow only, CFG-off steps via lax.cond", ip, decode=False)
    where = measure("  flow only, CFG-off steps via jnp.where", ip, decode=False, cfg_off="where")
    one = measure("  flow only, no CFG (1 branch)", ImageParams(num_timesteps=args.steps, cfg_text_scale=1.0),
                  decode=False)
    withcb = measure("  flow only, lax.cond + progress callback", ip, decode=False, progress=True)
    sig = shifted_schedule(ip.num_timesteps, ip.timestep_shift)[:-1]
    off = int(((sig <= ip.cfg_interval[0]) | (sig > ip.cfg_interval[1])).sum())
    print(f"CFG-off steps: {off} of {ip.num_timesteps - 1}; lax.cond saves {100 * (1 - base / where):.1f}% of flow time "
          f"vs jnp.where; VAE decode ~{full - base:.2f} s; one branch/2 branches = {one / base:.2f}; "
          f"progress callback {100 * (withcb / base - 1):+.1f}%")


if __name__ == "__main__":
    main()

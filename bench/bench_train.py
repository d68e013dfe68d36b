"""Train-step throughput at a small config on this machine: tokens/s and an MFU estimate.

    python bench/bench_train.py [--config configs/train-tiny.yaml] [--steps 20] [--packs 4] [--mesh data=1,fsdp=1,tensor=1]

Builds a synthetic dataset in a temp folder, compiles the step once (not timed), then times ``--steps``
steps (batches are pre-built, so the figures are the jitted step alone). MFU uses
``bagel_jax.train.loop.step_flops`` (model FLOPs, 3x forward) over ``train.peak_tflops_per_device``
(default: a nominal 0.1 TFLOP/s per CPU device - pass ``train.peak_tflops_per_device=...`` to use your
CPU's measured peak).
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "train-tiny.yaml"))
ap.add_argument("--steps", type=int, default=20, help="timed steps")
ap.add_argument("--packs", type=int, default=4, help="packs per step")
ap.add_argument("--mesh", default="data=1,fsdp=1,tensor=1")
ap.add_argument("--data", default=None, help="data folder (default: a fresh synthetic one)")
ap.add_argument("overrides", nargs="*", help="config overrides section.key=value")
args = ap.parse_args()


def main():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bagel_jax import sharding as shd
    from bagel_jax.data import synthetic
    from bagel_jax.data.loader import PackedIterator
    from bagel_jax.loading import build_modules, random_model
    from bagel_jax.models.bagel import param_shapes
    from bagel_jax.tokenizer import load_tokenizer
    from bagel_jax.train import optimizer as O, step as S
    from bagel_jax.train.loop import load_train_config, peak_flops_per_device, step_flops

    raw, cfg, tc, dc = load_train_config(args.config, [f"data.packs_per_step={args.packs}", *args.overrides])
    data = args.data or os.path.join(tempfile.mkdtemp(), "syn")
    if not os.path.isfile(os.path.join(data, "dataset.yaml")):
        synthetic.write(data, num=64, seed=0)
    tok = load_tokenizer(os.path.join(data, "tokenizer"))
    mesh = shd.make_mesh(**shd.parse_mesh(args.mesh))
    model, vae = build_modules(cfg, dtype=O.DTYPES[tc.compute_dtype], param_dtype=jnp.float32,
                               remat_policy=tc.remat_policy)
    bm = random_model(cfg, jax.random.PRNGKey(0))
    shapes = param_shapes(model)
    mask = O.trainable_mask(shapes, tc)
    opt = O.make_optimizer(tc, mask, 1000)
    state, ssh = S.init_state(bm.params, opt, 0, mesh)
    vsh = shd.tree_shardings(bm.vae_params, mesh)
    vae_params = jax.device_put(bm.vae_params, vsh)
    fn = S.jit_train_step(S.make_train_step(model, vae, tc, mask, opt, O.lr_schedule(tc, 1000), None, ssh["params"]),
                          ssh, mesh, vsh)
    it = PackedIterator(data, dc, cfg, tok, accum=tc.accum_steps)
    batches = [it.next_batch() for _ in range(args.steps + 1)]
    t = time.perf_counter()
    state, m = fn(state, shd.put_batch(batches[0][0], mesh), vae_params)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    times, toks, flops = [], 0, 0.0
    for b, n in batches[1:]:
        gb = shd.put_batch(b, mesh)
        t = time.perf_counter()
        state, m = fn(state, gb, vae_params)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
        toks += n
        flops += step_flops(cfg, b)
    total = sum(times)
    peak = peak_flops_per_device(tc) * jax.device_count()
    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}, mesh {dict(mesh.shape)}")
    print(f"model: {O.count_params(shapes) / 1e6:.2f}M params, compute {tc.compute_dtype}; "
          f"{dc.packs_per_step} packs x {max(dc.row_buckets)} tokens per step")
    print(f"first step (compile + run): {compile_s:.1f}s")
    print(f"step time: median {np.median(times) * 1e3:.1f} ms, mean {total / len(times) * 1e3:.1f} ms over {len(times)} steps")
    print(f"throughput: {toks / total:.0f} real tokens/s; model FLOPs {flops / total / 1e9:.2f} GFLOP/s; "
          f"MFU estimate {flops / total / peak:.2%} of {peak / 1e12:.2f} TFLOP/s")


if __name__ == "__main__":
    main()

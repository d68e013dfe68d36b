"""Ahead-of-time compile of the BAGEL-7B-MoT train step for an 8-device mesh (fsdp 8) on fake CPU devices.

Nothing is allocated: params, optimiser state, EMA and the batch are ``jax.ShapeDtypeStruct`` with
shardings; ``jax.jit(...).lower(...).compile()`` then reports the per-device memory the program needs
(``compiled.memory_analysis()``). Slow (minutes) - a script, not a test.

    python bench/aot_7b.py [--tokens 4096] [--remat full] [--mesh data=1,fsdp=8,tensor=1]

Note: this is the XLA:CPU compile, so the memory figures are indicative for GPU/TPU (same sharding,
different fusion/scheduling); attention is the dense reference path (an [L, L] mask per pack).
"""

import argparse
import functools
import os
import sys
import time

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "bagel-7b-mot.yaml"))
ap.add_argument("--devices", type=int, default=8, help="fake CPU devices")
ap.add_argument("--mesh", default="data=1,fsdp=8,tensor=1")
ap.add_argument("--tokens", type=int, default=4096, help="row length of each pack (= ViT / latent / CE capacity)")
ap.add_argument("--packs", type=int, default=8, help="global packs per step (one per device by default)")
ap.add_argument("--vae-images", type=int, default=2, help="VAE images per pack")
ap.add_argument("--vae-hw", type=int, default=512, help="VAE image side (pixels)")
ap.add_argument("--remat", default="full", help="remat policy of decoder / ViT layers (see bagel_jax.nn.layers)")
ap.add_argument("--dtype", default="bfloat16", help="compute dtype")
args = ap.parse_args()
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bagel_jax import sharding as shd  # noqa: E402
from bagel_jax.config import config_from_yaml  # noqa: E402
from bagel_jax.loading import build_modules, vae_param_shapes  # noqa: E402
from bagel_jax.models.bagel import param_shapes  # noqa: E402
from bagel_jax.train import optimizer as O, step as S  # noqa: E402


def main():
    cfg = config_from_yaml(args.config)
    tc = O.TrainConfig(compute_dtype=args.dtype, remat_policy=args.remat)
    mesh = shd.make_mesh(**shd.parse_mesh(args.mesh))
    model, vae = build_modules(cfg, dtype=O.DTYPES[args.dtype], param_dtype=jnp.float32, remat_policy=args.remat)
    shapes = param_shapes(model)
    mask = O.trainable_mask(shapes, tc)
    opt = O.make_optimizer(tc, mask, 1000)
    abstract = S.abstract_state(shapes, opt, tc.seed)
    ssh = S.state_shardings(abstract, mesh)
    state = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, ssh)
    vshapes = vae_param_shapes(vae)
    vsh = shd.tree_shardings(vshapes, mesh)
    vae_abs = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), vshapes, vsh)

    A, G, L, Ni, HW = 1, args.packs, args.tokens, args.vae_images, args.vae_hw
    P = cfg.vit.patch_dim
    i32, f32 = jnp.int32, jnp.float32
    fields = dict(token_ids=((1, L), i32), kind=((1, L), jnp.int8), positions=((1, L), i32), seg=((1, L), i32),
                  vis=((1, L), i32), nblk=((1, L), i32), vit_patches=((L, P), f32), vit_pos=((L,), i32),
                  vit_seg=((L,), i32), vit_dest=((L,), i32), vae_images=((Ni, HW, HW, 3), f32), vae_src=((L,), i32),
                  vae_pos=((L,), i32), vae_dest=((L,), i32), vae_t_raw=((L,), f32), vae_mse=((L,), jnp.bool_),
                  ce_index=((L,), i32), ce_label=((L,), i32), ce_valid=((L,), f32), ce_reweight=((L,), f32))
    batch = {k: jax.ShapeDtypeStruct((A, G) + s, d, sharding=shd.batch_sharding(mesh, 2 + len(s)))
             for k, (s, d) in fields.items()}
    step = S.make_train_step(model, vae, tc, mask, opt, O.lr_schedule(tc, 1000), None, ssh["params"])
    # the training layout: expert streams, here half und / half gen slots (memory barely depends on it)
    step = functools.partial(step, expert_split=(L // 2, L - L // 2))
    jitted = jax.jit(step, in_shardings=(ssh, {k: v.sharding for k, v in batch.items()}, vsh),
                     out_shardings=(ssh, shd.replicated(mesh)), donate_argnums=(0,))
    n = O.count_params(shapes)
    print(f"BAGEL-7B-MoT: {n / 1e9:.2f}B params ({O.count_params(shapes, mask) / 1e9:.2f}B trainable); "
          f"mesh {dict(mesh.shape)}; {G} packs x {L} tokens; remat {args.remat}; compute {args.dtype}", flush=True)
    t = time.time()
    lowered = jitted.lower(state, batch, vae_abs)
    print(f"lowered in {time.time() - t:.1f}s", flush=True)
    t = time.time()
    compiled = lowered.compile()
    print(f"compiled in {time.time() - t:.1f}s", flush=True)
    ma = compiled.memory_analysis()
    gib = lambda b: b / 2 ** 30
    if ma is None:
        print("memory_analysis() not available on this backend")
        return
    arg, out, tmp = ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.temp_size_in_bytes
    alias = getattr(ma, "alias_size_in_bytes", 0)
    gen = getattr(ma, "generated_code_size_in_bytes", 0)
    print(f"per device: arguments {gib(arg):.2f} GiB, outputs {gib(out):.2f} GiB (aliased/donated {gib(alias):.2f} GiB), "
          f"temporaries {gib(tmp):.2f} GiB, code {gen / 2 ** 20:.1f} MiB")
    print(f"per device peak estimate (arguments + outputs - aliased + temporaries): {gib(arg + out - alias + tmp):.2f} GiB")
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(abstract))
    print(f"train state total {gib(state_bytes):.1f} GiB (params + EMA fp32, AdamW moments fp32) "
          f"= {gib(state_bytes) / mesh.size:.2f} GiB per device when fully sharded")


if __name__ == "__main__":
    main()

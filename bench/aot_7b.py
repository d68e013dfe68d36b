"""Ahead-of-time compile of the BAGEL-7B-MoT train step on fake CPU devices: per-device memory table.

Nothing is allocated: params, optimiser state, EMA and the batch are ``jax.ShapeDtypeStruct`` with
shardings; ``jax.jit(...).lower(...).compile()`` then reports the per-device memory the program needs
(``compiled.memory_analysis()``). One compile per configuration (mesh x tokens per pack); each prints
"per device peak estimate ...: N GiB" and a Markdown table row, and the table is printed again at the end.
Slow: minutes per configuration at 7B (the compile, not the run) - a script, not a test.

    python bench/aot_7b.py                                   # fsdp 8, 4096 tokens per pack, full remat
    python bench/aot_7b.py --mesh data=1,fsdp=8,tensor=1 --mesh data=1,fsdp=4,tensor=2 \\
        --tokens 8192,16384,32768,36864 --out aot_7b.jsonl  # the table in docs/performance.md (<= 64 GiB at 36,864)

The batch is the real packing code's output (:func:`bagel_jax.data.packing.pack`) at the capacities the
training loader uses for a row of ``--tokens`` (ViT, latent and CE capacity = the row length, ``--vae-images``
images of ``--vae-hw`` pixels), so new batch fields are picked up automatically. Packs per step default to
one per data-parallel shard (``data * fsdp``).

Note: this is the XLA:CPU compile, so the memory figures are indicative for GPU/TPU (same sharding,
different fusion/scheduling).
"""

import argparse
import functools
import json
import os
import sys
import time

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "bagel-7b-mot.yaml"))
ap.add_argument("--devices", type=int, default=8, help="fake CPU devices (default 8)")
ap.add_argument("--mesh", action="append", default=None,
                help="mesh data=D,fsdp=F,tensor=T (repeatable: one table row per mesh x tokens; "
                     "default data=1,fsdp=8,tensor=1)")
ap.add_argument("--tokens", default="4096",
                help="tokens per pack (row length), comma-separated for several rows (default 4096)")
ap.add_argument("--packs", type=int, default=None, help="global packs per step (default: data * fsdp, one per shard)")
ap.add_argument("--vae-images", type=int, default=2, help="VAE image capacity per pack (default 2)")
ap.add_argument("--vae-hw", type=int, default=512, help="VAE image side in pixels (default 512)")
ap.add_argument("--remat", default="full", help="remat policy of decoder / ViT layers (default full)")
ap.add_argument("--attention", default=None,
                help="attention implementation of decoder and ViT (default: the model's default for the length)")
ap.add_argument("--seq-parallel", action="store_true",
                help="split the residual stream's sequence over the tensor axis (ModelOptions.seq_parallel)")
ap.add_argument("--dtype", default="bfloat16", help="compute dtype (default bfloat16)")
ap.add_argument("--out", default=None, metavar="FILE.jsonl", help="append one JSON line per configuration")
ap.add_argument("--lora-rank", type=int, default=0,
                help="the LoRA train step instead (docs/lora.md): adapters of this rank on every q/k/v/o/MLP projection "
                     "of both experts, the frozen base in --dtype (or int8 with --quantize int8), an argument of the step")
ap.add_argument("--quantize", default="none", choices=("none", "int8"), help="with --lora-rank: the base's decoder "
                "projections in int8")
args = ap.parse_args()
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bagel_jax import lora as LR  # noqa: E402
from bagel_jax import quantize as Q  # noqa: E402
from bagel_jax import sharding as shd  # noqa: E402
from bagel_jax.config import config_from_yaml  # noqa: E402
from bagel_jax.data import packing  # noqa: E402
from bagel_jax.loading import build_modules, vae_param_shapes  # noqa: E402
from bagel_jax.models.bagel import param_shapes  # noqa: E402
from bagel_jax.nn.options import as_dtype  # noqa: E402
from bagel_jax.train import lora as TL, optimizer as O, step as S  # noqa: E402

GIB = 2 ** 30
HEADER = ("| mesh | tokens/pack | packs | remat | attention | seq-par | arguments GiB | temporaries GiB | "
          "peak GiB/device | compile s |\n|---|---|---|---|---|---|---|---|---|---|")


def pack_fields(cfg, L: int, n_images: int, hw: int) -> dict:
    """Shapes and dtypes of one packed row of ``L`` tokens, from the real packing code at the loader's capacities."""
    sp = packing.SpecialTokens(1, 2, 3, 4)
    vit_side = cfg.vit.patch_size * 2
    sample = [packing.TextItem([5, 6, 7], loss=True), packing.VitItem(np.zeros((3, vit_side, vit_side), np.float32)),
              packing.VaeItem(np.zeros((3, hw, hw), np.float32), loss=True, t_raw=0.0)]
    caps = packing.Capacities(rows=1, row_len=L, vit_tokens=L, latent_tokens=L, vae_images=n_images,
                              vae_hw=(hw, hw), ce_tokens=L)
    arrays = packing.pack([[sample]], sp, cfg, caps).arrays()
    return {k: (np.shape(v), np.asarray(v).dtype) for k, v in arrays.items()}


def one_config(cfg, mesh_spec: str, L: int) -> dict:
    tc = O.TrainConfig(compute_dtype=args.dtype, remat_policy=args.remat, attention_impl=args.attention or "auto",
                       seq_parallel=args.seq_parallel)
    mesh = shd.make_mesh(**shd.parse_mesh(mesh_spec))
    model, vae = build_modules(cfg, tc.model_options)
    shapes = param_shapes(model)
    lc = LR.LoraConfig(rank=args.lora_rank, quantize=args.quantize) if args.lora_rank else None
    if lc is not None:   # the train state is the adapter's; the frozen base is an input beside the VAE
        model = TL.lora_model(model, lc)
        base = jax.eval_shape(lambda p: Q.quantize_params(Q.cast_floats(p, as_dtype(args.dtype)), lc.quantize), shapes)
        base = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), base,
                                      shd.tree_shardings(base, mesh))
        print(f"LoRA rank {lc.rank}: frozen base {Q.param_bytes(base) / GIB:.2f} GiB ({args.quantize if args.quantize != 'none' else args.dtype})")
        shapes = LR.adapter_shapes(lc, shapes)
    mask = O.trainable_mask(shapes, tc)
    opt = O.make_optimizer(tc, mask, 1000)
    abstract = S.abstract_state(shapes, opt, tc.seed)
    ssh = S.state_shardings(abstract, mesh)
    state = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, ssh)
    vshapes = vae_param_shapes(vae)
    vsh = shd.tree_shardings(vshapes, mesh)
    vae_abs = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), vshapes, vsh)

    G = args.packs or shd.num_batch_shards(mesh)
    # [accum, packs, ...one pack's arrays] as the loader collates them (rows = 1 per pack)
    batch = {k: jax.ShapeDtypeStruct((1, G) + s, d, sharding=shd.batch_sharding(mesh, 2 + len(s)))
             for k, (s, d) in pack_fields(cfg, L, args.vae_images, args.vae_hw).items()}
    step = S.make_train_step(model, vae, tc, mask, opt, O.lr_schedule(tc, 1000), None, ssh["params"],
                             loss_fn=TL.make_loss_fn(model, vae, tc, lc, {}) if lc is not None else None)
    if lc is not None:
        vsh, vae_abs = (vsh, jax.tree_util.tree_map(lambda a: a.sharding, base)), (vae_abs, base)
    # the training layout: expert streams, here half und / half gen slots (memory barely depends on it)
    step = functools.partial(step, expert_split=(L // 2, L - L // 2))
    jitted = jax.jit(step, in_shardings=(ssh, {k: v.sharding for k, v in batch.items()}, vsh),
                     out_shardings=(ssh, shd.replicated(mesh)), donate_argnums=(0,))
    print(f"BAGEL-7B-MoT: {O.count_params(shapes) / 1e9:.2f}B params ({O.count_params(shapes, mask) / 1e9:.2f}B "
          f"trainable); mesh {dict(mesh.shape)}; {G} packs x {L} tokens; remat {args.remat}; attention "
          f"{args.attention or 'default'}; seq-parallel {args.seq_parallel}; compute {args.dtype}", flush=True)
    t = time.time()
    with shd.mesh_scope(mesh):
        lowered = jitted.lower(state, batch, vae_abs)
    t_lower = time.time() - t
    t = time.time()
    compiled = lowered.compile()
    t_compile = time.time() - t
    print(f"lowered in {t_lower:.1f}s, compiled in {t_compile:.1f}s", flush=True)
    row = dict(mesh=mesh_spec, tokens=L, packs=G, remat=args.remat, attention=args.attention or "default",
               seq_parallel=args.seq_parallel, dtype=args.dtype, lower_s=round(t_lower, 1),
               compile_s=round(t_compile, 1), lora_rank=args.lora_rank, quantize=args.quantize)
    ma = compiled.memory_analysis()
    if ma is None:
        print("memory_analysis() not available on this backend")
        return row
    arg, out, tmp = ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.temp_size_in_bytes
    alias = getattr(ma, "alias_size_in_bytes", 0)
    gen = getattr(ma, "generated_code_size_in_bytes", 0)
    peak = arg + out - alias + tmp
    print(f"per device: arguments {arg / GIB:.2f} GiB, outputs {out / GIB:.2f} GiB (aliased/donated "
          f"{alias / GIB:.2f} GiB), temporaries {tmp / GIB:.2f} GiB, code {gen / 2 ** 20:.1f} MiB")
    print(f"per device peak estimate (arguments + outputs - aliased + temporaries): {peak / GIB:.2f} GiB")
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(abstract))
    print(f"train state total {state_bytes / GIB:.1f} GiB (params + EMA fp32, AdamW moments fp32) "
          f"= {state_bytes / GIB / mesh.size:.2f} GiB per device when fully sharded", flush=True)
    row.update(arguments_gib=round(arg / GIB, 2), outputs_gib=round(out / GIB, 2), aliased_gib=round(alias / GIB, 2),
               temporaries_gib=round(tmp / GIB, 2), peak_gib=round(peak / GIB, 2))
    return row


def table_row(r: dict) -> str:
    f = lambda k: f"{r[k]:.2f}" if k in r else "n/a"
    return (f"| {r['mesh']} | {r['tokens']} | {r['packs']} | {r['remat']} | {r['attention']} | "
            f"{'yes' if r['seq_parallel'] else 'no'} | {f('arguments_gib')} | {f('temporaries_gib')} | "
            f"{f('peak_gib')} | {r['compile_s']:.0f} |")


def main():
    cfg = config_from_yaml(args.config)
    meshes = args.mesh or ["data=1,fsdp=8,tensor=1"]
    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    rows = []
    for m in meshes:
        for L in tokens:
            r = one_config(cfg, m, L)
            rows.append(r)
            print(HEADER.splitlines()[0] + "\n" + table_row(r), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(r) + "\n")
    print("\n" + HEADER)
    for r in rows:
        print(table_row(r))


if __name__ == "__main__":
    main()

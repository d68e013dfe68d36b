"""Where the train step's time goes: FLOPs by part, per-part time measured inside the compiled step
(profiler trace of the jitted step, XLA:CPU thunk events mapped to parts through the optimised HLO's
metadata), and the achieved fraction of the 2048^3 float32 matmul probe measured in the same process.

    python bench/train_breakdown.py [--tokens 1023,4092] [--variants base,...] [--repeat 5] [--profile]

The model and pack are those of the ``../shared/perf`` train case: Qwen2-MoT hidden 512, 8 layers, 8/2
heads, MLP 1408, vocab 576; SigLIP hidden 256, 4 layers; FLUX-layout AE ch 32 (random weights), one
pack of a VLM sample (224x224 ViT image, 30 question ids, 150 answer ids with CE) and two text-to-image
samples (40 / 21 caption ids, a 256x256 VAE image each with MSE): 1023 tokens. ``--tokens 4092`` packs
the same three samples four times. The step is built as the harness builds it
(``make_train_step`` + ``jit_train_step``, float32, AdamW, clip 1.0, EMA, one device); only the
variant's options change. Variants (``--variants``, comma-separated, timed alternating in one
process, medians) are named in :data:`VARIANTS`.

``--profile`` also sweeps the trace's op spans: per part the time it ran while no other thread ran an op
(``alone s``), the step's time with none / one / two threads running ops, and the op runs per step.

FLOPs: :func:`bagel_jax.train.metrics.step_flops_by_part` (matmul FLOPs a step needs, 3x forward for
trained parts; the frozen VAE encoder forward once, from XLA's cost analysis). ``frac probe`` =
FLOPs / time / probe GFLOP/s.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import dataclasses
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import time

DUMP = tempfile.mkdtemp(prefix="train_breakdown_hlo_")
atexit.register(shutil.rmtree, DUMP, True)     # XLA:CPU also dumps LLVM IR and objects: hundreds of MB
# the optimised HLO of the step (instruction name -> metadata) maps profiler events to parts
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={DUMP} --xla_dump_hlo_as_text"
                           " --xla_dump_hlo_module_re=.*train_step.*").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.profiler import ProfileData  # noqa: E402

from bagel_jax import runtime, sharding as shd  # noqa: E402
from bagel_jax.config import BagelConfig, LLMConfig, VAEConfig, ViTConfig  # noqa: E402
from bagel_jax.data import packing  # noqa: E402
from bagel_jax.loading import random_model  # noqa: E402
from bagel_jax.models import flux_vae  # noqa: E402
from bagel_jax.nn import layer_loop  # noqa: E402
from bagel_jax.tokenizer import load_tokenizer  # noqa: E402
from bagel_jax.train import optimizer as O  # noqa: E402
from bagel_jax.train import step as St  # noqa: E402
from bagel_jax.train.metrics import step_flops_by_part  # noqa: E402

TINY_A = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "tiny-a")

# name -> (TrainConfig overrides, ModelOptions overrides)
VARIANTS = {
    "base": ({}, {}),
    "xla": ({}, dict(attention_impl="xla")),
    "blocked": ({}, dict(attention_impl="blocked")),
    "dots": ({}, dict(remat_policy="dots")),
    "full": ({}, dict(remat_policy="full")),
    "scan": (dict(layer_loop="scan"), {}),
    "unrolled": (dict(layer_loop="unrolled"), {}),
    # per-layer parameter arrays in the train state itself (a model built with layer_loop="unrolled")
    "perlayer": ({}, dict(layer_loop="unrolled")),
}
# the layout of the train state's layer stacks (init_state's layer_loop) where a variant is not the default
# ("auto": per layer on one CPU device): "scan" and "unrolled" keep the state stacked, "unrolled" slicing it
# per layer inside every step
STATE_LAYOUT = {"scan": "scan", "unrolled": "scan"}


def perf_config() -> BagelConfig:
    """The ``../shared/perf`` small model's architecture (scripts/make_model.py)."""
    llm = LLMConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                    intermediate_size=1408, vocab_size=576)
    vit = ViTConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)
    vae = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1))
    cfg = BagelConfig(llm=llm, vit=vit, vae=vae)
    cfg.validate()
    return cfg


def perf_pack(special, cfg, repeats: int = 1, seed: int = 0) -> packing.PackedBatch:
    """The harness's training pack (``repeats`` copies of its three samples), random ids and pixels."""
    rs = np.random.RandomState(seed)
    ids = lambda n: rs.randint(10, 500, n).tolist()
    vae_img = rs.uniform(-1, 1, (3, 256, 256)).astype(np.float32)
    vit_img = vae_img[:, 16:240, 16:240].copy()
    T = packing.TextItem
    samples = []
    for _ in range(repeats):
        t_raw = rs.randn(2)
        samples += [[packing.VitItem(vit_img), T(ids(30)), T(ids(150), loss=True)],
                    [T(ids(40)), packing.VaeItem(vae_img, loss=True, t_raw=float(t_raw[0]))],
                    [T(ids(21)), packing.VaeItem(vae_img, loss=True, t_raw=float(t_raw[1]))]]
    return packing.pack([samples], special, cfg)


def matmul_probe(n: int = 2048, repeat: int = 5) -> float:
    """GFLOP/s of a jitted ``n^3`` float32 matmul (median of ``repeat``), as the harness's probe."""
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * n ** 3 / float(np.median(ts)) / 1e9


def vae_encode_flops(bm, images) -> float:
    """XLA's FLOP count of the VAE encoder's forward on ``images`` (a separate program: FLOPs only)."""
    fn = jax.jit(lambda p, x: bm.vae.apply({"params": p}, x, method=flux_vae.AutoEncoder.encode_moments))
    ca = fn.lower(bm.vae_params, images).compile().cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops", 0.0))


class Variant:
    def __init__(self, name, bm, arrays, mesh):
        tc_over, opt_over = VARIANTS[name]
        self.name = name
        self.tc = O.TrainConfig(compute_dtype="float32", warmup_steps=0, **tc_over)
        model = bm.model.clone(opts=dataclasses.replace(bm.model.opts, **opt_over))
        params = layer_loop.unstack(bm.params) if model.opts.layer_loop == "unrolled" else bm.params
        mask = O.trainable_mask(params, self.tc)
        opt = O.make_optimizer(self.tc, mask, 1000)
        self.state, ssh = St.init_state(params, opt, 0, mesh, layer_loop=STATE_LAYOUT.get(name, "auto"))
        vsh = shd.tree_shardings(bm.vae_params, mesh)
        self.vae_params = jax.device_put(bm.vae_params, vsh)
        self.fn = St.jit_train_step(St.make_train_step(model, bm.vae, self.tc, mask, opt,
                                                       O.lr_schedule(self.tc, 1000), None, ssh["params"]),
                                    ssh, mesh, vsh)
        # a logical-order batch, as the harness gives it: the step lays it out as expert streams on the host
        self.batch = shd.put_batch(arrays, mesh)
        self.split = St.streams_from_logical(arrays)[1]
        self.times, self.metrics = [], None

    def run(self):
        t = time.perf_counter()
        self.state, m = self.fn(self.state, self.batch, self.vae_params)
        m = jax.device_get(m)
        dt = time.perf_counter() - t
        if self.metrics is None:
            self.metrics = m
        return dt


# ------------------------------------------------------------------------------------------- profiling
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?(%?[\w.\-]+)\s*=\s*\S.*?\s([\w\-]+)\(")
_META = re.compile(r'op_name="([^"]*)"')
_COMP = re.compile(r"^(?:ENTRY\s+)?(%?[\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"(?:calls|body|condition|to_apply)=(%?[\w.\-]+)|branch_computations=\{([^}]*)\}")

PARTS = ("decoder matmuls", "decoder other", "attention + RoPE", "layer scan slices", "ViT", "VAE encode",
         "CE (LM head)", "MSE / latent heads", "embed / scatter / loss", "optimizer + EMA", "other")


def hlo_index(module_text: str) -> dict:
    """instruction name -> (opcode, op_name) of an optimised HLO module's text. An instruction without an
    ``op_name`` (YNNPACK fusions, ops of loop bodies XLA created) takes that of the instruction calling its
    computation (a fusion, while, call), so the ops of a loop count towards the part that runs the loop."""
    out, comp_of, caller = {}, {}, {}
    comp = None
    for line in module_text.splitlines():
        h = _COMP.match(line)
        if h:
            comp = h.group(1).lstrip("%")
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name = m.group(1).lstrip("%")
        op = _META.search(line)
        out[name] = (m.group(2), op.group(1) if op else "")
        comp_of[name] = comp
        for one, many in _CALLS.findall(line):
            for c in (one or many).split(","):
                caller.setdefault(c.strip().lstrip("%"), name)

    def inherited(name, depth=0):
        opcode, op_name = out[name]
        if op_name or depth > 20:
            return op_name
        parent = caller.get(comp_of.get(name))
        return inherited(parent, depth + 1) if parent in out else ""

    return {n: (oc, inherited(n)) for n, (oc, _) in out.items()}


def classify(op_name: str, is_dot: bool) -> str:
    """The part of the step an op belongs to, from its HLO ``op_name`` (JAX's name stack)."""
    if "encode_moments" in op_name:
        return "VAE encode"
    if "embed_vit" in op_name:
        return "ViT"
    if "Bagel.decode" in op_name:
        if "layer._apply" in op_name:
            return "decoder matmuls" if is_dot else "decoder other"
        if re.search(r"/layers(_\d+)?/layer/", op_name):
            return "attention + RoPE"
        if "dynamic_index_in_dim" in op_name or "dynamic_update_index_in_dim" in op_name:
            return "layer scan slices"
        return "decoder other"
    if "lm_logits" in op_name:
        return "CE (LM head)"
    if "velocity" in op_name or "embed_latents" in op_name:
        return "MSE / latent heads"
    if "jvp(" in op_name or "transpose(" in op_name:
        return "embed / scatter / loss"
    if op_name.startswith("jit(train_step)/"):
        return "optimizer + EMA"
    return "other"


def profile_step(v: Variant, steps: int, module_text: str):
    """Per-part op time (s per step) of ``steps`` runs of ``v``'s compiled step, from a profiler trace; also
    :func:`concurrency` of its op spans and the op runs per step."""
    idx = hlo_index(module_text)
    d = tempfile.mkdtemp(prefix="train_breakdown_trace_")
    atexit.register(shutil.rmtree, d, True)
    jax.profiler.start_trace(d)
    for _ in range(steps):
        v.run()
    jax.profiler.stop_trace()
    path = sorted(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True))[-1]
    pd = ProfileData.from_file(path)
    by_part, by_op = collections.Counter(), collections.Counter()
    unmatched = collections.Counter()
    spans = []                                               # (start, end, thread, part) of every leaf op
    for plane in pd.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for e in line.events:
                if e.name not in idx:
                    if not e.name.startswith(("Thread", "ThunkExecutor", "end:")):
                        unmatched[e.name] += e.duration_ns
                    continue
                opcode, op_name = idx[e.name]
                if opcode in ("while", "conditional", "call"):   # containers: their ops are counted
                    continue
                dt = e.duration_ns * 1e-9 / steps
                is_dot = opcode in ("dot", "convolution") or op_name.endswith(("dot_general", "conv_general_dilated"))
                part = classify(op_name, is_dot)
                by_part[part] += dt
                by_op[(e.name, opcode, part, op_name)] += dt
                spans.append((e.start_ns, e.start_ns + e.duration_ns, line.name, part))
    return by_part, by_op, unmatched, concurrency(spans, steps), len(spans) / steps


def concurrency(spans, steps: int):
    """From leaf-op spans ``(start, end, thread, part)``: the seconds per step during which 0, 1 and 2+ threads
    ran an op (between the first op's start and the last op's end of the trace), and per part the seconds it
    ran while no other thread ran anything (work that did not spread over the cores)."""
    edges = sorted([(a, 1, t, p) for a, b, t, p in spans] + [(b, -1, t, p) for a, b, t, p in spans],
                   key=lambda x: (x[0], x[1]))
    busy = collections.Counter()                            # thread -> open ops
    part_of = {}                                            # thread -> part of its open op
    by_n, alone = collections.Counter(), collections.Counter()
    last = edges[0][0] if edges else 0
    for ts, d, t, p in edges:
        dt = (ts - last) * 1e-9 / steps
        active = [th for th, c in busy.items() if c > 0]
        by_n[min(len(active), 2)] += dt
        if len(active) == 1:
            alone[part_of[active[0]]] += dt
        last = ts
        busy[t] += d
        if d > 0:
            part_of[t] = p
    return by_n, alone


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1023,4092", help="1023 (the harness pack) and/or 4092 (4 copies)")
    ap.add_argument("--variants", default="base", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--repeat", type=int, default=5, help="timed steps per variant (median)")
    ap.add_argument("--profile", action="store_true", help="trace the first variant's step, per-part times")
    ap.add_argument("--top", type=int, default=25, help="slowest ops listed with --profile")
    ap.add_argument("--save", default=None, help="with --profile: write every op's time per step to this JSON")
    ap.add_argument("--tune-malloc", action="store_true",
                    help="bagel_jax.runtime.tune_cpu_malloc() first, as train.py does (no page faults per step)")
    args = ap.parse_args()
    if args.tune_malloc:
        print(f"tune_cpu_malloc applied: {runtime.tune_cpu_malloc()}")
    print(f"import bagel_jax's CPU buffer settings applied: {runtime.malloc_tuned()} (BAGEL_JAX_CPU_MALLOC=0: not)")

    cfg = perf_config()
    bm = random_model(cfg, jax.random.PRNGKey(0))
    special = load_tokenizer(TINY_A).special
    mesh = shd.make_mesh(**shd.parse_mesh("data=1,fsdp=1,tensor=1"))
    print(f"backend {jax.default_backend()} x {jax.device_count()}, jax {jax.__version__}; "
          f"load {open('/proc/loadavg').read().split()[:3]}")
    probe = matmul_probe()
    print(f"matmul probe (2048^3 fp32): {probe:.1f} GFLOP/s")
    for T in [int(t) for t in args.tokens.split(",")]:
        b = perf_pack(special, cfg, repeats=max(1, round(T / 1023)))
        arrays = {k: v.reshape((1, 1) + v.shape) for k, v in b.arrays().items()}   # [accum, packs, ...]
        parts = step_flops_by_part(cfg, b.arrays(), vae_encode_flops(bm, jnp.asarray(b.vae_images)))
        flops = sum(parts.values())
        print(f"\n== {b.token_ids.shape[1]} tokens: {int((b.seg > 0).sum())} real, {int(b.ce_valid.sum())} CE, "
              f"{int(b.vae_mse.sum())} MSE latents, {b.vit_patches.shape[0]} ViT patches; "
              f"{flops / 1e9:.1f} GFLOP per step")
        for k, f in parts.items():
            print(f"   {k:24s} {f / 1e9:8.2f} GFLOP ({100 * f / flops:4.1f} %)")
        variants = [Variant(n, bm, arrays, mesh) for n in args.variants.split(",")]
        for v in variants:
            before = set(glob.glob(os.path.join(DUMP, "*train_step*after_optimizations.txt")))
            t = time.perf_counter()
            v.run()
            v.compile_s = time.perf_counter() - t
            mods = sorted(set(glob.glob(os.path.join(DUMP, "*train_step*after_optimizations.txt"))) - before)
            v.module_text = open(mods[-1]).read() if mods else ""
            ntr = sum(1 for l in v.module_text.splitlines() if re.search(r"= f32\[[^\]]*\]\S* (transpose|copy)\(", l))
            nst = len(re.findall(r"copy\(%state__", v.module_text))
            print(f"   {v.name}: split {v.split}, first call {v.compile_s:.1f} s, loss {float(v.metrics['loss']):.6f} "
                  f"(ce {float(v.metrics['loss_ce']):.6f}); optimised HLO: {ntr} transpose/copy ops, "
                  f"{nst} copies of train-state arrays")
        for _ in range(args.repeat):
            for v in variants:
                v.times.append(v.run())
        probe2 = matmul_probe()
        print(f"   matmul probe after: {probe2:.1f} GFLOP/s; load {open('/proc/loadavg').read().split()[:3]}")
        pr = float(np.median([probe, probe2]))
        for v in variants:
            med = float(np.median(v.times))
            print(f"   {v.name:8s} median {med:.3f} s/step (runs {', '.join(f'{x:.3f}' for x in v.times)}): "
                  f"{flops / med / 1e9:.1f} GFLOP/s = {100 * flops / med / 1e9 / pr:.0f} % of the probe")
        for v in (variants if args.profile else []):
            by_part, by_op, unmatched, (by_n, alone), n_ops = profile_step(v, 2, v.module_text)
            tot = sum(by_part.values())
            med = float(np.median(v.times))
            print(f"   profile of {v.name} (op time per step, summed over threads; wall {med:.3f} s):")
            print(f"   {'part':24s} {'op s':>7s} {'share':>6s} {'GFLOP':>7s} {'% probe':>7s} {'alone s':>7s}")
            flop_of = {"decoder matmuls": parts["decoder matmuls"], "attention + RoPE": parts["attention"],
                       "ViT": parts["ViT"], "VAE encode": parts["VAE encode"], "CE (LM head)": parts["CE (LM head)"],
                       "MSE / latent heads": parts["latent heads"]}
            for p in PARTS:
                if by_part[p] == 0:
                    continue
                f = flop_of.get(p, 0.0)
                eff = f"{100 * f / by_part[p] / 1e9 / pr:6.0f}" if f else "      "
                print(f"   {p:24s} {by_part[p]:7.3f} {100 * by_part[p] / tot:5.1f}% {f / 1e9:7.2f} {eff}  "
                      f"{alone[p]:7.3f}")
            print(f"   {'total':24s} {tot:7.3f}")
            print(f"   threads running ops (s per step): none {by_n[0]:.3f}, one {by_n[1]:.3f}, two or more "
                  f"{by_n[2]:.3f}; {n_ops:.0f} op runs per step ('alone s': a part's time with the other thread idle; "
                  "XLA's own convolutions are not traced and count as none)")
            print("   slowest ops:")
            for (name, opcode, part, op_name), dt in by_op.most_common(args.top):
                print(f"   {dt * 1e3:8.1f} ms  {name:28s} {opcode:12s} {part:20s} {op_name[-100:]}")
            if args.save:
                rows = [dict(tokens=T, variant=v.name, op=n, opcode=oc, part=pt, op_name=on, s=dt)
                        for (n, oc, pt, on), dt in by_op.items()]
                old = json.load(open(args.save)) if os.path.exists(args.save) else []
                json.dump(old + rows, open(args.save, "w"))
            if unmatched:
                print("   unmatched events:", [(k, round(x * 1e-6 / 2, 1)) for k, x in unmatched.most_common(6)])


if __name__ == "__main__":
    main()

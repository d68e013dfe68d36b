"""Train-step speed on one accelerator: step time, tokens/s and MFU per attention implementation.

A random BAGEL with a 1B-class decoder (Qwen2.5-1.5B shapes per expert: hidden 1536, 28 layers, 12/2 heads,
MLP 8960, vocab 151,936; two experts as in BAGEL-MoT) is trained for a few steps on packs of ``--tokens`` tokens
built by the real packing code (``bench._common.mixed_pack``: text-to-image, VQA and edit-like samples,
256 px VAE images) in the expert-stream
layout, with the real train step (AdamW, clip, EMA, bf16 compute, float32 master weights, full remat). For each
``--attention`` implementation and each pack length it prints the median step time, tokens/s (real tokens) and
MFU = ``bagel_jax.train.metrics.step_flops`` / (time * ``--peak-tflops``).

    python bench/gpu_train.py                              # xla, blocked, pallas, cudnn at 8k and 32k tokens
    python bench/gpu_train.py --attention blocked,pallas --tokens 32768 --steps 5 --profile
    python bench/gpu_train.py --tiny                       # a CPU smoke run of this script

Each configuration runs in its own child process with a time limit (``--timeout``; ``--in-process`` runs them
all here): out-of-memory, unsupported combinations (e.g. ``cudnn`` at 32k), a crash or a hang print the error in
its row and the table goes on. ``--out FILE`` appends one JSON line per row; ``--profile`` adds the top ops of
one more traced step (``bench/gpu_check.py`` runs this script as its train part).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench._common import mixed_pack  # noqa: E402
from bench.gpu_check import format_top_ops, trace_top_ops  # noqa: E402
from bagel_jax import sharding as shd  # noqa: E402
from bagel_jax.config import BagelConfig, LLMConfig, VAEConfig, ViTConfig  # noqa: E402
from bagel_jax.data import packing  # noqa: E402
from bagel_jax.loading import build_modules  # noqa: E402
from bagel_jax.models.bagel import init_params  # noqa: E402
from bagel_jax.train import optimizer as O, step as S  # noqa: E402
from bagel_jax.train.metrics import step_flops  # noqa: E402


def model_config(tiny: bool) -> BagelConfig:
    if tiny:
        llm = LLMConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=256, vocab_size=1024)
        vit = ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
        vae = VAEConfig(ch=32, ch_mult=(1, 2, 2, 2))
    else:
        llm = LLMConfig(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                        intermediate_size=8960, vocab_size=151936)
        vit = ViTConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16)
        vae = VAEConfig()
    cfg = BagelConfig(llm=llm, vit=vit, vae=vae)
    cfg.validate()
    return cfg


def build_pack(cfg: BagelConfig, tokens: int, hw: int):
    """One pack of at most ``tokens`` tokens (logical order) and its expert-stream layout."""
    b = mixed_pack(cfg, packing.SpecialTokens(1, 2, 3, 4), tokens, vae_px=hw, vit_px=cfg.vit.patch_size * 16)
    und, _ = packing.expert_counts(b)
    U = int(und.max())
    streams, _ = packing.to_expert_streams(b, U)
    return b, streams, (U, tokens - U)


def run_one(cfg, impl: str, tokens: int, args) -> list[dict]:
    """Rows of one configuration: the timing row, then (``--profile``) the top ops of one more step."""
    tc = O.TrainConfig(compute_dtype=args.dtype, remat_policy=args.remat, attention_impl=impl, warmup_steps=0)
    mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model, vae = build_modules(cfg, tc.model_options)
    params = init_params(model, jax.random.PRNGKey(0))
    ds = cfg.vae.downsample
    vae_params = vae.init(jax.random.PRNGKey(1), jnp.zeros((1, ds * 2, ds * 2, cfg.vae.in_channels)))["params"]
    mask = O.trainable_mask(params, tc)
    opt = O.make_optimizer(tc, mask, 1000)
    state, ssh = S.init_state(params, opt, 0, mesh)
    del params
    vsh = shd.tree_shardings(vae_params, mesh)
    vae_params = jax.device_put(vae_params, vsh)
    logical, streams, split = build_pack(cfg, tokens, args.vae_hw)
    batch = {k: v.reshape((1, 1) + v.shape) for k, v in streams.arrays().items()}
    batch["expert_split"] = np.asarray(split, np.int32).reshape(1, 1, 2)
    fn = S.jit_train_step(S.make_train_step(model, vae, tc, mask, opt, O.lr_schedule(tc, 1000), None, ssh["params"]),
                          ssh, mesh, vsh)
    gb = shd.put_batch(batch, mesh)
    holder = {"state": state}
    del state

    def step():
        holder["state"], m = fn(holder["state"], gb, vae_params)
        jax.block_until_ready(m)
        return m

    t = time.perf_counter()
    step()
    first = time.perf_counter() - t
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        m = step()
        times.append(time.perf_counter() - t)
    med = float(np.median(times))
    real = int((logical.seg > 0).sum())
    flops = step_flops(cfg, logical.arrays())
    rows = [dict(what="train", attention=impl, tokens=tokens, real_tokens=real, step_s=med, tokens_per_s=real / med,
                 mfu=flops / med / (args.peak_tflops * 1e12), step_flops=flops, first_s=first, loss=float(m["loss"]),
                 peak_bytes=peak_bytes(), error=None)]
    if args.profile:
        rows.append(trace_top_ops(step, f"train_step {impl} {tokens}"))
    return rows


def peak_bytes():
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    return (stats or {}).get("peak_bytes_in_use")


def table_row(r: dict) -> str:
    if r.get("error"):
        return f"| {r['attention']} | {r['tokens']} | - | - | - | - | - | {r['error']} |"
    peak = f", peak memory {r['peak_bytes'] / 2 ** 30:.1f} GiB" if r.get("peak_bytes") else ""
    return (f"| {r['attention']} | {r['tokens']} | {r['real_tokens']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
            f"{100 * r['mfu']:.1f} % | {r['first_s']:.1f} | loss {r['loss']:.4f}{peak} |")


def error_row(impl: str, tokens: int, e) -> dict:
    if isinstance(e, BaseException):
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        e = f"{type(e).__name__}: {msg}"
    return dict(what="train", attention=impl, tokens=tokens, error=e)


def isolated(impl: str, tokens: int, argv: list[str], timeout: float) -> list[dict]:
    """Rows of one configuration measured in a child process (a crash, a hang or a poisoned device cannot
    reach the next configuration; the child's device memory is freed with it)."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rows.jsonl")
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--attention", impl, "--tokens", str(tokens),
               "--out", out, "--in-process"]
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return [error_row(impl, tokens, f"timeout after {timeout:.0f} s")]
        rows = [json.loads(line) for line in open(out)] if os.path.exists(out) else []
        if proc.returncode != 0 and not rows:
            tail = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()][-1:] or [""]
            return [error_row(impl, tokens, f"exit status {proc.returncode}: {tail[0][:200]}")]
        return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attention", default="xla,blocked,pallas,cudnn", help="comma-separated implementations")
    ap.add_argument("--tokens", default="8192,32768", help="comma-separated tokens per pack")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median reported)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="compute dtype")
    ap.add_argument("--remat", default="full", help="remat policy (bagel_jax.nn.options.REMAT_POLICIES)")
    ap.add_argument("--vae-hw", type=int, default=256, help="VAE image side in pixels")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="peak dense bf16 TFLOP/s of the device for MFU (H100/H200 SXM: 989)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and 512-token packs: a CPU smoke test")
    ap.add_argument("--profile", action="store_true", help="also trace one more step and print its top ops")
    ap.add_argument("--out", default=None, metavar="FILE.jsonl", help="also append one JSON line per row here")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration (child process)")
    ap.add_argument("--in-process", action="store_true",
                    help="measure every configuration in this process (default: one child process each)")
    args = ap.parse_args(argv)
    cfg = model_config(args.tiny)
    if args.tiny:
        args.tokens, args.vae_hw = "512", 64
    child_argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    child_argv = _drop_options(child_argv, ("--attention", "--tokens", "--out", "--timeout"), ("--in-process",))
    print(f"backend {jax.default_backend()}: {jax.devices()[0].device_kind}; decoder hidden {cfg.llm.hidden_size} x "
          f"{cfg.llm.num_hidden_layers} layers (MoT), compute {args.dtype}, remat {args.remat}", flush=True)
    print("| attention | tokens/pack | real tokens | step s (median) | tokens/s | MFU | first call s | |\n"
          "|---|---|---|---|---|---|---|---|", flush=True)
    for T in [int(t) for t in str(args.tokens).split(",")]:
        for impl in args.attention.split(","):
            if args.in_process:
                try:
                    rows = run_one(cfg, impl, T, args)
                except Exception as e:  # an OOM or an unsupported implementation must not stop the table
                    rows = [error_row(impl, T, e)]
                gc.collect()
            else:
                rows = isolated(impl, T, child_argv, args.timeout)
            for r in rows:
                if r["what"] == "train":
                    print(table_row(r), flush=True)
                else:
                    print(format_top_ops(r), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows)


def _drop_options(argv: list[str], with_value: tuple, flags: tuple) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in with_value:
            skip = "=" not in a
            continue
        if name in flags:
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    main()

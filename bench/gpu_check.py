"""The first thing to run on a GPU: is every attention path correct there, and how fast is BAGEL on it.

One call, each part in its own child process with its own time limit (a crash, a hang or an out-of-memory in
one part cannot eat the others):

* ``correctness``: every attention implementation ("xla", "blocked", "pallas", "cudnn") against a float32
  dense reference at BAGEL's real shapes (the ViT: 16 heads x 72 over 2,560 patches; the 1.5B-class decoder
  12 / 2 heads x 128 and BAGEL-7B's 28 / 4 heads x 128 at 8k tokens; 7B at 32k, where only the O(L)
  implementations run and the float32 "blocked" path is the reference), bf16 inputs, the output and the
  gradients of q, k, v, on packed masks with causal text, full-attention image blocks, noised blocks,
  padding and fully masked query rows (which must give exactly 0). Tolerance: 2e-2 of the reference's
  largest magnitude (bf16 rounds to 2^-8 relative; flash kernels also round the probabilities to bf16).
* ``infer``: ``bench/gpu_infer.py`` (BAGEL-7B shapes, random weights, bf16: 1024 px text-to-image with the
  official settings, with and without TaylorSeer; greedy decoding), with the top ops of one image's flow
  steps and of the decode steps.
* ``train``: ``bench/gpu_train.py`` (the 1.5B-class MoT train step at 8k tokens per pack, per attention
  implementation), with the top ops of one step.

    python bench/gpu_check.py                        # on the GPU: under 7 minutes on one H100 / H200
    python bench/gpu_check.py --parts correctness    # one part
    python bench/gpu_check.py --limit train=600      # more time for a part
    python bench/gpu_check.py --tiny                 # every part on CPU at tiny shapes (a few minutes)

Prints a table on stdout, appends one JSON line per result to ``--jsonl`` (default ``gpu_check.jsonl``).
Exit status 1 if a correctness check failed (or the correctness part did not finish), 2 if another part
failed or ran out of time, else 0. Uses whatever jax the machine has (0.10 and 0.11 checked): the Pallas
Triton backend's deprecation warning of jax 0.11 is expected (docs/gpu.md).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
PARTS = ("correctness", "infer", "train")
# seconds per part, 400 s in all, sized from the one H200 run (30 s per 1024 px image, 25 s compile): the infer
# part needs about 3 minutes at today's speed; the train part fits about one implementation's compile and steps.
# A part that runs out of time is reported; rerun it alone with a larger --limit.
LIMITS = {"correctness": 75, "infer": 200, "train": 125}
TINY_LIMITS = {"correctness": 240, "infer": 240, "train": 300}
TOL = 2e-2

# name, batch, tokens, query heads, kv heads, head_dim
REAL_SHAPES = [("vit-so400m", 1, 2560, 16, 16, 72), ("decoder-1.5b-8k", 1, 8192, 12, 2, 128),
               ("decoder-7b-8k", 1, 8192, 28, 4, 128), ("decoder-7b-32k", 1, 32768, 28, 4, 128)]
TINY_SHAPES = [("vit-tiny", 1, 96, 4, 4, 72), ("decoder-tiny", 2, 160, 4, 2, 64)]
DENSE_MAX = 16384            # above this no dense path runs (and none is claimed: docs/gpu.md)


# ------------------------------------------------------------------------------------------------ profiles

_XLA_OP = re.compile(r"^[a-z][a-z0-9_-]*(\.[a-z0-9_-]+)*$")     # XLA:CPU op names: fusion.3, while.180, ...

def trace_top_ops(fn, label: str, per: int = 1, top: int = 10) -> dict:
    """Run ``fn()`` (which blocks until done) under ``jax.profiler`` and sum the traced op durations by name:
    the device's ops where the trace has a device (GPU kernels on its stream lines, TPU ops), else the host's
    XLA ops (CPU; there a loop's time also contains its body's ops).
    ``per``: the number of steps the call makes (the times are also given per step)."""
    try:                          # a profiler that cannot start (no CUPTI, say) must not end the measurements
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            with jax.profiler.trace(d, create_perfetto_trace=True):
                fn()
            wall = time.perf_counter() - t
            paths = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
            if not paths:
                return dict(what="profile", of=label, error="no perfetto trace written")
            with gzip.open(paths[0]) as f:
                trace = json.load(f)
    except Exception as e:        # noqa: BLE001
        return dict(what="profile", of=label, error=f"{type(e).__name__}: {str(e).strip()[:300]}")
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device = {p for p, n in procs.items() if "/device:" in n}
    # the op-level lines of a device: GPU kernels on its "Stream" lines, TPU ops on "XLA Ops"; module and step
    # lines span their ops and would count them twice
    lines = {k for k, n in threads.items() if k[0] in device and "Stream" in n}
    lines = lines or {k for k, n in threads.items() if k[0] in device and n == "XLA Ops"}
    totals, counts = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X":
            continue
        name = e.get("name", "")
        if lines:
            if (e.get("pid"), e.get("tid")) not in lines:
                continue
        elif device:
            if e.get("pid") not in device:
                continue
        elif not _XLA_OP.match(name):
            continue                          # host side: Python frames and runtime plumbing, not XLA ops
        totals[name] += float(e.get("dur", 0.0)) / 1e3          # microseconds -> ms
        counts[name] += 1
    total = sum(totals.values())
    ops = [dict(op=n, ms=ms, ms_per_step=ms / per, share=ms / total if total else 0.0, count=counts[n])
           for n, ms in totals.most_common(top)]
    return dict(what="profile", of=label, source="device" if device else "host", wall_s=wall, per=per,
                traced_ms=total, top=ops)


def format_top_ops(r: dict) -> str:
    if r.get("error"):
        return f"profile {r['of']}: {r['error']}"
    lines = [f"profile {r['of']}: {r['traced_ms'] / r['per']:.1f} ms of {r['source']} ops per step "
             f"({r['per']} step(s) traced, wall {r['wall_s']:.2f} s)"]
    lines += [f"    {o['share'] * 100:5.1f} %  {o['ms_per_step']:9.3f} ms/step  {o['count']:6d} calls  {o['op'][:100]}"
              for o in r["top"]]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- correctness

def packed_vectors(B: int, L: int, vit: bool, seed: int):
    """Mask vectors ``(q_vec, k_vec)`` of a packed row, as the packing code builds them: samples of causal text
    and full-attention image blocks (every other image block of the decoder noised), padding at the end; the
    keys of one sample are dropped (seg 0 in ``k_vec``), so its queries are fully masked rows."""
    from bagel_jax.nn.attention import MaskVectors

    rng = np.random.default_rng(seed)
    seg, vis, nblk = (np.zeros((B, L), np.int32) for _ in range(3))
    for b in range(B):
        pos, sid, blk = 0, 0, 0
        end = L - max(1, L // 17)                                    # padding tail
        while pos < end:
            sid += 1
            n = min(int(rng.integers(L // 8, L // 3)), end - pos)
            seg[b, pos:pos + n] = sid
            i = pos
            while i < pos + n:
                m = min(int(rng.integers(8, max(9, L // 12))), pos + n - i)
                if vit or rng.random() < 0.5:                        # a full-attention block
                    vis[b, i:i + m] = i
                    if not vit and rng.random() < 0.5:
                        blk += 1
                        nblk[b, i:i + m] = blk
                else:                                                # causal text
                    vis[b, i:i + m] = np.arange(i, i + m)
                i += m
            pos += n
    kseg = seg.copy()
    kseg[0][seg[0] == 2] = 0                                         # sample 2 of row 0 loses its keys
    q = MaskVectors(*(jnp.asarray(x) for x in (seg, vis, nblk)))
    return q, MaskVectors(jnp.asarray(kseg), q.vis, q.nblk)


def _impl_fn(name: str, tiny: bool):
    from bagel_jax.nn import attention as A

    if name == "pallas":
        from bagel_jax.nn.pallas_attention import flash_attention
        return lambda *a: flash_attention(*a)
    if name == "cudnn":
        # on CPU (--tiny) the wrapper's own logic runs with jax's dense implementation in place of cuDNN
        sdpa = "cudnn" if jax.default_backend() == "gpu" else "xla"
        return lambda *a: A.cudnn_packed(*a, sdpa_impl=sdpa)
    return lambda *a: A.attention(*a, implementation=name)


def _out_and_grads(fn, q, k, v, w, qv, kv):
    def f(q, k, v):
        out = fn(q, k, v, qv, kv)
        return jnp.sum(out.astype(jnp.float32) * w), out
    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return [out, *grads]


def check_shape(name: str, B: int, L: int, H: int, K: int, dh: int, tiny: bool) -> list[dict]:
    from bagel_jax.nn.attention import dense_mask

    rng = np.random.default_rng(L + H)
    qv, kv = packed_vectors(B, L, name.startswith("vit"), seed=L)
    r = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32)).astype(jnp.bfloat16)
    q, k, v, w = r(B, L, H, dh), r(B, L, K, dh), r(B, L, K, dh), r(B, L, H, dh)
    dense = L <= DENSE_MAX
    ref_name = "xla" if dense else "blocked"
    up = lambda x: x.astype(jnp.float32)
    t = time.perf_counter()
    with jax.default_matmul_precision("float32"):        # a true float32 reference (not TF32 on GPU)
        ref = [np.asarray(x, np.float32)
               for x in _out_and_grads(_impl_fn(ref_name, tiny), up(q), up(k), up(v), up(w), qv, kv)]
    ref_s = time.perf_counter() - t
    if dense:
        dead = ~np.asarray(dense_mask(qv, kv)).any(-1)
    else:                        # [B, L] of queries with no allowed key, from the vectors without an [L, L] mask
        seg, kseg = np.asarray(qv.seg), np.asarray(kv.seg)
        dead = np.stack([~np.isin(seg[b], kseg[b][kseg[b] > 0]) for b in range(B)])
    assert dead.any() and not dead.all()
    rows = []
    impls = ["xla", "blocked", "pallas", "cudnn"] if dense else ["blocked", "pallas"]
    for impl in impls:
        row = dict(what="correctness", shape=name, tokens=L, heads=H, kv_heads=K, head_dim=dh, impl=impl,
                   reference=f"{ref_name} float32", ref_s=ref_s)
        if impl == "cudnn" and jax.default_backend() != "gpu":
            row["impl"] = "cudnn (dense sdpa on CPU)"
        try:
            t = time.perf_counter()
            got = [np.asarray(x, np.float32) for x in _out_and_grads(_impl_fn(impl, tiny), q, k, v, w, qv, kv)]
            row["s"] = time.perf_counter() - t
            errs = {}
            for n, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
                scale = max(float(np.abs(b).max()), 1e-6)
                errs[n] = float(np.abs(a - b).max()) / scale if np.isfinite(a).all() else float("inf")
            row["rel_err"] = errs
            row["dead_rows_zero"] = bool(not got[0][dead].any() and not got[1][dead].any())
            row["ok"] = all(e <= TOL for e in errs.values()) and row["dead_rows_zero"]
        except Exception as e:   # noqa: BLE001 - a failing implementation is a result
            row.update(ok=False, error=f"{type(e).__name__}: {str(e).strip()[:300]}")
        rows.append(row)
    return rows


def part_correctness(args) -> int:
    shapes = TINY_SHAPES if args.tiny else REAL_SHAPES
    failed = False
    for shape in shapes:
        for row in check_shape(*shape, tiny=args.tiny):
            emit(row, args.jsonl)
            print(format_correctness(row), flush=True)
            failed |= not row["ok"]
    return 1 if failed else 0


def format_correctness(r: dict) -> str:
    head = f"{r['shape']:<16} {r['impl']:<26} vs {r['reference']:<15}"
    if r.get("error"):
        return f"{head} FAIL  {r['error']}"
    e = r["rel_err"]
    return (f"{head} {'ok  ' if r['ok'] else 'FAIL'}  rel err out {e['out']:.1e} dq {e['dq']:.1e} dk {e['dk']:.1e} "
            f"dv {e['dv']:.1e}; fully masked rows 0: {r['dead_rows_zero']}; {r['s']:.1f} s")


# ------------------------------------------------------------------------------------------------- driver

def emit(row: dict, path: str) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def part_command(part: str, args) -> list[str]:
    py = sys.executable
    if part == "correctness":
        cmd = [py, os.path.abspath(__file__), "--run-part", "correctness", "--jsonl", args.jsonl]
        return cmd + (["--tiny"] if args.tiny else [])
    if part == "infer":
        cmd = [py, os.path.join(BENCH, "gpu_infer.py"), "--quantize", "none", "--rounds", "1", "--profile",
               "--decode-tokens", "128", "--out", args.jsonl]
        return cmd + (["--tiny", "--step-cache", "none"] if args.tiny else [])
    if part == "train":
        cmd = [py, os.path.join(BENCH, "gpu_train.py"), "--attention", args.train_attention, "--tokens",
               args.train_tokens, "--steps", "3", "--profile", "--out", args.jsonl]
        return cmd + (["--tiny", "--in-process"] if args.tiny else [])
    raise ValueError(part)


def run_part(part: str, args, limit: float) -> dict:
    """Run one part as a child process group; kill the group at ``limit`` seconds."""
    cmd = part_command(part, args)
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=limit)
        status = "ok" if proc.returncode == 0 else f"exit status {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        status = f"timeout after {limit:.0f} s"
    row = dict(what="part", part=part, status=status, s=time.perf_counter() - t, limit_s=limit)
    emit(row, args.jsonl)
    sys.stdout.write(out)
    print(f"== part {part}: {status} ({row['s']:.0f} s of {limit:.0f})", flush=True)
    return row


def summary(rows: list[dict]) -> str:
    lines = ["", "| part | result |", "|---|---|"]
    for r in rows:
        w = r.get("what")
        if w == "part":
            lines.append(f"| {r['part']} | {r['status']} ({r['s']:.0f} s) |")
        elif w == "correctness":
            lines.append(f"| correctness {r['shape']} {r['impl']} | "
                         f"{'ok' if r['ok'] else 'FAIL'} {r.get('error') or ''} |")
        elif w == "t2i":
            lines.append(f"| t2i {r['size']} px {r['steps']} steps {r['step_cache']} | {r['s_per_image']:.2f} s/image, "
                         f"compile {r['compile_s']:.0f} s, peak {_gib(r.get('peak_bytes'))} |")
        elif w == "decode":
            lines.append(f"| decode ({r['tokens']} tokens, batch 1) | {r['tokens_per_s']:.1f} tokens/s, "
                         f"peak {_gib(r.get('peak_bytes'))} |")
        elif w == "train":
            res = r.get("error") or (f"{r['step_s']:.3f} s/step, {r['tokens_per_s']:,.0f} tokens/s, "
                                     f"MFU {100 * r['mfu']:.1f} %, peak {_gib(r.get('peak_bytes'))}")
            lines.append(f"| train {r['attention']} {r['tokens']} tokens | {res} |")
        elif w == "profile":
            top = r.get("top") or []
            first = f"{top[0]['share'] * 100:.0f} % {top[0]['op'][:60]}" if top else r.get("error", "")
            lines.append(f"| profile {r['of']} | top op: {first} |")
        elif "error" in r:
            lines.append(f"| {r.get('quantize', '?')} | {r['error'][:120]} |")
    return "\n".join(lines)


def git_commit():
    """The checkout's commit, or None (a copy of the tree without ``.git``, no git)."""
    try:
        out = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _gib(b) -> str:
    return f"{b / 2 ** 30:.1f} GiB" if b else "n/a"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts (default: all)")
    ap.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS", help="a part's time limit")
    ap.add_argument("--jsonl", default="gpu_check.jsonl", help="JSON lines file (appended)")
    ap.add_argument("--tiny", action="store_true", help="every part on CPU at tiny shapes")
    ap.add_argument("--train-attention", default="auto,pallas,cudnn", help="implementations of the train part")
    ap.add_argument("--train-tokens", default="8192", help="tokens per pack of the train part")
    ap.add_argument("--run-part", default=None, help=argparse.SUPPRESS)      # child mode
    args = ap.parse_args(argv)
    if args.run_part == "correctness":
        return part_correctness(args)
    limits = dict(TINY_LIMITS if args.tiny else LIMITS)
    for item in args.limit:
        part, _, sec = item.partition("=")
        limits[part] = float(sec)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)} (choose from {', '.join(PARTS)})")
    start = os.path.getsize(args.jsonl) if os.path.exists(args.jsonl) else 0
    print(f"gpu_check: jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}, "
          f"commit {git_commit()}, parts {parts}, limits {limits}", flush=True)
    emit(dict(what="environment", jax=jax.__version__, backend=jax.default_backend(),
              device=jax.devices()[0].device_kind, tiny=args.tiny, commit=git_commit(),
              date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())), args.jsonl)
    part_rows = {p: run_part(p, args, limits[p]) for p in parts}
    with open(args.jsonl) as f:
        f.seek(start)
        rows = [json.loads(line) for line in f if line.strip()]
    print(summary(rows), flush=True)
    if any(r.get("what") == "correctness" and not r["ok"] for r in rows):
        return 1
    if "correctness" in parts and part_rows["correctness"]["status"] != "ok":
        return 1                                  # crashed or ran out of time before every check passed
    if any(r["status"] != "ok" for r in part_rows.values()):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

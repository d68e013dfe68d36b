"""TaylorSeer step caching against plain sampling, measured in the same run: seconds per image (median of
``--rounds``, both compiled first), decoder passes, the image difference on uint8 (max / mean abs), and
the demo checker's colour / position accuracy on the held-out prompts of the synthetic world with and
without the cache.

    PYTHONPATH=. python bench/bench_taylorseer.py [--model-path DIR] [--steps 20 50] [--rounds 5]

Default model: the embedded demo model (its inference.json image size). The ratio printed is
plain time / cached time (> 1: caching is faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bagel_jax.demo import synthetic as syn  # noqa: E402
from bagel_jax.demo.checker import detect  # noqa: E402
from bagel_jax.demo.evaluate import demo_transforms, held_out_combinations  # noqa: E402
from bagel_jax.inference.api import InferenceOptions, folder_defaults, load  # noqa: E402


def _timed(pipe, prompts, size, steps, cache, rounds):
    kw = dict(image_size=(size, size), num_timesteps=steps, step_cache=cache, seed=0)
    out = pipe.generate_image(prompts, **kw)          # compile + first run
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        pipe.generate_image(prompts, **kw)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times) / len(prompts)


def _accuracy(arrays, combos):
    col = pos = 0
    for arr, (c, _, p) in zip(arrays, combos):
        d = detect(arr)
        col += d.colour == syn.COLOURS[c]
        pos += d.position == syn.POSITIONS[p]
    return col / len(combos), pos / len(combos)


def _passes(steps: int, first_enhance=5, fresh=3) -> int:
    """Decoder passes of a branch run on every step (the reference rule)."""
    n, skip = 0, 0
    for s in range(steps - 1):
        if s < first_enhance or skip == fresh - 1:
            n, skip = n + 1, 0
        else:
            skip += 1
    return n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None, help="model folder (default: the embedded demo model)")
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 50], help="num_timesteps values to measure")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per setting (median reported)")
    ap.add_argument("--batch", type=int, default=32, help="held-out prompts per call and accuracy set (default 32: all)")
    args = ap.parse_args(argv)
    path = args.model_path or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                           "bagel_jax", "assets", "demo")
    size = int(folder_defaults(path).get("image_size", (64, 64))[0])
    vae_tf, vit_tf = demo_transforms(size)
    pipe = load(path, dtype="float32", inference=InferenceOptions(vae_tf, vit_tf))
    combos = held_out_combinations()[: args.batch]
    prompts = [syn.phrase(o) for o in combos]
    load1 = os.getloadavg()[0]
    print(f"model {path}, {size}x{size}, {len(prompts)} held-out prompts per call, backend "
          f"{jax.default_backend()}, load1 at start {load1:.2f}")
    print(f"{'steps':>5} {'plain s/img':>11} {'cached s/img':>12} {'ratio':>6} {'passes':>9} {'max|d|':>6} "
          f"{'mean|d|':>7} {'colour plain/cached':>20} {'position plain/cached':>22}")
    for steps in args.steps:
        plain, tp = _timed(pipe, prompts, size, steps, "none", args.rounds)
        cached, tc = _timed(pipe, prompts, size, steps, "taylorseer", args.rounds)
        a = np.stack(plain.arrays).astype(np.int16)
        b = np.stack(cached.arrays).astype(np.int16)
        d = np.abs(a - b)
        (cp, pp), (cc, pc) = _accuracy(plain.arrays, combos), _accuracy(cached.arrays, combos)
        print(f"{steps:>5} {tp:>11.4f} {tc:>12.4f} {tp / tc:>6.2f} {_passes(steps):>4}/{steps - 1:<4} "
              f"{int(d.max()):>6} {float(d.mean()):>7.3f} {cp:>9.3f}/{cc:<10.3f} {pp:>10.3f}/{pc:<11.3f}")
    print(f"load1 at end {os.getloadavg()[0]:.2f} (passes: decoder passes of the conditional branch; the CFG "
          "branch runs the same rule on its own steps)")


if __name__ == "__main__":
    main()

"""Plot a training run's CE and MSE curves (``WORKDIR/metrics.jsonl``) to a PNG, with PIL only.

    python -m bagel_jax.demo.plot_curve RUN/metrics.jsonl OUT.png [--smooth 50]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from PIL import Image, ImageDraw

from ..train.metrics import read_metrics


def smooth(y: np.ndarray, k: int) -> np.ndarray:
    if k <= 1 or len(y) < k:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    out = (c[k:] - c[:-k]) / k
    return np.concatenate([np.full(k - 1, out[0]), out])


def plot(series: dict, steps: np.ndarray, path: str, w: int = 720, h: int = 360) -> None:
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    L, R, T, B = 60, 20, 20, 40
    ymax = max(float(np.max(v)) for v in series.values()) * 1.05
    x = lambda s: L + (s - steps[0]) / max(1, steps[-1] - steps[0]) * (w - L - R)
    y = lambda v: h - B - v / ymax * (h - T - B)
    d.rectangle([L, T, w - R, h - B], outline="black")
    for k in range(6):
        v = ymax * k / 5
        d.line([L - 4, y(v), L, y(v)], fill="black")
        d.text((5, y(v) - 6), f"{v:.2f}", fill="black")
    for k in range(6):
        s = steps[0] + (steps[-1] - steps[0]) * k / 5
        d.text((x(s) - 12, h - B + 6), f"{int(s)}", fill="black")
    colours = ["#1f77b4", "#d62728", "#2ca02c"]
    for (name, v), col in zip(series.items(), colours):
        pts = [(x(s), y(val)) for s, val in zip(steps, v)]
        d.line(pts, fill=col, width=2)
        d.text((w - R - 150, T + 8 + 14 * list(series).index(name)), name, fill=col)
    d.text((w // 2 - 20, h - 18), "step", fill="black")
    img.save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bagel_jax.demo.plot_curve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics", help="metrics.jsonl of a train.py run")
    ap.add_argument("out", help="output PNG")
    ap.add_argument("--smooth", type=int, default=50, help="moving-average window in steps")
    args = ap.parse_args(argv)
    rows = [r for r in read_metrics(args.metrics) if "loss_ce" in r]
    steps = np.array([r["step"] for r in rows], float)
    series = {f"CE (smoothed {args.smooth})": smooth(np.array([r["loss_ce"] for r in rows]), args.smooth),
              f"MSE (smoothed {args.smooth})": smooth(np.array([r["loss_mse"] for r in rows]), args.smooth)}
    plot(series, steps, args.out)
    print(f"wrote {args.out} ({len(rows)} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

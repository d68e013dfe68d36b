"""Teach the demo model a colour word it has never seen, with a LoRA (docs/lora.md#demo-a-new-colour-word).

``data``: the synthetic world's dataset (:func:`bagel_jax.demo.synthetic.write`) in which, in a share of the
text-to-image rows that show the colour (red by default), every caption says the new word (``scarlet``)
instead; the other rows and groups are the world as usual, so the run also replays what the model knows.
``eval``: the new word's generation accuracy (every shape at every position, "a scarlet circle on the left",
checked by the pixel checker: is the shape red, is it where asked) and, for the old skills, the held-out
evaluation of :mod:`bagel_jax.demo.evaluate` - of the demo model alone or with ``--lora ADAPTER``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import synthetic as syn
from .checker import detect
from .evaluate import demo_transforms, evaluate

DEMO_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "demo")


def write(out: str, word: str = "scarlet", colour: str = "red", num: int = 4000, seed: int = 1, size: int = 32,
          share: float = 0.5) -> dict:
    """The dataset (module doc); returns the summary of :func:`bagel_jax.demo.synthetic.write` plus the number
    of rows whose captions say ``word``."""
    summary = syn.write(out, num=num, seed=seed, size=size, edit_move_share=0.75)
    path = os.path.join(out, "t2i", "part-00000.parquet")
    table = pq.read_table(path)
    rng = np.random.default_rng(seed + 1000)
    rx = re.compile(rf"\b{re.escape(colour)}\b")
    caps, n = [], 0
    for c in table.column("captions").to_pylist():
        d = json.loads(c)
        if any(rx.search(v) for v in d.values()) and rng.random() < share:
            d = {k: rx.sub(word, v) for k, v in d.items()}
            n += 1
        caps.append(json.dumps(d))
    pq.write_table(pa.table({"image": table.column("image"), "captions": caps}), path, row_group_size=64)
    return dict(summary, word=word, colour=colour, rows_with_word=n)


def evaluate_word(pipe, word: str = "scarlet", colour: str = "red", size: int = 32, num_timesteps: int = 20,
                  seeds: tuple = (0, 1, 2)) -> dict:
    """Generation accuracy of "a WORD SHAPE at POSITION" over every shape and position, once per seed:
    ``word_colour`` (the shape is ``colour``), ``word_position``, ``word_colours`` (the detected colours,
    counted); and the same prompts with ``colour`` itself (``colour_colour``, ``colour_position``)."""
    objs = [(s, p) for s in range(len(syn.SHAPES)) for p in range(len(syn.POSITIONS))]
    res = {"num_prompts": len(objs) * len(seeds)}
    for name, w in (("word", word), ("colour", colour)):
        prompts = [f"a {w} {syn.SHAPES[s]} {syn.where(p)}" for s, p in objs]
        dets = []
        for seed in seeds:
            out = pipe.generate_image(prompts, image_size=(size, size), num_timesteps=num_timesteps, seed=seed)
            dets += [(detect(a), p) for a, (_, p) in zip(out.arrays, objs)]
        res[f"{name}_colour"] = sum(d.colour == colour for d, _ in dets) / len(dets)
        res[f"{name}_position"] = sum(d.position == syn.POSITIONS[p] for d, p in dets) / len(dets)
        res[f"{name}_colours"] = dict(collections.Counter(str(d.colour) for d, _ in dets).most_common())
    return res


def run_eval(model_path: Optional[str], lora: Optional[str], word: str, colour: str, size: int,
             num_timesteps: int) -> dict:
    from ..inference.api import InferenceOptions, load     # the inference stack, only for this subcommand

    vae_tf, vit_tf = demo_transforms(size)
    pipe = load(model_path or DEMO_MODEL, dtype="float32", inference=InferenceOptions(vae_tf, vit_tf), lora=lora)
    res = dict(model=model_path or DEMO_MODEL, lora=lora)
    res.update(evaluate_word(pipe, word, colour, size, num_timesteps))
    res.update({f"heldout_{k}": v for k, v in evaluate(pipe, size, num_timesteps).items()})
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bagel_jax.demo.new_word", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="write the dataset")
    d.add_argument("--out", required=True)
    d.add_argument("--num", type=int, default=4000, help="rows per group")
    d.add_argument("--seed", type=int, default=1)
    d.add_argument("--share", type=float, default=0.5, help="share of the colour's t2i rows that say the new word")
    e = sub.add_parser("eval", help="new-word and held-out accuracies")
    e.add_argument("--model-path", default=None, help="model folder (default: the embedded demo model)")
    e.add_argument("--lora", default=None, help="adapter folder applied unmerged")
    e.add_argument("--num-timesteps", type=int, default=20)
    e.add_argument("--json", default=None, help="also write the results here")
    for p in (d, e):
        p.add_argument("--word", default="scarlet")
        p.add_argument("--colour", default="red", choices=syn.COLOURS)
        p.add_argument("--size", type=int, default=32)
    a = ap.parse_args(argv)
    if a.cmd == "data":
        res = write(a.out, a.word, a.colour, a.num, a.seed, a.size, a.share)
    else:
        res = run_eval(a.model_path, a.lora, a.word, a.colour, a.size, a.num_timesteps)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

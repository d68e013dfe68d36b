"""Synthetic multimodal data in the official BAGEL formats: coloured shapes on backgrounds.

``python -m bagel_jax.demo.synthetic --out DIR --num N --seed S`` writes::

    DIR/t2i/part-00000.parquet        text-to-image: columns image (PNG bytes), captions (JSON dict)
    DIR/edit/part-00000.parquet       editing: image_list (PNG bytes list), instruction_list (list of lists)
    DIR/edit/parquet_info.json        {parquet path (relative to edit/): {"num_row_groups": n}} (official edit index)
    DIR/vlm/train.jsonl + images/     VLM SFT: {"image": file, "conversations": [{from, value}, ...]}
    DIR/eval/t2i.parquet              held-out (colour, shape, position) combinations (same format)
    DIR/eval/prompts.jsonl            {"prompt", "colour", "shape", "position"} per held-out combination
    DIR/tokenizer/                    a tiny Qwen2-format byte-level BPE over all texts
    DIR/dataset.yaml                  the dataset groups (t2i_pretrain, unified_edit, vlm_sft)
    DIR/interleave/train.jsonl + images/, DIR/eval/interleave.jsonl   with --interleave N: the
                                      ``interleaved`` group (:mod:`bagel_jax.demo.interleave_data`)

Every picture shows one to three shapes ({circle, square, triangle, star}) in distinct colours at
distinct positions ({left, right, top, bottom, center}) on a plain background. A (colour, shape,
position) with 0-based indexes ``(colour + 2*shape + 3*position) % 5 == 0`` never appears in a
training image; those combinations go to the eval split only.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from . import interleave_data
from .tokenizer_build import build_tokenizer
# the world's vocabulary, re-exported: the demo tools, tests and benchmarks read it as synthetic.X
from .world import (BACKGROUNDS, CENTRES, COLOURS, NUMBERS, POSITIONS, RGB, SHAPES, Obj, captions, edit_step,
                    held_out, join, phrase, png, render, sample_objs, vit_side, vqa, where)

__all__ = ["BACKGROUNDS", "CENTRES", "COLOURS", "NUMBERS", "POSITIONS", "RGB", "SHAPES", "Obj", "captions", "edit_step",
           "held_out", "join", "phrase", "png", "render", "sample_objs", "vit_side", "vqa", "where", "all_texts", "write",
           "main"]


def all_texts(rng: np.random.Generator, n: int = 3000) -> list[str]:
    """Texts covering the whole vocabulary of the generator (for the tokenizer)."""
    out = []
    for _ in range(n):
        objs = sample_objs(rng, allow_held_out=True)
        out += list(captions(objs, rng).values())
        out += list(vqa(objs, rng))
        _, instr = edit_step(objs, rng)
        out += instr
    out += [f"what colour is the {s}?" for s in SHAPES] + [f"where is the {s}?" for s in SHAPES]
    return out


def write(out: str, num: int = 256, seed: int = 0, size: int = 64, vocab_size: int = 560,
          bad: int = 0, edit_move_share: float = 0.5, interleave: int = 0) -> dict:
    """Write the dataset (``num`` rows per training split); ``bad`` extra rows with unreadable images are
    appended to each split (for tests of the bad-sample path); ``edit_move_share``: the share of moves
    among the edit steps (the rest recolour); ``interleave``: rows of the interleaved group (0: none; its
    own random stream, so the other splits and the tokenizer do not depend on it). Returns a summary dict."""
    if not 0.0 <= edit_move_share <= 1.0:
        raise ValueError(f"edit_move_share must be in [0, 1], got {edit_move_share}")

    rng = np.random.default_rng(seed)
    for d in ("t2i", "edit", "vlm/images", "eval"):
        os.makedirs(os.path.join(out, d), exist_ok=True)
    bg = lambda: int(rng.integers(0, len(BACKGROUNDS)))

    # text-to-image
    imgs, caps = [], []
    for _ in range(num):
        objs = sample_objs(rng)
        imgs.append(png(render(objs, bg(), size)))
        caps.append(json.dumps(captions(objs, rng)))
    for _ in range(bad):
        imgs.append(b"not an image")
        caps.append(json.dumps({"short": "a broken image"}))
    t2i_path = os.path.join(out, "t2i", "part-00000.parquet")
    pq.write_table(pa.table({"image": pa.array(imgs, pa.binary()), "captions": caps}), t2i_path, row_group_size=64)

    # editing: chains of 2-3 images
    ilists, instrs = [], []
    for _ in range(num):
        objs = sample_objs(rng, n=int(rng.integers(1, 3)))
        b = bg()
        chain, steps = [objs], []
        for _ in range(int(rng.integers(1, 3))):
            objs, ins = edit_step(objs, rng, edit_move_share)
            chain.append(objs)
            steps.append(ins)
        ilists.append([png(render(o, b, size)) for o in chain])
        instrs.append(steps)
    for _ in range(bad):
        ilists.append([b"broken", b"broken"])
        instrs.append([["make it broken"]])
    edit_path = os.path.join(out, "edit", "part-00000.parquet")
    pq.write_table(pa.table({"image_list": pa.array(ilists, pa.list_(pa.binary())),
                             "instruction_list": pa.array(instrs, pa.list_(pa.list_(pa.string())))}),
                   edit_path, row_group_size=64)
    with open(os.path.join(out, "edit", "parquet_info.json"), "w") as f:
        json.dump({"part-00000.parquet": {"num_row_groups": pq.ParquetFile(edit_path).num_row_groups}}, f)

    # VLM SFT jsonl
    with open(os.path.join(out, "vlm", "train.jsonl"), "w") as f:
        for i in range(num):
            objs = sample_objs(rng)
            name = f"images/{i:06d}.png"
            render(objs, bg(), size).save(os.path.join(out, "vlm", name))
            conv = []
            for t in range(int(rng.integers(1, 3))):
                q, a = vqa(objs, rng)
                conv += [dict(**{"from": "human", "value": ("<image>\n" if t == 0 else "") + q}),
                         dict(**{"from": "gpt", "value": a})]
            f.write(json.dumps({"image": name, "conversations": conv}) + "\n")
        for i in range(bad):
            name = f"images/bad{i:04d}.png"
            with open(os.path.join(out, "vlm", name), "wb") as g:
                g.write(b"broken")
            f.write(json.dumps({"image": name, "conversations": [{"from": "human", "value": "<image>\nwhat?"},
                                                                 {"from": "gpt", "value": "broken"}]}) + "\n")

    # held-out evaluation split: every held-out combination, alone on each background
    ev_imgs, ev_caps, prompts = [], [], []
    for c in range(len(COLOURS)):
        for s in range(len(SHAPES)):
            for p in range(len(POSITIONS)):
                if held_out(c, s, p):
                    o = (c, s, p)
                    ev_imgs.append(png(render([o], bg(), size)))
                    ev_caps.append(json.dumps(captions([o], rng)))
                    prompts.append(dict(prompt=phrase(o), colour=COLOURS[c], shape=SHAPES[s], position=POSITIONS[p]))
    pq.write_table(pa.table({"image": pa.array(ev_imgs, pa.binary()), "captions": ev_caps}),
                   os.path.join(out, "eval", "t2i.parquet"))
    with open(os.path.join(out, "eval", "prompts.jsonl"), "w") as f:
        for p in prompts:
            f.write(json.dumps(p) + "\n")

    build_tokenizer(all_texts(np.random.default_rng(seed + 1)), os.path.join(out, "tokenizer"), vocab_size)
    groups = {
        "t2i_pretrain": dict(data_dir="t2i", weight=1.0, is_mandatory=False,
                             image_transform_args=dict(max_image_size=size, min_image_size=size, image_stride=16)),
        "unified_edit": dict(data_dir="edit", parquet_info_path="edit/parquet_info.json", weight=1.0,
                             is_mandatory=False,
                             image_transform_args=dict(max_image_size=size, min_image_size=size, image_stride=16),
                             vit_image_transform_args=dict(max_image_size=vit_side(size),
                                                           min_image_size=vit_side(size), image_stride=14)),
        "vlm_sft": dict(data_dir="vlm", jsonl_path="vlm/train.jsonl", weight=1.0, is_mandatory=False,
                        image_transform_args=dict(max_image_size=vit_side(size), min_image_size=vit_side(size),
                                                  image_stride=14)),
    }
    extra = {}
    if interleave > 0:
        extra = interleave_data.write(out, interleave, seed, size)
        groups["interleaved"] = interleave_data.group(size)
    with open(os.path.join(out, "dataset.yaml"), "w") as f:
        yaml.safe_dump(groups, f, sort_keys=False)
    summary = dict(out=out, t2i=num + bad, edit=num + bad, vlm=num + bad, eval=len(prompts), seed=seed, size=size,
                   edit_move_share=edit_move_share, **extra)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Write a synthetic coloured-shapes dataset in the official BAGEL "
                                             "formats (T2I parquet, edit parquet, VLM jsonl) plus a tiny tokenizer.")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--num", type=int, default=256, help="rows per training split (t2i, edit, vlm)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (same seed -> same files)")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--vocab-size", type=int, default=560,
                    help="tokenizer vocabulary incl. special tokens (<= the model's vocab_size)")
    ap.add_argument("--bad", type=int, default=0, help="append this many rows with unreadable images per split")
    ap.add_argument("--edit-move-share", type=float, default=0.5,
                    help="share of moves among the edit steps, the rest recolour (0..1)")
    ap.add_argument("--interleave", type=int, default=0,
                    help="rows of the interleaved group (the text decides whether an image follows; 0 = none)")
    a = ap.parse_args(argv)
    print(json.dumps(write(a.out, a.num, a.seed, a.size, a.vocab_size, a.bad, a.edit_move_share, a.interleave)))


if __name__ == "__main__":
    main()

"""Evaluate a model of the synthetic shapes world on the held-out (colour, shape, position) combinations.

    python -m bagel_jax.demo.evaluate [--model-path DIR] [--size PX] [--num-timesteps 20] [--limit N] [--json OUT]

* generation: "a {colour} {shape} on the {position}" for every held-out combination; the generated
  image is read by the pixel checker (:mod:`bagel_jax.demo.checker`): colour and position accuracy;
* VQA: a rendered image of each held-out combination, asked "what colour is the {shape}?",
  "where is the {shape}?" and "how many shapes are there?"; exact-match accuracy;
* editing: a training-distribution image edited into each held-out combination ("make the {shape}
  {colour}" / "move the {shape} to the {position}"); correct when the checker reads the target
  colour and position.

Besides the totals, the result has ``vqa_colour`` / ``vqa_where`` / ``vqa_count`` (per question type) and
``edit_recolour`` / ``edit_move`` (per edit type).

``--interleave`` evaluates model-driven interleaving instead (:func:`evaluate_interleave`): the held-out
requests of :func:`bagel_jax.demo.interleave_data.eval_cases` ("Draw ..." vs "Describe ... in words.")
through ``interleave(mode="model")``: precision and recall of "starts an image" against the request, the
checker's colour / position accuracy of the first image drawn for a drawing request, and exact words answers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

import numpy as np
from PIL import Image

from ..images import ImageTransform
from ..inference.api import InferenceOptions, folder_defaults, load
from . import synthetic as syn
from .checker import detect
from .interleave_data import eval_cases


def held_out_combinations() -> list[tuple[int, int, int]]:
    return [(c, s, p) for c in range(len(syn.COLOURS)) for s in range(len(syn.SHAPES))
            for p in range(len(syn.POSITIONS)) if syn.held_out(c, s, p)]


def demo_transforms(size: int) -> tuple[ImageTransform, ImageTransform]:
    """VAE and ViT transforms of the demo world (images are ``size`` pixels square)."""
    return ImageTransform(size, size, 16), ImageTransform(syn.vit_side(size), syn.vit_side(size), 14)


def _norm(s: str) -> str:
    return " ".join(s.strip().lower().replace(".", "").split())


def evaluate(pipe, size: int = 32, num_timesteps: int = 20, seed: int = 0, limit: Optional[int] = None,
             batch: int = 16, save_dir: Optional[str] = None, gen_kw: Optional[dict] = None,
             edit_kw: Optional[dict] = None, generation_only: bool = False) -> dict:
    """Accuracies on the held-out combinations (see the module doc). ``gen_kw`` / ``edit_kw``: extra sampling
    arguments of ``generate_image`` / ``edit_image`` (default: the official defaults). ``generation_s_per_image``:
    wall seconds per generated image over the batches after the first (which compiles), None with one batch."""
    gen_kw, edit_kw = dict(gen_kw or {}), dict(edit_kw or {})
    combos = held_out_combinations()[:limit]
    res: dict = {"num_combinations": len(combos)}

    def batches(items):
        for i in range(0, len(items), batch):
            yield items[i:i + batch]

    # -- generation
    gen_c = gen_p = 0
    warm_s, warm_n = 0.0, 0
    for j, chunk in enumerate(batches(list(enumerate(combos)))):
        prompts = [syn.phrase(o) for _, o in chunk]
        t0 = time.perf_counter()
        out = pipe.generate_image(prompts, image_size=(size, size), num_timesteps=num_timesteps, seed=seed, **gen_kw)
        if j:
            warm_s, warm_n = warm_s + time.perf_counter() - t0, warm_n + len(chunk)
        for (i, (c, s, p)), arr in zip(chunk, out.arrays):
            d = detect(arr)
            gen_c += d.colour == syn.COLOURS[c]
            gen_p += d.position == syn.POSITIONS[p]
            if save_dir:
                Image.fromarray(arr).save(os.path.join(save_dir, f"gen_{i:03d}.png"))
    res["generation_colour"] = gen_c / len(combos)
    res["generation_position"] = gen_p / len(combos)
    res["generation_s_per_image"] = warm_s / warm_n if warm_n else None
    if generation_only:
        return res

    # -- VQA
    items = []
    for k, (c, s, p) in enumerate(combos):
        img = np.asarray(syn.render([(c, s, p)], k % len(syn.BACKGROUNDS), size))
        items += [(img, f"what colour is the {syn.SHAPES[s]}?", syn.COLOURS[c], "colour"),
                  (img, f"where is the {syn.SHAPES[s]}?", syn.where(p), "where"),
                  (img, "how many shapes are there?", syn.NUMBERS[1], "count")]
    by_kind = {"colour": 0, "where": 0, "count": 0}
    for chunk in batches(items):
        answers = pipe.understand([[it[0]] for it in chunk], [it[1] for it in chunk], max_new_tokens=12)
        for a, (_, _, want, kind) in zip(answers, chunk):
            by_kind[kind] += _norm(a) == _norm(want)
    res["vqa"] = sum(by_kind.values()) / len(items)
    for kind, n in by_kind.items():
        res[f"vqa_{kind}"] = n / len(combos)

    # -- editing into held-out combinations
    rng = np.random.default_rng(seed)
    edits = []
    for k, (c, s, p) in enumerate(combos):
        srcs = [cc for cc in range(len(syn.COLOURS)) if cc != c and not syn.held_out(cc, s, p)]
        src = (int(rng.choice(srcs)), s, p)
        edits.append((src, f"make the {syn.SHAPES[s]} {syn.COLOURS[c]}", (c, s, p), k, "recolour"))
        srcs = [pp for pp in range(len(syn.POSITIONS)) if pp != p and not syn.held_out(c, s, pp)]
        if srcs:
            src = (c, s, int(rng.choice(srcs)))
            to = "the center" if syn.POSITIONS[p] == "center" else f"the {syn.POSITIONS[p]}"
            edits.append((src, f"move the {syn.SHAPES[s]} to {to}", (c, s, p), k, "move"))
    ok = {"recolour": 0, "move": 0}
    for chunk in batches(edits):
        imgs = [np.asarray(syn.render([e[0]], e[3] % len(syn.BACKGROUNDS), size)) for e in chunk]
        out = pipe.edit_image(imgs, [e[1] for e in chunk], num_timesteps=num_timesteps, seed=seed, **edit_kw)
        for (_, _, (c, s, p), _, kind), arr in zip(chunk, out.arrays):
            d = detect(arr)
            ok[kind] += d.colour == syn.COLOURS[c] and d.position == syn.POSITIONS[p]
    res["edit"] = sum(ok.values()) / len(edits)
    res["num_edits"] = len(edits)
    for kind, n in ok.items():
        total = sum(e[4] == kind for e in edits)
        res[f"edit_{kind}"] = n / total if total else None   # (--limit may leave no move edit)
    return res


def evaluate_interleave(pipe, size: int = 32, num_timesteps: int = 20, seed: int = 0,
                        limit: Optional[int] = None, max_text_length: int = 48) -> dict:
    """Model-mode interleaving on the held-out requests (see the module doc); ``limit``: the first N cases
    (alternately drawing and words requests). ``cases`` lists per case what happened."""
    cases = eval_cases()[:limit]
    tp = fp = fn = col = pos = exact = 0
    rows = []
    for case in cases:
        out = pipe.interleave(case["prompt"], mode="model", image_size=(size, size), num_timesteps=num_timesteps,
                              seed=seed, max_text_length=max_text_length, max_interleaved_blocks=4)
        if not out.ok:
            raise RuntimeError(f"interleave failed on {case['prompt']!r}: {out.error}")
        drew = bool(out.images)
        row = dict(prompt=case["prompt"], draws=case["draws"], drew=drew, texts=out.texts)
        tp += drew and case["draws"]
        fp += drew and not case["draws"]
        fn += case["draws"] and not drew
        if drew and case["draws"]:
            d = detect(np.asarray(out.images[0].convert("RGB")))
            row.update(colour=d.colour, position=d.position)
            col += d.colour == case["colour"]
            pos += d.position == case["position"]
        if not case["draws"]:
            exact += bool(out.texts) and _norm(out.texts[0]) == _norm(case["answer"])
        rows.append(row)
    n_draw = sum(c["draws"] for c in cases)
    return dict(num_cases=len(cases), num_draw_requests=n_draw,
                starts_image_precision=tp / max(tp + fp, 1), starts_image_recall=tp / max(n_draw, 1),
                starts_image_false=fp, drawn_colour=col / max(tp, 1), drawn_position=pos / max(tp, 1),
                words_exact=exact / max(len(cases) - n_draw, 1), cases=rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bagel_jax.demo.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None, help="model folder (default: the embedded demo model)")
    ap.add_argument("--size", type=int, default=None,
                    help="image side of the synthetic world (default: the model folder's inference.json image size)")
    ap.add_argument("--num-timesteps", type=int, default=20, help="flow steps for generation and editing")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N held-out combinations")
    ap.add_argument("--batch", type=int, default=16, help="prompts per compiled call")
    ap.add_argument("--cfg-text-scale", type=float, default=None,
                    help="text CFG scale for generation and editing (default: official 4.0)")
    ap.add_argument("--cfg-img-scale", type=float, default=None, help="image CFG scale for editing (default: official 2.0)")
    ap.add_argument("--timestep-shift", type=float, default=None, help="flow schedule shift (default: official 3.0)")
    ap.add_argument("--image-mode", default=None, choices=("whole", "patch_ar"),
                    help="generation image mode (default whole; patch_ar for a model trained in that mode)")
    ap.add_argument("--patch-group", type=int, default=None, help="latent patches per step with --image-mode patch_ar")
    ap.add_argument("--generation-only", action="store_true", help="skip VQA and editing")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--save-images", default=None, help="write the generated images to this folder")
    ap.add_argument("--interleave", action="store_true",
                    help="evaluate model-driven interleaving (draw or answer in words) instead")
    args = ap.parse_args(argv)
    path = args.model_path
    if path is None:
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "demo")
    if not os.path.isdir(path):
        print(f"error: model folder not found: {path}", file=sys.stderr)
        return 2
    if args.size is None:
        args.size = int(folder_defaults(path).get("image_size", (64, 64))[0])
    vae_tf, vit_tf = demo_transforms(args.size)
    pipe = load(path, dtype="float32", inference=InferenceOptions(vae_tf, vit_tf))
    if args.save_images:
        os.makedirs(args.save_images, exist_ok=True)
    gen_kw = {k: v for k, v in (("cfg_text_scale", args.cfg_text_scale), ("timestep_shift", args.timestep_shift))
              if v is not None}
    edit_kw = dict(gen_kw, **({"cfg_img_scale": args.cfg_img_scale} if args.cfg_img_scale is not None else {}))
    if args.interleave:
        res = evaluate_interleave(pipe, args.size, args.num_timesteps, args.seed, args.limit)
    else:
        res = evaluate(pipe, args.size, args.num_timesteps, args.seed, args.limit, args.batch, args.save_images,
                       dict(gen_kw, **{k: v for k, v in (("image_mode", args.image_mode),
                                                         ("patch_group", args.patch_group)) if v is not None}),
                       edit_kw, args.generation_only)
    for k, v in res.items():
        if k == "cases":
            continue
        print(f"{k:<22} {v:.3f}" if isinstance(v, float) else f"{k:<22} {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

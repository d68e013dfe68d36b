"""Interleaved data of the synthetic shapes world in which the text decides whether an image follows.

Written by ``python -m bagel_jax.demo.synthetic --interleave N`` into ``DIR/interleave/`` as the
``interleaved`` group (:class:`bagel_jax.data.datasets.InterleavedDataset`, the official sequence-plan
fields, docs/architecture.md#training-packing). Three kinds of rows:

* **draw**: a request ("Draw ...", "Show ...", ...) -> the reply (a caption of the picture) with
  ``special_token_loss`` and label ``<|vision_start|>`` -> the picture (a noised target, then its clean
  VAE + ViT copy, as the model sees it after generating it) -> an empty closing text whose ``<|im_end|>``
  position learns ``<|im_end|>`` (nothing more follows);
* **words**: a request to describe in words or a question ("What colour is ...?") -> the answer with
  label ``<|im_end|>`` at its ``<|im_end|>`` position (no image);
* **story**: "Draw ..., then <edit>[, then <edit>]." -> caption + picture, then each edit instruction +
  the edited picture, each text labelled ``<|vision_start|>``, closed like **draw**.

So the model learns, at the ``<|im_end|>`` closing each of its texts, to emit ``<|vision_start|>`` (draw)
or ``<|im_end|>`` (stop). Held-out (colour, shape, position) combinations never appear in training rows;
``DIR/eval/interleave.jsonl`` holds one drawing request and one words request per held-out combination
(alternating, so the first 8 cases are 4 of each).
"""

from __future__ import annotations

import json
import os

import numpy as np

from . import world as S

DRAW = ("Draw {p}.", "Show {p}.", "Show me {p}.", "Please draw {p}.", "Make a picture of {p}.")
WORDS = ("Describe {p} in words.", "Tell me in words about {p}.", "Say in words what {p} looks like.")
QUESTIONS = ("What colour is {p}?", "Where is {p}?", "What shape is {p}?")
VS, END = "<|vision_start|>", "<|im_end|>"


def _text(text: str, loss: bool, label: str | None = None) -> dict:
    e = {"type": "text", "text": text, "loss": int(loss), "enable_cfg": 0}
    if label is not None:
        e.update(special_token_loss=1, special_token_label=label)
    return e


def _picture(name: str) -> list[dict]:
    """A generated picture: the noised target, then the clean VAE + ViT copy the model conditions on next."""
    return [{"type": "vae_image", "image": name, "loss": 1, "enable_cfg": 0},
            {"type": "vae_image", "image": name, "loss": 0, "enable_cfg": 1},
            {"type": "vit_image", "image": name, "enable_cfg": 1}]


def describe(objs) -> str:
    """The words answer to a describe request."""
    return S.join([f"a {S.SHAPES[s]} in {S.COLOURS[c]}, {S.where(p)}" for c, s, p in objs])


def answer(template: int, objs) -> str:
    c, s, p = objs[0]
    return (S.COLOURS[c], S.where(p), S.SHAPES[s])[template]


def words_request(objs, rng: np.random.Generator) -> tuple[str, str]:
    """(request, answer) of a words row: a describe request, or (one shape) a question."""
    p = S.join([S.phrase(o) for o in objs])
    if len(objs) == 1 and rng.random() < 0.4:
        k = int(rng.integers(0, len(QUESTIONS)))
        return QUESTIONS[k].format(p=p), answer(k, objs)
    return WORDS[int(rng.integers(0, len(WORDS)))].format(p=p), describe(objs)


def draw_request(objs, rng: np.random.Generator) -> str:
    return DRAW[int(rng.integers(0, len(DRAW)))].format(p=S.join([S.phrase(o) for o in objs]))


def row(kind: str, rng: np.random.Generator, save, size: int) -> dict:
    """One training row of ``kind`` (draw / words / story); ``save(img) -> name`` stores a picture."""
    objs = S.sample_objs(rng, n=1 if rng.random() < 0.7 else 2)
    if kind == "words":
        req, ans = words_request(objs, rng)
        return {"kind": kind, "sequence": [_text(req, False), _text(ans, True, END)]}
    bg = int(rng.integers(0, len(S.BACKGROUNDS)))
    caps = list(S.captions(objs, rng).values())
    req = draw_request(objs, rng)
    seq = [None, _text(caps[int(rng.integers(0, len(caps)))], True, VS), *_picture(save(S.render(objs, bg, size)))]
    steps = []
    if kind == "story":
        for _ in range(int(rng.integers(1, 3))):
            objs, instr = S.edit_step(objs, rng)
            steps.append(instr[int(rng.integers(0, len(instr)))])
            seq += [_text(steps[-1], True, VS), *_picture(save(S.render(objs, bg, size)))]
    seq[0] = _text(req[:-1] + "".join(f", then {st}" for st in steps) + ".", False)
    seq.append(_text("", True, END))
    return {"kind": kind, "sequence": seq}


def write(out: str, num: int, seed: int, size: int) -> dict:
    """Write ``num`` training rows (40 % draw, 40 % words, 20 % story) and the held-out eval requests."""
    rng = np.random.default_rng((seed, 15))
    d = os.path.join(out, "interleave")
    os.makedirs(os.path.join(d, "images"), exist_ok=True)
    counter = [0]

    def save(img) -> str:
        name = f"images/{counter[0]:06d}.png"
        img.save(os.path.join(d, name))
        counter[0] += 1
        return name

    kinds = {"draw": 0, "words": 0, "story": 0}
    with open(os.path.join(d, "train.jsonl"), "w") as f:
        for _ in range(num):
            kind = str(rng.choice(["draw", "words", "story"], p=[0.4, 0.4, 0.2]))
            kinds[kind] += 1
            f.write(json.dumps(row(kind, rng, save, size)) + "\n")
    cases = eval_cases()
    os.makedirs(os.path.join(out, "eval"), exist_ok=True)
    with open(os.path.join(out, "eval", "interleave.jsonl"), "w") as f:
        for c in cases:
            f.write(json.dumps(c) + "\n")
    return dict(interleave=num, interleave_kinds=kinds, interleave_images=counter[0], interleave_eval=len(cases))


def eval_cases() -> list[dict]:
    """One drawing request and one words request (describe or question) per held-out combination,
    alternating: ``{prompt, draws, colour, shape, position, answer}`` (``answer``: the words reply)."""
    cases = []
    held = [o for o in np.ndindex(len(S.COLOURS), len(S.SHAPES), len(S.POSITIONS)) if S.held_out(*o)]
    for k, o in enumerate(held):
        ph = S.phrase(o)
        base = dict(colour=S.COLOURS[o[0]], shape=S.SHAPES[o[1]], position=S.POSITIONS[o[2]])
        cases.append(dict(prompt=DRAW[k % len(DRAW)].format(p=ph), draws=True, answer=None, **base))
        j = k % (len(WORDS) + len(QUESTIONS))
        words = (WORDS + QUESTIONS)[j].format(p=ph)
        ans = describe([o]) if j < len(WORDS) else answer(j - len(WORDS), [o])
        cases.append(dict(prompt=words, draws=False, answer=ans, **base))
    return cases


def group(size: int) -> dict:
    """The ``interleaved`` group entry of ``dataset.yaml``."""
    return dict(data_dir="interleave", jsonl_path="interleave/train.jsonl", weight=1.0, is_mandatory=False,
                image_transform_args=dict(max_image_size=size, min_image_size=size, image_stride=16),
                vit_image_transform_args=dict(max_image_size=S.vit_side(size), min_image_size=S.vit_side(size),
                                              image_stride=14))

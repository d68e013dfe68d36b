"""The synthetic shapes world of the demo models: its vocabulary (shapes, colours, positions, backgrounds), the
held-out (colour, shape, position) rule, rendering, captions, questions and edit steps. The dataset writers
(:mod:`bagel_jax.demo.synthetic`, :mod:`bagel_jax.demo.interleave_data`) and the checker build on it."""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
POSITIONS = ("left", "right", "top", "bottom", "center")
RGB = dict(red=(220, 30, 30), green=(30, 170, 40), blue=(30, 60, 220), yellow=(240, 220, 30),
           purple=(140, 40, 170), orange=(250, 140, 20), white=(250, 250, 250), black=(10, 10, 10))
BACKGROUNDS = ((128, 128, 128), (180, 170, 150), (90, 110, 130), (160, 190, 170))
NUMBERS = ("zero", "one", "two", "three", "four")
# Layout: the centre of each position as a fraction of the image side (x, y).
CENTRES = dict(left=(0.2, 0.5), right=(0.8, 0.5), top=(0.5, 0.2), bottom=(0.5, 0.8), center=(0.5, 0.5))

Obj = tuple[int, int, int]  # (colour, shape, position) indexes


def held_out(c: int, s: int, p: int) -> bool:
    """True for the (colour, shape, position) combinations excluded from training."""
    return (c + 2 * s + 3 * p) % 5 == 0


def vit_side(size: int) -> int:
    """ViT input side for ``size``-pixel images: a multiple of the 14-pixel patch with at least 3x3
    patches (small images are scaled up, so that left / center / right fall in distinct patch columns)."""
    return max(42, size - size % 14)


def where(p: int) -> str:
    return "in the center" if POSITIONS[p] == "center" else f"on the {POSITIONS[p]}"


def phrase(o: Obj) -> str:
    c, s, p = o
    return f"a {COLOURS[c]} {SHAPES[s]} {where(p)}"


def render(objs: Sequence[Obj], bg: int, size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUNDS[bg])
    d = ImageDraw.Draw(img)
    r = size * 0.14
    for c, s, p in objs:
        cx, cy = (v * size for v in CENTRES[POSITIONS[p]])
        fill = RGB[COLOURS[c]]
        if SHAPES[s] == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif SHAPES[s] == "square":
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif SHAPES[s] == "triangle":
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:
            pts = []
            for k in range(10):
                rad = r if k % 2 == 0 else r * 0.45
                a = -np.pi / 2 + k * np.pi / 5
                pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
            d.polygon(pts, fill=fill)
    return img


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def join(parts: Sequence[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def captions(objs: Sequence[Obj], rng: np.random.Generator) -> dict[str, str]:
    """Several phrasings; every one contains "a {colour} {shape} on the {position}" for each shape."""
    ps = [phrase(o) for o in objs]
    n = len(objs)
    noun = "shape" if n == 1 else "shapes"
    return {
        "short": join(ps),
        "simple": f"an image of {join(ps)}",
        "detailed": f"a picture with {NUMBERS[n]} {noun}: {join(ps)}, on a plain background",
        "plain": f"there is {join(ps)}",
    }


def sample_objs(rng: np.random.Generator, allow_held_out: bool = False, n: int | None = None) -> list[Obj]:
    n = int(rng.integers(1, 4)) if n is None else n
    while True:
        shapes = rng.choice(len(SHAPES), n, replace=False)
        colours = rng.choice(len(COLOURS), n, replace=False)
        pos = rng.choice(len(POSITIONS), n, replace=False)
        objs = [(int(c), int(s), int(p)) for c, s, p in zip(colours, shapes, pos)]
        if allow_held_out or not any(held_out(*o) for o in objs):
            return objs


def vqa(objs: Sequence[Obj], rng: np.random.Generator) -> tuple[str, str]:
    kind = int(rng.integers(0, 3))
    o = objs[int(rng.integers(0, len(objs)))]
    if kind == 0:
        return f"what colour is the {SHAPES[o[1]]}?", COLOURS[o[0]]
    if kind == 1:
        return f"where is the {SHAPES[o[1]]}?", where(o[2])
    return "how many shapes are there?", NUMBERS[len(objs)]


def edit_step(objs: list[Obj], rng: np.random.Generator, move_share: float = 0.5) -> tuple[list[Obj], list[str]]:
    """One edit (recolour or move one shape) keeping every shape out of the held-out set; a move with
    probability ``move_share`` (when some position is free)."""
    for _ in range(100):
        i = int(rng.integers(0, len(objs)))
        c, s, p = objs[i]
        if rng.random() < 1.0 - move_share:
            free = [k for k in range(len(COLOURS)) if k not in [o[0] for o in objs]]
            new = (int(rng.choice(free)), s, p)
            instr = [f"make the {SHAPES[s]} {COLOURS[new[0]]}", f"change the colour of the {SHAPES[s]} to {COLOURS[new[0]]}",
                     f"turn the {SHAPES[s]} {COLOURS[new[0]]}"]
        else:
            free = [k for k in range(len(POSITIONS)) if k not in [o[2] for o in objs]]
            if not free:
                continue
            new = (c, s, int(rng.choice(free)))
            pos = "the center" if POSITIONS[new[2]] == "center" else f"the {POSITIONS[new[2]]}"
            instr = [f"move the {SHAPES[s]} to {pos}", f"put the {SHAPES[s]} {where(new[2])}"]
        if not held_out(*new):
            out = list(objs)
            out[i] = new
            return out, instr
    raise RuntimeError("could not find an edit")  # pragma: no cover

"""The demo checker is itself tested on ground-truth renders of the synthetic world."""

import itertools

import numpy as np
import pytest

from bagel_jax.demo import synthetic as syn
from bagel_jax.demo.checker import detect


@pytest.mark.parametrize("size", [64, 32])
def test_checker_reads_single_shapes_exactly(size):
    total = colour_ok = pos_ok = shape_ok = 0
    for c, s, p in itertools.product(range(len(syn.COLOURS)), range(len(syn.SHAPES)), range(len(syn.POSITIONS))):
        for bg in range(len(syn.BACKGROUNDS)):
            d = detect(np.asarray(syn.render([(c, s, p)], bg, size)))
            total += 1
            colour_ok += d.colour == syn.COLOURS[c]
            pos_ok += d.position == syn.POSITIONS[p]
            shape_ok += d.shape == syn.SHAPES[s]
    assert colour_ok == total and pos_ok == total
    assert shape_ok >= 0.9 * total, shape_ok / total


def test_checker_finds_nothing_on_an_empty_or_noisy_background():
    blank = np.full((64, 64, 3), 128, np.uint8)
    assert detect(blank).colour is None
    noisy = np.clip(blank + np.random.default_rng(0).normal(0, 5, blank.shape), 0, 255).astype(np.uint8)
    assert detect(noisy).colour is None


def test_checker_rejects_bad_input():
    import pytest
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        detect(np.zeros((64, 64)))

"""Speculative decoding everywhere text is decoded (tiny-a model, greedy): the thinking of generate_image /
edit_image, model-driven interleave (with its stop set <|im_end|>, <|vision_start|>), Conversation turns
(a small-BAGEL draft replayed from the conversation's history) and sample.py's flags all give exactly what
plain decoding gives; bad flag combinations exit 2 before any compute."""

import os
import sys

import numpy as np
import pytest

from bagel_jax.inference import api
from test_engine import HW, SMALL_VAE, SMALL_VIT, _img, _steered_pipeline

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sample  # noqa: E402


@pytest.fixture(scope="module")
def pipe(tiny_a):
    return api.load(tiny_a, dtype="float32", inference=api.InferenceOptions(SMALL_VAE, SMALL_VIT))


def test_thinking_with_draft_equals_plain(pipe):
    kw = dict(think=True, max_think_tokens=10, num_timesteps=3)
    plain = pipe.generate_image("A red cat.", image_size=HW, **kw)
    spec = pipe.generate_image("A red cat.", image_size=HW, draft="ngram", speculate=2, **kw)
    assert spec.thinking == plain.thinking and np.array_equal(spec.arrays, plain.arrays)
    plain = pipe.edit_image(_img(32, 32), "Make it blue.", **kw)
    spec = pipe.edit_image(_img(32, 32), "Make it blue.", draft=pipe, speculate="auto", **kw)
    assert spec.thinking == plain.thinking and np.array_equal(spec.arrays, plain.arrays)


def test_interleave_with_draft_equals_plain(pipe):
    prompt = "Tell a story."
    steered = _steered_pipeline(pipe, prompt)     # emits <|vision_start|> mid-text: the interleave stop set
    kw = dict(mode="model", image_size=HW, num_timesteps=3, max_text_length=12, max_interleaved_blocks=3)
    plain = steered.interleave(prompt, **kw)
    spec = steered.interleave(prompt, draft="ngram", speculate=3, **kw)
    assert plain.ok and spec.ok, (plain.error, spec.error)
    assert [k for k, _ in plain.items] == [k for k, _ in spec.items] == ["text", "image", "text"]
    assert spec.texts == plain.texts
    assert np.array_equal(np.asarray(spec.images[0]), np.asarray(plain.images[0]))


def test_conversation_with_draft_equals_plain(pipe):
    def turns(**defaults):
        conv = pipe.conversation(max_new_tokens=8, **defaults)
        conv.add_image(_img(32, 32))
        return [conv.ask("What is it?"), conv.ask("And the colour?", progress=True)]

    plain = turns()
    assert turns(draft=pipe, speculate=3) == plain       # the target as a BAGEL draft, replayed per turn
    assert turns(draft="ngram", speculate="auto") == plain


def test_cli_speculative_flags(pipe, tiny_a, tmp_path, capsys):
    common = ["--model-path", tiny_a, "--vae-transform", "256,32,16", "--vit-transform", "256,28,14",
              "--compilation-cache", str(tmp_path / "jaxcache"), "--no-progress", "--dtype", "float32"]

    def run(*args, out="o"):
        return sample.main([args[0], *common, "--out", str(tmp_path / out), *args[1:]])

    q = ["understand", "--question", "What is it?", "--max-new-tokens", "8"]
    for bad, msg in ((["--speculate", "3"], "--speculate needs a draft"),
                     (["--draft", "ngram", "--draft-model", str(tmp_path)], "not both"),
                     (["--draft", "ngram", "--speculate", "0"], "--speculate must be >= 1"),
                     (["--draft", "ngram", "--speculate", "x"], "integer >= 1 or 'auto'"),
                     (["--draft-model", str(tmp_path / "none")], "folder not found")):
        assert run(*q, *bad) == 2 and msg in capsys.readouterr().err
    assert run("generate", "--prompt", "a cat", "--draft", "ngram") == 2
    assert "decodes none without --think" in capsys.readouterr().err
    assert run(*q, out="plain") == 0
    plain = capsys.readouterr().out
    assert run(*q, "--draft", "ngram", "--speculate", "auto", out="spec") == 0
    assert capsys.readouterr().out == plain
    assert run(*q, "--draft-model", tiny_a, "--speculate", "2", out="spec2") == 0    # a BAGEL folder as draft
    assert capsys.readouterr().out == plain

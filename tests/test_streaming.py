"""Streaming: chunked decoding equals one call; a streamed interleave yields its first text before
its first image is finished and equals the plain result; conversation turns and the think phase stream;
errors reach the consumer; closing a stream stops the call. Embedded demo model, 32x32 images, few steps."""

import os
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "bagel_jax", "assets", "demo")
IMG = dict(num_timesteps=4)


@pytest.fixture(scope="module")
def pipe():
    if not os.path.isfile(os.path.join(DEMO, "ema.safetensors")):
        pytest.skip("no embedded demo model in this checkout")
    from bagel_jax.inference.api import load
    return load(DEMO, dtype="float32")


def _same_items(a, b):
    assert [k for k, _ in a] == [k for k, _ in b]
    for (k, x), (_, y) in zip(a, b):
        if k == "image":
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        else:
            assert x == y


def test_chunked_decode_equals_one_call(pipe, monkeypatch):
    """Same tokens for every chunk size (sampling on, so the per-step keys matter); the pieces handed to
    on_text concatenate to each row's text; one compiled call (one host round-trip) per chunk."""
    from bagel_jax.inference import decode
    from bagel_jax.inference.context import Context
    from bagel_jax.inference.decode import SamplingParams, generate_text
    import jax

    calls = []
    real = decode.decode_chunk
    monkeypatch.setattr(decode, "decode_chunk", lambda *a, **k: calls.append(1) or real(*a, **k))

    ctx = Context.new(pipe.engine, 2, track_cfg=False).add_text(["a red circle on the left", "a blue star"])
    sp = SamplingParams(do_sample=True, temperature=1.0)
    keys = [jax.random.PRNGKey(7), jax.random.PRNGKey(8)]
    ref = generate_text(ctx, 20, sp, keys, stop_tokens=[-1])
    assert all(len(t) == 20 for t in ref.token_ids)
    assert len(calls) == 1
    for chunk in (1, 3, 20):
        pieces, calls[:] = {0: [], 1: []}, []
        r = generate_text(ctx, 20, sp, keys, stop_tokens=[-1], chunk=chunk,
                          on_text=lambda b, p: pieces[b].append(p))
        for b in range(2):
            np.testing.assert_array_equal(r.token_ids[b], ref.token_ids[b])
            assert "".join(pieces[b]) == ref.texts[b]
        assert len(calls) == -(-20 // chunk)
        if chunk == 1:
            assert len(pieces[0]) > 1          # streamed, not one piece at the end


def test_streamed_interleave_first_text_before_first_image_and_equal(pipe):
    """The acceptance test: text is yielded (and received) before the first image exists; the events
    rebuild the plain call's items; the done event holds the same result."""
    from bagel_jax.inference import streaming

    kw = dict(mode="auto", num_images=2, max_text_length=24, seed=3, **IMG)
    plain = pipe.interleave("a blue square on the right", **kw)
    assert plain.ok and plain.items[0][0] == "text"
    got = []
    for ev in pipe.stream_interleave("a blue square on the right", chunk=2, **kw):
        got.append((ev, time.monotonic()))
    kinds = [ev.kind for ev, _ in got]
    assert kinds[-1] == "done" and kinds.count("image") == 2
    first_image = kinds.index("image")
    assert "text" in kinds[:first_image]
    first_text_received = next(t for ev, t in got if ev.kind == "text")
    image_ev = got[first_image][0]
    assert first_text_received < image_ev.t     # the consumer had the text while the image was being made
    assert [ev.t for ev, _ in got] == sorted(ev.t for ev, _ in got)
    _same_items(streaming.collect_items(ev for ev, _ in got), plain.items)
    _same_items(got[-1][0].value.items, plain.items)
    # explicit mode: the prompt's segments are not decoded; they are streamed whole, in order
    explicit = "first <|vision_start|> second"
    plain = pipe.interleave(explicit, mode="explicit", **IMG)
    _same_items(streaming.collect_items(pipe.stream_interleave(explicit, mode="explicit", **IMG)), plain.items)


def test_stream_think_phase_and_conversation_turns(pipe):
    from bagel_jax.inference import streaming

    plain = pipe.generate_image("a green triangle", think=True, max_think_tokens=12, **IMG)
    evs = list(pipe.stream_generate_image("a green triangle", think=True, max_think_tokens=12, chunk=4, **IMG))
    assert [e.kind for e in evs][-2:] == ["image", "done"]
    assert "".join(e.value for e in evs if e.kind == "think") == plain.thinking[0]
    np.testing.assert_array_equal(np.asarray(evs[-2].value), plain.arrays[0])

    a, b = pipe.conversation(max_new_tokens=10, **IMG), pipe.conversation(max_new_tokens=10, **IMG)
    want = [a.ask("what is it?"), a.generate_image("a red circle"), a.ask("and now?")]
    s1 = b.stream("ask", "what is it?", chunk=3)
    t1 = "".join(e.value for e in s1 if e.kind == "text")
    s2 = list(b.stream("generate_image", "a red circle"))
    s3 = b.stream("ask", "and now?")
    t3 = "".join(e.value for e in s3 if e.kind == "text")
    assert (t1, t3) == (want[0], want[2]) and s3.result == want[2]
    np.testing.assert_array_equal(np.asarray(s2[0].value), np.asarray(want[1]))
    assert streaming.active() is None          # the sink lives only in the worker thread


def test_stream_errors_and_cancel(pipe):
    from bagel_jax.images import ImageError
    from bagel_jax.inference import streaming

    with pytest.raises(ImageError, match="not supported"):
        list(pipe.stream_generate_image("x", image_size=(30, 30)))
    with pytest.raises(ValueError, match="chunk"):
        pipe.stream_understand(None, "q", chunk=0)
    conv = pipe.conversation(max_new_tokens=40)
    s = conv.stream("ask", "tell me more", chunk=1)
    first = next(iter(s))
    assert first.kind == "text"
    s.cancel()                                  # returns once the worker has stopped
    assert not s._thread.is_alive() and s.sink.cancelled.is_set()
    with pytest.raises(streaming.Cancelled):
        s.sink.emit("text", "late")


@pytest.mark.parametrize("step_cache", ["none", "taylorseer"])
def test_cancel_stops_an_image_between_flow_steps(pipe, monkeypatch, step_cache):
    """Cancelling a streamed image generation stops it at the next flow step: the compiled sampler asks the
    host before every step (``streaming.stop_requested``) and, once cancelled, runs no further step (the
    per-step progress callback sits inside the step) and no VAE decode; the call ends with ``Cancelled`` and
    no image. Here the cancel arrives at the third step's check."""
    import jax

    from bagel_jax.inference import progress, streaming

    ticks, asked = [], []
    monkeypatch.setattr(progress, "tick", lambda kind, step, total, postfix="": ticks.append(int(step)))
    real = streaming.stop_requested

    def stop(token):
        asked.append(int(token))
        if len(asked) == 3:
            streaming._live[int(token)].cancelled.set()
        return real(token)

    monkeypatch.setattr(streaming, "stop_requested", stop)
    s = pipe.stream_generate_image("a red circle", num_timesteps=12, step_cache=step_cache, progress=True)
    with pytest.raises(streaming.Cancelled):
        for ev in s:
            assert ev.kind != "image"
    jax.effects_barrier()
    assert ticks == [1, 2]                       # steps 1 and 2 ran, steps 3..11 were skipped
    assert len(asked) == 11 + 1 and len(set(asked)) == 1     # one check per step, one before the decode
    assert not streaming.stop_requested(asked[0] + 10_000)   # an unknown sink is not cancelled

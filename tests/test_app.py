"""The web app's handlers without a browser: settings come from ImageParams (no second defaults
table), results stream out of the handlers as the pipeline produces them, bad input and failures become a
status message, Stop ends a running call, the command line refuses bad arguments. A stand-in pipeline
keeps these tests fast; tests/test_app_browser.py runs the real page on the demo model."""

import dataclasses
import os
import threading

import pytest
from PIL import Image

pytest.importorskip("gradio", reason="the app needs gradio (pip install -e '.[app]')")

from bagel_jax.app import handlers as H  # noqa: E402
from bagel_jax.inference import streaming  # noqa: E402
from bagel_jax.inference.cfg import ImageParams  # noqa: E402


class FakePipe:
    """Streams like the real pipeline: text pieces through the active sink, images via emit_images."""

    default_image_size = (32, 32)

    def __init__(self):
        self.calls = []
        self.release = threading.Event()

    def generate_image(self, prompt, image_size=None, think=False, **kw):
        self.calls.append(("generate", prompt, image_size, kw))
        if think:
            with streaming.text_kind("think"):     # as Pipeline._think
                for piece in ("I will ", "draw it"):
                    streaming.active().text(0, piece)
        rows = prompt if isinstance(prompt, list) else [prompt]
        imgs = [Image.new("RGB", image_size, (0, 0, 10 * i)) for i in range(len(rows))]
        streaming.emit_images(imgs)
        return imgs

    def interleave(self, inputs, on_item=None, **kw):
        """Like the real one: decoded pieces, then the text item; an image; a segment that was not decoded."""
        from bagel_jax.inference.conversation import InterleaveResult

        img = Image.new("RGB", (32, 32))
        for piece in ("once ", "upon"):
            streaming.active().text(0, piece)
        on_item(("text", "once upon"))
        streaming.emit_images([img])
        on_item(("image", img))
        on_item(("text", "the end"))
        return InterleaveResult([("text", "once upon"), ("image", img), ("text", "the end")])

    def understand(self, image, question, **kw):
        sink = streaming.active()
        while not self.release.is_set():          # decodes "forever" until released or stopped
            sink.text(0, "blue ")
            self.release.wait(0.01)
        return "done"


def _last(gen):
    out = list(gen)
    return out, out[-1]


def test_settings_come_from_image_params():
    for edit, ref in ((False, ImageParams.t2i()), (True, ImageParams.edit())):
        d = H.image_defaults(edit)
        assert list(d) == list(H.IMAGE_FIELDS)
        assert ImageParams.fill(edit, **H.image_kwargs([d[k] for k in H.IMAGE_FIELDS])) == ref
    assert set(H.IMAGE_FIELDS) == {f.name for f in dataclasses.fields(ImageParams)} - {"cfg_interval"} | \
        {"cfg_interval_lo", "cfg_interval_hi"}


def test_parse_size():
    assert H.parse_size("32x48") == (32, 48) and H.parse_size(" 64 ") == (64, 64)
    for bad in ("", "axb", "32x", None):
        with pytest.raises(ValueError, match="image size must be HxW"):
            H.parse_size(bad)


def test_generate_streams_thinking_then_image():
    h = H.Handlers(FakePipe())
    settings = [H.image_defaults(False)[k] for k in H.IMAGE_FIELDS]
    out, last = _last(h.generate("a blue square", "32x32", 0, True, 100, *settings))
    thinking = [o[1] for o in out]
    assert "I will " in thinking and "I will draw it" in thinking      # grows piece by piece
    assert isinstance(last[0], Image.Image) and last[2].startswith("done")
    (_, prompt, size, kw), = h.pipe.calls
    assert (prompt, size, kw["num_timesteps"], kw["cfg_interval"]) == ("a blue square", (32, 32), 50, (0.4, 1.0))


def test_handlers_remove_their_image_folder():
    """The folder of the images the page links to goes with the handlers (or at exit), not left in /tmp."""
    import gc

    h = H.Handlers(FakePipe())
    tmp = h.tmp
    assert os.path.isdir(tmp)
    del h
    gc.collect()
    assert not os.path.exists(tmp)


def test_batch_yields_each_image():
    h = H.Handlers(FakePipe())
    settings = [H.image_defaults(False)[k] for k in H.IMAGE_FIELDS]
    out, last = _last(h.batch("a\nb\n", 2, "32", 5, *settings))
    assert [len(o[0]) for o in out if o[1].endswith("images")][-1] == 4 and last[1].startswith("4 images in")
    assert [cap for _, cap in last[0]] == ["a", "a", "b", "b"]


def test_interleave_streams_blocks_in_order():
    h = H.Handlers(FakePipe())
    settings = [H.image_defaults(False)[k] for k in H.IMAGE_FIELDS]
    out, last = _last(h.interleave("a story", None, "auto", 1, False, "32x32", 0, 500, *settings))
    assert [m["content"] for m in out[1][0]] == ["a story", "once "]               # the first piece alone
    msgs = last[0]
    assert [m["content"] for m in msgs[:2]] + [m["content"] for m in msgs[3:]] == ["a story", "once upon", "the end"]
    assert msgs[2]["content"]["path"].endswith(".png") and last[1] == "done: 1 image(s)"


class FakeConversation:
    has_image = False

    def ask(self, text, **kw):
        for piece in ("it is ", "blue"):
            streaming.active().text(0, piece)
        return "it is blue"


def test_chat_clears_the_message_box_once():
    """The message and attachment boxes are cleared by the turn's first update only; the later (streaming)
    updates leave them, so that the next message typed meanwhile is not wiped."""
    import gradio as gr

    pipe = FakePipe()
    pipe.conversation = lambda seed=0: FakeConversation()
    out, last = _last(H.Handlers(pipe).chat("what colour?", None, "ask", [], None, "32x32", False, 0, 50, 100,
                                            False, 0.3, 0, 1.0))
    assert out[0][2:4] == ("", None) and len(out) > 2 and last[-1] == "done"
    assert all(o[2] == gr.skip() and o[3] == gr.skip() for o in out[1:])
    assert [m["content"] for m in last[0]] == ["what colour?", "it is blue"]


def test_bad_input_is_a_status_message():
    h = H.Handlers(FakePipe())
    settings = [H.image_defaults(True)[k] for k in H.IMAGE_FIELDS]
    _, last = _last(h.edit(None, "make it red", 0, False, 100, *settings))
    assert last[-1] == "Error: upload an image to edit"
    _, last = _last(h.generate("x", "30 by 30", 0, False, 100, *settings))
    assert last[-1].startswith("Error: image size must be HxW")
    _, last = _last(h.understand(None, "  ", False, 0, 100, False, 0.3, 0, 1.0))
    assert last[-1] == "Error: enter a question"
    _, last = _last(h.chat("", None, "ask", [], None, "32x32", False, 0, 50, 100, False, 0.3, 0, 1.0))
    assert last[-1] == "Error: type a message or attach an image"


def test_stop_ends_a_running_call():
    pipe = FakePipe()
    h = H.Handlers(pipe)
    gen = h.understand(None, "what colour?", False, 0, 100, False, 0.3, 0, 1.0)
    first = next(gen)
    assert first == ("", "decoding...")
    assert next(gen)[0].startswith("blue")                 # streaming
    assert h.stop() == "Stopped."
    rest = list(gen)
    assert rest[-1][-1] == "Stopped." and not h._active
    assert h.stop() == "Nothing is running."


def test_cli_refuses_bad_arguments(tmp_path, capsys):
    from bagel_jax.app.__main__ import main

    assert main(["--model-path", str(tmp_path / "absent")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert main(["--port", "70000"]) == 2

"""The web app's request handlers: plain Python generators over one shared :class:`~bagel_jax.inference.api.Pipeline`,
testable without a browser (``tests/test_app.py`` calls them directly).

Every handler yields tuples of its outputs as results stream in (text pieces, each image when decoded), its
last output being a status line. Any failure becomes a status line ``Error: ...`` (the page stays alive);
:meth:`Handlers.stop` ends the running call at its next chunk or flow step (status ``Stopped.``). Image settings
arrive in the order of :data:`IMAGE_FIELDS` (:class:`~bagel_jax.inference.cfg.ImageParams`'s fields, the one
place of their defaults) and text settings in the order of :data:`TEXT_FIELDS`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import threading
import time
import weakref
from typing import Optional

from ..inference import streaming
from ..inference.cfg import ImageParams

# ImageParams fields as the page shows them: cfg_interval is two numbers (lo, hi)
IMAGE_FIELDS = tuple(f.name for f in dataclasses.fields(ImageParams) if f.name != "cfg_interval") + \
    ("cfg_interval_lo", "cfg_interval_hi")
TEXT_FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p")
DEFAULT_CHUNK = 8    # tokens per compiled decoding call while streaming into the page
ACTIONS = ("ask", "image", "edit")


def image_defaults(edit: bool) -> dict:
    """The page's default image settings: ``ImageParams.edit()`` or ``.t2i()`` in :data:`IMAGE_FIELDS` order."""
    d = dataclasses.asdict(ImageParams.edit() if edit else ImageParams.t2i())
    lo, hi = d.pop("cfg_interval")
    return dict(d, cfg_interval_lo=lo, cfg_interval_hi=hi)


def image_kwargs(values) -> dict:
    """Image settings from the page (:data:`IMAGE_FIELDS` order) -> keyword arguments of the pipeline."""
    d = dict(zip(IMAGE_FIELDS, values))
    d["cfg_interval"] = (d.pop("cfg_interval_lo"), d.pop("cfg_interval_hi"))
    d["num_timesteps"] = _int("num_timesteps", d["num_timesteps"])
    return d


def text_kwargs(values) -> dict:
    d = dict(zip(TEXT_FIELDS, values))
    d["max_new_tokens"] = _int("max_new_tokens", d["max_new_tokens"])
    d["top_k"] = _int("top_k", d["top_k"])
    return d


def _int(name: str, v) -> int:
    if v is None or float(v) != int(float(v)):
        raise ValueError(f"{name} must be a whole number, got {v!r}")
    return int(float(v))


def parse_size(text) -> tuple:
    """``"HxW"`` or one number -> (H, W); the pipeline then checks the model's limits."""
    s = str(text or "").strip().lower().replace(" ", "")
    try:
        h, w = s.split("x") if "x" in s else (s, s)
        return int(h), int(w)
    except ValueError:
        raise ValueError(f"image size must be HxW (e.g. 32x32) or one number, got {text!r}") from None


def _copy(msgs: list) -> list:
    """A snapshot of chat messages (later pieces extend the last message in place)."""
    return [dict(m) for m in msgs]


def _seed(v) -> int:
    return _int("seed", 0 if v is None else v)


class Handlers:
    """The app's handlers over one loaded pipeline (loaded once, shared by every request; the page's queue
    runs one request at a time)."""

    def __init__(self, pipe, chunk: int = DEFAULT_CHUNK):
        self.pipe = pipe
        self.chunk = chunk
        self.default_size = "x".join(str(x) for x in pipe.default_image_size)
        self.tmp = tempfile.mkdtemp(prefix="bagel_jax_app_")   # the images the page links to; removed with the handlers
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.tmp, True)   # (or at exit)
        self._lock = threading.Lock()
        self._active: set = set()
        self._n_files = 0

    # -- plumbing ------------------------------------------------------------------------------------------
    def _events(self, fn, *args, **kw):
        """Stream ``fn`` and register it so that :meth:`stop` can end it."""
        s = streaming.stream(fn, *args, chunk=self.chunk, **kw)
        with self._lock:
            self._active.add(s)
        try:
            yield from s
        finally:
            with self._lock:
                self._active.discard(s)

    def stop(self) -> str:
        """End every running call at its next chunk or flow step (without waiting)."""
        with self._lock:
            active = list(self._active)
        for s in active:
            s.sink.cancelled.set()
        return "Stopped." if active else "Nothing is running."

    @staticmethod
    def _guarded(gen, n_out: int):
        """Run a handler generator; an exception becomes a final status ``Error: ...`` (other outputs kept)."""
        import gradio as gr   # optional dependency (the [app] extra): handlers run in tests without it

        try:
            yield from gen
        except streaming.Cancelled:
            yield tuple([gr.skip()] * (n_out - 1)) + ("Stopped.",)
        except Exception as e:   # shown in the page; the app stays usable
            msg = str(e) or type(e).__name__
            yield tuple([gr.skip()] * (n_out - 1)) + (f"Error: {msg}",)

    def save(self, image) -> str:
        """Write a PIL image as PNG under the app's temp folder (chat messages show files)."""
        self._n_files += 1
        path = os.path.join(self.tmp, f"image_{self._n_files:05d}.png")
        image.save(path)
        return path

    # -- generate / batch / edit ---------------------------------------------------------------------------
    def generate(self, prompt, size, seed, think, max_think_tokens, *settings):
        """-> (image, thinking, status) as they arrive."""
        yield from self._guarded(self._images(False, None, prompt, size, seed, think, max_think_tokens, settings), 3)

    def edit(self, image, instruction, seed, think, max_think_tokens, *settings):
        """-> (image, thinking, status). No image is an error message."""
        yield from self._guarded(self._images(True, image, instruction, None, seed, think, max_think_tokens,
                                          settings), 3)

    def _images(self, edit, image, prompt, size, seed, think, max_think_tokens, settings):
        if not str(prompt or "").strip():
            raise ValueError("enter an instruction" if edit else "enter a prompt")
        kw = dict(image_kwargs(settings), seed=_seed(seed), think=bool(think),
                  max_think_tokens=_int("max_think_tokens", max_think_tokens))
        if edit:
            if image is None:
                raise ValueError("upload an image to edit")
            stream = self._events(self.pipe.edit_image, image, prompt, **kw)
        else:
            stream = self._events(self.pipe.generate_image, prompt, image_size=parse_size(size), **kw)
        t0, thinking = time.time(), ""
        yield None, "", "thinking..." if think else f"denoising ({kw['num_timesteps']} steps)..."
        for ev in stream:
            if ev.kind == "think":
                thinking += ev.value
                yield None, thinking, f"thinking... {len(thinking)} characters"
            elif ev.kind == "image":
                yield ev.value, thinking, f"done in {time.time() - t0:.1f} s"

    def batch(self, prompts, n, size, seed, *settings):
        """One prompt per line, ``n`` images each (seeds seed, seed+1, ...: one batched program) ->
        (gallery, status)."""
        yield from self._guarded(self._batch(prompts, n, size, seed, settings), 2)

    def _batch(self, prompts, n, size, seed, settings):
        lines = [p.strip() for p in str(prompts or "").splitlines() if p.strip()]
        n = _int("images per prompt", n)
        if not lines or n < 1:
            raise ValueError("enter at least one prompt (one per line) and at least 1 image per prompt")
        rows = [p for p in lines for _ in range(n)]
        t0, done = time.time(), []
        yield [], f"generating {len(rows)} images..."
        for ev in self._events(self.pipe.generate_image, rows, image_size=parse_size(size), seed=_seed(seed),
                               **image_kwargs(settings)):
            if ev.kind == "image":
                done.append((ev.value, rows[ev.row]))
                yield list(done), f"{len(done)}/{len(rows)} images"
        yield list(done), f"{len(rows)} images in {time.time() - t0:.1f} s"

    # -- understand ----------------------------------------------------------------------------------------
    def understand(self, image, question, think, seed, *text_settings):
        """-> (answer, status), the answer growing as it is decoded."""
        yield from self._guarded(self._understand(image, question, think, seed, text_settings), 2)

    def _understand(self, image, question, think, seed, text_settings):
        if not str(question or "").strip():
            raise ValueError("enter a question")
        answer, t0 = "", time.time()
        yield "", "decoding..."
        for ev in self._events(self.pipe.understand, image, question, think=bool(think), seed=_seed(seed),
                               **text_kwargs(text_settings)):
            if ev.kind == "text":
                answer += ev.value
                yield answer, "decoding..."
        yield answer, f"done in {time.time() - t0:.1f} s"

    # -- interleave ----------------------------------------------------------------------------------------
    def interleave(self, prompt, image, mode, num_images, think, size, seed, max_text_length, *settings):
        """-> (messages, status): text blocks grow as decoded, each image appears when decoded."""
        yield from self._guarded(self._interleave(prompt, image, mode, num_images, think, size, seed,
                                              max_text_length, settings), 2)

    def _interleave(self, prompt, image, mode, num_images, think, size, seed, max_text_length, settings):
        if not str(prompt or "").strip():
            raise ValueError("enter a prompt")
        inputs = ([image] if image is not None else []) + [prompt]
        msgs = [{"role": "user", "content": prompt}]
        yield _copy(msgs), "generating..."
        result, block = None, {"kind": None}
        for ev in self._events(self.pipe.interleave, inputs, mode=mode, num_images=_int("images", num_images),
                               think=bool(think), image_size=parse_size(size), seed=_seed(seed),
                               max_text_length=_int("max text length", max_text_length),
                               on_item=streaming.item_hook(), **image_kwargs(settings)):
            if ev.kind == "done":
                result = ev.value
            else:
                self._add_piece(msgs, ev, block)
                yield _copy(msgs), "generating..."
        if result is not None and result.error is not None:
            raise result.error
        yield _copy(msgs), f"done: {len(result.images) if result else 0} image(s)"

    def _add_piece(self, msgs: list, ev, block: dict) -> None:
        """Append a streamed event to chat messages: the pieces of one text block (``block["kind"]``, the
        kind of the block being written, None after an image) extend one message."""
        if ev.kind == "image":
            msgs.append({"role": "assistant", "content": {"path": self.save(ev.value)}})
            block["kind"] = None
        elif block["kind"] == ev.kind:
            msgs[-1]["content"] += ev.value
        else:
            msgs.append({"role": "assistant", "content": ("(thinking) " if ev.kind == "think" else "") + ev.value})
            block["kind"] = ev.kind

    # -- chat ----------------------------------------------------------------------------------------------
    def chat(self, message, image, action, history, conv, size, think, seed, *settings):
        """One chat turn: an optional uploaded image, then ``action`` ("ask": a text answer; "image": a new
        image; "edit": edit the latest image) on ``message``. ``settings``: num_timesteps, then
        :data:`TEXT_FIELDS`. The conversation (``conv``, a
        :class:`~bagel_jax.inference.conversation.Conversation` kept in the session) holds every turn.
        -> (history, conv, message box, image box, status)."""
        yield from self._guarded(self._chat(message, image, action, list(history or []), conv, size, think, seed,
                                        settings), 5)

    def _chat(self, message, image, action, history, conv, size, think, seed, settings):
        text = str(message or "").strip()
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        if not text and image is None:
            raise ValueError("type a message or attach an image")
        if action != "ask" and not text:
            raise ValueError(f"'{action}' needs a prompt")
        num_timesteps, txt_kw = _int("num_timesteps", settings[0]), text_kwargs(settings[1:])
        if conv is None:
            conv = self.pipe.conversation(seed=_seed(seed))
        if action == "edit" and image is None and not conv.has_image:
            raise ValueError("edit: the conversation has no image yet; attach one or make one with 'image'")
        if image is not None:
            conv.add_image(image)
            history.append({"role": "user", "content": {"path": self.save(conv.history[-1][2])}})
        if text:
            history.append({"role": "user", "content": text})
        yield _copy(history), conv, "", None, "working..."
        # the message and attachment boxes are cleared once, above; later updates leave them as they are, so
        # that what the user types meanwhile (the next turn) is not wiped by a streaming update
        import gradio as gr   # optional dependency, as in _guarded
        skip = gr.skip
        if not text:
            yield _copy(history), conv, skip(), skip(), "image added"
            return
        if action == "ask":
            stream = self._events(conv.ask, text, **txt_kw)
        else:
            # the conversation picks the editing or text-to-image defaults for the other settings
            kw = dict(think=bool(think), max_think_tokens=txt_kw["max_new_tokens"], num_timesteps=num_timesteps)
            if action == "image":
                kw["image_size"] = parse_size(size)
            stream = self._events(conv.edit if action == "edit" else conv.generate_image, text, **kw)
        block = {"kind": None}
        for ev in stream:
            if ev.kind != "done":
                self._add_piece(history, ev, block)
                yield _copy(history), conv, skip(), skip(), "working..."
        yield _copy(history), conv, skip(), skip(), "done"

    @staticmethod
    def reset():
        """A new conversation: (history, conv, status)."""
        return [], None, "new conversation"


def make_handlers(pipe, chunk: Optional[int] = None) -> Handlers:
    return Handlers(pipe, chunk or DEFAULT_CHUNK)
